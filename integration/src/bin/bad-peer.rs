//! `bad-peer`: a deliberately misbehaving VM for the fault tests. It joins a function tree
//! like a snapshotter (heartbeats and watch through the coordinator's client library) and
//! serves the layers' blocks over the real peer protocol (the snapshotter's
//! `lazy::peer_protocol` encoders), but wrong:
//!
//! - `--mode corrupt`: every block with the right length and one byte flipped (the child
//!   sees a digest mismatch);
//! - `--mode truncate`: the header announces the whole block, half of it follows, then the
//!   connection closes;
//! - `--mode short`: a well-formed answer with only the first half of the block.
//!
//! Hellos (sibling exchange) are answered "no sibling", start-order subscriptions with a
//! batch naming a block no layer has (the child must refuse it). It downloads the layers' blobs from
//! the registry at start (to have real bytes to damage) and prints `served <n>` to stdout
//! for every block request, `ready` once it listens and has joined.
//!
//! ```text
//! bad-peer --listen IP:PORT --coordinator http://HOST:PORT --tenant T --token S
//!          --node-id ID --function sha256:... --registry HOST:PORT --repo faasnet/tricky
//!          --layers sha256:a,sha256:b --mode corrupt|truncate|short
//! ```

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use faasnet_coordinator::client::{CoordinatorClient, MembershipOptions, TreeMembership};
use faasnet_format::{parse_tail, TailParse, Toc};
use faasnet_snapshotter::lazy::peer_protocol::{self, HelloAnswer, Op, Status, REQUEST_HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Corrupt,
    Truncate,
    Short,
}

struct Layer {
    blob: Vec<u8>,
    toc: Toc,
}

fn arg(args: &HashMap<String, String>, name: &str) -> anyhow::Result<String> {
    args.get(name)
        .cloned()
        .with_context(|| format!("--{name} is required"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut args = HashMap::new();
    for pair in raw.chunks(2) {
        let [k, v] = pair else {
            bail!("arguments come in --name value pairs");
        };
        let k = k.strip_prefix("--").context("expected --name")?;
        args.insert(k.to_string(), v.clone());
    }
    let mode = match arg(&args, "mode")?.as_str() {
        "corrupt" => Mode::Corrupt,
        "truncate" => Mode::Truncate,
        "short" => Mode::Short,
        m => bail!("unknown mode {m}"),
    };
    let registry = arg(&args, "registry")?;
    let repo = arg(&args, "repo")?;
    let mut layers = HashMap::new();
    for digest in arg(&args, "layers")?.split(',') {
        let url = format!("http://{registry}/v2/{repo}/blobs/{digest}");
        let blob = faasnet_integration::images::http_get(&url)?;
        let toc = match parse_tail(&blob, blob.len() as u64)? {
            TailParse::Complete(toc, _) => *toc,
            TailParse::NeedToc(_) => bail!("{digest}: the whole blob should hold the TOC"),
        };
        layers.insert(digest.to_string(), Layer { blob, toc });
    }
    let layers = Arc::new(layers);

    let listen = arg(&args, "listen")?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let client = CoordinatorClient::connect_lazy(
        &arg(&args, "coordinator")?,
        arg(&args, "tenant")?,
        &arg(&args, "token")?,
    )?;
    let membership = TreeMembership::join(
        client,
        &arg(&args, "function")?,
        &arg(&args, "node-id")?,
        &listen,
        MembershipOptions::default(),
    )
    .await?;
    println!("ready: mode {mode:?}, upstream {}", membership.upstream());
    let _ = std::io::stdout().flush();

    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (mut conn, _) = listener.accept().await?;
        let (layers, served) = (layers.clone(), served.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let n = conn.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= REQUEST_HEADER_LEN {
                    let (req, used) = match peer_protocol::decode_request(&buf) {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(_) => return,
                    };
                    buf.drain(..used);
                    if req.op == Op::Hello {
                        let answer = HelloAnswer { split: None }.encode();
                        let msg = peer_protocol::encode_response(Status::Ok, &answer);
                        if conn.write_all(&msg).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if req.op == Op::StartOrder {
                        // A start order naming a block no layer has: the child must refuse it.
                        let msg =
                            peer_protocol::encode_response(Status::Ok, &u32::MAX.to_le_bytes());
                        if conn.write_all(&msg).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let Some(entry) = layers
                        .get(&req.digest)
                        .and_then(|l| Some((l, l.toc.blocks.get(req.index as usize)?)))
                    else {
                        let msg = peer_protocol::encode_response(Status::UnknownLayer, b"unknown");
                        if conn.write_all(&msg).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    let (layer, e) = entry;
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    println!("served {n} ({} block {})", req.digest, req.index);
                    let _ = std::io::stdout().flush();
                    let mut stored =
                        layer.blob[e.offset as usize..(e.offset + e.stored_len) as usize].to_vec();
                    let half = stored.len() / 2;
                    match mode {
                        Mode::Corrupt => {
                            stored[half] ^= 0x40;
                            let msg = peer_protocol::encode_response(Status::Ok, &stored);
                            if conn.write_all(&msg).await.is_err() {
                                return;
                            }
                        }
                        Mode::Truncate => {
                            let header = peer_protocol::encode_response_header(
                                Status::Ok,
                                stored.len() as u32,
                            );
                            let _ = conn.write_all(&header).await;
                            let _ = conn.write_all(&stored[..half]).await;
                            return;
                        }
                        Mode::Short => {
                            let msg = peer_protocol::encode_response(Status::Ok, &stored[..half]);
                            if conn.write_all(&msg).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
    }
}
