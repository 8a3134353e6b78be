// SPDX-License-Identifier: MIT OR Apache-2.0
//! Socket-level load balancing on the two-node cluster: real client
//! processes (`xlb-client`) in a node's own network namespace (the host)
//! or a pod's, moved into the node's test cgroup where its agent attached
//! the cgroup programs (`--cgroup-path`, one cgroup per node and test).
//!
//! Mirrors kube-proxy's OUTPUT-chain behaviour (the node reaches every
//! ClusterIP, `pkg/proxy/nftables/proxier.go`'s service chains apply to
//! locally generated traffic) and the e2e tests named per scenario;
//! Cilium's `bpf/bpf_sock.c` for the socket-level mechanics.

use std::time::Duration;

use bpf_tests::{
    cgroup::{echo_pod, field},
    cluster::*,
};

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo, annotations: {xlb.io/scheduler: round-robin}}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd96::10"]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 9376, nodePort: 30036}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

const EMPTY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd96::20"]
  selector: {app: nothing}
  ports:
  - {name: http, port: 80, targetPort: 9376}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

/// web-1a on node 1 (local to the clients), web-2a on node 2 (remote), a
/// client pod on node 1.
fn cluster(services: &[&str], agent_args: &[&str]) -> Cluster {
    let mut c = Cluster::new(2, &[9376, 5353]);
    c.add_pod("web-1a", 1, "web");
    c.add_pod("web-2a", 2, "web");
    c.add_pod("client", 1, "");
    for s in services {
        c.add_services(s);
    }
    c.write_manifests(&[]);
    c.start_agents(agent_args);
    c
}

fn vip(addr: &str, port: u16) -> String {
    sa(addr, port).to_string()
}

fn lines(out: Result<String, String>) -> Vec<String> {
    out.unwrap_or_else(|e| panic!("xlb-client failed: {e}")).lines().map(str::to_string).collect()
}

/// The node itself (a process in the node's network namespace, like the
/// kubelet or a hostNetwork pod) reaches a ClusterIP over TCP and UDP in
/// both families, on the local and the remote backend; the socket shows
/// the service as its peer and as the source of every datagram, and no
/// packet of these flows is translated by TC or XDP.
#[test]
fn host_reaches_cluster_ip_over_tcp_and_udp_in_both_families() {
    let c = cluster(&[WEB], &[]);
    let host = &c.nodes[0].ns;
    let before = (c.verdict(1, "sock_xlate"), c.verdict(1, "new_flow"), c.verdict(2, "new_flow"));
    for ip in ["10.96.0.10", "fd96::10"] {
        let http = vip(ip, 80);
        let answers = lines(c.client(1, host, &["repeat", &http, "6", "h"]));
        for a in &answers {
            assert_eq!(field(a, "peer"), http, "getpeername shows the service: {a}");
        }
        let pods: std::collections::BTreeSet<String> = answers.iter().map(|a| echo_pod(a)).collect();
        assert_eq!(pods.len(), 2, "{ip}: the local and the remote backend answer over TCP: {answers:?}");
        let dns = vip(ip, 53);
        let mut udp_pods = std::collections::BTreeSet::new();
        for i in 0..6 {
            let a = lines(c.client(1, host, &["udp", &dns, &format!("u{i}")])).remove(0);
            assert_eq!(field(&a, "from"), dns, "recvfrom shows the service as the source: {a}");
            udp_pods.insert(echo_pod(&a));
            let a = lines(c.client(1, host, &["udp-connected", &dns, &format!("c{i}")])).remove(0);
            assert_eq!(field(&a, "peer"), dns, "a connected UDP socket's peer is the service: {a}");
            assert_eq!(field(&a, "from"), dns, "{a}");
            udp_pods.insert(echo_pod(&a));
        }
        assert_eq!(udp_pods.len(), 2, "{ip}: both backends answer over UDP: {udp_pods:?}");
    }
    // A dual-stack (AF_INET6) socket reaching the IPv4 service through its
    // v4-mapped address: connect6 / sendmsg6 and recvmsg6 / getpeername6.
    let mapped = "[::ffff:10.96.0.10]";
    let a = lines(c.client(1, host, &["tcp", &format!("{mapped}:80"), "m"])).remove(0);
    assert_eq!(field(&a, "peer"), vip("10.96.0.10", 80), "v4-mapped over IPv6: {a}");
    let a = lines(c.client(1, host, &["udp", &format!("{mapped}:53"), "m"])).remove(0);
    assert_eq!(field(&a, "from"), vip("10.96.0.10", 53), "v4-mapped over IPv6: {a}");
    let after = (c.verdict(1, "sock_xlate"), c.verdict(1, "new_flow"), c.verdict(2, "new_flow"));
    assert_eq!(after.0 - before.0, 2 * (6 + 6 + 6) + 2, "every connect and datagram translated at the socket");
    assert_eq!((after.1, after.2), (before.1, before.2), "no packet of these flows was balanced again by TC or XDP");
}

