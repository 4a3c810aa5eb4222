//! The client library VMs use to talk to the coordinator.
//!
//! Two levels:
//! - [`CoordinatorClient`]: one call per method (join, leave, heartbeat, upstream, watch,
//!   report a bad upstream).
//! - [`TreeMembership`]: joins a tree and keeps the VM in it from background tasks
//!   (heartbeats, the watch stream, reconnects with exponential backoff, re-joining if the
//!   coordinator forgot the node). The current upstream is a
//!   [`tokio::sync::watch::Receiver<Upstream>`]; the last known upstream stays valid while
//!   the coordinator is unreachable, so the data plane keeps working.
//!
//! ```no_run
//! # async fn demo() -> Result<(), faasnet_coordinator::client::ClientError> {
//! use faasnet_coordinator::client::{CoordinatorClient, MembershipOptions, TreeMembership};
//! let client = CoordinatorClient::connect_lazy("http://10.0.0.1:7700", "acme", "acme-secret")?;
//! let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
//! let membership = TreeMembership::join(
//!     client, digest, "vm-17", "10.0.3.17:7800", MembershipOptions::default(),
//! ).await?;
//! let mut upstream = membership.subscribe();
//! loop {
//!     match upstream.borrow_and_update().peer_addr() {
//!         None => { /* root: read from the registry */ }
//!         Some(_addr) => { /* read from the parent at addr */ }
//!     }
//!     if upstream.changed().await.is_err() { break; }
//! }
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use rand::Rng;
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

use crate::pb;
use crate::pb::coordinator_client::CoordinatorClient as RawClient;
use crate::upstream::{Source, Upstream};

/// Errors from the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint string could not be used.
    #[error("invalid coordinator endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// As given.
        endpoint: String,
        /// Why not.
        reason: String,
    },
    /// The token cannot be sent as metadata.
    #[error("invalid token: it must be printable ASCII")]
    Token,
    /// Connecting failed.
    #[error("connecting to the coordinator: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The coordinator answered with an error (or the call failed in transit). The
    /// message says what was wrong; [`ClientError::code`] gives the gRPC code.
    #[error("coordinator: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(Status),
    /// The coordinator's answer did not make sense.
    #[error("malformed answer from the coordinator: {0}")]
    Protocol(String),
    /// The first join did not succeed within [`MembershipOptions::join_timeout`].
    #[error("could not join within {timeout:?}; last error: {last}")]
    JoinTimeout {
        /// The configured timeout.
        timeout: Duration,
        /// The last error seen.
        last: Box<ClientError>,
    },
}

// Not `#[from]`: that would make the status the error's source, and error reports would
// print its message twice along with the raw metadata.
impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Status(s)
    }
}

impl ClientError {
    /// The gRPC status code, when the coordinator (or the transport) gave one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// True for failures worth retrying: transport trouble, an unavailable or overloaded
    /// coordinator. False for refusals that would repeat (bad argument, wrong tenant...).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Protocol(_) => true,
            ClientError::Status(s) => matches!(
                s.code(),
                Code::Unavailable
                    | Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Internal
                    | Code::Aborted
                    | Code::ResourceExhausted
                    | Code::Cancelled
            ),
            _ => false,
        }
    }

    fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }
}

/// What a successful join answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Where to read from.
    pub upstream: Upstream,
    /// Heartbeat within this, or the coordinator removes the node.
    pub lease_ttl: Duration,
}

/// What [`CoordinatorClient::report_bad_upstream`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advice {
    /// The node's current upstream (may already differ from the one that failed).
    pub upstream: Upstream,
    /// Further ancestors, nearest first, as `(node_id, addr)`: try them in order before
    /// falling back to the registry.
    pub fallbacks: Vec<(String, String)>,
}

/// A stream of upstream updates from [`CoordinatorClient::watch`].
pub type UpstreamStream = Pin<Box<dyn Stream<Item = Result<Upstream, ClientError>> + Send>>;

#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Authenticated gRPC channel plus the tenant name; cheap to clone.
#[derive(Clone)]
pub(crate) struct Conn {
    channel: Channel,
    bearer: Bearer,
}

