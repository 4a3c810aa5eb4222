//! FaaSNet snapshotter: a containerd proxy snapshotter.
//!
//! Ordinary layers are handled exactly like containerd's overlayfs snapshotter
//! ([`snapshots::Overlay`]); layers that a [`RemoteLayers`] implementation can mount
//! lazily (the FaaSNet block format, fed down the function tree) are committed as
//! *remote snapshots* at Prepare time, the way stargz-snapshotter does it, so that
//! containerd skips downloading and unpacking them.
//!
//! Module map:
//! - [`config`]: the daemon's TOML configuration (all tables, including the lazy path's).
//! - [`metadata`]: snapshot records in sled (kinds, parent chains, labels, times, usage).
//! - [`snapshots`]: the overlay snapshotter core: directories, mounts, crash-safe ordering.
//! - [`service`]: the containerd `Snapshotter` trait on top of the core, the remote-layer
//!   flow, and the gRPC server on a unix socket.
//! - [`metrics`]: the Prometheus registry and its HTTP endpoint.

use std::{collections::HashMap, path::Path};

use async_trait::async_trait;

pub mod config;
pub mod lazy;
pub mod metadata;
pub mod metrics;
pub mod service;
pub mod snapshots;

/// Label containerd sets on Prepare during unpack: the name the layer will be committed as
/// (its chain ID). Its presence is what makes a Prepare a candidate for a remote snapshot.
pub const TARGET_SNAPSHOT_LABEL: &str = "containerd.io/snapshot.ref";

/// Label put on a snapshot committed from a remote (lazily mounted) layer, as
/// stargz-snapshotter does; tools can tell remote snapshots apart by it.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// Value of [`REMOTE_LABEL`].
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";

/// Decides, at Prepare time, whether a layer can be mounted lazily instead of unpacked.
///
/// This is the seam between the ordinary snapshotter and the lazy path (FUSE filesystem,
/// block cache, block sources, peer server). The snapshotter owns the metadata and the
/// directories; an implementation only mounts and unmounts filesystems at the
/// `mountpoint` it is handed (always `<root>/snapshots/<id>/fs`, an existing empty
/// directory on first mount). That directory is then used as an overlay lowerdir like
/// any other committed layer.
#[async_trait]
pub trait RemoteLayers: Send + Sync {
    /// Called on Prepare when labels carry [`TARGET_SNAPSHOT_LABEL`] (the target committed
    /// key), with all the labels of the Prepare request (remote-layer labels included).
    ///
    /// Returns `Ok(true)` if the layer is now mounted at `mountpoint` and ready to be
    /// committed as a remote snapshot; `Ok(false)` to take the ordinary path (containerd
    /// downloads and unpacks the layer into the returned mounts). `Err` is logged and
    /// treated as `Ok(false)` (fallback); the implementation must leave nothing mounted
    /// at `mountpoint` in that case.
    async fn prepare_remote(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<bool>;

    /// Called on startup for each committed remote snapshot, to mount it again.
    ///
    /// `key` is the committed name; `labels` are the snapshot's current labels (those of
    /// the Prepare request that created it, plus [`REMOTE_LABEL`], plus any later Update).
    /// Any stale mount left at `mountpoint` by a previous process has been detached.
    async fn restore_remote(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<()>;

    /// Called when a remote snapshot is removed (after its metadata is gone, before its
    /// directory is deleted). Errors are logged; the snapshotter detaches whatever is
    /// still mounted at `mountpoint` before deleting the directory.
    async fn remove_remote(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<()>;
}

/// The [`RemoteLayers`] of a snapshotter without a lazy path: every layer takes the
/// ordinary path.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRemoteLayers;

#[async_trait]
impl RemoteLayers for NoRemoteLayers {
    async fn prepare_remote(
        &self,
        _key: &str,
        _labels: &HashMap<String, String>,
        _mountpoint: &Path,
    ) -> anyhow::Result<bool> {
        Ok(false)
    }

    async fn restore_remote(
        &self,
        key: &str,
        _labels: &HashMap<String, String>,
        _mountpoint: &Path,
    ) -> anyhow::Result<()> {
        anyhow::bail!("remote snapshot {key}: this snapshotter has no lazy path to mount it")
    }

    async fn remove_remote(
        &self,
        _key: &str,
        _labels: &HashMap<String, String>,
        _mountpoint: &Path,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Errors of snapshot operations. Each variant maps to the gRPC code containerd's
/// `errdefs.FromGRPC` turns back into the matching `errdefs` error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or its parent) does not exist: `NOT_FOUND`.
    #[error("{0}: not found")]
    NotFound(String),
    /// The key or name is taken: `ALREADY_EXISTS`.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the operation (e.g. has children, is not
    /// active): `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is wrong (e.g. an immutable field path, a bad filter):
    /// `INVALID_ARGUMENT`.
    #[error("{0}")]
    InvalidArgument(String),
    /// The metadata store failed: `INTERNAL`.
    #[error("metadata store: {0}")]
    Metadata(#[from] sled::Error),
    /// A metadata record could not be decoded: `INTERNAL`.
    #[error("metadata record {key}: {source}")]
    Corrupt {
        /// Snapshot key of the record.
        key: String,
        /// Decoding error.
        source: serde_json::Error,
    },
    /// A filesystem operation failed: `INTERNAL`.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Anything else (e.g. a worker task panicked): `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code containerd expects for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::Metadata(_) | Error::Corrupt { .. } | Error::Io { .. } | Error::Internal(_) => {
                tonic::Code::Internal
            }
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result of snapshot operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code(), err.to_string())
    }
}
