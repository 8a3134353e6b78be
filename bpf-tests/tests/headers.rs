// SPDX-License-Identifier: MIT OR Apache-2.0
//! Checksum corner cases and IPv6 headers xlb must not rewrite behind,
//! through BPF_PROG_TEST_RUN on XDP and both TC hooks. Cilium's
//! `csum_l4_offset_and_flags` (BPF_F_MARK_MANGLED_0 for UDP in both
//! families) and RFC 8200 §8.1 / RFC 4302 are the references.

use bpf_tests::{
    Prog, Verdict,
    fixtures::*,
    packet::{Pkt, SYN, insert_ipv6_ext, verify_checksums},
    svc_key,
};
use datapath_common::{PROTO_UDP, SCHED_MAGLEV};

/// A UDP datagram whose checksum after DNAT is exactly zero must leave with
/// 0xffff (zero means "no checksum"; over IPv6 receivers drop it), on every
/// hook and in both families. The payload's first word is chosen so that
/// the translated datagram sums to zero; etherparse then writes 0xffff
/// itself, and the output must match it byte for byte.
#[test]
fn a_udp_checksum_that_becomes_zero_is_sent_as_all_ones() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let key = svc_key(vip, 80, PROTO_UDP, scope(prog));
        let probe = Pkt::udp(client, 5353, vip, 80).payload(&[0, 0, 1, 2, 3, 4]);
        let b = expected_backend(&w, &key, &probe);
        let l4 = 14 + if v6 { 40 } else { 20 };
        // With the first payload word X = 0 the translated checksum is c; with
        // X = c the one's-complement sum becomes 0xffff, the checksum zero.
        let zeroed = dnatted(&probe, b);
        let c = [zeroed[l4 + 6], zeroed[l4 + 7]];
        let dgram = Pkt::udp(client, 5353, vip, 80).payload(&[c[0], c[1], 1, 2, 3, 4]);
        let want = dnatted(&dgram, b);
        assert_eq!(&want[l4 + 6..l4 + 8], &[0xff, 0xff], "the fixture sums to zero");
        let (v, out) = w.lb.run(prog, &dgram.build());
        assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6}");
        assert_eq!(out, want, "{prog:?} v6={v6}: a zero result is sent as 0xffff");
        verify_checksums(&out);
    });
}

/// UDP over IPv6 without a checksum is not allowed (RFC 8200 §8.1): the
/// receiver drops it, so xlb passes it unchanged and counts it malformed.
#[test]
fn ipv6_udp_without_a_checksum_passes_as_malformed() {
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        vip_service(&mut w, prog, true, SCHED_MAGLEV, 0, &backends(true));
        let mut p = Pkt::udp(CLIENT6, 5353, VIP6, 80).build();
        p[14 + 40 + 6] = 0;
        p[14 + 40 + 7] = 0;
        let (v, out) = w.lb.run(prog, &p);
        assert_eq!((v, out), (Verdict::Pass, p), "{prog:?}");
        assert_eq!(w.lb.verdict("malformed"), 1);
    }
}

/// Headers a rewrite behind would break pass untouched: a Routing header
/// with segments left (the destination is not the final one), AH (its ICV
/// covers the addresses), ESP (the ports are encrypted). A Routing header
/// with no segments left is an ordinary hop: balanced.
#[test]
fn routing_headers_with_segments_left_ah_and_esp_pass_untouched() {
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        let key = vip_service(&mut w, prog, true, SCHED_MAGLEV, 0, &backends(true));
        let syn = Pkt::tcp(CLIENT6, 40000, VIP6, 80, SYN);
        let with = |proto: u8, rest: &[u8]| {
            let mut p = syn.build();
            insert_ipv6_ext(&mut p, 14, proto, rest);
            p
        };
        let untouched = [
            // Routing header (type 253, experimental), 1 segment left.
            with(43, &[0, 253, 1, 0, 0, 0, 0]),
            // AH: payload length 4 (24 bytes), SPI, sequence, 12-byte ICV.
            with(51, &[4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]),
            // ESP: SPI and sequence; what follows is ciphertext.
            with(50, &[0, 0, 1, 0, 0, 0, 1]),
        ];
        for p in &untouched {
            let (v, out) = w.lb.run(prog, p);
            assert_eq!((v, &out), (Verdict::Pass, p), "{prog:?}");
        }
        assert_eq!(w.lb.verdict("ext_header_pass"), 3, "{prog:?}");
        assert_eq!(w.lb.verdict("new_flow"), 0);

        let done = with(43, &[0, 253, 0, 0, 0, 0, 0]);
        let b = expected_backend(&w, &key, &syn);
        let (v, out) = w.lb.run(prog, &done);
        assert_eq!(v, Verdict::Redirect, "{prog:?}: segments left 0 is balanced");
        let mut want = dnatted(&syn, b);
        insert_ipv6_ext(&mut want, 14, 43, &[0, 253, 0, 0, 0, 0, 0]);
        assert_eq!(out, want);
    }
}
