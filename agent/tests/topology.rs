// SPDX-License-Identifier: MIT OR Apache-2.0
//! Topology-aware routing, as kube-proxy's `pkg/proxy/topology.go`
//! (`CategorizeEndpoints`, `topologyModeFromHints`) and the cases of its
//! `topology_test.go`: hints decide, for Cluster-policy endpoints only,
//! with a fallback to every endpoint whenever the hints are incomplete or
//! name nothing for this node; Local policies ignore them.

mod fixtures;

use fixtures::*;
use xlb::translate::{Desired, Kind, NodeInfo, Options, Scope};

/// node-a in zone-a.
fn zoned(zone: Option<&str>) -> NodeInfo {
    NodeInfo { zone: zone.map(String::from), ..node() }
}

/// `shop/web` (ClusterIP 10.96.0.20, NodePort 30020 and LB 198.51.100.20
/// under `policy`), with the given endpoint lines.
fn service(spec_extra: &str, endpoints: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30020}}]
{spec_extra}
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.20}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"#
    )
}

/// An endpoint on `node` in `zone`, with hints for `zones` and `nodes`.
fn ep(addr: &str, node: &str, zone: &str, zones: &[&str], nodes: &[&str]) -> String {
    let names = |v: &[&str]| v.iter().map(|n| format!("{{name: {n}}}")).collect::<Vec<_>>().join(", ");
    let mut hints = Vec::new();
    if !zones.is_empty() {
        hints.push(format!("forZones: [{}]", names(zones)));
    }
    if !nodes.is_empty() {
        hints.push(format!("forNodes: [{}]", names(nodes)));
    }
    let hints = if hints.is_empty() { String::new() } else { format!(", hints: {{{}}}", hints.join(", ")) };
    format!("- {{addresses: [{addr}], nodeName: {node}, zone: {zone}{hints}}}\n")
}

fn cluster_ip(d: &Desired) -> Vec<String> {
    active(find(d, Kind::ClusterIp, "10.96.0.20", 80))
}

/// Three endpoints, each hinted for its own zone: two in zone-a (one on
/// this node), one in zone-b.
fn zone_hinted() -> String {
    [
        ep("10.0.1.1", "node-a", "zone-a", &["zone-a"], &[]),
        ep("10.0.1.2", "node-c", "zone-a", &["zone-a"], &[]),
        ep("10.0.2.1", "node-b", "zone-b", &["zone-b"], &[]),
    ]
    .concat()
}

#[test]
fn zone_hints_keep_traffic_in_the_zone_and_the_rest_drains() {
    // topology_test.go "hints enabled, hints annotation == auto": only the
    // endpoints hinted for this node's zone.
    let d = run_on(&service("", &zone_hinted()), &zoned(Some("zone-a")), &Options::default());
    let f = find(&d, Kind::ClusterIp, "10.96.0.20", 80);
    assert_eq!(active(f), ["10.0.1.1:8080", "10.0.1.2:8080"]);
    // An out-of-zone endpoint keeps the flows it has (conntrack keeps them
    // under kube-proxy too) but takes no new ones.
    assert_eq!(draining(f), ["10.0.2.1:8080"]);
    // The same on every Cluster-policy frontend: NodePort and LoadBalancer.
    assert_eq!(active(find(&d, Kind::NodePort, "192.168.1.10", 30020)).len(), 2);
    assert_eq!(active(find(&d, Kind::LoadBalancer, "198.51.100.20", 80)).len(), 2);
    // From zone-b: the other one.
    assert_eq!(
        cluster_ip(&run_on(&service("", &zone_hinted()), &zoned(Some("zone-b")), &Options::default())),
        ["10.0.2.1:8080"]
    );
}

