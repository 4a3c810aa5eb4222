//! The balanced binary tree of one function, as a pure data structure (no I/O, no clock).
//!
//! Nodes sit in a complete binary tree laid out by position, like a binary heap: the node at
//! position `i` has its parent at `(i - 1) / 2` and its children at `2i + 1` and `2i + 2`.
//! That layout gives the balance bound for free: N nodes always fill exactly
//! `ceil(log2(N + 1))` levels. Insert appends at position N (a new leaf, one upstream to
//! tell). Delete moves the last node into the hole, so at most three nodes learn a new
//! upstream: the moved node and the hole's (up to two) children. No rotations, no cascades.
//!
//! Every operation returns the exact list of nodes whose upstream changed; the coordinator
//! turns that list into watch notifications and sled writes.

use std::collections::HashMap;
use std::fmt::Write as _;

/// Why a tree operation was refused. The tree is unchanged when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The node id is already in this tree.
    #[error("node {0:?} is already in the tree")]
    Duplicate(String),
    /// The node id is not in this tree.
    #[error("node {0:?} is not in the tree")]
    NotFound(String),
}

/// A node's upstream as the tree sees it: the parent's id, or none for the root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamChange {
    /// The node that must be told.
    pub node: String,
    /// Its new parent; `None` means the node is now the root and reads the registry.
    pub parent: Option<String>,
}

/// What one insert or remove did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Nodes still in the tree whose upstream changed (including a newly inserted node).
    pub changes: Vec<UpstreamChange>,
    /// Nodes that now sit at a new position (inserted or moved), for persistence.
    pub placed: Vec<(String, usize)>,
}

#[derive(Debug, Clone)]
struct Slot<T> {
    id: String,
    data: T,
}

/// One function's tree of VMs; `T` is whatever the caller keeps per node.
#[derive(Debug, Clone)]
pub struct FunctionTree<T> {
    slots: Vec<Slot<T>>,
    index: HashMap<String, usize>,
}

impl<T> Default for FunctionTree<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Levels used by a complete binary tree of `n` nodes: `ceil(log2(n + 1))`.
pub fn balanced_height(n: usize) -> u32 {
    usize::BITS - n.leading_zeros()
}

fn parent_pos(pos: usize) -> Option<usize> {
    if pos == 0 {
        None
    } else {
        Some((pos - 1) / 2)
    }
}

