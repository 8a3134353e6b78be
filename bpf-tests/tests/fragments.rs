// SPDX-License-Identifier: MIT OR Apache-2.0
//! IP fragments through every program, both families: a UDP datagram
//! bigger than the path MTU, fragmented as a sender's IP layer does, to a
//! VIP and back. The first fragment carries the UDP header (whose length
//! and checksum cover the whole datagram) and is balanced like any packet;
//! the later ones follow it through the fragment map (Cilium's
//! IPV4_FRAG_DATAGRAMS; the kernel's own NAT defragments instead). Every
//! output fragment is compared byte for byte with the same fragmentation of
//! the translated datagram built from scratch, and the reassembled output
//! must pass an independent checksum check.

use bpf_tests::{
    NEIGH_MAC, OUT_MAC, Prog, Verdict,
    fixtures::*,
    packet::{Pkt, fragment, insert_ipv6_ext, reassemble, verify_checksums},
    svc_key,
};
use datapath_common::{PROTO_UDP, SCHED_MAGLEV};

/// Payload bytes per fragment: 1232 (a multiple of 8) keeps every IPv6
/// fragment within the 1280-byte minimum MTU.
const PIECE: usize = 1232;

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// The VIP:80 service for `prog`'s scope, a 3,000-byte UDP request to it
/// (three fragments: 1232, 1232 and 544 bytes of IP payload) and the
/// backend it gets; run the packets while the guard lives.
fn udp_to_vip(prog: Prog, v6: bool) -> (World, bpf_tests::Entered, Pkt, u32) {
    let mut w = world();
    let entered = w.env.enter();
    vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
    let (vip, client) = family(v6);
    let request = Pkt::udp(client, 7000, vip, 80).payload(&payload(3000));
    let b = expected_backend(&w, &svc_key(vip, 80, PROTO_UDP, scope(prog)), &request);
    (w, entered, request, b)
}

#[test]
fn a_fragmented_udp_datagram_is_translated_whole_in_both_directions() {
    both_families_both_hooks(|prog, v6| {
        let (mut w, _in, request, b) = udp_to_vip(prog, v6);
        let (vip, client) = family(v6);
        let input = fragment(&request.build(), PIECE, 0x1234);
        let want = fragment(&dnatted(&request, b), PIECE, 0x1234);
        assert_eq!(input.len(), 3);
        let mut out = Vec::new();
        for (i, f) in input.iter().enumerate() {
            let (v, o) = w.lb.run(prog, f);
            assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6}: fragment {i}");
            assert_eq!(o, want[i], "{prog:?} v6={v6}: fragment {i} as the translated datagram's");
            out.push(o);
        }
        verify_checksums(&reassemble(&out));
        assert_eq!((w.lb.verdict("new_flow"), w.lb.verdict("fragment_nat")), (1, 2), "{prog:?} v6={v6}");

        // The reply, as big, from the backend: reverse-NATed fragment by fragment.
        let reply = Pkt::udp(&backend_addr(b), 8080, client, 7000).payload(&payload(2900)).macs(NEIGH_MAC, OUT_MAC);
        let input = fragment(&reply.build(), PIECE, 0xbeef);
        let want = fragment(&reply.clone().src(vip, 80).macs(OUT_MAC, NEIGH_MAC).hop().build(), PIECE, 0xbeef);
        let mut out = Vec::new();
        for (i, f) in input.iter().enumerate() {
            let (v, o) = w.lb.run(prog, f);
            assert_eq!((v, &o), (Verdict::Redirect, &want[i]), "{prog:?} v6={v6}: reply fragment {i}");
            out.push(o);
        }
        verify_checksums(&reassemble(&out));
        assert_eq!((w.lb.verdict("reverse_nat"), w.lb.verdict("fragment_nat")), (1, 4), "{prog:?} v6={v6}");
    });
}

#[test]
fn later_fragments_without_their_first_pass_unchanged_and_are_counted() {
    both_families_both_hooks(|prog, v6| {
        let (mut w, _in, request, b) = udp_to_vip(prog, v6);
        let (_, client) = family(v6);
        let input = fragment(&request.build(), PIECE, 77);
        // Reordered: the last fragment overtakes the first. It has nothing
        // to follow yet and goes to the kernel unchanged.
        let (v, o) = w.lb.run(prog, &input[2]);
        assert_eq!((v, &o), (Verdict::Pass, &input[2]), "{prog:?} v6={v6}");
        assert_eq!(w.lb.verdict("fragment"), 1);
        // The first fragment is balanced, and the middle one follows it.
        let want = fragment(&dnatted(&request, b), PIECE, 77);
        for i in [0, 1] {
            let (v, o) = w.lb.run(prog, &input[i]);
            assert_eq!((v, &o), (Verdict::Redirect, &want[i]), "{prog:?} v6={v6}: fragment {i}");
        }
        // A later fragment of another datagram (another id) of the same
        // flow, whose first fragment was lost, is not taken for this one.
        let other = fragment(&request.build(), PIECE, 78);
        let (v, o) = w.lb.run(prog, &other[1]);
        assert_eq!((v, &o), (Verdict::Pass, &other[1]), "{prog:?} v6={v6}: id 78");
        // Fragments of a datagram to no service are none of xlb's business.
        let stranger = Pkt::udp(client, 7000, &backend_addr(b), 9999).payload(&payload(2000));
        for f in fragment(&stranger.build(), PIECE, 79) {
            let (v, o) = w.lb.run(prog, &f);
            assert_eq!((v, o), (Verdict::Pass, f), "{prog:?} v6={v6}: no service");
        }
        assert_eq!(w.lb.verdict("fragment"), 3, "{prog:?} v6={v6}");
        assert_eq!(w.lb.verdict("fragment_nat"), 1, "{prog:?} v6={v6}");
    });
}

#[test]
fn a_first_fragment_whose_udp_length_ends_in_it_is_malformed() {
    // What no sender produces: "more fragments" set, yet the UDP length
    // says the datagram ends inside this fragment. Passed unchanged, counted.
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let whole = Pkt::udp(client, 7000, vip, 80).payload(&payload(PIECE - 8)).build();
        let mut first = fragment(&whole, PIECE, 5).remove(0);
        if v6 {
            first[14 + 40 + 3] |= 1;
        } else {
            first[14 + 6] |= 0x20;
            bpf_tests::packet::fix_ipv4_checksum(&mut first, 14);
        }
        let (v, o) = w.lb.run(prog, &first);
        assert_eq!((v, o), (Verdict::Pass, first), "{prog:?} v6={v6}");
        assert_eq!(w.lb.verdict("malformed"), 1);
    });
}

#[test]
fn an_ipv6_atomic_fragment_is_an_ordinary_packet() {
    // RFC 6946: a fragment header with offset 0 and no more fragments is no
    // fragmentation; the packet is translated as it is, header kept.
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, true, SCHED_MAGLEV, 0, &backends(true));
        let key = svc_key(VIP6, 80, PROTO_UDP, scope(prog));
        let p = Pkt::udp(CLIENT6, 7000, VIP6, 80).payload(b"atomic");
        let b = expected_backend(&w, &key, &p);
        let mut input = p.build();
        insert_ipv6_ext(&mut input, 14, 44, &[0, 0, 0, 0, 0, 0, 9]);
        let mut want = dnatted(&p, b);
        insert_ipv6_ext(&mut want, 14, 44, &[0, 0, 0, 0, 0, 0, 9]);
        let (v, o) = w.lb.run(prog, &input);
        assert_eq!((v, o), (Verdict::Redirect, want), "{prog:?}");
        assert_eq!(w.lb.verdict("new_flow"), 1);
    }
}
