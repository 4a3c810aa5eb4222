//! Where blocks come from: the [`BlockSource`] trait (registry and peer), the node's upstream
//! in the function tree ([`UpstreamProvider`]) and the [`FetchChain`] that orders them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use faasnet_format::BlockEntry;
use tracing::{debug, warn, Instrument};

use super::{
    block_store::{Purpose, FETCH_PURPOSE},
    metrics::LazyMetrics,
    peer_protocol::{Class, Op},
    peer_source::PeerSource,
    registry_source::RegistrySource,
    sibling::{Siblings, SIBLING_DEADLINE},
    LayerRef, LazyError, Result, Source,
};

/// A remote source of stored blocks (LZ4 frames exactly as in the blob).
///
/// Implementations return the bytes they received; checking them against the TOC digest is
/// the [`FetchChain`]'s job, so that no source can bypass it.
#[async_trait]
pub trait BlockSource: Send + Sync {
    /// Fetches the stored frame of block `index` of `layer`, described by `entry`.
    async fn fetch(&self, layer: &LayerRef, index: usize, entry: &BlockEntry) -> Result<Bytes>;
}

/// Where this node gets a function's blocks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// This node is the root of the function tree (or there is no tree): the registry.
    Root,
    /// The parent node's peer server.
    Peer {
        /// Its address.
        addr: SocketAddr,
        /// Tree epoch in which this parent was assigned; changes whenever the tree does.
        epoch: u64,
    },
}

/// The current upstream of one function tree, as the control plane says.
pub trait UpstreamProvider: Send + Sync {
    /// The upstream to use now.
    fn current(&self) -> Upstream;
    /// The upstream of the second stripe (odd blocks) in the second stripe tree, if the
    /// control plane keeps one (docs/lazy.md, "Stripe trees").
    fn second(&self) -> Option<Upstream> {
        None
    }
    /// Tells the control plane that `peer` failed (unreachable, stalled, or served corrupt
    /// data), so that it can assign another parent.
    fn report_failure(&self, peer: SocketAddr);
}

/// A fixed upstream: the root (on-demand loading from the registry, no tree) or a fixed peer.
#[derive(Debug)]
pub struct StaticUpstream {
    upstream: Upstream,
    failures: AtomicU64,
}

impl StaticUpstream {
    /// Always the registry.
    pub fn root() -> Arc<Self> {
        Arc::new(StaticUpstream {
            upstream: Upstream::Root,
            failures: AtomicU64::new(0),
        })
    }

    /// Always `addr` (with the registry as fallback).
    pub fn peer(addr: SocketAddr) -> Arc<Self> {
        Arc::new(StaticUpstream {
            upstream: Upstream::Peer { addr, epoch: 0 },
            failures: AtomicU64::new(0),
        })
    }

    /// How many failures were reported.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl UpstreamProvider for StaticUpstream {
    fn current(&self) -> Upstream {
        self.upstream
    }

    fn report_failure(&self, peer: SocketAddr) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, "static upstream: failure reported (no coordinator to ask)");
    }
}

/// Timeouts of the [`FetchChain`].
#[derive(Clone, Debug)]
pub struct ChainOptions {
    /// A peer that makes no progress for this long is given up for the block.
    pub stall_timeout: Duration,
    /// Whole-request timeout of a registry fetch.
    pub fetch_timeout: Duration,
    /// How long a peer that served corrupt data is skipped.
    pub avoid_corrupt_peer_for: Duration,
    /// How long a peer that could not be reached (refused, reset, stalled, cut off
    /// mid-block) is skipped: the next blocks go straight to the registry instead of each
    /// waiting for a connect timeout, until the coordinator names another parent (a new
    /// address is not skipped) or this passes.
    pub avoid_unreachable_peer_for: Duration,
    /// Longest wait for one block from the parent, keep-alives or not: a safety net under the
    /// parent's own bounds (a parent whose uplink is held by a dead child, or that keeps
    /// saying "coming" and never sends, costs at most this before the registry is asked).
    pub peer_block_deadline: Duration,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            stall_timeout: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(10),
            avoid_corrupt_peer_for: Duration::from_secs(60),
            avoid_unreachable_peer_for: Duration::from_secs(3),
            peer_block_deadline: Duration::from_secs(30),
        }
    }
}

