//! The converter on the project's real test images (hack/images.sh: busybox, tricky,
//! realistic), with real processes only: a docker-registry, the `image-converter` CLI and a
//! stock containerd that unpacks converted layers through the CLI as its stream processor.
//!
//! For each image, one test:
//!
//! 1. builds it (cached) and pushes it to a fresh registry with `hack/images.sh build`;
//! 2. converts it with `image-converter convert` into the same registry (tag `faasnet`);
//! 3. checks every layer: the original blob and the converted blob are fetched over plain
//!    HTTP, the converted one is decoded by `image-converter decompress`, and the two tar
//!    streams are compared entry by entry (path, type, size, content sha256, mode, uid/gid,
//!    user/group names, mtime and PAX sub-second mtime, link targets, hardlinks, xattrs,
//!    device numbers, every PAX record, whiteouts and opaque markers as entries) and then
//!    byte for byte; `verify` must pass and `inspect --json` must report
//!    ceil(tar size / block size) blocks;
//! 4. pulls the original and the converted image into a private containerd, each in its own
//!    namespace (otherwise the converted image would reuse the original's snapshots by chain
//!    ID and the stream processor would never run), runs both with `ctr run --rm` and
//!    compares their stdout (for tricky also with `hack/images.sh expected tricky`).
//!
//! Steps 3 and 4 both run even when one fails; the test then fails naming both results.
//! Needs root, containerd, ctr, runc, docker-registry, curl and what hack/images.sh needs
//! (hack/install-deps.sh). Run `cargo build -p faasnet-image-converter` first when running
//! only this crate's tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context as _};
use faasnet_integration::binaries::workspace_binary;
use faasnet_integration::containerd::{Containerd, ContainerdOptions};
use faasnet_integration::images::{
    fetch_manifest, first_difference, http_get, images_sh, run, CONVERTED_TAG,
};
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[test]
fn busybox_converted_layers_and_container_match_the_original() {
    check_image("busybox", |orig, _| {
        ensure!(
            orig.trim_end() == "hello from busybox",
            "the busybox image's Cmd printed {orig:?}, expected \"hello from busybox\""
        );
        Ok(())
    });
}

#[test]
fn tricky_converted_layers_and_container_match_the_original() {
    check_image("tricky", |orig, conv| {
        let expected = images_sh(&["expected", "tricky"])?;
        ensure!(
            expected.contains("tricky listing: "),
            "`hack/images.sh expected tricky` printed no listing summary"
        );
        ensure!(
            orig == expected,
            "the original tricky image's output differs from `hack/images.sh expected tricky`:\n{}",
            first_difference(&expected, orig)
        );
        ensure!(
            conv == expected,
            "the converted tricky image's output differs from `hack/images.sh expected tricky`:\n{}",
            first_difference(&expected, conv)
        );
        Ok(())
    });
}

