// SPDX-License-Identifier: MIT OR Apache-2.0
//! The benchmark's Services, as every system gets them: N LoadBalancer
//! Services (UDP port 80, externalTrafficPolicy Local, two endpoints on
//! this node), as Kubernetes objects for xlb and as the rules kube-proxy
//! writes for them in iptables mode (`iptables-restore` input) and in
//! nftables mode (`nft -f` input).
//!
//! The traffic goes to the *last* service's load-balancer IP: the worst
//! case for a linear rule walk, and any case for a hash lookup. Its two
//! endpoints live in the backend namespace; the others' endpoints are
//! addresses nothing answers for (no traffic goes to them).
//!
//! The rule texts follow kube-proxy's proxier (pkg/proxy/iptables and
//! pkg/proxy/nftables) chain by chain: KUBE-SERVICES → KUBE-EXT → KUBE-SVL
//! → KUBE-SEP with `statistic random`, and the `service-ips` verdict map
//! with `numgen random` endpoint maps. The chain-name hashes differ from
//! kube-proxy's (they only need to be unique here).

use std::{
    fmt::Write as _,
    hash::{Hash, Hasher},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Pod CIDR of the pretend cluster (kube-proxy's --cluster-cidr).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NODE: &str = "bench-node";
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The target service's endpoints: addresses of the backend namespace.
pub const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 98, 0, 2), Ipv4Addr::new(10, 98, 0, 3)];

/// Service `i` of `n` (0-based; `n - 1` is the target).
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub lb_ip: Ipv4Addr,
    pub endpoints: [Ipv4Addr; 2],
}

fn nth(base: [u8; 4], i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes(base) + i)
}

pub fn services(n: u32) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            name: format!("svc-{i}"),
            // 10.96.0.0/12 and 198.18.0.0/15 hold 1 M and 128 Ki addresses.
            cluster_ip: nth([10, 96, 0, 10], i),
            lb_ip: nth([198, 18, 0, 10], i),
            endpoints: if i + 1 == n { BACKENDS } else { [nth([10, 128, 0, 0], 2 * i), nth([10, 128, 0, 1], 2 * i)] },
        })
        .collect()
}

/// The load-balancer IP the traffic goes to.
pub fn target(n: u32) -> Ipv4Addr {
    nth([198, 18, 0, 10], n - 1)
}

/// The Kubernetes objects of the services, shared as a source's snapshot holds them.
pub fn objects(svcs: &[Svc]) -> (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>) {
    let services = svcs
        .iter()
        .map(|s| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": s.name, "namespace": "bench", "resourceVersion": "1"},
                "spec": {
                    "type": "LoadBalancer", "clusterIP": s.cluster_ip.to_string(), "clusterIPs": [s.cluster_ip.to_string()],
                    "externalTrafficPolicy": "Local", "allocateLoadBalancerNodePorts": false,
                    "ports": [{"name": "p80", "protocol": "UDP", "port": PORT, "targetPort": TARGET_PORT}],
                },
                "status": {"loadBalancer": {"ingress": [{"ip": s.lb_ip.to_string()}]}},
            }))
            .expect("a valid Service")
        })
        .collect();
    let slices = svcs.iter().map(|s| Arc::new(slice(s, &s.endpoints, 1))).collect();
    (services, slices)
}

/// The same Services with a TCP port (the east-west connection runs).
pub fn objects_tcp(svcs: &[Svc]) -> (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>) {
    let (services, slices) = objects(svcs);
    let tcp = |v: serde_json::Value| as_tcp(&v.to_string());
    let services = services
        .iter()
        .map(|s| Arc::new(serde_json::from_str(&tcp(serde_json::to_value(&**s).unwrap())).unwrap()))
        .collect();
    let slices = slices
        .iter()
        .map(|s| Arc::new(serde_json::from_str(&tcp(serde_json::to_value(&**s).unwrap())).unwrap()))
        .collect();
    (services, slices)
}

/// Rules or objects written for the UDP services, for TCP services
/// instead: kube-proxy writes the same chains with the protocol's name
/// (`-p tcp -m tcp`, `tcp dport`, `. tcp .`, the chain hashes' input).
pub fn as_tcp(text: &str) -> String {
    text.replace("udp", "tcp").replace("UDP", "TCP")
}

/// The EndpointSlice of `s` with `endpoints`, at `version`.
pub fn slice(s: &Svc, endpoints: &[Ipv4Addr], version: u32) -> EndpointSlice {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|a| serde_json::json!({"addresses": [a.to_string()], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{}-abcde", s.name), "namespace": "bench", "resourceVersion": version.to_string(),
            "labels": {"kubernetes.io/service-name": s.name},
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "p80", "protocol": "UDP", "port": TARGET_PORT}],
    }))
    .expect("a valid EndpointSlice")
}

