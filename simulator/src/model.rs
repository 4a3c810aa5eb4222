//! The three provisioning modes our testbed runs, as discrete-event models over
//! [`crate::network::Network`].
//!
//! - **baseline**: every VM downloads the whole original (gzip) image from the registry, then
//!   unpacks it (`unpack_bps` of uncompressed data), then starts the container (`h0_s`).
//! - **ondemand**: every VM reads its start working set from the registry block by block, in
//!   the recorded order, with the snapshotter's read-ahead; then `h0_s`.
//! - **faasnet**: as on-demand, but only the tree's root reads the registry; every other VM
//!   asks its tree parent, which forwards a block once it holds all of it (store and forward
//!   per block, so a block reaches depth d after d block times plus latencies).
//!
//! Optionally every VM also prefetches the whole image in the background (access order
//! first), as the snapshotter does; prefetch flows get only the capacity on-demand flows leave
//! ([`Priority::Background`]), and a block being prefetched turns urgent when a read waits
//! for it.
//!
//! Latency: a request reaches its server after `rtt/2`; the server starts sending once it
//! holds the block, and the response's first byte needs another `rtt/2`. Both are folded
//! into the flow's start, so a block from a server that holds it costs `rtt + size/rate`.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};
use crate::network::{FlowId, Network, Priority};
use crate::trace::BlockTrace;
use crate::tree::{self, vm_name, TreeLayout};

/// How the VMs get the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Full pull of the original image from the registry, unpack, start.
    Baseline,
    /// Lazy block reads from the registry, no tree.
    #[serde(alias = "on-demand")]
    Ondemand,
    /// Lazy block reads through the function tree.
    Faasnet,
}

impl Mode {
    /// All modes, in report order.
    pub const ALL: [Mode; 3] = [Mode::Baseline, Mode::Ondemand, Mode::Faasnet];

    /// The name used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Ondemand => "ondemand",
            Mode::Faasnet => "faasnet",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "baseline" => Ok(Mode::Baseline),
            "ondemand" | "on-demand" => Ok(Mode::Ondemand),
            "faasnet" => Ok(Mode::Faasnet),
            _ => Err(SimError::Invalid(format!("unknown mode {s:?}"))),
        }
    }
}

/// Model parameters. Rates are in bytes per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Number of VMs starting the function at once.
    pub n_vms: usize,
    /// Each VM's uplink and downlink, bytes/s.
    pub vm_link_bps: f64,
    /// The registry's egress, bytes/s.
    pub registry_egress_bps: f64,
    /// Round-trip time of one block request, seconds.
    pub rtt_s: f64,
    /// Container start overhead once the image data is there (runtime, process start,
    /// imports not covered by the working set), seconds.
    pub h0_s: f64,
    /// Baseline unpack rate, bytes of uncompressed data per second.
    pub unpack_bps: f64,
    /// Blocks after a missed block fetched along with it (the snapshotter's read-ahead).
    pub readahead_blocks: usize,
    /// Background prefetch of the whole image during the start.
    pub prefetch: bool,
    /// Prefetch workers per layer.
    pub prefetch_concurrency: usize,
    /// Containers started per VM (fractions spread over the VMs: 2.5 means half the VMs run
    /// 3 and half 2).
    pub containers_per_vm: f64,
    /// vCPUs per VM: containers on one VM start `vm_cores` at a time, each taking `h0_s`.
    pub vm_cores: usize,
    /// Sibling exchange (docs/lazy.md): the two children of a parent split the blocks, side 0
    /// (the first child) fetches even-index blocks from the parent and the odd ones from its
    /// sibling, side 1 the other way round. Prefetch is not split.
    #[serde(default = "yes")]
    pub sibling_exchange: bool,
    /// Two stripe trees (coordinator `stripe_tree`): even-index blocks of a layer come down
    /// the function tree, odd ones down the second tree, whose inner nodes are the first's
    /// leaves; a root of either reads its stripe from the registry. Replaces the sibling
    /// exchange. Not in the snapshotter yet: this asks what it would buy.
    #[serde(default)]
    pub stripe_trees: bool,
    /// Prefetch starts a fetch only after no on-demand fetch ran on the node for this long
    /// (the snapshotter's `prefetch::QUIET`, 2 s), seconds.
    #[serde(default = "two_seconds")]
    pub prefetch_quiet_s: f64,
    /// Prefetch takes the recorded access order first (a node that ran the function
    /// before); false: block index order (a fresh node, as in the testbed benchmark).
    #[serde(default = "yes")]
    pub prefetch_recorded_order: bool,
    /// Cores shared by all VMs for their CPU work (container start `h0_s`, baseline unpack),
    /// each job using at most one core; `None`: every VM has its own CPU (no sharing).
    #[serde(default)]
    pub host_cores: Option<f64>,
    /// Follow (the snapshotter's `follow_concurrency`, 4): per layer, a VM fetches the blocks
    /// of its start region (trace `start_blocks`) at mount, and a child also every block its
    /// parent's start order names, this many at a time through its chain (sibling half,
    /// parent) as class followed. At a root (every VM in ondemand) the start region comes
    /// from the registry in streamed runs instead ([`Params::start_run_blocks`]). 0: off.
    #[serde(default = "four")]
    pub follow_concurrency: usize,
    /// Most start-region blocks in one registry range request at a root, one run at a time
    /// per layer, each block usable as it arrives (`follow::START_RUN_BLOCKS`, 16).
    #[serde(default = "sixteen")]
    pub start_run_blocks: usize,
    /// A peer's uplink writes one block at a time, by class (urgent, then followed, then
    /// prefetch; first come first served within a class), as the peer server's `Uplink`.
    /// False: a node's peer flows share its uplink max-min fairly in three strict classes.
    #[serde(default = "yes")]
    pub serial_uplink: bool,
}

fn yes() -> bool {
    true
}

fn four() -> usize {
    4
}

fn sixteen() -> usize {
    16
}

fn two_seconds() -> f64 {
    2.0
}

impl Default for Params {
    fn default() -> Self {
        Params {
            n_vms: 1,
            vm_link_bps: 125e6,
            registry_egress_bps: 500e6,
            rtt_s: 0.0005,
            h0_s: 1.0,
            unpack_bps: 100e6,
            readahead_blocks: 8,
            prefetch: true,
            prefetch_concurrency: 1,
            containers_per_vm: 1.0,
            vm_cores: 2,
            sibling_exchange: true,
            stripe_trees: false,
            prefetch_quiet_s: 2.0,
            prefetch_recorded_order: true,
            host_cores: None,
            follow_concurrency: 4,
            start_run_blocks: 16,
            serial_uplink: true,
        }
    }
}

impl Params {
    fn check(&self) -> Result<()> {
        let positive = [
            ("vm_link_bps", self.vm_link_bps),
            ("registry_egress_bps", self.registry_egress_bps),
            ("unpack_bps", self.unpack_bps),
        ];
        for (name, v) in positive {
            if v.is_nan() || v <= 0.0 {
                return Err(SimError::Invalid(format!("{name} must be > 0")));
            }
        }
        if self.n_vms == 0 {
            return Err(SimError::Invalid("n_vms must be > 0".into()));
        }
        if self.rtt_s < 0.0 || self.h0_s < 0.0 || self.prefetch_quiet_s < 0.0 {
            return Err(SimError::Invalid(
                "rtt, h0 and prefetch_quiet must be >= 0".into(),
            ));
        }
        if self.host_cores.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return Err(SimError::Invalid("host_cores must be > 0".into()));
        }
        Ok(())
    }

    /// Containers on VM `vm`.
    pub fn containers_on(&self, vm: usize) -> usize {
        let total = (self.containers_per_vm * self.n_vms as f64).round() as usize;
        let base = total / self.n_vms;
        let extra = total % self.n_vms;
        (base + usize::from(vm < extra)).max(1)
    }

    /// Time from "image data ready" to the last container on `vm` started.
    fn start_overhead_all(&self, vm: usize) -> f64 {
        let waves = self.containers_on(vm).div_ceil(self.vm_cores.max(1));
        self.h0_s * waves as f64
    }
}

