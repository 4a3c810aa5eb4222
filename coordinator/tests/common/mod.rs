//! Helpers shared by the coordinator's integration tests: an in-process server on real
//! sockets, polling, a metrics scrape. Each test file uses some of them.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use faasnet_coordinator::client::{AdminClient, CoordinatorClient};
use faasnet_coordinator::config::Config;
use faasnet_coordinator::server::{start, Running};

/// An in-process coordinator (TCP, a unix socket and /metrics) on a fresh data dir, stopped
/// when dropped. Tenants: acme (`acme-secret`), globex (`globex-secret`); admin
/// `admin-secret`.
pub struct Server {
    pub running: Running,
    pub endpoint: String,
    pub unix: std::path::PathBuf,
    pub metrics: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Server {
    /// A client of tenant acme and an admin client.
    pub async fn clients(&self) -> (CoordinatorClient, AdminClient) {
        let acme = CoordinatorClient::connect(&self.endpoint, "acme", "acme-secret")
            .await
            .unwrap();
        let admin = AdminClient::connect(&self.endpoint, "admin-secret")
            .await
            .unwrap();
        (acme, admin)
    }
}

/// Starts a server; `settings` are extra top-level config lines (leases, probes...).
pub async fn server(settings: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let unix = dir.path().join("coord.sock");
    let cfg = Config::parse(&format!(
        r#"
        listen = "127.0.0.1:0"
        unix_socket = "{}"
        data_dir = "{}"
        metrics_listen = "{metrics}"
        admin_token = "admin-secret"
        {settings}
        [tenants.acme]
        token = "acme-secret"
        [tenants.globex]
        token = "globex-secret"
        "#,
        unix.display(),
        dir.path().join("db").display()
    ))
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = start(cfg, async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    Server {
        endpoint: format!("http://{}", running.addr),
        running,
        unix,
        metrics,
        _dir: dir,
        stop: Some(tx),
    }
}

/// A TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it is true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Prometheus text of the metrics endpoint at `addr` (plain HTTP GET).
pub async fn scrape_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    sock.read_to_string(&mut body).await.unwrap();
    body
}
