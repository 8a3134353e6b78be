// SPDX-License-Identifier: MIT OR Apache-2.0
//! L2 announcements from XDP (issue #15), through BPF_PROG_TEST_RUN: an
//! ARP request (RFC 826) or a neighbour solicitation (RFC 4861 §7.2.3) for
//! an address in L2_ADDRS on the receiving interface is answered in place
//! and sent back out (a redirect to that interface); anything else — other
//! addresses, another interface, duplicate-address probes, a solicitation
//! that is not from a neighbour (hop limit below 255) — goes to the kernel.
//! The frames are what a Linux host sends (`arping`, the kernel's NDP).

use bpf_tests::{Prog, Verdict, fixtures::*};
use datapath_common::{L2Key, L2Value};

const OWNED4: [u8; 4] = [192, 168, 60, 100];
const OTHER4: [u8; 4] = [192, 168, 60, 101];
const OWNED6: &str = "fd60::100";
const ASKER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// BPF_PROG_TEST_RUN delivers XDP test frames on the loopback device.
const LO: u32 = 1;

fn announce(w: &mut World, addr: std::net::IpAddr, ifindex: u32) {
    announce_until(w, addr, ifindex, u64::MAX);
}

/// Announces `addr` until `deadline_ns` (CLOCK_BOOTTIME), as a Lease holder.
fn announce_until(w: &mut World, addr: std::net::IpAddr, ifindex: u32, deadline_ns: u64) {
    let key = L2Key { addr: xlb::datapath::map_addr(addr), ifindex };
    w.lb.dp.set_l2(&key, &L2Value { mac: OUR_MAC, _pad: 0, deadline_ns }).unwrap();
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&ASKER_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&ASKER_MAC);
    f.extend_from_slice(&[192, 168, 60, 200]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0); // padded to the Ethernet minimum, as on a wire
    f
}

