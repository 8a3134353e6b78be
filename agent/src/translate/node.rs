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
