// SPDX-License-Identifier: MIT OR Apache-2.0
//! Translation: Kubernetes objects + this node + options → the desired
//! datapath state. A pure function ([`translate`]) with no I/O, so every
//! Service feature is tested here against fixtures, and `xlb agent
//! --dry-run` prints exactly what the map writer would program.
//!
//! The rules follow kube-proxy where Kubernetes defines the behaviour:
//! - one frontend per (address, port, protocol): the ClusterIPs (internal
//!   scope), the NodePort on every node address, each LoadBalancer ingress
//!   IP and each externalIP (external scope);
//! - endpoints come from the EndpointSlices labelled
//!   `kubernetes.io/service-name`, matched to a service port by port *name*
//!   and protocol (which is how a named `targetPort` is resolved: the
//!   EndpointSlice controller writes the number each pod exposes);
//! - an endpoint is used when `ready`; when none of the candidates is ready,
//!   the `serving` + `terminating` ones are used (kube-proxy's fallback);
//!   every other endpoint of the slices is kept as a draining backend so its
//!   established connections finish;
//! - `externalTrafficPolicy: Local` limits the external frontends, and
//!   `internalTrafficPolicy: Local` the ClusterIP frontends, to endpoints on
//!   this node.
//!
//! Where each rule lives: [`service`] (a Service → its frontends), [`endpoints`]
//! (slices → endpoints, kube-proxy's choice), [`node`] (this node, the
//! options), [`model`] (the output's types), [`notes`] (problems and
//! expected skips), [`translator`] (the cache and the fast path).

use std::{borrow::Borrow, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;

mod endpoints;
mod model;
mod node;
mod notes;
mod service;
mod translator;
mod weights;

pub use endpoints::{TOPOLOGY_HINTS_ANNOTATION, TOPOLOGY_MODE_ANNOTATION};
pub use model::{BackendSpec, BackendState, Frontend, FrontendKey, Kind, Protocol, Scheduler, Scope};
pub use node::{NodeInfo, Options, ZONE_LABEL};
pub use translator::Translator;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation choosing the scheduler, by IPVS's name or the long one: `rr`
/// (`round-robin`), `wrr`, `lc`, `wlc`, `sh`, `mh` (`maglev`, the default
/// unless `--scheduler` says otherwise), `random`.
pub const SCHEDULER_ANNOTATION: &str = "xlb.io/scheduler";
/// Annotation giving endpoints weights: `key=weight` entries separated by
/// commas or white space, the key an endpoint's pod name (EndpointSlice
/// `targetRef.name`) or address, the weight 0–65535. An address entry
/// wins over a name entry; an endpoint named nowhere weighs 1; 0 takes no
/// new connections (established ones go on).
pub const WEIGHTS_ANNOTATION: &str = "xlb.io/weights";
/// Annotation overriding the Maglev table size (a prime within the configured bounds).
pub const MAGLEV_SIZE_ANNOTATION: &str = "xlb.io/maglev-table-size";
/// Kubernetes' default sessionAffinity ClientIP timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Something in the input xlb did not (fully) program, with the object it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// `namespace/name` of the Service.
    pub service: String,
    pub message: String,
}

/// kube-proxy's health check for an externalTrafficPolicy Local service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub service: String,
    pub port: u16,
    /// Ready endpoints of the service on this node.
    pub local_endpoints: usize,
}

/// The desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Desired {
    /// Sorted by key; keys are unique. Shared: an unchanged Service keeps
    /// the same `Arc`s from one [`Translator::translate`] to the next.
    pub frontends: Vec<Arc<Frontend>>,
    pub health_checks: Vec<HealthCheck>,
    /// Services or ports skipped for a reason worth a warning (SCTP, bad
    /// values, conflicts …).
    pub problems: Vec<Problem>,
    /// Services skipped by design, not problems: headless and ExternalName
    /// Services (DNS serves them), `ipMode: Proxy` ingress addresses.
    pub skipped: Vec<Problem>,
    /// Programmed, but worth a warning once: a NodePort outside
    /// `--node-port-range` (a cluster with a custom range keeps its NodePorts).
    pub notices: Vec<Problem>,
}

/// Computes the desired state. `services` and `slices` may come in any
/// order; the result is deterministic, frontends sorted by key.
pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    node: &NodeInfo,
    opts: &Options,
) -> Desired {
    let mut d = Translator::default().translate(services, slices, node, opts);
    d.normalize();
    d
}

impl Desired {
    /// Puts every list in a canonical order (frontends by key, the rest by
    /// Service, then content): what [`translate`] returns, whatever the
    /// input order.
    pub fn normalize(&mut self) {
        self.frontends.sort_unstable_by_key(|f| f.key);
        self.health_checks.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
        for list in [&mut self.problems, &mut self.skipped, &mut self.notices] {
            list.sort();
        }
    }
}

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

fn namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn family_matches(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

fn in_any(cidrs: &[IpNet], a: &IpAddr) -> bool {
    cidrs.iter().any(|c| c.contains(a))
}
