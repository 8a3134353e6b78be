// SPDX-License-Identifier: MIT OR Apache-2.0
//! The fuzzer's fixed world and its valid seed packets, one or more per
//! path of the pipeline, both families.
//!
//! World: the packet fixtures' FIB namespace and backends, SNAT to the
//! node address (so XDP flows to the "remote" backends are SNATed), and per
//! scope (XDP external, TC internal) the VIP:80 service (TCP and UDP, two
//! backends) and the VIP:81 service with no backend (rejects). Setup
//! packets establish the flows the established / reply / ICMP / later
//! fragment seeds belong to; each hook uses its own client ports, so its
//! flows are its own.

use std::collections::HashMap;

use datapath_common::{PROTO_TCP, PROTO_UDP, SCHED_MAGLEV, SCOPE_EXTERNAL, SCOPE_INTERNAL};

use crate::{
    NEIGH_MAC, OUT_MAC, Prog, addr16,
    fixtures::{CLIENT4, CLIENT6, NODE4, NODE6, VIP4, VIP6, World, backend_addr, spec, world},
    packet::{ACK, PSH, Pkt, SYN, fragment, icmp_error, insert_ipv6_ext},
    svc_key,
};

pub const SNAT_MIN: u16 = 40000;
pub const SNAT_MAX: u16 = 40999;

/// A seed: its class (for the report) and its bytes.
pub struct Seed {
    pub class: &'static str,
    pub frame: Vec<u8>,
}

/// Frontend ids: (external, internal) scope × family × (port 80 TCP, UDP, port 81 TCP, UDP).
fn frontend_id(scope: u8, v6: bool, i: u32) -> u32 {
    10 + 20 * (scope == SCOPE_INTERNAL) as u32 + 10 * v6 as u32 + i
}

/// Builds the world; returns it and every frontend's address and port.
pub fn build() -> (World, HashMap<u32, ([u8; 16], u16)>) {
    let mut w = world();
    w.lb.config_snat(NODE4, NODE6, SNAT_MIN, SNAT_MAX);
    let mut frontends = HashMap::new();
    for scope in [SCOPE_EXTERNAL, SCOPE_INTERNAL] {
        for v6 in [false, true] {
            let (vip, list) = if v6 { (VIP6, vec![11, 12]) } else { (VIP4, vec![1, 2]) };
            for (i, (port, proto, backends)) in [
                (80, PROTO_TCP, list.clone()),
                (80, PROTO_UDP, list.clone()),
                (81, PROTO_TCP, vec![]),
                (81, PROTO_UDP, vec![]),
            ]
            .into_iter()
            .enumerate()
            {
                let id = frontend_id(scope, v6, i as u32);
                w.lb.dp.set_service(svc_key(vip, port, proto, scope), &spec(id, SCHED_MAGLEV, 0, &backends)).unwrap();
                frontends.insert(id, (addr16(vip), port));
            }
        }
    }
    (w, frontends)
}

fn client_port(prog: Prog, n: u16) -> u16 {
    if prog == Prog::Xdp { 41000 + n } else { 42000 + n }
}

/// The packets that establish the seeds' flows (run again after every reset).
pub fn setup(prog: Prog) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let (vip, client) = if v6 { (VIP6, CLIENT6) } else { (VIP4, CLIENT4) };
        out.push(Pkt::tcp(client, client_port(prog, 1), vip, 80, SYN).build());
        out.push(Pkt::udp(client, client_port(prog, 2), vip, 80).payload(b"hello").build());
        out.push(datagram(prog, v6).remove(0));
    }
    out
}

fn datagram(prog: Prog, v6: bool) -> Vec<Vec<u8>> {
    let (vip, client) = if v6 { (VIP6, CLIENT6) } else { (VIP4, CLIENT4) };
    let p = Pkt::udp(client, client_port(prog, 3), vip, 80).payload(&[0x42; 2000]);
    fragment(&p.build(), 1232, 0x0a0b + prog as u32)
}

/// The seeds for `prog`'s flows; `w` has run `setup(prog)`.
pub fn seeds(w: &World, prog: Prog) -> Vec<Seed> {
    let mut s = Vec::new();
    let mut add = |class, frame| s.push(Seed { class, frame });
    for v6 in [false, true] {
        let (vip, client) = if v6 { (VIP6, CLIENT6) } else { (VIP4, CLIENT4) };
        let router = if v6 { "2001:db8::fe" } else { "192.0.2.254" };
        let p1 = client_port(prog, 1);
        add("new_flow", Pkt::tcp(client, client_port(prog, 9), vip, 80, SYN).build());
        add("new_flow", Pkt::udp(client, client_port(prog, 10), vip, 80).payload(b"query").build());
        let est = Pkt::tcp(client, p1, vip, 80, ACK | PSH).payload(b"GET / HTTP/1.1\r\n\r\n");
        add("established", est.build());
        add("vlan", est.clone().vlan(100).build());
        if v6 {
            let mut f = est.build();
            insert_ipv6_ext(&mut f, 14, 60, &[0, 1, 4, 0, 0, 0, 0]);
            insert_ipv6_ext(&mut f, 14, 43, &[0, 0, 0, 0, 0, 0, 0]);
            insert_ipv6_ext(&mut f, 14, 0, &[0, 1, 4, 0, 0, 0, 0]);
            add("ipv6_ext", f);
        } else {
            add("ipv4_options", est.clone().options(8).build());
        }
        // The reply: from the backend the flow got, to the client (or to
        // the node's SNAT port, for a SNATed flow).
        let fwd = w.lb.dp.conntrack_get(&crate::fixtures::tcp_key(client, p1, vip, 80));
        if let Some(e) = fwd {
            let b = w.lb.dp.backend(e.backend_id).expect("the flow's backend");
            let baddr: std::net::IpAddr = if v6 {
                std::net::Ipv6Addr::from(b.addr).into()
            } else {
                std::net::Ipv4Addr::new(b.addr[12], b.addr[13], b.addr[14], b.addr[15]).into()
            };
            let (to, port, class) = if e.nat_port != 0 {
                ((if v6 { NODE6 } else { NODE4 }).to_string(), u16::from_be(e.nat_port), "snat_reply")
            } else {
                (client.to_string(), p1, "reply")
            };
            let reply = Pkt::tcp(&baddr.to_string(), 8080, &to, port, ACK | PSH).payload(b"HTTP/1.1 200 OK\r\n\r\n");
            add(class, reply.clone().macs(NEIGH_MAC, OUT_MAC).build());
            // A router's "fragmentation needed" / "packet too big" about the
            // reply as it left towards the client: addressed to the VIP.
            let left = Pkt::tcp(vip, 80, client, p1, ACK | PSH).payload(&[0x55; 1400]).build();
            let (ty, code, rest) = if v6 { (2, 0, 1280u32.to_be_bytes()) } else { (3, 4, [0, 0, 0x05, 0x00]) };
            add("icmp_error", icmp_error(router, vip, ty, code, rest, &left, 128));
        }
        add("reject", Pkt::tcp(client, client_port(prog, 20), vip, 81, SYN).build());
        add("reject", Pkt::udp(client, client_port(prog, 21), vip, 81).payload(b"nobody").build());
        let frags = datagram(prog, v6);
        add("first_fragment", frags[0].clone());
        add("later_fragment", frags[1].clone());
        add("too_big", Pkt::udp(client, client_port(prog, 22), vip, 80).payload(&[7; 1600]).build());
        add("non_service", Pkt::udp(client, 5000, &backend_addr(if v6 { 11 } else { 1 }), 9999).payload(b"x").build());
    }
    s
}
