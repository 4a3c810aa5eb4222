//! A child follows its parent's start order ([`super::start_order`]): it subscribes to the
//! order in which the parent wants a layer's blocks and fetches each block it lacks as soon
//! as the parent names it, a few at a time, through its own fetch chain (sibling half,
//! parent, registry fallback; every block verified). Its container then mostly finds the
//! blocks local instead of paying a round trip up the tree per miss.
//!
//! A layer converted with a start profile (`Toc::start_blocks`) says which blocks a start
//! reads, in order, before anybody reads them: those are queued first, at mount, from the
//! node's upstream (the registry at the root), so that they arrive at the link's rate
//! instead of one dependent miss after another; they join the start order like any other.
//! At the root they come from the registry in runs of [`START_RUN_BLOCKS`], one run at a
//! time: a single flow, in the order the start reads them, each block landing as soon as it
//! is in; several flows at once would only fill the root's downlink queue, which its
//! children's requests and acknowledgements must also cross.
//!
//! The task follows whoever the tree names as upstream: it subscribes again when the parent
//! changes, waits while the node is the root (nothing to follow), and ends when the node
//! holds every block of the layer or the layer is unmounted (the task is aborted).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::Notify;
use tracing::{debug, info};

use super::{
    block_store::{BlockStore, Purpose},
    peer_source::PeerSource,
    Result,
};

/// How often a node without a parent to follow (the root, or its parent is being avoided)
/// looks again.
const RECHECK: Duration = Duration::from_millis(250);
/// Pause after a subscription failed (the parent is gone, or has not mounted the layer).
const RETRY: Duration = Duration::from_millis(500);
/// Most start blocks fetched in one registry range request at the root.
pub const START_RUN_BLOCKS: usize = 16;

/// What following did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowReport {
    /// Blocks fetched because the parent named them.
    pub fetched: usize,
    /// Fetches that failed (the container reads those blocks on demand later).
    pub failed: usize,
    /// Subscriptions made (one per parent, more after failures).
    pub subscriptions: usize,
}

/// Blocks named by the parent, not fetched yet, in order.
#[derive(Default)]
struct Queue {
    items: Mutex<VecDeque<usize>>,
    more: Notify,
    closed: AtomicBool,
}

impl Queue {
    fn push(&self, index: usize) {
        self.items.lock().unwrap().push_back(index);
        self.more.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.more.notify_waiters();
    }

    async fn pop(&self) -> Option<usize> {
        loop {
            let more = self.more.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            if let Some(i) = self.items.lock().unwrap().pop_front() {
                return Some(i);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            more.await;
        }
    }
}

/// Starts following the parent's start order of `store`'s layer with `concurrency` fetches
/// in flight at most.
pub fn spawn_follow(
    store: Arc<BlockStore>,
    concurrency: usize,
) -> tokio::task::JoinHandle<FollowReport> {
    tokio::spawn(async move {
        let queue = Arc::new(Queue::default());
        let profiled = (store.toc().start_blocks as usize).min(store.block_count());
        for index in 0..profiled {
            queue.push(index);
        }
        let fetched = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let root_run = Arc::new(tokio::sync::Mutex::new(()));
        let workers = (0..concurrency.max(1)).map(|_| {
            let (store, queue) = (store.clone(), queue.clone());
            let (fetched, failed) = (fetched.clone(), failed.clone());
            let root_run = root_run.clone();
            async move {
                while let Some(index) = queue.pop().await {
                    if store.is_held_or_coming(index) {
                        continue;
                    }
                    let at_root = store.chain().registry_for_all();
                    let result = if at_root && index < profiled {
                        let _one_at_a_time = root_run.lock().await;
                        let max = START_RUN_BLOCKS.min(profiled - index);
                        store.fetch_run(index, max, Purpose::Follow).await
                    } else {
                        store.stored_block(index, Purpose::Follow).await.map(|_| 1)
                    };
                    match result {
                        Ok(n) => fetched.fetch_add(n, Ordering::Relaxed),
                        Err(e) => {
                            debug!(index, error = %e, "follow: block failed");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
        });
        let subscriptions = async {
            let mut subscriptions = 0;
            while !holds_all(&store) {
                let Some(parent) = store.chain().order_source() else {
                    tokio::time::sleep(RECHECK).await;
                    continue;
                };
                subscriptions += 1;
                if let Err(e) = follow_parent(&store, parent, &queue).await {
                    debug!(%parent, layer = %store.layer().digest, error = %e, "follow: subscription ended");
                    tokio::time::sleep(RETRY).await;
                }
            }
            queue.close();
            subscriptions
        };
        let (subscriptions, _) = tokio::join!(subscriptions, futures::future::join_all(workers));
        let report = FollowReport {
            fetched: fetched.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            subscriptions,
        };
        info!(layer = %store.layer().digest, fetched = report.fetched, failed = report.failed, "follow done: every block held");
        report
    })
}

fn holds_all(store: &BlockStore) -> bool {
    store.cached_blocks() >= store.block_count()
}

/// Follows `parent`'s order until it is no longer the upstream (`Ok`) or the stream fails.
async fn follow_parent(store: &Arc<BlockStore>, parent: SocketAddr, queue: &Queue) -> Result<()> {
    let source = PeerSource::new(parent, store.chain().stall_timeout());
    // From the start each time: the indices are cheap and the ones held are skipped.
    let mut stream = source.follow(store.layer(), store.block_count(), 0).await?;
    loop {
        if let Some(batch) = stream.next().await? {
            for index in batch {
                if !store.is_held_or_coming(index as usize) {
                    queue.push(index as usize);
                }
            }
        }
        // Keep-alives come every 500 ms: a change of parent is noticed that soon.
        if store.chain().order_source() != Some(parent) || holds_all(store) {
            return Ok(());
        }
    }
}
