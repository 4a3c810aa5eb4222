//! Property tests of the whole forest (trees + leases + watchers + sled) over random
//! join / leave / heartbeat / clock / expire sequences.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasnet_coordinator::forest::{Forest, ForestError, RemoveReason};
use faasnet_coordinator::metrics::Metrics;
use faasnet_coordinator::store::Store;
use faasnet_coordinator::{Source, TreeKey, Upstream};
use proptest::prelude::*;
use tokio::sync::watch;

const TTL: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone)]
enum Op {
    Join(usize, u8),
    Leave(usize, u8),
    Heartbeat(usize, u8),
    Watch(usize, u8),
    Advance(u16),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    let t = 0..3usize;
    let n = 0..24u8;
    prop_oneof![
        6 => (t.clone(), n.clone()).prop_map(|(t, n)| Op::Join(t, n)),
        2 => (t.clone(), n.clone()).prop_map(|(t, n)| Op::Leave(t, n)),
        3 => (t.clone(), n.clone()).prop_map(|(t, n)| Op::Heartbeat(t, n)),
        3 => (t.clone(), n.clone()).prop_map(|(t, n)| Op::Watch(t, n)),
        2 => (1..700u16).prop_map(Op::Advance),
        2 => Just(Op::Expire),
    ]
}

fn key(t: usize) -> TreeKey {
    // Two tenants share a function digest: their trees must stay apart.
    let tenant = if t == 2 { "globex" } else { "acme" };
    let digest = format!("sha256:{}", format!("{:x}", t % 2).repeat(64));
    TreeKey::new(tenant, digest)
}

fn parent_of(u: &Upstream) -> Option<String> {
    match &u.source {
        Source::Registry => None,
        Source::Peer { node_id, .. } => Some(node_id.clone()),
    }
}

fn check_tree(map: &HashMap<String, Upstream>, epoch: u64) -> Result<(), TestCaseError> {
    let n = map.len();
    if n == 0 {
        return Ok(());
    }
    prop_assert_eq!(map.values().filter(|u| u.is_root()).count(), 1);
    let mut kids: HashMap<String, usize> = HashMap::new();
    let mut height = 0;
    for (node, up) in map {
        prop_assert_eq!(up.epoch, epoch, "answers carry the tree epoch");
        if let Some(p) = parent_of(up) {
            prop_assert!(map.contains_key(&p));
            *kids.entry(p).or_default() += 1;
        }
        let mut cur = node.clone();
        let mut steps = 1;
        while let Some(p) = parent_of(&map[&cur]) {
            cur = p;
            steps += 1;
            prop_assert!(steps <= n, "cycle");
        }
        height = height.max(steps);
    }
    prop_assert!(kids.values().all(|&k| k <= 2));
    prop_assert!(height <= ((n + 1) as f64).log2().ceil() as usize);
    check_second_tree(map, &kids)
}

/// The second stripe tree: a balanced binary tree over the same nodes, and no node forwards
/// in both trees (`kids`: children in the function tree).
fn check_second_tree(
    map: &HashMap<String, Upstream>,
    kids: &HashMap<String, usize>,
) -> Result<(), TestCaseError> {
    let n = map.len();
    let second = |u: &Upstream| match u.second.clone() {
        Some(Source::Peer { node_id, .. }) => Ok(Some(node_id)),
        Some(Source::Registry) => Ok(None),
        None => Err(TestCaseError::fail("no second stripe upstream")),
    };
    let mut roots = 0;
    let mut kids2: HashMap<String, usize> = HashMap::new();
    for (node, up) in map {
        match second(up)? {
            None => roots += 1,
            Some(p) => {
                prop_assert!(
                    map.contains_key(&p),
                    "{}'s second parent {} is absent",
                    node,
                    p
                );
                *kids2.entry(p).or_default() += 1;
            }
        }
        let (mut cur, mut steps) = (node.clone(), 1);
        while let Some(p) = second(&map[&cur])? {
            cur = p;
            steps += 1;
            prop_assert!(steps <= n, "cycle in the second tree");
        }
        prop_assert!(
            steps <= ((n + 1) as f64).log2().ceil() as usize,
            "second tree too high"
        );
    }
    prop_assert_eq!(roots, 1, "one root of the second tree");
    prop_assert!(kids2.values().all(|&k| k <= 2));
    for node in map.keys() {
        prop_assert!(
            !(kids.contains_key(node) && kids2.contains_key(node)),
            "{} forwards in both trees",
            node
        );
    }
    Ok(())
}

struct Model {
    deadlines: HashMap<(usize, String), Duration>,
    epochs: [u64; 3],
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let store = Arc::new(Store::temporary().unwrap());
    let base = Instant::now();
    let mut now = Duration::ZERO;
    let forest = Forest::open(store.clone(), Arc::new(Metrics::new()), TTL, base).unwrap();
    let mut model = Model {
        deadlines: HashMap::new(),
        epochs: [0; 3],
    };
    let mut watchers: Vec<(usize, String, watch::Receiver<Upstream>)> = Vec::new();

