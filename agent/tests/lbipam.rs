// SPDX-License-Identifier: MIT OR Apache-2.0
//! LoadBalancer address allocation (issue #15): pools, selection, requested
//! addresses, sharing, `NodeIPs`, the class, and — property-tested — that
//! an address is never handed out twice and never moves, over random
//! sequences of creates, deletes, pool changes and restarts. The state is
//! the Services' statuses, as the API server holds them (MetalLB's and
//! Cilium LB-IPAM's model).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Namespace, Node, Service, ServiceStatus};
use proptest::prelude::*;
use xlb::{
    lbipam::{self, Inputs, LoadBalancerIPPool, allocate},
    source::{Snapshot, files::parse_into},
};

fn objects(yaml: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "fixture", yaml);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    snap
}

fn run(snap: &Snapshot) -> lbipam::Allocation {
    allocate(&Inputs {
        services: &snap.services,
        pools: &snap.pools,
        namespaces: &snap.namespaces,
        nodes: &snap.nodes,
        previous: &BTreeMap::new(),
        lb_class: lbipam::DEFAULT_LB_CLASS,
    })
}

fn ips(a: &lbipam::Allocation, id: &str) -> Vec<String> {
    a.addresses.get(id).unwrap_or_else(|| panic!("{id} not allocated: {a:?}")).iter().map(|a| a.to_string()).collect()
}

/// A LoadBalancer Service `ns/name` with `extra` metadata and spec lines.
fn lb(ns: &str, name: &str, meta: &str, spec: &str, created: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"{meta}}}\n\
         spec: {{type: LoadBalancer, ports: [{{port: 80}}]{spec}}}\n---\n"
    )
}

const POOLS: &str = r#"
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: a-public}
spec:
  blocks: [{cidr: 198.51.100.0/30}, {start: "2001:db8::10", stop: "2001:db8::11"}]
  serviceSelector: {matchLabels: {exposure: public}}
---
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: b-default}
spec:
  blocks: [{start: 203.0.113.5, stop: 203.0.113.6}]
---
"#;

/// The CRD in `manifests/` is the one the code defines (`xlb crd`).
#[test]
fn the_crd_manifest_is_generated_from_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crd-loadbalancerippool.yaml");
    let file = std::fs::read_to_string(path).unwrap();
    assert!(file == lbipam::crd_yaml(), "{path} is stale: regenerate it with `xlb crd > {path}`");
    let kustomization =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/kustomization.yaml"));
    assert!(kustomization.unwrap().contains("crd-loadbalancerippool.yaml"));
}

/// A /30 gives its two host addresses (network and broadcast left out);
/// the selector picks the pool; oldest first; a Service beyond the pool
/// stays pending with a problem; IPv6 ranges and dual-stack families
/// (in `ipFamilies` order).
#[test]
fn pools_hand_out_their_addresses_oldest_first() {
    let mut y = POOLS.to_string();
    for (i, name) in ["web", "api", "late"].iter().enumerate() {
        y += &lb("shop", name, ", labels: {exposure: public}", "", &format!("2026-01-0{}T00:00:00Z", i + 1));
    }
    y += &lb("shop", "plain", "", "", "2026-01-01T00:00:00Z");
    y += &lb("shop", "dual", "", ", ipFamilies: [IPv6, IPv4], ipFamilyPolicy: PreferDualStack", "2026-01-02T00:00:00Z");
    y += &lb(
        "shop",
        "dual-public",
        ", labels: {exposure: public}",
        ", ipFamilies: [IPv6, IPv4], ipFamilyPolicy: RequireDualStack",
        "2025-12-31T00:00:00Z",
    );
    let a = run(&objects(&y));
    assert_eq!(ips(&a, "shop/dual-public"), ["2001:db8::10", "198.51.100.1"]);
    assert_eq!(ips(&a, "shop/web"), ["198.51.100.2"]);
    assert_eq!(ips(&a, "shop/plain"), ["203.0.113.5"]);
    // a-public is full: api (as old as dual, first by name) falls through
    // to b-default, which selects every Service.
    assert_eq!(ips(&a, "shop/api"), ["203.0.113.6"]);
    assert!(ips(&a, "shop/late").is_empty() && ips(&a, "shop/dual").is_empty(), "{a:?}");
    assert!(a.problems.iter().any(|(s, m)| s == "shop/late" && m.contains("no free IPv4 address")), "{:?}", a.problems);
    // No pool of dual's has IPv6 left either: a problem per family.
    assert!(a.problems.iter().any(|(s, m)| s == "shop/dual" && m.starts_with("IPv6")));
    assert!(a.problems.iter().any(|(s, m)| s == "shop/dual" && m.starts_with("IPv4")));
}

