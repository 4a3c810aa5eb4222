//! A flow-level network: nodes with an uplink and a downlink capacity, flows between nodes,
//! max-min fair rates by progressive filling, and an event clock that jumps from one flow
//! completion to the next.
//!
//! A flow from `src` to `dst` crosses exactly two links: `src`'s uplink and `dst`'s downlink
//! (the core is assumed non-blocking, as in a cloud data centre where the VM's NIC limit is the
//! bottleneck). Rates are the max-min fair allocation, computed in three strict priority
//! classes: [`Priority::Urgent`] flows share the links first, [`Priority::Followed`] flows get
//! the capacity urgent flows leave unused, [`Priority::Background`] flows what is left then.
//!
//! Rates are recomputed lazily, and only for the connected component (links joined by flows)
//! that a start, finish or priority change touched. In a function tree a component is one
//! parent's uplink plus its children's downlinks, so a 1,000-VM tree costs a handful of flows
//! per event instead of thousands. A flow's remaining bytes are settled only when its
//! component is recomputed; completion times sit in a heap with a version per flow, and stale
//! entries are skipped (and the heap rebuilt when they pile up).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Index of a node (a VM or a registry) in a [`Network`].
pub type NodeId = usize;

/// Scheduling class of a flow, highest first (the order is the priority order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// On-demand reads (the container waits for them) and read-ahead.
    Urgent,
    /// Blocks a child fetches because its parent's start order named them (follow): only
    /// capacity that urgent flows leave unused.
    Followed,
    /// Background prefetch: only capacity that urgent and followed flows leave unused.
    Background,
}

impl Priority {
    /// All classes, highest first.
    pub const ALL: [Priority; 3] = [Priority::Urgent, Priority::Followed, Priority::Background];
}

/// Handle of a flow, valid until the flow finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(usize);

/// What [`Network::finish`] returns about a finished flow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Finished {
    /// Sending node.
    pub src: NodeId,
    /// Receiving node.
    pub dst: NodeId,
    /// Bytes the flow carried.
    pub bytes: f64,
    /// The caller's tag given at [`Network::start_flow`].
    pub tag: u64,
}

#[derive(Debug)]
struct Link {
    cap: f64,
    flows: Vec<usize>,
}

#[derive(Debug)]
struct Flow {
    src: NodeId,
    dst: NodeId,
    links: [usize; 2],
    /// Position of this flow in each of its links' flow lists (O(1) removal).
    slots: [usize; 2],
    bytes: f64,
    remaining: f64,
    rate: f64,
    /// Time at which `remaining` was last settled.
    settled_at: f64,
    priority: Priority,
    version: u64,
    tag: u64,
}

#[derive(Debug, PartialEq)]
struct Completion {
    time: f64,
    flow: usize,
    version: u64,
}

impl Eq for Completion {}

impl Ord for Completion {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest completion on top; ties
        // go to the lower flow index so runs are deterministic.
        other
            .time
            .total_cmp(&self.time)
            .then_with(|| other.flow.cmp(&self.flow))
    }
}

impl PartialOrd for Completion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Share of one link in progressive filling, ordered smallest first in a max-heap.
#[derive(Debug, PartialEq)]
struct Share(f64, usize);

impl Eq for Share {}

impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The network: nodes, links, active flows and the clock.
#[derive(Debug, Default)]
pub struct Network {
    links: Vec<Link>,
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    live: usize,
    now: f64,
    dirty: Vec<usize>,
    heap: BinaryHeap<Completion>,
    // Scratch space for recomputation, indexed by link or flow; epochs avoid clearing it.
    link_epoch: Vec<u64>,
    flow_epoch: Vec<u64>,
    frozen_epoch: Vec<u64>,
    epoch: u64,
    rem: Vec<f64>,
    cnt: Vec<u32>,
    new_rate: Vec<f64>,
    recomputations: u64,
    /// Versions come from one counter: a flow slot reused by a new flow must not match the
    /// heap entries of the flow that had it before.
    last_version: u64,
}

impl Network {
    /// An empty network at time 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node with the given uplink and downlink capacities in bytes per second
    /// (`f64::INFINITY` for a side that never limits, e.g. a registry's downlink).
    pub fn add_node(&mut self, up_bps: f64, down_bps: f64) -> NodeId {
        assert!(
            up_bps > 0.0 && down_bps > 0.0,
            "capacities must be positive"
        );
        let id = self.links.len() / 2;
        for cap in [up_bps, down_bps] {
            self.links.push(Link {
                cap,
                flows: Vec::new(),
            });
            self.link_epoch.push(0);
            self.rem.push(0.0);
            self.cnt.push(0);
        }
        id
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.links.len() / 2
    }

