//! A snapshotter restart keeps lazily pulled images usable, all real: docker-registry, our
//! `snapshotter` and a private containerd using it, runc, FUSE.
//!
//! After a lazy pull and a first run of the tricky image, the snapshotter is restarted (the
//! way an operator or an upgrade restarts it). It must mount every committed remote snapshot
//! again, a new container must start and print exactly the expected output, and its blocks
//! must come from the block cache kept on disk, not from the registry again.
//!
//! Then a long-running container reads (O_DIRECT, so every read reaches the FUSE daemon)
//! and checksums image files in a loop while the snapshotter is killed with `kill -9`,
//! started again, and restarted with SIGTERM: the container must keep running, every
//! checksum it printed must be the original file's, no read may fail ("Transport endpoint
//! is not connected", I/O errors), and a new container must start afterwards
//! (docs/lazy.md, "Restarts").
//!
//! Needs root and hack/install-deps.sh; `cargo build --workspace --bins` first.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    // The restarted process serves the previous one's mounts again: drop the page cache so
    // the next container's lookups and reads reach it (and its block cache on disk).
    drop_caches()?;
    let log = vm.snapshotter.log();
    let restored = restored_counts(&log);
    ensure!(
        restored.len() == 2 && restored[1] == layers,
        "the restarted snapshotter should restore the image's {layers} remote snapshots; \
         startup lines say restored={restored:?}:\n{}",
        log_tail(&log, 30)
    );

    wait_for_containerd(&vm)?;
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

    reader_survives_restarts(&mut vm, &image, &expected, layers)
}

/// containerd's gRPC client reconnects with backoff (about a second) after the old socket
/// went away; waits until it reaches the new daemon, as a user would.
fn wait_for_containerd(vm: &Vm) -> anyhow::Result<()> {
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
    Ok(())
}

/// Files the reader checksums: big ones (several blocks, block boundaries) from two layers.
const READ_FILES: [&str; 4] = [
    "/data/blocks/random-5MiB.bin",
    "/data/blocks/zeros-2MiB.bin",
    "/data/blocks/ends-on-boundary.bin",
    "/bin/busybox",
];

/// The md5 of each regular file of the tricky image's expected listing (`... nlink=N
/// <md5> <path>`).
fn expected_md5s(listing: &str) -> BTreeMap<String, String> {
    listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            let mut it = l.split(' ').skip_while(|f| !f.starts_with("nlink="));
            it.next()?;
            let md5 = it.next()?.to_string();
            let path = it.collect::<Vec<_>>().join(" ");
            Some((path, md5))
        })
        .collect()
}

/// The reader's log so far: (iteration, path, md5) lines, and every other line.
fn parse_reader_log(log: &str) -> (Vec<(u64, String, String)>, Vec<String>) {
    let mut sums = Vec::new();
    let mut other = Vec::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match (f.len(), f.first().and_then(|i| i.parse::<u64>().ok())) {
            (3, Some(i)) => sums.push((i, f[1].to_string(), f[2].to_string())),
            _ => other.push(line.to_string()),
        }
    }
    (sums, other)
}

/// The last iteration of which the reader printed every file.
fn complete_iterations(sums: &[(u64, String, String)]) -> u64 {
    let mut per: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, _, _) in sums {
        *per.entry(*i).or_default() += 1;
    }
    per.iter()
        .filter(|(_, n)| **n == READ_FILES.len())
        .map(|(i, _)| *i)
        .max()
        .unwrap_or(0)
}

/// Evicts clean page cache, dentries and inodes (root only): later reads reach FUSE.
fn drop_caches() -> anyhow::Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    Ok(())
}

/// The long-running container; killed and deleted when dropped (also on failure: the
/// containerd fixture only cleans the default namespace).
struct Reader {
    id: String,
    log: PathBuf,
    containerd_socket: PathBuf,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let ctr = |args: &[&str]| {
            let _ = std::process::Command::new("ctr")
                .arg("-a")
                .arg(&self.containerd_socket)
                .args(["-n", "lazy"])
                .args(args)
                .output();
        };
        ctr(&["tasks", "kill", "-s", "SIGKILL", &self.id]);
        std::thread::sleep(Duration::from_millis(300));
        ctr(&["tasks", "delete", "-f", &self.id]);
        ctr(&["containers", "delete", &self.id]);
    }
}

impl Reader {
    fn read_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn iterations(&self) -> u64 {
        complete_iterations(&parse_reader_log(&self.read_log()).0)
    }

    /// Waits until the reader completes `more` iterations beyond the current one.
    fn wait_for_progress(&self, vm: &Vm, more: u64, what: &str) -> anyhow::Result<u64> {
        let start = self.iterations();
        let t = Instant::now();
        wait_until(what, Duration::from_secs(120), || {
            let now = self.iterations();
            (now >= start + more).then_some(now)
        })
        .map_err(|e| {
            e.context(format!(
                "reader stuck at iteration {} ({:?} after starting to wait); its log tail:\n{}\n\
                 snapshotter log tail:\n{}",
                self.iterations(),
                t.elapsed(),
                log_tail(&self.read_log(), 10),
                log_tail(&vm.snapshotter.log(), 40)
            ))
        })
    }

    fn running(&self, vm: &Vm) -> anyhow::Result<bool> {
        let out = vm.containerd.ctr_ok(&["-n", "lazy", "tasks", "ls"])?;
        Ok(out
            .lines()
            .any(|l| l.starts_with(&self.id) && l.contains("RUNNING")))
    }
}

