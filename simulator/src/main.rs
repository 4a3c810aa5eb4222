//! `faasnet-sim`: run scenarios, build block traces, calibrate on testbed measurements and
//! replay the paper's setups. See docs/simulator.md.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use faasnet_simulator::calibrate::{self, Measured};
use faasnet_simulator::model::{simulate, Mode, RunResult};
use faasnet_simulator::plot::Series;
use faasnet_simulator::replay::{self, PaperAssumptions, GBPS};
use faasnet_simulator::scenario::Scenario;
use faasnet_simulator::trace;

#[derive(Parser)]
#[command(
    name = "faasnet-sim",
    about = "Flow-level simulator of FaaSNet cold starts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a scenario: every mode at every N, and prints start times.
    Run {
        /// Scenario TOML.
        #[arg(long)]
        scenario: PathBuf,
        /// Run sizes (default: the scenario's).
        #[arg(long, value_delimiter = ',')]
        n: Vec<usize>,
        /// Modes (default: the scenario's).
        #[arg(long, value_delimiter = ',')]
        mode: Vec<String>,
        /// Also print one line per VM.
        #[arg(long)]
        per_vm: bool,
        /// Write all results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a PNG of start time vs N per mode.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Turn the sibling exchange off (both children fetch every block from the parent).
        #[arg(long)]
        no_sibling: bool,
        /// Two stripe trees instead of the sibling exchange (the coordinator's
        /// `stripe_tree`; not in the snapshotter yet).
        #[arg(long)]
        stripes: bool,
        /// Cores shared by all VMs' CPU work (0: none shared; default: the scenario's).
        #[arg(long)]
        host_cores: Option<f64>,
    },
    /// Builds a block trace from converted layer blobs (their TOCs) and access-order files.
    TraceFromToc {
        /// Converted layer blobs, lowest layer first.
        #[arg(long = "blob", required = true)]
        blobs: Vec<PathBuf>,
        /// Access-order files (one block index per line), one per blob, in the same order.
        #[arg(long = "access-order")]
        access_orders: Vec<PathBuf>,
        /// A folder of access-order files named by the layer digest's hex (as the
        /// snapshotter and the benchmark keep them); used for blobs without --access-order.
        #[arg(long)]
        access_order_dir: Option<PathBuf>,
        /// Fraction of a layer's blocks picked as its working set when it has no
        /// access order (synthetic fallback).
        #[arg(long, default_value_t = 0.1)]
        fallback_fraction: f64,
        /// Seed of the fallback.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Image name recorded in the trace.
        #[arg(long, default_value = "")]
        image: String,
        /// Output trace JSON.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fits h0 and the unpack rate on the N=1 runs of a measurement, predicts every run.
    Calibrate {
        /// The benchmark's results.json.
        #[arg(long)]
        measured: PathBuf,
        /// Scenario supplying the trace, latency, read-ahead and prefetch settings.
        #[arg(long)]
        scenario: PathBuf,
        /// Write the table (markdown) here too.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write a PNG of predicted start times vs N per mode.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Turn the sibling exchange off in the model (to compare with a --no-sibling testbed).
        #[arg(long)]
        no_sibling: bool,
        /// Shared CPU: all VMs' container starts and unpacks share the measurement's
        /// `params.cpus` cores (one core per VM at most).
        #[arg(long)]
        shared_cpu: bool,
        /// Shared CPU with this many cores (0: no sharing); overrides --shared-cpu.
        #[arg(long)]
        host_cores: Option<f64>,
    },
    /// Replays published setups next to the published figures.
    Replay {
        /// Which setups.
        which: Which,
        /// Write the report (markdown) here too.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Registry egress in Gbps (assumption).
        #[arg(long)]
        registry_gbps: Option<f64>,
        /// Working-set fraction of the uncompressed image (assumption).
        #[arg(long)]
        ws_fraction: Option<f64>,
        /// Container start overhead in s (assumption).
        #[arg(long)]
        h0: Option<f64>,
        /// Skip the sensitivity grid.
        #[arg(long)]
        no_sensitivity: bool,
        /// Also run on-demand at 1,000 VMs (slow: every VM's flows share the registry).
        #[arg(long)]
        large_ondemand: bool,
        /// Write a PNG of the scale-out start times.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Turn the sibling exchange off (with --no-stripes).
        #[arg(long)]
        no_sibling: bool,
        /// One function tree instead of the snapshotter's default two stripe trees.
        #[arg(long)]
        no_stripes: bool,
    },
    /// Draws start time against N from a JSON file of series (the benchmark report's
    /// measured figures): `{"title": "...", "series": {"mode": [[n, p50_s, max_s], ...]}}`.
    Plot {
        /// The series.
        #[arg(long)]
        data: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    /// The FaaSNet paper (ATC'21): scale-out 8..128 and 1,000 VMs.
    Paper,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run {
            scenario,
            n,
            mode,
            per_vm,
            json,
            plot,
            no_sibling,
            stripes,
            host_cores,
        } => {
            let mut s = Scenario::load(&scenario)?;
            if no_sibling {
                s.sibling_exchange = false;
            }
            s.stripe_trees |= stripes;
            if let Some(c) = host_cores {
                s.host_cores = (c > 0.0).then_some(c);
            }
            run(&s, n, mode, per_vm, json, plot)
        }
        Command::TraceFromToc {
            blobs,
            access_orders,
            access_order_dir,
            fallback_fraction,
            seed,
            image,
            out,
        } => trace_from_toc(
            &blobs,
            &access_orders,
            access_order_dir.as_deref(),
            fallback_fraction,
            seed,
            image,
            &out,
        ),
        Command::Calibrate {
            measured,
            scenario,
            out,
            plot,
            no_sibling,
            shared_cpu,
            host_cores,
        } => calibrate_cmd(
            &measured, &scenario, out, plot, no_sibling, shared_cpu, host_cores,
        ),
        Command::Replay {
            which: Which::Paper,
            out,
            registry_gbps,
            ws_fraction,
            h0,
            no_sensitivity,
            large_ondemand,
            plot,
            no_sibling,
            no_stripes,
        } => {
            let mut a = PaperAssumptions {
                sibling_exchange: !no_sibling,
                stripe_trees: !no_stripes,
                ..Default::default()
            };
            if let Some(g) = registry_gbps {
                a.registry_egress_bps = g * GBPS;
            }
            if let Some(f) = ws_fraction {
                a.working_set_fraction = f;
            }
            if let Some(h) = h0 {
                a.h0_s = h;
            }
            replay_paper(&a, out, !no_sensitivity, large_ondemand, plot)
        }
        Command::Plot { data, out } => plot_data(&data, &out),
    }
}

