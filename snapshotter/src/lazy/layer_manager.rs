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
use tracing::{debug, info, warn};

use super::{
    block_cache::BlockCache,
    block_source::{ChainOptions, FetchChain, StaticUpstream, UpstreamProvider},
    block_store::{BlockStore, FetchGate, MemCache},
    follow::{self, FollowReport},
    fuse_fs::{LayerMount, MountSettings, ResumedSession},
    fuse_handover::{self, FdStore},
    metrics::LazyMetrics,
    peer_server::PeerServer,
    prefetch::{self, PrefetchOptions, PrefetchReport},
    registry_source::{RegistryOptions, RegistrySource},
    sibling::Siblings,
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
    /// Whether children of one parent split blocks between them (needs a peer server).
    pub sibling_exchange: bool,
    /// Whether odd blocks come down the second stripe tree (replaces the sibling exchange).
    pub stripe_trees: bool,
    /// Fetches in flight per layer following the parent's start order (0: do not follow).
    pub follow_concurrency: usize,
    /// This node's peer address as others reach it; default: `peer_listen` when it is not
    /// a wildcard (without either, no sibling exchange).
    pub peer_advertise: Option<String>,
    /// Unix socket of the FUSE fd holder that keeps mounts' connections across restarts
    /// (started if absent); `None`: mounts die with the process.
    pub handover_socket: Option<PathBuf>,
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
            sibling_exchange: true,
            stripe_trees: true,
            follow_concurrency: 4,
            peer_advertise: None,
            handover_socket: None,
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
            sibling_exchange: lazy.sibling_exchange,
            stripe_trees: lazy.stripe_trees,
            follow_concurrency: lazy.follow_concurrency,
            peer_advertise: lazy.peer_advertise.clone(),
            mem_cache_bytes: lazy.memory_cache_bytes as usize,
            handover_socket: Some(config.root.join(HANDOVER_SOCKET)),
            ..LayerOptions::default()
        }
    }
}

/// The FUSE fd holder's socket, in the daemon's root.
pub const HANDOVER_SOCKET: &str = "fuse-handover.sock";

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
    follow: Option<tokio::task::JoinHandle<FollowReport>>,
}

