//! Serves the blocks of the layers this node has to its children in the function tree.
//!
//! A request for a block this node lacks is fetched once through the layer's own
//! [`BlockStore`] (the same single flight as local reads) and answered as soon as the block
//! is whole: the pipelining of the paper. While waiting, the server sends keep-alives so the
//! child's stall timeout does not fire on a deep tree. Only registered layers are served.
//!
//! A request for a layer that is not registered (yet) waits up to [`LAYER_GRACE`] for it,
//! with keep-alives: when a function starts on many VMs at once, a child often mounts a layer
//! a moment before its parent does, and answering "unknown layer" at once would send the
//! child to the registry for that block. A layer that did not come within the grace is
//! answered "unknown" at once afterwards, until it is registered.
//!
//! The uplink is shared by all children, so it gives strict priority to urgent blocks: a block
//! requested for prefetch is written only while no urgent block is being written. Otherwise a
//! child's start would queue behind its sibling's prefetch.
//!
//! Because the uplink carries one block at a time, a child that stops reading (cut off by a
//! partition, frozen) must not hold it: every write is bounded by [`WRITE_STALL`] and the
//! kernel drops a connection whose data stays unacknowledged
//! ([`super::peer_link::UNACKED_TIMEOUT`]). Without these bounds one dead child stalled its
//! siblings' starts for TCP's own timeout, a quarter of an hour.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::Notify,
    task::JoinSet,
};
use tracing::{debug, info, trace, warn, Instrument};

use super::{
    block_source::REFUSED_AS_UPSTREAM,
    block_store::{BlockStore, Purpose},
    metrics::LazyMetrics,
    peer_link::{bound_unacked, write_all_progressing},
    peer_protocol::{
        self, Class, Op, Status, KEEPALIVE_INTERVAL_MS, MAX_ORDER_BATCH, REQUEST_HEADER_LEN,
    },
    sibling::Children,
    LazyError, Result,
};

/// Idle time after which a child's connection is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A write to a child that makes no progress for this long ends the connection (the child
/// stopped reading), so it frees the uplink for the other children.
pub const WRITE_STALL: Duration = Duration::from_secs(4);
/// How long a request for a layer that is not registered waits for it (well below a
/// child's fetch timeout, so a child whose parent never mounts the layer loses little).
pub const LAYER_GRACE: Duration = Duration::from_secs(6);

struct Shared {
    layers: RwLock<HashMap<String, Arc<BlockStore>>>,
    /// Layers a request waited for in vain: answered "unknown" at once until registered.
    given_up: RwLock<HashSet<String>>,
    /// Woken when a layer is registered.
    registered: Notify,
    uplink: Uplink,
    /// This node's children, from their hellos (sibling exchange).
    children: Children,
    /// Children whose write stalled lately.
    not_reading: NotReading,
    metrics: Arc<LazyMetrics>,
}

/// This node's uplink, shared by its children: one block is written at a time, urgent blocks
/// first, then blocks the start order named, then prefetch; first come first served within
/// a class. One at a time keeps the link's queue short (several blocks written at once sit
/// in the link's queue together, and so does everything this node sends meanwhile: its own
/// requests upstream wait behind them) and finishes the first block first.
#[derive(Default)]
struct Uplink {
    state: Mutex<UplinkState>,
    changed: Notify,
}

#[derive(Default)]
struct UplinkState {
    busy: bool,
    seq: u64,
    /// Writers waiting for their turn, in the order they get it.
    waiting: BTreeSet<(Class, u64)>,
}

impl Uplink {
    /// Waits for the turn of a block of `class`; the uplink is this writer's until the turn
    /// drops. Cancel-safe: a writer that gives up leaves the queue.
    async fn turn(&self, class: Class) -> UplinkTurn<'_> {
        let key = {
            let mut s = self.state.lock().unwrap();
            s.seq += 1;
            let key = (class, s.seq);
            s.waiting.insert(key);
            key
        };
        let mut waiter = Waiter {
            uplink: self,
            key,
            served: false,
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.state.lock().unwrap();
                if !s.busy && s.waiting.first() == Some(&key) {
                    s.waiting.remove(&key);
                    s.busy = true;
                    waiter.served = true;
                    return UplinkTurn(self);
                }
            }
            changed.await;
        }
    }
}

/// A writer in the uplink's queue; leaves it when dropped before its turn came.
struct Waiter<'a> {
    uplink: &'a Uplink,
    key: (Class, u64),
    served: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if !self.served {
            self.uplink.state.lock().unwrap().waiting.remove(&self.key);
            self.uplink.changed.notify_waiters();
        }
    }
}

