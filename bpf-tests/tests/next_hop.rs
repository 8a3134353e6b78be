// SPDX-License-Identifier: MIT OR Apache-2.0
//! The new-flow path's next-hop cache (issue #13, deliverable 3), through
//! BPF_PROG_TEST_RUN on XDP and both TC hooks: the first new flow to a
//! backend looks its route up and caches it; the next ones take it from the
//! cache (seen here because a neighbour changed under it goes unnoticed)
//! until the agent moves `Config::route_epoch`, the cache entry is a second
//! old, or a packet does not fit the cached MTU. Katran keeps no FIB at all
//! (one gateway MAC for everything); Cilium looks the FIB up per packet. The
//! agent's side, bumping the epoch on a real neighbour change, is tested in
//! `agent.rs`.

use bpf_tests::{
    NEIGH_MAC, OUT_MAC, Prog, Verdict, addr16,
    fixtures::*,
    packet::{ACK, CLIENT_MAC, NODE_MAC, Pkt, SYN, icmp_error, with_macs},
};
use datapath_common::{CFG_F_NO_NEXT_HOP_CACHE, Config, NEXT_HOP_TTL_NS, SCHED_MAGLEV};
use std::time::Duration;

const MAC2: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x02];
const MAC3: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x03];

/// Gives the backend's address a new MAC on the FIB environment's link.
fn move_neighbour(w: &World, backend: u32, mac: [u8; 6]) {
    let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    w.env.ns.exec(&["ip", "neigh", "replace", &backend_addr(backend), "lladdr", &mac, "nud", "permanent", "dev", "o0"]);
}

/// A new flow's SYN from client port `sport`, and where it went out to.
fn new_flow(w: &mut World, prog: Prog, v6: bool, sport: u16, backend: u32) -> [u8; 6] {
    let (vip, client) = family(v6);
    let syn = Pkt::tcp(client, sport, vip, 80, SYN);
    let (v, out) = w.lb.run(prog, &syn.build());
    assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6} sport={sport}");
    let mac: [u8; 6] = out[..6].try_into().unwrap();
    assert_eq!(out, syn.dst(&backend_addr(backend), 8080).macs(OUT_MAC, mac).hop().build(), "{prog:?} v6={v6}");
    mac
}

#[test]
fn new_flows_reuse_their_backends_next_hop_until_the_route_epoch_moves_or_it_ages() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        let b = backends(v6)[0];
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &[b]);
        assert_eq!(new_flow(&mut w, prog, v6, 40000, b), NEIGH_MAC, "{prog:?} v6={v6}: looked up");
        let nh = w.lb.dp.next_hop(b, prog != Prog::Xdp).unwrap();
        assert_ne!(nh.filled_ns, 0, "{prog:?} v6={v6}: cached");
        assert_eq!((nh.addr, nh.ifindex), (addr16(&backend_addr(b)), w.env.out_ifindex));
        assert_eq!(nh.macs, [NEIGH_MAC, OUT_MAC].concat()[..], "{prog:?} v6={v6}");

        // The neighbour moves and nobody says so: the cache is what is used.
        move_neighbour(&w, b, MAC2);
        assert_eq!(new_flow(&mut w, prog, v6, 40001, b), NEIGH_MAC, "{prog:?} v6={v6}: from the cache");
        assert_eq!(w.lb.dp.next_hop(b, prog != Prog::Xdp).unwrap(), nh, "{prog:?} v6={v6}: not refilled");

        // The agent announces a route change: the next new flow looks again.
        let cfg = w.lb.dp.config().unwrap();
        w.lb.dp.set_config(&Config { route_epoch: cfg.route_epoch + 1, ..cfg }).unwrap();
        assert_eq!(new_flow(&mut w, prog, v6, 40002, b), MAC2, "{prog:?} v6={v6}: epoch moved");

        // Unannounced, a change applies once the entry is a TTL old.
        move_neighbour(&w, b, MAC3);
        assert_eq!(new_flow(&mut w, prog, v6, 40003, b), MAC2, "{prog:?} v6={v6}");
        std::thread::sleep(Duration::from_nanos(NEXT_HOP_TTL_NS) + Duration::from_millis(100));
        assert_eq!(new_flow(&mut w, prog, v6, 40004, b), MAC3, "{prog:?} v6={v6}: aged out");
        assert_eq!(w.lb.verdict("new_flow"), 5);
    });
}