/// True for a peer failure that says nothing about the block and everything about the
/// peer: it could not be reached, stalled, or cut the answer short. An error status the
/// peer answered (unknown layer, unavailable...) is not one: the peer is alive.
fn is_unreachable(e: &LazyError) -> bool {
    match e {
        LazyError::PeerStalled { .. } | LazyError::Protocol(_) => true,
        LazyError::Peer { reason, .. } => !reason.starts_with("answered"),
        _ => false,
    }
}

/// What a peer answers when asked for a block it fetches from the asker: the two views of
/// the tree disagree for a moment (a swap in a stripe tree), and waiting would deadlock.
pub const REFUSED_AS_UPSTREAM: &str = "you are my upstream for this block";

fn is_refused_as_upstream(e: &LazyError) -> bool {
    matches!(e, LazyError::Peer { reason, .. } if reason.contains(REFUSED_AS_UPSTREAM))
}

/// Why a fetch from a parent was given up because the tree no longer names that parent.
const PARENT_REPLACED: &str = "no longer this block's parent";

/// How many times one block follows its parent to a new one before it is read from the
/// registry.
const MAX_PARENT_MOVES: u32 = 4;

/// How often a fetch waiting on a parent checks that the tree still names it.
const PARENT_CHECK: Duration = Duration::from_millis(100);

fn is_parent_replaced(e: &LazyError) -> bool {
    matches!(e, LazyError::Peer { reason, .. } if reason.contains(PARENT_REPLACED))
}

/// Checks stored bytes against the block table entry.
pub fn verify_block(
    layer: &LayerRef,
    index: usize,
    entry: &BlockEntry,
    stored: &[u8],
    source: Source,
) -> Result<()> {
    let actual = faasnet_format::sha256_digest(stored);
    if stored.len() as u64 != entry.stored_len || actual != entry.digest {
        return Err(LazyError::DigestMismatch {
            layer: layer.digest.clone(),
            index,
            source_name: source.as_str(),
            expected: entry.digest.clone(),
            actual: if stored.len() as u64 != entry.stored_len {
                format!(
                    "{actual} ({} bytes, expected {})",
                    stored.len(),
                    entry.stored_len
                )
            } else {
                actual
            },
        });
    }
    Ok(())
}

/// Fetches blocks of one function's layers in order: the upstream peer (if any), then the
/// registry. The local cache comes before both; it is the block store's.
///
/// Every block is checked against its TOC digest here. When the peer fails, stalls or
/// serves a block that does not match, the block is fetched from the registry instead, the
/// fallback is counted and the [`UpstreamProvider`] is told, so it can ask for another
/// parent; a peer that served corrupt data is skipped for a while.
pub struct FetchChain {
    registry: Arc<RegistrySource>,
    upstream: Arc<dyn UpstreamProvider>,
    options: ChainOptions,
    metrics: Arc<LazyMetrics>,
    /// One connection pool per peer address.
    peers: Mutex<HashMap<SocketAddr, Arc<PeerSource>>>,
    /// Peers that served corrupt data, until when they are skipped.
    avoided: Mutex<HashMap<SocketAddr, Instant>>,
    /// Sibling exchange with the other child of our parent, if enabled.
    siblings: Option<Arc<Siblings>>,
    /// Odd blocks from the second stripe tree's parent, if enabled.
    stripes: bool,
}

impl FetchChain {
    /// A chain over `registry` with the upstream `upstream`.
    pub fn new(
        registry: Arc<RegistrySource>,
        upstream: Arc<dyn UpstreamProvider>,
        options: ChainOptions,
        metrics: Arc<LazyMetrics>,
    ) -> Self {
        FetchChain {
            registry,
            upstream,
            options,
            metrics,
            peers: Mutex::new(HashMap::new()),
            avoided: Mutex::new(HashMap::new()),
            siblings: None,
            stripes: false,
        }
    }

    /// Takes odd blocks from the upstream's second stripe tree (see
    /// [`UpstreamProvider::second`]) instead of the function tree's parent.
    pub fn with_stripes(mut self) -> Self {
        self.stripes = true;
        self
    }

    /// The upstream that block `index` comes from: the second stripe tree's for an odd
    /// block when stripes are on and the control plane sent one, else the function tree's.
    fn upstream_for(&self, index: usize) -> Upstream {
        if self.stripes && index % 2 == 1 {
            if let Some(second) = self.upstream.second() {
                return second;
            }
        }
        self.upstream.current()
    }

