// SPDX-License-Identifier: MIT OR Apache-2.0
//! `type: LoadBalancer` on bare metal (issue #15) on the two-node netns
//! cluster, agents from `--manifests`: addresses from a
//! LoadBalancerIPPool on the underlay's own subnet, so the external client
//! has **no route** to them but its on-link one and must resolve each by
//! ARP or NDP, answered from XDP by exactly one node; two Services sharing
//! one address (TCP 53 and UDP 53, MetalLB's `allow-shared-ip` case);
//! `mode: NodeIPs` giving the nodes' own addresses (k3s ServiceLB).

use bpf_tests::cluster::*;

const NODE_IPS_POOL: &str = r#"
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: a-nodes}
spec:
  mode: NodeIPs
  serviceSelector: {matchLabels: {lb: node-ips}}
"#;

fn dns(proto: &str, created: &str, cluster_ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: dns-{p}, namespace: demo, creationTimestamp: "{created}", annotations: {{xlb.io/sharing-key: dns}}}}
spec:
  type: LoadBalancer
  clusterIP: {cluster_ip}
  selector: {{app: web}}
  ports: [{{name: dns, port: 53, protocol: {proto}, targetPort: 5353, nodePort: {np}}}]
"#,
        p = proto.to_lowercase(),
        np = if proto == "TCP" { 30053 } else { 30054 }
    )
}

const NODE_IPS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: svclb, namespace: demo, labels: {lb: node-ips}, creationTimestamp: "2026-01-03T00:00:00Z"}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  selector: {app: web}
  ports: [{name: http, port: 8088, targetPort: 9376, nodePort: 30088}]
"#;

fn cluster() -> Cluster {
    let mut c = Cluster::new(2, &[9376, 5353]);
    c.add_pod("web-1a", 1, "web");
    c.add_pod("web-2a", 2, "web");
    for s in [
        lb::UNDERLAY_POOL,
        NODE_IPS_POOL,
        lb::WEB,
        &dns("TCP", "2026-01-02T00:00:00Z", "10.96.0.53"),
        &dns("UDP", "2026-01-02T00:00:01Z", "10.96.0.54"),
        NODE_IPS,
    ] {
        c.add_services(s);
    }
    c.write_manifests(&[]);
    c.start_agents(&[]);
    c
}

/// The external client's neighbour entry for `addr` (its MAC), after use.
fn neighbour(c: &Cluster, addr: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .args([&format!("--net=/var/run/netns/{}", c.external.name), "ip", "neigh", "show", addr])
        .output()
        .expect("ip neigh");
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).unwrap_or_default().to_string()
}

fn eth0_mac(c: &Cluster, node: usize) -> String {
    c.nodes[node - 1].ns.mac("eth0")
}

/// A LoadBalancer Service gets the pool's first addresses of both families;
/// the external client, with only its on-link route, resolves each by ARP
/// / NDP to one node's MAC and connects to both backends through it; that
/// node alone answered (the other's counters stay 0).
#[test]
fn a_pool_address_on_the_underlay_is_reachable_by_arp_and_ndp() {
    let c = cluster();
    let services: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "services"])).unwrap();
    let lb: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["service"] == "demo/web:http" && f["kind"] == "LoadBalancer")
        .map(|f| f["address"].as_str().unwrap())
        .collect();
    assert_eq!(lb, ["192.168.60.100", "fd60::100"], "{services:#}");
    for addr in ["192.168.60.100", "fd60::100"] {
        let mut pods = Vec::new();
        for i in 0..16 {
            let (pod, _) =
                tcp_request(&c.external, sa(addr, 80), &format!("r{i}")).unwrap_or_else(|e| panic!("{addr}: {e}"));
            pods.push(pod);
        }
        assert_eq!(spread(&pods).len(), 2, "{addr}: both backends, {:?}", spread(&pods));
        let mac = neighbour(&c, addr);
        let owners: Vec<usize> = (1..=2).filter(|n| eth0_mac(&c, *n) == mac).collect();
        assert_eq!(owners.len(), 1, "{addr} resolved to {mac:?}, one node's eth0");
    }
    let v4_owner = (1..=2).find(|n| eth0_mac(&c, *n) == neighbour(&c, "192.168.60.100")).unwrap();
    assert!(c.verdict(v4_owner, "l2_arp_reply") > 0);
    assert_eq!(c.verdict(3 - v4_owner, "l2_arp_reply"), 0, "the other node never answered ARP");
}

/// Two Services with one sharing key, TCP 53 and UDP 53, share one address
/// (the pool's next), both reachable from outside.
#[test]
fn two_services_share_one_address_for_tcp_and_udp_53() {
    let c = cluster();
    let to = sa("192.168.60.101", 53);
    let (pod, _) = tcp_request(&c.external, to, "tcp").expect("TCP 53");
    let (pod2, _) = udp_request(&c.external, to, "udp").expect("UDP 53");
    assert!(pod.starts_with("web-") && pod2.starts_with("web-"));
}

/// `mode: NodeIPs`: the Service's ingress addresses are the nodes' own, and
/// the external client reaches it on each node's address.
#[test]
fn node_ips_mode_uses_the_nodes_addresses() {
    let c = cluster();
    for n in 1..=2 {
        let (pod, _) =
            tcp_request(&c.external, sa(&node_addr4(n), 8088), "n").unwrap_or_else(|e| panic!("node {n}: {e}"));
        assert!(pod.starts_with("web-"));
    }
}
