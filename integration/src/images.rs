//! The project's test images (hack/images.sh) in a test's registry, converted with the real
//! `image-converter`, and what the tests need to know about them (manifests, TOC summaries).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context as _};
use serde_json::Value;

use crate::binaries::{hack_script, workspace_binary};
use crate::registry::Registry;

/// Where hack/images.sh keeps built images when the caller did not say (as hack/test.sh).
pub const DEFAULT_IMAGES_CACHE: &str = "/var/cache/faasnet/images";
/// Tag the converted image gets, in the same repository as the original.
pub const CONVERTED_TAG: &str = "faasnet";

/// One test image pushed to a registry, original and converted.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// `busybox`, `tricky` or `realistic`.
    pub name: String,
    /// Registry `host:port`.
    pub registry: String,
    /// `faasnet/<name>`.
    pub repo: String,
    /// The original image: `<registry>/faasnet/<name>:latest`.
    pub original: String,
    /// The converted image: `<registry>/faasnet/<name>:faasnet` (None until converted).
    pub converted: Option<String>,
    /// Manifest digest of the converted image.
    pub converted_digest: Option<String>,
}

/// A converted layer as the TOC summary (`image-converter inspect --json`) describes it.
#[derive(Debug, Clone)]
pub struct ConvertedLayer {
    pub digest: String,
    /// Size of the whole blob.
    pub blob_size: u64,
    /// Sum of the stored (compressed) sizes of its blocks.
    pub stored_size: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Length of the TOC frame (manifest annotation).
    pub toc_length: u64,
}

impl ConvertedLayer {
    /// Upper bound of what one node's TOC fetch reads from the registry: the tail
    /// (`faasnet_format::DEFAULT_TAIL_FETCH`, at most the blob) plus, when the TOC does not
    /// fit in it, the TOC frame.
    pub fn toc_fetch_allowance(&self) -> u64 {
        faasnet_format::DEFAULT_TAIL_FETCH.min(self.blob_size) + self.toc_length
    }
}

impl TestImage {
    /// Builds (cached) and pushes image `name` to `registry` with `hack/images.sh build`.
    pub fn push(name: &str, registry: &Registry) -> anyhow::Result<TestImage> {
        let pushed = images_sh(&["build", name, "--registry", &registry.addr])
            .with_context(|| format!("hack/images.sh build {name}"))?;
        let original = pushed.lines().last().unwrap_or_default().trim().to_string();
        ensure!(
            original == format!("{}/faasnet/{name}:latest", registry.addr),
            "hack/images.sh build printed an unexpected reference {original:?}"
        );
        Ok(TestImage {
            name: name.to_string(),
            registry: registry.addr.clone(),
            repo: format!("faasnet/{name}"),
            original,
            converted: None,
            converted_digest: None,
        })
    }

    /// Pushes and converts image `name` (tag `faasnet` in the same repository).
    pub fn push_converted(name: &str, registry: &Registry) -> anyhow::Result<TestImage> {
        let mut image = TestImage::push(name, registry)?;
        image.convert()?;
        Ok(image)
    }