#[test]
fn incomplete_or_foreign_hints_fall_back_to_every_endpoint() {
    let all = ["10.0.1.1:8080", "10.0.1.2:8080", "10.0.2.1:8080"];
    // "missing hints, … no topology": one ready endpoint without a hint.
    let one_unhinted = [
        ep("10.0.1.1", "node-a", "zone-a", &["zone-a"], &[]),
        ep("10.0.1.2", "node-c", "zone-a", &[], &[]),
        ep("10.0.2.1", "node-b", "zone-b", &["zone-b"], &[]),
    ]
    .concat();
    assert_eq!(cluster_ip(&run_on(&service("", &one_unhinted), &zoned(Some("zone-a")), &Options::default())), all);
    // "hints, but no hints for this zone".
    assert_eq!(cluster_ip(&run_on(&service("", &zone_hinted()), &zoned(Some("zone-c")), &Options::default())), all);
    // "node missing zone label".
    assert_eq!(cluster_ip(&run_on(&service("", &zone_hinted()), &zoned(None), &Options::default())), all);
    // A not-ready endpoint's missing hints do not matter: only ready ones count.
    let unready_unhinted =
        zone_hinted() + "- {addresses: [10.0.3.1], nodeName: node-d, zone: zone-a, conditions: {ready: false}}\n";
    let d = run_on(&service("", &unready_unhinted), &zoned(Some("zone-a")), &Options::default());
    assert_eq!(cluster_ip(&d), ["10.0.1.1:8080", "10.0.1.2:8080"]);
}

#[test]
fn node_hints_prefer_this_node_then_its_zone() {
    // PreferSameNode: the controller hints each endpoint for its node and zone.
    let both = [
        ep("10.0.1.1", "node-a", "zone-a", &["zone-a"], &["node-a"]),
        ep("10.0.1.2", "node-c", "zone-a", &["zone-a"], &["node-c"]),
        ep("10.0.2.1", "node-b", "zone-b", &["zone-b"], &["node-b"]),
    ]
    .concat();
    let d = run_on(&service("", &both), &zoned(Some("zone-a")), &Options::default());
    assert_eq!(cluster_ip(&d), ["10.0.1.1:8080"], "the endpoint hinted for this node");
    // A node with no endpoint of its own: the node hints name nothing for
    // it, so the zone hints decide.
    let d =
        run_on(&service("", &both), &NodeInfo { name: "node-x".into(), ..zoned(Some("zone-a")) }, &Options::default());
    assert_eq!(cluster_ip(&d), ["10.0.1.1:8080", "10.0.1.2:8080"]);
}

#[test]
fn local_policies_ignore_topology() {
    // topology_test.go "externalTrafficPolicy: Local, topology ignored for
    // Local endpoints": the external frontends take this node's endpoints,
    // hints or not; the ClusterIP and the pod-side view of the LB IP
    // (Cluster endpoints) follow the hints.
    let d = run_on(
        &service("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32020", &zone_hinted()),
        &zoned(Some("zone-b")),
        &Options::default(),
    );
    assert_eq!(active(find(&d, Kind::LoadBalancer, "198.51.100.20", 80)), ["10.0.1.1:8080"]);
    assert_eq!(active(find(&d, Kind::NodePort, "192.168.1.10", 30020)), ["10.0.1.1:8080"]);
    assert_eq!(cluster_ip(&d), ["10.0.2.1:8080"]);
    assert_eq!(active(find_in(&d, Kind::LoadBalancer, "198.51.100.20", 80, Scope::Internal)), ["10.0.2.1:8080"]);
    let d =
        run_on(&service("  internalTrafficPolicy: Local", &zone_hinted()), &zoned(Some("zone-b")), &Options::default());
    assert_eq!(cluster_ip(&d), ["10.0.1.1:8080"], "internalTrafficPolicy Local: this node's, not zone-b's");
}

#[test]
fn no_ready_endpoint_anywhere_falls_back_to_serving_terminating_without_topology() {
    // "…no ready endpoints anywhere": the serving-terminating ones, every zone.
    let cond = "conditions: {ready: false, serving: true, terminating: true}";
    let eps = format!(
        "- {{addresses: [10.0.1.1], nodeName: node-a, zone: zone-a, {cond}, hints: {{forZones: [{{name: zone-a}}]}}}}\n\
         - {{addresses: [10.0.2.1], nodeName: node-b, zone: zone-b, {cond}, hints: {{forZones: [{{name: zone-b}}]}}}}\n"
    );
    let d = run_on(&service("", &eps), &zoned(Some("zone-a")), &Options::default());
    assert_eq!(cluster_ip(&d), ["10.0.1.1:8080", "10.0.2.1:8080"]);
}

