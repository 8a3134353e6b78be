// SPDX-License-Identifier: MIT OR Apache-2.0
//! Warning Events on Services xlb could not (fully) program, so `kubectl
//! describe service` says what was skipped and why.
//!
//! One Event per problem in the whole cluster, not one per node: every
//! agent sees the same Services and translates them the same way, so a
//! translation problem gets an Event whose name is derived from the
//! Service's UID and the message. The first agent to report it creates it;
//! the others get `409 AlreadyExists` and know it is reported. A problem of
//! one node's maps (a full map, no free id) names that node.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

use crate::{source::Snapshot, translate::Problem};

/// `reportingController` of xlb's Events.
pub const CONTROLLER: &str = "xlb.io/agent";
/// The Event reason.
pub const REASON: &str = "XlbNotProgrammed";

/// Where a problem comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The translation: the same on every node, reported once.
    Cluster,
    /// This node's maps: reported per node.
    Node,
}

/// Publishes each problem's Event once.
pub struct EventSink {
    client: Client,
    node: String,
    /// (Service UID or name, message) created or being created; a create
    /// that fails (other than 409) is taken out, so the next sync retries.
    published: Arc<Mutex<HashSet<(String, String)>>>,
}

/// FNV-1a, 64 bits: a stable name part (not for security).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl EventSink {
    pub fn new(client: Client, node: &str) -> Self {
        Self { client, node: node.to_string(), published: Arc::default() }
    }

    /// The Event for `p` on Service `svc` (`uid`), as `origin` names it.
    pub fn event(&self, ns: &str, name: &str, uid: &str, message: &str, origin: Origin) -> Event {
        let scope = match origin {
            Origin::Cluster => "",
            Origin::Node => self.node.as_str(),
        };
        let now = MicroTime(Timestamp::now());
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.xlb-{:016x}", fnv(&[uid, message, scope]))),
                namespace: Some(ns.to_string()),
                ..ObjectMeta::default()
            },
            type_: Some("Warning".into()),
            reason: Some(REASON.into()),
            action: Some("Programming".into()),
            note: Some(message.chars().take(1000).collect()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(ns.to_string()),
                name: Some(name.to_string()),
                uid: (!uid.is_empty()).then(|| uid.to_string()),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(CONTROLLER.into()),
            reporting_instance: Some(format!("xlb-{}", self.node)),
            event_time: Some(now),
            ..Event::default()
        }
    }

    /// Creates the Events of `problems` not published yet by this agent;
    /// one another agent created already counts as published.
    pub fn publish(&mut self, snap: &Snapshot, problems: &[Problem], origin: Origin) {
        for p in problems {
            let Some((ns, name)) = p.service.split_once('/') else { continue };
            let Some(svc) = snap
                .services
                .iter()
                .find(|s| s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name))
            else {
                continue;
            };
            let uid = svc.metadata.uid.clone().unwrap_or_default();
            // A Service recreated under the same name (a new UID) is reported again.
            let key = (if uid.is_empty() { p.service.clone() } else { uid.clone() }, p.message.clone());
            if !self.published.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
                continue;
            }
            let ev = self.event(ns, name, &uid, &p.message, origin);
            let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
            let published = self.published.clone();
            tokio::spawn(async move {
                match api.create(&PostParams::default(), &ev).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {} // another node reported it
                    Err(e) => {
                        tracing::warn!(error = %e, "publishing an Event failed; retrying at the next sync");
                        published.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fnv;

    #[test]
    fn names_are_stable_and_tell_inputs_apart() {
        assert_eq!(fnv(&["uid", "msg", ""]), fnv(&["uid", "msg", ""]));
        assert_ne!(fnv(&["uid", "msg", ""]), fnv(&["uid", "msg", "node-1"]));
        // The separator: ("ab", "c") is not ("a", "bc").
        assert_ne!(fnv(&["ab", "c"]), fnv(&["a", "bc"]));
    }
}
