//! The server's TOML configuration.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Configuration problems.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One tenant.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Bearer token the tenant's VMs present.
    pub token: String,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:7700".parse().expect("static address")
}
fn default_lease_ttl_ms() -> u64 {
    10_000
}
fn default_sweep_interval_ms() -> u64 {
    1_000
}
fn default_probe_timeout_ms() -> u64 {
    1_000
}
fn default_probe_interval_ms() -> u64 {
    1_000
}
fn default_cache_bytes() -> u64 {
    64 << 20
}

/// The coordinator's configuration file.
///
/// ```toml
/// listen = "127.0.0.1:7700"                 # gRPC over TCP
/// unix_socket = "/run/faasnet/coord.sock"   # optional: gRPC over a unix socket too
/// data_dir = "/var/lib/faasnet/coordinator" # sled database
/// metrics_listen = "127.0.0.1:9700"         # optional: Prometheus /metrics
/// lease_ttl_ms = 10000
/// sweep_interval_ms = 1000
/// probe_timeout_ms = 1000                  # 0: no probes, leases only
/// probe_interval_ms = 1000
/// admin_token = "change-me"
///
/// [tenants.acme]
/// token = "acme-secret"
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TCP address for gRPC.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Optional unix socket path for gRPC (removed and re-created at start).
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// Directory of the sled database. Relative paths are taken from the config file's
    /// directory.
    pub data_dir: PathBuf,
    /// Optional address for the Prometheus `/metrics` endpoint.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Lease length; a node that does not heartbeat within it is removed.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// How often expired leases are swept.
    #[serde(default = "default_sweep_interval_ms")]
    pub sweep_interval_ms: u64,
    /// How long a probe of a suspect node's peer address may take to connect (see
    /// `health.rs`); 0 disables probes, so only leases remove dead nodes.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// A node is probed at most once per this interval, however many reports name it.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// sled page cache size.
    #[serde(default = "default_cache_bytes")]
    pub sled_cache_bytes: u64,
    /// Token for the admin service; without it the admin service refuses everything.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Tenants by name.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })?;
        if cfg.data_dir.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.data_dir = dir.join(&cfg.data_dir);
            }
        }
        Ok(cfg)
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source,
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.lease_ttl_ms == 0 || self.sweep_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "lease_ttl_ms and sweep_interval_ms must be positive".into(),
            ));
        }
        let mut seen = HashMap::new();
        for (name, t) in &self.tenants {
            crate::validate::tenant(name).map_err(ConfigError::Invalid)?;
            if t.token.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "tenant {name:?} has an empty token"
                )));
            }
            if Some(&t.token) == self.admin_token.as_ref() {
                return Err(ConfigError::Invalid(format!(
                    "tenant {name:?} uses the admin token"
                )));
            }
            if let Some(other) = seen.insert(t.token.as_str(), name) {
                return Err(ConfigError::Invalid(format!(
                    "tenants {other:?} and {name:?} share a token"
                )));
            }
        }
        if self.admin_token.as_deref() == Some("") {
            return Err(ConfigError::Invalid("admin_token is empty".into()));
        }
        Ok(())
    }

    /// Lease length.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Sweep period.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }

    /// Probe connect timeout; `None` when probes are disabled.
    pub fn probe_timeout(&self) -> Option<Duration> {
        (self.probe_timeout_ms > 0).then(|| Duration::from_millis(self.probe_timeout_ms))
    }

    /// Minimum time between two probes of one node.
    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_example() {
        let cfg = Config::parse(
            r#"
            data_dir = "db"
            admin_token = "adm"
            [tenants.acme]
            token = "a"
            [tenants.globex]
            token = "g"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.listen, default_listen());
        assert_eq!(cfg.tenants.len(), 2);
        assert_eq!(cfg.lease_ttl(), Duration::from_secs(10));
    }

    #[test]
    fn rejects_shared_tokens_and_unknown_keys() {
        let shared = "data_dir = \"d\"\n[tenants.a]\ntoken = \"x\"\n[tenants.b]\ntoken = \"x\"\n";
        assert!(matches!(
            Config::parse(shared),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::parse("data_dir = \"d\"\nbogus = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
    }
}
