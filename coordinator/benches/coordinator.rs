//! Coordinator throughput and latency: joins then leaves of N nodes over T trees.
//!
//! Three layers, measured in the same run so they can be compared:
//! 1. `tree`: the pure in-memory `FunctionTree` (no locks, no I/O): the upper bound.
//! 2. `forest`: trees + leases + sled batch + group-commit flush, no network.
//! 3. `grpc`: the full path: tonic client (this process) -> loopback TCP -> a real
//!    `coordinator` process -> forest -> sled flush -> answer. CPU per op is client +
//!    server; the split is printed below the table.
//!
//! Run: `cargo bench -p faasnet-coordinator --bench coordinator`
//! Knobs (env): BENCH_NODES (100000), BENCH_TREES (1000), BENCH_CONCURRENCY (32),
//! BENCH_CONNECTIONS (4), BENCH_DIR (sled directory's parent; default the system temp dir).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasnet_coordinator::client::CoordinatorClient;
use faasnet_coordinator::forest::{Forest, RemoveReason};
use faasnet_coordinator::function_tree::FunctionTree;
use faasnet_coordinator::metrics::Metrics;
use faasnet_coordinator::store::Store;
use faasnet_coordinator::TreeKey;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn digest(t: usize) -> String {
    format!("sha256:{t:064x}")
}

fn node(i: usize) -> String {
    format!("vm-{i:06}")
}

fn addr(i: usize) -> String {
    format!("10.{}.{}.{}:7800", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// CPU time (user + system) used by this process so far.
fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Latencies of one phase.
struct Phase {
    name: String,
    ops: usize,
    wall: Duration,
    cpu: Duration,
    lat_us: Vec<u32>,
}

impl Phase {
    fn report(&mut self) {
        self.lat_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if self.lat_us.is_empty() {
                return f64::NAN;
            }
            let i = ((self.lat_us.len() as f64 * p).ceil() as usize).saturating_sub(1);
            self.lat_us[i.min(self.lat_us.len() - 1)] as f64 / 1000.0
        };
        println!(
            "| {:<22} | {:>7} | {:>8.2} | {:>9.0} | {:>7.3} | {:>7.3} | {:>7.3} | {:>9.1} |",
            self.name,
            self.ops,
            self.wall.as_secs_f64(),
            self.ops as f64 / self.wall.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            self.lat_us.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
            self.cpu.as_secs_f64() * 1e6 / self.ops as f64,
        );
    }
}

fn header() {
    println!(
        "| {:<22} | {:>7} | {:>8} | {:>9} | {:>7} | {:>7} | {:>7} | {:>9} |",
        "phase", "ops", "wall s", "ops/s", "p50 ms", "p99 ms", "max ms", "CPU µs/op"
    );
    println!(
        "|{:-<24}|{:->9}|{:->10}|{:->11}|{:->9}|{:->9}|{:->9}|{:->11}|",
        "", "", "", "", "", "", "", ""
    );
}

/// Runs `op(i)` for every index in `order` from `concurrency` tasks; one latency per op.
async fn drive<F, Fut>(name: &str, order: Arc<Vec<usize>>, concurrency: usize, op: F) -> Phase
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let cpu0 = cpu_time();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (next, order, op) = (next.clone(), order.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(order.len() / concurrency + 1);
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let t0 = Instant::now();
                op(worker, i).await;
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            lat
        }));
    }
    let mut lat_us = Vec::with_capacity(order.len());
    for t in tasks {
        lat_us.extend(t.await.unwrap());
    }
    Phase {
        name: name.to_string(),
        ops: order.len(),
        wall: start.elapsed(),
        cpu: cpu_time() - cpu0,
        lat_us,
    }
}

