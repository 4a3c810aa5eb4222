//! Fast failure detection: a node suspected dead is probed, and removed at once if its peer
//! address does not accept a connection.
//!
//! Leases alone take a whole TTL (10 s by default) to notice a dead VM, and during that time
//! its children retry it for every block. Two events make a node suspect sooner:
//! - a child reports it (`ReportBadUpstream`): only an ancestor of the reporter can be
//!   suspected this way;
//! - its watch stream closes with no other watcher left: a VM whose process died closes its
//!   connection to the coordinator (the kernel does it for a `kill -9`).
//!
//! A suspect is not trusted on the word of the reporter: the coordinator connects to the
//! node's peer address itself (the "probe") and removes the node only if that fails, so a
//! buggy or malicious VM cannot evict a healthy one. A node is probed at most once per
//! `min_interval`, which bounds the connections a flood of reports can cause. A partitioned
//! node the coordinator can still reach stays in the tree; its children keep falling back
//! to the registry (the snapshotter avoids a failed peer for a while).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use crate::forest::Forest;
use crate::metrics::{Metrics, ResultLabel};
use crate::upstream::TreeKey;

/// How long after a closed watch stream a node that still answered is probed again.
const WATCH_RECHECK: Duration = Duration::from_millis(300);

/// Answers whether a peer address is alive. The server uses [`tcp_probe`]; tests may
/// inject their own.
pub type Probe = Arc<dyn Fn(String) -> BoxFuture<'static, bool> + Send + Sync>;

/// A probe that connects to `host:port` (or `http(s)://host[:port]`) and closes at once;
/// alive if the connection is accepted within `timeout`.
pub fn tcp_probe(timeout: Duration) -> Probe {
    Arc::new(move |addr: String| {
        Box::pin(async move {
            let target = host_port(&addr);
            matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await,
                Ok(Ok(_))
            )
        })
    })
}

/// `host:port` from a peer address (`host:port` or `http(s)://host[:port][/...]`).
fn host_port(addr: &str) -> String {
    let (rest, default_port) = if let Some(r) = addr.strip_prefix("http://") {
        (r, 80)
    } else if let Some(r) = addr.strip_prefix("https://") {
        (r, 443)
    } else {
        return addr.to_string();
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let has_port = match hostport.rfind(']') {
        Some(b) => hostport[b..].contains(':'),
        None => hostport.contains(':'),
    };
    if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    }
}

/// Why a node is suspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion<'a> {
    /// A node below it reported it failed.
    Reported {
        /// The reporter.
        by: &'a str,
    },
    /// Its last watch stream closed.
    WatchClosed,
}

/// What a check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The probe failed and the node was removed (its children were told).
    Removed,
    /// The probe succeeded: the node stays.
    Alive,
    /// Not probed: not in the tree any more, probed too recently, not an ancestor of the
    /// reporter, or probing is disabled.
    Skipped,
}

/// Probes suspect nodes and removes the dead ones.
pub struct Health {
    forest: Arc<Forest>,
    metrics: Arc<Metrics>,
    probe: Option<Probe>,
    min_interval: Duration,
    last_probe: Mutex<HashMap<(TreeKey, String), Instant>>,
}

impl Health {
    /// `probe: None` disables checks (every suspicion is [`Verdict::Skipped`]; leases
    /// remain the only failure detector).
    pub fn new(
        forest: Arc<Forest>,
        metrics: Arc<Metrics>,
        probe: Option<Probe>,
        min_interval: Duration,
    ) -> Self {
        Self {
            forest,
            metrics,
            probe,
            min_interval,
            last_probe: Mutex::new(HashMap::new()),
        }
    }

    /// True if this node may be probed now; records the attempt.
    fn take_slot(&self, key: &TreeKey, node_id: &str, now: Instant) -> bool {
        let mut last = self.last_probe.lock().unwrap();
        if last.len() > 4096 {
            let keep = self.min_interval;
            last.retain(|_, t| now.duration_since(*t) < keep);
        }
        let k = (key.clone(), node_id.to_string());
        match last.get(&k) {
            Some(t) if now.duration_since(*t) < self.min_interval => false,
            _ => {
                last.insert(k, now);
                true
            }
        }
    }

