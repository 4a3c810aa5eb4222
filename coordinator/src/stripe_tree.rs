//! The second stripe tree: a placement of a function's VMs in which every VM that forwards
//! in the function tree is a leaf, so that no VM forwards in both.
//!
//! Why: in one binary tree an inner VM uploads every block it gets to two children, 2 W for a
//! working set W (1.5 W with the sibling exchange), while the leaves, half of the VMs,
//! upload nothing. A start then takes at least 1.5 W / r on a link of rate r, where the
//! bound the benchmark holds us to is W / r. Split the blocks into two stripes (even and odd
//! indices) and send each down its own balanced tree, the inner VMs of one being the leaves
//! of the other (SplitStream, SOSP'03): every VM then uploads at most two half-streams, W,
//! and receives its two halves from two parents at once.
//!
//! The first tree is the [`FunctionTree`] itself (heap layout: `N` nodes, the first
//! `N / 2` positions are inner). This module keeps the second one, in the same heap layout
//! over its own positions, and one invariant: **no node is inner in both trees**. Counting
//! shows it can always hold: both trees have `N / 2` inner positions (rounded down), so the
//! `N - N / 2` leaves of the first can fill the inner positions of the second, with one
//! node to spare when `N` is odd.
//!
//! Changes stay O(1) per join or leave, like the first tree's: the second tree appends a
//! newcomer and fills a leaver's hole with its last node, as the first does; that moves at
//! most a few nodes across the inner/leaf boundary of either tree. A node that is then inner
//! in both (a *violator*) swaps its position in the second tree with a *spare*, a node that
//! is a leaf in both; if there are `x` violators there are at least `x` spares (the count
//! above), and one swap fixes one violator without making another. The spares are kept in a
//! set, updated for the few nodes an operation touches, so a spare is found without a scan.
//! Every operation returns exactly the nodes whose parent in the second tree changed.

use std::collections::{BTreeSet, HashMap};

use crate::function_tree::{FunctionTree, TreeError, UpstreamChange};

/// The second stripe tree of one function (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct StripeTree {
    /// Node ids by position in the second tree.
    slots: Vec<String>,
    /// Position of each node in the second tree.
    index: HashMap<String, usize>,
    /// Nodes that are leaves in both trees (ordered, so that placement is deterministic).
    spares: BTreeSet<String>,
    /// Positions written since the last [`StripeTree::take_placed`] (what to persist).
    written: BTreeSet<usize>,
}

fn parent_pos(pos: usize) -> Option<usize> {
    pos.checked_sub(1).map(|p| p / 2)
}

/// Whether position `pos` is an inner one in a heap layout of `n` nodes.
fn is_inner(pos: usize, n: usize) -> bool {
    pos < n / 2
}

/// Records the parents, before an operation, of the nodes it may change.
#[derive(Default)]
struct Before(HashMap<String, Option<String>>);

impl StripeTree {
    /// An empty second tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no node is in the tree.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The node's position in the second tree.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// `Some(None)` for the second tree's root, `Some(Some(parent))` for another node,
    /// `None` if absent.
    pub fn parent(&self, id: &str) -> Option<Option<&str>> {
        let pos = self.position(id)?;
        Some(parent_pos(pos).map(|p| self.slots[p].as_str()))
    }

