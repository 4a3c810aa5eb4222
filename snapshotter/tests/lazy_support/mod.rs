//! Shared helpers of the lazy-path tests: a real registry (Debian's `docker-registry`) with
//! its access log, a test layer with every kind of entry, conversion and push.

#![allow(dead_code)]

use std::{
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use faasnet_format::{convert_layer, ConvertOptions, ConvertedLayer};
use faasnet_snapshotter::lazy::{
    layer_manager::{LayerManager, LayerOptions},
    LazyMetrics,
};

/// A registry on 127.0.0.1 with filesystem storage in a temp dir.
pub struct Registry {
    pub addr: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("docker-registry is installed");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            addr,
            child,
            log,
            _dir: dir,
        }
    }

    /// Uploads `blob` to `repo` (monolithic upload: POST then PUT ?digest=).
    pub async fn push_blob(&self, repo: &str, blob: &[u8]) -> String {
        let digest = faasnet_format::sha256_digest(blob);
        let client = reqwest::Client::new();
        let resp = client
            .post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202, "start upload");
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let url = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.addr)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let resp = client
            .put(format!("{url}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "finish upload");
        digest
    }

    /// Ranged blob GETs (status 206) of `digest` in the access log so far, as
    /// (`bytes` sent) per request.
    pub fn range_requests(&self, digest: &str) -> Vec<u64> {
        let mut s = String::new();
        std::fs::File::open(&self.log)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        let needle = format!("/blobs/{digest} HTTP/1.1\" 206 ");
        s.lines()
            .filter_map(|l| {
                let i = l.find(&needle)?;
                l[i + needle.len()..].split(' ').next()?.parse().ok()
            })
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test layer's entries should look like once mounted.
pub struct Layer {
    pub tar: Vec<u8>,
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> key=value\n", where len counts itself.
    let body = 3 + key.len() + value.len();
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len += 1;
    }
    let mut v = format!("{len} {key}=").into_bytes();
    v.extend_from_slice(value);
    v.push(b'\n');
    v
}

pub struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

pub struct Meta {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
        }
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        TarBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    pub fn pax(&mut self, records: &[(&str, &[u8])]) {
        let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.b
            .append_data(&mut h, "PaxHeaders/x", &data[..])
            .unwrap();
    }

    fn header(ty: tar::EntryType, m: &Meta, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(ty);
        h.set_mode(m.mode);
        h.set_uid(m.uid);
        h.set_gid(m.gid);
        h.set_mtime(m.mtime);
        h.set_size(size);
        h
    }

    pub fn dir(&mut self, path: &str, m: Meta) {
        let mut h = Self::header(tar::EntryType::Directory, &m, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
    }

    pub fn file(&mut self, path: &str, m: Meta, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, &m, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(
            tar::EntryType::Symlink,
            &Meta {
                mode: 0o777,
                ..Meta::default()
            },
            0,
        );
        self.b.append_link(&mut h, path, target).unwrap();
    }

    pub fn hardlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Link, &Meta::default(), 0);
        self.b.append_link(&mut h, path, target).unwrap();
    }

    pub fn device(&mut self, path: &str, ty: tar::EntryType, major: u32, minor: u32, m: Meta) {
        let mut h = Self::header(ty, &m, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// Deterministic pseudo-random bytes (incompressible enough to span several blocks).
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 7) as u8
        })
        .collect()
}

/// Converts `tar` with 64 KiB blocks (so that test files span several).
pub fn convert(tar: &[u8]) -> (Vec<u8>, ConvertedLayer) {
    convert_with(tar, 0)
}

/// Like [`convert`], saying that the first `start_bytes` of the stream hold a start
/// profile's files.
pub fn convert_with(tar: &[u8], start_bytes: u64) -> (Vec<u8>, ConvertedLayer) {
    let mut blob = Vec::new();
    let opts = ConvertOptions {
        block_size: faasnet_format::MIN_BLOCK_SIZE,
        threads: 2,
        original: None,
        start_bytes,
    };
    let converted = convert_layer(tar, &mut blob, &opts, &|_| {}).unwrap();
    (blob, converted)
}

/// A layer manager with its own cache dir under `dir`, without read-ahead (tests count the
/// blocks reads fetch).
pub fn manager(dir: &Path, peer: bool, prefetch: bool) -> (Arc<LayerManager>, Arc<LazyMetrics>) {
    manager_with(
        dir,
        LayerOptions {
            peer_listen: peer.then(|| "127.0.0.1:0".parse().unwrap()),
            prefetch,
            readahead_blocks: 0,
            ..LayerOptions::default()
        },
    )
}

/// A layer manager with `options`, its cache under `dir`.
pub fn manager_with(dir: &Path, options: LayerOptions) -> (Arc<LayerManager>, Arc<LazyMetrics>) {
    let metrics = Arc::new(LazyMetrics::default());
    let m = LayerManager::new(
        LayerOptions {
            cache_dir: dir.join("cache"),
            stall_timeout: Duration::from_secs(2),
            ..options
        },
        metrics.clone(),
    )
    .unwrap();
    (m, metrics)
}

/// lgetxattr(2), `None` when absent.
pub fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    let r = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

/// llistxattr(2).
pub fn listxattr(path: &Path) -> Vec<String> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let r =
        unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert!(r >= 0, "llistxattr {}", path.display());
    buf.truncate(r as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}
