// SPDX-License-Identifier: MIT OR Apache-2.0
//! The allocation: Services of `type: LoadBalancer` (of our class) → their
//! ingress addresses, from the pools. Pure: the state is what the Services
//! already hold (their `status.loadBalancer.ingress`, or in `--manifests`
//! mode the previous allocation), so it survives restarts and an address
//! held by one Service is never handed to another (except to share it).
//!
//! Order of decisions:
//! 1. Every Service keeps the addresses it holds while they stay valid: in
//!    a pool that still selects it (a disabled pool keeps what it gave), of
//!    a family it has, the ones it requested if it requested any, and not
//!    in conflict with an older holder (older by creation time, then name).
//!    Any other address is replaced, as MetalLB does: a Service of our class
//!    takes its addresses from our pools (a cloud's or another controller's
//!    Services say so with `spec.loadBalancerClass`).
//! 2. Then, oldest first, each family still missing gets: the requested
//!    address (`xlb.io/lb-ips`, or `spec.loadBalancerIP`); else an address
//!    shared under its `xlb.io/sharing-key`; else the first free address of
//!    the first pool (by name, or `xlb.io/lb-pool`) that selects it.
//!
//! Sharing: Services with the same sharing key share an address when none
//! of their (port, protocol) pairs collide and their
//! `externalTrafficPolicy` is the same (one set of announcing nodes). The
//! later Service of a collision stays pending for that family, with a
//! problem. `NodeIPs` pools share node addresses among all their Services,
//! ports permitting.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Node, Service};

use super::pool::{LoadBalancerIPPool, PoolMode, Range, selector, selects};

/// Annotation: the addresses a Service asks for (comma-separated).
pub const LB_IPS_ANNOTATION: &str = "xlb.io/lb-ips";
/// Annotation: the pool a Service takes its addresses from.
pub const LB_POOL_ANNOTATION: &str = "xlb.io/lb-pool";
/// Annotation: Services with the same value may share an address.
pub const SHARING_KEY_ANNOTATION: &str = "xlb.io/sharing-key";
/// The default `--lb-class`.
pub const DEFAULT_LB_CLASS: &str = "xlb.io/lb";

/// What the allocation reads.
pub struct Inputs<'a> {
    pub services: &'a [Arc<Service>],
    pub pools: &'a [Arc<LoadBalancerIPPool>],
    pub namespaces: &'a [Arc<Namespace>],
    pub nodes: &'a [Arc<Node>],
    /// Addresses held per Service (`namespace/name`) beyond its status
    /// (`--manifests` mode: the previous allocation; else empty).
    pub previous: &'a BTreeMap<String, Vec<IpAddr>>,
    /// `--lb-class`: Services with another `spec.loadBalancerClass` are
    /// another controller's.
    pub lb_class: &'a str,
}

/// The result: every Service of ours with the addresses it has now (in
/// the order of its families; empty while pending), and the problems.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// (`namespace/name` of a Service, or `pool/NAME`; message).
    pub problems: Vec<(String, String)>,
}

/// A pool, parsed.
struct Pool {
    name: String,
    mode: PoolMode,
    ranges: Vec<Range>,
    services: Option<kube::core::Selector>,
    namespaces: Option<kube::core::Selector>,
    /// `NodeIPs`: the eligible nodes' addresses.
    node_addrs: Vec<IpAddr>,
    disabled: bool,
}

impl Pool {
    fn contains(&self, a: &IpAddr) -> bool {
        match self.mode {
            PoolMode::Pool => self.ranges.iter().any(|r| r.contains(a)),
            PoolMode::NodeIps => self.node_addrs.contains(a),
        }
    }
}

/// One candidate Service.
struct Candidate<'a> {
    id: String,
    svc: &'a Service,
    families: Vec<bool>,
    ports: BTreeSet<(i32, String)>,
    key: Option<String>,
    local: bool,
    requested: Vec<IpAddr>,
    pool: Option<String>,
    held: Vec<IpAddr>,
}

/// A Service's `status.loadBalancer.ingress` entries.
pub fn ingress(svc: &Service) -> impl Iterator<Item = &k8s_openapi::api::core::v1::LoadBalancerIngress> {
    svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref()).into_iter().flatten()
}

