//! A VM's upstream dies while the VM is loading the function: the container still starts
//! and its files are right. All real: two network namespaces on a bridge with 16 Mbit/s
//! links (so loading takes seconds), a docker-registry and the `coordinator` on the host's
//! bridge address, and in each VM its own `snapshotter` and containerd; `ctr-remote`, runc,
//! FUSE.
//!
//! 1. vm0 pulls (`ctr-remote images rpull`) and runs the converted tricky image: it is the
//!    root of the image's function tree and reads from the registry.
//! 2. vm1 pulls it: it joins the tree under vm0 and starts loading blocks from vm0.
//! 3. Right away vm0's snapshotter is killed with SIGKILL (its FUSE mounts die with it).
//! 4. vm1 runs the image: the output equals `hack/images.sh expected tricky`, and its
//!    rootfs equals the ORIGINAL image's (pulled into vm1's containerd with the overlayfs
//!    snapshotter) file by file; vm1's metrics show peer fallbacks or registry blocks.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{
    eventually_all_blocks, log_tail, Coordinator, SnapshotterOptions, Vm,
};

/// Bridge `fnb42`, addresses 10.77.42.0/24 (unique among the test files).
const NET_ID: u8 = 42;

#[test]
fn container_starts_and_is_intact_when_its_upstream_is_killed() {
    require_root();
    if let Err(e) = upstream_killed() {
        panic!("{e:#}");
    }
}

fn upstream_killed() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, 2, Some("16mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let total_blocks: u64 = image.converted_layers()?.iter().map(|l| l.blocks).sum();
    let expected = expected_tricky()?;
    let digest = image.converted_digest.clone().unwrap_or_default();
    let start = |i: usize| {
        Vm::start(
            &format!("n{NET_ID}vm{i}"),
            &SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)),
        )
    };
    let mut vm0 = start(0)?;
    let vm1 = start(1)?;

    // 1. vm0, the root, loads the image from the registry.
    let t = Instant::now();
    vm0.rpull("default", image.converted())?;
    let out = vm0.run("default", image.converted(), "run")?;
    ensure!(
        out == expected,
        "vm0's output differs from `hack/images.sh expected tricky`:\n{}",
        first_difference(&expected, &out)
    );
    eprintln!("vm0 (root) pulled and ran tricky in {:.1?}", t.elapsed());

    // 2. vm1 joins under vm0 and starts loading from it.
    let t = Instant::now();
    vm1.rpull("default", image.converted())?;
    let at_kill = vm1.snapshotter.metrics()?;

    // 3. vm0's snapshotter dies.
    vm0.snapshotter.kill9();
    vm0.snapshotter.detach_mounts();
    eprintln!(
        "vm1 pulled in {:.1?}; killed vm0's snapshotter with {} of {total_blocks} blocks \
         at vm1 (peer {}, registry {})",
        t.elapsed(),
        at_kill.lazy_blocks("peer") + at_kill.lazy_blocks("registry"),
        at_kill.lazy_blocks("peer"),
        at_kill.lazy_blocks("registry")
    );
    let log = vm1.snapshotter.log();
    ensure!(
        log.contains("joined function tree") && log.contains("upstream=peer vm0"),
        "vm1 should have joined the tree under vm0:\n{}\n{}",
        coordinator.draw(&digest),
        log_tail(&log, 30)
    );

    // 4. vm1's container starts anyway, with the right files.
    let t = Instant::now();
    let out = vm1.run("default", image.converted(), "run")?;
    ensure!(
        out == expected,
        "vm1's output after its upstream died differs from `hack/images.sh expected tricky`:\n{}",
        first_difference(&expected, &out)
    );
    eprintln!(
        "vm1 ran tricky in {:.1?} after its upstream died: output as expected",
        t.elapsed()
    );

    let summary = compare_with_original(
        &vm1.containerd,
        "default",
        &image.original,
        &image.chain_id()?,
    )
    .context("vm1's rootfs after its upstream died")?;
    eprintln!("vm1's rootfs equals the original: {summary}");

    // Every block vm1 holds came from vm0 before it died, or from the registry after.
    eventually_all_blocks(
        std::slice::from_ref(&vm1),
        total_blocks,
        Duration::from_secs(60),
    )?;
    let m = vm1.snapshotter.metrics()?;
    eprintln!(
        "vm1: blocks from peer {}, registry {}, cache {}; peer fallbacks {}",
        m.lazy_blocks("peer"),
        m.lazy_blocks("registry"),
        m.lazy_blocks("cache"),
        m.lazy_counter("peer_fallbacks")
    );
    ensure!(
        m.lazy_counter("peer_fallbacks") > 0 || m.lazy_blocks("registry") > 0,
        "vm1 should have gone to the registry once vm0 died: {:?}",
        m.samples
    );
    Ok(())
}
