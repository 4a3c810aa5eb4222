//! The gRPC service in-process over real sockets: bad requests, tenant isolation, watch
//! notifications, lease expiry, the client library's membership loop, unix socket, metrics.

use std::time::Duration;

use faasnet_coordinator::client::{AdminClient, ClientError, CoordinatorClient};
use faasnet_coordinator::{MembershipOptions, Source, TreeMembership, Upstream};
use futures::StreamExt;
use tonic::Code;

mod common;
use common::{scrape_metrics, wait_until, Server};

const F1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const F2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// A server with leases of `lease_ttl_ms`, swept every 50 ms, and no probes: the VMs here
/// have no peer servers (tests/health.rs probes real listeners).
async fn server(lease_ttl_ms: u64) -> Server {
    common::server(&format!(
        "lease_ttl_ms = {lease_ttl_ms}\nsweep_interval_ms = 50\nprobe_timeout_ms = 0"
    ))
    .await
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> (Code, String) {
    match r {
        Err(ClientError::Status(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a status error, got {other:?}"),
    }
}

fn peer(u: &Upstream) -> Option<&str> {
    match &u.source {
        Source::Registry => None,
        Source::Peer { node_id, .. } => Some(node_id),
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let s = server(60_000).await;
    let (acme, admin) = s.clients().await;
    acme.join(F1, "vm-a", "10.0.0.1:7800").await.unwrap();
    acme.join(F1, "vm-b", "10.0.0.2:7800").await.unwrap();
    let before = admin.get_tree("acme", F1).await.unwrap();

    // Wrong tenant: globex's token naming acme, and acme's token naming globex.
    let globex_as_acme = CoordinatorClient::connect(&s.endpoint, "acme", "globex-secret")
        .await
        .unwrap();
    let (c, m) = code(globex_as_acme.join(F1, "vm-x", "10.0.0.9:7800").await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(
        m.contains("belongs to tenant \"globex\"") && m.contains("\"acme\""),
        "{m}"
    );
    let (c, _) = code(globex_as_acme.leave(F1, "vm-a").await);
    assert_eq!(c, Code::PermissionDenied);
    let (c, _) = code(globex_as_acme.watch(F1, "vm-a").await.map(|_| ()));
    assert_eq!(c, Code::PermissionDenied);

    // Another tenant's tree with the same digest is a different tree.
    let globex = CoordinatorClient::connect(&s.endpoint, "globex", "globex-secret")
        .await
        .unwrap();
    let (c, m) = code(globex.heartbeat(F1, "vm-a").await);
    assert_eq!(c, Code::NotFound);
    assert!(m.contains("no tree"), "{m}");

    // No token / unknown token / admin token on tenant calls / tenant token on admin calls.
    let nobody = CoordinatorClient::connect(&s.endpoint, "acme", "wrong")
        .await
        .unwrap();
    assert_eq!(
        code(nobody.join(F1, "vm-x", "10.0.0.9:7800").await).0,
        Code::Unauthenticated
    );
    let admin_as_tenant = CoordinatorClient::connect(&s.endpoint, "acme", "admin-secret")
        .await
        .unwrap();
    assert_eq!(
        code(admin_as_tenant.join(F1, "vm-x", "10.0.0.9:7800").await).0,
        Code::PermissionDenied
    );
    let tenant_as_admin = AdminClient::connect(&s.endpoint, "acme-secret")
        .await
        .unwrap();
    assert_eq!(
        code(tenant_as_admin.list_trees(None).await).0,
        Code::PermissionDenied
    );

    // Unknown tree / unknown node.
    let (c, m) = code(acme.leave(F2, "vm-a").await);
    assert_eq!(c, Code::NotFound);
    assert!(m.contains("no tree for function"), "{m}");
    let (c, m) = code(acme.heartbeat(F1, "vm-zz").await);
    assert_eq!(c, Code::NotFound);
    assert!(m.contains("\"vm-zz\" is not in the tree"), "{m}");
    assert_eq!(
        code(acme.watch(F1, "vm-zz").await.map(|_| ())).0,
        Code::NotFound
    );
    assert_eq!(code(admin.get_tree("acme", F2).await).0, Code::NotFound);
    assert_eq!(
        code(admin.remove_node("acme", F1, "vm-zz").await).0,
        Code::NotFound
    );

    // Duplicate node id.
    let (c, m) = code(acme.join(F1, "vm-a", "10.0.0.7:7800").await);
    assert_eq!(c, Code::AlreadyExists);
    assert!(
        m.contains("already in the tree") && m.contains("10.0.0.1:7800"),
        "{m}"
    );

    // Malformed addresses and digests.
    for bad in ["10.0.0.1", "10.0.0.1:0", "ftp://x:1", "no spaces:1", ""] {
        let (c, m) = code(acme.join(F1, "vm-c", bad).await);
        assert_eq!(c, Code::InvalidArgument, "{bad}");
        assert!(
            m.contains("peer_addr") && m.contains("expected host:port"),
            "{m}"
        );
    }
    let (c, m) = code(acme.join("sha256:short", "vm-c", "10.0.0.3:7800").await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("not a manifest digest"), "{m}");
    assert_eq!(
        code(acme.join(F1, "", "10.0.0.3:7800").await).0,
        Code::InvalidArgument
    );

    // Nothing changed: same nodes, same epoch, and no tree appeared for F2 or globex.
    let after = admin.get_tree("acme", F1).await.unwrap();
    assert_eq!(before.summary, after.summary);
    let ids = |v: &faasnet_coordinator::client::TreeView| {
        v.nodes
            .iter()
            .map(|n| (n.node_id.clone(), n.peer_addr.clone(), n.position))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
    let trees = admin.list_trees(None).await.unwrap();
    assert_eq!(trees.len(), 1, "{trees:?}");
}

#[tokio::test]
async fn watchers_are_told_when_their_upstream_changes() {
    let s = server(60_000).await;
    let c = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    for (i, id) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let j = c.join(F1, id, &format!("10.0.0.{i}:7800")).await.unwrap();
        assert_eq!(j.upstream.epoch, i as u64 + 1);
    }
    // a; b, c under a; d, e under b.
    let mut wd = c.watch(F1, "d").await.unwrap();
    let mut we = c.watch(F1, "e").await.unwrap();
    let mut wc = c.watch(F1, "c").await.unwrap();
    let first = wd.next().await.unwrap().unwrap();
    assert_eq!(peer(&first), Some("b"));
    assert_eq!(first.epoch, 5);
    we.next().await.unwrap().unwrap();
    wc.next().await.unwrap().unwrap();

    // b leaves: e (last) moves into b's place under a; d's parent becomes e.
    c.leave(F1, "b").await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), wd.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(peer(&d), Some("e"));
    assert_eq!(d.epoch, 6);
    assert_eq!(d.peer_addr(), Some("10.0.0.4:7800"));
    let e = tokio::time::timeout(Duration::from_secs(5), we.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(peer(&e), Some("a"));
    // c was not affected: nothing arrives for it.
    assert!(tokio::time::timeout(Duration::from_millis(200), wc.next())
        .await
        .is_err());

    // Bad upstream advice: d's upstream e failed; fallbacks are e's ancestors.
    let advice = c.report_bad_upstream(F1, "d", "e").await.unwrap();
    assert_eq!(peer(&advice.upstream), Some("e"));
    assert_eq!(
        advice.fallbacks,
        vec![("a".to_string(), "10.0.0.0:7800".to_string())]
    );

    // A node that leaves sees its watch end with NOT_FOUND.
    c.leave(F1, "d").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), wd.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.unwrap_err().code(), Some(Code::NotFound));
}

#[tokio::test]
async fn expired_leases_are_removed_and_members_rejoin() {
    let s = server(400).await;
    let (c, admin) = s.clients().await;
    let opts = MembershipOptions {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    };
    // A root that never heartbeats, and two members kept alive by the library.
    c.join(F1, "silent", "10.0.0.1:7800").await.unwrap();
    let m1 = TreeMembership::join(c.clone(), F1, "m1", "10.0.0.2:7800", opts.clone())
        .await
        .unwrap();
    let m2 = TreeMembership::join(c.clone(), F1, "m2", "10.0.0.3:7800", opts.clone())
        .await
        .unwrap();
    assert_eq!(peer(&m1.upstream()), Some("silent"));

    // silent expires: m2 (last) takes the root, m1 hangs below it.
    let mut rx1 = m1.subscribe();
    wait_until("m2 becomes root", Duration::from_secs(10), || {
        let up = m2.upstream();
        async move { up.is_root() }
    })
    .await;
    wait_until("m1 told", Duration::from_secs(10), || {
        let up = rx1.borrow_and_update().clone();
        async move { peer(&up) == Some("m2") }
    })
    .await;
    let view = admin.get_tree("acme", F1).await.unwrap();
    assert_eq!(view.nodes.len(), 2, "{view:?}");

    // Members outlive several TTLs thanks to heartbeats.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(admin.get_tree("acme", F1).await.unwrap().nodes.len(), 2);

    // An admin removes m1: its library notices and joins again.
    admin.remove_node("acme", F1, "m1").await.unwrap();
    wait_until("m1 back in the tree", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            admin
                .get_tree("acme", F1)
                .await
                .map(|v| v.nodes.iter().any(|n| n.node_id == "m1"))
                .unwrap_or(false)
        }
    })
    .await;
    // refresh() asks again and agrees with the tree.
    let up = m1.refresh().await.unwrap();
    assert_eq!(peer(&up), Some("m2"));

    // Leaving ends the membership; the other member becomes the only node.
    m1.leave().await.unwrap();
    assert_eq!(admin.get_tree("acme", F1).await.unwrap().nodes.len(), 1);
    drop(m2);
}

#[tokio::test]
async fn unix_socket_and_metrics() {
    let s = server(60_000).await;
    let endpoint = format!("unix:{}", s.unix.display());
    let c = CoordinatorClient::connect(&endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    let j = c.join(F1, "u1", "http://vm-1.local:7800").await.unwrap();
    assert!(j.upstream.is_root());
    assert_eq!(j.lease_ttl, Duration::from_secs(60));
    let _ = c.join(F1, "u1", "bogus").await;

    // Plain HTTP GET of /metrics.
    let body = scrape_metrics(s.metrics).await;
    for needle in [
        "faasnet_coordinator_joins_total 1",
        "faasnet_coordinator_nodes 1",
        "faasnet_coordinator_trees 1",
        "faasnet_coordinator_rpc_duration_seconds_bucket{",
        "method=\"join\",code=\"InvalidArgument\"",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert!(!s.running.done.is_finished());
}

#[tokio::test]
async fn shutdown_does_not_wait_for_open_watch_streams() {
    let mut s = server(60_000).await;
    let c = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    c.join(F1, "w", "10.0.0.1:7800").await.unwrap();
    let mut stream = c.watch(F1, "w").await.unwrap();
    stream.next().await.unwrap().unwrap();
    s.stop.take().unwrap().send(()).unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), &mut s.running.done)
        .await
        .expect("server stops while a watch is open");
    done.unwrap().unwrap();
}
