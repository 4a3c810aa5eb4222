//! `coordinator`: runs the FaaSNet function-tree coordinator, or administers a running one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use faasnet_coordinator::client::AdminClient;
use faasnet_coordinator::config::Config;
use faasnet_coordinator::function_tree::FunctionTree;

#[derive(Parser)]
#[command(
    version,
    about = "FaaSNet coordinator: one balanced binary tree of VMs per function"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the trees of a running coordinator.
    Trees {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this tenant's trees.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Draw one tree.
    Draw {
        #[command(flatten)]
        admin: AdminArgs,
        tenant: String,
        /// The function's manifest digest.
        function: String,
    },
    /// Remove a node from a tree, as if it had left.
    RemoveNode {
        #[command(flatten)]
        admin: AdminArgs,
        tenant: String,
        function: String,
        node_id: String,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// Take the endpoint and admin token from this config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Coordinator endpoint (http://host:port or unix:/path); default: the config's listen.
    #[arg(long, env = "COORDINATOR_ENDPOINT")]
    endpoint: Option<String>,
    /// Admin token; default: the config's admin_token.
    #[arg(long, env = "COORDINATOR_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

impl AdminArgs {
    async fn connect(&self) -> Result<AdminClient> {
        let cfg = match &self.config {
            Some(p) => Some(Config::load(p)?),
            None => None,
        };
        let endpoint = match (&self.endpoint, &cfg) {
            (Some(e), _) => e.clone(),
            (None, Some(c)) => format!("http://{}", c.listen),
            (None, None) => bail!("give --endpoint or --config"),
        };
        let token = match (&self.admin_token, &cfg) {
            (Some(t), _) => t.clone(),
            (
                None,
                Some(Config {
                    admin_token: Some(t),
                    ..
                }),
            ) => t.clone(),
            _ => bail!("give --admin-token or a --config with admin_token"),
        };
        AdminClient::connect(&endpoint, &token)
            .await
            .with_context(|| format!("connecting to {endpoint}"))
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the cause chain, no backtrace: these are user-facing errors.
            // Many errors already embed their cause's text; print each piece once.
            let mut line = String::new();
            let mut previous = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !previous.contains(&text) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&text);
                }
                previous = text;
            }
            eprintln!("error: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config } => {
            init_tracing();
            let cfg = Config::load(&config)?;
            faasnet_coordinator::server::serve(cfg, shutdown_signal()).await?;
        }
        Command::Trees { admin, tenant } => {
            let trees = admin.connect().await?.list_trees(tenant.as_deref()).await?;
            println!(
                "{:<16} {:<73} {:>7} {:>6} {:>8}",
                "TENANT", "FUNCTION", "NODES", "HEIGHT", "EPOCH"
            );
            for t in trees {
                println!(
                    "{:<16} {:<73} {:>7} {:>6} {:>8}",
                    t.tenant, t.function, t.nodes, t.height, t.epoch
                );
            }
        }
        Command::Draw {
            admin,
            tenant,
            function,
        } => {
            let view = admin.connect().await?.get_tree(&tenant, &function).await?;
            let s = view.summary.unwrap_or_default();
            println!(
                "{}/{}: {} nodes, height {}, epoch {}",
                s.tenant, s.function, s.nodes, s.height, s.epoch
            );
            // Rebuild the layout locally just to draw it.
            let tree = FunctionTree::from_ordered(
                view.nodes
                    .into_iter()
                    .map(|n| (n.node_id, (n.peer_addr, n.lease_remaining_ms))),
            )?;
            print!(
                "{}",
                tree.draw(|id, (addr, lease)| format!(
                    "{id} ({addr}, lease {:.1}s)",
                    *lease as f64 / 1000.0
                ))
            );
        }
        Command::RemoveNode {
            admin,
            tenant,
            function,
            node_id,
        } => {
            let epoch = admin
                .connect()
                .await?
                .remove_node(&tenant, &function, &node_id)
                .await?;
            println!("removed {node_id} from {tenant}/{function}; tree epoch now {epoch}");
        }
    }
    Ok(())
}
