//! Runs the coordinator: store, forest, lease sweeper, gRPC listeners and `/metrics`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::forest::{Forest, ForestError};
use crate::health::{tcp_probe, Health};
use crate::lease::spawn_sweeper;
use crate::metrics::{serve_metrics, Metrics};
use crate::pb::admin_server::AdminServer;
use crate::pb::coordinator_server::CoordinatorServer;
use crate::service::{Auth, CoordinatorService};
use crate::store::{Store, StoreError};

/// How long a shutdown waits for in-flight calls before closing the remaining streams.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening or loading the database failed.
    #[error("opening the store in {path}: {source}")]
    Store {
        /// Database directory.
        path: PathBuf,
        /// Cause.
        source: StoreError,
    },
    /// Loading the trees failed.
    #[error("loading trees: {0}")]
    Load(#[from] ForestError),
    /// Binding a listener or creating a directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// A started server: its bound address and a handle to wait for it.
pub struct Running {
    /// The bound gRPC TCP address (useful when the config asked for port 0).
    pub addr: SocketAddr,
    /// Completes when the server has stopped.
    pub done: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// Opens the store, binds the listeners and serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    start(config, shutdown)
        .await?
        .done
        .await
        .expect("server task panicked")
}

/// Like [`serve`], but returns once the listeners are bound.
pub async fn start(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(io(format!("creating {}", config.data_dir.display())))?;
    let store = Store::open(&config.data_dir, config.sled_cache_bytes).map_err(|source| {
        ServeError::Store {
            path: config.data_dir.clone(),
            source,
        }
    })?;
    let metrics = Arc::new(Metrics::new());
    let forest = Arc::new(Forest::open(
        Arc::new(store),
        metrics.clone(),
        config.lease_ttl(),
        Instant::now(),
    )?);
    let trees = forest.list_trees(None);
    tracing::info!(
        trees = trees.len(),
        nodes = trees.iter().map(|t| t.nodes).sum::<usize>(),
        data_dir = %config.data_dir.display(),
        "state loaded"
    );

    let health = Arc::new(Health::new(
        forest.clone(),
        metrics.clone(),
        config.probe_timeout().map(tcp_probe),
        config.probe_interval(),
    ));
    let service =
        CoordinatorService::new(forest.clone(), Auth::from_config(&config), metrics.clone())
            .with_health(health);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(io(format!("binding {}", config.listen)))?;
    let addr = listener.local_addr().map_err(io("local_addr"))?;
    let router = || {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Detect dead watchers (VMs that vanished) without waiting for TCP timeouts.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(CoordinatorServer::new(service.clone()))
            .add_service(AdminServer::new(service.clone()))
    };

    let mut tasks = tokio::task::JoinSet::new();
    {
        // With our own listener tonic does not apply `tcp_nodelay`; without it Nagle and
        // delayed ACKs stall small answers by ~40 ms.
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            if let Ok(c) = &conn {
                let _ = c.set_nodelay(true);
            }
            conn
        });
        let tcp = router().serve_with_incoming_shutdown(incoming, stopped());
        tasks.spawn(async move { tcp.await.map_err(ServeError::from) });
    }
    if let Some(path) = &config.unix_socket {
        // A stale socket from a killed process would make bind fail.
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let uds = tokio::net::UnixListener::bind(path)
            .map_err(io(format!("binding unix socket {}", path.display())))?;
        let unix = router().serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(uds),
            stopped(),
        );
        tasks.spawn(async move { unix.await.map_err(ServeError::from) });
        tracing::info!(path = %path.display(), "gRPC listening on unix socket");
    }
    if let Some(maddr) = config.metrics_listen {
        let m = serve_metrics(metrics.clone(), maddr, stopped());
        tasks.spawn(async move {
            m.await.map_err(|e| ServeError::Io {
                what: format!("metrics server on {maddr}"),
                source: std::io::Error::other(e),
            })
        });
        tracing::info!(%maddr, "metrics on /metrics");
    }
    let sweeper = spawn_sweeper(forest, config.sweep_interval());
    tracing::info!(%addr, "gRPC listening");

    let done = tokio::spawn(async move {
        let mut result = Ok(());
        tokio::select! {
            _ = shutdown => {}
            Some(r) = tasks.join_next() => {
                result = r.expect("listener task panicked");
            }
        }
        let _ = stop_tx.send(true);
        sweeper.abort();
        // Graceful shutdown waits for open streams, and watch streams never end by
        // themselves: give unary calls a moment to finish, then cut the rest. Clients
        // reconnect to the next coordinator process.
        let drain = async {
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Err(e)) => tracing::warn!(error = %e, "listener stopped with an error"),
                    Ok(Ok(())) => {}
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::info!("closing remaining streams");
            tasks.shutdown().await;
        }
        result
    });
    Ok(Running { addr, done })
}
