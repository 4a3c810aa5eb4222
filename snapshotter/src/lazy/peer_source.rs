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
    block_store::{Purpose, FETCH_PURPOSE},
    peer_protocol::{self, BlockRequest, Op, Status, RESPONSE_HEADER_LEN},
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

    /// One exchange on `conn`. The outer error is a transport failure (worth a retry on a
    /// fresh connection); the inner one is the peer's answer.
    async fn exchange(
        &self,
        conn: &mut TcpStream,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
        op: Op,
    ) -> Result<Result<Bytes>> {
        let req = peer_protocol::encode_request(&BlockRequest {
            digest: layer.digest.clone(),
            index: index as u32,
            op,
        });
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
                    // The length is bounded by the decoder; it must also be this block's.
                    // Not read: the connection is unusable, hence the outer error.
                    if header.length as u64 != entry.stored_len {
                        return Err(self.err(format!(
                            "block {index} is {} bytes, the TOC says {}",
                            header.length, entry.stored_len
                        )));
                    }
                    let mut payload = vec![0u8; header.length as usize];
                    self.read_exact_stalling(conn, &mut payload).await?;
                    return Ok(Ok(Bytes::from(payload)));
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
}

impl PeerSource {
    /// Fetches block `index` with request op `op` (see [`Op`]).
    pub async fn fetch_op(
        &self,
        layer: &LayerRef,
        index: usize,
        entry: &BlockEntry,
        op: Op,
    ) -> Result<Bytes> {
        let pooled = self.idle.lock().unwrap().pop();
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        let result = match self.exchange(&mut conn, layer, index, entry, op).await {
            // A pooled connection may have been closed by the peer meanwhile: retry once on a
            // fresh one. An answer (even an error status) is final.
            Err(_) if reused => {
                conn = self.connect().await?;
                self.exchange(&mut conn, layer, index, entry, op).await?
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
}

#[async_trait]
impl BlockSource for PeerSource {
    async fn fetch(&self, layer: &LayerRef, index: usize, entry: &BlockEntry) -> Result<Bytes> {
        // Prefetch asks the peer to serve it last (its uplink is shared by its children).
        let op = match FETCH_PURPOSE.try_with(|p| *p) {
            Ok(Purpose::Prefetch) => Op::Prefetch,
            _ => Op::Urgent,
        };
        self.fetch_op(layer, index, entry, op).await
    }
}
