// SPDX-License-Identifier: MIT OR Apache-2.0
//! EndpointSlices → the endpoints of one service port, and kube-proxy's
//! choice among them.

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
}

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
pub(super) fn select_backends(candidates: &[&Endpoint]) -> Vec<BackendSpec> {
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
