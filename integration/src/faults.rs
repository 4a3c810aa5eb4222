//! Support for the fault tests (`tests/faults_*.rs`): the coordinator's view of a tree,
//! network partitions between groups of VMs, and small measurements.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::netns::{run, Network};
use crate::stack::{Coordinator, Metrics, Vm};

/// One node of a function tree as the coordinator's admin service shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    /// Node id (`vm<i>`).
    pub id: String,
    /// Its peer address.
    pub addr: String,
    /// Position in the layout (parent of i is (i-1)/2).
    pub position: u64,
    /// Parent id; `None` for the root.
    pub parent: Option<String>,
}

/// Admin access to a running coordinator (list and read trees).
pub struct Admin {
    rt: tokio::runtime::Runtime,
    endpoint: String,
}

impl Admin {
    /// For `coordinator` (admin token `admin`, as [`Coordinator::start`] configures).
    pub fn new(coordinator: &Coordinator) -> anyhow::Result<Admin> {
        Ok(Admin {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            endpoint: coordinator.endpoint(),
        })
    }

    /// `function`'s tree in position order; empty if the coordinator has no such tree.
    /// Fails if the coordinator does not answer.
    pub fn tree(&self, function: &str) -> anyhow::Result<Vec<TreeNode>> {
        self.rt.block_on(async {
            let admin = faasnet_coordinator::client::AdminClient::connect(&self.endpoint, "admin")
                .await
                .context("connect to the coordinator's admin service")?;
            match admin.get_tree(crate::stack::TENANT, function).await {
                Ok(view) => Ok(view
                    .nodes
                    .into_iter()
                    .map(|n| TreeNode {
                        id: n.node_id,
                        addr: n.peer_addr,
                        position: n.position,
                        parent: Some(n.parent_id).filter(|p| !p.is_empty()),
                    })
                    .collect()),
                Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(Vec::new()),
                Err(e) => Err(anyhow::anyhow!("get tree: {e}")),
            }
        })
    }

    /// `node → parent` of `function`'s tree.
    pub fn parents(&self, function: &str) -> anyhow::Result<BTreeMap<String, Option<String>>> {
        Ok(self
            .tree(function)?
            .into_iter()
            .map(|n| (n.id, n.parent))
            .collect())
    }
}

/// Checks the shape of a tree: one root, positions 0..n, parent of position i at (i-1)/2.
pub fn check_tree_shape(tree: &[TreeNode]) -> anyhow::Result<()> {
    for (i, n) in tree.iter().enumerate() {
        anyhow::ensure!(n.position == i as u64, "positions not dense: {tree:?}");
        let expected = (i > 0).then(|| tree[(i - 1) / 2].id.clone());
        anyhow::ensure!(
            n.parent == expected,
            "{} has parent {:?}: {tree:?}",
            n.id,
            n.parent
        );
    }
    Ok(())
}

/// A partition between two groups of VMs of one network: every packet between a VM of
/// `inside` and a VM of `outside` is dropped (iptables in each `inside` VM's namespace,
/// both directions), while both groups still reach the host (registry, coordinator).
/// Dropping it heals the partition.
pub struct Partition<'a> {
    net: &'a Network,
    inside: Vec<usize>,
    outside_ips: Vec<String>,
}

impl<'a> Partition<'a> {
    /// Cuts `inside` off from `outside`.
    pub fn cut(net: &'a Network, inside: &[usize], outside: &[usize]) -> anyhow::Result<Self> {
        let p = Partition {
            net,
            inside: inside.to_vec(),
            outside_ips: outside.iter().map(|&i| net.vm_ip(i)).collect(),
        };
        for &i in &p.inside {
            for ip in &p.outside_ips {
                p.rule(i, "-I", "INPUT", "-s", ip)?;
                p.rule(i, "-I", "OUTPUT", "-d", ip)?;
            }
        }
        Ok(p)
    }

    fn rule(&self, vm: usize, op: &str, chain: &str, dir: &str, ip: &str) -> anyhow::Result<()> {
        let ns = self.net.vm_ns(vm);
        run(
            "ip",
            &[
                "netns", "exec", &ns, "iptables", "-w", op, chain, dir, ip, "-j", "DROP",
            ],
        )
        .with_context(|| format!("iptables in {ns} (is iptables installed?)"))?;
        Ok(())
    }
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        for &i in &self.inside {
            for ip in &self.outside_ips {
                let _ = self.rule(i, "-D", "INPUT", "-s", ip);
                let _ = self.rule(i, "-D", "OUTPUT", "-d", ip);
            }
        }
    }
}

