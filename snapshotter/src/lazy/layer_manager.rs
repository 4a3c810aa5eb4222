//! Ties the lazy path together per layer: TOC, cache, FUSE mount, peer registration,
//! prefetch. This is what the snapshotter's [`crate::RemoteLayers`] seam calls (through
//! [`super::remote::LazyRemoteLayers`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use faasnet_format::Toc;
use tracing::{info, warn};

use super::{
    block_cache::BlockCache,
    block_source::{ChainOptions, FetchChain, UpstreamProvider},
    block_store::{BlockStore, FetchGate, MemCache},
    fuse_fs::{LayerMount, MountSettings},
    metrics::LazyMetrics,
    peer_server::PeerServer,
    prefetch::{self, PrefetchOptions, PrefetchReport},
    registry_source::{RegistryOptions, RegistrySource},
    LayerRef, LazyError, Result,
};

/// Settings of the lazy path.
#[derive(Clone, Debug)]
pub struct LayerOptions {
    /// Block cache directory.
    pub cache_dir: PathBuf,
    /// Disk quota of the block cache, in bytes.
    pub cache_quota_bytes: u64,
    /// Size of the in-memory LRU of decompressed blocks, in bytes.
    pub mem_cache_bytes: usize,
    /// Where to serve blocks to children; `None`: no peer server.
    pub peer_listen: Option<SocketAddr>,
    /// Registry hosts reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Timeout of one registry request.
    pub fetch_timeout: Duration,
    /// A peer silent for this long is given up for the block.
    pub stall_timeout: Duration,
    /// Whether mounted layers are prefetched whole in the background.
    pub prefetch: bool,
    /// Concurrent prefetch fetches per layer.
    pub prefetch_concurrency: usize,
    /// Most blocks per coalesced registry request when prefetching at the root.
    pub prefetch_run_blocks: usize,
    /// FUSE threads per mount.
    pub fuse_threads: usize,
    /// Blocks fetched ahead of each on-demand read (0: none).
    pub readahead_blocks: usize,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            cache_dir: PathBuf::from("/var/lib/faasnet-snapshotter/cache"),
            cache_quota_bytes: 10 << 30,
            mem_cache_bytes: 64 << 20,
            peer_listen: None,
            insecure_registries: Vec::new(),
            fetch_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(2),
            prefetch: true,
            // As the daemon's defaults (config.rs); reasons in docs/benchmarks-fuse.md.
            prefetch_concurrency: 1,
            prefetch_run_blocks: 2,
            fuse_threads: 4,
            readahead_blocks: 8,
        }
    }
}

impl LayerOptions {
    /// The options the daemon's configuration (`[lazy]`) asks for.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let lazy = &config.lazy;
        LayerOptions {
            cache_dir: config.cache_dir(),
            cache_quota_bytes: lazy.cache_quota_bytes,
            peer_listen: Some(lazy.peer_listen),
            insecure_registries: lazy.insecure_registries.clone(),
            fetch_timeout: Duration::from_millis(lazy.fetch_timeout_ms),
            prefetch: lazy.prefetch,
            prefetch_concurrency: lazy.prefetch_concurrency,
            prefetch_run_blocks: lazy.prefetch_run_blocks,
            readahead_blocks: lazy.readahead_blocks,
            mem_cache_bytes: lazy.memory_cache_bytes as usize,
            ..LayerOptions::default()
        }
    }
}

/// A TOC saved by [`save_toc`], if it is there and still valid.
fn load_toc(path: &Path) -> Option<Toc> {
    let text = std::fs::read(path).ok()?;
    let toc: Toc = serde_json::from_slice(&text).ok()?;
    // Same checks as a TOC from a blob: a damaged file is refetched, not trusted.
    toc.validate(toc.stored_size()).ok()?;
    Some(toc)
}

/// Saves a TOC atomically (temp file, fsync, rename).
fn save_toc(path: &Path, toc: &Toc) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(toc).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

struct Mounted {
    mount: LayerMount,
    prefetch: Option<tokio::task::JoinHandle<PrefetchReport>>,
}

