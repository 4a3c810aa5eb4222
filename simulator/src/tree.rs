//! The function tree of a simulated start, built by the coordinator's own tree code.
//!
//! Using [`FunctionTree`] itself (not a re-implementation of the heap layout) means the
//! simulator sees exactly the parents the coordinator would hand out: if the coordinator's
//! placement changes, the simulated pipeline depth changes with it.

use faasnet_coordinator::{function_tree::FunctionTree, stripe_tree::StripeTree};

use crate::error::{Result, SimError};

/// Who feeds whom, by VM index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeLayout {
    /// The parent of each VM; `None` for the root (it reads the registry).
    pub parent: Vec<Option<usize>>,
    /// The parent of each VM in the second stripe tree (the coordinator's `StripeTree`,
    /// whose inner nodes are the function tree's leaves); `None` for its root.
    pub second_parent: Vec<Option<usize>>,
    /// Depth of each VM (the root is 0).
    pub depth: Vec<u32>,
    /// Number of levels.
    pub height: u32,
}

/// The node id a simulated VM uses in the tree and in reports.
pub fn vm_name(i: usize) -> String {
    format!("vm{i}")
}

/// Builds the tree of `n` VMs joining in `order` (a permutation of `0..n`: the order in which
/// their join requests reach the coordinator).
pub fn build(order: &[usize]) -> Result<TreeLayout> {
    let n = order.len();
    let mut tree: FunctionTree<usize> = FunctionTree::new();
    let mut second = StripeTree::new();
    for &vm in order {
        if vm >= n {
            return Err(SimError::Invalid(format!(
                "join order names vm {vm} of {n}"
            )));
        }
        let delta = tree
            .insert(vm_name(vm), vm)
            .map_err(|e| SimError::Invalid(format!("join order: {e}")))?;
        second
            .joined(&tree, &vm_name(vm), &delta.placed)
            .map_err(|e| SimError::Invalid(format!("join order: {e}")))?;
    }
    let mut parent = vec![None; n];
    let mut depth = vec![0; n];
    let mut second_parent = vec![None; n];
    for (id, &vm) in tree.iter() {
        parent[vm] = tree
            .parent(id)
            .expect("node is in the tree")
            .map(|(_, &p)| p);
        depth[vm] = tree.depth(id).expect("node is in the tree");
        second_parent[vm] = second
            .parent(id)
            .expect("node is in both trees")
            .and_then(|p| tree.get(p).copied());
    }
    Ok(TreeLayout {
        parent,
        second_parent,
        depth,
        height: tree.height(),
    })
}

/// The tree of `n` VMs joining in index order (vm0 first, so vm0 is the root).
pub fn build_in_order(n: usize) -> TreeLayout {
    build(&(0..n).collect::<Vec<_>>()).expect("identity order is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_tree_is_the_heap_layout() {
        let t = build_in_order(7);
        assert_eq!(
            t.parent,
            vec![None, Some(0), Some(0), Some(1), Some(1), Some(2), Some(2)]
        );
        assert_eq!(t.depth, vec![0, 1, 1, 2, 2, 2, 2]);
        assert_eq!(t.height, 3);
    }

    #[test]
    fn join_order_decides_the_root() {
        let t = build(&[2, 0, 1]).unwrap();
        assert_eq!(t.parent, vec![Some(2), Some(2), None]);
        assert!(build(&[0, 0]).is_err());
        assert!(build(&[3]).is_err());
    }

    #[test]
    fn thousand_vms_have_ten_levels() {
        let t = build_in_order(1000);
        assert_eq!(t.height, 10);
        assert_eq!(*t.depth.iter().max().unwrap(), 9);
    }
}
