// SPDX-License-Identifier: MIT OR Apache-2.0
//! An in-process Kubernetes API-server emulator, over real HTTP, for the
//! three collections xlb watches.
//!
//! What it emulates (and nothing more):
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/api/v1/nodes` (cluster-wide, `fieldSelector=metadata.name=…` on
//!   nodes, `labelSelector` with `key`, `!key`, `key=value`, `key!=value`
//!   terms): a list with `metadata.resourceVersion`; no pagination (`limit`
//!   is ignored, no `continue` token).
//! - the same with `watch=true&resourceVersion=N`: a chunked stream of
//!   `ADDED`/`MODIFIED`/`DELETED` events newer than N, then live ones, and a
//!   `BOOKMARK` every 100 ms when `allowWatchBookmarks=true`; under a
//!   selector, an object that stops matching arrives `DELETED` and one that
//!   starts matching `ADDED`, as from the real watch cache;
//! - a watch from a resourceVersion older than the compaction floor gets
//!   the API server's answer: HTTP 200 and one `ERROR` event with a
//!   `Status` of code 410 (`Expired`), after which clients must re-list;
//! - [`ApiServer::drop_watches`] ends every open watch stream (a dropped
//!   connection); [`ApiServer::pause_watches`] also holds new watch requests
//!   until released; [`ApiServer::set_down`] makes every request fail with 503
//!   (an unreachable or overloaded API server).
//! - `POST /apis/events.k8s.io/v1/namespaces/{ns}/events` (and `PATCH` of
//!   one): stored in [`Inner::events_posted`] for the tests to read.
//!
//! One global resourceVersion counter, as etcd's revision.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    kind: Kind,
    rv: u64,
    ty: &'static str,
    object: Value,
    /// The object before a MODIFIED (for selector transitions).
    old: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Compaction floor: watches from an older resourceVersion get 410.
    floor: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Event>,
}

pub struct Inner {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Bumped by `drop_watches`; streams opened before end.
    generation: broadcast::Sender<()>,
    down: AtomicBool,
    paused: AtomicBool,
    /// Watch streams currently open.
    active: AtomicUsize,
    pub lists: AtomicUsize,
    pub watches: AtomicUsize,
    pub bookmarks: AtomicUsize,
    pub gone: AtomicUsize,
    pub events_posted: Mutex<Vec<Value>>,
    /// Creates of an Event name that existed (409).
    pub events_conflicts: AtomicUsize,
}

#[derive(Clone)]
pub struct ApiServer {
    pub inner: Arc<Inner>,
    pub addr: SocketAddr,
}

fn key(kind: Kind, obj: &Value) -> (Kind, String, String) {
    let m = &obj["metadata"];
    (kind, m["namespace"].as_str().unwrap_or("").to_string(), m["name"].as_str().unwrap_or("").to_string())
}

impl ApiServer {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner {
            store: Mutex::new(Store { rv: 100, ..Store::default() }),
            events: broadcast::channel(1024).0,
            generation: broadcast::channel(16).0,
            down: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            bookmarks: AtomicUsize::new(0),
            gone: AtomicUsize::new(0),
            events_posted: Mutex::new(Vec::new()),
            events_conflicts: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/v1/services", get(|s, q| handle(s, q, Kind::Service)))
            .route("/apis/discovery.k8s.io/v1/endpointslices", get(|s, q| handle(s, q, Kind::EndpointSlice)))
            .route("/api/v1/nodes", get(|s, q| handle(s, q, Kind::Node)))
            .route("/apis/events.k8s.io/v1/namespaces/{ns}/events", axum::routing::post(event))
            .route("/apis/events.k8s.io/v1/namespaces/{ns}/events/{name}", axum::routing::patch(event))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { inner, addr }
    }

    /// Creates or replaces an object (from YAML).
    pub fn apply(&self, kind: Kind, yaml: &str) {
        let mut obj: Value = serde_saphyr::from_str(yaml).expect("object YAML");
        let mut st = self.inner.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(kind, &obj);
        let old = st.objects.insert(k, obj.clone());
        let ty = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let ev = Event { kind, rv, ty, object: obj, old };
        st.history.push(ev.clone());
        let _ = self.inner.events.send(ev);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut st = self.inner.store.lock().unwrap();
        let Some(mut obj) = st.objects.remove(&(kind, namespace.to_string(), name.to_string())) else {
            return;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let ev = Event { kind, rv: st.rv, ty: "DELETED", object: obj, old: None };
        st.history.push(ev.clone());
        let _ = self.inner.events.send(ev);
    }

    /// Forgets the history and moves past it (like an etcd compaction):
    /// resuming a watch from any resourceVersion seen so far gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.inner.store.lock().unwrap();
        st.rv += 1;
        st.floor = st.rv;
        st.history.clear();
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
        let _ = self.inner.generation.send(());
    }

    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// A kubeconfig for this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emu\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: u\n  user: {{token: test}}\ncontexts:\n- name: emu\n  context: {{cluster: emu, user: u}}\n\
             current-context: emu\n",
            self.addr
        )
    }
}

async fn event(State(s): State<Arc<Inner>>, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut posted = s.events_posted.lock().unwrap();
    // A named Event is created once: a second create is 409 AlreadyExists.
    let name = v["metadata"]["name"].as_str().filter(|n| !n.is_empty());
    if let Some(name) = name
        && posted.iter().any(|e| e["metadata"]["name"].as_str() == Some(name))
    {
        s.events_conflicts.fetch_add(1, Ordering::Relaxed);
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("events.events.k8s.io \"{name}\" already exists"), "reason": "AlreadyExists", "code": 409});
        return (StatusCode::CONFLICT, [("content-type", "application/json")], status.to_string()).into_response();
    }
    posted.push(v.clone());
    (StatusCode::CREATED, [("content-type", "application/json")], v.to_string()).into_response()
}

/// Counts an open watch stream while it lives.
struct Open(Arc<Inner>);

impl Open {
    fn new(inner: Arc<Inner>) -> Self {
        inner.active.fetch_add(1, Ordering::SeqCst);
        Self(inner)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn matches_selector(obj: &Value, q: &BTreeMap<String, String>) -> bool {
    let name_ok = match q.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")) {
        Some(name) => obj["metadata"]["name"].as_str() == Some(name),
        None => true,
    };
    let labels = &obj["metadata"]["labels"];
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let labels_ok = q.get("labelSelector").is_none_or(|sel| {
        sel.split(',').filter(|t| !t.is_empty()).all(|t| {
            if let Some(k) = t.strip_prefix('!') {
                label(k).is_none()
            } else if let Some((k, v)) = t.split_once("!=") {
                label(k) != Some(v)
            } else if let Some((k, v)) = t.split_once('=') {
                label(k.trim_end_matches('=')) == Some(v)
            } else {
                label(t).is_some()
            }
        })
    });
    name_ok && labels_ok
}

/// How a watch under selector `q` sees event `e`: its type, or `None`
/// when neither the old nor the new object matches.
fn as_seen(e: &Event, q: &BTreeMap<String, String>) -> Option<&'static str> {
    let now = matches_selector(&e.object, q);
    let before = e.old.as_ref().is_some_and(|o| matches_selector(o, q));
    match (e.ty, before, now) {
        ("MODIFIED", true, true) => Some("MODIFIED"),
        ("MODIFIED", false, true) => Some("ADDED"),
        ("MODIFIED", true, false) => Some("DELETED"),
        ("MODIFIED", false, false) => None,
        (ty, _, true) => Some(ty),
        _ => None,
    }
}

fn line(v: &Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("{v}\n")))
}

async fn handle(State(s): State<Arc<Inner>>, Query(q): Query<BTreeMap<String, String>>, kind: Kind) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "emulated outage").into_response();
    }
    if q.get("watch").map(String::as_str) != Some("true") && q.get("watch").map(String::as_str) != Some("1") {
        s.lists.fetch_add(1, Ordering::Relaxed);
        let st = s.store.lock().unwrap();
        let items: Vec<&Value> =
            st.objects.iter().filter(|((k, ..), o)| *k == kind && matches_selector(o, &q)).map(|(_, o)| o).collect();
        let list = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return ([("content-type", "application/json")], list.to_string()).into_response();
    }
    while s.paused.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.watches.fetch_add(1, Ordering::Relaxed);
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (backlog, live, gone, upto) = {
        let st = s.store.lock().unwrap();
        let gone = from < st.floor;
        let backlog: Vec<Event> = st.history.iter().filter(|e| e.kind == kind && e.rv > from).cloned().collect();
        (backlog, s.events.subscribe(), gone, st.rv.max(from))
    };
    if gone {
        s.gone.fetch_add(1, Ordering::Relaxed);
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
        return ([("content-type", "application/json")], format!("{status}\n")).into_response();
    }
    let q2 = q.clone();
    let first: Vec<Result<Bytes, Infallible>> = backlog
        .into_iter()
        .filter_map(|e| as_seen(&e, &q2).map(|ty| line(&json!({"type": ty, "object": e.object}))))
        .collect();
    struct St {
        _open: Open,
        live: broadcast::Receiver<Event>,
        stop: broadcast::Receiver<()>,
        inner: Arc<Inner>,
        tick: tokio::time::Interval,
        q: BTreeMap<String, String>,
        /// The resourceVersion this stream has delivered everything up to
        /// (the backlog, then each live event of any kind). A bookmark says
        /// no more than this, as the real API server's: a bookmark past an
        /// event still queued would make a resumed watch skip it.
        upto: u64,
    }
    let st = St {
        _open: Open::new(s.clone()),
        live,
        stop: s.generation.subscribe(),
        inner: s.clone(),
        tick: tokio::time::interval(Duration::from_millis(100)),
        q,
        upto,
    };
    let rest = futures::stream::unfold(st, move |mut st| async move {
        loop {
            tokio::select! {
                _ = st.stop.recv() => return None,
                ev = st.live.recv() => match ev {
                    Ok(e) if e.rv <= st.upto => continue,
                    Ok(e) => {
                        st.upto = e.rv;
                        if e.kind == kind && let Some(ty) = as_seen(&e, &st.q) {
                            return Some((line(&json!({"type": ty, "object": e.object})), st));
                        }
                    }
                    Err(_) => return None,
                },
                _ = st.tick.tick(), if bookmarks => {
                    let rv = st.upto;
                    st.inner.bookmarks.fetch_add(1, Ordering::Relaxed);
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    return Some((line(&bm), st));
                }
            }
        }
    });
    let body = Body::from_stream(futures::StreamExt::chain(futures::stream::iter(first), rest));
    ([("content-type", "application/json")], body).into_response()
}