    /// The peer to ask for block `index` now, if any and not avoided (`None`: the registry).
    pub fn peer_for(&self, index: usize) -> Option<SocketAddr> {
        self.unless_avoided(self.upstream_for(index))
    }

    /// With stripe trees on: whether a request for block `index` from a node at address `ip`
    /// must be refused because this node fetches that block from `ip` itself (a parent and a
    /// child that swapped places in a stripe tree see the swap at different moments; serving
    /// would make each wait for the other). Peers are told apart by IP, one VM per address.
    pub fn asker_is_my_upstream(&self, index: usize, ip: std::net::IpAddr) -> bool {
        self.stripes
            && matches!(self.upstream_for(index), Upstream::Peer { addr, .. } if addr.ip() == ip)
    }

    /// Whose start order this node follows: the function tree's parent, else (with stripes,
    /// at the function tree's root) the second stripe tree's parent.
    pub fn order_source(&self) -> Option<SocketAddr> {
        self.current_peer()
            .or_else(|| self.stripes.then(|| self.peer_for(1)).flatten())
    }

    /// Whether this node reads every block from the registry (the root of every tree it is
    /// in, or its parents are avoided): it may then coalesce registry requests.
    pub fn registry_for_all(&self) -> bool {
        self.peer_for(0).is_none() && (!self.stripes || self.peer_for(1).is_none())
    }

    /// Splits blocks with the sibling (see [`super::sibling`]).
    pub fn with_siblings(mut self, siblings: Arc<Siblings>) -> Self {
        self.siblings = Some(siblings);
        self
    }

    /// With stripe trees on: the parent in the tree that block `index` does not come down,
    /// if it is a peer, not avoided and not the one asked first (the last resort when the
    /// registry fails).
    fn other_tree_peer(&self, index: usize) -> Option<SocketAddr> {
        if !self.stripes {
            return None;
        }
        let second = self.upstream.second()?;
        let other = if index % 2 == 1 {
            self.upstream.current()
        } else {
            second
        };
        let addr = self.unless_avoided(other)?;
        (Some(addr) != self.peer_for(index)).then_some(addr)
    }

    /// Whether this node fetches block `index` from its own upstream (the parent, or the
    /// registry at the root), rather than from its sibling.
    pub fn owns(&self, index: usize) -> bool {
        match (&self.siblings, self.current_peer()) {
            (Some(s), Some(parent)) => s.owns(parent, index),
            _ => true,
        }
    }

    /// The sibling to ask for block `index`, if the split says so and it is not avoided.
    fn sibling_for(&self, parent: SocketAddr, index: usize) -> Option<SocketAddr> {
        // Prefetch goes to the parent, which serves it last anyway.
        if matches!(FETCH_PURPOSE.try_with(|p| *p), Ok(Purpose::Prefetch)) {
            return None;
        }
        let split = self.siblings.as_ref()?.split(parent)?;
        if split.owns(index) {
            return None;
        }
        match self.avoided.lock().unwrap().get(&split.sibling) {
            Some(until) if Instant::now() < *until => None,
            _ => Some(split.sibling),
        }
    }

    /// Block `index` from the sibling, bounded by [`SIBLING_DEADLINE`] whatever its
    /// keep-alives; `None` (after logging) when it does not deliver a verified block.
    async fn fetch_from_sibling(
        &self,
        sibling: SocketAddr,
        parent: SocketAddr,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
    ) -> Option<Bytes> {
        let start = Instant::now();
        let source = self.peer_source(sibling);
        let class = FETCH_PURPOSE
            .try_with(|p| p.class())
            .unwrap_or(Class::Urgent);
        let fetch = source.fetch_op(layer, index, entry, Op::get_block(class, true));
        let result = match tokio::time::timeout(SIBLING_DEADLINE, fetch).await {
            Ok(r) => r,
            Err(_) => Err(LazyError::Timeout {
                what: format!("{layer} block {index} from sibling {sibling}"),
                timeout_ms: SIBLING_DEADLINE.as_millis() as u64,
            }),
        };
        let result =
            result.and_then(|b| verify_block(layer, index, entry, &b, Source::Peer).map(|()| b));
        match result {
            Ok(b) => {
                self.metrics.sibling_blocks.inc();
                self.metrics
                    .fetch_latency(Source::Peer, start.elapsed().as_secs_f64());
                Some(b)
            }
            Err(e) => {
                debug!(%sibling, error = %e, "sibling fetch failed; asking the parent");
                // A refusal ("not in this node's half") is not avoided: views differ for a
                // moment.
                if self.avoid_after(sibling, &e) {
                    if let Some(s) = &self.siblings {
                        s.forget(parent);
                    }
                }
                None
            }
        }
    }

