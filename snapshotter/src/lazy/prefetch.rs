//! Background prefetch of every block of a layer, so that the node soon holds the whole
//! layer and can feed its children, and a record of the blocks read at start so that a
//! later run fetches those first.
//!
//! Prefetch yields to on-demand fetches (container reads, children's requests): before each
//! fetch a worker waits until none has been in flight on this node for [`QUIET`], counting
//! from the mount too. At the root of a tree (upstream is the registry) it fetches runs of
//! consecutive missing blocks in one range request.

use std::{
    collections::{HashSet, VecDeque},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tracing::{debug, info};

use super::block_store::{BlockStore, Purpose};

/// How long no on-demand fetch must have run before a prefetch fetch starts: longer than the
/// pauses between a starting container's read bursts (imports, CPU work), short against the
/// time a whole layer takes. On the testbed, children in a tree started ~1 s sooner with 2 s
/// than with 500 ms (docs/benchmarks-startup.md).
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(2000);

/// How to prefetch.
#[derive(Clone, Debug)]
pub struct PrefetchOptions {
    /// Concurrent fetches.
    pub concurrency: usize,
    /// Most blocks fetched in one registry range request (root only).
    pub run_blocks: usize,
    /// Blocks to fetch first, in order (e.g. the access order of an earlier run).
    pub priority: Vec<u32>,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            concurrency: 4,
            run_blocks: 8,
            priority: Vec::new(),
        }
    }
}

/// What a prefetch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Blocks it fetched itself.
    pub fetched: usize,
    /// Fetches that failed (the blocks are fetched on demand later).
    pub failed: usize,
}

/// The order in which blocks are prefetched: `priority` first (valid, deduplicated), then the
/// rest in index order.
pub fn prefetch_order(block_count: usize, priority: &[u32]) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut order: Vec<usize> = priority
        .iter()
        .map(|&i| i as usize)
        .filter(|&i| i < block_count && seen.insert(i))
        .collect();
    order.extend((0..block_count).filter(|i| !seen.contains(i)));
    order
}

/// Starts prefetching `store`'s layer in the background.
pub fn spawn_prefetch(
    store: Arc<BlockStore>,
    options: PrefetchOptions,
) -> tokio::task::JoinHandle<PrefetchReport> {
    // Prefetch starts when the mount's first reads have come and gone, not before them.
    store.gate().touch();
    tokio::spawn(async move {
        let queue = Arc::new(Mutex::new(VecDeque::from(prefetch_order(
            store.block_count(),
            &options.priority,
        ))));
        let fetched = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let workers = (0..options.concurrency.max(1)).map(|_| {
            let (store, queue) = (store.clone(), queue.clone());
            let (fetched, failed) = (fetched.clone(), failed.clone());
            let run_blocks = options.run_blocks.max(1);
            async move {
                loop {
                    let next = queue.lock().unwrap().pop_front();
                    let Some(index) = next else { break };
                    if store.has_block(index) || store.is_in_flight(index) {
                        continue;
                    }
                    store.gate().wait_quiet(QUIET).await;
                    let at_root = store.chain().registry_for_all();
                    let result = if at_root {
                        store.fetch_run(index, run_blocks, Purpose::Prefetch).await
                    } else {
                        store
                            .stored_block(index, Purpose::Prefetch)
                            .await
                            .map(|_| 1)
                    };
                    match result {
                        Ok(n) => {
                            fetched.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            debug!(index, error = %e, "prefetch: block failed");
                        }
                    }
                }
            }
        });
        futures::future::join_all(workers).await;
        let report = PrefetchReport {
            fetched: fetched.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
        };
        info!(layer = %store.layer().digest, fetched = report.fetched, failed = report.failed, "prefetch done");
        report
    })
}

/// Reads an access-order file (one block index per line); missing or bad lines are skipped.
pub fn load_access_order(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Writes an access-order file atomically (temp file + rename).
pub fn save_access_order(path: &Path, order: &[u32]) -> std::io::Result<()> {
    save_lines(path, order)
}

/// Writes one item per line, atomically (temp file + rename).
pub fn save_lines<T: std::fmt::Display>(path: &Path, items: &[T]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let text: String = items.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_priority_first_once() {
        assert_eq!(prefetch_order(5, &[3, 9, 3, 1]), vec![3, 1, 0, 2, 4]);
        assert_eq!(prefetch_order(3, &[]), vec![0, 1, 2]);
    }

    #[test]
    fn access_order_file_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/order");
        assert!(load_access_order(&p).is_empty());
        save_access_order(&p, &[4, 0, 7]).unwrap();
        assert_eq!(load_access_order(&p), vec![4, 0, 7]);
    }
}