/// Requested addresses (`xlb.io/lb-ips`, or `spec.loadBalancerIP`), a pool
/// named by `xlb.io/lb-pool`, another class left alone, a status address
/// outside every pool replaced (as MetalLB: another controller's Service
/// says so with its class), a disabled pool keeping what it gave and giving
/// nothing new.
#[test]
fn requests_pool_annotation_class_foreign_and_disabled() {
    let mut y = POOLS.replace("name: b-default}\nspec:", "name: b-default}\nspec:\n  disabled: false");
    y += &lb("t", "asks", ", annotations: {xlb.io/lb-ips: 203.0.113.6}", "", "2026-01-01T00:00:00Z");
    y += &lb("t", "legacy", "", ", loadBalancerIP: 203.0.113.5", "2026-01-02T00:00:00Z");
    y += &lb("t", "taken", ", annotations: {xlb.io/lb-ips: 203.0.113.6}", "", "2026-01-03T00:00:00Z");
    y += &lb("t", "outside", ", annotations: {xlb.io/lb-ips: 192.0.2.1}", "", "2026-01-04T00:00:00Z");
    y += &lb("t", "named", ", annotations: {xlb.io/lb-pool: a-public}", "", "2026-01-05T00:00:00Z");
    y += &lb("t", "other", "", ", loadBalancerClass: example.com/lb", "2026-01-06T00:00:00Z");
    let a = run(&objects(&y));
    assert_eq!(ips(&a, "t/asks"), ["203.0.113.6"]);
    assert_eq!(ips(&a, "t/legacy"), ["203.0.113.5"]);
    assert!(ips(&a, "t/taken").is_empty());
    assert!(a.problems.iter().any(|(s, m)| s == "t/taken" && m.contains("203.0.113.6 is in use by t/asks")));
    assert!(a.problems.iter().any(|(s, m)| s == "t/outside" && m.contains("in no pool")));
    // a-public selects exposure=public only: the annotation cannot widen it.
    assert!(ips(&a, "t/named").is_empty());
    assert!(!a.addresses.contains_key("t/other"), "another class is another controller's");

    // A status address in no pool goes; a disabled pool keeps its own and
    // gives nothing new.
    let mut snap = objects(
        &(POOLS.replace("spec:\n  blocks: [{start: 203", "spec:\n  disabled: true\n  blocks: [{start: 203")
            + &lb("t", "cloud", "", "", "2026-01-01T00:00:00Z")
            + &lb("t", "kept", "", "", "2026-01-02T00:00:00Z")
            + &lb("t", "new", "", "", "2026-01-03T00:00:00Z")),
    );
    set_status(&mut snap, "cloud", &["192.0.2.77"]);
    set_status(&mut snap, "kept", &["203.0.113.6"]);
    let a = run(&snap);
    assert!(ips(&a, "t/cloud").is_empty(), "{a:?}");
    assert_eq!(ips(&a, "t/kept"), ["203.0.113.6"]);
    assert!(ips(&a, "t/new").is_empty(), "a disabled pool gives nothing new");
}

fn set_status(snap: &mut Snapshot, name: &str, addrs: &[&str]) {
    for s in &mut snap.services {
        if s.metadata.name.as_deref() == Some(name) {
            let mut svc = (**s).clone();
            svc.status = Some(status(addrs.iter().map(|a| a.parse().unwrap())));
            *s = Arc::new(svc);
        }
    }
}

fn status(addrs: impl Iterator<Item = IpAddr>) -> ServiceStatus {
    let ingress = addrs.map(|a| LoadBalancerIngress { ip: Some(a.to_string()), ..Default::default() }).collect();
    ServiceStatus { load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress) }), ..Default::default() }
}