/// The uplink is this writer's until dropped.
struct UplinkTurn<'a>(&'a Uplink);

impl Drop for UplinkTurn<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().busy = false;
        self.0.changed.notify_waiters();
    }
}

/// Children (by address: a child has several connections) a block write stalled to lately.
/// Their other connections are dropped when their turn on the uplink comes instead of each
/// holding it for another [`WRITE_STALL`]; by the time the mark expires the kernel has dropped
/// any connection of theirs with data in flight ([`super::peer_link::UNACKED_TIMEOUT`]).
#[derive(Default)]
struct NotReading(Mutex<HashMap<IpAddr, std::time::Instant>>);

impl NotReading {
    fn mark(&self, ip: IpAddr) {
        let until = std::time::Instant::now() + super::peer_link::UNACKED_TIMEOUT;
        self.0.lock().unwrap().insert(ip, until);
    }

    fn is_marked(&self, ip: IpAddr) -> bool {
        let mut marks = self.0.lock().unwrap();
        match marks.get(&ip) {
            Some(until) if std::time::Instant::now() < *until => true,
            Some(_) => {
                marks.remove(&ip);
                false
            }
            None => false,
        }
    }
}

impl Shared {
    fn layer(&self, digest: &str) -> Option<Arc<BlockStore>> {
        self.layers.read().unwrap().get(digest).cloned()
    }
}

