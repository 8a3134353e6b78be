// SPDX-License-Identifier: MIT OR Apache-2.0
//! The egress MTU, checked before any rewrite (BPF_PROG_TEST_RUN on XDP and
//! both TC hooks): a packet longer than the route's MTU with DF set, or over
//! IPv6, is answered with ICMP "fragmentation needed" / ICMPv6 "packet too
//! big" from the address the sender used, quoting its own packet, as a
//! router on the path would (RFC 1191, RFC 8201; Katran's
//! `send_icmp_too_big`); without DF it is rewritten and left to the kernel,
//! which fragments it. The answers, like rejects, are rate-limited per CPU.

use bpf_tests::{
    Prog, Verdict,
    fixtures::*,
    packet::{ACK, CLIENT_MAC, NODE_MAC, Pkt, SYN, clear_df, icmp_error, verify_checksums, with_macs},
};
use datapath_common::{Config, SCHED_MAGLEV};

/// The FIB environment's egress device with a 1280-byte MTU: a 1400-byte
/// packet, ordinary on the client's 1500-byte link, does not fit.
fn narrow(w: &World) {
    w.env.ns.exec(&["ip", "link", "set", "o0", "mtu", "1280"]);
}

/// The answer xlb must send for `input` (an Ethernet frame from the client
/// to `vip`): from the VIP to the client, MTU 1280, quoting the IP header,
/// its extension headers and 8 bytes of TCP, back out to the client's MAC.
fn too_big_answer(input: &[u8], vip: &str, client: &str, v6: bool) -> Vec<u8> {
    let (ty, code, rest, quote) = if v6 { (2, 0, 1280u32.to_be_bytes(), 48) } else { (3, 4, [0, 0, 0x05, 0x00], 28) };
    // (etherparse sets DF on IPv4, as xlb's answer and the kernel's ICMP do.)
    with_macs(icmp_error(vip, client, ty, code, rest, input, quote), NODE_MAC, CLIENT_MAC)
}

#[test]
fn a_packet_too_big_for_the_egress_mtu_is_answered_before_any_rewrite() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        narrow(&w);
        let key = vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let data = vec![0x42; 1400 - if v6 { 60 } else { 40 }];
        let big = Pkt::tcp(client, 40000, vip, 80, ACK).payload(&data);
        let input = big.build();
        // A new flow's first packet is checked too (its SYN would normally be small).
        let (v, out) = w.lb.run(prog, &input);
        assert_eq!(v, Verdict::Redirect, "{prog:?} v6={v6}: sent back");
        assert_eq!(out, too_big_answer(&input, vip, client, v6), "{prog:?} v6={v6}");
        verify_checksums(&out);
        assert_eq!(w.lb.verdict("frag_needed"), 1);
        assert_eq!(w.lb.verdict("new_flow"), 0, "counted once, as frag_needed");

        // An established flow: small packets go by the cached route, a big
        // one is checked afresh and answered, and the flow goes on.
        let syn = Pkt::tcp(client, 40001, vip, 80, SYN);
        let b = expected_backend(&w, &key, &syn);
        assert_eq!(w.lb.run(prog, &syn.build()).0, Verdict::Redirect);
        let small = Pkt::tcp(client, 40001, vip, 80, ACK);
        assert_eq!(w.lb.run(prog, &small.build()), (Verdict::Redirect, dnatted(&small, b)));
        let big = Pkt::tcp(client, 40001, vip, 80, ACK).payload(&data);
        let input = big.build();
        let (v, out) = w.lb.run(prog, &input);
        assert_eq!((v, out), (Verdict::Redirect, too_big_answer(&input, vip, client, v6)), "{prog:?} v6={v6}: cached");
        let fits = Pkt::tcp(client, 40001, vip, 80, ACK).payload(&data[..1000]);
        assert_eq!(w.lb.run(prog, &fits.build()), (Verdict::Redirect, dnatted(&fits, b)));
        assert_eq!(w.lb.verdict("frag_needed"), 2);
    });
}

/// IPv4 without DF: a router fragments. xlb rewrites the packet and hands
/// it to the kernel (no TTL or MAC change: the kernel forwards it).
#[test]
fn ipv4_without_df_too_big_goes_to_the_kernel_translated() {
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        narrow(&w);
        let key = vip_service(&mut w, prog, false, SCHED_MAGLEV, 0, &backends(false));
        let p = Pkt::tcp(CLIENT4, 40000, VIP4, 80, ACK).payload(&[7; 1360]);
        let b = expected_backend(&w, &key, &p);
        let (v, out) = w.lb.run(prog, &clear_df(p.build()));
        assert_eq!(v, Verdict::Pass, "{prog:?} {:?}", w.lb.verdicts());
        assert_eq!(out, clear_df(p.clone().dst(&backend_addr(b), 8080).build()), "{prog:?}: DNATed, not routed");
        verify_checksums(&out);
        assert_eq!((w.lb.verdict("new_flow"), w.lb.verdict("mtu_pass")), (1, 1));
    }
}

/// Answers are rate-limited per CPU (`Config::reply_rate`, burst as large):
/// a flood of SYNs to a service without endpoints gets that many RSTs and
/// the rest are dropped, counted.
#[test]
fn answers_are_rate_limited_per_cpu() {
    pin_to_one_cpu();
    for prog in Prog::ALL {
        let mut w = world();
        let _in = w.env.enter();
        w.lb.dp.set_config(&Config { reply_rate: 3, ..Config::default() }).unwrap();
        vip_service(&mut w, prog, false, SCHED_MAGLEV, 0, &[]);
        let mut sent = 0;
        for port in 0..10 {
            let (v, _) = w.lb.run(prog, &Pkt::tcp(CLIENT4, 41000 + port, VIP4, 80, SYN).payload(b"").build());
            sent += (v == Verdict::Redirect) as u32;
        }
        // One CPU's bucket (this thread's: pinned); 4 if a refill came in between.
        assert!((3..=4).contains(&sent), "{prog:?}: {sent} answers");
        assert_eq!(w.lb.verdict("no_backend_reject") + w.lb.verdict("reply_limited"), 10);
    }
}

/// BPF_PROG_TEST_RUN runs on the calling thread's CPU: keep this thread on one.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}