/// The addresses a Service holds in its status.
pub fn held_in_status(svc: &Service) -> Vec<IpAddr> {
    ingress(svc).filter_map(|i| i.ip.as_deref()?.parse().ok()).collect()
}

/// `namespace/name` of a Service.
pub fn id_of(svc: &Service) -> String {
    format!("{}/{}", svc.metadata.namespace.as_deref().unwrap_or("default"), svc.metadata.name.as_deref().unwrap_or(""))
}

/// A node's address of family `v4` handed out by `NodeIPs`: its
/// ExternalIP, else its InternalIP.
fn node_address(node: &Node, v4: bool) -> Option<IpAddr> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    let of = |ty: &str| {
        addrs
            .iter()
            .filter(|a| a.type_ == ty)
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .find(|a| a.is_ipv4() == v4)
    };
    of("ExternalIP").or_else(|| of("InternalIP"))
}

fn parse_pools(inp: &Inputs, problems: &mut Vec<(String, String)>) -> Vec<Pool> {
    let mut pools: Vec<Pool> = Vec::new();
    for p in inp.pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut bad = |m: String| problems.push((format!("pool/{name}"), m));
        let mut ranges = Vec::new();
        for b in &p.spec.blocks {
            match b.range() {
                Ok(r) => ranges.push(r),
                Err(e) => bad(format!("{e}; block ignored")),
            }
        }
        let sel = |s, what: &str, bad: &mut dyn FnMut(String)| match selector(s) {
            Ok(s) => Some(s),
            Err(e) => {
                bad(format!("{what}: {e}; the pool selects nothing"));
                None
            }
        };
        let services = sel(&p.spec.service_selector, "serviceSelector", &mut bad);
        let namespaces = sel(&p.spec.namespace_selector, "namespaceSelector", &mut bad);
        let nodes = sel(&p.spec.node_selector, "nodeSelector", &mut bad);
        let (Some(services), Some(namespaces), Some(nodes)) = (services, namespaces, nodes) else { continue };
        let node_addrs = if p.spec.mode == PoolMode::NodeIps {
            let mut eligible: Vec<&Arc<Node>> =
                inp.nodes.iter().filter(|n| selects(&nodes, n.metadata.labels.as_ref())).collect();
            eligible.sort_by_key(|n| n.metadata.name.clone());
            [true, false].iter().flat_map(|v4| eligible.iter().filter_map(|n| node_address(n, *v4))).collect()
        } else {
            if ranges.is_empty() {
                bad("no usable block: the pool hands out nothing".into());
            }
            Vec::new()
        };
        pools.push(Pool {
            name,
            mode: p.spec.mode,
            ranges,
            services,
            namespaces,
            node_addrs,
            disabled: p.spec.disabled,
        });
    }
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    pools
}

fn candidates<'a>(inp: &'a Inputs, problems: &mut Vec<(String, String)>) -> Vec<Candidate<'a>> {
    let mut out: Vec<Candidate> = Vec::new();
    for svc in inp.services {
        let Some(spec) = svc.spec.as_ref() else { continue };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            continue;
        }
        if spec.load_balancer_class.as_deref().is_some_and(|c| c != inp.lb_class) {
            continue;
        }
        let id = id_of(svc);
        let ann = |k: &str| svc.metadata.annotations.as_ref().and_then(|a| a.get(k)).map(|s| s.trim().to_string());
        let mut families: Vec<bool> = Vec::new();
        for f in spec.ip_families.iter().flatten() {
            families.push(f == "IPv4");
        }
        if families.is_empty() {
            let ips = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.iter().cloned().collect());
            families = ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()).map(|a| a.is_ipv4()).collect();
        }
        if families.is_empty() {
            families.push(true);
        }
        families.dedup();
        let mut requested = Vec::new();
        let raw = ann(LB_IPS_ANNOTATION).or_else(|| spec.load_balancer_ip.clone().filter(|s| !s.is_empty()));
        for s in raw.iter().flat_map(|r| r.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
            match s.parse::<IpAddr>() {
                Ok(a) => requested.push(a),
                Err(_) => problems.push((id.clone(), format!("{LB_IPS_ANNOTATION}: {s:?} is not an address; ignored"))),
            }
        }
        let ports =
            spec.ports.iter().flatten().map(|p| (p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into()))).collect();
        let mut held = held_in_status(svc);
        held.extend(
            inp.previous.get(&id).into_iter().flatten().filter(|a| !held.contains(a)).copied().collect::<Vec<_>>(),
        );
        out.push(Candidate {
            svc,
            families,
            ports,
            key: ann(SHARING_KEY_ANNOTATION).filter(|k| !k.is_empty()),
            local: spec.external_traffic_policy.as_deref() == Some("Local"),
            requested,
            pool: ann(LB_POOL_ANNOTATION).filter(|p| !p.is_empty()),
            held,
            id,
        });
    }
    // Oldest first: the creation time, then the name (RFC 3339 times sort as text).
    out.sort_by(|a, b| {
        let t = |c: &Candidate| c.svc.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        t(a).cmp(&t(b)).then_with(|| a.id.cmp(&b.id))
    });
    out
}

