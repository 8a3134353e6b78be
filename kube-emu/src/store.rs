// SPDX-License-Identifier: MIT OR Apache-2.0
//! The objects, the one global resourceVersion (etcd's revision), the
//! event history and the write paths of the generic registry store
//! (`k8s.io/apiserver/pkg/registry/generic/registry/store.go`): create,
//! update (with the strategy's `AllowCreateOnUpdate` and
//! `AllowUnconditionalUpdate`), delete with preconditions, and the
//! unconditional `apply` of the harness. Every one of them ends in
//! [`Store::write`], which bumps the resourceVersion, stamps the object,
//! records the event and broadcasts it to the watches.
//!
//! Errors are [`ApiError`]s, answered as `Status` objects with the real
//! server's reasons and messages.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::Kind;

/// An object's identity: kind, namespace (`""` when cluster-scoped), name.
pub(crate) type Key = (Kind, String, String);

/// At most this many events are kept; older ones are compacted away (a
/// watch from before them gets 410), as etcd's periodic compaction.
const HISTORY_MAX: usize = 50_000;

/// One change, as a watch sees it.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub kind: Kind,
    pub rv: u64,
    pub ty: &'static str,
    pub object: Value,
    /// The object before a MODIFIED (for selector transitions).
    pub old: Option<Value>,
}

/// A failed request, answered as a `Status` object (which kube-rs turns
/// into `kube::Error::Api` with this `code` and `reason`).
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, kind: Kind, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        self
    }

    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", kind.qualified())).with_details(kind, name)
    }

    pub fn already_exists(kind: Kind, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", kind.qualified()))
            .with_details(kind, name)
    }

    /// `apierrors.NewConflict` with the optimistic-lock message (or `why`).
    pub fn conflict(kind: Kind, name: &str, why: &str) -> Self {
        let msg = format!("Operation cannot be fulfilled on {} \"{name}\": {why}", kind.qualified());
        Self::new(409, "Conflict", msg).with_details(kind, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code});
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, [("content-type", "application/json")], self.status().to_string()).into_response()
    }
}

/// The optimistic-lock error message of the generic store.
pub(crate) const MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// Which update rules apply: the main resource's (the kind's strategy) or
/// the status subresource's (spec and metadata kept from the stored object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Strategy {
    Main,
    Status,
}

pub(crate) struct Store {
    pub rv: u64,
    /// Compaction floor: watches from an older resourceVersion get 410.
    pub floor: u64,
    pub objects: BTreeMap<Key, Value>,
    pub history: Vec<Event>,
    events: broadcast::Sender<Event>,
    /// Mixed into generated uids, so two servers do not hand out the same.
    seed: u64,
}

pub(crate) fn key(kind: Kind, ns: &str, name: &str) -> Key {
    (kind, if kind.namespaced() { ns.to_string() } else { String::new() }, name.to_string())
}

fn rv_of(obj: &Value) -> Result<u64, ApiError> {
    match &obj["metadata"]["resourceVersion"] {
        Value::Null => Ok(0),
        Value::String(s) if s.is_empty() => Ok(0),
        Value::String(s) => s.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}"))),
        v => Err(ApiError::bad_request(format!("invalid resource version: {v}"))),
    }
}

