//! Blocks and TOCs from an OCI registry (distribution v2 API) by HTTP range requests.
//!
//! `GET /v2/<repo>/blobs/<digest>` with `Range: bytes=a-b`; plain HTTP for configured insecure
//! hosts and loopback, HTTPS otherwise; the anonymous Bearer token flow on a 401 with a
//! `WWW-Authenticate: Bearer realm=...` challenge (tokens cached per repository).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use faasnet_format::{
    parse_tail, parse_toc_parts, toc_head_range, BlockEntry, Footer, TailParse, Toc,
    DEFAULT_TAIL_FETCH,
};
use reqwest::{header, Method, StatusCode};
use tracing::debug;

use super::{block_source::BlockSource, remote::ImageRef, LayerRef, LazyError, Result};

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Hosts (`host` or `host:port`) reached over plain HTTP. Loopback hosts always are.
    pub insecure_registries: Vec<String>,
    /// Timeout of one request.
    pub timeout: Option<Duration>,
}

/// The parsed TOC of a layer and what was learned fetching it.
#[derive(Debug, Clone)]
pub struct FetchedToc {
    /// The table of contents.
    pub toc: Toc,
    /// The footer.
    pub footer: Footer,
    /// Size of the whole blob.
    pub blob_size: u64,
}

/// An OCI registry client for blob ranges.
pub struct RegistrySource {
    client: reqwest::Client,
    insecure: Vec<String>,
    /// Bearer tokens by `registry/repository`.
    tokens: Mutex<HashMap<String, String>>,
}

