// SPDX-License-Identifier: MIT OR Apache-2.0
//! Where the Kubernetes objects come from: the API server ([`kube`]) or a
//! directory of YAML ([`files`]). Both publish whole [`Snapshot`]s on a
//! `tokio::sync::watch` channel; the agent translates the newest one.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::lbipam::LoadBalancerIPPool;

pub mod files;
pub mod kube;

/// Every object the translation needs, at one moment. Objects are shared
/// with the source's stores: a snapshot costs a pointer per object, and an
/// object that did not change is the same `Arc` in the next snapshot (the
/// translator's fast path relies on that).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub nodes: Vec<Arc<Node>>,
    /// LoadBalancerIPPools and Namespaces (their labels, for pools'
    /// `namespaceSelector`): the LoadBalancer address allocation's input.
    pub pools: Vec<Arc<LoadBalancerIPPool>>,
    pub namespaces: Vec<Arc<Namespace>>,
    /// Problems of the LoadBalancer address allocation: (`namespace/name`
    /// of the Service, or `pool/NAME`; message).
    pub lb_problems: Vec<(String, String)>,
    /// Objects that could not be read (file, document, reason).
    pub errors: Vec<String>,
    /// When the change that produced this snapshot was seen (for the
    /// event-to-map latency metric).
    pub changed_at: Option<Instant>,
    /// False until the source has a complete view (the API server's
    /// initial lists); the agent programs nothing before.
    pub synced: bool,
    /// The pools and Namespaces are complete too: the LoadBalancer
    /// allocation may run (never on a partial view of the pools).
    pub lb_synced: bool,
}

/// The label that gives a Service (and its EndpointSlices) to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label the EndpointSlice controller puts on a headless Service's slices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Which Services and EndpointSlices are this proxy's, as kube-proxy's
/// informers select them (`cmd/kube-proxy/app/server.go`): none labelled
/// `service.kubernetes.io/service-proxy-name` (another proxy serves those)
/// and no headless slices; with `--service-proxy-name NAME`, exactly the
/// ones labelled with NAME. The API server filters (nothing else is held in
/// memory); the file source applies the same rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub proxy_name: Option<String>,
}

impl Selector {
    /// The list/watch `labelSelector`.
    pub fn label_selector(&self) -> String {
        match &self.proxy_name {
            None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
            Some(n) => format!("{SERVICE_PROXY_NAME_LABEL}={n},!{HEADLESS_LABEL}"),
        }
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        get(HEADLESS_LABEL).is_none() && get(SERVICE_PROXY_NAME_LABEL) == self.proxy_name.as_ref()
    }

    /// Drops the Services and EndpointSlices that are not ours.
    pub fn retain(&self, snap: &mut Snapshot) {
        snap.services.retain(|s| self.matches(s.metadata.labels.as_ref()));
        snap.slices.retain(|s| self.matches(s.metadata.labels.as_ref()));
    }
}