/// A 16-character chain-name hash (kube-proxy: base32 of SHA-256).
fn hash16(parts: &[&str]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    let a = h.finish();
    parts.len().hash(&mut h);
    format!("{:016X}", a ^ h.finish().rotate_left(17)).chars().take(16).collect()
}

fn port_name(s: &Svc) -> String {
    format!("bench/{}:p80", s.name)
}

fn svc_chain(prefix: &str, s: &Svc) -> String {
    format!("{prefix}-{}", hash16(&[&port_name(s), "udp"]))
}

fn sep_chain(s: &Svc, ep: Ipv4Addr) -> String {
    format!("KUBE-SEP-{}", hash16(&[&port_name(s), "udp", &format!("{ep}:{TARGET_PORT}")]))
}

/// The per-service chains of iptables mode (declarations, rules).
fn iptables_service(s: &Svc, endpoints: &[Ipv4Addr], chains: &mut String, rules: &mut String) {
    let pn = port_name(s);
    let (svc, ext, svl) = (svc_chain("KUBE-SVC", s), svc_chain("KUBE-EXT", s), svc_chain("KUBE-SVL", s));
    for c in [&svc, &ext, &svl] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A {svc} -m comment --comment \"{pn} cluster IP\" -m udp -p udp -d {ip}/32 --dport {PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        ip = s.cluster_ip
    );
    for chain in [&svc, &svl] {
        for (k, ep) in endpoints.iter().enumerate() {
            let left = endpoints.len() - k;
            let stat = if left > 1 {
                format!(" -m statistic --mode random --probability {:.10}", 1.0 / left as f64)
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {chain} -m comment --comment \"{pn} -> {ep}:{TARGET_PORT}\"{stat} -j {}",
                sep_chain(s, *ep)
            );
        }
    }
    let _ = writeln!(
        rules,
        "-A {ext} -m comment --comment \"pod traffic for {pn} external destinations\" -s {CLUSTER_CIDR} -j {svc}"
    );
    let _ = writeln!(
        rules,
        "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {pn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(
        rules,
        "-A {ext} -m comment --comment \"route LOCAL traffic for {pn} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
    );
    let _ = writeln!(rules, "-A {ext} -j {svl}");
    for ep in endpoints {
        let sep = sep_chain(s, *ep);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let _ = writeln!(rules, "-A {sep} -m comment --comment {pn} -s {ep}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {pn} -m udp -p udp -j DNAT --to-destination {ep}:{TARGET_PORT}"
        );
    }
}

/// kube-proxy's KUBE-SERVICES rules for `s`.
fn iptables_dispatch(s: &Svc, out: &mut String) {
    let pn = port_name(s);
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{pn} cluster IP\" -m udp -p udp -d {}/32 --dport {PORT} -j {}",
        s.cluster_ip,
        svc_chain("KUBE-SVC", s)
    );
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{pn} loadbalancer IP\" -m udp -p udp -d {}/32 --dport {PORT} -j {}",
        s.lb_ip,
        svc_chain("KUBE-EXT", s)
    );
}

const NODEPORTS_LAST: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// A complete `iptables-restore` input: what kube-proxy's full sync writes
/// (plus the jumps from the built-in chains it installs separately).
pub fn iptables_full(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 1500 + 4096);
    out.push_str(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    out.push_str(&iptables_nat(svcs, svcs, true));
    out
}

/// The nat table: every service's KUBE-SERVICES rules, plus the chains of
/// `changed` (all of them on a full sync). With `base`, the built-in chains
/// and the masquerade chains too.
fn iptables_nat(all: &[Svc], changed: &[Svc], base: bool) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n");
    if base {
        chains.push_str(
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
        );
        rules.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
        );
    }
    chains.push_str(
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for s in all {
        iptables_dispatch(s, &mut rules);
    }
    rules.push_str(NODEPORTS_LAST);
    for s in changed {
        iptables_service(s, &s.endpoints, &mut chains, &mut rules);
    }
    chains + &rules + "COMMIT\n"
}

/// One endpoint of `svcs[idx]` replaced by `new_ep`, as kube-proxy's
/// partial sync writes it (`iptables-restore --noflush`): the whole
/// KUBE-SERVICES chain, the changed service's chains, the new KUBE-SEP
/// chain, and the old one deleted.
pub fn iptables_endpoint_change(svcs: &[Svc], idx: usize, new_ep: Ipv4Addr) -> String {
    let old = &svcs[idx];
    let mut moved = old.clone();
    moved.endpoints[1] = new_ep;
    let nat = iptables_nat(svcs, std::slice::from_ref(&moved), false);
    // Declaring a chain flushes it: the old KUBE-SEP chain is emptied
    // there, then deleted, as kube-proxy does.
    let gone = sep_chain(old, old.endpoints[1]);
    nat.replacen("*nat\n", &format!("*nat\n:{gone} - [0:0]\n"), 1).replace("COMMIT\n", &format!("-X {gone}\nCOMMIT\n"))
}