/// One simulated VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmResult {
    /// `vm<i>`.
    pub vm: String,
    /// Depth in the function tree (faasnet only).
    pub depth: Option<u32>,
    /// When its data was ready: working set read (lazy modes) or image unpacked (baseline).
    pub data_ready_s: f64,
    /// When its first container started.
    pub start_s: f64,
    /// When its last container started.
    pub all_started_s: f64,
    /// Bytes it received from the registry.
    pub registry_bytes: u64,
    /// Bytes it received from its parent.
    pub peer_bytes: u64,
    /// Bytes it sent to its children.
    pub served_bytes: u64,
}

/// One simulated run: a mode, N VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The mode.
    pub mode: Mode,
    /// Number of VMs.
    pub n: usize,
    /// Per VM.
    pub vms: Vec<VmResult>,
    /// Levels of the function tree (faasnet only).
    pub tree_height: Option<u32>,
    /// Median VM start time (nearest rank), seconds.
    pub p50_s: f64,
    /// Latest VM start time, seconds.
    pub max_s: f64,
    /// When every container on every VM had started, seconds.
    pub all_started_s: f64,
    /// Bytes the registry sent.
    pub registry_bytes: u64,
    /// Bytes sent VM to VM.
    pub peer_bytes: u64,
    /// Discrete events processed (cost of the simulation).
    pub events: u64,
}

/// Nearest-rank percentile (`q` in 0..=1) of unsorted values; 0 for none.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Runs one mode with `params.n_vms` VMs joining the tree in index order.
pub fn simulate(mode: Mode, params: &Params, trace: &BlockTrace) -> Result<RunResult> {
    params.check()?;
    trace.validate()?;
    match mode {
        Mode::Baseline => Ok(Baseline::run(params, trace)),
        Mode::Ondemand => Lazy::new(params, trace, None).run(mode),
        Mode::Faasnet => {
            let layout = tree::build_in_order(params.n_vms);
            Lazy::new(params, trace, Some(layout)).run(mode)
        }
    }
}

/// A timed event that is not a flow completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// A block's response starts flowing from `src` (a VM, or the registry when `None`).
    StartFlow {
        src: Option<usize>,
        dst: usize,
        block: usize,
    },
    /// A child's request for `block` reaches `server`.
    Serve {
        server: usize,
        child: usize,
        block: usize,
    },
    /// The baseline's download of the image starts.
    StartPull { vm: usize },
    /// A VM's prefetch looks again whether the node has been quiet long enough.
    PrefetchWake { vm: usize },
    /// `vm`'s parent's start order named `block` (it reaches the child after `rtt/2`).
    Named { vm: usize, block: usize },
}

#[derive(Debug)]
struct Timed {
    time: f64,
    seq: u64,
    ev: Timer,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        o.time.total_cmp(&self.time).then(o.seq.cmp(&self.seq))
    }
}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Timed>,
    seq: u64,
}

impl Timers {
    fn at(&mut self, time: f64, ev: Timer) {
        self.seq += 1;
        self.heap.push(Timed {
            time,
            seq: self.seq,
            ev,
        });
    }
}

/// What the engine does next.
enum Next {
    Timer(Timer),
    Flow(FlowId),
}

/// Picks the earliest of the next timer and the next flow completion and moves the clock.
fn next_event(net: &mut Network, timers: &mut Timers) -> Option<Next> {
    let flow = net.next_completion();
    let timer = timers.heap.peek().map(|t| t.time);
    match (flow, timer) {
        (None, None) => None,
        (Some((tf, f)), tt) if tt.is_none_or(|tt| tf <= tt) => {
            net.advance_to(tf);
            Some(Next::Flow(f))
        }
        _ => {
            let t = timers.heap.pop().expect("peeked");
            net.advance_to(t.time);
            Some(Next::Timer(t.ev))
        }
    }
}

/// When the earliest pending event (flow completion or timer) happens.
fn peek_time(net: &mut Network, timers: &Timers) -> Option<f64> {
    let flow = net.next_completion().map(|(t, _)| t);
    let timer = timers.heap.peek().map(|t| t.time);
    match (flow, timer) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// CPU work after each VM's data is ready, as a processor-sharing queue: `jobs` are (ready
/// time, CPU seconds of one core); each job runs on at most one core, and `cores` are shared
/// equally by the jobs running at once. Returns when each job finishes. `None`: no sharing
/// (every VM has its own CPU), so a job ends at ready + work.
pub fn cpu_finish_times(jobs: &[(f64, f64)], cores: Option<f64>) -> Vec<f64> {
    let Some(cores) = cores else {
        return jobs.iter().map(|&(a, w)| a + w).collect();
    };
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&x, &y| jobs[x].0.total_cmp(&jobs[y].0).then(x.cmp(&y)));
    let mut done = vec![f64::NAN; jobs.len()];
    let mut active: Vec<(usize, f64)> = Vec::new();
    let mut next = 0;
    let mut t = 0.0f64;
    const EPS: f64 = 1e-12;
    while next < order.len() || !active.is_empty() {
        if active.is_empty() {
            t = t.max(jobs[order[next]].0);
        }
        while next < order.len() && jobs[order[next]].0 <= t {
            let j = order[next];
            active.push((j, jobs[j].1.max(0.0)));
            next += 1;
        }
        let rate = (cores / active.len() as f64).min(1.0);
        let min_left = active.iter().map(|a| a.1).fold(f64::INFINITY, f64::min);
        let t_done = t + min_left / rate;
        let t_arrive = order.get(next).map_or(f64::INFINITY, |&j| jobs[j].0);
        let t_next = t_done.min(t_arrive);
        let worked = (t_next - t) * rate;
        t = t_next;
        for a in &mut active {
            a.1 -= worked;
        }
        active.retain(|&(j, left)| {
            if left <= EPS {
                done[j] = t;
                false
            } else {
                true
            }
        });
    }
    done
}

fn finish_run(
    mode: Mode,
    params: &Params,
    mut vms: Vec<VmResult>,
    tree_height: Option<u32>,
    events: u64,
) -> RunResult {
    for (i, v) in vms.iter_mut().enumerate() {
        let later_waves = params.start_overhead_all(i) - params.h0_s;
        v.all_started_s = v.start_s + later_waves.max(0.0);
    }
    let starts: Vec<f64> = vms.iter().map(|v| v.start_s).collect();
    RunResult {
        mode,
        n: vms.len(),
        tree_height,
        p50_s: percentile(&starts, 0.5),
        max_s: percentile(&starts, 1.0),
        all_started_s: vms.iter().map(|v| v.all_started_s).fold(0.0, f64::max),
        registry_bytes: vms.iter().map(|v| v.registry_bytes).sum(),
        peer_bytes: vms.iter().map(|v| v.peer_bytes).sum(),
        vms,
        events,
    }
}

