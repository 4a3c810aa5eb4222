//! A small OCI distribution (registry v2) client: resolve manifests, stream or range-read
//! blobs, HEAD blobs, push blobs from files and push manifests.
//!
//! Written on reqwest rather than a full OCI crate so that blobs are always streamed (never
//! held whole in memory) and range reads, needed by the snapshotter for on-demand block
//! fetches, are first class. Authentication: basic credentials from the docker config file
//! (`~/.docker/config.json` or `$DOCKER_CONFIG/config.json`, `auths.<host>.auth`), sent to
//! the registry directly or exchanged for a bearer token when the registry asks for one.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;

use base64::Engine as _;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use thiserror::Error;

use crate::manifest::media_types;
pub use crate::reference::Reference;

/// A stream of blob bytes.
pub type BlobStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Largest manifest accepted (the distribution spec suggests registries cap them at 4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 8 * 1024 * 1024;

/// Media types asked for when resolving a manifest.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Errors of the registry client. Every variant names the registry host.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },

    #[error("cannot reach registry {host}: {detail}")]
    Unreachable { host: String, detail: String },

    #[error("{what} not found in {host}/{repository}")]
    NotFound {
        host: String,
        repository: String,
        what: String,
    },

    #[error("registry {host} denied access to {repository}: {detail}")]
    Unauthorized {
        host: String,
        repository: String,
        detail: String,
    },

    #[error("registry {host}: {method} {url} answered {status}: {body}")]
    Status {
        host: String,
        method: String,
        url: String,
        status: u16,
        body: String,
    },

    #[error("registry {host}: {detail}")]
    Protocol { host: String, detail: String },

    #[error("reading docker config {path}: {detail}")]
    DockerConfig { path: PathBuf, detail: String },

    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A manifest as fetched: its raw bytes (digests are computed over them), media type and
/// digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

/// How to build a [`RegistryClient`].
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// Hosts (`host` or `host:port`) spoken to over plain HTTP. `localhost`, `127.0.0.1`
    /// and `::1` always are.
    pub plain_http: Vec<String>,
    /// Docker config file to read credentials from; default `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

/// Registry client; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    plain_http: Vec<String>,
    /// Basic credentials per registry host, `user:password`.
    credentials: HashMap<String, String>,
    /// Bearer tokens per (host, scope).
    tokens: Mutex<HashMap<(String, String), String>>,
}

