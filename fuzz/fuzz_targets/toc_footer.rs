//! The reader's view of a blob's tail: footer, TOC frame, TOC payload, TOC JSON and
//! `Toc::validate`. Whatever the bytes, parsing returns an error or a TOC that satisfies
//! every invariant the snapshotter relies on when it builds a FUSE tree from it.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use faasnet_format::footer::toc_payload;
use faasnet_format::{parse_tail, parse_toc_frame, Footer, TailParse, Toc, FOOTER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let (mode, rest) = (data[0], &data[1..]);
    match mode % 4 {
        // The bytes are the tail of a blob whose size is the tail plus a prefix.
        0 => {
            let (prefix, tail) = match rest.len() {
                n if n >= 4 => (
                    u32::from_le_bytes(rest[..4].try_into().unwrap()),
                    &rest[4..],
                ),
                _ => (0, rest),
            };
            let blob_size = tail.len() as u64 + prefix as u64;
            match parse_tail(tail, blob_size) {
                Ok(TailParse::Complete(toc, footer)) => {
                    check_toc(&toc, footer.toc_offset);
                    assert_eq!(toc.block_size, footer.block_size);
                    assert!(
                        footer.toc_offset + footer.toc_length + FOOTER_SIZE as u64 == blob_size
                    );
                }
                Ok(TailParse::NeedToc(footer)) => {
                    assert!(footer.toc_offset < blob_size - tail.len() as u64);
                    // Whatever a server sends back for the TOC range.
                    if let Ok(toc) = parse_toc_frame(tail, &footer) {
                        check_toc(&toc, footer.toc_offset);
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        // A footer on its own, then the rest as its TOC frame.
        1 => {
            if rest.len() < FOOTER_SIZE {
                return;
            }
            let (frame, footer) = rest.split_at(rest.len() - FOOTER_SIZE);
            let blob_size = (frame.len() + FOOTER_SIZE) as u64;
            if let Ok(f) = Footer::parse(footer, blob_size) {
                assert_eq!(Footer::parse(&f.to_bytes(), blob_size).unwrap(), f);
                if let Ok(p) = toc_payload(frame, &f) {
                    assert!(p.len() + 8 == frame.len());
                }
                if let Ok(toc) = parse_toc_frame(frame, &f) {
                    check_toc(&toc, f.toc_offset);
                }
            }
        }
        // A TOC payload (LZ4 block, size prepended).
        2 => {
            let blocks_end = rest.len() as u64 * 7;
            if let Ok(toc) = Toc::from_payload(rest, blocks_end) {
                check_toc(&toc, blocks_end);
            }
        }
        // TOC JSON, as the snapshotter's disk cache of TOCs holds it.
        _ => {
            if let Ok(toc) = serde_json::from_slice::<Toc>(rest) {
                if toc.validate(toc.stored_size()).is_ok() {
                    check_toc(&toc, toc.stored_size());
                }
            }
        }
    }
});

/// What a validated TOC promises its users (the snapshotter's inode table and block store).
fn check_toc(toc: &Toc, blocks_end: u64) {
    toc.validate(blocks_end).expect("a parsed TOC is valid");
    // Round trip through the payload.
    let again = Toc::from_payload(&toc.to_payload(), blocks_end).expect("re-encoded TOC parses");
    assert_eq!(&again, toc);
    assert_eq!(toc.stored_size(), blocks_end);
    for e in &toc.entries {
        let range = toc.blocks_for_range(e.offset, e.size);
        assert!(range.start <= range.end && range.end <= toc.blocks.len());
        if e.size > 0 {
            assert_eq!(
                range.len() as u64,
                (e.offset + e.size - 1) / toc.block_size as u64 - e.offset / toc.block_size as u64
                    + 1
            );
        }
        assert!(!e.path.starts_with('/') && !e.path.split('/').any(|c| c == ".." || c == "."));
        let _ = e.xattrs_decoded().count();
        let _ = e.name();
        // The FUSE layer turns mtimes into SystemTime exactly like this (fuse_fs::time_of).
        let _ = if e.mtime >= 0 {
            UNIX_EPOCH + Duration::new(e.mtime as u64, e.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(e.mtime.unsigned_abs())
                + Duration::from_nanos(e.mtime_nsec as u64)
        };
    }
}
