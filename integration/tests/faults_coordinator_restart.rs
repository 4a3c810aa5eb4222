//! Fault: `kill -9` and restart of the coordinator during a burst. All real: six network
//! namespaces on a bridge with 16 Mbit/s links, a docker-registry and the `coordinator` on
//! the host's bridge address, and in each VM its own `snapshotter` and containerd.
//!
//! 1. Five VMs pull and run the converted tricky image at once.
//! 2. As soon as two of them are in the function tree, the coordinator is killed with
//!    SIGKILL; one second later it is started again on the same address and state.
//! 3. Provisioning completes: all five containers start with the expected output.
//! 4. The tree is restored: the coordinator knows all five VMs, in a well-formed balanced
//!    tree (parent of position i at (i-1)/2).
//! 5. Later joins work: a sixth VM starts the function, joins under the right parent.
//! 6. Every VM's rootfs equals the ORIGINAL image's (`compare_with_original`).
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{
    check_tree_shape, finish_or_unstick, join_all, sources, spawn_starts, time_until, Admin,
};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{log_tail, Coordinator, SnapshotterOptions, Vm};

/// Bridge `fnb61`, addresses 10.77.61.0/24 (unique among the test files).
const NET_ID: u8 = 61;
const BURST: usize = 5;

#[test]
fn coordinator_killed_and_restarted_during_a_burst() {
    require_root();
    if let Err(e) = coordinator_restart() {
        panic!("{e:#}");
    }
}

fn coordinator_restart() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, BURST + 1, Some("16mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let mut coordinator = Coordinator::start(&net.host_ip())?;
    let admin = Admin::new(&coordinator)?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let expected = expected_tricky()?;
    let digest = image.converted_digest.clone().context("converted digest")?;
    let options: Vec<SnapshotterOptions> = (0..=BURST)
        .map(|i| SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)))
        .collect();
    let start = |i: usize| Vm::start(&format!("n{NET_ID}vm{i}"), &options[i]);
    let vms: Vec<Vm> = (0..BURST).map(start).collect::<anyhow::Result<_>>()?;

    // 1.-2. The burst; the main thread kills and restarts the coordinator.
    let barrier = Barrier::new(BURST + 1);
    let image_ref = image.converted();
    let (results, outage) = std::thread::scope(|s| {
        let handles = spawn_starts(s, &vms, image_ref, &barrier);
        barrier.wait();
        let burst = Instant::now();
        let outage = time_until("two VMs in the tree", Duration::from_secs(60), || {
            Ok(admin.tree(&digest)?.len() >= 2)
        })
        .and_then(|_| {
            let before = admin.tree(&digest)?.len();
            let at = burst.elapsed();
            coordinator.kill9();
            std::thread::sleep(Duration::from_secs(1));
            let t = Instant::now();
            coordinator.restart()?;
            Ok((at, before, t.elapsed() + Duration::from_secs(1)))
        });
        let stuck = finish_or_unstick(&handles, Duration::from_secs(150));
        if !stuck.is_empty() {
            eprintln!("VM commands still running after 150 s, killed: {stuck:#?}");
        }
        let results: Vec<_> = join_all(handles);
        (results, outage)
    });
    let (kill_at, nodes_at_kill, down_for) = outage?;
    eprintln!(
        "coordinator killed {kill_at:.1?} into the burst with {nodes_at_kill} nodes in the tree; \
         down for {down_for:.1?}"
    );

    // 3. Provisioning completed.
    for (vm, r) in vms.iter().zip(&results) {
        let (took, out) = r
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .with_context(|| format!("{}: start the function", vm.name))?;
        ensure!(
            *out == expected,
            "{}: output differs:\n{}",
            vm.name,
            first_difference(&expected, out)
        );
        eprintln!(
            "{}: started in {took:.1?}; {}",
            vm.name,
            sources(&vm.snapshotter.metrics()?)
        );
    }

    // 4. The tree is restored, with every VM.
    let restored = time_until("all five VMs in the tree", Duration::from_secs(30), || {
        Ok(admin.tree(&digest)?.len() == BURST)
    })
    .with_context(|| {
        format!(
            "tree:\n{}\ncoordinator log:\n{}",
            coordinator.draw(&digest),
            log_tail(&coordinator.log(), 30)
        )
    })?;
    let tree = admin.tree(&digest)?;
    check_tree_shape(&tree)?;
    let mut ids: Vec<String> = tree.iter().map(|n| n.id.clone()).collect();
    ids.sort();
    ensure!(
        ids == (0..BURST).map(|i| format!("vm{i}")).collect::<Vec<_>>(),
        "tree holds {ids:?}"
    );
    eprintln!(
        "tree restored ({restored:.1?} after the burst ended):\n{}",
        coordinator.draw(&digest)
    );

    // 5. A later VM joins and starts the function.
    let late = start(BURST)?;
    let t = Instant::now();
    late.rpull("default", image.converted())?;
    let out = late.run("default", image.converted(), "fn")?;
    ensure!(out == expected, "{}: output differs", late.name);
    let tree = admin.tree(&digest)?;
    check_tree_shape(&tree)?;
    let node = tree
        .iter()
        .find(|n| n.id == format!("vm{BURST}"))
        .context("the late VM is not in the tree")?;
    ensure!(
        node.position == BURST as u64,
        "late VM at position {}",
        node.position
    );
    eprintln!(
        "late VM joined under {:?} and started in {:.1?}; {}",
        node.parent,
        t.elapsed(),
        sources(&late.snapshotter.metrics()?)
    );

    // 6. Bytes.
    let chain = image.chain_id()?;
    for vm in vms.iter().chain([&late]) {
        let summary = compare_with_original(&vm.containerd, "default", &image.original, &chain)
            .with_context(|| format!("{}'s rootfs", vm.name))?;
        eprintln!("{}: rootfs equals the original: {summary}", vm.name);
    }
    Ok(())
}
