//! End-to-end tests of the `snapshotter` binary:
//! - containerd's own snapshotter test suite (shared/conformance/run.sh), in both the
//!   default isolation mode and the raw mode (server-side Walk filters);
//! - a restart keeps snapshots, and the metrics endpoint answers;
//! - a real containerd, configured with the snapshotter as a proxy plugin, imports a
//!   tiny busybox image through it and runs a container from it;
//! - the remote-layer seam under a real containerd: a stand-in lazy path (bind mounts)
//!   makes containerd take a layer as committed without unpacking it, run a container on
//!   it, get it back after a snapshotter restart, and remove it.
//!
//! They need root (mounts) and skip with a message otherwise. The suite lives in
//! `<repo>/../shared/conformance` (CI clones the repo with `shared/` beside it);
//! `FAASNET_SHARED` overrides. The containerd test needs containerd, ctr, runc and a
//! static /bin/busybox (Debian: containerd, runc, busybox-static).

use std::{
    collections::HashMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use containerd_snapshots::api::snapshots::v1::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    StatSnapshotRequest,
};
use faasnet_snapshotter::{
    metrics::Metrics, service::Service, snapshots::Overlay, RemoteLayers, REMOTE_LABEL,
    TARGET_SNAPSHOT_LABEL,
};
use sha2::{Digest, Sha256};

/// The tests mount a lot and two suite runs at once would only slow each other down.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("SKIP {}: needs root (mounts)", module_path!());
            return;
        }
    };
}

fn shared_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FAASNET_SHARED") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// A running snapshotter daemon on a temporary root and socket.
struct Daemon {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    metrics: String,
}

