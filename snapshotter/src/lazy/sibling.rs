//! Sibling exchange: the two children of a parent split a layer's blocks between them.
//!
//! In a binary function tree a parent's uplink feeds two children. If both fetch every block
//! from it, each gets half the uplink and a start takes twice as long as at the root, while
//! the children's own uplinks (all of the leaves', half of the tree) stay idle. So a parent
//! gives its two children sides: side 0 fetches the even blocks from the parent, side 1 the
//! odd ones, and each gets the other half from its sibling, which forwards a block as soon as
//! it is whole. The parent's uplink then carries each block once, not twice.
//!
//! Sides come from the parent, the one node both children talk to, in its answer to a
//! child's hello ([`super::peer_protocol::Op::Hello`]), refreshed every [`REFRESH`]. A node
//! answers a sibling's request only for its own half (which it fetches from the parent,
//! never from the sibling), so requests cannot go round in circles even while two views of
//! the tree disagree; a refused or failed sibling request falls back to the parent.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::debug;

use super::{peer_protocol::HelloAnswer, peer_source::PeerSource};

/// How often a child asks its parent for its side again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How often a child without a side asks again: when a function starts on many VMs at once
/// the second child says hello a moment after the first, and until the first asks again it
/// fetches everything from the parent (each of those blocks crosses the parent's uplink
/// twice).
pub const REFRESH_ALONE: Duration = Duration::from_millis(200);
/// A side older than this is not used (the parent stopped answering).
pub const EXPIRE: Duration = Duration::from_secs(5);
/// Longest wait for a block from a sibling before asking the parent instead: a bound that
/// keep-alives cannot extend, so two nodes whose views of the tree disagree never wait on
/// each other for long.
pub const SIBLING_DEADLINE: Duration = Duration::from_secs(4);

/// Which half of the blocks this node fetches from a parent, and who has the other half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// 0: even block indices from the parent; 1: odd ones.
    pub side: u8,
    /// The sibling's peer server.
    pub sibling: SocketAddr,
}

impl Split {
    /// Whether block `index` is fetched from the parent (else from the sibling).
    pub fn owns(&self, index: usize) -> bool {
        index % 2 == self.side as usize
    }
}

#[derive(Default)]
struct Link {
    split: Option<Split>,
    answered: Option<Instant>,
    asking: bool,
}

/// This node's sides, one per parent it has (one per function tree it is in).
pub struct Siblings {
    /// This node's peer address, as its parent and sibling reach it.
    me: String,
    timeout: Duration,
    links: Mutex<HashMap<SocketAddr, Link>>,
}

impl Siblings {
    /// Sides for the node whose peer server others reach at `me`; a hello gives up after
    /// `timeout`.
    pub fn new(me: String, timeout: Duration) -> Arc<Siblings> {
        Arc::new(Siblings {
            me,
            timeout,
            links: Mutex::new(HashMap::new()),
        })
    }

    /// The split with `parent`, if it answered lately; asks it again in the background when
    /// the answer is older than [`REFRESH`]. Must be called within a tokio runtime.
    pub fn split(self: &Arc<Self>, parent: SocketAddr) -> Option<Split> {
        let mut links = self.links.lock().unwrap();
        let link = links.entry(parent).or_default();
        let age = link.answered.map(|t| t.elapsed());
        let refresh = if link.split.is_some() {
            REFRESH
        } else {
            REFRESH_ALONE
        };
        if !link.asking && age.is_none_or(|a| a >= refresh) {
            link.asking = true;
            let me = self.clone();
            tokio::spawn(async move {
                let answer = me.hello(parent).await;
                let mut links = me.links.lock().unwrap();
                let link = links.entry(parent).or_default();
                link.asking = false;
                link.answered = Some(Instant::now());
                link.split = match answer {
                    Ok(split) => split,
                    Err(e) => {
                        debug!(%parent, error = %e, "hello to the parent failed");
                        None
                    }
                };
            });
        }
        match age {
            Some(a) if a < EXPIRE => link.split,
            _ => None,
        }
    }

    /// Whether this node fetches block `index` from `parent` itself: without a split, every
    /// block.
    pub fn owns(self: &Arc<Self>, parent: SocketAddr, index: usize) -> bool {
        self.split(parent).is_none_or(|s| s.owns(index))
    }