/// `xlb.io/sharing-key`: TCP 53 and UDP 53 share an address; a third with
/// TCP 53 again collides and stays pending (a problem); a different
/// externalTrafficPolicy does not share either.
#[test]
fn sharing_key_shares_when_ports_do_not_collide() {
    let dns = |name: &str, proto: &str, extra: &str, t: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d, creationTimestamp: \"{t}\", annotations: {{xlb.io/sharing-key: dns}}}}\n\
             spec: {{type: LoadBalancer, ports: [{{port: 53, protocol: {proto}}}]{extra}}}\n---\n"
        )
    };
    let y = POOLS.to_string()
        + &dns("tcp", "TCP", "", "2026-01-01T00:00:00Z")
        + &dns("udp", "UDP", "", "2026-01-02T00:00:00Z")
        + &dns("tcp-again", "TCP", "", "2026-01-03T00:00:00Z")
        + &dns("local", "SCTP", ", externalTrafficPolicy: Local", "2026-01-04T00:00:00Z");
    let a = run(&objects(&y));
    assert_eq!(ips(&a, "d/tcp"), ["203.0.113.5"]);
    assert_eq!(ips(&a, "d/udp"), ["203.0.113.5"], "shared");
    assert_eq!(ips(&a, "d/tcp-again"), ["203.0.113.6"], "a collision: the next free address instead");
    assert!(ips(&a, "d/local").is_empty(), "{a:?}");
    // Requested onto the shared address with a colliding port: a problem.
    let y = POOLS.to_string()
        + &dns("tcp", "TCP", "", "2026-01-01T00:00:00Z")
        + &dns("clash", "TCP", "", "2026-01-02T00:00:00Z")
            .replace("xlb.io/sharing-key: dns}", "xlb.io/sharing-key: dns, xlb.io/lb-ips: 203.0.113.5}");
    let a = run(&objects(&y));
    assert!(ips(&a, "d/clash").is_empty());
    assert!(a.problems.iter().any(|(s, m)| s == "d/clash" && m.contains("port 53/TCP")), "{:?}", a.problems);
}

/// `mode: NodeIPs` (k3s ServiceLB): the eligible nodes' ExternalIP, else
/// InternalIP, per family; `nodeSelector` narrows them; Services share
/// them when their ports do not collide.
#[test]
fn node_ips_mode_gives_the_nodes_addresses() {
    let node = |name: &str, labels: &str, addrs: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nstatus: {{addresses: [{addrs}]}}\n---\n"
        )
    };
    let y = r#"
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: nodes}
spec: {mode: NodeIPs, nodeSelector: {matchLabels: {lb: "yes"}}}
---
"#
    .to_string()
        + &node("n1", "lb: \"yes\"", "{type: InternalIP, address: 10.0.0.1}, {type: ExternalIP, address: 192.0.2.1}")
        + &node("n2", "lb: \"yes\"", "{type: InternalIP, address: 10.0.0.2}")
        + &node("n3", "", "{type: InternalIP, address: 10.0.0.3}")
        + &lb("k", "one", "", "", "2026-01-01T00:00:00Z")
        + &lb("k", "two", "", "", "2026-01-02T00:00:00Z").replace("port: 80", "port: 8080")
        + &lb("k", "three", "", "", "2026-01-03T00:00:00Z");
    let a = run(&objects(&y));
    assert_eq!(ips(&a, "k/one"), ["192.0.2.1", "10.0.0.2"]);
    assert_eq!(ips(&a, "k/two"), ["192.0.2.1", "10.0.0.2"]);
    assert!(ips(&a, "k/three").is_empty(), "port 80 is k/one's on those addresses");
}

