// SPDX-License-Identifier: MIT OR Apache-2.0
//! End-to-end Kubernetes Service behaviour on a two-node cluster in network
//! namespaces (see `bpf_tests::cluster`), with a real `xlb agent` per node
//! and real TCP and UDP sockets. Each scenario names the upstream
//! Kubernetes e2e test (test/e2e/network/service.go unless said otherwise)
//! whose behaviour it mirrors.

use std::{thread, time::Duration};

use bpf_tests::cluster::*;

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 9376, nodePort: 30036}
"#;

/// Two nodes, backends web-1a (node 1) and web-2a (node 2), a client pod on node 1.
fn two_nodes(services: &[&str], extra_agent_args: &[&str]) -> Cluster {
    let mut c = Cluster::new(2, &[9376, 9377, 5353]);
    c.add_pod("web-1a", 1, "web");
    c.add_pod("web-2a", 2, "web");
    c.add_pod("client", 1, "");
    for s in services {
        c.add_services(s);
    }
    c.write_manifests(&[("http", 9376), ("metrics", 9377)]);
    c.start_agents(extra_agent_args);
    c
}

/// The pods answering `n` new TCP connections from `from` to `to`.
fn pods_answering(from: &bpf_tests::NetNs, to: std::net::SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| tcp_request(from, to, &format!("r{i}")).unwrap_or_else(|e| panic!("request {i} to {to}: {e}")).0)
        .collect()
}

/// "should serve a basic endpoint from pods": a pod reaches the ClusterIP,
/// both backends (local and remote) answer, and the backend sees the pod's
/// own address.
#[test]
fn cluster_ip_from_a_pod() {
    let c = two_nodes(&[WEB], &[]);
    let client = c.pod("client");
    let mut seen = Vec::new();
    for i in 0..30 {
        let (pod, from) = tcp_request(&client.ns, sa("10.96.0.10", 80), &format!("r{i}")).expect("ClusterIP");
        assert_eq!(from.rsplit_once(':').unwrap().0, client.ip4, "no SNAT for pod → ClusterIP");
        seen.push(pod);
    }
    let s = spread(&seen);
    assert_eq!(s.len(), 2, "both backends, local and remote: {s:?}");
}

/// "should be able to create a functioning NodePort service": the external
/// client reaches the NodePort on each node; a backend on another node is
/// reached through SNAT (externalTrafficPolicy Cluster) and the reply
/// returns correctly.
#[test]
fn node_port_from_outside_on_every_node() {
    let c = two_nodes(&[WEB], &[]);
    for node in 1..=2 {
        let answers = pods_answering(&c.external, sa(&node_addr4(node), 30036), 30);
        let s = spread(&answers);
        assert_eq!(s.len(), 2, "node {node}: local and remote backends: {s:?}");
    }
    // What the backends saw: the client itself from its own node, the node
    // address (SNAT) from the other.
    for i in 0..20 {
        let (pod, from) = tcp_request(&c.external, sa(&node_addr4(1), 30036), &format!("s{i}")).unwrap();
        let ip = from.rsplit_once(':').unwrap().0.to_string();
        match pod.as_str() {
            "web-1a" => assert_eq!(ip, EXTERNAL4, "local backend: no SNAT"),
            "web-2a" => assert_eq!(ip, node_addr4(1), "remote backend: SNAT to the node"),
            other => panic!("{other}"),
        }
    }
}

/// "should be able to change the type and ports of a UDP service"
/// (loadbalancer.go), reduced to what a proxy does: a UDP ClusterIP from a
/// pod and a UDP NodePort from outside.
#[test]
fn udp_service() {
    let dns = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  selector: {app: web}
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}]
"#;
    let c = two_nodes(&[dns], &[]);
    let client = c.pod("client");
    let mut pods = Vec::new();
    for i in 0..20 {
        let (pod, _) = udp_request(&client.ns, sa("10.96.0.53", 53), &format!("q{i}")).expect("UDP ClusterIP");
        pods.push(pod);
    }
    assert_eq!(spread(&pods).len(), 2, "{:?}", spread(&pods));
    let (_, from) = udp_request(&c.external, sa(&node_addr4(2), 30053), "q").expect("UDP NodePort");
    assert!(from.starts_with(EXTERNAL4) || from.starts_with(&node_addr4(2)));
}

