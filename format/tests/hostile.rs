//! Hostile converted layers: every way a TOC, footer or block table can lie is refused with an
//! error naming the problem, before anything could be mounted (docs/reliability.md, "Bad
//! input"). The blobs are rebuilt with a correct TOC digest and footer, so only the
//! validation can catch them. Also the regressions found by the fuzz targets in fuzz/.

use faasnet_format::footer::toc_payload;
use faasnet_format::{
    convert_layer, decode_block, decode_stream, encode_tail, parse_tail, BlockEntry,
    ConvertOptions, ConvertedLayer, EntryKind, Footer, TailParse, Toc,
};

const BS: u32 = 64 * 1024;

fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A layer with a directory, files across several blocks, a symlink and a hardlink.
fn layer() -> (Vec<u8>, Vec<u8>, ConvertedLayer) {
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header("etc/", tar::EntryType::Directory, 0), &[][..])
        .unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    b.append(
        &header("etc/big", tar::EntryType::Regular, big.len() as u64),
        &big[..],
    )
    .unwrap();
    b.append(
        &header("etc/motd", tar::EntryType::Regular, 6),
        &b"hello\n"[..],
    )
    .unwrap();
    let mut l = header("etc/link", tar::EntryType::Symlink, 0);
    l.set_link_name("motd").unwrap();
    l.set_cksum();
    b.append(&l, &[][..]).unwrap();
    let mut h = header("etc/hard", tar::EntryType::Link, 0);
    h.set_link_name("etc/motd").unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let tar = b.into_inner().unwrap();
    let opts = ConvertOptions {
        block_size: BS,
        threads: 1,
        original: None,
        start_bytes: 0,
    };
    let mut blob = Vec::new();
    let layer = convert_layer(&tar[..], &mut blob, &opts, &|_| {}).unwrap();
    assert!(layer.toc.blocks.len() >= 4);
    (tar, blob, layer)
}

/// The blob with `toc` in place of its TOC (correct TOC digest and footer).
fn with_toc(blob: &[u8], layer: &ConvertedLayer, toc: &Toc) -> Vec<u8> {
    let end = layer.footer.toc_offset as usize;
    let mut out = blob[..end].to_vec();
    out.extend_from_slice(&encode_tail(toc, end as u64).0);
    out
}

/// Asserts that every reader path refuses `toc` (validation, tail parsing as the snapshotter
/// does before mounting, streaming decode as the unpack path does) with an error containing
/// `what`.
fn refused(blob: &[u8], layer: &ConvertedLayer, toc: &Toc, what: &str) {
    let err = toc.validate(layer.footer.toc_offset).unwrap_err();
    assert!(err.to_string().contains(what), "validate: {err}");
    let bad = with_toc(blob, layer, toc);
    let err = match parse_tail(&bad, bad.len() as u64) {
        Err(e) => e,
        Ok(TailParse::Complete(..)) => panic!("tail parse accepted a hostile TOC ({what})"),
        Ok(TailParse::NeedToc(_)) => panic!("whole blob given"),
    };
    assert!(err.to_string().contains(what), "parse_tail: {err}");
    let err = decode_stream(&bad[..], std::io::sink()).unwrap_err();
    assert!(err.to_string().contains(what), "decode_stream: {err}");
}

fn entry<'a>(toc: &'a mut Toc, path: &str) -> &'a mut faasnet_format::TocEntry {
    toc.entries.iter_mut().find(|e| e.path == path).unwrap()
}

#[test]
fn the_good_layer_passes() {
    let (tar, blob, layer) = layer();
    let mut out = Vec::new();
    decode_stream(&blob[..], &mut out).unwrap();
    assert_eq!(out, tar);
    let rebuilt = with_toc(&blob, &layer, &layer.toc);
    assert_eq!(rebuilt, blob);
}

