// SPDX-License-Identifier: MIT OR Apache-2.0
//! `xlb dump`: read-only views of the pinned maps, as aligned tables or
//! JSON. Works while the agent runs and after it exited (the pins hold the
//! state). Frontend ids are resolved to `namespace/name:port` through the
//! FRONTENDS map, backend ids to `address:port` through BACKENDS.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, bail};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use datapath_common::{
    AffinityKey, BACKEND_ACTIVE, BACKEND_F_NODE_LOCAL, BACKEND_TERMINATING, CFG_F_NO_NEXT_HOP_CACHE, CT_F_REPLY,
    CT_F_SNAT, CtEntry, CtKey, FrontendInfo, SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_EXT_LOCAL, SVC_F_NO_LOCAL_DROP,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, Service, ServiceKey, ct, is_v4_mapped, verdict,
};
use serde_json::{Value, json};

use crate::{
    datapath::{Maps, map_addr},
    select::{Flow, Parts, Pick, pick},
    translate::{Kind, Protocol, Scheduler},
};

/// An address from its 16-byte map form.
pub fn ip(a: &[u8; 16]) -> IpAddr {
    if is_v4_mapped(a) { IpAddr::from([a[12], a[13], a[14], a[15]]) } else { IpAddr::from(*a) }
}

/// `addr:port` (`[v6]:port`) from map fields (port in network order).
pub fn addr_port(a: &[u8; 16], port_be: u16) -> String {
    SocketAddr::new(ip(a), u16::from_be(port_be)).to_string()
}

fn proto_name(p: u8) -> &'static str {
    match Protocol::from_number(p) {
        Some(Protocol::Tcp) => "tcp",
        Some(Protocol::Udp) => "udp",
        None => "?",
    }
}

/// `addr:port/proto` of a SERVICES key.
pub fn frontend_addr(k: &ServiceKey) -> String {
    format!("{}/{}", addr_port(&k.addr, k.port), proto_name(k.proto))
}

fn name_of(i: &FrontendInfo) -> String {
    String::from_utf8_lossy(&i.name[..i.name_len as usize]).into_owned()
}

/// CLOCK_MONOTONIC_COARSE in ns, the clock of `bpf_ktime_get_coarse_ns`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain syscall filling `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn secs_since(then: u64, now: u64) -> f64 {
    now.saturating_sub(then) as f64 / 1e9
}

fn state_name(e: &CtEntry) -> &'static str {
    if ct::closing(e) {
        return "closing";
    }
    match e.state {
        ct::STATE_SYN_SENT => "syn_sent",
        ct::STATE_ESTABLISHED if e.fin_out != 0 => "half_closed_out",
        ct::STATE_ESTABLISHED if e.fin_in != 0 => "half_closed_in",
        ct::STATE_ESTABLISHED => "established",
        ct::STATE_CLOSING => "closing",
        ct::STATE_CLOSED => "closed",
        ct::STATE_UDP => "udp",
        _ => "?",
    }
}

fn flag_names(f: u8) -> String {
    let mut v = Vec::new();
    for (bit, n) in [
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_EXT_LOCAL, "local"),
        (SVC_F_NODEPORT, "nodeport"),
        (SVC_F_SOURCE_RANGES, "source-ranges"),
        (SVC_F_NO_LOCAL_DROP, "drop-no-local"),
    ] {
        if f & bit != 0 {
            v.push(n);
        }
    }
    v.join(",")
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// What to show.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum What {
    /// Every frontend: address, kind, service, scheduler, backends, counters.
    Services,
    /// Every backend: address, state, counters.
    Backends,
    /// The Maglev table of a service port: slots per backend (`--slots` for all).
    Maglev {
        /// `namespace/name:port` (port name, or number when unnamed).
        service: String,
        /// Also list every slot.
        #[arg(long)]
        slots: bool,
    },
    /// Conntrack entries (both directions of every flow).
    Conntrack,
    /// sessionAffinity ClientIP entries.
    Affinity,
    /// Packets by verdict reason, and per-frontend counters.
    Stats,
    /// Which backend a flow would hit, and why.
    Explain {
        /// Client `addr:port` (`[v6]:port`).
        client: SocketAddr,
        /// Frontend `addr:port`.
        frontend: SocketAddr,
        /// tcp or udp.
        protocol: String,
    },
}

struct View {
    maps: Maps,
    names: HashMap<u32, FrontendInfo>,
}

