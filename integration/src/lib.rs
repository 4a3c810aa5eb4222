//! Support for the end-to-end tests in `tests/`: real processes (registry, coordinator,
//! snapshotter, containerd), each started in its own temporary state and stopped on drop,
//! and emulated VMs as network namespaces.
//!
//! The tests need root. Where a prerequisite is missing they fail with a message naming it;
//! `hack/install-deps.sh` installs everything.

pub mod binaries;
pub mod containerd;
pub mod faults;
pub mod images;
pub mod netns;
pub mod process;
pub mod registry;
pub mod rootfs;
pub mod stack;

/// Fails the calling test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests need root (FUSE, containerd, namespaces)"
    );
}

/// A free TCP port on 127.0.0.1 (the kernel picks it; a tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_until<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
