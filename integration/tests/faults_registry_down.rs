//! Fault: the registry goes down once the tree holds the blocks; later VMs still start, from
//! their peers. All real: four network namespaces on a bridge with 16 Mbit/s links, a
//! docker-registry and the `coordinator` on the host's bridge address, and in each VM its
//! own `snapshotter` and containerd.
//!
//! 1. vm0 and vm1 pull and run the converted tricky image; wait until both hold every block.
//! 2. vm2 and vm3 pull it (`rpull`: manifest, config and each layer's TOC come from the
//!    registry; the snapshotters join the tree and start prefetching from their parents).
//! 3. The registry goes down for every VM: connections to it are refused (iptables REJECT
//!    with a TCP reset in each VM's namespace, as a dead registry process would).
//! 4. vm2 and vm3 run the function: the output is right, their blocks came from peers
//!    (registry block count 0, peer blocks still arriving during the outage), and the
//!    registry's access log shows that it sent them nothing during the outage (no request
//!    got through on a connection opened before it). Before the outage the log may show
//!    more than their TOC fetches: with stripe trees a later VM can be the root of the
//!    second tree and begin reading its stripe from the registry as soon as it has pulled;
//!    a read cut off by the outage is not a block taken (its block comes from a peer).
//! 5. The outage ends; vm2's and vm3's rootfs equal the ORIGINAL image's.
//!
//! Limit: a VM that has never pulled the image still needs the registry for the manifest,
//! config and TOCs (the peers do not serve them yet; docs/lazy.md "Not done yet"), so the
//! outage starts after the later VMs' pull and before their start.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::faults::{blob_bytes_served_to, sources, RegistryOutage};
use faasnet_integration::images::{expected_tricky, first_difference, TestImage};
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::rootfs::compare_with_original;
use faasnet_integration::stack::{eventually_all_blocks, Coordinator, SnapshotterOptions, Vm};

/// Bridge `fnb62`, addresses 10.77.62.0/24 (unique among the test files).
const NET_ID: u8 = 62;
const VMS: usize = 4;

#[test]
fn later_vms_start_from_peers_while_the_registry_is_down() {
    require_root();
    if let Err(e) = registry_down() {
        panic!("{e:#}");
    }
}

fn registry_down() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, VMS, Some("16mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let layers = image.converted_layers()?;
    let total_blocks: u64 = layers.iter().map(|l| l.blocks).sum();
    let toc_allowance: u64 = layers.iter().map(|l| l.toc_fetch_allowance()).sum();
    let expected = expected_tricky()?;
    let vms: Vec<Vm> = (0..VMS)
        .map(|i| {
            Vm::start(
                &format!("n{NET_ID}vm{i}"),
                &SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    // 1. The first two VMs load everything.
    for vm in &vms[..2] {
        vm.rpull("default", image.converted())?;
        let out = vm.run("default", image.converted(), "fn")?;
        ensure!(out == expected, "{}: output differs", vm.name);
    }
    eventually_all_blocks(&vms[..2], total_blocks, Duration::from_secs(90))?;

    // 2. The later VMs pull (metadata from the registry).
    for vm in &vms[2..] {
        vm.rpull("default", image.converted())?;
    }
    // 3. The registry goes down.
    let outage = RegistryOutage::start(&net, &(0..VMS).collect::<Vec<_>>(), &registry.addr)?;
    let at_outage: Vec<u64> = vms[2..]
        .iter()
        .map(|vm| Ok(vm.snapshotter.metrics()?.lazy_blocks("peer")))
        .collect::<anyhow::Result<_>>()?;
    let reachable = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", net.vm_ns(2)))
        .args(["--", "curl", "-sS", "-m", "3"])
        .arg(format!("http://{}/v2/", registry.addr))
        .output()?;
    ensure!(
        !reachable.status.success(),
        "the registry still answers from vm2"
    );
    eprintln!(
        "registry down (curl from vm2: {}); vm2/vm3 held {at_outage:?} of {total_blocks} blocks",
        String::from_utf8_lossy(&reachable.stderr).trim()
    );
    // What the registry sent them before the outage. It logs a request when its handler
    // returns: once the whole response is in its socket buffers (the resets stay inside the
    // VMs' namespaces, so a response that did not fit never returns during the test). The
    // pause lets a response still being written at the cut finish into those buffers.
    std::thread::sleep(Duration::from_secs(1));
    let before_outage: Vec<u64> = (2..VMS)
        .map(|i| blob_bytes_served_to(&registry, &net.vm_ip(i)))
        .collect();

    // 4. They start anyway.
    for (vm, before) in vms[2..].iter().zip(&at_outage) {
        let t = Instant::now();
        let out = vm.run("default", image.converted(), "fn")?;
        ensure!(
            out == expected,
            "{}: output differs:\n{}",
            vm.name,
            first_difference(&expected, &out)
        );
        eventually_all_blocks(
            std::slice::from_ref(vm),
            total_blocks,
            Duration::from_secs(60),
        )?;
        let m = vm.snapshotter.metrics()?;
        eprintln!(
            "{}: started in {:.1?} with the registry down; {}; {} blocks arrived during the outage",
            vm.name,
            t.elapsed(),
            sources(&m),
            m.lazy_blocks("peer") - before
        );
        ensure!(
            m.lazy_blocks("registry") == 0,
            "{}: took blocks from the registry",
            vm.name
        );
        ensure!(
            m.lazy_blocks("peer") > *before,
            "{}: no block came from a peer during the outage",
            vm.name
        );
    }
    for (i, before) in (2..VMS).zip(&before_outage) {
        let served = blob_bytes_served_to(&registry, &net.vm_ip(i));
        eprintln!(
            "registry access log: {before} blob bytes sent to vm{i} before the outage (its TOC \
             fetches take up to {toc_allowance}), {} during it",
            served - before
        );
        ensure!(
            served == *before,
            "the registry sent vm{i} {} blob bytes during the outage",
            served - before
        );
    }

    // 5. Bytes (the comparison pulls the original image: the registry is back).
    drop(outage);
    let chain = image.chain_id()?;
    for vm in &vms[2..] {
        let summary = compare_with_original(&vm.containerd, "default", &image.original, &chain)
            .with_context(|| format!("{}'s rootfs", vm.name))?;
        eprintln!("{}: rootfs equals the original: {summary}", vm.name);
    }
    Ok(())
}