/// What the agent sets while an `ip rule` selects by source, port or
/// interface: a route per new flow.
#[test]
fn with_the_cache_off_every_new_flow_looks_its_route_up() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        let b = backends(v6)[0];
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &[b]);
        let cfg = w.lb.dp.config().unwrap();
        w.lb.dp.set_config(&Config { flags: cfg.flags | CFG_F_NO_NEXT_HOP_CACHE, ..cfg }).unwrap();
        assert_eq!(new_flow(&mut w, prog, v6, 40000, b), NEIGH_MAC);
        move_neighbour(&w, b, MAC2);
        assert_eq!(new_flow(&mut w, prog, v6, 40001, b), MAC2, "{prog:?} v6={v6}: looked up again");
        assert_eq!(w.lb.dp.next_hop(b, prog != Prog::Xdp).unwrap().filled_ns, 0, "{prog:?} v6={v6}: nothing cached");
    });
}

/// The cache never skips the MTU check: a first packet longer than what
/// the cached route is known to carry is checked by a lookup, and answered
/// (mirrors `mtu.rs`, with the cache warm).
#[test]
fn a_cached_next_hop_never_carries_a_packet_too_big_for_the_route() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        w.env.ns.exec(&["ip", "link", "set", "o0", "mtu", "1280"]);
        let b = backends(v6)[0];
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &[b]);
        let (vip, client) = family(v6);
        assert_eq!(new_flow(&mut w, prog, v6, 40000, b), NEIGH_MAC);
        let data = vec![0x42; 1400 - if v6 { 60 } else { 40 }];
        let input = Pkt::tcp(client, 40001, vip, 80, ACK).payload(&data).build();
        let (v, out) = w.lb.run(prog, &input);
        assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6}: answered");
        let (ty, code, rest, quote) =
            if v6 { (2, 0, 1280u32.to_be_bytes(), 48) } else { (3, 4, [0, 0, 0x05, 0x00], 28) };
        assert_eq!(out, with_macs(icmp_error(vip, client, ty, code, rest, &input, quote), NODE_MAC, CLIENT_MAC));
        assert_eq!(w.lb.verdict("frag_needed"), 1, "{prog:?} v6={v6}");
        // Small new flows still take the cached route (a moved neighbour
        // goes unseen).
        move_neighbour(&w, b, MAC2);
        assert_eq!(new_flow(&mut w, prog, v6, 40002, b), NEIGH_MAC, "{prog:?} v6={v6}: from the cache");
        assert_eq!(w.lb.verdict("new_flow"), 2, "{prog:?} v6={v6}");
    });
}

/// A backend id given a new address (the writer reuses ids) never takes the
/// old address's route.
#[test]
fn a_backend_id_with_a_new_address_takes_a_new_route() {
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, false, SCHED_MAGLEV, 0, &[1]);
        assert_eq!(new_flow(&mut w, prog, false, 40000, 1), NEIGH_MAC, "{prog:?}");
        // Backend 1 now lives at backend 2's address, whose neighbour has another MAC.
        move_neighbour(&w, 2, MAC2);
        w.lb.backend(1, &backend_addr(2), 8080, datapath_common::BACKEND_ACTIVE, 0);
        let (vip, client) = family(false);
        let syn = Pkt::tcp(client, 40001, vip, 80, SYN);
        let (v, out) = w.lb.run(prog, &syn.build());
        assert_eq!(v, Verdict::Redirect);
        assert_eq!(out, syn.dst(&backend_addr(2), 8080).macs(OUT_MAC, MAC2).hop().build(), "{prog:?}");
    }
}

/// The FIB never forwards a packet with an IPv6 link-local source
/// (`BPF_FIB_LKUP_RET_NOT_FWDED`: the kernel gets it); a warm cache must not
/// forward it either.
#[test]
fn a_link_local_source_is_never_forwarded_by_the_cache() {
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        let b = backends(true)[0];
        vip_service(&mut w, prog, true, SCHED_MAGLEV, 0, &[b]);
        assert_eq!(new_flow(&mut w, prog, true, 40000, b), NEIGH_MAC, "{prog:?}");
        let (vip, _) = family(true);
        let syn = Pkt::tcp("fe80::99", 40001, vip, 80, SYN);
        assert_eq!(w.lb.run(prog, &syn.build()).0, Verdict::Pass, "{prog:?}: to the kernel");
        assert_eq!(w.lb.verdict("fib_pass"), 1, "{prog:?}");
    }
}
