//! Calibration against testbed measurements: fit the free parameters on N=1 runs only,
//! then predict every run and compare.
//!
//! Free parameters: `h0_s` (container start overhead) from the N=1 on-demand and faasnet
//! runs, `unpack_bps` from the N=1 baseline run. Everything else (links, registry egress,
//! block sizes, read order) is measured or set, not fitted, so a good match at N>1 is a test
//! of the model, not of the fit.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};
use crate::model::{percentile, simulate, Mode, Params, RunResult};
use crate::scenario::Scenario;
use crate::trace::BlockTrace;

/// Prediction errors beyond this (relative) are flagged.
pub const TOLERANCE: f64 = 0.20;

/// The benchmark's results.json (hack/bench/startup.sh; fields we do not use are ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Testbed parameters.
    pub params: MeasuredParams,
    /// The working-set run: one VM, on-demand, prefetch off; its registry bytes are W.
    #[serde(default)]
    pub working_set: Option<MeasuredRun>,
    /// The same VM started again with every block it needs cached.
    #[serde(default)]
    pub warm: Option<MeasuredRun>,
    /// Every run.
    pub runs: Vec<MeasuredRun>,
}

/// Testbed parameters (bytes/s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasuredParams {
    /// VM link, each direction.
    pub vm_link_bps: f64,
    /// Registry egress.
    pub registry_egress_bps: f64,
    /// Block size of the converted image.
    #[serde(default)]
    pub block_size: Option<u64>,
    /// CPUs of the host all VMs share.
    #[serde(default)]
    pub cpus: Option<usize>,
}

/// The mode of a measured run: the model's three, and `stripes`, the function tree with the
/// snapshotter's stripe trees (`lazy.stripe_trees`), which the model runs as
/// [`Mode::Faasnet`] with [`crate::model::Params::stripe_trees`] on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeasuredMode {
    /// Full pull.
    Baseline,
    /// Lazy reads from the registry, no tree.
    #[serde(alias = "on-demand")]
    Ondemand,
    /// The function tree with the sibling exchange.
    Faasnet,
    /// The function tree with stripe trees.
    Stripes,
}

impl MeasuredMode {
    /// The model's mode for it.
    pub fn model(self) -> Mode {
        match self {
            MeasuredMode::Baseline => Mode::Baseline,
            MeasuredMode::Ondemand => Mode::Ondemand,
            MeasuredMode::Faasnet | MeasuredMode::Stripes => Mode::Faasnet,
        }
    }

    /// Whether the model runs it with stripe trees.
    pub fn stripes(self) -> bool {
        self == MeasuredMode::Stripes
    }
}

impl From<Mode> for MeasuredMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Baseline => MeasuredMode::Baseline,
            Mode::Ondemand => MeasuredMode::Ondemand,
            Mode::Faasnet => MeasuredMode::Faasnet,
        }
    }
}

impl std::fmt::Display for MeasuredMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MeasuredMode::Stripes => f.write_str("stripes"),
            m => write!(f, "{}", m.model()),
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasuredRun {
    /// `baseline`, `ondemand`, `faasnet` or `stripes`.
    pub mode: MeasuredMode,
    /// VMs started at once.
    pub n: usize,
    /// Bytes the registry sent during the run (its own counter, TOCs and manifests
    /// included); the VMs' sum when absent.
    #[serde(default)]
    pub registry_bytes: Option<u64>,
    /// Share of the host's CPU time busy during the run.
    #[serde(default)]
    pub cpu_busy: Option<f64>,
    /// Per VM.
    pub vms: Vec<MeasuredVm>,
}

/// One VM of a measured run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasuredVm {
    /// VM name.
    pub vm: String,
    /// Request to first output, ms; `null` when the start failed.
    pub start_ms: Option<f64>,
    /// Whether the function printed its line; a failed start is left out.
    #[serde(default)]
    pub ok: Option<bool>,
    /// Block bytes from the registry (the snapshotter's counter).
    #[serde(default)]
    pub registry_bytes: Option<u64>,
    /// Block bytes from peers.
    #[serde(default)]
    pub peer_bytes: Option<u64>,
    /// Bytes the VM's interface received.
    #[serde(default)]
    pub rx_bytes: Option<u64>,
}

impl MeasuredRun {
    /// Start times (s) of the VMs that started.
    pub fn starts_s(&self) -> Vec<f64> {
        self.vms
            .iter()
            .filter(|v| v.ok != Some(false))
            .filter_map(|v| v.start_ms)
            .map(|ms| ms / 1000.0)
            .collect()
    }

