//! Fast failure detection (`health.rs`) through the real gRPC service: VMs are TCP
//! listeners on 127.0.0.1 (their "peer servers"); a dead VM is a closed port.
//!
//! - a child reports its dead parent: the parent is removed within the call, the children
//!   are told their new upstream;
//! - a report about a healthy parent, or about a node that is not the reporter's ancestor,
//!   removes nothing (a buggy or malicious VM cannot evict others);
//! - a node whose watch stream closes (its process died) is probed and removed if dead,
//!   kept if alive;
//! - a node is probed at most once per interval, however many reports name it.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use faasnet_coordinator::client::{AdminClient, CoordinatorClient};
use faasnet_coordinator::{Source, Upstream};
use futures::StreamExt;

mod common;
use common::{scrape_metrics, wait_until, Server};

/// A server whose probes give up after 500 ms, at most one per node per `probe_interval_ms`.
async fn server(probe_interval_ms: u64) -> Server {
    common::server(&format!(
        "lease_ttl_ms = 60000\nprobe_timeout_ms = 500\nprobe_interval_ms = {probe_interval_ms}"
    ))
    .await
}

const F1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// A VM's peer server: a listener that accepts (the kernel does) until dropped.
fn vm() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

async fn metrics(s: &Server) -> String {
    scrape_metrics(s.metrics).await
}

fn peer(u: &Upstream) -> Option<&str> {
    match &u.source {
        Source::Registry => None,
        Source::Peer { node_id, .. } => Some(node_id),
    }
}

