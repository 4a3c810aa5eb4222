//! The daemon's TOML configuration (`/etc/faasnet/snapshotter.toml`), all tables in one
//! place: the snapshotter's own settings, `[lazy]` for the lazy path and
//! `[coordinator]` for the function-tree coordinator. Every field has a default, so an
//! empty file (or none) is a valid configuration; unknown fields are errors.
//! See docs/config.md for the reference.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/faasnet/snapshotter.toml";

/// A configuration error, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is malformed or a field has the wrong type or an unknown name (the
    /// message shows the line and names the field).
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error.
        source: toml::de::Error,
    },
    /// A field parses but its value is not acceptable.
    #[error("config field `{field}`: {reason}")]
    Invalid {
        /// Dotted name of the field, e.g. `lazy.cache_quota_bytes`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The snapshotter daemon's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Root directory: metadata (`metadata.sled`) and snapshot directories
    /// (`snapshots/<id>`). Must be on a filesystem overlayfs accepts as upper dir.
    pub root: PathBuf,
    /// Unix socket serving containerd's snapshots gRPC API; containerd's
    /// `proxy_plugins.<name>.address`.
    pub socket: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax: `info`, `debug`,
    /// `faasnet_snapshotter=debug,info`). `RUST_LOG` overrides it.
    pub log_level: String,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); empty disables it.
    pub metrics_address: String,
    /// The lazy path (remote layers).
    pub lazy: LazyConfig,
    /// The function-tree coordinator.
    pub coordinator: CoordinatorConfig,
}

/// `[lazy]`: mounting converted layers lazily (FUSE) instead of unpacking them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LazyConfig {
    /// Whether layers in the FaaSNet block format are mounted lazily; when false every
    /// layer takes the ordinary path.
    pub enabled: bool,
    /// Block cache directory; default `<root>/cache`.
    pub cache_dir: Option<PathBuf>,
    /// Block cache size limit in bytes; least recently used blocks are evicted past it.
    pub cache_quota_bytes: u64,
    /// Where this node serves cached blocks to its children in the function tree.
    pub peer_listen: SocketAddr,
    /// Address other nodes use to reach `peer_listen` (`host:port`); default: the
    /// listen address when it is not a wildcard, else decided by the lazy path.
    pub peer_advertise: Option<String>,
    /// Registry hosts (`host` or `host:port`) reached over plain HTTP instead of HTTPS.
    pub insecure_registries: Vec<String>,
    /// Timeout of one block fetch (from a peer or the registry), in milliseconds, before
    /// trying the next source.
    pub fetch_timeout_ms: u64,
    /// Fetch every block of a mounted layer in the background, so this node can feed its
    /// children and later reads hit the cache.
    pub prefetch: bool,
    /// Concurrent background fetches per layer. Kept low: prefetch shares the link with
    /// on-demand reads, which must not queue behind it (docs/benchmarks-fuse.md).
    pub prefetch_concurrency: usize,
    /// Most blocks per coalesced registry request when prefetching at the tree's root.
    pub prefetch_run_blocks: usize,
    /// Blocks fetched ahead of each on-demand read (0: none).
    pub readahead_blocks: usize,
    /// Sibling exchange: the two children of a parent each fetch half of the blocks from it
    /// and the other half from each other, so the parent's uplink carries every block once
    /// (docs/lazy.md).
    pub sibling_exchange: bool,
    /// Stripe trees: even blocks come down the function tree, odd blocks down the
    /// coordinator's second stripe tree, in which the VMs that forward in the first are
    /// leaves, so no VM uploads more than one working set (docs/lazy.md, "Stripe trees").
    /// Replaces the sibling exchange when on.
    pub stripe_trees: bool,
    /// Fetches in flight per layer while following the parent's start order: a child asks
    /// for each block as soon as its parent wants it, instead of when its own container
    /// misses it (docs/lazy.md, "Start order"). 0: do not follow.
    pub follow_concurrency: usize,
    /// Memory for decompressed blocks (LRU), in bytes: whole-image reads revisit blocks
    /// in directory order, which is not the layer's order.
    pub memory_cache_bytes: u64,
    /// Unmount the lazy layers on SIGTERM/SIGINT (the behaviour before restarts kept them):
    /// containers still using them then fail. Default false: the layers stay mounted, their
    /// FUSE connections held by the fd holder process, and the next snapshotter serves them
    /// again (docs/lazy.md, "Restarts").
    pub unmount_on_exit: bool,
}

/// `[coordinator]`: where this node learns its upstream in each function tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Coordinator gRPC endpoint (e.g. `http://10.0.0.1:9300`); unset: no function tree,
    /// every node fetches blocks from the registry.
    pub endpoint: Option<String>,
    /// Tenant this node belongs to; trees are per tenant and function.
    pub tenant: String,
    /// Bearer token presented to the coordinator.
    pub token: Option<String>,
    /// File holding the token (read at startup), instead of `token`.
    pub token_file: Option<PathBuf>,
    /// This node's id in the trees; default: the hostname.
    pub node_id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/faasnet-snapshotter"),
            socket: PathBuf::from("/run/faasnet/snapshotter.sock"),
            log_level: "info".into(),
            metrics_address: "127.0.0.1:9101".into(),
            lazy: LazyConfig::default(),
            coordinator: CoordinatorConfig::default(),
        }
    }
}

