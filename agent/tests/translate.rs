// SPDX-License-Identifier: MIT OR Apache-2.0
//! Translation fixtures: YAML as `kubectl get -o yaml` prints it → the
//! desired datapath state, one test per Service feature.

mod fixtures;

use fixtures::*;
use xlb::{
    source::{Snapshot, files::parse_into},
    translate::{Desired, Kind, Options, Protocol, Scheduler, Scope, translate},
};

/// A Service with one TCP port 80 → named target `http`, and its slice.
const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports: [{name: http, port: 80, protocol: TCP, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.1.5]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [10.0.2.5]
  conditions: {ready: true}
  nodeName: node-b
"#;

/// The IPv4 and IPv6 EndpointSlices of the dual-stack Service `default/ds`:
/// one pod on node-a.
const DS_SLICES: &str = r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, namespace: default, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.1.7], nodeName: node-a}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, namespace: default, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00:1::7"], nodeName: node-a}]
"#;

#[test]
fn cluster_ip_with_named_target_port() {
    let d = run(WEB);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.frontends.len(), 1);
    let f = find(&d, Kind::ClusterIp, "10.96.0.10", 80);
    assert_eq!(f.name, "shop/web:http");
    assert_eq!(f.key.scope, Scope::Internal);
    assert_eq!(f.key.protocol, Protocol::Tcp);
    assert_eq!(f.scheduler, Scheduler::Maglev);
    // The named targetPort resolves to the number in the slice.
    assert_eq!(active(f), ["10.0.1.5:8080", "10.0.2.5:8080"]);
    assert_eq!(f.backends.iter().filter(|b| b.node_local).count(), 1);
    // Adaptive Maglev size: the smallest prime ≥ 100 × 2.
    assert_eq!(f.maglev_size, 251);
}

#[test]
fn slices_of_other_services_and_namespaces_are_ignored() {
    let other = WEB.replace("namespace: shop\n  labels", "namespace: other\n  labels");
    let d = run(&other);
    assert!(find(&d, Kind::ClusterIp, "10.96.0.10", 80).backends.is_empty());
}

#[test]
fn node_port_on_every_node_address_of_the_family() {
    let y = WEB
        .replace("type: ClusterIP", "type: NodePort")
        .replace("targetPort: http}", "targetPort: http, nodePort: 30036}");
    let d = run(&y);
    let np = find(&d, Kind::NodePort, "192.168.1.10", 30036);
    assert_eq!(np.key.scope, Scope::External);
    assert_eq!(active(np), ["10.0.1.5:8080", "10.0.2.5:8080"]);
    // IPv4-only service: no NodePort on the node's IPv6 address.
    assert!(!d.frontends.iter().any(|f| f.key.address == ip("fd00::10")));
    assert_eq!(d.frontends.len(), 2);

    let only = Options { nodeport_cidrs: vec!["10.0.0.0/8".parse().unwrap()], ..Options::default() };
    assert_eq!(run_with(&y, &only).frontends.len(), 1, "--nodeport-addresses filters node addresses");
}

#[test]
fn load_balancer_ingress_source_ranges_and_proxy_mode() {
    let y = WEB
        .replace(
            "type: ClusterIP",
            "type: LoadBalancer\n  loadBalancerSourceRanges: [203.0.113.0/24, 2001:db8::/32, bogus]",
        )
        .replace("targetPort: http}", "targetPort: http, nodePort: 30100}")
        + r#"
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.7}, {ip: 198.51.100.8, ipMode: Proxy}, {hostname: lb.example.com}]
"#;
    // `status` must belong to the Service document, not the slice: put it first.
    let y = {
        let (svc, rest) = y.split_once("---").unwrap();
        let status = rest.split_once("status:").map(|(_, s)| format!("status:{s}")).unwrap();
        let rest = rest.split_once("status:").unwrap().0;
        format!("{svc}{status}\n---{rest}")
    };
    let d = run(&y);
    let lb = find(&d, Kind::LoadBalancer, "198.51.100.7", 80);
    assert_eq!(lb.key.scope, Scope::External);
    assert_eq!(lb.source_ranges, vec!["203.0.113.0/24".parse().unwrap()], "only the frontend's family");
    assert_eq!(active(lb).len(), 2);
    // LoadBalancer services get NodePorts too, without source ranges.
    assert!(find(&d, Kind::NodePort, "192.168.1.10", 30100).source_ranges.is_empty());
    assert!(!d.frontends.iter().any(|f| f.key.address == ip("198.51.100.8")));
    let msgs: Vec<&str> = d.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(msgs.iter().any(|m| m.contains("bad CIDR \"bogus\"")), "{msgs:?}");
    // An ipMode Proxy address is skipped by design: not a problem.
    assert!(!msgs.iter().any(|m| m.contains("ipMode Proxy")), "{msgs:?}");
    assert!(d.skipped.iter().any(|p| p.message.contains("ipMode Proxy")), "{:?}", d.skipped);
}

