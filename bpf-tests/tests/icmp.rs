// SPDX-License-Identifier: MIT OR Apache-2.0
//! ICMP and ICMPv6 errors through BPF_PROG_TEST_RUN: an error quoting a
//! flow xlb translated is translated to follow it (RFC 5508 §3, the kernel's
//! `nf_nat_icmp_reply_translation`), on XDP and both TC hooks, for DNAT,
//! reverse-NAT and SNAT flows; anything else passes byte for byte. Every
//! output is compared with an error built from scratch around the quote the
//! far end must see, and its checksums (outer IPv4, ICMP / ICMPv6 over the
//! pseudo header) are verified independently.

use bpf_tests::{
    NEIGH_MAC, OUT_MAC, Prog, Verdict, addr16,
    fixtures::*,
    packet::{ACK, Pkt, SYN, icmp_error, routed, verify_checksums},
};
use datapath_common::{CT_F_SNAT, PROTO_UDP, SCHED_MAGLEV};

/// A router between xlb and the far end.
const ROUTER4: &str = "198.18.0.1";
const ROUTER6: &str = "2001:db8:ff::1";

fn router(v6: bool) -> &'static str {
    if v6 { ROUTER6 } else { ROUTER4 }
}

/// "Fragmentation needed" (next-hop MTU 1280) or "packet too big" (MTU 1280).
fn too_big(v6: bool) -> (u8, u8, [u8; 4]) {
    if v6 { (2, 0, 1280u32.to_be_bytes()) } else { (3, 4, [0, 0, 0x05, 0x00]) }
}

/// "Port unreachable".
fn port_unreachable(v6: bool) -> (u8, u8, [u8; 4]) {
    if v6 { (1, 4, [0; 4]) } else { (3, 3, [0; 4]) }
}

/// Quote lengths: the minimum (IP header and 8 bytes: ports, and for TCP the
/// sequence number, not the checksum) and what Linux sends (576 bytes in
/// all for IPv4, 1280 for IPv6).
fn quotes(v6: bool) -> [usize; 2] {
    if v6 { [48, 1280 - 48] } else { [28, 576 - 28] }
}

fn err(src: &str, dst: &str, kind: (u8, u8, [u8; 4]), offending: &[u8], quote: usize) -> Vec<u8> {
    icmp_error(src, dst, kind.0, kind.1, kind.2, offending, quote)
}

/// Mirrors the path-MTU case upstream relies on (a router's "fragmentation
/// needed" about the service's replies): the error is addressed to the VIP
/// and quotes VIP → client; it must reach the backend quoting backend → client.
#[test]
fn an_error_about_reply_traffic_reaches_the_backend() {
    both_families_both_hooks(|prog, v6| {
        for quote in quotes(v6) {
            let mut w = world();
            let _in = w.env.enter();
            let key = vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
            let (vip, client) = family(v6);
            let syn = Pkt::tcp(client, 40000, vip, 80, SYN);
            let b = expected_backend(&w, &key, &syn);
            assert_eq!(w.lb.run(prog, &syn.build()).0, Verdict::Redirect);
            let backend = backend_addr(b);
            let data = vec![0x5a; 1400];
            let sent = Pkt::tcp(vip, 80, client, 40000, ACK).payload(&data).ttl(63).build();
            let input = err(router(v6), vip, too_big(v6), &sent, quote);
            let (v, out) = w.lb.run(prog, &input);
            assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6} quote={quote}");
            let as_sent = Pkt::tcp(&backend, 8080, client, 40000, ACK).payload(&data).ttl(63).build();
            let want = routed(err(router(v6), &backend, too_big(v6), &as_sent, quote), OUT_MAC, NEIGH_MAC);
            assert_eq!(out, want, "{prog:?} v6={v6} quote={quote}: outer destination and quote translated");
            verify_checksums(&out);
            assert_eq!(w.lb.verdict("icmp_error_nat"), 1);
        }
    });
}

/// Mirrors upstream's "should be rejected" expectation for UDP through a
/// service whose endpoint has no socket: the backend's port unreachable
/// quotes client → backend; the client must see it come from the VIP,
/// quoting client → VIP, or its socket never gets ECONNREFUSED.
#[test]
fn a_backends_port_unreachable_reaches_the_client_from_the_vip() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let key = bpf_tests::svc_key(vip, 80, PROTO_UDP, scope(prog));
        let dgram = Pkt::udp(client, 5353, vip, 80).payload(b"query");
        let b = expected_backend(&w, &key, &dgram);
        assert_eq!(w.lb.run(prog, &dgram.build()).0, Verdict::Redirect);
        let backend = backend_addr(b);
        let received = Pkt::udp(client, 5353, &backend, 8080).payload(b"query").ttl(63).build();
        let input = err(&backend, client, port_unreachable(v6), &received, 1000);
        let (v, out) = w.lb.run(prog, &input);
        assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6}");
        let as_sent = Pkt::udp(client, 5353, vip, 80).payload(b"query").ttl(63).build();
        let want = routed(err(vip, client, port_unreachable(v6), &as_sent, 1000), OUT_MAC, NEIGH_MAC);
        assert_eq!(out, want, "{prog:?} v6={v6}: source, quote translated to the VIP");
        verify_checksums(&out);
    });
}

