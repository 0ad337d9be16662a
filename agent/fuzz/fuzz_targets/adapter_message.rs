#![no_main]

use libfuzzer_sys::fuzz_target;
use poolscope_adapter_protocol::decode;

// Any bytes a local sender writes to the adapter sockets: never a panic (the
// fast path indexes the bytes by hand), and a message that is read and
// written again reads back the same, whichever path read it.
fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode(data) {
        if let Ok(again) = message.encode() {
            assert_eq!(decode(&again).as_ref(), Ok(&message));
        }
    }
});
