//! The snapshotter's [`RemoteLayers`] seam on top of the [`LayerManager`].
//!
//! Containerd passes the image reference and the layer digest as Prepare labels: either
//! stargz-snapshotter's (set by `ctr-remote images rpull` and by containerd's remote-snapshot
//! handlers) or CRI's (set by the CRI plugin when `snapshot_annotations` is on). A layer
//! whose blob has no FaaSNet footer takes the ordinary path (`Ok(false)`).

use std::{collections::HashMap, path::Path, sync::Arc};

use async_trait::async_trait;
use tracing::{debug, info};

use super::{
    block_source::{StaticUpstream, UpstreamProvider},
    function_trees::FunctionTrees,
    layer_manager::{LayerManager, LayerOptions},
    metrics::LazyMetrics,
    LayerRef, LazyError, Result,
};
use crate::RemoteLayers;

/// Image reference label (stargz-snapshotter / `ctr-remote images rpull`).
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Layer digest label (stargz-snapshotter).
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Comma-separated digests of the image's layers (stargz-snapshotter).
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// Layer blob size label, when present.
pub const STARGZ_SIZE: &str = "containerd.io/snapshot/remote/stargz.size";
/// Image reference label (CRI).
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Layer digest label (CRI).
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Comma-separated digests of the image's layers (CRI).
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// A parsed image reference: where the image's blobs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (`docker.io` for Docker Hub names).
    pub registry: String,
    /// Repository (`library/busybox` for `busybox`).
    pub repository: String,
    /// The reference as given.
    pub reference: String,
}

impl ImageRef {
    /// Parses `[registry/]repository[:tag][@digest]` the way containerd's reference docker
    /// normalization does.
    pub fn parse(reference: &str) -> Result<ImageRef> {
        let bad =
            |why: &str| LazyError::InvalidInput(format!("image reference {reference:?}: {why}"));
        let name = reference.split('@').next().unwrap_or_default();
        // A tag is after the last ':' that comes after the last '/'.
        let name = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => &name[..i],
            _ => name,
        };
        if name.is_empty() {
            return Err(bad("empty name"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            Some(_) => ("docker.io".to_string(), name.to_string()),
            None => ("docker.io".to_string(), format!("library/{name}")),
        };
        if repository.is_empty() || repository.split('/').any(str::is_empty) {
            return Err(bad("bad repository"));
        }
        Ok(ImageRef {
            registry,
            repository,
            reference: reference.to_string(),
        })
    }
}

/// What the labels of a Prepare say about the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteLayerLabels {
    /// The image.
    pub image: ImageRef,
    /// The layer.
    pub layer: LayerRef,
    /// Blob size, when a label gives it.
    pub blob_size: Option<u64>,
    /// Digests of all the image's layers, when a label gives them.
    pub image_layers: Vec<String>,
}

impl RemoteLayerLabels {
    /// Reads the labels; `Ok(None)` when they do not name a remote layer.
    pub fn parse(labels: &HashMap<String, String>) -> Result<Option<Self>> {
        let get = |a: &str, b: &str| labels.get(a).or_else(|| labels.get(b)).cloned();
        let (Some(reference), Some(digest)) = (
            get(STARGZ_REFERENCE, CRI_IMAGE_REF),
            get(STARGZ_DIGEST, CRI_LAYER_DIGEST),
        ) else {
            return Ok(None);
        };
        let image = ImageRef::parse(&reference)?;
        let layer = LayerRef::new(image.registry.clone(), image.repository.clone(), digest)?;
        let blob_size = labels.get(STARGZ_SIZE).and_then(|s| s.parse().ok());
        let image_layers = get(STARGZ_LAYERS, CRI_IMAGE_LAYERS)
            .map(|l| {
                l.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(RemoteLayerLabels {
            image,
            layer,
            blob_size,
            image_layers,
        }))
    }
}

/// Where the lazily mounted layers of an image get their blocks from, besides the cache.
#[derive(Clone)]
pub enum Upstreams {
    /// No function tree: every node reads the registry (on-demand loading).
    Registry,
    /// The coordinator's function trees: the tree's root reads the registry, every other
    /// node its parent.
    Trees(Arc<FunctionTrees>),
}

/// [`RemoteLayers`] backed by a [`LayerManager`].
pub struct LazyRemoteLayers {
    manager: Arc<LayerManager>,
    upstreams: Upstreams,
    /// Manifest digests already resolved, keyed by image reference and layer list: containerd
    /// prepares an image's layers one after another, and each would otherwise cost a registry
    /// round trip. A tag moved to another image comes with another layer list, so never hits.
    functions: std::sync::Mutex<HashMap<(String, Vec<String>), String>>,
}

impl LazyRemoteLayers {
    /// Over `manager`, with upstreams from `upstreams`.
    pub fn new(manager: Arc<LayerManager>, upstreams: Upstreams) -> Self {
        LazyRemoteLayers {
            manager,
            upstreams,
            functions: Default::default(),
        }
    }