    /// Skips `peer` for a while after error `e` if the error says something about the peer
    /// (it served corrupt data: long; it could not be reached: short); true if it does.
    fn avoid_after(&self, peer: SocketAddr, e: &LazyError) -> bool {
        let avoid_for = match e {
            LazyError::DigestMismatch { .. } => {
                self.metrics.digest_failures.inc();
                self.options.avoid_corrupt_peer_for
            }
            e if is_unreachable(e) => self.options.avoid_unreachable_peer_for,
            _ => return false,
        };
        let until = Instant::now() + avoid_for;
        let mut avoided = self.avoided.lock().unwrap();
        // Never shorten a longer ban (a corrupt peer that then dies).
        let entry = avoided.entry(peer).or_insert(until);
        *entry = (*entry).max(until);
        drop(avoided);
        self.peers.lock().unwrap().remove(&peer);
        true
    }

    /// How long a peer may make no progress before it is given up.
    pub fn stall_timeout(&self) -> Duration {
        self.options.stall_timeout
    }

    /// The registry source (for the TOC and coalesced prefetch).
    pub fn registry(&self) -> &Arc<RegistrySource> {
        &self.registry
    }

    /// The upstream provider.
    pub fn upstream(&self) -> &Arc<dyn UpstreamProvider> {
        &self.upstream
    }

    /// The function tree's parent to ask now, if any and not avoided.
    pub fn current_peer(&self) -> Option<SocketAddr> {
        self.unless_avoided(self.upstream.current())
    }

    fn unless_avoided(&self, upstream: Upstream) -> Option<SocketAddr> {
        match upstream {
            Upstream::Root => None,
            Upstream::Peer { addr, .. } => {
                let mut avoided = self.avoided.lock().unwrap();
                match avoided.get(&addr) {
                    Some(until) if Instant::now() < *until => None,
                    Some(_) => {
                        avoided.remove(&addr);
                        Some(addr)
                    }
                    None => Some(addr),
                }
            }
        }
    }

    fn peer_source(&self, addr: SocketAddr) -> Arc<PeerSource> {
        self.peers
            .lock()
            .unwrap()
            .entry(addr)
            .or_insert_with(|| Arc::new(PeerSource::new(addr, self.options.stall_timeout)))
            .clone()
    }

    /// Fetches and verifies block `index`; returns its stored bytes and where they came from.
    pub async fn fetch(
        &self,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
    ) -> Result<(Bytes, Source)> {
        let span = tracing::debug_span!("fetch_block", layer = %layer.digest, index);
        async move {
            let wanted_peer = matches!(self.upstream_for(index), Upstream::Peer { .. });
            if let (Some(parent), false) = (self.current_peer(), self.stripes) {
                if let Some(sibling) = self.sibling_for(parent, index) {
                    if let Some(b) = self
                        .fetch_from_sibling(sibling, parent, layer, index, entry)
                        .await
                    {
                        return Ok((b, Source::Peer));
                    }
                }
            }
            // A parent the tree replaces while we wait hands the block on to the new one
            // (a few times at most: joins move the trees several times a second).
            let mut next_parent = self.peer_for(index);
            let mut moves = 0;
            while let Some(addr) = next_parent.take() {
                match self.fetch_from_parent(addr, layer, index, entry).await {
                    Ok(b) => return Ok((b, Source::Peer)),
                    // The parent refused: it fetches this block from us (views of the tree
                    // differ for a moment); no fault of the parent.
                    Err(e) if is_refused_as_upstream(&e) => {
                        debug!(%addr, index, "parent fetches this block from us; asking the registry")
                    }
                    // The tree moved on while we waited; no fault of the former parent.
                    Err(e) if is_parent_replaced(&e) => {
                        moves += 1;
                        if moves <= MAX_PARENT_MOVES {
                            next_parent = self.peer_for(index);
                        }
                        debug!(%addr, index, next = ?next_parent, "the tree replaced this block's parent");
                    }
                    Err(e) => {
                        warn!(%addr, error = %e, "peer fetch failed; falling back to the registry");
                        self.avoid_after(addr, &e);
                        // Stale pooled connections to a failed peer are of no use.
                        self.peers.lock().unwrap().remove(&addr);
                        // The coordinator checks the parent (of either stripe tree) and
                        // repairs the trees if it is gone.
                        self.upstream.report_failure(addr);
                    }
                }
            }
            if wanted_peer {
                self.metrics.peer_fallbacks.inc();
            }
            let registry_error = match self.fetch_from_registry(layer, index, entry).await {
                Ok(b) => return Ok((b, Source::Registry)),
                Err(e) => e,
            };
            // With stripe trees, the other tree's parent may hold the block (or get it from
            // its own upstream) while the registry is down: a start must not need the
            // registry for blocks the tree already has.
            if let Some(addr) = self.other_tree_peer(index) {
                warn!(%addr, index, error = %registry_error, "registry fetch failed; asking the other stripe tree's parent");
                match self.fetch_from_peer(addr, layer, index, entry).await {
                    Ok(b) => return Ok((b, Source::Peer)),
                    Err(e) => {
                        debug!(%addr, index, error = %e, "other stripe tree's parent failed too");
                        self.avoid_after(addr, &e);
                    }
                }
            }
            Err(registry_error)
        }
        .instrument(span)
        .await
    }

