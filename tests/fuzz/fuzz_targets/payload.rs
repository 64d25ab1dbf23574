//! Dead-letter payloads are untrusted: restoring arbitrary bytes never
//! panics and never expands past the cap; storing then restoring is exact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::store::deadletter::{DeadLetterTable, restore_payload};

fuzz_target!(|data: &[u8]| {
    let cap = 64 * 1024;
    if let Ok(out) = restore_payload(data, "gzip", cap) {
        assert!(out.len() <= cap);
    }
    let table = DeadLetterTable {
        schema: "s".into(),
        name: "t".into(),
        group: "g".into(),
        compress_over_bytes: 64,
        max_payload_bytes: 4096,
    };
    let stored = table.store_payload(data);
    let restored = restore_payload(&stored.bytes, stored.encoding, 1 << 20).expect("own payloads restore");
    assert_eq!(&restored[..], &data[..data.len().min(4096)]);
});
