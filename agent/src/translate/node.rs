// SPDX-License-Identifier: MIT OR Apache-2.0
//! This node and the node-wide settings, as translation needs them.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use super::in_any;
use crate::maglev;

/// This node, as translation needs it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeInfo {
    /// `metadata.name`, compared with an endpoint's `nodeName` for locality.
    pub name: String,
    /// Addresses NodePorts are exposed on.
    pub addresses: Vec<IpAddr>,
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
        for a in listed.filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP") {
            if let Ok(ip) = a.address.parse()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        }
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).filter(|z| !z.is_empty()).cloned();
        Self { name: node.metadata.name.clone().unwrap_or_default(), addresses, zone }
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
    /// Give endpoints without hints the ones the EndpointSlice controller
    /// would (from `trafficDistribution`): on with `--manifests`, where no
    /// controller runs.
    pub derive_hints: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            node_port_range: (30000, 32767),
            nodeport_cidrs: Vec::new(),
            external_ip_cidrs: Vec::new(),
            maglev_min: maglev::MIN_SIZE,
            maglev_max: maglev::MAX_SIZE,
            derive_hints: false,
        }
    }
}