/// A UDP client of a ClusterIP whose endpoints have no socket on the target
/// port gets ECONNREFUSED, as through kube-proxy: each backend's ICMP port
/// unreachable quotes client → backend, and xlb translates it (reversed
/// quote → conntrack) to come from the VIP quoting client → VIP, as
/// netfilter's `nf_nat_icmp_reply_translation` does for a RELATED packet.
/// The backends are on the client's node (TC translates) and on the other
/// node (XDP on the uplink translates), in both families.
#[test]
fn udp_to_a_port_without_a_socket_is_refused() {
    let closed = r#"
apiVersion: v1
kind: Service
metadata: {name: closed, namespace: demo}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.60
  clusterIPs: [10.96.0.60, "fd96::60"]
  selector: {app: web}
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5999}]
"#;
    let c = two_nodes(&[closed], &[]);
    let client = c.pod("client");
    // Six per family: a backend's kernel sends a burst of about six port
    // unreachables to one peer, then one a second (icmp_ratelimit).
    for vip in ["10.96.0.60", "fd96::60"] {
        for i in 0..6 {
            let any = if vip.contains(':') { "[::]:0" } else { "0.0.0.0:0" };
            let s = in_ns(&client.ns, || std::net::UdpSocket::bind(any)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.connect(sa(vip, 53)).unwrap();
            s.send(format!("q{i}").as_bytes()).unwrap();
            let err = s.recv(&mut [0u8; 64]).expect_err("no answer from a closed port");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{vip} datagram {i}: {err}");
        }
    }
    // Every refusal was translated on the client's node; the remote
    // backend's passed node 2 untranslated (no flow there), so that path was
    // taken too (and the local one with all but certainty: 12 flows, 2 backends).
    let verdicts = |node| {
        let v: serde_json::Value = serde_json::from_str(&c.dump(node, &["-o", "json", "stats"])).unwrap();
        v["verdicts"].clone()
    };
    let (one, two) = (verdicts(1), verdicts(2));
    assert!(one["icmp_error_nat"].as_u64().unwrap() >= 12, "node 1: {one:#}");
    assert!(two["icmp_error_pass"].as_u64().unwrap() >= 1, "node 2: {two:#}");
}

/// 8 KiB UDP requests and 8 KiB answers, six IP fragments each way on
/// 1500-byte links, through a ClusterIP from a pod and a NodePort from
/// outside, to the local and the remote (SNATed) backend, in both
/// families. Netfilter's NAT under kube-proxy reassembles the datagram
/// first; xlb translates each fragment (the later ones by their first
/// fragment's ports). What DNS over UDP with large answers (EDNS0, DNSSEC)
/// needs from a proxy.
#[test]
fn large_udp_datagrams_arrive_whole_both_ways() {
    let big = r#"
apiVersion: v1
kind: Service
metadata: {name: big, namespace: demo}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.54
  clusterIPs: [10.96.0.54, "fd96::54"]
  selector: {app: web}
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30054}]
"#;
    let c = two_nodes(&[big], &[]);
    let client = c.pod("client");
    let msg: String = (0..8192).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let targets = [
        (&client.ns, sa("10.96.0.54", 53)),
        (&client.ns, sa("fd96::54", 53)),
        (&c.external, sa(&node_addr4(1), 30054)),
        (&c.external, sa(&node_addr6(1), 30054)),
    ];
    for (from, to) in targets {
        let mut pods = Vec::new();
        for i in 0..16 {
            let answer = udp_echo(from, to, &msg).unwrap_or_else(|e| panic!("{to} datagram {i}: {e}"));
            let mut it = answer.splitn(4, ' ');
            let (pod, _, _, echoed) = (it.next(), it.next(), it.next(), it.next());
            assert!(echoed == Some(msg.as_str()), "{to} datagram {i}: {} bytes back, not the 8 KiB sent", answer.len());
            pods.push(pod.unwrap().to_string());
        }
        assert_eq!(spread(&pods).len(), 2, "{to}: local and remote backends: {:?}", spread(&pods));
    }
    for node in 1..=2 {
        let v: serde_json::Value = serde_json::from_str(&c.dump(node, &["-o", "json", "stats"])).unwrap();
        let v = &v["verdicts"];
        assert!(v["fragment_nat"].as_u64().unwrap() > 0 || node == 2, "node {node}: {v:#}");
        assert_eq!(v["malformed"].as_u64().unwrap(), 0, "node {node}: {v:#}");
    }
}