/// Polls `check` every 20 ms until it holds; answers how long that took, or fails after
/// `timeout`.
pub fn time_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if check().unwrap_or(false) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Blocks a VM took from each source, `cache/peer/registry`, for tables.
pub fn sources(m: &Metrics) -> String {
    format!(
        "cache {} peer {} registry {}",
        m.lazy_blocks("cache"),
        m.lazy_blocks("peer"),
        m.lazy_blocks("registry")
    )
}

/// Kills (SIGKILL) this process's direct children whose command name is one of `names`
/// (e.g. a `ctr` stuck on a dead VM); answers what it killed, for the failure message.
pub fn kill_children_named(names: &[&str]) -> Vec<String> {
    let me = std::process::id();
    let mut killed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid: u32 = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == me && names.contains(&comm) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(format!("{pid} {cmdline}"));
        }
    }
    killed
}

/// Starts `image_ref`'s function on every VM, each in its own thread of scope `s`: it waits at
/// `barrier` (so that all start together, with whoever else waits there), pulls lazily, runs,
/// and answers its time from the barrier to the output, and the output.
pub fn spawn_starts<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    vms: &'env [Vm],
    image_ref: &'env str,
    barrier: &'env std::sync::Barrier,
) -> Vec<std::thread::ScopedJoinHandle<'scope, anyhow::Result<(Duration, String)>>> {
    vms.iter()
        .map(|vm| {
            s.spawn(move || {
                barrier.wait();
                let t = Instant::now();
                vm.rpull("default", image_ref)?;
                let out = vm.run("default", image_ref, "fn")?;
                Ok((t.elapsed(), out))
            })
        })
        .collect()
}

/// Joins every handle, in order.
pub fn join_all<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, T>>) -> Vec<T> {
    handles
        .into_iter()
        .map(|h| h.join().expect("VM thread"))
        .collect()
}

/// Waits until every handle finished, for at most `timeout`; then kills stuck `ctr`
/// children so the threads return. Answers what was killed (empty when none was stuck).
pub fn finish_or_unstick<T>(
    handles: &[std::thread::ScopedJoinHandle<'_, T>],
    timeout: Duration,
) -> Vec<String> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if handles.iter().all(|h| h.is_finished()) {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_children_named(&["ctr", "ctr-remote", "nsenter"])
}

/// Kills (SIGKILL) the FUSE descriptor holder a snapshotter with state directory `dir`
/// started (`snapshotter __fuse-fd-holder DIR/...`), so that its FUSE mounts die with it:
/// with [`crate::stack::Snapshotter::kill9`] alone they wait for a restart. Answers the pids.
pub fn kill_fuse_holders(dir: &std::path::Path) -> Vec<i32> {
    let needle = format!("__fuse-fd-holder {}", dir.display());
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(&needle)
        {
            // SAFETY: kill(2) on the holder our own snapshotter started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    killed
}

/// The registry is down for a set of VMs: every TCP connection from them to `registry`
/// (`host:port`) is refused (iptables REJECT with a TCP reset in each VM's namespace), as
/// if the registry process had died. Dropping it ends the outage. (The process itself keeps
/// running so that its access log can prove nothing reached it.)
pub struct RegistryOutage<'a> {
    net: &'a Network,
    vms: Vec<usize>,
    host: String,
    port: String,
}

impl<'a> RegistryOutage<'a> {
    /// Starts the outage for `vms`.
    pub fn start(net: &'a Network, vms: &[usize], registry: &str) -> anyhow::Result<Self> {
        let (host, port) = registry
            .rsplit_once(':')
            .context("registry address is host:port")?;
        let o = RegistryOutage {
            net,
            vms: vms.to_vec(),
            host: host.to_string(),
            port: port.to_string(),
        };
        for &i in &o.vms {
            o.rule(i, "-I")?;
        }
        Ok(o)
    }

    fn rule(&self, vm: usize, op: &str) -> anyhow::Result<()> {
        let ns = self.net.vm_ns(vm);
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "iptables",
                "-w",
                op,
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &self.host,
                "--dport",
                &self.port,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ],
        )
        .with_context(|| format!("iptables in {ns}"))?;
        Ok(())
    }
}

