// SPDX-License-Identifier: MIT OR GPL-2.0
//! L2 announcements (issue #15): the node that owns a LoadBalancer address
//! answers ARP requests (IPv4) and neighbour solicitations (IPv6) for it,
//! here in XDP, before the kernel sees them. The agent puts the addresses
//! this node owns, per interface, in L2_ADDRS with the MAC to answer with;
//! a request for any other address passes to the kernel untouched.
//!
//! The answer is written over the request and sent back out of the
//! interface it came in on (a redirect: XDP_TX stalls on veth). ARP:
//! RFC 826's reply. NDP: RFC 4861's solicited advertisement (flags S and O,
//! the target link-layer address option), to the solicitation's source; a
//! duplicate-address probe (source `::`) is left to the kernel.
//!
//! Not handled: VLAN-tagged frames (a request on a VLAN sub-interface is
//! the kernel's), and the solicitation's own checksum is not verified
//! (the answer is to the sender whatever the request's integrity; a
//! corrupted request at worst gets an advertisement it did not need).

use aya_ebpf::programs::XdpContext;
use datapath_common::{L2Key, csum, v4_mapped, verdict};

use crate::{
    hook::{Action, Hook as _},
    maps::{L2_ADDRS, count_verdict},
    parse::{ETH_P_IPV6, PROTO_ICMPV6 as IPPROTO_ICMPV6},
};

const ETH: usize = 14;
const ETH_P_ARP: u16 = 0x0806;
const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
/// An advertisement: Ethernet, IPv6, ICMPv6 header and target (24), the
/// target link-layer address option (8).
const NA_LEN: usize = ETH + 40 + 32;

/// Answers the packet if it asks for an address L2_ADDRS holds for this
/// interface: `Some(Action::Tx)`, the packet rewritten; else `None`.
#[inline(never)]
pub fn answer(ctx: &mut XdpContext) -> Option<Action> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH > end {
        return None;
    }
    // SAFETY: bounds checked above.
    let proto = u16::from_be(unsafe { ((data + 12) as *const u16).read_unaligned() });
    match proto {
        ETH_P_ARP => arp(ctx),
        ETH_P_IPV6 => ndp(ctx),
        _ => None,
    }
}

/// The MAC to answer for `key`, while this node's hold on it lasts.
#[inline(always)]
fn owned_mac(key: &L2Key) -> Option<[u8; 6]> {
    // SAFETY: the value is copied out at once.
    let v = unsafe { L2_ADDRS.get(key) }?;
    let (mac, deadline) = (v.mac, v.deadline_ns);
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    if now >= deadline {
        count_verdict(verdict::L2_EXPIRED);
        return None;
    }
    Some(mac)
}

#[inline(always)]
fn arp(ctx: &mut XdpContext) -> Option<Action> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH + 28 > end {
        return None;
    }
    let p = data as *mut u8;
    // SAFETY: the 42 bytes are checked above; every access below is inside.
    unsafe {
        let a = p.add(ETH);
        // Ethernet/IPv4, hardware 6 bytes, protocol 4, a request.
        let fixed = [0u8, 1, 8, 0, 6, 4, 0, 1];
        for (i, b) in fixed.iter().enumerate() {
            if *a.add(i) != *b {
                return None;
            }
        }
        let mut tpa = [0u8; 4];
        core::ptr::copy_nonoverlapping(a.add(24), tpa.as_mut_ptr(), 4);
        let key = L2Key { addr: v4_mapped(tpa), ifindex: ctx.ifindex() };
        let mac = owned_mac(&key)?;
        let mut sha = [0u8; 6];
        let mut spa = [0u8; 4];
        core::ptr::copy_nonoverlapping(a.add(8), sha.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(a.add(14), spa.as_mut_ptr(), 4);
        // Ethernet: back to the asker, from us.
        core::ptr::copy_nonoverlapping(sha.as_ptr(), p, 6);
        core::ptr::copy_nonoverlapping(mac.as_ptr(), p.add(6), 6);
        *a.add(7) = 2; // a reply
        core::ptr::copy_nonoverlapping(mac.as_ptr(), a.add(8), 6);
        core::ptr::copy_nonoverlapping(tpa.as_ptr(), a.add(14), 4);
        core::ptr::copy_nonoverlapping(sha.as_ptr(), a.add(18), 6);
        core::ptr::copy_nonoverlapping(spa.as_ptr(), a.add(24), 4);
    }
    count_verdict(verdict::L2_ARP_REPLY);
    Some(Action::Tx)
}