    /// Converts the original with `image-converter convert` (own converter cache, so the
    /// conversion really happens against this registry).
    pub fn convert(&mut self) -> anyhow::Result<()> {
        let dst = format!("{}/{}:{CONVERTED_TAG}", self.registry, self.repo);
        let cache = tempfile::Builder::new()
            .prefix("faasnet-convert-cache")
            .tempdir()?;
        let mut cmd = Command::new(workspace_binary("image-converter"));
        cmd.args(["-q", "convert", &self.original, &dst, "--cache-dir"])
            .arg(cache.path());
        if !self.registry.starts_with("127.") && !self.registry.starts_with("localhost") {
            cmd.args(["--plain-http", &self.registry]);
        }
        let out = run(&mut cmd).with_context(|| format!("convert {} {dst}", self.original))?;
        let digest = out.trim().lines().last().unwrap_or_default().to_string();
        ensure!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "convert should print the manifest digest, printed {out:?}"
        );
        self.converted = Some(dst);
        self.converted_digest = Some(digest);
        Ok(())
    }

    /// The converted reference (panics if not converted).
    pub fn converted(&self) -> &str {
        self.converted.as_deref().expect("image converted")
    }

    /// The manifest of `tag_or_digest` in this image's repository.
    pub fn manifest(&self, tag_or_digest: &str) -> anyhow::Result<Value> {
        fetch_manifest(&self.registry, &self.repo, tag_or_digest)
    }

    /// Layer digests of the manifest `tag_or_digest`.
    pub fn layer_digests(&self, tag_or_digest: &str) -> anyhow::Result<Vec<String>> {
        let m = self.manifest(tag_or_digest)?;
        let layers = m["layers"].as_array().context("manifest has no layers")?;
        Ok(layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// The image config's `rootfs.diff_ids` (the same for original and converted).
    pub fn diff_ids(&self) -> anyhow::Result<Vec<String>> {
        let m = self.manifest("latest")?;
        let config = m["config"]["digest"].as_str().context("config digest")?;
        let body = http_get(&format!(
            "http://{}/v2/{}/blobs/{config}",
            self.registry, self.repo
        ))?;
        let config: Value = serde_json::from_slice(&body).context("image config")?;
        let ids = config["rootfs"]["diff_ids"]
            .as_array()
            .context("config has no rootfs.diff_ids")?;
        Ok(ids
            .iter()
            .map(|d| d.as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// The chain ID of the image's top layer: the snapshot its containers start from.
    pub fn chain_id(&self) -> anyhow::Result<String> {
        Ok(crate::rootfs::chain_id(&self.diff_ids()?))
    }

    /// The converted layers with their TOC summaries (`image-converter inspect --json`) and
    /// TOC lengths (manifest annotations).
    pub fn converted_layers(&self) -> anyhow::Result<Vec<ConvertedLayer>> {
        let manifest = self.manifest(CONVERTED_TAG)?;
        let mut cmd = Command::new(workspace_binary("image-converter"));
        cmd.args(["inspect", "--json", self.converted()]);
        if !self.registry.starts_with("127.") {
            cmd.args(["--plain-http", &self.registry]);
        }
        let json: Value = serde_json::from_str(&run(&mut cmd)?).context("inspect --json")?;
        let layers = json["layers"].as_array().context("inspect: no layers")?;
        let annotated = manifest["layers"].as_array().context("manifest layers")?;
        ensure!(
            layers.len() == annotated.len(),
            "inspect and manifest disagree"
        );
        layers
            .iter()
            .zip(annotated)
            .map(|(l, m)| {
                let s = &l["summary"];
                let num = |v: &Value, what: &str| {
                    v.as_u64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .with_context(|| format!("inspect/manifest: no {what}"))
                };
                Ok(ConvertedLayer {
                    digest: m["digest"].as_str().unwrap_or_default().to_string(),
                    blob_size: num(&s["blob_size"], "blob_size")?,
                    stored_size: num(&s["stored_size"], "stored_size")?,
                    blocks: num(&s["blocks"], "blocks")?,
                    toc_length: num(
                        &m["annotations"][faasnet_format::annotations::TOC_LENGTH],
                        "toc-length annotation",
                    )?,
                })
            })
            .collect()
    }
}

/// `hack/images.sh expected tricky`: the output a correct runtime prints for tricky.
pub fn expected_tricky() -> anyhow::Result<String> {
    let expected = images_sh(&["expected", "tricky"])?;
    ensure!(
        expected.contains("tricky listing: "),
        "`hack/images.sh expected tricky` printed no listing summary"
    );
    Ok(expected)
}

/// Runs hack/images.sh with the images cache of hack/test.sh unless the caller set one.
pub fn images_sh(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(hack_script("images.sh"));
    cmd.args(args);
    if std::env::var_os("FAASNET_IMAGES_CACHE").is_none() {
        cmd.env("FAASNET_IMAGES_CACHE", DEFAULT_IMAGES_CACHE);
    }
    run(&mut cmd)
}

/// Runs `cmd` (stderr passed through); fails unless it exits 0; returns stdout.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out: Output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("start {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} exited with {} (its stderr is above); stdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).context("stdout is not UTF-8")
}

/// GET `url` with curl (manifest media types accepted).
pub fn http_get(url: &str) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-fsSL", "--max-time", "120"])
        .args([
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            "-H",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
        ])
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("run curl")?;
    ensure!(
        out.status.success(),
        "GET {url}: curl exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The manifest `reference` (tag or digest) of `repo` at registry `addr`, as JSON.
pub fn fetch_manifest(addr: &str, repo: &str, reference: &str) -> anyhow::Result<Value> {
    let body = http_get(&format!("http://{addr}/v2/{repo}/manifests/{reference}"))?;
    serde_json::from_slice(&body).with_context(|| format!("manifest {repo}:{reference}"))
}

/// The first line where `a` and `b` differ, for failure messages.
pub fn first_difference(expected: &str, actual: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            return format!(
                "line {}: expected {:?}\n        actual   {:?}\n({} lines expected, {} actual)",
                i + 1,
                x.unwrap_or(&"<none>"),
                y.unwrap_or(&"<none>"),
                a.len(),
                b.len()
            );
        }
    }
    "no difference".to_string()
}

/// Reads a file into a string, empty if unreadable (logs in failure messages).
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