/// The `plot` subcommand: series from a JSON file, drawn with the simulator's plot module.
fn plot_data(data: &Path, out: &Path) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Data {
        title: String,
        series: std::collections::BTreeMap<String, Vec<(f64, f64, f64)>>,
    }
    let text =
        std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let d: Data = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected {{title, series: {{mode: [[n, p50, max]]}}}}",
            data.display()
        )
    })?;
    let series: Vec<Series> = d.series.into_iter().collect();
    faasnet_simulator::plot::plot_start_times(out, &series, &d.title)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn summary_header() -> &'static str {
    "| mode | N | p50 (s) | max (s) | all containers (s) | tree levels | registry MB | peer MB | events | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
}

fn summary_line(r: &RunResult, wall: f64) -> String {
    format!(
        "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.1} | {} | {:.2} |",
        r.mode,
        r.n,
        r.p50_s,
        r.max_s,
        r.all_started_s,
        r.tree_height.map_or("-".to_string(), |h| h.to_string()),
        r.registry_bytes as f64 / 1e6,
        r.peer_bytes as f64 / 1e6,
        r.events,
        wall
    )
}

fn series(results: &[RunResult]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for mode in Mode::ALL {
        let pts: Vec<_> = results
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| (r.n as f64, r.p50_s, r.max_s))
            .collect();
        if !pts.is_empty() {
            out.push((mode.to_string(), pts));
        }
    }
    out
}