fn empty_vms(n: usize, layout: Option<&TreeLayout>) -> Vec<VmResult> {
    (0..n)
        .map(|i| VmResult {
            vm: vm_name(i),
            depth: layout.map(|l| l.depth[i]),
            data_ready_s: f64::NAN,
            start_s: f64::NAN,
            all_started_s: f64::NAN,
            registry_bytes: 0,
            peer_bytes: 0,
            served_bytes: 0,
        })
        .collect()
}

struct Baseline;

impl Baseline {
    fn run(params: &Params, trace: &BlockTrace) -> RunResult {
        let n = params.n_vms;
        let mut net = Network::new();
        for _ in 0..n {
            net.add_node(params.vm_link_bps, params.vm_link_bps);
        }
        let registry = net.add_node(params.registry_egress_bps, f64::INFINITY);
        let mut timers = Timers::default();
        let mut vms = empty_vms(n, None);
        // A pull is a handful of requests (manifest, config, layers): a few round trips
        // before the bytes flow; we count two.
        for vm in 0..n {
            timers.at(2.0 * params.rtt_s, Timer::StartPull { vm });
        }
        let gz = trace.original_compressed_bytes as f64;
        let unpack = trace.original_uncompressed_bytes as f64 / params.unpack_bps;
        let mut events = 0;
        let mut pulled = 0;
        let mut jobs = vec![(0.0, 0.0); n];
        while pulled < n {
            let Some(next) = next_event(&mut net, &mut timers) else {
                break;
            };
            events += 1;
            match next {
                Next::Timer(Timer::StartPull { vm }) => {
                    net.start_flow(registry, vm, gz, Priority::Urgent, vm as u64);
                }
                Next::Timer(_) => unreachable!("baseline uses no block timers"),
                Next::Flow(f) => {
                    let done = net.finish(f);
                    let vm = done.tag as usize;
                    vms[vm].registry_bytes += done.bytes as u64;
                    vms[vm].data_ready_s = net.now() + unpack;
                    // Unpacking and the container start are CPU work on the VM.
                    jobs[vm] = (net.now(), unpack + params.h0_s);
                    pulled += 1;
                }
            }
        }
        for (vm, t) in cpu_finish_times(&jobs, params.host_cores)
            .into_iter()
            .enumerate()
        {
            vms[vm].start_s = t;
        }
        finish_run(Mode::Baseline, params, vms, None, events)
    }
}

const ABSENT: u8 = 0;
const IN_FLIGHT: u8 = 1;
const PRESENT: u8 = 2;

/// Why a node fetches a block (the snapshotter's `Purpose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A container read or a child's (or sibling's) urgent request: holds prefetch back.
    OnDemand,
    /// Read-ahead: urgent upstream, but does not hold prefetch back.
    ReadAhead,
    /// Follow: a start-region block queued at mount, or a block the parent's start order
    /// named. Class followed upstream; holds prefetch back like a read.
    Follow,
    /// Background prefetch (own, or a child's): lowest priority, never split.
    Prefetch,
}

impl Purpose {
    /// How an upstream peer ranks the request on its uplink.
    fn class(self) -> Priority {
        match self {
            Purpose::OnDemand | Purpose::ReadAhead => Priority::Urgent,
            Purpose::Follow => Priority::Followed,
            Purpose::Prefetch => Priority::Background,
        }
    }

    /// The purpose a server fetches a block with for a request of class `class`.
    fn for_class(class: Priority) -> Purpose {
        match class {
            Priority::Urgent => Purpose::OnDemand,
            Priority::Followed => Purpose::Follow,
            Priority::Background => Purpose::Prefetch,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// The VM's container read is blocked on the block.
    Reader,
    /// A child (or the sibling) asked for the block.
    Child(usize),
    /// A prefetch worker of a layer.
    Prefetch(usize),
    /// A follow worker of a layer.
    Follow(usize),
}

#[derive(Debug)]
struct Fetch {
    priority: Priority,
    flow: Option<FlowId>,
    waiters: Vec<Waiter>,
    /// Who sends it: a VM (parent or sibling), or the registry when `None`.
    server: Option<usize>,
    /// Counted in the node's on-demand gate (prefetch waits while any is in flight).
    gated: bool,
    /// Part of a streamed start-region run from the registry (layer of the run).
    run: Option<usize>,
}

/// The on-demand and function-tree engine.
struct Lazy<'a> {
    params: &'a Params,
    n: usize,
    /// Blocks flattened over the layers: (layer, index in layer, stored size).
    blocks: Vec<(usize, usize, u64)>,
    layer_len: Vec<usize>,
    reads: Vec<usize>,
    /// Per read: exclusive end (global block index) of the read-ahead window's bound (the
    /// file's end, else the layer's).
    read_bound: Vec<usize>,
    /// Per layer: its blocks in prefetch order (global indices).
    prefetch_order: Vec<Vec<usize>>,
    layout: Option<TreeLayout>,
    /// Per VM: (side, sibling) when its parent has two children and sibling exchange is on.
    split: Vec<Option<(usize, usize)>>,
    net: Network,
    registry: usize,
    timers: Timers,
    /// Per (vm, block): ABSENT, IN_FLIGHT or PRESENT.
    state: Vec<u8>,
    fetches: HashMap<usize, Fetch>,
    reader_pos: Vec<usize>,
    /// Per (vm, layer): next position in the layer's prefetch order.
    prefetch_next: Vec<usize>,
    /// Per (vm, layer): prefetch fetches in flight.
    prefetch_active: Vec<usize>,
    /// Per VM: on-demand fetches in flight, when the last one ended, and whether a wake-up
    /// of its prefetch is scheduled.
    gate_in_flight: Vec<usize>,
    gate_last_done: Vec<f64>,
    wake_pending: Vec<bool>,
    /// Per layer: first global index and end of the start region (global, exclusive).
    layer_first: Vec<usize>,
    start_end: Vec<usize>,
    /// Per VM: its children in the tree.
    children: Vec<Vec<usize>>,
    /// Per (vm, block): already in the VM's start order (children were told).
    noted: Vec<bool>,
    /// Per (vm, layer): blocks queued for the follow workers, and how many are fetching.
    follow_queue: Vec<VecDeque<usize>>,
    follow_active: Vec<usize>,
    /// Per (vm, layer): claimed blocks of the current streamed run not yet flowing, and
    /// whether a run is in progress.
    run_pending: Vec<VecDeque<usize>>,
    run_active: Vec<bool>,
    /// Per VM with a serial uplink: responses waiting for it, ordered by (class, arrival),
    /// their queue keys by (dst, block), and whether a block is being written.
    uplink_queue: Vec<BTreeSet<(Priority, u64, usize, usize)>>,
    uplink_keys: HashMap<usize, (Priority, u64)>,
    uplink_busy: Vec<bool>,
    uplink_seq: u64,
    vms: Vec<VmResult>,
    ready: usize,
    events: u64,
}

impl<'a> Lazy<'a> {
    fn new(params: &'a Params, trace: &BlockTrace, layout: Option<TreeLayout>) -> Self {
        let mut blocks = Vec::new();
        let mut layer_start = Vec::new();
        let mut layer_len = Vec::new();
        for (l, layer) in trace.layers.iter().enumerate() {
            layer_start.push(blocks.len());
            layer_len.push(layer.blocks.len());
            blocks.extend(layer.blocks.iter().enumerate().map(|(i, &s)| (l, i, s)));
        }
        let reads: Vec<usize> = trace
            .start_reads
            .iter()
            .map(|&(l, b)| layer_start[l] + b)
            .collect();
        let read_bound: Vec<usize> = trace
            .start_reads
            .iter()
            .enumerate()
            .map(|(i, &(l, _))| {
                let end = trace
                    .file_ends
                    .get(i)
                    .map_or(layer_len[l], |&e| e.min(layer_len[l]));
                layer_start[l] + end
            })
            .collect();
        // Prefetch order as the snapshotter's, per layer: recorded access order first (if
        // the node has a record), then the rest in index order.
        let mut seen = vec![false; blocks.len()];
        let mut prefetch_order = vec![Vec::new(); layer_len.len()];
        if params.prefetch_recorded_order {
            for &g in &reads {
                if !seen[g] {
                    seen[g] = true;
                    prefetch_order[blocks[g].0].push(g);
                }
            }
        }
        for g in 0..blocks.len() {
            if !seen[g] {
                prefetch_order[blocks[g].0].push(g);
            }
        }
        let n = params.n_vms;
        let mut split = vec![None; n];
        if let (Some(l), true) = (&layout, params.sibling_exchange && !params.stripe_trees) {
            let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
            for (vm, p) in l.parent.iter().enumerate() {
                if let Some(p) = p {
                    children[*p].push(vm);
                }
            }
            for c in children {
                // The first child (the left one, odd heap position) is side 0.
                if let [a, b] = c[..] {
                    split[a] = Some((0, b));
                    split[b] = Some((1, a));
                }
            }
        }
        let mut net = Network::new();
        for _ in 0..n {
            net.add_node(params.vm_link_bps, params.vm_link_bps);
        }
        let registry = net.add_node(params.registry_egress_bps, f64::INFINITY);
        let vms = empty_vms(n, layout.as_ref());
        let layers = layer_len.len();
        let mut children = vec![Vec::new(); n];
        if let Some(l) = &layout {
            for (vm, p) in l.parent.iter().enumerate() {
                if let Some(p) = p {
                    children[*p].push(vm);
                }
            }
            // With stripe trees a node's start order is heard by its children in both.
            if params.stripe_trees {
                for (vm, p) in l.second_parent.iter().enumerate() {
                    if let Some(p) = p {
                        children[*p].push(vm);
                    }
                }
            }
        }
        let start_end: Vec<usize> = trace
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| layer_start[l] + layer.start_blocks.min(layer_len[l]))
            .collect();
        let nblocks = blocks.len();
        Lazy {
            params,
            n,
            state: vec![ABSENT; n * blocks.len()],
            blocks,
            layer_len,
            reads,
            read_bound,
            prefetch_order,
            layout,
            split,
            net,
            registry,
            timers: Timers::default(),
            fetches: HashMap::new(),
            reader_pos: vec![0; n],
            prefetch_next: vec![0; n * layers],
            prefetch_active: vec![0; n * layers],
            gate_in_flight: vec![0; n],
            // The quiet period counts from the mount (`store.gate().touch()` at spawn).
            gate_last_done: vec![0.0; n],
            wake_pending: vec![false; n],
            layer_first: layer_start,
            start_end,
            children,
            noted: vec![false; n * nblocks],
            follow_queue: vec![VecDeque::new(); n * layers],
            follow_active: vec![0; n * layers],
            run_pending: vec![VecDeque::new(); n * layers],
            run_active: vec![false; n * layers],
            uplink_queue: vec![BTreeSet::new(); n],
            uplink_keys: HashMap::new(),
            uplink_busy: vec![false; n],
            uplink_seq: 0,
            vms,
            ready: 0,
            events: 0,
        }
    }

