//! Blocks flowing down a function tree: node B's upstream is node A's peer server, A's is the
//! registry. Plus a corrupt peer, a silent peer, single-flight fetches, prefetch, and the peer
//! server's answers to unknown layers.

mod lazy_support;

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use faasnet_format::{ConvertedLayer, EntryKind};
use faasnet_snapshotter::lazy::{
    block_source::BlockSource,
    peer_protocol::{self, Status},
    peer_source::PeerSource,
    LayerRef, Source, StaticUpstream,
};
use lazy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REPO: &str = "faasnet/lazy-tree";

/// A layer of a few multi-block files.
fn layer_tar() -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut t = TarBuilder::new();
    let mut files = HashMap::new();
    for i in 0..6u32 {
        let path = format!("app/file{i}");
        let data = noise(50_000 + i as usize * 70_000, i + 7);
        t.file(&path, Meta::default(), &data);
        files.insert(path, data);
    }
    t.hardlink("app/link", "app/file0");
    files.insert("app/link".into(), files["app/file0"].clone());
    (t.finish(), files)
}

struct Setup {
    registry: Registry,
    layer: LayerRef,
    converted: ConvertedLayer,
    blob: Vec<u8>,
    files: HashMap<String, Vec<u8>>,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let registry = Registry::start();
    let (tar, files) = layer_tar();
    let (blob, converted) = convert(&tar);
    let digest = registry.push_blob(REPO, &blob).await;
    Setup {
        layer: LayerRef::new(registry.addr.clone(), REPO, digest).unwrap(),
        registry,
        converted,
        blob,
        files,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn mountpoint(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

async fn read_all_and_compare(mnt: &Path, files: &HashMap<String, Vec<u8>>) {
    let (mnt, files) = (mnt.to_path_buf(), files.clone());
    tokio::task::spawn_blocking(move || {
        for (path, data) in &files {
            let got = std::fs::read(mnt.join(path)).unwrap();
            assert!(got == *data, "{path}: bytes differ");
        }
    })
    .await
    .unwrap();
}

async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Blocks that hold file data (those a full read touches).
fn data_blocks(c: &ConvertedLayer) -> usize {
    let mut set = std::collections::BTreeSet::new();
    for e in c.toc.entries.iter().filter(|e| e.kind == EntryKind::File) {
        set.extend(c.toc.blocks_for_range(e.offset, e.size));
    }
    set.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn child_gets_every_block_from_its_parent() {
    let s = setup().await;
    let n = data_blocks(&s.converted) as u64;
    let (a, am) = manager(&s.dir.path().join("a"), true, false);
    let (b, bm) = manager(&s.dir.path().join("b"), true, false);
    let (c, cm) = manager(&s.dir.path().join("c"), true, false);
    // A only serves the layer (it is the root: registry upstream); it has nothing cached.
    a.open_layer(&s.layer, None, StaticUpstream::root())
        .await
        .unwrap();
    let mnt_b = mountpoint(s.dir.path(), "mnt-b");
    let up_b = StaticUpstream::peer(a.peer_addr().unwrap());
    b.mount(&s.layer, None, up_b.clone(), &mnt_b).await.unwrap();
    read_all_and_compare(&mnt_b, &s.files).await;

    // B got every block from A, A fetched each from the registry once and forwarded it.
    assert_eq!(bm.blocks_from(Source::Registry), 0);
    assert_eq!(bm.blocks_from(Source::Peer), n);
    assert_eq!(bm.peer_fallbacks.get(), 0);
    assert_eq!(up_b.failures(), 0);
    assert_eq!(am.blocks_from(Source::Registry), n);
    // Counted once the server's write returns, which may be just after B's read did.
    wait_for(|| am.served_blocks.get() == n).await;
    assert_eq!(am.served_blocks.get(), n);
    // Registry: one range request per block, plus one tail (TOC) request per node.
    assert_eq!(
        s.registry.range_requests(&s.layer.digest).len() as u64,
        n + 2
    );

    // C below B: everything from B's cache, nothing new from the registry.
    let mnt_c = mountpoint(s.dir.path(), "mnt-c");
    c.mount(
        &s.layer,
        Some(s.converted.blob_size),
        StaticUpstream::peer(b.peer_addr().unwrap()),
        &mnt_c,
    )
    .await
    .unwrap();
    read_all_and_compare(&mnt_c, &s.files).await;
    assert_eq!(cm.blocks_from(Source::Peer), n);
    wait_for(|| bm.served_blocks.get() == n).await;
    assert_eq!(bm.served_blocks.get(), n);
    assert_eq!(
        bm.blocks_from(Source::Cache),
        n,
        "B served C from its cache"
    );
    assert_eq!(
        s.registry.range_requests(&s.layer.digest).len() as u64,
        n + 3
    );

    c.unmount(&mnt_c).await.unwrap();
    b.unmount(&mnt_b).await.unwrap();
}

/// The blocks of `paths`' data, in order of first appearance.
fn blocks_of(c: &ConvertedLayer, paths: &[&str]) -> Vec<usize> {
    let mut out = Vec::new();
    for p in paths {
        let e = c.toc.entries.iter().find(|e| e.path == *p).unwrap();
        for i in c.toc.blocks_for_range(e.offset, e.size) {
            if !out.contains(&i) {
                out.push(i);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn child_follows_its_parents_start_order() {
    let s = setup().await;
    let (a, am) = manager(&s.dir.path().join("a"), true, false);
    let (b, bm) = manager(&s.dir.path().join("b"), true, false);
    let mnt_a = mountpoint(s.dir.path(), "mnt-a");
    let mnt_b = mountpoint(s.dir.path(), "mnt-b");
    a.mount(&s.layer, None, StaticUpstream::root(), &mnt_a)
        .await
        .unwrap();
    b.mount(
        &s.layer,
        None,
        StaticUpstream::peer(a.peer_addr().unwrap()),
        &mnt_b,
    )
    .await
    .unwrap();

    // A's container reads two files; B's reads nothing yet.
    let read = ["app/file4", "app/file1"];
    let want = blocks_of(&s.converted, &read);
    let subset: HashMap<String, Vec<u8>> = read
        .iter()
        .map(|p| (p.to_string(), s.files[*p].clone()))
        .collect();
    // In this order (the start profile below records it).
    for p in read {
        read_all_and_compare(
            &mnt_a,
            &HashMap::from([(p.to_string(), s.files[p].clone())]),
        )
        .await;
    }
    assert_eq!(am.blocks_from(Source::Registry), want.len() as u64);

    // B fetched exactly those blocks from A, because A's start order named them.
    wait_for(|| bm.followed_blocks.get() == want.len() as u64).await;
    assert_eq!(bm.followed_blocks.get(), want.len() as u64);
    assert_eq!(bm.blocks_from(Source::Peer), want.len() as u64);
    assert_eq!(bm.blocks_from(Source::Registry), 0);
    assert_eq!(
        am.blocks_from(Source::Registry),
        want.len() as u64,
        "A fetched nothing more for B"
    );

    // B's container then finds them local: same bytes, no new fetch.
    read_all_and_compare(&mnt_b, &subset).await;
    assert_eq!(bm.blocks_from(Source::Peer), want.len() as u64);
    assert!(bm.blocks_from(Source::Cache) >= want.len() as u64);

    b.unmount(&mnt_b).await.unwrap();
    a.unmount(&mnt_a).await.unwrap();
    // A kept what its start read, in order: the layer's part of a start profile.
    let profile = s
        .dir
        .path()
        .join("a/cache/start-files")
        .join(s.layer.digest_hex());
    assert_eq!(
        std::fs::read_to_string(profile).unwrap(),
        "app/file4\napp/file1\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profiled_layer_fetches_its_start_blocks_at_mount() {
    let registry = Registry::start();
    let (tar, files) = layer_tar();
    // As if the converter had put a start profile's files in the first 3 blocks.
    let (blob, converted) = convert_with(&tar, 3 * faasnet_format::MIN_BLOCK_SIZE as u64);
    assert_eq!(converted.toc.start_blocks, 3);
    let digest = registry.push_blob(REPO, &blob).await;
    let layer = LayerRef::new(registry.addr.clone(), REPO, digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, am) = manager(&dir.path().join("a"), false, false);
    let mnt = mountpoint(dir.path(), "mnt");
    a.mount(&layer, None, StaticUpstream::root(), &mnt)
        .await
        .unwrap();
    // Nobody reads; prefetch is off: the start blocks come anyway, and only they.
    wait_for(|| am.followed_blocks.get() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(am.followed_blocks.get(), 3);
    assert_eq!(am.blocks_from(Source::Registry), 3);
    // At the root they came as one run: two range requests, the table of contents and it.
    assert_eq!(registry.range_requests(&layer.digest).len(), 2);
    read_all_and_compare(&mnt, &files).await;
    a.unmount(&mnt).await.unwrap();
}

/// A run of start blocks from the registry with a bad block in the middle: the blocks before
/// it are served, the bad one never is (a read of it fails), and nothing after it is taken
/// from that response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_block_in_a_registry_run_is_never_served() {
    let registry = Registry::start();
    let (tar, files) = layer_tar();
    let (mut blob, converted) = convert_with(&tar, 3 * faasnet_format::MIN_BLOCK_SIZE as u64);
    assert_eq!(converted.toc.start_blocks, 3);
    let bad = &converted.toc.blocks[1];
    blob[(bad.offset + bad.stored_len / 2) as usize] ^= 0x5a;
    let digest = registry.push_blob(REPO, &blob).await;
    let layer = LayerRef::new(registry.addr.clone(), REPO, digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, am) = manager(&dir.path().join("a"), false, false);
    let mnt = mountpoint(dir.path(), "mnt");
    a.mount(&layer, None, StaticUpstream::root(), &mnt)
        .await
        .unwrap();
    wait_for(|| am.digest_failures.get() >= 1).await;
    assert_eq!(am.digest_failures.get(), 1);
    assert_eq!(am.blocks_from(Source::Registry), 1, "only block 0 landed");
    let (mnt2, files2, converted2) = (mnt.clone(), files.clone(), converted.clone());
    tokio::task::spawn_blocking(move || {
        for (path, data) in &files2 {
            let blocks = blocks_of(&converted2, &[path]);
            match std::fs::read(mnt2.join(path)) {
                Ok(got) => {
                    assert!(
                        !blocks.contains(&1),
                        "{path} spans the bad block yet was read"
                    );
                    assert!(got == *data, "{path}: bytes differ");
                }
                Err(e) => assert!(blocks.contains(&1), "{path}: {e}"),
            }
        }
    })
    .await
    .unwrap();
    a.unmount(&mnt).await.unwrap();
}

/// A peer that answers every request with the right block, one byte flipped.
async fn corrupt_peer(
    blob: Vec<u8>,
    converted: ConvertedLayer,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let blob = Arc::new(blob);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (blob, converted, counter) = (blob.clone(), converted.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 512];
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Ok(Some((req, used))) = peer_protocol::decode_request(&buf) {
                        buf.drain(..used);
                        // It only knows blocks: a start-order subscription is hung up on.
                        if req.op.class().is_none() {
                            return;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        let e = &converted.toc.blocks[req.index as usize];
                        let mut stored =
                            blob[e.offset as usize..(e.offset + e.stored_len) as usize].to_vec();
                        let mid = stored.len() / 2;
                        stored[mid] ^= 0x40;
                        let resp = peer_protocol::encode_response(Status::Ok, &stored);
                        if conn.write_all(&resp).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_peer_is_detected_and_avoided() {
    let s = setup().await;
    let (peer, served) = corrupt_peer(s.blob.clone(), s.converted.clone()).await;
    let (b, bm) = manager(&s.dir.path().join("b"), false, false);
    let up = StaticUpstream::peer(peer);
    let mnt = mountpoint(s.dir.path(), "mnt");
    b.mount(&s.layer, None, up.clone(), &mnt).await.unwrap();
    read_all_and_compare(&mnt, &s.files).await;

    let bad = served.load(Ordering::SeqCst) as u64;
    assert!(bad >= 1, "the peer was asked");
    assert_eq!(
        bm.digest_failures.get(),
        bad,
        "every corrupt block was caught"
    );
    assert_eq!(
        bm.blocks_from(Source::Peer),
        0,
        "no corrupt block was accepted"
    );
    assert_eq!(
        bm.blocks_from(Source::Registry),
        data_blocks(&s.converted) as u64
    );
    assert!(bm.peer_fallbacks.get() >= bad);
    assert_eq!(up.failures(), bad, "the upstream provider was told");
    // Once caught, the peer is avoided: fewer peer requests than blocks.
    assert!(
        bad < data_blocks(&s.converted) as u64,
        "{bad} peer requests"
    );
    b.unmount(&mnt).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_peer_stalls_then_registry() {
    let s = setup().await;
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            held.push(c);
        }
    });
    let (b, bm) = manager(&s.dir.path().join("b"), false, false);
    let store = b
        .open_layer(&s.layer, None, StaticUpstream::peer(addr))
        .await
        .unwrap();
    let start = Instant::now();
    let raw = store.raw_block(0).await.unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert_eq!(raw.len(), s.converted.toc.blocks[0].raw_len as usize);
    assert_eq!(bm.peer_fallbacks.get(), 1);
    assert_eq!(bm.blocks_from(Source::Registry), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_of_a_missing_block_fetch_it_once() {
    let s = setup().await;
    let (a, am) = manager(&s.dir.path().join("a"), false, false);
    let store = a
        .open_layer(&s.layer, None, StaticUpstream::root())
        .await
        .unwrap();
    let before = s.registry.range_requests(&s.layer.digest).len();
    let index = 3;
    let reads: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.raw_block(index).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for r in reads {
        results.push(r.await.unwrap());
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        am.blocks_from(Source::Registry),
        1,
        "one fetch for 16 readers"
    );
    assert_eq!(s.registry.range_requests(&s.layer.digest).len(), before + 1);
    // Same through the stored path children use.
    let stored = store
        .stored_block(
            index,
            faasnet_snapshotter::lazy::block_store::Purpose::OnDemand,
        )
        .await
        .unwrap();
    let e = &s.converted.toc.blocks[index];
    assert_eq!(
        &stored[..],
        &s.blob[e.offset as usize..(e.offset + e.stored_len) as usize]
    );
    assert_eq!(am.blocks_from(Source::Registry), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_fetches_the_whole_layer_coalesced() {
    let s = setup().await;
    let (a, am) = manager(&s.dir.path().join("a"), true, true);
    let mnt = mountpoint(s.dir.path(), "mnt");
    a.mount(&s.layer, None, StaticUpstream::root(), &mnt)
        .await
        .unwrap();
    let store = a
        .open_layer(&s.layer, None, StaticUpstream::root())
        .await
        .unwrap();
    let n = s.converted.toc.blocks.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.cached_blocks() < n {
        assert!(Instant::now() < deadline, "prefetch did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(am.blocks_from(Source::Registry), n as u64);
    assert_eq!(am.prefetched_blocks.get(), n as u64);
    let ranges = s.registry.range_requests(&s.layer.digest).len();
    assert!(
        ranges - 1 < n,
        "{ranges} range requests for {n} blocks: not coalesced"
    );
    // Reading now touches no source but the cache.
    read_all_and_compare(&mnt, &s.files).await;
    assert_eq!(am.blocks_from(Source::Registry), n as u64);
    a.unmount(&mnt).await.unwrap();
}

/// Siblings starting together: a child asks for a block of a layer its parent is about to
/// mount. The parent holds the request (with keep-alives, so the child's 2 s stall timeout
/// does not fire) and serves it once the layer is there, instead of "unknown layer", which
/// would send the child to the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_server_waits_for_a_layer_being_mounted() {
    let s = setup().await;
    let (a, am) = manager(&s.dir.path().join("a"), true, false);
    let client = Arc::new(PeerSource::new(
        a.peer_addr().unwrap(),
        Duration::from_secs(2),
    ));
    let e0 = s.converted.toc.blocks[0].clone();
    let early = tokio::spawn({
        let (client, layer, e0) = (client.clone(), s.layer.clone(), e0.clone());
        async move { client.fetch(&layer, 0, &e0).await }
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !early.is_finished(),
        "answered before the layer was mounted"
    );
    a.open_layer(&s.layer, None, StaticUpstream::root())
        .await
        .unwrap();
    let b = early.await.unwrap().unwrap();
    assert_eq!(&b[..], &s.blob[..e0.stored_len as usize]);
    // The server counts a block after writing it: the child may see it first.
    let deadline = Instant::now() + Duration::from_secs(5);
    while am.served_blocks.get() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(am.served_blocks.get(), 1);
    assert_eq!(am.serve_errors.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_server_refuses_unknown_layers_and_bad_indices() {
    let s = setup().await;
    let (a, am) = manager(&s.dir.path().join("a"), true, false);
    a.open_layer(&s.layer, None, StaticUpstream::root())
        .await
        .unwrap();
    let client = PeerSource::new(a.peer_addr().unwrap(), Duration::from_secs(2));
    let e0 = s.converted.toc.blocks[0].clone();
    let unknown = LayerRef::new(
        s.registry.addr.clone(),
        REPO,
        format!("sha256:{}", "1".repeat(64)),
    )
    .unwrap();
    let err = client
        .fetch(&unknown, 0, &e0)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("UnknownLayer"), "{err}");
    let err = client
        .fetch(&s.layer, 100_000, &e0)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("BadIndex"), "{err}");
    // The same connection pool still works for a real block.
    let b = client.fetch(&s.layer, 0, &e0).await.unwrap();
    assert_eq!(&b[..], &s.blob[..e0.stored_len as usize]);
    assert_eq!(am.serve_errors.get(), 2);
    wait_for(|| am.served_blocks.get() == 1).await;
    assert_eq!(am.served_blocks.get(), 1);
}
