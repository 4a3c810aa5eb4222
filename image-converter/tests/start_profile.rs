//! `convert --start-profile` against a real registry: the profile's files come first in each
//! layer, in profile order, inside blocks `0..start_blocks`; reordered layers get new
//! diffIDs and the image a new config that says so; the image holds the same files; layers
//! the profile does not touch convert exactly as without it; re-conversions reuse exactly
//! the conversions they would produce again.

mod common;

use std::path::Path;

use common::*;
use faasnet_format::{annotations, Toc, LAYER_MEDIA_TYPE};

const BLOCK: u64 = 64 * 1024;

fn base_layer() -> Vec<u8> {
    let mods: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("lib/mod{i}.so"), noise(20_000, i)))
        .collect();
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Exec("bin/app", b"#!/bin/sh\necho app\n"),
        Entry::Hardlink("bin/app2", "bin/app"),
        Entry::Symlink("bin/sh", "app"),
        Entry::Dir("etc"),
        Entry::File("etc/conf", b"base\n"),
        Entry::File("etc/dup", b"first\n"),
    ];
    // Files before their directory's entry, as some tools write them.
    entries.extend(mods.iter().map(|(p, d)| Entry::File(p, d)));
    entries.push(Entry::Dir("lib"));
    entries.push(Entry::File("etc/dup", b"second\n"));
    tar_of(&entries)
}

fn top_layer() -> Vec<u8> {
    tar_of(&[
        Entry::Dir("etc"),
        Entry::File("etc/.wh.dup", b""),
        Entry::File("etc/conf", b"top\n"),
        Entry::Dir("data"),
        Entry::File("data/x", &noise(150_000, 99)),
        Entry::File("data/y", &noise(90_000, 98)),
    ])
}

fn untouched_layer() -> Vec<u8> {
    tar_of(&[Entry::File(
        "readme.txt",
        b"nothing here is in the profile\n",
    )])
}

const PROFILE: &str = "# files read by a start, first read first
/bin/app
lib/mod30.so

/lib/mod3.so
etc/conf
etc/.wh.dup
etc/dup
lib/mod17.so
/bin/app
not/there
bin/sh
data/x
";

/// The entries each layer must put first, in order: the listed files, each after the
/// entries of its parent directories.
const MOVED: [&[&str]; 3] = [
    &[
        "bin",
        "bin/app",
        "lib",
        "lib/mod30.so",
        "lib/mod3.so",
        "etc",
        "etc/conf",
        "lib/mod17.so",
    ],
    &["etc", "etc/conf", "data", "data/x"],
    &[],
];

fn write(dir: &Path, name: &str, text: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn toc_of(blob: &[u8]) -> Toc {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), blob).unwrap();
    faasnet_image_converter::inspect::read_toc_file(f.path())
        .unwrap()
        .0
}

fn sorted(mut v: EntryList) -> EntryList {
    v.sort();
    v
}

