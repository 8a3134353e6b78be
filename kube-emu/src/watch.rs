// SPDX-License-Identifier: MIT OR Apache-2.0
//! Lists and watches of one kind, cluster-wide or in one namespace, under
//! the request's selectors.
//!
//! - `labelSelector`: comma-separated `key`, `!key`, `key=value`,
//!   `key==value`, `key!=value` terms (no set-based `in`/`notin`);
//! - `fieldSelector`: `metadata.name` and `metadata.namespace` with `=`,
//!   `==` or `!=` (other fields are ignored: they match);
//! - a list has `metadata.resourceVersion` and every item; no pagination
//!   (`limit` is ignored, no `continue`), the list `resourceVersion` and
//!   `resourceVersionMatch` are ignored (always the latest state);
//! - a watch (`watch=true`) from `resourceVersion=N` streams the recorded
//!   events newer than N, then live ones; with no resourceVersion (or `0`),
//!   or with `sendInitialEvents=true`, it starts with a synthetic `ADDED`
//!   per object (the latter then a `BOOKMARK` annotated
//!   `k8s.io/initial-events-end`); a `BOOKMARK` every 100 ms with
//!   `allowWatchBookmarks=true`; `timeoutSeconds` ends the stream; under a
//!   selector an object that stops matching arrives `DELETED` and one that
//!   starts matching `ADDED`, as from the real watch cache;
//! - a watch from below the compaction floor: HTTP 200 and one `ERROR`
//!   event with a `Status` of code 410 (`Expired`).

use std::{collections::BTreeMap, convert::Infallible, net::IpAddr, sync::Arc, sync::atomic::Ordering, time::Duration};

use axum::{
    body::{Body, Bytes},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::{sync::broadcast, time::Instant};

use crate::{Inner, Kind, store::Event};

/// What a list or watch asks for: a kind, maybe one namespace, the query.
#[derive(Clone, Debug)]
pub(crate) struct Filter {
    pub kind: Kind,
    pub ns: Option<String>,
    pub q: BTreeMap<String, String>,
}

impl Filter {
    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        kind == self.kind
            && self.ns.as_deref().is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && self.q.get("fieldSelector").is_none_or(|s| fields_match(obj, s))
            && self.q.get("labelSelector").is_none_or(|s| labels_match(obj, s))
    }

    /// How this watch sees event `e`: its type, or `None` when neither the
    /// old nor the new object matches.
    fn as_seen(&self, e: &Event) -> Option<&'static str> {
        let now = self.matches(e.kind, &e.object);
        let before = e.old.as_ref().is_some_and(|o| self.matches(e.kind, o));
        match (e.ty, before, now) {
            ("MODIFIED", true, true) => Some("MODIFIED"),
            ("MODIFIED", false, true) => Some("ADDED"),
            ("MODIFIED", true, false) => Some("DELETED"),
            ("MODIFIED", false, false) => None,
            (ty, _, true) => Some(ty),
            _ => None,
        }
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.q.get(name).map(String::as_str), Some("true" | "1"))
    }
}

fn fields_match(obj: &Value, sel: &str) -> bool {
    sel.split(',').filter(|t| !t.is_empty()).all(|t| {
        let (field, neg, want) = match t.split_once("!=") {
            Some((f, v)) => (f, true, v),
            None => match t.split_once('=') {
                Some((f, v)) => (f, false, v.strip_prefix('=').unwrap_or(v)),
                None => return true,
            },
        };
        let got = match field.trim() {
            "metadata.name" => obj["metadata"]["name"].as_str().unwrap_or(""),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str().unwrap_or(""),
            _ => return true,
        };
        (got == want) != neg
    })
}

fn labels_match(obj: &Value, sel: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    sel.split(',').filter(|t| !t.is_empty()).all(|t| {
        if let Some(k) = t.strip_prefix('!') {
            label(k).is_none()
        } else if let Some((k, v)) = t.split_once("!=") {
            label(k) != Some(v)
        } else if let Some((k, v)) = t.split_once('=') {
            label(k) == Some(v.strip_prefix('=').unwrap_or(v))
        } else {
            label(t).is_some()
        }
    })
}

fn json_response(v: &Value) -> Response {
    ([("content-type", "application/json")], v.to_string()).into_response()
}

fn line(v: &Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("{v}\n")))
}

