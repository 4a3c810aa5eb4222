//! Malicious converted images, end to end: real registry, our snapshotter, containerd with our
//! stream processor, `ctr-remote rpull`.
//!
//! The converted busybox image is taken from the registry, its layer blob rewritten (TOC,
//! footer or block table) and pushed back as a new blob with a new manifest under its own tag,
//! with correct OCI digests: the registry and containerd accept it, so only our validation can
//! catch it. For each hostile variant:
//!
//! - the lazy mount is refused before anything is mounted (snapshotter log names the
//!   problem), the snapshotter falls back to the ordinary path, and the ordinary path (our
//!   stream processor, `image-converter decompress`) refuses the layer too: the pull fails,
//!   and the snapshotter log or the client error names the problem;
//! - no FUSE mount of that layer exists under the snapshotter's root (/proc/self/mountinfo).
//!
//! One variant cannot be detected before mounting: a block table consistent in itself but not
//! describing the frames (digests recomputed over shifted ranges). It mounts lazily; reading
//! the files in the bad blocks fails with EIO, and every byte that can be read is compared
//! with the original layer: none differs.
//!
//! A control variant (the same blob, re-pushed under a new tag) mounts lazily, so the rewrite
//! machinery itself is not what makes the others fail.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use faasnet_format::{
    decode_stream, encode_tail, parse_tail, sha256_digest, EntryKind, Footer, TailParse, Toc,
};
use faasnet_integration::binaries::workspace_binary;
use faasnet_integration::containerd::{Containerd, ContainerdOptions};
use faasnet_integration::images::{http_get, TestImage, CONVERTED_TAG};
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::ImageMount;
use faasnet_integration::stack::{log_tail, Snapshotter, SnapshotterOptions};
use serde_json::Value;

/// What a variant does to the good blob, and the words its error must contain.
struct Variant {
    name: &'static str,
    /// Text the snapshotter log or the client error must contain.
    expect: &'static str,
    build: fn(&[u8], &Toc, &Footer) -> Vec<u8>,
}

/// The blob's blocks with `toc` as its TOC (correct TOC digest and footer).
fn with_toc(blob: &[u8], footer: &Footer, toc: &Toc) -> Vec<u8> {
    let end = footer.toc_offset as usize;
    let mut out = blob[..end].to_vec();
    out.extend_from_slice(&encode_tail(toc, footer.toc_offset).0);
    out
}

fn edit_toc(blob: &[u8], toc: &Toc, footer: &Footer, edit: impl Fn(&mut Toc)) -> Vec<u8> {
    let mut t = toc.clone();
    edit(&mut t);
    with_toc(blob, footer, &t)
}