#[test]
fn realistic_converted_layers_and_container_match_the_original() {
    check_image("realistic", |orig, _| {
        ensure!(
            orig.starts_with("faasnet function ready: numpy "),
            "the realistic image's Cmd printed {orig:?}, expected \"faasnet function ready: numpy ...\""
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// the test body

/// Pushes, converts and checks image `name`; `check_output(original, converted)` gets the two
/// containers' normalised stdout (already known to be equal) for image-specific assertions.
fn check_image(name: &str, check_output: impl Fn(&str, &str) -> anyhow::Result<()>) {
    require_root();
    let converter = workspace_binary("image-converter");
    let registry = Registry::start("127.0.0.1").expect("start docker-registry");

    let pushed = images_sh(&["build", name, "--registry", &registry.addr])
        .unwrap_or_else(|e| panic!("hack/images.sh build {name}: {e:#}"));
    let src = pushed.lines().last().unwrap_or_default().trim().to_string();
    assert_eq!(
        src,
        format!("{}/faasnet/{name}:latest", registry.addr),
        "hack/images.sh build printed an unexpected reference"
    );
    let dst = format!("{}/faasnet/{name}:{CONVERTED_TAG}", registry.addr);

    let work = tempfile::Builder::new()
        .prefix(&format!("faasnet-conv-{name}-"))
        .tempdir()
        .unwrap();
    let cache_dir = work.path().join("converter-cache");
    let out = run(Command::new(&converter)
        .args(["convert", &src, &dst, "--cache-dir"])
        .arg(&cache_dir))
    .unwrap_or_else(|e| panic!("image-converter convert {src} {dst}: {e:#}"));
    let manifest_digest = out.trim().lines().last().unwrap_or_default().to_string();
    assert!(
        manifest_digest.starts_with("sha256:") && manifest_digest.len() == 71,
        "convert should print the manifest digest on stdout, printed {out:?}"
    );

    let layers = check_layers(
        &registry,
        &converter,
        name,
        &dst,
        &manifest_digest,
        work.path(),
    );
    let container = check_containers(&converter, &src, &dst, work.path())
        .and_then(|(orig, conv)| check_output(&orig, &conv));

    let mut failures = String::new();
    match &layers {
        Ok(summary) => eprintln!("{name}: layers OK\n{summary}"),
        Err(e) => writeln!(failures, "LAYERS of {name}: {e:#}").unwrap(),
    }
    match &container {
        Ok(()) => eprintln!("{name}: containerd output OK"),
        Err(e) => writeln!(failures, "CONTAINERD run of {name}: {e:#}").unwrap(),
    }
    assert!(failures.is_empty(), "{name}:\n{failures}");
}

/// Step 3: every converted layer decodes to the original tar stream; verify and inspect agree.
/// Returns a short per-layer summary.
fn check_layers(
    registry: &Registry,
    converter: &Path,
    name: &str,
    dst: &str,
    manifest_digest: &str,
    work: &Path,
) -> anyhow::Result<String> {
    let repo = format!("faasnet/{name}");
    let orig_manifest = fetch_manifest(&registry.addr, &repo, "latest")?;
    let conv_manifest = fetch_manifest(&registry.addr, &repo, CONVERTED_TAG)?;
    let conv_bytes = http_get(&format!(
        "http://{}/v2/{repo}/manifests/{manifest_digest}",
        registry.addr
    ))
    .context("fetch the converted manifest by the digest convert printed")?;
    ensure!(
        sha256_hex(&conv_bytes) == manifest_digest["sha256:".len()..],
        "the manifest tagged {CONVERTED_TAG} does not have the digest convert printed ({manifest_digest})"
    );
    ensure!(
        conv_manifest["annotations"][faasnet_format::annotations::CONVERTED] == "true",
        "the converted manifest lacks the {} annotation",
        faasnet_format::annotations::CONVERTED
    );
    ensure!(
        orig_manifest["config"]["digest"] == conv_manifest["config"]["digest"],
        "the converted image should keep the config blob unchanged (diffIDs stay valid)"
    );
    let orig_layers = orig_manifest["layers"]
        .as_array()
        .context("original layers")?;
    let conv_layers = conv_manifest["layers"]
        .as_array()
        .context("converted layers")?;
    ensure!(
        orig_layers.len() == conv_layers.len() && !orig_layers.is_empty(),
        "original has {} layers, converted {}",
        orig_layers.len(),
        conv_layers.len()
    );

    // verify: every block's digest, the diffIDs, the blobs' digests.
    let verify = run(Command::new(converter).args(["verify", dst]))
        .with_context(|| format!("image-converter verify {dst}"))?;
    let verified = format!("OK: {} layers, ", conv_layers.len());
    ensure!(
        verify.lines().any(|l| l.starts_with(&verified)),
        "verify should print a line starting with {verified:?}, printed:\n{verify}"
    );

    // inspect --json: the TOC summaries.
    let inspect: Value = serde_json::from_str(
        &run(Command::new(converter).args(["inspect", "--json", dst]))
            .with_context(|| format!("image-converter inspect --json {dst}"))?,
    )
    .context("inspect --json printed no JSON")?;
    let inspected = inspect["layers"].as_array().context("inspect: no layers")?;
    ensure!(
        inspected.len() == conv_layers.len(),
        "inspect lists {} layers, the manifest {}",
        inspected.len(),
        conv_layers.len()
    );

    let mut summary = String::new();
    let mut features = Features::default();
    for (i, (orig, conv)) in orig_layers.iter().zip(conv_layers).enumerate() {
        let what = format!("layer {i} ({})", str_of(&orig["digest"]));
        let (orig_tar, conv_tar, f) =
            check_one_layer(&registry.addr, &repo, converter, orig, conv, work)
                .with_context(|| what.clone())?;
        features.add(&f);

        let s = &inspected[i]["summary"];
        let tar_size = s["tar_size"].as_u64().context("inspect: tar_size")?;
        let block_size = s["block_size"].as_u64().context("inspect: block_size")?;
        let blocks = s["blocks"].as_u64().context("inspect: blocks")?;
        ensure!(
            inspected[i]["converted"] == true,
            "{what}: inspect says the layer is not converted"
        );
        ensure!(
            tar_size == orig_tar,
            "{what}: inspect reports tar_size {tar_size}, the original tar has {orig_tar} bytes"
        );
        ensure!(
            conv_tar == orig_tar,
            "{what}: decompressed {conv_tar} bytes, original {orig_tar}"
        );
        ensure!(
            block_size == u64::from(faasnet_format::DEFAULT_BLOCK_SIZE),
            "{what}: block size {block_size}, expected the default {}",
            faasnet_format::DEFAULT_BLOCK_SIZE
        );
        ensure!(
            blocks == tar_size.div_ceil(block_size),
            "{what}: inspect reports {blocks} blocks, ceil({tar_size} / {block_size}) = {}",
            tar_size.div_ceil(block_size)
        );
        ensure!(
            s["diff_id"] == conv["annotations"][faasnet_format::annotations::DIFF_ID],
            "{what}: inspect diff_id {} differs from the layer's annotation",
            s["diff_id"]
        );
        ensure!(
            verify.contains(&format!("OK ({blocks} blocks, ")),
            "{what}: verify did not report {blocks} verified blocks:\n{verify}"
        );
        writeln!(
            summary,
            "  {what}: {} entries, tar {tar_size} B, {blocks} blocks, gzip {} B -> converted {} B",
            f.entries, orig["size"], conv["size"]
        )?;
    }
    writeln!(summary, "  covered: {features:?}")?;
    // The tricky image exists to exercise these; make sure the comparison really saw them.
    if name == "tricky" {
        for (n, what) in [
            (features.hardlinks, "hardlinks"),
            (features.symlinks, "symlinks"),
            (features.whiteouts, "whiteouts"),
            (features.opaque, "opaque markers"),
            (features.xattrs, "entries with xattrs"),
            (features.subsecond_mtimes, "PAX sub-second mtimes"),
            (features.fifos, "fifos"),
            (features.long_paths, "paths longer than 100 bytes"),
        ] {
            ensure!(n > 0, "the tricky image's layers contain no {what}: the test image is not what this test expects");
        }
    }
    Ok(summary)
}

/// Fetches one original and one converted layer, decodes both, compares them. Returns the
/// original tar size, the decoded tar size and what the layer contains.
fn check_one_layer(
    addr: &str,
    repo: &str,
    converter: &Path,
    orig: &Value,
    conv: &Value,
    work: &Path,
) -> anyhow::Result<(u64, u64, Features)> {
    let orig_digest = str_of(&orig["digest"]);
    let conv_digest = str_of(&conv["digest"]);
    ensure!(
        conv["mediaType"] == faasnet_format::LAYER_MEDIA_TYPE,
        "converted layer {conv_digest} has media type {}",
        conv["mediaType"]
    );
    ensure!(
        conv["annotations"][faasnet_format::annotations::ORIGINAL_DIGEST] == orig_digest,
        "converted layer {conv_digest} names original {}, expected {orig_digest}",
        conv["annotations"][faasnet_format::annotations::ORIGINAL_DIGEST]
    );

    let orig_blob = fetch_blob(addr, repo, orig_digest, work)?;
    let conv_blob = fetch_blob(addr, repo, conv_digest, work)?;
    ensure!(
        std::fs::metadata(&conv_blob)?.len() == conv["size"].as_u64().unwrap_or(0),
        "converted blob size differs from its descriptor"
    );

    // Original: gzip (or plain tar) decoded in-process with flate2.
    let orig_tar = {
        let mut raw = Vec::new();
        File::open(&orig_blob)?.read_to_end(&mut raw)?;
        if raw.starts_with(&[0x1f, 0x8b]) {
            let mut tar = Vec::new();
            flate2::read::MultiGzDecoder::new(&raw[..])
                .read_to_end(&mut tar)
                .context("gunzip the original layer")?;
            tar
        } else {
            raw
        }
    };
    // Converted: decoded by the CLI, as containerd's stream processor does.
    let conv_tar_path = work.join(format!("{}.tar", &conv_digest[7..]));
    let status = Command::new(converter)
        .arg("decompress")
        .stdin(File::open(&conv_blob)?)
        .stdout(File::create(&conv_tar_path)?)
        .stderr(Stdio::inherit())
        .status()
        .context("run image-converter decompress")?;
    ensure!(
        status.success(),
        "image-converter decompress < {conv_digest} exited with {status}"
    );
    let conv_tar = std::fs::read(&conv_tar_path)?;
    std::fs::remove_file(&conv_tar_path)?;

    let diff_id = str_of(&conv["annotations"][faasnet_format::annotations::DIFF_ID]);
    ensure!(
        format!("sha256:{}", sha256_hex(&orig_tar)) == diff_id,
        "the original layer's uncompressed digest is not the diff-id annotation {diff_id}"
    );

    // Entry by entry first (readable failures), then byte for byte (stronger).
    let a = read_tree(&orig_tar).context("read the original layer's tar")?;
    let b = read_tree(&conv_tar).context("read the decompressed converted layer's tar")?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        ensure!(
            x == y,
            "entry {i} differs:\n  original:  {x:?}\n  converted: {y:?}"
        );
    }
    ensure!(
        a.len() == b.len(),
        "the original layer has {} entries, the decompressed converted one {} (first extra: {:?})",
        a.len(),
        b.len(),
        if a.len() > b.len() {
            a.get(b.len())
        } else {
            b.get(a.len())
        }
    );
    if orig_tar != conv_tar {
        let at = orig_tar
            .iter()
            .zip(&conv_tar)
            .position(|(x, y)| x != y)
            .unwrap_or(orig_tar.len().min(conv_tar.len()));
        bail!(
            "same entries, but the tar streams differ from byte {at} on (original {} bytes, decompressed {} bytes)",
            orig_tar.len(),
            conv_tar.len()
        );
    }
    let _ = std::fs::remove_file(&orig_blob);
    let _ = std::fs::remove_file(&conv_blob);
    Ok((
        orig_tar.len() as u64,
        conv_tar.len() as u64,
        Features::of(&a),
    ))
}

/// Step 4: the original and the converted image run in a real containerd; returns both outputs
/// (normalised) after checking that they are equal and that the stream processor ran.
fn check_containers(
    converter: &Path,
    src: &str,
    dst: &str,
    work: &Path,
) -> anyhow::Result<(String, String)> {
    // The stream processor is a wrapper that logs each call and runs the real CLI: proof that
    // containerd decoded the converted layers through it.
    let calls = work.join("processor-calls.log");
    let wrapper = work.join("decompress-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$STREAM_PROCESSOR_MEDIATYPE $*\" >> '{}'\nexec '{}' \"$@\"\n",
            calls.display(),
            converter.display()
        ),
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let ctd = Containerd::start(&ContainerdOptions {
        stream_processor: Some(wrapper),
        ..Default::default()
    })
    .context("start containerd")?;

    let mut outputs = Vec::new();
    for (image, ns) in [(src, "faasnet-orig"), (dst, "faasnet-conv")] {
        let before = std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .count();
        ctd.ctr_ok(&["-n", ns, "images", "pull", "--plain-http", image])
            .with_context(|| format!("pull {image} (containerd log: {})", tail(&ctd.log(), 20)))?;
        let after = std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .count();
        let layers = layer_count(&ctd, ns, image)?;
        let expected_calls = if ns == "faasnet-conv" { layers } else { 0 };
        ensure!(
            after - before == expected_calls,
            "pulling {image} ran the stream processor {} times, expected {expected_calls} (one per converted layer)",
            after - before
        );
        let out = ctd
            .ctr_ok(&["-n", ns, "run", "--rm", image, &format!("{ns}-run")])
            .with_context(|| format!("run {image}"))?;
        outputs.push(normalise(&out));
    }
    let conv = outputs.pop().unwrap();
    let orig = outputs.pop().unwrap();
    ensure!(
        !orig.trim().is_empty(),
        "the original image printed nothing"
    );
    ensure!(
        orig == conv,
        "the converted image printed something else than the original:\n{}",
        first_difference(&orig, &conv)
    );
    // Same diffIDs, so the same snapshot chain.
    let snaps = |ns| ctd.ctr_ok(&["-n", ns, "snapshots", "ls"]);
    let (a, b) = (snaps("faasnet-orig")?, snaps("faasnet-conv")?);
    ensure!(
        a == b,
        "snapshot chains differ between the original and the converted image:\n{a}\n---\n{b}"
    );
    let calls = std::fs::read_to_string(&calls).unwrap_or_default();
    ensure!(
        calls
            .lines()
            .all(|l| l == format!("{} decompress", faasnet_format::LAYER_MEDIA_TYPE)),
        "unexpected stream processor calls:\n{calls}"
    );
    Ok((orig, conv))
}

/// Number of layers of `image` as containerd sees it (its manifest from the content store).
fn layer_count(ctd: &Containerd, ns: &str, image: &str) -> anyhow::Result<usize> {
    let list = ctd.ctr_ok(&["-n", ns, "images", "ls"])?;
    let digest = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(image))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .with_context(|| format!("{image} not in `ctr images ls`:\n{list}"))?
        .to_string();
    let manifest: Value =
        serde_json::from_str(&ctd.ctr_ok(&["-n", ns, "content", "get", &digest])?)
            .context("manifest JSON from the content store")?;
    Ok(manifest["layers"].as_array().map_or(0, Vec::len))
}

/// Drops output lines that legitimately differ between two runs (timings).
fn normalise(out: &str) -> String {
    out.lines()
        .filter(|l| !l.starts_with("import+compute took "))
        .map(|l| format!("{l}\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// tar trees

/// Everything about a tar entry that unpacking can observe, plus every PAX record.
#[derive(PartialEq, Eq)]
struct TreeEntry {
    path: Vec<u8>,
    kind: tar::EntryType,
    size: u64,
    content_sha256: String,
    mode: u32,
    uid: u64,
    gid: u64,
    uname: Option<Vec<u8>>,
    gname: Option<Vec<u8>>,
    mtime: u64,
    link: Option<Vec<u8>>,
    device: Device,
    /// Every PAX record (path, linkpath, mtime with sub-second part, uid/gid, SCHILY.xattr.*).
    pax: BTreeMap<String, Vec<u8>>,
}

impl TreeEntry {
    fn name(&self) -> &[u8] {
        let p = self.path.strip_suffix(b"/").unwrap_or(&self.path);
        p.rsplit(|&c| c == b'/').next().unwrap_or(p)
    }
    fn is_opaque(&self) -> bool {
        self.name() == b".wh..wh..opq"
    }
    fn is_whiteout(&self) -> bool {
        self.name().starts_with(b".wh.") && !self.is_opaque()
    }
}

impl std::fmt::Debug for TreeEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn s(b: &Option<Vec<u8>>) -> Option<std::borrow::Cow<'_, str>> {
            b.as_deref().map(String::from_utf8_lossy)
        }
        let pax: BTreeMap<&str, std::borrow::Cow<str>> = self
            .pax
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v)))
            .collect();
        f.debug_struct("Entry")
            .field("path", &String::from_utf8_lossy(&self.path))
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("sha256", &self.content_sha256)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("uname", &s(&self.uname))
            .field("gname", &s(&self.gname))
            .field("mtime", &self.mtime)
            .field("link", &s(&self.link))
            .field("device", &self.device)
            .field("whiteout", &self.is_whiteout())
            .field("opaque", &self.is_opaque())
            .field("pax", &pax)
            .finish()
    }
}

