// SPDX-License-Identifier: MIT OR GPL-2.0
//! Header parsing: Ethernet, one 802.1Q tag, IPv4 (with options) or IPv6
//! (with up to `MAX_EXT_HEADERS` extension headers), then TCP or UDP.
//!
//! Every length field is checked against the packet before it is trusted;
//! anything inconsistent is `Malformed` and the pipeline passes it unchanged
//! (the kernel's own validation then deals with it) and counts it.
//!
//! Fragments: a first fragment (offset 0, more fragments) carries the L4
//! header and is balanced by its ports like any packet of its flow; its UDP
//! length covers the whole datagram, so it exceeds the fragment's payload.
//! A later fragment (offset ≠ 0) carries no L4 header: it is `Fragment`, with
//! the `Flow`'s addresses, protocol, offsets and fragment id filled in and no
//! ports (`fragment.rs` finds them). An IPv6 fragment header with offset 0
//! and no more fragments (an atomic fragment, RFC 6946) is no fragmentation.
//!
//! ICMP / ICMPv6 errors (`IcmpError`) get their outer header parsed here; the
//! quoted packet inside is `icmp.rs`'s business. IPv6 packets with a header
//! that a rewrite behind it would break (a Routing header with segments left:
//! the destination is not final; AH: its ICV covers the addresses; ESP: the
//! ports are encrypted) are `ExtHeader`, passed untouched.

use crate::{hook::Hook, nat::load_word};
use datapath_common::{PROTO_TCP, PROTO_UDP};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const PROTO_AH: u8 = 51;
const PROTO_ESP: u8 = 50;
const PROTO_ROUTING: u8 = 43;

const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Extension headers walked before giving up on an IPv6 packet.
pub const MAX_EXT_HEADERS: usize = 4;

/// A parsed TCP or UDP packet. 8-byte aligned with the addresses first, so
/// copying them into map keys takes two 64-bit moves each.
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct Flow {
    /// Addresses as 16 bytes (IPv4 mapped), network order.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Offset of the IP header (14, or 18 behind a VLAN tag).
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// IPv4 header length in bytes (0 for IPv6).
    pub ihl: usize,
    /// L4 length (header + payload) from the IP length fields.
    pub l4_len: usize,
    /// Ports, network order.
    pub sport: u16,
    pub dport: u16,
    /// IPv4 identification or IPv6 fragment id, as loaded (fragments only).
    pub frag_id: u32,
    pub v6: bool,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The first fragment of a fragmented datagram.
    pub first_fragment: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4/IPv6, or not TCP/UDP: none of our business.
    Other,
    Malformed,
    /// A later fragment: the `Flow` has addresses, protocol, offsets (`l4`
    /// is where its payload starts), lengths and `frag_id`; no ports.
    Fragment,
    /// A TCP/UDP packet; the `Flow` was filled in.
    Flow,
    /// An ICMP error (v4 types 3, 11, 12) or ICMPv6 error (types 1-4): the
    /// `Flow`'s addresses, offsets and lengths describe the outer packet,
    /// `l4` is the ICMP header, `proto` the ICMP protocol; no ports.
    IcmpError,
    /// IPv6 behind a Routing header with segments left, AH or ESP.
    ExtHeader,
}

/// A `T` at `off` in the packet (one typed load; see `nat::load_word`).
#[inline(always)]
fn load<T: Copy>(hook: &impl Hook, off: usize) -> Option<T> {
    let p = hook.data() + off;
    if p + core::mem::size_of::<T>() > hook.data_end() {
        return None;
    }
    // SAFETY: bounds checked above.
    Some(unsafe { load_word::<T>(p) })
}

/// Big-endian u16 at `off`.
#[inline(always)]
fn be16(hook: &impl Hook, off: usize) -> Option<u16> {
    load::<u16>(hook, off).map(u16::from_be)
}

