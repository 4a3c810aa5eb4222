//! containerd's snapshots API on top of the [`Overlay`] core: the `Snapshotter` trait of
//! the containerd-snapshots crate, the remote-layer flow at Prepare (after
//! stargz-snapshotter), restoring remote snapshots at startup, and the gRPC server on a
//! unix socket.
//!
//! Remote-layer flow (stargz-snapshotter's `Prepare` → `prepareRemoteSnapshot` →
//! `commit`): containerd unpacks a layer by calling Prepare with the label
//! [`TARGET_SNAPSHOT_LABEL`] set to the name the layer will be committed as. We first
//! create the active snapshot as usual, then ask [`RemoteLayers::prepare_remote`] to mount
//! the layer at the snapshot's `fs` dir. If it does, we commit the snapshot under the
//! target name with [`REMOTE_LABEL`] and answer ALREADY_EXISTS: containerd then finds the
//! target committed and skips downloading and applying the layer. If anything fails, the
//! active snapshot is returned as usual and containerd unpacks the layer (fallback).

use std::{collections::HashMap, future::Future, path::Path, sync::Arc};

use containerd_snapshots::{api::types::Mount, Info, Usage as ApiUsage};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::{
    metadata::{Kind, Record},
    metrics::Metrics,
    snapshots::{Filters, Overlay},
    Error, RemoteLayers, Result, REMOTE_LABEL, REMOTE_LABEL_VALUE, TARGET_SNAPSHOT_LABEL,
};

