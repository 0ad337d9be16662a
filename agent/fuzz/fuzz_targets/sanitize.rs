#![no_main]

use libfuzzer_sys::fuzz_target;
use poolscope::protocol::{sanitize, QUERY_MAX_CHARS};

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    assert!(sanitize(&sql).chars().count() <= QUERY_MAX_CHARS);
});