/// "should be able to reach pod on ipv4 and ipv6 ip" (dual-stack suite,
/// test/e2e/network/dual_stack.go): one dual-stack Service, both families
/// from a pod and from outside; and "should create service with ipv6
/// cluster ip": an IPv6-only Service.
#[test]
fn dual_stack_and_ipv6_services() {
    let ds = r#"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: demo}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd96::20"]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30080}]
"#;
    let v6 = r#"
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: demo}
spec:
  ipFamilies: [IPv6]
  clusterIP: "fd96::30"
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 9376}]
"#;
    let c = two_nodes(&[ds, v6], &[]);
    let client = c.pod("client");
    let answers = pods_answering(&client.ns, sa("fd96::30", 8080), 20);
    assert_eq!(spread(&answers).len(), 2, "IPv6-only: {:?}", spread(&answers));
    for vip in ["10.96.0.20", "fd96::20"] {
        let answers = pods_answering(&client.ns, sa(vip, 80), 20);
        assert_eq!(spread(&answers).len(), 2, "{vip}: {:?}", spread(&answers));
    }
    let (_, from) = tcp_request(&client.ns, sa("fd96::20", 80), "x").unwrap();
    assert!(from.contains(&client.ip6), "IPv6 pod → IPv6 ClusterIP keeps the source: {from}");
    for node in 1..=2 {
        for addr in [node_addr4(node), node_addr6(node)] {
            let answers = pods_answering(&c.external, sa(&addr, 30080), 12);
            assert_eq!(spread(&answers).len(), 2, "NodePort {addr}: {:?}", spread(&answers));
        }
    }
}

/// "should have session affinity work for service with type clusterIP":
/// 20 requests from one client land on one backend.
#[test]
fn session_affinity_client_ip() {
    let svc = WEB.replace("  selector:", "  sessionAffinity: ClientIP\n  selector:");
    let c = two_nodes(&[&svc], &[]);
    let client = c.pod("client");
    let answers = pods_answering(&client.ns, sa("10.96.0.10", 80), 20);
    assert_eq!(spread(&answers).len(), 1, "{:?}", spread(&answers));
    let from_outside = pods_answering(&c.external, sa(&node_addr4(1), 30036), 20);
    assert_eq!(spread(&from_outside).len(), 1, "{:?}", spread(&from_outside));
    let aff = c.dump(1, &["-o", "json", "affinity"]);
    let aff: serde_json::Value = serde_json::from_str(&aff).unwrap();
    assert!(aff.as_array().unwrap().iter().any(|a| a["client"] == client.ip4.as_str()), "{aff:#}");
}