    /// [`Self::fetch_from_peer`] from this block's parent, given up as soon as the tree names
    /// another parent for it. While the trees change (VMs joining at once), fetches made to
    /// parents of different epochs can form a circle longer than the two VMs the peer
    /// server's refusal catches (measured: four VMs, each waiting on the next with
    /// keep-alives until the 30 s deadline; docs/data/perhop-n16-25mbit-unprofiled.md). The
    /// current tree has no circle, so every circle has an edge to a replaced parent, and
    /// dropping that fetch breaks it.
    async fn fetch_from_parent(
        &self,
        addr: SocketAddr,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
    ) -> Result<Bytes> {
        let fetch = self.fetch_from_peer(addr, layer, index, entry);
        tokio::pin!(fetch);
        let mut check = tokio::time::interval(PARENT_CHECK);
        loop {
            tokio::select! {
                r = &mut fetch => return r,
                _ = check.tick() => {
                    let still = matches!(self.upstream_for(index), Upstream::Peer { addr: a, .. } if a == addr);
                    if !still {
                        return Err(LazyError::Peer {
                            peer: addr.to_string(),
                            reason: format!("block {index}: {PARENT_REPLACED}"),
                        });
                    }
                }
            }
        }
    }

    async fn fetch_from_peer(
        &self,
        addr: SocketAddr,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
    ) -> Result<Bytes> {
        let start = Instant::now();
        let deadline = self.options.peer_block_deadline;
        let b = tokio::time::timeout(deadline, self.peer_source(addr).fetch(layer, index, entry))
            .await
            .map_err(|_| LazyError::Peer {
                peer: addr.to_string(),
                reason: format!(
                    "block {index} not sent within {} ms (keep-alives only)",
                    deadline.as_millis()
                ),
            })??;
        verify_block(layer, index, entry, &b, Source::Peer)?;
        self.metrics
            .fetch_latency(Source::Peer, start.elapsed().as_secs_f64());
        Ok(b)
    }

    async fn fetch_from_registry(
        &self,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
    ) -> Result<Bytes> {
        let start = Instant::now();
        let timeout_ms = self.options.fetch_timeout.as_millis() as u64;
        let b = tokio::time::timeout(
            self.options.fetch_timeout,
            self.registry.fetch(layer, index, entry),
        )
        .await
        .map_err(|_| LazyError::Timeout {
            what: format!("{layer} block {index} from the registry"),
            timeout_ms,
        })??;
        if let Err(e) = verify_block(layer, index, entry, &b, Source::Registry) {
            self.metrics.digest_failures.inc();
            return Err(e);
        }
        self.metrics
            .fetch_latency(Source::Registry, start.elapsed().as_secs_f64());
        Ok(b)
    }