    fn key(&self, vm: usize, block: usize) -> usize {
        vm * self.blocks.len() + block
    }

    fn parent(&self, vm: usize) -> Option<usize> {
        self.layout.as_ref().and_then(|l| l.parent[vm])
    }

    /// Who `vm` asks for `block`: the registry (`None`) at the root or without a tree; else
    /// the parent, or the sibling for the other side's half of an urgent fetch.
    fn upstream(&self, vm: usize, block: usize, purpose: Purpose) -> Option<usize> {
        if let (true, Some(l)) = (self.params.stripe_trees, &self.layout) {
            // Even blocks down the function tree, odd ones down the second tree.
            return if self.blocks[block].1.is_multiple_of(2) {
                l.parent[vm]
            } else {
                l.second_parent[vm]
            };
        }
        let parent = self.parent(vm)?;
        match self.split[vm] {
            Some((side, sibling))
                if purpose != Purpose::Prefetch && self.blocks[block].1 % 2 != side =>
            {
                Some(sibling)
            }
            _ => Some(parent),
        }
    }

    fn handle(&mut self, next: Next) {
        self.events += 1;
        match next {
            Next::Flow(f) => self.flow_done(f),
            Next::Timer(Timer::StartFlow { src, dst, block }) => self.respond(src, dst, block),
            Next::Timer(Timer::Named { vm, block }) => {
                if self.state[self.key(vm, block)] == ABSENT {
                    let layer = self.blocks[block].0;
                    let slot = self.slot(vm, layer);
                    self.follow_queue[slot].push_back(block);
                    self.pump_follow(vm, layer);
                }
            }
            Next::Timer(Timer::Serve {
                server,
                child,
                block,
            }) => self.serve(server, child, block),
            Next::Timer(Timer::PrefetchWake { vm }) => {
                self.wake_pending[vm] = false;
                self.pump_prefetch(vm);
            }
            Next::Timer(Timer::StartPull { .. }) => unreachable!("lazy modes do not pull"),
        }
    }

    fn run(mut self, mode: Mode) -> Result<RunResult> {
        // At mount, before the container's first read: every layer's follow task queues its
        // start region (a root streams it from the registry in runs).
        if self.params.follow_concurrency > 0 {
            for vm in 0..self.n {
                for layer in 0..self.layer_len.len() {
                    // With stripe trees every node (a root too, for the other stripe)
                    // follows; a lone VM, the root of both, streams runs.
                    let streams = if self.params.stripe_trees && self.n > 1 {
                        false
                    } else {
                        self.parent(vm).is_none()
                    };
                    if streams {
                        self.next_run(vm, layer);
                    } else {
                        let slot = self.slot(vm, layer);
                        let range = self.layer_first[layer]..self.start_end[layer];
                        self.follow_queue[slot].extend(range);
                        self.pump_follow(vm, layer);
                    }
                }
            }
        }
        for vm in 0..self.n {
            self.advance_reader(vm);
        }
        if self.params.prefetch {
            for vm in 0..self.n {
                self.pump_prefetch(vm);
            }
        }
        while self.ready < self.n {
            let Some(next) = next_event(&mut self.net, &mut self.timers) else {
                return Err(SimError::Invalid(
                    "simulation stalled before every VM had its data (model bug)".into(),
                ));
            };
            self.handle(next);
        }
        // The container starts: CPU work after the data is there (shared, if so set).
        let jobs: Vec<(f64, f64)> = self
            .vms
            .iter()
            .map(|v| (v.data_ready_s, self.params.h0_s))
            .collect();
        let starts = cpu_finish_times(&jobs, self.params.host_cores);
        let last = starts.iter().copied().fold(0.0, f64::max);
        for (v, t) in self.vms.iter_mut().zip(starts) {
            v.start_s = t;
        }
        // Byte counters cover what moved until the last start.
        while peek_time(&mut self.net, &self.timers).is_some_and(|t| t <= last) {
            let next = next_event(&mut self.net, &mut self.timers).expect("peeked");
            self.handle(next);
        }
        let height = self.layout.as_ref().map(|l| l.height);
        Ok(finish_run(mode, self.params, self.vms, height, self.events))
    }