impl Conn {
    fn settings(endpoint: &str, token: &str) -> Result<ConnFuture, ClientError> {
        let bearer = Bearer(
            format!("Bearer {token}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| ClientError::Token)?,
        );
        let bad = |reason: String| ClientError::Endpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        let (uri, unix): (String, Option<PathBuf>) = if let Some(path) = endpoint
            .strip_prefix("unix://")
            .or_else(|| endpoint.strip_prefix("unix:"))
        {
            // The URI is a placeholder: the connector dials the socket.
            (
                "http://coordinator.invalid".into(),
                Some(PathBuf::from(path)),
            )
        } else if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            (endpoint.to_string(), None)
        } else {
            (format!("http://{endpoint}"), None)
        };
        let ep = Endpoint::from_shared(uri)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            // Notice a dead coordinator on an idle watch stream.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        Ok(ConnFuture { ep, unix, bearer })
    }

    fn raw(&self) -> RawClient<InterceptedService<Channel, Bearer>> {
        RawClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

/// Dial settings, not yet connected.
struct ConnFuture {
    ep: Endpoint,
    unix: Option<PathBuf>,
    bearer: Bearer,
}

impl ConnFuture {
    async fn connect(self) -> Result<Conn, ClientError> {
        let channel = match self.unix {
            None => self.ep.connect().await?,
            Some(path) => {
                self.ep
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        tokio::net::UnixStream::connect(path.clone())
                    }))
                    .await?
            }
        };
        Ok(Conn {
            channel,
            bearer: self.bearer,
        })
    }

    /// Must run inside a tokio runtime (tonic spawns the channel's worker).
    fn lazy(self) -> Conn {
        let channel = match self.unix {
            None => self.ep.connect_lazy(),
            Some(path) => self
                .ep
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    tokio::net::UnixStream::connect(path.clone())
                })),
        };
        Conn {
            channel,
            bearer: self.bearer,
        }
    }
}

/// Admin access (list trees, draw one, remove a node), authenticated by the admin token.
/// Used by the `coordinator` CLI.
#[derive(Clone)]
pub struct AdminClient {
    conn: Conn,
}

/// A tree as the admin service describes it.
pub type TreeView = pb::TreeView;
/// One tree in a listing.
pub type TreeSummary = pb::TreeSummary;

impl AdminClient {
    /// Connects now; `endpoint` as for [`CoordinatorClient::connect`].
    pub async fn connect(endpoint: &str, admin_token: &str) -> Result<Self, ClientError> {
        Ok(Self {
            conn: Conn::settings(endpoint, admin_token)?.connect().await?,
        })
    }

    fn raw(&self) -> pb::admin_client::AdminClient<InterceptedService<Channel, Bearer>> {
        pb::admin_client::AdminClient::with_interceptor(
            self.conn.channel.clone(),
            self.conn.bearer.clone(),
        )
    }

    /// Trees with at least one node; `tenant` filters.
    pub async fn list_trees(&self, tenant: Option<&str>) -> Result<Vec<TreeSummary>, ClientError> {
        let r = self
            .raw()
            .list_trees(pb::ListTreesRequest {
                tenant: tenant.unwrap_or_default().to_string(),
            })
            .await?;
        Ok(r.into_inner().trees)
    }