#[test]
fn external_ips_with_allow_list() {
    let y = WEB.replace("type: ClusterIP", "type: ClusterIP\n  externalIPs: [198.51.100.20, 203.0.113.9]");
    let d = run(&y);
    assert_eq!(find(&d, Kind::ExternalIp, "198.51.100.20", 80).key.scope, Scope::External);
    find(&d, Kind::ExternalIp, "203.0.113.9", 80);

    let opts = Options { external_ip_cidrs: vec!["198.51.100.0/24".parse().unwrap()], ..Options::default() };
    let d = run_with(&y, &opts);
    find(&d, Kind::ExternalIp, "198.51.100.20", 80);
    assert!(!d.frontends.iter().any(|f| f.key.address == ip("203.0.113.9")));
    assert!(d.problems[0].message.contains("CVE-2020-8554"));
}

/// Expected skips are not problems (no warning, no Event): ExternalName and
/// headless Services are DNS's, as kube-proxy's service-proxy label
/// selector leaves them out; they are listed as skipped.
#[test]
fn external_name_and_headless_are_skipped_without_a_problem() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: a}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: a}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
"#
    .to_string()
        + WEB;
    let d = run(&y);
    assert_eq!(d.frontends.len(), 1, "the good service is still programmed");
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let p: Vec<(&str, &str)> = d.skipped.iter().map(|p| (p.service.as_str(), p.message.as_str())).collect();
    assert!(p.iter().any(|(s, m)| *s == "a/ext" && m.contains("ExternalName")), "{p:?}");
    assert!(p.iter().any(|(s, m)| *s == "a/hl" && m.contains("headless")), "{p:?}");
}

#[test]
fn multi_port_udp_and_sctp() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
  - {name: metrics, port: 9153, protocol: TCP, targetPort: metrics}
  - {name: sig, port: 9, protocol: SCTP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
- {name: metrics, port: 9153, protocol: TCP}
endpoints:
- addresses: [10.0.1.53]
"#;
    let d = run(y);
    assert_eq!(d.frontends.len(), 3);
    let udp = d.frontends.iter().find(|f| f.key.protocol == Protocol::Udp).unwrap();
    assert_eq!((udp.name.as_str(), udp.key.port), ("kube-system/dns:dns", 53));
    assert_eq!(active(udp), ["10.0.1.53:53"], "conditions absent: ready");
    assert_eq!(active(find(&d, Kind::ClusterIp, "10.96.0.53", 9153)), ["10.0.1.53:9153"]);
    assert!(d.problems.iter().any(|p| p.message.contains("SCTP is not supported")), "{:?}", d.problems);
}

#[test]
fn a_port_without_a_matching_slice_port_has_no_backends() {
    let y = WEB.replace("[{name: http, port: 8080", "[{name: web, port: 8080");
    assert!(run(&y).frontends[0].backends.is_empty());
}

#[test]
fn dual_stack_pairs_each_family_with_its_slices() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: fd00:96::10
  clusterIPs: [fd00:96::10, 10.96.0.20]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"#;
    let d = run(&format!("{y}{DS_SLICES}"));
    assert_eq!(d.frontends.len(), 4, "{:#?}", d.frontends);
    assert_eq!(active(find(&d, Kind::ClusterIp, "10.96.0.20", 80)), ["10.0.1.7:8080"]);
    assert_eq!(active(find(&d, Kind::ClusterIp, "fd00:96::10", 80)), ["fd00:1::7:8080"]);
    assert_eq!(active(find(&d, Kind::NodePort, "fd00::10", 30080)), ["fd00:1::7:8080"]);
    assert_eq!(active(find(&d, Kind::NodePort, "192.168.1.10", 30080)), ["10.0.1.7:8080"]);
    assert_eq!(d.frontends[0].name, "default/ds:80", "unnamed ports are named by number");
}

