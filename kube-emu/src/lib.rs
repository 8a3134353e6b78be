// SPDX-License-Identifier: MIT OR Apache-2.0
//! A Kubernetes API-server emulator over real HTTP/1.1 (no TLS, any
//! bearer token), for tests in process ([`ApiServer::start`]), for the
//! netns cluster harness on its own thread in a network namespace
//! ([`ApiServer::spawn`]), and as the `kube-emu` binary.
//!
//! What it emulates (and nothing more):
//! - the kinds of [`Kind`]: Services, EndpointSlices, Nodes, Namespaces,
//!   Leases (`coordination.k8s.io/v1`) and LoadBalancerIPPools
//!   (`xlb.io/v1alpha1`, the CRD's objects; no CRD objects themselves);
//! - list and watch of every kind, cluster-wide and per namespace, with
//!   label and `metadata.name` / `metadata.namespace` field selectors,
//!   bookmarks, and 410 Expired from a compacted history (`watch.rs`);
//! - `GET` of one object; `POST` / `PUT` / merge `PATCH` / `DELETE` of
//!   Leases; `GET` / `PUT` / merge `PATCH` of a Service's `status`; Events
//!   created or patched (kept in [`Inner::events_posted`]) (`routes.rs`);
//! - the generic registry store's write rules: one global resourceVersion
//!   (etcd's revision) bumped by every write, optimistic concurrency (a
//!   stale resourceVersion is 409 Conflict, a missing one 422 for Leases),
//!   create-on-update for Leases, status writes that never change spec, a
//!   write that changes nothing is no write, errors as `Status` objects with
//!   the real reasons and messages (`store.rs`);
//! - faults (kube-rs 5 clients retry a 503 by default, up to 15 times
//!   with a backoff from 5 ms: minutes; `Config::default_retry` turns that
//!   off): [`ApiServer::set_down`] (every request 503),
//!   [`ApiServer::block`] (one client address's requests 503, a node
//!   partitioned from the API server), [`ApiServer::drop_watches`],
//!   [`ApiServer::pause_watches`], [`ApiServer::compact`].
//!
//! Not emulated: discovery, authentication and authorization, admission,
//! validation and defaulting of objects (stored as sent), `metadata.generation`,
//! managed fields and server-side apply (415), JSON patch (415),
//! finalizers and graceful deletion, pagination, `dryRun`, writes to kinds
//! other than Leases (405; the harness writes with [`ApiServer::apply`]),
//! protobuf, HTTP/2, TLS.
//!
//! The server lives as long as the process (or, from [`ApiServer::start`],
//! the tokio runtime it was started in): there is no shutdown.

mod routes;
mod store;
mod watch;

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::sync::broadcast;

/// The kinds the emulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Namespace,
    Lease,
    LoadBalancerIPPool,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Service, Kind::EndpointSlice, Kind::Node, Kind::Namespace, Kind::Lease, Kind::LoadBalancerIPPool];

    /// The API group (`""` for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Lease => "coordination.k8s.io",
            Kind::LoadBalancerIPPool => "xlb.io",
            Kind::Service | Kind::Node | Kind::Namespace => "",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Kind::LoadBalancerIPPool => "v1alpha1",
            _ => "v1",
        }
    }

    /// `group/version`, or `v1` for the core group.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::LoadBalancerIPPool => "xlb.io/v1alpha1",
            Kind::Service | Kind::Node | Kind::Namespace => "v1",
        }
    }

    /// The `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Lease => "Lease",
            Kind::LoadBalancerIPPool => "LoadBalancerIPPool",
        }
    }

    /// The resource, as in paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Namespace => "namespaces",
            Kind::Lease => "leases",
            Kind::LoadBalancerIPPool => "loadbalancerippools",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Service | Kind::EndpointSlice | Kind::Lease)
    }

    /// The kind of an object's `apiVersion` and `kind` (an empty
    /// `api_version` matches any).
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind && (api_version.is_empty() || api_version == k.api_version()))
    }

    /// `plural.group` (`leases.coordination.k8s.io`; `services` in the
    /// core group), as in the API server's messages.
    pub(crate) fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }

    /// The strategy's `AllowCreateOnUpdate` (a PUT of a missing object creates it).
    pub(crate) fn allow_create_on_update(self) -> bool {
        self == Kind::Lease
    }

    /// The strategy's `AllowUnconditionalUpdate` (a PUT may omit the resourceVersion).
    pub(crate) fn allow_unconditional_update(self) -> bool {
        !matches!(self, Kind::Lease | Kind::LoadBalancerIPPool)
    }
}

