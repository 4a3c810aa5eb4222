//! A snapshotter restart keeps lazily pulled images usable, all real: docker-registry, our
//! `snapshotter` and a private containerd using it, runc, FUSE.
//!
//! After a lazy pull and a first run of the tricky image, the snapshotter is restarted (the
//! way an operator or an upgrade restarts it). It must mount every committed remote snapshot
//! again, a new container must start and print exactly the expected output, and its blocks
//! must come from the block cache kept on disk, not from the registry again.
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::time::Duration;

use anyhow::ensure;
use faasnet_integration::images::{expected_tricky, first_difference, TestImage, CONVERTED_TAG};
use faasnet_integration::registry::Registry;
use faasnet_integration::stack::{log_tail, SnapshotterOptions, Vm};
use faasnet_integration::{require_root, wait_until};

#[test]
fn restarted_snapshotter_remounts_layers_and_starts_new_containers() {
    require_root();
    if let Err(e) = restart_inner() {
        panic!("{e:#}");
    }
}

/// Lines of the form `... snapshotter ready ... restored=N`, as N.
fn restored_counts(log: &str) -> Vec<usize> {
    log.lines()
        .filter(|l| l.contains("snapshotter ready"))
        .filter_map(|l| l.split("restored=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

fn restart_inner() -> anyhow::Result<()> {
    let expected = expected_tricky()?;
    let registry = Registry::start("127.0.0.1")?;
    let image = TestImage::push_converted("tricky", &registry)?;
    let layers = image.layer_digests(CONVERTED_TAG)?.len();
    let mut vm = Vm::start("restart", &SnapshotterOptions::default())?;

    vm.rpull("lazy", image.converted())?;
    let first = vm.run("lazy", image.converted(), "before")?;
    ensure!(
        first == expected,
        "first run differs from the expected output:\n{}",
        first_difference(&expected, &first)
    );

    vm.snapshotter.restart()?;
    let log = vm.snapshotter.log();
    let restored = restored_counts(&log);
    ensure!(
        restored.len() == 2 && restored[1] == layers,
        "the restarted snapshotter should restore the image's {layers} remote snapshots; \
         startup lines say restored={restored:?}:\n{}",
        log_tail(&log, 30)
    );

    // containerd's gRPC client reconnects with backoff (about a second) after the old socket
    // went away; wait until it reaches the new daemon, as a user would.
    let ctd = &vm.containerd;
    wait_until(
        "containerd to reach the restarted snapshotter",
        Duration::from_secs(30),
        || {
            ctd.ctr(&["-n", "lazy", "snapshots", "--snapshotter", "faasnet", "ls"])
                .ok()
                .filter(|o| o.status.success())
        },
    )?;
    let second = vm.run("lazy", image.converted(), "after")?;
    ensure!(
        second == expected,
        "a container started after the restart prints something else:\n{}",
        first_difference(&expected, &second)
    );
    // The restarted process's counters start at zero: everything it read came from disk.
    let m = vm.snapshotter.metrics()?;
    ensure!(
        m.lazy_blocks("registry") == 0 && m.lazy_blocks("cache") > 0,
        "after the restart blocks should come from the on-disk cache only: cache {}, \
         registry {}",
        m.lazy_blocks("cache"),
        m.lazy_blocks("registry")
    );
    eprintln!(
        "restart: {layers} layers restored, new container OK, {} blocks from the cache",
        m.lazy_blocks("cache")
    );
    Ok(())
}

#[test]
fn restored_counts_are_parsed() {
    let log = "x INFO snapshotter: snapshotter ready root=/a restored=0\n\
               y INFO snapshotter: snapshotter ready root=/a restored=4\n";
    assert_eq!(restored_counts(log), vec![0, 4]);
}