    /// Fetches blocks `first..first + entries.len()` from the registry in one range request
    /// (runs at the root: prefetch, and a profiled layer's start blocks), verifying each and
    /// handing it to `on_block` as soon as it is in. Returns how many were handed over; on an
    /// error the rest did not come (and a block that failed its digest was not handed over).
    pub async fn fetch_run_from_registry(
        &self,
        layer: &LayerRef,
        first: usize,
        entries: &[BlockEntry],
        on_block: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<usize> {
        let start = Instant::now();
        let timeout = self.options.fetch_timeout * (entries.len() as u32).max(1);
        let metrics = self.metrics.clone();
        let mut verified = |index: usize, b: Bytes| -> Result<()> {
            if let Err(e) =
                verify_block(layer, index, &entries[index - first], &b, Source::Registry)
            {
                metrics.digest_failures.inc();
                return Err(e);
            }
            on_block(index, b);
            Ok(())
        };
        let n = tokio::time::timeout(
            timeout,
            self.registry
                .fetch_blocks_each(layer, first, entries, &mut verified),
        )
        .await
        .map_err(|_| LazyError::Timeout {
            what: format!(
                "{layer} blocks {first}..{} from the registry",
                first + entries.len()
            ),
            timeout_ms: timeout.as_millis() as u64,
        })??;
        self.metrics
            .fetch_latency(Source::Registry, start.elapsed().as_secs_f64());
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lazy::peer_protocol;
    use crate::lazy::registry_source::RegistryOptions;

    /// A control plane with a fixed parent in each stripe tree.
    struct TwoTrees {
        first: Upstream,
        second: Option<Upstream>,
    }

    impl UpstreamProvider for TwoTrees {
        fn current(&self) -> Upstream {
            self.first
        }
        fn second(&self) -> Option<Upstream> {
            self.second
        }
        fn report_failure(&self, _peer: SocketAddr) {}
    }

    /// A chain over `upstream` with a registry client that is never reached in these tests.
    fn chain_over(upstream: Arc<dyn UpstreamProvider>, options: ChainOptions) -> FetchChain {
        let registry = RegistrySource::new(RegistryOptions {
            insecure_registries: vec![],
            timeout: None,
        })
        .unwrap();
        FetchChain::new(
            Arc::new(registry),
            upstream,
            options,
            Arc::new(LazyMetrics::default()),
        )
    }

    fn chain(first: Upstream, second: Option<Upstream>, stripes: bool) -> FetchChain {
        let c = chain_over(
            Arc::new(TwoTrees { first, second }),
            ChainOptions::default(),
        );
        if stripes {
            c.with_stripes()
        } else {
            c
        }
    }

    fn peer(addr: &str) -> Upstream {
        Upstream::Peer {
            addr: addr.parse().unwrap(),
            epoch: 1,
        }
    }

    #[test]
    fn stripes_route_odd_blocks_to_the_second_tree() {
        let (a, b) = ("10.0.0.1:9112", "10.0.0.2:9112");
        let c = chain(peer(a), Some(peer(b)), true);
        assert_eq!(c.peer_for(0), Some(a.parse().unwrap()));
        assert_eq!(c.peer_for(7), Some(b.parse().unwrap()));
        assert!(!c.registry_for_all());
        // The root of the second tree reads odd blocks from the registry, even ones from
        // its parent in the function tree, and follows that parent's start order.
        let c = chain(peer(a), Some(Upstream::Root), true);
        assert_eq!(c.peer_for(1), None);
        assert_eq!(c.peer_for(2), Some(a.parse().unwrap()));
        assert_eq!(c.order_source(), Some(a.parse().unwrap()));
        // The function tree's root follows its second-tree parent.
        let c = chain(Upstream::Root, Some(peer(b)), true);
        assert_eq!(c.order_source(), Some(b.parse().unwrap()));
        assert!(!c.registry_for_all());
        // Root of both: everything from the registry, in coalesced runs.
        assert!(chain(Upstream::Root, Some(Upstream::Root), true).registry_for_all());
    }

    #[test]
    fn without_stripes_or_a_second_tree_every_block_comes_from_the_parent() {
        let (a, b) = ("10.0.0.1:9112", "10.0.0.2:9112");
        let off = chain(peer(a), Some(peer(b)), false);
        let old_coordinator = chain(peer(a), None, true);
        for c in [off, old_coordinator] {
            assert_eq!(c.peer_for(1), Some(a.parse().unwrap()));
            assert_eq!(c.order_source(), Some(a.parse().unwrap()));
        }
    }

    #[test]
    fn a_request_from_my_stripe_parent_is_refused_only_with_stripes() {
        let (a, b) = ("10.0.0.1:9112", "10.0.0.2:9112");
        let c = chain(peer(a), Some(peer(b)), true);
        let ip_b = "10.0.0.2".parse().unwrap();
        assert!(
            c.asker_is_my_upstream(3, ip_b),
            "odd block: b is my upstream"
        );
        assert!(!c.asker_is_my_upstream(4, ip_b), "even block: a is");
        assert!(!chain(peer(a), Some(peer(b)), false).asker_is_my_upstream(3, ip_b));
    }

    #[test]
    fn when_the_registry_fails_the_other_trees_parent_is_the_last_resort() {
        let (a, b) = ("10.0.0.1:9112", "10.0.0.2:9112");
        // Root of the second tree: odd blocks from the registry, else the function tree's
        // parent; even blocks from that parent, with no second peer to turn to.
        let c = chain(peer(a), Some(Upstream::Root), true);
        assert_eq!(c.other_tree_peer(1), Some(a.parse().unwrap()));
        assert_eq!(c.other_tree_peer(2), None);
        // Root of the function tree: even blocks fall back to the second-tree parent.
        let c = chain(Upstream::Root, Some(peer(b)), true);
        assert_eq!(c.other_tree_peer(2), Some(b.parse().unwrap()));
        assert_eq!(c.other_tree_peer(1), None);
        // Both parents are peers: each is the other's stand-in.
        let c = chain(peer(a), Some(peer(b)), true);
        assert_eq!(c.other_tree_peer(1), Some(a.parse().unwrap()));
        assert_eq!(c.other_tree_peer(2), Some(b.parse().unwrap()));
        // Without stripes there is one tree.
        assert_eq!(
            chain(Upstream::Root, Some(peer(b)), false).other_tree_peer(2),
            None
        );
    }

    /// A control plane whose second-tree parent can be replaced.
    struct Movable {
        second: Mutex<Upstream>,
    }

    impl UpstreamProvider for Movable {
        fn current(&self) -> Upstream {
            Upstream::Root
        }
        fn second(&self) -> Option<Upstream> {
            Some(*self.second.lock().unwrap())
        }
        fn report_failure(&self, _peer: SocketAddr) {}
    }

    #[tokio::test]
    async fn a_fetch_waiting_on_a_replaced_parent_is_given_up() {
        use tokio::io::AsyncWriteExt;
        // A parent that only ever sends keep-alives: it waits for a block itself (in the
        // measured case, on a circle of VMs waiting for each other).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let parent = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let h =
                        peer_protocol::encode_response_header(peer_protocol::Status::KeepAlive, 0);
                    while conn.write_all(&h).await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
        });
        let upstream = Arc::new(Movable {
            second: Mutex::new(Upstream::Peer {
                addr: parent,
                epoch: 1,
            }),
        });
        let options = ChainOptions {
            peer_block_deadline: Duration::from_secs(60),
            ..ChainOptions::default()
        };
        let c = chain_over(upstream.clone(), options).with_stripes();
        let layer = LayerRef {
            registry: "127.0.0.1:1".into(),
            repository: "t".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
        };
        let entry = BlockEntry {
            offset: 0,
            stored_len: 10,
            raw_len: 10,
            digest: format!("sha256:{}", "0".repeat(64)),
        };
        let mover = upstream.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            *mover.second.lock().unwrap() = Upstream::Root;
        });
        // Without the check it would wait for the 60 s deadline and fail as a stall.
        let e = c
            .fetch_from_parent(parent, &layer, 1, &entry)
            .await
            .unwrap_err();
        assert!(is_parent_replaced(&e), "{e}");
    }

    #[test]
    fn unreachable_peers_are_told_apart_from_answers() {
        let peer = |reason: &str| LazyError::Peer {
            peer: "10.0.0.1:9112".into(),
            reason: reason.into(),
        };
        assert!(is_unreachable(&peer(
            "connect: Connection refused (os error 111)"
        )));
        assert!(is_unreachable(&peer("connection closed mid-response")));
        assert!(is_unreachable(&LazyError::PeerStalled {
            peer: "10.0.0.1:9112".into(),
            timeout_ms: 2000
        }));
        assert!(is_unreachable(&LazyError::Protocol("bad magic".into())));
        // The peer is alive and said so: not avoided.
        assert!(!is_unreachable(&peer(
            "answered UnknownLayer: not registered"
        )));
        assert!(!is_unreachable(&LazyError::Timeout {
            what: "x".into(),
            timeout_ms: 1
        }));
    }
}
