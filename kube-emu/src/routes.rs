// SPDX-License-Identifier: MIT OR Apache-2.0
//! The HTTP surface: paths to kinds, verbs to store operations, the fault
//! injection guard in front of everything, and the Event sink.
//!
//! Paths: `/api/v1/{plural}[/{name}[/{sub}]]`,
//! `/api/v1/namespaces/{ns}/{plural}[/{name}[/{sub}]]` and the same under
//! `/apis/{group}/{version}`. Verbs:
//!
//! | what | verbs |
//! |---|---|
//! | every kind | `GET` list / watch (cluster-wide, or per namespace when namespaced), `GET` one |
//! | `Lease` | `POST`, `PUT`, `PATCH` (merge), `DELETE` |
//! | `Service` `/status` | `GET`, `PUT`, `PATCH` (merge; strategic treated as merge) |
//! | Events (`events.k8s.io/v1`) | `POST`, `PATCH`: kept in [`Inner::events_posted`] |
//!
//! Any other verb on a known kind is 405 `MethodNotAllowed`; an unknown
//! path is 404. No discovery (`/api`, `/apis`), no `/version`, no
//! authentication, `dryRun` and `fieldManager` are ignored.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, Query, Request, State},
    http::{HeaderMap, Method, StatusCode, Uri, header::CONTENT_TYPE},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{patch, post},
};
use serde_json::{Value, json};

use crate::{
    Inner, Kind,
    store::{ApiError, Strategy, merge_patch},
    watch::{Filter, list_or_watch},
};

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/apis/events.k8s.io/v1/namespaces/{ns}/events", post(event))
        .route("/apis/events.k8s.io/v1/namespaces/{ns}/events/{name}", patch(event))
        .fallback(dispatch)
        .layer(middleware::from_fn_with_state(inner.clone(), guard))
        .with_state(inner)
}

/// `set_down` and `block`: 503 before anything else.
async fn guard(
    State(s): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if s.refuses(peer.ip()) {
        return unavailable(&s);
    }
    next.run(req).await
}

pub(crate) fn unavailable(s: &Inner) -> Response {
    s.unavailable.fetch_add(1, Ordering::Relaxed);
    ApiError::new(503, "ServiceUnavailable", "emulated outage").into_response()
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

/// What a path names.
#[derive(Debug, PartialEq)]
struct Target<'a> {
    kind: Kind,
    ns: Option<&'a str>,
    name: Option<&'a str>,
    sub: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let find = |plural: &str| {
            Kind::ALL.into_iter().find(|k| k.group() == group && k.version() == version && k.plural() == plural)
        };
        let (kind, ns, tail) = match rest {
            ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(Kind::namespaced) => {
                (find(plural)?, Some(*ns), tail)
            }
            [plural, tail @ ..] => {
                let kind = find(plural)?;
                // A namespaced object is named only within its namespace.
                if kind.namespaced() && !tail.is_empty() {
                    return None;
                }
                (kind, None, tail)
            }
            [] => return None,
        };
        if tail.len() > 2 || tail.iter().any(|s| s.is_empty()) || ns.is_some_and(str::is_empty) {
            return None;
        }
        Some(Self { kind, ns, name: tail.first().copied(), sub: tail.get(1).copied() })
    }
}

fn not_found_path() -> Response {
    ApiError::new(404, "NotFound", "the server could not find the requested resource").into_response()
}

fn method_not_allowed(method: &Method) -> Response {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource ({method})"),
    )
    .into_response()
}

