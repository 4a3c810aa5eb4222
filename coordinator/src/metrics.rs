//! Prometheus metrics and the tiny HTTP server that exposes them on `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label for per-RPC metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// RPC method name.
    pub method: &'static str,
    /// gRPC status code name ("ok" on success).
    pub code: &'static str,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Label of [`Metrics::probes`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `alive` or `dead`.
    pub result: &'static str,
}

/// Every metric the coordinator keeps.
pub struct Metrics {
    registry: Registry,
    /// Trees with at least one node.
    pub trees: Gauge,
    /// Nodes over all trees.
    pub nodes: Gauge,
    /// Successful joins.
    pub joins: Counter,
    /// Voluntary leaves.
    pub leaves: Counter,
    /// Nodes removed because their lease expired.
    pub expiries: Counter,
    /// Nodes removed by an admin.
    pub removals: Counter,
    /// Nodes already in a tree whose upstream changed because of a delete.
    pub rebalances: Counter,
    /// Upstream updates pushed to watchers.
    pub notifications: Counter,
    /// Reports of a failed upstream.
    pub bad_upstream_reports: Counter,
    /// Probes of a suspect node's peer address, by result (`alive`, `dead`).
    pub probes: Family<ResultLabel, Counter>,
    /// Nodes removed because their peer address did not answer a probe.
    pub unreachable_removals: Counter,
    /// RPC latency by method and outcome.
    pub rpc_latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("faasnet_coordinator");
        let m = Self {
            trees: Gauge::default(),
            nodes: Gauge::default(),
            joins: Counter::default(),
            leaves: Counter::default(),
            expiries: Counter::default(),
            removals: Counter::default(),
            rebalances: Counter::default(),
            notifications: Counter::default(),
            bad_upstream_reports: Counter::default(),
            probes: Family::default(),
            unreachable_removals: Counter::default(),
            rpc_latency: Family::new_with_constructor(latency_histogram),
            registry: Registry::default(),
        };
        registry.register(
            "trees",
            "Function trees with at least one node",
            m.trees.clone(),
        );
        registry.register("nodes", "Nodes over all trees", m.nodes.clone());
        registry.register("joins", "Successful joins", m.joins.clone());
        registry.register("leaves", "Voluntary leaves", m.leaves.clone());
        registry.register(
            "expiries",
            "Nodes removed on lease expiry",
            m.expiries.clone(),
        );
        registry.register(
            "admin_removals",
            "Nodes removed by an admin",
            m.removals.clone(),
        );
        registry.register(
            "rebalances",
            "Existing nodes whose upstream changed because of a delete",
            m.rebalances.clone(),
        );
        registry.register(
            "notifications",
            "Upstream updates pushed to watchers",
            m.notifications.clone(),
        );
        registry.register(
            "bad_upstream_reports",
            "Reports of a failed upstream",
            m.bad_upstream_reports.clone(),
        );
        registry.register(
            "probes",
            "Probes of a suspect node's peer address, by result",
            m.probes.clone(),
        );
        registry.register(
            "unreachable_removals",
            "Nodes removed because their peer address did not answer a probe",
            m.unreachable_removals.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "RPC latency by method and status",
            m.rpc_latency.clone(),
        );
        Self { registry, ..m }
    }

    /// Records one RPC.
    pub fn observe_rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.rpc_latency
            .get_or_create(&MethodLabels {
                method,
                code: code_name(code),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` resolves.
pub async fn serve_metrics(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), hyper::Error> {
    use hyper::service::{make_service_fn, service_fn};
    use hyper::{Body, Request, Response, StatusCode};

    let make = make_service_fn(move |_| {
        let metrics = metrics.clone();
        async move {
            Ok::<_, Infallible>(service_fn(move |req: Request<Body>| {
                let metrics = metrics.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Body::from(metrics.encode()))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from("try /metrics\n"))
                    };
                    Ok::<_, Infallible>(resp.expect("static response"))
                }
            }))
        }
    });
    hyper::Server::try_bind(&addr)?
        .serve(make)
        .with_graceful_shutdown(shutdown)
        .await
}
