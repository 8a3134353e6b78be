// SPDX-License-Identifier: MIT OR Apache-2.0
//! Packet construction for the fixtures (etherparse's builder, plus the
//! header shapes it does not build: IPv4 options, IPv6 extension headers,
//! fragments) and an independent checksum checker.

use std::net::IpAddr;

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice, checksum::Sum16BitWords};

/// Client-side MACs of input packets.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xdd, 0x01];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { flags: u8, seq: u32, ack: u32 },
    Udp,
}

/// A TCP or UDP packet description, turned into bytes by [`Pkt::build`].
#[derive(Clone, Debug)]
pub struct Pkt {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Bytes of IPv4 options (multiple of 4) to insert.
    pub ipv4_options: usize,
    /// Insert an IPv6 hop-by-hop header.
    pub hop_by_hop: bool,
    /// Zero the UDP checksum (IPv4 only: "no checksum").
    pub udp_zero_csum: bool,
    pub ttl: u8,
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|_| panic!("bad address {s}"))
}

impl Pkt {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self::new(src, sport, dst, dport, L4::Tcp { flags, seq: 1000, ack: if flags & ACK != 0 { 5000 } else { 0 } })
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, L4::Udp)
    }

    fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Self {
        Self {
            smac: CLIENT_MAC,
            dmac: NODE_MAC,
            vlan: None,
            src: ip(src),
            dst: ip(dst),
            sport,
            dport,
            l4,
            payload: b"hello xlb".to_vec(),
            ipv4_options: 0,
            hop_by_hop: false,
            udp_zero_csum: false,
            ttl: 64,
        }
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }
    pub fn options(mut self, n: usize) -> Self {
        self.ipv4_options = n;
        self
    }
    pub fn hop_by_hop(mut self) -> Self {
        self.hop_by_hop = true;
        self
    }
    pub fn udp_zero_csum(mut self) -> Self {
        self.udp_zero_csum = true;
        self
    }
    pub fn src(mut self, a: &str, port: u16) -> Self {
        self.src = ip(a);
        self.sport = port;
        self
    }
    pub fn dst(mut self, a: &str, port: u16) -> Self {
        self.dst = ip(a);
        self.dport = port;
        self
    }
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
    /// As forwarded by a router: one hop less.
    pub fn hop(self) -> Self {
        let t = self.ttl - 1;
        self.ttl(t)
    }
    pub fn macs(mut self, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        self.smac = smac;
        self.dmac = dmac;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.smac, self.dmac);
        let ip = match (self.vlan, self.src, self.dst) {
            (None, IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (None, IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            (Some(v), IpAddr::V4(s), IpAddr::V4(d)) => {
                eth.single_vlan(v.try_into().unwrap()).ipv4(s.octets(), d.octets(), self.ttl)
            }
            (Some(v), IpAddr::V6(s), IpAddr::V6(d)) => {
                eth.single_vlan(v.try_into().unwrap()).ipv6(s.octets(), d.octets(), self.ttl)
            }
            _ => panic!("mixed address families"),
        };
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { flags, seq, ack } => {
                let mut b = ip.tcp(self.sport, self.dport, seq, 65535);
                if flags & SYN != 0 {
                    b = b.syn();
                }
                if flags & ACK != 0 {
                    b = b.ack(ack);
                }
                if flags & FIN != 0 {
                    b = b.fin();
                }
                if flags & RST != 0 {
                    b = b.rst();
                }
                if flags & PSH != 0 {
                    b = b.psh();
                }
                b.write(&mut out, &self.payload).unwrap();
            }
            L4::Udp => ip.udp(self.sport, self.dport).write(&mut out, &self.payload).unwrap(),
        }
        let l3 = if self.vlan.is_some() { 18 } else { 14 };
        if self.udp_zero_csum {
            assert!(matches!(self.l4, L4::Udp) && self.src.is_ipv4());
            out[l3 + 20 + 6] = 0;
            out[l3 + 20 + 7] = 0;
        }
        if self.ipv4_options > 0 {
            insert_ipv4_options(&mut out, l3, self.ipv4_options);
        }
        if self.hop_by_hop {
            insert_hop_by_hop(&mut out, l3);
        }
        out
    }
}

