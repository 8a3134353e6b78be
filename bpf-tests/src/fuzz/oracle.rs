// SPDX-License-Identifier: MIT OR Apache-2.0
//! Judges one program run: the verdict, the output frame and the verdict
//! counters it moved, against the datapath's state after the run.
//!
//! Every packet must be counted under exactly one reason (`fib_pass` and
//! `mtu_pass` come on top), and the reason must fit what happened:
//! - passed unchanged (pass, malformed, fragment, icmp_error_pass,
//!   ext_header_pass, tail_call_failed): byte-identical output;
//! - dropped (snat_exhausted, source_range_drop, rewrite_failed,
//!   reply_limited, no_local_endpoint_drop);
//! - translated (new_flow, ct_hit, reverse_nat, ct_full, fragment_nat;
//!   redirected, or passed with fib_pass / mtu_pass): the same packet with
//!   only MACs, TTL, addresses, ports and checksums changed, the addresses
//!   and ports those of the conntrack entry for the input's tuple (or, with
//!   no entry, of a backend of the service it was sent to), and every
//!   checksum that verified in the input verifying in the output;
//! - an ICMP error translated (icmp_error_nat): the outer destination, the
//!   quote's addresses and ports, as the flow of the reversed quote gives
//!   them (RFC 5508), checksums likewise;
//! - answered (no_backend_reject, frag_needed): a RST or an ICMP error from
//!   the input's destination to its source, quoting it, checksums valid.

use std::collections::HashMap;

use datapath_common::{CT_F_REPLY, CT_F_SNAT, CtEntry, CtKey, FragKey, FragPorts, SCOPE_INTERNAL, ServiceKey, verdict};

use super::wire::{self, Frag, ICMP, ICMPV6, Ip, TCP, UDP};
use crate::{Lb, Verdict};

/// What a run was judged to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Unchanged,
    Dropped,
    Translated,
    IcmpTranslated,
    Answered,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::Dropped => "dropped",
            Self::Translated => "translated",
            Self::IcmpTranslated => "icmp-translated",
            Self::Answered => "answered",
        }
    }
}

/// What the oracle knows independently of the datapath: each frontend
/// id's address and port (host order), and the hook's scope.
pub struct Known {
    pub frontends: HashMap<u32, ([u8; 16], u16)>,
    pub scope: u8,
}

/// A (source, destination, source port, destination port) tuple, ports in host order.
type Tuple = ([u8; 16], [u8; 16], u16, u16);

pub fn judge(lb: &Lb, known: &Known, input: &[u8], v: Verdict, out: &[u8], delta: &[u64]) -> Result<Outcome, String> {
    let on_top = |r: u32| {
        r == verdict::FIB_PASS || r == verdict::MTU_PASS || r == verdict::CT_MISS_NON_SYN || r == verdict::L2_EXPIRED
    };
    let primary: Vec<u32> = (0..verdict::COUNT).filter(|&r| !on_top(r) && delta[r as usize] > 0).collect();
    let counted: u64 = primary.iter().map(|&r| delta[r as usize]).sum();
    if counted != 1 {
        return Err(format!("counted under {counted} reasons: {}", names(delta)));
    }
    let reason = primary[0];
    let kernel = delta[verdict::FIB_PASS as usize] + delta[verdict::MTU_PASS as usize] > 0;
    use verdict::*;
    match reason {
        PASS | MALFORMED | FRAGMENT | ICMP_ERROR_PASS | EXT_HEADER_PASS | TAIL_CALL_FAILED => {
            if v != Verdict::Pass || out != input || kernel {
                return Err(format!("{}: {v:?}, output {}", NAMES[reason as usize], diff(input, out)));
            }
            Ok(Outcome::Unchanged)
        }
        SNAT_EXHAUSTED | SOURCE_RANGE_DROP | REWRITE_FAILED | REPLY_LIMITED | NO_LOCAL_ENDPOINT_DROP | CT_RACE_DROP => {
            if v != Verdict::Drop {
                return Err(format!("{}: {v:?}", NAMES[reason as usize]));
            }
            Ok(Outcome::Dropped)
        }
        NEW_FLOW | CT_HIT | REVERSE_NAT | CT_FULL | FRAGMENT_NAT | CT_RACE => {
            if !(v == Verdict::Redirect || (v == Verdict::Pass && kernel)) {
                return Err(format!("{}: {v:?} (fib_pass/mtu_pass: {kernel})", NAMES[reason as usize]));
            }
            translated(lb, known, input, out, reason).map(|()| Outcome::Translated)
        }
        ICMP_ERROR_NAT => {
            if !(v == Verdict::Redirect || (v == Verdict::Pass && kernel)) {
                return Err(format!("icmp_error_nat: {v:?}"));
            }
            icmp_translated(lb, known, input, out).map(|()| Outcome::IcmpTranslated)
        }
        NO_BACKEND_REJECT | FRAG_NEEDED => {
            if v != Verdict::Redirect {
                return Err(format!("{}: {v:?}", NAMES[reason as usize]));
            }
            answered(input, out, reason == FRAG_NEEDED).map(|()| Outcome::Answered)
        }
        _ => Err(format!("reason {} has no rule", NAMES[reason as usize])),
    }
}

