//! The start order of a layer: the blocks this node wanted for a container's start, in the
//! order it first wanted them. Children follow it ([`super::follow`]).
//!
//! A function starts on all the VMs of its tree at about the same time and reads the same
//! blocks in about the same order. A child that waits for its own container to miss a block
//! pays a round trip to its parent per miss, one after the other (a start is a chain of
//! dependent reads: one import after another). Following the parent's order instead, the
//! child asks for each block as soon as the parent wants it, so the block travels down the
//! tree right behind the parent's own fetch and is usually local when the child's container
//! reads it: the pipelining the function tree is meant for.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
struct Log {
    noted: Vec<bool>,
    order: Vec<u32>,
}

/// An append-only list of a layer's block indices, each at most once, that tasks can wait
/// on for growth.
pub struct StartOrder {
    log: Mutex<Log>,
    grew: Notify,
}

impl StartOrder {
    /// An empty order for a layer of `block_count` blocks.
    pub fn new(block_count: usize) -> Self {
        StartOrder {
            log: Mutex::new(Log {
                noted: vec![false; block_count],
                order: Vec::new(),
            }),
            grew: Notify::new(),
        }
    }

    /// Appends block `index` unless it is there already (or out of range); true if appended.
    pub fn note(&self, index: usize) -> bool {
        let mut log = self.log.lock().unwrap();
        match log.noted.get_mut(index) {
            Some(noted) if !*noted => {
                *noted = true;
                log.order.push(index as u32);
                drop(log);
                self.grew.notify_waiters();
                true
            }
            _ => false,
        }
    }

    /// How many blocks are in the order.
    pub fn len(&self) -> usize {
        self.log.lock().unwrap().order.len()
    }

    /// Whether the order is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The blocks from position `from` on, at most `max` of them.
    pub fn since(&self, from: usize, max: usize) -> Vec<u32> {
        let log = self.log.lock().unwrap();
        log.order.iter().skip(from).take(max).copied().collect()
    }

    /// Waits until the order holds more than `len` blocks.
    pub async fn grown_past(&self, len: usize) {
        loop {
            let grew = self.grew.notified();
            tokio::pin!(grew);
            grew.as_mut().enable();
            if self.len() > len {
                return;
            }
            grew.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::Duration};

    #[test]
    fn each_block_once_in_first_order() {
        let o = StartOrder::new(8);
        assert!(o.note(5) && o.note(1) && !o.note(5) && o.note(7));
        assert!(!o.note(8), "out of range");
        assert_eq!(o.since(0, 10), vec![5, 1, 7]);
        assert_eq!(o.since(1, 1), vec![1]);
        assert!(o.since(3, 10).is_empty());
    }

    #[tokio::test]
    async fn waiters_wake_on_growth() {
        let o = Arc::new(StartOrder::new(4));
        o.note(0);
        // Already past: no wait.
        tokio::time::timeout(Duration::from_millis(100), o.grown_past(0))
            .await
            .unwrap();
        let waiter = tokio::spawn({
            let o = o.clone();
            async move { o.grown_past(1).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "nothing new yet");
        o.note(0); // not new: no wake-up that counts
        o.note(2);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