#[test]
fn session_affinity_client_ip() {
    let y = WEB.replace("type: ClusterIP", "type: ClusterIP\n  sessionAffinity: ClientIP");
    assert_eq!(run(&y).frontends[0].affinity_timeout_s, Some(10_800));
    let y = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
    );
    assert_eq!(run(&y).frontends[0].affinity_timeout_s, Some(60));
    assert_eq!(run(WEB).frontends[0].affinity_timeout_s, None);
}

#[test]
fn traffic_policies_local() {
    let y = WEB
        .replace("type: ClusterIP", "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000")
        .replace("targetPort: http}", "targetPort: http, nodePort: 30036}");
    let d = run(&y);
    let np = find(&d, Kind::NodePort, "192.168.1.10", 30036);
    assert!(np.local_only);
    assert_eq!(active(np), ["10.0.1.5:8080"], "only this node's endpoint");
    let cip = find(&d, Kind::ClusterIp, "10.96.0.10", 80);
    assert!(!cip.local_only);
    assert_eq!(active(cip).len(), 2, "externalTrafficPolicy does not limit ClusterIP");
    assert_eq!(d.health_checks.len(), 1);
    assert_eq!((d.health_checks[0].port, d.health_checks[0].local_endpoints), (32000, 1));

    // kube-proxy's "pod traffic for external destinations": from pods the
    // NodePort leads to every endpoint (the internal-scope view).
    let from_pods = find_in(&d, Kind::NodePort, "192.168.1.10", 30036, Scope::Internal);
    assert!(!from_pods.local_only && !from_pods.no_local_endpoints);
    assert_eq!(active(from_pods).len(), 2, "Cluster endpoints for pod traffic");

    // No local endpoint: the health check reports 0 (→ 503); the NodePort
    // drops (endpoints exist elsewhere: kube-proxy's DROP, not REJECT), and
    // pods still reach the endpoints on other nodes.
    let none = y.replace("nodeName: node-a", "nodeName: node-c");
    let d = run(&none);
    assert_eq!(d.health_checks[0].local_endpoints, 0);
    let np = find(&d, Kind::NodePort, "192.168.1.10", 30036);
    assert!(np.backends.is_empty() && np.no_local_endpoints, "{np:#?}");
    assert_eq!(active(find_in(&d, Kind::NodePort, "192.168.1.10", 30036, Scope::Internal)).len(), 2);

    // The local endpoint drained (weight 0): the health check reports 0,
    // so the load balancer stops sending here, and the NodePort drops
    // (endpoints elsewhere), as with no local endpoint.
    let drained = y.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, annotations: {xlb.io/weights: 10.0.1.5=0}}",
    );
    let d = run(&drained);
    assert_eq!(d.health_checks[0].local_endpoints, 0);
    let np = find(&d, Kind::NodePort, "192.168.1.10", 30036);
    assert!(active(np).is_empty() && np.no_local_endpoints, "{np:#?}");
    assert_eq!(active(find_in(&d, Kind::NodePort, "192.168.1.10", 30036, Scope::Internal)), ["10.0.2.5:8080"]);

    let itp = WEB.replace("type: ClusterIP", "type: ClusterIP\n  internalTrafficPolicy: Local");
    let d = run(&itp);
    assert_eq!(active(&d.frontends[0]), ["10.0.1.5:8080"]);
    assert!(!d.frontends[0].no_local_endpoints);
    assert!(d.health_checks.is_empty());
    // internalTrafficPolicy Local with the endpoints elsewhere: the ClusterIP drops too.
    let d = run(&itp.replace("nodeName: node-a", "nodeName: node-c"));
    assert!(d.frontends[0].backends.is_empty() && d.frontends[0].no_local_endpoints);
}

/// kube-proxy REJECTs ("has no endpoints") only a Service with no usable
/// endpoint anywhere; Cluster policies never drop.
#[test]
fn no_endpoints_at_all_rejects_rather_than_drops() {
    let y = WEB
        .replace("type: ClusterIP", "type: NodePort\n  externalTrafficPolicy: Local")
        .replace("targetPort: http}", "targetPort: http, nodePort: 30036}")
        .replace("conditions: {ready: true}", "conditions: {ready: false}");
    let d = run(&y);
    for f in &d.frontends {
        assert!(f.eligible().next().is_none() && !f.no_local_endpoints, "{f:#?}");
    }
    for f in &run(WEB).frontends {
        assert!(!f.no_local_endpoints);
    }
}

