//! Converting a tar stream and decoding it again gives back the same bytes, and the TOC
//! describes every entry.

use faasnet_format::{
    convert_layer, decode_block, decode_stream, parse_tail, parse_toc_frame, parse_toc_parts,
    toc_head_range, ConvertOptions, EntryKind, FormatError, TailParse, Toc,
};
use proptest::prelude::*;

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A tar with the awkward cases: long and non-ASCII names, links, xattrs, whiteouts, a file
/// ending exactly on a block boundary and one spanning many blocks.
fn tricky_tar(block: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &header("dir/", tar::EntryType::Directory, 0, 0o755),
        &[][..],
    )
    .unwrap();
    b.append(
        &header("dir/empty", tar::EntryType::Regular, 0, 0o644),
        &[][..],
    )
    .unwrap();
    let exact = vec![7u8; block - 512 * 3];
    b.append(
        &header(
            "dir/exact",
            tar::EntryType::Regular,
            exact.len() as u64,
            0o600,
        ),
        &exact[..],
    )
    .unwrap();
    let big: Vec<u8> = (0..block * 5 + 123).map(|i| (i * 31 % 251) as u8).collect();
    b.append(
        &header("big.bin", tar::EntryType::Regular, big.len() as u64, 0o4755),
        &big[..],
    )
    .unwrap();
    let long = format!("dir/{}/ünïcødé-名前.txt", "x".repeat(150));
    let mut h = header("placeholder", tar::EntryType::Regular, 5, 0o644);
    b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
    let mut l = header("dir/hard", tar::EntryType::Link, 0, 0o644);
    b.append_link(&mut l, "dir/hard", "big.bin").unwrap();
    let mut s = header("dir/sym", tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut s, "dir/sym", "../big.bin").unwrap();
    b.append(
        &header("dir/.wh.gone", tar::EntryType::Regular, 0, 0o644),
        &[][..],
    )
    .unwrap();
    b.append(
        &header("dir/.wh..wh..opq", tar::EntryType::Regular, 0, 0o644),
        &[][..],
    )
    .unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.note", &b"v\x00\xff"[..])])
        .unwrap();
    b.append(
        &header("xattr-file", tar::EntryType::Regular, 2, 0o644),
        &b"hi"[..],
    )
    .unwrap();
    b.into_inner().unwrap()
}

fn convert(tar: &[u8], block_size: u32) -> (Vec<u8>, faasnet_format::ConvertedLayer) {
    let opts = ConvertOptions {
        block_size,
        threads: 3,
        original: None,
        start_bytes: 0,
    };
    let mut blob = Vec::new();
    let layer = convert_layer(tar, &mut blob, &opts, &|_| {}).unwrap();
    (blob, layer)
}

#[test]
fn tricky_tar_roundtrips_and_is_indexed() {
    let block = 64 * 1024;
    let tar = tricky_tar(block);
    let (blob, layer) = convert(&tar, block as u32);
    assert_eq!(layer.blob_size, blob.len() as u64);
    assert_eq!(layer.blob_digest, faasnet_format::sha256_digest(&blob));
    assert_eq!(layer.toc.diff_id, faasnet_format::sha256_digest(&tar));

    let mut out = Vec::new();
    let toc = decode_stream(&blob[..], &mut out).unwrap();
    assert_eq!(out, tar, "decoded stream differs from the original tar");
    assert_eq!(toc, layer.toc);

    // Every entry's data range points at its bytes in the tar stream.
    let big = toc.entries.iter().find(|e| e.path == "big.bin").unwrap();
    assert_eq!(big.mode, 0o4755);
    assert_eq!((big.uid, big.gid, big.mtime), (1000, 100, 1_700_000_000));
    let data = &tar[big.offset as usize..(big.offset + big.size) as usize];
    assert_eq!(data[..4], [0, 31, 62, 93]);
    let hard = toc.entries.iter().find(|e| e.path == "dir/hard").unwrap();
    assert_eq!(
        (hard.kind, hard.link.as_deref()),
        (EntryKind::Hardlink, Some("big.bin"))
    );
    let sym = toc.entries.iter().find(|e| e.path == "dir/sym").unwrap();
    assert_eq!(sym.link.as_deref(), Some("../big.bin"));
    assert!(toc
        .entries
        .iter()
        .any(|e| e.path.ends_with("ünïcødé-名前.txt") && e.size == 5));
    assert!(toc.entries.iter().any(|e| e.path == "dir/.wh..wh..opq"));
    let x = toc.entries.iter().find(|e| e.path == "xattr-file").unwrap();
    assert_eq!(x.xattr("user.note").unwrap(), b"v\x00\xff");

    // Random access: each block decodes to its slice of the tar stream.
    for (i, b) in toc.blocks.iter().enumerate() {
        let stored = &blob[b.offset as usize..(b.offset + b.stored_len) as usize];
        let raw = decode_block(i, b, stored).unwrap();
        let start = i * block;
        assert_eq!(raw, tar[start..start + raw.len()]);
    }
}

#[test]
fn tail_parse_with_small_and_full_tail() {
    let tar = tricky_tar(64 * 1024);
    let (blob, layer) = convert(&tar, 64 * 1024);
    let size = blob.len() as u64;
    match parse_tail(&blob, size).unwrap() {
        TailParse::Complete(toc, _) => assert_eq!(*toc, layer.toc),
        TailParse::NeedToc(_) => panic!("whole blob holds the TOC"),
    }
    match parse_tail(&blob[blob.len() - 100..], size).unwrap() {
        TailParse::NeedToc(f) => {
            let frame = &blob[f.toc_offset as usize..(f.toc_offset + f.toc_length) as usize];
            assert_eq!(parse_toc_frame(frame, &f).unwrap(), layer.toc);
        }
        TailParse::Complete(..) => panic!("100 bytes cannot hold the TOC"),
    }
}

