//! The FaaSNet stack on real processes: the `coordinator` binary, one `snapshotter` daemon
//! per (emulated) VM, and a private containerd per VM that uses it as proxy snapshotter
//! `faasnet`. Each process has its own temporary state and is stopped on drop; the
//! snapshotter's FUSE mounts are detached when it goes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::binaries::workspace_binary;
use crate::containerd::{in_netns, Containerd, ContainerdOptions};
use crate::netns::Network;
use crate::process::Daemon;

/// Tenant and token every test uses with the coordinator.
pub const TENANT: &str = "t1";
/// The tenant's token.
pub const TOKEN: &str = "secret";
/// Longest a test waits for one `ctr run` of a function: minutes above the slowest start in
/// any test, so reaching it means a start hung.
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// A running `coordinator serve` with its own sled directory.
pub struct Coordinator {
    /// `host:port` of its gRPC listener.
    pub addr: String,
    daemon: Daemon,
    dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts a coordinator listening on `ip` (and a free port) with tenant [`TENANT`].
    pub fn start(ip: &str) -> anyhow::Result<Coordinator> {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-coord")
            .tempdir_in("/tmp")?;
        let addr = format!("{ip}:{}", crate::free_port());
        let config = dir.path().join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{}\"\nadmin_token = \"admin\"\n\
                 [tenants.{TENANT}]\ntoken = \"{TOKEN}\"\n",
                dir.path().join("data").display()
            ),
        )?;
        let daemon = spawn_coordinator(dir.path(), &addr)?;
        Ok(Coordinator { addr, daemon, dir })
    }

    /// `kill -9` of the process (its sled state stays).
    pub fn kill9(&mut self) {
        self.daemon.kill_with(libc::SIGKILL);
    }

    /// Starts the process again on the same address, config and state; waits until it
    /// listens.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.daemon.stop();
        self.daemon = spawn_coordinator(self.dir.path(), &self.addr)?;
        Ok(())
    }

    /// `http://host:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `coordinator draw` of `function`'s tree (for logs), or the error.
    pub fn draw(&self, function: &str) -> String {
        let out = Command::new(workspace_binary("coordinator"))
            .args([
                "draw",
                "--endpoint",
                &self.endpoint(),
                "--admin-token",
                "admin",
            ])
            .args([TENANT, function])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("coordinator draw: {e}"),
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Its state directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts `coordinator serve` with DIR/coordinator.toml and waits until `addr` accepts.
fn spawn_coordinator(dir: &Path, addr: &str) -> anyhow::Result<Daemon> {
    let mut cmd = Command::new(workspace_binary("coordinator"));
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.join("coordinator.toml"))
        .env("RUST_LOG", "info");
    let mut daemon = Daemon::spawn("coordinator", cmd, &dir.join("coordinator.log"))?;
    crate::wait_until("coordinator to listen", Duration::from_secs(30), || {
        if daemon.check_alive().is_err() {
            return Some(());
        }
        std::net::TcpStream::connect(addr).ok().map(|_| ())
    })?;
    daemon.check_alive()?;
    Ok(daemon)
}

/// How to start a snapshotter.
#[derive(Debug, Clone, Default)]
pub struct SnapshotterOptions {
    /// Network namespace to run it in (only the network namespace is joined).
    pub netns: Option<String>,
    /// `lazy.peer_listen` (`ip:port`); default 127.0.0.1 and a free port.
    pub peer_listen: Option<String>,
    /// `metrics_address`; default 127.0.0.1 and a free port. Must be reachable from the
    /// host (the test reads it): in a VM, use the VM's address.
    pub metrics_address: Option<String>,
    /// `lazy.insecure_registries`.
    pub insecure_registries: Vec<String>,
    /// `[coordinator]`: endpoint; None = no function tree (blocks from the registry).
    pub coordinator: Option<String>,
    /// `coordinator.node_id` (required with a coordinator: every VM has the same hostname).
    pub node_id: Option<String>,
    /// More `[lazy]` settings, TOML lines (e.g. `cache_quota_bytes = 1000000\n`).
    pub lazy_extra: String,
}

impl SnapshotterOptions {
    /// VM `i` of `net`: in its namespace, peer server on `<vm ip>:9112`, metrics on
    /// `<vm ip>:9111` (reachable from the host), node id `vm<i>`, plain HTTP to `registry`
    /// (`host:port`), in the function trees of `coordinator` if given.
    pub fn in_vm(
        net: &Network,
        i: usize,
        registry: &str,
        coordinator: Option<&Coordinator>,
    ) -> SnapshotterOptions {
        let ip = net.vm_ip(i);
        SnapshotterOptions {
            netns: Some(net.vm_ns(i)),
            peer_listen: Some(format!("{ip}:9112")),
            metrics_address: Some(format!("{ip}:9111")),
            insecure_registries: vec![registry.to_string()],
            coordinator: coordinator.map(Coordinator::endpoint),
            node_id: Some(format!("vm{i}")),
            lazy_extra: String::new(),
        }
    }
}