    for op in ops {
        let snapshot: Vec<HashMap<String, Upstream>> = (0..3)
            .map(|t| forest.upstreams(&key(t)).unwrap_or_default())
            .collect();
        let mut changed_trees: HashSet<usize> = HashSet::new();
        let mut multi_change = false;
        match &op {
            Op::Join(t, n) => {
                let id = format!("vm{n}");
                let addr = format!("10.0.{t}.{n}:7800");
                let r = forest.join(&key(*t), &id, &addr, base + now).await;
                if model.deadlines.contains_key(&(*t, id.clone())) {
                    prop_assert!(matches!(r, Err(ForestError::Duplicate { .. })), "{:?}", r);
                } else {
                    let up = r.unwrap();
                    model.epochs[*t] += 1;
                    prop_assert_eq!(up.epoch, model.epochs[*t]);
                    model.deadlines.insert((*t, id), now + TTL);
                    changed_trees.insert(*t);
                }
            }
            Op::Leave(t, n) => {
                let id = format!("vm{n}");
                let r = forest.remove(&key(*t), &id, RemoveReason::Left).await;
                if model.deadlines.remove(&(*t, id)).is_some() {
                    model.epochs[*t] += 1;
                    prop_assert_eq!(r.unwrap(), model.epochs[*t]);
                    changed_trees.insert(*t);
                } else {
                    prop_assert!(
                        matches!(
                            r,
                            Err(ForestError::UnknownNode { .. } | ForestError::UnknownTree { .. })
                        ),
                        "{:?}",
                        r
                    );
                }
            }
            Op::Heartbeat(t, n) => {
                let id = format!("vm{n}");
                let r = forest.heartbeat(&key(*t), &id, base + now);
                match model.deadlines.get_mut(&(*t, id)) {
                    Some(d) => {
                        prop_assert_eq!(r.unwrap(), model.epochs[*t]);
                        *d = now + TTL;
                    }
                    None => prop_assert!(r.is_err()),
                }
            }
            Op::Watch(t, n) => {
                let id = format!("vm{n}");
                match forest.watch(&key(*t), &id).await {
                    Ok(rx) => {
                        prop_assert!(model.deadlines.contains_key(&(*t, id.clone())));
                        prop_assert_eq!(&*rx.borrow(), &snapshot[*t][&id]);
                        watchers.push((*t, id, rx));
                    }
                    Err(_) => prop_assert!(!model.deadlines.contains_key(&(*t, id))),
                }
            }
            Op::Advance(ms) => now += Duration::from_millis(*ms as u64),
            Op::Expire => {
                let mut removed = forest.expire(base + now).await.unwrap();
                let mut expected: Vec<_> = model
                    .deadlines
                    .iter()
                    .filter(|(_, d)| **d <= now)
                    .map(|((t, id), _)| (key(*t), id.clone()))
                    .collect();
                removed.sort();
                expected.sort();
                prop_assert_eq!(&removed, &expected, "exactly the expired leases go");
                model.deadlines.retain(|_, d| *d > now);
                for (k, _) in &removed {
                    let t = (0..3).find(|t| key(*t) == *k).unwrap();
                    model.epochs[t] += 1;
                    changed_trees.insert(t);
                }
                multi_change = removed.len() > 1;
            }
        }

        // Invariants, and notifications == change in the tree.
        for (t, before) in snapshot.iter().enumerate() {
            let map = forest.upstreams(&key(t)).unwrap_or_default();
            let members: HashSet<&String> = map.keys().collect();
            let expected: HashSet<String> = model
                .deadlines
                .keys()
                .filter(|(mt, _)| *mt == t)
                .map(|(_, id)| id.clone())
                .collect();
            prop_assert_eq!(members, expected.iter().collect::<HashSet<_>>());
            check_tree(&map, model.epochs[t])?;
            if !changed_trees.contains(&t) {
                prop_assert_eq!(&map, before, "untouched trees do not change");
            }
        }
        let mut live = Vec::new();
        for (t, id, mut rx) in watchers.drain(..) {
            let now_map = forest.upstreams(&key(t)).unwrap_or_default();
            match (rx.has_changed(), now_map.get(&id)) {
                (Err(_), None) => continue, // left: its watch closed
                (Err(_), Some(_)) => prop_assert!(false, "watch of live node {} closed", id),
                (Ok(_), None) => prop_assert!(false, "watch of removed node {} still open", id),
                (Ok(notified), Some(cur)) => {
                    // Either parent: in the function tree or in the second stripe tree.
                    let before = snapshot[t].get(&id).map(|u| (&u.source, &u.second));
                    let moved = before != Some((&cur.source, &cur.second));
                    if multi_change {
                        prop_assert!(!moved || notified, "{} moved but was not told", id);
                    } else {
                        prop_assert_eq!(
                            notified,
                            moved,
                            "{} told iff its upstream changed ({:?})",
                            id,
                            op
                        );
                    }
                    let seen = rx.borrow_and_update().clone();
                    prop_assert_eq!(
                        (&seen.source, &seen.second),
                        (&cur.source, &cur.second),
                        "watcher holds the current upstream"
                    );
                    if notified && !multi_change {
                        prop_assert_eq!(seen.epoch, model.epochs[t]);
                    }
                    prop_assert!(seen.epoch <= model.epochs[t]);
                }
            }
            live.push((t, id, rx));
        }
        watchers = live;
    }

    // Everything acknowledged is in sled: a fresh forest over the same store agrees.
    let reopened = Forest::open(store, Arc::new(Metrics::new()), TTL, base + now).unwrap();
    for t in 0..3 {
        let a = forest.upstreams(&key(t)).unwrap_or_default();
        let b = reopened.upstreams(&key(t)).unwrap_or_default();
        prop_assert_eq!(a, b, "reloaded tree {} differs", t);
    }
    // Epochs keep going up after a reload, also for trees that emptied (and come back).
    for t in 0..3 {
        let up = reopened
            .join(&key(t), "newcomer", "10.9.9.9:7800", base + now)
            .await
            .unwrap();
        prop_assert_eq!(
            up.epoch,
            model.epochs[t] + 1,
            "tree {} epoch after reload",
            t
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn forest_sequences(ops in prop::collection::vec(op(), 1..120)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
