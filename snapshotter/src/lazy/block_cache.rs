//! The on-disk block cache: per layer (keyed by blob digest) a data file and a persisted
//! bitmap of the blocks present, and a disk quota over all layers.
//!
//! ## What is cached: stored (compressed) frames
//!
//! The cache keeps each block exactly as it is in the blob (its LZ4 frame), at the block's
//! blob offset in a sparse data file. Children in the function tree are served these bytes
//! as they are, with no recompression, and they cost less disk and less network than raw
//! data. Reads want decompressed bytes: LZ4 decompresses at several GB/s, the kernel page
//! cache (FOPEN_KEEP_CACHE) absorbs re-reads of a file, and the block store keeps a small
//! in-memory LRU of decompressed blocks for reads that straddle or revisit blocks.
//!
//! ## Crash safety (after nydus' indexed chunk map)
//!
//! `<dir>/bitmap` holds a 16-byte header (magic, block count) and one bit per block. A bit
//! is set only after the block's bytes are durable in `<dir>/data` (write, `fdatasync`,
//! then set the bit), so a crash never leaves a bit set over missing data; at worst a block
//! whose bit was not yet written is fetched again. The bitmap itself is not synced for the
//! same reason. Blocks read back are checked against their digest anyway (by the block store),
//! so a corrupted disk is detected too: the bit is cleared and the block fetched again.
//!
//! ## Quota
//!
//! When the total size of the cache exceeds the quota, whole layers that are not open (no
//! mount, no peer registration holds them) are deleted, least recently used first.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::SystemTime,
};

use faasnet_format::BlockEntry;
use tracing::{debug, info, warn};

use super::{metrics::LazyMetrics, LazyError, Result};

const BITMAP_MAGIC: &[u8; 8] = b"FNBITMP1";
const BITMAP_HEADER: u64 = 16;

/// The block presence bitmap of one layer, in memory and in its file.
struct Bitmap {
    file: File,
    bits: Vec<u8>,
    count: usize,
}

impl Bitmap {
    /// Opens `path` for `count` blocks; a missing file, or one for another block count, starts
    /// empty (returns `true` as second value when it was reset).
    fn open(path: &Path, count: usize) -> io::Result<(Bitmap, bool)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = count.div_ceil(8);
        let mut header = [0u8; BITMAP_HEADER as usize];
        let mut bits = vec![0u8; len];
        let valid = file.metadata()?.len() == BITMAP_HEADER + len as u64
            && file.read_exact_at(&mut header, 0).is_ok()
            && &header[..8] == BITMAP_MAGIC
            && u64::from_le_bytes(header[8..16].try_into().unwrap()) == count as u64
            && file.read_exact_at(&mut bits, BITMAP_HEADER).is_ok();
        if !valid {
            bits.iter_mut().for_each(|b| *b = 0);
            header[..8].copy_from_slice(BITMAP_MAGIC);
            header[8..16].copy_from_slice(&(count as u64).to_le_bytes());
            file.set_len(0)?;
            file.write_all_at(&header, 0)?;
            file.write_all_at(&bits, BITMAP_HEADER)?;
            file.sync_all()?;
        }
        Ok((Bitmap { file, bits, count }, !valid))
    }

    fn get(&self, i: usize) -> bool {
        i < self.count && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    /// Sets or clears bit `i` and writes its byte through to the file.
    fn put(&mut self, i: usize, present: bool) -> io::Result<()> {
        let byte = &mut self.bits[i / 8];
        if present {
            *byte |= 1 << (i % 8);
        } else {
            *byte &= !(1 << (i % 8));
        }
        self.file
            .write_all_at(&[*byte], BITMAP_HEADER + (i / 8) as u64)
    }

    fn present(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.count).filter(|&i| self.get(i))
    }
}

/// The cached blocks of one layer.
pub struct LayerCache {
    digest: String,
    dir: PathBuf,
    data: File,
    bitmap: Mutex<Bitmap>,
    blocks: Vec<BlockEntry>,
    /// Stored bytes of the blocks present.
    bytes: AtomicU64,
    owner: Weak<BlockCache>,
}

impl LayerCache {
    /// Blob digest of the layer.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Number of blocks in the layer.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Whether block `index` is on disk.
    pub fn has(&self, index: usize) -> bool {
        self.bitmap.lock().unwrap().get(index)
    }

    /// Number of blocks on disk.
    pub fn present_count(&self) -> usize {
        self.bitmap.lock().unwrap().present().count()
    }