    /// Makes sure `vm` is getting `block`, with `waiter` told when it arrives.
    fn fetch(&mut self, vm: usize, block: usize, purpose: Purpose, waiter: Option<Waiter>) {
        let k = self.key(vm, block);
        let priority = purpose.class();
        if purpose != Purpose::Prefetch {
            self.note(vm, block);
        }
        match self.state[k] {
            PRESENT => unreachable!("callers check for present blocks"),
            IN_FLIGHT => {
                if let Some(w) = waiter {
                    self.fetches.get_mut(&k).expect("in flight").waiters.push(w);
                }
                // A read or a follow takes over a prefetch fetch (`join_or_start`); anything
                // else joins the fetch as it is.
                if matches!(purpose, Purpose::OnDemand | Purpose::Follow) {
                    self.upgrade(vm, block, priority);
                }
            }
            _ => {
                self.state[k] = IN_FLIGHT;
                let server = self.upstream(vm, block, purpose);
                let gated = matches!(purpose, Purpose::OnDemand | Purpose::Follow);
                if gated {
                    self.gate_in_flight[vm] += 1;
                }
                self.fetches.insert(
                    k,
                    Fetch {
                        priority,
                        flow: None,
                        waiters: waiter.into_iter().collect(),
                        server,
                        gated,
                        run: None,
                    },
                );
                let now = self.net.now();
                let rtt = self.params.rtt_s;
                match server {
                    None => self.timers.at(
                        now + rtt,
                        Timer::StartFlow {
                            src: None,
                            dst: vm,
                            block,
                        },
                    ),
                    Some(s) => self.timers.at(
                        now + rtt / 2.0,
                        Timer::Serve {
                            server: s,
                            child: vm,
                            block,
                        },
                    ),
                }
            }
        }
    }

    /// A read or a follow now waits for a block being prefetched: the fetch takes its class
    /// (`class`), here and upstream. Only prefetch fetches are taken over.
    fn upgrade(&mut self, vm: usize, block: usize, class: Priority) {
        let k = self.key(vm, block);
        let Some(fetch) = self.fetches.get_mut(&k) else {
            return;
        };
        if fetch.priority != Priority::Background || class == Priority::Background {
            return;
        }
        fetch.priority = class;
        match (fetch.flow, fetch.server) {
            (Some(f), Some(_)) if !self.params.serial_uplink => self.net.set_priority(f, class),
            (Some(_), _) => {} // being written (serial uplink) or from the registry (FIFO)
            (None, Some(s)) => {
                if let Some((old, seq)) = self.uplink_keys.get(&k).copied() {
                    // Waiting for the server's uplink: move it up its queue.
                    self.uplink_queue[s].remove(&(old, seq, vm, block));
                    self.uplink_queue[s].insert((class, seq, vm, block));
                    self.uplink_keys.insert(k, (class, seq));
                } else if self.state[self.key(s, block)] == IN_FLIGHT {
                    self.upgrade(s, block, class);
                }
            }
            (None, None) => {}
        }
    }

    fn slot(&self, vm: usize, layer: usize) -> usize {
        vm * self.layer_len.len() + layer
    }

    /// Adds `block` to `vm`'s start order; its children hear of it `rtt/2` later.
    fn note(&mut self, vm: usize, block: usize) {
        let k = self.key(vm, block);
        if self.noted[k] || self.params.follow_concurrency == 0 {
            return;
        }
        self.noted[k] = true;
        let at = self.net.now() + self.params.rtt_s / 2.0;
        for i in 0..self.children[vm].len() {
            let c = self.children[vm][i];
            self.timers.at(at, Timer::Named { vm: c, block });
        }
    }

    /// The response carrying `block` to `dst` is ready to go from `src` (a VM, or the
    /// registry when `None`): a flow starts, or it waits for a serial uplink.
    fn respond(&mut self, src: Option<usize>, dst: usize, block: usize) {
        let k = self.key(dst, block);
        match src {
            Some(s) if self.params.serial_uplink => {
                let class = self.fetches[&k].priority;
                self.uplink_seq += 1;
                let seq = self.uplink_seq;
                self.uplink_queue[s].insert((class, seq, dst, block));
                self.uplink_keys.insert(k, (class, seq));
                self.pump_uplink(s);
            }
            _ => {
                let fetch = self.fetches.get_mut(&k).expect("fetch in flight");
                let size = self.blocks[block].2 as f64;
                // Only our peer servers hold prefetch back; the registry (an HTTP server
                // behind a FIFO egress) sends every response alike.
                let (node, class) = match src {
                    Some(s) => (s, fetch.priority),
                    None => (self.registry, Priority::Urgent),
                };
                fetch.flow = Some(self.net.start_flow(node, dst, size, class, k as u64));
            }
        }
    }

    /// A serial uplink writes its next block, highest class first, if it is free.
    fn pump_uplink(&mut self, s: usize) {
        if self.uplink_busy[s] {
            return;
        }
        let Some(first) = self.uplink_queue[s].pop_first() else {
            return;
        };
        let (_, _, dst, block) = first;
        let k = self.key(dst, block);
        self.uplink_keys.remove(&k);
        self.uplink_busy[s] = true;
        let size = self.blocks[block].2 as f64;
        // One block at a time on the uplink; on the child's downlink it shares with whatever
        // else comes in (a FIFO link: no class there).
        let flow = self
            .net
            .start_flow(s, dst, size, Priority::Urgent, k as u64);
        self.fetches.get_mut(&k).expect("fetch in flight").flow = Some(flow);
    }

    /// A root streams its layer's start region from the registry: the next run of up to
    /// `start_run_blocks` blocks it lacks (stopping at one held or coming), one at a time.
    fn next_run(&mut self, vm: usize, layer: usize) {
        let slot = self.slot(vm, layer);
        if self.run_active[slot] {
            return;
        }
        let end = self.start_end[layer];
        let mut g = self.layer_first[layer];
        while g < end && self.state[self.key(vm, g)] != ABSENT {
            g += 1;
        }
        let mut claimed = VecDeque::new();
        while g < end
            && claimed.len() < self.params.start_run_blocks.max(1)
            && self.state[self.key(vm, g)] == ABSENT
        {
            let k = self.key(vm, g);
            self.state[k] = IN_FLIGHT;
            self.gate_in_flight[vm] += 1;
            self.fetches.insert(
                k,
                Fetch {
                    priority: Priority::Followed,
                    flow: None,
                    waiters: Vec::new(),
                    server: None,
                    gated: true,
                    run: Some(layer),
                },
            );
            self.note(vm, g);
            claimed.push_back(g);
            g += 1;
        }
        if claimed.is_empty() {
            return;
        }
        self.run_active[slot] = true;
        self.run_pending[slot] = claimed;
        // One range request: its first byte after a round trip, then the blocks back to back.
        let first = self.run_pending[slot].pop_front().expect("claimed");
        self.timers.at(
            self.net.now() + self.params.rtt_s,
            Timer::StartFlow {
                src: None,
                dst: vm,
                block: first,
            },
        );
    }