/// The block server of this node.
pub struct PeerServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PeerServer {
    /// Binds `addr` and starts serving (port 0 picks a free port; see [`Self::local_addr`]).
    pub async fn bind(addr: SocketAddr, metrics: Arc<LazyMetrics>) -> Result<PeerServer> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| LazyError::io(format!("peer server: bind {addr}"), e))?;
        Self::start(listener, metrics)
    }

    /// Like [`Self::bind`], from synchronous code running inside a tokio runtime.
    pub fn bind_std(addr: SocketAddr, metrics: Arc<LazyMetrics>) -> Result<PeerServer> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| LazyError::io(format!("peer server: bind {addr}"), e))?;
        let listener = TcpListener::from_std(listener)
            .map_err(|e| LazyError::io(format!("peer server: bind {addr}"), e))?;
        Self::start(listener, metrics)
    }

    fn start(listener: TcpListener, metrics: Arc<LazyMetrics>) -> Result<PeerServer> {
        let addr = listener
            .local_addr()
            .map_err(|e| LazyError::io("peer server: local address", e))?;
        let shared = Arc::new(Shared {
            layers: RwLock::new(HashMap::new()),
            given_up: RwLock::new(HashSet::new()),
            registered: Notify::new(),
            uplink: Uplink::default(),
            children: Children::default(),
            not_reading: NotReading::default(),
            metrics,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        info!(%addr, "peer server listening");
        Ok(PeerServer { shared, addr, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `store`'s layer from now on.
    pub fn register(&self, store: Arc<BlockStore>) {
        let digest = store.layer().digest.clone();
        self.shared.given_up.write().unwrap().remove(&digest);
        self.shared.layers.write().unwrap().insert(digest, store);
        self.shared.registered.notify_waiters();
    }

    /// Stops serving layer `digest`.
    pub fn unregister(&self, digest: &str) {
        self.shared.layers.write().unwrap().remove(digest);
    }

    /// Whether layer `digest` is served.
    pub fn is_registered(&self, digest: &str) -> bool {
        self.shared.layers.read().unwrap().contains_key(digest)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    bound_unacked(&stream);
                    let span = tracing::debug_span!("peer_conn", %peer);
                    conns.spawn(serve_conn(stream, peer, shared.clone()).instrument(span));
                }
                Err(e) => {
                    warn!(error = %e, "peer server: accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(mut stream: TcpStream, child: SocketAddr, shared: Arc<Shared>) {
    if let Err(e) = serve_requests(&mut stream, child, &shared).await {
        debug!(error = %e, "peer connection closed");
    }
}

async fn serve_requests(stream: &mut TcpStream, child: SocketAddr, shared: &Shared) -> Result<()> {
    let io = |e| LazyError::io("peer connection", e);
    loop {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut header)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r.map_err(io)?,
        };
        let rest = match peer_protocol::decode_request_header(&header) {
            Ok(n) => n,
            Err(e) => {
                // The stream is out of sync: answer and hang up.
                let msg = encode_err(Status::BadRequest, &e.to_string());
                write_all_progressing(stream, &msg, WRITE_STALL)
                    .await
                    .map_err(io)?;
                return Err(LazyError::Protocol(e.0));
            }
        };
        let mut buf = header.to_vec();
        buf.resize(REQUEST_HEADER_LEN + rest, 0);
        stream
            .read_exact(&mut buf[REQUEST_HEADER_LEN..])
            .await
            .map_err(io)?;
        let req = match peer_protocol::decode_request(&buf) {
            Ok(Some((req, _))) => req,
            Ok(None) | Err(_) => {
                let msg = encode_err(Status::BadRequest, "malformed request");
                write_all_progressing(stream, &msg, WRITE_STALL)
                    .await
                    .map_err(io)?;
                return Err(LazyError::Protocol("malformed request".into()));
            }
        };
        if req.op == Op::Hello {
            let answer = shared.children.hello(&req.digest).encode();
            let msg = peer_protocol::encode_response(Status::Ok, &answer);
            write_all_progressing(stream, &msg, WRITE_STALL)
                .await
                .map_err(io)?;
            continue;
        }
        let store = match shared.layer(&req.digest) {
            Some(store) => Some(store),
            None => wait_for_layer(stream, shared, &req.digest).await?,
        };
        let Some(store) = store else {
            shared.metrics.serve_errors.inc();
            let msg = encode_err(
                Status::UnknownLayer,
                &format!("layer {} is not served by this node", req.digest),
            );
            write_all_progressing(stream, &msg, WRITE_STALL)
                .await
                .map_err(io)?;
            continue;
        };
        if req.op == Op::StartOrder {
            // The connection is the child's start-order stream from now on.
            return serve_follow(stream, &store, req.index as usize).await;
        }
        let index = req.index as usize;
        trace!(layer = %req.digest, index, op = ?req.op, "block asked");
        if index >= store.block_count() {
            shared.metrics.serve_errors.inc();
            let msg = encode_err(
                Status::BadIndex,
                &format!("layer has {} blocks", store.block_count()),
            );
            write_all_progressing(stream, &msg, WRITE_STALL)
                .await
                .map_err(io)?;
            continue;
        }
        // A sibling gets only blocks this node fetches from the parent itself (or holds):
        // anything else would be asked of the sibling again.
        if req.op.is_from_sibling() && !store.has_block(index) && !store.chain().owns(index) {
            let msg = encode_err(Status::Unavailable, "not in this node's half");
            write_all_progressing(stream, &msg, WRITE_STALL)
                .await
                .map_err(io)?;
            continue;
        }
        if !store.has_block(index) && store.chain().asker_is_my_upstream(index, child.ip()) {
            let msg = encode_err(Status::Unavailable, REFUSED_AS_UPSTREAM);
            write_all_progressing(stream, &msg, WRITE_STALL)
                .await
                .map_err(io)?;
            continue;
        }
        // A block is fetched here (if need be) for what the child wants it for: an urgent
        // request competes with local reads, a prefetch request is prefetch here too.
        let class = req.op.class().unwrap_or(Class::Urgent);
        let purpose = match class {
            Class::Urgent => Purpose::OnDemand,
            Class::Followed => Purpose::Follow,
            Class::Prefetch => Purpose::Prefetch,
        };
        let fetch = store.stored_block(index, purpose);
        tokio::pin!(fetch);
        let mut keepalive = tokio::time::interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS));
        keepalive.tick().await; // the first tick is immediate
        let result = loop {
            tokio::select! {
                r = &mut fetch => break r,
                _ = keepalive.tick() => {
                    let h = peer_protocol::encode_response_header(Status::KeepAlive, 0);
                    write_all_progressing(stream, &h, WRITE_STALL).await.map_err(io)?;
                }
            }
        };
        match result {
            Ok(bytes) => {
                // Keep-alives while waiting for the uplink: a long start on a sibling is
                // not a stall.
                let turn = shared.uplink.turn(class);
                tokio::pin!(turn);
                let _turn = loop {
                    tokio::select! {
                        t = &mut turn => break t,
                        _ = keepalive.tick() => {
                            let h = peer_protocol::encode_response_header(Status::KeepAlive, 0);
                            write_all_progressing(stream, &h, WRITE_STALL).await.map_err(io)?;
                        }
                    }
                };
                if shared.not_reading.is_marked(child.ip()) {
                    return Err(LazyError::io(
                        "peer connection",
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "this child stopped reading on another connection",
                        ),
                    ));
                }
                let mut msg =
                    peer_protocol::encode_response_header(Status::Ok, bytes.len() as u32).to_vec();
                msg.extend_from_slice(&bytes);
                if let Err(e) = write_all_progressing(stream, &msg, WRITE_STALL).await {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        warn!(%child, error = %e, "a child stopped reading; its other requests are dropped");
                        shared.not_reading.mark(child.ip());
                    }
                    return Err(io(e));
                }
                // The span names the child; the class tells a follow from a prefetch in a per-hop
                // analysis (hack/bench/perhop_report.py).
                trace!(layer = %req.digest, index, ?class, "block served");
                shared.metrics.served_blocks.inc();
                shared.metrics.served_bytes.inc_by(bytes.len() as u64);
            }
            Err(e) => {
                shared.metrics.serve_errors.inc();
                warn!(layer = %req.digest, index, error = %e, "cannot serve block to a child");
                let msg = encode_err(Status::Unavailable, &e.to_string());
                write_all_progressing(stream, &msg, WRITE_STALL)
                    .await
                    .map_err(io)?;
            }
        }
    }
}