fn names(delta: &[u64]) -> String {
    let parts: Vec<String> = (0..verdict::COUNT as usize)
        .filter(|&r| delta[r] > 0)
        .map(|r| format!("{}+{}", verdict::NAMES[r], delta[r]))
        .collect();
    parts.join(" ")
}

fn diff(a: &[u8], b: &[u8]) -> String {
    if a == b {
        return "identical".into();
    }
    if a.len() != b.len() {
        return format!("length {} → {}", a.len(), b.len());
    }
    let at: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).take(8).collect();
    format!("differs at {at:?}")
}

fn key(t: &Tuple, proto: u8) -> CtKey {
    CtKey { src: t.0, dst: t.1, sport: t.2.to_be(), dport: t.3.to_be(), proto, _pad: [0; 3] }
}

/// Where conntrack entry `e` (found under `k`) sends a packet, as the
/// oracle reads the entry: a reply comes from its frontend (to the original
/// client if SNATed), a forward packet goes to its backend (from the SNAT
/// source if SNATed).
fn target(lb: &Lb, known: &Known, k: &Tuple, e: &CtEntry) -> Result<Tuple, String> {
    let snat = e.flags & CT_F_SNAT != 0;
    let nat = (e.nat_addr, u16::from_be(e.nat_port));
    if e.flags & CT_F_REPLY != 0 {
        let &(addr, port) = known.frontends.get(&e.rev_nat_id).ok_or(format!("unknown frontend {}", e.rev_nat_id))?;
        let (dst, dport) = if snat { nat } else { (k.1, k.3) };
        Ok((addr, dst, port, dport))
    } else {
        let b = lb.dp.backend(e.backend_id).ok_or(format!("entry names backend {}, which is gone", e.backend_id))?;
        let (src, sport) = if snat { nat } else { (k.0, k.2) };
        Ok((src, b.addr, sport, u16::from_be(b.port)))
    }
}

/// The backends a new flow to `t`'s destination may get, by the service
/// map (the pod-side scope falls back to the external frontends).
fn service_backends(lb: &Lb, known: &Known, t: &Tuple, proto: u8) -> Vec<u32> {
    let mut k = ServiceKey { addr: t.1, port: t.3.to_be(), proto, scope: known.scope };
    let svc = lb.dp.service(&k).or_else(|| {
        k.scope = 0;
        (known.scope == SCOPE_INTERNAL).then(|| lb.dp.service(&k)).flatten()
    });
    svc.and_then(|s| lb.dp.region_slots(&s).ok()).unwrap_or_default()
}