fn with_conditions(a: &str, b: &str) -> String {
    WEB.replacen("conditions: {ready: true}", "conditions: A", 1)
        .replacen("conditions: {ready: true}", "conditions: B", 1)
        .replace("conditions: A", &format!("conditions: {a}"))
        .replace("conditions: B", &format!("conditions: {b}"))
}

#[test]
fn endpoint_conditions_like_kube_proxy() {
    // One ready, one terminating: the terminating one drains.
    let d = run(&with_conditions("{ready: true}", "{ready: false, serving: true, terminating: true}"));
    assert_eq!(active(&d.frontends[0]), ["10.0.1.5:8080"]);
    assert_eq!(draining(&d.frontends[0]), ["10.0.2.5:8080"]);
    // None ready: fall back to serving + terminating endpoints.
    let d = run(&with_conditions(
        "{ready: false, serving: true, terminating: true}",
        "{ready: false, serving: false, terminating: true}",
    ));
    assert_eq!(active(&d.frontends[0]), ["10.0.1.5:8080"]);
    assert_eq!(draining(&d.frontends[0]), ["10.0.2.5:8080"]);
    // Not ready and not terminating (failing readiness): never used, flows drain.
    let d = run(&with_conditions("{ready: false}", "{ready: false}"));
    assert!(active(&d.frontends[0]).is_empty());
    assert_eq!(draining(&d.frontends[0]).len(), 2);
    assert_eq!(d.frontends[0].maglev_size, 0);
}

#[test]
fn scheduler_and_maglev_size_annotations() {
    let ann = |a: &str| {
        WEB.replace(
            "metadata: {name: web, namespace: shop}",
            &format!("metadata: {{name: web, namespace: shop, annotations: {{{a}}}}}"),
        )
    };
    let d = run(&ann("xlb.io/scheduler: round-robin"));
    assert_eq!((d.frontends[0].scheduler, d.frontends[0].maglev_size), (Scheduler::RoundRobin, 0));
    assert_eq!(run(&ann("xlb.io/scheduler: random")).frontends[0].scheduler, Scheduler::Random);
    let d = run(&ann("xlb.io/scheduler: fastest"));
    assert_eq!(d.frontends[0].scheduler, Scheduler::Maglev);
    assert!(d.problems[0].message.contains("fastest"));

    assert_eq!(run(&ann("xlb.io/maglev-table-size: '65537'")).frontends[0].maglev_size, 65537);
    let d = run(&ann("xlb.io/maglev-table-size: '1000'"));
    assert_eq!(d.frontends[0].maglev_size, 251, "not a prime: adaptive size");
    assert!(d.problems[0].message.contains("not a prime"));
}

/// The IPVS names (`ipvsadm -s`) and the long ones; `--scheduler` sets the
/// default; an unknown name is a problem and keeps the default; `sh` sizes
/// a Maglev table as `mh` does, the others have none.
#[test]
fn every_scheduler_by_ipvs_or_long_name_and_the_default() {
    let ann = |a: &str| {
        WEB.replace(
            "metadata: {name: web, namespace: shop}",
            &format!("metadata: {{name: web, namespace: shop, annotations: {{{a}}}}}"),
        )
    };
    for (names, want) in [
        (["rr", "round-robin"], Scheduler::RoundRobin),
        (["wrr", "weighted-round-robin"], Scheduler::WeightedRoundRobin),
        (["lc", "least-connection"], Scheduler::LeastConnection),
        (["wlc", "weighted-least-connection"], Scheduler::WeightedLeastConnection),
        (["sh", "source-hash"], Scheduler::SourceHash),
        (["mh", "maglev"], Scheduler::Maglev),
        (["random", "RANDOM"], Scheduler::Random),
    ] {
        for name in names {
            let d = run(&ann(&format!("xlb.io/scheduler: {name}")));
            assert!(d.problems.is_empty(), "{name}: {:?}", d.problems);
            let f = &d.frontends[0];
            assert_eq!(f.scheduler, want, "{name}");
            assert_eq!(f.maglev_size > 0, want.maglev(), "{name}: {}", f.maglev_size);
        }
    }
    let opts = Options { scheduler: Scheduler::LeastConnection, ..Options::default() };
    assert_eq!(run_with(WEB, &opts).frontends[0].scheduler, Scheduler::LeastConnection, "--scheduler");
    let d = run_with(&ann("xlb.io/scheduler: lblc"), &opts);
    assert_eq!(d.frontends[0].scheduler, Scheduler::LeastConnection, "unknown: the default");
    assert!(d.problems[0].message.contains("\"lblc\" is not a scheduler (rr, wrr, lc, wlc, sh, mh, random); using lc"));
}