/// The node reaches its own NodePort (kube-proxy accepts NodePorts on the
/// node's addresses from local processes), also translated at connect.
#[test]
fn host_reaches_its_own_node_port() {
    let c = cluster(&[WEB], &[]);
    let host = &c.nodes[0].ns;
    let np = vip(&node_addr4(1), 30036);
    let before = c.verdict(1, "sock_xlate");
    let answers = lines(c.client(1, host, &["repeat", &np, "4", "n"]));
    assert!(answers.iter().all(|a| field(a, "peer") == np), "{answers:?}");
    assert_eq!(c.verdict(1, "sock_xlate") - before, 4);
}

/// "should be rejected when no endpoints exist" (service.go) through the
/// socket: connect fails at once with ECONNREFUSED, as kube-proxy's REJECT
/// makes it; so does a datagram sent to the service and a UDP connect; from
/// the node and from a pod, both families. A Service with
/// `internalTrafficPolicy: Local` whose endpoints are all on the other node
/// fails with EHOSTUNREACH (kube-proxy drops; see the README).
#[test]
fn no_endpoints_fail_at_connect_with_econnrefused() {
    let local_only = r#"
apiVersion: v1
kind: Service
metadata: {name: far, namespace: demo}
spec:
  clusterIP: 10.96.0.21
  clusterIPs: [10.96.0.21]
  internalTrafficPolicy: Local
  selector: {app: far}
  ports: [{name: http, port: 80, targetPort: 9376}]
"#;
    let mut c = Cluster::new(2, &[9376, 5353]);
    c.add_pod("client", 1, "");
    c.add_pod("far-2a", 2, "far");
    c.add_services(EMPTY);
    c.add_services(local_only);
    c.write_manifests(&[]);
    c.start_agents(&[]);
    for (who, ns) in [("host", &c.nodes[0].ns), ("pod", &c.pod("client").ns)] {
        for ip in ["10.96.0.20", "fd96::20"] {
            for (port, proto) in [(80, "tcp"), (53, "udp"), (53, "udp-connect")] {
                let a = lines(c.client(1, ns, &["connect-error", &vip(ip, port), proto])).remove(0);
                assert_eq!(field(&a, "err"), "111", "{who} {proto} {ip}: ECONNREFUSED: {a}");
                let ms: u64 = field(&a, "ms").parse().unwrap();
                assert!(ms < 500, "{who} {proto} {ip}: failed at once, not after a timeout: {a}");
            }
        }
        let a = lines(c.client(1, ns, &["connect-error", &vip("10.96.0.21", 80), "tcp"])).remove(0);
        assert_eq!(field(&a, "err"), "113", "{who}: Local policy, no local endpoint: EHOSTUNREACH: {a}");
    }
    assert_eq!(c.verdict(1, "sock_reject"), 12);
    assert_eq!(c.verdict(1, "sock_no_local"), 2);
    // From node 2, where its endpoint is, the same Service answers.
    let a = lines(c.client(2, &c.nodes[1].ns, &["tcp", &vip("10.96.0.21", 80), "x"])).remove(0);
    assert_eq!(echo_pod(&a), "far-2a", "{a}");
}