fn frag_ports(lb: &Lb, ip: &Ip) -> Option<(u16, u16)> {
    let map = lb.dp.ebpf.map(datapath_common::maps::FRAGS)?;
    let frags = aya::maps::HashMap::<_, FragKey, FragPorts>::try_from(map).ok()?;
    // The id as the datapath loads it: the packet's bytes in memory order.
    let id = if ip.v6 {
        u32::from_ne_bytes(ip.frag_id.to_be_bytes())
    } else {
        u16::from_ne_bytes((ip.frag_id as u16).to_be_bytes()) as u32
    };
    let k = FragKey { src: ip.src, dst: ip.dst, id, proto: ip.proto, _pad: [0; 3] };
    frags.get(&k, 0).ok().map(|p| (u16::from_be(p.sport), u16::from_be(p.dport)))
}

/// A TCP/UDP packet (or later fragment) rewritten to its flow's translation.
fn translated(lb: &Lb, known: &Known, input: &[u8], out: &[u8], reason: u32) -> Result<(), String> {
    let ip = wire::frame(input).ok_or("translated a frame the oracle cannot read as IP")?;
    let later = ip.frag == Frag::Later;
    if later != (reason == verdict::FRAGMENT_NAT) {
        return Err(format!("{} for a {:?} packet", verdict::NAMES[reason as usize], ip.frag));
    }
    let ports = if later {
        frag_ports(lb, &ip).ok_or("fragment_nat without a FRAGS record")?
    } else {
        ip.ports(input).ok_or("translated a packet without ports")?
    };
    let t: Tuple = (ip.src, ip.dst, ports.0, ports.1);
    let want = match lb.dp.conntrack_get(&key(&t, ip.proto)) {
        Some(e) => {
            let want = target(lb, known, &t, &e)?;
            if e.flags & CT_F_REPLY == 0 && reason == verdict::NEW_FLOW {
                let allowed = service_backends(lb, known, &t, ip.proto);
                if !allowed.contains(&e.backend_id) {
                    return Err(format!("new flow went to backend {}, not one of {allowed:?}", e.backend_id));
                }
            }
            Some(want)
        }
        None if reason == verdict::CT_FULL => None,
        None => return Err(format!("{} but no conntrack entry for the input", verdict::NAMES[reason as usize])),
    };
    let o = wire::frame(out).ok_or("the output is not IP")?;
    same_shape(&ip, &o)?;
    let got: Tuple = (o.src, o.dst, o.ports(out).map_or(ports.0, |p| p.0), o.ports(out).map_or(ports.1, |p| p.1));
    if later && (got.2, got.3) != (t.2, t.3) {
        return Err("a later fragment's bytes where ports would be were changed".into());
    }
    match want {
        Some(w) if later && (w.0, w.1) != (got.0, got.1) => {
            return Err(format!("fragment to {got:?}, entry says {w:?}"));
        }
        Some(w) if !later && w != got => return Err(format!("translated to {got:?}, entry says {w:?}")),
        None => {
            let ids = service_backends(lb, known, &t, ip.proto);
            if !ids
                .iter()
                .any(|&id| lb.dp.backend(id).is_some_and(|b| b.addr == got.1 && u16::from_be(b.port) == got.3))
            {
                return Err(format!("ct_full flow to {got:?}, no backend of its service"));
            }
        }
        _ => {}
    }
    let mut mutable = vec![false; input.len()];
    mark(&mut mutable, 0..12);
    mark(&mut mutable, ip.addr_range());
    if !ip.v6 {
        mark(&mut mutable, ip.l3 + 10..ip.l3 + 12);
    }
    if !later {
        mark(&mut mutable, ip.l4..ip.l4 + 4);
        let c = ip.l4_csum_at().unwrap();
        mark(&mut mutable, c..c + 2);
    }
    unchanged_but(input, out, &mutable, ip.ttl_at())?;
    checksums_kept(input, &ip, out, &o)
}