/// The server's state, shared by the handlers and the [`ApiServer`] handles.
pub struct Inner {
    store: Mutex<store::Store>,
    /// Ends watch streams: `None` all of them, `Some(ip)` that client's.
    stop: broadcast::Sender<Option<IpAddr>>,
    down: AtomicBool,
    paused: AtomicBool,
    blocked: Mutex<HashSet<IpAddr>>,
    /// Watch streams currently open.
    active: AtomicUsize,
    pub lists: AtomicUsize,
    pub watches: AtomicUsize,
    pub bookmarks: AtomicUsize,
    /// Watches answered 410 Expired.
    pub gone: AtomicUsize,
    pub events_posted: Mutex<Vec<Value>>,
    /// Creates of an Event name that existed (409).
    pub events_conflicts: AtomicUsize,
    /// Successful Service status writes (`PUT`/`PATCH …/status`, no-ops included).
    pub status_writes: AtomicUsize,
    /// Successful Lease writes (create, replace, patch, delete; no-ops included).
    pub lease_writes: AtomicUsize,
    /// 409 answers to object writes (Conflict and AlreadyExists; not Events').
    pub conflicts: AtomicUsize,
    /// 503 answers (`set_down`, `block`).
    pub unavailable: AtomicUsize,
}

impl Inner {
    fn new() -> Arc<Self> {
        Arc::new(Inner {
            store: Mutex::new(store::Store::new()),
            stop: broadcast::channel(64).0,
            down: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            blocked: Mutex::new(HashSet::new()),
            active: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            bookmarks: AtomicUsize::new(0),
            gone: AtomicUsize::new(0),
            events_posted: Mutex::new(Vec::new()),
            events_conflicts: AtomicUsize::new(0),
            status_writes: AtomicUsize::new(0),
            lease_writes: AtomicUsize::new(0),
            conflicts: AtomicUsize::new(0),
            unavailable: AtomicUsize::new(0),
        })
    }

    /// Whether a request from `peer` fails with 503.
    fn refuses(&self, peer: IpAddr) -> bool {
        self.down.load(Ordering::SeqCst) || self.blocked.lock().unwrap().contains(&peer.to_canonical())
    }
}

/// A running emulator: a handle to its state and the address it listens on.
#[derive(Clone)]
pub struct ApiServer {
    pub inner: Arc<Inner>,
    pub addr: SocketAddr,
}

async fn serve(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    let app = routes::router(inner).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("kube-emu: {e}");
    }
}