/// A LoadBalancer address with `loadBalancerSourceRanges` is left to the
/// packet path (the source is not known at connect): counted `sock_skip`,
/// and TC balances it, applying the ranges.
#[test]
fn source_ranges_are_left_to_the_packet_path() {
    let ranged = r#"
apiVersion: v1
kind: Service
metadata: {name: ranged, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30]
  selector: {app: web}
  loadBalancerSourceRanges: [10.244.0.0/16]
  ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30038}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.30}]}
"#;
    let c = cluster(&[ranged], &[]);
    let pod = &c.pod("client").ns;
    let before = (c.verdict(1, "sock_skip"), c.verdict(1, "new_flow"), c.verdict(1, "sock_xlate"));
    let a = lines(c.client(1, pod, &["tcp", &vip("198.51.100.30", 80), "r"])).remove(0);
    assert!(a.contains("echo=web-"), "{a}");
    let a = lines(c.client(1, pod, &["tcp", &vip("10.96.0.30", 80), "r"])).remove(0);
    assert_eq!(field(&a, "peer"), vip("10.96.0.30", 80), "the ClusterIP has no ranges: socket-LB: {a}");
    let after = (c.verdict(1, "sock_skip"), c.verdict(1, "new_flow"), c.verdict(1, "sock_xlate"));
    assert_eq!((after.0 - before.0, after.1 - before.1, after.2 - before.2), (1, 1, 1), "skip + TC, then socket-LB");
}

/// `--socket-lb=all` (the default): a pod's connections to a ClusterIP are
/// translated at connect; TC on its interface sees plain pod → backend
/// traffic (nothing to balance, no conntrack entry), the backend sees the
/// pod's own address. The same pod's sockets outside the cgroup (a test
/// thread) still go through TC: the fallback for what socket-LB cannot see.
#[test]
fn pod_connections_are_translated_at_connect() {
    let c = cluster(&[WEB], &[]);
    let pod = c.pod("client");
    let http = vip("10.96.0.10", 80);
    let before = (c.verdict(1, "sock_xlate"), c.verdict(1, "new_flow"));
    let answers = lines(c.client(1, &pod.ns, &["repeat", &http, "6", "p"]));
    for a in &answers {
        assert_eq!(field(a, "peer"), http, "{a}");
        let seen_as = echo_field(a, 1);
        assert_eq!(seen_as.rsplit_once(':').unwrap().0, pod.ip4, "the backend sees the pod itself: {a}");
    }
    let after = (c.verdict(1, "sock_xlate"), c.verdict(1, "new_flow"));
    assert_eq!(after.0 - before.0, 6, "translated at connect");
    assert_eq!(after.1, before.1, "TC balanced none of them");
    let ct: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "conntrack"])).unwrap();
    let tracked =
        ct.as_array().unwrap().iter().filter(|e| e["source"].as_str().unwrap_or("").contains(&pod.ip4)).count();
    assert_eq!(tracked, 0, "no conntrack entry for socket-translated flows: {ct:#}");
    // The fallback: a thread of this test (not in the cgroup) in the same pod.
    tcp_request(&pod.ns, sa("10.96.0.10", 80), "tc").expect("through TC");
    assert_eq!(c.verdict(1, "new_flow") - after.1, 1, "a socket outside the cgroup is balanced by TC");
}

/// `--socket-lb=host`: only the node's own sockets are translated at
/// connect; a pod's go through TC (counted as new flows there).
#[test]
fn host_mode_translates_only_the_nodes_own_sockets() {
    let c = cluster(&[WEB], &["--socket-lb", "host"]);
    let http = vip("10.96.0.10", 80);
    let before = (c.verdict(1, "sock_xlate"), c.verdict(1, "new_flow"));
    lines(c.client(1, &c.pod("client").ns, &["repeat", &http, "4", "p"]));
    let mid = (c.verdict(1, "sock_xlate"), c.verdict(1, "new_flow"));
    assert_eq!((mid.0 - before.0, mid.1 - before.1), (0, 4), "pod sockets: TC, not socket-LB");
    let answers = lines(c.client(1, &c.nodes[0].ns, &["repeat", &http, "4", "h"]));
    assert!(answers.iter().all(|a| field(a, "peer") == http), "{answers:?}");
    assert_eq!(c.verdict(1, "sock_xlate") - mid.0, 4, "host sockets: socket-LB");
}