    /// Stored bytes on disk.
    pub fn present_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn entry(&self, index: usize) -> io::Result<&BlockEntry> {
        self.blocks
            .get(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no block {index}")))
    }

    /// Reads block `index` (unverified) if present. Blocking.
    pub fn get(&self, index: usize) -> Result<Option<Vec<u8>>> {
        if !self.has(index) {
            return Ok(None);
        }
        let e = self
            .entry(index)
            .map_err(|e| LazyError::io(self.digest.clone(), e))?;
        let mut buf = vec![0u8; e.stored_len as usize];
        self.data.read_exact_at(&mut buf, e.offset).map_err(|err| {
            LazyError::io(format!("read block {index} of {}", self.dir.display()), err)
        })?;
        Ok(Some(buf))
    }

    /// Writes the block's bytes and makes them durable, without marking them present.
    fn write_data(&self, index: usize, stored: &[u8]) -> io::Result<()> {
        let e = self.entry(index)?;
        if stored.len() as u64 != e.stored_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "block {index} is {} bytes, expected {}",
                    stored.len(),
                    e.stored_len
                ),
            ));
        }
        self.data.write_all_at(stored, e.offset)?;
        self.data.sync_data()
    }

    fn mark_present(&self, index: usize) -> io::Result<bool> {
        let mut bm = self.bitmap.lock().unwrap();
        if bm.get(index) {
            return Ok(false);
        }
        bm.put(index, true)?;
        Ok(true)
    }

    /// Stores verified block `index`: data first, durable, then its bit. Blocking.
    pub fn put(&self, index: usize, stored: &[u8]) -> Result<()> {
        if self.has(index) {
            return Ok(());
        }
        let ctx = || format!("cache block {index} in {}", self.dir.display());
        self.write_data(index, stored)
            .map_err(|e| LazyError::io(ctx(), e))?;
        if self
            .mark_present(index)
            .map_err(|e| LazyError::io(ctx(), e))?
        {
            self.bytes.fetch_add(stored.len() as u64, Ordering::Relaxed);
            if let Some(owner) = self.owner.upgrade() {
                owner.grew(stored.len() as u64);
            }
        }
        Ok(())
    }

    /// Forgets block `index` (its bytes failed verification). Blocking.
    pub fn invalidate(&self, index: usize) -> Result<()> {
        let mut bm = self.bitmap.lock().unwrap();
        if bm.get(index) {
            bm.put(index, false)
                .map_err(|e| LazyError::io(format!("invalidate block {index}"), e))?;
            let len = self.blocks[index].stored_len;
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            if let Some(owner) = self.owner.upgrade() {
                owner.shrank(len);
            }
        }
        Ok(())
    }
}

impl Drop for LayerCache {
    fn drop(&mut self) {
        // Last use time for LRU eviction across restarts: the directory's mtime.
        let _ = File::open(&self.dir).and_then(|d| d.set_modified(SystemTime::now()));
        if let Some(owner) = self.owner.upgrade() {
            owner.closed(&self.digest, self.present_bytes());
        }
    }
}

/// What the cache knows about one layer on disk.
struct LayerRecord {
    dir: PathBuf,
    /// Bytes on disk (blocks present), as last known.
    bytes: u64,
    last_use: SystemTime,
    open: Weak<LayerCache>,
}

/// The block caches of all layers, under one directory and one quota.
pub struct BlockCache {
    root: PathBuf,
    quota: u64,
    total: AtomicU64,
    layers: Mutex<HashMap<String, LayerRecord>>,
    metrics: Arc<LazyMetrics>,
    me: Weak<BlockCache>,
}

