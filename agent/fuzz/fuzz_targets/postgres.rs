#![no_main]

use libfuzzer_sys::fuzz_target;
use poolscope::protocol::DbSystem;

fuzz_target!(|data: &[u8]| poolscope_fuzz::feed(DbSystem::Postgresql, data));