    /// One whole tree.
    pub async fn get_tree(&self, tenant: &str, function: &str) -> Result<TreeView, ClientError> {
        let r = self
            .raw()
            .get_tree(pb::TreeRef {
                tenant: tenant.to_string(),
                function: function.to_string(),
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Removes a node as if it had left; answers the tree's new epoch.
    pub async fn remove_node(
        &self,
        tenant: &str,
        function: &str,
        node_id: &str,
    ) -> Result<u64, ClientError> {
        let r = self
            .raw()
            .remove_node(pb::NodeRef {
                tenant: tenant.to_string(),
                function: function.to_string(),
                node_id: node_id.to_string(),
            })
            .await?;
        Ok(r.into_inner().epoch)
    }
}

/// One tenant's connection to the coordinator. Cheap to clone; calls may run
/// concurrently.
#[derive(Clone)]
pub struct CoordinatorClient {
    conn: Conn,
    tenant: String,
}

fn status_upstream(u: Option<pb::Upstream>) -> Result<Upstream, ClientError> {
    u.ok_or_else(|| ClientError::Protocol("answer without upstream".into()))?
        .try_into()
        .map_err(ClientError::Protocol)
}

impl CoordinatorClient {
    /// Connects now. `endpoint` is `http://host:port`, `host:port` or `unix:/path/to.sock`;
    /// `token` is the tenant's token from the coordinator's config.
    pub async fn connect(
        endpoint: &str,
        tenant: impl Into<String>,
        token: &str,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            conn: Conn::settings(endpoint, token)?.connect().await?,
            tenant: tenant.into(),
        })
    }

    /// Like [`connect`](Self::connect) but dials on the first call (and again after
    /// failures), so it works even if the coordinator is down right now. Must be called
    /// inside a tokio runtime.
    pub fn connect_lazy(
        endpoint: &str,
        tenant: impl Into<String>,
        token: &str,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            conn: Conn::settings(endpoint, token)?.lazy(),
            tenant: tenant.into(),
        })
    }

    /// The tenant this client acts for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    fn node_ref(&self, function: &str, node_id: &str) -> pb::NodeRef {
        pb::NodeRef {
            tenant: self.tenant.clone(),
            function: function.to_string(),
            node_id: node_id.to_string(),
        }
    }

    /// Joins `function`'s tree (the converted image's manifest digest) as `node_id`,
    /// serving blocks at `peer_addr`. Fails with `ALREADY_EXISTS` if the node id is taken.
    pub async fn join(
        &self,
        function: &str,
        node_id: &str,
        peer_addr: &str,
    ) -> Result<Joined, ClientError> {
        let resp = self
            .conn
            .raw()
            .join(pb::JoinRequest {
                tenant: self.tenant.clone(),
                function: function.to_string(),
                node_id: node_id.to_string(),
                peer_addr: peer_addr.to_string(),
            })
            .await?
            .into_inner();
        Ok(Joined {
            upstream: status_upstream(resp.upstream)?,
            lease_ttl: Duration::from_millis(resp.lease_ttl_ms),
        })
    }

    /// Leaves the tree; the nodes below are re-attached and told.
    pub async fn leave(&self, function: &str, node_id: &str) -> Result<(), ClientError> {
        self.conn
            .raw()
            .leave(self.node_ref(function, node_id))
            .await?;
        Ok(())
    }

    /// Renews the lease; answers the lease length. `NOT_FOUND` means the coordinator no
    /// longer knows the node (its lease expired): join again.
    pub async fn heartbeat(&self, function: &str, node_id: &str) -> Result<Duration, ClientError> {
        let r = self
            .conn
            .raw()
            .heartbeat(self.node_ref(function, node_id))
            .await?
            .into_inner();
        Ok(Duration::from_millis(r.lease_ttl_ms))
    }

    /// Asks for the node's current upstream again.
    pub async fn upstream(&self, function: &str, node_id: &str) -> Result<Upstream, ClientError> {
        Ok(self.status(function, node_id).await?.0)
    }

    /// The node's upstream and the peer address the coordinator has for it.
    async fn status(
        &self,
        function: &str,
        node_id: &str,
    ) -> Result<(Upstream, String), ClientError> {
        let r = self
            .conn
            .raw()
            .get_node(self.node_ref(function, node_id))
            .await?
            .into_inner();
        Ok((status_upstream(r.upstream)?, r.peer_addr))
    }

    /// Tells the coordinator that upstream `bad_node_id` failed for this node; answers the
    /// current upstream and further ancestors to try before the registry.
    pub async fn report_bad_upstream(
        &self,
        function: &str,
        node_id: &str,
        bad_node_id: &str,
    ) -> Result<Advice, ClientError> {
        let r = self
            .conn
            .raw()
            .report_bad_upstream(pb::BadUpstreamReport {
                node: Some(self.node_ref(function, node_id)),
                bad_node_id: bad_node_id.to_string(),
            })
            .await?
            .into_inner();
        Ok(Advice {
            upstream: status_upstream(r.upstream)?,
            fallbacks: r
                .fallbacks
                .into_iter()
                .map(|p| (p.node_id, p.addr))
                .collect(),
        })
    }

    /// Streams the node's upstream: the current one first, then every change. The stream
    /// ends with a `NOT_FOUND` error when the node leaves the tree.
    pub async fn watch(
        &self,
        function: &str,
        node_id: &str,
    ) -> Result<UpstreamStream, ClientError> {
        let stream = self
            .conn
            .raw()
            .watch(self.node_ref(function, node_id))
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|item| match item {
            Ok(u) => Upstream::try_from(u).map_err(ClientError::Protocol),
            Err(s) => Err(ClientError::Status(s)),
        })))
    }
}