fn mark(m: &mut [bool], r: std::ops::Range<usize>) {
    for i in r {
        if let Some(b) = m.get_mut(i) {
            *b = true;
        }
    }
}

fn same_shape(a: &Ip, b: &Ip) -> Result<(), String> {
    if (a.l3, a.v6, a.hdr, a.proto, a.l4, a.frag) != (b.l3, b.v6, b.hdr, b.proto, b.l4, b.frag) {
        return Err(format!("the output's headers changed shape: {a:?} → {b:?}"));
    }
    Ok(())
}

/// Same length, same bytes outside `mutable`; the TTL byte as it was or one less.
fn unchanged_but(input: &[u8], out: &[u8], mutable: &[bool], ttl: usize) -> Result<(), String> {
    if input.len() != out.len() {
        return Err(format!("length {} → {}", input.len(), out.len()));
    }
    for i in 0..input.len() {
        let ok = mutable[i] || input[i] == out[i] || (i == ttl && out[i].wrapping_add(1) == input[i]);
        if !ok {
            return Err(format!("byte {i} changed: {:#04x} → {:#04x}", input[i], out[i]));
        }
    }
    Ok(())
}

/// Every checksum that verified in the input verifies in the output; a
/// UDP-over-IPv4 checksum of zero (none) stays zero, and no other UDP
/// checksum becomes zero.
fn checksums_kept(input: &[u8], ip: &Ip, out: &[u8], o: &Ip) -> Result<(), String> {
    if wire::ipv4_header_ok(input, ip) && !wire::ipv4_header_ok(out, o) {
        return Err("the IPv4 header checksum broke".into());
    }
    if wire::l4_ok(input, ip) == Some(true) && wire::l4_ok(out, o) != Some(true) {
        return Err(format!("the L4 checksum broke (proto {})", ip.proto));
    }
    if ip.proto == UDP && ip.frag != Frag::Later {
        let (a, b) = (&input[ip.l4 + 6..ip.l4 + 8], &out[o.l4 + 6..o.l4 + 8]);
        if (a == [0, 0]) != (b == [0, 0]) && !ip.v6 {
            return Err(format!("UDP checksum {a:?} → {b:?}"));
        }
        if ip.v6 && b == [0, 0] {
            return Err("an IPv6 UDP checksum of zero".into());
        }
    }
    Ok(())
}

