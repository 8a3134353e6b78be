// SPDX-License-Identifier: MIT OR GPL-2.0
//! Header parsing: Ethernet, one 802.1Q tag, IPv4 (with options) or IPv6
//! (with up to `MAX_EXT_HEADERS` extension headers), then TCP or UDP.
//!
//! Every length field is checked against the packet before it is trusted;
//! anything inconsistent is `Malformed` and the pipeline passes it unchanged
//! (the kernel's own validation then deals with it) and counts it.
//!
//! Fragments: a first fragment (offset 0) carries the L4 header and is
//! balanced by its ports like any packet of its flow. Later fragments carry no
//! ports; they are passed to the kernel unchanged and counted as `fragment`.

use crate::hook::Hook;
use datapath_common::{PROTO_TCP, PROTO_UDP, v4_mapped};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Extension headers walked before giving up on an IPv6 packet.
pub const MAX_EXT_HEADERS: usize = 4;

/// A parsed TCP or UDP packet.
#[derive(Clone, Copy, Default)]
pub struct Flow {
    /// Offset of the IP header (14, or 18 behind a VLAN tag).
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub v6: bool,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Addresses as 16 bytes (IPv4 mapped), network order.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports, network order.
    pub sport: u16,
    pub dport: u16,
    /// IPv4 header length in bytes (0 for IPv6).
    pub ihl: usize,
    /// L4 length (header + payload) from the IP length fields.
    pub l4_len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4/IPv6, or not TCP/UDP: none of our business.
    Other,
    Malformed,
    Fragment,
    /// A TCP/UDP packet; the `Flow` was filled in.
    Flow,
}

#[inline(always)]
fn load<T: Copy>(hook: &impl Hook, off: usize) -> Option<T> {
    let start = hook.data();
    if start + off + core::mem::size_of::<T>() > hook.data_end() {
        return None;
    }
    // SAFETY: bounds checked above; packet memory is byte-aligned, so read unaligned.
    Some(unsafe { ((start + off) as *const T).read_unaligned() })
}

/// Big-endian u16 at `off`.
#[inline(always)]
fn be16(hook: &impl Hook, off: usize) -> Option<u16> {
    load::<u16>(hook, off).map(u16::from_be)
}

/// Parses the packet into `f`. Not inlined: it keeps its header copies in
/// its own stack frame (the verifier allows 512 bytes along a call chain).
#[inline(never)]
pub fn parse(hook: &mut impl Hook, f: &mut Flow) -> Parsed {
    // Enough for Ethernet + VLAN + IPv6 + a few extension headers + TCP.
    hook.pull(192);
    let Some(mut ethertype) = be16(hook, 12) else { return Parsed::Other };
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = be16(hook, 16) else { return Parsed::Malformed };
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
    let Some(hdr) = load::<[u8; 20]>(hook, l3) else { return Parsed::Malformed };
    if hdr[0] >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    // The skb may be non-linear past what was pulled: trust the IP length
    // against the full packet length there.
    let pkt_len = hook.len() as usize;
    if ihl < 20 || total < ihl || l3 + total > pkt_len || hook.data() + l3 + ihl > hook.data_end() {
        return Parsed::Malformed;
    }
    let proto = hdr[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Other;
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if frag & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    f.src = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    f.dst = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    f.l3 = l3;
    f.l4 = l3 + ihl;
    f.v6 = false;
    f.proto = proto;
    f.ihl = ihl;
    f.l4_len = total - ihl;
    l4(hook, f)
}

#[inline(always)]
fn parse_v6(hook: &impl Hook, l3: usize, f: &mut Flow) -> Parsed {
    let Some(hdr) = load::<[u8; 40]>(hook, l3) else { return Parsed::Malformed };
    if hdr[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let payload = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if payload == 0 || l3 + 40 + payload > hook.len() as usize {
        // Zero is a jumbogram (or a lie): neither is ours to rewrite.
        return Parsed::Malformed;
    }
    let mut next = hdr[6];
    let mut off = l3 + 40;
    let end = l3 + 40 + payload;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => break,
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let Some(h) = load::<[u8; 2]>(hook, off) else { return Parsed::Malformed };
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let Some(h) = load::<[u8; 2]>(hook, off) else { return Parsed::Malformed };
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            // Fragment header: 8 bytes; offset in the top 13 bits of bytes 2-3.
            44 => {
                let Some(h) = load::<[u8; 4]>(hook, off) else { return Parsed::Malformed };
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Parsed::Fragment;
                }
                next = h[0];
                off += 8;
            }
            _ => return Parsed::Other,
        }
        if off > end {
            return Parsed::Malformed;
        }
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        // Still inside an extension chain after the limit: a bogus or hostile chain.
        return match next {
            0 | 43 | 60 | 51 | 44 => Parsed::Malformed,
            _ => Parsed::Other,
        };
    }
    f.src.copy_from_slice(&hdr[8..24]);
    f.dst.copy_from_slice(&hdr[24..40]);
    f.l3 = l3;
    f.l4 = off;
    f.v6 = true;
    f.proto = next;
    f.ihl = 0;
    f.l4_len = end - off;
    l4(hook, f)
}

#[inline(always)]
fn l4(hook: &impl Hook, f: &mut Flow) -> Parsed {
    f.tcp_flags = 0;
    if f.proto == PROTO_TCP {
        let Some(h) = load::<[u8; 20]>(hook, f.l4) else { return Parsed::Malformed };
        let doff = ((h[12] >> 4) as usize) * 4;
        if doff < 20 || doff > f.l4_len {
            return Parsed::Malformed;
        }
        f.tcp_flags = h[13];
    } else {
        let Some(h) = load::<[u8; 8]>(hook, f.l4) else { return Parsed::Malformed };
        let ulen = u16::from_be_bytes([h[4], h[5]]) as usize;
        if ulen < 8 || ulen > f.l4_len {
            return Parsed::Malformed;
        }
    }
    let Some(ports) = load::<[u16; 2]>(hook, f.l4) else { return Parsed::Malformed };
    f.sport = ports[0];
    f.dport = ports[1];
    Parsed::Flow
}