#[test]
fn blocks_outside_the_blob_overlapping_or_lying_about_sizes() {
    let (_, blob, layer) = layer();
    let n = layer.toc.blocks.len();

    // The last block runs past the TOC offset (outside the block data).
    let mut t = layer.toc.clone();
    t.blocks[n - 1].stored_len += 10;
    refused(&blob, &layer, &t, "runs past the end of the block data");

    // A block starts inside the previous one.
    let mut t = layer.toc.clone();
    t.blocks[2].offset -= 1;
    refused(&blob, &layer, &t, "overlaps the previous block");

    // A gap between blocks.
    let mut t = layer.toc.clone();
    t.blocks[1].offset += 1;
    refused(&blob, &layer, &t, "leaves a gap");

    // A block table pointing far outside the blob.
    let mut t = layer.toc.clone();
    t.blocks[0].offset = u64::MAX - 5;
    refused(&blob, &layer, &t, "block 0 starts at");

    // A full block that claims fewer tar bytes, and the last one more than a block.
    let mut t = layer.toc.clone();
    t.blocks[0].raw_len -= 1;
    refused(&blob, &layer, &t, "block 0 claims to hold");
    let mut t = layer.toc.clone();
    t.blocks[n - 1].raw_len = BS + 1;
    refused(&blob, &layer, &t, "claims to hold");
    let mut t = layer.toc.clone();
    t.blocks[n - 1].raw_len = 0;
    refused(&blob, &layer, &t, "claims to hold 0");

    // A stored length no LZ4 frame of that content can have.
    let mut t = layer.toc.clone();
    t.blocks[n - 1].stored_len = 10 * BS as u64;
    refused(&blob, &layer, &t, "more than an LZ4 frame can take");
    let mut t = layer.toc.clone();
    t.blocks[0].stored_len = 0;
    refused(&blob, &layer, &t, "stored length of 0");

    // tar_size disagrees with the blocks.
    let mut t = layer.toc.clone();
    t.tar_size += 512;
    refused(&blob, &layer, &t, "blocks hold");

    // A malformed digest.
    let mut t = layer.toc.clone();
    t.blocks[1].digest = "sha256:xyz".into();
    refused(&blob, &layer, &t, "malformed digest");
}

#[test]
fn block_table_lies_are_caught_when_the_block_is_read() {
    // A table that is self-consistent but does not describe the frames: the stored bytes of
    // block 1 shifted by one, with digests recomputed over the shifted ranges. Nothing but the
    // frames themselves can tell; the reader refuses each block before serving a byte of it.
    let (_, blob, layer) = layer();
    let b1 = &layer.toc.blocks[1];
    let lying = BlockEntry {
        offset: b1.offset + 1,
        stored_len: b1.stored_len - 1,
        raw_len: b1.raw_len,
        digest: faasnet_format::sha256_digest(
            &blob[(b1.offset + 1) as usize..(b1.offset + b1.stored_len) as usize],
        ),
    };
    let stored = &blob[lying.offset as usize..(lying.offset + lying.stored_len) as usize];
    let err = decode_block(1, &lying, stored).unwrap_err();
    assert!(err.to_string().contains("block 1: bad LZ4 frame"), "{err}");

    // Right frame, but the table claims a different uncompressed size: the short last block
    // claimed as a full one.
    let n = layer.toc.blocks.len();
    let last = layer.toc.blocks[n - 1].clone();
    let stored = &blob[last.offset as usize..(last.offset + last.stored_len) as usize];
    let claim = BlockEntry {
        raw_len: last.raw_len + 1,
        ..last.clone()
    };
    let err = decode_block(n - 1, &claim, stored).unwrap_err();
    assert!(err.to_string().contains("decodes to"), "{err}");
    let claim = BlockEntry {
        raw_len: last.raw_len - 1,
        ..last.clone()
    };
    let err = decode_block(n - 1, &claim, stored).unwrap_err();
    assert!(err.to_string().contains("decodes to"), "{err}");

    // Stored length differs from the bytes fetched.
    let claim = BlockEntry {
        stored_len: last.stored_len + 1,
        ..last.clone()
    };
    let err = decode_block(n - 1, &claim, stored).unwrap_err();
    assert!(err.to_string().contains("stored length"), "{err}");

    // The streaming decoder sees the real frames and refuses the table that disagrees.
    let mut t = layer.toc.clone();
    t.blocks[1] = lying;
    t.blocks[0].stored_len += 1;
    t.blocks[0].digest = faasnet_format::sha256_digest(&blob[..t.blocks[0].stored_len as usize]);
    t.validate(layer.footer.toc_offset).unwrap(); // consistent, so only the blocks tell
    let bad = with_toc(&blob, &layer, &t);
    let err = decode_stream(&bad[..], std::io::sink()).unwrap_err();
    assert!(
        err.to_string()
            .contains("position differs from the block table"),
        "{err}"
    );
}