    /// Stops using the split with `parent` until the next answer (the sibling failed).
    pub fn forget(&self, parent: SocketAddr) {
        if let Some(link) = self.links.lock().unwrap().get_mut(&parent) {
            link.split = None;
        }
    }

    async fn hello(&self, parent: SocketAddr) -> Result<Option<Split>, String> {
        let peer = PeerSource::new(parent, self.timeout);
        let payload = tokio::time::timeout(self.timeout, peer.hello(&self.me))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let answer = HelloAnswer::decode(&payload).map_err(|e| e.0)?;
        match answer.split {
            None => Ok(None),
            Some((side, sibling)) => sibling
                .parse()
                .map(|sibling| Some(Split { side, sibling }))
                .map_err(|_| format!("sibling address {sibling:?}")),
        }
    }
}

/// A parent's record of its children, from their hellos: the two that said hello first (and
/// keep saying it) get the two sides.
#[derive(Default)]
pub struct Children {
    /// Peer address and last hello, oldest first.
    seen: Mutex<Vec<(String, Instant)>>,
}

/// A child that has not said hello for this long is dropped (it left, or its parent changed).
pub const CHILD_TTL: Duration = Duration::from_secs(4);

impl Children {
    /// Records a hello from the child at `addr` and answers it.
    pub fn hello(&self, addr: &str) -> HelloAnswer {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap();
        seen.retain(|(_, t)| now.duration_since(*t) < CHILD_TTL);
        match seen.iter_mut().find(|(a, _)| a == addr) {
            Some(entry) => entry.1 = now,
            None => seen.push((addr.to_string(), now)),
        }
        let pos = seen.iter().position(|(a, _)| a == addr);
        let split = match (pos, seen.len()) {
            (Some(p), n) if p < 2 && n >= 2 => Some((p as u8, seen[1 - p].0.clone())),
            _ => None,
        };
        HelloAnswer { split }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_children_get_opposite_sides_and_each_other() {
        let c = Children::default();
        assert_eq!(
            c.hello("a:1").split,
            None,
            "alone: everything from the parent"
        );
        assert_eq!(c.hello("b:1").split, Some((1, "a:1".to_string())));
        assert_eq!(c.hello("a:1").split, Some((0, "b:1".to_string())));
        // A third (a stale or extra child) gets no side; the first two keep theirs.
        assert_eq!(c.hello("c:1").split, None);
        assert_eq!(c.hello("b:1").split, Some((1, "a:1".to_string())));
    }

    #[test]
    fn sides_own_complementary_halves() {
        let sib: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (l, r) = (
            Split {
                side: 0,
                sibling: sib,
            },
            Split {
                side: 1,
                sibling: sib,
            },
        );
        for i in 0..64 {
            assert!(
                l.owns(i) != r.owns(i),
                "block {i} must have exactly one owner"
            );
        }
    }

    #[tokio::test]
    async fn a_child_learns_its_side_from_a_real_peer_server() {
        use super::super::{metrics::LazyMetrics, peer_server::PeerServer};
        let server = PeerServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(LazyMetrics::default()),
        )
        .await
        .unwrap();
        let parent = server.local_addr();
        let a = Siblings::new("127.0.0.1:7001".into(), Duration::from_secs(2));
        let b = Siblings::new("127.0.0.1:7002".into(), Duration::from_secs(2));
        let until = |s: &Arc<Siblings>, want: Option<u8>| {
            let s = s.clone();
            async move {
                for _ in 0..100 {
                    if s.split(parent).map(|x| x.side) == want {
                        return s.split(parent);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("no split {want:?}");
            }
        };
        // a alone: no split; then b joins and gets side 1 with a as sibling, and a side 0.
        let _ = a.split(parent);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sb = until(&b, Some(1)).await.unwrap();
        assert_eq!(sb.sibling.to_string(), "127.0.0.1:7001");
        let sa = until(&a, Some(0)).await.unwrap();
        assert_eq!(sa.sibling.to_string(), "127.0.0.1:7002");
        assert!(a.owns(parent, 0) && !a.owns(parent, 1));
        assert!(b.owns(parent, 1) && !b.owns(parent, 0));
    }
}
