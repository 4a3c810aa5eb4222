//! End-to-end check of `image-converter decompress` as a containerd stream processor: a
//! private containerd (own root, state and socket) with the `[stream_processors]` entry from
//! docs/image-converter.md pulls a converted busybox image from a private registry, unpacks
//! it through the processor and runs it with runc; the output must equal the original
//! image's.
//!
//! Skipped (loudly) unless running as root with containerd, ctr and runc installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start(stream_processor: &Path) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-ctd-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        // The CRI plugin and unused snapshotters are disabled: this containerd only pulls,
        // unpacks (walking differ + stream processor) and runs with runc.
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "info"

[stream_processors]
  [stream_processors."io.containerd.faasnet.lz4block"]
    accepts = ["{media_type}"]
    returns = "application/vnd.oci.image.layer.v1.tar"
    path = "{bin}"
    args = ["decompress"]
"#,
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
                media_type = faasnet_format::LAYER_MEDIA_TYPE,
                bin = stream_processor.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.socket.exists() || !c.ctr("default", &["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// Runs ctr in namespace `ns` (snapshots are per namespace, so the converted image is
    /// unpacked from scratch in its own, not found already unpacked by chain ID).
    fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ctr_ok(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ctr(ns, args);
        assert!(
            out.status.success(),
            "ctr {} failed:\nstdout: {}\nstderr: {}\ncontainerd log (tail):\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Remove what we created so that no mount or task outlives the test.
        for ns in [
            "faasnet-orig",
            "faasnet-conv",
            "faasnet-prof",
            "faasnet-prof-orig",
        ] {
            let _ = self.ctr(ns, &["tasks", "kill", "-s", "SIGKILL", ns]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshot mounts are not left behind by `ctr run --rm`; unmount defensively anyway.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A busybox image: /bin/busybox (static) plus applet symlinks and a file to print.
fn busybox_layers() -> Option<Vec<TestLayer>> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let base = tar_of(&[
        Entry::Dir("bin"),
        Entry::Exec("bin/busybox", &busybox),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/cat", "busybox"),
        Entry::Symlink("bin/ls", "busybox"),
        Entry::Symlink("bin/sha256sum", "busybox"),
        Entry::Symlink("bin/echo", "busybox"),
        Entry::Dir("etc"),
        Entry::File("etc/msg", b"hello from a faasnet layer\n"),
        Entry::Dir("tmp"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("dev"),
    ]);
    let top = tar_of(&[
        Entry::Dir("data"),
        Entry::File("data/noise.bin", &noise(3_000_000, 42)),
        Entry::Dir("etc"),
        Entry::File("etc/msg", b"overridden by the second layer\n"),
    ]);
    Some(vec![TestLayer::gzip(base), TestLayer::gzip(top)])
}

/// True when this host can run the containerd tests (else says loudly why not).
fn can_run_containerd() -> bool {
    let root = unsafe { libc_geteuid() } == 0;
    let missing: Vec<&str> = ["containerd", "ctr", "runc"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    if !root || !missing.is_empty() || !Path::new("/bin/busybox").exists() {
        eprintln!(
            "\n!!!!!!!! SKIPPING containerd stream processor test: root={root}, missing: {missing:?} \
             (needs root, containerd, ctr, runc and /bin/busybox) !!!!!!!!\n"
        );
        return false;
    }
    true
}

/// A stream processor that logs each call to `calls`, then runs the real CLI: proof that
/// containerd went through it.
fn logging_wrapper(dir: &Path) -> (PathBuf, PathBuf) {
    let calls = dir.join("calls.log");
    let wrapper = dir.join("decompress-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$STREAM_PROCESSOR_MEDIATYPE $*\" >> {}\nexec {} \"$@\"\n",
            calls.display(),
            bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    (wrapper, calls)
}

const SCRIPT: &str = "cat /etc/msg; ls /bin; sha256sum /data/noise.bin";

#[test]
fn containerd_pulls_and_runs_a_converted_image() {
    if !can_run_containerd() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let layers = busybox_layers().unwrap();
    let src = reg.image("busybox:orig");
    let dst = reg.image("busybox:faasnet");
    push_image(&src, &layers, None, false);
    let cache = tempfile::tempdir().unwrap();
    let out = cli(
        &["convert", &src, &dst, "--block-size", "64KiB"],
        cache.path(),
    );
    assert!(out.status.success());

    let wrap_dir = tempfile::tempdir().unwrap();
    let (wrapper, calls) = logging_wrapper(wrap_dir.path());
    let ctd = Containerd::start(&wrapper);
    let mut outputs = Vec::new();
    for (image, ns) in [(&dst, "faasnet-conv"), (&src, "faasnet-orig")] {
        ctd.ctr_ok(ns, &["images", "pull", "--plain-http", image]);
        let run = ctd.ctr_ok(ns, &["run", "--rm", image, ns, "/bin/sh", "-c", SCRIPT]);
        outputs.push(run);
    }
    outputs.reverse();
    let calls = std::fs::read_to_string(&calls).unwrap_or_default();
    eprintln!("stream processor calls:\n{calls}");
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        vec![format!("{} decompress", faasnet_format::LAYER_MEDIA_TYPE); 2],
        "containerd ran the stream processor once per converted layer"
    );
    eprintln!("original image output:\n{}", outputs[0]);
    eprintln!("converted image output:\n{}", outputs[1]);
    assert!(outputs[0].contains("overridden by the second layer"));
    assert!(outputs[0].contains(&faasnet_format::sha256_digest(&noise(3_000_000, 42))[7..]));
    assert_eq!(outputs[0], outputs[1]);

    // containerd recorded the converted layers' uncompressed digests as the config's
    // diffIDs: the snapshot chain of the converted image is the same as the original's.
    let conv = ctd.ctr_ok("faasnet-conv", &["snapshots", "ls"]);
    let orig = ctd.ctr_ok("faasnet-orig", &["snapshots", "ls"]);
    eprintln!("snapshots:\n{conv}");
    assert_eq!(conv, orig);
}

/// An image converted with a start profile (both layers reordered, new diffIDs and
/// config): containerd's unpacker checks every processed layer against the new config's
/// diffIDs, and the container's output equals the original image's.
#[test]
fn containerd_runs_an_image_converted_with_a_start_profile() {
    if !can_run_containerd() {
        return;
    }
    let Some(reg) = Registry::start() else { return };
    let layers = busybox_layers().unwrap();
    let src = reg.image("busybox:orig");
    let dst = reg.image("busybox:profiled");
    push_image(&src, &layers, None, false);
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.txt");
    std::fs::write(
        &profile,
        "/bin/busybox\n/etc/msg\n/data/noise.bin\n/bin/sh\n",
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = cli(
        &[
            "convert",
            &src,
            &dst,
            "--block-size",
            "64KiB",
            "--start-profile",
            profile.to_str().unwrap(),
        ],
        cache.path(),
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 files moved first"), "{err}");
    assert!(err.contains("2 reordered by the start profile"), "{err}");
    // Both layers have new diffIDs, named by the new config.
    let (m, _) = manifest_of(&dst).unwrap();
    let m = json(&m);
    let config = json(&blob_of(&dst, m["config"]["digest"].as_str().unwrap()));
    for (i, l) in layers.iter().enumerate() {
        let d = config["rootfs"]["diff_ids"][i].as_str().unwrap();
        assert_ne!(d, sha(&l.tar));
        assert_eq!(
            m["layers"][i]["annotations"][faasnet_format::annotations::DIFF_ID],
            d
        );
    }

    let (wrapper, calls) = logging_wrapper(dir.path());
    let ctd = Containerd::start(&wrapper);
    let mut outputs = Vec::new();
    for (image, ns) in [(&src, "faasnet-prof-orig"), (&dst, "faasnet-prof")] {
        ctd.ctr_ok(ns, &["images", "pull", "--plain-http", image]);
        outputs.push(ctd.ctr_ok(ns, &["run", "--rm", image, ns, "/bin/sh", "-c", SCRIPT]));
    }
    let calls = std::fs::read_to_string(&calls).unwrap_or_default();
    assert_eq!(
        calls.lines().count(),
        2,
        "the stream processor ran once per layer:\n{calls}"
    );
    eprintln!("original image output:\n{}", outputs[0]);
    eprintln!("profiled image output:\n{}", outputs[1]);
    assert!(outputs[0].contains("overridden by the second layer"));
    assert_eq!(outputs[0], outputs[1]);
    // New diffIDs, so a snapshot chain of its own.
    let prof = ctd.ctr_ok("faasnet-prof", &["snapshots", "ls"]);
    let orig = ctd.ctr_ok("faasnet-prof-orig", &["snapshots", "ls"]);
    assert_ne!(prof, orig);
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
