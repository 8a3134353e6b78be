// SPDX-License-Identifier: MIT OR Apache-2.0
//! kube-proxy's two health services, as cloud load balancers probe them.
//!
//! - The proxy's own, `/healthz` and `/livez` on `--healthz-bind-address`
//!   (`0.0.0.0:10256`), as `pkg/proxy/healthcheck/proxy_health.go`: healthy
//!   unless a change seen in the source has waited longer than the timeout
//!   to reach the maps; `/healthz` also fails while this Node is being
//!   deleted or carries the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
//!   taint. Load balancers probe it for every `Cluster`-policy Service.
//! - The healthCheckNodePort of each `LoadBalancer` Service with
//!   `externalTrafficPolicy: Local` (`service_health.go`): 200 only while
//!   the node has a local ready endpoint *and* the proxy is healthy.
//!
//! [`ProxyHealth`] is the one signal both read (and the metrics port's
//! `/healthz`). Changes are marked queued by a task of their own that
//! watches the source ([`ProxyHealth::watch`]), not by the reconcile loop,
//! so a loop that stops syncing shows as unhealthy.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use k8s_openapi::api::core::v1::Node;
use tokio::sync::watch;

use crate::{source::Snapshot, translate::HealthCheck};

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's default: twice its 30 s `--iptables-sync-period`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// More unapplied changes than this are not told apart (only the oldest
/// and the newest matter, and by then the proxy is long unhealthy).
const QUEUE_MAX: usize = 256;

/// The proxy's health: kube-proxy's `ProxyHealthServer`, for one proxier
/// (xlb writes both families in one sync).
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    /// The last completed sync; `None` while starting up (healthy then,
    /// as kube-proxy: nothing has been late yet).
    last_updated: Option<SystemTime>,
    /// When each change seen and not yet applied was seen, oldest first.
    queued: VecDeque<Instant>,
    /// The newest change a completed sync included.
    applied_upto: Option<Instant>,
    /// Not being deleted and not tainted for deletion.
    node_eligible: bool,
}