/// `xlb.io/weights` by pod name (`targetRef.name`) and by address, the
/// address winning; a missing entry weighs 1; weight 0 keeps the endpoint
/// as a backend (its flows go on) but not eligible; a bad entry is reported
/// and the others stand. All weights 0: nothing eligible (rejected, as
/// IPVS with every dest quiesced).
#[test]
fn weights_annotation_by_pod_name_and_address() {
    let y = WEB
        .replace(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, annotations: {xlb.io/scheduler: wrr, xlb.io/weights: 'web-a=3 web-b=0 10.0.2.5=2 10.0.3.5=x'}}",
        )
        .replace("  nodeName: node-a\n", "  nodeName: node-a\n  targetRef: {kind: Pod, name: web-a}\n")
        .replace("  nodeName: node-b\n", "  nodeName: node-b\n  targetRef: {kind: Pod, name: web-b}\n")
        + "- addresses: [10.0.3.5]\n  targetRef: {kind: Pod, name: web-c}\n";
    let d = run(&y);
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert!(d.problems[0].message.contains("10.0.3.5=x"));
    let f = &d.frontends[0];
    let w: Vec<(String, u16, bool)> =
        f.backends.iter().map(|b| (b.address.to_string(), b.weight, b.eligible())).collect();
    assert_eq!(
        w,
        [("10.0.1.5".into(), 3, true), ("10.0.2.5".into(), 2, true), ("10.0.3.5".into(), 1, true)],
        "the address entry wins over web-b=0"
    );
    let y = y.replace("10.0.2.5=2 ", "");
    let f = &run(&y).frontends[0];
    assert_eq!(active(f), ["10.0.1.5:8080", "10.0.3.5:8080"]);
    assert_eq!(f.backends.len(), 3, "the drained one stays a backend");
    let y = y.replace("web-a=3", "web-a=0").replace("10.0.3.5=x", "web-c=0");
    let f = &run(&y).frontends[0];
    assert!(active(f).is_empty() && f.backends.len() == 3 && !f.no_local_endpoints);
}

#[test]
fn maglev_size_adapts_to_backends_within_bounds() {
    let mut y = WEB.to_string();
    for i in 0..10 {
        y.push_str(&format!("- addresses: [10.0.3.{i}]\n"));
    }
    let d = run(&y);
    assert_eq!(d.frontends[0].eligible().count(), 12);
    assert_eq!(d.frontends[0].maglev_size, 1201, "smallest prime ≥ 1200");
    let small = Options { maglev_max: 1000, ..Options::default() };
    assert_eq!(run_with(&y, &small).frontends[0].maglev_size, 997, "largest prime ≤ the bound");
    let big = Options { maglev_min: 16381, ..Options::default() };
    assert_eq!(run_with(&y, &big).frontends[0].maglev_size, 16381);
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_first_service() {
    let y = WEB.to_string()
        + "---\n"
        + WEB.replace("name: web, namespace: shop", "name: web2, namespace: shop").split("---").next().unwrap();
    let d = run(&y);
    assert_eq!(d.frontends.len(), 1);
    assert_eq!(d.frontends[0].name, "shop/web:http");
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].service, "shop/web2");
    assert!(d.problems[0].message.contains("already used by shop/web:http"));
}

#[test]
fn bad_documents_are_reported_and_the_rest_kept() {
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "f.yaml", &format!("{WEB}\n---\nkind: Service\nspec: {{ports: 7}}\n"));
    assert_eq!(snap.services.len(), 1);
    assert_eq!(snap.slices.len(), 1);
    assert_eq!(snap.errors.len(), 1);
    assert!(snap.errors[0].starts_with("f.yaml document 3: bad Service"), "{:?}", snap.errors);
}

#[test]
fn duplicate_endpoints_across_slices_count_once() {
    let slice = WEB.split("---").nth(1).unwrap().replace("name: web-abc", "name: web-def");
    let y = format!("{WEB}---{slice}");
    assert_eq!(active(&run(&y).frontends[0]).len(), 2);
}

