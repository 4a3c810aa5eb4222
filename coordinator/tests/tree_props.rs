//! Property tests of the pure function tree over random insert/delete sequences.

use std::collections::{HashMap, HashSet, VecDeque};

use faasnet_coordinator::function_tree::{FunctionTree, TreeError, UpstreamChange};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(u16),
    Remove(prop::sample::Index),
    RemoveMissing(u16),
    Swap(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..200u16).prop_map(Op::Insert),
        4 => any::<prop::sample::Index>().prop_map(Op::Remove),
        1 => (1000..1010u16).prop_map(Op::RemoveMissing),
        2 => any::<prop::sample::Index>().prop_map(Op::Swap),
    ]
}

/// node -> parent (None for the root)
fn parents(t: &FunctionTree<()>) -> HashMap<String, Option<String>> {
    t.iter()
        .map(|(id, _)| {
            let p = t.parent(id).expect("present").map(|(p, _)| p.to_string());
            (id.to_string(), p)
        })
        .collect()
}

/// Checks the structural invariants on the parent map alone, without trusting the layout.
pub fn check_tree(map: &HashMap<String, Option<String>>) -> Result<(), TestCaseError> {
    let n = map.len();
    if n == 0 {
        return Ok(());
    }
    let roots: Vec<_> = map.iter().filter(|(_, p)| p.is_none()).collect();
    prop_assert_eq!(roots.len(), 1, "exactly one root");
    let root = roots[0].0.clone();
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for (node, parent) in map {
        if let Some(p) = parent {
            prop_assert!(
                map.contains_key(p),
                "parent {} of {} is in the tree",
                p,
                node
            );
            prop_assert_ne!(p, node, "no self loop");
            children.entry(p.as_str()).or_default().push(node);
        }
    }
    for (p, kids) in &children {
        prop_assert!(kids.len() <= 2, "{} has {} children", p, kids.len());
    }
    // No cycles: every chain reaches the root within n steps. Depth is the chain length.
    let mut height = 0;
    for node in map.keys() {
        let mut cur = node.clone();
        let mut steps = 0;
        while let Some(Some(p)) = map.get(&cur) {
            cur = p.clone();
            steps += 1;
            prop_assert!(steps <= n, "cycle through {}", node);
        }
        prop_assert_eq!(&cur, &root);
        height = height.max(steps + 1);
    }
    // Every node reachable from the root.
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([root.as_str()]);
    while let Some(x) = queue.pop_front() {
        prop_assert!(seen.insert(x), "visited twice: {}", x);
        queue.extend(children.get(x).into_iter().flatten().copied());
    }
    prop_assert_eq!(seen.len(), n, "all nodes reachable from the root");
    let bound = ((n + 1) as f64).log2().ceil() as usize;
    prop_assert!(
        height <= bound,
        "height {} > ceil(log2({}+1)) = {}",
        height,
        n,
        bound
    );
    Ok(())
}

fn diff(
    before: &HashMap<String, Option<String>>,
    after: &HashMap<String, Option<String>>,
) -> HashSet<UpstreamChange> {
    after
        .iter()
        .filter(|(n, p)| before.get(*n) != Some(p))
        .map(|(n, p)| UpstreamChange {
            node: n.clone(),
            parent: p.clone(),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_sequences_keep_the_tree_balanced_and_notify_exactly(ops in prop::collection::vec(op(), 1..300)) {
        let mut t: FunctionTree<()> = FunctionTree::new();
        for op in ops {
            let before = parents(&t);
            let result = match &op {
                Op::Insert(i) => t.insert(format!("vm{i}"), ()),
                Op::Remove(ix) => {
                    if t.is_empty() { continue; }
                    let id = t.at(ix.index(t.len())).unwrap().0.to_string();
                    t.remove(&id).map(|(_, d)| d)
                }
                Op::RemoveMissing(i) => t.remove(&format!("vm{i}")).map(|(_, d)| d),
                Op::Swap(ix) => {
                    if t.is_empty() { continue; }
                    let id = t.at(ix.index(t.len())).unwrap().0.to_string();
                    t.swap_with_parent(&id)
                }
            };
            let after = parents(&t);
            match result {
                Ok(delta) => {
                    let changes: HashSet<_> = delta.changes.iter().cloned().collect();
                    prop_assert_eq!(changes.len(), delta.changes.len(), "no duplicate notice");
                    prop_assert_eq!(changes, diff(&before, &after), "notices == change in the tree after {:?}", op);
                    match op {
                        Op::Insert(_) => {
                            prop_assert_eq!(after.len(), before.len() + 1);
                            prop_assert_eq!(delta.changes.len(), 1);
                        }
                        Op::Swap(_) => {
                            prop_assert_eq!(after.len(), before.len());
                            prop_assert!(delta.changes.len() <= 5);
                        }
                        _ => {
                            prop_assert_eq!(after.len() + 1, before.len());
                            // O(1) moves: one node relocated, at most three told.
                            prop_assert!(delta.placed.len() <= 1);
                            prop_assert!(delta.changes.len() <= 3);
                        }
                    }
                    // Positions reported for persistence are the real ones.
                    for (id, pos) in &delta.placed {
                        prop_assert_eq!(t.position(id), Some(*pos));
                    }
                }
                Err(TreeError::Duplicate(_)) | Err(TreeError::NotFound(_)) => {
                    prop_assert_eq!(&before, &after, "a refused op changes nothing");
                }
            }
            check_tree(&after)?;
            prop_assert_eq!(t.height() as usize, {
                let n = t.len();
                ((n + 1) as f64).log2().ceil() as usize
            });
        }
    }
}
