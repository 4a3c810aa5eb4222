//! `snapshotter`: the FaaSNet containerd proxy snapshotter daemon.
//!
//!     snapshotter --config /etc/faasnet/snapshotter.toml [--root DIR] [--socket PATH]
//!
//! Serves containerd's snapshots API on a unix socket (containerd's
//! `[proxy_plugins.<name>] type = "snapshot"`), Prometheus metrics on HTTP, and stops
//! cleanly on SIGINT/SIGTERM.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use faasnet_snapshotter::{
    config::{Config, DEFAULT_CONFIG_PATH},
    lazy::{fuse_handover, metrics::LazyMetrics, LayerManager, LazyRemoteLayers},
    metrics::{Endpoint, Metrics},
    service::{serve, Service},
    snapshots::Overlay,
    NoRemoteLayers, RemoteLayers,
};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// FaaSNet containerd snapshotter: overlayfs snapshots, with lazily mounted remote layers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file. A missing file at the default path means all defaults.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Root directory (overrides `root`).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket for containerd (overrides `socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Log filter (overrides `log_level`; RUST_LOG overrides both).
    #[arg(long)]
    log_level: Option<String>,
    /// Metrics address, empty to disable (overrides `metrics_address`).
    #[arg(long)]
    metrics_address: Option<String>,
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config =
        if args.config == std::path::Path::new(DEFAULT_CONFIG_PATH) && !args.config.exists() {
            Config::default()
        } else {
            Config::load(&args.config)?
        };
    if let Some(root) = &args.root {
        config.root = root.clone();
    }
    if let Some(socket) = &args.socket {
        config.socket = socket.clone();
    }
    if let Some(level) = &args.log_level {
        config.log_level = level.clone();
    }
    if let Some(addr) = &args.metrics_address {
        config.metrics_address = addr.clone();
    }
    config.validate()?;
    Ok(config)
}

/// The lazy path: converted layers mounted through FUSE and fed from cache, upstream peer
/// or registry (`[lazy]`, `[coordinator]`). Disabled: every layer is unpacked.
/// The lazy path's layer manager, when the lazy path is on.
type LazyManager = Option<Arc<LayerManager>>;

/// Also returns the lazy path's layer manager, for restarts (docs/lazy.md, "Restarts").
fn remote_layers(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<dyn RemoteLayers>, LazyManager)> {
    if !config.lazy.enabled {
        tracing::info!("lazy path disabled (lazy.enabled = false): all layers are unpacked");
        return Ok((Arc::new(NoRemoteLayers), None));
    }
    let lazy_metrics = Arc::new(LazyMetrics::default());
    metrics.with_registry(|r| lazy_metrics.register(r.sub_registry_with_prefix("lazy")));
    let remote = LazyRemoteLayers::from_config(config, lazy_metrics)
        .context("starting the lazy path (config tables [lazy] and [coordinator])")?;
    let manager = remote.manager().clone();
    Ok((Arc::new(remote), Some(manager)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The error and its causes on one line, each said once (our error types print their
/// source as part of their message).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(msg.trim()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

fn main() -> std::process::ExitCode {
    // The FUSE fd holder (lazy::fuse_handover), started by the daemon itself.
    let mut argv = std::env::args_os().skip(1);
    if argv.next().as_deref() == Some(std::ffi::OsStr::new(fuse_handover::HOLDER_ARG)) {
        return holder_main(argv.next().map(PathBuf::from));
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snapshotter: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        // Exit without dropping the runtime: fuser answers EIO for the FUSE requests of the
        // tasks it would drop; unanswered, the next process gets them resent instead.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("snapshotter: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn holder_main(socket: Option<PathBuf>) -> std::process::ExitCode {
    let Some(socket) = socket else {
        eprintln!("usage: snapshotter {} SOCKET", fuse_handover::HOLDER_ARG);
        return std::process::ExitCode::FAILURE;
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // Signals meant for the snapshotter (its process group, a terminal) must not end us.
    // SAFETY: setting signal dispositions to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    match fuse_handover::run_holder(&socket) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshotter fd holder: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::new(env),
        _ => EnvFilter::try_new(&config.log_level).with_context(|| {
            format!(
                "config field `log_level`: bad filter {:?}",
                config.log_level
            )
        })?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let metrics = Arc::new(Metrics::new());
    let core = {
        let root = config.root.clone();
        tokio::task::spawn_blocking(move || Overlay::open(&root))
            .await?
            .with_context(|| format!("open snapshotter root {}", config.root.display()))?
    };
    let (remote, manager) = remote_layers(&config, &metrics)?;
    // The previous process's FUSE connections first: containers' reads go on.
    if let Some(m) = &manager {
        let resumed = m.resume_handed_over().await;
        if resumed > 0 {
            tracing::info!(
                resumed,
                "FUSE connections of the previous process served again"
            );
        }
    }
    let service = Service::new(Arc::new(core), remote, metrics.clone());
    let restored = service.restore_remote_snapshots().await?;
    if let Some(m) = &manager {
        m.finish_resume().await;
    }
    tracing::info!(root = %config.root.display(), restored, "snapshotter ready");

    // One signal stops both servers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
    });

    let metrics_task = match config.metrics_addr()? {
        Some(addr) => {
            let endpoint = Endpoint::bind(addr, metrics.clone())
                .with_context(|| format!("config field `metrics_address`: bind {addr}"))?;
            tracing::info!(address = %endpoint.local_addr(), "serving metrics on /metrics");
            Some(tokio::spawn(endpoint.serve(stopped(stop_rx.clone()))))
        }
        None => None,
    };

    let core = service.core().clone();
    serve(service, &config.socket, stopped(stop_rx)).await?;
    if let Some(task) = metrics_task {
        if let Ok(Err(e)) = task.await {
            tracing::warn!(error = %e, "metrics endpoint");
        }
    }
    if let Some(m) = &manager {
        if config.lazy.unmount_on_exit {
            m.unmount_all().await;
        } else {
            // The next process serves them again (docs/lazy.md, "Restarts").
            m.leave_mounted().await;
        }
    }
    core.metadata().flush()?;
    tracing::info!("stopped");
    Ok(())
}
