//! One layer's blocks as the rest of the lazy path sees them: decompressed for reads (FUSE),
//! stored for children (peer server), fetched at most once however many ask at the same time.
//!
//! Lookup order: in-memory LRU of decompressed blocks ([`MemCache`], shared by all layers) ->
//! blocks just fetched and being written to disk -> the disk cache -> a fetch in flight ->
//! a new fetch through the [`FetchChain`]. Fetches run in their own tasks, so a reader that
//! gives up (a child that disconnects) does not cancel them for the others.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use faasnet_format::{BlockEntry, Toc};
use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use tokio::sync::oneshot;
use tracing::{debug, trace, warn};

use super::{
    block_cache::LayerCache,
    block_source::{verify_block, FetchChain},
    metrics::LazyMetrics,
    peer_protocol::Class,
    start_order::StartOrder,
    LayerRef, LazyError, Result, Source,
};

/// Why a block is wanted: on-demand fetches go before prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A read by a container (FUSE) or a child node: someone waits.
    OnDemand,
    /// Read-ahead after an on-demand read: nobody waits yet, but soon will, so upstream
    /// peers treat it as urgent; it does not hold prefetch back.
    ReadAhead,
    /// The parent's start order named the block ([`super::follow`]): this node's container
    /// will most likely read it soon. Urgent upstream, and holds prefetch back like a read.
    Follow,
    /// Background prefetch.
    Prefetch,
}

impl Purpose {
    /// Whether the block is wanted for a start (anything but background prefetch): such
    /// blocks join the layer's [`StartOrder`], and a prefetch fetch of them is taken over.
    pub fn is_for_start(self) -> bool {
        self != Purpose::Prefetch
    }

    /// How an upstream peer is to rank the request on its uplink.
    pub fn class(self) -> Class {
        match self {
            Purpose::OnDemand | Purpose::ReadAhead => Class::Urgent,
            Purpose::Follow => Class::Followed,
            Purpose::Prefetch => Class::Prefetch,
        }
    }
}

tokio::task_local! {
    /// The purpose of the fetch running in this task, for sources that pass it on (a peer
    /// serves prefetch requests last). Set around every fetch the store starts.
    pub static FETCH_PURPOSE: Purpose;
}

type FetchResult = std::result::Result<Bytes, Arc<LazyError>>;
type Flight = Shared<BoxFuture<'static, FetchResult>>;

/// Counts on-demand fetches in flight across all layers; prefetch waits while any run.
#[derive(Debug, Default)]
pub struct FetchGate {
    on_demand: AtomicUsize,
    idle: tokio::sync::Notify,
    /// When the last on-demand fetch ended.
    last_done: Mutex<Option<std::time::Instant>>,
}

impl FetchGate {
    /// Waits until no on-demand fetch has been in flight for `quiet`: a starting container
    /// reads in bursts with short pauses (imports, CPU work), and a prefetch slipped into a
    /// pause would hold the link when the next burst comes.
    pub async fn wait_quiet(&self, quiet: std::time::Duration) {
        loop {
            self.wait_idle().await;
            let since = self.last_done.lock().unwrap().map(|t| t.elapsed());
            match since {
                Some(elapsed) if elapsed < quiet => tokio::time::sleep(quiet - elapsed).await,
                _ => return,
            }
        }
    }

    /// Counts as activity now: a layer was just mounted, its container's first reads are
    /// about to come, and prefetch must not take the link before them.
    pub fn touch(&self) {
        *self.last_done.lock().unwrap() = Some(std::time::Instant::now());
    }

    /// Waits until no on-demand fetch is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.on_demand.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(self: &Arc<Self>) -> GateGuard {
        self.on_demand.fetch_add(1, Ordering::AcqRel);
        GateGuard(self.clone())
    }
}

struct GateGuard(Arc<FetchGate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        if self.0.on_demand.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.last_done.lock().unwrap() = Some(std::time::Instant::now());
            self.0.idle.notify_waiters();
        }
    }
}

/// A small LRU of decompressed blocks, shared by all layers, bounded in bytes.
pub struct MemCache {
    capacity: usize,
    inner: Mutex<MemInner>,
}

/// (layer id, block index) -> (decompressed bytes, last-use tick).
type MemMap = HashMap<(u64, usize), (Arc<Vec<u8>>, u64)>;

#[derive(Default)]
struct MemInner {
    map: MemMap,
    used: usize,
    tick: u64,
}

