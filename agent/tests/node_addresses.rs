// SPDX-License-Identifier: MIT OR Apache-2.0
//! Where NodePorts open, as kube-proxy opens them: on every address of the
//! node (its interfaces' and its Node object's, each once), narrowed per
//! family by `--nodeport-addresses` (`pkg/proxy/util/nodeport_addresses.go`:
//! a family with no CIDR listed keeps all its addresses) or to the primary
//! address of each family; a NodePort outside `--node-port-range` is kept
//! (the API server validated it), with a notice.

mod fixtures;

use fixtures::*;
use xlb::translate::{Desired, Kind, NodeInfo, Options};

/// A dual-stack NodePort Service (30036) with one endpoint per family.
const DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIPs: [10.96.0.10, "fd96::10"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30036}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.1.5], nodeName: node-a}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00:1::5"], nodeName: node-a}]
"#;

/// node-a: its Node object says 192.168.1.10 and fd00::10; its interfaces
/// also carry 10.1.0.7 and fd01::7.
fn host() -> NodeInfo {
    NodeInfo { local: vec![ip("10.1.0.7"), ip("192.168.1.10"), ip("fd01::7")], ..node() }
}

fn nodeports(d: &Desired) -> Vec<String> {
    let mut v: Vec<String> =
        d.frontends.iter().filter(|f| f.kind == Kind::NodePort).map(|f| f.key.address.to_string()).collect();
    v.sort();
    v.dedup();
    v
}

fn translate(node: &NodeInfo, opts: &Options) -> Desired {
    run_on(DUAL, node, opts)
}

fn cidrs(list: &[&str]) -> Options {
    Options { nodeport_cidrs: list.iter().map(|c| c.parse().unwrap()).collect(), ..Options::default() }
}

#[test]
fn every_address_of_the_node_each_once() {
    // kube-proxy: every local address (iptables `--dst-type LOCAL`); the
    // Node object's too, and 192.168.1.10 (listed twice) only once.
    let d = translate(&host(), &Options::default());
    assert_eq!(nodeports(&d), ["10.1.0.7", "192.168.1.10", "fd00::10", "fd01::7"]);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}

#[test]
fn nodeport_addresses_narrow_each_family_on_its_own() {
    // nodeport_addresses_test.go: "IPv4 CIDR only" keeps every IPv6 address.
    assert_eq!(nodeports(&translate(&host(), &cidrs(&["10.1.0.0/16"]))), ["10.1.0.7", "fd00::10", "fd01::7"]);
    assert_eq!(nodeports(&translate(&host(), &cidrs(&["fd01::/64"]))), ["10.1.0.7", "192.168.1.10", "fd01::7"]);
    assert_eq!(nodeports(&translate(&host(), &cidrs(&["192.168.0.0/16", "fd00::/64"]))), ["192.168.1.10", "fd00::10"]);
    // A CIDR matching nothing of its family: no NodePort in that family.
    assert_eq!(nodeports(&translate(&host(), &cidrs(&["172.16.0.0/12"]))), ["fd00::10", "fd01::7"]);
}

#[test]
fn primary_is_the_first_address_of_each_family() {
    let primary = Options { nodeport_primary: true, ..Options::default() };
    assert_eq!(nodeports(&translate(&host(), &primary)), ["192.168.1.10", "fd00::10"]);
    // No Node object address: the interfaces' first.
    let bare = NodeInfo { addresses: Vec::new(), ..host() };
    assert_eq!(nodeports(&translate(&bare, &primary)), ["10.1.0.7", "fd01::7"]);
}

#[test]
fn a_node_port_outside_the_range_is_kept_with_a_notice() {
    let narrow = Options { node_port_range: (31000, 31999), ..Options::default() };
    let d = translate(&host(), &narrow);
    assert_eq!(nodeports(&d).len(), 4, "still programmed");
    assert!(d.problems.is_empty(), "not a problem (no Warning Event): {:?}", d.problems);
    assert_eq!(d.notices.len(), 1, "{:?}", d.notices);
    assert!(d.notices[0].message.contains("outside --node-port-range 31000-31999"), "{:?}", d.notices);
    assert_eq!(d.notices[0].service, "shop/web");
}

#[test]
fn primary_prefers_an_internal_ip_and_zero_cidrs_match_all() {
    // kube-proxy's GetNodeHostIPs: InternalIP before ExternalIP, whatever
    // the order the Node lists them in.
    let n: k8s_openapi::api::core::v1::Node = serde_saphyr::from_str(
        "metadata: {name: node-a}\n\
         status: {addresses: [{type: ExternalIP, address: 203.0.113.5}, {type: InternalIP, address: 192.168.1.10}]}",
    )
    .unwrap();
    let info = NodeInfo::from_node(&n);
    assert_eq!(info.addresses, [ip("192.168.1.10"), ip("203.0.113.5")]);
    let primary = Options { nodeport_primary: true, ..Options::default() };
    assert_eq!(nodeports(&translate(&info, &primary)), ["192.168.1.10"]);
    // util/nodeport_addresses.go MatchAll: a zero CIDR in every listed family.
    assert!(Options::default().nodeports_everywhere());
    assert!(cidrs(&["0.0.0.0/0", "::/0"]).nodeports_everywhere());
    assert!(cidrs(&["0.0.0.0/0"]).nodeports_everywhere(), "IPv6 lists nothing: all of it");
    assert!(!cidrs(&["0.0.0.0/0", "fd00::/64"]).nodeports_everywhere());
    assert!(!primary.nodeports_everywhere());
}