impl RegistrySource {
    /// A client with `options`.
    pub fn new(options: RegistryOptions) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(16)
            .user_agent(concat!("faasnet-snapshotter/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = options.timeout {
            builder = builder.timeout(t);
        }
        let client = builder.build().map_err(|e| LazyError::Registry {
            url: String::new(),
            reason: format!("cannot build HTTP client: {e}"),
        })?;
        Ok(RegistrySource {
            client,
            insecure: options.insecure_registries,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Base URL of `registry` (`http://host:port` or `https://host`).
    pub fn base_url(&self, registry: &str) -> String {
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let bare = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let plain = self.insecure.iter().any(|h| h == registry || h == host)
            || bare == "localhost"
            || bare == "[::1]"
            || bare.starts_with("127.");
        format!("{}://{host}", if plain { "http" } else { "https" })
    }

    fn blob_url(&self, layer: &LayerRef) -> String {
        format!(
            "{}/v2/{}/blobs/{}",
            self.base_url(&layer.registry),
            layer.repository,
            layer.digest
        )
    }

    /// Sends a request for blob `layer`, doing the token dance once on a 401 challenge.
    async fn send(
        &self,
        layer: &LayerRef,
        method: Method,
        range: Option<(u64, u64)>,
    ) -> Result<reqwest::Response> {
        let url = self.blob_url(layer);
        let range = range.map(|(start, end)| format!("bytes={start}-{end}"));
        self.send_url(
            &url,
            &layer.registry,
            &layer.repository,
            method,
            |req| match &range {
                Some(r) => req.header(header::RANGE, r),
                None => req,
            },
        )
        .await
    }

    /// Sends a request to `url` of `registry`/`repository`, doing the token dance once on a
    /// 401 Bearer challenge; `decorate` adds headers.
    async fn send_url(
        &self,
        url: &str,
        registry: &str,
        repository: &str,
        method: Method,
        decorate: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let key = format!("{registry}/{repository}");
        for attempt in 0..2 {
            let mut req = decorate(self.client.request(method.clone(), url));
            if let Some(token) = self.tokens.lock().unwrap().get(&key) {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.map_err(|e| LazyError::Registry {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if let Some(token) = self.fetch_token(&challenge, repository).await? {
                    self.tokens.lock().unwrap().insert(key.clone(), token);
                    continue;
                }
            }
            return Ok(resp);
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The digest of the manifest `image` names (a HEAD request, unless the reference
    /// already pins a digest). It identifies the image's function tree.
    pub async fn manifest_digest(&self, image: &ImageRef) -> Result<String> {
        if let Some((_, digest)) = image.reference.rsplit_once('@') {
            return Ok(digest.to_string());
        }
        let tag = image
            .reference
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map_or("latest", |(_, t)| t);
        let url = format!(
            "{}/v2/{}/manifests/{tag}",
            self.base_url(&image.registry),
            image.repository
        );
        let accept = "application/vnd.oci.image.index.v1+json, \
                      application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json, \
                      application/vnd.docker.distribution.manifest.v2+json";
        let resp = self
            .send_url(
                &url,
                &image.registry,
                &image.repository,
                Method::HEAD,
                |r| r.header(header::ACCEPT, accept),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(LazyError::Registry {
                url,
                reason: format!("HEAD manifest answered {}", resp.status()),
            });
        }
        resp.headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or(LazyError::Registry {
                url,
                reason: "manifest answer has no Docker-Content-Digest header".into(),
            })
    }

    /// Gets an anonymous token for a `Bearer` challenge; `None` if it is not one.
    async fn fetch_token(&self, challenge: &str, repository: &str) -> Result<Option<String>> {
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return Ok(None);
        };
        let params = parse_challenge(params);
        let Some(realm) = params.get("realm") else {
            return Ok(None);
        };
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{repository}:pull"));
        query.push(("scope", scope));
        debug!(realm, "registry: fetching a bearer token");
        let resp = self
            .client
            .get(realm)
            .query(&query)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| LazyError::Registry {
                url: realm.clone(),
                reason: format!("token request: {e}"),
            })?;
        let body: serde_json::Value = resp.json().await.map_err(|e| LazyError::Registry {
            url: realm.clone(),
            reason: format!("token response: {e}"),
        })?;
        Ok(body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string))
    }

    /// Size of the blob (HEAD).
    pub async fn blob_size(&self, layer: &LayerRef) -> Result<u64> {
        let resp = self.send(layer, Method::HEAD, None).await?;
        let url = self.blob_url(layer);
        if !resp.status().is_success() {
            return Err(LazyError::Registry {
                url,
                reason: format!("HEAD answered {}", resp.status()),
            });
        }
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or(LazyError::Registry {
                url,
                reason: "HEAD answer has no Content-Length".into(),
            })
    }

    /// Fetches `len` bytes of the blob at `start`.
    pub async fn fetch_range(&self, layer: &LayerRef, start: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let resp = self
            .send(layer, Method::GET, Some((start, start + len - 1)))
            .await?;
        let url = self.blob_url(layer);
        let status = resp.status();
        // A 200 is acceptable only when the range was the whole body anyway.
        if status != StatusCode::PARTIAL_CONTENT && !(status == StatusCode::OK && start == 0) {
            return Err(LazyError::Registry {
                url,
                reason: format!("range {start}+{len} answered {status}"),
            });
        }
        let body = resp.bytes().await.map_err(|e| LazyError::Registry {
            url: url.clone(),
            reason: format!("reading range {start}+{len}: {e}"),
        })?;
        let body = if status == StatusCode::OK && body.len() as u64 > len {
            body.slice(..len as usize)
        } else {
            body
        };
        if body.len() as u64 != len {
            return Err(LazyError::Registry {
                url,
                reason: format!("range {start}+{len} returned {} bytes", body.len()),
            });
        }
        Ok(body)
    }

    /// Fetches and parses the TOC from the blob's tail: one range request for a small layer,
    /// two when the TOC is larger than [`DEFAULT_TAIL_FETCH`], the second for exactly the
    /// part of it the tail lacks (plus a HEAD when the size is unknown). A blob that is not in
    /// our format fails with a footer error ([`LazyError::is_not_our_format`]).
    pub async fn fetch_toc(&self, layer: &LayerRef, blob_size: Option<u64>) -> Result<FetchedToc> {
        let blob_size = match blob_size {
            Some(s) => s,
            None => self.blob_size(layer).await?,
        };
        let tail_len = DEFAULT_TAIL_FETCH.min(blob_size);
        let tail = self
            .fetch_range(layer, blob_size - tail_len, tail_len)
            .await?;
        let parsed = parse_tail(&tail, blob_size).map_err(|e| LazyError::format(layer, e))?;
        let (toc, footer) = match parsed {
            TailParse::Complete(toc, footer) => (*toc, footer),
            TailParse::NeedToc(footer) => {
                // Only the part of the TOC frame the tail does not hold.
                let (offset, len) = toc_head_range(&footer, blob_size, tail_len);
                let head = self.fetch_range(layer, offset, len).await?;
                let toc = parse_toc_parts(&head, &tail, &footer, blob_size)
                    .map_err(|e| LazyError::format(layer, e))?;
                (toc, footer)
            }
        };
        Ok(FetchedToc {
            toc,
            footer,
            blob_size,
        })
    }

    /// Fetches the contiguous blocks `first..first + entries.len()` in one range request and
    /// hands each block's stored bytes to `on_block` (with its index) as soon as they are in,
    /// not when the whole range is: a block fetched this way can travel down the tree while
    /// the rest of the range still arrives. An error from `on_block` ends the fetch. Returns
    /// how many blocks were handed over; an error after some were means the rest did not come.
    pub async fn fetch_blocks_each(
        &self,
        layer: &LayerRef,
        first: usize,
        entries: &[BlockEntry],
        on_block: &mut (dyn FnMut(usize, Bytes) -> Result<()> + Send),
    ) -> Result<usize> {
        let (Some(head), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(0);
        };
        let start = head.offset;
        let end = last.offset + last.stored_len;
        if entries
            .windows(2)
            .any(|w| w[0].offset + w[0].stored_len != w[1].offset)
        {
            return Err(LazyError::InvalidInput(format!(
                "blocks {first}..{} are not contiguous",
                first + entries.len()
            )));
        }
        let len = end - start;
        let mut resp = self
            .send(layer, Method::GET, Some((start, end - 1)))
            .await?;
        let url = self.blob_url(layer);
        let status = resp.status();
        if status != StatusCode::PARTIAL_CONTENT && !(status == StatusCode::OK && start == 0) {
            return Err(LazyError::Registry {
                url,
                reason: format!("range {start}+{len} answered {status}"),
            });
        }
        let mut buf = bytes::BytesMut::new();
        let mut next = 0usize;
        while next < entries.len() {
            let chunk = resp.chunk().await.map_err(|e| LazyError::Registry {
                url: url.clone(),
                reason: format!("reading range {start}+{len}: {e}"),
            })?;
            let Some(chunk) = chunk else {
                return Err(LazyError::Registry {
                    url,
                    reason: format!(
                        "range {start}+{len} ended after {} of {} blocks",
                        next,
                        entries.len()
                    ),
                });
            };
            buf.extend_from_slice(&chunk);
            while next < entries.len() && buf.len() as u64 >= entries[next].stored_len {
                let block = buf.split_to(entries[next].stored_len as usize).freeze();
                on_block(first + next, block)?;
                next += 1;
            }
        }
        Ok(next)
    }
}

#[async_trait]
impl BlockSource for RegistrySource {
    async fn fetch(&self, layer: &LayerRef, _index: usize, entry: &BlockEntry) -> Result<Bytes> {
        self.fetch_range(layer, entry.offset, entry.stored_len)
            .await
    }
}

/// Parses `k="v",k2="v2"` of a `WWW-Authenticate` challenge.
fn parse_challenge(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, a)) => (v.to_string(), a),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, a)) => (v.trim().to_string(), a),
                None => (after.trim().to_string(), ""),
            }
        };
        out.insert(key, value);
        rest = after.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing() {
        let p = parse_challenge(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
    }

    #[test]
    fn plain_http_for_loopback_and_configured_hosts() {
        let r = RegistrySource::new(RegistryOptions {
            insecure_registries: vec!["reg.local:5000".into()],
            timeout: None,
        })
        .unwrap();
        assert_eq!(r.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(r.base_url("localhost"), "http://localhost");
        assert_eq!(r.base_url("reg.local:5000"), "http://reg.local:5000");
        assert_eq!(r.base_url("ghcr.io"), "https://ghcr.io");
        assert_eq!(r.base_url("docker.io"), "https://registry-1.docker.io");
    }
}