/// Stores an IPv4 address (as loaded from the packet) in IPv4-mapped form.
#[inline(always)]
fn set_v4_mapped(dst: &mut [u8; 16], addr: u32) {
    let p = dst.as_mut_ptr();
    // SAFETY: `dst` is a field of the 8-aligned `Flow`, at an 8-aligned offset.
    unsafe {
        (p as *mut u64).write(0);
        (p.add(8) as *mut u32).write(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        (p.add(12) as *mut u32).write(addr);
    }
}

/// Copies an IPv6 address from the packet at absolute address `at`.
#[inline(always)]
fn set_v6(dst: &mut [u8; 16], at: usize) {
    let p = dst.as_mut_ptr() as *mut u32;
    // SAFETY: the caller bounds-checked the 16 bytes at `at`; `dst` is aligned.
    unsafe {
        for i in 0..4 {
            p.add(i).write(load_word::<u32>(at + 4 * i));
        }
    }
}

/// Parses the packet into `f`. Not inlined: it keeps its header copies in
/// its own stack frame (the verifier allows 512 bytes along a call chain).
#[inline(never)]
pub fn parse(hook: &mut impl Hook, f: &mut Flow) -> Parsed {
    // Enough for Ethernet + VLAN + IPv6 + a few extension headers + TCP.
    hook.pull(192);
    let Some(mut ethertype) = be16(hook, 12) else {
        return Parsed::Other;
    };
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = be16(hook, 16) else {
            return Parsed::Malformed;
        };
        if inner == ETH_P_8021Q || inner == ETH_P_8021AD {
            // VLAN in VLAN: not supported, never rewritten.
            return Parsed::Malformed;
        }
        ethertype = inner;
        l3 = 18;
    }
    match ethertype {
        ETH_P_IP => parse_v4(hook, l3, f),
        ETH_P_IPV6 => parse_v6(hook, l3, f),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_v4(hook: &impl Hook, l3: usize, f: &mut Flow) -> Parsed {
    let h = hook.data() + l3;
    if h + 20 > hook.data_end() {
        return Parsed::Malformed;
    }
    // SAFETY: the 20-byte fixed header was bounds-checked above.
    let (vihl, total, id, frag, proto, saddr, daddr) = unsafe {
        (
            load_word::<u8>(h),
            u16::from_be(load_word::<u16>(h + 2)) as usize,
            load_word::<u16>(h + 4),
            u16::from_be(load_word::<u16>(h + 6)),
            load_word::<u8>(h + 9),
            load_word::<u32>(h + 12),
            load_word::<u32>(h + 16),
        )
    };
    if vihl >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // The skb may be non-linear past what was pulled: check the IP length
    // against the full packet length.
    let pkt_len = hook.len() as usize;
    if ihl < 20 || total < ihl || l3 + total > pkt_len || h + ihl > hook.data_end() {
        return Parsed::Malformed;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Parsed::Other;
    }
    set_v4_mapped(&mut f.src, saddr);
    set_v4_mapped(&mut f.dst, daddr);
    f.l3 = l3;
    f.l4 = l3 + ihl;
    f.v6 = false;
    f.proto = proto;
    f.ihl = ihl;
    f.l4_len = total - ihl;
    f.frag_id = id as u32;
    // Offset in the low 13 bits, "more fragments" above it.
    f.first_fragment = frag & 0x3fff == 0x2000;
    if frag & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    if proto == PROTO_ICMP {
        return icmp(hook, f, |t| t == 3 || t == 11 || t == 12);
    }
    l4(hook, f)
}

/// An ICMP message: an error of a kind `is_error` accepts, or `Other`.
#[inline(always)]
fn icmp(hook: &impl Hook, f: &mut Flow, is_error: impl Fn(u8) -> bool) -> Parsed {
    f.sport = 0;
    f.dport = 0;
    f.tcp_flags = 0;
    // Type and code together: a 1-byte bounds check compiles to a compare the
    // verifier cannot use.
    match load::<[u8; 2]>(hook, f.l4) {
        Some([t, _]) if is_error(t) => Parsed::IcmpError,
        Some(_) => Parsed::Other,
        None => Parsed::Malformed,
    }
}

#[inline(always)]
fn parse_v6(hook: &impl Hook, l3: usize, f: &mut Flow) -> Parsed {
    let h = hook.data() + l3;
    if h + 40 > hook.data_end() {
        return Parsed::Malformed;
    }
    // SAFETY: the 40-byte header was bounds-checked above.
    let (ver, payload, mut next) =
        unsafe { (load_word::<u8>(h) >> 4, u16::from_be(load_word::<u16>(h + 4)) as usize, load_word::<u8>(h + 6)) };
    if ver != 6 {
        return Parsed::Malformed;
    }
    if payload == 0 || l3 + 40 + payload > hook.len() as usize {
        // Zero is a jumbogram (or a lie): neither is ours to rewrite.
        return Parsed::Malformed;
    }
    let mut off = l3 + 40;
    let end = l3 + 40 + payload;
    f.first_fragment = false;
    f.frag_id = 0;
    let mut later = false;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => break,
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | PROTO_ROUTING | 60 => {
                let Some(e) = load::<[u8; 4]>(hook, off) else {
                    return Parsed::Malformed;
                };
                if next == PROTO_ROUTING && e[3] != 0 {
                    // Segments left: the destination address is not the final one.
                    return Parsed::ExtHeader;
                }
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            PROTO_AH | PROTO_ESP => return Parsed::ExtHeader,
            // Fragment header: 8 bytes; offset in the top 13 bits of bytes
            // 2-3, "more fragments" in the lowest bit, then the 32-bit id.
            44 => {
                let Some(e) = load::<[u32; 2]>(hook, off) else {
                    return Parsed::Malformed;
                };
                let b = e[0].to_ne_bytes();
                let bits = u16::from_be_bytes([b[2], b[3]]);
                f.frag_id = e[1];
                f.first_fragment = bits == 1;
                next = b[0];
                off += 8;
                if bits & 0xfff8 != 0 {
                    later = true;
                    break;
                }
            }
            _ => return Parsed::Other,
        }
        if off > end {
            return Parsed::Malformed;
        }
    }
    if later {
        if off > end {
            return Parsed::Malformed;
        }
    } else if next != PROTO_TCP && next != PROTO_UDP && next != PROTO_ICMPV6 {
        // Still inside an extension chain after the limit: a bogus or hostile chain.
        return match next {
            0 | PROTO_ROUTING | 60 | 44 => Parsed::Malformed,
            PROTO_AH | PROTO_ESP => Parsed::ExtHeader,
            _ => Parsed::Other,
        };
    }
    set_v6(&mut f.src, h + 8);
    set_v6(&mut f.dst, h + 24);
    f.l3 = l3;
    f.l4 = off;
    f.v6 = true;
    f.proto = next;
    f.ihl = 0;
    f.l4_len = end - off;
    if later {
        return Parsed::Fragment;
    }
    if next == PROTO_ICMPV6 {
        return icmp(hook, f, |t| (1..=4).contains(&t));
    }
    l4(hook, f)
}

#[inline(always)]
fn l4(hook: &impl Hook, f: &mut Flow) -> Parsed {
    let h = hook.data() + f.l4;
    let ports;
    f.tcp_flags = 0;
    if f.proto == PROTO_TCP {
        if h + 20 > hook.data_end() {
            return Parsed::Malformed;
        }
        // SAFETY: the 20-byte TCP header was bounds-checked above.
        let (p, doff, flags) =
            unsafe { (load_word::<u32>(h), ((load_word::<u8>(h + 12) >> 4) as usize) * 4, load_word::<u8>(h + 13)) };
        if doff < 20 || doff > f.l4_len {
            return Parsed::Malformed;
        }
        ports = p;
        f.tcp_flags = flags;
    } else {
        if h + 8 > hook.data_end() {
            return Parsed::Malformed;
        }
        // SAFETY: the 8-byte UDP header was bounds-checked above.
        let (p, ulen, sum) =
            unsafe { (load_word::<u32>(h), u16::from_be(load_word::<u16>(h + 4)) as usize, load_word::<u16>(h + 6)) };
        // A first fragment's UDP length is the whole datagram's: longer
        // than this fragment's payload (more fragments follow), never within
        // it. Either way the header itself lies within the IP packet.
        if ulen < 8 || f.l4_len < 8 || (ulen > f.l4_len) != f.first_fragment {
            return Parsed::Malformed;
        }
        if f.v6 && sum == 0 {
            // No checksum is not allowed over IPv6 (RFC 8200 §8.1): the
            // receiver drops it, so it is not ours to forward.
            return Parsed::Malformed;
        }
        ports = p;
    }
    f.sport = ports as u16;
    f.dport = (ports >> 16) as u16;
    Parsed::Flow
}
