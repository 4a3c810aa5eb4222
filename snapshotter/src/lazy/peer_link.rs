//! Bounds on a peer TCP connection whose other end went silent.
//!
//! Across a dead link (a partition, a VM that froze) TCP retransmits unacknowledged data for
//! about 15 minutes (`tcp_retries2`) before a write fails, and a write into a full send
//! buffer waits all that time. A peer server writes one block at a time to all its children
//! ([`super::peer_server`]), so one such write would starve every other child, each kept
//! waiting by keep-alives that say "coming". Two bounds prevent it: the kernel aborts a
//! connection whose data stays unacknowledged for [`UNACKED_TIMEOUT`] (`TCP_USER_TIMEOUT`),
//! and [`write_all_progressing`] gives up on a write that makes no progress for a stall
//! timeout.

use std::{io, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Longest time data sent on a peer connection may stay unacknowledged before the kernel
/// drops the connection. Far above a round trip on a congested link, far below TCP's own.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(8);

/// Bytes handed to the socket per write in [`write_all_progressing`]: each must leave within
/// the stall timeout.
const CHUNK: usize = 64 * 1024;

/// Sets `TCP_USER_TIMEOUT` on `stream` to [`UNACKED_TIMEOUT`] (best effort: without it the
/// application-level bounds still hold).
pub fn bound_unacked(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    if let Err(e) = sock.set_tcp_user_timeout(Some(UNACKED_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT on a peer connection");
    }
}

/// Writes all of `buf`, failing with `TimedOut` when a chunk of it cannot be handed to the
/// socket within `stall` (the peer stopped reading or acknowledging).
pub async fn write_all_progressing(
    stream: &mut TcpStream,
    buf: &[u8],
    stall: Duration,
) -> io::Result<()> {
    for chunk in buf.chunks(CHUNK) {
        match tokio::time::timeout(stall, stream.write_all(chunk)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no write progress for {} ms (the peer stopped reading)",
                        stall.as_millis()
                    ),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_write_to_a_peer_that_never_reads_gives_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Accepted and kept open, never read: the socket buffers fill and writes stop.
        let (_server, _) = listener.accept().await.unwrap();
        bound_unacked(&client);
        let block = vec![7u8; 64 << 20];
        let t = std::time::Instant::now();
        let err = write_all_progressing(&mut client, &block, Duration::from_millis(300))
            .await
            .expect_err("a peer that never reads cannot take 64 MiB");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gave up after {:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_write_to_a_reading_peer_completes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut server, &mut got)
                .await
                .unwrap();
            got
        });
        let block: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        write_all_progressing(&mut client, &block, Duration::from_secs(5))
            .await
            .unwrap();
        drop(client);
        assert!(reader.await.unwrap() == block);
    }
}