fn run(
    scenario: &Scenario,
    ns: Vec<usize>,
    modes: Vec<String>,
    per_vm: bool,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
) -> Result<()> {
    let trace = scenario.block_trace()?;
    let ns = if ns.is_empty() { scenario.sizes() } else { ns };
    let modes: Vec<Mode> = if modes.is_empty() {
        scenario.modes()
    } else {
        modes
            .iter()
            .map(|m| m.parse())
            .collect::<std::result::Result<_, _>>()?
    };
    println!(
        "scenario {:?} (sibling exchange {}, shared CPU {}): {} blocks, converted {:.1} MB, working set {} reads / {:.1} MB, gzip {:.1} MB",
        scenario.name,
        if scenario.sibling_exchange { "on" } else { "off" },
        scenario
            .host_cores
            .map_or("no".to_string(), |c| format!("{c} cores")),
        trace.block_count(),
        trace.converted_bytes() as f64 / 1e6,
        trace.start_reads.len(),
        trace.working_set_bytes() as f64 / 1e6,
        trace.original_compressed_bytes as f64 / 1e6
    );
    println!("{}", summary_header());
    let mut results = Vec::new();
    for &mode in &modes {
        for &n in &ns {
            let t0 = Instant::now();
            let r = simulate(mode, &scenario.params(n), &trace)?;
            println!("{}", summary_line(&r, t0.elapsed().as_secs_f64()));
            if per_vm {
                for v in &r.vms {
                    println!(
                        "    {} depth {:?} data {:.3} s start {:.3} s registry {:.1} MB peer {:.1} MB served {:.1} MB",
                        v.vm,
                        v.depth,
                        v.data_ready_s,
                        v.start_s,
                        v.registry_bytes as f64 / 1e6,
                        v.peer_bytes as f64 / 1e6,
                        v.served_bytes as f64 / 1e6
                    );
                }
            }
            results.push(r);
        }
    }
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = plot {
        faasnet_simulator::plot::plot_start_times(
            &path,
            &series(&results),
            &format!("simulated start time, {}", scenario.name),
        )?;
    }
    Ok(())
}

fn trace_from_toc(
    blobs: &[PathBuf],
    access_orders: &[PathBuf],
    dir: Option<&Path>,
    fallback_fraction: f64,
    seed: u64,
    image: String,
    out: &Path,
) -> Result<()> {
    if !access_orders.is_empty() && access_orders.len() != blobs.len() {
        bail!("give one --access-order per --blob, or none (use --access-order-dir)");
    }
    let orders: Vec<Option<Vec<u32>>> = blobs
        .iter()
        .enumerate()
        .map(|(i, blob)| {
            if let Some(p) = access_orders.get(i) {
                return Some(read_order(p));
            }
            let dir = dir?;
            let name = blob.file_name()?.to_string_lossy().to_string();
            let hex = name
                .trim_start_matches("sha256:")
                .trim_start_matches("sha256_");
            let p = dir.join(hex);
            p.exists().then(|| read_order(&p))
        })
        .collect();
    let mut t = trace::from_blobs(blobs, &orders, fallback_fraction, seed)?;
    t.image = image;
    t.save(out)?;
    println!(
        "{}: {} layers, {} blocks ({:.1} MB converted), {} start reads ({:.1} MB), {} of {} layers from access-order files",
        out.display(),
        t.layers.len(),
        t.block_count(),
        t.converted_bytes() as f64 / 1e6,
        t.start_reads.len(),
        t.working_set_bytes() as f64 / 1e6,
        orders.iter().filter(|o| o.is_some()).count(),
        blobs.len()
    );
    Ok(())
}