/// Knobs for [`TreeMembership`].
#[derive(Debug, Clone)]
pub struct MembershipOptions {
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Retry delays double up to this.
    pub max_backoff: Duration,
    /// Heartbeat period; `None` means a third of the lease the coordinator grants.
    pub heartbeat_interval: Option<Duration>,
    /// How long [`TreeMembership::join`] keeps retrying the first join; `None`: forever.
    pub join_timeout: Option<Duration>,
}

impl Default for MembershipOptions {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            heartbeat_interval: None,
            join_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Exponential backoff with jitter (each delay is drawn from [d/2, d]).
struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    fn new(o: &MembershipOptions) -> Self {
        Self {
            next: o.initial_backoff,
            initial: o.initial_backoff,
            max: o.max_backoff.max(o.initial_backoff),
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }
}

struct Member {
    client: CoordinatorClient,
    function: String,
    node_id: String,
    peer_addr: String,
    opts: MembershipOptions,
    tx: watch::Sender<Upstream>,
}

impl Member {
    /// Publishes `u` if it is newer than what we have (`force` after a fresh join).
    fn publish(&self, u: Upstream, force: bool) {
        self.tx.send_if_modified(|cur| {
            if (force || u.epoch > cur.epoch) && *cur != u {
                tracing::info!(function = %self.function, node = %self.node_id, upstream = %u, "upstream changed");
                *cur = u;
                true
            } else {
                false
            }
        });
    }

