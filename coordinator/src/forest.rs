//! All function trees, their leases and their watchers, persisted through [`Store`].
//!
//! This is the coordinator without the network: the gRPC service, the lease sweeper and
//! the tests all drive it. Every call that changes a tree follows the same order:
//! 1. under the tree's lock, change the in-memory tree, bump its epoch and queue the
//!    change to the store (so sled sees each tree's changes in epoch order);
//! 2. outside the lock, wait for the store's group commit (applied and flushed);
//! 3. only then answer the caller and push the upstream updates to watchers.
//!
//! Nothing is ever told to a VM before it is on disk, so after a crash no VM can hold an
//! epoch newer than what the restarted coordinator remembers.
//!
//! Calls take `now` instead of reading the clock, so tests can drive leases.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::function_tree::{Delta, FunctionTree};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, Write};
use crate::stripe_tree::StripeTree;
use crate::upstream::{Source, TreeKey, Upstream};
use crate::validate;

/// Why a request was refused. Nothing changed when one is returned (except `Storage`,
/// after which the coordinator refuses every change until restarted).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForestError {
    /// No tree (with nodes) for this tenant and function.
    #[error("no tree for function {function} of tenant {tenant}")]
    UnknownTree {
        /// Tenant named in the request.
        tenant: String,
        /// Function named in the request.
        function: String,
    },
    /// The tree exists but the node is not in it.
    #[error("node {node_id:?} is not in the tree of function {function} of tenant {tenant}")]
    UnknownNode {
        /// Tenant named in the request.
        tenant: String,
        /// Function named in the request.
        function: String,
        /// Node named in the request.
        node_id: String,
    },
    /// The node id is already in the tree.
    #[error("node {node_id:?} is already in the tree of function {function} (serving at {existing_addr}); leave first or pick another node id")]
    Duplicate {
        /// Function named in the request.
        function: String,
        /// Node named in the request.
        node_id: String,
        /// Address the existing member gave.
        existing_addr: String,
    },
    /// A malformed field.
    #[error("{0}")]
    Invalid(String),
    /// Writing to disk failed.
    #[error("storage failed: {0}")]
    Storage(#[from] StoreError),
    /// Storage failed earlier; state on disk is the truth until a restart reloads it.
    #[error("coordinator storage failed earlier; refusing changes until it is restarted")]
    Unavailable,
}

/// Why a node left its tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// The node asked to leave.
    Left,
    /// Its lease expired.
    Expired,
    /// An administrator removed it.
    Admin,
    /// Its peer address did not accept a connection when probed (after a child reported
    /// it or its watch stream closed): see [`crate::health`].
    Unreachable,
}

#[derive(Debug)]
struct NodeInfo {
    addr: String,
    deadline: Instant,
    /// The tree epoch of its join (0 when loaded from the store): tells a node that
    /// re-joined apart from the one that was probed.
    generation: u64,
    /// Created on the first Watch; dropping it ends the node's watch streams.
    watch: Option<Arc<watch::Sender<Upstream>>>,
}

#[derive(Debug, Default)]
struct TreeEntry {
    tree: FunctionTree<NodeInfo>,
    /// The second stripe tree over the same nodes.
    stripes: StripeTree,
    epoch: u64,
    /// Short id naming the tree in the store's node keys.
    id: u64,
}

type Note = (Arc<watch::Sender<Upstream>>, Upstream);

/// A node's state as answered by [`Forest::node_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Current upstream.
    pub upstream: Upstream,
    /// The node's own peer address.
    pub peer_addr: String,
    /// Depth in the tree (root is 0).
    pub depth: u32,
}

/// One tree in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSummary {
    /// Which tree.
    pub key: TreeKey,
    /// Node count.
    pub nodes: usize,
    /// Levels.
    pub height: u32,
    /// Current epoch.
    pub epoch: u64,
}

/// One node in a [`TreeView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewNode {
    /// Node id.
    pub node_id: String,
    /// Peer address.
    pub addr: String,
    /// Position in the layout.
    pub position: usize,
    /// Parent id, `None` for the root.
    pub parent: Option<String>,
    /// Time left on the lease.
    pub lease_remaining: Duration,
}

/// A whole tree, for the admin `draw` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeView {
    /// Summary line.
    pub summary: TreeSummary,
    /// Nodes in position order.
    pub nodes: Vec<ViewNode>,
}

