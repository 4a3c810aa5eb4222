//! The lease sweeper: removes nodes that stopped heartbeating, as if they had left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::forest::Forest;

/// Runs [`Forest::expire`] every `interval` until the task is dropped or aborted.
pub fn spawn_sweeper(forest: Arc<Forest>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match forest.expire(Instant::now()).await {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(count = removed.len(), "expired leases");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
            }
        }
    })
}
