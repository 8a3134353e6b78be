// SPDX-License-Identifier: MIT OR Apache-2.0
//! L2 announcements of LoadBalancer addresses (issue #15): which addresses
//! this node answers ARP and NDP for, the L2_ADDRS entries that make the
//! XDP program answer (`datapath-ebpf/src/l2.rs`), and the gratuitous ARP
//! and unsolicited neighbour advertisements a new owner sends.
//!
//! Ownership, `--manifests` mode: every agent reads the same Nodes, Services
//! and EndpointSlices, so each computes the same owner per address without
//! talking to the others: rendezvous hashing (the eligible node with the
//! highest hash of address and node name), which spreads the addresses
//! over the nodes and moves only a departed node's. Eligible: every Node of
//! the snapshot for `externalTrafficPolicy: Cluster`; for `Local`, the
//! nodes with a ready endpoint of the Service; never a node labelled
//! [`EXCLUDE_LABEL`] or reported NotReady. Without Node objects nothing
//! is announced (no view of the other nodes: two owners would answer).
//!
//! Ownership with the API server ([`leases`]): a Lease per address, taken
//! by the eligible nodes in the same rendezvous order, so exactly one node
//! answers at any moment, including while an agent is dead or cut off.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Service;

use crate::source::Snapshot;

pub mod announce;
pub mod leases;

pub use announce::Announcer;

/// The nodes that may announce each LoadBalancer address of `snap`.
pub fn eligible(snap: &Snapshot, external_ips: bool, lb_class: &str) -> BTreeMap<IpAddr, BTreeSet<String>> {
    let nodes: BTreeSet<String> =
        snap.nodes.iter().filter(|n| may_announce(n)).filter_map(|n| n.metadata.name.clone()).collect();
    // A node's own address (`NodeIPs` pools hand them out) is its own to
    // answer for: never announced by another.
    let node_addrs: BTreeSet<IpAddr> = snap
        .nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let mut out: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for svc in &snap.services {
        let Some(spec) = svc.spec.as_ref() else { continue };
        let mut addrs = Vec::new();
        // Another controller's LoadBalancer is its to announce.
        let ours = spec.load_balancer_class.as_deref().is_none_or(|c| c == lb_class);
        if spec.type_.as_deref() == Some("LoadBalancer") && ours {
            addrs.extend(crate::lbipam::allocate::held_in_status(svc));
        }
        if external_ips {
            addrs.extend(spec.external_ips.iter().flatten().filter_map(|a| a.parse::<IpAddr>().ok()));
        }
        if addrs.is_empty() {
            continue;
        }
        let who = if spec.external_traffic_policy.as_deref() == Some("Local") {
            local_endpoint_nodes(snap, svc).intersection(&nodes).cloned().collect()
        } else {
            nodes.clone()
        };
        for a in addrs.into_iter().filter(|a| !node_addrs.contains(a)) {
            // Services sharing an address: the nodes eligible for all of
            // them (a Local one's traffic must land where it has an endpoint).
            match out.entry(a) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(who.clone());
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let both: BTreeSet<String> = o.get().intersection(&who).cloned().collect();
                    o.insert(both);
                }
            }
        }
    }
    out
}

/// The label that keeps a node out of external load balancers (kubeadm
/// puts it on control-plane nodes; the cloud-provider service controller
/// and MetalLB honour it).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Whether `node` may announce: not excluded by [`EXCLUDE_LABEL`], and not
/// reported NotReady (a node with no Ready condition at all counts as
/// ready: nobody says otherwise).
fn may_announce(node: &k8s_openapi::api::core::v1::Node) -> bool {
    let excluded = node.metadata.labels.as_ref().is_some_and(|l| l.contains_key(EXCLUDE_LABEL));
    let ready =
        node.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    !excluded && ready.is_none_or(|c| c.status == "True")
}

/// Nodes with a ready endpoint of `svc`.
fn local_endpoint_nodes(snap: &Snapshot, svc: &Service) -> BTreeSet<String> {
    let (ns, name) =
        (svc.metadata.namespace.as_deref().unwrap_or("default"), svc.metadata.name.as_deref().unwrap_or(""));
    snap.slices
        .iter()
        .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == ns)
        .filter(|s| {
            s.metadata.labels.as_ref().and_then(|l| l.get(crate::translate::SERVICE_NAME_LABEL)).map(String::as_str)
                == Some(name)
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

fn weight(addr: &IpAddr, node: &str) -> u64 {
    let mut key = addr.to_string().into_bytes();
    key.push(0);
    key.extend_from_slice(node.as_bytes());
    crate::maglev::hash64(0x6c32, &key)
}

/// Rendezvous hashing: the owner of `addr` among `nodes`.
pub fn owner<'a>(addr: &IpAddr, nodes: &'a BTreeSet<String>) -> Option<&'a String> {
    nodes.iter().max_by_key(|n| weight(addr, n))
}