/// An ICMP error (IPv4) or ICMPv6 error (IPv6) from `src` to `dst`, as a
/// router or host sends it: type, code and the 4 bytes after the checksum
/// (unused, or the next-hop MTU / MTU), quoting the first `quote` bytes of
/// `offending`'s IP packet (its Ethernet header left off).
pub fn icmp_error(src: &str, dst: &str, ty: u8, code: u8, rest: [u8; 4], offending: &[u8], quote: usize) -> Vec<u8> {
    let l3 = if u16::from_be_bytes([offending[12], offending[13]]) == 0x8100 { 18 } else { 14 };
    let quoted = &offending[l3..(l3 + quote).min(offending.len())];
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    let mut out = Vec::new();
    match (ip(src), ip(dst)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            eth.ipv4(s.octets(), d.octets(), 64).icmpv4_raw(ty, code, rest).write(&mut out, quoted).unwrap()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth.ipv6(s.octets(), d.octets(), 64).icmpv6_raw(ty, code, rest).write(&mut out, quoted).unwrap()
        }
        _ => panic!("mixed address families"),
    }
    out
}

/// Sets the MACs of a built frame (source, destination) and decrements its
/// TTL / hop limit, as a router forwards it.
pub fn routed(frame: Vec<u8>, smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let mut frame = with_macs(frame, smac, dmac);
    if frame[14] >> 4 == 4 {
        frame[14 + 8] -= 1;
        fix_ipv4_checksum(&mut frame, 14);
    } else {
        frame[14 + 7] -= 1;
    }
    frame
}

/// A built frame with other MACs (source, destination).
pub fn with_macs(mut frame: Vec<u8>, smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dmac);
    frame[6..12].copy_from_slice(&smac);
    frame
}

/// Clears "don't fragment" on a built IPv4 frame (etherparse's builder sets it).
pub fn clear_df(mut frame: Vec<u8>) -> Vec<u8> {
    frame[14 + 6] &= !0x40;
    fix_ipv4_checksum(&mut frame, 14);
    frame
}

/// Inserts `n` bytes of NOP options (plus EOL) after the IPv4 header.
pub fn insert_ipv4_options(frame: &mut Vec<u8>, l3: usize, n: usize) {
    assert!(n.is_multiple_of(4) && n <= 40);
    let mut opts = vec![1u8; n];
    opts[n - 1] = 0;
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    frame.splice(l3 + ihl..l3 + ihl, opts);
    frame[l3] = 0x40 | ((ihl + n) / 4) as u8;
    let total = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) + n as u16;
    frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(frame, l3);
}

/// Recomputes the IPv4 header checksum in place.
pub fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    frame[l3 + 10] = 0;
    frame[l3 + 11] = 0;
    let c = Sum16BitWords::new().add_slice(&frame[l3..l3 + ihl]).ones_complement();
    // etherparse sums native-order words: its result is in native order too.
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_ne_bytes());
}

/// Inserts an 8-byte hop-by-hop header (PadN) after the IPv6 header.
pub fn insert_hop_by_hop(frame: &mut Vec<u8>, l3: usize) {
    insert_ipv6_ext(frame, l3, 0, &[0, 1, 4, 0, 0, 0, 0]);
}

/// Inserts an IPv6 extension header of protocol `proto` right after the
/// IPv6 header: its next-header byte, then `rest` (its other bytes).
pub fn insert_ipv6_ext(frame: &mut Vec<u8>, l3: usize, proto: u8, rest: &[u8]) {
    let next = frame[l3 + 6];
    let mut h = vec![next];
    h.extend_from_slice(rest);
    let n = h.len() as u16;
    frame.splice(l3 + 40..l3 + 40, h);
    frame[l3 + 6] = proto;
    let plen = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) + n;
    frame[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
}

