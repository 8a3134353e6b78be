// SPDX-License-Identifier: MIT OR Apache-2.0
//! One Service → its frontends: which addresses (ClusterIPs, NodePorts,
//! LoadBalancer ingress, externalIPs), which scope, which policy, which
//! scheduler; and its healthCheckNodePort.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{
    DEFAULT_AFFINITY_TIMEOUT_S, EndpointSlice, Frontend, FrontendKey, HealthCheck, Kind, MAGLEV_SIZE_ANNOTATION,
    NodeInfo, Options, Protocol, SCHEDULER_ANNOTATION, Scheduler, Scope, WEIGHTS_ANNOTATION,
    endpoints::{Distribution, Endpoint, Topology, endpoints_for, select_backends},
    family_matches, in_any,
    notes::{Note, NoteKind, Notes},
    weights::Weights,
};
use crate::maglev;

/// What a Service says once for all its ports.
struct Shape<'a> {
    /// `namespace/name`.
    id: &'a str,
    spec: &'a ServiceSpec,
    /// `spec.type`: ClusterIP, NodePort or LoadBalancer.
    ty: &'a str,
    cluster_ips: Vec<IpAddr>,
    /// The families the Service has (true = IPv4).
    families: BTreeSet<bool>,
    /// The family a dual-stack pod is counted in by the health check.
    primary_v4: bool,
    scheduler: Scheduler,
    maglev_override: Option<u32>,
    /// `xlb.io/weights`.
    weights: Weights,
    affinity_timeout_s: Option<u32>,
    ext_local: bool,
    int_local: bool,
    source_ranges: Vec<IpNet>,
    lb_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    node_addrs: Vec<IpAddr>,
    /// Hints to give endpoints that have none (`--manifests` only).
    derive_hints: Option<Distribution>,
}

/// The frontends of one Service; problems are pushed as messages.
pub(super) fn service_frontends(
    svc: &Service,
    id: &str,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
    problems: &mut Notes,
    health_checks: &mut Vec<HealthCheck>,
) -> Vec<Frontend> {
    let Some(shape) = shape(svc, id, node, opts, problems) else { return Vec::new() };
    let mut out = Vec::new();
    // Pods, not addresses: a dual-stack pod has one endpoint per family, so
    // the health check counts the primary family's.
    let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
    for port in shape.spec.ports.iter().flatten() {
        let endpoints = port_frontends(&shape, port, slices, node, opts, problems, &mut out);
        local_ready.extend(
            endpoints
                .iter()
                // A drained endpoint (weight 0) takes no new connection:
                // not one the load balancer should send to this node for.
                .filter(|e| e.local && e.ready && e.weight > 0 && e.address.is_ipv4() == shape.primary_v4)
                .map(|e| e.address),
        );
    }
    // Nothing programmed and nothing said yet: say why, so no Service is
    // dropped silently.
    if out.is_empty() && problems.0.iter().all(|n| n.kind == NoteKind::Notice) {
        let why = if shape.spec.ports.as_ref().is_none_or(Vec::is_empty) {
            "no ports; nothing to program"
        } else if shape.cluster_ips.is_empty() {
            "no clusterIP, and no NodePort on this node's addresses nor external address to program; skipped"
        } else {
            "nothing to program; skipped"
        };
        problems.push(why);
    }
    // kube-proxy serves a healthCheckNodePort only for a LoadBalancer with
    // a Local policy (`NeedsHealthCheck`), counting the distinct local ready
    // endpoints across all the Service's ports (`LocalReadyEndpoints`).
    if shape.ty == "LoadBalancer"
        && shape.ext_local
        && let Some(port) = shape.spec.health_check_node_port.filter(|p| *p > 0 && *p <= 65535)
    {
        health_checks.push(HealthCheck {
            service: id.to_string(),
            port: port as u16,
            local_endpoints: local_ready.len(),
        });
    }
    out
}

/// The Service's type, addresses and settings; `None` when it has nothing
/// to load-balance (with the reason in `problems`).
fn shape<'a>(
    svc: &'a Service,
    id: &'a str,
    node: &NodeInfo,
    opts: &Options,
    problems: &mut Notes,
) -> Option<Shape<'a>> {
    let Some(spec) = &svc.spec else {
        problems.push("no spec; skipped");
        return None;
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" {
        problems.push(Note::expected("type ExternalName is resolved by DNS, not load-balanced; skipped"));
        return None;
    }
    if !matches!(ty, "ClusterIP" | "NodePort" | "LoadBalancer") {
        problems.push(format!("unknown type {ty:?}; skipped"));
        return None;
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        problems.push(Note::expected(
            "headless (clusterIP: None): DNS returns the endpoints, nothing to load-balance; skipped",
        ));
        return None;
    }
    let (cluster_ips, families) = cluster_ips_and_families(spec, problems);
    let primary_v4 = cluster_ips
        .first()
        .map(IpAddr::is_ipv4)
        .or_else(|| spec.ip_families.as_ref().and_then(|f| f.first()).map(|f| f == "IPv4"))
        .unwrap_or(true);
    let (scheduler, maglev_override) = scheduler(svc, opts, problems);
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.clamp(1, 86_400) as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<IpNet>() {
            Ok(n) => source_ranges.push(n.trunc()),
            Err(_) => problems.push(format!("loadBalancerSourceRanges: bad CIDR {r:?}; ignored")),
        }
    }
    Some(Shape {
        id,
        spec,
        ty,
        cluster_ips,
        families,
        primary_v4,
        scheduler,
        maglev_override,
        weights: svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(WEIGHTS_ANNOTATION))
            .map(|v| Weights::parse(v, problems))
            .unwrap_or_default(),
        affinity_timeout_s,
        ext_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        int_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        source_ranges,
        lb_ips: load_balancer_ips(svc, problems),
        external_ips: external_ips(spec, opts, problems),
        node_addrs: node.nodeport_addresses(opts),
        derive_hints: Distribution::of(spec, svc.metadata.annotations.as_ref()).filter(|_| opts.derive_hints),
    })
}