#[inline(always)]
fn ndp(ctx: &mut XdpContext) -> Option<Action> {
    let (data, end) = (ctx.data(), ctx.data_end());
    // IPv6 header, ICMPv6 header and the target address.
    if data + ETH + 40 + 24 > end {
        return None;
    }
    let p = data as *const u8;
    let mut src = [0u8; 16];
    let mut target = [0u8; 16];
    let mut eth_src = [0u8; 6];
    // SAFETY: the 78 bytes are checked above; every read below is inside.
    unsafe {
        let ip = p.add(ETH);
        // Version 6, a payload that holds the solicitation, no extension
        // header, hop limit 255 (RFC 4861 §7.1.1), a solicitation with
        // code 0.
        let payload = u16::from_be_bytes([*ip.add(4), *ip.add(5)]) as usize;
        if *ip >> 4 != 6 || payload < 24 || data + ETH + 40 + payload > end {
            return None;
        }
        if *ip.add(6) != IPPROTO_ICMPV6 || *ip.add(7) != 255 {
            return None;
        }
        let icmp = ip.add(40);
        if *icmp != ND_SOLICIT || *icmp.add(1) != 0 {
            return None;
        }
        core::ptr::copy_nonoverlapping(ip.add(8), src.as_mut_ptr(), 16);
        core::ptr::copy_nonoverlapping(icmp.add(8), target.as_mut_ptr(), 16);
        core::ptr::copy_nonoverlapping(p.add(6), eth_src.as_mut_ptr(), 6);
    }
    if src == [0; 16] {
        return None; // duplicate address detection: the kernel's business
    }
    // A multicast source or target, or an IPv4-mapped target (L2_ADDRS keys
    // IPv4 addresses that way), is never one to answer.
    let mapped = target[..10] == [0; 10] && target[10] == 0xff && target[11] == 0xff;
    if src[0] == 0xff || target[0] == 0xff || mapped {
        return None;
    }
    let key = L2Key { addr: target, ifindex: ctx.ifindex() };
    let mac = owned_mac(&key)?;
    // The advertisement is 86 bytes; the solicitation may be shorter (no
    // source link-layer option) or longer (other options).
    if ctx.truncate(NA_LEN as u32).is_err() {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + NA_LEN > end {
        return None;
    }
    let p = data as *mut u8;
    // SAFETY: the 86 bytes are checked above; every write below is inside.
    unsafe {
        core::ptr::copy_nonoverlapping(eth_src.as_ptr(), p, 6);
        core::ptr::copy_nonoverlapping(mac.as_ptr(), p.add(6), 6);
        let ip = p.add(ETH);
        // Version 6, no traffic class or flow label, payload 32, ICMPv6, 255.
        let head = [0x60u8, 0, 0, 0, 0, 32, IPPROTO_ICMPV6, 255];
        core::ptr::copy_nonoverlapping(head.as_ptr(), ip, 8);
        core::ptr::copy_nonoverlapping(target.as_ptr(), ip.add(8), 16);
        core::ptr::copy_nonoverlapping(src.as_ptr(), ip.add(24), 16);
        let icmp = ip.add(40);
        // Type, code, checksum (below), flags S and O, reserved.
        let na = [ND_ADVERT, 0, 0, 0, 0x60, 0, 0, 0];
        core::ptr::copy_nonoverlapping(na.as_ptr(), icmp, 8);
        core::ptr::copy_nonoverlapping(target.as_ptr(), icmp.add(8), 16);
        // Option: target link-layer address (type 2, 1 × 8 bytes).
        *icmp.add(24) = 2;
        *icmp.add(25) = 1;
        core::ptr::copy_nonoverlapping(mac.as_ptr(), icmp.add(26), 6);
        // Checksum over the pseudo-header (addresses, length 32, next
        // header 58) and the 32 bytes of the message.
        let mut sum = 0u32;
        for i in 0..20 {
            // Addresses (16 words) and the message's first 4 words…
            let w = (ip.add(8 + 2 * i) as *const u16).read_unaligned();
            sum = csum::add(sum, w as u32);
        }
        for i in 0..12 {
            // …and its other 12.
            let w = (icmp.add(8 + 2 * i) as *const u16).read_unaligned();
            sum = csum::add(sum, w as u32);
        }
        let pseudo = [0u8, 32, 0, IPPROTO_ICMPV6];
        sum = csum::add(sum, u16::from_ne_bytes([pseudo[0], pseudo[1]]) as u32);
        sum = csum::add(sum, u16::from_ne_bytes([pseudo[2], pseudo[3]]) as u32);
        let c = !csum::fold(sum);
        (icmp.add(2) as *mut u16).write_unaligned(c);
    }
    count_verdict(verdict::L2_NDP_REPLY);
    Some(Action::Tx)
}
