//! Fault: the block cache reaches its disk quota. All real: one network namespace, a
//! docker-registry on the host's bridge address, a `snapshotter` (no function tree: every
//! block from the registry) with `lazy.cache_quota_bytes` set below what the converted
//! tricky and realistic images need together (they share no layer), and containerd.
//!
//! 1. tricky is pulled and run; its image is then removed (`ctr images rm --sync`), so its
//!    layers are unmounted: in the cache, not in use.
//! 2. realistic is pulled and run: the cache goes over quota and tricky's unused layers
//!    are evicted (metric `evicted_layers`, their directories are gone); realistic's layers
//!    (in use) all stay; the function starts.
//! 3. realistic is removed and tricky pulled and run again: its evicted blocks are fetched
//!    again, realistic's now unused layers are evicted, tricky's output is right and its
//!    rootfs equals the ORIGINAL image's (`compare_with_original`).
//! 4. The cache holds at most the quota on disk.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{disk_usage, fuse_mounts_under};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{eventually, log_tail, SnapshotterOptions, Vm};

/// Bridge `fnb65`, addresses 10.77.65.0/24 (unique among the test files).
const NET_ID: u8 = 65;

#[test]
fn unused_layers_are_evicted_at_the_quota_and_starts_stay_correct() {
    require_root();
    if let Err(e) = disk_quota() {
        panic!("{e:#}");
    }
}

fn layer_dirs(cache: &Path, image: &TestImage) -> anyhow::Result<Vec<bool>> {
    Ok(image
        .converted_layers()?
        .iter()
        .map(|l| {
            cache
                .join(format!("sha256-{}", &l.digest["sha256:".len()..]))
                .exists()
        })
        .collect())
}

fn remove(vm: &Vm, image: &str) -> anyhow::Result<()> {
    vm.containerd
        .ctr_ok(&["-n", "default", "images", "rm", "--sync", image])?;
    eventually(
        "the image's layers to be unmounted",
        Duration::from_secs(30),
        || Ok(fuse_mounts_under(vm.snapshotter.dir()) == 0),
    )
}

fn disk_quota() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, 1, None)?;
    let registry = Registry::start(&net.host_ip())?;
    let tricky = TestImage::push_converted("tricky", &registry)?;
    let realistic = TestImage::push_converted("realistic", &registry)?;
    let size = |i: &TestImage| -> anyhow::Result<u64> {
        Ok(i.converted_layers()?.iter().map(|l| l.stored_size).sum())
    };
    let (t, b) = (size(&tricky)?, size(&realistic)?);
    let quota = b + t / 2;
    eprintln!("tricky {t} B, realistic {b} B of blocks; quota {quota} B");
    let mut opts = SnapshotterOptions::in_vm(&net, 0, &registry.addr, None);
    opts.lazy_extra = format!("cache_quota_bytes = {quota}\n");
    let vm = Vm::start(&format!("n{NET_ID}vm0"), &opts)?;
    let cache = vm
        .snapshotter
        .dir()
        .join("root")
        .join("cache")
        .join("layers");
    let expected = expected_tricky()?;
    let total_tricky: u64 = tricky.converted_layers()?.iter().map(|l| l.blocks).sum();

    // 1. tricky, then removed.
    vm.rpull("default", tricky.converted())?;
    ensure!(vm.run("default", tricky.converted(), "t1")? == expected);
    eventually("tricky's every block", Duration::from_secs(60), || {
        Ok(vm.snapshotter.metrics()?.lazy_blocks("registry") >= total_tricky)
    })?;
    remove(&vm, tricky.converted())?;
    ensure!(
        layer_dirs(&cache, &tricky)?.iter().all(|p| *p),
        "tricky's layers should still be cached: {:?}, cache holds {:?}",
        layer_dirs(&cache, &tricky)?,
        std::fs::read_dir(&cache).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    eprintln!(
        "tricky loaded and removed: cache {} B on disk, evicted {}",
        disk_usage(&cache)?,
        vm.snapshotter.metrics()?.lazy_counter("evicted_layers")
    );

    // 2. realistic pushes the cache over quota: tricky's unused layers go.
    vm.rpull("default", realistic.converted())?;
    let out = vm.run("default", realistic.converted(), "b1")?;
    ensure!(
        out.contains("faasnet function ready: numpy "),
        "realistic printed {out:?}"
    );
    let total_realistic: u64 = realistic.converted_layers()?.iter().map(|l| l.blocks).sum();
    eventually("realistic's every block", Duration::from_secs(120), || {
        Ok(vm.snapshotter.metrics()?.lazy_blocks("registry") >= total_tricky + total_realistic)
    })?;
    eventually("tricky's layers evicted", Duration::from_secs(60), || {
        Ok(vm.snapshotter.metrics()?.lazy_counter("evicted_layers") > 0)
    })
    .with_context(|| log_tail(&vm.snapshotter.log(), 30))?;
    let left = layer_dirs(&cache, &tricky)?;
    ensure!(
        left.iter().any(|p| !p),
        "no tricky layer directory was removed: {left:?}"
    );
    ensure!(
        layer_dirs(&cache, &realistic)?.iter().all(|p| *p),
        "a layer of realistic (in use) was evicted"
    );
    let evicted_1 = vm.snapshotter.metrics()?.lazy_counter("evicted_layers");
    eprintln!(
        "realistic started; evicted {evicted_1} tricky layers (still cached: {left:?}); \
         cache {} B on disk",
        disk_usage(&cache)?
    );

    // 3. realistic removed, tricky again.
    remove(&vm, realistic.converted())?;
    let before = vm.snapshotter.metrics()?.lazy_blocks("registry");
    vm.rpull("default", tricky.converted())?;
    let out = vm.run("default", tricky.converted(), "t2")?;
    ensure!(
        out == expected,
        "tricky's output after eviction differs:\n{}",
        first_difference(&expected, &out)
    );
    eventually(
        "tricky's every block again",
        Duration::from_secs(60),
        || {
            let m = vm.snapshotter.metrics()?;
            Ok(m.lazy_blocks("registry") + m.lazy_blocks("cache") > before
                && layer_dirs(&cache, &tricky)?.iter().all(|p| *p))
        },
    )?;
    let m = vm.snapshotter.metrics()?;
    let refetched = m.lazy_blocks("registry") - before;
    eprintln!(
        "tricky started again: {refetched} blocks fetched again from the registry; evicted \
         layers {}",
        m.lazy_counter("evicted_layers")
    );
    ensure!(
        refetched > 0,
        "no block of the evicted layers was fetched again"
    );
    eventually(
        "realistic's unused layers evicted",
        Duration::from_secs(60),
        || Ok(layer_dirs(&cache, &realistic)?.iter().any(|p| !p)),
    )?;
    let summary = compare_with_original(
        &vm.containerd,
        "default",
        &tricky.original,
        &tricky.chain_id()?,
    )
    .context("tricky's rootfs after eviction")?;
    eprintln!("tricky's rootfs equals the original: {summary}");

    // 4. Within the quota on disk (allocated blocks; bitmaps and TOCs are small).
    let used = disk_usage(&cache)?;
    eprintln!("cache on disk {used} B, quota {quota} B");
    ensure!(
        used <= quota + (1 << 20),
        "the cache uses {used} B on disk, quota {quota} B"
    );
    Ok(())
}
