// SPDX-License-Identifier: MIT OR Apache-2.0
//! Translation properties over generated input (proptest): Services,
//! EndpointSlices and nodes with random types, ports, names, families,
//! conditions, hints, labels, duplicates and bad values.
//!
//! - it never panics;
//! - the output does not depend on the order of the input lists;
//! - `Translator::translate_shared`, through random sequences of edits (the
//!   fast path and the full one, versioned and unversioned objects, node and
//!   option changes), always equals a fresh `translate`;
//! - a Service that programs nothing is reported (a problem or a skip).
//!
//! A fixed budget of cases (`PROPTEST_CASES` overrides it); each test
//! prints how many it ran.

use std::{
    io::Write as _,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proptest::{option, prelude::*, sample::select};
use serde_json::{Value, json};
use xlb::translate::{Desired, NodeInfo, Options, Translator, translate};

/// Says how many cases a property ran (to stderr directly: libtest
/// captures only the print macros).
fn report(name: &str, cases: &AtomicUsize) {
    let _ = writeln!(
        std::io::stderr(),
        "{name}: {} generated cases, {} frontends translated",
        cases.load(Ordering::Relaxed),
        FRONTENDS.load(Ordering::Relaxed)
    );
}

/// Frontends the generated input translated to (a generator that only
/// makes invalid Services would test little).
static FRONTENDS: AtomicUsize = AtomicUsize::new(0);

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const NAMESPACES: &[&str] = &["a", "b"];
const NAMES: &[&str] = &["s0", "s1", "s2", "s3", "s4"];
const NODES: &[&str] = &["node-a", "node-b"];
const ZONES: &[&str] = &["z1", "z2"];

/// Mostly valid values, sometimes bad ones.
fn mostly<T: Clone + std::fmt::Debug + 'static>(good: &'static [T], bad: &'static [T]) -> impl Strategy<Value = T> {
    prop_oneof![8 => select(good), 1 => select(bad)]
}

fn ip_value() -> impl Strategy<Value = &'static str> {
    mostly(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "fd00:96::1", "fd00:96::2"], &["", "bogus", "None"])
}

fn port() -> impl Strategy<Value = Value> {
    (
        option::of(select(&["", "http", "dns", "x"][..])),
        mostly(&[53i64, 80, 443], &[0, 70000]),
        option::of(mostly(&["TCP", "UDP"], &["SCTP", "tcp"])),
        option::of(mostly(&[30080i64, 30081], &[0, 29999, 70000])),
        prop_oneof![Just(json!(8080)), Just(json!("http")), Just(json!(5353))],
    )
        .prop_map(|(name, port, protocol, node_port, target)| {
            let mut p = json!({"port": port, "targetPort": target});
            if let Some(n) = name {
                p["name"] = json!(n);
            }
            if let Some(pr) = protocol {
                p["protocol"] = json!(pr);
            }
            if let Some(np) = node_port {
                p["nodePort"] = json!(np);
            }
            p
        })
}

