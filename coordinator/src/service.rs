//! The gRPC services: `Coordinator` for VMs (tenant tokens) and `Admin` (admin token).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::forest::{Forest, ForestError, RemoveReason, TreeSummary};
use crate::health::{Health, Suspicion};
use crate::metrics::Metrics;
use crate::pb;
use crate::upstream::TreeKey;

impl From<ForestError> for Status {
    fn from(e: ForestError) -> Self {
        let msg = e.to_string();
        match e {
            ForestError::UnknownTree { .. } | ForestError::UnknownNode { .. } => {
                Status::not_found(msg)
            }
            ForestError::Duplicate { .. } => Status::already_exists(msg),
            ForestError::Invalid(_) => Status::invalid_argument(msg),
            ForestError::Storage(_) => Status::internal(msg),
            ForestError::Unavailable => Status::unavailable(msg),
        }
    }
}

/// Who may call what: tenant tokens for the `Coordinator` service, the admin token for
/// `Admin`.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tenant_by_token: HashMap<String, String>,
    admin_token: Option<String>,
}

fn bearer(meta: &MetadataMap) -> Result<&str, Status> {
    let missing = || {
        Status::unauthenticated(
            "missing or malformed authorization metadata: send `authorization: Bearer <token>`",
        )
    };
    let value = meta.get("authorization").ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    value.strip_prefix("Bearer ").ok_or_else(missing)
}

impl Auth {
    /// Tokens from the config.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            tenant_by_token: cfg
                .tenants
                .iter()
                .map(|(name, t)| (t.token.clone(), name.clone()))
                .collect(),
            admin_token: cfg.admin_token.clone(),
        }
    }

    /// Checks that the caller holds the token of `tenant`.
    pub fn tenant(&self, meta: &MetadataMap, tenant: &str) -> Result<(), Status> {
        let token = bearer(meta)?;
        match self.tenant_by_token.get(token) {
            Some(owner) if owner == tenant => Ok(()),
            Some(owner) => Err(Status::permission_denied(format!(
                "the token belongs to tenant {owner:?} but the request names tenant {tenant:?}: \
                 a VM may only use its own tenant's trees"
            ))),
            None if self.admin_token.as_deref() == Some(token) => Err(Status::permission_denied(
                "the admin token cannot make tenant calls; use the tenant's token",
            )),
            None => Err(Status::unauthenticated("unknown token")),
        }
    }

    /// Checks that the caller holds the admin token.
    pub fn admin(&self, meta: &MetadataMap) -> Result<(), Status> {
        let token = bearer(meta)?;
        match &self.admin_token {
            Some(t) if t == token => Ok(()),
            Some(_) if self.tenant_by_token.contains_key(token) => Err(Status::permission_denied(
                "a tenant token cannot make admin calls; use the admin token",
            )),
            Some(_) => Err(Status::unauthenticated("unknown token")),
            None => Err(Status::permission_denied(
                "the admin service is disabled: no admin_token in the coordinator's config",
            )),
        }
    }
}

/// Implements both gRPC services over one [`Forest`].
#[derive(Clone)]
pub struct CoordinatorService {
    forest: Arc<Forest>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
    health: Option<Arc<Health>>,
}

fn node_key(r: &pb::NodeRef) -> TreeKey {
    TreeKey::new(r.tenant.clone(), r.function.clone())
}

fn summary(s: &TreeSummary) -> pb::TreeSummary {
    pb::TreeSummary {
        tenant: s.key.tenant.clone(),
        function: s.key.function.clone(),
        nodes: s.nodes as u64,
        height: s.height,
        epoch: s.epoch,
    }
}

impl CoordinatorService {
    /// A service over `forest`.
    pub fn new(forest: Arc<Forest>, auth: Auth, metrics: Arc<Metrics>) -> Self {
        Self {
            forest,
            auth: Arc::new(auth),
            metrics,
            health: None,
        }
    }