impl Store {
    pub fn new() -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        Self {
            rv: 100,
            floor: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            events: broadcast::channel(8192).0,
            seed: nanos ^ u64::from(std::process::id()) << 32,
        }
    }

    /// Live events after now (call under the lock that reads the backlog).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Forgets the history and moves past it (like an etcd compaction).
    pub fn compact(&mut self) {
        self.rv += 1;
        self.floor = self.rv;
        self.history.clear();
    }

    /// The one write: `Some(obj)` stores `obj` under `key` (created or
    /// replaced), `None` deletes it. Bumps the global resourceVersion and
    /// stamps the object (apiVersion, kind, name, namespace, a new
    /// resourceVersion; `uid` and `creationTimestamp` kept from the stored
    /// object, else set when absent), records the ADDED / MODIFIED / DELETED
    /// event and broadcasts it. Returns the object written (or deleted);
    /// `None` when deleting a missing object (nothing happens).
    pub fn write(&mut self, key: Key, new: Option<Value>) -> Option<Value> {
        let kind = key.0;
        let (ty, object, old) = match new {
            Some(mut obj) => {
                self.rv += 1;
                let old = self.objects.get(&key);
                obj["apiVersion"] = json!(kind.api_version());
                obj["kind"] = json!(kind.name());
                let m = &mut obj["metadata"];
                if !m.is_object() {
                    *m = json!({});
                }
                m["name"] = json!(key.2);
                if kind.namespaced() {
                    m["namespace"] = json!(key.1);
                } else if let Some(m) = m.as_object_mut() {
                    m.remove("namespace");
                }
                m["resourceVersion"] = json!(self.rv.to_string());
                normalize(kind, &mut obj);
                let m = &mut obj["metadata"];
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = old.map(|o| &o["metadata"][field]).filter(|v| !v.is_null()) {
                        m[field] = v.clone();
                    } else if m[field].as_str().is_none_or(str::is_empty) {
                        m[field] = json!(if field == "uid" { self.uid() } else { now_rfc3339() });
                    }
                }
                let old = self.objects.insert(key, obj.clone());
                (if old.is_some() { "MODIFIED" } else { "ADDED" }, obj, old)
            }
            None => {
                let mut obj = self.objects.remove(&key)?;
                self.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                ("DELETED", obj, None)
            }
        };
        let ev = Event { kind, rv: self.rv, ty, object: object.clone(), old };
        self.history.push(ev.clone());
        if self.history.len() > HISTORY_MAX {
            let cut = self.history.len() - HISTORY_MAX / 2;
            self.floor = self.history[cut - 1].rv;
            self.history.drain(..cut);
        }
        let _ = self.events.send(ev);
        Some(object)
    }

    /// A uid in the UUID v4 layout, unique per server and write.
    fn uid(&self) -> String {
        let (a, b) = (self.seed, self.rv);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Result<&Value, ApiError> {
        self.objects.get(&key(kind, ns, name)).ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// The harness's `kubectl apply`: creates or replaces unconditionally.
    /// A Service whose new object has no `status` keeps the stored one.
    pub fn apply(&mut self, kind: Kind, mut obj: Value) -> Value {
        let m = &obj["metadata"];
        let ns = m["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or("default");
        let k = key(kind, ns, m["name"].as_str().unwrap_or(""));
        if kind == Kind::Service
            && obj.get("status").is_none()
            && let Some(status) = self.objects.get(&k).and_then(|o| o.get("status"))
        {
            obj["status"] = status.clone();
        }
        self.write(k, Some(obj)).expect("a write returns the object")
    }

    /// `POST` (create): 409 AlreadyExists when the name is taken. The
    /// server owns `uid`, `creationTimestamp` and `resourceVersion`.
    pub fn create(&mut self, kind: Kind, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        check_namespace(kind, ns, &obj)?;
        if rv_of(&obj)? != 0 {
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let m = &mut obj["metadata"];
        if m["name"].as_str().is_none_or(str::is_empty)
            && let Some(prefix) = m["generateName"].as_str().filter(|p| !p.is_empty())
        {
            m["name"] = json!(format!("{prefix}{:05x}", (self.rv + 1) & 0xfffff));
        }
        let Some(name) = m["name"].as_str().filter(|n| !n.is_empty()).map(str::to_string) else {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    kind.name()
                ),
            ));
        };
        if let Some(m) = m.as_object_mut() {
            m.remove("uid");
            m.remove("creationTimestamp");
        }
        let k = key(kind, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(kind, &name));
        }
        Ok(self.write(k, Some(obj)).expect("a write returns the object"))
    }

    /// `PUT` (replace) of the main resource or the status subresource:
    /// store.go's `Update`. A missing object is created when the kind
    /// allows create-on-update (`(object, true)`), else 404; no
    /// resourceVersion is 422 unless the kind allows unconditional updates;
    /// a stale one is 409 Conflict. An update that changes nothing writes
    /// nothing (no new resourceVersion, no event), as the real server.
    pub fn update(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        mut obj: Value,
        strategy: Strategy,
    ) -> Result<(Value, bool), ApiError> {
        check_namespace(kind, ns, &obj)?;
        match obj["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() && n != name => {
                let msg = format!("the name of the object ({n}) does not match the name on the URL ({name})");
                return Err(ApiError::bad_request(msg));
            }
            _ => {}
        }
        let rv = rv_of(&obj)?;
        let k = key(kind, ns, name);
        let Some(old) = self.objects.get(&k) else {
            if strategy == Strategy::Status || !kind.allow_create_on_update() {
                return Err(ApiError::not_found(kind, name));
            }
            if let Some(m) = obj["metadata"].as_object_mut() {
                for f in ["resourceVersion", "uid", "creationTimestamp"] {
                    m.remove(f);
                }
            }
            return Ok((self.write(k, Some(obj)).expect("a write returns the object"), true));
        };
        if rv == 0 && !kind.allow_unconditional_update() {
            let msg = format!(
                "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                kind.qualified()
            );
            let mut e = ApiError::new(422, "Invalid", msg).with_details(kind, name);
            e.details.as_mut().expect("details")["causes"] = json!([{"reason": "FieldValueInvalid",
                "message": "Invalid value: 0x0: must be specified for an update", "field": "metadata.resourceVersion"}]);
            return Err(e);
        }
        if rv != 0 && rv_of(old)? != rv {
            return Err(ApiError::conflict(kind, name, MODIFIED));
        }
        if strategy == Strategy::Status {
            // serviceStatusStrategy: a status write never changes spec; the
            // metadata (labels, annotations, …) is the stored one.
            obj["spec"] = old["spec"].clone();
            obj["metadata"] = old["metadata"].clone();
        }
        let mut same = obj.clone();
        same["apiVersion"] = old["apiVersion"].clone();
        same["kind"] = old["kind"].clone();
        for f in ["resourceVersion", "uid", "creationTimestamp", "name", "namespace"] {
            same["metadata"][f] = old["metadata"][f].clone();
        }
        if same == *old {
            return Ok((old.clone(), false));
        }
        Ok((self.write(k, Some(obj)).expect("a write returns the object"), false))
    }

    /// `DELETE`, with the `DeleteOptions` preconditions (`uid`,
    /// `resourceVersion`): 404 when missing, 409 when a precondition fails.
    pub fn delete(&mut self, kind: Kind, ns: &str, name: &str, options: &Value) -> Result<Value, ApiError> {
        let old = self.get(kind, ns, name)?;
        let pre = &options["preconditions"];
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = pre[field].as_str()
                && old["metadata"][field].as_str() != Some(want)
            {
                let got = old["metadata"][field].as_str().unwrap_or("");
                let why = format!("Precondition failed: {what} in precondition: {want}, {what} in object meta: {got}");
                return Err(ApiError::conflict(kind, name, &why));
            }
        }
        Ok(self.write(key(kind, ns, name), None).expect("the object exists"))
    }
}