/// A Service `ns/name`.
fn service(ns: &'static str, name: &'static str) -> impl Strategy<Value = Value> {
    let addressing = (
        option::of(mostly(&["ClusterIP", "NodePort", "LoadBalancer"], &["ExternalName", "Bogus"])),
        option::of(ip_value()),
        option::of(proptest::collection::vec(ip_value(), 0..3)),
        option::of(proptest::collection::vec(select(&["IPv4", "IPv6", "IPvX"][..]), 0..3)),
        proptest::collection::vec(port(), 1..4),
    );
    let policy = (
        option::of(select(&["Local", "Cluster"][..])),
        option::of(select(&["Local", "Cluster"][..])),
        option::of(select(&[None, Some(0i64), Some(30), Some(200000)][..])),
        option::of(select(&[0i64, 32100, 70000][..])),
        option::of(select(&["PreferClose", "PreferSameNode", "PreferSameZone", "Nope"][..])),
    );
    let external = (
        proptest::collection::vec((ip_value(), option::of(select(&["VIP", "Proxy"][..]))), 0..3),
        proptest::collection::vec(select(&["198.51.100.1", "2001:db8::1", "bad"][..]), 0..3),
        proptest::collection::vec(select(&["10.0.0.0/8", "::/0", "bad/99", "192.0.2.1"][..]), 0..3),
    );
    let meta = (
        option::of(select(&["maglev", "round-robin", "random", "nope"][..])),
        option::of(select(&["251", "252", "65537", "x"][..])),
        option::of(select(&["Auto", "auto", "Off"][..])),
        any::<bool>(),
    );
    (addressing, policy, external, meta).prop_map(move |(addressing, policy, external, meta)| {
        let (ty, cip, cips, families, ports) = addressing;
        let (etp, itp, affinity, hcnp, distribution) = policy;
        let (ingress, external_ips, ranges) = external;
        let (scheduler, maglev, topology, versioned) = meta;
        let mut spec = json!({"ports": ports});
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                spec[k] = v;
            }
        };
        put("type", ty.map(|t| json!(t)));
        put("clusterIP", cip.map(|c| json!(c)));
        put("clusterIPs", cips.map(|c| json!(c)));
        put("ipFamilies", families.map(|f| json!(f)));
        put("externalTrafficPolicy", etp.map(|p| json!(p)));
        put("internalTrafficPolicy", itp.map(|p| json!(p)));
        put("healthCheckNodePort", hcnp.map(|p| json!(p)));
        put("trafficDistribution", distribution.map(|d| json!(d)));
        put("externalIPs", Some(json!(external_ips)));
        put("loadBalancerSourceRanges", Some(json!(ranges)));
        if let Some(timeout) = affinity {
            put("sessionAffinity", Some(json!("ClientIP")));
            put("sessionAffinityConfig", timeout.map(|t| json!({"clientIP": {"timeoutSeconds": t}})));
        }
        let mut annotations = serde_json::Map::new();
        if let Some(s) = scheduler {
            annotations.insert("xlb.io/scheduler".into(), json!(s));
        }
        if let Some(m) = maglev {
            annotations.insert("xlb.io/maglev-table-size".into(), json!(m));
        }
        if let Some(t) = topology {
            annotations.insert("service.kubernetes.io/topology-mode".into(), json!(t));
        }
        let ingress: Vec<Value> = ingress
            .into_iter()
            .map(|(ip, mode)| match mode {
                Some(m) => json!({"ip": ip, "ipMode": m}),
                None => json!({"ip": ip}),
            })
            .collect();
        let mut meta = json!({"name": name, "namespace": ns, "annotations": annotations});
        if versioned {
            meta["resourceVersion"] = json!("0"); // replaced by the caller
        }
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec,
               "status": {"loadBalancer": {"ingress": ingress}}})
    })
}

fn endpoint() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(mostly(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2"], &["bad"]), 0..3),
        (option::of(any::<bool>()), option::of(any::<bool>()), option::of(any::<bool>())),
        option::of(select(NODES)),
        option::of(select(ZONES)),
        option::of((proptest::collection::vec(select(ZONES), 0..3), proptest::collection::vec(select(NODES), 0..3))),
    )
        .prop_map(|(addresses, (ready, serving, terminating), node, zone, hints)| {
            let mut e = json!({"addresses": addresses, "conditions": {}});
            for (k, v) in [("ready", ready), ("serving", serving), ("terminating", terminating)] {
                if let Some(v) = v {
                    e["conditions"][k] = json!(v);
                }
            }
            if let Some(n) = node {
                e["nodeName"] = json!(n);
            }
            if let Some(z) = zone {
                e["zone"] = json!(z);
            }
            if let Some((zones, nodes)) = hints {
                let names = |v: Vec<&str>| v.into_iter().map(|n| json!({"name": n})).collect::<Vec<_>>();
                e["hints"] = json!({"forZones": names(zones), "forNodes": names(nodes)});
            }
            e
        })
}