fn ip6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// RFC 1071 sum of `parts`, folded (0xffff over a correct checksum).
fn sum(parts: &[&[u8]]) -> u16 {
    let mut s = 0u32;
    for p in parts {
        for w in p.chunks(2) {
            s += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A neighbour solicitation from fd60::200 for `target`, to its
/// solicited-node address, with the source link-layer option (`slla`).
fn solicitation(target: &str, src: &str, hop_limit: u8, slla: bool) -> Vec<u8> {
    solicitation_with(target, src, hop_limit, slla, &[])
}

/// [`solicitation`] with more options after the link-layer one.
fn solicitation_with(target: &str, src: &str, hop_limit: u8, slla: bool, options: &[u8]) -> Vec<u8> {
    let t = ip6(target);
    let mut dst = ip6("ff02::1:ff00:0");
    dst[13..].copy_from_slice(&t[13..]);
    let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    if slla {
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&ASKER_MAC);
    }
    icmp.extend_from_slice(options);
    let len = icmp.len() as u32;
    let src = ip6(src);
    let c = !sum(&[&src, &dst, &len.to_be_bytes(), &[0, 0, 0, 58], &icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0xff, t[13], t[14], t[15]];
    f.extend_from_slice(&ASKER_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(len as u16).to_be_bytes());
    f.extend_from_slice(&[58, hop_limit]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn an_arp_request_for_an_announced_address_is_answered_from_xdp() {
    let mut w = world();
    let _in = w.env.enter();
    announce(&mut w, std::net::IpAddr::from(OWNED4), LO);
    let (v, out) = w.lb.run(Prog::Xdp, &arp_request(OWNED4));
    assert_eq!(v, Verdict::Redirect, "sent back out of the receiving interface");
    assert_eq!(out[..6], ASKER_MAC, "to the asker");
    assert_eq!(out[6..12], OUR_MAC);
    assert_eq!(out[12..22], [0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2], "an ARP reply");
    assert_eq!((&out[22..28], &out[28..32]), (&OUR_MAC[..], &OWNED4[..]), "sender: us, the address");
    assert_eq!((&out[32..38], &out[38..42]), (&ASKER_MAC[..], &[192u8, 168, 60, 200][..]), "target: the asker");
    assert_eq!(w.lb.verdict("l2_arp_reply"), 1);

    // Another address, or the same one asked on another interface: the kernel's.
    let (v, out) = w.lb.run(Prog::Xdp, &arp_request(OTHER4));
    assert_eq!((v, out), (Verdict::Pass, arp_request(OTHER4)));
    let mut w2 = world();
    let _in2 = w2.env.enter();
    announce(&mut w2, std::net::IpAddr::from(OWNED4), 7);
    assert_eq!(w2.lb.run(Prog::Xdp, &arp_request(OWNED4)).0, Verdict::Pass);
    // A reply (not a request) passes.
    let mut reply = arp_request(OWNED4);
    reply[21] = 2;
    assert_eq!(w.lb.run(Prog::Xdp, &reply).0, Verdict::Pass);
}

#[test]
fn a_neighbour_solicitation_for_an_announced_address_is_answered_from_xdp() {
    for slla in [true, false] {
        let mut w = world();
        let _in = w.env.enter();
        announce(&mut w, OWNED6.parse().unwrap(), LO);
        let (v, out) = w.lb.run(Prog::Xdp, &solicitation(OWNED6, "fd60::200", 255, slla));
        assert_eq!(v, Verdict::Redirect);
        assert_eq!(out.len(), 86, "Ethernet, IPv6 and a 32-byte advertisement");
        assert_eq!((&out[..6], &out[6..12], &out[12..14]), (&ASKER_MAC[..], &OUR_MAC[..], &[0x86u8, 0xdd][..]));
        let ip = &out[14..54];
        assert_eq!(ip[..8], [0x60, 0, 0, 0, 0, 32, 58, 255]);
        assert_eq!((ip6_of(&ip[8..24]), ip6_of(&ip[24..40])), (ip6(OWNED6), ip6("fd60::200")));
        let icmp = &out[54..];
        assert_eq!(icmp[0..2], [136, 0], "a neighbour advertisement");
        assert_eq!(icmp[4..8], [0x60, 0, 0, 0], "solicited, override");
        assert_eq!(ip6_of(&icmp[8..24]), ip6(OWNED6));
        assert_eq!((&icmp[24..26], &icmp[26..32]), (&[2u8, 1][..], &OUR_MAC[..]), "target link-layer address");
        let ok = sum(&[&ip[8..24], &ip[24..40], &32u32.to_be_bytes(), &[0, 0, 0, 58], icmp]);
        assert_eq!(ok, 0xffff, "ICMPv6 checksum");
        assert_eq!(w.lb.verdict("l2_ndp_reply"), 1);
        // Duplicate address detection (source ::) and a hop limit below 255 pass.
        for f in [solicitation(OWNED6, "::", 255, false), solicitation(OWNED6, "fd60::200", 64, slla)] {
            assert_eq!(w.lb.run(Prog::Xdp, &f).0, Verdict::Pass);
        }
        assert_eq!(w.lb.run(Prog::Xdp, &solicitation("fd60::101", "fd60::200", 255, slla)).0, Verdict::Pass);
    }
    // A longer solicitation (a nonce option after the link-layer one,
    // RFC 7527) is cut to the 86-byte advertisement.
    let mut w = world();
    let _in = w.env.enter();
    announce(&mut w, OWNED6.parse().unwrap(), LO);
    let long = solicitation_with(OWNED6, "fd60::200", 255, true, &[14, 1, 1, 2, 3, 4, 5, 6]);
    assert_eq!(long.len(), 94);
    let (v, out) = w.lb.run(Prog::Xdp, &long);
    assert_eq!((v, out.len()), (Verdict::Redirect, 86));
    // A multicast or IPv4-mapped target is never answered, even if in the map.
    for target in ["ff02::1", "::ffff:192.168.60.100"] {
        announce(&mut w, target.parse().unwrap(), LO);
        assert_eq!(w.lb.run(Prog::Xdp, &solicitation(target, "fd60::200", 255, true)).0, Verdict::Pass, "{target}");
    }
}

fn ip6_of(b: &[u8]) -> [u8; 16] {
    b.try_into().unwrap()
}

/// A Lease holder's entry answers until its deadline and not after: an
/// agent that dies (or freezes) with its programs attached stops answering
/// by itself when its Lease runs out, before another node may take it
/// (the split brain MetalLB has by design, metallb/metallb#740).
#[test]
fn an_entry_past_its_deadline_is_not_answered() {
    let now = xlb::lease::boot_ns();
    for (addr, frame, answered) in [
        (std::net::IpAddr::from(OWNED4), arp_request(OWNED4), "l2_arp_reply"),
        (OWNED6.parse().unwrap(), solicitation(OWNED6, "fd60::200", 255, true), "l2_ndp_reply"),
    ] {
        let mut w = world();
        let _in = w.env.enter();
        announce_until(&mut w, addr, LO, now + 60_000_000_000);
        assert_eq!(w.lb.run(Prog::Xdp, &frame).0, Verdict::Redirect, "{addr}: a minute left");
        announce_until(&mut w, addr, LO, now.saturating_sub(1));
        let (v, out) = w.lb.run(Prog::Xdp, &frame);
        assert_eq!((v, &out), (Verdict::Pass, &frame), "{addr}: expired, left to the kernel untouched");
        assert_eq!((w.lb.verdict(answered), w.lb.verdict("l2_expired")), (1, 1), "{addr}");
    }
}