/// A list (`{Kind}List`) or, with `watch=true`, a watch stream.
pub(crate) async fn list_or_watch(s: Arc<Inner>, f: Filter, peer: IpAddr) -> Response {
    if !f.flag("watch") {
        s.lists.fetch_add(1, Ordering::Relaxed);
        let st = s.store.lock().unwrap();
        let items: Vec<&Value> = st.objects.iter().filter(|((k, ..), o)| f.matches(*k, o)).map(|(_, o)| o).collect();
        return json_response(&json!({
            "apiVersion": f.kind.api_version(),
            "kind": format!("{}List", f.kind.name()),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }));
    }
    watch(s, f, peer).await
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

/// A live watch stream's state.
struct Live {
    _open: Open,
    live: broadcast::Receiver<Event>,
    stop: broadcast::Receiver<Option<IpAddr>>,
    inner: Arc<Inner>,
    tick: tokio::time::Interval,
    bookmarks: bool,
    until: Option<Instant>,
    peer: IpAddr,
    f: Filter,
    /// The resourceVersion this stream has delivered everything up to
    /// (the backlog, then each live event of any kind). A bookmark says no
    /// more than this, as the real API server's: a bookmark past an event
    /// still queued would make a resumed watch skip it.
    upto: u64,
}

impl Live {
    /// The next line of the stream, or `None` when it ends.
    async fn next(&mut self) -> Option<Result<Bytes, Infallible>> {
        let until = self.until;
        loop {
            tokio::select! {
                stop = self.stop.recv() => match stop {
                    Ok(Some(ip)) if ip != self.peer => continue,
                    _ => return None,
                },
                ev = self.live.recv() => match ev {
                    Ok(e) if e.rv <= self.upto => continue,
                    Ok(e) => {
                        self.upto = e.rv;
                        if let Some(ty) = self.f.as_seen(&e) {
                            return Some(line(&json!({"type": ty, "object": e.object})));
                        }
                    }
                    Err(_) => return None,
                },
                _ = self.tick.tick(), if self.bookmarks => {
                    self.inner.bookmarks.fetch_add(1, Ordering::Relaxed);
                    return Some(line(&bookmark(self.f.kind, self.upto, false)));
                }
                _ = tokio::time::sleep_until(until.unwrap_or_else(Instant::now)), if until.is_some() => return None,
            }
        }
    }
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": meta}})
}

async fn watch(s: Arc<Inner>, f: Filter, peer: IpAddr) -> Response {
    while s.paused.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.watches.fetch_add(1, Ordering::Relaxed);
    let from: u64 = f.q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let initial = f.flag("sendInitialEvents");
    let (first, live, gone, upto) = {
        let st = s.store.lock().unwrap();
        let gone = from != 0 && from < st.floor && !initial;
        let first: Vec<Result<Bytes, Infallible>> = if from == 0 || initial {
            // The current state as ADDED events (an rv of "0": any state).
            let adds = st.objects.iter().filter(|((k, ..), o)| f.matches(*k, o));
            let mut v: Vec<_> = adds.map(|(_, o)| line(&json!({"type": "ADDED", "object": o}))).collect();
            if initial {
                v.push(line(&bookmark(f.kind, st.rv, true)));
            }
            v
        } else {
            let backlog = st.history.iter().filter(|e| e.rv > from);
            backlog.filter_map(|e| f.as_seen(e).map(|ty| line(&json!({"type": ty, "object": e.object})))).collect()
        };
        let upto = if from == 0 || initial { st.rv } else { st.rv.max(from) };
        (first, st.subscribe(), gone, upto)
    };
    if gone {
        s.gone.fetch_add(1, Ordering::Relaxed);
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
        return ([("content-type", "application/json")], format!("{status}\n")).into_response();
    }
    let timeout = f.q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).filter(|t| *t > 0);
    let st = Live {
        _open: Open::new(s.clone()),
        live,
        stop: s.stop.subscribe(),
        inner: s.clone(),
        tick: tokio::time::interval(Duration::from_millis(100)),
        bookmarks: f.flag("allowWatchBookmarks"),
        until: timeout.map(|t| Instant::now() + Duration::from_secs(t)),
        peer,
        f,
        upto,
    };
    // A block or outage that came after the guard let this request in but
    // before the stream could hear of it.
    if s.refuses(st.peer) {
        return crate::routes::unavailable(&s);
    }
    let rest = futures::stream::unfold(st, |mut st| async move { st.next().await.map(|l| (l, st)) });
    let body = Body::from_stream(futures::StreamExt::chain(futures::stream::iter(first), rest));
    ([("content-type", "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(q: &[(&str, &str)]) -> Filter {
        Filter { kind: Kind::Service, ns: None, q: q.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"name": "web", "namespace": "shop", "labels": {"a": "1", "b": ""}}});
        let m = |q: &[(&str, &str)]| filter(q).matches(Kind::Service, &o);
        assert!(m(&[("labelSelector", "a=1,b,!c")]));
        assert!(m(&[("labelSelector", "a==1,c!=2")]));
        assert!(!m(&[("labelSelector", "a!=1")]));
        assert!(!m(&[("labelSelector", "!a")]));
        assert!(m(&[("fieldSelector", "metadata.name=web,metadata.namespace==shop")]));
        assert!(!m(&[("fieldSelector", "metadata.name!=web")]));
        assert!(!filter(&[]).matches(Kind::Node, &o));
        let f = Filter { ns: Some("other".into()), ..filter(&[]) };
        assert!(!f.matches(Kind::Service, &o));
    }
}