fn start_reader(vm: &Vm, image: &TestImage) -> anyhow::Result<Reader> {
    let out = vm.containerd.dir().join("reader-out");
    std::fs::create_dir_all(&out)?;
    let files = READ_FILES.join(" ");
    // Every read with O_DIRECT: the page cache cannot hide a dead FUSE daemon. Whatever dd
    // says besides its transfer summary (a failed open or read) is printed as ERR.
    let script = format!(
        "i=0; while :; do i=$((i+1)); for f in {files}; do \
           s=$(/bin/busybox dd if=$f iflag=direct bs=1M 2>/out/err | /bin/busybox md5sum); \
           echo \"$i $f ${{s%% *}}\"; \
           /bin/busybox grep -v -e 'records in' -e 'records out' -e 'bytes .* copied' /out/err \
             | /bin/busybox sed 's/^/ERR /'; \
         done >> /out/log; /bin/busybox sleep 0.1; done"
    );
    let id = format!("{}-reader-{}", vm.name, std::process::id());
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    vm.containerd.ctr_ok(&[
        "-n",
        "lazy",
        "run",
        "-d",
        "--snapshotter",
        "faasnet",
        "--mount",
        &mount,
        image.converted(),
        &id,
        "/bin/busybox",
        "sh",
        "-c",
        &script,
    ])?;
    Ok(Reader {
        id,
        log: out.join("log"),
        containerd_socket: vm.containerd.dir().join("containerd.sock"),
    })
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The long-running container across `kill -9` and SIGTERM restarts.
fn reader_survives_restarts(
    vm: &mut Vm,
    image: &TestImage,
    expected: &str,
    layers: usize,
) -> anyhow::Result<()> {
    let md5s = expected_md5s(expected);
    for f in READ_FILES {
        ensure!(md5s.contains_key(f), "{f} is not in the expected listing");
    }
    let reader = start_reader(vm, image)?;
    let before = reader.wait_for_progress(vm, 2, "the reader's first iterations")?;

    // kill -9 in the middle of the reads; nothing serves FUSE for a while: the reads wait.
    vm.snapshotter.kill9();
    std::thread::sleep(Duration::from_secs(2));
    drop_caches()?;
    let during = reader.iterations();
    // Starts a new process (the old one is gone).
    vm.snapshotter.restart()?;
    let after_kill = reader.wait_for_progress(vm, 3, "the reader after kill -9 and a new start")?;

    // Graceful restart (SIGTERM).
    vm.snapshotter.restart()?;
    drop_caches()?;
    let after_term = reader.wait_for_progress(vm, 3, "the reader after a SIGTERM restart")?;
    ensure!(
        reader.running(vm)?,
        "the reader container is not running any more"
    );

    let (sums, other) = parse_reader_log(&reader.read_log());
    ensure!(
        other.is_empty(),
        "the reader printed errors (reads failed across the restarts):\n{}",
        other.join("\n")
    );
    let wrong: Vec<String> = sums
        .iter()
        .filter(|(_, f, m)| md5s.get(f) != Some(m))
        .map(|(i, f, m)| format!("iteration {i}: {f} md5 {m}, expected {:?}", md5s.get(f)))
        .collect();
    ensure!(
        wrong.is_empty(),
        "the reader read wrong content:\n{}",
        wrong.join("\n")
    );
    let log = vm.snapshotter.log();
    let resumed = count(&log, "resumed mount attached");
    ensure!(
        resumed >= 2 * layers,
        "each restart should put every layer's mount back ({layers} layers, 2 restarts); \
         the log says so {resumed} times:\n{}",
        log_tail(&log, 40)
    );
    let resent = count(&log, "FUSE_NOTIFY_RESEND sent");
    ensure!(
        resent >= 2 * layers,
        "each resumed connection should have its unanswered requests resent: {resent} times"
    );
    let restored = restored_counts(&log);
    ensure!(
        restored.iter().skip(1).all(|&n| n == layers),
        "every restart should restore the {layers} remote snapshots: restored={restored:?}"
    );

    // A new container still starts, and reads the same image.
    wait_for_containerd(vm)?;
    let fresh = vm.run("lazy", image.converted(), "final")?;
    ensure!(
        fresh == expected,
        "a container started after the restarts prints something else:\n{}",
        first_difference(expected, &fresh)
    );
    eprintln!(
        "restart: reader iterations {before} before kill -9, {during} while no snapshotter ran, \
         {after_kill} after the new start, {after_term} after the SIGTERM restart; {} checksums, \
         all correct",
        sums.len()
    );
    Ok(())
}

#[test]
fn reader_log_is_parsed() {
    let listing = "-rw-r--r-- 0:0 3 2020-01-01 00:00:00.000000000 +0000 nlink=1 abc /a b\n\
                   drwxr-xr-x 0:0 /d\n";
    let m = expected_md5s(listing);
    assert_eq!(m.get("/a b").map(String::as_str), Some("abc"));
    assert_eq!(m.len(), 1);
    let mut log = String::new();
    for i in 1..=2 {
        for f in READ_FILES {
            log += &format!("{i} {f} x\n");
        }
    }
    log += "3 /bin/busybox x\nERR dd: can't open: Transport endpoint is not connected\n";
    let (sums, other) = parse_reader_log(&log);
    assert_eq!(complete_iterations(&sums), 2);
    assert_eq!(other.len(), 1);
}

#[test]
fn restored_counts_are_parsed() {
    let log = "x INFO snapshotter: snapshotter ready root=/a restored=0\n\
               y INFO snapshotter: snapshotter ready root=/a restored=4\n";
    assert_eq!(restored_counts(log), vec![0, 4]);
}