/// "should have session affinity work for service with type clusterIP"
/// through the socket: every connection of the node lands on one backend,
/// keyed by its network namespace; and kube-proxy's endpoint choice
/// (topology.go: ready endpoints, else serving-terminating ones) holds.
#[test]
fn affinity_and_terminating_endpoints_hold_through_socket_lb() {
    let aff =
        WEB.replace("name: web,", "name: sticky,").replace("10.96.0.10", "10.96.0.11").replace("fd96::10", "fd96::11");
    let aff = aff
        .replace("  selector:", "  sessionAffinity: ClientIP\n  selector:")
        .replace("nodePort: 30036", "nodePort: 30037");
    let mut c = cluster(&[WEB, &aff], &[]);
    let host = &c.nodes[0].ns;
    let pods = |c: &Cluster, to: &str, n: &str| -> Vec<String> {
        lines(c.client(1, &c.nodes[0].ns, &["repeat", to, n, "a"])).iter().map(|l| echo_pod(l)).collect()
    };
    let sticky = pods(&c, &vip("10.96.0.11", 80), "20");
    assert_eq!(spread(&sticky).len(), 1, "affinity: {:?}", spread(&sticky));
    let _ = host;
    let dump: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "affinity"])).unwrap();
    assert!(
        dump.as_array().unwrap().iter().any(|a| a["client"].as_str().unwrap_or("").starts_with("netns:")),
        "the affinity entry names the client's network namespace: {dump:#}"
    );
    // web-1a terminating, web-2a ready: new connections only to web-2a.
    c.set_pod_state("web-1a", PodState::Terminating);
    c.write_manifests(&[]);
    c.wait_synced(2);
    let ready_only = pods(&c, &vip("10.96.0.10", 80), "10");
    assert_eq!(spread(&ready_only).keys().collect::<Vec<_>>(), ["web-2a"], "{:?}", spread(&ready_only));
    // Only the terminating one is left serving: it takes new connections.
    c.set_pod_state("web-2a", PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(3);
    let terminating = pods(&c, &vip("10.96.0.10", 80), "6");
    assert_eq!(spread(&terminating).keys().collect::<Vec<_>>(), ["web-1a"], "{:?}", spread(&terminating));
}

/// An agent restart (programs swapped on the pinned cgroup links, maps
/// reused) breaks no socket-translated connection: a TCP stream keeps
/// ticking and a connected UDP socket still sees the service as the source
/// (its reverse entry is pinned). `--socket-lb=off` then detaches the
/// hooks: the node, which has no route to the service range, can no longer
/// reach the ClusterIP.
#[test]
fn agent_restart_breaks_no_socket_translated_connection() {
    let mut c = cluster(&[WEB], &[]);
    let pod = c.pod("client").ns.name.clone();
    let pod_ns = &c.pod("client").ns;
    let mut stream = c.client_running(1, pod_ns, &["stream", &vip("10.96.0.10", 80)]);
    assert_eq!(field(&stream.line(), "peer"), vip("10.96.0.10", 80));
    let mut udp = c.client_running(1, &c.nodes[0].ns, &["udp-hold", &vip("fd96::10", 53)]);
    let first = udp.ask("before");
    assert_eq!(field(&first, "from"), vip("fd96::10", 53), "{first}");
    assert!(stream.line().starts_with("tick="));
    c.start_agent(1, &[]);
    let log = c.nodes[0].agent.as_ref().unwrap().log_text();
    assert!(log.contains("socket-LB attached") && log.contains("updated=9"), "links swapped in place:\n{log}");
    for _ in 0..5 {
        let l = stream.line();
        assert!(l.starts_with("tick="), "the stream broke across the restart: {l}");
    }
    let after = udp.ask("after");
    assert_eq!(field(&after, "from"), vip("fd96::10", 53), "{after}");
    assert_eq!(echo_pod(&after), echo_pod(&first), "the connected UDP socket keeps its backend");
    drop((stream, udp));
    c.start_agent(1, &["--socket-lb", "off"]);
    let a = lines(c.client(1, &c.nodes[0].ns, &["connect-error", &vip("10.96.0.10", 80), "tcp"])).remove(0);
    assert_eq!(field(&a, "err"), "101", "no socket-LB, no route to the ClusterIP (ENETUNREACH): {a}");
    let _ = pod;
    std::thread::sleep(Duration::from_millis(10));
}

