//! Fault: `kill -9` of an inner VM's snapshotter while its subtree is starting. All real:
//! five network namespaces on a bridge with 16 Mbit/s links, a docker-registry and the
//! `coordinator` on the host's bridge address, and in each VM its own `snapshotter` and
//! containerd; `ctr-remote`, runc, FUSE.
//!
//! 1. The five VMs pull and run the converted tricky image at once (a burst): the function
//!    tree is vm at position 0 (root), 1 and 2 below it, 3 and 4 below position 1.
//! 2. Once the tree holds all five and the children of the node at position 1 (an inner
//!    node) have taken a few blocks from it, its snapshotter is killed with SIGKILL, and so is its FUSE descriptor
//!    holder (the VM's snapshotter is gone for good, it does not restart).
//! 3. Within 2 s the coordinator has removed it and both its children have a new upstream
//!    (measured from the kill by polling the coordinator's admin service; the children's
//!    logs show the watch update).
//! 4. Every other VM's container starts with the expected output, and each survivor's
//!    rootfs equals the ORIGINAL image's file by file (`compare_with_original`).
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{
    finish_or_unstick, join_all, kill_fuse_holders, sources, spawn_starts, time_until, Admin,
};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{log_tail, Coordinator, SnapshotterOptions, Vm};

/// Bridge `fnb60`, addresses 10.77.60.0/24 (unique among the test files).
const NET_ID: u8 = 60;
const VMS: usize = 5;

#[test]
fn inner_node_killed_during_a_burst() {
    require_root();
    if let Err(e) = inner_killed() {
        panic!("{e:#}");
    }
}

fn inner_killed() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, VMS, Some("16mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let admin = Admin::new(&coordinator)?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let expected = expected_tricky()?;
    let digest = image.converted_digest.clone().context("converted digest")?;
    let mut vms: Vec<Vm> = (0..VMS)
        .map(|i| {
            Vm::start(
                &format!("n{NET_ID}vm{i}"),
                &SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    // 1. The burst, one thread per VM; the main thread watches the tree and kills.
    let barrier = Barrier::new(VMS + 1);
    let image_ref = image.converted();
    let (results, victim) = std::thread::scope(|s| {
        let handles = spawn_starts(s, &vms, image_ref, &barrier);
        barrier.wait();
        let burst = Instant::now();
        // 2. Wait for the full tree, then kill position 1.
        let tree = time_until("all five VMs in the tree", Duration::from_secs(60), || {
            Ok(admin.tree(&digest)?.len() == VMS)
        })
        .and_then(|_| admin.tree(&digest));
        let outcome = tree.map(|tree| {
            let inner = tree[1].id.clone();
            let children: Vec<String> = tree
                .iter()
                .filter(|n| n.parent.as_deref() == Some(inner.as_str()))
                .map(|n| n.id.clone())
                .collect();
            let idx: usize = inner.trim_start_matches("vm").parse().expect("vm<i>");
            // Mid-load: its children are already taking blocks from it.
            let child_vms: Vec<&Vm> = children
                .iter()
                .map(|c| &vms[c.trim_start_matches("vm").parse::<usize>().expect("vm<i>")])
                .collect();
            let _ = time_until(
                "the children to load from it",
                Duration::from_secs(20),
                || {
                    let mut peer = 0;
                    for vm in &child_vms {
                        peer += vm.snapshotter.metrics()?.lazy_blocks("peer");
                    }
                    Ok(peer >= 4)
                },
            );
            let vm = &vms[idx];
            let m = vm.snapshotter.metrics().unwrap_or_default();
            let kill_at = burst.elapsed();
            kill9_shared(vm);
            // The whole snapshotter goes, FUSE descriptor holder included: its mounts die.
            kill_fuse_holders(vm.snapshotter.dir());
            vm.snapshotter.detach_mounts();
            let t = Instant::now();
            // 3. Its children get a new upstream.
            let recovered = time_until(
                "the killed node's children to have a new upstream",
                Duration::from_secs(15),
                || {
                    let p = admin.parents(&digest)?;
                    Ok(!p.contains_key(&inner)
                        && children
                            .iter()
                            .all(|c| p.get(c).is_some_and(|up| up.as_deref() != Some(&inner))))
                },
            );
            (
                idx,
                inner,
                children,
                m,
                kill_at,
                recovered.map(|_| t.elapsed()),
            )
        });
        let stuck = finish_or_unstick(&handles, Duration::from_secs(150));
        if !stuck.is_empty() {
            eprintln!("VM commands still running after 150 s, killed: {stuck:#?}");
            for vm in &vms {
                eprintln!("{}:\n{}", vm.name, log_tail(&vm.snapshotter.log(), 30));
            }
        }
        let results: Vec<_> = join_all(handles);
        (results, outcome)
    });
    let (idx, inner, children, at_kill, kill_after, recovery) = victim?;
    eprintln!(
        "killed {inner} (position 1, children {children:?}) {:.1?} into the burst, \
         when it had {}",
        kill_after,
        sources(&at_kill)
    );
    let recovery = recovery.with_context(|| {
        format!(
            "tree now:\n{}\ncoordinator log:\n{}",
            coordinator.draw(&digest),
            log_tail(&coordinator.log(), 20)
        )
    })?;
    eprintln!(
        "children re-parented {recovery:.2?} after the kill; tree now:\n{}",
        coordinator.draw(&digest)
    );
    ensure!(
        recovery <= Duration::from_secs(2),
        "the children of {inner} got a new upstream only {recovery:?} after the kill (> 2 s)"
    );

    // 4. Every other VM started the function with the right files.
    for (i, (vm, r)) in vms.iter().zip(&results).enumerate() {
        if i == idx {
            continue;
        }
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
        let m = vm.snapshotter.metrics()?;
        eprintln!(
            "{}: started in {took:.1?}; {}; fallbacks {}",
            vm.name,
            sources(&m),
            m.lazy_counter("peer_fallbacks")
        );
    }
    for child in &children {
        let vm = &vms[child.trim_start_matches("vm").parse::<usize>()?];
        let log = vm.snapshotter.log();
        ensure!(
            log.contains("upstream changed"),
            "{}: no upstream change in its log:\n{}",
            vm.name,
            log_tail(&log, 30)
        );
    }
    let chain = image.chain_id()?;
    for (i, vm) in vms.iter().enumerate() {
        if i == idx {
            continue;
        }
        let summary = compare_with_original(&vm.containerd, "default", &image.original, &chain)
            .with_context(|| format!("{}'s rootfs", vm.name))?;
        eprintln!("{}: rootfs equals the original: {summary}", vm.name);
    }
    let victim = vms.remove(idx);
    drop(victim);
    Ok(())
}

/// `kill -9` of a VM's snapshotter through a shared reference (the VM threads hold the
/// others).
fn kill9_shared(vm: &Vm) {
    let pid = vm.snapshotter.pid();
    // SAFETY: kill(2) on the snapshotter's own pid (our child, not yet reaped).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}