impl Drop for RegistryOutage<'_> {
    fn drop(&mut self) {
        for &i in &self.vms {
            let _ = self.rule(i, "-D");
        }
    }
}

/// Bytes of blob GETs the registry's access log shows for client `ip` (combined log
/// format: the client address comes first).
pub fn blob_bytes_served_to(registry: &crate::registry::Registry, ip: &str) -> u64 {
    let log = std::fs::read_to_string(registry.log_path()).unwrap_or_default();
    log.lines()
        .filter(|l| l.split_whitespace().next() == Some(ip))
        .filter_map(|l| {
            let start = l.find('"')?;
            let rest = &l[start + 1..];
            let end = rest.find('"')?;
            let mut req = rest[..end].split_whitespace();
            (req.next()? == "GET" && req.next()?.contains("/blobs/")).then_some(())?;
            rest[end + 1..]
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A running `bad-peer` (src/bin/bad-peer.rs) in VM `i`'s namespace: a member of the
/// function tree that serves damaged blocks. Killed on drop.
pub struct BadPeer {
    /// Its node id.
    pub node_id: String,
    daemon: crate::process::Daemon,
    _dir: tempfile::TempDir,
}

impl BadPeer {
    /// Starts it in VM `i` of `net` (peer address `<vm ip>:9112`, node id `vm<i>`), joined
    /// to `image`'s tree; `mode` is `corrupt`, `truncate` or `short`. Waits until it has
    /// joined.
    pub fn start(
        net: &Network,
        i: usize,
        coordinator: &Coordinator,
        image: &crate::images::TestImage,
        mode: &str,
    ) -> anyhow::Result<BadPeer> {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-badpeer")
            .tempdir_in("/tmp")?;
        let layers: Vec<String> = image
            .converted_layers()?
            .into_iter()
            .map(|l| l.digest)
            .collect();
        let node_id = format!("vm{i}");
        let ns = net.vm_ns(i);
        let mut cmd = crate::containerd::in_netns(
            Some(&ns),
            crate::binaries::workspace_binary("bad-peer")
                .to_str()
                .unwrap(),
        );
        cmd.args(["--listen", &format!("{}:9112", net.vm_ip(i))])
            .args(["--coordinator", &coordinator.endpoint()])
            .args([
                "--tenant",
                crate::stack::TENANT,
                "--token",
                crate::stack::TOKEN,
            ])
            .args(["--node-id", &node_id])
            .args([
                "--function",
                image.converted_digest.as_deref().context("converted")?,
            ])
            .args(["--registry", &image.registry, "--repo", &image.repo])
            .args(["--layers", &layers.join(","), "--mode", mode]);
        let mut daemon =
            crate::process::Daemon::spawn("bad-peer", cmd, &dir.path().join("bad-peer.log"))?;
        crate::wait_until("bad-peer to join", Duration::from_secs(60), || {
            if daemon.check_alive().is_err() {
                return Some(());
            }
            daemon.log().contains("ready").then_some(())
        })?;
        daemon.check_alive()?;
        Ok(BadPeer {
            node_id,
            daemon,
            _dir: dir,
        })
    }

    /// Block requests it answered (with damaged blocks) so far.
    pub fn served(&self) -> u64 {
        self.daemon
            .log()
            .lines()
            .filter_map(|l| l.strip_prefix("served ")?.split(' ').next()?.parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// Its log.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// FUSE mounts under `dir` now (a snapshotter's lazily mounted layers).
pub fn fuse_mounts_under(dir: &std::path::Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let fstype = f
                .iter()
                .position(|x| *x == "-")
                .and_then(|i| f.get(i + 1))
                .copied()
                .unwrap_or("");
            fstype.starts_with("fuse")
                && f.get(4)
                    .is_some_and(|p| std::path::Path::new(p).starts_with(dir))
        })
        .count()
}

/// Bytes allocated on disk under `dir` (`du -s --block-size=1`: sparse files count what they
/// hold).
pub fn disk_usage(dir: &std::path::Path) -> anyhow::Result<u64> {
    let out = run("du", &["-s", "--block-size=1", &dir.display().to_string()])?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du output")
}
