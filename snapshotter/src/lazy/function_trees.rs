//! Upstreams from the coordinator's function trees.
//!
//! This VM joins the tree of every image (function) it mounts lazily, follows the parent the
//! coordinator assigns, and leaves the tree when the image's last lazily mounted layer is
//! removed. The coordinator is off the critical path: the last known upstream stays in use
//! while it is unreachable, and a failed parent only means registry fallbacks until the
//! coordinator answers again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use faasnet_coordinator::client::{CoordinatorClient, MembershipOptions, TreeMembership};
use faasnet_coordinator::{Source, Upstream as TreeAnswer};
use tokio::sync::watch;
use tracing::{info, warn};

use super::block_source::{Upstream, UpstreamProvider};

/// Errors joining a tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    // Boxed: the client error is large and this travels on every join.
    #[error("coordinator: {0}")]
    Coordinator(#[from] Box<faasnet_coordinator::client::ClientError>),
    #[error("coordinator config: {0}")]
    Config(String),
}

/// This VM's memberships in function trees, one per image it has mounted lazily.
pub struct FunctionTrees {
    client: CoordinatorClient,
    node_id: String,
    peer_addr: String,
    options: MembershipOptions,
    trees: tokio::sync::Mutex<HashMap<String, TreeUse>>,
}

struct TreeUse {
    upstream: Arc<TreeUpstream>,
    mounts: HashSet<PathBuf>,
}