fn read_tree(tar_bytes: &[u8]) -> anyhow::Result<Vec<TreeEntry>> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for entry in archive.entries()? {
        let mut e = entry?;
        let mut pax = BTreeMap::new();
        if let Some(exts) = e.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                pax.insert(
                    String::from_utf8_lossy(ext.key_bytes()).into_owned(),
                    ext.value_bytes().to_vec(),
                );
            }
        }
        let h = e.header().clone();
        let path = e.path_bytes().into_owned();
        let link = e.link_name_bytes().map(|l| l.into_owned());
        let size = e.size();
        let mut content = Vec::new();
        e.read_to_end(&mut content)?;
        ensure!(
            content.len() as u64 == size,
            "entry {}: read {} bytes, header says {size}",
            String::from_utf8_lossy(&path),
            content.len()
        );
        out.push(TreeEntry {
            path,
            kind: h.entry_type(),
            size,
            content_sha256: sha256_hex(&content),
            mode: h.mode()?,
            uid: h.uid()?,
            gid: h.gid()?,
            uname: h.username_bytes().map(<[u8]>::to_vec),
            gname: h.groupname_bytes().map(<[u8]>::to_vec),
            mtime: h.mtime()?,
            link,
            // Only character and block devices have numbers; other entries may leave the
            // fields empty (not octal), so those are compared as raw header bytes.
            device: if matches!(h.entry_type(), tar::EntryType::Char | tar::EntryType::Block) {
                Device::Numbers(h.device_major()?, h.device_minor()?)
            } else {
                Device::Raw(h.as_bytes()[329..345].to_vec())
            },
            pax,
        });
    }
    Ok(out)
}