/// The snapshots service: what the gRPC server calls.
#[derive(Clone)]
pub struct Service {
    core: Arc<Overlay>,
    remote: Arc<dyn RemoteLayers>,
    metrics: Arc<Metrics>,
}

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be set up.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn to_info(name: String, r: Record) -> Info {
    Info {
        kind: match r.kind {
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name,
        parent: r.parent,
        labels: r.labels,
        created_at: r.created,
        updated_at: r.updated,
    }
}

impl Service {
    /// A service over `core`, asking `remote` about layers that might be mounted lazily.
    pub fn new(core: Arc<Overlay>, remote: Arc<dyn RemoteLayers>, metrics: Arc<Metrics>) -> Self {
        Service {
            core,
            remote,
            metrics,
        }
    }

    /// The core.
    pub fn core(&self) -> &Arc<Overlay> {
        &self.core
    }

    /// Runs `f` on the core on a blocking thread: the core does synchronous file system
    /// and metadata work (fsyncs, directory scans) that must not stall the runtime.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Overlay) -> Result<T> + Send + 'static,
    {
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| Error::Internal(format!("snapshot worker: {e}")))?
    }

    /// Mounts every committed remote snapshot again (at startup: their FUSE mounts died
    /// with the previous process). Failures are logged and counted; a snapshot that
    /// cannot be restored stays in the metadata (containerd may remove it). Returns how
    /// many were restored.
    pub async fn restore_remote_snapshots(&self) -> Result<usize> {
        let remotes = self.blocking(|c| c.remote_snapshots()).await?;
        let mut restored = 0;
        for (name, record) in remotes {
            let mountpoint = self.core.upper_path(record.id);
            let detach = {
                let mp = mountpoint.clone();
                tokio::task::spawn_blocking(move || {
                    crate::snapshots::fsutil::detach_mounts_under(&mp)
                })
                .await
            };
            if let Ok(Err(e)) | Err(e) = detach.map_err(std::io::Error::other) {
                tracing::warn!(snapshot = %name, error = %e, "cannot detach stale mount of remote snapshot");
            }
            match self
                .remote
                .restore_remote(&name, &record.labels, &mountpoint)
                .await
            {
                Ok(()) => {
                    restored += 1;
                    tracing::info!(snapshot = %name, mountpoint = %mountpoint.display(), "restored remote snapshot");
                }
                Err(e) => {
                    self.metrics.remote_restore_failures.inc();
                    tracing::warn!(snapshot = %name, error = %format!("{e:#}"), "cannot restore remote snapshot; containers using it will fail until it is removed and pulled again");
                }
            }
        }
        Ok(restored)
    }

    /// Prepare, with the remote-layer flow.
    async fn prepare_inner(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.metrics.prepares.inc();
        let (snapshot, mounts) = {
            let (key, parent, labels) = (key.clone(), parent.clone(), labels.clone());
            self.blocking(move |c| c.create(Kind::Active, &key, &parent, labels))
                .await?
        };
        if let Some(target) = labels.get(TARGET_SNAPSHOT_LABEL) {
            let mountpoint = self.core.upper_path(snapshot.id);
            if self.try_remote(&key, target, &labels, &mountpoint).await {
                return Err(Error::AlreadyExists(format!("target snapshot {target}")));
            }
        }
        Ok(mounts)
    }

    /// Tries to make active snapshot `key` a remote snapshot committed as `target`.
    /// Returns true if `target` now exists (so Prepare answers ALREADY_EXISTS); false to
    /// take the ordinary path, with nothing left mounted at `mountpoint`.
    async fn try_remote(
        &self,
        key: &str,
        target: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> bool {
        match self.remote.prepare_remote(key, labels, mountpoint).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                self.metrics.remote_fallbacks.inc();
                tracing::warn!(key, target, error = %format!("{e:#}"), "remote layer: cannot mount lazily, falling back to unpacking");
                self.detach(mountpoint).await;
                return false;
            }
        }
        let mut commit_labels = labels.clone();
        commit_labels.insert(REMOTE_LABEL.into(), REMOTE_LABEL_VALUE.into());
        let committed = {
            let (target, key) = (target.to_string(), key.to_string());
            self.blocking(move |c| c.commit_remote(&target, &key, commit_labels))
                .await
        };
        match committed {
            Ok(_) => {
                self.metrics.remote_prepares.inc();
                tracing::info!(key, target, "remote layer: committed as a remote snapshot");
                true
            }
            Err(Error::AlreadyExists(_)) => {
                // Another Prepare committed the same layer first: ours is redundant.
                tracing::info!(
                    key,
                    target,
                    "remote layer: target appeared meanwhile, dropping this copy"
                );
                self.remove_inner(key.to_string(), true).await.ok();
                true
            }
            Err(e) => {
                self.metrics.remote_fallbacks.inc();
                tracing::warn!(key, target, error = %e, "remote layer: cannot commit, falling back to unpacking");
                if let Err(e) = self.remote.remove_remote(key, labels, mountpoint).await {
                    tracing::warn!(key, error = %format!("{e:#}"), "remote layer: unmount after failed commit");
                }
                self.detach(mountpoint).await;
                false
            }
        }
    }

    /// Detaches whatever is mounted at or below `mountpoint`, logging failures.
    async fn detach(&self, mountpoint: &Path) {
        let mp = mountpoint.to_path_buf();
        let result =
            tokio::task::spawn_blocking(move || crate::snapshots::fsutil::detach_mounts_under(&mp))
                .await;
        if let Ok(Err(e)) | Err(e) = result.map_err(std::io::Error::other) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "cannot detach");
        }
    }

    /// Remove: metadata first, then (remote snapshots) the lazy path's unmount, then the
    /// directory. `remote_hint` forces the unmount call for an active snapshot the lazy
    /// path has mounted but that was not committed.
    async fn remove_inner(&self, key: String, remote_hint: bool) -> Result<()> {
        let record = {
            let key = key.clone();
            self.blocking(move |c| c.remove(&key)).await?
        };
        if record.remote || remote_hint {
            let mountpoint = self.core.upper_path(record.id);
            if let Err(e) = self
                .remote
                .remove_remote(&key, &record.labels, &mountpoint)
                .await
            {
                tracing::warn!(snapshot = %key, error = %format!("{e:#}"), "remote layer: unmount on remove");
            }
        }
        let id = record.id;
        // The record is gone: a failure to delete the directory leaves an orphan for
        // Cleanup, it does not fail the Remove (as in containerd).
        if let Err(e) = self.blocking(move |c| c.delete_dir(id)).await {
            tracing::warn!(snapshot = %key, error = %e, "cannot delete snapshot directory; Cleanup will retry");
        }
        Ok(())
    }

    /// Counts and logs a failed request.
    fn count<T>(&self, op: &str, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.metrics.error(op, e.code());
            tracing::debug!(op, error = %e, "request failed");
        }
        r
    }
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = Error;

    async fn stat(&self, key: String) -> Result<Info> {
        let r = self
            .blocking(move |c| c.stat(&key).map(|r| to_info(key, r)))
            .await;
        self.count("stat", r)
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        let r = self
            .blocking(move |c| {
                let paths = fieldpaths.unwrap_or_default();
                c.update(&info.name, &info.labels, &paths)
                    .map(|r| to_info(info.name, r))
            })
            .await;
        self.count("update", r)
    }

    async fn usage(&self, key: String) -> Result<ApiUsage> {
        let r = self
            .blocking(move |c| {
                c.usage(&key).map(|u| ApiUsage {
                    inodes: u.inodes,
                    size: u.size,
                })
            })
            .await;
        self.count("usage", r)
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>> {
        let r = self.blocking(move |c| c.mounts(&key)).await;
        self.count("mounts", r)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let r = self.prepare_inner(key, parent, labels).await;
        self.count("prepare", r)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.metrics.views.inc();
        let r = self
            .blocking(move |c| c.create(Kind::View, &key, &parent, labels).map(|(_, m)| m))
            .await;
        self.count("view", r)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.metrics.commits.inc();
        let r = self
            .blocking(move |c| c.commit(&name, &key, labels).map(|_| ()))
            .await;
        self.count("commit", r)
    }

    async fn remove(&self, key: String) -> Result<()> {
        self.metrics.removes.inc();
        let r = self.remove_inner(key, false).await;
        self.count("remove", r)
    }

    async fn clear(&self) -> Result<()> {
        let r = self.blocking(|c| c.cleanup().map(|_| ())).await;
        self.count("cleanup", r)
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info>>>;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream> {
        let r = self
            .blocking(move |c| {
                let filters = Filters::parse(&filters)?;
                c.list(&filters)
            })
            .await;
        let infos = self.count("list", r)?;
        Ok(futures::stream::iter(
            infos
                .into_iter()
                .map(|(name, r)| Ok(to_info(name, r)))
                .collect::<Vec<_>>(),
        ))
    }
}

/// Serves `service` on the unix socket `socket` until `shutdown` completes. The socket's
/// directory is created; a stale socket file is replaced (a live one is an error); the
/// file is removed on exit.
pub async fn serve(
    service: Service,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
) -> std::result::Result<(), ServeError> {
    let sock_err = |source| ServeError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    // Replace a stale socket file, but never steal the socket of a live server.
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(sock_err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is serving on this socket",
        )));
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(sock_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(socket).map_err(sock_err)?;
    tracing::info!(socket = %socket.display(), "serving containerd snapshots API");
    let result = tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(service)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.map_err(ServeError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_snapshots::Snapshotter as _;
    use std::sync::Mutex;

    /// A lazy path that "mounts" by writing a marker file, and records its calls.
    #[derive(Default)]
    struct FakeRemote {
        accept: bool,
        fail: bool,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl RemoteLayers for FakeRemote {
        async fn prepare_remote(
            &self,
            key: &str,
            labels: &HashMap<String, String>,
            mountpoint: &Path,
        ) -> anyhow::Result<bool> {
            self.calls.lock().unwrap().push(format!("prepare {key}"));
            if self.fail {
                anyhow::bail!("registry unreachable");
            }
            if !self.accept || !labels.contains_key("faasnet/layer") {
                return Ok(false);
            }
            std::fs::write(mountpoint.join("marker"), b"lazy")?;
            Ok(true)
        }
        async fn restore_remote(
            &self,
            key: &str,
            _labels: &HashMap<String, String>,
            mountpoint: &Path,
        ) -> anyhow::Result<()> {
            assert!(mountpoint.is_dir());
            self.calls.lock().unwrap().push(format!("restore {key}"));
            Ok(())
        }
        async fn remove_remote(
            &self,
            key: &str,
            _labels: &HashMap<String, String>,
            _mountpoint: &Path,
        ) -> anyhow::Result<()> {
            self.calls.lock().unwrap().push(format!("remove {key}"));
            Ok(())
        }
    }

    fn service(root: &Path, remote: Arc<FakeRemote>) -> Service {
        Service::new(
            Arc::new(Overlay::open(root).unwrap()),
            remote,
            Arc::new(Metrics::new()),
        )
    }

    fn unpack_labels(target: &str, remote: bool) -> HashMap<String, String> {
        let mut l = HashMap::from([(TARGET_SNAPSHOT_LABEL.to_string(), target.to_string())]);
        if remote {
            l.insert("faasnet/layer".into(), "sha256:abc".into());
        }
        l
    }

    #[tokio::test]
    async fn remote_layer_is_committed_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let remote = Arc::new(FakeRemote {
            accept: true,
            ..Default::default()
        });
        let svc = service(&root, remote.clone());
        let err = svc
            .prepare(
                "extract-1 chain1".into(),
                "".into(),
                unpack_labels("chain1", true),
            )
            .await
            .unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
        let info = svc.stat("chain1".into()).await.unwrap();
        assert_eq!(info.kind, containerd_snapshots::Kind::Committed);
        assert_eq!(info.labels[REMOTE_LABEL], REMOTE_LABEL_VALUE);
        assert!(
            svc.stat("extract-1 chain1".into()).await.is_err(),
            "key consumed"
        );
        assert_eq!(svc.metrics.remote_prepares.get(), 1);

        // A layer on top of it uses its mountpoint as lowerdir.
        let mounts = svc
            .prepare("c1".into(), "chain1".into(), HashMap::new())
            .await
            .unwrap();
        let id = svc.core.stat("chain1").unwrap().id;
        let lower = svc.core.upper_path(id);
        assert_eq!(mounts[0].r#type, "overlay");
        assert!(mounts[0]
            .options
            .contains(&format!("lowerdir={}", lower.display())));
        svc.remove("c1".into()).await.unwrap();
        drop(svc);

        // Restart: restore_remote for the committed remote snapshot.
        let svc = service(&root, remote.clone());
        assert_eq!(svc.restore_remote_snapshots().await.unwrap(), 1);
        svc.remove("chain1".into()).await.unwrap();
        assert_eq!(
            *remote.calls.lock().unwrap(),
            vec![
                "prepare extract-1 chain1",
                "restore chain1",
                "remove chain1"
            ]
        );
        assert!(!lower.exists());
    }

    #[tokio::test]
    async fn ordinary_layers_and_failures_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(FakeRemote {
            accept: true,
            ..Default::default()
        });
        let svc = service(&dir.path().join("a"), remote);
        // No remote labels: the lazy path declines, the ordinary path is taken.
        let m = svc
            .prepare("k".into(), "".into(), unpack_labels("c", false))
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(svc.metrics.remote_fallbacks.get(), 0);

        let failing = Arc::new(FakeRemote {
            fail: true,
            ..Default::default()
        });
        let svc = service(&dir.path().join("b"), failing);
        let m = svc
            .prepare("k".into(), "".into(), unpack_labels("c", true))
            .await
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(svc.metrics.remote_fallbacks.get(), 1);
        svc.commit("c".into(), "k".into(), HashMap::new())
            .await
            .unwrap();
        assert!(!svc
            .stat("c".into())
            .await
            .unwrap()
            .labels
            .contains_key(REMOTE_LABEL));
    }

    #[tokio::test]
    async fn second_prepare_of_same_layer_reports_exists() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(FakeRemote {
            accept: true,
            ..Default::default()
        });
        let svc = service(&dir.path().join("r"), remote);
        // The target was committed meanwhile (e.g. an ordinary unpack finished first).
        svc.prepare("x".into(), "".into(), HashMap::new())
            .await
            .unwrap();
        svc.commit("chain".into(), "x".into(), HashMap::new())
            .await
            .unwrap();
        let err = svc
            .prepare(
                "extract-2 chain".into(),
                "".into(),
                unpack_labels("chain", true),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)));
        assert!(
            svc.stat("extract-2 chain".into()).await.is_err(),
            "redundant copy removed"
        );
    }
}