/// "should create endpoints for unready pods" inverted: a service whose only
/// endpoint is gone refuses connections at once (kube-proxy's REJECT), it
/// does not time out.
#[test]
fn no_endpoints_refuse_quickly() {
    let mut c = two_nodes(&[WEB], &[]);
    c.set_pod_state("web-1a", PodState::Gone);
    c.set_pod_state("web-2a", PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(2);
    let started = std::time::Instant::now();
    assert!(refused(&c.pod("client").ns, sa("10.96.0.10", 80)), "ClusterIP without endpoints");
    assert!(refused(&c.external, sa(&node_addr4(2), 30036)), "NodePort without endpoints");
    assert!(started.elapsed() < Duration::from_secs(2), "refused quickly, took {:?}", started.elapsed());
}

/// "should allow pods to hairpin back to themselves through services": a
/// backend reaches its own service and may land on itself.
#[test]
fn hairpin() {
    let c = two_nodes(&[WEB], &[]);
    let me = c.pod("web-1a");
    let mut landed_on_self = false;
    for i in 0..30 {
        let (pod, _) = tcp_request(&me.ns, sa("10.96.0.10", 80), &format!("h{i}")).expect("hairpin request");
        landed_on_self |= pod == "web-1a";
    }
    assert!(landed_on_self, "30 requests never reached the caller itself");
}

/// Traffic not for a service is untouched: plain connections to a pod and
/// to a node address (ssh-like) work with xlb on every interface.
#[test]
fn non_service_traffic_is_untouched() {
    let c = two_nodes(&[WEB], &[]);
    let client = c.pod("client");
    let remote = c.pod("web-2a");
    let (pod, from) = tcp_request(&client.ns, sa(&remote.ip4, 9376), "direct").expect("pod to pod");
    assert_eq!((pod.as_str(), from.rsplit_once(':').unwrap().0), ("web-2a", client.ip4.as_str()));
    // The external client reaches a service of the node itself (ssh-like).
    let listener = in_ns(&c.nodes[0].ns, || std::net::TcpListener::bind("0.0.0.0:2222")).unwrap();
    let server = thread::spawn(move || {
        use std::io::Write as _;
        let (mut s, peer) = listener.accept().unwrap();
        writeln!(s, "hello {peer}").unwrap();
    });
    let s =
        in_ns(&c.external, || std::net::TcpStream::connect_timeout(&sa(&node_addr4(1), 2222), Duration::from_secs(3)))
            .expect("node's own port");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    assert!(line.starts_with(&format!("hello {EXTERNAL4}:")), "{line}");
    server.join().unwrap();
    let verdicts = c.dump(1, &["-o", "json", "stats"]);
    let v: serde_json::Value = serde_json::from_str(&verdicts).unwrap();
    assert!(v["verdicts"]["pass"].as_u64().unwrap() > 0, "non-service packets were passed: {v:#}");
}

/// "should work after the service has been recreated" / "should work after
/// restarting kube-proxy": the agent restarts in the middle of a streaming
/// connection; the connection survives and new connections still balance.
#[test]
fn agent_restart_mid_stream() {
    let mut c = two_nodes(&[WEB], &[]);
    let mut streams: Vec<Stream> =
        (0..6).map(|_| Stream::open(&c.pod("client").ns, sa("10.96.0.10", 80)).expect("open stream")).collect();
    for s in &mut streams {
        s.tick().unwrap();
    }
    c.stop_agent(1);
    thread::sleep(Duration::from_millis(500));
    for s in &mut streams {
        s.tick().expect("alive without an agent");
    }
    c.start_agent(1, &[]);
    for s in &mut streams {
        s.tick().expect("alive after the restart");
    }
    let answers = pods_answering(&c.pod("client").ns, sa("10.96.0.10", 80), 30);
    assert_eq!(spread(&answers).len(), 2, "{:?}", spread(&answers));
}

#[test]
#[ignore = "debugging aid: keeps a cluster up for 5 minutes"]
fn hold_cluster() {
    let c = two_nodes(&[WEB], &[]);
    eprintln!(
        "fabric {} external {} nodes {:?} pods {:?}",
        c.fabric.name,
        c.external.name,
        c.nodes.iter().map(|n| n.ns.name.clone()).collect::<Vec<_>>(),
        c.pods.iter().map(|p| (p.name.clone(), p.ns.name.clone())).collect::<Vec<_>>()
    );
    thread::sleep(Duration::from_secs(300));
}

/// "should be possible to connect to a service via ExternalIP when the
/// external IP is not assigned to a node" and loadbalancer.go "should be
/// able to create LoadBalancer Service without NodePort": the LoadBalancer
/// ingress IP and an externalIP, reached from outside through node-1.
#[test]
fn load_balancer_ip_and_external_ip_from_outside() {
    let lb = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.0.30
  selector: {app: web}
  externalIPs: [80.11.12.30]
  ports: [{name: http, port: 8765, targetPort: 9376}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.30}]}}
"#;
    let c = two_nodes(&[lb], &[]);
    for vip in ["198.51.100.30", "80.11.12.30"] {
        let answers = pods_answering(&c.external, sa(vip, 8765), 24);
        assert_eq!(spread(&answers).len(), 2, "{vip}: {:?}", spread(&answers));
    }
    // No NodePort was allocated, so none is programmed.
    let svcs: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "services"])).unwrap();
    assert!(svcs.as_array().unwrap().iter().all(|f| f["kind"] != "NodePort"), "{svcs:#}");
}

