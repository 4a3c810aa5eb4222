//! An ordinary (unconverted) image through our snapshotter, all real: docker-registry, our
//! `snapshotter` with the lazy path on, a private containerd, `ctr`, `ctr-remote`, runc.
//!
//! The original busybox image is pulled through snapshotter `faasnet` twice, on two VMs
//! (snapshotter + containerd each; within one containerd, a second pull would reuse the
//! first one's committed layer without asking the snapshotter): with `ctr-remote images
//! rpull` (its Prepare carries the remote-layer labels, the lazy path looks at the blob,
//! finds no FaaSNet footer and says "ordinary path") and with plain `ctr images pull` (ctr 1.6 fetches every blob, then
//! unpacks with no labels at all, so the lazy path is not even asked). Both unpack the layer
//! the way containerd's overlayfs snapshotter does: the snapshotter prepares and commits
//! it, the layer blob is in containerd's content store, nothing is mounted through FUSE, no
//! remote snapshot or fallback is counted, and both containers print "hello from busybox".
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use anyhow::ensure;
use faasnet_integration::images::TestImage;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::stack::{log_tail, SnapshotterOptions, Vm};

#[test]
fn ordinary_image_takes_the_ordinary_path_with_pull_and_rpull() {
    require_root();
    if let Err(e) = ordinary_image() {
        panic!("{e:#}");
    }
}

fn ordinary_image() -> anyhow::Result<()> {
    let registry = Registry::start("127.0.0.1")?;
    let image = TestImage::push("busybox", &registry)?;
    let layers = image.layer_digests("latest")?;

    // 1. ctr-remote rpull: remote-layer labels, but not a FaaSNet blob.
    let vm = Vm::start("ordinary-rpull", &SnapshotterOptions::default())?;
    vm.rpull("default", &image.original)?;
    check_ordinary(&vm, &layers, Some("not a FaaSNet layer; ordinary path"))?;
    let out = vm.run("default", &image.original, "run")?;
    ensure!(
        out.trim_end() == "hello from busybox",
        "busybox (rpull) printed {out:?}"
    );
    drop(vm);

    // 2. Plain ctr pull: no remote-layer labels at all.
    let vm = Vm::start("ordinary-pull", &SnapshotterOptions::default())?;
    vm.containerd.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "faasnet",
        &image.original,
    ])?;
    // ctr 1.6 fetches, then unpacks with no labels: the snapshotter is not even asked to
    // look for a remote layer.
    check_ordinary(&vm, &layers, None)?;
    let out = vm.run("default", &image.original, "run")?;
    ensure!(
        out.trim_end() == "hello from busybox",
        "busybox (plain pull) printed {out:?}"
    );
    eprintln!(
        "busybox: rpull and plain pull both took the ordinary path; layer in the content \
         store; both printed \"hello from busybox\""
    );
    Ok(())
}

/// The snapshotter logged `message`, prepared and committed the layer the ordinary way,
/// mounted nothing lazily, made no remote snapshot; the layer blobs are in containerd's
/// content store.
fn check_ordinary(vm: &Vm, layers: &[String], message: Option<&str>) -> anyhow::Result<()> {
    let log = vm.snapshotter.log();
    if let Some(message) = message {
        ensure!(
            log.contains(message),
            "{}: the snapshotter should log {message:?}:\n{}",
            vm.name,
            log_tail(&log, 30)
        );
    }
    ensure!(
        !log.contains("remote layer mounted lazily"),
        "{}: an ordinary layer was mounted lazily:\n{}",
        vm.name,
        log_tail(&log, 30)
    );
    let content = vm.containerd.content_blobs();
    for l in layers {
        ensure!(
            content.contains(l),
            "{}: containerd's content store should hold layer {l}, holds {content:?}",
            vm.name
        );
    }
    let m = vm.snapshotter.metrics()?;
    ensure!(
        m.get("faasnet_snapshotter_remote_prepares_total") == 0.0
            && m.get("faasnet_snapshotter_remote_fallbacks_total") == 0.0,
        "{}: an ordinary image should make no remote snapshot and no fallback: {:?}",
        vm.name,
        m.samples
            .iter()
            .filter(|(k, _)| k.contains("remote"))
            .collect::<Vec<_>>()
    );
    let (prepares, commits) = (
        m.get("faasnet_snapshotter_prepares_total"),
        m.get("faasnet_snapshotter_commits_total"),
    );
    ensure!(
        prepares >= layers.len() as f64 && commits >= layers.len() as f64,
        "{}: the layer should be prepared and committed by the snapshotter (unpacked): \
         prepares {prepares}, commits {commits}",
        vm.name
    );
    let dir = vm.snapshotter.dir().display().to_string();
    let fuse = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(&dir) && l.contains("fuse"))
        .count();
    ensure!(
        fuse == 0,
        "{}: {fuse} FUSE mounts for an ordinary image",
        vm.name
    );
    Ok(())
}