impl Daemon {
    /// Starts the daemon in `dir` (root `dir/root`, socket `dir/snapshotter.sock`) and
    /// waits for its socket.
    fn start(dir: &Path, metrics: &str) -> Daemon {
        let root = dir.join("root");
        let socket = dir.join("snapshotter.sock");
        let log = dir.join("snapshotter.log");
        let config = dir.join("snapshotter.toml");
        fs::write(
            &config,
            format!(
                "root = {:?}\nsocket = {:?}\nlog_level = \"debug\"\nmetrics_address = {:?}\n",
                root, socket, metrics
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_snapshotter"))
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start snapshotter");
        let mut d = Daemon {
            child: Some(child),
            root,
            socket,
            log,
            metrics: metrics.to_string(),
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("snapshotter exited with {status}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("snapshotter socket never came up:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait: a clean stop.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "snapshotter exit {status}:\n{}",
                        self.log_text()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("snapshotter ignored SIGTERM:\n{}", self.log_text());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Detaches every mount below `dir` (a failed test may leave some) so the temp dir can
/// be deleted.
fn detach_all_under(dir: &Path) {
    if let Ok(mounts) = faasnet_snapshotter::snapshots::fsutil::mounts_under(dir) {
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn run_suite(socket: &Path, isolation: &str) -> (usize, usize, String) {
    let run_sh = shared_dir().join("conformance/run.sh");
    assert!(
        run_sh.exists(),
        "{} not found: the conformance harness lives in shared/ beside the repo (or set FAASNET_SHARED)",
        run_sh.display()
    );
    let out = Command::new("bash")
        .arg(&run_sh)
        .arg(socket)
        .env("SNAPSHOTTER_ISOLATION", isolation)
        .stdin(Stdio::null())
        .output()
        .expect("run conformance harness");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!(
        "{stdout}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    // "N passed, M failed"
    let nums: Vec<usize> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        nums.len() == 2 && last.contains("passed") && last.contains("failed"),
        "no 'N passed, M failed' line from run.sh:\n{text}"
    );
    let failures: String = stdout
        .lines()
        .filter(|l| l.starts_with("failed:") || l.starts_with("log:"))
        .collect::<Vec<_>>()
        .join("\n");
    (nums[0], nums[1], failures)
}

#[test]
fn containerd_snapshotter_suite_passes() {
    require_root!();
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), "");
    let (passed, failed, details) = run_suite(&d.socket, "prefix");
    eprintln!("conformance (isolation=prefix): {passed} passed, {failed} failed");
    assert_eq!(
        failed,
        0,
        "conformance failures:\n{details}\n{}",
        d.log_text()
    );
    assert_eq!(
        passed, 20,
        "the reference overlay snapshotter passes 20\n{details}"
    );
    // Every test cleaned up after itself: nothing left but the root dirs.
    d.stop();
    assert_eq!(fs::read_dir(d.root.join("snapshots")).unwrap().count(), 0);
    detach_all_under(dir.path());
}

#[test]
fn containerd_snapshotter_suite_passes_with_server_side_filters() {
    require_root!();
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), "");
    // Raw keys and Walk filters sent to the server: valid once per fresh snapshotter.
    let (passed, failed, details) = run_suite(&d.socket, "none");
    eprintln!("conformance (isolation=none): {passed} passed, {failed} failed");
    assert_eq!(
        failed,
        0,
        "conformance failures:\n{details}\n{}",
        d.log_text()
    );
    assert_eq!(passed, 20);
    d.stop();
    detach_all_under(dir.path());
}

async fn client(socket: &Path) -> SnapshotsClient<tonic::transport::Channel> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await
        .expect("connect to snapshotter");
    SnapshotsClient::new(channel)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_snapshots_and_metrics_are_served() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start(dir.path(), &metrics);
    let mut c = client(&d.socket).await;
    let labels = HashMap::from([("l".to_string(), "1".to_string())]);
    let mounts = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "faasnet".into(),
            key: "active".into(),
            parent: String::new(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    fs::write(Path::new(&mounts[0].source).join("hello"), b"world").unwrap();
    c.commit(CommitSnapshotRequest {
        snapshotter: "faasnet".into(),
        name: "layer".into(),
        key: "active".into(),
        labels: labels.clone(),
    })
    .await
    .unwrap();
    let err = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "faasnet".into(),
            key: "layer".into(),
            parent: String::new(),
            labels: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);

    let text = tokio::task::spawn_blocking({
        let m = d.metrics.clone();
        move || http_get(&m, "/metrics")
    })
    .await
    .unwrap();
    assert!(
        text.contains("faasnet_snapshotter_prepares_total 2"),
        "{text}"
    );
    assert!(
        text.contains("faasnet_snapshotter_commits_total 1"),
        "{text}"
    );
    assert!(
        text.contains(r#"faasnet_snapshotter_errors_total{op="prepare",code="already_exists"} 1"#),
        "{text}"
    );

    drop(c);
    d.stop();
    assert!(!d.socket.exists(), "socket removed on clean stop");
    d.wait_restart();
    let mut c = client(&d.socket).await;
    let info = c
        .stat(StatSnapshotRequest {
            snapshotter: "faasnet".into(),
            key: "layer".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, 3, "committed");
    assert_eq!(info.labels, labels);
    let view = c
        .view(
            containerd_snapshots::api::snapshots::v1::ViewSnapshotRequest {
                snapshotter: "faasnet".into(),
                key: "view".into(),
                parent: "layer".into(),
                labels: HashMap::new(),
            },
        )
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(view[0].options, vec!["ro", "rbind"]);
    assert_eq!(
        fs::read(Path::new(&view[0].source).join("hello")).unwrap(),
        b"world"
    );
    drop(c);
    d.stop();
}

impl Daemon {
    /// Starts the daemon again on the same root and socket.
    fn wait_restart(&mut self) {
        let dir = self.root.parent().unwrap().to_path_buf();
        let again = Daemon::start(&dir, &self.metrics.clone());
        *self = again;
    }
}

// ---- containerd end to end ------------------------------------------------------------

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes an OCI image archive holding one uncompressed layer with a static busybox at
/// /bin/busybox (and /bin/sh → busybox), named `<base>:test` on import. Returns the
/// layer's digest: also its diff ID and, as the only layer, the image's chain ID.
fn build_busybox_image(busybox: &Path, out: &Path) -> String {
    // The layer.
    let mut layer = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(0);
    layer
        .append_data(&mut dir, "bin/", std::io::empty())
        .unwrap();
    let data = fs::read(busybox).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o755);
    file.set_size(data.len() as u64);
    file.set_mtime(0);
    layer
        .append_data(&mut file, "bin/busybox", &data[..])
        .unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_mode(0o777);
    link.set_size(0);
    link.set_mtime(0);
    layer.append_link(&mut link, "bin/sh", "busybox").unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_digest = sha256_hex(&layer);

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    }))
    .unwrap();
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let manifest_digest = sha256_hex(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "test"},
            "platform": {"architecture": oci_arch(), "os": "linux"},
        }],
    }))
    .unwrap();

    let mut archive = tar::Builder::new(fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        archive.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    add(&format!("blobs/sha256/{layer_digest}"), &layer);
    add(&format!("blobs/sha256/{config_digest}"), &config);
    add(&format!("blobs/sha256/{manifest_digest}"), &manifest);
    archive.finish().unwrap();
    format!("sha256:{layer_digest}")
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// A containerd on temporary dirs with the snapshotter as proxy plugin `faasnet`.
struct Containerd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, snapshotter_socket: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        let config = dir.join("containerd.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[proxy_plugins.faasnet]
  type = "snapshot"
  address = "{snap}"
"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
                snap = snapshotter_socket.display(),
            ),
        )
        .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start containerd");
        let c = Containerd { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&c.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd never came up:\n{}",
                fs::read_to_string(&c.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "faasnet-test"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        eprintln!(
            "ctr {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_containerd_tools() -> &'static Path {
    for tool in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
        assert!(
            which(tool).is_some(),
            "{tool} not found (Debian: apt-get install containerd runc)"
        );
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox missing (apt-get install busybox-static)"
    );
    busybox
}

#[test]
fn containerd_runs_a_container_on_the_snapshotter() {
    require_root!();
    let busybox = require_containerd_tools();
    let _g = heavy();

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("busybox-oci.tar");
    let _ = build_busybox_image(busybox, &image);
    let snap_dir = dir.path().join("snap");
    fs::create_dir(&snap_dir).unwrap();
    let mut snapshotter = Daemon::start(&snap_dir, "");
    let ctrd_dir = dir.path().join("ctrd");
    fs::create_dir(&ctrd_dir).unwrap();
    let containerd = Containerd::start(&ctrd_dir, &snapshotter.socket);

    let name = "docker.io/faasnet/busybox:test";
    let image_arg = image.to_str().unwrap();
    let out = containerd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "faasnet",
        "--base-name",
        "docker.io/faasnet/busybox",
        image_arg,
    ]);
    assert!(
        out.status.success(),
        "import failed\ncontainerd:\n{}\nsnapshotter:\n{}",
        containerd.log_text(),
        snapshotter.log_text()
    );
    // The layer was unpacked into our snapshotter and committed under its chain ID.
    let out = containerd.ctr(&["snapshots", "--snapshotter", "faasnet", "ls"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing.contains("sha256:") && listing.contains("Committed"),
        "{listing}"
    );

    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "faasnet",
        name,
        "faasnet-e2e",
        "/bin/busybox",
        "echo",
        "hello from a faasnet snapshot",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from a faasnet snapshot"),
        "ctr run failed: {stdout}\ncontainerd:\n{}\nsnapshotter:\n{}",
        containerd.log_text(),
        snapshotter.log_text()
    );
    // The container's active snapshot is gone after --rm; the image layer stays.
    let out = containerd.ctr(&["snapshots", "--snapshotter", "faasnet", "ls"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!listing.contains("faasnet-e2e"), "{listing}");

    let out = containerd.ctr(&["images", "rm", "--sync", name]);
    assert!(out.status.success());
    drop(containerd);
    snapshotter.stop();
    detach_all_under(dir.path());
}