impl Default for LazyConfig {
    fn default() -> Self {
        LazyConfig {
            enabled: true,
            cache_dir: None,
            cache_quota_bytes: 10 << 30,
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 9102)),
            peer_advertise: None,
            insecure_registries: Vec::new(),
            fetch_timeout_ms: 10_000,
            prefetch: true,
            prefetch_concurrency: 1,
            prefetch_run_blocks: 2,
            readahead_blocks: 8,
            sibling_exchange: true,
            stripe_trees: true,
            follow_concurrency: 4,
            memory_cache_bytes: 256 << 20,
            unmount_on_exit: false,
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            endpoint: None,
            tenant: "default".into(),
            token: None,
            token_file: None,
            node_id: None,
        }
    }
}

impl CoordinatorConfig {
    /// The tenant token: `token`, else the contents of `token_file`, else empty.
    pub fn resolved_token(&self) -> Result<String, ConfigError> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        match &self.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                }),
            None => Ok(String::new()),
        }
    }

    /// This node's id: `node_id`, else the hostname.
    pub fn resolved_node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".to_string())
        })
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if !self.root.is_absolute() {
            return invalid("root", "must be an absolute path");
        }
        if !self.socket.is_absolute() {
            return invalid("socket", "must be an absolute path");
        }
        self.metrics_addr()?;
        if let Some(dir) = &self.lazy.cache_dir {
            if !dir.is_absolute() {
                return invalid("lazy.cache_dir", "must be an absolute path");
            }
        }
        if self.lazy.cache_quota_bytes == 0 {
            return invalid("lazy.cache_quota_bytes", "must be greater than 0");
        }
        if self.lazy.prefetch_concurrency == 0 {
            return invalid("lazy.prefetch_concurrency", "must be at least 1");
        }
        if self.lazy.prefetch_run_blocks == 0 {
            return invalid("lazy.prefetch_run_blocks", "must be at least 1");
        }
        if self.lazy.fetch_timeout_ms == 0 {
            return invalid("lazy.fetch_timeout_ms", "must be greater than 0");
        }
        if let Some(ep) = &self.coordinator.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return invalid(
                    "coordinator.endpoint",
                    "must be a URL starting with http:// or https://",
                );
            }
        }
        if self.coordinator.token.is_some() && self.coordinator.token_file.is_some() {
            return invalid(
                "coordinator.token_file",
                "set either token or token_file, not both",
            );
        }
        if self.coordinator.tenant.is_empty() {
            return invalid("coordinator.tenant", "must not be empty");
        }
        Ok(())
    }

    /// The metrics endpoint address; `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_address.is_empty() {
            return Ok(None);
        }
        self.metrics_address
            .parse()
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                field: "metrics_address",
                reason: format!("{:?} is not an ip:port address: {e}", self.metrics_address),
            })
    }

    /// The block cache directory (`lazy.cache_dir`, default `<root>/cache`).
    pub fn cache_dir(&self) -> PathBuf {
        self.lazy
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.root.join("cache"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshotter.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = Config::default();
        assert_eq!(
            c.metrics_addr().unwrap(),
            Some("127.0.0.1:9101".parse().unwrap())
        );
        assert_eq!(
            c.cache_dir(),
            PathBuf::from("/var/lib/faasnet-snapshotter/cache")
        );
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
            root = "/data/snap"
            socket = "/run/x.sock"
            log_level = "debug"
            metrics_address = ""
            [lazy]
            cache_dir = "/data/cache"
            cache_quota_bytes = 1073741824
            peer_listen = "0.0.0.0:7000"
            insecure_registries = ["localhost:5000"]
            [coordinator]
            endpoint = "http://127.0.0.1:9300"
            tenant = "t1"
            token = "secret"
            node_id = "vm-1"
            "#,
        )
        .unwrap();
        assert_eq!(c.root, PathBuf::from("/data/snap"));
        assert_eq!(c.metrics_addr().unwrap(), None);
        assert_eq!(c.cache_dir(), PathBuf::from("/data/cache"));
        assert_eq!(c.lazy.peer_listen.port(), 7000);
        assert_eq!(c.lazy.insecure_registries, vec!["localhost:5000"]);
        assert!(c.lazy.enabled);
        assert_eq!(c.coordinator.node_id.as_deref(), Some("vm-1"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("rooot = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("rooot"), "{e}");
        let e = parse("[lazy]\ncache_quota_bytes = \"big\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache_quota_bytes"), "{e}");
        let e = parse("[lazy]\npeer_listen = \"nowhere\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("peer_listen"), "{e}");
        let e = parse("metrics_address = \"localhost\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics_address"), "{e}");
        let e = parse("root = \"relative\"").unwrap_err().to_string();
        assert!(e.contains("`root`"), "{e}");
        let e = parse("[coordinator]\nendpoint = \"10.0.0.1:1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("coordinator.endpoint"), "{e}");
    }
}
