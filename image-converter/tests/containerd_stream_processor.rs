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
        for ns in ["faasnet-orig", "faasnet-conv"] {
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

#[test]
fn containerd_pulls_and_runs_a_converted_image() {
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

    // The stream processor is a wrapper that logs each call, then runs the real CLI: proof
    // that containerd went through it.
    let wrap_dir = tempfile::tempdir().unwrap();
    let calls = wrap_dir.path().join("calls.log");
    let wrapper = wrap_dir.path().join("decompress-wrapper");
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

    let ctd = Containerd::start(&wrapper);
    let script = "cat /etc/msg; ls /bin; sha256sum /data/noise.bin";
    let mut outputs = Vec::new();
    for (image, ns) in [(&dst, "faasnet-conv"), (&src, "faasnet-orig")] {
        ctd.ctr_ok(ns, &["images", "pull", "--plain-http", image]);
        let run = ctd.ctr_ok(ns, &["run", "--rm", image, ns, "/bin/sh", "-c", script]);
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

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