impl BlockCache {
    /// Opens (creating) the cache under `root` with a quota of `quota` bytes, and takes stock
    /// of the layers already there. Blocking.
    pub fn open(root: &Path, quota: u64, metrics: Arc<LazyMetrics>) -> Result<Arc<Self>> {
        let layers_dir = root.join("layers");
        fs::create_dir_all(&layers_dir)
            .map_err(|e| LazyError::io(format!("create {}", layers_dir.display()), e))?;
        let mut layers = HashMap::new();
        let mut total = 0;
        let entries = fs::read_dir(&layers_dir)
            .map_err(|e| LazyError::io(format!("list {}", layers_dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_prefix("sha256-") else {
                continue;
            };
            let dir = entry.path();
            // Allocated size, not length: data files are sparse.
            let bytes = ["data", "bitmap"]
                .iter()
                .filter_map(|f| fs::metadata(dir.join(f)).ok())
                .map(|m| m.blocks() * 512)
                .sum();
            let last_use = fs::metadata(&dir)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            total += bytes;
            layers.insert(
                format!("sha256:{hex}"),
                LayerRecord {
                    dir,
                    bytes,
                    last_use,
                    open: Weak::new(),
                },
            );
        }
        info!(root = %root.display(), layers = layers.len(), bytes = total, quota, "block cache opened");
        Ok(Arc::new_cyclic(|me| BlockCache {
            root: layers_dir,
            quota,
            total: AtomicU64::new(total),
            layers: Mutex::new(layers),
            metrics,
            me: me.clone(),
        }))
    }

    /// Total bytes in the cache.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The quota in bytes.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Whether the cache holds (some blocks of) layer `digest`.
    pub fn contains(&self, digest: &str) -> bool {
        self.layers.lock().unwrap().contains_key(digest)
    }

    /// Opens the cache of layer `digest` with block table `blocks`, creating it if needed.
    /// The layer cannot be evicted while the returned handle lives. Blocking.
    pub fn open_layer(&self, digest: &str, blocks: &[BlockEntry]) -> Result<Arc<LayerCache>> {
        if !super::is_sha256_digest(digest) {
            return Err(LazyError::InvalidInput(format!(
                "bad layer digest {digest:?}"
            )));
        }
        let mut layers = self.layers.lock().unwrap();
        if let Some(open) = layers.get(digest).and_then(|r| r.open.upgrade()) {
            return Ok(open);
        }
        let dir = self
            .root
            .join(format!("sha256-{}", &digest["sha256:".len()..]));
        let ctx = |what: &str| format!("{what} in {}", dir.display());
        fs::create_dir_all(&dir).map_err(|e| LazyError::io(ctx("create layer cache"), e))?;
        let data_len = blocks.last().map_or(0, |b| b.offset + b.stored_len);
        let (bitmap, reset) = Bitmap::open(&dir.join("bitmap"), blocks.len())
            .map_err(|e| LazyError::io(ctx("open bitmap"), e))?;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("data"))
            .map_err(|e| LazyError::io(ctx("open data"), e))?;
        if reset {
            // The bitmap was new or unusable: no block is trusted, drop the old bytes too.
            data.set_len(0)
                .map_err(|e| LazyError::io(ctx("truncate data"), e))?;
        }
        data.set_len(data_len)
            .map_err(|e| LazyError::io(ctx("size data"), e))?;
        let bytes = bitmap.present().map(|i| blocks[i].stored_len).sum();
        let cache = Arc::new(LayerCache {
            digest: digest.to_string(),
            dir: dir.clone(),
            data,
            bitmap: Mutex::new(bitmap),
            blocks: blocks.to_vec(),
            bytes: AtomicU64::new(bytes),
            owner: self.me.clone(),
        });
        let old = layers.insert(
            digest.to_string(),
            LayerRecord {
                dir,
                bytes,
                last_use: SystemTime::now(),
                open: Arc::downgrade(&cache),
            },
        );
        let old_bytes = old.map_or(0, |r| r.bytes);
        if bytes >= old_bytes {
            self.total.fetch_add(bytes - old_bytes, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(old_bytes - bytes, Ordering::Relaxed);
        }
        debug!(layer = digest, present = bytes, "layer cache opened");
        Ok(cache)
    }

    fn grew(&self, by: u64) {
        let total = self.total.fetch_add(by, Ordering::Relaxed) + by;
        if total > self.quota {
            self.evict();
        }
    }

    fn shrank(&self, by: u64) {
        self.total.fetch_sub(by, Ordering::Relaxed);
    }

    fn closed(&self, digest: &str, bytes: u64) {
        let mut layers = self.layers.lock().unwrap();
        if let Some(r) = layers.get_mut(digest) {
            // Unless the layer was opened again meanwhile.
            if r.open.strong_count() == 0 {
                r.last_use = SystemTime::now();
                r.bytes = bytes;
            }
        }
    }

    /// Evicts unopened layers, least recently used first, until the total is within quota.
    /// Blocking.
    pub fn evict(&self) {
        // Handles upgraded here are dropped after the lock is released: dropping the last one
        // runs `closed`, which takes the lock.
        let mut held = Vec::new();
        let mut layers = self.layers.lock().unwrap();
        // Keep byte counts of open layers current before deciding.
        for r in layers.values_mut() {
            if let Some(open) = r.open.upgrade() {
                r.bytes = open.present_bytes();
                held.push(open);
            }
        }
        while self.total.load(Ordering::Relaxed) > self.quota {
            let victim = layers
                .iter()
                .filter(|(_, r)| r.open.strong_count() == 0)
                .min_by_key(|(_, r)| r.last_use)
                .map(|(d, _)| d.clone());
            let Some(digest) = victim else {
                warn!(
                    total = self.total.load(Ordering::Relaxed),
                    quota = self.quota,
                    "block cache over quota, but every layer in it is in use"
                );
                return;
            };
            let r = layers.remove(&digest).expect("victim is in the map");
            match fs::remove_dir_all(&r.dir) {
                Ok(()) => {
                    let total = self.total.load(Ordering::Relaxed);
                    self.total.fetch_sub(r.bytes.min(total), Ordering::Relaxed);
                    self.metrics.evicted_layers.inc();
                    info!(layer = %digest, bytes = r.bytes, "block cache: evicted layer");
                }
                Err(e) => {
                    warn!(layer = %digest, error = %e, "block cache: cannot evict layer");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize, len: u64) -> Vec<BlockEntry> {
        (0..n)
            .map(|i| BlockEntry {
                offset: i as u64 * len,
                stored_len: len,
                raw_len: len as u32,
                digest: format!("sha256:{}", "0".repeat(64)),
            })
            .collect()
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn bits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(LazyMetrics::default());
        let blocks = table(20, 100);
        {
            let cache = BlockCache::open(dir.path(), 1 << 30, m.clone()).unwrap();
            let l = cache.open_layer(&digest('a'), &blocks).unwrap();
            l.put(3, &[3u8; 100]).unwrap();
            l.put(17, &[17u8; 100]).unwrap();
            assert!(l.has(3) && l.has(17) && !l.has(4));
            assert_eq!(cache.total_bytes(), 200);
        }
        let cache = BlockCache::open(dir.path(), 1 << 30, m).unwrap();
        assert!(cache.contains(&digest('a')));
        let l = cache.open_layer(&digest('a'), &blocks).unwrap();
        assert_eq!(l.present_count(), 2);
        assert_eq!(l.get(17).unwrap().unwrap(), vec![17u8; 100]);
        assert_eq!(l.get(4).unwrap(), None);
        assert_eq!(cache.total_bytes(), 200);
        l.invalidate(17).unwrap();
        assert!(!l.has(17));
        assert_eq!(cache.total_bytes(), 100);
    }

    #[test]
    fn crash_between_data_and_bit_leaves_bit_clear() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(LazyMetrics::default());
        let blocks = table(4, 64);
        {
            let cache = BlockCache::open(dir.path(), 1 << 30, m.clone()).unwrap();
            let l = cache.open_layer(&digest('b'), &blocks).unwrap();
            l.put(0, &[1u8; 64]).unwrap();
            // The data of block 2 is durable, then the process "dies" before the bit is set.
            l.write_data(2, &[2u8; 64]).unwrap();
        }
        let cache = BlockCache::open(dir.path(), 1 << 30, m).unwrap();
        let l = cache.open_layer(&digest('b'), &blocks).unwrap();
        assert!(l.has(0));
        assert!(
            !l.has(2),
            "a block whose bit was never set must not count as present"
        );
        assert_eq!(l.get(2).unwrap(), None);
    }

    #[test]
    fn bitmap_for_another_block_count_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(LazyMetrics::default());
        let cache = BlockCache::open(dir.path(), 1 << 30, m).unwrap();
        {
            let l = cache.open_layer(&digest('c'), &table(8, 10)).unwrap();
            l.put(1, &[9u8; 10]).unwrap();
        }
        let l = cache.open_layer(&digest('c'), &table(9, 10)).unwrap();
        assert_eq!(l.present_count(), 0);
    }

    #[test]
    fn quota_evicts_unopened_layers_lru() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(LazyMetrics::default());
        let cache = BlockCache::open(dir.path(), 250, m.clone()).unwrap();
        let blocks = table(2, 100);
        for c in ['1', '2'] {
            let l = cache.open_layer(&digest(c), &blocks).unwrap();
            l.put(0, &[0u8; 100]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Layer 3 stays open while it grows past the quota: layer 1 (oldest) goes.
        let l3 = cache.open_layer(&digest('3'), &blocks).unwrap();
        l3.put(0, &[0u8; 100]).unwrap();
        assert!(!cache.contains(&digest('1')));
        assert!(cache.contains(&digest('2')) && cache.contains(&digest('3')));
        assert_eq!(cache.total_bytes(), 200);
        // Open layers are never evicted, even over quota.
        l3.put(1, &[0u8; 100]).unwrap();
        assert!(cache.contains(&digest('3')));
        assert!(!cache.contains(&digest('2')));
        assert_eq!(m.evicted_layers.get(), 2);
    }
}