/// Streams `store`'s start order from position `from` on, as it grows, with keep-alives in
/// the pauses, until the child hangs up (docs/lazy.md, "Start order").
async fn serve_follow(stream: &mut TcpStream, store: &BlockStore, from: usize) -> Result<()> {
    let io = |e| LazyError::io("peer connection (start order)", e);
    let order = store.start_order();
    let mut pos = from;
    let mut keepalive = tokio::time::interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS));
    keepalive.tick().await; // the first tick is immediate
    loop {
        let batch = order.since(pos, MAX_ORDER_BATCH);
        if !batch.is_empty() {
            pos += batch.len();
            let msg = peer_protocol::encode_response(
                Status::Ok,
                &peer_protocol::encode_order_batch(&batch),
            );
            write_all_progressing(stream, &msg, WRITE_STALL)
                .await
                .map_err(io)?;
            keepalive.reset();
            continue;
        }
        tokio::select! {
            () = order.grown_past(pos) => {}
            _ = keepalive.tick() => {
                let h = peer_protocol::encode_response_header(Status::KeepAlive, 0);
                write_all_progressing(stream, &h, WRITE_STALL).await.map_err(io)?;
            }
        }
    }
}

/// Waits up to [`LAYER_GRACE`] for layer `digest` to be registered, sending keep-alives;
/// `None` if it did not come (or did not come for an earlier request either).
async fn wait_for_layer(
    stream: &mut TcpStream,
    shared: &Shared,
    digest: &str,
) -> Result<Option<Arc<BlockStore>>> {
    if shared.given_up.read().unwrap().contains(digest) {
        return Ok(None);
    }
    debug!(layer = %digest, "request for a layer not mounted yet; waiting for it");
    let deadline = tokio::time::Instant::now() + LAYER_GRACE;
    let mut keepalive = tokio::time::interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS));
    keepalive.tick().await; // the first tick is immediate
    loop {
        let registered = shared.registered.notified();
        tokio::pin!(registered);
        registered.as_mut().enable();
        if let Some(store) = shared.layer(digest) {
            return Ok(Some(store));
        }
        tokio::select! {
            _ = &mut registered => {}
            _ = keepalive.tick() => {
                let h = peer_protocol::encode_response_header(Status::KeepAlive, 0);
                write_all_progressing(stream, &h, WRITE_STALL)
                    .await
                    .map_err(|e| LazyError::io("peer connection", e))?;
            }
            _ = tokio::time::sleep_until(deadline) => {
                shared.given_up.write().unwrap().insert(digest.to_string());
                return Ok(shared.layer(digest));
            }
        }
    }
}

fn encode_err(status: Status, msg: &str) -> Vec<u8> {
    // Messages are short; cap them anyway so the response stays within the protocol limit.
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    peer_protocol::encode_response(status, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uplink_turns_go_one_at_a_time_by_class() {
        let uplink = Arc::new(Uplink::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        // The uplink is taken; then a prefetch, a followed and two urgent writers queue up.
        let first = uplink.turn(Class::Prefetch).await;
        let mut tasks = Vec::new();
        for (name, class) in [
            ("prefetch", Class::Prefetch),
            ("followed", Class::Followed),
            ("urgent-1", Class::Urgent),
            ("urgent-2", Class::Urgent),
        ] {
            let (uplink, order) = (uplink.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = uplink.turn(class).await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            order.lock().unwrap().is_empty(),
            "nobody writes while it is taken"
        );
        // A writer that gives up leaves the queue without blocking the others.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), uplink.turn(Class::Urgent));
        assert!(gave_up.await.is_err());
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["urgent-1", "urgent-2", "followed", "prefetch"]
        );
    }
}