fn first_file(t: &mut Toc) -> &mut faasnet_format::TocEntry {
    t.entries
        .iter_mut()
        .find(|e| e.kind == EntryKind::File && e.size > 0)
        .expect("a regular file with data")
}

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "footer-points-outside",
            expect: "does not end where the footer starts",
            build: |blob, _, footer| {
                let mut b = blob.to_vec();
                let n = b.len();
                let f = Footer {
                    toc_offset: footer.toc_offset + (1 << 40),
                    ..*footer
                };
                b[n - 72..].copy_from_slice(&f.to_bytes());
                b
            },
        },
        Variant {
            name: "toc-digest-mismatch",
            expect: "corrupt TOC",
            build: |blob, _, footer| {
                let mut b = blob.to_vec();
                b[footer.toc_offset as usize + 20] ^= 0x40;
                b
            },
        },
        Variant {
            name: "block-outside-blob",
            expect: "runs past the end of the block data",
            build: |blob, toc, footer| {
                edit_toc(blob, toc, footer, |t| {
                    let n = t.blocks.len();
                    t.blocks[n - 1].stored_len += 4096;
                })
            },
        },
        Variant {
            name: "blocks-overlap",
            expect: "overlaps the previous block",
            build: |blob, toc, footer| edit_toc(blob, toc, footer, |t| t.blocks[1].offset -= 16),
        },
        Variant {
            name: "block-size-lie",
            expect: "block 0 claims to hold",
            build: |blob, toc, footer| edit_toc(blob, toc, footer, |t| t.blocks[0].raw_len -= 1),
        },
        Variant {
            name: "entries-overlap",
            expect: "overlaps the previous entry",
            build: |blob, toc, footer| {
                edit_toc(blob, toc, footer, |t| {
                    // The last entry's data moved onto the first entry's.
                    let first = t.entries[0].offset;
                    t.entries.last_mut().unwrap().offset = first;
                })
            },
        },
        Variant {
            name: "path-escapes-root",
            expect: "escapes the layer root",
            build: |blob, toc, footer| {
                edit_toc(blob, toc, footer, |t| {
                    first_file(t).path = "bin/../../../etc/faasnet-evil".into()
                })
            },
        },
        Variant {
            name: "absolute-path",
            expect: "escapes the layer root",
            build: |blob, toc, footer| {
                edit_toc(blob, toc, footer, |t| {
                    first_file(t).path = "/etc/faasnet-evil".into()
                })
            },
        },
        Variant {
            name: "hardlink-escapes-root",
            expect: "escapes the layer root",
            build: |blob, toc, footer| {
                edit_toc(blob, toc, footer, |t| {
                    let e = t.entries.last_mut().unwrap();
                    e.kind = EntryKind::Hardlink;
                    e.size = 0;
                    e.link = Some("../../../etc/shadow".into());
                })
            },
        },
        Variant {
            name: "absurd-entry-count",
            expect: "entries, more than a",
            build: |blob, toc, footer| {
                edit_toc(blob, toc, footer, |t| {
                    let e = t.entries.last().unwrap().clone();
                    let n = (t.tar_size / 512) as usize + 1 - t.entries.len();
                    t.entries.extend((0..n).map(|i| {
                        let mut e = e.clone();
                        e.path = format!("x/{i}");
                        e
                    }));
                })
            },
        },
    ]
}

/// The block table says block 1 starts one byte later than its frame does (and block 0 one
/// byte longer), digests recomputed: consistent, so only the frames can tell.
fn frames_lie(blob: &[u8], toc: &Toc, footer: &Footer) -> Vec<u8> {
    edit_toc(blob, toc, footer, |t| {
        t.blocks[0].stored_len += 1;
        t.blocks[1].offset += 1;
        t.blocks[1].stored_len -= 1;
        for b in &mut t.blocks[..2] {
            b.digest = sha256_digest(&blob[b.offset as usize..(b.offset + b.stored_len) as usize]);
        }
    })
}

#[test]
fn malicious_converted_images_are_refused_and_never_mounted() {
    require_root();
    if let Err(e) = inner() {
        panic!("{e:#}");
    }
}