/// Device numbers of a device entry, or the raw devmajor/devminor fields of any other entry.
#[derive(Debug, PartialEq, Eq)]
enum Device {
    Numbers(Option<u32>, Option<u32>),
    Raw(Vec<u8>),
}

/// What a layer contains, to show (and for tricky, assert) what the comparison covered.
#[derive(Debug, Default)]
struct Features {
    entries: usize,
    files: usize,
    dirs: usize,
    symlinks: usize,
    hardlinks: usize,
    whiteouts: usize,
    opaque: usize,
    xattrs: usize,
    subsecond_mtimes: usize,
    fifos: usize,
    devices: usize,
    long_paths: usize,
}

impl Features {
    fn of(entries: &[TreeEntry]) -> Features {
        let mut f = Features {
            entries: entries.len(),
            ..Default::default()
        };
        for e in entries {
            match e.kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => f.files += 1,
                tar::EntryType::Directory => f.dirs += 1,
                tar::EntryType::Symlink => f.symlinks += 1,
                tar::EntryType::Link => f.hardlinks += 1,
                tar::EntryType::Fifo => f.fifos += 1,
                tar::EntryType::Char | tar::EntryType::Block => f.devices += 1,
                _ => {}
            }
            f.whiteouts += usize::from(e.is_whiteout());
            f.opaque += usize::from(e.is_opaque());
            f.xattrs += usize::from(e.pax.keys().any(|k| k.starts_with("SCHILY.xattr.")));
            f.subsecond_mtimes +=
                usize::from(e.pax.get("mtime").is_some_and(|m| m.contains(&b'.')));
            f.long_paths += usize::from(e.path.len() > 100);
        }
        f
    }

    fn add(&mut self, o: &Features) {
        self.entries += o.entries;
        self.files += o.files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.hardlinks += o.hardlinks;
        self.whiteouts += o.whiteouts;
        self.opaque += o.opaque;
        self.xattrs += o.xattrs;
        self.subsecond_mtimes += o.subsecond_mtimes;
        self.fifos += o.fifos;
        self.devices += o.devices;
        self.long_paths += o.long_paths;
    }
}

