//! One stored block against a block-table entry that may lie about its sizes: decode_block
//! either returns exactly `raw_len` bytes or an error, never panics, and never allocates more
//! than a block.
#![no_main]

use faasnet_format::{decode_block, encode_block, sha256_digest, BlockEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let raw_len = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let lie = data[4];
    let stored = &data[5..];
    let mut entry = BlockEntry {
        offset: 0,
        stored_len: stored.len() as u64,
        raw_len,
        digest: sha256_digest(stored),
    };
    if lie & 1 == 1 {
        entry.stored_len = entry.stored_len.wrapping_add(lie as u64 >> 1);
    }
    if let Ok(raw) = decode_block(7, &entry, stored) {
        assert_eq!(raw.len(), raw_len as usize);
        assert_eq!(entry.stored_len, stored.len() as u64);
        // What the converter would store for these bytes decodes back to them.
        let again = encode_block(&raw);
        let e2 = BlockEntry {
            offset: 0,
            stored_len: again.stored.len() as u64,
            raw_len: again.raw_len,
            digest: again.digest.clone(),
        };
        assert_eq!(decode_block(0, &e2, &again.stored).unwrap(), raw);
    }
});