#[test]
fn paths_escaping_the_root_are_refused() {
    let (_, blob, layer) = layer();
    for (evil, why) in [
        ("../x", "escapes the layer root"),
        ("/etc/passwd", "escapes the layer root"),
        ("a/../../b", "escapes the layer root"),
        ("etc/../..", "escapes the layer root"),
        ("./etc/motd", "not normalized"),
        ("etc//motd", "not normalized"),
        ("etc/motd/", "not normalized"),
        ("etc/mo\0td", "NUL"),
    ] {
        let mut t = layer.toc.clone();
        entry(&mut t, "etc/motd").path = evil.into();
        refused(&blob, &layer, &t, why);
    }
    // A name Linux cannot hold.
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").path = format!("etc/{}", "n".repeat(256));
    refused(&blob, &layer, &t, "longer than 255");

    // Hardlinks: escaping, absolute, later, missing, or to a directory.
    for (target, why) in [
        ("../etc/shadow", "escapes the layer root"),
        ("/etc/shadow", "escapes the layer root"),
        ("etc/link2", "not an earlier entry"),
        ("", "not an earlier entry"),
        ("etc", "hardlink to the directory"),
    ] {
        let mut t = layer.toc.clone();
        entry(&mut t, "etc/hard").link = Some(target.into());
        refused(&blob, &layer, &t, why);
    }
    // Symlink targets are data (resolved inside the container), but must be a target Linux
    // can store.
    for target in ["", "a\0b"] {
        let mut t = layer.toc.clone();
        entry(&mut t, "etc/link").link = Some(target.into());
        refused(&blob, &layer, &t, "symlink target");
    }
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/link").link = None;
    refused(&blob, &layer, &t, "symlink has no target");
    // Whiteouts that name nothing (or `.` / `..`).
    for w in ["etc/.wh.", "etc/.wh..", "etc/.wh..."] {
        let mut t = layer.toc.clone();
        entry(&mut t, "etc/motd").path = w.into();
        refused(&blob, &layer, &t, "does not name an entry");
    }
    // The root as a file.
    let mut t = layer.toc.clone();
    let mut root = t.entries[0].clone();
    root.path = String::new();
    root.kind = EntryKind::File;
    t.entries[0] = root;
    refused(&blob, &layer, &t, "root is not a directory");
}

#[test]
fn entries_outside_the_stream_or_overlapping_are_refused() {
    let (_, blob, layer) = layer();
    // Data past the end of the tar stream.
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").size = t.tar_size;
    refused(&blob, &layer, &t, "outside the");
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").offset = u64::MAX - 511;
    refused(&blob, &layer, &t, "outside the");

    // Two files sharing data, a file inside another one's data, an offset inside a header.
    let big = layer.toc.entries[1].clone();
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").offset = big.offset;
    refused(&blob, &layer, &t, "overlaps the previous entry");
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").offset = big.offset + 1024;
    refused(&blob, &layer, &t, "overlaps the previous entry");
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").offset += 100;
    refused(&blob, &layer, &t, "overlaps the previous entry");
    let mut t = layer.toc.clone();
    t.entries[0].offset = 0;
    refused(&blob, &layer, &t, "overlaps the previous entry");

    // Data on something that is not a file.
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/link").size = 1;
    refused(&blob, &layer, &t, "not a regular file but has data");
}

#[test]
fn absurd_counts_and_values_are_refused() {
    let (_, blob, layer) = layer();
    // More entries than the tar stream has headers for.
    let mut t = layer.toc.clone();
    let e = t.entries[2].clone();
    let n = (t.tar_size / 512) as usize + 1;
    t.entries = (0..n)
        .map(|i| {
            let mut e = e.clone();
            e.path = format!("f{i}");
            e.size = 0;
            e.offset = 512 * (i as u64 + 1);
            e
        })
        .collect();
    refused(&blob, &layer, &t, "more than a");

    // mtime_nsec of a second or more: fuse_fs::time_of would overflow on a large mtime.
    let mut t = layer.toc.clone();
    let m = entry(&mut t, "etc/motd");
    m.mtime = i64::MAX;
    m.mtime_nsec = 1_500_000_000;
    refused(&blob, &layer, &t, "not below one second");

    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").uid = 1 << 32; // would wrap to root
    refused(&blob, &layer, &t, "out of range");

    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").mode = 0o170644;
    refused(&blob, &layer, &t, "beyond the permissions");

    for (k, v, why) in [
        ("", "eA==", "xattr name"),
        ("user.a\0b", "eA==", "xattr name"),
        ("user.x", "!!!", "not base64"),
    ] {
        let mut t = layer.toc.clone();
        entry(&mut t, "etc/motd").xattrs.insert(k.into(), v.into());
        refused(&blob, &layer, &t, why);
    }
    let mut t = layer.toc.clone();
    entry(&mut t, "etc/motd").xattrs.insert(
        "user.big".into(),
        faasnet_format::toc::encode_xattr(&vec![0u8; 65537]),
    );
    refused(&blob, &layer, &t, "longer than 65536");

    let mut t = layer.toc.clone();
    t.version = 2;
    refused(&blob, &layer, &t, "unsupported version");

    // A start profile longer than the layer.
    let mut t = layer.toc.clone();
    t.start_blocks = t.blocks.len() as u32 + 1;
    refused(&blob, &layer, &t, "start_blocks is");
}

