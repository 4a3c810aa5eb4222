//! Block traces: which blocks an image has (compressed size of each) and which of them a
//! function's start reads, in order.
//!
//! A trace comes from the benchmark (a real converted image and the snapshotter's
//! access-order record), from a converted blob's TOC ([`from_blobs`]), or is synthesized from
//! a few sizes for paper replays ([`synthetic`]).

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use faasnet_format::{
    parse_tail, parse_toc_parts, toc_head_range, TailParse, Toc, DEFAULT_TAIL_FETCH,
};

use crate::error::{Result, SimError};

/// One layer of a trace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLayer {
    /// The converted layer's digest (informational).
    #[serde(default)]
    pub digest: String,
    /// Compressed (stored) size of each block, in block order.
    pub blocks: Vec<u64>,
    /// Blocks `0..start_blocks` are the start region of a layer converted with a start
    /// profile (`Toc::start_blocks`): the snapshotter queues them at mount, in order, and at
    /// the root fetches them from the registry in streamed runs. 0: no start region.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_blocks: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The block trace file (JSON), as the benchmark writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTrace {
    /// Image reference (informational).
    #[serde(default)]
    pub image: String,
    /// Uncompressed bytes per block.
    pub block_size: u64,
    /// Size of the original (gzip) image's layers: what the baseline downloads.
    pub original_compressed_bytes: u64,
    /// Size of the layers' tar streams: what the baseline unpacks.
    pub original_uncompressed_bytes: u64,
    /// The converted layers, lowest first.
    pub layers: Vec<TraceLayer>,
    /// `[layer, block]` pairs the function's start reads, in order (the working set).
    pub start_reads: Vec<(usize, usize)>,
    /// Per start read (same length as `start_reads`, or empty when unknown): the block after
    /// the last block of the file that read is in (exclusive end, index in the layer). The
    /// snapshotter's read-ahead stops there. Empty: read-ahead is bounded by the layer only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_ends: Vec<usize>,
}

impl BlockTrace {
    /// Reads a trace file and checks it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        let trace: BlockTrace = serde_json::from_str(&text).map_err(|source| SimError::Json {
            path: path.display().to_string(),
            source,
        })?;
        trace.validate()?;
        Ok(trace)
    }

    /// Writes the trace as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).expect("a trace serializes");
        std::fs::write(path, text).map_err(|e| SimError::io(path, e))
    }

    /// Checks that every start read names an existing block.
    pub fn validate(&self) -> Result<()> {
        if self.block_size == 0 {
            return Err(SimError::Invalid("block_size is 0".into()));
        }
        if !self.file_ends.is_empty() && self.file_ends.len() != self.start_reads.len() {
            return Err(SimError::Invalid(format!(
                "file_ends has {} entries, start_reads {}",
                self.file_ends.len(),
                self.start_reads.len()
            )));
        }
        for &(l, b) in &self.start_reads {
            let ok = self
                .layers
                .get(l)
                .is_some_and(|layer| b < layer.blocks.len());
            if !ok {
                return Err(SimError::Invalid(format!(
                    "start read [{l}, {b}] names no block of the image"
                )));
            }
        }
        Ok(())
    }

    /// Total number of blocks.
    pub fn block_count(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len()).sum()
    }

    /// Sum of the compressed block sizes (the converted image without TOCs).
    pub fn converted_bytes(&self) -> u64 {
        self.layers.iter().flat_map(|l| &l.blocks).sum()
    }

    /// A copy whose read-ahead stops at most `cap` blocks after each read (its file ends
    /// set to that, or kept when the file ends earlier): how a trace without file boundaries
    /// is made to fetch the measured working set.
    pub fn with_readahead_cap(&self, cap: usize) -> BlockTrace {
        let mut t = self.clone();
        t.file_ends = self
            .start_reads
            .iter()
            .enumerate()
            .map(|(i, &(l, b))| {
                let len = self.layers[l].blocks.len();
                let known = self.file_ends.get(i).copied().unwrap_or(len);
                known.min(b + 1 + cap).min(len)
            })
            .collect();
        t
    }

    /// Compressed bytes of the distinct blocks the start reads.
    pub fn working_set_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.start_reads
            .iter()
            .filter(|r| seen.insert(**r))
            .map(|&(l, b)| self.layers[l].blocks[b])
            .sum()
    }
}