/// Every tree the coordinator manages.
pub struct Forest {
    trees: RwLock<HashMap<TreeKey, Arc<Mutex<TreeEntry>>>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    lease_ttl: Duration,
    failed: AtomicBool,
    next_tree_id: AtomicU64,
}

fn unknown_tree(key: &TreeKey) -> ForestError {
    ForestError::UnknownTree {
        tenant: key.tenant.clone(),
        function: key.function.clone(),
    }
}

fn unknown_node(key: &TreeKey, node_id: &str) -> ForestError {
    ForestError::UnknownNode {
        tenant: key.tenant.clone(),
        function: key.function.clone(),
        node_id: node_id.to_string(),
    }
}

fn check_ref(key: &TreeKey, node_id: Option<&str>) -> Result<(), ForestError> {
    validate::tenant(&key.tenant).map_err(ForestError::Invalid)?;
    validate::function(&key.function).map_err(ForestError::Invalid)?;
    if let Some(n) = node_id {
        validate::node_id(n).map_err(ForestError::Invalid)?;
    }
    Ok(())
}

impl TreeEntry {
    fn source(&self, parent: Option<&str>) -> Source {
        match parent.and_then(|id| Some((id, self.tree.get(id)?))) {
            None => Source::Registry,
            Some((id, info)) => Source::Peer {
                node_id: id.to_string(),
                addr: info.addr.clone(),
            },
        }
    }

    fn upstream(&self, node_id: &str) -> Option<Upstream> {
        let parent = self.tree.parent(node_id)?;
        Some(Upstream {
            epoch: self.epoch,
            source: self.source(parent.map(|(id, _)| id)),
            second: self.stripes.parent(node_id).map(|p| self.source(p)),
        })
    }

    /// Upstream updates for the watched nodes among `delta.changes` and `also` (nodes whose
    /// parent in the second stripe tree changed).
    fn notes(&self, delta: &Delta, also: &[crate::function_tree::UpstreamChange]) -> Vec<Note> {
        let mut told = std::collections::HashSet::new();
        delta
            .changes
            .iter()
            .chain(also)
            .filter(|c| told.insert(c.node.clone()))
            .filter_map(|c| {
                let tx = self.tree.get(&c.node)?.watch.clone()?;
                Some((tx, self.upstream(&c.node)?))
            })
            .collect()
    }

    /// A second stripe tree for the function tree, built afresh (when none was stored, or
    /// the stored one does not fit).
    fn rebuild_stripes(&mut self) {
        let mut first = FunctionTree::<()>::new();
        let mut stripes = StripeTree::new();
        for (id, _) in self.tree.iter() {
            let delta = first.insert(id.to_string(), ()).expect("ids are unique");
            stripes
                .joined(&first, id, &delta.placed)
                .expect("joined right after the function tree");
        }
        self.stripes = stripes;
    }
}

impl Forest {
    /// Loads every tree from `store`. Each node gets a fresh lease of `lease_ttl` from `now`:
    /// nodes could not heartbeat while the coordinator was down.
    pub fn open(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        lease_ttl: Duration,
        now: Instant,
    ) -> Result<Self, ForestError> {
        let mut trees = HashMap::new();
        let (mut tree_count, mut node_count) = (0i64, 0i64);
        let mut next_tree_id = 1;
        for loaded in store.load()? {
            next_tree_id = next_tree_id.max(loaded.id + 1);
            if loaded.nodes.is_empty() {
                // Comes back lazily (with its epoch) if someone joins again.
                continue;
            }
            let nodes = loaded.nodes.into_iter().map(|(id, addr)| {
                let info = NodeInfo {
                    addr,
                    deadline: now + lease_ttl,
                    generation: 0,
                    watch: None,
                };
                (id, info)
            });
            let tree = FunctionTree::from_ordered(nodes)
                .map_err(|e| ForestError::Storage(StoreError::Sled(e.to_string())))?;
            tree_count += 1;
            node_count += tree.len() as i64;
            let mut entry = TreeEntry {
                stripes: StripeTree::new(),
                epoch: loaded.epoch,
                id: loaded.id,
                tree,
            };
            match StripeTree::from_order(&entry.tree, loaded.stripe_order) {
                Ok(stripes) => entry.stripes = stripes,
                Err(e) => {
                    // A store written before stripe trees existed, or a damaged one: any
                    // valid placement does; all of it is written with the next change.
                    tracing::warn!(tree = %loaded.key, reason = %e, "second stripe tree rebuilt");
                    entry.rebuild_stripes();
                }
            }
            trees.insert(loaded.key, Arc::new(Mutex::new(entry)));
        }
        metrics.trees.set(tree_count);
        metrics.nodes.set(node_count);
        Ok(Self {
            trees: RwLock::new(trees),
            store,
            metrics,
            lease_ttl,
            failed: AtomicBool::new(false),
            next_tree_id: AtomicU64::new(next_tree_id),
        })
    }