/// A connected UDP socket is balanced once, at connect. When its backend
/// leaves, the agent aborts it (kube-proxy deletes such UDP conntrack
/// entries, `conntrack/cleanup.go`; Cilium destroys the sockets): the
/// client's next call fails, and its reconnect lands on a live backend. A
/// socket to a backend that stays is left alone.
#[test]
fn connected_udp_sockets_reselect_when_their_backend_leaves() {
    let mut c = cluster(&[WEB], &[]);
    let dns = vip("10.96.0.10", 53);
    // Connected sockets, on the node and in a pod (the agent enters the
    // pod's namespace to find those), and unconnected ones; held until
    // each kind has one on each backend.
    let mut held = Vec::new();
    let kinds =
        [("host", &c.nodes[0].ns, false), ("pod", &c.pod("client").ns, false), ("unconnected", &c.nodes[0].ns, true)];
    for (kind, ns, unconnected) in kinds {
        let mut pods = std::collections::BTreeSet::new();
        for _ in 0..16 {
            let args: &[&str] = if unconnected { &["udp-hold", &dns, "unconnected"] } else { &["udp-hold", &dns] };
            let mut h = c.client_running(1, ns, args);
            let pod = echo_pod(&h.ask("hello"));
            pods.insert(pod.clone());
            held.push((kind, pod, h));
            if pods.len() == 2 {
                break;
            }
        }
        assert_eq!(pods.len(), 2, "{kind}: both backends");
    }
    // An unconnected socket keeps its backend from datagram to datagram.
    for (kind, pod, h) in held.iter_mut().filter(|(k, ..)| *k == "unconnected") {
        for i in 0..4 {
            assert_eq!(&echo_pod(&h.ask(&format!("again {i}"))), pod, "{kind}");
        }
    }
    c.set_pod_state("web-2a", PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(2);
    let log = c.nodes[0].agent.as_ref().unwrap().log_text();
    let to_gone = held.iter().filter(|(k, p, _)| p == "web-2a" && *k != "unconnected").count();
    assert!(log.contains(&format!("sockets={to_gone}\n")), "{to_gone} connected sockets aborted:\n{log}");
    for (kind, pod, h) in &mut held {
        let a = h.ask("after");
        if *kind == "unconnected" {
            // Never aborted: its next datagram is balanced again.
            assert!(!a.contains("errors="), "an unconnected socket is not aborted: {a}");
            assert_eq!(echo_pod(&a), "web-1a", "{a}");
            assert_eq!(field(&a, "from"), dns, "{a}");
        } else if pod == "web-2a" {
            // ECONNABORTED is pending on the socket (EDESTADDRREQ first: it
            // is no longer connected); the reconnect is balanced anew.
            assert!(field(&a, "errors").contains("103"), "{kind}: the socket to the removed backend was aborted: {a}");
            assert_eq!(echo_pod(&a), "web-1a", "{kind}: reconnected to the live backend: {a}");
            assert_eq!(field(&a, "from"), dns, "{a}");
        } else {
            assert!(!a.contains("errors="), "{kind}: a socket to a backend that stays is untouched: {a}");
            assert_eq!(echo_pod(&a), "web-1a", "{a}");
        }
    }
}

/// The `n`-th comma-separated word of an `echo=` field (0: pod, 1: the
/// client address the backend saw).
fn echo_field(line: &str, n: usize) -> String {
    field(line, "echo").split(',').nth(n).unwrap_or_default().to_string()
}