/// An EndpointSlice of some Service (perhaps one that does not exist).
fn slice() -> impl Strategy<Value = Value> {
    (
        select(NAMESPACES),
        select(NAMES),
        select(&["x", "y", "z"][..]),
        mostly(&["IPv4", "IPv6"], &["FQDN"]),
        proptest::collection::vec(
            (
                option::of(select(&["", "http", "dns", "x"][..])),
                option::of(mostly(&[8080i64, 5353], &[0, -1])),
                option::of(select(&["TCP", "UDP", "SCTP"][..])),
            ),
            0..3,
        ),
        proptest::collection::vec(endpoint(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(ns, svc, suffix, family, ports, endpoints, versioned)| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(name, port, protocol)| {
                    let mut p = json!({});
                    if let Some(n) = name {
                        p["name"] = json!(n);
                    }
                    if let Some(n) = port {
                        p["port"] = json!(n);
                    }
                    if let Some(pr) = protocol {
                        p["protocol"] = json!(pr);
                    }
                    p
                })
                .collect();
            let mut meta = json!({"name": format!("{svc}-{suffix}"), "namespace": ns,
                                  "labels": {"kubernetes.io/service-name": svc}});
            if versioned {
                meta["resourceVersion"] = json!("0");
            }
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                   "addressType": family, "ports": ports, "endpoints": endpoints})
        })
}

/// Services with distinct `namespace/name` (the API server allows no two).
fn services() -> impl Strategy<Value = Vec<Value>> {
    let all: Vec<(&'static str, &'static str)> =
        NAMESPACES.iter().flat_map(|ns| NAMES.iter().map(move |n| (*ns, *n))).collect();
    proptest::sample::subsequence(all, 0..6)
        .prop_flat_map(|ids| ids.into_iter().map(|(ns, n)| service(ns, n)).collect::<Vec<_>>())
}

fn node() -> impl Strategy<Value = NodeInfo> {
    (
        select(&["node-a", "node-b", ""][..]),
        proptest::sample::subsequence(vec!["192.168.1.10", "fd00::10", "192.168.1.10", "10.1.0.7"], 0..4),
        proptest::sample::subsequence(vec!["10.1.0.7", "fd01::7", "192.168.1.10"], 0..3),
        option::of(select(ZONES)),
    )
        .prop_map(|(name, addresses, local, zone)| NodeInfo {
            name: name.into(),
            addresses: addresses.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect(),
            local: local.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect(),
            zone: zone.map(String::from),
        })
}

fn options() -> impl Strategy<Value = Options> {
    (
        proptest::sample::subsequence(vec!["10.0.0.0/8", "192.168.0.0/16", "fd00::/64"], 0..3),
        any::<bool>(),
        any::<bool>(),
        select(&[(30000u16, 32767u16), (30081, 30081)][..]),
        proptest::sample::subsequence(vec!["198.51.100.0/24"], 0..2),
    )
        .prop_map(|(cidrs, primary, derive, range, external)| Options {
            nodeport_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            nodeport_primary: primary && cidrs.is_empty(),
            derive_hints: derive,
            node_port_range: range,
            external_ip_cidrs: external.iter().map(|c| c.parse().unwrap()).collect(),
            ..Options::default()
        })
}

/// Objects from generated JSON, each versioned one with a fresh resourceVersion.
struct Objects {
    next_version: u64,
}

impl Objects {
    fn version(&mut self, mut v: Value) -> Value {
        if v["metadata"].get("resourceVersion").is_some() {
            self.next_version += 1;
            v["metadata"]["resourceVersion"] = json!(self.next_version.to_string());
        }
        v
    }

    fn service(&mut self, v: Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(self.version(v)).expect("a Service"))
    }

    fn slice(&mut self, v: Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(self.version(v)).expect("an EndpointSlice"))
    }
}

/// `d` in translate's order (Translator keeps the input's).
fn normalized(mut d: Desired) -> Desired {
    d.normalize();
    d
}

fn id(s: &Service) -> String {
    format!("{}/{}", s.metadata.namespace.as_deref().unwrap_or("default"), s.metadata.name.as_deref().unwrap_or(""))
}