/// Checks every checksum of a frame with etherparse's own arithmetic:
/// the IPv4 header, and TCP / UDP / ICMP / ICMPv6 over their pseudo headers.
/// A zero UDP-over-IPv4 checksum ("none") is accepted.
pub fn verify_checksums(frame: &[u8]) {
    let p = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("unparseable output: {e:?}"));
    let (mut pseudo, v6) = match &p.net {
        Some(etherparse::NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            let c = Sum16BitWords::new().add_slice(h.slice()).ones_complement();
            assert_eq!(c, 0, "IPv4 header checksum");
            let s = Sum16BitWords::new().add_slice(&h.source()).add_slice(&h.destination());
            (s, false)
        }
        Some(etherparse::NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            (Sum16BitWords::new().add_slice(&h.source()).add_slice(&h.destination()), true)
        }
        other => panic!("no IP layer: {other:?}"),
    };
    let (proto, seg): (u8, &[u8]) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (6, t.slice()),
        Some(TransportSlice::Udp(u)) => {
            if !v6 && u.checksum() == 0 {
                return;
            }
            (17, u.slice())
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let c = Sum16BitWords::new().add_slice(i.slice()).ones_complement();
            assert_eq!(c, 0, "ICMP checksum");
            return;
        }
        Some(TransportSlice::Icmpv6(i)) => (58, i.slice()),
        None => panic!("no transport layer"),
    };
    pseudo = pseudo.add_2bytes([0, proto]).add_slice(&(seg.len() as u32).to_be_bytes()[if v6 { 0 } else { 2 }..]);
    let c = pseudo.add_slice(seg).ones_complement();
    assert_eq!(c, 0, "L4 checksum (proto {proto})");
}

/// Fragments a built frame (Ethernet, no VLAN; IPv4 or IPv6 without
/// extension headers) as a sender's IP layer does: the IP payload in pieces
/// of `size` bytes (a multiple of 8; the last piece has the rest), each with
/// the IP header, identification `id`, its offset and "more fragments" on
/// all but the last. IPv4 fragments have DF clear (a DF packet is never
/// fragmented); IPv6 ones carry a fragment header.
pub fn fragment(frame: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(size.is_multiple_of(8) && size > 0);
    let v6 = frame[14] >> 4 == 6;
    let hdr = if v6 { 40 } else { (frame[14] & 0x0f) as usize * 4 };
    let payload = &frame[14 + hdr..];
    let pieces: Vec<&[u8]> = payload.chunks(size).collect();
    let n = pieces.len();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let offset = (i * size / 8) as u16;
            let more = i + 1 < n;
            let mut f = frame[..14 + hdr].to_vec();
            if v6 {
                let next = f[14 + 6];
                f[14 + 6] = 44;
                let bits = offset << 3 | more as u16;
                f.extend_from_slice(&[next, 0]);
                f.extend_from_slice(&bits.to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
                f[14 + 4..14 + 6].copy_from_slice(&(8 + piece.len() as u16).to_be_bytes());
            } else {
                f[14 + 2..14 + 4].copy_from_slice(&((hdr + piece.len()) as u16).to_be_bytes());
                f[14 + 4..14 + 6].copy_from_slice(&(id as u16).to_be_bytes());
                let bits = offset | if more { 0x2000 } else { 0 };
                f[14 + 6..14 + 8].copy_from_slice(&bits.to_be_bytes());
                fix_ipv4_checksum(&mut f, 14);
            }
            f.extend_from_slice(piece);
            f
        })
        .collect()
}

/// Joins fragments made like [`fragment`]'s (in order) back into one
/// frame, for [`verify_checksums`]: the first fragment's headers, without
/// the fragment header or flags, and every fragment's payload.
pub fn reassemble(fragments: &[Vec<u8>]) -> Vec<u8> {
    let first = &fragments[0];
    let v6 = first[14] >> 4 == 6;
    let hdr = if v6 { 40 } else { (first[14] & 0x0f) as usize * 4 };
    let skip = if v6 { 8 } else { 0 };
    let mut out = first[..14 + hdr].to_vec();
    for f in fragments {
        out.extend_from_slice(&f[14 + hdr + skip..]);
    }
    let len = out.len() - 14;
    if v6 {
        out[14 + 6] = first[14 + 40];
        out[14 + 4..14 + 6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        out[14 + 2..14 + 4].copy_from_slice(&(len as u16).to_be_bytes());
        out[14 + 6..14 + 8].copy_from_slice(&[0, 0]);
        fix_ipv4_checksum(&mut out, 14);
    }
    out
}
