//! Converts one uncompressed tar stream into a blob: blocks, TOC frame, footer.
//!
//! Pipeline with bounded memory whatever the layer size: the calling thread reads and indexes
//! the tar stream and cuts it into blocks; worker threads compress and hash blocks; a writer
//! thread puts them back in order and writes them out. At most `2 * threads + 2` blocks are in
//! flight at any time.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::block::{encode_block, EncodedBlock};
use crate::error::{FormatError, Result};
use crate::footer::{toc_frame, Footer, FORMAT_VERSION};
use crate::tar_index::index_tar;
use crate::toc::{BlockEntry, OriginalLayer, Toc};

/// How to convert a layer.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Block size; see [`crate::validate_block_size`].
    pub block_size: u32,
    /// Compression threads (at least 1).
    pub threads: usize,
    /// The original layer, recorded in the TOC.
    pub original: Option<OriginalLayer>,
    /// Tar bytes at the start of the stream that hold the start profile's files (see
    /// [`Toc::start_blocks`]); 0: none.
    pub start_bytes: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            block_size: crate::DEFAULT_BLOCK_SIZE,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            original: None,
            start_bytes: 0,
        }
    }
}

/// The result of converting a layer.
#[derive(Debug, Clone)]
pub struct ConvertedLayer {
    pub toc: Toc,
    pub footer: Footer,
    /// Total blob size.
    pub blob_size: u64,
    /// `sha256:<hex>` of the whole blob.
    pub blob_digest: String,
}