/// Every kind's routes but the Events'.
async fn dispatch(
    State(s): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(t) = Target::parse(uri.path()) else {
        return not_found_path();
    };
    let ns = t.ns.unwrap_or("");
    let (kind, lease, svc_status) = (t.kind, t.kind == Kind::Lease, t.kind == Kind::Service && t.sub == Some("status"));
    match (&method, t.name, t.sub) {
        (&Method::GET, None, None) => {
            let f = Filter { kind, ns: t.ns.map(str::to_string), q };
            list_or_watch(s, f, peer.ip().to_canonical()).await
        }
        (&Method::GET, Some(name), None) => get(&s, kind, ns, name),
        (&Method::GET, Some(name), Some(_)) if svc_status => get(&s, kind, ns, name),
        (_, _, Some(_)) if !svc_status => not_found_path(),
        (&Method::POST, None, None) if lease => write(&s, kind, false, |st| {
            let obj = parse(&body)?;
            Ok((StatusCode::CREATED, st.create(kind, ns, obj)?))
        }),
        (&Method::PUT, Some(name), _) if lease || svc_status => {
            let strategy = if svc_status { Strategy::Status } else { Strategy::Main };
            write(&s, kind, svc_status, |st| {
                let (obj, created) = st.update(kind, ns, name, parse(&body)?, strategy)?;
                Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, obj))
            })
        }
        (&Method::PATCH, Some(name), _) if lease || svc_status => {
            let strategy = if svc_status { Strategy::Status } else { Strategy::Main };
            let ct = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let ct = ct.split(';').next().unwrap_or("").trim();
            if !matches!(ct, "application/merge-patch+json" | "application/strategic-merge-patch+json") {
                let msg = format!(
                    "the body of the request was in an unknown format ({ct}) - accepted media types include: \
                     application/merge-patch+json, application/strategic-merge-patch+json"
                );
                return ApiError::new(415, "UnsupportedMediaType", msg).into_response();
            }
            write(&s, kind, svc_status, |st| {
                let patch = parse(&body)?;
                let mut obj = st.get(kind, ns, name)?.clone();
                merge_patch(&mut obj, &patch);
                Ok((StatusCode::OK, st.update(kind, ns, name, obj, strategy)?.0))
            })
        }
        (&Method::DELETE, Some(name), None) if lease => write(&s, kind, false, |st| {
            let options = if body.is_empty() { json!({}) } else { parse(&body)? };
            let gone = st.delete(kind, ns, name, &options)?;
            let details =
                json!({"name": name, "group": kind.group(), "kind": kind.plural(), "uid": gone["metadata"]["uid"]});
            Ok((
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
            ))
        }),
        _ => method_not_allowed(&method),
    }
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(ApiError::bad_request("the request body is not a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the request body is not JSON: {e}"))),
    }
}

fn get(s: &Inner, kind: Kind, ns: &str, name: &str) -> Response {
    match s.store.lock().unwrap().get(kind, ns, name) {
        Ok(obj) => json_response(StatusCode::OK, obj),
        Err(e) => e.into_response(),
    }
}

/// Runs one store operation under the lock and counts it: a success as a
/// status write or a Lease write, a 409 as a conflict.
fn write(
    s: &Inner,
    kind: Kind,
    status: bool,
    op: impl FnOnce(&mut crate::store::Store) -> Result<(StatusCode, Value), ApiError>,
) -> Response {
    let r = op(&mut s.store.lock().unwrap());
    match r {
        Ok((code, v)) => {
            if status {
                s.status_writes.fetch_add(1, Ordering::Relaxed);
            } else if kind == Kind::Lease {
                s.lease_writes.fetch_add(1, Ordering::Relaxed);
            }
            json_response(code, &v)
        }
        Err(e) => {
            if e.code == 409 {
                s.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        }
    }
}

/// `POST` / `PATCH` of an `events.k8s.io/v1` Event: kept as sent.
async fn event(State(s): State<Arc<Inner>>, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut posted = s.events_posted.lock().unwrap();
    // A named Event is created once: a second create is 409 AlreadyExists.
    let name = v["metadata"]["name"].as_str().filter(|n| !n.is_empty());
    if let Some(name) = name
        && posted.iter().any(|e| e["metadata"]["name"].as_str() == Some(name))
    {
        s.events_conflicts.fetch_add(1, Ordering::Relaxed);
        let msg = format!("events.events.k8s.io \"{name}\" already exists");
        return ApiError::new(409, "AlreadyExists", msg).into_response();
    }
    posted.push(v.clone());
    json_response(StatusCode::CREATED, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = |kind, ns, name, sub| Some(Target { kind, ns, name, sub });
        assert_eq!(Target::parse("/api/v1/services"), t(Kind::Service, None, None, None));
        assert_eq!(Target::parse("/api/v1/namespaces"), t(Kind::Namespace, None, None, None));
        assert_eq!(Target::parse("/api/v1/namespaces/shop"), t(Kind::Namespace, None, Some("shop"), None));
        assert_eq!(Target::parse("/api/v1/namespaces/shop/services"), t(Kind::Service, Some("shop"), None, None));
        assert_eq!(
            Target::parse("/api/v1/namespaces/shop/services/web/status"),
            t(Kind::Service, Some("shop"), Some("web"), Some("status"))
        );
        assert_eq!(
            Target::parse("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l"),
            t(Kind::Lease, Some("kube-system"), Some("l"), None)
        );
        assert_eq!(
            Target::parse("/apis/xlb.io/v1alpha1/loadbalancerippools/p"),
            t(Kind::LoadBalancerIPPool, None, Some("p"), None)
        );
        assert_eq!(Target::parse("/api/v1/nodes/n1"), t(Kind::Node, None, Some("n1"), None));
        assert_eq!(Target::parse("/api/v1/services/web"), None, "a namespaced object needs its namespace");
        assert_eq!(Target::parse("/apis/xlb.io/v1/loadbalancerippools"), None, "wrong version");
        assert_eq!(Target::parse("/apis/xlb.io/v1alpha1/namespaces/shop/loadbalancerippools"), None);
        assert_eq!(Target::parse("/healthz"), None);
    }
}
