//! A private containerd instance (own root, state, socket and config), optionally with our
//! snapshotter as a proxy plugin and our stream processor, and `ctr` against it.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::process::Daemon;

/// What to plug into containerd.
#[derive(Debug, Default, Clone)]
pub struct ContainerdOptions {
    /// Socket of a proxy snapshotter, registered as snapshotter `faasnet`.
    pub snapshotter_socket: Option<PathBuf>,
    /// `image-converter` binary to register as the stream processor for converted layers.
    pub stream_processor: Option<PathBuf>,
    /// Network namespace (name under /run/netns) to run containerd in. Only the network
    /// namespace is joined, so mounts stay visible to every process of the test.
    pub netns: Option<String>,
}

/// A running containerd.
pub struct Containerd {
    /// Its gRPC socket.
    pub socket: PathBuf,
    daemon: Daemon,
    netns: Option<String>,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Writes a config and starts containerd; waits until `ctr version` answers.
    pub fn start(opts: &ContainerdOptions) -> anyhow::Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-ctd")
            .tempdir_in("/tmp")?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  level = \"info\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
        );
        if let Some(s) = &opts.snapshotter_socket {
            config += &format!(
                "[proxy_plugins]\n  [proxy_plugins.faasnet]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                s.display()
            );
        }
        if let Some(p) = &opts.stream_processor {
            config += &format!(
                "[stream_processors]\n  [stream_processors.\"io.containerd.faasnet.lz4block\"]\n    \
                 accepts = [\"{}\"]\n    returns = \"application/vnd.oci.image.layer.v1.tar\"\n    \
                 path = \"{}\"\n    args = [\"decompress\"]\n",
                faasnet_format::LAYER_MEDIA_TYPE,
                p.display()
            );
        }
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = in_netns(opts.netns.as_deref(), "containerd");
        cmd.arg("--config").arg(&config_path);
        let mut daemon = Daemon::spawn("containerd", cmd, &d.join("containerd.log"))
            .context("is containerd installed? (hack/install-deps.sh)")?;
        let netns = opts.netns.clone();
        crate::wait_until("containerd to answer", Duration::from_secs(30), || {
            if daemon.check_alive().is_err() {
                return Some(());
            }
            ctr_at(netns.as_deref(), &socket, &["version"])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        })?;
        daemon.check_alive()?;
        Ok(Containerd {
            socket,
            daemon,
            netns,
            dir,
        })
    }

    /// Runs `ctr -a SOCKET ARGS...` and returns its output (whatever the status).
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<Output> {
        ctr_at(self.netns.as_deref(), &self.socket, args)
    }

    /// Runs `ctr` and fails unless it succeeds; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctr(args)?;
        anyhow::ensure!(
            out.status.success(),
            "ctr {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like [`Self::ctr_ok`], but kills `ctr` after `limit`: the error then names the
    /// processes stuck in the kernel and where (a container start that hangs on a read of a
    /// lazy layer shows up as `runc init` waiting in a FUSE read), instead of a test that
    /// never ends.
    pub fn ctr_ok_within(&self, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        let mut cmd = in_netns(self.netns.as_deref(), "ctr");
        cmd.arg("-a").arg(&self.socket).args(args);
        let out = output_within(cmd, limit).with_context(|| format!("ctr {args:?}"))?;
        anyhow::ensure!(
            out.status.success(),
            "ctr {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ctr-remote ARGS...` (stargz's ctr, which passes remote-snapshot labels on pull).
    pub fn ctr_remote_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = in_netns(self.netns.as_deref(), "ctr-remote");
        cmd.arg("-a").arg(&self.socket).args(args);
        let out = cmd
            .output()
            .context("run ctr-remote (package stargz-snapshotter)")?;
        anyhow::ensure!(
            out.status.success(),
            "ctr-remote {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// containerd's root directory (content store under `io.containerd.content.v1.content`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Digests of the blobs in containerd's content store.
    pub fn content_blobs(&self) -> Vec<String> {
        let dir = self
            .root()
            .join("io.containerd.content.v1.content/blobs/sha256");
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Directory for test files that should live as long as this instance.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Remove containers and tasks left by a failed test, so no shim outlives the test.
        if let Ok(out) = self.ctr(&["containers", "list", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
                let _ = self.ctr(&["containers", "delete", id]);
            }
        }
        self.daemon.stop();
        // Unmount anything containerd left under its root or state.
        crate::netns::unmount_under(self.dir.path());
    }
}

fn ctr_at(netns: Option<&str>, socket: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = in_netns(netns, "ctr");
    cmd.arg("-a").arg(socket).args(args);
    cmd.output().context("run ctr")
}

/// Runs `cmd` to completion, or kills it after `limit` and fails naming what is stuck.
fn output_within(mut cmd: Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn")?;
    // Drained on threads so a chatty command cannot block on a full pipe.
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait")? {
            break status;
        }
        if Instant::now() >= deadline {
            let stuck = stuck_processes();
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "did not finish within {limit:?}; processes waiting in the kernel:\n{stuck}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Every process in uninterruptible sleep (state D) with its command line and kernel stack.
pub fn stuck_processes() -> String {
    let mut out = String::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return "(no /proc)".into();
    };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "PID (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next());
        if state != Some("D") {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let stack = std::fs::read_to_string(e.path().join("stack")).unwrap_or_default();
        out.push_str(&format!("pid {pid}: {}\n{stack}", cmdline.trim()));
    }
    if out.is_empty() {
        out.push_str("(none)");
    }
    out
}

/// A command that runs `program` in network namespace `netns` (only the network namespace:
/// `ip netns exec` would also unshare the mount namespace and hide FUSE mounts).
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(program);
            cmd
        }
    }
}
