//! Bad inputs: each gives a clear error, prints no digest, and leaves the destination tag
//! exactly as it was (still pointing at the old manifest, or still absent).

mod common;

use std::path::Path;

use common::*;

/// A one-entry tar whose header fields are written raw, bypassing the tar crate's checks.
fn raw_tar(name: &[u8], size_field: Option<&[u8; 11]>, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    if let Some(size) = size_field {
        h.as_old_mut().size[..11].copy_from_slice(size);
        h.as_old_mut().size[11] = 0;
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn good_layer() -> TestLayer {
    TestLayer::gzip(tar_of(&[
        Entry::Dir("etc"),
        Entry::File("etc/ok", b"fine\n"),
        Entry::File("big", &noise(300_000, 1)),
    ]))
}

struct Setup {
    reg: Registry,
    cache: tempfile::TempDir,
    /// Destination tag holding a good converted image before the bad conversion.
    dst: String,
    old: String,
}

fn setup() -> Option<Setup> {
    let reg = Registry::start()?;
    let cache = tempfile::tempdir().unwrap();
    let good = reg.image("app:good");
    push_image(&good, &[good_layer()], None, false);
    let dst = reg.image("app:converted");
    let out = cli(&["convert", &good, &dst], cache.path());
    assert!(out.status.success());
    let old = String::from_utf8(out.stdout).unwrap().trim().to_string();
    Some(Setup {
        reg,
        cache,
        dst,
        old,
    })
}

impl Setup {
    /// Converts `src` into the existing tag and into a fresh one; both must fail with a
    /// message containing every one of `expected`, and neither tag may change.
    fn expect_failure(&self, src: &str, expected: &[&str]) {
        self.expect_failure_with(src, &[], expected)
    }

    fn expect_failure_with(&self, src: &str, flags: &[&str], expected: &[&str]) {
        let fresh = self.reg.image("app:fresh");
        for dst in [&self.dst, &fresh] {
            let mut args = vec!["convert", src, dst.as_str()];
            args.extend_from_slice(flags);
            let out = cli(&args, self.cache.path());
            assert!(!out.status.success(), "conversion of {src} must fail");
            assert!(out.stdout.is_empty(), "no digest printed on failure");
            let err = String::from_utf8_lossy(&out.stderr);
            for e in expected {
                assert!(err.contains(e), "error message lacks {e:?}:\n{err}");
            }
        }
        assert_eq!(
            manifest_of(&self.dst).unwrap().1,
            self.old,
            "old tag untouched"
        );
        assert!(manifest_of(&fresh).is_none(), "new tag not created");
    }

    /// Pushes a one-layer image whose (gzip) layer blob is `blob`, with `diff_id` in the
    /// config; returns its reference.
    fn push_bad(&self, name: &str, layer: TestLayer) -> String {
        let src = self.reg.image(name);
        push_image(&src, &[good_layer(), layer], None, false);
        src
    }
}

#[test]
fn truncated_gzip() {
    let Some(s) = setup() else { return };
    let mut l = TestLayer::gzip(tar_of(&[Entry::File("f", &noise(500_000, 3))]));
    l.blob.truncate(l.blob.len() / 2);
    let src = s.push_bad("bad:truncated", l);
    s.expect_failure(&src, &["gzip stream is corrupt or truncated", "truncated"]);
}

#[test]
fn corrupt_gzip() {
    let Some(s) = setup() else { return };
    let mut l = TestLayer::gzip(tar_of(&[Entry::File(
        "f",
        &b"compressible text ".repeat(50_000),
    )]));
    let mid = l.blob.len() / 2;
    for b in &mut l.blob[mid..mid + 16] {
        *b ^= 0xa5;
    }
    let src = s.push_bad("bad:corrupt", l);
    s.expect_failure(&src, &["gzip stream is corrupt"]);
}

#[test]
fn blob_that_is_not_a_tar() {
    let Some(s) = setup() else { return };
    let l = TestLayer::gzip(b"this is plain text, not a tar archive\n".repeat(100));
    let src = s.push_bad("bad:nottar", l);
    s.expect_failure(&src, &["not a valid tar archive"]);
    let l = TestLayer::plain(b"short".to_vec());
    let src = s.push_bad("bad:short", l);
    s.expect_failure(&src, &["not a valid tar archive"]);
}

#[test]
fn entry_paths_escaping_the_root() {
    let Some(s) = setup() else { return };
    let src = s.push_bad(
        "bad:dotdot",
        TestLayer::gzip(raw_tar(b"a/../../etc/evil", None, b"x")),
    );
    s.expect_failure(&src, &["a/../../etc/evil", "escapes the layer root"]);
    let src = s.push_bad(
        "bad:absolute",
        TestLayer::gzip(raw_tar(b"/etc/passwd", None, b"x")),
    );
    s.expect_failure(&src, &["/etc/passwd", "absolute path"]);
}

#[test]
fn absurd_size_in_tar_header() {
    let Some(s) = setup() else { return };
    // 8 GiB claimed, 5 bytes present.
    let src = s.push_bad(
        "bad:size",
        TestLayer::gzip(raw_tar(b"huge", Some(b"77777777777"), b"small")),
    );
    s.expect_failure(&src, &["tar entry \"huge\"", "size run past the end"]);
}

#[test]
fn unknown_media_type() {
    let Some(s) = setup() else { return };
    let mut l = good_layer();
    l.media_type = "application/vnd.example.weird+lz77".into();
    let src = s.push_bad("bad:mediatype", l);
    s.expect_failure(
        &src,
        &["unknown media type", "application/vnd.example.weird+lz77"],
    );
}

#[test]
fn diff_id_mismatch() {
    let Some(s) = setup() else { return };
    let src = s.reg.image("bad:diffid");
    let wrong = sha(b"something else");
    push_image(
        &src,
        &[good_layer(), good_layer()],
        Some(vec![sha(&good_layer().tar), wrong.clone()]),
        false,
    );
    s.expect_failure(&src, &["diffID", &wrong]);
}

#[test]
fn missing_tag_and_unreachable_registries() {
    let Some(s) = setup() else { return };
    let missing = s.reg.image("app:no-such-tag");
    s.expect_failure(&missing, &["no-such-tag", "not found", &s.reg.addr]);
    let missing_repo = s.reg.image("nothing-here:v1");
    s.expect_failure(&missing_repo, &["not found"]);

    let dead = format!("127.0.0.1:{}", free_port());
    let src = format!("{dead}/app:v1");
    s.expect_failure(&src, &["cannot reach registry", &dead]);

    // Unreachable destination: fails before anything is converted.
    let out = cli(
        &[
            "convert",
            &s.reg.image("app:good"),
            &format!("{dead}/app:v1"),
        ],
        s.cache.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach registry") && err.contains(&dead),
        "{err}"
    );
}

#[test]
fn tampered_blob_in_oci_layout() {
    let Some(s) = setup() else { return };
    // Convert into a layout, then flip a byte of a source layer in a layout copy: its
    // content no longer matches the digest the manifest names.
    let dir = tempfile::tempdir().unwrap();
    let src_img = s.reg.image("app:good");
    let layout = format!("oci:{}:orig", dir.path().display());
    // Round-trip the original (unconverted) image into a layout with skopeo if available,
    // else build the layout by hand from the registry.
    build_layout(&src_img, dir.path());
    let index = json(&std::fs::read(dir.path().join("index.json")).unwrap());
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let m = json(&std::fs::read(dir.path().join("blobs/sha256").join(&mdigest[7..])).unwrap());
    let ldigest = m["layers"][0]["digest"].as_str().unwrap();
    let lpath = dir.path().join("blobs/sha256").join(&ldigest[7..]);
    let mut blob = std::fs::read(&lpath).unwrap();
    let n = blob.len();
    blob[n / 2] ^= 0xff;
    std::fs::write(&lpath, &blob).unwrap();
    // Without --force the layer is skipped: its digest names a conversion the destination
    // already has, and the (corrupt) local copy is never read. That is fine, and
    // content-addressed; --force reads it and must notice.
    s.expect_failure_with(&layout, &["--force"], &["corrupt or tampered", ldigest]);
}

/// Writes the image `reference` (single manifest) into an OCI layout at `dir`, tag `orig`.
fn build_layout(reference: &str, dir: &Path) {
    let (bytes, digest) = manifest_of(reference).unwrap();
    let m = json(&bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_string());
    }
    for d in digests {
        std::fs::write(
            dir.join("blobs/sha256").join(&d[7..]),
            blob_of(reference, &d),
        )
        .unwrap();
    }
    std::fs::write(dir.join("blobs/sha256").join(&digest[7..]), &bytes).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "orig"}
        }]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn bad_start_profiles_name_the_line() {
    let Some(s) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = s.reg.image("app:good");
    let cases: [(&str, &[u8], &[&str]); 4] = [
        (
            "utf8.txt",
            b"# ok\netc/ok\nbig\xff\xfe\n",
            &["line 3", "not valid UTF-8"],
        ),
        (
            "dotdot.txt",
            b"etc/ok\n/usr/../../etc/shadow\n",
            &["line 2", "/usr/../../etc/shadow", "escapes the layer root"],
        ),
        ("nul.txt", b"a\0b\n", &["line 1", "NUL"]),
        ("root.txt", b"etc/ok\n\n/\n", &["line 3", "root directory"]),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let mut want = vec![p];
        want.extend_from_slice(expected);
        s.expect_failure_with(&src, &["--start-profile", p], &want);
    }
    let missing = dir.path().join("missing.txt");
    let p = missing.to_str().unwrap();
    s.expect_failure_with(&src, &["--start-profile", p], &[p, "cannot read"]);
}