/// Sizes of a synthetic image (for replays of setups we cannot measure).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticImage {
    /// Uncompressed image size (sum of the layers' tar streams), bytes.
    pub image_bytes: u64,
    /// Uncompressed bytes the start reads, rounded up to whole blocks.
    pub working_set_bytes: u64,
    /// Block-compressed size / uncompressed size.
    pub compressed_ratio: f64,
    /// Original gzip size / uncompressed size; default: `compressed_ratio / 1.31` (our
    /// converted images are 1.31x their gzip size, docs/benchmarks-convert.md).
    #[serde(default)]
    pub gzip_ratio: Option<f64>,
    /// Number of equal layers (default 1).
    #[serde(default)]
    pub layers: Option<usize>,
    /// Longest run of consecutive blocks the start reads (default 16).
    #[serde(default)]
    pub max_run_blocks: Option<usize>,
    /// Seed of the block choice (default 1).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Ratio of our converted (per-block LZ4) size to the original gzip size, measured on the
/// realistic image (docs/benchmarks-convert.md).
pub const CONVERTED_OVER_GZIP: f64 = 1.31;

/// Builds a synthetic trace: equal blocks of `block_size * compressed_ratio` bytes, and a
/// working set of runs of consecutive blocks (1 to `max_run_blocks` long) at random places,
/// read in random order: the shape of a real start (whole files, scattered over the image).
pub fn synthetic(img: &SyntheticImage, block_size: u64) -> Result<BlockTrace> {
    if img.image_bytes == 0
        || block_size == 0
        || img.compressed_ratio.is_nan()
        || img.compressed_ratio <= 0.0
    {
        return Err(SimError::Invalid(
            "synthetic image needs image_bytes, block_size and compressed_ratio > 0".into(),
        ));
    }
    let layers = img.layers.unwrap_or(1).max(1);
    let total_blocks = img.image_bytes.div_ceil(block_size) as usize;
    let per_layer = total_blocks.div_ceil(layers);
    let block_stored = ((block_size as f64) * img.compressed_ratio)
        .round()
        .max(1.0) as u64;
    let mut trace_layers = Vec::new();
    let mut left = total_blocks;
    for i in 0..layers {
        let n = per_layer.min(left);
        left -= n;
        trace_layers.push(TraceLayer {
            digest: format!("synthetic:{i}"),
            blocks: vec![block_stored; n],
            start_blocks: 0,
        });
    }
    trace_layers.retain(|l| !l.blocks.is_empty());
    let ws_blocks = (img.working_set_bytes.div_ceil(block_size) as usize).min(total_blocks);
    let (start_reads, file_ends) = pick_working_set(
        &trace_layers
            .iter()
            .map(|l| l.blocks.len())
            .collect::<Vec<_>>(),
        ws_blocks,
        img.max_run_blocks.unwrap_or(16).max(1),
        img.seed.unwrap_or(1),
    );
    let gzip_ratio = img
        .gzip_ratio
        .unwrap_or(img.compressed_ratio / CONVERTED_OVER_GZIP);
    Ok(BlockTrace {
        image: format!("synthetic-{}MB", img.image_bytes / 1_000_000),
        block_size,
        original_compressed_bytes: (img.image_bytes as f64 * gzip_ratio).round() as u64,
        original_uncompressed_bytes: img.image_bytes,
        layers: trace_layers,
        start_reads,
        file_ends,
    })
}

