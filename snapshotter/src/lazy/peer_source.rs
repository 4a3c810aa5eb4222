//! Blocks from the upstream peer (its [`super::peer_server`]) over TCP.
//!
//! Connections are kept in a small idle pool and reused; each carries one request at a time.
//! Every read and write is bounded by the stall timeout: a peer that says nothing (not even a
//! keep-alive) for that long is given up, whatever the size of the block.

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use faasnet_format::BlockEntry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    block_source::BlockSource,
    block_store::FETCH_PURPOSE,
    peer_link::bound_unacked,
    peer_protocol::{self, BlockRequest, Class, Op, Status, RESPONSE_HEADER_LEN},
    LayerRef, LazyError, Result,
};

/// Idle connections kept per peer.
const MAX_IDLE: usize = 8;

/// A client of one peer's block server.
pub struct PeerSource {
    addr: SocketAddr,
    stall: Duration,
    idle: Mutex<Vec<TcpStream>>,
}

impl PeerSource {
    /// A client of the peer at `addr` giving up after `stall` without progress.
    pub fn new(addr: SocketAddr, stall: Duration) -> Self {
        PeerSource {
            addr,
            stall,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn err(&self, reason: impl Into<String>) -> LazyError {
        LazyError::Peer {
            peer: self.addr.to_string(),
            reason: reason.into(),
        }
    }

    fn stalled(&self) -> LazyError {
        LazyError::PeerStalled {
            peer: self.addr.to_string(),
            timeout_ms: self.stall.as_millis() as u64,
        }
    }

    async fn connect(&self) -> Result<TcpStream> {
        let conn = tokio::time::timeout(self.stall, TcpStream::connect(self.addr))
            .await
            .map_err(|_| self.stalled())?
            .map_err(|e| self.err(format!("connect: {e}")))?;
        let _ = conn.set_nodelay(true);
        bound_unacked(&conn);
        Ok(conn)
    }

    async fn read_exact_stalling(&self, conn: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let n = tokio::time::timeout(self.stall, conn.read(&mut buf[filled..]))
                .await
                .map_err(|_| self.stalled())?
                .map_err(|e| self.err(format!("read: {e}")))?;
            if n == 0 {
                return Err(self.err("connection closed mid-response"));
            }
            filled += n;
        }
        Ok(())
    }

    /// One exchange on `conn`: sends `req`, skips keep-alives, and reads the answer. An `Ok`
    /// answer's length must pass `check_len` before its payload is read. The outer error is
    /// a transport failure (worth a retry on a fresh connection); the inner one is the
    /// peer's answer.
    async fn exchange(
        &self,
        conn: &mut TcpStream,
        req: &BlockRequest,
        check_len: &(dyn Fn(u32) -> std::result::Result<(), String> + Sync),
    ) -> Result<Result<Vec<u8>>> {
        let req = peer_protocol::encode_request(req);
        tokio::time::timeout(self.stall, conn.write_all(&req))
            .await
            .map_err(|_| self.stalled())?
            .map_err(|e| self.err(format!("write: {e}")))?;
        loop {
            let mut h = [0u8; RESPONSE_HEADER_LEN];
            self.read_exact_stalling(conn, &mut h).await?;
            let header = peer_protocol::decode_response_header(&h)
                .map_err(|e| LazyError::Protocol(format!("from {}: {e}", self.addr)))?;
            match header.status {
                Status::KeepAlive => continue,
                Status::Ok => {
                    // The length is bounded by the decoder; the caller bounds it further.
                    // Not read: the connection is unusable, hence the outer error.
                    check_len(header.length).map_err(|e| self.err(e))?;
                    let mut payload = vec![0u8; header.length as usize];
                    self.read_exact_stalling(conn, &mut payload).await?;
                    return Ok(Ok(payload));
                }
                status => {
                    let mut msg = vec![0u8; header.length as usize];
                    self.read_exact_stalling(conn, &mut msg).await?;
                    return Ok(Err(self.err(format!(
                        "answered {status:?}: {}",
                        String::from_utf8_lossy(&msg)
                    ))));
                }
            }
        }
    }

    /// Sends `req` on a pooled connection (retried once on a fresh one if the pooled one
    /// turns out closed) and answers the payload of an `Ok` answer.
    async fn request(
        &self,
        req: &BlockRequest,
        check_len: &(dyn Fn(u32) -> std::result::Result<(), String> + Sync),
    ) -> Result<Vec<u8>> {
        let pooled = self.idle.lock().unwrap().pop();
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        let result = match self.exchange(&mut conn, req, check_len).await {
            // A pooled connection may have been closed by the peer meanwhile: retry once on a
            // fresh one. An answer (even an error status) is final.
            Err(_) if reused => {
                conn = self.connect().await?;
                self.exchange(&mut conn, req, check_len).await?
            }
            other => other?,
        };
        // The connection is in a clean state after any complete answer.
        {
            let mut idle = self.idle.lock().unwrap();
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        result
    }

    /// Fetches block `index` with request op `op` (see [`Op`]).
    pub async fn fetch_op(
        &self,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
        op: Op,
    ) -> Result<Bytes> {
        let req = BlockRequest {
            digest: layer.digest.clone(),
            index: index as u32,
            op,
        };
        // It must be this block's length.
        let check_len = |len: u32| {
            if len as u64 == entry.stored_len {
                Ok(())
            } else {
                Err(format!(
                    "block {index} is {len} bytes, the TOC says {}",
                    entry.stored_len
                ))
            }
        };
        self.request(&req, &check_len).await.map(Bytes::from)
    }

    /// Says hello to this peer as the child whose peer server is at `me` (sibling
    /// exchange); answers the raw answer payload.
    pub async fn hello(&self, me: &str) -> Result<Vec<u8>> {
        let req = BlockRequest {
            digest: me.to_string(),
            index: 0,
            op: Op::Hello,
        };
        // Hello answers are tiny; a large one is not an answer.
        let check_len = |len: u32| {
            if len <= 4096 {
                Ok(())
            } else {
                Err(format!("hello answer of {len} bytes"))
            }
        };
        self.request(&req, &check_len).await
    }
}

/// A parent's start order of one layer, as it streams it ([`PeerSource::follow`]).
pub struct OrderStream {
    conn: TcpStream,
    source_addr: SocketAddr,
    stall: Duration,
    block_count: usize,
}

impl OrderStream {
    /// The next message: `Some(indices)` for a batch, `None` for a keep-alive. An error ends
    /// the stream (the parent stalled, hung up, answered an error, or sent garbage).
    pub async fn next(&mut self) -> Result<Option<Vec<u32>>> {
        let source = PeerSource::new(self.source_addr, self.stall);
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        source.read_exact_stalling(&mut self.conn, &mut h).await?;
        let header = peer_protocol::decode_response_header(&h)
            .map_err(|e| LazyError::Protocol(format!("from {}: {e}", self.source_addr)))?;
        // A batch is at most MAX_ORDER_BATCH indices (error messages are shorter still);
        // anything longer is not one.
        if header.length as usize > peer_protocol::MAX_ORDER_BATCH * 4 {
            return Err(LazyError::Protocol(format!(
                "from {}: start-order message of {} bytes",
                self.source_addr, header.length
            )));
        }
        let mut payload = vec![0u8; header.length as usize];
        source
            .read_exact_stalling(&mut self.conn, &mut payload)
            .await?;
        match header.status {
            Status::KeepAlive => Ok(None),
            Status::Ok => peer_protocol::decode_order_batch(&payload, self.block_count)
                .map(Some)
                .map_err(|e| LazyError::Protocol(format!("from {}: {e}", self.source_addr))),
            status => Err(source.err(format!(
                "answered {status:?}: {}",
                String::from_utf8_lossy(&payload)
            ))),
        }
    }
}

impl PeerSource {
    /// Subscribes to this peer's start order of `layer` (a layer of `block_count` blocks)
    /// from position `from` on, on a connection of its own.
    pub async fn follow(
        &self,
        layer: &LayerRef,
        block_count: usize,
        from: usize,
    ) -> Result<OrderStream> {
        let mut conn = self.connect().await?;
        let req = peer_protocol::encode_request(&BlockRequest {
            digest: layer.digest.clone(),
            index: from.min(u32::MAX as usize) as u32,
            op: Op::StartOrder,
        });
        tokio::time::timeout(self.stall, conn.write_all(&req))
            .await
            .map_err(|_| self.stalled())?
            .map_err(|e| self.err(format!("write: {e}")))?;
        Ok(OrderStream {
            conn,
            source_addr: self.addr,
            stall: self.stall,
            block_count,
        })
    }
}

#[async_trait]
impl BlockSource for PeerSource {
    async fn fetch(&self, layer: &LayerRef, index: usize, entry: &BlockEntry) -> Result<Bytes> {
        // The peer's uplink is shared by its children: say how urgent the block is.
        let class = FETCH_PURPOSE
            .try_with(|p| p.class())
            .unwrap_or(Class::Urgent);
        let op = Op::get_block(class, false);
        self.fetch_op(layer, index, entry, op).await
    }
}
