// SPDX-License-Identifier: MIT OR Apache-2.0
//! FILTER, the datapath's "maybe ours" test before conntrack
//! (`datapath_common::filter`): what it lets through follows the frontends
//! and backends the agent writes, and what it stops never reaches conntrack.
//! kube-proxy's equivalent is the KUBE-SERVICES chain, which matches only a
//! Service's address and port (and KUBE-NODEPORTS a node port); everything
//! else falls through untouched.

use bpf_tests::{
    Prog, Verdict, addr16,
    fixtures::*,
    packet::{ACK, PSH, Pkt},
    svc_key,
};
use datapath_common::{BACKEND_ACTIVE, CtEntry, PROTO_TCP, PROTO_UDP, SCHED_MAGLEV, ct};
use xlb::filter::Dir;

/// A conntrack entry pinning `client:40000 → dst:80` to backend 1 — live,
/// established — for a destination that is no frontend: the filter must keep
/// the packet from it until a frontend with that address and port exists.
#[test]
fn packets_to_no_frontend_and_from_no_backend_never_reach_conntrack() {
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, false, SCHED_MAGLEV, 0, &backends(false));
        let other = "10.0.9.9";
        let key = tcp_key(CLIENT4, 40000, other, 80);
        let entry = CtEntry {
            last_seen_ns: xlb::dump::now_ns(),
            backend_id: 1,
            rev_nat_id: 10,
            state: ct::STATE_ESTABLISHED,
            ..CtEntry::default()
        };
        w.lb.dp.conntrack_insert(&key, &entry).unwrap();
        let ack = Pkt::tcp(CLIENT4, 40000, other, 80, ACK | PSH).payload(b"x");
        let (v, out) = w.lb.run(prog, &ack.build());
        assert_eq!((v, out), (Verdict::Pass, ack.build()), "{prog:?}: not a frontend, untouched");
        assert_eq!(w.lb.verdict("pass"), 1);
        assert_eq!(w.lb.verdict("ct_hit"), 0, "{prog:?}: conntrack was not consulted");

        // The same packet once `other:80` is a frontend: the entry applies.
        let k = svc_key(other, 80, PROTO_TCP, scope(prog));
        w.lb.dp.set_service(k, &spec(30, SCHED_MAGLEV, 0, &[1])).unwrap();
        let (v, out) = w.lb.run(prog, &ack.build());
        assert_eq!(v, Verdict::Redirect, "{prog:?}");
        assert_eq!(out, dnatted(&ack, 1));
        assert_eq!(w.lb.verdict("ct_hit"), 1);

        // Removed again: passed again, without a lookup.
        w.lb.dp.remove_service(&k).unwrap();
        let (v, _) = w.lb.run(prog, &ack.build());
        assert_eq!(v, Verdict::Pass);
        assert_eq!(w.lb.verdict("ct_hit"), 1);
    }
}

/// The bits follow the maps: a frontend address:port counts once per
/// protocol and scope it serves, a backend once per id, and a bit is clear
/// only when the last entry using it is gone.
#[test]
fn filter_bits_follow_frontends_and_backends() {
    let mut w = world();
    let vip = addr16(VIP4);
    let passes = |w: &World, dir, a: &[u8; 16], port: u16| w.lb.dp.filter_passes(dir, a, port.to_be());
    assert!(!passes(&w, Dir::Dst, &vip, 80));
    vip_service(&mut w, Prog::Xdp, false, SCHED_MAGLEV, 0, &backends(false));
    assert!(passes(&w, Dir::Dst, &vip, 80), "TCP and UDP frontends on VIP:80");
    assert!(!passes(&w, Dir::Dst, &vip, 81) && !passes(&w, Dir::Src, &vip, 80));
    w.lb.dp.remove_service(&svc_key(VIP4, 80, PROTO_TCP, scope(Prog::Xdp))).unwrap();
    assert!(passes(&w, Dir::Dst, &vip, 80), "the UDP frontend still uses it");
    w.lb.dp.remove_service(&svc_key(VIP4, 80, PROTO_UDP, scope(Prog::Xdp))).unwrap();
    assert!(!passes(&w, Dir::Dst, &vip, 80), "the last one gone");

    let b1 = addr16(&backend_addr(1));
    assert!(passes(&w, Dir::Src, &b1, 8080), "world() wrote backend 1");
    w.lb.backend(1, &backend_addr(1), 9090, BACKEND_ACTIVE, 0);
    assert!(!passes(&w, Dir::Src, &b1, 8080) && passes(&w, Dir::Src, &b1, 9090), "rewritten with a new port");
    w.lb.dp.remove_backend(1).unwrap();
    assert!(!passes(&w, Dir::Src, &b1, 9090));
}