#[test]
fn without_a_controller_traffic_distribution_gives_the_hints() {
    // Slices with zones but no hints, as a directory holds them.
    let bare = [
        ep("10.0.1.1", "node-a", "zone-a", &[], &[]),
        ep("10.0.1.2", "node-c", "zone-a", &[], &[]),
        ep("10.0.2.1", "node-b", "zone-b", &[], &[]),
    ]
    .concat();
    let derive = Options { derive_hints: true, ..Options::default() };
    let node = zoned(Some("zone-a"));
    // kube-proxy (the API server, where the controller writes hints): the
    // hints alone decide, and there are none.
    let d = run_on(&service("  trafficDistribution: PreferClose", &bare), &node, &Options::default());
    assert_eq!(cluster_ip(&d).len(), 3);
    // --manifests: the controller's hints for each mode.
    for (extra, want) in [
        ("  trafficDistribution: PreferClose", vec!["10.0.1.1:8080", "10.0.1.2:8080"]),
        ("  trafficDistribution: PreferSameZone", vec!["10.0.1.1:8080", "10.0.1.2:8080"]),
        ("  trafficDistribution: PreferSameNode", vec!["10.0.1.1:8080"]),
        ("", vec!["10.0.1.1:8080", "10.0.1.2:8080", "10.0.2.1:8080"]),
    ] {
        assert_eq!(cluster_ip(&run_on(&service(extra, &bare), &node, &derive)), want, "{extra:?}");
    }
    let auto = service("", &bare).replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, annotations: {service.kubernetes.io/topology-mode: Auto}}",
    );
    assert_eq!(cluster_ip(&run_on(&auto, &node, &derive)), ["10.0.1.1:8080", "10.0.1.2:8080"], "topology-mode: Auto");
    // An endpoint without a zone gets no hint, so nobody's hints are complete.
    let zoneless = bare.clone() + "- {addresses: [10.0.4.1], nodeName: node-e}\n";
    assert_eq!(cluster_ip(&run_on(&service("  trafficDistribution: PreferClose", &zoneless), &node, &derive)).len(), 4);
}

#[test]
fn the_zone_comes_from_the_node_label() {
    let n: k8s_openapi::api::core::v1::Node = serde_saphyr::from_str(
        "metadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n\
         status: {addresses: [{type: InternalIP, address: 192.168.1.10}, {type: ExternalIP, address: 192.168.1.10}]}",
    )
    .unwrap();
    let info = NodeInfo::from_node(&n);
    assert_eq!(info.zone.as_deref(), Some("zone-a"));
    // One IP listed as InternalIP and ExternalIP is one address (else every
    // NodePort would conflict with itself).
    assert_eq!(info.addresses, [ip("192.168.1.10")]);
    let d = run_on(&service("", &zone_hinted()), &info, &Options::default());
    assert_eq!(cluster_ip(&d), ["10.0.1.1:8080", "10.0.1.2:8080"]);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}

/// Drained endpoints (`xlb.io/weights` 0) do not decide topology: with both
/// of this zone's endpoints at weight 0, the zone is not chosen (it would
/// leave nothing eligible) and the other zone's endpoint takes the new
/// connections; the drained ones stay backends, their flows going on.
#[test]
fn a_zone_whose_endpoints_are_all_drained_is_not_chosen() {
    let y = service("", &zone_hinted()).replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, annotations: {xlb.io/weights: '10.0.1.1=0 10.0.1.2=0'}}",
    );
    let d = run_on(&y, &zoned(Some("zone-a")), &Options::default());
    let f = find(&d, Kind::ClusterIp, "10.96.0.20", 80);
    assert_eq!(active(f), ["10.0.2.1:8080"]);
    assert_eq!(f.backends.len(), 3);
}
