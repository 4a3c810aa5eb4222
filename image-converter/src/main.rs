//! `image-converter`: converts OCI images into the FaaSNet block format, inspects and
//! verifies converted layers, and decompresses them back to tar (as a containerd stream
//! processor). Results go to stdout, human messages to stderr.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use faasnet_image_converter::cache::{self, LayerCache};
use faasnet_image_converter::convert::short_digest;
use faasnet_image_converter::inspect::{self, ShowOptions};
use faasnet_image_converter::progress::Progress;
use faasnet_image_converter::{
    convert_image, parse_size, ClientConfig, ConvertConfig, ImageLocation, RegistryClient,
    StartProfile, Store,
};

/// Converts OCI images into the FaaSNet lz4 block format and reads converted layers back.
#[derive(Parser)]
#[command(name = "image-converter", version, about)]
struct Cli {
    /// No progress bars and no messages on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image (or every platform image of an index) and push it to DST.
    ///
    /// SRC and DST are registry references (host[:port]/repo[:tag][@digest]) or OCI layout
    /// directories (oci:DIR[:tag]). Prints the new manifest (or index) digest on stdout.
    Convert {
        /// Source image.
        src: String,
        /// Destination image; its tag is written last, once everything else is pushed.
        dst: String,
        /// Block size: a power of two from 64KiB to 4MiB.
        #[arg(long, default_value = "512KiB", value_parser = parse_block_size)]
        block_size: u32,
        /// Compression threads per layer (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Layers converted at the same time (default: cores + 1, from 2 to 8).
        #[arg(long)]
        jobs: Option<usize>,
        /// Convert every layer again, ignoring earlier conversions (cache and destination).
        #[arg(long)]
        force: bool,
        /// Directory of the conversion cache (default: $XDG_CACHE_HOME/faasnet or
        /// ~/.cache/faasnet).
        #[arg(long, env = "FAASNET_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Put the files a start reads first in each layer, in the order it read them: FILE
        /// lists image paths (usr/bin/python3), one per line, in first-read order; blank
        /// lines and lines starting with # are ignored. Reordered layers get new diffIDs
        /// and the image a new config (docs/image-converter.md, "Start profile").
        #[arg(long, value_name = "FILE")]
        start_profile: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Print the table of contents of a converted image (every layer) or blob file.
    Inspect {
        /// Image reference, oci:DIR[:tag], or path of a local blob file.
        target: String,
        /// List every entry: mode, uid/gid, size, path, link target.
        #[arg(long)]
        entries: bool,
        /// List every block: offset, stored and raw size, digest.
        #[arg(long)]
        blocks: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Recompute every block digest and the diffID; exits non-zero naming the first bad
    /// block.
    Verify {
        /// Image reference, oci:DIR[:tag], or path of a local blob file.
        target: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Read a converted layer on stdin, write the original tar on stdout (containerd
    /// stream processor).
    Decompress,
}

#[derive(Args, Clone)]
struct RegistryArgs {
    /// Registry host (host or host:port) to reach over plain HTTP; repeat or separate with
    /// commas. localhost and 127.0.0.1 always use plain HTTP.
    #[arg(long = "plain-http", value_name = "HOST", value_delimiter = ',')]
    plain_http: Vec<String>,
    /// Docker config file with registry credentials (default: $DOCKER_CONFIG/config.json or
    /// ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    fn client(&self) -> anyhow::Result<Arc<RegistryClient>> {
        Ok(Arc::new(RegistryClient::new(ClientConfig {
            plain_http: self.plain_http.clone(),
            docker_config: self.docker_config.clone(),
        })?))
    }
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    let n = u32::try_from(n).map_err(|_| format!("{s} is too large"))?;
    faasnet_format::validate_block_size(n).map_err(|e| e.to_string())?;
    Ok(n)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("image-converter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Decompress = cli.command {
        return decompress();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(run_async(cli));
    // A failed conversion may leave blocking work that is winding down; don't wait for it.
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn run_async(cli: Cli) -> anyhow::Result<ExitCode> {
    let progress = Progress::new(cli.quiet);
    match cli.command {
        Command::Convert {
            src,
            dst,
            block_size,
            threads,
            jobs,
            force,
            cache_dir,
            start_profile,
            registry,
        } => {
            // Read the profile first: a bad one fails before anything is fetched or pushed.
            let profile = match &start_profile {
                Some(path) => Some(Arc::new(
                    StartProfile::load(path).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            };
            let client = registry.client()?;
            let src_loc: ImageLocation = src.parse()?;
            let dst_loc: ImageLocation = dst.parse()?;
            if let ImageLocation::Registry(r) = &dst_loc {
                if r.digest.is_some() {
                    bail!("destination {dst} names a digest; give a tag (host/repo:tag)");
                }
            }
            let src_store = Store::open(&src_loc, &client)?;
            let dst_store = Store::open_for_write(&dst_loc, &client)?;
            let mut cfg = ConvertConfig::new();
            cfg.block_size = block_size;
            if let Some(t) = threads {
                cfg.threads = t.max(1);
            }
            if let Some(j) = jobs {
                cfg.layer_jobs = j.max(1);
            }
            cfg.force = force;
            let dir = cache_dir.or_else(cache::default_dir);
            cfg.cache = Arc::new(LayerCache::load(dir.as_deref()));
            cfg.progress = progress.clone();
            progress.message(format!("converting {src_loc} -> {dst_loc}"));
            if let Some(p) = &profile {
                progress.message(format!(
                    "start profile {}: {} paths{}",
                    p.source(),
                    p.paths().len(),
                    if p.is_empty() {
                        " (no layer will be reordered)"
                    } else {
                        ""
                    }
                ));
            }
            cfg.start_profile = profile;
            let out = convert_image(&src_store, &dst_store, &cfg)
                .await
                .with_context(|| format!("converting {src_loc}"))?;
            let reordered = if cfg.start_profile.is_some() {
                format!(", {} reordered by the start profile", out.reordered)
            } else {
                String::new()
            };
            progress.message(format!(
                "pushed {dst_loc} ({} layers converted, {} reused, {} kept{reordered}) as {}",
                out.converted, out.reused, out.kept, out.digest
            ));
            println!("{}", out.digest);
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            target,
            entries,
            blocks,
            json,
            registry,
        } => {
            let show = ShowOptions { entries, blocks };
            let layers = if Path::new(&target).is_file() {
                vec![inspect::inspect_file(Path::new(&target))
                    .with_context(|| format!("inspecting {target}"))?]
            } else {
                let store = open_target(&target, &registry)?;
                inspect::inspect_image(&store)
                    .await
                    .with_context(|| format!("inspecting {target}"))?
            };
            let mut out = io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(
                    &mut out,
                    &inspect::render_json(&target, &layers, show),
                )?;
                writeln!(out)?;
            } else {
                out.write_all(inspect::render_text(&layers, show).as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            target,
            json,
            registry,
        } => verify(&target, json, &registry).await,
        Command::Decompress => unreachable!("handled before the runtime starts"),
    }
}

/// Opens an image target (not a file) for reading.
fn open_target(target: &str, registry: &RegistryArgs) -> anyhow::Result<Store> {
    let loc: ImageLocation = target.parse()?;
    if let ImageLocation::Registry(r) = &loc {
        if r.registry == faasnet_image_converter::reference::DOCKER_HUB_HOST
            && !target.contains('/')
            && !target.contains(':')
        {
            bail!("{target:?} is neither a file nor an image reference with a registry host");
        }
    }
    Ok(Store::open(&loc, &registry.client()?)?)
}

async fn verify(target: &str, json: bool, registry: &RegistryArgs) -> anyhow::Result<ExitCode> {
    let mut results = Vec::new();
    let mut failed = false;
    if Path::new(target).is_file() {
        match inspect::verify_file(Path::new(target)) {
            Ok(r) => results.push(serde_json::json!({"path": target, "ok": true, "report": r})),
            Err(e) => {
                failed = true;
                results
                    .push(serde_json::json!({"path": target, "ok": false, "error": e.to_string()}));
            }
        }
    } else {
        let store = open_target(target, registry)?;
        let diff_ids = inspect::config_diff_ids(&store)
            .await
            .with_context(|| format!("reading {target}"))?;
        let layers = inspect::image_layers(&store)
            .await
            .with_context(|| format!("reading {target}"))?;
        for (_, desc) in layers {
            if desc.media_type != faasnet_format::LAYER_MEDIA_TYPE {
                results.push(serde_json::json!({"digest": desc.digest, "ok": true,
                    "skipped": format!("not converted ({})", desc.media_type)}));
                continue;
            }
            let config_diff = diff_ids.get(&desc.digest).map(String::as_str);
            match inspect::verify_remote(&store, &desc, config_diff).await {
                Ok(r) => results
                    .push(serde_json::json!({"digest": desc.digest, "ok": true, "report": r})),
                Err(e) => {
                    failed = true;
                    results.push(serde_json::json!({"digest": desc.digest, "ok": false, "error": e.to_string()}));
                }
            }
        }
    }
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"source": target, "ok": !failed, "layers": results}),
        )?;
        writeln!(out)?;
    } else {
        let (mut blocks, mut checked) = (0u64, 0usize);
        for r in &results {
            let name = r["digest"].as_str().or(r["path"].as_str()).unwrap_or("?");
            let name = short_digest(name);
            if let Some(s) = r["skipped"].as_str() {
                writeln!(out, "{name}: {s}, skipped")?;
            } else if let Some(e) = r["error"].as_str() {
                writeln!(out, "{name}: FAILED: {e}")?;
            } else {
                let rep = &r["report"];
                checked += 1;
                blocks += rep["blocks"].as_u64().unwrap_or(0);
                writeln!(
                    out,
                    "{name}: OK ({} blocks, {} entries, {} tar bytes, diffID {})",
                    rep["blocks"],
                    rep["entries"],
                    rep["tar_size"],
                    rep["diff_id"].as_str().unwrap_or("?")
                )?;
            }
        }
        if failed {
            writeln!(out, "FAILED")?;
        } else {
            writeln!(out, "OK: {checked} layers, {blocks} blocks verified")?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Converted layer on stdin → original tar on stdout. containerd runs this as a stream
/// processor and passes the layer's media type in STREAM_PROCESSOR_MEDIATYPE; any error goes
/// to stderr (containerd includes it in its own error) with a non-zero exit.
fn decompress() -> anyhow::Result<ExitCode> {
    if let Ok(mt) = std::env::var("STREAM_PROCESSOR_MEDIATYPE") {
        if mt != faasnet_format::LAYER_MEDIA_TYPE {
            tracing::warn!(
                "STREAM_PROCESSOR_MEDIATYPE is {mt:?}, expected {:?}; decoding anyway",
                faasnet_format::LAYER_MEDIA_TYPE
            );
        }
    }
    let stdin = io::stdin().lock();
    let stdout = BufWriter::with_capacity(1 << 20, io::stdout().lock());
    let toc = faasnet_format::decode_stream(stdin, stdout).context("decompressing the layer")?;
    tracing::info!(
        "decompressed {} blocks, {} tar bytes, diffID {}",
        toc.blocks.len(),
        toc.tar_size,
        toc.diff_id
    );
    Ok(ExitCode::SUCCESS)
}