/// Runs the allocation.
pub fn allocate(inp: &Inputs) -> Allocation {
    let mut problems = Vec::new();
    let pools = parse_pools(inp, &mut problems);
    let cands = candidates(inp, &mut problems);
    let ns_labels: BTreeMap<String, Option<&BTreeMap<String, String>>> = inp
        .namespaces
        .iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n.metadata.labels.as_ref()))
        .collect();
    // Which pools may serve candidate `c` (by the annotation, or selectors).
    let eligible = |c: &Candidate, new: bool| -> Vec<&Pool> {
        let ns = c.svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        pools
            .iter()
            .filter(|p| c.pool.as_ref().is_none_or(|want| *want == p.name))
            .filter(|p| !(new && p.disabled))
            .filter(|p| selects(&p.services, c.svc.metadata.labels.as_ref()))
            .filter(|p| selects(&p.namespaces, ns_labels.get(&ns).copied().flatten()))
            .collect()
    };
    // Holders of each address: candidate indexes. An entry without any is
    // reserved: a node's address, an externalIP, or the address of a
    // Service that is not ours (another class, another proxy's).
    let mut used: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    let ours: BTreeSet<&str> = cands.iter().map(|c| c.id.as_str()).collect();
    let node_addrs =
        inp.nodes.iter().filter_map(|n| n.status.as_ref()?.addresses.as_ref()).flatten().map(|a| &a.address);
    let external_ips = inp.services.iter().filter_map(|s| s.spec.as_ref()?.external_ips.as_ref()).flatten();
    for a in node_addrs.chain(external_ips).filter_map(|a| a.parse::<IpAddr>().ok()) {
        used.entry(a).or_default();
    }
    for s in inp.services.iter().filter(|s| !ours.contains(id_of(s).as_str())) {
        for a in held_in_status(s) {
            used.entry(a).or_default();
        }
    }
    let mut got: Vec<Vec<IpAddr>> = vec![Vec::new(); cands.len()];
    // May candidate `i` use `a` beside its holders?
    let fits = |i: usize, a: &IpAddr, used: &BTreeMap<IpAddr, Vec<usize>>, node_ips: bool| -> Result<(), String> {
        let c = &cands[i];
        if !node_ips && used.get(a).is_some_and(Vec::is_empty) {
            return Err(format!("{a} is in use (a node's address, an externalIP, or another controller's Service)"));
        }
        for &h in used.get(a).into_iter().flatten() {
            let o = &cands[h];
            if !node_ips && (c.key.is_none() || c.key != o.key) {
                return Err(format!("{a} is in use by {}", o.id));
            }
            if c.local != o.local {
                return Err(format!("{a} is shared with {}, whose externalTrafficPolicy differs", o.id));
            }
            if let Some(p) = c.ports.intersection(&o.ports).next() {
                return Err(format!("{a} is shared with {}, which has port {}/{} too", o.id, p.0, p.1));
            }
        }
        Ok(())
    };
    // 1. Keep what is held and still valid.
    for (i, c) in cands.iter().enumerate() {
        let pools = eligible(c, false);
        for a in &c.held {
            let family_open = c.families.contains(&a.is_ipv4()) && !got[i].iter().any(|g| g.is_ipv4() == a.is_ipv4());
            // A request for this family names the address to keep.
            let asked: Vec<&IpAddr> = c.requested.iter().filter(|r| r.is_ipv4() == a.is_ipv4()).collect();
            let wanted = asked.is_empty() || asked.contains(&a);
            // `NodeIPs` addresses are not held: step 2 derives them again
            // from the nodes, every time.
            let pool = pools.iter().find(|p| p.mode == PoolMode::Pool && p.contains(a));
            if family_open && wanted && pool.is_some() && fits(i, a, &used, false).is_ok() {
                used.entry(*a).or_default().push(i);
                got[i].push(*a);
            }
        }
    }
    // 2. Give the missing families an address.
    for (i, c) in cands.iter().enumerate() {
        let pools = eligible(c, true);
        if c.pool.as_ref().is_some_and(|want| !pools.iter().any(|p| p.name == *want)) {
            problems.push((
                c.id.clone(),
                format!("{LB_POOL_ANNOTATION}: no enabled pool {:?} selects this Service", c.pool.as_ref().unwrap()),
            ));
        }
        for &v4 in &c.families {
            if got[i].iter().any(|g| g.is_ipv4() == v4) {
                continue;
            }
            let fam = if v4 { "IPv4" } else { "IPv6" };
            let mut why = None;
            let mut take: Vec<IpAddr> = Vec::new();
            if let Some(a) = c.requested.iter().find(|a| a.is_ipv4() == v4) {
                match pools.iter().find(|p| p.contains(a)) {
                    None => why = Some(format!("requested {a} is in no pool that selects this Service")),
                    Some(p) => match fits(i, a, &used, p.mode == PoolMode::NodeIps) {
                        Ok(()) => take.push(*a),
                        Err(e) => why = Some(format!("requested {e}")),
                    },
                }
            } else {
                // Shared under the key first, then the pools in order.
                let shared = c.key.as_ref().and_then(|k| {
                    used.iter()
                        .filter(|(a, hs)| a.is_ipv4() == v4 && hs.iter().any(|h| cands[*h].key.as_ref() == Some(k)))
                        .find(|(a, _)| {
                            pools.iter().any(|p| p.mode == PoolMode::Pool && p.contains(a))
                                && fits(i, a, &used, false).is_ok()
                        })
                        .map(|(a, _)| *a)
                });
                if let Some(a) = shared {
                    take.push(a);
                }
                for p in &pools {
                    if !take.is_empty() {
                        break;
                    }
                    match p.mode {
                        PoolMode::Pool => {
                            let mut free = p.ranges.iter().filter(|r| r.first.is_ipv4() == v4);
                            if let Some(a) = free.find_map(|r| r.first_free(&used)) {
                                take.push(a);
                            }
                        }
                        PoolMode::NodeIps => {
                            let addrs: Vec<IpAddr> =
                                p.node_addrs.iter().filter(|a| a.is_ipv4() == v4).copied().collect();
                            match addrs.iter().map(|a| fits(i, a, &used, true)).find(Result::is_err) {
                                Some(Err(e)) => why = Some(e),
                                _ => take.extend(addrs),
                            }
                        }
                    }
                    if !take.is_empty() || why.is_some() {
                        break;
                    }
                }
                if take.is_empty() && why.is_none() {
                    why = Some(if pools.is_empty() {
                        "no enabled pool selects this Service".to_string()
                    } else {
                        format!("no free {fam} address in the pools that select it")
                    });
                }
            }
            if let Some(w) = why {
                problems.push((c.id.clone(), format!("{fam}: {w}; pending")));
            }
            for a in take {
                used.entry(a).or_default().push(i);
                got[i].push(a);
            }
        }
        // In the order of the Service's families.
        got[i].sort_by_key(|a| c.families.iter().position(|v4| *v4 == a.is_ipv4()));
    }
    Allocation { addresses: cands.iter().zip(got).map(|(c, g)| (c.id.clone(), g)).collect(), problems }
}