/// Checks the profiled image `dst` against the original layers; returns its config digest.
fn check_profiled(dst: &str, digest_line: &str, originals: &[TestLayer], config: &[u8]) -> String {
    let (bytes, digest) = manifest_of(dst).expect("destination tag exists");
    assert_eq!(digest_line.trim(), digest);
    let m = json(&bytes);
    // A new config: the original with only the reordered layers' diffIDs changed.
    let cdigest = m["config"]["digest"].as_str().unwrap().to_string();
    assert_ne!(cdigest, sha(config), "reordered layers need a new config");
    let new_config = blob_of(dst, &cdigest);
    assert_eq!(m["config"]["size"], new_config.len());
    let mut want = json(config);
    let got = json(&new_config);
    let diff_ids: Vec<String> = got["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    want["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    assert_eq!(got, want, "everything but the diffIDs unchanged");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), originals.len());
    for (i, ((l, orig), moved)) in layers.iter().zip(originals).zip(MOVED).enumerate() {
        assert_eq!(l["mediaType"], LAYER_MEDIA_TYPE);
        let a = &l["annotations"];
        let blob = blob_of(dst, l["digest"].as_str().unwrap());
        let out = decompress(&blob);
        assert!(out.status.success());
        let tar = out.stdout;
        assert_eq!(
            sha(&tar),
            diff_ids[i],
            "layer {i}: the config names its tar"
        );
        assert_eq!(a[annotations::DIFF_ID], diff_ids[i].as_str());
        assert_eq!(
            sorted(entries(&tar)),
            sorted(entries(&orig.tar)),
            "layer {i}: the same entries"
        );
        let toc = toc_of(&blob);
        if moved.is_empty() {
            assert!(tar == orig.tar, "layer {i}: untouched, byte for byte");
            assert_eq!(toc.start_blocks, 0);
            assert!(a.get(annotations::START_PROFILE).is_none());
            assert!(a.get(annotations::ORIGINAL_DIFF_ID).is_none());
            continue;
        }
        assert_ne!(diff_ids[i], sha(&orig.tar), "layer {i}: reordered");
        assert_eq!(a[annotations::ORIGINAL_DIFF_ID], sha(&orig.tar).as_str());
        assert_eq!(
            a[annotations::START_PROFILE],
            faasnet_image_converter::start_profile::moved_digest(moved.iter().copied()).as_str()
        );
        // The first entries are the profile's files, in profile order, inside the start
        // blocks, which end in the block holding the last one's end.
        let first: Vec<&str> = toc.entries[..moved.len()]
            .iter()
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(first, moved, "layer {i}");
        let last = &toc.entries[moved.len() - 1];
        let start_bytes = (last.offset + last.size).div_ceil(512) * 512;
        assert_eq!(toc.start_blocks as u64, start_bytes.div_ceil(BLOCK));
        assert!(toc.start_blocks as usize <= toc.blocks.len());
        let next = &toc.entries[moved.len()];
        assert_eq!(next.offset, start_bytes + 512, "the rest follows at once");
        assert_eq!(toc.diff_id, diff_ids[i]);
    }
    cdigest
}

