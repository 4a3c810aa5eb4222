//! Emulated VMs: network namespaces on a Linux bridge, with veth links and optional tc rate
//! limits. Only the network is namespaced: every VM shares the host's mount namespace, so a
//! VM's FUSE mounts are visible to its containerd (which runs in the same network namespace).

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

/// A bridge with `n` VM namespaces attached. Dropping it deletes everything it created.
pub struct Network {
    id: u8,
    vms: usize,
}

/// Runs a command and fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Network {
    /// Creates bridge `fnb<id>` with address 10.77.<id>.1/24 on the host and namespaces
    /// `fn<id>vm<i>` with address 10.77.<id>.<10+i>, for i in 0..vms. `rate` (tc syntax, e.g.
    /// "200mbit") limits each VM link in both directions.
    pub fn create(id: u8, vms: usize, rate: Option<&str>) -> anyhow::Result<Network> {
        let net = Network { id, vms };
        net.teardown(); // leftovers of an aborted run
        let br = net.bridge();
        run("ip", &["link", "add", &br, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{}/24", net.host_ip()), "dev", &br],
        )?;
        run("ip", &["link", "set", &br, "up"])?;
        for i in 0..vms {
            let ns = net.vm_ns(i);
            let host_if = format!("fn{id}h{i}");
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &host_if, "master", &br, "up"])?;
            let ip = format!("{}/24", net.vm_ip(i));
            run("ip", &["-n", &ns, "addr", "add", &ip, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            if let Some(rate) = rate {
                let tbf = [
                    "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms",
                ];
                run(
                    "tc",
                    &[&["qdisc", "add", "dev", &host_if][..], &tbf[..]].concat(),
                )?;
                run(
                    "tc",
                    &[&["-n", &ns, "qdisc", "add", "dev", "eth0"][..], &tbf[..]].concat(),
                )?;
            }
        }
        Ok(net)
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        format!("fnb{}", self.id)
    }

    /// The host's address on the bridge (reachable from every VM).
    pub fn host_ip(&self) -> String {
        format!("10.77.{}.1", self.id)
    }

    /// Namespace name of VM `i`.
    pub fn vm_ns(&self, i: usize) -> String {
        format!("fn{}vm{i}", self.id)
    }

    /// Address of VM `i`.
    pub fn vm_ip(&self, i: usize) -> String {
        format!("10.77.{}.{}", self.id, 10 + i)
    }

    /// Takes VM `i`'s link down or up (a network partition of that VM).
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let host_if = format!("fn{}h{i}", self.id);
        run(
            "ip",
            &["link", "set", &host_if, if up { "up" } else { "down" }],
        )?;
        Ok(())
    }

    fn teardown(&self) {
        for i in 0..self.vms.max(64) {
            let ns = self.vm_ns(i);
            if Path::new("/run/netns").join(&ns).exists() {
                // Whatever still runs in it (a snapshotter's FUSE fd holder outlives its
                // snapshotter by design) would keep the namespace and its veth alive, and the
                // next test's network of the same name could not be made.
                if let Ok(pids) = run("ip", &["netns", "pids", &ns]) {
                    for pid in pids.split_whitespace() {
                        let _ = run("kill", &["-9", pid]);
                    }
                }
                let _ = run("ip", &["netns", "del", &ns]);
            }
            // A deleted namespace is freed only once its last socket is gone (a connection
            // cut off by a partition retransmits for a while), and its veth with it: delete
            // the host end now, which takes the pair down.
            let host_if = format!("fn{}h{i}", self.id);
            if Path::new("/sys/class/net").join(&host_if).exists() {
                let _ = run("ip", &["link", "del", &host_if]);
            }
        }
        let _ = run("ip", &["link", "del", &self.bridge()]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let c = std::ffi::CString::new(p).unwrap();
        // SAFETY: umount2 with a valid C string; failure is ignored (best-effort cleanup).
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
