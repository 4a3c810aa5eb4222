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

/// The benchmark's results.json (fields we do not use are ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Testbed parameters.
    pub params: MeasuredParams,
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
}

/// One measured run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasuredRun {
    /// `baseline`, `ondemand` or `faasnet`.
    pub mode: Mode,
    /// VMs started at once.
    pub n: usize,
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
    /// Bytes from the registry.
    #[serde(default)]
    pub registry_bytes: Option<u64>,
    /// Bytes from the parent.
    #[serde(default)]
    pub peer_bytes: Option<u64>,
}

impl MeasuredRun {
    fn starts_s(&self) -> Vec<f64> {
        self.vms
            .iter()
            .filter_map(|v| v.start_ms)
            .map(|ms| ms / 1000.0)
            .collect()
    }

    fn registry_bytes(&self) -> u64 {
        self.vms.iter().filter_map(|v| v.registry_bytes).sum()
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
}

/// The fitted parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// Fitted container start overhead, s.
    pub h0_s: f64,
    /// Fitted unpack rate, bytes/s.
    pub unpack_bps: f64,
    /// What each was fitted from (for the report).
    pub notes: Vec<String>,
}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Mode.
    pub mode: Mode,
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
}

/// Fits on the N=1 runs and predicts all runs. The scenario supplies what the measurement
/// does not (trace, latency, read-ahead, prefetch); the measurement's link and registry
/// rates override the scenario's.
pub fn calibrate(
    measured: &Measured,
    scenario: &Scenario,
    trace: &BlockTrace,
) -> Result<Calibration> {
    let mut params = scenario.params(1);
    params.vm_link_bps = measured.params.vm_link_bps;
    params.registry_egress_bps = measured.params.registry_egress_bps;
    let mut notes = Vec::new();
    if let Some(bs) = measured.params.block_size {
        if bs != trace.block_size {
            notes.push(format!(
                "warning: measured block size {bs} differs from the trace's {}",
                trace.block_size
            ));
        }
    }
    let n1 = |mode: Mode| {
        measured
            .runs
            .iter()
            .filter(move |r| r.mode == mode && r.n == 1)
            .flat_map(|r| r.starts_s())
    };
    // h0: measured start minus the simulated data time (with h0 = 0) of a lone VM.
    let mut zero = params.clone();
    zero.h0_s = 0.0;
    let mut h0_samples = Vec::new();
    for mode in [Mode::Ondemand, Mode::Faasnet] {
        let data = simulate(mode, &zero, trace)?.max_s;
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
    // unpack: measured baseline minus simulated download and h0, over the uncompressed size.
    let mut fast = params.clone();
    fast.unpack_bps = f64::INFINITY;
    let pull = simulate(Mode::Baseline, &fast, trace)?.max_s;
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
    let mut rows = Vec::new();
    for run in &measured.runs {
        let starts = run.starts_s();
        if starts.is_empty() {
            continue;
        }
        let mut p = params.clone();
        p.n_vms = run.n;
        let predicted: RunResult = simulate(run.mode, &p, trace)?;
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
            notes,
        },
        params,
        rows,
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

    #[test]
    fn sample_measurement_calibrates_within_tolerance() {
        let measured = Measured::load(&testdata("testdata/measured-sample.json")).unwrap();
        let scenario = Scenario::load(&testdata("scenarios/testbed.toml")).unwrap();
        let trace = scenario.block_trace().unwrap();
        let cal = calibrate(&measured, &scenario, &trace).unwrap();
        // The sample was generated with h0 = 1.5 s and unpack at 60 MB/s, plus noise.
        assert!((cal.fit.h0_s - 1.5).abs() < 0.2, "{:?}", cal.fit);
        assert!(
            (cal.fit.unpack_bps / 60e6 - 1.0).abs() < 0.2,
            "{:?}",
            cal.fit
        );
        assert_eq!(cal.rows.len(), measured.runs.len());
        let flagged: Vec<_> = cal.rows.iter().filter(|r| r.flagged()).collect();
        assert!(flagged.is_empty(), "{}", table(&cal));
        assert!(table(&cal).contains("| faasnet | 16 |"));
    }

    #[test]
    fn errors_and_flags() {
        let r = Row {
            mode: Mode::Faasnet,
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
