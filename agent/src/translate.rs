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

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

use crate::maglev;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation choosing the scheduler: `maglev` (default), `round-robin`, `random`.
pub const SCHEDULER_ANNOTATION: &str = "xlb.io/scheduler";
/// Annotation overriding the Maglev table size (a prime within the configured bounds).
pub const MAGLEV_SIZE_ANNOTATION: &str = "xlb.io/maglev-table-size";
/// Kubernetes' default sessionAffinity ClientIP timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// This node, as translation needs it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeInfo {
    /// `metadata.name`, compared with an endpoint's `nodeName` for locality.
    pub name: String,
    /// Addresses NodePorts are exposed on.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// The InternalIP and ExternalIP addresses of a Node object.
    pub fn from_node(node: &Node) -> Self {
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Self { name: node.metadata.name.clone().unwrap_or_default(), addresses }
    }

    /// The addresses that carry NodePorts under `opts`.
    pub fn nodeport_addresses(&self, opts: &Options) -> Vec<IpAddr> {
        self.addresses
            .iter()
            .filter(|a| opts.nodeport_cidrs.is_empty() || in_any(&opts.nodeport_cidrs, a))
            .copied()
            .collect()
    }
}

/// Node-wide translation settings (agent flags).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Options {
    /// Valid NodePort values (kube-apiserver's `--service-node-port-range`).
    pub node_port_range: (u16, u16),
    /// Only node addresses inside these CIDRs carry NodePorts; empty: all
    /// (kube-proxy's `--nodeport-addresses`).
    pub nodeport_cidrs: Vec<IpNet>,
    /// externalIPs allowed; empty: any. Restricting them is the node-side
    /// mitigation of CVE-2020-8554 (a user claiming someone else's IP).
    pub external_ip_cidrs: Vec<IpNet>,
    /// Bounds of the adaptive Maglev table size.
    pub maglev_min: u32,
    pub maglev_max: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            node_port_range: (30000, 32767),
            nodeport_cidrs: Vec::new(),
            external_ip_cidrs: Vec::new(),
            maglev_min: maglev::MIN_SIZE,
            maglev_max: maglev::MAX_SIZE,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => datapath_common::PROTO_TCP,
            Self::Udp => datapath_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            datapath_common::PROTO_TCP => Some(Self::Tcp),
            datapath_common::PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// Which hook matches a frontend (see `datapath_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    External,
    Internal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Self::External => datapath_common::SCOPE_EXTERNAL,
            Self::Internal => datapath_common::SCOPE_INTERNAL,
        }
    }
}

/// Where a frontend address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl Kind {
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u8) -> Option<Self> {
        [Self::ClusterIp, Self::NodePort, Self::LoadBalancer, Self::ExternalIp].get(n as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "externalIP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    Maglev,
    RoundRobin,
    Random,
}

impl Scheduler {
    pub fn number(self) -> u8 {
        match self {
            Self::Maglev => datapath_common::SCHED_MAGLEV,
            Self::RoundRobin => datapath_common::SCHED_ROUND_ROBIN,
            Self::Random => datapath_common::SCHED_RANDOM,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            datapath_common::SCHED_MAGLEV => Some(Self::Maglev),
            datapath_common::SCHED_ROUND_ROBIN => Some(Self::RoundRobin),
            datapath_common::SCHED_RANDOM => Some(Self::Random),
            _ => None,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "maglev" => Some(Self::Maglev),
            "round-robin" | "rr" => Some(Self::RoundRobin),
            "random" => Some(Self::Random),
            _ => None,
        }
    }
}

/// The (address, port, protocol, scope) a frontend is matched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FrontendKey {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub port: u16,
    /// `active`: eligible for new flows; `terminating`: keeps its flows only.
    pub state: BackendState,
    /// The endpoint runs on this node.
    pub node_local: bool,
}