#[test]
fn a_toc_split_between_tail_and_head_is_joined_for_every_tail_length() {
    let tar = tricky_tar(64 * 1024);
    let (blob, layer) = convert(&tar, 64 * 1024);
    let size = blob.len() as u64;
    let footer = match parse_tail(&blob[blob.len() - 100..], size).unwrap() {
        TailParse::NeedToc(f) => f,
        TailParse::Complete(..) => panic!("100 bytes cannot hold the TOC"),
    };
    // Tails from the footer alone to one byte short of the whole TOC frame.
    let whole = (footer.toc_length + (size - footer.toc_offset - footer.toc_length)) as usize;
    for tail_len in (72..whole).step_by(97).chain([whole - 1]) {
        let tail = &blob[blob.len() - tail_len..];
        let TailParse::NeedToc(f) = parse_tail(tail, size).unwrap() else {
            panic!("a tail of {tail_len} bytes cannot hold the TOC");
        };
        let (offset, len) = toc_head_range(&f, size, tail_len as u64);
        assert_eq!(offset, f.toc_offset);
        // Nothing fetched twice: the head ends where the tail starts.
        assert_eq!(offset + len, size - tail_len as u64);
        let head = &blob[offset as usize..(offset + len) as usize];
        assert_eq!(parse_toc_parts(head, tail, &f, size).unwrap(), layer.toc);
        // A head of the wrong length is refused, not misparsed.
        assert!(parse_toc_parts(&head[1..], tail, &f, size).is_err());
    }
}

#[test]
fn corrupt_and_truncated_blobs_are_refused() {
    let tar = tricky_tar(64 * 1024);
    let (blob, layer) = convert(&tar, 64 * 1024);
    // Flip one byte inside block 2's data.
    let mut bad = blob.clone();
    let b2 = &layer.toc.blocks[2];
    bad[(b2.offset + b2.stored_len / 2) as usize] ^= 0x55;
    let err = decode_stream(&bad[..], std::io::sink()).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::BlockDigestMismatch { index: 2, .. }
                | FormatError::BadBlock { index: 2, .. }
        ),
        "{err}"
    );
    // Truncated anywhere: an error, never Ok.
    for cut in [10, blob.len() / 2, blob.len() - 1] {
        assert!(
            decode_stream(&blob[..cut], std::io::sink()).is_err(),
            "cut at {cut}"
        );
    }
    // A tail that is not ours.
    assert!(parse_tail(&tar[tar.len() - 200..], tar.len() as u64).is_err());
}

#[test]
fn non_tar_and_escaping_paths_are_refused() {
    let opts = ConvertOptions::default();
    let junk = vec![0x42u8; 4096];
    let err = convert_layer(&junk[..], std::io::sink(), &opts, &|_| {}).unwrap_err();
    assert!(matches!(err, FormatError::NotTar(_)), "{err}");

    for evil in ["../etc/passwd", "a/../../x"] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        // set_path refuses `..`; write the name bytes directly as a hostile tool would.
        h.as_old_mut().name[..evil.len()].copy_from_slice(evil.as_bytes());
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let err = convert_layer(&tar[..], std::io::sink(), &opts, &|_| {}).unwrap_err();
        assert!(err.to_string().contains("escapes the layer root"), "{err}");
    }
}

#[test]
fn hostile_toc_is_rejected() {
    let tar = tricky_tar(64 * 1024);
    let (_, layer) = convert(&tar, 64 * 1024);
    let end = layer.footer.toc_offset;
    let mut t: Toc = layer.toc.clone();
    t.entries[1].offset = t.tar_size; // data outside the stream
    t.entries[1].size = 10;
    assert!(t.validate(end).unwrap_err().to_string().contains("outside"));
    let mut t = layer.toc.clone();
    t.blocks[1].offset += 1; // blocks overlap
    assert!(t.validate(end).is_err());
    let mut t = layer.toc.clone();
    t.entries[0].path = "../x".into();
    assert!(t.validate(end).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_tars_roundtrip(files in prop::collection::vec((0usize..300_000, any::<u8>()), 0..6),
                             shift in 0u32..3) {
        let mut b = tar::Builder::new(Vec::new());
        for (i, (len, seed)) in files.iter().enumerate() {
            let data: Vec<u8> = (0..*len).map(|j| seed.wrapping_add((j / 7) as u8)).collect();
            b.append(&header(&format!("f{i}"), tar::EntryType::Regular, *len as u64, 0o644), &data[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let (blob, layer) = convert(&tar, (64 * 1024) << shift);
        let mut out = Vec::new();
        decode_stream(&blob[..], &mut out).unwrap();
        prop_assert_eq!(out, tar);
        prop_assert_eq!(layer.toc.entries.len(), files.len());
    }
}

/// The blob is a plain LZ4 frame stream: the reference `lz4` tool decodes it to the original
/// tar, skipping the TOC and footer frames. Skipped (loudly) where the tool is not installed.
#[test]
fn reference_lz4_tool_decodes_blob() {
    if std::process::Command::new("lz4")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: lz4 tool not installed (apt-get install lz4)");
        return;
    }
    let tar = tricky_tar(64 * 1024);
    let (blob, _) = convert(&tar, 64 * 1024);
    let dir = tempfile_dir();
    let path = dir.join("layer.lz4");
    std::fs::write(&path, &blob).unwrap();
    let out = std::process::Command::new("lz4")
        .args(["-dc", "--no-frame-crc"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, tar);
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("faasnet-format-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