    /// Keeps `vm`'s follow workers of `layer` busy with the queued blocks it lacks.
    fn pump_follow(&mut self, vm: usize, layer: usize) {
        let slot = self.slot(vm, layer);
        while self.follow_active[slot] < self.params.follow_concurrency {
            let Some(g) = self.follow_queue[slot].pop_front() else {
                return;
            };
            if self.state[self.key(vm, g)] != ABSENT {
                continue;
            }
            self.follow_active[slot] += 1;
            self.fetch(vm, g, Purpose::Follow, Some(Waiter::Follow(layer)));
        }
    }

    /// A child's (or sibling's) request for `block` reached `server`.
    fn serve(&mut self, server: usize, child: usize, block: usize) {
        let priority = self.fetches[&self.key(child, block)].priority;
        if priority != Priority::Background {
            self.note(server, block);
        }
        if self.state[self.key(server, block)] == PRESENT {
            self.timers.at(
                self.net.now() + self.params.rtt_s / 2.0,
                Timer::StartFlow {
                    src: Some(server),
                    dst: child,
                    block,
                },
            );
        } else {
            let purpose = Purpose::for_class(priority);
            self.fetch(server, block, purpose, Some(Waiter::Child(child)));
        }
    }

    fn flow_done(&mut self, f: FlowId) {
        let done = self.net.finish(f);
        let k = done.tag as usize;
        let (vm, block) = (k / self.blocks.len(), k % self.blocks.len());
        self.state[k] = PRESENT;
        let bytes = done.bytes as u64;
        if done.src == self.registry {
            self.vms[vm].registry_bytes += bytes;
        } else {
            self.vms[vm].peer_bytes += bytes;
            self.vms[done.src].served_bytes += bytes;
            if self.params.serial_uplink {
                self.uplink_busy[done.src] = false;
                self.pump_uplink(done.src);
            }
        }
        let fetch = self.fetches.remove(&k).expect("fetch in flight");
        if let Some(layer) = fetch.run {
            // The run streams on: the next claimed block follows at once; after the last,
            // the next run is requested.
            let slot = self.slot(vm, layer);
            match self.run_pending[slot].pop_front() {
                Some(next) => self.respond(None, vm, next),
                None => {
                    self.run_active[slot] = false;
                    self.next_run(vm, layer);
                }
            }
        }
        if fetch.gated {
            self.gate_in_flight[vm] -= 1;
            if self.gate_in_flight[vm] == 0 {
                self.gate_last_done[vm] = self.net.now();
                self.schedule_wake(vm);
            }
        }
        for w in fetch.waiters {
            match w {
                Waiter::Reader => {
                    self.reader_pos[vm] += 1;
                    self.advance_reader(vm);
                }
                Waiter::Child(c) => self.timers.at(
                    self.net.now() + self.params.rtt_s / 2.0,
                    Timer::StartFlow {
                        src: Some(vm),
                        dst: c,
                        block,
                    },
                ),
                Waiter::Prefetch(layer) => {
                    self.prefetch_active[vm * self.layer_len.len() + layer] -= 1;
                    self.pump_prefetch(vm);
                }
                Waiter::Follow(layer) => {
                    let slot = self.slot(vm, layer);
                    self.follow_active[slot] -= 1;
                    self.pump_follow(vm, layer);
                }
            }
        }
    }

    /// Read-ahead of the read at `pos`: the next `readahead_blocks` blocks, up to the end of
    /// the file being read (urgent, but not holding prefetch back).
    fn read_ahead(&mut self, vm: usize, pos: usize) {
        let g = self.reads[pos];
        let end = (g + 1 + self.params.readahead_blocks).min(self.read_bound[pos]);
        for ra in g + 1..end {
            if self.state[self.key(vm, ra)] == ABSENT {
                self.fetch(vm, ra, Purpose::ReadAhead, None);
            }
        }
    }

    /// Walks the VM's start reads until one must wait for a block. Every read starts its
    /// read-ahead, whether its own block is there or not (as `BlockStore::read_at`).
    fn advance_reader(&mut self, vm: usize) {
        while let Some(&g) = self.reads.get(self.reader_pos[vm]) {
            let pos = self.reader_pos[vm];
            let present = self.state[self.key(vm, g)] == PRESENT;
            self.note(vm, g);
            if !present {
                self.fetch(vm, g, Purpose::OnDemand, Some(Waiter::Reader));
            }
            self.read_ahead(vm, pos);
            if !present {
                return;
            }
            self.reader_pos[vm] += 1;
        }
        if self.reader_pos[vm] == self.reads.len() && self.vms[vm].data_ready_s.is_nan() {
            self.vms[vm].data_ready_s = self.net.now();
            self.ready += 1;
        }
    }

    /// Whether prefetch may fetch on `vm` now; if not, makes sure it is woken up in time.
    fn quiet(&mut self, vm: usize) -> bool {
        if self.gate_in_flight[vm] > 0 {
            return false; // woken when the last on-demand fetch ends
        }
        let at = self.gate_last_done[vm] + self.params.prefetch_quiet_s;
        if self.net.now() >= at - 1e-12 {
            return true;
        }
        self.schedule_wake(vm);
        false
    }

    fn schedule_wake(&mut self, vm: usize) {
        if self.params.prefetch && !self.wake_pending[vm] {
            self.wake_pending[vm] = true;
            let at = self.gate_last_done[vm] + self.params.prefetch_quiet_s;
            self.timers
                .at(at.max(self.net.now()), Timer::PrefetchWake { vm });
        }
    }