/// One frontend of the desired state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Frontend {
    /// `namespace/name:port`, the port's name (or number when unnamed).
    pub name: String,
    pub kind: Kind,
    #[serde(flatten)]
    pub key: FrontendKey,
    pub scheduler: Scheduler,
    /// sessionAffinity ClientIP timeout; `None` without affinity.
    pub affinity_timeout_s: Option<u32>,
    /// externalTrafficPolicy (external frontends) or internalTrafficPolicy
    /// (ClusterIP) is `Local`: only node-local endpoints, never SNAT.
    pub local_only: bool,
    /// A `Local` policy whose Service has usable endpoints, none of them on
    /// this node: new flows are dropped, not rejected (kube-proxy's DROP
    /// "has no local endpoints"), so clients retransmit while a load
    /// balancer's health checks move traffic elsewhere. A Service with no
    /// usable endpoint at all is rejected.
    pub no_local_endpoints: bool,
    /// Maglev table size (prime), 0 for other schedulers or no backends.
    pub maglev_size: u32,
    /// loadBalancerSourceRanges of a LoadBalancer frontend; empty: any source.
    pub source_ranges: Vec<IpNet>,
    /// Eligible (`active`) backends first, then draining ones; sorted within each.
    pub backends: Vec<BackendSpec>,
}

impl Frontend {
    pub fn active(&self) -> impl Iterator<Item = &BackendSpec> {
        self.backends.iter().filter(|b| b.state == BackendState::Active)
    }
}

/// A message of one Service's translation: a problem, or a skip that is
/// expected by design (headless, ExternalName, an `ipMode: Proxy` address),
/// which is not a problem: no warning, no Event.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Note {
    expected: bool,
    message: String,
}

impl Note {
    fn expected(message: &str) -> Self {
        Self { expected: true, message: message.into() }
    }
}

impl From<String> for Note {
    fn from(message: String) -> Self {
        Self { expected: false, message }
    }
}

impl From<&str> for Note {
    fn from(message: &str) -> Self {
        Self { expected: false, message: message.into() }
    }
}

/// The notes of one Service's translation, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Notes(Vec<Note>);

impl Notes {
    fn push(&mut self, n: impl Into<Note>) {
        self.0.push(n.into());
    }
}

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
}

/// An endpoint of a slice, with kube-proxy's condition defaults applied.
#[derive(Clone, Debug)]
struct Endpoint {
    address: IpAddr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
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
    d.frontends.sort_unstable_by_key(|f| f.key);
    d
}

/// What one Service translated to, and the versions it was translated from.
struct Cached {
    namespace: String,
    name: String,
    /// The Service's resourceVersion, and its EndpointSlices' (name, resourceVersion).
    version: String,
    slices: Vec<(String, String)>,
    frontends: Vec<Arc<Frontend>>,
    problems: Notes,
    health_checks: Vec<HealthCheck>,
    /// The last [`Translator::translate`] call that saw the Service.
    seen: u64,
}

/// [`translate`] with memory: a Service whose object and EndpointSlices
/// carry the same resourceVersions as last time is not translated again,
/// and its frontends are the same `Arc`s, which the map writer skips. A
/// sync after one EndpointSlice change costs one Service's translation plus
/// a hash lookup per other Service; nothing is sorted. Objects without a
/// resourceVersion are translated every time.
///
/// The result is [`translate`]'s with the frontends in input order instead
/// of key order: when two Services claim one frontend, the one first by
/// `namespace/name` still gets it, wherever it comes in the input.
#[derive(Default)]
pub struct Translator {
    node: Option<NodeInfo>,
    opts: Option<Options>,
    cache: FastMap<u64, Cached>,
    hasher: foldhash::fast::RandomState,
    calls: u64,
    prev: Option<Prev>,
}

type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

fn namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// `namespace/name` of a frontend's Service (its name is `namespace/name:port`).
fn owner(f: &Frontend) -> &str {
    f.name.rsplit_once(':').map_or(f.name.as_str(), |(s, _)| s)
}

/// The last [`Translator::translate_shared`] call, for its fast path.
struct Prev {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// By service position.
    per_service: Vec<PrevService>,
    /// By slice position: the position of the service it belongs to.
    slice_owner: Vec<Option<usize>>,
    out: Desired,
}

/// What one service (by input position) contributed to the last output.
#[derive(Default)]
struct PrevService {
    /// Positions of its slices in the input.
    slices: Vec<usize>,
    /// Keys of all its frontends, in order, and where each one sits in the
    /// output (`None`: another Service holds that key).
    keys: Vec<FrontendKey>,
    placed: Vec<Option<usize>>,
    problems: Notes,
    health_checks: Vec<HealthCheck>,
}

/// A change touching more Services than this takes the full path.
const FAST_PATH_MAX: usize = 64;

fn label(s: &EndpointSlice) -> Option<&str> {
    s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str)
}