fn nft_service_chain(s: &Svc) -> String {
    format!("service-{}-bench/{}/udp/p80", &hash16(&[&port_name(s), "udp"])[..8], s.name)
}

fn nft_external_chain(s: &Svc) -> String {
    format!("external-{}-bench/{}/udp/p80", &hash16(&[&port_name(s), "udp"])[..8], s.name)
}

fn nft_endpoint_chain(s: &Svc, ep: Ipv4Addr) -> String {
    format!(
        "endpoint-{}-bench/{}/udp/p80__{ep}/{TARGET_PORT}",
        &hash16(&[&port_name(s), "udp", &ep.to_string()])[..8],
        s.name
    )
}

/// The chains of one service in nftables mode (into `out`), and its
/// `service-ips` elements (into `elements`).
fn nft_service(s: &Svc, out: &mut String, elements: &mut Vec<String>) {
    let (svc, ext) = (nft_service_chain(s), nft_external_chain(s));
    let t = "ip kube-proxy";
    // Every chain first: a rule may only jump to a chain that exists.
    for c in [svc.clone(), ext.clone()].into_iter().chain(s.endpoints.iter().map(|ep| nft_endpoint_chain(s, *ep))) {
        let _ = writeln!(out, "add chain {t} {c}\nflush chain {t} {c}");
    }
    let _ = writeln!(
        out,
        "add rule {t} {svc} ip daddr {} udp dport {PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.cluster_ip
    );
    let eps: Vec<String> =
        s.endpoints.iter().enumerate().map(|(k, ep)| format!("{k} : goto {}", nft_endpoint_chain(s, *ep))).collect();
    let _ = writeln!(out, "add rule {t} {svc} numgen random mod {} vmap {{ {} }}", eps.len(), eps.join(" , "));
    let _ = writeln!(out, "add rule {t} {ext} ip saddr {CLUSTER_CIDR} goto {svc}");
    let _ = writeln!(out, "add rule {t} {ext} fib saddr type local jump mark-for-masquerade");
    let _ = writeln!(out, "add rule {t} {ext} fib saddr type local goto {svc}");
    let _ = writeln!(out, "add rule {t} {ext} goto {svc}");
    for ep in &s.endpoints {
        let c = nft_endpoint_chain(s, *ep);
        let _ = writeln!(out, "add rule {t} {c} ip saddr {ep} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {t} {c} meta l4proto udp dnat to {ep}:{TARGET_PORT}");
    }
    elements.push(format!("{} . udp . {PORT} : goto {svc}", s.cluster_ip));
    elements.push(format!("{} . udp . {PORT} : goto {ext}", s.lb_ip));
}

/// A complete `nft -f` input: kube-proxy's nftables-mode table.
pub fn nft_full(svcs: &[Svc]) -> String {
    let t = "ip kube-proxy";
    let mut out = String::with_capacity(svcs.len() * 1500 + 4096);
    let _ = write!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add chain {t} services\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state invalid drop\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n"
    );
    let mut elements = Vec::with_capacity(svcs.len() * 2);
    for s in svcs {
        nft_service(s, &mut out, &mut elements);
    }
    for chunk in elements.chunks(1000) {
        let _ = writeln!(out, "add element {t} service-ips {{ {} }}", chunk.join(" , "));
    }
    out
}

/// One endpoint of `svcs[idx]` replaced, as kube-proxy's nftables mode
/// writes it: the service's chains rewritten, the new endpoint chain added,
/// the old one deleted, in one transaction.
pub fn nft_endpoint_change(svcs: &[Svc], idx: usize, new_ep: Ipv4Addr) -> String {
    let old = &svcs[idx];
    let mut moved = old.clone();
    moved.endpoints[1] = new_ep;
    let mut out = String::new();
    let mut elements = Vec::new();
    nft_service(&moved, &mut out, &mut elements);
    let gone = nft_endpoint_chain(old, old.endpoints[1]);
    let _ = writeln!(out, "flush chain ip kube-proxy {gone}\ndelete chain ip kube-proxy {gone}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_the_last_service() {
        let s = services(3);
        assert_eq!(s[2].lb_ip, target(3));
        assert_eq!(s[2].endpoints, BACKENDS);
        assert_ne!(s[0].endpoints, BACKENDS);
    }

    #[test]
    fn rule_counts_grow_like_kube_proxy() {
        let one = iptables_full(&services(1));
        let ten = iptables_full(&services(10));
        // 2 KUBE-SERVICES rules, 1 masquerade + 2 + 2 statistic jumps, 4 KUBE-EXT, 2 × 2 KUBE-SEP per service.
        let per = (ten.lines().filter(|l| l.starts_with("-A")).count()
            - one.lines().filter(|l| l.starts_with("-A")).count())
            / 9;
        assert_eq!(per, 2 + 5 + 4 + 4);
    }
}