/// Reads a tar stream from `input`, writes the converted blob to `output`.
///
/// `progress` is called with the number of tar bytes consumed so far.
pub fn convert_layer<R, W>(
    input: R,
    output: W,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ConvertedLayer>
where
    R: Read,
    W: Write + Send,
{
    crate::validate_block_size(opts.block_size)?;
    let threads = opts.threads.max(1);
    let max_in_flight = 2 * threads + 2;

    std::thread::scope(|s| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<(usize, EncodedBlock)>();
        // Credits bound the blocks in flight: the cutter takes one per block, the writer
        // gives it back once the block is written.
        let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(max_in_flight);
        for _ in 0..max_in_flight {
            credit_tx.send(()).expect("credit channel has room");
        }

        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            s.spawn(move || loop {
                let job = job_rx.lock().expect("job queue").recv();
                let Ok((idx, raw)) = job else { return };
                if done_tx.send((idx, encode_block(&raw))).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);

        let writer = s.spawn(move || write_blocks(output, done_rx, credit_tx));

        let mut cutter = BlockCutter {
            inner: input,
            block_size: opts.block_size as usize,
            buf: Vec::with_capacity(opts.block_size as usize),
            next_index: 0,
            consumed: 0,
            diff_hasher: Sha256::new(),
            jobs: Some(job_tx),
            credits: credit_rx,
            progress,
        };
        let indexed = index_tar(&mut cutter);
        // Whatever follows the end-of-archive marker is part of the layer too.
        let drained = indexed.and_then(|entries| {
            io::copy(&mut cutter, &mut io::sink())?;
            Ok(entries)
        });
        let entries = match drained {
            Ok(entries) => entries,
            Err(e) => {
                cutter.jobs = None; // stops the workers, then the writer
                let _ = writer.join();
                return Err(e);
            }
        };
        cutter.flush_block()?;
        cutter.jobs = None;
        let tar_size = cutter.consumed;
        if tar_size < 1024 || !tar_size.is_multiple_of(512) {
            let _ = writer.join();
            return Err(FormatError::NotTar(format!(
                "stream is {tar_size} bytes, not a whole tar archive"
            )));
        }
        let diff_id = format!("sha256:{}", hex::encode(cutter.diff_hasher.finalize()));
        let (mut output, blocks, mut blob_hasher, blocks_end) =
            writer.join().expect("writer thread panicked")?;

        let toc = Toc {
            version: FORMAT_VERSION,
            block_size: opts.block_size,
            tar_size,
            diff_id,
            original: opts.original.clone(),
            start_blocks: opts
                .start_bytes
                .min(tar_size)
                .div_ceil(opts.block_size as u64) as u32,
            blocks,
            entries,
        };
        toc.validate(blocks_end)?;
        let (tail, footer) = encode_tail(&toc, blocks_end);
        output.write_all(&tail)?;
        output.flush()?;
        blob_hasher.update(&tail);
        Ok(ConvertedLayer {
            blob_size: blocks_end + tail.len() as u64,
            blob_digest: format!("sha256:{}", hex::encode(blob_hasher.finalize())),
            toc,
            footer,
        })
    })
}

/// The end of a blob whose blocks end at `toc_offset`: the TOC frame for `toc`, then the
/// footer pointing at it. Does not validate `toc` (tests use it to build hostile blobs).
pub fn encode_tail(toc: &Toc, toc_offset: u64) -> (Vec<u8>, Footer) {
    let payload = toc.to_payload();
    let mut tail = toc_frame(&payload);
    let footer = Footer {
        version: FORMAT_VERSION,
        block_size: toc.block_size,
        toc_offset,
        toc_length: tail.len() as u64,
        toc_sha256: Sha256::digest(&payload).into(),
    };
    tail.extend_from_slice(&footer.to_bytes());
    (tail, footer)
}

type WriterResult<W> = Result<(W, Vec<BlockEntry>, Sha256, u64)>;

/// Writes compressed blocks in stream order, returning the block table.
fn write_blocks<W: Write>(
    mut out: W,
    done: Receiver<(usize, EncodedBlock)>,
    credits: SyncSender<()>,
) -> WriterResult<W> {
    let mut pending = BTreeMap::new();
    let mut next = 0usize;
    let mut offset = 0u64;
    let mut table = Vec::new();
    let mut hasher = Sha256::new();
    for (idx, block) in done {
        pending.insert(idx, block);
        while let Some(block) = pending.remove(&next) {
            out.write_all(&block.stored)?;
            hasher.update(&block.stored);
            table.push(BlockEntry {
                offset,
                stored_len: block.stored.len() as u64,
                raw_len: block.raw_len,
                digest: block.digest,
            });
            offset += block.stored.len() as u64;
            next += 1;
            let _ = credits.try_send(());
        }
    }
    if !pending.is_empty() {
        return Err(FormatError::Io(io::Error::other(
            "a compression worker stopped early",
        )));
    }
    Ok((out, table, hasher, offset))
}

/// A reader adapter that hands every byte read through it to the block pipeline.
struct BlockCutter<'p, R> {
    inner: R,
    block_size: usize,
    buf: Vec<u8>,
    next_index: usize,
    consumed: u64,
    diff_hasher: Sha256,
    jobs: Option<SyncSender<(usize, Vec<u8>)>>,
    credits: Receiver<()>,
    progress: &'p (dyn Fn(u64) + Sync),
}

impl<R> BlockCutter<'_, R> {
    fn flush_block(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let raw = std::mem::replace(&mut self.buf, Vec::with_capacity(self.block_size));
        self.credits
            .recv()
            .map_err(|_| io::Error::other("block writer stopped"))?;
        let jobs = self.jobs.as_ref().expect("cutter used after close");
        jobs.send((self.next_index, raw))
            .map_err(|_| io::Error::other("compression workers stopped"))?;
        self.next_index += 1;
        Ok(())
    }
}

impl<R: Read> Read for BlockCutter<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        let mut rest = &out[..n];
        self.diff_hasher.update(rest);
        self.consumed += n as u64;
        while !rest.is_empty() {
            let take = rest.len().min(self.block_size - self.buf.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.block_size {
                self.flush_block()?;
            }
        }
        if n > 0 {
            (self.progress)(self.consumed);
        }
        Ok(n)
    }
}