/// "should serve multiport endpoints from pods": two ports, one with a
/// named targetPort resolved through the EndpointSlice.
#[test]
fn multi_port_with_a_named_target_port() {
    let mp = r#"
apiVersion: v1
kind: Service
metadata: {name: mp, namespace: demo}
spec:
  clusterIP: 10.96.0.40
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 81, targetPort: metrics}
"#;
    let c = two_nodes(&[mp], &[]);
    let client = &c.pod("client").ns;
    for (port, want) in [(80, 9376), (81, 9377)] {
        for i in 0..6 {
            let (_, _, served) = tcp_request_port(client, sa("10.96.0.40", port), &format!("p{i}")).unwrap();
            assert_eq!(served, want, "service port {port} → target port {want}");
        }
    }
}

/// ESIPP suite (service.go, "[sig-network] ESIPP"): "should work for
/// type=LoadBalancer" / "type=NodePort" (the backend sees the client's
/// address), "should only target nodes with endpoints" (a node without one
/// drops: kube-proxy's DROP "has no local endpoints", so the client
/// retransmits while the load balancer's health check catches up; not a
/// REJECT), and "should work from pods": a pod on a node without a local
/// endpoint reaching the LoadBalancer IP or its own node's NodePort gets the
/// Cluster endpoints with its own address kept (kube-proxy's "pod traffic
/// for external destinations"). Plus the healthCheckNodePort: 200 on the
/// node with the endpoint, 503 on the other.
#[test]
fn external_traffic_policy_local() {
    let local = r#"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: demo}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  clusterIP: 10.96.0.50
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 9376, nodePort: 30050}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}
"#;
    let mut c = two_nodes(&[local], &[]);
    // The only endpoint is web-2a, on node-2; the client pod is on node-1.
    c.set_pod_state("web-1a", PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(2);
    for i in 0..10 {
        let (pod, from) = tcp_request(&c.external, sa(&node_addr4(2), 30050), &format!("l{i}")).unwrap();
        assert_eq!(pod, "web-2a");
        assert_eq!(from.rsplit_once(':').unwrap().0, EXTERNAL4, "no SNAT under Local: the real client");
    }
    // node-1 has no local endpoint: its NodePort and the LoadBalancer IP
    // (routed to node-1) drop, without forwarding or refusing.
    for to in [sa(&node_addr4(1), 30050), sa("198.51.100.50", 80)] {
        assert!(unanswered(&c.external, to), "{to}: node-1 must drop, not forward or refuse");
    }
    let v: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "stats"])).unwrap();
    assert!(v["verdicts"]["no_local_endpoint_drop"].as_u64().unwrap() >= 2, "{:#}", v["verdicts"]);
    assert_eq!(v["verdicts"]["no_backend_reject"].as_u64().unwrap(), 0, "{:#}", v["verdicts"]);
    let (code, body) = http_get(&c.external, sa(&node_addr4(2), 32100), "/");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1, "{body}");
    let (code, body) = http_get(&c.external, sa(&node_addr4(1), 32100), "/");
    assert_eq!(code, 503, "{body}");
    // networking.go "should check kube-proxy urls": the proxy's own health
    // port answers on every node (what a Cluster-policy load balancer probes).
    for node in [1, 2] {
        for to in [sa(&node_addr4(node), 10256), sa(&node_addr6(node), 10256)] {
            let (code, body) = http_get(&c.external, to, "/healthz");
            assert_eq!(code, 200, "{to}: {body}");
        }
    }
    // "should work from pods": the Cluster endpoints, the pod's own address.
    let client = c.pod("client");
    for to in [sa("198.51.100.50", 80), sa(&node_addr4(1), 30050), sa("10.96.0.50", 80)] {
        let (pod, from) = tcp_request(&client.ns, to, "p").unwrap_or_else(|e| panic!("{to} from a pod: {e}"));
        assert_eq!(pod, "web-2a", "{to}");
        assert_eq!(from.rsplit_once(':').unwrap().0, client.ip4, "{to}: the pod's own address");
    }
}

