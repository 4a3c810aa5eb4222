//! Scenario files (TOML, `simulator/scenarios/*.toml`): the testbed or paper setup to run.
//!
//! All rates are bytes per second (`*_bps`), as in the benchmark's results.json.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};
use crate::model::{Mode, Params};
use crate::trace::{self, BlockTrace, SyntheticImage};

fn default_h0() -> f64 {
    1.0
}
fn default_unpack() -> f64 {
    100e6
}
fn default_block_size() -> u64 {
    faasnet_format::DEFAULT_BLOCK_SIZE as u64
}
fn default_readahead() -> usize {
    8
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_follow() -> usize {
    4
}
fn default_start_run() -> usize {
    16
}
fn default_one_f() -> f64 {
    1.0
}
fn default_cores() -> usize {
    2
}
fn default_quiet_ms() -> f64 {
    // As the snapshotter's `prefetch::QUIET`.
    2000.0
}

/// One scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    #[serde(default)]
    pub name: String,
    /// VMs starting at once (the default run size).
    pub n_vms: usize,
    /// Run sizes for a sweep (default: just `n_vms`).
    #[serde(default)]
    pub ns: Vec<usize>,
    /// Modes to run (default: all three).
    #[serde(default)]
    pub modes: Vec<Mode>,
    /// VM link, each direction, bytes/s.
    pub vm_link_bps: f64,
    /// Registry egress, bytes/s.
    pub registry_egress_bps: f64,
    /// Round trip of a block request, milliseconds.
    #[serde(default)]
    pub rtt_ms: f64,
    /// Container start overhead, seconds.
    #[serde(default = "default_h0")]
    pub h0_s: f64,
    /// Baseline unpack rate, uncompressed bytes/s.
    #[serde(default = "default_unpack")]
    pub unpack_bps: f64,
    /// Block size (uncompressed bytes per block) for synthetic images.
    #[serde(default = "default_block_size")]
    pub block_size: u64,
    /// The snapshotter's read-ahead, blocks.
    #[serde(default = "default_readahead")]
    pub readahead_blocks: usize,
    /// Background prefetch of the whole image.
    #[serde(default = "default_true")]
    pub prefetch: bool,
    /// Prefetch workers per layer.
    #[serde(default = "default_one")]
    pub prefetch_concurrency: usize,
    /// Containers per VM.
    #[serde(default = "default_one_f")]
    pub containers_per_vm: f64,
    /// vCPUs per VM.
    #[serde(default = "default_cores")]
    pub vm_cores: usize,
    /// Sibling exchange between the two children of a parent (the snapshotter's default).
    #[serde(default = "default_true")]
    pub sibling_exchange: bool,
    /// Two stripe trees instead of the sibling exchange (see `Params::stripe_trees`).
    #[serde(default)]
    pub stripe_trees: bool,
    /// Prefetch waits until no on-demand fetch ran on the node for this long, ms.
    #[serde(default = "default_quiet_ms")]
    pub prefetch_quiet_ms: f64,
    /// Prefetch takes the recorded access order first (false: a fresh node, index order).
    #[serde(default = "default_true")]
    pub prefetch_recorded_order: bool,
    /// Cores shared by all VMs' CPU work (container start, unpack); absent: no sharing.
    #[serde(default)]
    pub host_cores: Option<f64>,
    /// Follow fetches at once per layer (the snapshotter's `follow_concurrency`); 0: off.
    #[serde(default = "default_follow")]
    pub follow_concurrency: usize,
    /// Most start-region blocks per streamed registry run at a root.
    #[serde(default = "default_start_run")]
    pub start_run_blocks: usize,
    /// Peer uplinks write one block at a time by class (urgent, followed, prefetch).
    #[serde(default = "default_true")]
    pub serial_uplink: bool,
    /// A block trace file (relative to the scenario file); else the synthetic image below.
    #[serde(default)]
    pub trace: Option<PathBuf>,
    /// Synthetic image: uncompressed size, bytes.
    #[serde(default)]
    pub image_bytes: Option<u64>,
    /// Synthetic image: uncompressed bytes read at start.
    #[serde(default)]
    pub working_set_bytes: Option<u64>,
    /// Synthetic image: block-compressed / uncompressed.
    #[serde(default)]
    pub compressed_ratio: Option<f64>,
    /// Synthetic image: gzip / uncompressed.
    #[serde(default)]
    pub gzip_ratio: Option<f64>,
    /// Synthetic image: layers.
    #[serde(default)]
    pub layers: Option<usize>,
    /// Synthetic image: longest run of consecutive blocks read.
    #[serde(default)]
    pub max_run_blocks: Option<usize>,
    /// Synthetic image: seed.
    #[serde(default)]
    pub seed: Option<u64>,
}