    /// One join; an `ALREADY_EXISTS` for our own address (an earlier attempt whose answer
    /// was lost) counts as joined.
    async fn join_once(&self) -> Result<Joined, ClientError> {
        match self
            .client
            .join(&self.function, &self.node_id, &self.peer_addr)
            .await
        {
            Err(e) if e.code() == Some(Code::AlreadyExists) => {
                let (upstream, addr) = self.client.status(&self.function, &self.node_id).await?;
                if addr == self.peer_addr {
                    let lease_ttl = self.client.heartbeat(&self.function, &self.node_id).await?;
                    Ok(Joined {
                        upstream,
                        lease_ttl,
                    })
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    fn heartbeat_interval(&self, ttl: Duration) -> Duration {
        self.opts
            .heartbeat_interval
            .unwrap_or(ttl / 3)
            .max(Duration::from_millis(10))
    }

    /// Runs until an error; the caller backs off and calls again.
    async fn session(
        &self,
        need_join: &mut bool,
        ttl: &mut Duration,
        backoff: &mut Backoff,
    ) -> ClientError {
        if *need_join {
            match self.join_once().await {
                Ok(j) => {
                    tracing::info!(function = %self.function, node = %self.node_id, "re-joined the tree");
                    *ttl = j.lease_ttl;
                    self.publish(j.upstream, true);
                    *need_join = false;
                }
                Err(e) => return e,
            }
        }
        let mut stream = match self.client.watch(&self.function, &self.node_id).await {
            Ok(s) => s,
            Err(e) => {
                *need_join = e.is_not_found();
                return e;
            }
        };
        let mut tick = tokio::time::interval(self.heartbeat_interval(*ttl));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match self.client.heartbeat(&self.function, &self.node_id).await {
                    Ok(t) => {
                        *ttl = t;
                        backoff.reset();
                    }
                    Err(e) => {
                        *need_join = e.is_not_found();
                        return e;
                    }
                },
                item = stream.next() => match item {
                    Some(Ok(u)) => {
                        self.publish(u, false);
                        backoff.reset();
                    }
                    Some(Err(e)) => {
                        *need_join = e.is_not_found();
                        return e;
                    }
                    None => return ClientError::Protocol("watch stream ended".into()),
                },
            }
        }
    }

    async fn run(self: Arc<Self>, mut ttl: Duration) {
        let mut backoff = Backoff::new(&self.opts);
        let mut need_join = false;
        loop {
            let err = self.session(&mut need_join, &mut ttl, &mut backoff).await;
            let delay = if need_join {
                Duration::ZERO
            } else {
                backoff.delay()
            };
            tracing::warn!(
                function = %self.function, node = %self.node_id, error = %err, retry_in = ?delay,
                "coordinator session ended; keeping the last known upstream"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// A VM's membership in one function tree, kept alive in the background.
///
/// Dropping it stops the background task without leaving (the lease then expires);
/// call [`leave`](Self::leave) to leave at once.
pub struct TreeMembership {
    member: Arc<Member>,
    rx: watch::Receiver<Upstream>,
    task: tokio::task::JoinHandle<()>,
}

impl TreeMembership {
    /// Joins `function`'s tree, retrying transient failures with backoff for up to
    /// `opts.join_timeout`, then keeps the membership alive in background tasks.
    /// Refusals (bad argument, wrong tenant, node id taken by another address) are
    /// returned at once.
    pub async fn join(
        client: CoordinatorClient,
        function: &str,
        node_id: &str,
        peer_addr: &str,
        opts: MembershipOptions,
    ) -> Result<Self, ClientError> {
        let placeholder = Upstream {
            epoch: 0,
            source: Source::Registry,
            second: None,
        };
        let (tx, rx) = watch::channel(placeholder);
        let member = Arc::new(Member {
            client,
            function: function.to_string(),
            node_id: node_id.to_string(),
            peer_addr: peer_addr.to_string(),
            opts,
            tx,
        });
        let start = Instant::now();
        let mut backoff = Backoff::new(&member.opts);
        let joined = loop {
            match member.join_once().await {
                Ok(j) => break j,
                Err(e) if e.is_retryable() => {
                    let delay = backoff.delay();
                    if let Some(timeout) = member.opts.join_timeout {
                        if start.elapsed() + delay > timeout {
                            return Err(ClientError::JoinTimeout {
                                timeout,
                                last: Box::new(e),
                            });
                        }
                    }
                    tracing::warn!(error = %e, retry_in = ?delay, "join failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        };
        member.publish(joined.upstream, true);
        let task = tokio::spawn(member.clone().run(joined.lease_ttl));
        Ok(Self { member, rx, task })
    }

    /// The current upstream (the last known one if the coordinator is unreachable).
    pub fn upstream(&self) -> Upstream {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every upstream change.
    pub fn subscribe(&self) -> watch::Receiver<Upstream> {
        self.rx.clone()
    }

    /// Asks the coordinator for the current upstream again and publishes it if newer.
    pub async fn refresh(&self) -> Result<Upstream, ClientError> {
        let m = &self.member;
        let u = m.client.upstream(&m.function, &m.node_id).await?;
        m.publish(u, false);
        Ok(self.upstream())
    }

    /// The current upstream failed (connection refused, timeouts...): reports it and
    /// answers what to try instead. A newer upstream is also published to subscribers.
    /// If [`Advice::upstream`] is still the failed node, try [`Advice::fallbacks`] in
    /// order, then the registry.
    pub async fn report_bad_upstream(&self) -> Result<Advice, ClientError> {
        let bad = match &self.upstream().source {
            Source::Peer { node_id, .. } => node_id.clone(),
            Source::Registry => String::new(),
        };
        self.report_bad_node(&bad).await
    }

    /// Like [`Self::report_bad_upstream`] for any node this one fetches from, by id: with
    /// stripe trees, the parent in the second tree ([`Upstream::second`]). The coordinator
    /// checks that node's health and repairs both trees if it is gone.
    pub async fn report_bad_node(&self, bad_node_id: &str) -> Result<Advice, ClientError> {
        let m = &self.member;
        let advice = m
            .client
            .report_bad_upstream(&m.function, &m.node_id, bad_node_id)
            .await?;
        m.publish(advice.upstream.clone(), false);
        Ok(advice)
    }

    /// Stops the background tasks and leaves the tree.
    pub async fn leave(self) -> Result<(), ClientError> {
        self.task.abort();
        let m = &self.member;
        m.client.leave(&m.function, &m.node_id).await
    }
}

impl Drop for TreeMembership {
    fn drop(&mut self) {
        self.task.abort();
    }
}
