//! Prometheus metrics of the snapshotter, and the HTTP endpoint that serves them.
//!
//! Everything lives in one [`Metrics`] registry with the `faasnet_snapshotter` prefix.
//! Other parts of the daemon (the lazy path's block cache, block sources, peer server)
//! register their own metrics into it with [`Metrics::register`] or
//! [`Metrics::with_registry`] before the endpoint starts serving.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, sync::Mutex};

use hyper::{
    server::conn::AddrIncoming,
    service::{make_service_fn, service_fn},
    Body, Method, Request, Response, StatusCode,
};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family},
    registry::{Metric, Registry},
};

/// Labels of [`Metrics::errors`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The snapshots API operation (`prepare`, `commit`, ...).
    pub op: String,
    /// The gRPC code returned (`not_found`, `already_exists`, ...).
    pub code: String,
}

/// The snapshotter's metrics and their registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Prepare requests.
    pub prepares: Counter,
    /// View requests.
    pub views: Counter,
    /// Commit requests.
    pub commits: Counter,
    /// Remove requests.
    pub removes: Counter,
    /// Layers committed as remote snapshots at Prepare (containerd skipped their download).
    pub remote_prepares: Counter,
    /// Remote-layer attempts that failed and fell back to the ordinary path.
    pub remote_fallbacks: Counter,
    /// Remote snapshots that could not be mounted again at startup.
    pub remote_restore_failures: Counter,
    /// Requests that returned an error, by operation and gRPC code.
    pub errors: Family<ErrorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the snapshotter's own metrics registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("faasnet_snapshotter");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            prepares: Counter::default(),
            views: Counter::default(),
            commits: Counter::default(),
            removes: Counter::default(),
            remote_prepares: Counter::default(),
            remote_fallbacks: Counter::default(),
            remote_restore_failures: Counter::default(),
            errors: Family::default(),
        };
        registry.register("prepares", "Prepare requests", m.prepares.clone());
        registry.register("views", "View requests", m.views.clone());
        registry.register("commits", "Commit requests", m.commits.clone());
        registry.register("removes", "Remove requests", m.removes.clone());
        registry.register(
            "remote_prepares",
            "Layers committed as remote (lazily mounted) snapshots at Prepare",
            m.remote_prepares.clone(),
        );
        registry.register(
            "remote_fallbacks",
            "Remote-layer attempts that failed and fell back to unpacking",
            m.remote_fallbacks.clone(),
        );
        registry.register(
            "remote_restore_failures",
            "Remote snapshots that could not be mounted again at startup",
            m.remote_restore_failures.clone(),
        );
        registry.register(
            "errors",
            "Snapshots API requests that returned an error, by operation and gRPC code",
            m.errors.clone(),
        );
        *m.registry.lock().unwrap() = registry;
        m
    }

    /// Registers `metric` as `faasnet_snapshotter_<name>`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.with_registry(|r| r.register(name, help, metric));
    }

    /// Runs `f` on the registry (e.g. to make a sub-registry with its own prefix:
    /// `r.sub_registry_with_prefix("lazy")`).
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Counts an error returned by `op`.
    pub fn error(&self, op: &str, code: tonic::Code) {
        let code = format!("{code:?}");
        self.errors
            .get_or_create(&ErrorLabels {
                op: op.to_string(),
                code: to_snake(&code),
            })
            .inc();
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        self.with_registry(|r| encode(&mut out, r))
            .expect("writing to a String cannot fail");
        out
    }
}

fn to_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The metrics endpoint bound to its address, not yet serving.
pub struct Endpoint {
    incoming: AddrIncoming,
    metrics: Arc<Metrics>,
}

impl Endpoint {
    /// Binds `addr` (port 0 picks a free port; see [`Endpoint::local_addr`]).
    pub fn bind(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Self, hyper::Error> {
        Ok(Endpoint {
            incoming: AddrIncoming::bind(&addr)?,
            metrics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.incoming.local_addr()
    }

    /// Serves `GET /metrics` (Prometheus text) until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), hyper::Error> {
        let metrics = self.metrics;
        let make = make_service_fn(move |_conn| {
            let metrics = metrics.clone();
            async move {
                Ok::<_, Infallible>(service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                }))
            }
        });
        hyper::Server::builder(self.incoming)
            .serve(make)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

fn respond(req: &Request<Body>, metrics: &Metrics) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            *resp.body_mut() = Body::from(metrics.encode());
        }
        _ => *resp.status_mut() = StatusCode::NOT_FOUND,
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_and_extra_metrics() {
        let m = Metrics::new();
        m.prepares.inc();
        m.error("remove", tonic::Code::FailedPrecondition);
        let extra = Counter::<u64>::default();
        extra.inc_by(7);
        m.register("lazy_blocks_fetched", "test", extra);
        let text = m.encode();
        assert!(
            text.contains("faasnet_snapshotter_prepares_total 1"),
            "{text}"
        );
        assert!(
            text.contains("faasnet_snapshotter_lazy_blocks_fetched_total 7"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"faasnet_snapshotter_errors_total{op="remove",code="failed_precondition"} 1"#
            ),
            "{text}"
        );
    }
}