#[test]
fn start_profile_reorders_layers_and_reuses_only_matching_conversions() {
    let Some(reg) = Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let layers = vec![
        TestLayer::gzip(base_layer()),
        TestLayer::gzip(top_layer()),
        TestLayer::plain(untouched_layer()),
    ];
    let src = reg.image("prof:v1");
    let dst = reg.image("prof:v1-faasnet");
    push_image(&src, &layers, None, false);
    let (src_manifest, _) = manifest_of(&src).unwrap();
    let config = blob_of(
        &src,
        json(&src_manifest)["config"]["digest"].as_str().unwrap(),
    );
    let profile = write(dir.path(), "profile.txt", PROFILE.as_bytes());
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["convert", &src, &dst, "--block-size", "64KiB"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str], cache: &Path| {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = cli(&a, cache);
        assert!(out.status.success());
        (
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };

    let (m1, err) = run(&["--start-profile", &profile], cache.path());
    assert!(err.contains("start profile"), "{err}");
    assert!(err.contains("5 files moved first"), "{err}");
    assert!(err.contains("2 files moved first"), "{err}");
    assert!(
        err.contains("no file of this layer listed, layout unchanged"),
        "{err}"
    );
    assert!(err.contains("2 reordered by the start profile"), "{err}");
    let cfg1 = check_profiled(&dst, &m1, &layers, &config);

    // The unprofiled conversion of the untouched layer is the same blob.
    let plain_dst = reg.image("prof:plain");
    let plain_cache = tempfile::tempdir().unwrap();
    let out = cli(
        &["convert", &src, &plain_dst, "--block-size", "64KiB"],
        plain_cache.path(),
    );
    assert!(out.status.success());
    let (plain, _) = manifest_of(&plain_dst).unwrap();
    let (prof, _) = manifest_of(&dst).unwrap();
    assert_eq!(json(&plain)["layers"][2], json(&prof)["layers"][2]);
    assert_ne!(json(&plain)["layers"][0], json(&prof)["layers"][0]);
    assert_eq!(json(&plain)["config"]["digest"], sha(&config).as_str());

    // inspect shows the start region; verify checks against the new config.
    let out = cli(&["inspect", &dst], cache.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("start profile: blocks 0..").count(),
        2,
        "{text}"
    );
    let out = cli(&["inspect", &dst, "--json"], cache.path());
    let v = json(&out.stdout);
    assert!(v["layers"][0]["summary"]["start_blocks"].as_u64().unwrap() >= 1);
    assert!(v["layers"][2]["summary"].get("start_blocks").is_none());
    let out = cli(&["verify", &dst], cache.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK: 3 layers"));

    // Again with the same profile: everything reused (local cache, then the destination's
    // annotations), same manifest. --force converts again, deterministically.
    let (m, err) = run(&["--start-profile", &profile], cache.path());
    assert_eq!(m, m1);
    assert_eq!(err.matches("already converted").count(), 3, "{err}");
    assert_eq!(err.matches("start profile applied").count(), 2, "{err}");
    let fresh = tempfile::tempdir().unwrap();
    let (m, err) = run(&["--start-profile", &profile], fresh.path());
    assert_eq!(m, m1);
    assert_eq!(err.matches("already converted").count(), 3, "{err}");
    let (m, err) = run(&["--start-profile", &profile, "--force"], cache.path());
    assert_eq!(m, m1);
    assert!(!err.contains("already converted"));

    // Without the profile, the reordered conversions are not taken: the original layout
    // and config come back (the untouched layer is reused).
    let (m0, err) = run(&[], cache.path());
    assert_ne!(m0, m1);
    assert_eq!(err.matches("already converted").count(), 1, "{err}");
    assert_eq!(manifest_of(&dst).unwrap().0, plain);

    // A profile that changes only the second layer's files: the first layer's earlier
    // conversion is reused (the destination still has it, the cache knows it), the second
    // is converted again.
    let changed = write(
        dir.path(),
        "changed.txt",
        PROFILE.replace("data/x\n", "data/y\n").as_bytes(),
    );
    let (m2, err) = run(&["--start-profile", &changed], cache.path());
    assert_ne!(m2, m1);
    assert_eq!(err.matches("already converted").count(), 2, "{err}");
    assert!(err.contains("2 files moved first"), "{err}");
    let (bytes, _) = manifest_of(&dst).unwrap();
    let (old, _) = manifest_of(&format!("{}@{m1}", reg.image("prof"))).unwrap();
    let (now, old) = (json(&bytes), json(&old));
    assert_eq!(now["layers"][0], old["layers"][0]);
    assert_ne!(now["layers"][1], old["layers"][1]);
    assert_ne!(now["config"]["digest"], cfg1.as_str());
    let toc = toc_of(&blob_of(&dst, now["layers"][1]["digest"].as_str().unwrap()));
    let first: Vec<&str> = toc.entries[..4].iter().map(|e| e.path.as_str()).collect();
    assert_eq!(first, ["etc", "etc/conf", "data", "data/y"]);
    let out = cli(&["verify", &dst], cache.path());
    assert!(out.status.success());
}

#[test]
fn an_empty_profile_changes_nothing() {
    let Some(reg) = Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let layers = vec![TestLayer::gzip(base_layer())];
    let src = reg.image("empty:v1");
    push_image(&src, &layers, None, false);
    let profile = write(dir.path(), "p.txt", b"# nothing recorded\n\n");
    let a = reg.image("empty:a");
    let b = reg.image("empty:b");
    let out = cli(
        &["convert", &src, &a, "--start-profile", &profile],
        cache.path(),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 paths"));
    let out2 = cli(&["convert", &src, &b, "--force"], cache.path());
    assert!(out2.status.success());
    assert_eq!(
        out.stdout, out2.stdout,
        "the same manifest as without a profile"
    );
}