    /// Registry bytes of the run: the registry's counter, else the VMs' sum.
    pub fn registry_bytes(&self) -> u64 {
        self.registry_bytes
            .unwrap_or_else(|| self.vms.iter().filter_map(|v| v.registry_bytes).sum())
    }
}

impl Measured {
    /// Reads a results.json.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| SimError::Json {
            path: path.display().to_string(),
            source,
        })
    }

    /// W: block bytes one cold start fetched from the registry (prefetch off).
    pub fn working_set_bytes(&self) -> Option<u64> {
        let run = self.working_set.as_ref()?;
        let vm = run.vms.first()?;
        vm.registry_bytes.or(run.registry_bytes)
    }

    /// The warm start, s.
    pub fn warm_s(&self) -> Option<f64> {
        self.warm.as_ref()?.starts_s().first().copied()
    }
}

/// The fitted parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// Fitted container start overhead, s.
    pub h0_s: f64,
    /// Fitted unpack rate, bytes/s.
    pub unpack_bps: f64,
    /// Measured W (block bytes of one cold start, prefetch off), if the file has it.
    pub measured_w: Option<u64>,
    /// The model's W for the same start (on-demand, one VM, prefetch off).
    pub modelled_w: u64,
    /// Read-ahead cap chosen so that the modelled W matches the measured one (only for a
    /// trace without file boundaries).
    pub readahead_cap: Option<usize>,
    /// What each was fitted from (for the report).
    pub notes: Vec<String>,
}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Mode.
    pub mode: MeasuredMode,
    /// VMs.
    pub n: usize,
    /// Measured median start, s.
    pub measured_p50_s: f64,
    /// Measured latest start, s.
    pub measured_max_s: f64,
    /// Predicted median start, s.
    pub predicted_p50_s: f64,
    /// Predicted latest start, s.
    pub predicted_max_s: f64,
    /// Measured registry bytes.
    pub measured_registry_bytes: u64,
    /// Predicted registry bytes.
    pub predicted_registry_bytes: u64,
}

impl Row {
    /// Relative error of the median, percent.
    pub fn p50_error_pct(&self) -> f64 {
        100.0 * (self.predicted_p50_s - self.measured_p50_s) / self.measured_p50_s
    }

    /// Relative error of the maximum, percent.
    pub fn max_error_pct(&self) -> f64 {
        100.0 * (self.predicted_max_s - self.measured_max_s) / self.measured_max_s
    }

    /// True when either error is beyond [`TOLERANCE`].
    pub fn flagged(&self) -> bool {
        self.p50_error_pct().abs() > TOLERANCE * 100.0
            || self.max_error_pct().abs() > TOLERANCE * 100.0
    }
}

/// Calibration output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The fit.
    pub fit: Fit,
    /// Parameters used for the predictions (at N=1; N varies per row).
    pub params: Params,
    /// One row per measured run, in file order.
    pub rows: Vec<Row>,
    /// The trace the predictions used (read-ahead capped if so fitted).
    #[serde(skip)]
    pub trace: BlockTrace,
}

/// What the command line may change against the scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Options {
    /// Shared CPU: `Some(cores)` overrides the scenario's `host_cores`; `Some(0.0)` means
    /// no sharing.
    pub host_cores: Option<f64>,
    /// Overrides the scenario's sibling exchange.
    pub sibling_exchange: Option<bool>,
}

/// W of the model: registry bytes of one VM's on-demand start with prefetch off.
pub fn modelled_working_set(params: &Params, trace: &BlockTrace) -> Result<u64> {
    let mut p = params.clone();
    p.n_vms = 1;
    p.prefetch = false;
    Ok(simulate(Mode::Ondemand, &p, trace)?.registry_bytes)
}

