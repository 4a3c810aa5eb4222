//! Stripe trees (`lazy.stripe_trees = true`): five VMs start the same function at once, even
//! blocks come down the function tree and odd blocks down the coordinator's second stripe
//! tree, and no VM uploads much more than one copy of the image. All real: five network
//! namespaces on a bridge with 100 Mbit/s links, a docker-registry and the `coordinator` on
//! the host's bridge address, and in each VM its own `snapshotter` and containerd.
//!
//! 1. vm0..vm4 pull the converted tricky image one after the other, so the function tree is
//!    vm0 → (vm1 → (vm3, vm4), vm2): vm0 and vm1 forward in it. In the second tree they are
//!    leaves, and two of vm2, vm3, vm4 forward the odd blocks instead.
//! 2. All five run the function at once: every output is right.
//! 3. Once every VM holds every block (prefetch), from the snapshotters' metrics:
//!    - the registry served about one copy of the image (each stripe's root reads its
//!      stripe), not one per VM;
//!    - no VM served more than 1.5 copies (one, plus the start blocks fetched at mount while
//!      the trees were still forming);
//!    - VMs that are leaves of the function tree served blocks (the second tree's inner
//!      nodes).
//! 4. The rootfs of every VM equals the ORIGINAL image's.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{check_tree_shape, sources, Admin};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{eventually_all_blocks, Coordinator, SnapshotterOptions, Vm};

/// Bridge `fnb43`, addresses 10.77.43.0/24 (unique among the test files).
const NET_ID: u8 = 43;
const VMS: usize = 5;

#[test]
fn stripe_trees_split_the_upload_over_every_vm() {
    require_root();
    if let Err(e) = stripes() {
        panic!("{e:#}");
    }
}

fn stripes() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, VMS, Some("100mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let admin = Admin::new(&coordinator)?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let total: u64 = image.converted_layers()?.iter().map(|l| l.blocks).sum();
    let expected = expected_tricky()?;
    let digest = image.converted_digest.clone().context("converted digest")?;
    let vms: Vec<Vm> = (0..VMS)
        .map(|i| {
            let mut opts = SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator));
            opts.lazy_extra = "stripe_trees = true\n".into();
            Vm::start(&format!("n{NET_ID}vm{i}"), &opts)
        })
        .collect::<anyhow::Result<_>>()?;

    // 1. The trees.
    for vm in &vms {
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

    // 2. Everyone starts at once.
    let image_ref = image.converted();
    let results: Vec<anyhow::Result<(Duration, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
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
    for (vm, r) in vms.iter().zip(results) {
        let (took, out) = r.with_context(|| format!("{}: start the function", vm.name))?;
        ensure!(
            out == expected,
            "{}: output differs:\n{}",
            vm.name,
            first_difference(&expected, &out)
        );
        eprintln!("{}: started in {took:.1?}", vm.name);
    }

    // 3. Where the blocks came from and who served them.
    eventually_all_blocks(&vms, total, Duration::from_secs(120))?;
    let metrics: Vec<_> = vms
        .iter()
        .map(|vm| vm.snapshotter.metrics())
        .collect::<anyhow::Result<_>>()?;
    let served: Vec<u64> = metrics
        .iter()
        .map(|m| m.lazy_counter("served_blocks"))
        .collect();
    for ((vm, m), s) in vms.iter().zip(&metrics).zip(&served) {
        eprintln!(
            "{}: {}; served {s}; sibling blocks {}",
            vm.name,
            sources(m),
            m.lazy_counter("sibling_blocks")
        );
    }
    eprintln!("of {total} blocks");
    let from_registry: u64 = metrics.iter().map(|m| m.lazy_blocks("registry")).sum();
    ensure!(
        from_registry <= total + total / 2,
        "the registry served {from_registry} blocks to {VMS} VMs, more than 1.5 copies of \
         the {total}"
    );
    ensure!(
        metrics
            .iter()
            .all(|m| m.lazy_counter("sibling_blocks") == 0),
        "stripe trees replace the sibling exchange, yet blocks came from siblings"
    );
    let most = *served.iter().max().unwrap_or(&0);
    ensure!(
        most <= total + total / 2,
        "a VM served {most} blocks, more than 1.5 copies of the {total} (served: {served:?})"
    );
    let forwarding_leaves = served[2..].iter().filter(|&&s| s > total / 4).count();
    ensure!(
        forwarding_leaves >= 2,
        "two of the function tree's leaves vm2..vm4 should forward the odd blocks (served: \
         {served:?})"
    );

    // 4. Bytes.
    let chain = image.chain_id()?;
    for vm in &vms {
        let summary = compare_with_original(&vm.containerd, "default", &image.original, &chain)
            .with_context(|| format!("{}'s rootfs", vm.name))?;
        eprintln!("{}: rootfs equals the original: {summary}", vm.name);
    }
    Ok(())
}