/// A running snapshotter daemon. Dropping it stops it and detaches its mounts.
pub struct Snapshotter {
    /// containerd's proxy plugin address.
    pub socket: PathBuf,
    /// Where its metrics are served.
    pub metrics_address: String,
    /// Where its peer server listens.
    pub peer_listen: String,
    daemon: Daemon,
    netns: Option<String>,
    dir: tempfile::TempDir,
}

impl Snapshotter {
    /// Writes a config and starts `snapshotter`; waits for its socket and metrics endpoint.
    pub fn start(opts: &SnapshotterOptions) -> anyhow::Result<Snapshotter> {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-snap")
            .tempdir_in("/tmp")?;
        let d = dir.path();
        let socket = d.join("snap.sock");
        let local = || format!("127.0.0.1:{}", crate::free_port());
        let peer_listen = opts.peer_listen.clone().unwrap_or_else(local);
        let metrics_address = opts.metrics_address.clone().unwrap_or_else(local);
        let mut config = format!(
            "root = \"{}\"\nsocket = \"{}\"\nlog_level = \"info,faasnet_snapshotter=debug\"\n\
             metrics_address = \"{metrics_address}\"\n[lazy]\npeer_listen = \"{peer_listen}\"\n\
             insecure_registries = {:?}\n",
            d.join("root").display(),
            socket.display(),
            opts.insecure_registries,
        );
        config += &opts.lazy_extra;
        if let Some(endpoint) = &opts.coordinator {
            let node_id = opts
                .node_id
                .as_deref()
                .context("a snapshotter with a coordinator needs a node_id")?;
            config += &format!(
                "[coordinator]\nendpoint = \"{endpoint}\"\ntenant = \"{TENANT}\"\n\
                 token = \"{TOKEN}\"\nnode_id = \"{node_id}\"\n"
            );
        }
        std::fs::write(d.join("snapshotter.toml"), config)?;
        let daemon = spawn_snapshotter(d, opts.netns.as_deref(), &socket, &metrics_address)?;
        Ok(Snapshotter {
            socket,
            metrics_address,
            peer_listen,
            daemon,
            netns: opts.netns.clone(),
            dir,
        })
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same root, socket and config,
    /// as an operator's restart would; waits until it serves again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.daemon.stop();
        self.daemon = spawn_snapshotter(
            self.dir.path(),
            self.netns.as_deref(),
            &self.socket,
            &self.metrics_address,
        )?;
        Ok(())
    }

    /// Its metrics now.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        fetch_metrics(&self.metrics_address)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Fails if the process exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.daemon.check_alive()
    }

    /// `kill -9`: its FUSE mounts die with it (they stay until [`Snapshotter::detach_mounts`]
    /// or drop).
    pub fn kill9(&mut self) {
        self.daemon.kill_with(libc::SIGKILL);
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Lazily unmounts everything under its state directory (FUSE layers).
    pub fn detach_mounts(&self) {
        crate::netns::unmount_under(self.dir.path());
    }

    /// Its state directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.daemon.stop();
        self.detach_mounts();
    }
}

/// Starts `snapshotter --config DIR/snapshotter.toml` (in `netns`), logging to
/// DIR/snapshotter.log, and waits for its socket and metrics endpoint.
fn spawn_snapshotter(
    dir: &Path,
    netns: Option<&str>,
    socket: &Path,
    metrics_address: &str,
) -> anyhow::Result<Daemon> {
    let mut cmd = in_netns(netns, workspace_binary("snapshotter").to_str().unwrap());
    cmd.arg("--config").arg(dir.join("snapshotter.toml"));
    cmd.env_remove("RUST_LOG");
    let mut daemon = Daemon::spawn("snapshotter", cmd, &dir.join("snapshotter.log"))?;
    crate::wait_until(
        "snapshotter socket and metrics",
        Duration::from_secs(30),
        || {
            if daemon.check_alive().is_err() {
                return Some(());
            }
            // Connect, not just exists: a restarted daemon finds its predecessor's socket file.
            let serving = std::os::unix::net::UnixStream::connect(socket).is_ok();
            (serving && fetch_metrics(metrics_address).is_ok()).then_some(())
        },
    )?;
    daemon.check_alive()?;
    Ok(daemon)
}