async fn nodes(admin: &AdminClient) -> Vec<(String, String)> {
    admin
        .get_tree("acme", F1)
        .await
        .map(|v| {
            v.nodes
                .into_iter()
                .map(|n| (n.node_id, n.parent_id))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_reported_dead_parent_is_removed_and_its_children_told() {
    let s = server(1000).await;
    let (c, admin) = s.clients().await;
    // a (root) ─ b ─ d, e ; a ─ c
    let vms: Vec<_> = (0..5).map(|_| vm()).collect();
    for (id, (_, addr)) in ["a", "b", "c", "d", "e"].iter().zip(&vms) {
        c.join(F1, id, addr).await.unwrap();
    }
    let mut wd = c.watch(F1, "d").await.unwrap();
    let mut we = c.watch(F1, "e").await.unwrap();
    assert_eq!(peer(&wd.next().await.unwrap().unwrap()), Some("b"));
    assert_eq!(peer(&we.next().await.unwrap().unwrap()), Some("b"));

    // b dies (its peer server closes); d notices first and reports it.
    let mut vms = vms;
    drop(vms.remove(1));
    let t = Instant::now();
    let advice = c.report_bad_upstream(F1, "d", "b").await.unwrap();
    let took = t.elapsed();
    assert_ne!(peer(&advice.upstream), Some("b"), "{advice:?}");
    assert!(took < Duration::from_secs(1), "report took {took:?}");
    let tree = nodes(&admin).await;
    assert!(!tree.iter().any(|(id, _)| id == "b"), "{tree:?}");
    assert_eq!(tree.len(), 4);
    // Both children are told, without waiting for b's lease (60 s).
    let d_up = tokio::time::timeout(Duration::from_secs(2), wd.next())
        .await
        .expect("d told")
        .unwrap()
        .unwrap();
    let e_up = tokio::time::timeout(Duration::from_secs(2), we.next())
        .await
        .expect("e told")
        .unwrap()
        .unwrap();
    assert_ne!(peer(&d_up), Some("b"));
    assert_ne!(peer(&e_up), Some("b"));

    let m = metrics(&s).await;
    for needle in [
        "faasnet_coordinator_unreachable_removals_total 1",
        "faasnet_coordinator_probes_total{result=\"dead\"} 1",
        "faasnet_coordinator_bad_upstream_reports_total 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
}

#[tokio::test]
async fn a_reported_dead_parent_in_the_second_stripe_tree_is_removed() {
    let s = server(1000).await;
    let (c, admin) = s.clients().await;
    let ids = ["a", "b", "c", "d", "e", "f", "g"];
    let mut vms: Vec<_> = (0..ids.len()).map(|_| Some(vm())).collect();
    for (id, v) in ids.iter().zip(&vms) {
        c.join(F1, id, &v.as_ref().unwrap().1).await.unwrap();
    }
    // A node whose second-tree parent is no ancestor of it in the function tree: only the
    // second tree makes the report credible.
    let tree = nodes(&admin).await;
    let first_ancestors = |id: &str| {
        let mut up: Vec<String> = Vec::new();
        let mut id = id.to_string();
        while let Some((_, p)) = tree.iter().find(|(n, p)| *n == id && !p.is_empty()) {
            up.push(p.clone());
            id = p.clone();
        }
        up
    };
    let mut pair = None;
    for id in ids {
        let up = c.upstream(F1, id).await.unwrap();
        if let Some(Source::Peer { node_id, .. }) = &up.second {
            if !first_ancestors(id).contains(node_id) {
                pair = Some((id, node_id.clone()));
                break;
            }
        }
    }
    let (reporter, bad) = pair.expect("some node's second parent is outside its ancestry");
    let bad_index = ids.iter().position(|id| *id == bad).unwrap();
    drop(vms[bad_index].take());
    c.report_bad_upstream(F1, reporter, &bad).await.unwrap();
    let tree = nodes(&admin).await;
    assert!(
        !tree.iter().any(|(id, _)| *id == bad),
        "{reporter} reported its dead second parent {bad}, still in {tree:?}"
    );
    assert_eq!(tree.len(), ids.len() - 1);
    // Its place in the second tree went to a live node.
    let up = c.upstream(F1, reporter).await.unwrap();
    assert!(
        !matches!(&up.second, Some(Source::Peer { node_id, .. }) if *node_id == bad),
        "{up:?}"
    );
}

#[tokio::test]
async fn reports_cannot_evict_healthy_nodes_or_strangers() {
    let s = server(1000).await;
    let (c, admin) = s.clients().await;
    let (_la, a) = vm();
    let (_lb, b) = vm();
    let (lc, cc) = vm();
    c.join(F1, "a", &a).await.unwrap();
    c.join(F1, "b", &b).await.unwrap();
    c.join(F1, "c", &cc).await.unwrap();
    // b calls its healthy parent a bad: a is probed, answers, stays.
    let advice = c.report_bad_upstream(F1, "b", "a").await.unwrap();
    assert_eq!(peer(&advice.upstream), Some("a"));
    // c is dead, but b is not below c: b's word does not count, c is not even probed.
    drop(lc);
    c.report_bad_upstream(F1, "b", "c").await.unwrap();
    // Nor does a report about oneself or an unknown node.
    c.report_bad_upstream(F1, "b", "b").await.unwrap();
    c.report_bad_upstream(F1, "b", "zz").await.unwrap();
    assert_eq!(nodes(&admin).await.len(), 3);
    let m = metrics(&s).await;
    assert!(
        m.contains("faasnet_coordinator_probes_total{result=\"alive\"} 1")
            && !m.contains("result=\"dead\""),
        "{m}"
    );
}

#[tokio::test]
async fn probes_are_rate_limited_per_node() {
    let s = server(60_000).await;
    let c = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    let (_la, a) = vm();
    let (_lb, b) = vm();
    let (_lc, cc) = vm();
    c.join(F1, "a", &a).await.unwrap();
    c.join(F1, "b", &b).await.unwrap();
    c.join(F1, "c", &cc).await.unwrap();
    for _ in 0..20 {
        c.report_bad_upstream(F1, "b", "a").await.unwrap();
        c.report_bad_upstream(F1, "c", "a").await.unwrap();
    }
    let m = metrics(&s).await;
    assert!(
        m.contains("faasnet_coordinator_probes_total{result=\"alive\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_closed_watch_gets_a_dead_node_removed_and_a_live_one_kept() {
    let s = server(1000).await;
    let admin = AdminClient::connect(&s.endpoint, "admin-secret")
        .await
        .unwrap();
    let c = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    let (la, a) = vm();
    let (_lb, b) = vm();
    let (_lc, cc) = vm();
    c.join(F1, "a", &a).await.unwrap();
    c.join(F1, "b", &b).await.unwrap();
    c.join(F1, "c", &cc).await.unwrap();
    let mut wb = c.watch(F1, "b").await.unwrap();
    wb.next().await.unwrap().unwrap();

    // b's watch goes away while b still serves: b stays.
    {
        let b_conn = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
            .await
            .unwrap();
        let mut w = b_conn.watch(F1, "b").await.unwrap();
        w.next().await.unwrap().unwrap();
    }
    drop(wb);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(nodes(&admin).await.len(), 3);

    // a's process dies: its own connection (with its watch) and its peer server close.
    let a_conn = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    let mut wa = a_conn.watch(F1, "a").await.unwrap();
    wa.next().await.unwrap().unwrap();
    let c2 = CoordinatorClient::connect(&s.endpoint, "acme", "acme-secret")
        .await
        .unwrap();
    let mut wc = c2.watch(F1, "c").await.unwrap();
    assert_eq!(peer(&wc.next().await.unwrap().unwrap()), Some("a"));
    let t = Instant::now();
    drop(la);
    drop(wa);
    drop(a_conn);
    let up = tokio::time::timeout(Duration::from_secs(2), wc.next())
        .await
        .expect("c told within 2 s")
        .unwrap()
        .unwrap();
    assert_ne!(peer(&up), Some("a"));
    eprintln!("c re-parented {:?} after a died", t.elapsed());
    wait_until("a removed", Duration::from_secs(2), || {
        let admin = admin.clone();
        async move { !nodes(&admin).await.iter().any(|(id, _)| id == "a") }
    })
    .await;
}
