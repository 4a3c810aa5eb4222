//! A real registry: Debian's `docker-registry` (distribution v2) on plain HTTP, with its
//! access log captured so tests can count what it served.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use crate::process::Daemon;

/// A running registry with its own storage.
pub struct Registry {
    /// `host:port` clients use.
    pub addr: String,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
}

impl Registry {
    /// Starts a registry listening on `listen_ip` and a free port.
    pub fn start(listen_ip: &str) -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-registry")
            .tempdir()?;
        let port = crate::free_port();
        let addr = format!("{listen_ip}:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let mut daemon = Daemon::spawn("docker-registry", cmd, &dir.path().join("registry.log"))
            .context("is Debian's docker-registry installed? (hack/install-deps.sh)")?;
        crate::wait_until("registry to answer", Duration::from_secs(20), || {
            if daemon.check_alive().is_err() {
                return Some(());
            }
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        })?;
        daemon.check_alive()?;
        Ok(Registry {
            addr,
            daemon,
            _dir: dir,
        })
    }

    /// The log file path.
    pub fn log_path(&self) -> PathBuf {
        self.daemon.log_path().to_path_buf()
    }

    /// Parses the access log (Apache combined format) written so far.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        self.daemon
            .log()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Total bytes the registry sent for GETs of blob `digest`.
    pub fn blob_bytes_served(&self, digest: &str) -> u64 {
        let suffix = format!("/blobs/{digest}");
        self.access_log()
            .iter()
            .filter(|e| e.method == "GET" && e.path.ends_with(&suffix))
            .map(|e| e.bytes)
            .sum()
    }
}

/// `1.2.3.4 - - [date] "GET /v2/x HTTP/1.1" 206 1234 "referer" "agent"`
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let start = line.find('"')?;
    let rest = &line[start + 1..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split_whitespace();
    let method = req.next()?.to_string();
    let path = req.next()?.split('?').next()?.to_string();
    let mut after = rest[end + 1..].split_whitespace();
    let status = after.next()?.parse().ok()?;
    let bytes = after.next()?.parse().unwrap_or(0);
    Some(AccessLogEntry {
        method,
        path,
        status,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_combined_log_line() {
        let l = r#"10.0.0.2 - - [23/Nov/2026:20:00:00 +0000] "GET /v2/a/b/blobs/sha256:ab?x=1 HTTP/1.1" 206 524288 "" "reqwest""#;
        let e = super::parse_access_line(l).unwrap();
        assert_eq!((e.method.as_str(), e.status, e.bytes), ("GET", 206, 524288));
        assert_eq!(e.path, "/v2/a/b/blobs/sha256:ab");
        assert!(super::parse_access_line("time=x level=info msg=y").is_none());
    }
}
