//! Test helpers: a private `docker-registry`, test images built from small tar layers, and
//! a runner for the CLI binary.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use faasnet_image_converter::manifest::{
    media_types, to_bytes, Descriptor, ImageIndex, ImageManifest,
};
use faasnet_image_converter::{ClientConfig, Reference, RegistryClient};

/// A docker-registry process on a free loopback port, with its storage in a temp dir.
pub struct Registry {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry, or returns `None` (with a loud message) if the binary is missing.
    pub fn start() -> Option<Registry> {
        let bin = "/usr/bin/docker-registry";
        if !Path::new(bin).exists() {
            eprintln!("!!! SKIPPING: {bin} is not installed (apt-get install docker-registry)");
            return None;
        }
        // Tests run in parallel: a port picked by another test's registry, or one that
        // registry still holds, would let our readiness check talk to the wrong process.
        // Ports are unique within this process, and the registry we started must still be
        // running once the port answers; otherwise (its bind failed) try another port.
        for _ in 0..5 {
            if let Some(reg) = Self::try_start(bin) {
                return Some(reg);
            }
        }
        panic!("docker-registry did not start on any of 5 ports");
    }

    fn try_start(bin: &str) -> Option<Registry> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut reg = Registry {
            addr: addr.clone(),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            if reg.child.try_wait().unwrap().is_some() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // A registry that lost the port exits at once; give it the time to.
        std::thread::sleep(Duration::from_millis(200));
        if reg.child.try_wait().unwrap().is_some() {
            return None;
        }
        Some(reg)
    }

    /// `127.0.0.1:PORT/name`.
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A runtime for the async client in sync tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn client() -> Arc<RegistryClient> {
    Arc::new(
        RegistryClient::new(ClientConfig {
            plain_http: vec![],
            docker_config: Some("/nonexistent".into()),
        })
        .unwrap(),
    )
}

/// One tar entry of a test layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Exec(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// Builds a tar archive from entries.
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data) | Entry::Exec(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if matches!(e, Entry::Exec(..)) {
                    0o755
                } else {
                    0o644
                });
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            Entry::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn sha(data: &[u8]) -> String {
    faasnet_format::sha256_digest(data)
}

/// A layer to push: the tar (for the diffID) and the blob as stored.
#[derive(Clone)]
pub struct TestLayer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub media_type: String,
}

impl TestLayer {
    pub fn gzip(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            blob: gzip(&tar),
            tar,
            media_type: media_types::OCI_LAYER_GZIP.into(),
        }
    }

    pub fn docker_gzip(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            blob: gzip(&tar),
            tar,
            media_type: media_types::DOCKER_LAYER_GZIP.into(),
        }
    }

    pub fn plain(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            blob: tar.clone(),
            tar,
            media_type: media_types::OCI_LAYER.into(),
        }
    }
}

/// Image config bytes for `diff_ids`, with a command and PATH.
pub fn config_json(diff_ids: &[String], cmd: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn desc(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: sha(data),
        size: data.len() as u64,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    }
}

/// Pushes an image made of `layers` (config diffIDs computed from the tars unless
/// `diff_ids` is given) as `reference` (`host/repo:tag`); `docker` picks the Docker schema2
/// manifest type. Returns the manifest digest.
pub fn push_image(
    reference: &str,
    layers: &[TestLayer],
    diff_ids: Option<Vec<String>>,
    docker: bool,
) -> String {
    let r = Reference::parse(reference).unwrap();
    let (bytes, mt) = image_manifest(&r, layers, diff_ids, docker);
    rt().block_on(async {
        client()
            .push_manifest(&r, r.reference(), mt, &bytes)
            .await
            .unwrap()
    })
}