/// An ICMP error rewritten to follow its flow.
fn icmp_translated(lb: &Lb, known: &Known, input: &[u8], out: &[u8]) -> Result<(), String> {
    let ip = wire::frame(input).ok_or("icmp_error_nat of a non-IP frame")?;
    if !matches!(ip.proto, ICMP | ICMPV6) {
        return Err("icmp_error_nat of a non-ICMP packet".into());
    }
    let q = wire::ip(input, ip.l4 + 8, ip.v6).ok_or("icmp_error_nat without a readable quote")?;
    if !matches!(q.proto, TCP | UDP) || q.frag == Frag::Later {
        return Err("icmp_error_nat of a quote without ports".into());
    }
    let qp =
        (u16::from_be_bytes([input[q.l4], input[q.l4 + 1]]), u16::from_be_bytes([input[q.l4 + 2], input[q.l4 + 3]]));
    // The reversed quote: the tuple of a packet going the other way here.
    let r: Tuple = (q.dst, q.src, qp.1, qp.0);
    let e = lb.dp.conntrack_get(&key(&r, q.proto)).ok_or("icmp_error_nat with no entry for the reversed quote")?;
    let t = target(lb, known, &r, &e)?;
    let o = wire::frame(out).ok_or("the output is not IP")?;
    same_shape(&ip, &o)?;
    let oq = wire::ip(out, o.l4 + 8, o.v6).ok_or("the output's quote is unreadable")?;
    let want_src = if ip.src == r.0 { t.0 } else { ip.src };
    if (o.src, o.dst) != (want_src, t.1) {
        return Err(format!("outer {:?} → {:?}, want {want_src:?} → {:?}", o.src, o.dst, t.1));
    }
    let oqp = (u16::from_be_bytes([out[oq.l4], out[oq.l4 + 1]]), u16::from_be_bytes([out[oq.l4 + 2], out[oq.l4 + 3]]));
    if (oq.src, oq.dst, oqp.0, oqp.1) != (t.1, t.0, t.3, t.2) {
        return Err(format!("quote {:?}:{} → {:?}:{}, want the reverse of {t:?}", oq.src, oqp.0, oq.dst, oqp.1));
    }
    let mut mutable = vec![false; input.len()];
    mark(&mut mutable, 0..12);
    mark(&mut mutable, ip.addr_range());
    mark(&mut mutable, q.addr_range());
    mark(&mut mutable, ip.l4 + 2..ip.l4 + 4);
    mark(&mut mutable, q.l4..q.l4 + 4);
    if !ip.v6 {
        mark(&mut mutable, ip.l3 + 10..ip.l3 + 12);
        mark(&mut mutable, q.l3 + 10..q.l3 + 12);
    }
    if let Some(c) = q.l4_csum_at() {
        mark(&mut mutable, c..c + 2);
    }
    unchanged_but(input, out, &mutable, ip.ttl_at())?;
    if wire::ipv4_header_ok(input, &ip) && !wire::ipv4_header_ok(out, &o) {
        return Err("the outer IPv4 header checksum broke".into());
    }
    if q.l3 + q.hdr <= input.len() && wire::ipv4_header_ok(input, &q) && !wire::ipv4_header_ok(out, &oq) {
        return Err("the quoted IPv4 header checksum broke".into());
    }
    if wire::l4_ok(input, &ip) == Some(true) && wire::l4_ok(out, &o) != Some(true) {
        return Err("the ICMP checksum broke".into());
    }
    Ok(())
}

/// A reject or packet-too-big built from the input: from its destination to
/// its source, MACs swapped, every checksum valid; a RST for TCP (no
/// backend), else an ICMP error quoting the input's IP packet.
fn answered(input: &[u8], out: &[u8], too_big: bool) -> Result<(), String> {
    let ip = wire::frame(input).ok_or("answered a non-IP frame")?;
    let o = wire::frame(out).ok_or("the answer is not IP")?;
    if (o.src, o.dst) != (ip.dst, ip.src) || out[..6] != input[6..12] || out[6..12] != input[..6] {
        return Err("the answer does not go back to the sender from the address it used".into());
    }
    if !wire::ipv4_header_ok(out, &o) {
        return Err("the answer's IPv4 header checksum".into());
    }
    if o.end != out.len() {
        return Err(format!("the answer's IP length ends at {}, the frame at {}", o.end, out.len()));
    }
    if wire::l4_ok(out, &o) != Some(true) {
        return Err(format!("the answer's checksum (proto {})", o.proto));
    }
    match o.proto {
        TCP if !too_big => {
            let (sp, dp) = ip.ports(input).ok_or("a RST for a packet without ports")?;
            if o.ports(out) != Some((dp, sp)) || out[o.l4 + 13] & 0x04 == 0 {
                return Err("the RST does not answer the segment".into());
            }
        }
        ICMP | ICMPV6 => {
            let quote = &out[o.l4 + 8..];
            let orig = &input[ip.l3..ip.end.max(ip.l3)];
            if quote.is_empty() || !orig.starts_with(quote) {
                return Err("the ICMP answer does not quote the packet".into());
            }
            let (ty, code) = (out[o.l4], out[o.l4 + 1]);
            let want = match (o.v6, too_big) {
                (false, false) => (3, 3),
                (false, true) => (3, 4),
                (true, false) => (1, 4),
                (true, true) => (2, 0),
            };
            if (ty, code) != want {
                return Err(format!("ICMP type/code {ty}/{code}, want {want:?}"));
            }
        }
        p => return Err(format!("an answer of protocol {p}")),
    }
    Ok(())
}