/// The lazy layers of this node.
pub struct LayerManager {
    options: LayerOptions,
    cache: Arc<BlockCache>,
    registry: Arc<RegistrySource>,
    peer_server: Option<PeerServer>,
    mem: Arc<MemCache>,
    gate: Arc<FetchGate>,
    metrics: Arc<LazyMetrics>,
    /// Open stores by layer digest: mounts of the same layer share one.
    stores: Mutex<HashMap<String, Weak<BlockStore>>>,
    /// Parsed TOCs by layer digest, so that a layer mounted again needs no request.
    tocs: Mutex<HashMap<String, Arc<Toc>>>,
    mounts: tokio::sync::Mutex<HashMap<PathBuf, Mounted>>,
}

impl LayerManager {
    /// Opens the cache and starts the peer server. Must be called within a tokio runtime.
    pub fn new(options: LayerOptions, metrics: Arc<LazyMetrics>) -> Result<Arc<Self>> {
        let cache = BlockCache::open(
            &options.cache_dir,
            options.cache_quota_bytes,
            metrics.clone(),
        )?;
        let registry = Arc::new(RegistrySource::new(RegistryOptions {
            insecure_registries: options.insecure_registries.clone(),
            timeout: Some(options.fetch_timeout),
        })?);
        let peer_server = match options.peer_listen {
            Some(addr) => Some(PeerServer::bind_std(addr, metrics.clone())?),
            None => None,
        };
        Ok(Arc::new(LayerManager {
            mem: MemCache::new(options.mem_cache_bytes),
            options,
            cache,
            registry,
            peer_server,
            gate: Arc::new(FetchGate::default()),
            metrics,
            stores: Mutex::new(HashMap::new()),
            tocs: Mutex::new(HashMap::new()),
            mounts: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<LazyMetrics> {
        &self.metrics
    }

    /// The block cache.
    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// The registry client.
    pub fn registry(&self) -> &Arc<RegistrySource> {
        &self.registry
    }

    /// Where the peer server listens, if there is one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_server.as_ref().map(|s| s.local_addr())
    }

    /// The TOC of `layer` (fetched once, then remembered).
    ///
    /// TOCs are also kept on disk (`<cache_dir>/tocs/<hex>.json`), so that remounting a
    /// layer after a restart needs no registry request at all.
    pub async fn toc(&self, layer: &LayerRef, blob_size: Option<u64>) -> Result<Arc<Toc>> {
        if let Some(toc) = self.tocs.lock().unwrap().get(&layer.digest) {
            return Ok(toc.clone());
        }
        let path = self
            .options
            .cache_dir
            .join("tocs")
            .join(format!("{}.json", layer.digest_hex()));
        let saved = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || load_toc(&path))
                .await
                .ok()
                .flatten()
        };
        let toc = match saved {
            Some(toc) => Arc::new(toc),
            None => {
                let toc = Arc::new(self.registry.fetch_toc(layer, blob_size).await?.toc);
                let (toc2, path2) = (toc.clone(), path.clone());
                let saved = tokio::task::spawn_blocking(move || save_toc(&path2, &toc2)).await;
                if let Ok(Err(e)) = saved {
                    warn!(path = %path.display(), error = %e, "cannot save TOC");
                }
                toc
            }
        };
        self.tocs
            .lock()
            .unwrap()
            .insert(layer.digest.clone(), toc.clone());
        Ok(toc)
    }

    /// Opens `layer` (TOC, disk cache, fetch chain through `upstream`) and serves it to
    /// children. A layer already open is shared, whatever `upstream` says.
    pub async fn open_layer(
        &self,
        layer: &LayerRef,
        blob_size: Option<u64>,
        upstream: Arc<dyn UpstreamProvider>,
    ) -> Result<Arc<BlockStore>> {
        if let Some(store) = self
            .stores
            .lock()
            .unwrap()
            .get(&layer.digest)
            .and_then(Weak::upgrade)
        {
            return Ok(store);
        }
        let toc = self.toc(layer, blob_size).await?;
        let cache = self.cache.clone();
        let (digest, blocks) = (layer.digest.clone(), toc.clone());
        let disk = tokio::task::spawn_blocking(move || cache.open_layer(&digest, &blocks.blocks))
            .await
            .map_err(|e| LazyError::io("open layer cache", std::io::Error::other(e)))??;
        let chain = Arc::new(FetchChain::new(
            self.registry.clone(),
            upstream,
            ChainOptions {
                stall_timeout: self.options.stall_timeout,
                fetch_timeout: self.options.fetch_timeout,
                ..ChainOptions::default()
            },
            self.metrics.clone(),
        ));
        let store = BlockStore::new(
            layer.clone(),
            toc,
            disk,
            chain,
            self.mem.clone(),
            self.gate.clone(),
            self.metrics.clone(),
            self.options.readahead_blocks,
        );
        let mut stores = self.stores.lock().unwrap();
        // Another caller may have opened it meanwhile: keep theirs.
        if let Some(existing) = stores.get(&layer.digest).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        stores.insert(layer.digest.clone(), Arc::downgrade(&store));
        if let Some(server) = &self.peer_server {
            server.register(store.clone());
        }
        Ok(store)
    }

    /// Stops serving `digest` to children (when nothing of it is mounted any more).
    pub async fn release_layer(&self, digest: &str) {
        let mounted = self
            .mounts
            .lock()
            .await
            .values()
            .any(|m| m.mount.store().layer().digest == digest);
        if !mounted {
            if let Some(server) = &self.peer_server {
                server.unregister(digest);
            }
        }
    }

    fn access_order_path(&self, layer: &LayerRef) -> PathBuf {
        self.options
            .cache_dir
            .join("access-order")
            .join(layer.digest_hex())
    }

    /// Mounts `layer` at `mountpoint`, serves it to children and starts its prefetch.
    /// Mounting the same mountpoint twice is a no-op. Mounts of different layers proceed in
    /// parallel (containerd prepares an image's layers concurrently).
    pub async fn mount(
        &self,
        layer: &LayerRef,
        blob_size: Option<u64>,
        upstream: Arc<dyn UpstreamProvider>,
        mountpoint: &Path,
    ) -> Result<()> {
        if self.mounts.lock().await.contains_key(mountpoint) {
            return Ok(());
        }
        let store = self.open_layer(layer, blob_size, upstream).await?;
        let mount = LayerMount::mount(
            store.clone(),
            mountpoint,
            MountSettings {
                threads: self.options.fuse_threads,
            },
        )
        .await?;
        let mut mounts = self.mounts.lock().await;
        if mounts.contains_key(mountpoint) {
            // Raced with another mount of the same mountpoint: ours is on top, take it off.
            drop(mounts);
            return mount.unmount().await;
        }
        let prefetch = self.options.prefetch.then(|| {
            let priority = prefetch::load_access_order(&self.access_order_path(layer));
            prefetch::spawn_prefetch(
                store.clone(),
                PrefetchOptions {
                    concurrency: self.options.prefetch_concurrency,
                    run_blocks: self.options.prefetch_run_blocks,
                    priority,
                },
            )
        });
        mounts.insert(mountpoint.to_path_buf(), Mounted { mount, prefetch });
        info!(layer = %layer, mountpoint = %mountpoint.display(), "lazy layer ready");
        Ok(())
    }

    /// Whether something is mounted at `mountpoint` by this manager.
    pub async fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.mounts.lock().await.contains_key(mountpoint)
    }