impl MemCache {
    /// A cache of at most `capacity` bytes.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(MemCache {
            capacity,
            inner: Mutex::new(MemInner::default()),
        })
    }

    fn get(&self, key: (u64, usize)) -> Option<Arc<Vec<u8>>> {
        let mut g = self.inner.lock().unwrap();
        g.tick += 1;
        let tick = g.tick;
        g.map.get_mut(&key).map(|(v, t)| {
            *t = tick;
            v.clone()
        })
    }

    fn insert(&self, key: (u64, usize), value: Arc<Vec<u8>>) {
        if value.len() > self.capacity {
            return;
        }
        let mut g = self.inner.lock().unwrap();
        g.tick += 1;
        let tick = g.tick;
        g.used += value.len();
        if let Some((old, _)) = g.map.insert(key, (value, tick)) {
            g.used -= old.len();
        }
        // Few entries (capacity / block size): a linear scan for the oldest is cheap.
        while g.used > self.capacity {
            let Some(oldest) = g.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) else {
                break;
            };
            if let Some((v, _)) = g.map.remove(&oldest) {
                g.used -= v.len();
            }
        }
    }

    fn remove_layer(&self, layer_id: u64) {
        let mut g = self.inner.lock().unwrap();
        let keys: Vec<_> = g.map.keys().filter(|k| k.0 == layer_id).copied().collect();
        for k in keys {
            if let Some((v, _)) = g.map.remove(&k) {
                g.used -= v.len();
            }
        }
    }
}

#[derive(Default)]
struct Flights {
    in_flight: HashMap<usize, Flight>,
    /// The tasks of in-flight prefetch fetches, so that an urgent read can take their place.
    prefetching: HashMap<usize, tokio::task::AbortHandle>,
    /// Fetched and verified, being written to disk: served from here meanwhile.
    unpersisted: HashMap<usize, Bytes>,
}

/// Order in which blocks were first read on demand (for prefetch on a later run).
#[derive(Default)]
struct AccessOrder {
    seen: Vec<bool>,
    order: Vec<u32>,
}

/// Files whose data was read, by data offset in the tar stream, in first-read order (the
/// start profile the converter can lay the layer out by).
#[derive(Default)]
struct FilesRead {
    seen: std::collections::HashSet<u64>,
    order: Vec<u64>,
}

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

/// The blocks of one layer.
pub struct BlockStore {
    id: u64,
    layer: LayerRef,
    toc: Arc<Toc>,
    disk: Arc<LayerCache>,
    chain: Arc<FetchChain>,
    mem: Arc<MemCache>,
    gate: Arc<FetchGate>,
    metrics: Arc<LazyMetrics>,
    flights: Mutex<Flights>,
    access: Mutex<AccessOrder>,
    files_read: Mutex<FilesRead>,
    /// The blocks wanted for the start, in order, for the children to follow.
    start_order: StartOrder,
    readahead: usize,
}