impl FunctionTrees {
    /// Talks to the coordinator at `endpoint` as `tenant`; this VM is `node_id` and serves
    /// blocks to its children at `peer_addr`. Connects on first use, so a coordinator that
    /// is down at startup is no error.
    pub fn new(
        endpoint: &str,
        tenant: &str,
        token: &str,
        node_id: &str,
        peer_addr: &str,
    ) -> Result<Arc<Self>, TreeError> {
        if peer_addr.parse::<SocketAddr>().is_err() {
            return Err(TreeError::Config(format!(
                "peer address {peer_addr:?} must be ip:port reachable by other VMs \
                 (set lazy.peer_advertise)"
            )));
        }
        Ok(Arc::new(FunctionTrees {
            client: CoordinatorClient::connect_lazy(endpoint, tenant, token).map_err(Box::new)?,
            node_id: node_id.to_string(),
            peer_addr: peer_addr.to_string(),
            options: MembershipOptions::default(),
            trees: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The upstream in `function`'s tree for the layer mounted at `mountpoint`; joins the
    /// tree on first use.
    pub async fn acquire(
        &self,
        function: &str,
        mountpoint: &Path,
    ) -> Result<Arc<TreeUpstream>, TreeError> {
        let mut trees = self.trees.lock().await;
        if let Some(t) = trees.get_mut(function) {
            t.mounts.insert(mountpoint.to_path_buf());
            return Ok(t.upstream.clone());
        }
        let membership = TreeMembership::join(
            self.client.clone(),
            function,
            &self.node_id,
            &self.peer_addr,
            self.options.clone(),
        )
        .await
        .map_err(Box::new)?;
        info!(function, node = %self.node_id, upstream = %membership.upstream(), "joined function tree");
        let upstream = Arc::new(TreeUpstream {
            function: function.to_string(),
            rx: membership.subscribe(),
            membership: Mutex::new(Some(Arc::new(membership))),
            reporting: Arc::new(AtomicBool::new(false)),
        });
        trees.insert(
            function.to_string(),
            TreeUse {
                upstream: upstream.clone(),
                mounts: HashSet::from([mountpoint.to_path_buf()]),
            },
        );
        Ok(upstream)
    }

    /// The layer at `mountpoint` is gone; leaves the trees it was the last user of.
    pub async fn release(&self, mountpoint: &Path) {
        let mut trees = self.trees.lock().await;
        let emptied: Vec<String> = trees
            .iter_mut()
            .filter_map(|(f, t)| {
                (t.mounts.remove(mountpoint) && t.mounts.is_empty()).then(|| f.clone())
            })
            .collect();
        for function in emptied {
            if let Some(t) = trees.remove(&function) {
                t.upstream.leave().await;
            }
        }
    }
}

/// The upstream of this VM in one function tree, kept current by the coordinator's watch.
pub struct TreeUpstream {
    function: String,
    rx: watch::Receiver<TreeAnswer>,
    /// `None` once the tree was left.
    membership: Mutex<Option<Arc<TreeMembership>>>,
    /// A failure report is in flight; later failures wait for its answer.
    reporting: Arc<AtomicBool>,
}

impl TreeUpstream {
    async fn leave(&self) {
        let membership = self.membership.lock().expect("membership lock").take();
        let Some(m) = membership else { return };
        match Arc::try_unwrap(m) {
            Ok(m) => match m.leave().await {
                Ok(()) => info!(function = %self.function, "left function tree"),
                // The lease expires anyway; the coordinator then re-attaches our children.
                Err(e) => warn!(function = %self.function, error = %e, "leaving the tree failed"),
            },
            // A failure report holds it for a moment; dropping stops the membership and
            // the lease expires.
            Err(_) => warn!(function = %self.function, "tree left by lease expiry"),
        }
    }
}

/// The coordinator's answer as a block-fetch upstream.
fn to_upstream(answer: &TreeAnswer) -> Upstream {
    source_to_upstream(&answer.source, answer.epoch)
}

fn source_to_upstream(source: &Source, epoch: u64) -> Upstream {
    match source {
        Source::Registry => Upstream::Root,
        Source::Peer { addr, .. } => match addr.parse() {
            Ok(addr) => Upstream::Peer { addr, epoch },
            // Validated by the coordinator on join; unreachable in practice.
            Err(_) => Upstream::Root,
        },
    }
}

impl UpstreamProvider for TreeUpstream {
    fn current(&self) -> Upstream {
        if self.membership.lock().expect("membership lock").is_none() {
            return Upstream::Root;
        }
        to_upstream(&self.rx.borrow())
    }

    fn second(&self) -> Option<Upstream> {
        if self.membership.lock().expect("membership lock").is_none() {
            return None;
        }
        let answer = self.rx.borrow();
        answer
            .second
            .as_ref()
            .map(|s| source_to_upstream(s, answer.epoch))
    }

    fn report_failure(&self, peer: SocketAddr) {
        let Some(m) = self.membership.lock().expect("membership lock").clone() else {
            return;
        };
        // Only a current parent is reported, in either stripe tree (the report names it by
        // id): if the coordinator already moved us elsewhere, the failure is old news.
        let Some(bad_node_id) = parent_id(&self.rx.borrow(), peer) else {
            return;
        };
        if self.reporting.swap(true, Ordering::AcqRel) {
            return;
        }
        let reporting = self.reporting.clone();
        let function = self.function.clone();
        tokio::spawn(async move {
            match m.report_bad_node(&bad_node_id).await {
                Ok(advice) => {
                    info!(%function, %peer, bad = %bad_node_id, upstream = %advice.upstream, "reported failed upstream")
                }
                Err(e) => {
                    warn!(%function, %peer, error = %e, "could not report failed upstream; keeping registry fallback")
                }
            }
            reporting.store(false, Ordering::Release);
        });
    }
}

/// The node id of the parent at `peer` in either stripe tree of `answer`, if it is one.
fn parent_id(answer: &TreeAnswer, peer: SocketAddr) -> Option<String> {
    [Some(&answer.source), answer.second.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|source| match source {
            Source::Peer { node_id, addr } if addr.parse() == Ok(peer) => Some(node_id.clone()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_peer_is_named_in_either_stripe_tree() {
        let peer = |id: &str, addr: &str| Source::Peer {
            node_id: id.into(),
            addr: addr.into(),
        };
        let answer = TreeAnswer {
            epoch: 4,
            source: peer("vm1", "10.0.0.1:7800"),
            second: Some(peer("vm5", "10.0.0.5:7800")),
        };
        let named = |addr: &str| parent_id(&answer, addr.parse().unwrap());
        assert_eq!(named("10.0.0.1:7800").as_deref(), Some("vm1"));
        assert_eq!(named("10.0.0.5:7800").as_deref(), Some("vm5"));
        assert_eq!(named("10.0.0.9:7800"), None, "not a parent: old news");
        let root = TreeAnswer {
            epoch: 4,
            source: Source::Registry,
            second: None,
        };
        assert_eq!(parent_id(&root, "10.0.0.1:7800".parse().unwrap()), None);
    }

    #[test]
    fn answers_map_to_upstreams() {
        let root = TreeAnswer {
            epoch: 3,
            source: Source::Registry,
            second: None,
        };
        assert_eq!(to_upstream(&root), Upstream::Root);
        let peer = TreeAnswer {
            epoch: 7,
            source: Source::Peer {
                node_id: "vm2".into(),
                addr: "10.0.0.2:7800".into(),
            },
            second: None,
        };
        assert_eq!(
            to_upstream(&peer),
            Upstream::Peer {
                addr: "10.0.0.2:7800".parse().unwrap(),
                epoch: 7
            }
        );
    }
}