// ---------------------------------------------------------------------------------------------
// processes and HTTP

/// Downloads blob `digest` into `dir` with a plain HTTP GET and checks its digest.
fn fetch_blob(addr: &str, repo: &str, digest: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unexpected digest {digest}"))?;
    let path = dir.join(hex);
    let url = format!("http://{addr}/v2/{repo}/blobs/{digest}");
    let status = Command::new("curl")
        .args(["-fsSL", "--max-time", "300", "-o"])
        .arg(&path)
        .arg(&url)
        .stdin(Stdio::null())
        .status()
        .context("run curl")?;
    ensure!(status.success(), "GET {url}: curl exited with {status}");
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(&path)?, &mut hasher)?;
    let got = hex::encode(hasher.finalize());
    ensure!(
        got == hex,
        "GET {url} returned content with digest sha256:{got}"
    );
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// small helpers

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The entry comparison itself must notice each kind of difference the layer check relies on
/// (no root or processes needed).
#[test]
fn entry_comparison_notices_every_metadata_change() {
    fn layer(mode: u32, mtime: &str, xattr: &[u8], target: &str, content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("mtime", mtime.as_bytes()), ("SCHILY.xattr.user.k", xattr)])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("dir/file").unwrap();
        h.set_size(content.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, content).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Link);
        h.set_path("dir/link").unwrap();
        h.set_link_name(target).unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        b.into_inner().unwrap()
    }
    let base = ("1600000000.5", &b"v"[..], "dir/file", &b"data"[..]);
    let tree = |mode, (m, x, t, c): (&str, &[u8], &str, &[u8])| {
        read_tree(&layer(mode, m, x, t, c)).unwrap()
    };
    assert_eq!(tree(0o644, base), tree(0o644, base));
    for (what, changed) in [
        ("mode", tree(0o600, base)),
        (
            "sub-second mtime",
            tree(0o644, ("1600000000.6", base.1, base.2, base.3)),
        ),
        ("xattr", tree(0o644, (base.0, b"w", base.2, base.3))),
        (
            "hardlink target",
            tree(0o644, (base.0, base.1, "dir/other", base.3)),
        ),
        ("content", tree(0o644, (base.0, base.1, base.2, b"dat4"))),
    ] {
        assert_ne!(
            tree(0o644, base),
            changed,
            "a changed {what} went unnoticed"
        );
    }
}