/// Fits on the N=1 runs and predicts all runs. The scenario supplies what the measurement
/// does not (trace, latency, read-ahead, prefetch); the measurement's link and registry
/// rates override the scenario's.
pub fn calibrate(
    measured: &Measured,
    scenario: &Scenario,
    trace: &BlockTrace,
    opts: &Options,
) -> Result<Calibration> {
    let mut params = scenario.params(1);
    params.vm_link_bps = measured.params.vm_link_bps;
    params.registry_egress_bps = measured.params.registry_egress_bps;
    match opts.host_cores {
        Some(c) if c > 0.0 => params.host_cores = Some(c),
        Some(_) => params.host_cores = None,
        None => {}
    }
    if let Some(on) = opts.sibling_exchange {
        params.sibling_exchange = on;
    }
    let mut notes = Vec::new();
    if let Some(bs) = measured.params.block_size {
        if bs != trace.block_size {
            notes.push(format!(
                "warning: measured block size {bs} differs from the trace's {}",
                trace.block_size
            ));
        }
    }
    // The working set: read-ahead stops at the end of the file being read. A trace without
    // file boundaries, or whose guessed boundaries (the access order names blocks, not
    // files) fetch a different W, gets the read-ahead cap whose modelled W is nearest the
    // measured W (one more parameter, fitted on the N=1 working-set run).
    let measured_w = measured.working_set_bytes();
    let mut trace = trace.clone();
    let mut readahead_cap = None;
    if let Some(w) = measured_w {
        let uncapped = modelled_working_set(&params, &trace)?;
        let mut best: Option<(u64, usize, u64)> = None;
        for cap in 0..=params.readahead_blocks {
            let mw = modelled_working_set(&params, &trace.with_readahead_cap(cap))?;
            let err = mw.abs_diff(w);
            if best.is_none_or(|b| err < b.0) {
                best = Some((err, cap, mw));
            }
        }
        let (_, cap, mw) = best.expect("at least cap 0");
        if cap < params.readahead_blocks {
            notes.push(format!(
                "read-ahead bounded by {}: modelled W {:.1} MB against the measured {:.1} MB; \
                 capped at {cap} blocks after each read, the modelled W is {:.1} MB",
                if trace.file_ends.is_empty() {
                    "the layer only (no file boundaries in the trace)"
                } else {
                    "the trace's file guesses"
                },
                uncapped as f64 / 1e6,
                w as f64 / 1e6,
                mw as f64 / 1e6,
            ));
            trace = trace.with_readahead_cap(cap);
            readahead_cap = Some(cap);
        }
    }
    let modelled_w = modelled_working_set(&params, &trace)?;
    match measured_w {
        Some(w) => notes.push(format!(
            "W: measured {:.1} MB, modelled {:.1} MB ({:+.0}%; {} reads in the trace, read-ahead bounded by {})",
            w as f64 / 1e6,
            modelled_w as f64 / 1e6,
            100.0 * (modelled_w as f64 - w as f64) / w as f64,
            trace.start_reads.len(),
            match (readahead_cap, trace.file_ends.is_empty()) {
                (Some(_), _) => "the fitted cap",
                (None, false) => "the files",
                (None, true) => "the layer",
            },
        )),
        None => notes.push(format!(
            "W: not in the measurement; modelled {:.1} MB",
            modelled_w as f64 / 1e6
        )),
    }
    let n1 = |mode: Mode| {
        measured
            .runs
            .iter()
            .filter(move |r| r.mode.model() == mode && r.n == 1)
            .flat_map(|r| r.starts_s())
    };
    // h0: measured start minus the simulated data time (with h0 = 0) of a lone VM.
    let mut zero = params.clone();
    zero.h0_s = 0.0;
    let mut h0_samples = Vec::new();
    for mode in [Mode::Ondemand, Mode::Faasnet] {
        let data = simulate(mode, &zero, &trace)?.max_s;
        for s in n1(mode) {
            h0_samples.push(s - data);
            notes.push(format!(
                "h0 from {mode} N=1: measured {s:.3} s - simulated data {data:.3} s"
            ));
        }
    }
    if h0_samples.is_empty() {
        notes.push(format!(
            "no N=1 on-demand/faasnet run: h0 kept at the scenario's {:.3} s",
            params.h0_s
        ));
    } else {
        let mean = h0_samples.iter().sum::<f64>() / h0_samples.len() as f64;
        if mean < 0.0 {
            notes.push(format!(
                "warning: fitted h0 {mean:.3} s < 0 (the model's data time is too long); using 0"
            ));
        }
        params.h0_s = mean.max(0.0);
    }
    if let Some(warm) = measured.warm_s() {
        notes.push(format!(
            "for comparison, the warm start (every block cached) took {warm:.3} s; h0 also \
             holds the CPU pauses between a cold start's read bursts, which the model does not overlap"
        ));
    }
    // unpack: measured baseline minus simulated download and h0, over the uncompressed size.
    let mut fast = params.clone();
    fast.unpack_bps = f64::INFINITY;
    let pull = simulate(Mode::Baseline, &fast, &trace)?.max_s;
    let base: Vec<f64> = n1(Mode::Baseline).collect();
    if base.is_empty() {
        notes.push(format!(
            "no N=1 baseline run: unpack kept at the scenario's {:.1} MB/s",
            params.unpack_bps / 1e6
        ));
    } else {
        let mean = base.iter().sum::<f64>() / base.len() as f64;
        let unpack_time = mean - pull;
        if unpack_time > 0.0 {
            params.unpack_bps = trace.original_uncompressed_bytes as f64 / unpack_time;
            notes.push(format!(
                "unpack from baseline N=1: measured {mean:.3} s - simulated pull + h0 {pull:.3} s = {unpack_time:.3} s"
            ));
        } else {
            notes.push(format!(
                "warning: baseline N=1 ({mean:.3} s) is not longer than the simulated pull + h0 ({pull:.3} s); unpack kept at {:.1} MB/s",
                params.unpack_bps / 1e6
            ));
        }
    }
    notes.push(match params.host_cores {
        Some(c) => format!(
            "shared CPU: the container starts (h0) and baseline unpacks of all VMs share {c} cores, one core per job at most"
        ),
        None => "no shared CPU: every VM's h0 and unpack run on a CPU of its own".into(),
    });
    let mut rows = Vec::new();
    for run in &measured.runs {
        let starts = run.starts_s();
        if starts.is_empty() {
            continue;
        }
        let mut p = params.clone();
        p.n_vms = run.n;
        p.stripe_trees = run.mode.stripes();
        let predicted: RunResult = simulate(run.mode.model(), &p, &trace)?;
        rows.push(Row {
            mode: run.mode,
            n: run.n,
            measured_p50_s: percentile(&starts, 0.5),
            measured_max_s: percentile(&starts, 1.0),
            predicted_p50_s: predicted.p50_s,
            predicted_max_s: predicted.max_s,
            measured_registry_bytes: run.registry_bytes(),
            predicted_registry_bytes: predicted.registry_bytes,
        });
    }
    Ok(Calibration {
        fit: Fit {
            h0_s: params.h0_s,
            unpack_bps: params.unpack_bps,
            measured_w,
            modelled_w,
            readahead_cap,
            notes,
        },
        params,
        rows,
        trace,
    })
}