/// The snapshotter's access-order file format: one block index per line.
fn read_order(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn calibrate_cmd(
    measured: &Path,
    scenario: &Path,
    out: Option<PathBuf>,
    plot: Option<PathBuf>,
    no_sibling: bool,
    shared_cpu: bool,
    host_cores: Option<f64>,
) -> Result<()> {
    let m = Measured::load(measured)?;
    let s = Scenario::load(scenario)?;
    let trace = s.block_trace()?;
    let cpus = m.params.cpus.map(|c| c as f64);
    if shared_cpu && host_cores.is_none() && cpus.is_none() {
        bail!("--shared-cpu: the measurement has no params.cpus; give --host-cores");
    }
    let opts = calibrate::Options {
        host_cores: host_cores.or(if shared_cpu { cpus } else { None }),
        sibling_exchange: no_sibling.then_some(false),
    };
    let cal = calibrate::calibrate(&m, &s, &trace, &opts)?;
    let trace = cal.trace.clone();
    let mut text = format!(
        "Fitted on N=1: h0 = {:.3} s, unpack = {:.1} MB/s (links {:.2} MB/s, registry {:.2} MB/s, RTT {:.2} ms, sibling exchange {}, shared CPU {})\n\n",
        cal.fit.h0_s,
        cal.fit.unpack_bps / 1e6,
        cal.params.vm_link_bps / 1e6,
        cal.params.registry_egress_bps / 1e6,
        cal.params.rtt_s * 1000.0,
        if cal.params.sibling_exchange { "on" } else { "off" },
        cal.params
            .host_cores
            .map_or("no".to_string(), |c| format!("{c} cores")),
    );
    for note in &cal.fit.notes {
        text.push_str(&format!("- {note}\n"));
    }
    text.push('\n');
    text.push_str(&calibrate::table(&cal));
    let flagged = cal.rows.iter().filter(|r| r.flagged()).count();
    let within16 = cal.rows.iter().filter(|r| r.n <= 16).all(|r| !r.flagged());
    text.push_str(&format!(
        "\n{} of {} runs beyond ±20%; N <= 16 all within 20%: {}\n",
        flagged,
        cal.rows.len(),
        if within16 { "yes" } else { "no" }
    ));
    print!("{text}");
    if let Some(p) = out {
        std::fs::write(&p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = plot {
        let mut results = Vec::new();
        for mode in Mode::ALL {
            let mut ns: Vec<usize> = cal
                .rows
                .iter()
                .filter(|r| r.mode == mode.into())
                .map(|r| r.n)
                .collect();
            ns.sort();
            ns.dedup();
            for n in ns {
                let mut params = cal.params.clone();
                params.n_vms = n;
                results.push(simulate(mode, &params, &trace)?);
            }
        }
        faasnet_simulator::plot::plot_start_times(
            &p,
            &series(&results),
            "predicted start time (calibrated)",
        )?;
    }
    Ok(())
}

fn replay_paper(
    a: &PaperAssumptions,
    out: Option<PathBuf>,
    sensitivity: bool,
    large_ondemand: bool,
    plot: Option<PathBuf>,
) -> Result<()> {
    let t0 = Instant::now();
    let rows = replay::scale_out(a, &replay::SCALE_OUT_NS)?;
    eprintln!("scale-out simulated in {:.1} s", t0.elapsed().as_secs_f64());
    let mut large = Vec::new();
    let mut modes = vec![Mode::Baseline, Mode::Faasnet];
    if large_ondemand {
        modes.insert(1, Mode::Ondemand);
    }
    for mode in modes {
        let t0 = Instant::now();
        large.push(replay::large_scale(a, mode)?);
        eprintln!(
            "1,000 VMs {mode} simulated in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let sens = if sensitivity {
        replay::sensitivity(a, &[2.5, 5.0, 10.0, 25.0], &[0.064, 0.15, 0.30], 128)?
    } else {
        Vec::new()
    };
    let md = replay::report(a, &rows, &large, &sens);
    print!("{md}");
    if let Some(p) = out {
        std::fs::write(&p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = plot {
        let results: Vec<RunResult> = rows.iter().flat_map(|r| r.runs.clone()).collect();
        faasnet_simulator::plot::plot_start_times(
            &p,
            &series(&results),
            "paper scale-out replay (758 MB, 1 Gbps)",
        )?;
    }
    Ok(())
}
