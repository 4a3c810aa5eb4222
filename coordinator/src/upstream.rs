//! What the coordinator tells a VM: where to read its image blocks from.

use std::fmt;

/// Where a VM reads its blocks from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The VM is the root of its tree: read the registry.
    Registry,
    /// Read from this peer (the VM's parent in the tree).
    Peer {
        /// The parent's node id.
        node_id: String,
        /// The parent's peer address, as it gave it when joining.
        addr: String,
    },
}

/// A VM's upstream at a given tree epoch.
///
/// `epoch` is the tree's change counter, persisted and bumped on every change to the
/// tree. Between two answers about the same tree, the one with the higher epoch is the
/// newer; an answer with a lower epoch than one already seen is stale and must be ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// Tree epoch this answer reflects.
    pub epoch: u64,
    /// Where to read from.
    pub source: Source,
    /// Where to read the second stripe (odd blocks) from: the VM's parent in the second
    /// stripe tree ([`crate::stripe_tree`]); `None` from a coordinator without one.
    pub second: Option<Source>,
}

impl Upstream {
    /// True when the VM is the root and reads the registry.
    pub fn is_root(&self) -> bool {
        matches!(self.source, Source::Registry)
    }

    /// The parent's peer address, if the VM is not the root.
    pub fn peer_addr(&self) -> Option<&str> {
        match &self.source {
            Source::Registry => None,
            Source::Peer { addr, .. } => Some(addr),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registry => write!(f, "registry (root)"),
            Source::Peer { node_id, addr } => write!(f, "peer {node_id} at {addr}"),
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(second) = &self.second {
            write!(f, ", second stripe {second}")?;
        }
        write!(f, " @ epoch {}", self.epoch)
    }
}

/// Identifies one function tree: the tenant and the converted image's manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TreeKey {
    /// Tenant that owns the function.
    pub tenant: String,
    /// Manifest digest of the converted image, e.g. `sha256:<64 hex>`.
    pub function: String,
}

impl TreeKey {
    /// Builds a key.
    pub fn new(tenant: impl Into<String>, function: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            function: function.into(),
        }
    }
}

impl fmt::Display for TreeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.function)
    }
}

fn pb_peer(node_id: &str, addr: &str) -> crate::pb::Peer {
    crate::pb::Peer {
        node_id: node_id.to_string(),
        addr: addr.to_string(),
    }
}

impl From<&Upstream> for crate::pb::Upstream {
    fn from(u: &Upstream) -> Self {
        use crate::pb::second_upstream::Source as S2;
        use crate::pb::upstream::Source as S;
        crate::pb::Upstream {
            epoch: u.epoch,
            source: Some(match &u.source {
                Source::Registry => S::Root(crate::pb::Root {}),
                Source::Peer { node_id, addr } => S::Peer(pb_peer(node_id, addr)),
            }),
            second: u.second.as_ref().map(|s| crate::pb::SecondUpstream {
                source: Some(match s {
                    Source::Registry => S2::Root(crate::pb::Root {}),
                    Source::Peer { node_id, addr } => S2::Peer(pb_peer(node_id, addr)),
                }),
            }),
        }
    }
}

impl TryFrom<crate::pb::Upstream> for Upstream {
    type Error = String;

    fn try_from(u: crate::pb::Upstream) -> Result<Self, Self::Error> {
        use crate::pb::upstream::Source as S;
        let source = match u.source {
            Some(S::Root(_)) => Source::Registry,
            Some(S::Peer(p)) => Source::Peer {
                node_id: p.node_id,
                addr: p.addr,
            },
            None => return Err("upstream without a source".into()),
        };
        use crate::pb::second_upstream::Source as S2;
        let second = match u.second.map(|s| s.source) {
            None => None,
            Some(Some(S2::Root(_))) => Some(Source::Registry),
            Some(Some(S2::Peer(p))) => Some(Source::Peer {
                node_id: p.node_id,
                addr: p.addr,
            }),
            Some(None) => return Err("second stripe upstream without a source".into()),
        };
        Ok(Upstream {
            epoch: u.epoch,
            source,
            second,
        })
    }
}