/// The comparison as a markdown table.
pub fn table(cal: &Calibration) -> String {
    let mut out = String::from(
        "| mode | N | measured p50 (s) | measured max (s) | predicted p50 (s) | predicted max (s) | error p50 | error max | registry MB measured / predicted | |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in &cal.rows {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:+.0}% | {:+.0}% | {:.0} / {:.0} | {} |\n",
            r.mode,
            r.n,
            r.measured_p50_s,
            r.measured_max_s,
            r.predicted_p50_s,
            r.predicted_max_s,
            r.p50_error_pct(),
            r.max_error_pct(),
            r.measured_registry_bytes as f64 / 1e6,
            r.predicted_registry_bytes as f64 / 1e6,
            if r.flagged() { "**> 20%**" } else { "ok" },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn testdata(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
    }

    /// A measurement made by the model itself (h0 1.5 s, unpack 60 MB/s, ±5% jitter), in
    /// the benchmark's format.
    fn synthetic_measurement(scenario: &Scenario, trace: &BlockTrace) -> Measured {
        let mut runs = Vec::new();
        let mut p = scenario.params(1);
        p.h0_s = 1.5;
        p.unpack_bps = 60e6;
        let mut jitter = [1.03, 0.97, 1.05, 0.95, 1.0, 1.02, 0.98]
            .into_iter()
            .cycle();
        for mode in Mode::ALL {
            for n in [1, 2, 4, 8] {
                p.n_vms = n;
                let r = simulate(mode, &p, trace).unwrap();
                let vms = r
                    .vms
                    .iter()
                    .map(|v| MeasuredVm {
                        vm: v.vm.clone(),
                        start_ms: Some(v.start_s * 1000.0 * jitter.next().unwrap()),
                        ok: Some(true),
                        registry_bytes: Some(v.registry_bytes),
                        peer_bytes: Some(v.peer_bytes),
                        rx_bytes: None,
                    })
                    .collect();
                runs.push(MeasuredRun {
                    mode: mode.into(),
                    n,
                    registry_bytes: Some(r.registry_bytes),
                    cpu_busy: None,
                    vms,
                });
            }
        }
        Measured {
            params: MeasuredParams {
                vm_link_bps: scenario.vm_link_bps,
                registry_egress_bps: scenario.registry_egress_bps,
                block_size: Some(trace.block_size),
                cpus: Some(2),
            },
            working_set: None,
            warm: None,
            runs,
        }
    }

    #[test]
    fn synthetic_measurement_calibrates_within_tolerance() {
        let scenario = Scenario::load(&testdata("scenarios/testbed.toml")).unwrap();
        let trace = scenario.block_trace().unwrap();
        let measured = synthetic_measurement(&scenario, &trace);
        let cal = calibrate(&measured, &scenario, &trace, &Options::default()).unwrap();
        assert!((cal.fit.h0_s - 1.5).abs() < 0.2, "{:?}", cal.fit);
        assert!(
            (cal.fit.unpack_bps / 60e6 - 1.0).abs() < 0.2,
            "{:?}",
            cal.fit
        );
        assert_eq!(cal.rows.len(), measured.runs.len());
        let flagged: Vec<_> = cal.rows.iter().filter(|r| r.flagged()).collect();
        assert!(flagged.is_empty(), "{}", table(&cal));
        assert!(table(&cal).contains("| faasnet | 8 |"));
    }

    #[test]
    fn a_stripes_run_is_predicted_with_stripe_trees() {
        let scenario = Scenario::load(&testdata("scenarios/testbed.toml")).unwrap();
        let trace = scenario.block_trace().unwrap();
        let mut measured = synthetic_measurement(&scenario, &trace);
        // The bench's fourth mode, as results.json names it.
        let json = r#"{"mode": "stripes", "n": 8, "vms": [{"vm": "vm0", "start_ms": 9000}]}"#;
        let run: MeasuredRun = serde_json::from_str(json).unwrap();
        assert_eq!(run.mode, MeasuredMode::Stripes);
        measured.runs.push(run);
        let cal = calibrate(&measured, &scenario, &trace, &Options::default()).unwrap();
        let row = cal.rows.last().unwrap();
        assert_eq!((row.mode, row.n), (MeasuredMode::Stripes, 8));
        // Predicted as the model's function tree with stripe trees, not with the sibling
        // exchange: each root reads its stripe, so the registry serves one working set.
        let mut p = cal.params.clone();
        p.n_vms = 8;
        p.stripe_trees = true;
        let stripes = simulate(Mode::Faasnet, &p, &cal.trace).unwrap();
        p.stripe_trees = false;
        let sibling = simulate(Mode::Faasnet, &p, &cal.trace).unwrap();
        assert_ne!(stripes.max_s, sibling.max_s);
        assert_eq!(row.predicted_max_s, stripes.max_s);
        assert_eq!(row.predicted_registry_bytes, stripes.registry_bytes);
        assert!(table(&cal).contains("| stripes | 8 |"));
    }

    #[test]
    fn real_results_json_is_read() {
        // A real hack/bench/startup.sh output (100 Mbit/s, N = 1, 2, 4, no sibling exchange)
        // and the trace of its image.
        let measured = Measured::load(&testdata("testdata/measured-st2.json")).unwrap();
        assert_eq!(measured.working_set_bytes(), Some(36_014_517));
        assert_eq!(measured.warm_s(), Some(0.286));
        assert_eq!(measured.params.cpus, Some(2));
        assert_eq!(measured.runs.len(), 9);
        // Per-VM snapshotter counters are 0 in baseline; the registry's own counter is used.
        assert_eq!(measured.runs[0].registry_bytes(), 86_373_081);
        let trace = BlockTrace::load(&testdata("testdata/realistic-trace-st2.json")).unwrap();
        let scenario = Scenario::parse(
            "n_vms = 1\nvm_link_bps = 1\nregistry_egress_bps = 1\nrtt_ms = 0.2\nprefetch_recorded_order = false",
        )
        .unwrap();
        let opts = Options {
            host_cores: None,
            sibling_exchange: Some(false),
        };
        let cal = calibrate(&measured, &scenario, &trace, &opts).unwrap();
        // W is matched to within a block or two of the measurement.
        let w = cal.fit.measured_w.unwrap() as f64;
        assert!(
            (cal.fit.modelled_w as f64 / w - 1.0).abs() < 0.03,
            "{:?}",
            cal.fit
        );
        assert_eq!(cal.rows.len(), 9);
        assert!(cal.fit.h0_s > 0.0 && cal.fit.h0_s < 3.0, "{:?}", cal.fit);
    }

    #[test]
    fn errors_and_flags() {
        let r = Row {
            mode: MeasuredMode::Faasnet,
            n: 4,
            measured_p50_s: 10.0,
            measured_max_s: 10.0,
            predicted_p50_s: 12.5,
            predicted_max_s: 9.0,
            measured_registry_bytes: 0,
            predicted_registry_bytes: 0,
        };
        assert!((r.p50_error_pct() - 25.0).abs() < 1e-9);
        assert!((r.max_error_pct() + 10.0).abs() < 1e-9);
        assert!(r.flagged());
    }
}