fn main() {
    let nodes = env("BENCH_NODES", 100_000);
    let trees = env("BENCH_TREES", 1_000);
    let concurrency = env("BENCH_CONCURRENCY", 32);
    let connections = env("BENCH_CONNECTIONS", 4).max(1);
    let base_dir = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());

    println!(
        "coordinator bench: {nodes} nodes over {trees} trees, {concurrency} in flight, \
         {connections} gRPC connections, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Other work on the machine skews every figure below; say how busy it was.
    let loadavg = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", loadavg().trim());
    let join_order: Arc<Vec<usize>> = Arc::new((0..nodes).collect());
    let mut leave: Vec<usize> = (0..nodes).collect();
    leave.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let leave_order = Arc::new(leave);
    let tree_of = move |i: usize| i % trees;

    // 1. Pure trees.
    header();
    {
        let rss0 = rss_bytes();
        let mut forest: Vec<FunctionTree<String>> =
            (0..trees).map(|_| FunctionTree::new()).collect();
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        for &i in join_order.iter() {
            forest[tree_of(i)].insert(node(i), addr(i)).unwrap();
        }
        let ins = t0.elapsed();
        let rss1 = rss_bytes();
        let t1 = Instant::now();
        for &i in leave_order.iter() {
            forest[tree_of(i)].remove(&node(i)).unwrap();
        }
        let del = t1.elapsed();
        let total = nodes as f64 * 2.0 / (ins + del).as_secs_f64();
        let cpu = cpu_time() - cpu0;
        println!(
            "| {:<22} | {:>7} | {:>8.2} | {:>9.0} | {:>7} | {:>7} | {:>7} | {:>9.2} |",
            "tree: insert+remove",
            nodes * 2,
            (ins + del).as_secs_f64(),
            total,
            "-",
            "-",
            "-",
            cpu.as_secs_f64() * 1e6 / (nodes * 2) as f64
        );
        println!(
            "\nmemory, pure tree (id + addr strings, index): {:.0} bytes/node (RSS delta)\n",
            rss1.saturating_sub(rss0) as f64 / nodes as f64
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 2. Forest: locks + sled + group commit, no network.
    rt.block_on(async {
        let dir = tempfile::tempdir_in(&base_dir).unwrap();
        let store = Arc::new(Store::open(dir.path(), 64 << 20).unwrap());
        let forest = Arc::new(
            Forest::open(store, Arc::new(Metrics::new()), Duration::from_secs(600), Instant::now())
                .unwrap(),
        );
        let rss0 = rss_bytes();
        header();
        let f = forest.clone();
        let mut join = drive("forest: join", join_order.clone(), concurrency, move |_, i| {
            let f = f.clone();
            async move {
                let key = TreeKey::new("bench", digest(tree_of(i)));
                f.join(&key, &node(i), &addr(i), Instant::now()).await.unwrap();
            }
        })
        .await;
        let rss1 = rss_bytes();
        let f = forest.clone();
        let mut leave = drive("forest: leave", leave_order.clone(), concurrency, move |_, i| {
            let f = f.clone();
            async move {
                let key = TreeKey::new("bench", digest(tree_of(i)));
                f.remove(&key, &node(i), RemoveReason::Left).await.unwrap();
            }
        })
        .await;
        join.report();
        leave.report();
        let mut both = Phase {
            name: "forest: join+leave".into(),
            ops: join.ops + leave.ops,
            wall: join.wall + leave.wall,
            cpu: join.cpu + leave.cpu,
            lat_us: [join.lat_us, leave.lat_us].concat(),
        };
        both.report();
        println!(
            "\nmemory, forest with {nodes} nodes (trees, leases, sled cache): {:.0} bytes/node (RSS delta)\n",
            rss1.saturating_sub(rss0) as f64 / nodes as f64
        );
    });

    // 3. Full path over gRPC, against a real `coordinator` process.
    rt.block_on(async {
        let dir = tempfile::tempdir_in(&base_dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"db\"\nlease_ttl_ms = 600000\n\
                 [tenants.bench]\ntoken = \"bench-token\"\n"
            ),
        )
        .unwrap();
        let mut server = Server(
            std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("start coordinator"),
        );
        let pid = server.0.id();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut clients = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while clients.len() < connections {
            match CoordinatorClient::connect(&endpoint, "bench", "bench-token").await {
                Ok(c) => clients.push(c),
                Err(e) => {
                    assert!(Instant::now() < deadline, "coordinator not up: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let clients = Arc::new(clients);
        let (rss0, scpu0) = (proc_rss(pid), proc_cpu(pid));
        header();
        let c = clients.clone();
        let mut join = drive("grpc: join", join_order.clone(), concurrency, move |w, i| {
            let c = c.clone();
            async move {
                c[w % c.len()]
                    .join(&digest(tree_of(i)), &node(i), &addr(i))
                    .await
                    .unwrap();
            }
        })
        .await;
        let (rss1, scpu1) = (proc_rss(pid), proc_cpu(pid));
        let c = clients.clone();
        let mut leave = drive("grpc: leave", leave_order.clone(), concurrency, move |w, i| {
            let c = c.clone();
            async move {
                c[w % c.len()].leave(&digest(tree_of(i)), &node(i)).await.unwrap();
            }
        })
        .await;
        let scpu2 = proc_cpu(pid);
        let (join_client, leave_client) = (join.cpu, leave.cpu);
        join.cpu += scpu1 - scpu0;
        leave.cpu += scpu2 - scpu1;
        join.report();
        leave.report();
        let mut both = Phase {
            name: "grpc: join+leave".into(),
            ops: join.ops + leave.ops,
            wall: join.wall + leave.wall,
            cpu: join.cpu + leave.cpu,
            lat_us: [join.lat_us, leave.lat_us].concat(),
        };
        both.report();
        let per = |d: Duration| d.as_secs_f64() * 1e6 / nodes as f64;
        println!(
            "\ngrpc CPU µs/op split: server join {:.1}, leave {:.1}; client join {:.1}, leave {:.1}",
            per(scpu1 - scpu0),
            per(scpu2 - scpu1),
            per(join_client),
            per(leave_client)
        );
        println!(
            "memory, coordinator process: {:.1} MiB idle, {:.1} MiB with {nodes} nodes: {:.0} bytes/node (RSS delta)",
            rss0 as f64 / (1 << 20) as f64,
            rss1 as f64 / (1 << 20) as f64,
            rss1.saturating_sub(rss0) as f64 / nodes as f64
        );
        println!("load average at end: {}", loadavg().trim());
        drop(server.0.kill());
        let _ = server.0.wait();
    });
}

/// Kills the coordinator process if the bench panics.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// utime + stime of another process (clock-tick resolution).
fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}