/// Moves the calling thread (only it) into the network namespace `path`.
fn enter_netns(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: setns(2) on a descriptor we hold open; it changes only the
    // calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

impl ApiServer {
    /// Serves on 127.0.0.1 (a free port) in the current tokio runtime.
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr` in the current tokio runtime. Panics when it
    /// cannot listen there.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("kube-emu: cannot listen on {addr}: {e}"));
        let addr = listener.local_addr().expect("a bound address");
        let inner = Inner::new();
        tokio::spawn(serve(listener, inner.clone()));
        Self { inner, addr }
    }

    /// Serves on `addr` from a thread of its own, with its own tokio
    /// runtime, in the network namespace file `netns` when given (e.g.
    /// `/run/netns/NAME`: only that thread enters it). Returns once the
    /// listener is bound, so clients can connect at once; the server runs
    /// until the process exits. Panics when it cannot enter the namespace
    /// or listen. Callable from any thread, inside a runtime or not.
    pub fn spawn(netns: Option<&Path>, addr: SocketAddr) -> Self {
        let inner = Inner::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.map(Path::to_path_buf);
        let state = inner.clone();
        let run = move || {
            let bound = (|| {
                if let Some(p) = &netns {
                    enter_netns(p)?;
                }
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
                let listener = rt
                    .block_on(tokio::net::TcpListener::bind(addr))
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let local = listener.local_addr().map_err(|e| e.to_string())?;
                Ok::<_, String>((rt, listener, local))
            })();
            match bound {
                Ok((rt, listener, local)) => {
                    let _ = tx.send(Ok(local));
                    rt.block_on(serve(listener, state));
                }
                Err(e) => _ = tx.send(Err(e)),
            }
        };
        std::thread::Builder::new().name("kube-emu".into()).spawn(run).expect("a thread");
        let addr = match rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("kube-emu: {e}"),
            Err(_) => panic!("kube-emu: the server thread ended"),
        };
        Self { inner, addr }
    }

    /// Creates or replaces an object (from YAML), as `kubectl apply`:
    /// unconditionally, always a write. The namespace of a namespaced
    /// kind defaults to `default`; a Service whose YAML has no `status`
    /// keeps the stored one. Panics on YAML that is not an object.
    pub fn apply(&self, kind: Kind, yaml: &str) {
        let obj: Value = serde_saphyr::from_str(yaml).expect("object YAML");
        self.apply_value(kind, obj);
    }

    /// [`ApiServer::apply`] of a parsed object; returns it as stored.
    pub fn apply_value(&self, kind: Kind, obj: Value) -> Value {
        self.inner.store.lock().unwrap().apply(kind, obj)
    }

    /// Applies every document of a multi-document YAML by its `apiVersion`
    /// and `kind` (`List`s item by item). Returns how many were applied
    /// and, for the ones skipped, `apiVersion kind name` (kinds not served).
    pub fn apply_all(&self, yaml: &str) -> Result<(usize, Vec<String>), String> {
        fn one(api: &ApiServer, doc: Value, n: &mut usize, skipped: &mut Vec<String>) {
            let (av, kind) = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
            if let (true, Some(items)) = (kind.ends_with("List"), doc["items"].as_array()) {
                for item in items.clone() {
                    one(api, item, n, skipped);
                }
            } else if let Some(k) = Kind::of(av, kind) {
                api.apply_value(k, doc);
                *n += 1;
            } else if !doc.is_null() {
                skipped.push(format!("{av} {kind} {}", doc["metadata"]["name"].as_str().unwrap_or("")));
            }
        }
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| e.to_string())?;
        let (mut n, mut skipped) = (0, Vec::new());
        for doc in docs {
            one(self, doc, &mut n, &mut skipped);
        }
        Ok((n, skipped))
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds);
    /// nothing when it does not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.inner.store.lock().unwrap().write(store::key(kind, namespace, name), None);
    }

    /// The stored object (`namespace` is ignored for cluster-scoped kinds).
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.inner.store.lock().unwrap().objects.get(&store::key(kind, namespace, name)).cloned()
    }

    /// Every stored object of `kind`, by namespace and name.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        let st = self.inner.store.lock().unwrap();
        st.objects.iter().filter(|((k, ..), _)| *k == kind).map(|(_, o)| o.clone()).collect()
    }

    /// Forgets the history and moves past it (like an etcd compaction):
    /// resuming a watch from any resourceVersion seen so far gets 410 Gone.
    pub fn compact(&self) {
        self.inner.store.lock().unwrap().compact();
    }

    /// Ends every watch (returning once all have ended) and holds new watch
    /// requests (they wait, without an answer) until `pause_watches(false)`.
    pub async fn pause_watches(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::SeqCst);
        if paused {
            while self.inner.active.load(Ordering::SeqCst) > 0 {
                self.drop_watches();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Ends every open watch stream, as a dropped connection would.
    pub fn drop_watches(&self) {
        let _ = self.inner.stop.send(None);
    }

    /// Makes every request fail with 503 (and ends the watches): an
    /// unreachable or overloaded API server.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Makes every request from the client address `ip` fail with 503 and
    /// ends its watches (a node partitioned from the API server), or lifts
    /// that.
    pub fn block(&self, ip: IpAddr, blocked: bool) {
        let ip = ip.to_canonical();
        let mut set = self.inner.blocked.lock().unwrap();
        if blocked {
            set.insert(ip);
            drop(set);
            let _ = self.inner.stop.send(Some(ip));
        } else {
            set.remove(&ip);
        }
    }

    /// A kubeconfig for this server, at its bound address.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emu\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: u\n  user: {{token: test}}\ncontexts:\n- name: emu\n  context: {{cluster: emu, user: u}}\n\
             current-context: emu\n",
            self.addr
        )
    }
}