    /// Current simulated time in seconds.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Number of active flows.
    pub fn active_flows(&self) -> usize {
        self.live
    }

    /// How many component recomputations ran (a cost measure for benchmarks).
    pub fn recomputations(&self) -> u64 {
        self.recomputations
    }

    fn up(node: NodeId) -> usize {
        2 * node
    }

    fn down(node: NodeId) -> usize {
        2 * node + 1
    }

    /// Starts a flow of `bytes` from `src` to `dst` now. `tag` comes back in [`Finished`].
    pub fn start_flow(
        &mut self,
        src: NodeId,
        dst: NodeId,
        bytes: f64,
        priority: Priority,
        tag: u64,
    ) -> FlowId {
        assert!(src != dst, "a flow needs two distinct nodes");
        assert!(src < self.node_count() && dst < self.node_count());
        let links = [Self::up(src), Self::down(dst)];
        assert!(
            self.links[links[0]].cap.is_finite() || self.links[links[1]].cap.is_finite(),
            "a flow between two unlimited links would have an infinite rate"
        );
        let slots = [
            self.links[links[0]].flows.len(),
            self.links[links[1]].flows.len(),
        ];
        let flow = Flow {
            src,
            dst,
            links,
            slots,
            bytes,
            remaining: bytes.max(0.0),
            rate: 0.0,
            settled_at: self.now,
            priority,
            version: 0,
            tag,
        };
        let id = match self.free.pop() {
            Some(i) => {
                self.flows[i] = Some(flow);
                i
            }
            None => {
                self.flows.push(Some(flow));
                self.flow_epoch.push(0);
                self.frozen_epoch.push(0);
                self.new_rate.push(0.0);
                self.flows.len() - 1
            }
        };
        for l in links {
            self.links[l].flows.push(id);
            self.dirty.push(l);
        }
        self.live += 1;
        FlowId(id)
    }

    /// Changes a flow's class (an on-demand read now waits for a block being prefetched).
    pub fn set_priority(&mut self, id: FlowId, priority: Priority) {
        let flow = self.flows[id.0].as_mut().expect("live flow");
        if flow.priority != priority {
            flow.priority = priority;
            self.dirty.extend(flow.links);
        }
    }

    /// Priority of a live flow.
    pub fn priority(&self, id: FlowId) -> Priority {
        self.flows[id.0].as_ref().expect("live flow").priority
    }

    /// Current rate of a live flow in bytes per second (recomputing pending changes first).
    pub fn rate(&mut self, id: FlowId) -> f64 {
        self.settle();
        self.flows[id.0].as_ref().expect("live flow").rate
    }

    /// Sum of the rates of the flows crossing `node`'s uplink and downlink.
    pub fn node_load(&mut self, node: NodeId) -> (f64, f64) {
        self.settle();
        let sum = |l: usize| -> f64 {
            self.links[l]
                .flows
                .iter()
                .map(|&f| self.flows[f].as_ref().unwrap().rate)
                .sum()
        };
        (sum(Self::up(node)), sum(Self::down(node)))
    }

