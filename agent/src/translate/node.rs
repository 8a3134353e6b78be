// SPDX-License-Identifier: MIT OR Apache-2.0
//! This node and the node-wide settings, as translation needs them.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use super::Scheduler;
use crate::maglev;

/// This node, as translation needs it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeInfo {
    /// `metadata.name`, compared with an endpoint's `nodeName` for locality.
    pub name: String,
    /// The Node object's InternalIP and ExternalIP addresses, then
    /// `--node-address`: the first of each family is the node's primary.
    pub addresses: Vec<IpAddr>,
    /// The addresses on the host's interfaces (rtnetlink; loopback and
    /// link-local left out), where NodePorts open by default as under
    /// kube-proxy.
    pub local: Vec<IpAddr>,
    /// The `topology.kubernetes.io/zone` label, for topology-aware routing.
    pub zone: Option<String>,
}

/// The Node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl NodeInfo {
    /// The InternalIP and ExternalIP addresses of a Node object (each
    /// once: a Node may list one IP as both), and its zone.
    pub fn from_node(node: &Node) -> Self {
        let mut addresses: Vec<IpAddr> = Vec::new();
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref()).into_iter().flatten();
        // InternalIPs first (the primary address of a family is the first),
        // as kube-proxy's GetNodeHostIPs.
        let listed: Vec<_> = listed.collect();
        for ty in ["InternalIP", "ExternalIP"] {
            for a in listed.iter().filter(|a| a.type_ == ty) {
                if let Ok(ip) = a.address.parse()
                    && !addresses.contains(&ip)
                {
                    addresses.push(ip);
                }
            }
        }
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).filter(|z| !z.is_empty()).cloned();
        Self { name: node.metadata.name.clone().unwrap_or_default(), addresses, local: Vec::new(), zone }
    }

    /// The addresses that carry NodePorts under `opts`, as kube-proxy's
    /// `--nodeport-addresses` (`util/nodeport_addresses.go`), per family:
    /// the node's addresses inside that family's CIDRs, or all of them when
    /// no CIDR of the family is listed; `primary`: the node's primary
    /// address of each family.
    pub fn nodeport_addresses(&self, opts: &Options) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = Vec::new();
        for a in self.addresses.iter().chain(&self.local) {
            if !all.contains(a) {
                all.push(*a);
            }
        }
        if opts.nodeport_primary {
            return [true, false]
                .into_iter()
                .filter_map(|v4| all.iter().copied().find(|a| a.is_ipv4() == v4))
                .collect();
        }
        let of_family = |v4: bool| opts.nodeport_cidrs.iter().filter(move |c| c.addr().is_ipv4() == v4);
        all.into_iter()
            .filter(|a| {
                let mut cidrs = of_family(a.is_ipv4()).peekable();
                cidrs.peek().is_none() || cidrs.any(|c| c.contains(a))
            })
            .collect()
    }
}

/// Node-wide translation settings (agent flags).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Options {
    /// Valid NodePort values (kube-apiserver's `--service-node-port-range`).
    pub node_port_range: (u16, u16),
    /// Only node addresses inside these CIDRs carry NodePorts; a family
    /// with none listed: all of that family (kube-proxy's `--nodeport-addresses`).
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--nodeport-addresses primary`: only the node's primary address of
    /// each family.
    pub nodeport_primary: bool,
    /// externalIPs allowed; empty: any. Restricting them is the node-side
    /// mitigation of CVE-2020-8554 (a user claiming someone else's IP).
    pub external_ip_cidrs: Vec<IpNet>,
    /// Bounds of the adaptive Maglev table size.
    pub maglev_min: u32,
    pub maglev_max: u32,
    /// The scheduler of a Service that names none (`--scheduler`).
    pub scheduler: Scheduler,
    /// Give endpoints without hints the ones the EndpointSlice controller
    /// would (from `trafficDistribution`): on with `--manifests`, where no
    /// controller runs.
    pub derive_hints: bool,
}

impl Options {
    /// NodePorts are open on every address: no `--nodeport-addresses`, or
    /// one whose families each list nothing or a zero CIDR (`0.0.0.0/0`,
    /// `::/0`: kube-proxy's `MatchAll`).
    pub fn nodeports_everywhere(&self) -> bool {
        let all = |v4: bool| {
            let mut of = self.nodeport_cidrs.iter().filter(|c| c.addr().is_ipv4() == v4).peekable();
            of.peek().is_none() || of.any(|c| c.prefix_len() == 0)
        };
        !self.nodeport_primary && all(true) && all(false)
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            node_port_range: (30000, 32767),
            nodeport_cidrs: Vec::new(),
            nodeport_primary: false,
            external_ip_cidrs: Vec::new(),
            maglev_min: maglev::MIN_SIZE,
            maglev_max: maglev::MAX_SIZE,
            scheduler: Scheduler::Maglev,
            derive_hints: false,
        }
    }
}