impl View {
    fn service_name(&self, id: u32) -> String {
        self.names.get(&id).map(name_of).unwrap_or_else(|| format!("#{id}"))
    }

    fn backend_name(&self, id: u32) -> String {
        match self.maps.backend(id) {
            Some(b) => addr_port(&b.addr, b.port),
            None => format!("#{id} (deleted)"),
        }
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.iter().copied());
    t
}

/// Runs one dump against the maps pinned under `pin_dir`.
pub fn run(pin_dir: &std::path::Path, what: &What, format: Format) -> anyhow::Result<String> {
    let maps = Maps::open_pinned(pin_dir).with_context(|| {
        format!("opening the maps pinned under {} (is the agent running, or did it run?)", pin_dir.display())
    })?;
    let names = maps.frontends().into_iter().collect();
    let v = View { maps, names };
    let (json, table) = match what {
        What::Services => services(&v)?,
        What::Backends => backends(&v)?,
        What::Maglev { service, slots } => maglev(&v, service, *slots)?,
        What::Conntrack => conntrack(&v),
        What::Affinity => affinity(&v),
        What::Stats => stats(&v)?,
        What::Explain { client, frontend, protocol } => explain(&v, *client, *frontend, protocol)?,
    };
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&json)? + "\n",
        Format::Table => table.to_string() + "\n",
    })
}

fn sorted_services(v: &View) -> Vec<(ServiceKey, Service)> {
    let mut s = v.maps.services();
    s.sort_by_key(|(k, svc)| (v.service_name(svc.id), k.scope, ip(&k.addr), u16::from_be(k.port)));
    s
}