impl<T> FunctionTree<T> {
    /// An empty tree.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Rebuilds a tree from nodes listed in position order (as persisted).
    pub fn from_ordered(nodes: impl IntoIterator<Item = (String, T)>) -> Result<Self, TreeError> {
        let mut tree = Self::new();
        for (id, data) in nodes {
            tree.insert(id, data)?;
        }
        Ok(tree)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no node is in the tree.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True when `id` is in the tree.
    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// Number of levels (0 for an empty tree); always `balanced_height(len())`.
    pub fn height(&self) -> u32 {
        balanced_height(self.slots.len())
    }

    /// The node's position in the layout.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The data kept for `id`.
    pub fn get(&self, id: &str) -> Option<&T> {
        self.index.get(id).map(|&p| &self.slots[p].data)
    }

    /// Mutable data kept for `id`.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        match self.index.get(id) {
            Some(&p) => Some(&mut self.slots[p].data),
            None => None,
        }
    }

    /// The node at `pos`.
    pub fn at(&self, pos: usize) -> Option<(&str, &T)> {
        self.slots.get(pos).map(|s| (s.id.as_str(), &s.data))
    }

    /// `Some(None)` for the root, `Some(Some(parent))` for another node, `None` if absent.
    pub fn parent(&self, id: &str) -> Option<Option<(&str, &T)>> {
        let pos = self.position(id)?;
        Some(parent_pos(pos).map(|p| (self.slots[p].id.as_str(), &self.slots[p].data)))
    }

    /// The node's ancestors, nearest (the parent) first, ending with the root.
    pub fn ancestors(&self, id: &str) -> Vec<(&str, &T)> {
        let mut out = Vec::new();
        let mut pos = self.position(id);
        while let Some(p) = pos.and_then(parent_pos) {
            out.push((self.slots[p].id.as_str(), &self.slots[p].data));
            pos = Some(p);
        }
        out
    }

    /// The node's depth (root is 0).
    pub fn depth(&self, id: &str) -> Option<u32> {
        self.position(id).map(|p| balanced_height(p + 1) - 1)
    }

    /// Nodes in position order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> + '_ {
        self.slots.iter().map(|s| (s.id.as_str(), &s.data))
    }

    /// Mutable data of every node, in position order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut T)> + '_ {
        self.slots.iter_mut().map(|s| (s.id.as_str(), &mut s.data))
    }

    /// Adds a node as the next leaf. Its own upstream is the only one that changes.
    pub fn insert(&mut self, id: String, data: T) -> Result<Delta, TreeError> {
        if self.index.contains_key(&id) {
            return Err(TreeError::Duplicate(id));
        }
        let pos = self.slots.len();
        let parent = parent_pos(pos).map(|p| self.slots[p].id.clone());
        self.index.insert(id.clone(), pos);
        self.slots.push(Slot {
            id: id.clone(),
            data,
        });
        Ok(Delta {
            changes: vec![UpstreamChange {
                node: id.clone(),
                parent,
            }],
            placed: vec![(id, pos)],
        })
    }

    /// Removes a node: the last node moves into its place, so the layout stays complete.
    /// Returns the removed node's data and the upstream changes (at most three).
    pub fn remove(&mut self, id: &str) -> Result<(T, Delta), TreeError> {
        let Some(pos) = self.index.remove(id) else {
            return Err(TreeError::NotFound(id.to_string()));
        };
        let last = self.slots.len() - 1;
        let old_parent_of_last = parent_pos(last);
        let removed = self.slots.swap_remove(pos);
        let mut delta = Delta::default();
        if pos == last {
            // A leaf at the end: nobody hangs below it.
            return Ok((removed.data, delta));
        }
        let moved = self.slots[pos].id.clone();
        self.index.insert(moved.clone(), pos);
        delta.placed.push((moved.clone(), pos));
        // The moved node's parent is unchanged when it only slid over to its sibling's place.
        if parent_pos(pos) != old_parent_of_last {
            delta.changes.push(UpstreamChange {
                node: moved.clone(),
                parent: parent_pos(pos).map(|p| self.slots[p].id.clone()),
            });
        }
        for child in [2 * pos + 1, 2 * pos + 2] {
            if child < self.slots.len() {
                delta.changes.push(UpstreamChange {
                    node: self.slots[child].id.clone(),
                    parent: Some(moved.clone()),
                });
            }
        }
        Ok((removed.data, delta))
    }

    /// Number of children of `id` (0, 1 or 2).
    pub fn children_count(&self, id: &str) -> Option<usize> {
        let pos = self.position(id)?;
        Some(
            [2 * pos + 1, 2 * pos + 2]
                .iter()
                .filter(|&&c| c < self.slots.len())
                .count(),
        )
    }

    /// Swaps a node with its parent, keeping the shape (so the balance bound holds). This
    /// is the primitive for placement beyond the paper: moving a VM that is busy serving
    /// children in other trees down to a leaf here, and a less loaded one up. At most five
    /// nodes are told: the two swapped, the sibling, and the children of the lower slot.
    pub fn swap_with_parent(&mut self, id: &str) -> Result<Delta, TreeError> {
        let pos = self
            .position(id)
            .ok_or_else(|| TreeError::NotFound(id.to_string()))?;
        let Some(up) = parent_pos(pos) else {
            // The root has no parent: nothing to do.
            return Ok(Delta::default());
        };
        let n = self.slots.len();
        let affected: Vec<usize> = [up, pos, 2 * up + 1, 2 * up + 2, 2 * pos + 1, 2 * pos + 2]
            .into_iter()
            .filter(|&p| p < n)
            .collect();
        let parent_id = |t: &Self, p: usize| parent_pos(p).map(|q| t.slots[q].id.clone());
        let before: HashMap<String, Option<String>> = affected
            .iter()
            .map(|&p| (self.slots[p].id.clone(), parent_id(self, p)))
            .collect();
        self.slots.swap(up, pos);
        self.index.insert(self.slots[up].id.clone(), up);
        self.index.insert(self.slots[pos].id.clone(), pos);
        let mut delta = Delta {
            changes: Vec::new(),
            placed: vec![
                (self.slots[up].id.clone(), up),
                (self.slots[pos].id.clone(), pos),
            ],
        };
        let mut seen = std::collections::HashSet::new();
        for &p in &affected {
            let node = self.slots[p].id.clone();
            let parent = parent_id(self, p);
            if seen.insert(node.clone()) && before.get(&node) != Some(&parent) {
                delta.changes.push(UpstreamChange { node, parent });
            }
        }
        Ok(delta)
    }

    /// An indented drawing of the tree, one node per line, labelled by `label`.
    pub fn draw(&self, label: impl Fn(&str, &T) -> String) -> String {
        let mut out = String::new();
        if self.slots.is_empty() {
            out.push_str("(empty)\n");
            return out;
        }
        self.draw_at(0, "", "", &label, &mut out);
        out
    }

    fn draw_at(
        &self,
        pos: usize,
        lead: &str,
        child_lead: &str,
        label: &impl Fn(&str, &T) -> String,
        out: &mut String,
    ) {
        let slot = &self.slots[pos];
        let _ = writeln!(out, "{lead}{}", label(&slot.id, &slot.data));
        let kids: Vec<usize> = [2 * pos + 1, 2 * pos + 2]
            .into_iter()
            .filter(|&c| c < self.slots.len())
            .collect();
        for (i, &c) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            let (l, cl) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            self.draw_at(
                c,
                &format!("{child_lead}{l}"),
                &format!("{child_lead}{cl}"),
                label,
                out,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> FunctionTree<()> {
        let mut t = FunctionTree::new();
        for i in 0..n {
            t.insert(format!("n{i}"), ()).unwrap();
        }
        t
    }

    #[test]
    fn height_matches_bound() {
        for n in 0..100usize {
            let bound = ((n + 1) as f64).log2().ceil() as u32;
            assert_eq!(balanced_height(n), bound, "n={n}");
            assert_eq!(ids(n).height(), bound);
        }
    }

    #[test]
    fn insert_parents() {
        let t = ids(5);
        assert_eq!(t.parent("n0"), Some(None));
        assert_eq!(t.parent("n1").unwrap().unwrap().0, "n0");
        assert_eq!(t.parent("n4").unwrap().unwrap().0, "n1");
        assert_eq!(t.depth("n4"), Some(2));
        let anc: Vec<_> = t.ancestors("n4").into_iter().map(|(i, _)| i).collect();
        assert_eq!(anc, vec!["n1", "n0"]);
    }

    #[test]
    fn duplicate_and_missing_are_refused() {
        let mut t = ids(3);
        assert_eq!(
            t.insert("n1".into(), ()),
            Err(TreeError::Duplicate("n1".into()))
        );
        assert_eq!(
            t.remove("zz").unwrap_err(),
            TreeError::NotFound("zz".into())
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn remove_root_moves_last() {
        let mut t = ids(5);
        let (_, d) = t.remove("n0").unwrap();
        // n4 takes the root; n1 and n2 get it as their parent.
        assert_eq!(t.position("n4"), Some(0));
        assert_eq!(d.changes.len(), 3);
        assert!(d.changes.contains(&UpstreamChange {
            node: "n4".into(),
            parent: None
        }));
    }

    #[test]
    fn remove_sibling_slides_without_notice() {
        let mut t = ids(3);
        let (_, d) = t.remove("n1").unwrap();
        assert!(d.changes.is_empty());
        assert_eq!(d.placed, vec![("n2".to_string(), 1)]);
    }

    #[test]
    fn draw_shows_structure() {
        let t = ids(4);
        let s = t.draw(|id, _| id.to_string());
        assert_eq!(s, "n0\n├── n1\n│   └── n3\n└── n2\n");
    }
}
