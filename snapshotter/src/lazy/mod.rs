//! The lazy path: converted layers (the FaaSNet block format) mounted read-only through FUSE,
//! their blocks fetched on demand and fed down the function tree.
//!
//! Data flow of one block read (docs/lazy.md has the full picture):
//!
//! ```text
//! FUSE read ──► BlockStore (memory LRU ─► disk BlockCache ─► single-flight fetch)
//!                                                              │
//!                                     FetchChain: upstream peer ─► registry (fallback)
//! peer child ──► PeerServer ──► BlockStore (same single flight: a block a child asks for
//!                                while we fetch it is sent as soon as it is whole)
//! ```
//!
//! Module map:
//! - [`peer_protocol`]: the binary block request/response of the peer protocol (pure).
//! - [`block_source`]: the [`block_source::BlockSource`] trait, the upstream of a node in a
//!   function tree ([`block_source::UpstreamProvider`]) and the [`block_source::FetchChain`]
//!   that orders the sources.
//! - [`registry_source`]: blocks (and the TOC) from an OCI registry by HTTP range requests.
//! - [`peer_source`]: blocks from the upstream peer over TCP.
//! - [`block_cache`]: the on-disk cache of stored blocks with a persisted bitmap and a quota.
//! - [`block_store`]: one layer's blocks: memory LRU, disk cache, single-flight fetches.
//! - [`fuse_fs`]: the read-only FUSE filesystem of one layer, and [`fuse_fs::LayerMount`].
//! - [`fuse_handover`]: FUSE connections kept by a holder process across restarts.
//! - [`peer_link`]: bounds on a peer connection whose other end went silent.
//! - [`peer_server`]: serves the blocks of registered layers to child nodes.
//! - [`prefetch`]: background fetch of a whole layer, and the record of access order.
//! - [`layer_manager`]: ties the above together per layer (mount, register, prefetch).
//! - [`remote`]: the snapshotter's [`crate::RemoteLayers`] seam on top of the manager.
//! - [`metrics`]: Prometheus metrics of all of the above.

use std::fmt;

pub mod block_cache;
pub mod block_source;
pub mod block_store;
pub mod follow;
pub mod function_trees;
pub mod fuse_fs;
pub mod fuse_handover;
pub mod layer_manager;
pub mod metrics;
pub mod peer_link;
pub mod peer_protocol;
pub mod peer_server;
pub mod peer_source;
pub mod prefetch;
pub mod registry_source;
pub mod remote;
pub mod sibling;
pub mod start_order;

pub use block_source::{FetchChain, StaticUpstream, Upstream, UpstreamProvider};
pub use layer_manager::{LayerManager, LayerOptions};
pub use metrics::LazyMetrics;
pub use remote::LazyRemoteLayers;

/// One converted layer blob in a registry: where to fetch it and its identity.
///
/// The blob digest is the key everywhere (cache directory, peer protocol): two images that
/// share a layer share its cache and can feed each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayerRef {
    /// Registry host (`host` or `host:port`), as in the image reference.
    pub registry: String,
    /// Repository in the registry (`library/busybox`).
    pub repository: String,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
}

impl LayerRef {
    /// A layer reference; `digest` must look like `sha256:<64 hex>`.
    pub fn new(
        registry: impl Into<String>,
        repository: impl Into<String>,
        digest: impl Into<String>,
    ) -> Result<Self> {
        let r = LayerRef {
            registry: registry.into(),
            repository: repository.into(),
            digest: digest.into(),
        };
        if !is_sha256_digest(&r.digest) {
            return Err(LazyError::InvalidInput(format!(
                "layer digest {:?} is not sha256:<64 hex digits>",
                r.digest
            )));
        }
        Ok(r)
    }

    /// The hex part of the digest (safe as a file name: checked at construction).
    pub fn digest_hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

impl fmt::Display for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.registry, self.repository, self.digest)
    }
}

/// `sha256:` followed by 64 lowercase or uppercase hex digits.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Where a block came from; a label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The in-memory LRU or the on-disk cache of this node.
    Cache,
    /// The upstream peer in the function tree.
    Peer,
    /// The registry.
    Registry,
}

impl Source {
    /// Lowercase name, as used in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Peer => "peer",
            Source::Registry => "registry",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the lazy path. Each names what failed and, where it helps, with what.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// Local file I/O (cache files, mountpoints).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The blob is not in the FaaSNet format, or its TOC or a block is malformed.
    #[error("{layer}: {source}")]
    Format {
        /// The layer (digest or reference).
        layer: String,
        /// The format error.
        source: faasnet_format::FormatError,
    },
    /// A block's bytes do not match the digest in the TOC.
    #[error("{layer} block {index}: digest mismatch from {source_name} (expected {expected}, got {actual})")]
    DigestMismatch {
        /// The layer digest.
        layer: String,
        /// Block index.
        index: usize,
        /// Where the bytes came from.
        source_name: &'static str,
        /// Digest in the TOC.
        expected: String,
        /// Digest of what was received.
        actual: String,
    },
    /// An HTTP request to the registry failed or got an unexpected answer.
    #[error("registry {url}: {reason}")]
    Registry {
        /// The URL requested.
        url: String,
        /// What went wrong (status, transport error).
        reason: String,
    },
    /// A peer failed, answered with an error status or spoke the protocol wrong.
    #[error("peer {peer}: {reason}")]
    Peer {
        /// The peer address.
        peer: String,
        /// What went wrong.
        reason: String,
    },
    /// A peer made no progress within the stall timeout.
    #[error("peer {peer}: no progress for {timeout_ms} ms")]
    PeerStalled {
        /// The peer address.
        peer: String,
        /// The stall timeout.
        timeout_ms: u64,
    },
    /// A fetch took longer than its timeout.
    #[error("{what}: timed out after {timeout_ms} ms")]
    Timeout {
        /// What was being fetched.
        what: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// A peer-protocol message is malformed.
    #[error("peer protocol: {0}")]
    Protocol(String),
    /// The layer is not registered (peer server) or not known (manager).
    #[error("unknown layer {0}")]
    UnknownLayer(String),
    /// A block index beyond the layer's block table.
    #[error("{layer}: block {index} out of range ({count} blocks)")]
    BlockOutOfRange {
        /// The layer digest.
        layer: String,
        /// Requested index.
        index: usize,
        /// Number of blocks.
        count: usize,
    },
    /// Mounting or unmounting the FUSE filesystem failed.
    #[error("mount {mountpoint}: {reason}")]
    Mount {
        /// The mountpoint.
        mountpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// Bad input (labels, references, configuration).
    #[error("{0}")]
    InvalidInput(String),
    /// A fetch shared by several readers failed; every reader gets this copy of the error.
    #[error("{0}")]
    Shared(std::sync::Arc<LazyError>),
}

impl LazyError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LazyError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a format error with the layer it concerns.
    pub fn format(layer: impl fmt::Display, source: faasnet_format::FormatError) -> Self {
        LazyError::Format {
            layer: layer.to_string(),
            source,
        }
    }

    /// True when the error says the blob is not in our format (take the ordinary path).
    pub fn is_not_our_format(&self) -> bool {
        match self {
            LazyError::Format { source, .. } => {
                matches!(source, faasnet_format::FormatError::BadFooter(_))
            }
            LazyError::Shared(e) => e.is_not_our_format(),
            _ => false,
        }
    }
}

/// Result of the lazy path.
pub type Result<T, E = LazyError> = std::result::Result<T, E>;