    /// Nodes in position order (as persisted).
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.slots.iter().map(String::as_str)
    }

    /// The nodes whose position changed since the last call, with their position now: what
    /// a store must write to keep this tree.
    pub fn take_placed(&mut self) -> Vec<(String, usize)> {
        let written = std::mem::take(&mut self.written);
        written
            .into_iter()
            .filter_map(|p| Some((self.slots.get(p)?.clone(), p)))
            .collect()
    }

    /// The tree with nodes `order` in position order, as stored, for function tree `first`;
    /// an error says why it cannot be (not the same nodes, or a node inner in both trees).
    pub fn from_order<T>(first: &FunctionTree<T>, order: Vec<String>) -> Result<Self, String> {
        let mut tree = StripeTree::new();
        for (pos, id) in order.into_iter().enumerate() {
            if !first.contains(&id) {
                return Err(format!("node {id:?} is not in the function tree"));
            }
            if tree.index.insert(id.clone(), pos).is_some() {
                return Err(format!("node {id:?} is placed twice"));
            }
            tree.slots.push(id);
        }
        if tree.slots.len() != first.len() {
            return Err(format!(
                "{} nodes placed, the function tree has {}",
                tree.slots.len(),
                first.len()
            ));
        }
        let ids = tree.slots.clone();
        for id in &ids {
            if Self::inner_in_first(first, id) && tree.inner_here(id) {
                return Err(format!("node {id:?} is inner in both trees"));
            }
            tree.refresh_spare(first, id);
        }
        Ok(tree)
    }

    /// Adds `id`, which `first` (the function tree, already updated) has just taken in;
    /// `placed` is that insert's [`crate::function_tree::Delta::placed`]. Returns the nodes
    /// whose parent in this tree changed, the newcomer first.
    pub fn joined<T>(
        &mut self,
        first: &FunctionTree<T>,
        id: &str,
        placed: &[(String, usize)],
    ) -> Result<Vec<UpstreamChange>, TreeError> {
        if self.index.contains_key(id) {
            return Err(TreeError::Duplicate(id.to_string()));
        }
        if !first.contains(id) || first.len() != self.slots.len() + 1 {
            // The caller updates the function tree first; anything else is a bug upstream.
            return Err(TreeError::NotFound(id.to_string()));
        }
        let mut before = Before::default();
        let pos = self.slots.len();
        self.note(&mut before, pos);
        self.slots.push(id.to_string());
        self.written.insert(pos);
        self.index.insert(id.to_string(), pos);
        let mut touched = self.boundary(first);
        touched.push(id.to_string());
        touched.extend(placed.iter().map(|(n, _)| n.clone()));
        if let Some(p) = first.position(id).and_then(parent_pos) {
            touched.push(first.at(p).map(|(n, _)| n.to_string()).unwrap_or_default());
        }
        self.repair(first, &mut before, touched);
        let mut changes = self.changes(before, None);
        // The newcomer had no parent before: it is always told, and told first.
        changes.retain(|c| c.node != id);
        changes.insert(
            0,
            UpstreamChange {
                node: id.to_string(),
                parent: self.parent(id).flatten().map(str::to_string),
            },
        );
        Ok(changes)
    }

    /// Removes `id`, which `first` (the function tree, already updated) has just let go;
    /// `placed` is that remove's [`crate::function_tree::Delta::placed`] (the node that
    /// moved into the hole, whose category there may differ). Returns the nodes still in
    /// the tree whose parent in this tree changed.
    pub fn left<T>(
        &mut self,
        first: &FunctionTree<T>,
        id: &str,
        placed: &[(String, usize)],
    ) -> Result<Vec<UpstreamChange>, TreeError> {
        let Some(&pos) = self.index.get(id) else {
            return Err(TreeError::NotFound(id.to_string()));
        };
        if first.contains(id) || first.len() + 1 != self.slots.len() {
            return Err(TreeError::NotFound(id.to_string()));
        }
        let mut before = Before::default();
        let last = self.slots.len() - 1;
        self.note(&mut before, pos);
        self.note(&mut before, last);
        // The boundary nodes of the tree as it was may change category too.
        let mut touched = self.boundary_of(self.slots.len());
        self.index.remove(id);
        self.spares.remove(id);
        self.slots.swap_remove(pos);
        self.written.insert(pos);
        if pos < self.slots.len() {
            let moved = self.slots[pos].clone();
            self.index.insert(moved.clone(), pos);
            touched.push(moved);
        }
        touched.extend(self.boundary(first));
        touched.extend(placed.iter().map(|(n, _)| n.clone()));
        touched.retain(|t| t != id);
        self.repair(first, &mut before, touched);
        Ok(self.changes(before, Some(id)))
    }

    /// Ids around both trees' inner/leaf boundary for the current size: the only
    /// positions whose category a join or leave can change.
    fn boundary<T>(&self, first: &FunctionTree<T>) -> Vec<String> {
        let n = first.len();
        let mut out = self.boundary_of(n);
        let mid = n / 2;
        for p in mid.saturating_sub(2)..(mid + 2).min(n) {
            if let Some((id, _)) = first.at(p) {
                out.push(id.to_string());
            }
        }
        out
    }

    /// Ids of this tree around the inner/leaf boundary of a layout of `n` nodes.
    fn boundary_of(&self, n: usize) -> Vec<String> {
        let mid = n / 2;
        (mid.saturating_sub(2)..(mid + 2).min(self.slots.len()))
            .map(|p| self.slots[p].clone())
            .collect()
    }

    fn inner_in_first<T>(first: &FunctionTree<T>, id: &str) -> bool {
        first.position(id).is_some_and(|p| is_inner(p, first.len()))
    }

    fn inner_here(&self, id: &str) -> bool {
        self.position(id)
            .is_some_and(|p| is_inner(p, self.slots.len()))
    }

    /// Brings the spare set up to date for `touched`, then swaps every violator among them
    /// with a spare.
    fn repair<T>(&mut self, first: &FunctionTree<T>, before: &mut Before, touched: Vec<String>) {
        for id in &touched {
            self.refresh_spare(first, id);
        }
        for id in touched {
            if !(self.index.contains_key(&id)
                && Self::inner_in_first(first, &id)
                && self.inner_here(&id))
            {
                continue;
            }
            let spare = self
                .spares
                .iter()
                .next()
                .cloned()
                .expect("a violator implies a spare (see the module docs)");
            let (a, b) = (self.index[&id], self.index[&spare]);
            self.note(before, a);
            self.note(before, b);
            self.slots.swap(a, b);
            self.written.extend([a, b]);
            self.index.insert(id.clone(), b);
            self.index.insert(spare.clone(), a);
            self.refresh_spare(first, &id);
            self.refresh_spare(first, &spare);
        }
    }

    fn refresh_spare<T>(&mut self, first: &FunctionTree<T>, id: &str) {
        let spare = self.index.contains_key(id)
            && first.contains(id)
            && !Self::inner_in_first(first, id)
            && !self.inner_here(id);
        if spare {
            self.spares.insert(id.to_string());
        } else {
            self.spares.remove(id);
        }
    }

    /// Before position `pos` is written: remembers the parents of its occupant and of the
    /// occupants of its children, the nodes whose parent the write may change.
    fn note(&self, before: &mut Before, pos: usize) {
        for p in [pos, 2 * pos + 1, 2 * pos + 2] {
            if let Some(id) = self.slots.get(p) {
                before
                    .0
                    .entry(id.clone())
                    .or_insert_with(|| parent_pos(p).map(|q| self.slots[q].clone()));
            }
        }
    }

    /// The noted nodes whose parent is now different (without `gone`).
    fn changes(&self, before: Before, gone: Option<&str>) -> Vec<UpstreamChange> {
        let mut out: Vec<UpstreamChange> = before
            .0
            .into_iter()
            .filter(|(id, _)| Some(id.as_str()) != gone)
            .filter_map(|(id, old)| {
                let now = self.parent(&id)?.map(str::to_string);
                (now != old).then_some(UpstreamChange {
                    node: id,
                    parent: now,
                })
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Both {
        first: FunctionTree<()>,
        second: StripeTree,
    }

    impl Both {
        fn new() -> Self {
            Both {
                first: FunctionTree::new(),
                second: StripeTree::new(),
            }
        }

        fn parents(&self) -> HashMap<String, Option<String>> {
            self.second
                .iter()
                .map(|id| {
                    let p = self.second.parent(id).unwrap().map(str::to_string);
                    (id.to_string(), p)
                })
                .collect()
        }

        fn join(&mut self, id: &str) -> Vec<UpstreamChange> {
            let delta = self.first.insert(id.to_string(), ()).unwrap();
            self.second.joined(&self.first, id, &delta.placed).unwrap()
        }

        fn leave(&mut self, id: &str) -> Vec<UpstreamChange> {
            let (_, delta) = self.first.remove(id).unwrap();
            self.second.left(&self.first, id, &delta.placed).unwrap()
        }

        /// Same nodes in both; no node inner in both; the spare set exact.
        fn check(&self) {
            let n = self.first.len();
            assert_eq!(self.second.len(), n);
            for (id, _) in self.first.iter() {
                let a = self.first.position(id).unwrap();
                let b = self.second.position(id).expect("in both trees");
                assert_eq!(self.second.slots[b], id);
                assert!(
                    !(is_inner(a, n) && is_inner(b, n)),
                    "{id} is inner in both trees (positions {a}, {b} of {n})"
                );
                let spare = !is_inner(a, n) && !is_inner(b, n);
                assert_eq!(self.second.spares.contains(id), spare, "spare set for {id}");
            }
            // Both trees have N / 2 inner nodes, disjoint: N % 2 nodes are leaves in both.
            assert_eq!(self.second.spares.len(), n % 2);
        }
    }

    #[test]
    fn two_nodes_feed_each_other() {
        let mut t = Both::new();
        t.join("a");
        t.check();
        assert_eq!(t.second.parent("a"), Some(None));
        t.join("b");
        t.check();
        // "a" is the function tree's root (inner); in the second tree it hangs under "b".
        assert_eq!(t.first.parent("b").unwrap().map(|p| p.0), Some("a"));
        assert_eq!(t.second.parent("b"), Some(None));
        assert_eq!(t.second.parent("a"), Some(Some("b")));
    }

    #[test]
    fn every_node_forwards_in_at_most_one_tree_at_16() {
        let mut t = Both::new();
        for i in 0..16 {
            t.join(&format!("vm{i}"));
            t.check();
        }
        // Every node has at most two children over both trees: it uploads at most W.
        let mut children: HashMap<String, usize> = HashMap::new();
        for (id, _) in t.first.iter() {
            if let Some(Some((p, _))) = t.first.parent(id) {
                *children.entry(p.to_string()).or_default() += 1;
            }
            if let Some(Some(p)) = t.second.parent(id) {
                *children.entry(p.to_string()).or_default() += 1;
            }
        }
        assert!(children.values().all(|&c| c <= 2), "{children:?}");
        // The 8 leaves of the function tree are the 8 nodes that forward in the second.
        let forwarding_second: BTreeSet<&str> = t.second.iter().take(8).collect();
        let leaves_first: BTreeSet<&str> = t.first.iter().skip(8).map(|(id, _)| id).collect();
        assert_eq!(forwarding_second, leaves_first);
    }

    #[test]
    fn errors_leave_the_tree_unchanged() {
        let mut t = Both::new();
        t.join("a");
        assert_eq!(
            t.second.joined(&t.first, "a", &[]),
            Err(TreeError::Duplicate("a".into()))
        );
        assert!(matches!(
            t.second.left(&t.first, "zz", &[]),
            Err(TreeError::NotFound(_))
        ));
        // Not yet removed from the function tree: refused.
        assert!(matches!(
            t.second.left(&t.first, "a", &[]),
            Err(TreeError::NotFound(_))
        ));
        t.check();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any sequence of joins and leaves keeps the invariant, reports exactly the nodes
        /// whose parent in the second tree changed, and changes O(1) of them.
        #[test]
        fn joins_and_leaves_keep_the_invariant(ops in proptest::collection::vec((any::<bool>(), 0usize..1000), 1..300)) {
            let mut t = Both::new();
            let mut next = 0usize;
            let mut members: Vec<String> = Vec::new();
            let mut most = 0usize;
            for (join, pick) in ops {
                let before = t.parents();
                let (changes, gone) = if join || members.is_empty() {
                    let id = format!("n{next}");
                    next += 1;
                    members.push(id.clone());
                    (t.join(&id), None)
                } else {
                    let id = members.swap_remove(pick % members.len());
                    (t.leave(&id), Some(id))
                };
                t.check();
                let after = t.parents();
                let mut expected: Vec<(String, Option<String>)> = after
                    .iter()
                    .filter(|(id, p)| before.get(*id) != Some(*p))
                    .map(|(id, p)| (id.clone(), p.clone()))
                    .collect();
                expected.sort();
                let mut got: Vec<(String, Option<String>)> =
                    changes.iter().map(|c| (c.node.clone(), c.parent.clone())).collect();
                got.sort();
                prop_assert_eq!(got, expected);
                if let Some(gone) = gone {
                    prop_assert!(!changes.iter().any(|c| c.node == gone));
                }
                most = most.max(changes.len());
            }
            prop_assert!(most <= 16, "an operation changed {} parents", most);
        }
    }
}