/// kube-proxy keys endpoints by address:port (endpointslicecache.go): two
/// hostNetwork pods on one node share the node's address and serve on
/// different ports behind a named targetPort; both are backends.
#[test]
fn one_address_on_two_ports_is_two_endpoints() {
    let other =
        WEB.split("---").nth(1).unwrap().replace("name: web-abc", "name: web-host").replace("port: 8080", "port: 8081");
    let d = run(&format!("{WEB}---{other}"));
    let mut got = active(&d.frontends[0]);
    got.sort();
    assert_eq!(got, ["10.0.1.5:8080", "10.0.1.5:8081", "10.0.2.5:8080", "10.0.2.5:8081"]);
}

/// A true duplicate keeps its best copy (local, then ready, serving, not
/// terminating), whichever slice comes first: the result is the same for
/// any slice order.
#[test]
fn a_duplicate_endpoint_resolves_the_same_in_any_slice_order() {
    // The same endpoint 10.0.2.5:8080 in a second slice, claimed there by
    // this node and not ready.
    let dup = WEB
        .split("---")
        .nth(1)
        .unwrap()
        .replace("name: web-abc", "name: web-zzz")
        .replace("- addresses: [10.0.1.5]\n  conditions: {ready: true}\n  nodeName: node-a\n", "")
        .replace("conditions: {ready: true}\n  nodeName: node-b", "conditions: {ready: false}\n  nodeName: node-a");
    assert!(dup.contains("ready: false") && !dup.contains("10.0.1.5"), "{dup}");
    let (svc, slice) = WEB.split_once("---").unwrap();
    let a = run(&format!("{svc}---{slice}---{dup}"));
    let b = run(&format!("{svc}---{dup}---{slice}"));
    assert_eq!(a, b, "slice order changed the result");
    let f = &a.frontends[0];
    let copy = f.backends.iter().find(|x| x.address == ip("10.0.2.5")).expect("the duplicate");
    assert!(copy.node_local, "the local copy wins: {f:#?}");
}

#[test]
fn files_with_thousands_of_objects_parse() {
    let mut y = String::new();
    for i in 0..3000 {
        y.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n---\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "big.yaml", &y);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors.first());
    assert_eq!(snap.services.len(), 3000);
}

#[test]
fn health_check_counts_pods_not_addresses() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.20, "fd00:96::10"]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"#;
    assert_eq!(run(&format!("{y}{DS_SLICES}")).health_checks[0].local_endpoints, 1);
}

/// kube-proxy's health check: only a LoadBalancer with a Local policy has
/// one (a NodePort's healthCheckNodePort field is not served), and the count
/// is of distinct local ready endpoints across every port: a first port
/// that is SCTP, or has no endpoints of its own, does not zero it.
#[test]
fn health_check_counts_every_port_and_needs_a_load_balancer() {
    let y = r#"
apiVersion: v1
kind: Service
metadata: {name: mp, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32002
  clusterIP: 10.96.0.21
  ports:
  - {name: sctp, port: 9, protocol: SCTP, nodePort: 30009}
  - {name: a, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: b, port: 81, targetPort: 8081, nodePort: 30081}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mp-1, namespace: default, labels: {kubernetes.io/service-name: mp}}
addressType: IPv4
ports: [{name: a, port: 8080}]
endpoints: [{addresses: [10.0.1.7], nodeName: node-a}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mp-2, namespace: default, labels: {kubernetes.io/service-name: mp}}
addressType: IPv4
ports: [{name: b, port: 8081}]
endpoints: [{addresses: [10.0.1.7], nodeName: node-a}, {addresses: [10.0.1.8], nodeName: node-a}]
"#;
    let d = run(y);
    assert_eq!(d.health_checks.len(), 1);
    assert_eq!((d.health_checks[0].port, d.health_checks[0].local_endpoints), (32002, 2), "10.0.1.7 and .8");
    let np = y.replace("type: LoadBalancer", "type: NodePort");
    assert!(run(&np).health_checks.is_empty(), "a NodePort's healthCheckNodePort is not served");
}

/// `WEB`-like services `a`, `b`, `c` with resourceVersions, for the translator.
fn versioned(endpoints_b: &str, version_b: u32) -> Vec<(String, u32, String)> {
    ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (eps, v) = if *n == "b" { (endpoints_b.to_string(), version_b) } else { (format!("10.0.{i}.1"), 1) };
            (n.to_string(), v, eps)
        })
        .collect()
}