fn inner() -> anyhow::Result<()> {
    let registry = Registry::start("127.0.0.1")?;
    let image = TestImage::push_converted("busybox", &registry)?;
    let manifest = image.manifest(CONVERTED_TAG)?;
    let layers = manifest["layers"].as_array().context("layers")?;
    ensure!(layers.len() == 1, "busybox should have one layer");
    let digest = layers[0]["digest"].as_str().context("layer digest")?;
    let blob = http_get(&format!(
        "http://{}/v2/{}/blobs/{digest}",
        registry.addr, image.repo
    ))?;
    ensure!(sha256_digest(&blob) == digest, "downloaded blob digest");
    let (toc, footer) = match parse_tail(&blob, blob.len() as u64)? {
        TailParse::Complete(toc, footer) => (*toc, footer),
        TailParse::NeedToc(_) => bail!("whole blob given"),
    };
    ensure!(
        toc.blocks.len() >= 2,
        "busybox layer has {} blocks",
        toc.blocks.len()
    );
    let mut original_tar = Vec::new();
    decode_stream(&blob[..], &mut original_tar)?;
    let original_files = regular_files(&original_tar)?;

    let (snapshotter, containerd) = stack()?;
    let fuse_mounts = || fuse_mounts_under(snapshotter.dir());

    // Control: the same blob re-pushed under a new tag mounts lazily.
    let control = push_variant(&registry, &image.repo, &manifest, "control", &blob)?;
    rpull(&containerd, "control", &control)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", log_tail(&snapshotter.log(), 30)))?;
    ensure!(
        snapshotter.log().contains("remote layer mounted lazily"),
        "the control image was not mounted lazily:\n{}",
        log_tail(&snapshotter.log(), 30)
    );
    let baseline = fuse_mounts();
    ensure!(!baseline.is_empty(), "no FUSE mount for the control image");
    eprintln!("control: mounted lazily ({} FUSE mount)", baseline.len());

    let mut results = Vec::new();
    for v in variants() {
        let t = Instant::now();
        let bad = (v.build)(&blob, &toc, &footer);
        let reference = push_variant(&registry, &image.repo, &manifest, v.name, &bad)?;
        let log_before = snapshotter.log().len();
        let pulled = rpull(&containerd, v.name, &reference);
        let log = snapshotter.log()[log_before..].to_string();
        let client = match &pulled {
            Ok(()) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            pulled.is_err(),
            "{}: the pull of a hostile image succeeded\nsnapshotter log:\n{}",
            v.name,
            log_tail(&log, 30)
        );
        // Named twice: by the snapshotter when it declines the lazy mount, and to the user by
        // the ordinary path (our stream processor) in the pull's error.
        ensure!(
            log.contains(v.expect) && client.contains(v.expect),
            "{}: the snapshotter log and the client error must both say {:?}\nclient: {client}\n\
             snapshotter log:\n{}",
            v.name,
            v.expect,
            log_tail(&log, 30)
        );
        ensure!(
            !log.contains("remote layer mounted lazily"),
            "{}: mounted lazily:\n{}",
            v.name,
            log_tail(&log, 30)
        );
        let mounts = fuse_mounts();
        ensure!(
            mounts == baseline,
            "{}: FUSE mounts under the snapshotter changed: {mounts:?} (before: {baseline:?})",
            v.name
        );
        let said = client
            .lines()
            .find_map(|l| l.split_once("image-converter: error: "))
            .map(|(_, m)| m)
            .unwrap_or_default();
        eprintln!(
            "{}: refused in {:.1?}, nothing mounted; snapshotter log and pull error name it: {said}",
            v.name,
            t.elapsed(),
        );
        results.push(v.name);
    }

    drop(containerd);
    drop(snapshotter);

    // The undetectable-before-mount lie: mounted, bad blocks refused on read, no byte wrong.
    // A fresh snapshotter: remote snapshots are keyed by chain ID, so on the first one this
    // image (same diffIDs) would reuse the control's snapshot.
    let (snapshotter, containerd) = stack()?;
    let bad = frames_lie(&blob, &toc, &footer);
    let reference = push_variant(&registry, &image.repo, &manifest, "frames-lie", &bad)?;
    let log_before = snapshotter.log().len();
    rpull(&containerd, "frames-lie", &reference)?;
    ensure!(
        snapshotter.log()[log_before..].contains("remote layer mounted lazily"),
        "frames-lie: expected a lazy mount (the table is consistent)"
    );
    let mount = ImageMount::mount(&containerd, "frames-lie", "faasnet", &image.chain_id()?)?;
    let (mut compared, mut refused_files, mut refused_bytes) = (0u64, 0usize, 0u64);
    // Every file in 64 KiB pieces: each piece reads exactly the original bytes or fails
    // with EIO.
    const PIECE: usize = 64 * 1024;
    for (path, want) in &original_files {
        let f = std::fs::File::open(mount.path().join(path))
            .with_context(|| format!("frames-lie: open {path}"))?;
        let mut refused_here = false;
        for (i, expected) in want.chunks(PIECE).enumerate() {
            let mut got = vec![0u8; expected.len()];
            match f.read_exact_at(&mut got, (i * PIECE) as u64) {
                Ok(()) => {
                    ensure!(
                        got == expected,
                        "frames-lie: {path} bytes {}..{} differ from the original",
                        i * PIECE,
                        i * PIECE + expected.len()
                    );
                    compared += got.len() as u64;
                }
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    refused_here = true;
                    refused_bytes += expected.len() as u64;
                }
                Err(e) => bail!("frames-lie: {path} at {}: {e}", i * PIECE),
            }
        }
        refused_files += usize::from(refused_here);
    }
    drop(mount);
    let log = snapshotter.log()[log_before..].to_string();
    ensure!(
        refused_files > 0,
        "frames-lie: every file read fine ({compared} bytes of {:?}), the lying blocks were \
         never read\nsnapshotter log:\n{}",
        original_files.keys().collect::<Vec<_>>(),
        log_tail(&log, 40)
    );
    ensure!(
        log.contains("bad LZ4 frame") || log.contains("decodes to"),
        "frames-lie: the snapshotter log does not name the bad block:\n{}",
        log_tail(&log, 30)
    );
    eprintln!(
        "frames-lie: mounted; {refused_bytes} bytes in {refused_files} files refused with EIO, \
         {compared} bytes read and identical to the original, 0 bytes wrong"
    );
    eprintln!(
        "malicious images: {} variants refused before mounting, frames-lie refused on read",
        results.len()
    );
    Ok(())
}