static PERMUTED: AtomicUsize = AtomicUsize::new(0);
static EDITED: AtomicUsize = AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_order_gives_the_same_output_and_every_silent_service_is_reported(
        (svcs, perm_s) in services().prop_flat_map(|v| { let n = v.len(); (Just(v), Just((0..n).collect::<Vec<_>>()).prop_shuffle()) }),
        (slices, perm_e) in proptest::collection::vec(slice(), 0..8)
            .prop_flat_map(|v| { let n = v.len(); (Just(v), Just((0..n).collect::<Vec<_>>()).prop_shuffle()) }),
        node in node(),
        opts in options(),
    ) {
        PERMUTED.fetch_add(1, Ordering::Relaxed);
        let mut o = Objects { next_version: 0 };
        let s: Vec<Arc<Service>> = svcs.into_iter().map(|v| o.service(v)).collect();
        let e: Vec<Arc<EndpointSlice>> = slices.into_iter().map(|v| o.slice(v)).collect();
        let d = translate(&s, &e, &node, &opts);
        FRONTENDS.fetch_add(d.frontends.len(), Ordering::Relaxed);
        let s2: Vec<Arc<Service>> = perm_s.iter().map(|&i| s[i].clone()).collect();
        let e2: Vec<Arc<EndpointSlice>> = perm_e.iter().map(|&j| e[j].clone()).collect();
        prop_assert_eq!(&translate(&s2, &e2, &node, &opts), &d);
        for svc in &s {
            let id = id(svc);
            let programs = d.frontends.iter().any(|f| f.name.starts_with(&format!("{id}:")));
            let said = d.problems.iter().chain(&d.skipped).any(|p| p.service == id);
            prop_assert!(programs || said, "{} programs nothing and nothing says why: {:#?}", id, svc.spec);
        }
        if PERMUTED.load(Ordering::Relaxed) == cases(2000) as usize {
            report("permutations", &PERMUTED);
        }
    }
}

/// One edit of the input.
#[derive(Clone, Debug)]
enum Edit {
    /// Service at (index mod len) replaced by a new version of itself.
    Service(usize, Value),
    /// Slice at (index mod len) replaced by a new version (maybe of another Service).
    Slice(usize, Value),
    AddSlice(Value),
    RemoveSlice(usize),
    RemoveService(usize),
    Node(NodeInfo),
    Options(Options),
    Nothing,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), select(NAMESPACES), select(NAMES))
            .prop_flat_map(|(i, ns, n)| service(ns, n).prop_map(move |v| Edit::Service(i, v))),
        6 => (any::<usize>(), slice()).prop_map(|(i, v)| Edit::Slice(i, v)),
        2 => slice().prop_map(Edit::AddSlice),
        1 => any::<usize>().prop_map(Edit::RemoveSlice),
        1 => any::<usize>().prop_map(Edit::RemoveService),
        1 => node().prop_map(Edit::Node),
        1 => options().prop_map(Edit::Options),
        1 => Just(Edit::Nothing),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(400), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_shared_translator_agrees_with_translate_through_any_edits(
        svcs in services(),
        slices in proptest::collection::vec(slice(), 0..8),
        node0 in node(),
        opts0 in options(),
        edits in proptest::collection::vec(edit(), 1..20),
    ) {
        EDITED.fetch_add(1, Ordering::Relaxed);
        let mut o = Objects { next_version: 0 };
        let mut s: Vec<Arc<Service>> = svcs.into_iter().map(|v| o.service(v)).collect();
        let mut e: Vec<Arc<EndpointSlice>> = slices.into_iter().map(|v| o.slice(v)).collect();
        let (mut node, mut opts) = (node0, opts0);
        let mut t = Translator::default();
        prop_assert_eq!(normalized(t.translate_shared(&s, &e, &node, &opts)), translate(&s, &e, &node, &opts));
        for ed in edits {
            match ed {
                Edit::Service(i, v) if !s.is_empty() => {
                    // A new version of the same Service (same name), as an update.
                    let i = i % s.len();
                    let mut v = v;
                    v["metadata"]["name"] = json!(s[i].metadata.name.clone());
                    v["metadata"]["namespace"] = json!(s[i].metadata.namespace.clone());
                    s[i] = o.service(v);
                }
                Edit::Slice(j, v) if !e.is_empty() => { let j = j % e.len(); e[j] = o.slice(v); }
                Edit::AddSlice(v) => e.push(o.slice(v)),
                Edit::RemoveSlice(j) if !e.is_empty() => { e.remove(j % e.len()); }
                Edit::RemoveService(i) if !s.is_empty() => { s.remove(i % s.len()); }
                Edit::Node(n) => node = n,
                Edit::Options(p) => opts = p,
                _ => {}
            }
            let fresh = translate(&s, &e, &node, &opts);
            FRONTENDS.fetch_add(fresh.frontends.len(), Ordering::Relaxed);
            prop_assert_eq!(normalized(t.translate_shared(&s, &e, &node, &opts)), fresh);
        }
        if EDITED.load(Ordering::Relaxed) == cases(400) as usize {
            report("edit sequences", &EDITED);
        }
    }
}
