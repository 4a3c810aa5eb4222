//! Fault: peers that serve corrupt or truncated blocks. All real: five network namespaces on
//! a bridge with 16 Mbit/s links, a docker-registry and the `coordinator` on the host's
//! bridge address; in vm0 and vm1 a `bad-peer` (src/bin/bad-peer.rs: a tree member that
//! speaks the peer protocol but damages every block), in vm2..vm4 a `snapshotter` and
//! containerd each.
//!
//! 1. bad-peer `corrupt` joins first (root: position 0), bad-peer `truncate` second
//!    (position 1). vm2..vm4 then pull and run the converted tricky image at once: the one
//!    at position 2 has the corrupt peer as parent, those at 3 and 4 the truncating one.
//! 2. Every container starts with the expected output and every rootfs equals the
//!    ORIGINAL image's (`compare_with_original`): no damaged byte got through.
//! 3. The damage was detected: the corrupt peer's child counts digest failures; every child
//!    counts peer fallbacks (the blocks came from the registry instead).
//! 4. The bad peers were avoided: they answered fewer requests than their children needed
//!    blocks (a corrupt peer is skipped for 60 s, an unreachable or truncating one for 3 s).
//! 5. They were reported: the coordinator probed them, found them alive, and kept them
//!    (a live peer is never evicted on a child's word).
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::sync::Barrier;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{join_all, sources, spawn_starts, Admin, BadPeer};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{
    eventually_all_blocks, log_tail, Coordinator, SnapshotterOptions, Vm,
};

/// Bridge `fnb64`, addresses 10.77.64.0/24 (unique among the test files).
const NET_ID: u8 = 64;

#[test]
fn corrupt_and_truncating_peers_are_detected_avoided_and_bytes_stay_right() {
    require_root();
    if let Err(e) = corrupt_peer() {
        panic!("{e:#}");
    }
}

fn corrupt_peer() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, 5, Some("16mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let admin = Admin::new(&coordinator)?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let total_blocks: u64 = image.converted_layers()?.iter().map(|l| l.blocks).sum();
    let expected = expected_tricky()?;
    let digest = image.converted_digest.clone().context("converted digest")?;

    // 1. The bad peers, then the burst.
    let corrupt = BadPeer::start(&net, 0, &coordinator, &image, "corrupt")?;
    let truncate = BadPeer::start(&net, 1, &coordinator, &image, "truncate")?;
    let vms: Vec<Vm> = (2..5)
        .map(|i| {
            Vm::start(
                &format!("n{NET_ID}vm{i}"),
                &SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let barrier = Barrier::new(vms.len());
    let image_ref = image.converted();
    let results: Vec<anyhow::Result<(Duration, String)>> = std::thread::scope(|s| {
        let handles = spawn_starts(s, &vms, image_ref, &barrier);
        join_all(handles)
    });
    let tree = admin.tree(&digest)?;
    eprintln!("function tree:\n{}", coordinator.draw(&digest));
    let parent_of = |vm: &Vm| -> Option<String> {
        let id = format!("vm{}", vm.name.rsplit("vm").next().unwrap_or(""));
        tree.iter().find(|n| n.id == id)?.parent.clone()
    };

    // 2. Everyone started with the right files.
    for (vm, r) in vms.iter().zip(results) {
        let (took, out) = r.with_context(|| format!("{}: start the function", vm.name))?;
        ensure!(
            out == expected,
            "{}: output differs:\n{}",
            vm.name,
            first_difference(&expected, &out)
        );
        eprintln!(
            "{}: started in {took:.1?} under {:?}",
            vm.name,
            parent_of(vm)
        );
    }
    eventually_all_blocks(&vms, total_blocks, Duration::from_secs(90))?;

    // 3. Detected.
    let mut needed = std::collections::HashMap::<String, u64>::new();
    for vm in &vms {
        let m = vm.snapshotter.metrics()?;
        let parent = parent_of(vm).unwrap_or_default();
        eprintln!(
            "{} (parent {parent}): {}; digest failures {}, peer fallbacks {}",
            vm.name,
            sources(&m),
            m.lazy_counter("digest_failures"),
            m.lazy_counter("peer_fallbacks")
        );
        if parent == corrupt.node_id {
            ensure!(
                m.lazy_counter("digest_failures") > 0,
                "{}: no digest failure under the corrupt peer",
                vm.name
            );
        }
        if parent == corrupt.node_id || parent == truncate.node_id {
            ensure!(
                m.lazy_counter("peer_fallbacks") > 0 && m.lazy_blocks("registry") > 0,
                "{}: no fallback under a bad peer: {}",
                vm.name,
                sources(&m)
            );
            // Every block it holds it needed once; the bad parent was the first choice.
            *needed.entry(parent).or_default() += total_blocks;
        }
    }

    // 4. Avoided.
    for bad in [&corrupt, &truncate] {
        let served = bad.served();
        let needed = needed.get(&bad.node_id).copied().unwrap_or(0);
        eprintln!(
            "{} answered {served} block requests with damaged blocks; its children needed \
             {needed} blocks",
            bad.node_id
        );
        ensure!(
            needed == 0 || served < needed,
            "{} was asked for {served} blocks, its children needed {needed}: not avoided",
            bad.node_id
        );
    }

    // 5. Reported, probed, kept.
    let log = coordinator.log();
    ensure!(
        log.contains("suspect node answered its probe; kept"),
        "the coordinator never probed a reported bad peer:\n{}",
        log_tail(&log, 30)
    );
    ensure!(
        tree.iter().any(|n| n.id == corrupt.node_id)
            && tree.iter().any(|n| n.id == truncate.node_id),
        "a live bad peer was evicted:\n{}",
        coordinator.draw(&digest)
    );

    // 2. Bytes.
    let chain = image.chain_id()?;
    for vm in &vms {
        let summary = compare_with_original(&vm.containerd, "default", &image.original, &chain)
            .with_context(|| format!("{}'s rootfs", vm.name))?;
        eprintln!("{}: rootfs equals the original: {summary}", vm.name);
    }
    let _ = (corrupt.log(), truncate.log());
    Ok(())
}