/// `clusterIPs` (or `clusterIP`), and the families from them and `ipFamilies`.
fn cluster_ips_and_families(spec: &ServiceSpec, problems: &mut Notes) -> (Vec<IpAddr>, BTreeSet<bool>) {
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let raw_ips = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect());
    for s in raw_ips.iter().filter(|s| !s.is_empty()) {
        match s.parse() {
            Ok(a) => cluster_ips.push(a),
            Err(_) => problems.push(format!("bad clusterIP {s:?}; ignored")),
        }
    }
    let mut families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv4).collect(); // true = IPv4
    for f in spec.ip_families.iter().flatten() {
        match f.as_str() {
            "IPv4" => families.insert(true),
            "IPv6" => families.insert(false),
            other => {
                problems.push(format!("unknown ipFamily {other:?}; ignored"));
                false
            }
        };
    }
    if families.is_empty() {
        families.insert(true);
    }
    (cluster_ips, families)
}

/// The scheduler annotation, and a Maglev table size annotation if valid.
fn scheduler(svc: &Service, opts: &Options, problems: &mut Notes) -> (Scheduler, Option<u32>) {
    let annotations = svc.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k));
    let scheduler = match get(SCHEDULER_ANNOTATION) {
        None => opts.scheduler,
        Some(s) => Scheduler::parse(s).unwrap_or_else(|| {
            problems.push(format!(
                "{SCHEDULER_ANNOTATION}: {s:?} is not a scheduler ({}); using {}",
                Scheduler::names(),
                opts.scheduler.ipvs_name()
            ));
            opts.scheduler
        }),
    };
    let maglev_override = get(MAGLEV_SIZE_ANNOTATION).and_then(|s| match s.parse::<u32>() {
        Ok(m) if m >= opts.maglev_min && m <= opts.maglev_max && maglev::next_prime(m) == m => Some(m),
        _ => {
            problems.push(format!(
                "{MAGLEV_SIZE_ANNOTATION}: {s:?} is not a prime in {}..={}; using the adaptive size",
                opts.maglev_min, opts.maglev_max
            ));
            None
        }
    });
    (scheduler, maglev_override)
}

/// `status.loadBalancer.ingress` IPs bound here (not `ipMode: Proxy`).
fn load_balancer_ips(svc: &Service, problems: &mut Notes) -> Vec<IpAddr> {
    crate::lbipam::allocate::ingress(svc)
        .filter_map(|i| {
            let ip = i.ip.as_deref()?;
            if i.ip_mode.as_deref() == Some("Proxy") {
                problems.push(Note::expected(&format!(
                    "LoadBalancer ingress {ip} has ipMode Proxy: the load balancer proxies, not bound here"
                )));
                return None;
            }
            ip.parse().map_err(|_| problems.push(format!("bad LoadBalancer ingress IP {ip:?}; ignored"))).ok()
        })
        .collect()
}

/// `spec.externalIPs`, within `--external-ip-cidrs` when given.
fn external_ips(spec: &ServiceSpec, opts: &Options, problems: &mut Notes) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in spec.external_ips.iter().flatten() {
        match s.parse::<IpAddr>() {
            Ok(a) if !opts.external_ip_cidrs.is_empty() && !in_any(&opts.external_ip_cidrs, &a) => {
                problems.push(format!("externalIP {a} is outside the allowed CIDRs (CVE-2020-8554); skipped"))
            }
            Ok(a) => out.push(a),
            Err(_) => problems.push(format!("bad externalIP {s:?}; ignored")),
        }
    }
    out
}