impl BlockStore {
    /// The store of `layer` with table of contents `toc`, cached in `disk`, fetched through
    /// `chain`. A read also starts fetching the `readahead` blocks after the ones it needs
    /// (sequential reads then overlap fetch latency instead of paying it block by block).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layer: LayerRef,
        toc: Arc<Toc>,
        disk: Arc<LayerCache>,
        chain: Arc<FetchChain>,
        mem: Arc<MemCache>,
        gate: Arc<FetchGate>,
        metrics: Arc<LazyMetrics>,
        readahead: usize,
    ) -> Arc<Self> {
        let n = toc.blocks.len();
        Arc::new(BlockStore {
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            layer,
            toc,
            disk,
            chain,
            mem,
            gate,
            metrics,
            flights: Mutex::new(Flights::default()),
            access: Mutex::new(AccessOrder {
                seen: vec![false; n],
                order: Vec::new(),
            }),
            files_read: Mutex::new(FilesRead::default()),
            start_order: StartOrder::new(n),
            readahead,
        })
    }

    /// The layer.
    pub fn layer(&self) -> &LayerRef {
        &self.layer
    }

    /// Its table of contents.
    pub fn toc(&self) -> &Arc<Toc> {
        &self.toc
    }

    /// Its fetch chain.
    pub fn chain(&self) -> &Arc<FetchChain> {
        &self.chain
    }

    /// The fetch gate shared with prefetch.
    pub fn gate(&self) -> &Arc<FetchGate> {
        &self.gate
    }

    /// Number of blocks.
    pub fn block_count(&self) -> usize {
        self.toc.blocks.len()
    }

    /// Whether block `index` is held locally (disk or about to be).
    pub fn has_block(&self, index: usize) -> bool {
        self.flights
            .lock()
            .unwrap()
            .unpersisted
            .contains_key(&index)
            || self.disk.has(index)
    }

    /// Whether block `index` is being fetched now.
    pub fn is_in_flight(&self, index: usize) -> bool {
        self.flights.lock().unwrap().in_flight.contains_key(&index)
    }

    /// Whether block `index` is held, or being fetched for a start (not only for prefetch).
    pub fn is_held_or_coming(&self, index: usize) -> bool {
        let f = self.flights.lock().unwrap();
        f.unpersisted.contains_key(&index)
            || (f.in_flight.contains_key(&index) && !f.prefetching.contains_key(&index))
            || self.disk.has(index)
    }

    /// The blocks this node wanted for a start so far, in order (what children follow).
    pub fn start_order(&self) -> &StartOrder {
        &self.start_order
    }

    /// Number of blocks on disk.
    pub fn cached_blocks(&self) -> usize {
        self.disk.present_count()
    }

    fn entry(&self, index: usize) -> Result<&BlockEntry> {
        self.toc
            .blocks
            .get(index)
            .ok_or_else(|| LazyError::BlockOutOfRange {
                layer: self.layer.digest.clone(),
                index,
                count: self.toc.blocks.len(),
            })
    }

    /// The stored (compressed, verified) bytes of block `index`: what children are served.
    pub async fn stored_block(self: &Arc<Self>, index: usize, purpose: Purpose) -> Result<Bytes> {
        let entry = self.entry(index)?.clone();
        if purpose.is_for_start() {
            self.start_order.note(index);
        }
        let flight = {
            let mut f = self.flights.lock().unwrap();
            if let Some(b) = f.unpersisted.get(&index) {
                self.metrics.obtained(Source::Cache, b.len() as u64);
                return Ok(b.clone());
            }
            match f.in_flight.contains_key(&index) {
                true => Some(self.join_or_start(&mut f, index, &entry, purpose)),
                false if self.disk.has(index) => None,
                false => Some(self.start_fetch(&mut f, index, entry.clone(), purpose)),
            }
        };
        if let Some(flight) = flight {
            return flight.await.map_err(LazyError::Shared);
        }
        match self.read_disk(index, &entry).await {
            Ok(Some(b)) => {
                self.metrics.obtained(Source::Cache, b.len() as u64);
                Ok(b)
            }
            // Gone or corrupt on disk: fetch it again.
            Ok(None) | Err(_) => {
                let flight = {
                    let mut f = self.flights.lock().unwrap();
                    self.join_or_start(&mut f, index, &entry, purpose)
                };
                flight.await.map_err(LazyError::Shared)
            }
        }
    }

    /// Reads and verifies block `index` from disk; a corrupt block is invalidated.
    async fn read_disk(&self, index: usize, entry: &BlockEntry) -> Result<Option<Bytes>> {
        let disk = self.disk.clone();
        let layer = self.layer.clone();
        let entry = entry.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let Some(b) = disk.get(index)? else {
                return Ok(None);
            };
            if let Err(e) = verify_block(&layer, index, &entry, &b, Source::Cache) {
                metrics.digest_failures.inc();
                warn!(error = %e, "corrupt block in the disk cache; fetching it again");
                disk.invalidate(index)?;
                return Ok(None);
            }
            Ok(Some(Bytes::from(b)))
        })
        .await
        .map_err(|e| LazyError::io("disk cache read task", std::io::Error::other(e)))?
    }

    /// The flight of block `index`: the one in the air, or a new one. An urgent read does not
    /// join a prefetch fetch: upstream, a prefetch request waits while the peer's uplink
    /// carries urgent blocks (its other children's starts), so the read would wait for all of
    /// them. The prefetch fetch is cancelled (its waiters see an error; prefetch moves on) and
    /// an urgent one takes its place.
    fn join_or_start(
        self: &Arc<Self>,
        f: &mut Flights,
        index: usize,
        entry: &BlockEntry,
        purpose: Purpose,
    ) -> Flight {
        if matches!(purpose, Purpose::OnDemand | Purpose::Follow) {
            if let Some(task) = f.prefetching.remove(&index) {
                task.abort();
                f.in_flight.remove(&index);
                debug!(layer = %self.layer.digest, index, "urgent read takes over a prefetch fetch");
                return self.start_fetch(f, index, entry.clone(), purpose);
            }
        }
        match f.in_flight.get(&index) {
            Some(flight) => flight.clone(),
            None => self.start_fetch(f, index, entry.clone(), purpose),
        }
    }

    /// Starts a fetch of block `index` in its own task and records it as in flight.
    fn start_fetch(
        self: &Arc<Self>,
        flights: &mut Flights,
        index: usize,
        entry: BlockEntry,
        purpose: Purpose,
    ) -> Flight {
        let (tx, rx) = oneshot::channel::<FetchResult>();
        let flight = Self::flight_from(rx);
        flights.in_flight.insert(index, flight.clone());
        let me = self.clone();
        let guard =
            matches!(purpose, Purpose::OnDemand | Purpose::Follow).then(|| self.gate.enter());
        let task = tokio::spawn(FETCH_PURPOSE.scope(purpose, async move {
            let result = me.chain.fetch(&me.layer, index, &entry).await;
            drop(guard);
            let result = match result {
                Ok((bytes, source)) => {
                    me.metrics.obtained(source, bytes.len() as u64);
                    match purpose {
                        Purpose::Prefetch => me.metrics.prefetched_blocks.inc(),
                        Purpose::Follow => me.metrics.followed_blocks.inc(),
                        _ => 0,
                    };
                    me.landed(index, bytes.clone());
                    Ok(bytes)
                }
                Err(e) => {
                    let mut f = me.flights.lock().unwrap();
                    f.in_flight.remove(&index);
                    f.prefetching.remove(&index);
                    Err(Arc::new(e))
                }
            };
            let _ = tx.send(result);
        }));
        if purpose == Purpose::Prefetch {
            flights.prefetching.insert(index, task.abort_handle());
        }
        flight
    }

    fn flight_from(rx: oneshot::Receiver<FetchResult>) -> Flight {
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(Arc::new(LazyError::InvalidInput(
                    "block fetch task ended without a result".into(),
                )))
            })
        }
        .boxed()
        .shared()
    }

    /// A block arrived: serve it from memory, persist it in the background, then forget it.
    fn landed(self: &Arc<Self>, index: usize, bytes: Bytes) {
        trace!(layer = %self.layer.digest, index, "block landed");
        {
            let mut f = self.flights.lock().unwrap();
            f.in_flight.remove(&index);
            f.prefetching.remove(&index);
            f.unpersisted.insert(index, bytes.clone());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = me.disk.put(index, &bytes) {
                warn!(layer = %me.layer.digest, index, error = %e, "cannot write block to the disk cache");
            }
            me.flights.lock().unwrap().unpersisted.remove(&index);
        });
    }

    /// Starts fetching block `index` unless it is held or already in flight; nobody waits.
    fn fetch_in_background(self: &Arc<Self>, index: usize) {
        self.start_order.note(index);
        let mut f = self.flights.lock().unwrap();
        if f.in_flight.contains_key(&index)
            || f.unpersisted.contains_key(&index)
            || self.disk.has(index)
        {
            return;
        }
        let entry = self.toc.blocks[index].clone();
        // Dropping the handle does not cancel the fetch: it runs in its own task.
        drop(self.start_fetch(&mut f, index, entry, Purpose::ReadAhead));
    }

    /// At the root: fetches up to `max` consecutive missing blocks from `start` in one
    /// registry range request, each landing (and served to whoever waits for it) as soon as it
    /// is in. One flow instead of `max` keeps the root's downlink queue short, so that its
    /// children's requests and acknowledgements are not stuck behind it. `purpose` is
    /// [`Purpose::Prefetch`] or [`Purpose::Follow`] (a profiled layer's start blocks: counted
    /// by the fetch gate and named in the start order). Returns how many blocks it fetched (0
    /// when `start` is already present or in flight).
    pub async fn fetch_run(
        self: &Arc<Self>,
        start: usize,
        max: usize,
        purpose: Purpose,
    ) -> Result<usize> {
        let mut claimed = Vec::new();
        {
            let mut f = self.flights.lock().unwrap();
            let mut i = start;
            while i < self.toc.blocks.len()
                && claimed.len() < max
                && !f.in_flight.contains_key(&i)
                && !f.unpersisted.contains_key(&i)
                && !self.disk.has(i)
            {
                let (tx, rx) = oneshot::channel::<FetchResult>();
                f.in_flight.insert(i, Self::flight_from(rx));
                claimed.push(Some(tx));
                i += 1;
            }
        }
        if claimed.is_empty() {
            return Ok(0);
        }
        let n = claimed.len();
        if purpose.is_for_start() {
            for i in start..start + n {
                self.start_order.note(i);
            }
        }
        let entries = self.toc.blocks[start..start + n].to_vec();
        let me = self.clone();
        let guard = (purpose != Purpose::Prefetch).then(|| self.gate.enter());
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(FETCH_PURPOSE.scope(purpose, async move {
            let mut on_block = |index: usize, b: Bytes| {
                me.metrics.obtained(Source::Registry, b.len() as u64);
                match purpose {
                    Purpose::Follow => me.metrics.followed_blocks.inc(),
                    _ => me.metrics.prefetched_blocks.inc(),
                };
                me.landed(index, b.clone());
                if let Some(tx) = claimed[index - start].take() {
                    let _ = tx.send(Ok(b));
                }
            };
            let result = me
                .chain
                .fetch_run_from_registry(&me.layer, start, &entries, &mut on_block)
                .await;
            drop(guard);
            let outcome = match result {
                Ok(got) => Ok(got),
                Err(e) => {
                    debug!(error = %e, start, n, "registry run failed");
                    let e = Arc::new(e);
                    let mut f = me.flights.lock().unwrap();
                    for (k, tx) in claimed.into_iter().enumerate() {
                        if let Some(tx) = tx {
                            f.in_flight.remove(&(start + k));
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                    Err(LazyError::Shared(e))
                }
            };
            let _ = done_tx.send(outcome);
        }));
        done_rx.await.unwrap_or(Ok(0))
    }

    /// The decompressed bytes of block `index`.
    pub async fn raw_block(self: &Arc<Self>, index: usize) -> Result<Arc<Vec<u8>>> {
        if let Some(raw) = self.mem.get((self.id, index)) {
            return Ok(raw);
        }
        let stored = self.stored_block(index, Purpose::OnDemand).await?;
        let entry = self.entry(index)?;
        // Verified already (by the chain or on disk read): decompress only, with the same
        // rules as every other reader of the format (exactly one frame, exact size).
        let raw = Arc::new(
            faasnet_format::decode_frame(index, &stored, entry.raw_len)
                .map_err(|e| LazyError::format(&self.layer, e))?,
        );
        self.mem.insert((self.id, index), raw.clone());
        Ok(raw)
    }

    /// Reads `len` bytes of the layer's tar stream at `offset` (a file's data), fetching the
    /// blocks it spans concurrently. Read-ahead covers the blocks after them up to
    /// `readahead_end` (the end of the file being read), at most the configured count: the
    /// blocks past a file belong to other files, which a start often never reads, and every
    /// block fetched for nothing costs link time that the tree shares.
    pub async fn read_at(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        readahead_end: u64,
    ) -> Result<Vec<u8>> {
        let len = len.min(self.toc.tar_size.saturating_sub(offset) as usize);
        let range = self.toc.blocks_for_range(offset, len as u64);
        self.record_access(range.clone());
        let bs = self.toc.block_size as u64;
        let file_blocks_end = readahead_end.div_ceil(bs) as usize;
        let ahead_end = (range.end + self.readahead)
            .min(file_blocks_end)
            .min(self.toc.blocks.len());
        for j in range.end..ahead_end {
            self.fetch_in_background(j);
        }
        let blocks =
            futures::future::try_join_all(range.clone().map(|i| self.raw_block(i))).await?;
        let mut out = Vec::with_capacity(len);
        for (i, raw) in range.zip(blocks) {
            let block_start = i as u64 * bs;
            let from = offset.max(block_start) - block_start;
            let to = (offset + len as u64).min(block_start + raw.len() as u64) - block_start;
            out.extend_from_slice(&raw[from as usize..to as usize]);
        }
        Ok(out)
    }

    fn record_access(&self, range: std::ops::Range<usize>) {
        let mut a = self.access.lock().unwrap();
        for i in range {
            if let Some(seen) = a.seen.get_mut(i) {
                if !*seen {
                    *seen = true;
                    a.order.push(i as u32);
                }
            }
        }
    }

    /// Blocks read on demand so far, in the order they were first read.
    pub fn access_order(&self) -> Vec<u32> {
        self.access.lock().unwrap().order.clone()
    }

    /// Records a read of the file whose data starts at tar offset `data_offset`.
    pub fn record_file_read(&self, data_offset: u64) {
        let mut f = self.files_read.lock().unwrap();
        if f.seen.insert(data_offset) {
            f.order.push(data_offset);
        }
    }

    /// Paths of the files read so far, in the order they were first read (the layer's part
    /// of a start profile, docs/image-converter.md).
    pub fn files_read(&self) -> Vec<String> {
        let order = self.files_read.lock().unwrap().order.clone();
        let by_offset: HashMap<u64, &str> = self
            .toc
            .entries
            .iter()
            .filter(|e| e.kind == faasnet_format::EntryKind::File && e.size > 0)
            .map(|e| (e.offset, e.path.as_str()))
            .collect();
        order
            .iter()
            .filter_map(|o| by_offset.get(o).map(|p| p.to_string()))
            .collect()
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        self.mem.remove_layer(self.id);
    }
}