// ---- the remote-layer seam under a real containerd ------------------------------------

/// Label (inherited by the backend snapshotter, as every `containerd.io/snapshot/` label)
/// naming a directory the fake lazy path "mounts" as the layer.
const LAYER_DIR_LABEL: &str = "containerd.io/snapshot/faasnet-test.layer-dir";

/// A stand-in for the lazy path: read-only bind mounts of a local directory named by a
/// label, in place of a FUSE filesystem.
struct BindRemote;

fn bind_ro(src: &str, dst: &Path) -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )?;
    Ok(())
}

#[async_trait::async_trait]
impl RemoteLayers for BindRemote {
    async fn prepare_remote(
        &self,
        _key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<bool> {
        match labels.get(LAYER_DIR_LABEL) {
            Some(dir) => bind_ro(dir, mountpoint).map(|_| true),
            None => Ok(false),
        }
    }
    async fn restore_remote(
        &self,
        _key: &str,
        labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<()> {
        bind_ro(&labels[LAYER_DIR_LABEL], mountpoint)
    }
    async fn remove_remote(
        &self,
        _key: &str,
        _labels: &HashMap<String, String>,
        mountpoint: &Path,
    ) -> anyhow::Result<()> {
        nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)?;
        Ok(())
    }
}

/// The snapshotter served in-process with [`BindRemote`] as its lazy path.
struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve_in_process(root: &Path, socket: &Path) -> InProcess {
    let core = Arc::new(Overlay::open(root).unwrap());
    let service = Service::new(core, Arc::new(BindRemote), Arc::new(Metrics::new()));
    service.restore_remote_snapshots().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let socket = socket.to_path_buf();
    let task = tokio::spawn(async move {
        faasnet_snapshotter::service::serve(service, &socket, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    InProcess { stop, task }
}

impl InProcess {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn namespaced<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("containerd-namespace", "faasnet-test".parse().unwrap());
    req
}

// The HEAVY guard serialises whole tests, each on its own runtime: holding it across
// awaits blocks no other task of this runtime.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_uses_a_remote_layer_without_unpacking_it() {
    require_root!();
    let busybox = require_containerd_tools();
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("busybox-oci.tar");
    let chain_id = build_busybox_image(busybox, &image);
    // The "remote" layer content: what the lazy path would serve through FUSE.
    let layer_dir = dir.path().join("layer");
    fs::create_dir_all(layer_dir.join("bin")).unwrap();
    fs::copy(busybox, layer_dir.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", layer_dir.join("bin/sh")).unwrap();

    let snap_root = dir.path().join("snap-root");
    let snap_sock = dir.path().join("snap.sock");
    let snapshotter = serve_in_process(&snap_root, &snap_sock).await;
    let ctrd_dir = dir.path().join("ctrd");
    fs::create_dir(&ctrd_dir).unwrap();
    let containerd = tokio::task::block_in_place(|| Containerd::start(&ctrd_dir, &snap_sock));
    let ctr = |args: &[&str]| tokio::task::block_in_place(|| containerd.ctr(args));

    // The image's blobs only: nothing unpacked yet.
    let out = ctr(&[
        "images",
        "import",
        "--no-unpack",
        "--base-name",
        "docker.io/faasnet/busybox",
        image.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "import: {}", containerd.log_text());

    // What containerd's unpacker sends for a layer (through containerd's own snapshots
    // service, which adds its metadata layer on top of ours): Prepare of an extraction key
    // with the target chain ID label.
    let mut c = client(&containerd.socket).await;
    let labels = HashMap::from([
        (TARGET_SNAPSHOT_LABEL.to_string(), chain_id.clone()),
        (LAYER_DIR_LABEL.to_string(), layer_dir.display().to_string()),
        (
            "containerd.io/gc.root".to_string(),
            "faasnet-test".to_string(),
        ),
    ]);
    let err = c
        .prepare(namespaced(PrepareSnapshotRequest {
            snapshotter: "faasnet".into(),
            key: format!("extract-1 {chain_id}"),
            parent: String::new(),
            labels,
        }))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::AlreadyExists,
        "containerd should see the remote layer as committed: {err:?}\n{}",
        containerd.log_text()
    );
    // containerd found our committed remote snapshot (by Walk with a filter) and linked it.
    let info = c
        .stat(namespaced(StatSnapshotRequest {
            snapshotter: "faasnet".into(),
            key: chain_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, 3, "committed");
    assert_eq!(
        info.labels.get(REMOTE_LABEL).map(String::as_str),
        Some("remote snapshot")
    );

    // ctr run sees the image as unpacked and runs on top of the remote layer.
    let run = |name: &str| {
        ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "faasnet",
            "docker.io/faasnet/busybox:test",
            name,
            "/bin/sh",
            "-c",
            "echo remote layer says hi; ls /bin",
        ])
    };
    let out = run("faasnet-remote-1");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && stdout.contains("remote layer says hi"),
        "ctr run: {stdout}\n{}",
        containerd.log_text()
    );

    // Restart the snapshotter: the remote snapshot is mounted again (restore_remote).
    snapshotter.shutdown().await;
    let mountpoints = faasnet_snapshotter::snapshots::fsutil::mounts_under(&snap_root).unwrap();
    assert_eq!(
        mountpoints.len(),
        1,
        "the remote layer's mount: {mountpoints:?}"
    );
    let snapshotter = serve_in_process(&snap_root, &snap_sock).await;
    // containerd's gRPC connection to the proxy reconnects with backoff: retry while it
    // still reports the snapshotter unavailable.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    let out = loop {
        attempt += 1;
        let out = run(&format!("faasnet-remote-2-{attempt}"));
        let unavailable = String::from_utf8_lossy(&out.stderr).contains("unavailable");
        if out.status.success() || !unavailable || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("remote layer says hi"),
        "after restart: {}",
        containerd.log_text()
    );

    // Removing it through containerd (metadata first; the backend snapshot goes at the
    // next garbage collection, which `images rm --sync` runs) unmounts it
    // (remove_remote) and deletes its directory.
    let out = ctr(&["snapshots", "--snapshotter", "faasnet", "rm", &chain_id]);
    assert!(out.status.success(), "rm: {}", containerd.log_text());
    let out = ctr(&["images", "rm", "--sync", "docker.io/faasnet/busybox:test"]);
    assert!(out.status.success(), "images rm: {}", containerd.log_text());
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = faasnet_snapshotter::snapshots::fsutil::mounts_under(&snap_root).unwrap();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(left.is_empty(), "still mounted: {left:?}");
    assert_eq!(
        fs::read_dir(snap_root.join("snapshots")).unwrap().count(),
        0
    );

    drop(c);
    tokio::task::block_in_place(|| drop(containerd));
    snapshotter.shutdown().await;
    detach_all_under(dir.path());
}