/// One answer of `/healthz` or `/livez`.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub code: StatusCode,
    pub body: String,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            state: Mutex::new(HealthState {
                last_updated: None,
                queued: VecDeque::new(),
                applied_upto: None,
                // Eligible while starting up, until a Node says otherwise.
                node_eligible: true,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change seen at `at` waits to be applied (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self, at: Instant) {
        let mut st = self.lock();
        if st.applied_upto.is_some_and(|a| at <= a) || st.queued.back().is_some_and(|b| at <= *b) {
            return; // already applied, or already queued
        }
        if st.queued.len() >= QUEUE_MAX {
            st.queued.pop_back();
        }
        st.queued.push_back(at);
    }

    /// A sync completed with every change up to `upto` (the snapshot's
    /// `changed_at`; `None`: everything so far) (kube-proxy's `Updated`).
    pub fn updated(&self, upto: Option<Instant>) {
        self.updated_at(upto, SystemTime::now());
    }

    fn updated_at(&self, upto: Option<Instant>, now: SystemTime) {
        let mut st = self.lock();
        st.last_updated = Some(now);
        match upto {
            None => st.queued.clear(),
            Some(upto) => {
                while st.queued.front().is_some_and(|q| *q <= upto) {
                    st.queued.pop_front();
                }
                st.applied_upto = Some(st.applied_upto.map_or(upto, |a| a.max(upto)));
            }
        }
    }

    /// Follows this node's Node object (kube-proxy's `SyncNode`). A Node
    /// absent from the source leaves the last judgement as it was.
    pub fn sync_node(&self, node: Option<&Node>) {
        let Some(node) = node else { return };
        let deleting = node.metadata.deletion_timestamp.is_some();
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        self.lock().node_eligible = !deleting && !tainted;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// The proxy's own health, ignoring the Node (what a healthCheckNodePort
    /// reports as `serviceProxyHealthy`).
    pub fn is_healthy(&self) -> bool {
        self.healthy_at(Instant::now()).0
    }

    fn healthy_at(&self, now: Instant) -> (bool, Option<SystemTime>) {
        let st = self.lock();
        let Some(last) = st.last_updated else { return (true, None) };
        let late = st.queued.front().is_some_and(|q| now.saturating_duration_since(*q) >= self.timeout);
        (!late, Some(last))
    }

    /// `/healthz`: the proxy is healthy and this node is eligible.
    pub fn healthz(&self) -> Answer {
        self.answer(Instant::now(), SystemTime::now(), true)
    }

    /// `/livez`: the proxy alone.
    pub fn livez(&self) -> Answer {
        self.answer(Instant::now(), SystemTime::now(), false)
    }

    fn answer(&self, now: Instant, wall: SystemTime, node_checks: bool) -> Answer {
        let (healthy, mut last) = self.healthy_at(now);
        let eligible = self.node_eligible();
        let ok = healthy && (eligible || !node_checks);
        // kube-proxy reports "now" as the last update while healthy (its
        // older releases' meaning: the sync loop ran recently).
        if ok {
            last = Some(wall);
        }
        let (last, current) = (go_time(last), go_time(Some(wall)));
        let body = if node_checks {
            format!(r#"{{"lastUpdated": "{last}","currentTime": "{current}", "nodeEligible": {eligible}}}"#)
        } else {
            format!(r#"{{"lastUpdated": "{last}","currentTime": "{current}"}}"#)
        };
        Answer { code: if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body }
    }

    /// Marks every change the source publishes as queued, and follows the
    /// Node, until the source goes away.
    pub async fn watch(self: Arc<Self>, mut rx: watch::Receiver<Snapshot>, node_name: String) {
        loop {
            {
                let snap = rx.borrow_and_update();
                if let Some(at) = snap.changed_at {
                    self.queued(at);
                }
                self.sync_node(
                    snap.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(&node_name)).map(|n| &**n),
                );
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A time as Go prints a UTC `time.Time` (`2006-01-02 15:04:05.999999999
/// +0000 UTC`; `None` is Go's zero time), the format of kube-proxy's
/// bodies. (Go also appends its monotonic reading, `m=+…`; xlb does not.)
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return "0001-01-01 00:00:00 +0000 UTC".into() };
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    let mut s = format!("{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
    let nanos = d.subsec_nanos();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push_str(" +0000 UTC");
    s
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn respond(a: Answer) -> impl IntoResponse {
    (a.code, [("content-type", "application/json"), ("x-content-type-options", "nosniff")], a.body)
}

/// The listening sockets for `addr`: an unspecified IPv4 address listens
/// on IPv6 too where the host has it, as Go's `net.Listen` does for
/// kube-proxy's `0.0.0.0:10256`.
async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        && let Ok(l) = tokio::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, addr.port())).await
    {
        return Ok(l);
    }
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/healthz` and `/livez` on `addr` until the task is dropped.
pub async fn serve_proxy_health(addr: SocketAddr, health: Arc<ProxyHealth>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|State(h): State<Arc<ProxyHealth>>| async move { respond(h.healthz()) }))
        .route("/livez", get(|State(h): State<Arc<ProxyHealth>>| async move { respond(h.livez()) }))
        .with_state(health);
    let listener = bind(addr).await?;
    tracing::info!(%addr, "serving /healthz and /livez");
    axum::serve(listener, app).await?;
    Ok(())
}

/// Where the healthCheckNodePort servers listen: every address, or (with
/// `--nodeport-addresses`) the node's NodePort addresses, as kube-proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    All,
    On(Vec<IpAddr>),
}

/// One Service's health-check server (one socket per listening address).
struct ServiceServer {
    service: Arc<Mutex<String>>,
    local: Arc<AtomicUsize>,
    listen: Listen,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Every address of `listen` is served.
    complete: bool,
}

impl ServiceServer {
    /// Stops serving and waits until the sockets are closed, so the same
    /// port can be bound again at once.
    async fn close(mut self) {
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for ServiceServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Clone)]
struct ServiceState {
    service: Arc<Mutex<String>>,
    local: Arc<AtomicUsize>,
    proxy: Arc<ProxyHealth>,
}

/// The healthCheckNodePort servers: `GET` anything answers 200 when the
/// node has a ready local endpoint of the Service and the proxy is
/// healthy, 503 otherwise, with kube-proxy's body, so cloud load balancers
/// only send traffic to nodes that can serve it locally.
pub struct ServiceHealth {
    proxy: Arc<ProxyHealth>,
    servers: HashMap<u16, ServiceServer>,
    /// The last sync's input, for [`ServiceHealth::retry`].
    wanted: Vec<HealthCheck>,
    listen: Listen,
}

/// kube-proxy's body, byte for byte (`service_health.go`).
pub fn service_body(service: &str, local: usize, healthy: bool) -> String {
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    let q = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        q(ns),
        q(name)
    )
}

async fn service_check(State(s): State<ServiceState>) -> impl IntoResponse {
    let n = s.local.load(Ordering::Relaxed);
    let healthy = s.proxy.is_healthy();
    let svc = s.service.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let code = if n > 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    respond(Answer { code, body: service_body(&svc, n, healthy) })
}

impl ServiceHealth {
    pub fn new(proxy: Arc<ProxyHealth>) -> Self {
        Self { proxy, servers: HashMap::new(), wanted: Vec::new(), listen: Listen::All }
    }

    /// Starts, updates and stops servers to match `wanted`, listening as
    /// `listen` says. A server whose addresses changed is closed (its
    /// sockets released before the new ones bind) and reopened; one that
    /// could not bind everywhere is retried at the next sync or [`retry`].
    ///
    /// [`retry`]: ServiceHealth::retry
    pub async fn sync(&mut self, wanted: &[HealthCheck], listen: &Listen) {
        self.wanted = wanted.to_vec();
        self.listen = listen.clone();
        let ports: HashMap<u16, &HealthCheck> = wanted.iter().map(|h| (h.port, h)).collect();
        let closing: Vec<u16> = self
            .servers
            .iter()
            .filter(|(port, s)| !ports.contains_key(port) || s.listen != *listen || !s.complete)
            .map(|(port, _)| *port)
            .collect();
        for port in closing {
            if let Some(s) = self.servers.remove(&port) {
                s.close().await;
            }
        }
        for (port, h) in ports {
            if let Some(s) = self.servers.get(&port) {
                s.local.store(h.local_endpoints, Ordering::Relaxed);
                *s.service.lock().unwrap_or_else(|e| e.into_inner()) = h.service.clone();
                continue;
            }
            if let Some(server) = self.open(port, h, listen).await {
                self.servers.insert(port, server);
            }
        }
    }

    /// Opens what the last [`sync`](ServiceHealth::sync) could not (kube-proxy
    /// retries on each periodic sync).
    pub async fn retry(&mut self) {
        let missing = self.wanted.iter().any(|h| !self.servers.get(&h.port).is_some_and(|s| s.complete));
        if missing {
            let (wanted, listen) = (self.wanted.clone(), self.listen.clone());
            self.sync(&wanted, &listen).await;
        }
    }

    async fn open(&self, port: u16, h: &HealthCheck, listen: &Listen) -> Option<ServiceServer> {
        let state = ServiceState {
            service: Arc::new(Mutex::new(h.service.clone())),
            local: Arc::new(AtomicUsize::new(h.local_endpoints)),
            proxy: self.proxy.clone(),
        };
        let addrs: Vec<SocketAddr> = match listen {
            Listen::All => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)],
            Listen::On(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
        };
        let mut tasks = Vec::new();
        let mut complete = true;
        for addr in addrs {
            match bind(addr).await {
                Ok(listener) => {
                    let app = Router::new().fallback(service_check).with_state(state.clone());
                    tasks.push(tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    }));
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(service = %h.service, %addr, error = %e, "cannot serve the health check; will retry");
                }
            }
        }
        if tasks.is_empty() {
            return None;
        }
        tracing::info!(service = %h.service, port, "serving the health check");
        let ServiceState { service, local, .. } = state;
        Some(ServiceServer { service, local, listen: listen.clone(), tasks, complete })
    }
}

#[cfg(test)]
mod tests {
    //! Mirrors kube-proxy's `healthcheck_test.go` (`TestHealthzServer`,
    //! `TestLivezServer`, `TestServerWithSelectiveListeningAddress`'s bodies).
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn starting_up_is_healthy_and_a_late_update_is_not() {
        let h = ProxyHealth::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // Nothing synced yet: healthy, with Go's zero time as lastUpdated.
        h.queued(t0);
        let a = h.answer(t0 + Duration::from_secs(120), wall, true);
        assert_eq!(a.code, StatusCode::OK, "{}", a.body);
        h.updated_at(Some(t0), wall);
        // A change queued and applied in time.
        let t1 = t0 + Duration::from_secs(1);
        h.queued(t1);
        assert_eq!(h.answer(t1 + Duration::from_secs(59), wall, true).code, StatusCode::OK);
        // … not applied within the timeout: unhealthy, on both paths.
        let late = t1 + Duration::from_secs(60);
        let a = h.answer(late, wall + Duration::from_secs(61), true);
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            a.body,
            r#"{"lastUpdated": "2023-11-14 22:13:20 +0000 UTC","currentTime": "2023-11-14 22:14:21 +0000 UTC", "nodeEligible": true}"#
        );
        assert_eq!(h.answer(late, wall, false).code, StatusCode::SERVICE_UNAVAILABLE);
        // A later change queued meanwhile keeps waiting after this one lands.
        let t2 = t1 + Duration::from_secs(30);
        h.queued(t2);
        h.updated_at(Some(t1), wall);
        assert_eq!(h.answer(t2 + Duration::from_secs(59), wall, true).code, StatusCode::OK);
        assert_eq!(h.answer(t2 + Duration::from_secs(60), wall, true).code, StatusCode::SERVICE_UNAVAILABLE);
        // A change marked queued after its sync already landed is no debt.
        h.updated_at(Some(t2), wall);
        h.queued(t2);
        h.queued(t1);
        assert_eq!(h.answer(t2 + Duration::from_secs(600), wall, true).code, StatusCode::OK);
    }

    #[test]
    fn a_node_being_deleted_or_tainted_fails_healthz_but_not_livez() {
        let h = ProxyHealth::new(DEFAULT_TIMEOUT);
        let (now, wall) = (Instant::now(), SystemTime::now());
        h.updated_at(None, wall);
        for (yaml, eligible) in [
            ("metadata: {name: n1}", true),
            (
                "metadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}",
                false,
            ),
            ("metadata: {name: n1}\nspec: {taints: [{key: other, effect: NoSchedule}]}", true),
            ("metadata: {name: n1, deletionTimestamp: '2026-12-02T00:00:00Z'}", false),
        ] {
            h.sync_node(Some(&node(yaml)));
            let a = h.answer(now, wall, true);
            assert_eq!(a.code == StatusCode::OK, eligible, "{yaml}: {}", a.body);
            assert!(a.body.ends_with(&format!(r#""nodeEligible": {eligible}}}"#)), "{}", a.body);
            let l = h.answer(now, wall, false);
            assert_eq!(l.code, StatusCode::OK, "{yaml}: /livez skips the node checks");
            assert!(!l.body.contains("nodeEligible"), "{}", l.body);
            // serviceProxyHealthy ignores the node too.
            assert!(h.is_healthy());
        }
        // A Node missing from the source keeps the last judgement.
        h.sync_node(None);
        assert!(!h.node_eligible());
    }

    #[test]
    fn times_print_as_go_prints_them() {
        let at = |s, n| Some(SystemTime::UNIX_EPOCH + Duration::new(s, n));
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(at(0, 0)), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(at(1_709_210_096, 120_000_000)), "2024-02-29 12:34:56.12 +0000 UTC");
        assert_eq!(go_time(at(4_102_444_799, 999_999_999)), "2099-12-31 23:59:59.999999999 +0000 UTC");
    }

    #[test]
    fn the_service_body_is_kube_proxys() {
        let b = service_body("shop/web", 2, true);
        assert_eq!(
            b,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["service"]["name"], "web");
    }
}