impl Scenario {
    /// Reads a scenario; a relative `trace` path is resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        let mut s: Scenario = toml::from_str(&text).map_err(|source| SimError::Toml {
            path: path.display().to_string(),
            source,
        })?;
        if let (Some(t), Some(dir)) = (&s.trace, path.parent()) {
            if t.is_relative() {
                s.trace = Some(dir.join(t));
            }
        }
        Ok(s)
    }

    /// Parses a scenario from TOML text (trace paths stay as written).
    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|source| SimError::Toml {
            path: "<scenario>".into(),
            source,
        })
    }

    /// Model parameters for a run of `n` VMs.
    pub fn params(&self, n: usize) -> Params {
        Params {
            n_vms: n,
            vm_link_bps: self.vm_link_bps,
            registry_egress_bps: self.registry_egress_bps,
            rtt_s: self.rtt_ms / 1000.0,
            h0_s: self.h0_s,
            unpack_bps: self.unpack_bps,
            readahead_blocks: self.readahead_blocks,
            prefetch: self.prefetch,
            prefetch_concurrency: self.prefetch_concurrency,
            containers_per_vm: self.containers_per_vm,
            vm_cores: self.vm_cores,
            sibling_exchange: self.sibling_exchange,
            stripe_trees: self.stripe_trees,
            prefetch_quiet_s: self.prefetch_quiet_ms / 1000.0,
            prefetch_recorded_order: self.prefetch_recorded_order,
            host_cores: self.host_cores,
            follow_concurrency: self.follow_concurrency,
            start_run_blocks: self.start_run_blocks,
            serial_uplink: self.serial_uplink,
        }
    }

    /// The run sizes to sweep.
    pub fn sizes(&self) -> Vec<usize> {
        if self.ns.is_empty() {
            vec![self.n_vms]
        } else {
            self.ns.clone()
        }
    }

    /// The modes to run.
    pub fn modes(&self) -> Vec<Mode> {
        if self.modes.is_empty() {
            Mode::ALL.to_vec()
        } else {
            self.modes.clone()
        }
    }

    /// The synthetic image description, if the scenario has one.
    pub fn synthetic_image(&self) -> Option<SyntheticImage> {
        Some(SyntheticImage {
            image_bytes: self.image_bytes?,
            working_set_bytes: self.working_set_bytes?,
            compressed_ratio: self.compressed_ratio?,
            gzip_ratio: self.gzip_ratio,
            layers: self.layers,
            max_run_blocks: self.max_run_blocks,
            seed: self.seed,
        })
    }

    /// The block trace: the trace file, else the synthetic image.
    pub fn block_trace(&self) -> Result<BlockTrace> {
        if let Some(path) = &self.trace {
            return BlockTrace::load(path);
        }
        let img = self.synthetic_image().ok_or_else(|| {
            SimError::Invalid(
                "scenario needs `trace` or image_bytes + working_set_bytes + compressed_ratio"
                    .into(),
            )
        })?;
        trace::synthetic(&img, self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_scenario_parses_with_defaults() {
        let s = Scenario::parse(
            r#"
            n_vms = 4
            vm_link_bps = 6.25e6
            registry_egress_bps = 25e6
            image_bytes = 100_000_000
            working_set_bytes = 10_000_000
            compressed_ratio = 0.5
            modes = ["ondemand", "faasnet"]
            "#,
        )
        .unwrap();
        assert_eq!(s.sizes(), vec![4]);
        assert_eq!(s.modes(), vec![Mode::Ondemand, Mode::Faasnet]);
        let p = s.params(8);
        assert_eq!((p.n_vms, p.readahead_blocks, p.prefetch), (8, 8, true));
        let t = s.block_trace().unwrap();
        assert_eq!(t.block_size, 524_288);
        assert!(Scenario::parse("n_vms = 1\nbogus = 2").is_err());
    }

    #[test]
    fn shipped_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap();
                s.block_trace().unwrap();
                count += 1;
            }
        }
        assert!(count > 0);
    }
}