    /// Live flows with their endpoints, priority and rate (for tests and debugging).
    pub fn snapshot(&mut self) -> Vec<(FlowId, NodeId, NodeId, Priority, f64)> {
        self.settle();
        self.flows
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                f.as_ref()
                    .map(|f| (FlowId(i), f.src, f.dst, f.priority, f.rate))
            })
            .collect()
    }

    /// Capacities (up, down) of a node.
    pub fn capacity(&self, node: NodeId) -> (f64, f64) {
        (
            self.links[Self::up(node)].cap,
            self.links[Self::down(node)].cap,
        )
    }

    /// The earliest flow completion, `(time, flow)`, or `None` when no flow can finish (no
    /// flow, or all starved). Does not move the clock.
    pub fn next_completion(&mut self) -> Option<(f64, FlowId)> {
        self.settle();
        while let Some(top) = self.heap.peek() {
            let fresh = matches!(&self.flows[top.flow], Some(f) if f.version == top.version);
            if fresh {
                return Some((top.time.max(self.now), FlowId(top.flow)));
            }
            self.heap.pop();
        }
        None
    }

    /// Moves the clock to `t` (no earlier than now and no later than the next completion:
    /// rates are constant in between, so nothing else has to change).
    pub fn advance_to(&mut self, t: f64) {
        // Changes made at the old time take effect at the old time.
        self.settle();
        debug_assert!(t + 1e-9 >= self.now, "time goes forward");
        if t > self.now {
            self.now = t;
        }
    }

    /// Removes a flow that completed now (or is abandoned) and frees its share.
    pub fn finish(&mut self, id: FlowId) -> Finished {
        let flow = self.flows[id.0].take().expect("live flow");
        for (k, &l) in flow.links.iter().enumerate() {
            let slot = flow.slots[k];
            let list = &mut self.links[l].flows;
            list.swap_remove(slot);
            if let Some(&moved) = list.get(slot) {
                let m = self.flows[moved].as_mut().unwrap();
                let which = if m.links[0] == l { 0 } else { 1 };
                m.slots[which] = slot;
            }
            self.dirty.push(l);
        }
        self.free.push(id.0);
        self.live -= 1;
        Finished {
            src: flow.src,
            dst: flow.dst,
            bytes: flow.bytes,
            tag: flow.tag,
        }
    }

    /// Recomputes the rates of every component touched since the last call.
    pub fn settle(&mut self) {
        while let Some(l) = self.dirty.pop() {
            if self.link_epoch[l] != self.epoch + 1 {
                self.recompute_component(l);
            }
        }
        self.epoch += 1;
        if self.heap.len() > 4 * self.live + 1024 {
            self.rebuild_heap();
        }
    }

    fn rebuild_heap(&mut self) {
        self.heap.clear();
        for (i, f) in self.flows.iter().enumerate() {
            if let Some(f) = f {
                if f.rate > 0.0 {
                    self.heap.push(Completion {
                        time: f.settled_at + f.remaining / f.rate,
                        flow: i,
                        version: f.version,
                    });
                }
            }
        }
    }

    /// Progressive filling over the component of `start`, urgent class first.
    fn recompute_component(&mut self, start: usize) {
        self.recomputations += 1;
        // All components recomputed in one settle() share the mark `epoch + 1`.
        let mark = self.epoch + 1;
        let mut comp_links = vec![start];
        let mut comp_flows = Vec::new();
        self.link_epoch[start] = mark;
        let mut i = 0;
        while i < comp_links.len() {
            let l = comp_links[i];
            i += 1;
            for &f in &self.links[l].flows {
                if self.flow_epoch[f] == mark {
                    continue;
                }
                self.flow_epoch[f] = mark;
                comp_flows.push(f);
                for &l2 in &self.flows[f].as_ref().unwrap().links {
                    if self.link_epoch[l2] != mark {
                        self.link_epoch[l2] = mark;
                        comp_links.push(l2);
                    }
                }
            }
        }
        for &l in &comp_links {
            self.rem[l] = self.links[l].cap;
        }
        for class in Priority::ALL {
            self.fill_class(class, &comp_links, &comp_flows, mark);
        }
        let now = self.now;
        let mut version = self.last_version;
        for &f in &comp_flows {
            let new_rate = self.new_rate[f];
            let flow = self.flows[f].as_mut().unwrap();
            // Settle the bytes moved at the old rate, then switch to the new one.
            flow.remaining = (flow.remaining - flow.rate * (now - flow.settled_at)).max(0.0);
            flow.settled_at = now;
            if new_rate != flow.rate || flow.version == 0 {
                flow.rate = new_rate;
                version += 1;
                flow.version = version;
                if new_rate > 0.0 || flow.remaining == 0.0 {
                    let dt = if flow.remaining == 0.0 {
                        0.0
                    } else {
                        flow.remaining / new_rate
                    };
                    self.heap.push(Completion {
                        time: now + dt,
                        flow: f,
                        version: flow.version,
                    });
                }
            }
        }
        self.last_version = version;
    }

    fn fill_class(&mut self, class: Priority, links: &[usize], flows: &[usize], mark: u64) {
        for &l in links {
            self.cnt[l] = 0;
        }
        for &f in flows {
            let flow = self.flows[f].as_ref().unwrap();
            if flow.priority == class {
                for l in flow.links {
                    self.cnt[l] += 1;
                }
                self.new_rate[f] = 0.0;
            }
        }
        let mut heap: BinaryHeap<Share> = links
            .iter()
            .filter(|&&l| self.cnt[l] > 0)
            .map(|&l| Share(self.rem[l].max(0.0) / self.cnt[l] as f64, l))
            .collect();
        while let Some(Share(share, l)) = heap.pop() {
            if self.cnt[l] == 0 {
                continue;
            }
            let current = self.rem[l].max(0.0) / self.cnt[l] as f64;
            if current != share {
                // Shares only grow as other links freeze flows; re-queue at the new value.
                heap.push(Share(current, l));
                continue;
            }
            // `l` is the tightest link: every unfrozen flow of the class on it gets `share`.
            for idx in 0..self.links[l].flows.len() {
                let f = self.links[l].flows[idx];
                if self.frozen_epoch[f] == mark {
                    continue;
                }
                let flow = self.flows[f].as_ref().unwrap();
                if flow.priority != class {
                    continue;
                }
                self.frozen_epoch[f] = mark;
                self.new_rate[f] = share;
                for l2 in flow.links {
                    self.rem[l2] -= share;
                    self.cnt[l2] -= 1;
                }
            }
        }
        for &l in links {
            // Rounding can leave a hair below zero; background flows must not see it.
            if self.rem[l] < 0.0 {
                self.rem[l] = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EPS: f64 = 1e-6;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= EPS * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn one_flow_gets_the_smaller_link() {
        let mut net = Network::new();
        let a = net.add_node(100.0, 100.0);
        let b = net.add_node(100.0, 40.0);
        let f = net.start_flow(a, b, 400.0, Priority::Urgent, 7);
        assert!(close(net.rate(f), 40.0));
        let (t, id) = net.next_completion().unwrap();
        assert_eq!(id, f);
        assert!(close(t, 10.0));
        net.advance_to(t);
        let done = net.finish(f);
        assert_eq!((done.src, done.dst, done.tag), (a, b, 7));
        assert!(net.next_completion().is_none());
    }

    #[test]
    fn registry_egress_is_shared_fairly_and_leftover_goes_to_the_unconstrained() {
        let mut net = Network::new();
        let reg = net.add_node(300.0, f64::INFINITY);
        let slow = net.add_node(100.0, 50.0);
        let fast1 = net.add_node(100.0, 1000.0);
        let fast2 = net.add_node(100.0, 1000.0);
        let f0 = net.start_flow(reg, slow, 1.0, Priority::Urgent, 0);
        let f1 = net.start_flow(reg, fast1, 1.0, Priority::Urgent, 0);
        let f2 = net.start_flow(reg, fast2, 1.0, Priority::Urgent, 0);
        assert!(close(net.rate(f0), 50.0));
        assert!(close(net.rate(f1), 125.0));
        assert!(close(net.rate(f2), 125.0));
    }

    #[test]
    fn background_gets_only_the_leftover() {
        let mut net = Network::new();
        let p = net.add_node(100.0, 100.0);
        let c1 = net.add_node(100.0, 30.0);
        let c2 = net.add_node(100.0, 100.0);
        let u = net.start_flow(p, c1, 1.0, Priority::Urgent, 0);
        let b = net.start_flow(p, c2, 1.0, Priority::Background, 0);
        assert!(close(net.rate(u), 30.0));
        assert!(close(net.rate(b), 70.0));
        // A second urgent flow on the uplink starves the background one.
        let u2 = net.start_flow(p, c2, 1.0, Priority::Urgent, 0);
        assert!(close(net.rate(u2), 70.0));
        assert!(close(net.rate(b), 0.0));
        net.set_priority(b, Priority::Urgent);
        assert!(close(net.rate(u), 30.0));
        assert!(close(net.rate(b), 35.0));
        assert!(close(net.rate(u2), 35.0));
    }

    #[test]
    fn progress_is_kept_across_rate_changes() {
        let mut net = Network::new();
        let p = net.add_node(100.0, 100.0);
        let c1 = net.add_node(1000.0, 1000.0);
        let c2 = net.add_node(1000.0, 1000.0);
        let f1 = net.start_flow(p, c1, 100.0, Priority::Urgent, 1);
        net.advance_to(0.5); // 50 bytes moved at 100 B/s
        let f2 = net.start_flow(p, c2, 100.0, Priority::Urgent, 2);
        let (t, id) = net.next_completion().unwrap();
        assert_eq!(id, f1);
        assert!(close(t, 1.5)); // 50 bytes left at 50 B/s
        net.advance_to(t);
        net.finish(f1);
        let (t, id) = net.next_completion().unwrap();
        assert_eq!(id, f2);
        assert!(close(t, 2.0)); // 50 done, 50 left at 100 B/s
    }

    #[test]
    fn a_reused_flow_slot_does_not_inherit_old_completions() {
        let mut net = Network::new();
        let a = net.add_node(10.0, 10.0);
        let b = net.add_node(10.0, 10.0);
        let c = net.add_node(10.0, 10.0);
        let f1 = net.start_flow(a, b, 10.0, Priority::Urgent, 1);
        let f2 = net.start_flow(a, c, 100.0, Priority::Urgent, 2);
        net.settle(); // f1 completes at 2 s at 5 B/s
        net.advance_to(0.1);
        net.finish(f2); // abandoned; its slot is free with a heap entry left behind
        let f3 = net.start_flow(a, c, 1000.0, Priority::Urgent, 3);
        net.settle();
        while let Some((t, f)) = net.next_completion() {
            net.advance_to(t);
            let done = net.finish(f);
            if done.tag == 3 {
                assert!(t > 50.0, "slot reuse fired early at {t}");
            }
        }
        let _ = (f1, f3);
    }

    #[test]
    fn zero_byte_flow_completes_at_once() {
        let mut net = Network::new();
        let a = net.add_node(1.0, 1.0);
        let b = net.add_node(1.0, 1.0);
        net.advance_to(3.0);
        let f = net.start_flow(a, b, 0.0, Priority::Urgent, 0);
        assert_eq!(net.next_completion(), Some((3.0, f)));
    }

    /// Checks the max-min properties of the urgent class and of the background class in the
    /// capacity left by the urgent one.
    fn check_max_min(net: &mut Network) {
        let snap = net.snapshot();
        let nodes = net.node_count();
        for class in Priority::ALL {
            // Load per link: the flows of this class and of every higher one.
            let mut load = vec![0.0; 2 * nodes];
            let mut max_on = vec![0.0f64; 2 * nodes];
            for &(_, s, d, p, r) in &snap {
                if p <= class {
                    load[2 * s] += r;
                    load[2 * d + 1] += r;
                }
                if p == class {
                    max_on[2 * s] = max_on[2 * s].max(r);
                    max_on[2 * d + 1] = max_on[2 * d + 1].max(r);
                }
            }
            let cap = |l: usize| {
                let (u, d) = net.capacity(l / 2);
                if l.is_multiple_of(2) {
                    u
                } else {
                    d
                }
            };
            for (l, &ld) in load.iter().enumerate() {
                assert!(ld <= cap(l) * (1.0 + EPS) + EPS, "link {l} over capacity");
            }
            // Every flow of the class has a bottleneck: a saturated link on which no flow of
            // the class gets more than it does.
            for &(_, s, d, p, r) in &snap {
                if p != class {
                    continue;
                }
                let bottleneck = [2 * s, 2 * d + 1].into_iter().any(|l| {
                    cap(l).is_finite()
                        && close(load[l], cap(l))
                        && max_on[l] <= r * (1.0 + EPS) + EPS
                });
                assert!(bottleneck, "flow {s}->{d} at {r} has no bottleneck");
            }
        }
    }

    proptest! {
        #[test]
        fn rates_are_max_min_fair(
            caps in prop::collection::vec((1.0f64..1000.0, 1.0f64..1000.0), 2..8),
            flows in prop::collection::vec((0usize..8, 0usize..8, any::<bool>()), 1..40),
            removals in prop::collection::vec(0usize..40, 0..10),
        ) {
            let mut net = Network::new();
            for &(u, d) in &caps {
                net.add_node(u, d);
            }
            let n = caps.len();
            let mut ids = Vec::new();
            for &(s, d, urgent) in &flows {
                let (s, d) = (s % n, d % n);
                if s == d {
                    continue;
                }
                let p = if urgent { Priority::Urgent } else { Priority::Background };
                ids.push(net.start_flow(s, d, 1e6, p, 0));
            }
            check_max_min(&mut net);
            for r in removals {
                if ids.is_empty() {
                    break;
                }
                let id = ids.swap_remove(r % ids.len());
                net.finish(id);
                check_max_min(&mut net);
            }
        }

        #[test]
        fn bytes_are_conserved(
            sizes in prop::collection::vec(1.0f64..1e4, 1..20),
        ) {
            // A star: one server, several clients; the server's uplink runs full until the
            // last flow ends, so the end time is total bytes / capacity.
            let mut net = Network::new();
            let server = net.add_node(100.0, 100.0);
            let clients: Vec<_> = sizes.iter().map(|_| net.add_node(1e9, 1e9)).collect();
            for (c, &b) in clients.iter().zip(&sizes) {
                net.start_flow(server, *c, b, Priority::Urgent, 0);
            }
            let mut end = 0.0;
            while let Some((t, f)) = net.next_completion() {
                net.advance_to(t);
                net.finish(f);
                end = t;
            }
            let total: f64 = sizes.iter().sum();
            prop_assert!(close(end, total / 100.0));
        }
    }
}
