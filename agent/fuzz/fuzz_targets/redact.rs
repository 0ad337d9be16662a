#![no_main]

use libfuzzer_sys::fuzz_target;
use poolscope::redact::command_line;

// Arguments split at NUL, as /proc/PID/cmdline has them: any bytes, never a
// panic (slicing at the URL and `=` positions is where one could hide).
fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let _ = command_line(&args);
});