    /// Keeps the VM's prefetch workers (per layer) busy while the node is quiet.
    fn pump_prefetch(&mut self, vm: usize) {
        if !self.params.prefetch {
            return;
        }
        let layers = self.layer_len.len();
        let workers = self.params.prefetch_concurrency.max(1);
        for layer in 0..layers {
            let slot = vm * layers + layer;
            while self.prefetch_active[slot] < workers {
                // The worker skips blocks held or in flight, then waits for quiet.
                let order = &self.prefetch_order[layer];
                let mut pos = self.prefetch_next[slot];
                while pos < order.len() && self.state[vm * self.blocks.len() + order[pos]] != ABSENT
                {
                    pos += 1;
                }
                self.prefetch_next[slot] = pos;
                let Some(&g) = self.prefetch_order[layer].get(pos) else {
                    break;
                };
                if !self.quiet(vm) {
                    return;
                }
                self.prefetch_next[slot] += 1;
                self.prefetch_active[slot] += 1;
                self.fetch(vm, g, Purpose::Prefetch, Some(Waiter::Prefetch(layer)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceLayer;

    fn trace(blocks: usize, size: u64, reads: &[usize]) -> BlockTrace {
        BlockTrace {
            image: "t".into(),
            block_size: size,
            original_compressed_bytes: blocks as u64 * size,
            original_uncompressed_bytes: 2 * blocks as u64 * size,
            layers: vec![TraceLayer {
                digest: String::new(),
                blocks: vec![size; blocks],
                start_blocks: 0,
            }],
            start_reads: reads.iter().map(|&b| (0, b)).collect(),
            file_ends: Vec::new(),
        }
    }

    fn params(n: usize) -> Params {
        Params {
            n_vms: n,
            vm_link_bps: 100.0,
            registry_egress_bps: 1000.0,
            rtt_s: 0.0,
            h0_s: 1.0,
            unpack_bps: 200.0,
            readahead_blocks: 0,
            prefetch: false,
            prefetch_concurrency: 1,
            containers_per_vm: 1.0,
            vm_cores: 2,
            sibling_exchange: false,
            stripe_trees: false,
            prefetch_quiet_s: 0.0,
            prefetch_recorded_order: true,
            host_cores: None,
            follow_concurrency: 0,
            start_run_blocks: 16,
            serial_uplink: false,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn baseline_is_download_unpack_h0() {
        let t = trace(10, 100, &[0]);
        let r = simulate(Mode::Baseline, &params(1), &t).unwrap();
        // 1000 bytes at 100 B/s, 2000 bytes unpacked at 200 B/s, h0 1 s.
        assert!(close(r.max_s, 10.0 + 10.0 + 1.0), "{}", r.max_s);
        assert_eq!(r.registry_bytes, 1000);
        // 20 VMs share the registry's 1000 B/s: 20 s to download.
        let r = simulate(Mode::Baseline, &params(20), &t).unwrap();
        assert!(close(r.max_s, 20.0 + 10.0 + 1.0), "{}", r.max_s);
    }

    #[test]
    fn ondemand_reads_only_the_working_set() {
        let t = trace(10, 100, &[3, 1, 4]);
        let r = simulate(Mode::Ondemand, &params(1), &t).unwrap();
        assert!(close(r.max_s, 3.0 + 1.0), "{}", r.max_s);
        assert_eq!(r.registry_bytes, 300);
        // Every read starts a read-ahead of 2: read 3 brings 4 and 5, read 1 brings 2,
        // read 4 (already there) brings 6: blocks 1..=6.
        let mut p = params(1);
        p.readahead_blocks = 2;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        assert_eq!(r.registry_bytes, 600);
        // Read-ahead stops at the end of the file being read: files [1, 2) and [3, 5).
        let mut bounded = t.clone();
        bounded.file_ends = vec![5, 2, 5];
        let r = simulate(Mode::Ondemand, &p, &bounded).unwrap();
        assert_eq!(r.registry_bytes, 300);
        // A cap of 0 blocks after each read: no read-ahead at all.
        let r = simulate(Mode::Ondemand, &p, &t.with_readahead_cap(0)).unwrap();
        assert_eq!(r.registry_bytes, 300);
    }

    #[test]
    fn stripe_trees_spread_the_upload_over_every_vm() {
        // 7 VMs, 48 blocks of 100 B all read, read-ahead 8: with sibling exchange the three
        // inner VMs upload 1.5x the working set and the four leaves half of it; with stripe
        // trees no VM uploads more than the working set, and (with the snapshotter's follow
        // and serial uplinks) the slowest start is sooner.
        let t = trace(48, 100, &(0..48).collect::<Vec<_>>());
        let w = 4800;
        let mut p = params(7);
        p.readahead_blocks = 8;
        p.follow_concurrency = 4;
        p.serial_uplink = true;
        p.sibling_exchange = true;
        let sibling = simulate(Mode::Faasnet, &p, &t).unwrap();
        p.stripe_trees = true;
        let stripes = simulate(Mode::Faasnet, &p, &t).unwrap();
        let most = |r: &RunResult| r.vms.iter().map(|v| v.served_bytes).max().unwrap();
        assert!(most(&sibling) > w, "{}", most(&sibling));
        assert!(most(&stripes) <= w, "{}", most(&stripes));
        // Both roots read one stripe each from the registry: one working set in all.
        assert_eq!(stripes.registry_bytes, w);
        for v in &stripes.vms {
            assert_eq!(v.peer_bytes + v.registry_bytes, w);
        }
        assert!(
            stripes.max_s < sibling.max_s,
            "{} vs {}",
            stripes.max_s,
            sibling.max_s
        );
    }

    #[test]
    fn sibling_exchange_halves_the_parents_uplink_load() {
        // Root + two children, 4 blocks of 100 B at 100 B/s, no latency.
        let t = trace(4, 100, &[0, 1, 2, 3]);
        let mut p = params(3);
        let without = simulate(Mode::Faasnet, &p, &t).unwrap();
        p.sibling_exchange = true;
        let with = simulate(Mode::Faasnet, &p, &t).unwrap();
        // Without: each child gets the root's uplink half the time (10 s, see
        // faasnet_pipelines_down_the_tree). With: the root sends each block once (800 ->
        // 400 B served), and the children pass the other half to each other.
        assert_eq!(without.vms[0].served_bytes, 800);
        assert_eq!(with.vms[0].served_bytes, 400);
        assert_eq!(with.vms[1].served_bytes, 200);
        assert_eq!(with.vms[2].served_bytes, 200);
        assert_eq!(with.peer_bytes, 800);
        // Reads strictly one after another (no read-ahead) are latency-bound either way.
        assert!(with.max_s <= without.max_s + 1e-9);
        // With read-ahead the children's uplinks carry half the data: a lower max.
        let t = trace(64, 100, &(0..48).collect::<Vec<_>>());
        let mut p = params(7);
        p.readahead_blocks = 8;
        let without = simulate(Mode::Faasnet, &p, &t).unwrap();
        p.sibling_exchange = true;
        let with = simulate(Mode::Faasnet, &p, &t).unwrap();
        assert!(
            with.max_s < 0.85 * without.max_s,
            "{} vs {}",
            with.max_s,
            without.max_s
        );
        // An only child fetches everything from its parent.
        p.n_vms = 2;
        let only = simulate(Mode::Faasnet, &p, &t).unwrap();
        assert_eq!(only.vms[0].served_bytes, only.vms[1].peer_bytes);
        assert_eq!(only.vms[1].served_bytes, 0);
    }

    #[test]
    fn prefetch_waits_for_a_quiet_node() {
        // Reads of blocks 0 and 5 with 2 s of nothing in between is not modelled (reads
        // follow each other at once), so look at when prefetch starts: not before 0.5 s
        // after the last on-demand fetch.
        let t = trace(10, 100, &[0, 1]);
        let mut p = params(1);
        p.prefetch = true;
        p.prefetch_quiet_s = 0.5;
        p.prefetch_recorded_order = false;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        // Reads end at 2 s; the start at 3 s; prefetch from 2.5 s: 0.5 s of block 2 done.
        assert!(close(r.max_s, 3.0), "{}", r.max_s);
        assert_eq!(r.registry_bytes, 200);
        p.prefetch_quiet_s = 0.0;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        // Without the quiet period prefetch starts at 2 s and block 2 is in by 3 s.
        assert_eq!(r.registry_bytes, 300);
    }

    #[test]
    fn shared_cpu_is_processor_sharing() {
        // Two jobs of 1 s at 0 on 1 core: both end at 2 s; a third at 3 s runs alone.
        let t = cpu_finish_times(&[(0.0, 1.0), (0.0, 1.0), (3.0, 1.0)], Some(1.0));
        assert!(
            close(t[0], 2.0) && close(t[1], 2.0) && close(t[2], 4.0),
            "{t:?}"
        );
        // Two cores: at most one core per job.
        let t = cpu_finish_times(&[(0.0, 1.0), (0.0, 1.0), (0.5, 1.0)], Some(2.0));
        // 0..0.5 both at 1; then three share 2 cores (2/3 each): the first two have 0.5
        // left, done at 0.5 + 0.75 = 1.25; the third has 0.5 left, alone at 1: 1.75.
        assert!(close(t[0], 1.25) && close(t[2], 1.75), "{t:?}");
        assert_eq!(cpu_finish_times(&[(1.0, 2.0)], None), vec![3.0]);
        let t = trace(4, 100, &[0]);
        let mut p = params(4);
        p.host_cores = Some(2.0);
        p.h0_s = 1.0;
        // Four baseline VMs pull 400 B each (4 s at their 100 B/s links), then unpack
        // (800 B at 200 B/s: 4 s) and start (1 s) on 2 shared cores: 5 s of work each at
        // half a core.
        let r = simulate(Mode::Baseline, &p, &t).unwrap();
        assert!(close(r.max_s, 4.0 + 10.0), "{}", r.max_s);
    }

    #[test]
    fn faasnet_pipelines_down_the_tree() {
        // 3 VMs: root + two children, 4 blocks of 100 B at 100 B/s, no latency.
        let t = trace(4, 100, &[0, 1, 2, 3]);
        let r = simulate(Mode::Faasnet, &params(3), &t).unwrap();
        assert_eq!(r.tree_height, Some(2));
        // Root: 4 s of data, then h0. The children share the root's uplink (50 B/s each):
        // block 0 leaves the root at 1 s and arrives at 3 s, each further block 2 s later.
        assert!(close(r.vms[0].start_s, 5.0), "{:?}", r.vms[0]);
        assert!(close(r.vms[1].data_ready_s, 9.0), "{:?}", r.vms[1]);
        assert!(close(r.vms[2].start_s, 10.0), "{:?}", r.vms[2]);
        assert_eq!(r.registry_bytes, 400);
        assert_eq!(r.peer_bytes, 800);
        assert_eq!(r.vms[0].served_bytes, 800);
    }

    #[test]
    fn faasnet_chain_is_store_and_forward_per_block() {
        // A chain would need a unary tree; with 2 VMs the tree is root + one child. One
        // block: the child gets it one block time after the root.
        let t = trace(1, 100, &[0]);
        let r = simulate(Mode::Faasnet, &params(2), &t).unwrap();
        assert!(close(r.vms[0].data_ready_s, 1.0));
        assert!(close(r.vms[1].data_ready_s, 2.0));
        // With latency: root rtt + 1 s; child waits for the root, then rtt/2 + 1 s.
        let mut p = params(2);
        p.rtt_s = 0.2;
        let r = simulate(Mode::Faasnet, &p, &t).unwrap();
        assert!(close(r.vms[0].data_ready_s, 1.2), "{:?}", r.vms[0]);
        assert!(close(r.vms[1].data_ready_s, 2.3), "{:?}", r.vms[1]);
    }

    #[test]
    fn prefetch_does_not_slow_the_start_and_brings_the_rest() {
        let t = trace(20, 100, &[0, 1]);
        let mut p = params(1);
        let without = simulate(Mode::Ondemand, &p, &t).unwrap();
        p.prefetch = true;
        let with = simulate(Mode::Ondemand, &p, &t).unwrap();
        // The prefetch worker starts with the access order, so it takes block 1 early
        // (as background) and the reader upgrades it: never slower.
        assert!(with.max_s <= without.max_s + 1e-9);
    }

    #[test]
    fn faasnet_beats_ondemand_when_the_registry_is_the_bottleneck() {
        let t = trace(40, 100, &(0..20).collect::<Vec<_>>());
        let mut p = params(32);
        p.registry_egress_bps = 200.0;
        p.readahead_blocks = 8;
        p.prefetch = true;
        let od = simulate(Mode::Ondemand, &p, &t).unwrap();
        let fn_ = simulate(Mode::Faasnet, &p, &t).unwrap();
        assert!(fn_.max_s * 2.0 < od.max_s, "{} vs {}", fn_.max_s, od.max_s);
        assert!(fn_.registry_bytes < od.registry_bytes);
    }

    #[test]
    fn containers_spread_over_vms() {
        let mut p = params(4);
        p.containers_per_vm = 2.5;
        let per: Vec<_> = (0..4).map(|v| p.containers_on(v)).collect();
        assert_eq!(per, vec![3, 3, 2, 2]);
        assert_eq!(p.start_overhead_all(0), 2.0);
        assert_eq!(p.start_overhead_all(3), 1.0);
    }

    #[test]
    fn a_root_streams_its_start_region_in_runs() {
        // 8 blocks of 100 B, the first 6 a start region, read in order; link 100 B/s.
        let mut t = trace(8, 100, &[0, 1, 2, 3, 4, 5]);
        t.layers[0].start_blocks = 6;
        let mut p = params(1);
        p.rtt_s = 0.1;
        p.follow_concurrency = 4;
        p.start_run_blocks = 4;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        // Two runs (4 + 2 blocks), one round trip each, the blocks back to back: 6.2 s.
        assert!(close(r.vms[0].data_ready_s, 6.2), "{:?}", r.vms[0]);
        assert_eq!(r.registry_bytes, 600);
        // Without follow, every read is its own round trip: 6 x 1.1 s.
        p.follow_concurrency = 0;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        assert!(close(r.vms[0].data_ready_s, 6.6), "{:?}", r.vms[0]);
    }

    #[test]
    fn a_child_follows_its_parents_start_region() {
        // Root and one child; 4 start-region blocks read in order, no latency.
        let mut t = trace(4, 100, &[0, 1, 2, 3]);
        t.layers[0].start_blocks = 4;
        let mut p = params(2);
        p.follow_concurrency = 4;
        p.serial_uplink = true;
        let r = simulate(Mode::Faasnet, &p, &t).unwrap();
        // The root streams at 100 B/s (4 s); the child gets each block as soon as the
        // root holds it (serial uplink, one block behind): 5 s.
        assert!(close(r.vms[0].data_ready_s, 4.0), "{:?}", r.vms[0]);
        assert!(close(r.vms[1].data_ready_s, 5.0), "{:?}", r.vms[1]);
        assert_eq!(r.vms[1].peer_bytes, 400);
        assert_eq!(r.registry_bytes, 400);
    }

    #[test]
    fn a_serial_uplink_is_never_slower_than_a_shared_one() {
        // Root with two children (no sibling exchange) following the root's streamed start
        // region, with the root's uplink writing one block at a time or shared by both.
        let mut t = trace(4, 100, &[0, 1, 2, 3]);
        t.layers[0].start_blocks = 4;
        let mut p = params(3);
        p.follow_concurrency = 4;
        p.serial_uplink = true;
        let serial = simulate(Mode::Faasnet, &p, &t).unwrap();
        p.serial_uplink = false;
        let shared = simulate(Mode::Faasnet, &p, &t).unwrap();
        // Same bytes either way; one block at a time gets the first child its blocks no
        // later than sharing the uplink does.
        assert_eq!(serial.peer_bytes, shared.peer_bytes);
        assert!(serial.vms[1].data_ready_s <= shared.vms[1].data_ready_s + 1e-9);
        assert!(serial.max_s <= shared.max_s + 1e-9);
    }

    #[test]
    fn prefetch_waits_quiet_from_the_mount() {
        // A start that reads nothing the registry must send: prefetch still waits 2 s.
        let t = trace(10, 100, &[]);
        let mut p = params(1);
        p.prefetch = true;
        p.prefetch_quiet_s = 2.0;
        p.h0_s = 2.5;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        // Start at 2.5 s; prefetch from 2 s: half of one block by then, none finished.
        assert_eq!(r.registry_bytes, 0);
        p.h0_s = 3.0;
        let r = simulate(Mode::Ondemand, &p, &t).unwrap();
        assert_eq!(r.registry_bytes, 100);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 1.0), 3.0);
    }
}