/// Chooses `want` distinct blocks as runs of consecutive blocks at random places, in a
/// random order of runs (blocks inside a run in index order, as a file is read). Returns the
/// reads and, per read, the end of its run (its file) in its layer.
fn pick_working_set(
    layer_blocks: &[usize],
    want: usize,
    max_run: usize,
    seed: u64,
) -> (Vec<(usize, usize)>, Vec<usize>) {
    let total: usize = layer_blocks.iter().sum();
    let want = want.min(total);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut taken = vec![false; total];
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let mut count = 0;
    // Random probing gets slow when the working set is most of the image; then fall back to
    // a sweep over what is left.
    let mut attempts = 0;
    while count < want && attempts < 20 * total + 100 {
        attempts += 1;
        let len = rng.gen_range(1..=max_run).min(want - count);
        let start = rng.gen_range(0..total);
        let run: Vec<usize> = (start..(start + len).min(total))
            .take_while(|&g| !taken[g])
            .collect();
        if run.is_empty() {
            continue;
        }
        for &g in &run {
            taken[g] = true;
        }
        count += run.len();
        runs.push(run);
    }
    for (g, t) in taken.iter_mut().enumerate() {
        if count >= want {
            break;
        }
        if !*t {
            *t = true;
            count += 1;
            runs.push(vec![g]);
        }
    }
    runs.shuffle(&mut rng);
    // Global block index -> (layer, block).
    let mut starts = Vec::with_capacity(layer_blocks.len());
    let mut acc = 0;
    for &n in layer_blocks {
        starts.push(acc);
        acc += n;
    }
    let mut reads = Vec::with_capacity(want);
    let mut ends = Vec::with_capacity(want);
    for run in runs {
        // A run is one file: read-ahead stops at its end (or its layer's).
        let run_end = run.last().map_or(0, |&g| g + 1);
        for g in run {
            let l = starts.partition_point(|&s| s <= g) - 1;
            reads.push((l, g - starts[l]));
            ends.push(run_end.min(starts[l] + layer_blocks[l]) - starts[l]);
        }
    }
    (reads, ends)
}

/// Reads the TOC of a converted layer blob on disk.
pub fn read_toc(path: &Path) -> Result<Toc> {
    let fmt = |source| SimError::Format {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(|e| SimError::io(path, e))?;
    let size = file.metadata().map_err(|e| SimError::io(path, e))?.len();
    let tail_len = DEFAULT_TAIL_FETCH.min(size);
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(size - tail_len))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| SimError::io(path, e))?;
    match parse_tail(&tail, size).map_err(fmt)? {
        TailParse::Complete(toc, _) => Ok(*toc),
        TailParse::NeedToc(footer) => {
            let (offset, len) = toc_head_range(&footer, size, tail_len);
            let mut head = vec![0u8; len as usize];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut head))
                .map_err(|e| SimError::io(path, e))?;
            parse_toc_parts(&head, &tail, &footer, size).map_err(fmt)
        }
    }
}

/// Builds a trace from converted layer blobs (lowest layer first) and, per layer, an optional
/// access order (block indices, as the snapshotter's access-order file holds them).
///
/// The start reads are each layer's access order, layers in order (the record is per layer,
/// so the interleaving across layers is not known). Layers without an access order get a
/// synthetic working set of `fallback_fraction` of their blocks.
pub fn from_blobs(
    blobs: &[std::path::PathBuf],
    access_orders: &[Option<Vec<u32>>],
    fallback_fraction: f64,
    seed: u64,
) -> Result<BlockTrace> {
    let mut layers = Vec::new();
    let mut start_reads = Vec::new();
    let mut file_ends = Vec::new();
    let mut block_size = 0u64;
    let (mut gz, mut raw) = (0u64, 0u64);
    for (i, blob) in blobs.iter().enumerate() {
        let toc = read_toc(blob)?;
        block_size = toc.block_size as u64;
        raw += toc.tar_size;
        // Without a record of the original, assume it is the converted size over the
        // measured converted/gzip ratio.
        gz += match &toc.original {
            Some(o) => o.size,
            None => (toc.stored_size() as f64 / CONVERTED_OVER_GZIP) as u64,
        };
        let n = toc.blocks.len();
        let digest = blob
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        layers.push(TraceLayer {
            digest,
            blocks: toc.blocks.iter().map(|b| b.stored_len).collect(),
            start_blocks: (toc.start_blocks as usize).min(n),
        });
        let ends = file_ends_of(&toc);
        match access_orders.get(i).and_then(|o| o.as_ref()) {
            Some(order) => {
                let mut seen = HashSet::new();
                for &b in order {
                    let b = b as usize;
                    if b < n && seen.insert(b) {
                        start_reads.push((i, b));
                        file_ends.push(ends[b]);
                    }
                }
            }
            None => {
                let want = ((n as f64) * fallback_fraction).ceil() as usize;
                let (picked, _) = pick_working_set(&[n], want, 16, seed.wrapping_add(i as u64));
                for (_, b) in picked {
                    start_reads.push((i, b));
                    file_ends.push(ends[b]);
                }
            }
        }
    }
    let trace = BlockTrace {
        image: String::new(),
        block_size,
        original_compressed_bytes: gz,
        original_uncompressed_bytes: raw,
        layers,
        start_reads,
        file_ends,
    };
    trace.validate()?;
    Ok(trace)
}

