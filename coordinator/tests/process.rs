//! A real `coordinator` process over a real socket: join, watch, kill -9, restart, state
//! intact, watchers reconnect and are told.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use faasnet_coordinator::client::{AdminClient, CoordinatorClient};
use faasnet_coordinator::{MembershipOptions, Source, TreeMembership, Upstream};
use futures::StreamExt;

mod common;
use common::{free_port, wait_until};

const F: &str = "sha256:abababababababababababababababababababababababababababababababab";

/// Kills the process when the test ends, whatever happens.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start coordinator"),
    )
}

async fn admin_when_up(endpoint: &str, log: &Path) -> AdminClient {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = AdminClient::connect(endpoint, "admin-secret").await {
            if a.list_trees(None).await.is_ok() {
                return a;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coordinator did not come up; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn parent(u: &Upstream) -> Option<&str> {
    match &u.source {
        Source::Registry => None,
        Source::Peer { node_id, .. } => Some(node_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_keeps_trees_and_watchers_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("coordinator.toml");
    let log = dir.path().join("coordinator.log");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{port}"
data_dir = "db"
lease_ttl_ms = 20000
sweep_interval_ms = 100
# The VMs here have no peer servers: probes would find them all dead.
probe_timeout_ms = 0
admin_token = "admin-secret"

[tenants.acme]
token = "acme-secret"
"#
        ),
    )
    .unwrap();

    let mut server = spawn(&config, &log);
    let admin = admin_when_up(&endpoint, &log).await;
    let client = CoordinatorClient::connect_lazy(&endpoint, "acme", "acme-secret").unwrap();

    // Three VMs: a is the root, b and c its children.
    let a = client.join(F, "a", "10.0.0.1:7800").await.unwrap();
    assert!(a.upstream.is_root());
    let b = client.join(F, "b", "10.0.0.2:7800").await.unwrap();
    assert_eq!(parent(&b.upstream), Some("a"));
    // c stays in through the client library, which must ride out the restart.
    let opts = MembershipOptions {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    };
    let c = TreeMembership::join(client.clone(), F, "c", "10.0.0.3:7800", opts)
        .await
        .unwrap();
    assert_eq!(parent(&c.upstream()), Some("a"));
    let epoch_before = c.upstream().epoch;
    assert_eq!(epoch_before, 3);

    let mut watch_b = client.watch(F, "b").await.unwrap();
    let first = watch_b.next().await.unwrap().unwrap();
    assert_eq!(parent(&first), Some("a"));

    let before = admin.get_tree("acme", F).await.unwrap();

    // kill -9.
    let pid = server.0.id();
    server.0.kill().unwrap(); // SIGKILL on unix
    let status = server.0.wait().unwrap();
    assert!(!status.success(), "killed, pid {pid}");

    // The watch breaks; the library keeps the last known upstream meanwhile.
    let broken = tokio::time::timeout(Duration::from_secs(10), watch_b.next())
        .await
        .expect("watch notices the dead coordinator");
    assert!(!matches!(broken, Some(Ok(_))), "{broken:?}");
    assert_eq!(parent(&c.upstream()), Some("a"));
    assert!(client.heartbeat(F, "b").await.is_err());

    // Restart on the same data: same trees, same positions, same epoch.
    let _server = spawn(&config, &log);
    let admin = admin_when_up(&endpoint, &log).await;
    let after = admin.get_tree("acme", F).await.unwrap();
    assert_eq!(before.summary, after.summary);
    let layout = |v: &faasnet_coordinator::client::TreeView| {
        v.nodes
            .iter()
            .map(|n| (n.node_id.clone(), n.peer_addr.clone(), n.parent_id.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(layout(&before), layout(&after));
    // Leases came back too: every node holds one.
    assert!(after.nodes.iter().all(|n| n.lease_remaining_ms > 0));

    // b reconnects its watch and sees its upstream as of the current epoch.
    let mut watch_b = client.watch(F, "b").await.unwrap();
    let again = watch_b.next().await.unwrap().unwrap();
    assert_eq!(parent(&again), Some("a"));
    assert_eq!(again.epoch, epoch_before);

    // Let the library's watch reconnect, then remove the root: c (last) takes the root
    // and b is re-attached under c. Both are told.
    let mut rx_c = c.subscribe();
    admin.remove_node("acme", F, "a").await.unwrap();
    let told_b = tokio::time::timeout(Duration::from_secs(10), watch_b.next())
        .await
        .expect("b told in time")
        .unwrap()
        .unwrap();
    assert_eq!(parent(&told_b), Some("c"));
    assert_eq!(told_b.epoch, epoch_before + 1);
    wait_until("c told it is the root", Duration::from_secs(15), || {
        let up = rx_c.borrow_and_update().clone();
        async move { up.is_root() && up.epoch == epoch_before + 1 }
    })
    .await;

    let tree = admin.get_tree("acme", F).await.unwrap();
    assert_eq!(tree.nodes.len(), 2);
    assert_eq!(tree.nodes[0].node_id, "c");

    // Admin CLI against the running process: trees and draw.
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["draw", "--config"])
        .arg(&config)
        .args(["acme", F])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("2 nodes") && text.contains("c (10.0.0.3:7800") && text.contains("└── b"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["trees", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(F), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["remove-node", "--config"])
        .arg(&config)
        .args(["acme", F, "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the tree"),
        "{out:?}"
    );
}