impl Translator {
    /// Translates objects of any origin (no fast path; see [`Translator::translate_shared`]).
    pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
        &mut self,
        services: &[S],
        slices: &[E],
        node: &NodeInfo,
        opts: &Options,
    ) -> Desired {
        self.prev = None;
        self.full(services, slices, node, opts, false)
    }

    /// Translates a [`crate::source::Snapshot`]'s shared objects. When the
    /// input has the same shape as last time (same lengths, the changed
    /// objects at the positions of the ones they replace, as in a reflector
    /// store after updates) and few objects changed, only the Services they
    /// touch are translated, in place, and the rest is not looked at: the
    /// cost of a sync is then that of a pointer comparison per object.
    pub fn translate_shared(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
        opts: &Options,
    ) -> Desired {
        if self.node.as_ref() == Some(node)
            && self.opts.as_ref() == Some(opts)
            && let Some(d) = self.fast(services, slices, node, opts)
        {
            return d;
        }
        let d = self.full(services, slices, node, opts, true);
        if let Some(p) = self.prev.as_mut() {
            p.services = services.to_vec();
            p.slices = slices.to_vec();
        }
        d
    }

    fn fast(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
        opts: &Options,
    ) -> Option<Desired> {
        let p = self.prev.as_mut()?;
        if p.services.len() != services.len() || p.slices.len() != slices.len() {
            return None;
        }
        let mut affected: Vec<usize> = Vec::new();
        for (i, (old, new)) in p.services.iter().zip(services).enumerate() {
            if !Arc::ptr_eq(old, new) {
                let same =
                    old.metadata.name == new.metadata.name && namespace(&old.metadata) == namespace(&new.metadata);
                if !same || affected.len() == FAST_PATH_MAX {
                    return None;
                }
                affected.push(i);
            }
        }
        for (j, (old, new)) in p.slices.iter().zip(slices).enumerate() {
            if !Arc::ptr_eq(old, new) {
                // Same owner, or the grouping changed: start over.
                if label(old) != label(new) || namespace(&old.metadata) != namespace(&new.metadata) {
                    return None;
                }
                if let Some(i) = p.slice_owner[j] {
                    if affected.len() == FAST_PATH_MAX {
                        return None;
                    }
                    affected.push(i);
                }
            }
        }
        affected.sort_unstable();
        affected.dedup();
        let mut out = p.out.clone();
        let mut redone = Vec::with_capacity(affected.len());
        for &i in &affected {
            let (svc, ps) = (&*services[i], &p.per_service[i]);
            let sl: Vec<&EndpointSlice> = ps.slices.iter().map(|&j| &*slices[j]).collect();
            let id = format!("{}/{}", namespace(&svc.metadata), svc.metadata.name.as_deref().unwrap_or(""));
            let (mut problems, mut health) = (Notes::default(), Vec::new());
            let frontends = service_frontends(svc, &id, &sl, node, opts, &mut problems, &mut health);
            // Only endpoints changed: the same frontends, problems and health checks.
            if frontends.len() != ps.keys.len()
                || frontends.iter().zip(&ps.keys).any(|(f, k)| f.key != *k)
                || problems != ps.problems
                || health != ps.health_checks
            {
                return None;
            }
            redone.push(frontends);
        }
        for (&i, frontends) in affected.iter().zip(redone) {
            for (f, at) in frontends.into_iter().zip(&p.per_service[i].placed) {
                if let Some(pos) = *at {
                    out.frontends[pos] = Arc::new(f);
                }
            }
        }
        p.services.clone_from_slice(services);
        p.slices.clone_from_slice(slices);
        p.out = out.clone();
        Some(out)
    }

    fn full<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
        &mut self,
        services: &[S],
        slices: &[E],
        node: &NodeInfo,
        opts: &Options,
        record: bool,
    ) -> Desired {
        use std::hash::BuildHasher as _;
        if self.node.as_ref() != Some(node) || self.opts.as_ref() != Some(opts) {
            self.cache.clear();
            self.node = Some(node.clone());
            self.opts = Some(opts.clone());
        }
        self.calls += 1;
        let call = self.calls;
        // EndpointSlices (by position) by (namespace, service name).
        let mut by_service: FastMap<(&str, &str), Vec<usize>> =
            FastMap::with_capacity_and_hasher(slices.len(), self.hasher.clone());
        for (j, s) in slices.iter().enumerate() {
            let s = s.borrow();
            if let Some(svc) = label(s) {
                by_service.entry((namespace(&s.metadata), svc)).or_default().push(j);
            }
        }

        let mut out = Desired::default();
        // Frontend key → its index in `out.frontends`; index → (service, frontend) positions.
        let mut taken: FastMap<FrontendKey, usize> =
            FastMap::with_capacity_and_hasher(services.len() * 2, self.hasher.clone());
        let mut holder: Vec<(usize, usize)> = Vec::new();
        let mut per_service: Vec<PrevService> = Vec::new();
        let mut slice_owner: Vec<Option<usize>> = vec![None; if record { slices.len() } else { 0 }];
        let mut problems: Vec<Problem> = Vec::new();
        for (i, svc) in services.iter().enumerate() {
            let svc = svc.borrow();
            let (ns, name) = (namespace(&svc.metadata), svc.metadata.name.as_deref().unwrap_or(""));
            let positions = by_service.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
            let sl: Vec<&EndpointSlice> = positions.iter().map(|&j| slices[j].borrow()).collect();
            let h = self.hasher.hash_one((ns, name));
            let hit =
                self.cache.get(&h).is_some_and(|c| c.namespace == ns && c.name == name && up_to_date(c, svc, &sl));
            if !hit {
                let id = format!("{ns}/{name}");
                let (mut p, mut health) = (Notes::default(), Vec::new());
                let frontends = service_frontends(svc, &id, &sl, node, opts, &mut p, &mut health);
                let versioned =
                    svc.metadata.resource_version.is_some() && sl.iter().all(|s| s.metadata.resource_version.is_some());
                let version = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                    m.resource_version.clone().unwrap_or_default()
                };
                let c = Cached {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    // Empty: never up to date (see `up_to_date`).
                    version: if versioned { version(&svc.metadata) } else { String::new() },
                    slices: sl
                        .iter()
                        .map(|s| (s.metadata.name.clone().unwrap_or_default(), version(&s.metadata)))
                        .collect(),
                    frontends: frontends.into_iter().map(Arc::new).collect(),
                    problems: p,
                    health_checks: health,
                    seen: call,
                };
                self.cache.insert(h, c);
            }
            let c = self.cache.get_mut(&h).expect("cached above");
            c.seen = call;
            let id = || format!("{ns}/{name}");
            for n in &c.problems.0 {
                let p = Problem { service: id(), message: n.message.clone() };
                if n.expected { out.skipped.push(p) } else { problems.push(p) }
            }
            out.health_checks.extend(c.health_checks.iter().cloned());
            let mut mine = PrevService::default();
            if record {
                for &j in positions {
                    slice_owner[j] = Some(i);
                }
                mine = PrevService {
                    slices: positions.to_vec(),
                    keys: c.frontends.iter().map(|f| f.key).collect(),
                    placed: vec![None; c.frontends.len()],
                    problems: c.problems.clone(),
                    health_checks: c.health_checks.clone(),
                };
            }
            for (k, f) in c.frontends.iter().enumerate() {
                let Some(&at) = taken.get(&f.key) else {
                    taken.insert(f.key, out.frontends.len());
                    if record {
                        mine.placed[k] = Some(out.frontends.len());
                        holder.push((i, k));
                    }
                    out.frontends.push(Arc::clone(f));
                    continue;
                };
                // Two claims: the Service first by namespace/name keeps it.
                let held = &out.frontends[at];
                let (loser, winner) = if owner(f) < owner(held) {
                    let lost = std::mem::replace(&mut out.frontends[at], Arc::clone(f));
                    if record {
                        let (oi, ok) = std::mem::replace(&mut holder[at], (i, k));
                        if oi == i {
                            mine.placed[ok] = None;
                        } else {
                            per_service[oi].placed[ok] = None;
                        }
                        mine.placed[k] = Some(at);
                    }
                    (lost, Arc::clone(f))
                } else {
                    (Arc::clone(f), Arc::clone(held))
                };
                problems.push(Problem {
                    service: owner(&loser).to_string(),
                    message: format!(
                        "{} {}:{}/{:?} is already used by {}; skipped",
                        loser.kind.name(),
                        loser.key.address,
                        loser.key.port,
                        loser.key.protocol,
                        winner.name
                    ),
                });
            }
            if record {
                per_service.push(mine);
            }
        }
        self.cache.retain(|_, c| c.seen == call);
        // By Service (stable: each one's own problems before its duplicates).
        problems.sort_by(|a, b| a.service.cmp(&b.service));
        out.problems = problems;
        if record {
            self.prev =
                Some(Prev { services: Vec::new(), slices: Vec::new(), per_service, slice_owner, out: out.clone() });
        }
        out
    }
}