    /// Probes suspect nodes (reported by a child, or whose watch stream closed) with
    /// `health` and removes the dead ones; without it only leases remove nodes.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Runs one RPC body, recording its latency and outcome.
    async fn timed<T>(
        &self,
        method: &'static str,
        body: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let result = body.await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => {
                tracing::debug!(method, code = ?s.code(), message = s.message(), "request refused");
                s.code()
            }
        };
        self.metrics.observe_rpc(method, code, start.elapsed());
        result.map(Response::new)
    }

    fn ttl_ms(&self) -> u64 {
        self.forest.lease_ttl().as_millis() as u64
    }
}

/// The stream type of `Watch`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Upstream, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %req.get_ref().tenant, node = %req.get_ref().node_id))]
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.timed("join", async {
            let r = req.get_ref();
            self.auth.tenant(req.metadata(), &r.tenant)?;
            let key = TreeKey::new(r.tenant.clone(), r.function.clone());
            let up = self
                .forest
                .join(&key, &r.node_id, &r.peer_addr, Instant::now())
                .await?;
            Ok(pb::JoinResponse {
                upstream: Some((&up).into()),
                lease_ttl_ms: self.ttl_ms(),
            })
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %req.get_ref().tenant, node = %req.get_ref().node_id))]
    async fn leave(
        &self,
        req: Request<pb::NodeRef>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.timed("leave", async {
            let r = req.get_ref();
            self.auth.tenant(req.metadata(), &r.tenant)?;
            let epoch = self
                .forest
                .remove(&node_key(r), &r.node_id, RemoveReason::Left)
                .await?;
            Ok(pb::LeaveResponse { epoch })
        })
        .await
    }

    async fn heartbeat(
        &self,
        req: Request<pb::NodeRef>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.timed("heartbeat", async {
            let r = req.get_ref();
            self.auth.tenant(req.metadata(), &r.tenant)?;
            let epoch = self
                .forest
                .heartbeat(&node_key(r), &r.node_id, Instant::now())?;
            Ok(pb::HeartbeatResponse {
                lease_ttl_ms: self.ttl_ms(),
                epoch,
            })
        })
        .await
    }

    async fn get_node(
        &self,
        req: Request<pb::NodeRef>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        self.timed("get_node", async {
            let r = req.get_ref();
            self.auth.tenant(req.metadata(), &r.tenant)?;
            let s = self.forest.node_status(&node_key(r), &r.node_id).await?;
            Ok(pb::NodeStatus {
                upstream: Some((&s.upstream).into()),
                peer_addr: s.peer_addr,
                depth: s.depth,
            })
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn report_bad_upstream(
        &self,
        req: Request<pb::BadUpstreamReport>,
    ) -> Result<Response<pb::BadUpstreamAdvice>, Status> {
        self.timed("report_bad_upstream", async {
            let r = req.get_ref();
            let node = r
                .node
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("node is missing"))?;
            self.auth.tenant(req.metadata(), &node.tenant)?;
            let key = node_key(node);
            if let (Some(health), false) = (&self.health, r.bad_node_id.is_empty()) {
                // Answered after the probe, so a removal shows in the advice at once.
                let verdict = health
                    .check(
                        &key,
                        &r.bad_node_id,
                        Suspicion::Reported { by: &node.node_id },
                    )
                    .await;
                tracing::debug!(tree = %key, bad = %r.bad_node_id, ?verdict, "bad upstream checked");
            }
            let (up, fallbacks) = self
                .forest
                .bad_upstream(&node_key(node), &node.node_id, &r.bad_node_id)
                .await?;
            Ok(pb::BadUpstreamAdvice {
                upstream: Some((&up).into()),
                fallbacks: fallbacks
                    .into_iter()
                    .map(|(node_id, addr)| pb::Peer { node_id, addr })
                    .collect(),
            })
        })
        .await
    }

    type WatchStream = WatchStream;

    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %req.get_ref().tenant, node = %req.get_ref().node_id))]
    async fn watch(&self, req: Request<pb::NodeRef>) -> Result<Response<WatchStream>, Status> {
        self.timed("watch", async {
            let r = req.get_ref();
            self.auth.tenant(req.metadata(), &r.tenant)?;
            let key = node_key(r);
            let rx = self.forest.watch(&key, &r.node_id).await?;
            let farewell = format!(
                "node {:?} left the tree of function {} (left, lease expired or removed): join again",
                r.node_id, key.function
            );
            // First the current upstream, then every change; when the node leaves, the
            // sender is dropped and the stream ends with NOT_FOUND.
            let guard = WatchGuard {
                health: self.health.clone(),
                key: key.clone(),
                node_id: r.node_id.clone(),
            };
            let stream = futures::stream::unfold(
                (rx, true, Some(farewell)),
                |(mut rx, first, farewell)| async move {
                    if !first && rx.changed().await.is_err() {
                        let msg = farewell?;
                        return Some((Err(Status::not_found(msg)), (rx, false, None)));
                    }
                    let up = pb::Upstream::from(&*rx.borrow_and_update());
                    Some((Ok(up), (rx, false, farewell)))
                },
            );
            // The guard lives as long as the stream: when the VM's connection dies, the
            // stream is dropped and the node becomes a suspect.
            let stream = stream.map(move |item| {
                let _ = &guard;
                item
            });
            Ok(Box::pin(stream) as WatchStream)
        })
        .await
    }
}

