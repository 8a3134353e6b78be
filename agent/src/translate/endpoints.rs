// SPDX-License-Identifier: MIT OR Apache-2.0
//! EndpointSlices → the endpoints of one service port, and kube-proxy's
//! choice among them: ready, else serving-terminating, and topology-aware
//! routing for Cluster-policy endpoints (`pkg/proxy/topology.go`).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1::ServicePort, discovery::v1::EndpointSlice};

use super::{BackendSpec, BackendState, NodeInfo, Protocol};

/// An endpoint of a slice, with kube-proxy's condition defaults applied.
#[derive(Clone, Debug)]
pub(super) struct Endpoint {
    pub(super) address: IpAddr,
    pub(super) port: u16,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) local: bool,
    /// `targetRef.name`: the pod's name (`xlb.io/weights` keys).
    pub(super) name: Option<String>,
    /// From `xlb.io/weights` (set by the caller; 1 here).
    pub(super) weight: u16,
    /// `hints.forZones` and `hints.forNodes` (names).
    pub(super) zone_hints: Vec<String>,
    pub(super) node_hints: Vec<String>,
}

/// How a Service asks for topology-aware routing (`spec.trafficDistribution`,
/// or the `service.kubernetes.io/topology-mode: Auto` annotation). With the
/// API server the EndpointSlice controller turns it into hints and only the
/// hints count, as for kube-proxy; with `--manifests` there is no
/// controller, and an endpoint without hints gets the ones the controller
/// would have given it (see [`endpoints_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Distribution {
    /// `PreferClose`, `PreferSameZone`, topology-mode `Auto`: the endpoint's zone.
    SameZone,
    /// `PreferSameNode`: its node, and its zone as the fallback.
    SameNode,
}

impl Distribution {
    pub(super) fn of(
        spec: &k8s_openapi::api::core::v1::ServiceSpec,
        annotations: Option<&BTreeMap<String, String>>,
    ) -> Option<Self> {
        match spec.traffic_distribution.as_deref() {
            Some("PreferSameNode") => return Some(Self::SameNode),
            Some("PreferClose" | "PreferSameZone") => return Some(Self::SameZone),
            _ => {}
        }
        let mode =
            annotations.and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION).or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION)))?;
        mode.eq_ignore_ascii_case("auto").then_some(Self::SameZone)
    }
}

/// The annotation that enables topology-aware routing (Kubernetes ≥ 1.27).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// Its deprecated predecessor.
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";

/// The endpoints of `slices` serving service port `port` (by name and
/// protocol), one per address:port. The same address may serve on two
/// ports (hostNetwork pods of one node behind a named targetPort); a true
/// duplicate (an endpoint in two slices, e.g. while slices are migrated)
/// keeps its best copy — local (as kube-proxy's endpointslicecache
/// prefers), then ready, serving, not terminating — so the result does not
/// depend on the order the slices arrive in.
pub(super) fn endpoints_for(
    port: &ServicePort,
    proto: Protocol,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    derive: Option<Distribution>,
) -> Vec<Endpoint> {
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
            // endpointslicecache.go: a missing condition is true (terminating: false).
            let serving = c.serving.unwrap_or(true);
            let terminating = c.terminating.unwrap_or(false);
            let local = !node.name.is_empty() && e.node_name.as_deref() == Some(node.name.as_str());
            for a in &e.addresses {
                let Ok(address) = a.parse::<IpAddr>() else {
                    continue;
                };
                if (s.address_type == "IPv4") != address.is_ipv4() {
                    continue;
                }
                let (zone_hints, node_hints) = hints(e, derive);
                let name = e.target_ref.as_ref().and_then(|r| r.name.clone());
                let ep = Endpoint {
                    address,
                    port: tp,
                    ready,
                    serving,
                    terminating,
                    local,
                    name,
                    weight: 1,
                    zone_hints,
                    node_hints,
                };
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

/// An endpoint's hints; without any, the ones the EndpointSlice controller
/// gives for `derive` (its zone; with `SameNode` also its node).
fn hints(e: &k8s_openapi::api::discovery::v1::Endpoint, derive: Option<Distribution>) -> (Vec<String>, Vec<String>) {
    let h = e.hints.as_ref();
    let zones: Vec<String> =
        h.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone()).collect();
    let nodes: Vec<String> =
        h.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone()).collect();
    if !zones.is_empty() || !nodes.is_empty() {
        return (zones, nodes);
    }
    match derive {
        None => (zones, nodes),
        Some(d) => {
            let zones = e.zone.iter().cloned().collect();
            let nodes = if d == Distribution::SameNode { e.node_name.iter().cloned().collect() } else { Vec::new() };
            (zones, nodes)
        }
    }
}

/// Which Cluster-policy endpoints this node may use (kube-proxy's
/// `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Topology {
    /// No topology: every endpoint.
    Any,
    /// Those hinted for this node.
    SameNode,
    /// Those hinted for this node's zone.
    SameZone,
}

impl Topology {
    /// Same node when every ready endpoint has a node hint and one names
    /// this node; else same zone when every ready endpoint has a zone hint
    /// and one names this node's zone; else none. (Incomplete hints, a
    /// node without a zone label, or no endpoint for here: no topology.)
    /// A drained endpoint (weight 0) counts as not ready here: a zone whose
    /// endpoints are all drained must not be chosen.
    pub(super) fn of(endpoints: &[&Endpoint], node: &NodeInfo) -> Self {
        let ready: Vec<&&Endpoint> = endpoints.iter().filter(|e| e.ready && e.weight > 0).collect();
        if ready.is_empty() {
            return Self::Any;
        }
        if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(&node.name)) {
            return Self::SameNode;
        }
        if let Some(zone) = node.zone.as_ref()
            && ready.iter().all(|e| !e.zone_hints.is_empty())
            && ready.iter().any(|e| e.zone_hints.contains(zone))
        {
            return Self::SameZone;
        }
        Self::Any
    }

    fn admits(self, e: &Endpoint, node: &NodeInfo) -> bool {
        match self {
            Self::Any => true,
            Self::SameNode => e.node_hints.contains(&node.name),
            Self::SameZone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
        }
    }
}

/// kube-proxy's choice among `candidates`: the ready ones `topology`
/// admits, else (no ready endpoint anywhere) the serving-terminating ones.
/// Every other candidate is kept as a draining backend, so its established
/// connections finish (as conntrack keeps them under kube-proxy).
pub(super) fn select_backends(candidates: &[&Endpoint], topology: Topology, node: &NodeInfo) -> Vec<BackendSpec> {
    let ready: Vec<&&Endpoint> = candidates.iter().filter(|e| e.ready && topology.admits(e, node)).collect();
    let eligible: Vec<&&Endpoint> =
        if ready.is_empty() { candidates.iter().filter(|e| e.serving && e.terminating).collect() } else { ready };
    let mut out: Vec<BackendSpec> = eligible
        .iter()
        .map(|e| BackendSpec {
            address: e.address,
            port: e.port,
            state: BackendState::Active,
            node_local: e.local,
            serving: e.serving,
            weight: e.weight,
        })
        .collect();
    let mut draining: Vec<BackendSpec> = candidates
        .iter()
        .filter(|e| !eligible.iter().any(|x| (x.address, x.port) == (e.address, e.port)))
        .map(|e| BackendSpec {
            address: e.address,
            port: e.port,
            state: BackendState::Terminating,
            node_local: e.local,
            serving: e.serving,
            weight: e.weight,
        })
        .collect();
    out.sort();
    draining.sort();
    out.extend(draining);
    out
}