/// Per block of a layer, the end (exclusive block index) of the file a read of that block
/// is taken to be in: the largest regular file with data in the block. The access-order
/// record names blocks, not files; a block the start reads in a big file is most likely
/// read for that file, and for small files the choice hardly matters (they end in the block
/// or the next). A block with no file data ends at itself + 1 (no read-ahead).
pub fn file_ends_of(toc: &Toc) -> Vec<usize> {
    let n = toc.blocks.len();
    let bs = toc.block_size.max(1) as u64;
    let mut best: Vec<(u64, usize)> = (0..n).map(|b| (0, b + 1)).collect();
    for e in &toc.entries {
        if e.kind != faasnet_format::EntryKind::File || e.size == 0 {
            continue;
        }
        let first = (e.offset / bs) as usize;
        let end = ((e.offset + e.size).div_ceil(bs) as usize).min(n);
        for slot in best.iter_mut().take(end).skip(first) {
            if e.size > slot.0 {
                *slot = (e.size, end);
            }
        }
    }
    best.into_iter().map(|(_, end)| end).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_has_the_asked_sizes() {
        let img = SyntheticImage {
            image_bytes: 100 * 524_288,
            working_set_bytes: 10 * 524_288,
            compressed_ratio: 0.5,
            gzip_ratio: None,
            layers: Some(3),
            max_run_blocks: None,
            seed: None,
        };
        let t = synthetic(&img, 524_288).unwrap();
        assert_eq!(t.block_count(), 100);
        assert_eq!(t.layers.len(), 3);
        assert_eq!(t.start_reads.len(), 10);
        let distinct: HashSet<_> = t.start_reads.iter().collect();
        assert_eq!(distinct.len(), 10);
        assert_eq!(t.working_set_bytes(), 10 * 262_144);
        t.validate().unwrap();
        // Same seed, same trace.
        assert_eq!(synthetic(&img, 524_288).unwrap(), t);
    }

    #[test]
    fn whole_image_working_set_is_possible() {
        let (sets, ends) = pick_working_set(&[5, 7], 12, 4, 3);
        let distinct: HashSet<_> = sets.iter().collect();
        assert_eq!(distinct.len(), 12);
        // Every read's file ends after it, inside its layer.
        let len = [5, 7];
        for (&(l, b), &e) in sets.iter().zip(&ends) {
            assert!(b < e && e <= len[l], "{l} {b} {e}");
        }
    }

    #[test]
    fn trace_json_round_trips_and_is_validated() {
        let text = r#"{"image": "x", "block_size": 524288, "original_compressed_bytes": 10,
            "original_uncompressed_bytes": 20,
            "layers": [{"digest": "sha256:aa", "blocks": [100, 200]}],
            "start_reads": [[0, 1], [0, 0]]}"#;
        let t: BlockTrace = serde_json::from_str(text).unwrap();
        t.validate().unwrap();
        assert_eq!(t.working_set_bytes(), 300);
        let bad = BlockTrace {
            start_reads: vec![(0, 2)],
            ..t
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn trace_from_a_converted_blob() {
        use faasnet_format::{convert_layer, ConvertOptions};
        // A small tar with one file big enough for a few 64 KiB blocks.
        let mut builder = tar::Builder::new(Vec::new());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, "f", &data[..]).unwrap();
        let tar_bytes = builder.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer");
        let mut out = std::fs::File::create(&blob).unwrap();
        let opts = ConvertOptions {
            block_size: 65_536,
            ..Default::default()
        };
        convert_layer(&tar_bytes[..], &mut out, &opts, &|_| {}).unwrap();
        drop(out);
        let t = from_blobs(
            std::slice::from_ref(&blob),
            &[Some(vec![2, 0, 2, 99])],
            0.5,
            1,
        )
        .unwrap();
        assert_eq!(t.block_size, 65_536);
        assert_eq!(t.start_reads, vec![(0, 2), (0, 0)]);
        // One file from byte 512 to 300,512: blocks 0..5, so read-ahead may run to 5.
        assert_eq!(t.file_ends, vec![5, 5]);
        assert_eq!(t.original_uncompressed_bytes, tar_bytes.len() as u64);
        let t = from_blobs(&[blob], &[None], 0.5, 1).unwrap();
        assert_eq!(t.start_reads.len(), t.block_count().div_ceil(2));
    }
}