#[test]
fn bad_layers_fail_the_same_way_with_a_start_profile() {
    let Some(s) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.txt");
    std::fs::write(&profile, "f\netc/ok\nbig\nhuge\n").unwrap();
    let flags = ["--start-profile", profile.to_str().unwrap(), "--force"];

    let mut l = TestLayer::gzip(tar_of(&[Entry::File("f", &noise(500_000, 3))]));
    l.blob.truncate(l.blob.len() / 2);
    let src = s.push_bad("badp:truncated", l);
    s.expect_failure_with(&src, &flags, &["gzip stream is corrupt or truncated"]);

    let src = s.push_bad(
        "badp:dotdot",
        TestLayer::gzip(raw_tar(b"a/../../etc/evil", None, b"x")),
    );
    s.expect_failure_with(
        &src,
        &flags,
        &["a/../../etc/evil", "escapes the layer root"],
    );

    let src = s.push_bad(
        "badp:size",
        TestLayer::gzip(raw_tar(b"huge", Some(b"77777777777"), b"small")),
    );
    s.expect_failure_with(
        &src,
        &flags,
        &["tar entry \"huge\"", "size run past the end"],
    );

    let l = TestLayer::gzip(b"this is plain text, not a tar archive\n".repeat(100));
    let src = s.push_bad("badp:nottar", l);
    s.expect_failure_with(&src, &flags, &["not a valid tar archive"]);

    let src = s.reg.image("badp:diffid");
    let wrong = sha(b"something else");
    push_image(
        &src,
        &[good_layer(), good_layer()],
        Some(vec![sha(&good_layer().tar), wrong.clone()]),
        false,
    );
    s.expect_failure_with(&src, &flags, &["diffID", &wrong]);

    // A descriptor whose size does not match the blob: the download is refused.
    let good = good_layer();
    let src = s.reg.image("badp:size-field");
    let r = faasnet_image_converter::Reference::parse(&src).unwrap();
    let (bytes, mt) = image_manifest(&r, std::slice::from_ref(&good), None, false);
    let mut m = json(&bytes);
    m["layers"][0]["size"] = serde_json::json!(good.blob.len() as u64 + 1);
    let bytes = serde_json::to_vec(&m).unwrap();
    rt().block_on(async {
        client()
            .push_manifest(&r, r.reference(), mt, &bytes)
            .await
            .unwrap()
    });
    s.expect_failure_with(&src, &flags, &["the manifest says"]);
}