/// traffic_distribution.go "should route traffic to an endpoint in the same
/// zone when using PreferClose": node-1 in zone-a, node-2 in zone-b, one
/// backend in each. A pod in zone-a and an external client entering at
/// either node's NodePort reach only their zone's backend; once zone-a has
/// none, zone-a's traffic goes to zone-b (kube-proxy's fallback: no hint
/// for this zone, no topology). With `--manifests` no EndpointSlice
/// controller writes the hints, so the agent derives them from the
/// endpoints' zones, as the controller would.
#[test]
fn traffic_distribution_prefer_close_stays_in_the_zone() {
    let svc = WEB.replace("  selector: {app: web}", "  selector: {app: web}\n  trafficDistribution: PreferClose");
    let mut c = Cluster::new(2, &[9376]);
    c.zones = vec!["zone-a".into(), "zone-b".into()];
    c.add_pod("web-1a", 1, "web");
    c.add_pod("web-2a", 2, "web");
    c.add_pod("client", 1, "");
    c.add_services(&svc);
    c.write_manifests(&[]);
    c.start_agents(&[]);
    let client = c.pod("client").ns.name.clone();
    let from_pod = |c: &Cluster, n| pods_answering(&c.pod("client").ns, sa("10.96.0.10", 80), n);
    assert!(from_pod(&c, 12).iter().all(|p| p == "web-1a"), "{client}: zone-a's backend only");
    let answers = pods_answering(&c.external, sa(&node_addr4(2), 30036), 12);
    assert!(answers.iter().all(|p| p == "web-2a"), "entering in zone-b: {answers:?}");
    let answers = pods_answering(&c.external, sa(&node_addr4(1), 30036), 12);
    assert!(answers.iter().all(|p| p == "web-1a"), "entering in zone-a: {answers:?}");
    // zone-a loses its backend: its traffic crosses to zone-b.
    c.set_pod_state("web-1a", PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(2);
    assert!(from_pod(&c, 6).iter().all(|p| p == "web-2a"), "fallback to the other zone");
}

/// loadbalancer.go "should only allow access from service loadbalancer
/// source ranges": a source inside loadBalancerSourceRanges connects, one
/// outside is dropped; widening the ranges lets it in.
#[test]
fn load_balancer_source_ranges() {
    let svc = |ranges: &str| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: lbsr, namespace: demo}}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.0.60
  selector: {{app: web}}
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{name: http, port: 80, targetPort: 9376}}]
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.60}}]}}}}
"#
        )
    };
    let mut c = Cluster::new(2, &[9376]);
    c.add_pod("web-1a", 1, "web");
    c.add_pod("client", 1, "");
    c.add_services(&svc("10.244.0.0/16"));
    c.write_manifests(&[]);
    c.start_agents(&[]);
    let to = sa("198.51.100.60", 80);
    assert!(tcp_request(&c.pod("client").ns, to, "in range").is_ok(), "a pod inside the range connects");
    let err = tcp_request(&c.external, to, "out of range").expect_err("outside the range");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "dropped, as the cloud LB would: {err}");
    let stats: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "stats"])).unwrap();
    assert!(stats["verdicts"]["source_range_drop"].as_u64().unwrap() > 0, "{stats:#}");

    c.set_services(&[&svc(&format!("10.244.0.0/16, {EXTERNAL4}/32"))]);
    c.write_manifests(&[]);
    c.wait_synced(2);
    assert!(tcp_request(&c.external, to, "now allowed").is_ok());
}

