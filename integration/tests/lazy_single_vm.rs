//! Lazy pull on one VM, all real: docker-registry, `image-converter`, our `snapshotter`
//! (no function tree: blocks come from the registry), a private containerd with it as proxy
//! snapshotter `faasnet`, `ctr-remote`, runc and FUSE.
//!
//! For the tricky and the realistic test image (hack/images.sh), converted:
//!
//! 1. `ctr-remote images rpull --snapshotter faasnet` mounts every layer lazily (snapshotter
//!    log) and containerd's content store ends up with the manifest and the config only, no
//!    layer blob;
//! 2. `ctr run` of the image's command prints what it must (tricky: exactly
//!    `hack/images.sh expected tricky`; realistic: "faasnet function ready");
//! 3. the lazily pulled rootfs (`ctr images mount --snapshotter faasnet`: overlay over the
//!    FUSE layers) equals, file by file, the ORIGINAL image pulled in another namespace with
//!    containerd's own overlayfs snapshotter and mounted the same way: type, content, mode
//!    with setuid/setgid/sticky, owner, symlink targets, devices, xattrs, mtimes with
//!    nanoseconds, hardlink groups.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage, CONVERTED_TAG};
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{log_tail, SnapshotterOptions, Vm};

#[test]
fn tricky_lazily_pulled_runs_and_equals_the_original() {
    lazy_single_vm("tricky", |out| {
        let expected = expected_tricky()?;
        ensure!(
            out == expected,
            "the lazily pulled tricky image's output differs from `hack/images.sh expected tricky`:\n{}",
            first_difference(&expected, out)
        );
        Ok(())
    });
}

#[test]
fn realistic_lazily_pulled_runs_and_equals_the_original() {
    lazy_single_vm("realistic", |out| {
        ensure!(
            out.contains("faasnet function ready: numpy "),
            "the realistic image printed {out:?}, expected \"faasnet function ready: numpy ...\""
        );
        Ok(())
    });
}

fn lazy_single_vm(name: &str, check_output: impl Fn(&str) -> anyhow::Result<()>) {
    require_root();
    if let Err(e) = lazy_single_vm_inner(name, check_output) {
        panic!("{name}: {e:#}");
    }
}

fn lazy_single_vm_inner(
    name: &str,
    check_output: impl Fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let registry = Registry::start("127.0.0.1")?;
    let t = Instant::now();
    let image = TestImage::push_converted(name, &registry)?;
    eprintln!("{name}: pushed and converted in {:.1?}", t.elapsed());
    let vm = Vm::start(&format!("single-{name}"), &SnapshotterOptions::default())?;

    // 1. Lazy pull: every layer mounted lazily, no layer blob in containerd's content store.
    let pull = vm.rpull("lazy", image.converted())?;
    let layers = image.layer_digests(CONVERTED_TAG)?;
    let log = vm.snapshotter.log();
    let mounted = log.matches("remote layer mounted lazily").count();
    ensure!(
        mounted >= layers.len(),
        "{} layers but the snapshotter logged {mounted} lazy mounts:\n{}",
        layers.len(),
        log_tail(&log, 40)
    );
    let manifest = image.manifest(CONVERTED_TAG)?;
    let config = manifest["config"]["digest"].as_str().unwrap_or_default();
    let content: BTreeSet<String> = vm.containerd.content_blobs().into_iter().collect();
    let digest = image.converted_digest.clone().unwrap_or_default();
    let allowed: BTreeSet<String> = [digest.clone(), config.to_string()].into();
    ensure!(
        layers.iter().all(|l| !content.contains(l)),
        "containerd's content store holds layer blobs after a lazy pull: {content:?} (layers {layers:?})"
    );
    ensure!(
        content == allowed,
        "containerd's content store should hold exactly the manifest {digest} and the config \
         {config}, holds {content:?}"
    );
    eprintln!(
        "{name}: rpull {pull:.1?}, {} layers mounted lazily, content store: manifest + config",
        layers.len()
    );

    // 2. The image's command.
    let t = Instant::now();
    let out = vm.run("lazy", image.converted(), "run")?;
    check_output(&out).with_context(|| format!("ctr run (took {:.1?})", t.elapsed()))?;
    eprintln!(
        "{name}: ctr run OK in {:.1?}: {}",
        t.elapsed(),
        out.lines().last().unwrap_or_default()
    );

    // 3. Every file of the lazily pulled rootfs against the original image's.
    let t = Instant::now();
    let summary =
        compare_with_original(&vm.containerd, "lazy", &image.original, &image.chain_id()?)?;
    eprintln!(
        "{name}: rootfs identical to the original ({:.1?}): {summary}",
        t.elapsed()
    );
    let m = vm.snapshotter.metrics()?;
    eprintln!(
        "{name}: blocks from registry {}, cache {}, peer {}",
        m.lazy_blocks("registry"),
        m.lazy_blocks("cache"),
        m.lazy_blocks("peer")
    );
    drop(vm);
    Ok(())
}