fn services(v: &View) -> anyhow::Result<(Value, Table)> {
    let mut t = table(&[
        "ID",
        "FRONTEND",
        "KIND",
        "SCOPE",
        "SERVICE",
        "SCHEDULER",
        "FLAGS",
        "BACKENDS",
        "WEIGHTS",
        "TABLE",
        "PACKETS",
        "BYTES",
    ]);
    let mut out = Vec::new();
    for (k, s) in sorted_services(v) {
        let kind = v.names.get(&s.id).and_then(|i| Kind::from_number(i.kind)).map(Kind::name).unwrap_or("?");
        let scope = if k.scope == SCOPE_INTERNAL { "internal" } else { "external" };
        let scheduler = Scheduler::from_number(s.scheduler);
        let sched = scheduler.map(Scheduler::long_name).unwrap_or("?");
        let c = v.maps.service_stats(s.id)?;
        let slots = v.maps.region_slots(&s)?;
        let parts = Parts::of(&s, &slots);
        let backends: Vec<String> = parts.list.iter().map(|id| v.backend_name(*id)).collect();
        let weights: Vec<u32> = (0..parts.list.len()).map(|i| parts.weight(i)).collect();
        let maglev = scheduler.is_some_and(Scheduler::maglev);
        t.add_row(vec![
            s.id.to_string(),
            frontend_addr(&k),
            kind.to_string(),
            scope.to_string(),
            v.service_name(s.id),
            scheduler.map(Scheduler::ipvs_name).unwrap_or("?").to_string(),
            flag_names(s.flags),
            s.count.to_string(),
            if parts.weights.is_empty() {
                "-".to_string()
            } else {
                weights.iter().map(u32::to_string).collect::<Vec<_>>().join(":")
            },
            s.table_len.to_string(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
        out.push(json!({
            "id": s.id, "service": v.service_name(s.id), "kind": kind, "address": ip(&k.addr).to_string(),
            "port": u16::from_be(k.port), "protocol": proto_name(k.proto), "scope": scope, "scheduler": sched,
            "ipvs_scheduler": scheduler.map(Scheduler::ipvs_name), "flags": flag_names(s.flags),
            "affinity_timeout_s": s.affinity_timeout_s, "maglev_size": if maglev { s.table_len } else { 0 },
            "table_len": s.table_len, "backends": backends, "weights": weights, "packets": c.packets, "bytes": c.bytes,
        }));
    }
    Ok((Value::Array(out), t))
}

fn backends(v: &View) -> anyhow::Result<(Value, Table)> {
    // How many frontends list each backend for new flows.
    let mut refs: HashMap<u32, usize> = HashMap::new();
    for (_, s) in v.maps.services() {
        for id in v.maps.region_slots(&s)?.iter().take(s.count as usize) {
            *refs.entry(*id).or_default() += 1;
        }
    }
    let mut t = table(&["ID", "BACKEND", "STATE", "NODE", "FRONTENDS", "CONNECTIONS", "PACKETS", "BYTES"]);
    let mut out = Vec::new();
    for (id, b) in v.maps.backends() {
        let state = match b.state {
            BACKEND_ACTIVE => "active",
            BACKEND_TERMINATING => "terminating",
            _ => "?",
        };
        let node = if b.flags & BACKEND_F_NODE_LOCAL != 0 { "local" } else { "remote" };
        let c = v.maps.backend_stats(id)?;
        let n = refs.get(&id).copied().unwrap_or(0);
        // Established TCP connections through this node (conntrack's count).
        let conns = v.maps.conntrack_table().connections(id);
        t.add_row(vec![
            id.to_string(),
            addr_port(&b.addr, b.port),
            state.into(),
            node.into(),
            n.to_string(),
            conns.to_string(),
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
        out.push(json!({"id": id, "backend": addr_port(&b.addr, b.port), "state": state, "node": node,
            "frontends": n, "connections": conns, "packets": c.packets, "bytes": c.bytes}));
    }
    Ok((Value::Array(out), t))
}

fn maglev(v: &View, service: &str, all_slots: bool) -> anyhow::Result<(Value, Table)> {
    let found: Vec<(ServiceKey, Service)> =
        sorted_services(v).into_iter().filter(|(_, s)| v.service_name(s.id) == service).collect();
    if found.is_empty() {
        let known: std::collections::BTreeSet<String> = v.names.values().map(name_of).collect();
        bail!("no frontend of {service}; known: {}", known.into_iter().collect::<Vec<_>>().join(", "));
    }
    let mut t = table(&["FRONTEND", "M", "BACKEND", "SLOTS", "SHARE"]);
    let mut out = Vec::new();
    for (k, s) in found {
        let region = v.maps.region_slots(&s)?;
        let maglev = Scheduler::from_number(s.scheduler).is_some_and(Scheduler::maglev);
        let tab: Vec<u32> = if maglev { Parts::of(&s, &region).table.to_vec() } else { Vec::new() };
        let m = tab.len() as u32;
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for id in &tab {
            *per.entry(v.backend_name(*id)).or_default() += 1;
        }
        for (b, n) in &per {
            let share = if m > 0 { *n as f64 * 100.0 / m as f64 } else { 0.0 };
            t.add_row(vec![frontend_addr(&k), m.to_string(), b.clone(), n.to_string(), format!("{share:.2}%")]);
        }
        if m == 0 {
            t.add_row(vec![frontend_addr(&k), "0".into(), "(not Maglev, or no backends)".into(), "".into(), "".into()]);
        }
        if all_slots {
            for (i, id) in tab.iter().enumerate() {
                t.add_row(vec![frontend_addr(&k), format!("slot {i}"), v.backend_name(*id), "".into(), "".into()]);
            }
        }
        out.push(json!({"frontend": frontend_addr(&k), "m": m, "slots_per_backend": per,
            "table": if all_slots { json!(tab) } else { Value::Null }}));
    }
    Ok((Value::Array(out), t))
}

fn conntrack(v: &View) -> (Value, Table) {
    let now = now_ns();
    let mut entries = v.maps.conntrack();
    entries.sort_by_key(|(k, e)| (e.rev_nat_id, e.flags & CT_F_REPLY, ip(&k.src), u16::from_be(k.sport)));
    let mut t = table(&["SOURCE", "DESTINATION", "PROTO", "DIR", "SERVICE", "BACKEND", "NAT", "STATE", "IDLE"]);
    let mut out = Vec::new();
    for (k, e) in entries {
        let dir = if e.flags & CT_F_REPLY != 0 { "reply" } else { "forward" };
        let nat = if e.flags & CT_F_SNAT != 0 {
            format!("snat {}", addr_port(&e.nat_addr, e.nat_port))
        } else {
            String::new()
        };
        let idle = secs_since(e.last_seen_ns, now);
        t.add_row(vec![
            addr_port(&k.src, k.sport),
            addr_port(&k.dst, k.dport),
            proto_name(k.proto).into(),
            dir.into(),
            v.service_name(e.rev_nat_id),
            v.backend_name(e.backend_id),
            nat.clone(),
            state_name(&e).into(),
            format!("{idle:.0}s"),
        ]);
        out.push(json!({"source": addr_port(&k.src, k.sport), "destination": addr_port(&k.dst, k.dport),
            "protocol": proto_name(k.proto), "direction": dir, "service": v.service_name(e.rev_nat_id),
            "backend": v.backend_name(e.backend_id), "nat": nat, "state": state_name(&e), "idle_s": idle}));
    }
    (Value::Array(out), t)
}

fn affinity(v: &View) -> (Value, Table) {
    let now = now_ns();
    let mut t = table(&["CLIENT", "SERVICE", "BACKEND", "IDLE"]);
    let mut out = Vec::new();
    for (k, a) in v.maps.affinity() {
        let idle = secs_since(a.last_used_ns, now);
        // Socket-LB keys a network namespace, not an address.
        let client = match datapath_common::netns_of_client(&k.client) {
            Some(cookie) => format!("netns:{cookie}"),
            None => ip(&k.client).to_string(),
        };
        t.add_row(vec![
            client.clone(),
            v.service_name(k.service_id),
            v.backend_name(a.backend_id),
            format!("{idle:.0}s"),
        ]);
        out.push(json!({"client": client, "service": v.service_name(k.service_id),
            "backend": v.backend_name(a.backend_id), "idle_s": idle}));
    }
    (Value::Array(out), t)
}

fn stats(v: &View) -> anyhow::Result<(Value, Table)> {
    let verdicts = v.maps.verdicts()?;
    let mut t = table(&["VERDICT", "PACKETS"]);
    let mut by = serde_json::Map::new();
    for (i, n) in verdicts.iter().enumerate() {
        t.add_row(vec![verdict::NAMES[i].to_string(), n.to_string()]);
        by.insert(verdict::NAMES[i].into(), json!(n));
    }
    let ct = v.maps.conntrack_len();
    t.add_row(vec!["conntrack entries".to_string(), ct.to_string()]);
    let table_ = v.maps.conntrack_table();
    let capacity = table_.capacity();
    t.add_row(vec!["conntrack flows / capacity".to_string(), format!("{} / {capacity}", ct / 2)]);
    let mut events = serde_json::Map::new();
    for (name, n) in datapath_common::ct_table::event::NAMES.iter().zip(table_.events()) {
        t.add_row(vec![format!("conntrack {name}"), n.to_string()]);
        events.insert((*name).into(), json!(n));
    }
    let cfg = v.maps.config()?;
    let cache = cfg.flags & CFG_F_NO_NEXT_HOP_CACHE == 0;
    t.add_row(vec!["route epoch".to_string(), cfg.route_epoch.to_string()]);
    t.add_row(vec!["next-hop cache".to_string(), if cache { "per backend" } else { "off (ip rules)" }.to_string()]);
    Ok((
        json!({"verdicts": by, "conntrack_entries": ct, "conntrack_flows": ct / 2, "conntrack_capacity": capacity,
            "conntrack_events": events, "route_epoch": cfg.route_epoch, "next_hop_cache": cache}),
        t,
    ))
}

fn explain(v: &View, client: SocketAddr, frontend: SocketAddr, protocol: &str) -> anyhow::Result<(Value, Table)> {
    let proto = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => datapath_common::PROTO_TCP,
        "udp" => datapath_common::PROTO_UDP,
        p => bail!("protocol {p:?}: expected tcp or udp"),
    };
    let (caddr, vaddr) = (map_addr(client.ip()), map_addr(frontend.ip()));
    let (sport, dport) = (client.port().to_be(), frontend.port().to_be());
    let mut lines: Vec<String> = Vec::new();
    let mut answer = json!(null);
    for scope in [SCOPE_INTERNAL, datapath_common::SCOPE_EXTERNAL] {
        let key = ServiceKey { addr: vaddr, port: dport, proto, scope };
        let Some(svc) = v.maps.service(&key) else {
            continue;
        };
        let hook =
            if scope == SCOPE_INTERNAL { "TC (internal scope)" } else { "XDP, and TC as a fallback (external scope)" };
        let name = v.service_name(svc.id);
        lines.push(format!("{frontend}/{protocol} is frontend #{} of {name}, matched by {hook}", svc.id));
        let ct_key = CtKey { src: caddr, dst: vaddr, sport, dport, proto, _pad: [0; 3] };
        if let Some(e) = v.maps.conntrack_get(&ct_key).filter(|e| !ct::expired(e, now_ns())) {
            let b = v.backend_name(e.backend_id);
            lines.push(format!(
                "→ backend {b}: existing conntrack entry ({}, idle {:.0}s)",
                state_name(&e),
                secs_since(e.last_seen_ns, now_ns())
            ));
            answer = json!({"service": name, "backend": b, "reason": "conntrack"});
            break;
        }
        if svc.flags & SVC_F_AFFINITY != 0 {
            let ak = AffinityKey { client: caddr, service_id: svc.id };
            if let Some(a) = v.maps.affinity_get(&ak) {
                let idle = secs_since(a.last_used_ns, now_ns());
                if idle < svc.affinity_timeout_s as f64
                    && v.maps.backend(a.backend_id).is_some_and(|b| b.state == BACKEND_ACTIVE)
                {
                    let b = v.backend_name(a.backend_id);
                    lines.push(format!(
                        "→ backend {b}: sessionAffinity ClientIP entry (used {idle:.0}s ago, timeout {}s)",
                        svc.affinity_timeout_s
                    ));
                    answer = json!({"service": name, "backend": b, "reason": "affinity"});
                    break;
                }
            }
        }
        let slots = v.maps.region_slots(&svc)?;
        let parts = Parts::of(&svc, &slots);
        let flow = Flow { saddr: &caddr, sport, dport, proto };
        let conns = |id: u32| v.maps.conntrack_table().connections(id);
        let sched = Scheduler::from_number(svc.scheduler);
        let sched_name = sched.map(Scheduler::ipvs_name).unwrap_or("?");
        match pick(&svc, &slots, flow, [0; 3], conns) {
            Pick::Reject if svc.flags & SVC_F_NO_LOCAL_DROP != 0 => {
                lines.push(
                    "→ no endpoint on this node (Local policy; the Service has endpoints elsewhere): the flow is dropped"
                        .into(),
                );
                answer = json!({"service": name, "backend": null, "reason": "no_local_endpoint"});
            }
            Pick::Reject => {
                lines.push("→ no eligible backend: the flow is rejected (TCP RST / ICMP unreachable)".into());
                answer = json!({"service": name, "backend": null, "reason": "no_backend"});
            }
            Pick::Maglev { slot, backend } => {
                let b = v.backend_name(backend);
                let by = if sched == Some(Scheduler::SourceHash) {
                    "source hash (the client address alone)"
                } else {
                    "Maglev (the flow hash)"
                };
                lines.push(format!("→ backend {b}: new flow, {by}, slot {slot} of {}", svc.table_len));
                let reason = if sched == Some(Scheduler::SourceHash) { "source_hash" } else { "maglev" };
                answer = json!({"service": name, "backend": b, "reason": reason, "slot": slot, "m": svc.table_len});
            }
            Pick::List { .. } | Pick::LeastConnections { .. } => {
                let details: Vec<Value> = parts
                    .list
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        json!({"backend": v.backend_name(*id), "weight": parts.weight(i), "connections": conns(*id)})
                    })
                    .collect();
                let all: Vec<String> = parts.list.iter().map(|id| v.backend_name(*id)).collect();
                let shown: Vec<String> = parts
                    .list
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        format!("{} (weight {}, {} active)", v.backend_name(*id), parts.weight(i), conns(*id))
                    })
                    .collect();
                // `reason` keeps the values of before the scheduler set
                // (round-robin, random); `candidates` the addresses.
                let (reason, how) = match sched {
                    Some(Scheduler::Random) => ("random", "random: not predictable"),
                    Some(Scheduler::RoundRobin) => ("round-robin (per CPU)", "depends on the CPU's cursor"),
                    Some(Scheduler::WeightedRoundRobin) => {
                        ("weighted round-robin (per CPU)", "depends on the CPU's cursor")
                    }
                    _ => ("least connections", "depends on live counts (two random candidates)"),
                };
                lines.push(format!("→ new flow, {sched_name} ({how}) over {}", shown.join(", ")));
                answer = json!({"service": name, "backend": null, "reason": reason, "scheduler": sched_name,
                    "candidates": all, "candidate_details": details});
            }
        }
        break;
    }
    if lines.is_empty() {
        lines.push(format!("{frontend}/{protocol} is not a frontend: the packet passes untouched"));
        answer = json!({"service": null, "backend": null, "reason": "not_a_service"});
    }
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    for l in &lines {
        t.add_row(vec![l.clone()]);
    }
    Ok((json!({"explanation": lines, "answer": answer}), t))
}
