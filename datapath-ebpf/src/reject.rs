// SPDX-License-Identifier: MIT OR GPL-2.0
//! Answers xlb builds in place and sends back out of the ingress device,
//! from the address the packet was sent to:
//! - rejection of a flow to a service without a usable backend, the way
//!   kube-proxy's REJECT rules do it (upstream e2e expects a refusal, not a
//!   timeout): a TCP segment gets a RST, a UDP datagram an ICMP / ICMPv6
//!   port unreachable;
//! - "fragmentation needed" / "packet too big" for a packet longer than the
//!   egress MTU (Katran's `send_icmp_too_big`).
//!
//! The ICMP answers quote the offending packet's IP header, its extension
//! headers and 8 bytes of its L4 header (what the sender's stack needs to
//! find the socket), up to `MAX_QUOTE` bytes.

use crate::{hook::Hook, nat::ptr, parse::Flow};
use datapath_common::{
    PROTO_TCP,
    csum::{self, sum_bytes},
    ct::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TTL: u8 = 64;

#[inline(always)]
fn store<T>(hook: &impl Hook, off: usize, v: T) -> Result<(), ()> {
    let p: *mut T = ptr(hook, off)?;
    // SAFETY: bounds checked by `ptr`.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

#[inline(always)]
fn load<T>(hook: &impl Hook, off: usize) -> Result<T, ()> {
    let p: *mut T = ptr(hook, off)?;
    // SAFETY: bounds checked by `ptr`.
    Ok(unsafe { p.read_unaligned() })
}

/// Swaps the Ethernet addresses in place (a VLAN tag stays where it is).
#[inline(always)]
fn swap_macs(hook: &impl Hook, ethertype_off: usize, ethertype: u16) -> Result<(), ()> {
    let m: [u8; 12] = load(hook, 0)?;
    let mut s = [0u8; 12];
    s[..6].copy_from_slice(&m[6..]);
    s[6..].copy_from_slice(&m[..6]);
    store(hook, 0, s)?;
    store(hook, ethertype_off, ethertype.to_be())
}

#[inline(always)]
fn ipv4_header(total_len: u16, proto: u8, src: &[u8; 16], dst: &[u8; 16]) -> [u8; 20] {
    let l = total_len.to_be_bytes();
    let mut h = [
        0x45, 0, l[0], l[1], 0, 0, 0x40, 0, TTL, proto, 0, 0, src[12], src[13], src[14], src[15], dst[12], dst[13],
        dst[14], dst[15],
    ];
    let c = !csum::fold(sum_bytes(0, &h));
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    h
}

#[inline(always)]
fn ipv6_header(payload_len: u16, next: u8, src: &[u8; 16], dst: &[u8; 16]) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next;
    h[7] = TTL;
    h[8..24].copy_from_slice(src);
    h[24..40].copy_from_slice(dst);
    h
}

/// One's-complement sum of the pseudo header (addresses in the family's form).
#[inline(always)]
fn pseudo_sum(v6: bool, src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u16) -> u32 {
    let s = if v6 { sum_bytes(sum_bytes(0, src), dst) } else { sum_bytes(sum_bytes(0, &src[12..]), &dst[12..]) };
    csum::add(s, sum_bytes(0, &[0, proto]) + sum_bytes(0, &len.to_be_bytes()))
}

/// What to answer, as [`reject`]'s `too_big` argument: no backend (a TCP
/// RST, or ICMP port unreachable for UDP). Any other value is "too big"
/// with that MTU. A plain number, not an enum: LLVM passes an enum's
/// payload register uninitialised for the variant without one, and the
/// verifier refuses to read it.
pub const NO_BACKEND: u32 = 0;

/// Turns the packet into the answer. `Err` means the packet may be
/// half-written: the caller drops it.
#[inline(never)]
pub fn reject(hook: &mut impl Hook, flow: &Flow, too_big: u32) -> Result<(), ()> {
    if too_big == NO_BACKEND && flow.proto == PROTO_TCP { tcp_rst(hook, flow) } else { icmp_error(hook, flow, too_big) }
}

#[inline(always)]
fn tcp_rst(hook: &mut impl Hook, flow: &Flow) -> Result<(), ()> {
    let th: [u8; 20] = load(hook, flow.l4)?;
    let seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
    let ack = u32::from_be_bytes([th[8], th[9], th[10], th[11]]);
    let doff = ((th[12] >> 4) as usize) * 4;
    let flags = th[13];
    if flags & TCP_RST != 0 {
        // Never answer a RST (RFC 793): the caller drops it.
        return Err(());
    }
    // RFC 793 "Reset generation": echo the ACK as our sequence number, or
    // else acknowledge everything the segment occupied.
    let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let occupied = (flow.l4_len - doff) as u32 + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let l3 = flow.l3;
    let ip_len = if flow.v6 { 40 } else { 20 };
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&flow.dport.to_ne_bytes());
    t[2..4].copy_from_slice(&flow.sport.to_ne_bytes());
    t[4..8].copy_from_slice(&rseq.to_be_bytes());
    t[8..12].copy_from_slice(&rack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = rflags;
    let c = !csum::fold(sum_bytes(pseudo_sum(flow.v6, &flow.dst, &flow.src, PROTO_TCP, 20), &t));
    t[16..18].copy_from_slice(&c.to_ne_bytes());
    if flow.v6 {
        swap_macs(hook, l3 - 2, 0x86dd)?;
        store(hook, l3, ipv6_header(20, PROTO_TCP, &flow.dst, &flow.src))?;
    } else {
        swap_macs(hook, l3 - 2, 0x0800)?;
        store(hook, l3, ipv4_header(40, PROTO_TCP, &flow.dst, &flow.src))?;
    }
    store(hook, l3 + ip_len, t)?;
    hook.truncate((l3 + ip_len + 20) as u32)
}

/// Most bytes of the offending packet an answer quotes (IPv4 needs at most
/// 60 + 8; IPv6 40, its extension headers, and 8).
const MAX_QUOTE: usize = 128;

#[inline(always)]
fn icmp_error(hook: &mut impl Hook, flow: &Flow, too_big: u32) -> Result<(), ()> {
    let l3 = flow.l3;
    // The new IP + ICMP headers go in front of the original IP header, which
    // becomes the quoted part: grow the head by exactly their size and move
    // the Ethernet header to the new front.
    let grow = if flow.v6 { 40 + 8 } else { 20 + 8 };
    let quote = flow.l4 - flow.l3 + 8;
    let quote = if quote > MAX_QUOTE { MAX_QUOTE } else { quote };
    let macs: [u8; 12] = load(hook, 0)?;
    let tag: [u8; 4] = if l3 == 18 { load(hook, 12)? } else { [0; 4] };
    hook.grow_head(grow as u32)?;
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(&macs[6..]);
    m[6..].copy_from_slice(&macs[..6]);
    store(hook, 0, m)?;
    if l3 == 18 {
        store(hook, 12, tag)?;
    }
    let icmp_off = l3 + grow - 8;
    // Sum of the quoted bytes (a multiple of 4 long), read 4 at a time with a
    // bounded loop.
    let mut s = 0u32;
    let start = l3 + grow;
    for i in 0..MAX_QUOTE / 4 {
        if 4 * i >= quote {
            break;
        }
        let w: u32 = load(hook, start + 4 * i)?;
        s = csum::add(s, csum::add(w & 0xffff, w >> 16));
    }
    let icmp_len = (8 + quote) as u16;
    let mut icmp = [0u8; 8];
    let (t, code, rest) = match (too_big, flow.v6) {
        (NO_BACKEND, false) => (3, 3, 0),
        (NO_BACKEND, true) => (1, 4, 0),
        // Fragmentation needed, the next-hop MTU in the low 16 bits.
        (mtu, false) => (3, 4, mtu & 0xffff),
        (mtu, true) => (2, 0, mtu),
    };
    icmp[0] = t;
    icmp[1] = code;
    icmp[4..8].copy_from_slice(&rest.to_be_bytes());
    if flow.v6 {
        s = csum::add(s, pseudo_sum(true, &flow.dst, &flow.src, IPPROTO_ICMPV6, icmp_len));
        store(hook, l3 - 2, 0x86ddu16.to_be())?;
        store(hook, l3, ipv6_header(icmp_len, IPPROTO_ICMPV6, &flow.dst, &flow.src))?;
    } else {
        store(hook, l3 - 2, 0x0800u16.to_be())?;
        store(hook, l3, ipv4_header(20 + icmp_len, IPPROTO_ICMP, &flow.dst, &flow.src))?;
    }
    let c = !csum::fold(sum_bytes(s, &icmp));
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    store(hook, icmp_off, icmp)?;
    hook.truncate((start + quote) as u32)
}
