//! Three VMs start the same function at once and the registry serves each block at most
//! once, all real: three network namespaces on a bridge with 200 Mbit/s links, a
//! docker-registry and the `coordinator` on the host's bridge address, and in each VM its
//! own `snapshotter` (node vm0..vm2, peer server and metrics on the VM's address) and
//! containerd; `ctr-remote`, runc, FUSE.
//!
//! The converted realistic image is pulled (`ctr-remote images rpull`) and run (`ctr run`)
//! on the three VMs at the same moment (one thread each). All three print the function's
//! output. Once every VM holds every block (the background prefetch), the registry must
//! have served each block at most once:
//!
//! (a) from its access log: per converted layer, the bytes of blob GETs are at most the
//!     layer's blocks' stored bytes plus, per VM, one TOC fetch (tail and TOC frame, from
//!     `image-converter inspect --json` and the manifest's TOC annotations);
//! (b) from the snapshotters' metrics: the blocks the three VMs took from the registry add
//!     up to at most the image's block count, and some came from peers.
//!
//! A table of where each VM's blocks came from is printed.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::collections::HashMap;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use faasnet_integration::images::TestImage;
use faasnet_integration::netns::Network;
use faasnet_integration::registry::Registry;
use faasnet_integration::require_root;
use faasnet_integration::stack::{
    eventually_all_blocks, log_tail, Coordinator, SnapshotterOptions, Vm,
};

/// Bridge `fnb41`, addresses 10.77.41.0/24 (unique among the test files).
const NET_ID: u8 = 41;
const VMS: usize = 3;

#[test]
fn three_vms_start_together_and_the_registry_serves_each_block_once() {
    require_root();
    if let Err(e) = three_vms() {
        panic!("{e:#}");
    }
}

fn three_vms() -> anyhow::Result<()> {
    let net = Network::create(NET_ID, VMS, Some("200mbit"))?;
    let registry = Registry::start(&net.host_ip())?;
    let coordinator = Coordinator::start(&net.host_ip())?;
    let t = Instant::now();
    let image = TestImage::push_converted("realistic", &registry)?;
    let layers = image.converted_layers()?;
    let total_blocks: u64 = layers.iter().map(|l| l.blocks).sum();
    eprintln!(
        "realistic: pushed and converted in {:.1?}; {} layers, {total_blocks} blocks",
        t.elapsed(),
        layers.len()
    );
    // What the registry served before the VMs (the converter's and inspect's own reads).
    let before: HashMap<String, u64> = layers
        .iter()
        .map(|l| (l.digest.clone(), registry.blob_bytes_served(&l.digest)))
        .collect();

    let vms: Vec<Vm> = (0..VMS)
        .map(|i| {
            Vm::start(
                &format!("n{NET_ID}vm{i}"),
                &SnapshotterOptions::in_vm(&net, i, &registry.addr, Some(&coordinator)),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    // All three at once.
    let barrier = Barrier::new(VMS);
    let image_ref = image.converted();
    let results: Vec<anyhow::Result<(Duration, Duration, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let pull = vm.rpull("default", image_ref)?;
                    let out = vm.run("default", image_ref, "fn")?;
                    Ok((pull, t.elapsed(), out))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("VM thread"))
            .collect()
    });
    let mut starts = Vec::new();
    for (vm, r) in vms.iter().zip(results) {
        let (pull, start, out) = r.with_context(|| format!("{}: start the function", vm.name))?;
        ensure!(
            out.contains("faasnet function ready: numpy "),
            "{}: the function printed {out:?}",
            vm.name
        );
        starts.push((pull, start));
    }
    let digest = image.converted_digest.clone().unwrap_or_default();
    eprintln!("function tree:\n{}", coordinator.draw(&digest));

    // Every VM ends up with every block (prefetch), from the registry or a peer.
    eventually_all_blocks(&vms, total_blocks, Duration::from_secs(120)).with_context(|| {
        let counts: Vec<String> = vms
            .iter()
            .map(|vm| match vm.snapshotter.metrics() {
                Ok(m) => format!(
                    "{}: registry {} peer {}",
                    vm.name,
                    m.lazy_blocks("registry"),
                    m.lazy_blocks("peer")
                ),
                Err(e) => format!("{}: {e:#}", vm.name),
            })
            .collect();
        format!("of {total_blocks} blocks: {}", counts.join("; "))
    })?;

    // The table.
    let metrics: Vec<_> = vms
        .iter()
        .map(|vm| vm.snapshotter.metrics())
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "\n{:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
        "vm", "cache", "peer", "registry", "served", "fallbacks", "rpull", "start"
    );
    for ((vm, m), (pull, start)) in vms.iter().zip(&metrics).zip(&starts) {
        eprintln!(
            "{:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7.1}s {:>8.1}s",
            vm.name,
            m.lazy_blocks("cache"),
            m.lazy_blocks("peer"),
            m.lazy_blocks("registry"),
            m.lazy_counter("served_blocks"),
            m.lazy_counter("peer_fallbacks"),
            pull.as_secs_f64(),
            start.as_secs_f64()
        );
    }

    // (a) the registry's access log, per layer.
    let mut report = Vec::new();
    let mut over = Vec::new();
    for l in &layers {
        let served = registry.blob_bytes_served(&l.digest) - before[&l.digest];
        let allowed = l.stored_size + VMS as u64 * l.toc_fetch_allowance();
        report.push(format!(
            "{}: served {served} B, blocks {} B, allowed {allowed} B",
            &l.digest[..19],
            l.stored_size
        ));
        if served > allowed {
            over.push(format!(
                "layer {} ({} blocks): the registry served {served} bytes of it, more than its \
                 blocks ({} B) plus {VMS} TOC fetches ({} B each)",
                l.digest,
                l.blocks,
                l.stored_size,
                l.toc_fetch_allowance()
            ));
        }
    }
    eprintln!("registry access log:\n  {}", report.join("\n  "));
    ensure!(
        over.is_empty(),
        "{}\nfunction tree:\n{}",
        over.join("\n"),
        coordinator.draw(&digest)
    );

    // (b) the snapshotters' metrics.
    let from_registry: u64 = metrics.iter().map(|m| m.lazy_blocks("registry")).sum();
    let from_peers: u64 = metrics.iter().map(|m| m.lazy_blocks("peer")).sum();
    ensure!(
        from_registry <= total_blocks,
        "the VMs took {from_registry} blocks from the registry, the image has {total_blocks}; \
         vm logs:\n{}",
        vms.iter()
            .map(|vm| format!("{}:\n{}", vm.name, log_tail(&vm.snapshotter.log(), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        from_peers > 0,
        "no VM took a block from a peer ({from_registry} from the registry)"
    );
    eprintln!(
        "registry blocks {from_registry} <= {total_blocks} image blocks; peer blocks {from_peers}"
    );
    drop(vms);
    drop(net);
    Ok(())
}