/// A dual-stack Service asking for its IPv4 address only keeps the IPv6
/// address it holds; node addresses, externalIPs and another class's
/// addresses are never handed out; an IPv6 CIDR skips its subnet-router
/// anycast address; a /64 pool is not scanned address by address.
#[test]
fn partial_requests_reserved_addresses_and_large_pools() {
    let pool = r#"
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: p}
spec:
  blocks: [{start: 203.0.113.5, stop: 203.0.113.8}, {cidr: "2001:db8:7::/64"}]
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 203.0.113.5}]}
---
"#;
    let dual = ", ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack";
    let y = pool.to_string()
        + &lb("t", "dual", ", annotations: {xlb.io/lb-ips: 203.0.113.8}", dual, "2026-01-01T00:00:00Z")
        + &lb("t", "ext", "", ", externalIPs: [203.0.113.6]", "2026-01-02T00:00:00Z")
            .replace("type: LoadBalancer", "type: ClusterIP")
        + &lb("t", "theirs", "", ", loadBalancerClass: example.com/lb", "2026-01-03T00:00:00Z")
        + &lb("t", "mine", "", "", "2026-01-04T00:00:00Z");
    let mut snap = objects(&y);
    set_status(&mut snap, "dual", &["203.0.113.8", "2001:db8:7::9"]);
    set_status(&mut snap, "theirs", &["203.0.113.7"]);
    let a = run(&snap);
    assert_eq!(ips(&a, "t/dual"), ["203.0.113.8", "2001:db8:7::9"], "the IPv6 address is kept");
    assert!(ips(&a, "t/mine").is_empty(), ".5 is a node's, .6 an externalIP, .7 another class's: {a:?}");
    // Fresh: the /64's first address is skipped.
    let mut snap = objects(&y);
    set_status(&mut snap, "theirs", &["203.0.113.7"]);
    let started = std::time::Instant::now();
    let a = run(&snap);
    assert_eq!(ips(&a, "t/dual"), ["203.0.113.8", "2001:db8:7::1"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
}

/// `namespaceSelector` reads the Namespace's labels.
#[test]
fn namespace_selector() {
    let y = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: xlb.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: prod}
spec:
  blocks: [{cidr: 198.51.100.8/31}]
  namespaceSelector: {matchLabels: {env: prod}}
---
"#
    .to_string()
        + &lb("prod", "web", "", "", "2026-01-01T00:00:00Z")
        + &lb("dev", "web", "", "", "2026-01-01T00:00:00Z");
    let a = run(&objects(&y));
    assert_eq!(ips(&a, "prod/web"), ["198.51.100.8"], "a /31 has no network or broadcast address");
    assert!(ips(&a, "dev/web").is_empty());
}