/// External traffic SNATed to a remote backend: an error from the backend
/// (to the node's SNAT address) goes back to the client from the VIP; an
/// error from a router about the VIP's replies goes to the backend quoting
/// backend → node:SNAT port.
#[test]
fn errors_of_snatted_flows_follow_both_translations() {
    for v6 in [false, true] {
        let mut w = world();
        let _in = w.env.enter();
        w.lb.config_snat(NODE4, NODE6, 61000, 61015);
        let key = vip_service(&mut w, Prog::Xdp, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let node = if v6 { NODE6 } else { NODE4 };
        let syn = Pkt::tcp(client, 40000, vip, 80, SYN);
        let b = expected_backend(&w, &key, &syn);
        assert_eq!(w.lb.run(Prog::Xdp, &syn.build()).0, Verdict::Redirect);
        let backend = backend_addr(b);
        let (_, fwd) =
            w.lb.dp.conntrack().into_iter().find(|(k, e)| e.flags == CT_F_SNAT && k.src == addr16(client)).unwrap();
        let port = u16::from_be(fwd.nat_port);

        // From the backend, about what it received (node:port → backend).
        let received = Pkt::tcp(node, port, &backend, 8080, ACK).payload(&[1; 200]).ttl(62).build();
        let input = err(&backend, node, port_unreachable(v6), &received, 500);
        let (v, out) = w.lb.run(Prog::Xdp, &input);
        assert_eq!(v, Verdict::Redirect, "v6={v6}");
        let as_sent = Pkt::tcp(client, 40000, vip, 80, ACK).payload(&[1; 200]).ttl(62).build();
        let want = routed(err(vip, client, port_unreachable(v6), &as_sent, 500), OUT_MAC, NEIGH_MAC);
        assert_eq!(out, want, "v6={v6}: the backend's error, back to the client");
        verify_checksums(&out);

        // From a router, about a reply the client was sent (VIP → client).
        let sent = Pkt::tcp(vip, 80, client, 40000, ACK).payload(&[2; 1400]).ttl(63).build();
        let input = err(router(v6), vip, too_big(v6), &sent, quotes(v6)[1]);
        let (v, out) = w.lb.run(Prog::Xdp, &input);
        assert_eq!(v, Verdict::Redirect);
        let as_sent = Pkt::tcp(&backend, 8080, node, port, ACK).payload(&[2; 1400]).ttl(63).build();
        let want = routed(err(router(v6), &backend, too_big(v6), &as_sent, quotes(v6)[1]), OUT_MAC, NEIGH_MAC);
        assert_eq!(out, want, "v6={v6}: the router's error, to the backend");
        verify_checksums(&out);
        assert_eq!(w.lb.verdict("icmp_error_nat"), 2);
    }
}

/// Errors that quote no tracked flow, and ICMP that is not an error, are
/// none of xlb's business: byte-identical, counted.
#[test]
fn errors_quoting_no_flow_and_other_icmp_pass_untouched() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let untracked = Pkt::tcp(vip, 80, client, 40999, ACK).build();
        let mut later_fragment = Pkt::udp(vip, 80, client, 40000).build();
        if v6 {
            later_fragment.splice(14 + 40..14 + 40, [17u8, 0, 0, 8, 0, 0, 0, 1]);
            later_fragment[14 + 6] = 44;
        } else {
            later_fragment[14 + 7] = 8;
        }
        let cases = [
            err(router(v6), vip, too_big(v6), &untracked, 200),
            err(router(v6), vip, too_big(v6), &later_fragment, 200),
            // A quote too short for the ports.
            err(router(v6), vip, too_big(v6), &untracked, if v6 { 42 } else { 22 }),
        ];
        for input in &cases {
            let (v, out) = w.lb.run(prog, input);
            assert_eq!((v, &out), (Verdict::Pass, input), "{prog:?} v6={v6}");
        }
        assert_eq!(w.lb.verdict("icmp_error_pass"), 3);
        // An echo request to the VIP is not an error.
        let echo = err(client, vip, if v6 { (128, 0, [0, 1, 0, 1]) } else { (8, 0, [0, 1, 0, 1]) }, &untracked, 20);
        let (v, out) = w.lb.run(prog, &echo);
        assert_eq!((v, out), (Verdict::Pass, echo));
        assert_eq!(w.lb.verdict("pass"), 1);
    });
}