/// GET http://ADDRESS/metrics, parsed.
pub fn fetch_metrics(address: &str) -> anyhow::Result<Metrics> {
    let body = crate::images::http_get(&format!("http://{address}/metrics"))?;
    Ok(Metrics::parse(&String::from_utf8_lossy(&body)))
}

/// Prometheus text exposition, parsed into `name{labels}` → value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, f64>,
}

impl Metrics {
    /// Parses the text format (comments skipped).
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect();
        Metrics { samples }
    }

    /// The sample `key` (`name` or `name{label="v"}` exactly as exposed), 0 if absent.
    pub fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    /// `faasnet_snapshotter_lazy_blocks_total{source="<source>"}`.
    pub fn lazy_blocks(&self, source: &str) -> u64 {
        self.get(&format!(
            "faasnet_snapshotter_lazy_blocks_total{{source=\"{source}\"}}"
        )) as u64
    }

    /// `faasnet_snapshotter_lazy_<name>_total`.
    pub fn lazy_counter(&self, name: &str) -> u64 {
        self.get(&format!("faasnet_snapshotter_lazy_{name}_total")) as u64
    }
}

/// One emulated VM: a snapshotter and a containerd using it (in the VM's network namespace
/// when it has one). Dropped in order: containerd (containers killed), then the snapshotter.
pub struct Vm {
    /// `vm0`, `vm1`, …: prefix of its container ids (runc's state is shared).
    pub name: String,
    pub containerd: Containerd,
    pub snapshotter: Snapshotter,
}

impl Drop for Vm {
    fn drop(&mut self) {
        keep_log(
            &format!("{}-snapshotter.log", self.name),
            &self.snapshotter.log(),
        );
    }
}

/// With `FAASNET_TEST_LOGS=DIR` set, writes `text` to `DIR/name` (logs of daemons whose
/// temporary directories are deleted at the end of a test).
pub fn keep_log(name: &str, text: &str) {
    if let Some(dir) = std::env::var_os("FAASNET_TEST_LOGS") {
        let dir = PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(name), text);
    }
}

impl Vm {
    /// Starts the VM's snapshotter with `opts`, then its containerd (in `opts.netns`).
    pub fn start(name: &str, opts: &SnapshotterOptions) -> anyhow::Result<Vm> {
        let snapshotter =
            Snapshotter::start(opts).with_context(|| format!("{name}: start the snapshotter"))?;
        let containerd = Containerd::start(&ContainerdOptions {
            snapshotter_socket: Some(snapshotter.socket.clone()),
            stream_processor: None,
            netns: opts.netns.clone(),
        })
        .with_context(|| format!("{name}: start containerd"))?;
        Ok(Vm {
            name: name.to_string(),
            containerd,
            snapshotter,
        })
    }

    /// `ctr-remote images rpull --plain-http --snapshotter faasnet REF` in namespace `ns`.
    pub fn rpull(&self, ns: &str, image: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.containerd
            .ctr_remote_ok(&[
                "-n",
                ns,
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "faasnet",
                image,
            ])
            .with_context(|| format!("{}: rpull {image}", self.name))?;
        Ok(t.elapsed())
    }

    /// `ctr run --rm --snapshotter faasnet IMAGE <vm>-<id>` in namespace `ns`; returns stdout.
    /// Fails after [`RUN_LIMIT`], naming what is stuck.
    pub fn run(&self, ns: &str, image: &str, id: &str) -> anyhow::Result<String> {
        let id = format!("{}-{id}", self.name);
        self.containerd
            .ctr_ok_within(
                &[
                    "-n",
                    ns,
                    "run",
                    "--rm",
                    "--snapshotter",
                    "faasnet",
                    image,
                    &id,
                ],
                RUN_LIMIT,
            )
            .with_context(|| {
                format!(
                    "{}: ctr run {image}\nsnapshotter log tail:\n{}",
                    self.name,
                    log_tail(&self.snapshotter.log(), 40)
                )
            })
    }
}

/// The last `n` lines of `log`.
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until every VM of `vms` holds all `total_blocks` blocks of the image (fetched from
/// the registry or a peer: prefetch completes the layers), for at most `timeout`.
pub fn eventually_all_blocks(
    vms: &[Vm],
    total_blocks: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let names: Vec<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
    eventually(
        &format!("{} to hold every block", names.join(", ")),
        timeout,
        || {
            for vm in vms {
                let m = vm.snapshotter.metrics()?;
                if m.lazy_blocks("registry") + m.lazy_blocks("peer") < total_blocks {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
}

/// Waits until `check` holds, polling every 200 ms; fails after `timeout` naming `what`.
pub fn eventually(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => {}
            Ok(false) => anyhow::bail!("timed out after {timeout:?} waiting for {what}"),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
            }
            Err(e) => return Err(e.context(format!("waiting for {what}"))),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