    /// Lease length granted on join and heartbeat.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn check_healthy(&self) -> Result<(), ForestError> {
        if self.failed.load(Ordering::Relaxed) {
            Err(ForestError::Unavailable)
        } else {
            Ok(())
        }
    }

    fn fail(&self, e: StoreError) -> ForestError {
        tracing::error!(error = %e, "storage failed; refusing changes until restart");
        self.failed.store(true, Ordering::Relaxed);
        ForestError::Storage(e)
    }

    async fn sync(&self) -> Result<(), ForestError> {
        self.store.sync().await.map_err(|e| self.fail(e))
    }

    fn notify(&self, notes: Vec<Note>) {
        for (tx, up) in notes {
            // Notes from concurrent changes may arrive out of order; keep the newest.
            let sent = tx.send_if_modified(|cur| {
                if up.epoch > cur.epoch {
                    *cur = up.clone();
                    true
                } else {
                    false
                }
            });
            if sent {
                self.metrics.notifications.inc();
            }
        }
    }

    fn entry(&self, key: &TreeKey) -> Option<Arc<Mutex<TreeEntry>>> {
        self.trees.read().unwrap().get(key).cloned()
    }

    fn entry_or_create(&self, key: &TreeKey) -> Result<Arc<Mutex<TreeEntry>>, ForestError> {
        if let Some(e) = self.entry(key) {
            return Ok(e);
        }
        // A tree that emptied before a restart keeps its epoch and id on disk.
        let meta = self.store.tree_meta(key)?;
        let mut trees = self.trees.write().unwrap();
        Ok(trees
            .entry(key.clone())
            .or_insert_with(|| {
                let (epoch, id) = match meta {
                    Some(m) => (m.epoch, m.id),
                    None => (0, self.next_tree_id.fetch_add(1, Ordering::Relaxed)),
                };
                Arc::new(Mutex::new(TreeEntry {
                    tree: FunctionTree::new(),
                    stripes: StripeTree::new(),
                    epoch,
                    id,
                }))
            })
            .clone())
    }

    /// Adds a VM to the function's tree (creating the tree) and answers its upstream.
    pub async fn join(
        &self,
        key: &TreeKey,
        node_id: &str,
        peer_addr: &str,
        now: Instant,
    ) -> Result<Upstream, ForestError> {
        check_ref(key, Some(node_id))?;
        validate::peer_addr(peer_addr).map_err(ForestError::Invalid)?;
        self.check_healthy()?;
        let entry = self.entry_or_create(key)?;
        let (upstream, notes) = {
            let mut e = entry.lock().unwrap();
            if let Some(existing) = e.tree.get(node_id) {
                return Err(ForestError::Duplicate {
                    function: key.function.clone(),
                    node_id: node_id.to_string(),
                    existing_addr: existing.addr.clone(),
                });
            }
            let epoch = e.epoch + 1;
            let info = NodeInfo {
                addr: peer_addr.to_string(),
                deadline: now + self.lease_ttl,
                generation: epoch,
                watch: None,
            };
            let delta = e
                .tree
                .insert(node_id.to_string(), info)
                .expect("checked for duplicates above");
            let e = &mut *e;
            let second = e
                .stripes
                .joined(&e.tree, node_id, &delta.placed)
                .expect("the function tree took the node in just now");
            let stripe_placed = e.stripes.take_placed();
            let write = Write {
                tree_id: e.id,
                epoch,
                put: delta
                    .placed
                    .iter()
                    .map(|(id, pos)| (id.as_str(), *pos, peer_addr))
                    .collect(),
                remove: vec![],
                stripe_put: stripe_placed
                    .iter()
                    .map(|(id, pos)| (id.as_str(), *pos))
                    .collect(),
            };
            if let Err(err) = self.store.write(key, &write) {
                // The coordinator refuses changes from now on and reloads from disk when
                // restarted; the insert was a pure append, so undo it exactly anyway.
                let _ = e.tree.remove(node_id);
                return Err(self.fail(err));
            }
            e.epoch = epoch;
            if e.tree.len() == 1 {
                self.metrics.trees.inc();
            }
            self.metrics.nodes.inc();
            let notes = e.notes(&delta, &second);
            (e.upstream(node_id).expect("just inserted"), notes)
        };
        self.sync().await?;
        self.metrics.joins.inc();
        tracing::debug!(tree = %key, node_id, peer_addr, upstream = %upstream, "joined");
        self.notify(notes);
        Ok(upstream)
    }

    fn remove_locked(
        &self,
        key: &TreeKey,
        e: &mut TreeEntry,
        node_id: &str,
        reason: RemoveReason,
    ) -> Result<Vec<Note>, ForestError> {
        let (info, delta) = e
            .tree
            .remove(node_id)
            .map_err(|_| unknown_node(key, node_id))?;
        let epoch = e.epoch + 1;
        let addrs: Vec<(&str, usize, &str)> = delta
            .placed
            .iter()
            .map(|(id, pos)| {
                let addr = e.tree.get(id).map(|i| i.addr.as_str()).unwrap_or("");
                (id.as_str(), *pos, addr)
            })
            .collect();
        let second = e
            .stripes
            .left(&e.tree, node_id, &delta.placed)
            .expect("the function tree let the node go just now");
        let stripe_placed = e.stripes.take_placed();
        let write = Write {
            tree_id: e.id,
            epoch,
            put: addrs,
            remove: vec![node_id],
            stripe_put: stripe_placed
                .iter()
                .map(|(id, pos)| (id.as_str(), *pos))
                .collect(),
        };
        self.store
            .write(key, &write)
            .map_err(|err| self.fail(err))?;
        e.epoch = epoch;
        // Dropping the removed node's sender ends its watch streams.
        drop(info);
        self.metrics.nodes.dec();
        if e.tree.is_empty() {
            self.metrics.trees.dec();
        }
        self.metrics.rebalances.inc_by(delta.changes.len() as u64);
        match reason {
            RemoveReason::Left => self.metrics.leaves.inc(),
            RemoveReason::Expired => self.metrics.expiries.inc(),
            RemoveReason::Admin => self.metrics.removals.inc(),
            RemoveReason::Unreachable => self.metrics.unreachable_removals.inc(),
        };
        tracing::debug!(tree = %key, node_id, ?reason, moved = delta.changes.len(), "removed");
        Ok(e.notes(&delta, &second))
    }

    /// Removes a VM from its tree; answers the tree's new epoch.
    pub async fn remove(
        &self,
        key: &TreeKey,
        node_id: &str,
        reason: RemoveReason,
    ) -> Result<u64, ForestError> {
        check_ref(key, Some(node_id))?;
        self.check_healthy()?;
        let entry = self.entry(key).ok_or_else(|| unknown_tree(key))?;
        let (epoch, notes) = {
            let mut e = entry.lock().unwrap();
            if e.tree.is_empty() {
                return Err(unknown_tree(key));
            }
            let notes = self.remove_locked(key, &mut e, node_id, reason)?;
            (e.epoch, notes)
        };
        self.sync().await?;
        self.notify(notes);
        Ok(epoch)
    }

    fn with_node<R>(
        &self,
        key: &TreeKey,
        node_id: &str,
        f: impl FnOnce(&mut TreeEntry) -> R,
    ) -> Result<R, ForestError> {
        check_ref(key, Some(node_id))?;
        let entry = self.entry(key).ok_or_else(|| unknown_tree(key))?;
        let mut e = entry.lock().unwrap();
        if e.tree.is_empty() {
            return Err(unknown_tree(key));
        }
        if !e.tree.contains(node_id) {
            return Err(unknown_node(key, node_id));
        }
        Ok(f(&mut e))
    }

    /// Renews a VM's lease; answers the tree's epoch. No disk write: leases restart from a
    /// full TTL after a coordinator restart anyway.
    pub fn heartbeat(
        &self,
        key: &TreeKey,
        node_id: &str,
        now: Instant,
    ) -> Result<u64, ForestError> {
        let ttl = self.lease_ttl;
        self.with_node(key, node_id, |e| {
            e.tree.get_mut(node_id).expect("checked").deadline = now + ttl;
            e.epoch
        })
    }

    /// The VM's upstream, its own address and depth.
    pub async fn node_status(
        &self,
        key: &TreeKey,
        node_id: &str,
    ) -> Result<NodeStatus, ForestError> {
        let status = self.with_node(key, node_id, |e| NodeStatus {
            upstream: e.upstream(node_id).expect("checked"),
            peer_addr: e.tree.get(node_id).expect("checked").addr.clone(),
            depth: e.tree.depth(node_id).expect("checked"),
        })?;
        // Never hand out an epoch that is not on disk yet.
        self.sync().await?;
        Ok(status)
    }

    /// The VM's upstream `bad_node_id` failed: answers its current upstream and the
    /// ancestors above it (nearest first) to try before the registry.
    pub async fn bad_upstream(
        &self,
        key: &TreeKey,
        node_id: &str,
        bad_node_id: &str,
    ) -> Result<(Upstream, Vec<(String, String)>), ForestError> {
        self.metrics.bad_upstream_reports.inc();
        let answer = self.with_node(key, node_id, |e| {
            let upstream = e.upstream(node_id).expect("checked");
            let fallbacks = e
                .tree
                .ancestors(node_id)
                .into_iter()
                // The current parent is the upstream; the failed node is no fallback.
                .filter(|(id, _)| *id != bad_node_id && upstream_id(&upstream) != Some(*id))
                .map(|(id, info)| (id.to_string(), info.addr.clone()))
                .collect();
            (upstream, fallbacks)
        })?;
        tracing::info!(tree = %key, node_id, bad_node_id, upstream = %answer.0, "bad upstream reported");
        self.sync().await?;
        Ok(answer)
    }

    /// Subscribes to the VM's upstream. The receiver holds the current upstream and sees
    /// every later change; it closes when the node leaves the tree.
    pub async fn watch(
        &self,
        key: &TreeKey,
        node_id: &str,
    ) -> Result<watch::Receiver<Upstream>, ForestError> {
        let rx = self.with_node(key, node_id, |e| {
            let current = e.upstream(node_id).expect("checked");
            let info = e.tree.get_mut(node_id).expect("checked");
            match &info.watch {
                Some(tx) => {
                    // Refresh the epoch for the new subscriber without waking the others:
                    // their upstream did not change.
                    tx.send_if_modified(|v| {
                        *v = current;
                        false
                    });
                    tx.subscribe()
                }
                None => {
                    let (tx, rx) = watch::channel(current);
                    info.watch = Some(Arc::new(tx));
                    rx
                }
            }
        })?;
        self.sync().await?;
        Ok(rx)
    }

    /// The node's peer address and generation (changes when it leaves and joins again), if
    /// it is in the tree.
    pub fn peer_of(&self, key: &TreeKey, node_id: &str) -> Option<(String, u64)> {
        let entry = self.entry(key)?;
        let e = entry.lock().unwrap();
        e.tree.get(node_id).map(|i| (i.addr.clone(), i.generation))
    }

    /// True if `ancestor` is above `node_id` in the function tree (its parent, grandparent...)
    /// or in the second stripe tree.
    pub fn is_ancestor(&self, key: &TreeKey, node_id: &str, ancestor: &str) -> bool {
        let Some(entry) = self.entry(key) else {
            return false;
        };
        let e = entry.lock().unwrap();
        if e.tree
            .ancestors(node_id)
            .iter()
            .any(|(id, _)| *id == ancestor)
        {
            return true;
        }
        // Or in the second stripe tree, which a node fetches its odd blocks down.
        let mut current = node_id;
        for _ in 0..e.stripes.len() {
            match e.stripes.parent(current) {
                Some(Some(parent)) if parent == ancestor => return true,
                Some(Some(parent)) => current = parent,
                _ => break,
            }
        }
        false
    }

    /// True if someone watches the node's upstream now (its membership is connected).
    pub fn is_watched(&self, key: &TreeKey, node_id: &str) -> bool {
        let Some(entry) = self.entry(key) else {
            return false;
        };
        let e = entry.lock().unwrap();
        e.tree
            .get(node_id)
            .and_then(|i| i.watch.as_ref())
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// Removes a node found unreachable, unless it left or joined again since it was
    /// probed (`generation` from [`Forest::peer_of`]). Answers whether it was removed.
    pub async fn remove_unreachable(
        &self,
        key: &TreeKey,
        node_id: &str,
        generation: u64,
    ) -> Result<bool, ForestError> {
        check_ref(key, Some(node_id))?;
        self.check_healthy()?;
        let Some(entry) = self.entry(key) else {
            return Ok(false);
        };
        let notes = {
            let mut e = entry.lock().unwrap();
            match e.tree.get(node_id) {
                Some(i) if i.generation == generation => {}
                _ => return Ok(false),
            }
            self.remove_locked(key, &mut e, node_id, RemoveReason::Unreachable)?
        };
        self.sync().await?;
        self.notify(notes);
        Ok(true)
    }

    /// Removes every node whose lease ended at or before `now`; answers who was removed.
    pub async fn expire(&self, now: Instant) -> Result<Vec<(TreeKey, String)>, ForestError> {
        self.check_healthy()?;
        let entries: Vec<_> = self
            .trees
            .read()
            .unwrap()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let mut removed = Vec::new();
        let mut notes = Vec::new();
        for (key, entry) in entries {
            let mut e = entry.lock().unwrap();
            let expired: Vec<String> = e
                .tree
                .iter()
                .filter(|(_, info)| info.deadline <= now)
                .map(|(id, _)| id.to_string())
                .collect();
            for id in expired {
                notes.extend(self.remove_locked(&key, &mut e, &id, RemoveReason::Expired)?);
                tracing::info!(tree = %key, node_id = %id, "lease expired");
                removed.push((key.clone(), id));
            }
        }
        if !removed.is_empty() {
            self.sync().await?;
            self.notify(notes);
        }
        Ok(removed)
    }

    /// Trees with at least one node, optionally of one tenant, sorted.
    pub fn list_trees(&self, tenant: Option<&str>) -> Vec<TreeSummary> {
        let mut out: Vec<TreeSummary> = self
            .trees
            .read()
            .unwrap()
            .iter()
            .filter(|(k, _)| tenant.is_none_or(|t| k.tenant == t))
            .filter_map(|(k, e)| {
                let e = e.lock().unwrap();
                (!e.tree.is_empty()).then(|| TreeSummary {
                    key: k.clone(),
                    nodes: e.tree.len(),
                    height: e.tree.height(),
                    epoch: e.epoch,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// The whole tree.
    pub fn tree_view(&self, key: &TreeKey, now: Instant) -> Result<TreeView, ForestError> {
        check_ref(key, None)?;
        let entry = self.entry(key).ok_or_else(|| unknown_tree(key))?;
        let e = entry.lock().unwrap();
        if e.tree.is_empty() {
            return Err(unknown_tree(key));
        }
        let nodes = e
            .tree
            .iter()
            .enumerate()
            .map(|(position, (id, info))| ViewNode {
                node_id: id.to_string(),
                addr: info.addr.clone(),
                position,
                parent: e.tree.parent(id).flatten().map(|(p, _)| p.to_string()),
                lease_remaining: info.deadline.saturating_duration_since(now),
            })
            .collect();
        Ok(TreeView {
            summary: TreeSummary {
                key: key.clone(),
                nodes: e.tree.len(),
                height: e.tree.height(),
                epoch: e.epoch,
            },
            nodes,
        })
    }

    /// For each node of a tree, its upstream; `None` if the tree is unknown. For tests and
    /// invariant checks.
    pub fn upstreams(&self, key: &TreeKey) -> Option<HashMap<String, Upstream>> {
        let entry = self.entry(key)?;
        let e = entry.lock().unwrap();
        Some(
            e.tree
                .iter()
                .map(|(id, _)| (id.to_string(), e.upstream(id).expect("present")))
                .collect(),
        )
    }
}

fn upstream_id(u: &Upstream) -> Option<&str> {
    match &u.source {
        Source::Registry => None,
        Source::Peer { node_id, .. } => Some(node_id),
    }
}