/// `nodes` in rendezvous order for `addr`: the owner by [`owner`] first.
pub fn ranked(addr: &IpAddr, nodes: &BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<(u64, &String)> = nodes.iter().map(|n| (weight(addr, n), n)).collect();
    // Highest weight first; ties (never in practice) by name, as `owner`.
    v.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(a.1)));
    v.into_iter().map(|(_, n)| n.clone()).collect()
}

/// The addresses `node` announces (`--manifests` mode).
pub fn owned(snap: &Snapshot, node: &str, external_ips: bool, lb_class: &str) -> BTreeSet<IpAddr> {
    eligible(snap, external_ips, lb_class)
        .into_iter()
        .filter(|(a, nodes)| owner(a, nodes).is_some_and(|o| o == node))
        .map(|(a, _)| a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::files::parse_into;

    const C: &str = crate::lbipam::DEFAULT_LB_CLASS;

    fn snap(nodes: usize, services: usize, local_on: Option<&str>) -> Snapshot {
        let mut y = String::new();
        for n in 1..=nodes {
            y += &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}}}\n---\n");
        }
        for s in 0..services {
            let policy = if local_on.is_some() { ", externalTrafficPolicy: Local" } else { "" };
            y += &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: t}}\n\
                 spec: {{type: LoadBalancer, ports: [{{port: 80}}]{policy}}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 10.9.{}.{}}}]}}}}\n---\n",
                s / 250,
                s % 250 + 1
            );
            if let Some(node) = local_on {
                y += &format!(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{s}-1, namespace: t, labels: {{kubernetes.io/service-name: s{s}}}}}\n\
                     addressType: IPv4\nendpoints: [{{addresses: [10.244.0.1], nodeName: {node}, conditions: {{ready: true}}}}, \
                     {{addresses: [10.244.0.2], nodeName: node-3, conditions: {{ready: false}}}}]\n---\n"
                );
            }
        }
        let mut s = Snapshot::default();
        parse_into(&mut s, "test", &y);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        s
    }

    /// One owner per address, spread over the nodes; a node leaving moves
    /// only its own addresses (rendezvous hashing).
    #[test]
    fn one_owner_per_address_spread_and_stable() {
        let three = snap(3, 300, None);
        let had: Vec<BTreeSet<IpAddr>> = (1..=3).map(|n| owned(&three, &format!("node-{n}"), false, C)).collect();
        assert_eq!(had.iter().map(BTreeSet::len).sum::<usize>(), 300, "every address exactly once");
        assert!(had.iter().all(|o| o.len() > 70), "spread: {:?}", had.iter().map(BTreeSet::len).collect::<Vec<_>>());
        let two = snap(2, 300, None);
        for n in 1..=2 {
            let now = owned(&two, &format!("node-{n}"), false, C);
            assert!(had[n - 1].is_subset(&now), "node-{n} keeps what it had");
        }
    }

    /// `externalTrafficPolicy: Local`: only nodes with a ready endpoint.
    #[test]
    fn local_policy_announces_from_nodes_with_a_ready_endpoint() {
        let s = snap(3, 20, Some("node-2"));
        assert_eq!(owned(&s, "node-2", false, C).len(), 20);
        assert!(owned(&s, "node-1", false, C).is_empty() && owned(&s, "node-3", false, C).is_empty());
        assert!(owned(&snap(0, 5, None), "node-1", false, C).is_empty(), "no Node objects: nothing");
    }

    /// A node's own address (a `NodeIPs` pool's) is never announced by another.
    #[test]
    fn node_addresses_are_not_announced() {
        let mut s = snap(2, 1, None);
        let y = "apiVersion: v1\nkind: Node\nmetadata: {name: node-9}\nstatus: {addresses: [{type: InternalIP, address: 10.9.0.1}]}\n";
        parse_into(&mut s, "node", y);
        assert!((1..=9).all(|n| owned(&s, &format!("node-{n}"), false, C).is_empty()));
    }

    /// Excluded and NotReady nodes never announce (the cloud-provider
    /// service controller's node predicates).
    #[test]
    fn excluded_and_not_ready_nodes_do_not_announce() {
        let mut s = snap(2, 40, None);
        let y = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-3, labels: {{{EXCLUDE_LABEL}: \"\"}}}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: node-4}}\nstatus: {{conditions: [{{type: Ready, status: \"False\"}}]}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: node-5}}\nstatus: {{conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        );
        parse_into(&mut s, "nodes", &y);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert!(owned(&s, "node-3", false, C).is_empty() && owned(&s, "node-4", false, C).is_empty());
        assert!(!owned(&s, "node-5", false, C).is_empty(), "a Ready node does");
        let total: usize = [1, 2, 5].iter().map(|n| owned(&s, &format!("node-{n}"), false, C).len()).sum();
        assert_eq!(total, 40);
    }
}