/// The namespace in the body, if any, must be the one of the URL.
fn check_namespace(kind: Kind, ns: &str, obj: &Value) -> Result<(), ApiError> {
    match obj["metadata"]["namespace"].as_str() {
        Some(n) if kind.namespaced() && !n.is_empty() && n != ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(()),
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes a
/// key, anything else (arrays included) replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Now as RFC 3339 in UTC, to the second (`2024-05-01T12:00:00Z`).
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// What the real registries do to every object written, beyond the
/// generic store:
/// - Lease (`pkg/registry/coordination/lease/strategy.go`): without the
///   CoordinatedLeaderElection feature gate (off by default)
///   `spec.preferredHolder` and `spec.strategy` are dropped.
/// - Service (`pkg/registry/core/service/strategy.go`,
///   `dropTypeDependentFields`): a Service that is not `type:
///   LoadBalancer` has no load-balancer status.
fn normalize(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Lease => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("preferredHolder");
                spec.remove("strategy");
            }
        }
        Kind::Service => {
            if obj["spec"]["type"].as_str() != Some("LoadBalancer")
                && let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut)
                && status.contains_key("loadBalancer")
            {
                status.insert("loadBalancer".into(), json!({}));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_is_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}}));
    }

    #[test]
    fn timestamps_look_like_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }
}
