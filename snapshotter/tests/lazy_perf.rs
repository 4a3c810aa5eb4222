//! Throughput of reads through a lazy mount (ignored by default: run with
//! `cargo test -p faasnet-snapshotter --release --test lazy_perf -- --ignored --nocapture`).

mod lazy_support;

use std::time::Instant;

use faasnet_format::{convert_layer, ConvertOptions};
use faasnet_snapshotter::lazy::{LayerRef, Source, StaticUpstream};
use lazy_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn read_throughput_cold_and_warm() {
    let registry = Registry::start();
    let mut t = TarBuilder::new();
    let size = 96 << 20;
    let mut data = noise(size / 2, 9);
    data.extend(b"some text that compresses well ".repeat(size / 2 / 31 + 1));
    data.truncate(size);
    t.file("big", Meta::default(), &data);
    let tar = t.finish();
    let mut blob = Vec::new();
    let converted =
        convert_layer(&tar[..], &mut blob, &ConvertOptions::default(), &|_| {}).unwrap();
    let digest = registry.push_blob("faasnet/perf", &blob).await;
    let layer = LayerRef::new(registry.addr.clone(), "faasnet/perf", digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (manager, metrics) = manager_with(
        dir.path(),
        faasnet_snapshotter::lazy::LayerOptions {
            prefetch: false,
            readahead_blocks: std::env::var("READAHEAD")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(4),
            ..Default::default()
        },
    );
    manager
        .mount(
            &layer,
            Some(converted.blob_size),
            StaticUpstream::root(),
            &mnt,
        )
        .await
        .unwrap();
    for round in ["cold", "warm (page cache)"] {
        let m = mnt.clone();
        let start = Instant::now();
        let got = tokio::task::spawn_blocking(move || std::fs::read(m.join("big")).unwrap())
            .await
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert!(got == data);
        println!(
            "{round}: {} MiB in {secs:.2}s = {:.0} MiB/s; registry blocks {}",
            size >> 20,
            (size >> 20) as f64 / secs,
            metrics.blocks_from(Source::Registry)
        );
    }
    manager.unmount(&mnt).await.unwrap();
    // Warm from the disk cache, after a remount (no page cache).
    manager
        .mount(
            &layer,
            Some(converted.blob_size),
            StaticUpstream::root(),
            &mnt,
        )
        .await
        .unwrap();
    let m = mnt.clone();
    let start = Instant::now();
    let got = tokio::task::spawn_blocking(move || std::fs::read(m.join("big")).unwrap())
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(got == data);
    println!("disk cache: {:.0} MiB/s", (size >> 20) as f64 / secs);
    manager.unmount(&mnt).await.unwrap();
}