#[test]
fn duplicate_paths_are_tar_semantics_not_an_error() {
    // A later entry with the same path replaces the earlier one, as in tar and in
    // containerd's unpacker (docs/format.md); the FUSE tree does the same. Accepted.
    let (_, _, layer) = layer();
    let mut t = layer.toc.clone();
    let mut again = entry(&mut t, "etc/motd").clone();
    again.offset = t.entries.last().unwrap().offset + 512;
    again.mode = 0o600;
    t.entries.push(again);
    t.validate(layer.footer.toc_offset).unwrap();
}

#[test]
fn hostile_footers_are_refused() {
    let (_, blob, layer) = layer();
    let size = blob.len() as u64;
    let f = layer.footer;
    for (footer, why) in [
        (
            Footer {
                toc_offset: size,
                ..f
            },
            "does not end where the footer starts",
        ),
        (
            Footer {
                toc_offset: u64::MAX - 2,
                ..f
            },
            "overflows",
        ),
        (Footer { toc_length: 4, ..f }, "out of range"),
        (
            Footer {
                toc_length: 1 << 40,
                ..f
            },
            "out of range",
        ),
        (
            Footer {
                block_size: 1000,
                ..f
            },
            "block size 1000",
        ),
        (Footer { version: 9, ..f }, "version 9"),
    ] {
        let mut bad = blob.clone();
        let n = bad.len();
        bad[n - 72..].copy_from_slice(&footer.to_bytes());
        let err = parse_tail(&bad, size).unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
        assert!(decode_stream(&bad[..], std::io::sink()).is_err());
    }
    // The TOC digest in the footer does not match.
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let err = parse_tail(&bad, size).unwrap_err();
    assert!(err.to_string().contains("corrupt TOC"), "{err}");
    // A blob size that does not match the tail given.
    assert!(parse_tail(&blob, size - 1).is_err());
    assert!(parse_tail(&blob[..10], size).is_err());
}

// ---- Regressions found by the fuzz targets (fuzz/, hack/fuzz.sh) ----

#[test]
fn fuzz_toc_payload_claiming_a_huge_size_is_refused_without_allocating() {
    // toc_footer found it: a 12-byte payload claiming ~800 MB made the LZ4 decompressor
    // allocate the claim.
    let mut payload = 800_000_000u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0x1f, 0, 0, 0, 0, 0, 0, 0]);
    let err = Toc::from_payload(&payload, 0).unwrap_err();
    assert!(err.to_string().contains("more than LZ4"), "{err}");
    // An honest payload well above the old check still parses.
    let (_, _, layer) = layer();
    let p = layer.toc.to_payload();
    Toc::from_payload(&p, layer.footer.toc_offset).unwrap();
}

#[test]
fn fuzz_block_table_claiming_a_huge_block_is_refused_without_allocating() {
    // block_decode found it: decode_block reserved raw_len (up to 4 GiB) before decoding.
    let stored = b"not a frame";
    let entry = BlockEntry {
        offset: 0,
        stored_len: stored.len() as u64,
        raw_len: u32::MAX,
        digest: faasnet_format::sha256_digest(stored),
    };
    let err = decode_block(0, &entry, stored).unwrap_err();
    assert!(
        err.to_string().contains("more than the largest block"),
        "{err}"
    );
}

#[test]
fn short_toc_frame_against_a_forged_footer_is_an_error() {
    let f = Footer {
        version: 1,
        block_size: BS,
        toc_offset: 0,
        toc_length: 3,
        toc_sha256: [0; 32],
    };
    assert!(toc_payload(b"abc", &f).is_err());
}