/// Pushes layers and config; returns the manifest bytes and media type (not pushed).
pub fn image_manifest(
    r: &Reference,
    layers: &[TestLayer],
    diff_ids: Option<Vec<String>>,
    docker: bool,
) -> (Vec<u8>, &'static str) {
    let c = client();
    let diff_ids = diff_ids.unwrap_or_else(|| layers.iter().map(|l| sha(&l.tar)).collect());
    let config = config_json(&diff_ids, &["/bin/sh"]);
    rt().block_on(async {
        for l in layers {
            c.push_blob_bytes(r, Bytes::from(l.blob.clone()), &sha(&l.blob))
                .await
                .unwrap();
        }
        c.push_blob_bytes(r, Bytes::from(config.clone()), &sha(&config))
            .await
            .unwrap();
    });
    let (mt, cmt) = if docker {
        (media_types::DOCKER_MANIFEST, media_types::DOCKER_CONFIG)
    } else {
        (media_types::OCI_MANIFEST, media_types::OCI_CONFIG)
    };
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(mt.into()),
        config: desc(cmt, &config),
        layers: layers
            .iter()
            .map(|l| desc(&l.media_type, &l.blob))
            .collect(),
        annotations: Default::default(),
        extra: Default::default(),
    };
    (to_bytes(&m), mt)
}

/// Pushes an index of the given (already pushed) manifests as `reference`.
pub fn push_index(reference: &str, children: &[(Vec<u8>, &str, &str)]) -> String {
    let r = Reference::parse(reference).unwrap();
    let c = client();
    rt().block_on(async {
        let mut manifests = Vec::new();
        for (bytes, mt, arch) in children {
            let d = c.push_manifest(&r, &sha(bytes), mt, bytes).await.unwrap();
            let mut de = desc(mt, bytes);
            assert_eq!(de.digest, d);
            de.platform = Some(serde_json::json!({"os": "linux", "architecture": arch}));
            manifests.push(de);
        }
        let idx = ImageIndex {
            schema_version: 2,
            media_type: Some(media_types::OCI_INDEX.into()),
            manifests,
            annotations: Default::default(),
            extra: Default::default(),
        };
        c.push_manifest(&r, r.reference(), media_types::OCI_INDEX, &to_bytes(&idx))
            .await
            .unwrap()
    })
}

/// The manifest `reference` points at, or `None` if the tag does not exist.
pub fn manifest_of(reference: &str) -> Option<(Vec<u8>, String)> {
    let r = Reference::parse(reference).unwrap();
    rt().block_on(async {
        match client().resolve_manifest(&r).await {
            Ok(m) => Some((m.bytes, m.digest)),
            Err(faasnet_image_converter::RegistryError::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    })
}

/// Reads a whole blob.
pub fn blob_of(reference: &str, digest: &str) -> Vec<u8> {
    let r = Reference::parse(reference).unwrap();
    rt().block_on(async { client().fetch_blob(&r, digest, 1 << 30).await.unwrap() })
}

/// Path of the CLI binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_image-converter"))
}

/// Runs the CLI with a private cache directory.
pub fn cli(args: &[&str], cache: &Path) -> Output {
    let out = Command::new(bin())
        .args(args)
        .env("FAASNET_CACHE_DIR", cache)
        .env("DOCKER_CONFIG", cache.join("docker"))
        .output()
        .unwrap();
    eprintln!(
        "$ image-converter {}\n-- exit {:?}\n-- stdout:\n{}-- stderr:\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `image-converter decompress` on `blob`; returns stdout.
pub fn decompress(blob: &[u8]) -> Output {
    let mut child = Command::new(bin())
        .arg("decompress")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = blob.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// The parsed manifest JSON.
pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Pseudo-random bytes (deterministic).
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// (path, type, mode, size, link, data) of every entry.
pub type EntryList = Vec<(Vec<u8>, u8, u32, u64, Option<Vec<u8>>, Vec<u8>)>;

/// Every entry of a tar archive, in archive order.
pub fn entries(tar_bytes: &[u8]) -> EntryList {
    let mut a = tar::Archive::new(tar_bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            let h = e.header();
            (
                e.path_bytes().into_owned(),
                h.entry_type().as_byte(),
                h.mode().unwrap(),
                h.size().unwrap(),
                e.link_name_bytes().map(|l| l.into_owned()),
                data,
            )
        })
        .collect()
}