/// The cached translation still holds: same Service version, same slices
/// at the same versions. Never for objects without versions.
fn up_to_date(c: &Cached, svc: &Service, slices: &[&EndpointSlice]) -> bool {
    if c.version.is_empty() || svc.metadata.resource_version.as_deref() != Some(c.version.as_str()) {
        return false;
    }
    c.slices.len() == slices.len()
        && c.slices.iter().zip(slices).all(|((name, version), s)| {
            s.metadata.name.as_deref() == Some(name.as_str())
                && s.metadata.resource_version.as_deref() == Some(version.as_str())
        })
}

fn family_matches(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

fn in_any(cidrs: &[IpNet], a: &IpAddr) -> bool {
    cidrs.iter().any(|c| c.contains(a))
}

/// The frontends of one Service; problems are pushed as messages.
fn service_frontends(
    svc: &Service,
    id: &str,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
    problems: &mut Notes,
    health_checks: &mut Vec<HealthCheck>,
) -> Vec<Frontend> {
    let Some(spec) = &svc.spec else {
        problems.push("no spec; skipped");
        return Vec::new();
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        problems.push(Note::expected("type ExternalName is resolved by DNS, not load-balanced; skipped"));
        return Vec::new();
    }
    if !matches!(ty, "ClusterIP" | "NodePort" | "LoadBalancer") {
        problems.push(format!("unknown type {ty:?}; skipped"));
        return Vec::new();
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        problems.push(Note::expected(
            "headless (clusterIP: None): DNS returns the endpoints, nothing to load-balance; skipped",
        ));
        return Vec::new();
    }
    // Cluster IPs, and the families the service has.
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let raw_ips = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect());
    for s in raw_ips.iter().filter(|s| !s.is_empty()) {
        match s.parse() {
            Ok(a) => cluster_ips.push(a),
            Err(_) => problems.push(format!("bad clusterIP {s:?}; ignored")),
        }
    }
    let mut families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv4).collect(); // true = IPv4
    for f in spec.ip_families.iter().flatten() {
        match f.as_str() {
            "IPv4" => families.insert(true),
            "IPv6" => families.insert(false),
            other => {
                problems.push(format!("unknown ipFamily {other:?}; ignored"));
                false
            }
        };
    }
    if families.is_empty() {
        families.insert(true);
    }

    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let scheduler = match annotations.get(SCHEDULER_ANNOTATION) {
        None => Scheduler::Maglev,
        Some(s) => Scheduler::parse(s).unwrap_or_else(|| {
            problems.push(format!("{SCHEDULER_ANNOTATION}: {s:?} is not maglev, round-robin or random; using maglev"));
            Scheduler::Maglev
        }),
    };
    let maglev_override = annotations.get(MAGLEV_SIZE_ANNOTATION).and_then(|s| match s.parse::<u32>() {
        Ok(m) if m >= opts.maglev_min && m <= opts.maglev_max && maglev::next_prime(m) == m => Some(m),
        _ => {
            problems.push(format!(
                "{MAGLEV_SIZE_ANNOTATION}: {s:?} is not a prime in {}..={}; using the adaptive size",
                opts.maglev_min, opts.maglev_max
            ));
            None
        }
    });
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.clamp(1, 86_400) as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let ext_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let int_local = spec.internal_traffic_policy.as_deref() == Some("Local");

    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<IpNet>() {
            Ok(n) => source_ranges.push(n.trunc()),
            Err(_) => problems.push(format!("loadBalancerSourceRanges: bad CIDR {r:?}; ignored")),
        }
    }
    let lb_ips: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let ip = i.ip.as_deref()?;
            if i.ip_mode.as_deref() == Some("Proxy") {
                problems.push(Note::expected(&format!(
                    "LoadBalancer ingress {ip} has ipMode Proxy: the load balancer proxies, not bound here"
                )));
                return None;
            }
            ip.parse().map_err(|_| problems.push(format!("bad LoadBalancer ingress IP {ip:?}; ignored"))).ok()
        })
        .collect();
    let mut external_ips = Vec::new();
    for s in spec.external_ips.iter().flatten() {
        match s.parse::<IpAddr>() {
            Ok(a) if !opts.external_ip_cidrs.is_empty() && !in_any(&opts.external_ip_cidrs, &a) => {
                problems.push(format!("externalIP {a} is outside the allowed CIDRs (CVE-2020-8554); skipped"))
            }
            Ok(a) => external_ips.push(a),
            Err(_) => problems.push(format!("bad externalIP {s:?}; ignored")),
        }
    }
    let is_nodeport = matches!(ty, "NodePort" | "LoadBalancer");
    let node_addrs = node.nodeport_addresses(opts);

    let mut out = Vec::new();
    // Pods, not addresses: a dual-stack pod has one endpoint per family, so
    // the health check counts the primary family's.
    let primary_v4 = cluster_ips
        .first()
        .map(IpAddr::is_ipv4)
        .or_else(|| spec.ip_families.as_ref().and_then(|f| f.first()).map(|f| f == "IPv4"))
        .unwrap_or(true);
    let mut local_ready: std::collections::BTreeSet<IpAddr> = Default::default();
    for port in spec.ports.iter().flatten() {
        let pname = port.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| port.port.to_string());
        let name = format!("{id}:{pname}");
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                problems.push(format!("port {pname}: protocol {other} is not supported by xlb; skipped"));
                continue;
            }
        };
        let Some(svc_port) = u16::try_from(port.port).ok().filter(|p| *p > 0) else {
            problems.push(format!("port {pname}: bad port {}; skipped", port.port));
            continue;
        };
        let endpoints = endpoints_for(port, proto, slices, node);
        let make = |kind: Kind, address: IpAddr, port: u16, scope: Scope, local_only: bool| {
            let v4 = address.is_ipv4();
            let family: Vec<&Endpoint> = endpoints.iter().filter(|e| e.address.is_ipv4() == v4).collect();
            let candidates: Vec<&Endpoint> = family.iter().copied().filter(|e| !local_only || e.local).collect();
            let backends = select_backends(&candidates);
            let active = backends.iter().filter(|b| b.state == BackendState::Active).count();
            let usable_anywhere =
                local_only && select_backends(&family).iter().any(|b| b.state == BackendState::Active);
            let maglev_size = match (scheduler, active) {
                (Scheduler::Maglev, n) if n > 0 => maglev_override.unwrap_or_else(|| {
                    let want = (n as u64 * 100).clamp(opts.maglev_min as u64, opts.maglev_max as u64) as u32;
                    let p = maglev::next_prime(want);
                    if p > opts.maglev_max { maglev::prev_prime(opts.maglev_max) } else { p }
                }),
                _ => 0,
            };
            Frontend {
                name: name.clone(),
                kind,
                key: FrontendKey { address, port, protocol: proto, scope },
                scheduler,
                affinity_timeout_s,
                local_only,
                no_local_endpoints: active == 0 && usable_anywhere,
                maglev_size,
                source_ranges: if kind == Kind::LoadBalancer {
                    source_ranges.iter().filter(|n| family_matches(&n.addr(), &address)).copied().collect()
                } else {
                    Vec::new()
                },
                backends,
            }
        };
        for a in &cluster_ips {
            out.push(make(Kind::ClusterIp, *a, svc_port, Scope::Internal, int_local));
        }
        if is_nodeport {
            match port.node_port {
                None | Some(0) => {
                    if ty == "NodePort" {
                        problems.push(format!("port {pname}: type NodePort without a nodePort; NodePort skipped"));
                    }
                }
                Some(np) if np < opts.node_port_range.0 as i32 || np > opts.node_port_range.1 as i32 => {
                    problems.push(format!(
                        "port {pname}: nodePort {np} is outside {}-{}; NodePort skipped",
                        opts.node_port_range.0, opts.node_port_range.1
                    ));
                }
                Some(np) => {
                    for a in node_addrs.iter().filter(|a| families.contains(&a.is_ipv4())) {
                        out.push(make(Kind::NodePort, *a, np as u16, Scope::External, ext_local));
                        if ext_local {
                            out.push(make(Kind::NodePort, *a, np as u16, Scope::Internal, false));
                        }
                    }
                }
            }
        }
        for (kind, addrs) in [(Kind::LoadBalancer, &lb_ips), (Kind::ExternalIp, &external_ips)] {
            if kind == Kind::LoadBalancer && ty != "LoadBalancer" {
                continue;
            }
            for a in addrs.iter() {
                if !families.contains(&a.is_ipv4()) {
                    problems.push(format!("{} {a}: the service has no such IP family; skipped", kind.name()));
                    continue;
                }
                out.push(make(kind, *a, svc_port, Scope::External, ext_local));
                if ext_local {
                    // kube-proxy's "pod traffic for external destinations":
                    // pods (and, later, the host) reaching an external
                    // address of a Local Service get the Cluster endpoints,
                    // as if they had gone out to the load balancer and back.
                    out.push(make(kind, *a, svc_port, Scope::Internal, false));
                }
            }
        }
        local_ready.extend(
            endpoints.iter().filter(|e| e.local && e.ready && e.address.is_ipv4() == primary_v4).map(|e| e.address),
        );
    }
    // kube-proxy serves a healthCheckNodePort only for a LoadBalancer with
    // a Local policy (`NeedsHealthCheck`), counting the distinct local ready
    // endpoints across all the Service's ports (`LocalReadyEndpoints`).
    if ty == "LoadBalancer"
        && ext_local
        && let Some(port) = spec.health_check_node_port.filter(|p| *p > 0 && *p <= 65535)
    {
        health_checks.push(HealthCheck {
            service: id.to_string(),
            port: port as u16,
            local_endpoints: local_ready.len(),
        });
    }
    out
}