impl RegistryClient {
    /// Builds a client, reading credentials from the docker config file if there is one.
    pub fn new(config: ClientConfig) -> Result<RegistryClient, RegistryError> {
        let path = config.docker_config.clone().or_else(default_docker_config);
        let credentials = match path {
            Some(p) if p.exists() => read_docker_credentials(&p)?,
            _ => HashMap::new(),
        };
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "faasnet-image-converter/",
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(|e| RegistryError::Protocol {
                host: "-".into(),
                detail: format!("cannot build HTTP client: {}", error_chain(&e)),
            })?;
        Ok(RegistryClient {
            http,
            plain_http: config.plain_http,
            credentials,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// `http` or `https` for `host`.
    fn scheme(&self, host: &str) -> &'static str {
        let name = host_name(host);
        let local = matches!(name, "localhost" | "127.0.0.1" | "::1" | "[::1]");
        if local
            || self
                .plain_http
                .iter()
                .any(|h| h == host || (!h.contains(':') && h == name))
        {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, r: &Reference, tail: &str) -> String {
        format!(
            "{}://{}/v2/{}/{tail}",
            self.scheme(&r.registry),
            r.registry,
            r.repository
        )
    }

    /// Fetches the manifest `r` points at (by digest if it has one, else by tag).
    pub async fn resolve_manifest(&self, r: &Reference) -> Result<FetchedManifest, RegistryError> {
        self.fetch_manifest(r, r.reference()).await
    }

    /// Fetches the manifest `reference` (a tag or digest) of `r`'s repository. When fetched
    /// by digest, the bytes are checked against it.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = self.url(r, &format!("manifests/{reference}"));
        let resp = self
            .send(r, "pull", &|c| {
                Ok(c.get(&url).header(ACCEPT, MANIFEST_ACCEPT))
            })
            .await?;
        let resp = self
            .check(r, resp, "GET", &url, &format!("manifest {reference}"))
            .await?;
        let header_type = content_type(resp.headers());
        let bytes = read_limited(r, resp, MAX_MANIFEST_SIZE).await?;
        let digest = faasnet_format::sha256_digest(&bytes);
        if reference.starts_with("sha256:") && reference != digest {
            return Err(RegistryError::Protocol {
                host: r.registry.clone(),
                detail: format!("manifest {reference} has digest {digest}"),
            });
        }
        let media_type = crate::manifest::detect_media_type(&bytes, header_type.as_deref())
            .unwrap_or_else(|| header_type.unwrap_or_default());
        Ok(FetchedManifest {
            bytes: bytes.to_vec(),
            media_type,
            digest,
        })
    }

    /// Size of blob `digest`, or `None` if the registry does not have it (HEAD request).
    pub async fn blob_size(
        &self,
        r: &Reference,
        digest: &str,
    ) -> Result<Option<u64>, RegistryError> {
        let url = self.url(r, &format!("blobs/{digest}"));
        let resp = self.send(r, "pull", &|c| Ok(c.head(&url))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self
            .check(r, resp, "HEAD", &url, &format!("blob {digest}"))
            .await?;
        Ok(resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// Streams blob `digest`. The caller verifies the digest of what it reads (the bytes are
    /// passed through as they arrive so that memory stays bounded).
    pub async fn fetch_blob_stream(
        &self,
        r: &Reference,
        digest: &str,
    ) -> Result<BlobStream, RegistryError> {
        let url = self.url(r, &format!("blobs/{digest}"));
        let resp = self.send(r, "pull", &|c| Ok(c.get(&url))).await?;
        let resp = self
            .check(r, resp, "GET", &url, &format!("blob {digest}"))
            .await?;
        let host = r.registry.clone();
        Ok(Box::pin(resp.bytes_stream().map_err(move |e| {
            io::Error::other(format!("reading from registry {host}: {}", error_chain(&e)))
        })))
    }

    /// Reads a whole small blob into memory and checks its digest. Refuses blobs larger than
    /// `max` bytes.
    pub async fn fetch_blob(
        &self,
        r: &Reference,
        digest: &str,
        max: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let url = self.url(r, &format!("blobs/{digest}"));
        let resp = self.send(r, "pull", &|c| Ok(c.get(&url))).await?;
        let resp = self
            .check(r, resp, "GET", &url, &format!("blob {digest}"))
            .await?;
        let bytes = read_limited(r, resp, max).await?;
        let actual = faasnet_format::sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::Protocol {
                host: r.registry.clone(),
                detail: format!("blob {digest} has digest {actual}"),
            });
        }
        Ok(bytes.to_vec())
    }

    /// Reads `len` bytes of blob `digest` from `offset` (HTTP Range request).
    pub async fn fetch_blob_range(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = self.url(r, &format!("blobs/{digest}"));
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let resp = self
            .send(r, "pull", &|c| Ok(c.get(&url).header(RANGE, &range)))
            .await?;
        let status = resp.status();
        let resp = self
            .check(r, resp, "GET", &url, &format!("blob {digest}"))
            .await?;
        if status == StatusCode::PARTIAL_CONTENT {
            let bytes = read_limited(r, resp, len as usize).await?;
            if bytes.len() as u64 != len {
                return Err(RegistryError::Protocol {
                    host: r.registry.clone(),
                    detail: format!(
                        "range {range} of blob {digest} returned {} bytes",
                        bytes.len()
                    ),
                });
            }
            return Ok(bytes);
        }
        // The registry ignored the Range header: skip to the range in the full body rather
        // than buffering the whole blob.
        let mut stream = resp.bytes_stream();
        let mut skipped = 0u64;
        let mut out = Vec::with_capacity(len as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.unreachable(r, &e))?;
            let start = offset.saturating_sub(skipped).min(chunk.len() as u64) as usize;
            skipped += chunk.len() as u64;
            let want = len as usize - out.len();
            let end = (start + want).min(chunk.len());
            out.extend_from_slice(&chunk[start..end]);
            if out.len() as u64 == len {
                return Ok(Bytes::from(out));
            }
        }
        Err(RegistryError::Protocol {
            host: r.registry.clone(),
            detail: format!("blob {digest} ends before {}", offset + len),
        })
    }

    /// Uploads the file at `path` as blob `digest` (`size` bytes) with a monolithic PUT,
    /// streaming the file. Does nothing if the registry already has the blob.
    pub async fn push_blob_file(
        &self,
        r: &Reference,
        path: &Path,
        digest: &str,
        size: u64,
    ) -> Result<(), RegistryError> {
        if self.blob_size(r, digest).await? == Some(size) {
            return Ok(());
        }
        let location = self.start_upload(r).await?;
        let url = upload_url(&location, digest);
        let resp = self
            .send(r, "pull,push", &|c| {
                let file = std::fs::File::open(path)?;
                Ok(c.put(&url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size)
                    .body(tokio::fs::File::from_std(file)))
            })
            .await?;
        self.check(r, resp, "PUT", &url, &format!("upload of blob {digest}"))
            .await?;
        Ok(())
    }

    /// Uploads a small in-memory blob. Does nothing if the registry already has it.
    pub async fn push_blob_bytes(
        &self,
        r: &Reference,
        data: Bytes,
        digest: &str,
    ) -> Result<(), RegistryError> {
        if self.blob_size(r, digest).await? == Some(data.len() as u64) {
            return Ok(());
        }
        let location = self.start_upload(r).await?;
        let url = upload_url(&location, digest);
        let resp = self
            .send(r, "pull,push", &|c| {
                Ok(c.put(&url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(data.clone()))
            })
            .await?;
        self.check(r, resp, "PUT", &url, &format!("upload of blob {digest}"))
            .await?;
        Ok(())
    }

    /// Pushes a manifest under `reference` (a tag, or its own digest). Returns its digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String, RegistryError> {
        let url = self.url(r, &format!("manifests/{reference}"));
        let body = Bytes::copy_from_slice(bytes);
        let resp = self
            .send(r, "pull,push", &|c| {
                Ok(c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone()))
            })
            .await?;
        self.check(r, resp, "PUT", &url, &format!("manifest {reference}"))
            .await?;
        Ok(faasnet_format::sha256_digest(bytes))
    }

    /// Starts a blob upload; returns the absolute upload URL.
    async fn start_upload(&self, r: &Reference) -> Result<String, RegistryError> {
        let url = self.url(r, "blobs/uploads/");
        let resp = self
            .send(r, "pull,push", &|c| {
                Ok(c.post(&url).header(CONTENT_LENGTH, 0))
            })
            .await?;
        let resp = self.check(r, resp, "POST", &url, "blob upload").await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                host: r.registry.clone(),
                detail: "blob upload answer has no Location header".into(),
            })?;
        if location.starts_with("http://") || location.starts_with("https://") {
            Ok(location.to_string())
        } else {
            Ok(format!(
                "{}://{}{location}",
                self.scheme(&r.registry),
                r.registry
            ))
        }
    }

    /// Sends a request built by `build`, handling authentication: sends what credentials we
    /// have, and on a 401 with a bearer challenge fetches a token and retries once. `build`
    /// is called again for the retry because a streaming body cannot be replayed.
    async fn send(
        &self,
        r: &Reference,
        actions: &str,
        build: &(dyn Fn(&reqwest::Client) -> io::Result<RequestBuilder> + Sync),
    ) -> Result<Response, RegistryError> {
        let scope = format!("repository:{}:{actions}", r.repository);
        let key = (r.registry.clone(), scope.clone());
        for attempt in 0..2 {
            let mut req = build(&self.http)?;
            let token = self.tokens.lock().expect("token cache").get(&key).cloned();
            if let Some(t) = token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            } else if let Some(c) = self.credentials.get(&r.registry) {
                req = req.header(AUTHORIZATION, basic(c));
            }
            let resp = req.send().await.map_err(|e| self.unreachable(r, &e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let Some(params) = parse_bearer_challenge(&challenge) else {
                return Err(RegistryError::Unauthorized {
                    host: r.registry.clone(),
                    repository: r.repository.clone(),
                    detail: if self.credentials.contains_key(&r.registry) {
                        "credentials from the docker config were rejected".into()
                    } else {
                        format!("no credentials for {} in the docker config", r.registry)
                    },
                });
            };
            let token = self.fetch_token(r, &params, &scope).await?;
            self.tokens
                .lock()
                .expect("token cache")
                .insert(key.clone(), token);
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Exchanges credentials (or nothing, for anonymous pulls) for a bearer token.
    async fn fetch_token(
        &self,
        r: &Reference,
        params: &HashMap<String, String>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let realm = params.get("realm").ok_or_else(|| RegistryError::Protocol {
            host: r.registry.clone(),
            detail: "bearer challenge without a realm".into(),
        })?;
        let mut query = vec![("scope", scope.to_string())];
        if let Some(s) = params.get("service") {
            query.push(("service", s.clone()));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(c) = self.credentials.get(&r.registry) {
            req = req.header(AUTHORIZATION, basic(c));
        }
        let resp = req.send().await.map_err(|e| self.unreachable(r, &e))?;
        if !resp.status().is_success() {
            return Err(RegistryError::Unauthorized {
                host: r.registry.clone(),
                repository: r.repository.clone(),
                detail: format!("token server {realm} answered {}", resp.status()),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = resp.json().await.map_err(|e| RegistryError::Protocol {
            host: r.registry.clone(),
            detail: format!("token server {realm}: {}", error_chain(&e)),
        })?;
        answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| RegistryError::Protocol {
                host: r.registry.clone(),
                detail: format!("token server {realm} returned no token"),
            })
    }

    /// Turns a non-success answer into an error that says what was asked for.
    async fn check(
        &self,
        r: &Reference,
        resp: Response,
        method: &str,
        url: &str,
        what: &str,
    ) -> Result<Response, RegistryError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::NOT_FOUND && method != "PUT" && method != "POST" {
            return Err(RegistryError::NotFound {
                host: r.registry.clone(),
                repository: r.repository.clone(),
                what: what.to_string(),
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                host: r.registry.clone(),
                repository: r.repository.clone(),
                detail: format!("{method} {what} answered {status}"),
            });
        }
        let mut body = resp.text().await.unwrap_or_default();
        body.truncate(1000);
        Err(RegistryError::Status {
            host: r.registry.clone(),
            method: method.to_string(),
            url: url.to_string(),
            status: status.as_u16(),
            body,
        })
    }

    fn unreachable(&self, r: &Reference, e: &reqwest::Error) -> RegistryError {
        RegistryError::Unreachable {
            host: r.registry.clone(),
            detail: error_chain(e),
        }
    }

    /// Issues an arbitrary request against `r`'s repository (used by tests and tools).
    pub async fn raw(
        &self,
        r: &Reference,
        method: Method,
        tail: &str,
    ) -> Result<Response, RegistryError> {
        let url = self.url(r, tail);
        self.send(r, "pull", &|c| Ok(c.request(method.clone(), &url)))
            .await
    }
}

/// The upload URL with the `digest` query parameter appended.
fn upload_url(location: &str, digest: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

/// Reads a response body, refusing more than `max` bytes.
async fn read_limited(r: &Reference, resp: Response, max: usize) -> Result<Bytes, RegistryError> {
    if let Some(len) = resp.content_length() {
        if len > max as u64 {
            return Err(RegistryError::Protocol {
                host: r.registry.clone(),
                detail: format!("answer of {len} bytes exceeds the {max}-byte limit"),
            });
        }
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| RegistryError::Unreachable {
            host: r.registry.clone(),
            detail: error_chain(&e),
        })?;
        if out.len() + chunk.len() > max {
            return Err(RegistryError::Protocol {
                host: r.registry.clone(),
                detail: format!("answer exceeds the {max}-byte limit"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

fn content_type(h: &HeaderMap) -> Option<String> {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
        .filter(|s| {
            s != "application/json"
                && s != "text/plain"
                && s != "application/octet-stream"
                && !s.is_empty()
        })
        .filter(|s| media_types::is_manifest(s))
}

/// The host name without the port.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map_or(host, |h| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn basic(user_pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

/// Renders an error with all its sources, so that "connection refused" is not lost behind
/// "error sending request".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
fn parse_bearer_challenge(h: &str) -> Option<HashMap<String, String>> {
    let rest = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))?;
    let mut out = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_lowercase();
        let (value, after) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key, value);
        s = after.trim_start_matches(',').trim();
    }
    Some(out)
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Reads `auths` from a docker config file: registry host → `user:password`.
pub fn read_docker_credentials(path: &Path) -> Result<HashMap<String, String>, RegistryError> {
    let err = |detail: String| RegistryError::DockerConfig {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Auth {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: HashMap<String, Auth>,
    }
    let config: Config = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut out = HashMap::new();
    for (key, a) in config.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let host = match host.as_str() {
            "index.docker.io" | "docker.io" => crate::reference::DOCKER_HUB_HOST.to_string(),
            _ => host,
        };
        let user_pass = match (a.auth, a.username, a.password) {
            (Some(auth), _, _) if !auth.is_empty() => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| err(format!("auths.{key}.auth is not base64: {e}")))?;
                String::from_utf8(raw).map_err(|_| err(format!("auths.{key}.auth is not UTF-8")))?
            }
            (_, Some(u), Some(p)) => format!("{u}:{p}"),
            _ => continue,
        };
        out.insert(host, user_pass);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge() {
        let p = parse_bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert!(parse_bearer_challenge("Basic realm=x").is_none());
    }

    #[test]
    fn plain_http_hosts() {
        let c = RegistryClient::new(ClientConfig {
            plain_http: vec!["reg.local".into(), "other:8080".into()],
            docker_config: Some("/nonexistent".into()),
        })
        .unwrap();
        assert_eq!(c.scheme("127.0.0.1:5000"), "http");
        assert_eq!(c.scheme("localhost"), "http");
        assert_eq!(c.scheme("reg.local:5000"), "http");
        assert_eq!(c.scheme("other:8080"), "http");
        assert_eq!(c.scheme("other:9090"), "https");
        assert_eq!(c.scheme("example.com"), "https");
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"reg:5000":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        let c = read_docker_credentials(&p).unwrap();
        assert_eq!(c[crate::reference::DOCKER_HUB_HOST], "u:p");
        assert_eq!(c["reg:5000"], "a:b");
    }
}