/// Held by a watch stream; when the stream goes (the VM disconnected, or the node left),
/// a node still in the tree with nobody watching it is checked.
struct WatchGuard {
    health: Option<Arc<Health>>,
    key: TreeKey,
    node_id: String,
}

/// How long after a watch stream closes the node is probed: the dying process closes its
/// coordinator connection and its peer listener at nearly the same moment.
const WATCH_CLOSED_PROBE_DELAY: Duration = Duration::from_millis(100);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let Some(health) = self.health.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = self.key.clone();
        let node_id = std::mem::take(&mut self.node_id);
        rt.spawn(async move {
            tokio::time::sleep(WATCH_CLOSED_PROBE_DELAY).await;
            health.check(&key, &node_id, Suspicion::WatchClosed).await;
        });
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for CoordinatorService {
    async fn list_trees(
        &self,
        req: Request<pb::ListTreesRequest>,
    ) -> Result<Response<pb::ListTreesResponse>, Status> {
        self.timed("admin_list_trees", async {
            self.auth.admin(req.metadata())?;
            let tenant = Some(req.get_ref().tenant.as_str()).filter(|t| !t.is_empty());
            let trees = self.forest.list_trees(tenant).iter().map(summary).collect();
            Ok(pb::ListTreesResponse { trees })
        })
        .await
    }

    async fn get_tree(&self, req: Request<pb::TreeRef>) -> Result<Response<pb::TreeView>, Status> {
        self.timed("admin_get_tree", async {
            self.auth.admin(req.metadata())?;
            let r = req.get_ref();
            let view = self.forest.tree_view(
                &TreeKey::new(r.tenant.clone(), r.function.clone()),
                Instant::now(),
            )?;
            Ok(pb::TreeView {
                summary: Some(summary(&view.summary)),
                nodes: view
                    .nodes
                    .into_iter()
                    .map(|n| pb::TreeNode {
                        node_id: n.node_id,
                        peer_addr: n.addr,
                        position: n.position as u64,
                        parent_id: n.parent.unwrap_or_default(),
                        lease_remaining_ms: n
                            .lease_remaining
                            .min(Duration::from_secs(u32::MAX as u64))
                            .as_millis() as u64,
                    })
                    .collect(),
            })
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(tenant = %req.get_ref().tenant, node = %req.get_ref().node_id))]
    async fn remove_node(
        &self,
        req: Request<pb::NodeRef>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.timed("admin_remove_node", async {
            self.auth.admin(req.metadata())?;
            let r = req.get_ref();
            let epoch = self
                .forest
                .remove(&node_key(r), &r.node_id, RemoveReason::Admin)
                .await?;
            tracing::info!(tenant = %r.tenant, function = %r.function, node = %r.node_id, "removed by admin");
            Ok(pb::LeaveResponse { epoch })
        })
        .await
    }
}