    /// Unmounts what [`Self::mount`] mounted at `mountpoint`; stops serving the layer when no
    /// other mount uses it. Returns false when nothing was mounted there.
    pub async fn unmount(&self, mountpoint: &Path) -> Result<bool> {
        let Some(m) = self.mounts.lock().await.remove(mountpoint) else {
            return Ok(false);
        };
        if let Some(p) = m.prefetch {
            p.abort();
        }
        let store = m.mount.store().clone();
        // The blocks read at start, for the prefetch order of the next run; the first run's
        // record is kept (it is the cold start's).
        let order = store.access_order();
        let path = self.access_order_path(store.layer());
        if !order.is_empty() && !path.exists() {
            if let Err(e) = prefetch::save_access_order(&path, &order) {
                warn!(path = %path.display(), error = %e, "cannot save access order");
            }
        }
        let result = m.mount.unmount().await;
        self.release_layer(&store.layer().digest).await;
        result.map(|()| true)
    }

    /// Unmounts everything (shutdown).
    pub async fn unmount_all(&self) {
        let mountpoints: Vec<PathBuf> = self.mounts.lock().await.keys().cloned().collect();
        for mp in mountpoints {
            if let Err(e) = self.unmount(&mp).await {
                warn!(mountpoint = %mp.display(), error = %e, "unmount");
            }
        }
    }
}