/// One service port's frontends, pushed to `out`; returns its endpoints.
fn port_frontends(
    shape: &Shape,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
    opts: &Options,
    problems: &mut Notes,
    out: &mut Vec<Frontend>,
) -> Vec<Endpoint> {
    let pname = port.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| port.port.to_string());
    let proto = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => {
            problems.push(format!("port {pname}: protocol {other} is not supported by xlb; skipped"));
            return Vec::new();
        }
    };
    let Some(svc_port) = u16::try_from(port.port).ok().filter(|p| *p > 0) else {
        problems.push(format!("port {pname}: bad port {}; skipped", port.port));
        return Vec::new();
    };
    let mut endpoints = endpoints_for(port, proto, slices, node, shape.derive_hints);
    for e in &mut endpoints {
        e.weight = shape.weights.of(e);
    }
    let f = Port { shape, name: format!("{}:{pname}", shape.id), proto, endpoints: &endpoints, node, opts };
    let ext_local = shape.ext_local;
    for a in &shape.cluster_ips {
        out.push(f.frontend(Kind::ClusterIp, *a, svc_port, Scope::Internal, shape.int_local));
    }
    if matches!(shape.ty, "NodePort" | "LoadBalancer") {
        match port.node_port {
            None | Some(0) => {
                if shape.ty == "NodePort" {
                    problems.push(format!("port {pname}: type NodePort without a nodePort; NodePort skipped"));
                }
            }
            Some(np) if !(1..=65535).contains(&np) => {
                problems.push(format!("port {pname}: bad nodePort {np}; NodePort skipped"));
            }
            Some(np) => {
                // The API server validates the range; a cluster with a
                // custom --service-node-port-range keeps its NodePorts.
                if np < opts.node_port_range.0 as i32 || np > opts.node_port_range.1 as i32 {
                    problems.push(Note::notice(format!(
                        "port {pname}: nodePort {np} is outside --node-port-range {}-{}; programmed anyway",
                        opts.node_port_range.0, opts.node_port_range.1
                    )));
                }
                for a in shape.node_addrs.iter().filter(|a| shape.families.contains(&a.is_ipv4())) {
                    out.push(f.frontend(Kind::NodePort, *a, np as u16, Scope::External, ext_local));
                    if ext_local {
                        out.push(f.frontend(Kind::NodePort, *a, np as u16, Scope::Internal, false));
                    }
                }
            }
        }
    }
    for (kind, addrs) in [(Kind::LoadBalancer, &shape.lb_ips), (Kind::ExternalIp, &shape.external_ips)] {
        if kind == Kind::LoadBalancer && shape.ty != "LoadBalancer" {
            continue;
        }
        for a in addrs.iter() {
            if !shape.families.contains(&a.is_ipv4()) {
                problems.push(format!("{} {a}: the service has no such IP family; skipped", kind.name()));
                continue;
            }
            out.push(f.frontend(kind, *a, svc_port, Scope::External, ext_local));
            if ext_local {
                // kube-proxy's "pod traffic for external destinations":
                // pods (and, later, the host) reaching an external
                // address of a Local Service get the Cluster endpoints,
                // as if they had gone out to the load balancer and back.
                out.push(f.frontend(kind, *a, svc_port, Scope::Internal, false));
            }
        }
    }
    endpoints
}

/// One service port, ready to make its frontends.
struct Port<'a> {
    shape: &'a Shape<'a>,
    /// `namespace/name:port`.
    name: String,
    proto: Protocol,
    endpoints: &'a [Endpoint],
    node: &'a NodeInfo,
    opts: &'a Options,
}

impl Port<'_> {
    /// The frontend on `address:port` in `scope`; `local_only` limits it
    /// to this node's endpoints, else topology may (kube-proxy applies it
    /// to Cluster-policy endpoints only).
    fn frontend(&self, kind: Kind, address: IpAddr, port: u16, scope: Scope, local_only: bool) -> Frontend {
        let (shape, opts, node) = (self.shape, self.opts, self.node);
        let v4 = address.is_ipv4();
        let family: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.address.is_ipv4() == v4).collect();
        let backends = if local_only {
            let local: Vec<&Endpoint> = family.iter().copied().filter(|e| e.local).collect();
            select_backends(&local, Topology::Any, node)
        } else {
            select_backends(&family, Topology::of(&family, node), node)
        };
        let eligible = backends.iter().filter(|b| b.eligible()).count();
        let usable_anywhere = local_only && select_backends(&family, Topology::Any, node).iter().any(|b| b.eligible());
        let maglev_size = match (shape.scheduler, eligible) {
            (s, n) if s.maglev() && n > 0 => shape.maglev_override.unwrap_or_else(|| {
                let want = (n as u64 * 100).clamp(opts.maglev_min as u64, opts.maglev_max as u64) as u32;
                let p = maglev::next_prime(want);
                if p > opts.maglev_max { maglev::prev_prime(opts.maglev_max) } else { p }
            }),
            _ => 0,
        };
        Frontend {
            name: self.name.clone(),
            kind,
            key: FrontendKey { address, port, protocol: self.proto, scope },
            scheduler: shape.scheduler,
            affinity_timeout_s: shape.affinity_timeout_s,
            local_only,
            no_local_endpoints: eligible == 0 && usable_anywhere,
            maglev_size,
            source_ranges: if kind == Kind::LoadBalancer {
                shape.source_ranges.iter().filter(|n| family_matches(&n.addr(), &address)).copied().collect()
            } else {
                Vec::new()
            },
            backends,
        }
    }
}