fn versioned_yaml(specs: &[(String, u32, String)]) -> String {
    specs
        .iter()
        .enumerate()
        .map(|(i, (n, v, eps))| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: t, resourceVersion: \"7\"}}\n\
                 spec: {{clusterIP: 10.96.1.{}, ports: [{{name: p, port: 80, targetPort: 8080}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {n}-1, namespace: t, resourceVersion: \"{v}\", labels: {{kubernetes.io/service-name: {n}}}}}\n\
                 addressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{{addresses: [{eps}]}}]\n---\n",
                i + 1
            )
        })
        .collect()
}

fn snapshot(yaml: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "fixture", yaml);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    snap
}

#[test]
fn a_translator_reuses_unchanged_services_and_matches_translate() {
    use std::sync::Arc;
    use xlb::translate::Translator;
    let mut t = Translator::default();
    let opts = Options::default();
    let s1 = snapshot(&versioned_yaml(&versioned("10.0.1.1", 1)));
    let d1 = t.translate(&s1.services, &s1.slices, &node(), &opts);
    assert_eq!(d1.frontends.len(), 3);

    // Same versions: the very same frontends.
    let again = t.translate(&s1.services, &s1.slices, &node(), &opts);
    assert!(d1.frontends.iter().zip(&again.frontends).all(|(a, b)| Arc::ptr_eq(a, b)));

    // b's slice changes (new version): only b is translated again.
    let s2 = snapshot(&versioned_yaml(&versioned("10.0.1.2", 2)));
    let d2 = t.translate(&s2.services, &s2.slices, &node(), &opts);
    let shared: Vec<bool> = d1.frontends.iter().zip(&d2.frontends).map(|(a, b)| Arc::ptr_eq(a, b)).collect();
    assert_eq!(shared, [true, false, true]);
    assert_eq!(active(&d2.frontends[1]), ["10.0.1.2:8080"]);
    // The cache never changes the answer.
    let mut sorted = d2.clone();
    sorted.frontends.sort_by_key(|f| f.key);
    assert_eq!(sorted, translate(&s2.services, &s2.slices, &node(), &opts));

    // A content change under an old version is not noticed (the API server
    // never does that), but a Service that goes away is forgotten.
    let mut s3 = s2.clone();
    s3.services.retain(|s| s.metadata.name.as_deref() != Some("a"));
    let d3 = t.translate(&s3.services, &s3.slices, &node(), &opts);
    assert_eq!(d3.frontends.len(), 2);
    // Options or node changes start over.
    let d4 = t.translate(&s3.services, &s3.slices, &node(), &Options { maglev_min: 509, ..Options::default() });
    assert!(!Arc::ptr_eq(&d3.frontends[0], &d4.frontends[0]));
    assert_eq!(d4.frontends[0].maglev_size, 509);
}

#[test]
fn unversioned_objects_are_translated_every_time() {
    use std::sync::Arc;
    let mut t = xlb::translate::Translator::default();
    let s = snapshot(WEB);
    let a = t.translate(&s.services, &s.slices, &node(), &Options::default());
    let b = t.translate(&s.services, &s.slices, &node(), &Options::default());
    assert!(!Arc::ptr_eq(&a.frontends[0], &b.frontends[0]));
    assert_eq!(a, b);
}

#[test]
fn the_first_service_by_name_wins_a_frontend_in_any_input_order() {
    let y = WEB.to_string()
        + "---\n"
        + WEB.replace("name: web, namespace: shop", "name: web2, namespace: shop").split("---").next().unwrap();
    let mut s = snapshot(&y);
    s.services.reverse();
    s.slices.reverse();
    let d = xlb::translate::Translator::default().translate(&s.services, &s.slices, &node(), &Options::default());
    assert_eq!(d.frontends.len(), 1);
    assert_eq!(d.frontends[0].name, "shop/web:http");
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].service, "shop/web2");
}

/// Replaces slice `j` with a copy whose single endpoint is `addr`.
fn with_endpoint(s: &Snapshot, j: usize, addr: &str, version: &str) -> Snapshot {
    let mut next = s.clone();
    let mut slice = (*next.slices[j]).clone();
    slice.endpoints.as_mut().unwrap()[0].addresses = vec![addr.to_string()];
    slice.metadata.resource_version = Some(version.into());
    next.slices[j] = std::sync::Arc::new(slice);
    next
}

