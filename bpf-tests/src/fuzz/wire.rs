// SPDX-License-Identifier: MIT OR Apache-2.0
//! The oracle's own reading of a frame and its own checksum arithmetic,
//! written apart from the datapath's (`parse.rs`, `datapath_common::csum`)
//! so that a shared mistake cannot hide. It only locates fields; deciding
//! what is valid is the datapath's business, checking the result the
//! oracle's.

/// Where the fields of an IP packet are (absolute offsets in the frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    pub l3: usize,
    pub v6: bool,
    /// IPv4 header length; 40 for IPv6.
    pub hdr: usize,
    /// Addresses in the 16-byte form (IPv4 mapped).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the upper-layer header (or a later fragment's payload).
    pub l4: usize,
    /// End of the IP packet by its length field, clamped to the frame.
    pub end: usize,
    pub frag: Frag,
    /// IPv4 identification or IPv6 fragment id.
    pub frag_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    No,
    First,
    Later,
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

fn mapped(a: &[u8]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(a);
    m
}

/// The IP packet of an Ethernet frame (one optional 802.1Q tag).
pub fn frame(f: &[u8]) -> Option<Ip> {
    let (ethertype, l3) = match be16(f, 12)? {
        0x8100 | 0x88a8 => (be16(f, 16)?, 18),
        t => (t, 14),
    };
    match ethertype {
        0x0800 => ip(f, l3, false),
        0x86dd => ip(f, l3, true),
        _ => None,
    }
}

/// An IP packet at `l3` (a frame's, or one quoted inside an ICMP error).
pub fn ip(f: &[u8], l3: usize, v6: bool) -> Option<Ip> {
    if v6 {
        let h = f.get(l3..l3 + 40)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let end = (l3 + 40 + be16(h, 4)? as usize).min(f.len());
        let (mut next, mut off) = (h[6], l3 + 40);
        let (mut frag, mut frag_id) = (Frag::No, 0);
        for _ in 0..8 {
            match next {
                0 | 43 | 60 => {
                    next = *f.get(off)?;
                    off += (*f.get(off + 1)? as usize + 1) * 8;
                }
                44 => {
                    let bits = be16(f, off + 2)?;
                    frag_id = u32::from_be_bytes(f.get(off + 4..off + 8)?.try_into().ok()?);
                    frag = if bits & 0xfff8 != 0 {
                        Frag::Later
                    } else if bits & 1 != 0 {
                        Frag::First
                    } else {
                        Frag::No
                    };
                    next = *f.get(off)?;
                    off += 8;
                    if frag == Frag::Later {
                        break;
                    }
                }
                _ => break,
            }
        }
        Some(Ip {
            l3,
            v6,
            hdr: 40,
            src: h[8..24].try_into().ok()?,
            dst: h[24..40].try_into().ok()?,
            proto: next,
            l4: off,
            end,
            frag,
            frag_id,
        })
    } else {
        let h = f.get(l3..l3 + 20)?;
        if h[0] >> 4 != 4 {
            return None;
        }
        let hdr = (h[0] & 0x0f) as usize * 4;
        let bits = be16(h, 6)?;
        let frag = if bits & 0x1fff != 0 {
            Frag::Later
        } else if bits & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::No
        };
        Some(Ip {
            l3,
            v6,
            hdr,
            src: mapped(&h[12..16]),
            dst: mapped(&h[16..20]),
            proto: h[9],
            l4: l3 + hdr,
            end: (l3 + be16(h, 2)? as usize).min(f.len()),
            frag,
            frag_id: be16(h, 4)? as u32,
        })
    }
}

impl Ip {
    /// Offset of the TTL / hop limit byte.
    pub fn ttl_at(&self) -> usize {
        self.l3 + if self.v6 { 7 } else { 8 }
    }

    /// The address bytes in the frame (source then destination).
    pub fn addr_range(&self) -> std::ops::Range<usize> {
        if self.v6 { self.l3 + 8..self.l3 + 40 } else { self.l3 + 12..self.l3 + 20 }
    }

    /// Source and destination port, if the L4 header is in this packet.
    pub fn ports(&self, f: &[u8]) -> Option<(u16, u16)> {
        if self.frag == Frag::Later || !matches!(self.proto, TCP | UDP) {
            return None;
        }
        Some((be16(f, self.l4)?, be16(f, self.l4 + 2)?))
    }

    /// Offset of the L4 checksum field (TCP, UDP, ICMP, ICMPv6).
    pub fn l4_csum_at(&self) -> Option<usize> {
        match self.proto {
            TCP => Some(self.l4 + 16),
            UDP => Some(self.l4 + 6),
            ICMP | ICMPV6 => Some(self.l4 + 2),
            _ => None,
        }
    }
}

/// One's complement sum of 16-bit big-endian words (an odd byte padded).
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 header's checksum verifies (IPv6 has none: true).
pub fn ipv4_header_ok(f: &[u8], ip: &Ip) -> bool {
    ip.v6 || f.get(ip.l3..ip.l3 + ip.hdr).is_some_and(|h| ip.hdr >= 20 && fold(sum(h, 0)) == 0xffff)
}

/// The L4 checksum (TCP, UDP, ICMP, ICMPv6) over the segment as far as
/// the IP length says, with the pseudo header where it has one. `None`
/// when it cannot be checked from this packet alone: a fragment (the
/// checksum covers the whole datagram), a truncated packet, another
/// protocol, or UDP over IPv4 without a checksum.
pub fn l4_ok(f: &[u8], ip: &Ip) -> Option<bool> {
    if ip.frag != Frag::No || ip.end < ip.l4 || ip.end > f.len() || ip.l4_csum_at()? + 2 > ip.end {
        return None;
    }
    let seg = &f[ip.l4..ip.end];
    if ip.proto == UDP && !ip.v6 && seg[6..8] == [0, 0] {
        return None;
    }
    let pseudo = match (ip.proto, ip.v6) {
        (ICMP, _) => 0,
        (_, true) => sum(&ip.src, sum(&ip.dst, seg.len() as u64 + ip.proto as u64)),
        (_, false) => sum(&ip.src[12..], sum(&ip.dst[12..], seg.len() as u64 + ip.proto as u64)),
    };
    Some(fold(sum(seg, pseudo)) == 0xffff)
}