/// A snapshotter and a containerd using it, with our stream processor for the ordinary path.
fn stack() -> anyhow::Result<(Snapshotter, Containerd)> {
    let snapshotter = Snapshotter::start(&SnapshotterOptions::default())?;
    let containerd = Containerd::start(&ContainerdOptions {
        snapshotter_socket: Some(snapshotter.socket.clone()),
        stream_processor: Some(workspace_binary("image-converter")),
        netns: None,
    })?;
    Ok((snapshotter, containerd))
}

/// Regular files of a tar stream: path (no leading `./`) → content.
fn regular_files(tar: &[u8]) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for e in archive.entries()? {
        let mut e = e?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = faasnet_format::toc::normalize_path(&e.path()?.to_string_lossy())
            .map_err(anyhow::Error::msg)?;
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.insert(path, data);
    }
    Ok(out)
}

/// `ctr-remote rpull` of `reference` in namespace `ns` with snapshotter faasnet.
fn rpull(containerd: &Containerd, ns: &str, reference: &str) -> anyhow::Result<()> {
    containerd.ctr_remote_ok(&[
        "-n",
        ns,
        "images",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "faasnet",
        reference,
    ])?;
    Ok(())
}

/// FUSE mounts whose mount point lies under `dir`.
fn fuse_mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy().into_owned();
    info.lines()
        .filter(|l| {
            let mut fields = l.split(" - ");
            let (head, tail) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
            let mountpoint = head.split(' ').nth(4).unwrap_or("");
            mountpoint.starts_with(&dir) && tail.starts_with("fuse")
        })
        .map(|l| l.split(' ').nth(4).unwrap_or("").to_string())
        .collect()
}

/// Pushes `blob` and a copy of `manifest` using it (size, digest and TOC annotations
/// updated) as tag `tag`; returns the reference.
fn push_variant(
    registry: &Registry,
    repo: &str,
    manifest: &Value,
    tag: &str,
    blob: &[u8],
) -> anyhow::Result<String> {
    let digest = sha256_digest(blob);
    let base = format!("http://{}/v2/{repo}", registry.addr);
    // Monolithic upload: POST for a session, PUT with the digest.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("blob");
    std::fs::write(&file, blob)?;
    let headers = curl(&[
        "-X",
        "POST",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("{base}/blobs/uploads/"),
    ])?;
    let location = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .context("upload: no Location header")?;
    let location = if location.starts_with('/') {
        format!("http://{}{location}", registry.addr)
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{location}{sep}digest={digest}"),
    ])?;

    let mut m = manifest.clone();
    let layer = &mut m["layers"][0];
    layer["digest"] = digest.clone().into();
    layer["size"] = blob.len().into();
    // Keep the TOC annotations truthful about where the (new) footer says the TOC is, when
    // the footer parses; a hostile footer leaves them as they were.
    if let Ok(f) = Footer::parse(&blob[blob.len() - 72..], blob.len() as u64) {
        let a = &mut layer["annotations"];
        a[faasnet_format::annotations::TOC_OFFSET] = f.toc_offset.to_string().into();
        a[faasnet_format::annotations::TOC_LENGTH] = f.toc_length.to_string().into();
        a[faasnet_format::annotations::TOC_DIGEST] =
            format!("sha256:{}", hex::encode(f.toc_sha256)).into();
    }
    let media_type = m["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let mfile = dir.path().join("manifest.json");
    std::fs::write(&mfile, serde_json::to_vec(&m)?)?;
    curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Content-Type: {media_type}"),
        "--data-binary",
        &format!("@{}", mfile.display()),
        &format!("{base}/manifests/{tag}"),
    ])?;
    Ok(format!("{}/{repo}:{tag}", registry.addr))
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "60"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run curl")?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