/// `--manifests` mode: the snapshot's Services get their allocation as
/// their status (`ipMode: VIP`), which the translation turns into
/// LoadBalancer frontends; the next snapshot keeps the addresses even when
/// an older Service appears; with no pool, statuses are left alone.
#[test]
fn manifests_mode_allocates_into_the_snapshot() {
    let base = POOLS.to_string() + &lb("t", "b", "", "", "2026-01-02T00:00:00Z");
    let mut held = BTreeMap::new();
    let mut snap = objects(&base);
    lbipam::apply(&mut snap, &mut held, lbipam::DEFAULT_LB_CLASS);
    let st = snap.services[0].status.as_ref().unwrap().load_balancer.as_ref().unwrap().ingress.as_ref().unwrap();
    assert_eq!((st[0].ip.as_deref(), st[0].ip_mode.as_deref()), (Some("203.0.113.5"), Some("VIP")));
    let d = xlb::translate::translate(
        &snap.services,
        &snap.slices,
        &xlb::translate::NodeInfo::default(),
        &xlb::translate::Options::default(),
    );
    assert!(
        d.frontends.iter().any(|f| f.kind == xlb::translate::Kind::LoadBalancer
            && f.key.address == "203.0.113.5".parse::<IpAddr>().unwrap())
    );
    // An older Service arrives: the address stays with t/b.
    let mut snap = objects(&(base.clone() + &lb("t", "a", "", "", "2026-01-01T00:00:00Z")));
    lbipam::apply(&mut snap, &mut held, lbipam::DEFAULT_LB_CLASS);
    assert_eq!(held["t/b"], ["203.0.113.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(held["t/a"], ["203.0.113.6".parse::<IpAddr>().unwrap()]);
    let mut none = objects(&lb("t", "b", "", "", "2026-01-02T00:00:00Z"));
    lbipam::apply(&mut none, &mut BTreeMap::new(), lbipam::DEFAULT_LB_CLASS);
    assert!(none.services[0].status.is_none(), "no pool: nothing allocated");
}

// ---- property: never twice, never moved ----

#[derive(Clone, Debug)]
enum Op {
    /// Create Service `n` (one of 12 names) with a sharing key (one of 2,
    /// or none), port (one of 2) and protocol.
    Create {
        n: u8,
        key: Option<u8>,
        port: u8,
        udp: bool,
        dual: bool,
    },
    Delete {
        n: u8,
    },
    /// The pool's IPv4 range becomes .1–.`size`.
    Resize {
        size: u8,
    },
    /// The allocator restarts: only the statuses remain.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12, proptest::option::of(0u8..2), 0u8..2, any::<bool>(), any::<bool>())
            .prop_map(|(n, key, port, udp, dual)| Op::Create { n, key, port, udp, dual }),
        2 => (0u8..12).prop_map(|n| Op::Delete { n }),
        1 => (1u8..8).prop_map(|size| Op::Resize { size }),
        1 => Just(Op::Restart),
    ]
}

fn pool(size: u8) -> Arc<LoadBalancerIPPool> {
    let y = format!(
        "apiVersion: xlb.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: p}}\n\
         spec: {{blocks: [{{start: 10.9.0.1, stop: 10.9.0.{size}}}, {{start: \"fd09::1\", stop: \"fd09::3\"}}]}}\n"
    );
    objects(&y).pools.remove(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn an_address_is_never_held_twice_and_never_moves(ops in proptest::collection::vec(op(), 1..40)) {
        let mut services: BTreeMap<u8, Service> = BTreeMap::new();
        let mut size = 4u8;
        let mut previous = BTreeMap::new();
        let mut clock = 0u32;
        for op in ops {
            match op {
                Op::Create { n, key, port, udp, dual } => {
                    if services.contains_key(&n) { continue; }
                    clock += 1;
                    let ann = key.map(|k| format!(", annotations: {{xlb.io/sharing-key: k{k}}}")).unwrap_or_default();
                    let fam = if dual { ", ipFamilies: [IPv4, IPv6]" } else { "" };
                    let y = format!(
                        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: p, creationTimestamp: \"2026-01-01T00:{:02}:{:02}Z\"{ann}}}\n\
                         spec: {{type: LoadBalancer{fam}, ports: [{{port: {}, protocol: {}}}]}}\n",
                        clock / 60, clock % 60, 53 + port as i32, if udp { "UDP" } else { "TCP" }
                    );
                    services.insert(n, (*objects(&y).services.remove(0)).clone());
                }
                Op::Delete { n } => { services.remove(&n); }
                Op::Resize { size: s } => size = s,
                Op::Restart => previous = BTreeMap::new(),
            }
            let before: BTreeMap<String, Vec<IpAddr>> = services.values()
                .map(|s| (format!("p/{}", s.metadata.name.as_deref().unwrap()), lbipam::allocate::held_in_status(s)))
                .collect();
            let list: Vec<Arc<Service>> = services.values().cloned().map(Arc::new).collect();
            let pools = [pool(size)];
            let a = allocate(&Inputs {
                services: &list, pools: &pools, namespaces: &[] as &[Arc<Namespace>], nodes: &[] as &[Arc<Node>],
                previous: &previous, lb_class: lbipam::DEFAULT_LB_CLASS,
            });
            // Never twice: an address's holders all share a key, with distinct ports.
            let mut holders: BTreeMap<IpAddr, Vec<&Service>> = BTreeMap::new();
            for s in &list {
                let id = format!("p/{}", s.metadata.name.as_deref().unwrap());
                for addr in &a.addresses[&id] {
                    holders.entry(*addr).or_default().push(s);
                    // Inside the pool as it is now.
                    let last = if addr.is_ipv4() { size as u128 } else { 3 };
                    let low = match addr { IpAddr::V4(v) => (u32::from(*v) & 0xff) as u128, IpAddr::V6(v) => u128::from(*v) & 0xffff };
                    prop_assert!((1..=last).contains(&low), "{addr} outside the pool of size {size}");
                }
            }
            for (addr, hs) in &holders {
                if hs.len() > 1 {
                    let key = |s: &Service| s.metadata.annotations.as_ref().and_then(|a| a.get("xlb.io/sharing-key")).cloned();
                    prop_assert!(key(hs[0]).is_some() && hs.iter().all(|s| key(s) == key(hs[0])), "{addr} held by {} Services without one key", hs.len());
                    let ports: std::collections::BTreeSet<_> = hs.iter().map(|s| {
                        let p = &s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
                        (p.port, p.protocol.clone())
                    }).collect();
                    prop_assert_eq!(ports.len(), hs.len(), "{} shared with a port collision", addr);
                }
            }
            // Never moves: an address held before and still in the pool stays.
            for (id, old) in &before {
                for addr in old {
                    let low = match addr { IpAddr::V4(v) => (u32::from(*v) & 0xff) as u128, IpAddr::V6(v) => u128::from(*v) & 0xffff };
                    let still = if addr.is_ipv4() { low <= size as u128 } else { true };
                    if still {
                        prop_assert!(a.addresses[id].contains(addr), "{id} lost {addr}");
                    }
                }
            }
            // Write the statuses back, as the leader does.
            for s in services.values_mut() {
                let id = format!("p/{}", s.metadata.name.as_deref().unwrap());
                s.status = Some(status(a.addresses[&id].iter().copied()));
            }
            previous = a.addresses.clone();
        }
    }
}