impl Mounted {
    /// Stops the layer's background work (prefetch, following the parent).
    fn stop_background(&self) {
        for task in [
            self.prefetch.as_ref().map(|t| t.abort_handle()),
            self.follow.as_ref().map(|t| t.abort_handle()),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
    }
}

/// The lazy layers of this node.
pub struct LayerManager {
    options: LayerOptions,
    cache: Arc<BlockCache>,
    registry: Arc<RegistrySource>,
    peer_server: Option<PeerServer>,
    /// This node's peer address as other VMs reach it, if known.
    advertise: Option<String>,
    /// Sides in the sibling exchange, shared by every layer's fetch chain.
    siblings: Option<Arc<Siblings>>,
    mem: Arc<MemCache>,
    gate: Arc<FetchGate>,
    metrics: Arc<LazyMetrics>,
    /// Open stores by layer digest: mounts of the same layer share one.
    stores: Mutex<HashMap<String, Weak<BlockStore>>>,
    /// Parsed TOCs by layer digest, so that a layer mounted again needs no request.
    tocs: Mutex<HashMap<String, Arc<Toc>>>,
    mounts: tokio::sync::Mutex<HashMap<PathBuf, Mounted>>,
    /// Where mounts' FUSE connections are handed over (docs/lazy.md, "Restarts").
    handover: Option<Arc<FdStore>>,
    /// Connections of the previous process, served again, that were still attached at
    /// their mountpoint: [`Self::mount`] of that mountpoint puts them back.
    resumed: tokio::sync::Mutex<HashMap<PathBuf, ResumedSession>>,
    /// Resumed connections not (or no longer) attached anywhere, served until their last
    /// user goes.
    orphans: Mutex<Vec<ResumedSession>>,
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
        let handover = options.handover_socket.as_deref().and_then(|socket| {
            match FdStore::connect_or_spawn(socket, fuse_handover::spawn_holder_process) {
                Ok(store) => Some(Arc::new(store)),
                Err(e) => {
                    warn!(socket = %socket.display(), error = %e, "no FUSE fd holder: mounts will not survive a restart");
                    None
                }
            }
        });
        let advertise = options.peer_advertise.clone().or_else(|| {
            peer_server
                .as_ref()
                .map(|s| s.local_addr())
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.to_string())
        });
        let siblings = match (
            &advertise,
            options.sibling_exchange && !options.stripe_trees,
        ) {
            (Some(me), true) => Some(Siblings::new(me.clone(), options.stall_timeout)),
            _ => None,
        };
        Ok(Arc::new(LayerManager {
            advertise,
            siblings,
            mem: MemCache::new(options.mem_cache_bytes),
            handover,
            resumed: Default::default(),
            orphans: Default::default(),
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

    /// The address other VMs reach this node's peer server at: `peer_advertise`, else the
    /// listen address when it is not a wildcard.
    pub fn advertise_addr(&self) -> Option<&str> {
        self.advertise.as_deref()
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
        let mut chain = FetchChain::new(
            self.registry.clone(),
            upstream,
            ChainOptions {
                stall_timeout: self.options.stall_timeout,
                fetch_timeout: self.options.fetch_timeout,
                ..ChainOptions::default()
            },
            self.metrics.clone(),
        );
        if let Some(s) = &self.siblings {
            chain = chain.with_siblings(s.clone());
        }
        if self.options.stripe_trees {
            chain = chain.with_stripes();
        }
        let chain = Arc::new(chain);
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
        let resumed = self.resumed.lock().await.remove(mountpoint);
        let mut mount = None;
        if let Some(r) = resumed {
            if r.held().digest != layer.digest {
                warn!(mountpoint = %mountpoint.display(), held = %r.held().digest, wanted = %layer.digest, "resumed mount is of another layer; mounting again");
                self.orphan(r).await;
            } else {
                match r.attach(store.clone(), mountpoint) {
                    Ok(m) => mount = Some(m),
                    Err(failed) => {
                        let (r, why) = *failed;
                        warn!(mountpoint = %mountpoint.display(), reason = %why, "cannot put the resumed mount back; mounting again (running containers keep the old one)");
                        self.orphans.lock().unwrap().push(r);
                    }
                }
            }
        }
        let mount = match mount {
            Some(m) => m,
            None => LayerMount::mount(store.clone(), mountpoint, self.mount_settings()).await?,
        };
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
        // Every mount follows: a node that is the root now may get a parent later.
        let follow = (self.options.follow_concurrency > 0)
            .then(|| follow::spawn_follow(store.clone(), self.options.follow_concurrency));
        mounts.insert(
            mountpoint.to_path_buf(),
            Mounted {
                mount,
                prefetch,
                follow,
            },
        );
        info!(layer = %layer, mountpoint = %mountpoint.display(), "lazy layer ready");
        Ok(())
    }

    fn mount_settings(&self) -> MountSettings {
        MountSettings {
            threads: self.options.fuse_threads,
            handover: self.handover.clone(),
        }
    }

    /// Serves again every FUSE connection the previous process handed over (call once at
    /// startup, before the remote snapshots are restored): container reads waiting on them
    /// go on (those left unanswered are resent), lookups at once, reads as soon as
    /// [`Self::mount`] (restoring the snapshot) or [`Self::finish_resume`] gives the layer
    /// its upstream. A connection that cannot be served is closed, so that its users get
    /// an error instead of waiting forever. Returns how many are served.
    pub async fn resume_handed_over(&self) -> usize {
        let Some(handover) = self.handover.clone() else {
            return 0;
        };
        let held = match tokio::task::spawn_blocking({
            let h = handover.clone();
            move || h.list()
        })
        .await
        {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list handed-over FUSE connections");
                return 0;
            }
            Err(e) => {
                warn!(error = %e, "listing handed-over FUSE connections");
                return 0;
            }
        };
        let mut served = 0;
        for (held, fd) in held {
            let resumed = async {
                let layer = LayerRef::new(&held.registry, &held.repository, &held.digest)?;
                let toc = self.toc(&layer, None).await?;
                ResumedSession::resume(held.clone(), fd, toc, self.mount_settings()).await
            }
            .await;
            match resumed {
                Ok(r) => {
                    served += 1;
                    let mut map = self.resumed.lock().await;
                    if r.attached_copy() && !map.contains_key(&held.mountpoint) {
                        map.insert(held.mountpoint.clone(), r);
                    } else {
                        drop(map);
                        self.orphans.lock().unwrap().push(r);
                    }
                }
                Err(e) => {
                    warn!(mountpoint = %held.mountpoint.display(), error = %e, "cannot serve a handed-over FUSE connection; closing it (its users get errors)");
                    let h = handover.clone();
                    let _ = tokio::task::spawn_blocking(move || h.forget(&held)).await;
                }
            }
        }
        served
    }

    /// After the remote snapshots are restored: resumed connections no snapshot took back
    /// read from the registry-rooted chain and are detached from their mountpoint; they are
    /// served until their last user goes.
    pub async fn finish_resume(&self) {
        let left: Vec<ResumedSession> = self.resumed.lock().await.drain().map(|(_, r)| r).collect();
        for r in left {
            let mp = r.held().mountpoint.clone();
            info!(mountpoint = %mp.display(), "handed-over mount belongs to no remote snapshot; detached, served until its users go");
            let detach =
                fuse_handover::fuse_mount_dev(&mp).as_deref() == Some(r.held().dev.as_str());
            self.orphan(r).await;
            if detach {
                let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let pending: Vec<usize> = {
            let orphans = self.orphans.lock().unwrap();
            (0..orphans.len()).collect()
        };
        for i in pending {
            let held = self
                .orphans
                .lock()
                .unwrap()
                .get(i)
                .map(|r| r.held().clone());
            let Some(held) = held else { continue };
            if let Ok(layer) = LayerRef::new(&held.registry, &held.repository, &held.digest) {
                match self.open_layer(&layer, None, StaticUpstream::root()).await {
                    Ok(store) => {
                        if let Some(r) = self.orphans.lock().unwrap().get(i) {
                            r.set_store(store);
                        }
                    }
                    Err(e) => {
                        warn!(layer = %layer, error = %e, "cannot open the layer of a resumed mount")
                    }
                }
            }
        }
        self.orphans.lock().unwrap().retain(|r| !r.ended());
    }

    /// Keeps `r` served (detached from any mountpoint), reading from the registry-rooted
    /// chain if nothing gave it a store yet.
    async fn orphan(&self, r: ResumedSession) {
        let r = r.into_detached();
        if let Ok(layer) = LayerRef::new(&r.held().registry, &r.held().repository, &r.held().digest)
        {
            if let Ok(store) = self.open_layer(&layer, None, StaticUpstream::root()).await {
                r.set_store(store);
            }
        }
        self.orphans.lock().unwrap().push(r);
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
        m.stop_background();
        let store = m.mount.store().clone();
        self.save_access_order(&store);
        let result = m.mount.unmount().await;
        self.release_layer(&store.layer().digest).await;
        result.map(|()| true)
    }

    /// The blocks read at start, for the prefetch order of the next run, and the files read,
    /// for a start profile (`<cache>/start-files/<hex>`, one path per line, the converter's
    /// `--start-profile`); the first run's records are kept (they are the cold start's).
    fn save_access_order(&self, store: &BlockStore) {
        let order = store.access_order();
        let path = self.access_order_path(store.layer());
        if !order.is_empty() && !path.exists() {
            if let Err(e) = prefetch::save_access_order(&path, &order) {
                warn!(path = %path.display(), error = %e, "cannot save access order");
            }
        }
        let files = store.files_read();
        let path = self
            .options
            .cache_dir
            .join("start-files")
            .join(store.layer().digest_hex());
        if !files.is_empty() && !path.exists() {
            if let Err(e) = prefetch::save_lines(&path, &files) {
                warn!(path = %path.display(), error = %e, "cannot save the files read at start");
            }
        }
    }

    /// Leaves every layer mounted for the next process (shutdown for a restart): the FUSE
    /// connections stay with the holder; reads arriving meanwhile wait in the kernel.
    /// Without a holder, this unmounts instead (the mounts could not outlive us).
    pub async fn leave_mounted(&self) {
        if self.handover.is_none() {
            return self.unmount_all().await;
        }
        let mounts: Vec<(PathBuf, Mounted)> = self.mounts.lock().await.drain().collect();
        for (mp, m) in mounts {
            m.stop_background();
            self.save_access_order(m.mount.store());
            m.mount.leave_mounted();
            debug!(mountpoint = %mp.display(), "left mounted for the next process");
        }
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
