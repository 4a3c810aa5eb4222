//! Readers that glue the async download to the synchronous, thread-based format pipeline:
//! a channel-fed reader, a digest-checking reader, the layer decompressors and an adapter
//! that remembers the first error it saw (so the final message can say *which* stage
//! failed, not just "I/O error").

use std::io::{self, BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::manifest::LayerCompression;
use crate::registry::BlobStream;

/// Chunks buffered between the download task and the converting thread. With ~16-256 KiB
/// chunks this keeps at most a few MiB per layer in memory.
const CHANNEL_CHUNKS: usize = 16;

/// Spawns a task pumping `stream` into a channel; returns the synchronous reading end.
/// Must be called within a tokio runtime; the reader must be used outside it (blocking).
pub fn stream_reader(mut stream: BlobStream) -> ChannelReader {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    ChannelReader {
        rx,
        cur: Bytes::new(),
    }
}

/// Blocking reader over a channel of chunks.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Hashes and counts everything read through it.
pub struct DigestReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    progress: Box<dyn Fn(u64) + Send>,
}

impl<R: Read> DigestReader<R> {
    /// Wraps `inner`; `progress` gets the running byte count.
    pub fn new(inner: R, progress: Box<dyn Fn(u64) + Send>) -> Self {
        DigestReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            progress,
        }
    }

    /// Reads whatever is left, then returns (`sha256:<hex>`, byte count).
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        self.count += n as u64;
        if n > 0 {
            (self.progress)(self.count);
        }
        Ok(n)
    }
}

/// Remembers the first error that passed through, for the final message.
pub struct Recorded<R> {
    inner: R,
    slot: Arc<Mutex<Option<String>>>,
}

impl<R> Recorded<R> {
    /// Wraps `inner`; returns the reader and the slot the first error lands in.
    pub fn new(inner: R) -> (Self, Arc<Mutex<Option<String>>>) {
        let slot = Arc::new(Mutex::new(None));
        (
            Recorded {
                inner,
                slot: Arc::clone(&slot),
            },
            slot,
        )
    }
}

impl<R: Read> Read for Recorded<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.inner.read(out).inspect_err(|e| {
            let mut slot = self.slot.lock().expect("error slot");
            if slot.is_none() {
                *slot = Some(describe_io_error(e));
            }
        })
    }
}

/// Words an I/O error from a decoder for people: an early end means a truncated blob.
fn describe_io_error(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        format!("unexpected end of data, the blob is truncated ({e})")
    } else {
        e.to_string()
    }
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Wraps `input` in the decompressor for `compression`. A layer labelled as plain tar is
/// sniffed, because some tools push gzip layers with the uncompressed media type (containerd
/// does the same). Returns the reader and the compression actually used.
pub fn decompressor<'a, R: Read + Send + 'a>(
    input: R,
    compression: LayerCompression,
) -> io::Result<(Box<dyn Read + Send + 'a>, LayerCompression)> {
    let mut input = BufReader::with_capacity(256 * 1024, input);
    let compression = if compression == LayerCompression::None {
        let head = input.fill_buf()?;
        if head.starts_with(GZIP_MAGIC) {
            LayerCompression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        }
    } else {
        compression
    };
    let reader: Box<dyn Read + Send + 'a> = match compression {
        LayerCompression::None | LayerCompression::Converted => Box::new(input),
        LayerCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        LayerCompression::Zstd => zstd_reader(input)?,
    };
    Ok((reader, compression))
}

#[cfg(feature = "zstd")]
fn zstd_reader<'a, R: BufRead + Send + 'a>(input: R) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(Box::new(ZstdFrames {
        decoder: None,
        input: Some(input),
    }))
}

#[cfg(not(feature = "zstd"))]
fn zstd_reader<'a, R: BufRead + Send + 'a>(_input: R) -> io::Result<Box<dyn Read + Send + 'a>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this build has no zstd support (feature `zstd`)",
    ))
}

/// Decodes a sequence of zstd frames (a zstd stream may hold several).
#[cfg(feature = "zstd")]
struct ZstdFrames<R: BufRead> {
    decoder: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
    input: Option<R>,
}

#[cfg(feature = "zstd")]
impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(dec) = self.decoder.as_mut() {
                let n = dec.read(out)?;
                if n > 0 || out.is_empty() {
                    return Ok(n);
                }
                let dec = self.decoder.take().expect("decoder present");
                self.input = Some(dec.into_inner());
            }
            let mut input = self.input.take().expect("input present");
            if input.fill_buf()?.is_empty() {
                self.input = Some(input);
                return Ok(0);
            }
            let dec = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
            self.decoder = Some(dec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniffs_gzip_labelled_as_tar() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"hello").unwrap();
        let gz = enc.finish().unwrap();
        let (mut r, c) = decompressor(&gz[..], LayerCompression::None).unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!((s.as_str(), c), ("hello", LayerCompression::Gzip));
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&[7u8; 100_000]).unwrap();
        let gz = enc.finish().unwrap();
        let (mut r, _) = decompressor(&gz[..gz.len() / 2], LayerCompression::Gzip).unwrap();
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
    }
}