#[test]
fn the_shared_fast_path_retranslates_only_what_changed_and_agrees_with_translate() {
    use std::sync::Arc;
    use xlb::translate::Translator;
    let opts = Options::default();
    let sorted = |mut d: Desired| {
        d.frontends.sort_by_key(|f| f.key);
        d
    };
    // Two services claim one frontend too, so placement is exercised.
    let dup = WEB
        .replace("name: web, namespace: shop", "name: aaa, namespace: shop")
        .replace("name: web-abc", "name: aaa-abc")
        .replace("kubernetes.io/service-name: web}", "kubernetes.io/service-name: aaa}");
    let s1 = snapshot(&(versioned_yaml(&versioned("10.0.1.1", 1)) + WEB + "---\n" + &dup));
    let mut t = Translator::default();
    let d1 = t.translate_shared(&s1.services, &s1.slices, &node(), &opts);
    assert_eq!(sorted(d1.clone()), translate(&s1.services, &s1.slices, &node(), &opts));

    // b's slice (position 1) gets a new endpoint: only b's frontend is new.
    let s2 = with_endpoint(&s1, 1, "10.0.1.9", "2");
    let d2 = t.translate_shared(&s2.services, &s2.slices, &node(), &opts);
    let renewed: Vec<&str> = d1
        .frontends
        .iter()
        .zip(&d2.frontends)
        .filter(|(a, b)| !Arc::ptr_eq(a, b))
        .map(|(_, b)| b.name.as_str())
        .collect();
    assert_eq!(renewed, ["t/b:p"]);
    assert_eq!(sorted(d2.clone()), translate(&s2.services, &s2.slices, &node(), &opts));

    // The service that lost the duplicate changes endpoints: nothing it owns is placed.
    let web_slice = s2.slices.iter().position(|s| s.metadata.name.as_deref() == Some("web-abc")).unwrap();
    let s3 = with_endpoint(&s2, web_slice, "10.244.9.9", "5");
    let d3 = t.translate_shared(&s3.services, &s3.slices, &node(), &opts);
    assert_eq!(sorted(d3.clone()), translate(&s3.services, &s3.slices, &node(), &opts));
    assert!(d2.frontends.iter().zip(&d3.frontends).all(|(a, b)| Arc::ptr_eq(a, b)));
    assert_eq!(d3.problems.len(), 1, "{:?}", d3.problems);

    // A slice moving to another service changes the grouping: the full path, same answer.
    let mut s4 = s3.clone();
    let mut moved = (*s4.slices[0]).clone();
    moved.metadata.labels.as_mut().unwrap().insert("kubernetes.io/service-name".into(), "c".into());
    moved.metadata.resource_version = Some("9".into());
    s4.slices[0] = Arc::new(moved);
    let d4 = t.translate_shared(&s4.services, &s4.slices, &node(), &opts);
    assert_eq!(sorted(d4.clone()), translate(&s4.services, &s4.slices, &node(), &opts));
    assert!(find(&d4, Kind::ClusterIp, "10.96.1.1", 80).backends.is_empty(), "a lost its only slice");

    // A service removed: a different shape, the full path.
    let mut s5 = s4.clone();
    s5.services.remove(0);
    let d5 = t.translate_shared(&s5.services, &s5.slices, &node(), &opts);
    assert_eq!(sorted(d5), translate(&s5.services, &s5.slices, &node(), &opts));
}

/// Found by the property test (`translate_properties.rs`): a Service that
/// programs nothing says why, and a frontend three Services claim names
/// its final holder in every loser's problem, whatever the input order.
#[test]
fn silent_services_and_claim_messages_found_by_the_property_test() {
    let d = run("apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: a}\nspec: {clusterIP: 10.96.0.9}");
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert!(d.problems[0].message.contains("no ports"), "{:?}", d.problems);
    let claim = |ns: &str, name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{clusterIP: 10.96.1.{}, externalIPs: [198.51.100.1], ports: [{{port: 53}}]}}\n---\n",
            name.len() + ns.len()
        )
    };
    let (x, y, z) = (claim("a", "s0"), claim("b", "s00"), claim("b", "s000"));
    for order in [[&x, &y, &z], [&z, &y, &x], [&y, &z, &x]] {
        let d = run(&order.iter().map(|s| s.as_str()).collect::<String>());
        let lost: Vec<&str> = d.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert!(lost.iter().all(|m| m.ends_with("already used by a/s0:53; skipped")), "{lost:?}");
    }
}