    /// The daemon's lazy path from its configuration: `[lazy]` for the cache and peer
    /// server, `[coordinator]` for the function trees (none configured: registry only).
    /// Register `metrics` into the daemon's registry first. Must be called within a
    /// multi-threaded tokio runtime (the peer server starts listening).
    pub fn from_config(config: &crate::config::Config, metrics: Arc<LazyMetrics>) -> Result<Self> {
        let manager = LayerManager::new(LayerOptions::from_config(config), metrics)?;
        let upstreams = match &config.coordinator.endpoint {
            None => Upstreams::Registry,
            Some(endpoint) => {
                let c = &config.coordinator;
                let token = c
                    .resolved_token()
                    .map_err(|e| LazyError::InvalidInput(format!("coordinator token: {e}")))?;
                let node_id = c.resolved_node_id();
                let advertise = manager
                    .advertise_addr()
                    .map(str::to_string)
                    .ok_or_else(|| {
                        LazyError::InvalidInput(
                            "lazy.peer_listen is a wildcard address: set lazy.peer_advertise \
                         to the address other VMs reach this one at"
                                .into(),
                        )
                    })?;
                let trees = FunctionTrees::new(endpoint, &c.tenant, &token, &node_id, &advertise)
                    .map_err(|e| LazyError::InvalidInput(e.to_string()))?;
                info!(endpoint, node = %node_id, peer = %advertise, "function trees from the coordinator");
                Upstreams::Trees(trees)
            }
        };
        Ok(Self::new(manager, upstreams))
    }

    /// The manager.
    pub fn manager(&self) -> &Arc<LayerManager> {
        &self.manager
    }

    async fn mount(&self, l: &RemoteLayerLabels, mountpoint: &Path) -> Result<()> {
        let upstream: Arc<dyn UpstreamProvider> = match &self.upstreams {
            Upstreams::Registry => StaticUpstream::root(),
            Upstreams::Trees(trees) => {
                // Only converted layers join a tree: check the format (the TOC, which the
                // mount needs anyway) before telling the coordinator anything.
                self.manager.toc(&l.layer, l.blob_size).await?;
                let function = self.function_of(l).await?;
                trees
                    .acquire(&function, mountpoint)
                    .await
                    .map_err(|e| LazyError::InvalidInput(format!("function tree: {e}")))?
            }
        };
        let mounted = self
            .manager
            .mount(&l.layer, l.blob_size, upstream, mountpoint)
            .await;
        if mounted.is_err() {
            self.release(mountpoint).await;
        }
        mounted
    }

    /// The function (tree) the layer's image belongs to: its manifest digest.
    async fn function_of(&self, l: &RemoteLayerLabels) -> Result<String> {
        // Without the layer list the cache key could not tell a moved tag: always ask.
        let key = (!l.image_layers.is_empty())
            .then(|| (l.image.reference.clone(), l.image_layers.clone()));
        if let Some(f) = key
            .as_ref()
            .and_then(|k| self.functions.lock().unwrap().get(k).cloned())
        {
            return Ok(f);
        }
        let function = self.manager.registry().manifest_digest(&l.image).await?;
        if let Some(k) = key {
            self.functions.lock().unwrap().insert(k, function.clone());
        }
        Ok(function)
    }

    async fn release(&self, mountpoint: &Path) {
        if let Upstreams::Trees(trees) = &self.upstreams {
            trees.release(mountpoint).await;
        }
    }
}

#[async_trait]
impl RemoteLayers for LazyRemoteLayers {
    async fn prepare_remote(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<bool> {
        let Some(l) = RemoteLayerLabels::parse(labels)? else {
            debug!(key, "no remote-layer labels; ordinary path");
            return Ok(false);
        };
        match self.mount(&l, mountpoint).await {
            Ok(()) => {
                info!(key, layer = %l.layer, "remote layer mounted lazily");
                Ok(true)
            }
            Err(e) if e.is_not_our_format() => {
                debug!(key, layer = %l.layer, error = %e, "not a FaaSNet layer; ordinary path");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn restore_remote(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<()> {
        let l = RemoteLayerLabels::parse(labels)?.ok_or_else(|| {
            anyhow::anyhow!("remote snapshot {key}: labels do not name an image and a layer")
        })?;
        self.mount(&l, mountpoint).await?;
        Ok(())
    }

    async fn remove_remote(
        &self,
        _key: &str,
        _labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<()> {
        let unmounted = self.manager.unmount(mountpoint).await;
        self.release(mountpoint).await;
        unmounted?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let r = ImageRef::parse("127.0.0.1:5000/faasnet/busybox:converted").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "faasnet/busybox")
        );
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/busybox")
        );
        let r = ImageRef::parse("ghcr.io/a/b@sha256:abc").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("ghcr.io", "a/b")
        );
        let r = ImageRef::parse("localhost/x:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "x")
        );
        let r = ImageRef::parse("user/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "user/app")
        );
        assert!(ImageRef::parse("").is_err());
    }

    #[test]
    fn labels_stargz_and_cri() {
        let d = format!("sha256:{}", "a".repeat(64));
        let mut l = HashMap::new();
        assert_eq!(RemoteLayerLabels::parse(&l).unwrap(), None);
        l.insert(CRI_IMAGE_REF.to_string(), "reg.io:5000/f/x:1".to_string());
        l.insert(CRI_LAYER_DIGEST.to_string(), d.clone());
        l.insert(CRI_IMAGE_LAYERS.to_string(), format!("{d},sha256:b"));
        let p = RemoteLayerLabels::parse(&l).unwrap().unwrap();
        assert_eq!(p.layer.registry, "reg.io:5000");
        assert_eq!(p.layer.digest, d);
        assert_eq!(p.image_layers.len(), 2);
        l.insert(STARGZ_DIGEST.to_string(), "sha256:short".to_string());
        assert!(RemoteLayerLabels::parse(&l).is_err());
    }
}