    /// Checks a suspect node: probes its peer address and removes it if that fails.
    pub async fn check(&self, key: &TreeKey, node_id: &str, why: Suspicion<'_>) -> Verdict {
        let Some(probe) = &self.probe else {
            return Verdict::Skipped;
        };
        match why {
            Suspicion::Reported { by } => {
                if !self.forest.is_ancestor(key, by, node_id) {
                    return Verdict::Skipped;
                }
            }
            Suspicion::WatchClosed => {
                // The membership reconnected meanwhile: nothing to suspect.
                if self.forest.is_watched(key, node_id) {
                    return Verdict::Skipped;
                }
            }
        }
        let Some((addr, generation)) = self.forest.peer_of(key, node_id) else {
            return Verdict::Skipped;
        };
        // Only reports are rate-limited: they can come in floods. A closed watch stream comes
        // once per connection, and it must not use up the slot of the children's reports that
        // follow a crash (see below).
        let reported = matches!(why, Suspicion::Reported { .. });
        if reported && !self.take_slot(key, node_id, Instant::now()) {
            return Verdict::Skipped;
        }
        let start = Instant::now();
        let mut alive = probe(addr.clone()).await;
        if alive && !reported {
            // A process being killed closes its descriptors one by one: the coordinator may see
            // the watch stream end while the peer listener still accepts for a moment. Look
            // again once the exit is surely over.
            tokio::time::sleep(WATCH_RECHECK).await;
            alive = probe(addr.clone()).await;
        }
        self.metrics
            .probes
            .get_or_create(&ResultLabel {
                result: if alive { "alive" } else { "dead" },
            })
            .inc();
        if alive {
            tracing::info!(tree = %key, node_id, %addr, ?why, "suspect node answered its probe; kept");
            return Verdict::Alive;
        }
        match self
            .forest
            .remove_unreachable(key, node_id, generation)
            .await
        {
            Ok(true) => {
                tracing::info!(
                    tree = %key, node_id, %addr, ?why, probe_ms = start.elapsed().as_millis() as u64,
                    "suspect node unreachable; removed, its children re-attached"
                );
                Verdict::Removed
            }
            Ok(false) => Verdict::Skipped,
            Err(e) => {
                tracing::warn!(tree = %key, node_id, error = %e, "removing an unreachable node failed");
                Verdict::Skipped
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const F: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn forest() -> (Arc<Forest>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(Store::temporary().unwrap());
        let f = Forest::open(
            store,
            metrics.clone(),
            Duration::from_secs(60),
            Instant::now(),
        );
        (Arc::new(f.unwrap()), metrics)
    }

    fn dead() -> Probe {
        Arc::new(|_| Box::pin(async { false }))
    }

    #[tokio::test]
    async fn dead_parent_removed_children_reattached() {
        let (f, m) = forest();
        let key = TreeKey::new("t", F);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            f.join(&key, id, &format!("10.0.0.{i}:1"), Instant::now())
                .await
                .unwrap();
        }
        let h = Health::new(f.clone(), m.clone(), Some(dead()), Duration::from_secs(1));
        // d's parent is b.
        assert_eq!(
            h.check(&key, "b", Suspicion::Reported { by: "d" }).await,
            Verdict::Removed
        );
        let ups = f.upstreams(&key).unwrap();
        assert_eq!(ups.len(), 3);
        assert!(ups
            .values()
            .all(|u| !matches!(&u.source, crate::Source::Peer { node_id, .. } if node_id == "b")));
        assert_eq!(m.unreachable_removals.get(), 1);
        // Gone: a second report is skipped.
        assert_eq!(
            h.check(&key, "b", Suspicion::Reported { by: "d" }).await,
            Verdict::Skipped
        );
        // Disabled probes skip everything.
        let off = Health::new(f.clone(), m, None, Duration::ZERO);
        assert_eq!(
            off.check(&key, "a", Suspicion::WatchClosed).await,
            Verdict::Skipped
        );
    }

    #[tokio::test]
    async fn a_node_that_rejoined_during_the_probe_is_kept() {
        let (f, m) = forest();
        let key = TreeKey::new("t", F);
        f.join(&key, "a", "10.0.0.1:1", Instant::now())
            .await
            .unwrap();
        f.join(&key, "b", "10.0.0.2:1", Instant::now())
            .await
            .unwrap();
        // While the probe runs, b leaves and joins again (a new process): the old
        // incarnation's probe result must not remove the new one.
        let calls = Arc::new(AtomicUsize::new(0));
        let (f2, k2, calls2) = (f.clone(), key.clone(), calls.clone());
        let probe: Probe = Arc::new(move |_| {
            let (f, key, calls) = (f2.clone(), k2.clone(), calls2.clone());
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                f.remove(&key, "b", crate::forest::RemoveReason::Left)
                    .await
                    .unwrap();
                f.join(&key, "b", "10.0.0.2:1", Instant::now())
                    .await
                    .unwrap();
                false
            })
        });
        let h = Health::new(f.clone(), m, Some(probe), Duration::ZERO);
        assert_eq!(
            h.check(&key, "b", Suspicion::WatchClosed).await,
            Verdict::Skipped
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(f.upstreams(&key).unwrap().contains_key("b"));
    }

    #[test]
    fn host_port_of_peer_addresses() {
        assert_eq!(host_port("10.0.0.1:7800"), "10.0.0.1:7800");
        assert_eq!(host_port("http://vm-1.local"), "vm-1.local:80");
        assert_eq!(host_port("https://vm-1.local/x"), "vm-1.local:443");
        assert_eq!(host_port("http://[::1]:9"), "[::1]:9");
        assert_eq!(host_port("http://[::1]"), "[::1]:80");
    }
}
