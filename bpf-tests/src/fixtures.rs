// SPDX-License-Identifier: MIT OR Apache-2.0
//! The packet-fixture world shared by the BPF_PROG_TEST_RUN suites
//! (`tests/packets.rs`, `tests/icmp.rs`): a FIB namespace, a datapath with
//! backends 1-4 (IPv4) and 11-14 (IPv6) written through the agent's own
//! writer, services programmed the same way, and the host mirror of backend
//! selection to predict each new flow's backend.

use datapath_common::{BACKEND_ACTIVE, CtKey, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey};
use xlb::{ServiceSpec, select};

use crate::{
    FibEnv, Lb, NEIGH_MAC, OUT_MAC, Prog, addr16,
    packet::{L4, Pkt},
    svc_key,
};

pub const VIP4: &str = "10.96.0.10";
pub const VIP6: &str = "fd00:96::10";
pub const CLIENT4: &str = "192.0.2.100";
pub const CLIENT6: &str = "2001:db8::100";
pub const NODE4: &str = "192.0.2.1";
pub const NODE6: &str = "2001:db8::1";
/// IPv4 backends 1..=4 are 10.0.1.11..14, IPv6 backends 11..=14 are fd00::11..14.
pub const NEIGHBOURS: &[&str] = &[
    "10.0.1.11",
    "10.0.1.12",
    "10.0.1.13",
    "10.0.1.14",
    "fd00::11",
    "fd00::12",
    "fd00::13",
    "fd00::14",
    CLIENT4,
    CLIENT6,
];

pub fn family(v6: bool) -> (&'static str, &'static str) {
    if v6 { (VIP6, CLIENT6) } else { (VIP4, CLIENT4) }
}

pub fn backend_addr(id: u32) -> String {
    if id >= 11 { format!("fd00::{id}") } else { format!("10.0.1.{}", 10 + id) }
}

pub fn scope(prog: Prog) -> u8 {
    match prog {
        Prog::Xdp => SCOPE_EXTERNAL,
        Prog::TcIngress | Prog::TcEgress => SCOPE_INTERNAL,
    }
}

pub struct World {
    pub env: FibEnv,
    pub lb: Lb,
}

/// Backends 1-4 (IPv4) and 11-14 (IPv6) on port 8080, all active; no SNAT
/// address configured (so XDP flows keep the client address).
pub fn world() -> World {
    world_with(Lb::new())
}

/// [`world`] with its maps pinned under `dir` (reused when there).
pub fn world_pinned(dir: &std::path::Path) -> World {
    world_with(Lb::pinned(dir))
}

fn world_with(mut lb: Lb) -> World {
    let env = FibEnv::new(NEIGHBOURS);
    for id in 1..=4 {
        lb.backend(id, &backend_addr(id), 8080, BACKEND_ACTIVE, 0);
    }
    for id in 11..=14 {
        lb.backend(id, &backend_addr(id), 8080, BACKEND_ACTIVE, 0);
    }
    World { env, lb }
}

pub fn spec(id: u32, scheduler: u8, flags: u8, backends: &[u32]) -> ServiceSpec {
    ServiceSpec {
        id,
        scheduler,
        flags,
        affinity_timeout_s: 10800,
        backends: backends.to_vec(),
        weights: Vec::new(),
        maglev_size: None,
    }
}

pub fn backends(v6: bool) -> Vec<u32> {
    if v6 { vec![11, 12] } else { vec![1, 2] }
}

/// Programs the VIP:80 service (TCP and UDP) for `prog`'s scope; returns its key.
pub fn vip_service(w: &mut World, prog: Prog, v6: bool, sched: u8, flags: u8, list: &[u32]) -> ServiceKey {
    let (vip, _) = family(v6);
    let id = if v6 { 20 } else { 10 };
    for (i, proto) in [PROTO_TCP, PROTO_UDP].into_iter().enumerate() {
        let k = svc_key(vip, 80, proto, scope(prog));
        w.lb.dp.set_service(k, &spec(id + i as u32, sched, flags, list)).expect("set service");
    }
    svc_key(vip, 80, PROTO_TCP, scope(prog))
}

/// Which backend the host mirror says a new flow gets.
pub fn expected_backend(w: &World, key: &ServiceKey, p: &Pkt) -> u32 {
    let svc = w.lb.dp.service(key).expect("service programmed");
    let slots = w.lb.dp.region_slots(&svc).unwrap();
    let proto = match p.l4 {
        L4::Tcp { .. } => PROTO_TCP,
        L4::Udp => PROTO_UDP,
    };
    let saddr = addr16(&p.src.to_string());
    let flow = select::Flow { saddr: &saddr, sport: p.sport.to_be(), dport: p.dport.to_be(), proto };
    select::pick(&svc, &slots, flow, [0; 3], |_| 0).backend().expect("no backend")
}

/// The packet as the datapath must emit it after DNAT to `backend` and FIB
/// redirect (routed: TTL / hop limit one less).
pub fn dnatted(p: &Pkt, backend: u32) -> Vec<u8> {
    p.clone().dst(&backend_addr(backend), 8080).macs(OUT_MAC, NEIGH_MAC).hop().build()
}

/// The CONNTRACK key of a TCP packet src:sport → dst:dport.
pub fn tcp_key(src: &str, sport: u16, dst: &str, dport: u16) -> CtKey {
    CtKey {
        src: addr16(src),
        dst: addr16(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

pub fn both_families_both_hooks(f: impl Fn(Prog, bool)) {
    for prog in Prog::ALL {
        for v6 in [false, true] {
            f(prog, v6);
        }
    }
}