/// kube-proxy's terminating-endpoint handling (KEP-1669; e2e "should
/// fallback to terminating endpoints when there are no ready endpoints"
/// and "should not be able to connect to terminating and unready
/// endpoints"): a terminating backend keeps its established connections,
/// new connections go to the ready one.
#[test]
fn terminating_endpoint_keeps_its_connections() {
    let mut c = two_nodes(&[WEB], &[]);
    let mut streams: Vec<Stream> =
        (0..12).map(|_| Stream::open(&c.pod("client").ns, sa("10.96.0.10", 80)).expect("stream")).collect();
    let on_2a = streams.iter().filter(|s| s.pod == "web-2a").count();
    assert!(on_2a > 0, "some streams on web-2a");
    c.set_pod_state("web-2a", PodState::Terminating);
    c.write_manifests(&[]);
    c.wait_synced(2);
    for _ in 0..3 {
        for s in &mut streams {
            s.tick().unwrap_or_else(|e| panic!("stream on {} broke: {e}", s.pod));
        }
    }
    let answers = pods_answering(&c.pod("client").ns, sa("10.96.0.10", 80), 20);
    assert_eq!(spread(&answers).keys().collect::<Vec<_>>(), ["web-1a"], "new connections avoid the terminating pod");
    let backends: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "backends"])).unwrap();
    let b = backends.as_array().unwrap().iter().find(|b| b["backend"] == "10.244.2.10:9376").expect("still known");
    assert_eq!(b["state"], "terminating");
}

/// Endpoint churn while 50 long-lived connections stream (the TCP analogue
/// of conntrack.go "should be able to preserve UDP traffic when server pod
/// cycles"): pods are added and one is removed; no connection to a
/// surviving backend breaks.
#[test]
fn endpoint_churn_keeps_connections_to_surviving_backends() {
    let mut c = Cluster::new(2, &[9376]);
    for (name, node) in [("web-1a", 1), ("web-1b", 1), ("web-2a", 2), ("web-2b", 2)] {
        c.add_pod(name, node, "web");
    }
    c.add_pod("client", 1, "");
    c.add_services(WEB);
    c.write_manifests(&[]);
    c.start_agents(&[]);
    let mut streams: Vec<Stream> =
        (0..50).map(|_| Stream::open(&c.pod("client").ns, sa("10.96.0.10", 80)).expect("stream")).collect();
    // Scale up by two pods, then remove web-1b.
    c.add_pod("web-1c", 1, "web");
    c.add_pod("web-2c", 2, "web");
    c.write_manifests(&[]);
    c.wait_synced(2);
    c.set_pod_state("web-1b", PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(3);
    let mut kept = 0;
    for s in streams.iter_mut().filter(|s| s.pod != "web-1b") {
        for _ in 0..3 {
            s.tick().unwrap_or_else(|e| panic!("stream on surviving {} broke: {e}", s.pod));
        }
        kept += 1;
    }
    assert!(kept >= 30, "{kept} of 50 streams were on surviving backends");
    let answers = pods_answering(&c.pod("client").ns, sa("10.96.0.10", 80), 60);
    let s = spread(&answers);
    assert!(s.contains_key("web-1c") && s.contains_key("web-2c") && !s.contains_key("web-1b"), "{s:?}");
}

/// Balance of new connections, per scheduler (the proxy side of
/// "should be able to up and down services"): within ±10 % of even.
/// Round-robin: 1,000 connections. Maglev hashes each flow, so its spread
/// over N flows has binomial noise (σ ≈ 14 of 250 at 1,000): 4,000
/// connections keep ±10 % a 3.6 σ bound instead of a coin flip.
#[test]
fn schedulers_balance_new_connections() {
    let rr = WEB.replace(
        "metadata: {name: web, namespace: demo}",
        "metadata: {name: web, namespace: demo, annotations: {xlb.io/scheduler: round-robin}}",
    );
    for (svc, n) in [(rr.as_str(), 1000usize), (WEB, 4000)] {
        let mut c = Cluster::new(2, &[9376]);
        for (name, node) in [("web-1a", 1), ("web-1b", 1), ("web-2a", 2), ("web-2b", 2)] {
            c.add_pod(name, node, "web");
        }
        c.add_pod("client", 1, "");
        c.add_services(svc);
        c.write_manifests(&[]);
        c.start_agents(&[]);
        let answers = pods_answering(&c.pod("client").ns, sa("10.96.0.10", 80), n);
        let s = spread(&answers);
        let even = n as f64 / 4.0;
        eprintln!("{n} connections: {s:?}");
        assert_eq!(s.len(), 4, "{s:?}");
        for (pod, k) in &s {
            let dev = (*k as f64 - even).abs() / even;
            assert!(dev <= 0.10, "{pod}: {k} of {n} is {:.1} % off even ({s:?})", dev * 100.0);
        }
    }
}
