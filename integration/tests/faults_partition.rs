//! Fault: a network partition cuts a subtree off from the rest of the function tree while it
//! loads; its VMs fall back to the registry and start correctly. All real: five network
//! namespaces on a bridge with 16 Mbit/s links, a docker-registry and the `coordinator` on
//! the host's bridge address, and in each VM its own `snapshotter` and containerd.
//!
//! All VMs share one bridge, so "partition" means: every packet between a VM of the
//! subtree and a VM outside it is dropped (iptables DROP in the subtree's namespaces, both
//! directions: connections hang, as across a dead link), while every VM still reaches the
//! host, where the registry and the coordinator run.
//!
//! 1. vm0 pulls and runs the converted tricky image (root of the tree, every block).
//! 2. vm1..vm4 pull it one after the other, so the tree is vm0 → (vm1 → (vm3, vm4), vm2).
//! 3. The subtree {vm1, vm3, vm4} is cut off from {vm0, vm2}.
//! 4. vm1..vm4 run the function at once: all outputs are right. vm1, the subtree's root,
//!    took its missing blocks from the registry after its parent stopped answering
//!    (stall timeout, then the parent is skipped); vm3 and vm4 from vm1 or the registry.
//!    The coordinator, which still reaches vm0, keeps it in the tree (the probe answers).
//! 5. The rootfs of every VM of the subtree equals the ORIGINAL image's.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{check_tree_shape, sources, Admin, Partition};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{eventually_all_blocks, Coordinator, SnapshotterOptions, Vm};

/// Bridge `fnb63`, addresses 10.77.63.0/24 (unique among the test files).
const NET_ID: u8 = 63;
const VMS: usize = 5;
const SUBTREE: [usize; 3] = [1, 3, 4];
const REST: [usize; 2] = [0, 2];

#[test]
fn a_partitioned_subtree_falls_back_to_the_registry() {
    require_root();
    if let Err(e) = partition() {
        panic!("{e:#}");
    }
}

fn partition() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, VMS, Some("16mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let admin = Admin::new(&coordinator)?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let total_blocks: u64 = image.converted_layers()?.iter().map(|l| l.blocks).sum();
    let expected = expected_tricky()?;
    let digest = image.converted_digest.clone().context("converted digest")?;
    let vms: Vec<Vm> = (0..VMS)
        .map(|i| {
            Vm::start(
                &format!("n{NET_ID}vm{i}"),
                &SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    // 1.-2. The tree.
    vms[0].rpull("default", image.converted())?;
    ensure!(vms[0].run("default", image.converted(), "fn")? == expected);
    for vm in &vms[1..] {
        vm.rpull("default", image.converted())?;
    }
    let tree = admin.tree(&digest)?;
    check_tree_shape(&tree)?;
    let ids: Vec<&str> = tree.iter().map(|n| n.id.as_str()).collect();
    ensure!(
        ids == ["vm0", "vm1", "vm2", "vm3", "vm4"],
        "unexpected tree:\n{}",
        coordinator.draw(&digest)
    );

    // 3. The cut.
    let cut = Partition::cut(&net, &SUBTREE, &REST)?;
    let at_cut: Vec<String> = vms
        .iter()
        .map(|vm| Ok(sources(&vm.snapshotter.metrics()?)))
        .collect::<anyhow::Result<_>>()?;
    eprintln!("subtree {{vm1, vm3, vm4}} cut off from {{vm0, vm2}}; blocks at the cut: {at_cut:?}");

    // 4. Everyone starts.
    let image_ref = image.converted();
    let results: Vec<anyhow::Result<(Duration, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms[1..]
            .iter()
            .map(|vm| {
                s.spawn(move || {
                    let t = Instant::now();
                    let out = vm.run("default", image_ref, "fn")?;
                    Ok((t.elapsed(), out))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("VM thread"))
            .collect()
    });
    for (vm, r) in vms[1..].iter().zip(results) {
        let (took, out) = r.with_context(|| format!("{}: start the function", vm.name))?;
        ensure!(
            out == expected,
            "{}: output differs:\n{}",
            vm.name,
            first_difference(&expected, &out)
        );
        eprintln!("{}: started in {took:.1?}", vm.name);
    }
    eventually_all_blocks(&vms, total_blocks, Duration::from_secs(90))?;
    for vm in &vms {
        let m = vm.snapshotter.metrics()?;
        eprintln!(
            "{}: {}; peer fallbacks {}",
            vm.name,
            sources(&m),
            m.lazy_counter("peer_fallbacks")
        );
    }
    let vm1 = vms[1].snapshotter.metrics()?;
    ensure!(
        vm1.lazy_blocks("peer") < total_blocks && vm1.lazy_blocks("registry") > 0,
        "vm1 should have taken its missing blocks from the registry: {}",
        sources(&vm1)
    );
    // The coordinator reaches vm0: it stays the root; the subtree is where it was.
    let tree = admin.tree(&digest)?;
    check_tree_shape(&tree)?;
    ensure!(
        tree.len() == VMS && tree[0].id == "vm0",
        "the tree changed:\n{}",
        coordinator.draw(&digest)
    );
    eprintln!("tree after the partition:\n{}", coordinator.draw(&digest));

    // 5. Bytes.
    drop(cut);
    let chain = image.chain_id()?;
    for &i in &SUBTREE {
        let vm = &vms[i];
        let summary = compare_with_original(&vm.containerd, "default", &image.original, &chain)
            .with_context(|| format!("{}'s rootfs", vm.name))?;
        eprintln!("{}: rootfs equals the original: {summary}", vm.name);
    }
    Ok(())
}