/// The endpoints of `slices` serving service port `port` (by name and
/// protocol), one per address:port. The same address may serve on two
/// ports (hostNetwork pods of one node behind a named targetPort); a true
/// duplicate (an endpoint in two slices, e.g. while slices are migrated)
/// keeps its best copy — local (as kube-proxy's endpointslicecache
/// prefers), then ready, serving, not terminating — so the result does not
/// depend on the order the slices arrive in.
fn endpoints_for(port: &ServicePort, proto: Protocol, slices: &[&EndpointSlice], node: &NodeInfo) -> Vec<Endpoint> {
    let want_name = port.name.clone().unwrap_or_default();
    let mut seen: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    let rank = |e: &Endpoint| (e.local, e.ready, e.serving, !e.terminating);
    for s in slices {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices are not load-balanced by kube-proxy either
        }
        let Some(p) = s.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == want_name
                && p.protocol.as_deref().unwrap_or("TCP").eq_ignore_ascii_case(match proto {
                    Protocol::Tcp => "TCP",
                    Protocol::Udp => "UDP",
                })
        }) else {
            continue;
        };
        let Some(tp) = p.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let terminating = c.terminating.unwrap_or(false);
            let local = !node.name.is_empty() && e.node_name.as_deref() == Some(node.name.as_str());
            for a in &e.addresses {
                let Ok(address) = a.parse::<IpAddr>() else {
                    continue;
                };
                if (s.address_type == "IPv4") != address.is_ipv4() {
                    continue;
                }
                let ep = Endpoint { address, port: tp, ready, serving, terminating, local };
                match seen.get(&(address, tp)) {
                    Some(old) if rank(old) >= rank(&ep) => {}
                    _ => {
                        seen.insert((address, tp), ep);
                    }
                }
            }
        }
    }
    seen.into_values().collect()
}

/// kube-proxy's choice among `candidates` (ready, else serving+terminating);
/// the other candidates are kept as draining backends.
fn select_backends(candidates: &[&Endpoint]) -> Vec<BackendSpec> {
    let ready: Vec<&&Endpoint> = candidates.iter().filter(|e| e.ready).collect();
    let eligible: Vec<&&Endpoint> =
        if ready.is_empty() { candidates.iter().filter(|e| e.serving && e.terminating).collect() } else { ready };
    let mut out: Vec<BackendSpec> = eligible
        .iter()
        .map(|e| BackendSpec { address: e.address, port: e.port, state: BackendState::Active, node_local: e.local })
        .collect();
    let mut draining: Vec<BackendSpec> = candidates
        .iter()
        .filter(|e| !eligible.iter().any(|x| x.address == e.address))
        .map(|e| BackendSpec {
            address: e.address,
            port: e.port,
            state: BackendState::Terminating,
            node_local: e.local,
        })
        .collect();
    out.sort();
    draining.sort();
    out.extend(draining);
    out
}
