// SPDX-License-Identifier: MIT OR GPL-2.0
//! ICMP and ICMPv6 errors that follow their flow (RFC 5508 §3; the kernel's
//! `nf_nat_icmp_reply_translation`, Cilium's `TUPLE_F_RELATED` lookups,
//! Katran's `handle_icmp.h`).
//!
//! An error quotes a packet P of some flow, as P looked where the error was
//! raised, and is addressed to P's sender. The reversed quote R (P's
//! destination → P's source, ports swapped) is exactly the tuple of a packet
//! travelling the other way at that point, so conntrack's lookup of R gives the
//! translation T a packet R would get here. The error is translated as
//! P's side of that: the quote becomes T(R) reversed (source ← T's
//! destination, destination ← T's source, ports likewise), the outer
//! destination becomes T's destination (P's sender as the other side knows
//! it), and the outer source, when it is R's source (the error comes from
//! P's destination itself, e.g. a backend's port unreachable), becomes T's
//! source. Every checksum the change touches is updated incrementally: the
//! quoted IPv4 header, the quoted TCP/UDP checksum when it was quoted, the
//! ICMP checksum (over the ICMPv6 pseudo header too) and the outer IPv4
//! header. An error that quotes no live flow passes untouched.
//!
//! The writes are plain packet stores on both hooks. That is right for TC
//! too: the ICMP checksum covers everything changed inside the message
//! (and, for ICMPv6, the outer addresses through the pseudo header), and
//! the IPv4 header checksums cover their headers, so the packet's
//! one's-complement sum, which a CHECKSUM_COMPLETE skb carries, is unchanged.

use crate::{
    conntrack,
    hook::{Action, Hook},
    maps::{SCRATCH, count_verdict},
    nat::{Target, forward, load_word, ptr, store_word, word},
    parse::{Flow, Parsed, parse},
};
use datapath_common::{CtKey, PROTO_TCP, PROTO_UDP, csum, verdict};

/// Bytes the TC hook makes linear before the quote is read: outer Ethernet,
/// VLAN, IPv6 with extensions, ICMP, and a quoted IPv6 header with
/// extensions and the first 20 bytes of TCP.
const PULL: u32 = 320;
/// Extension headers walked inside a quoted IPv6 packet.
const INNER_EXT_HEADERS: usize = 3;

/// Where the quoted packet's fields are, absolute offsets into the frame.
struct Quote {
    /// Quoted IP header.
    l3: usize,
    /// Quoted TCP/UDP header (at least its first 8 bytes are present).
    l4: usize,
    proto: u8,
    /// Written by the address rewrite: the ICMP checksum diff so far, and
    /// the quoted addresses' diff (for the quoted L4 checksum).
    icmp_diff: u32,
    inner_diff: u32,
}

/// The program behind `tail::ICMP_ERROR`: the packet parsed again, then
/// [`error`].
#[inline(always)]
pub fn program(hook: &mut impl Hook) -> Action {
    let mut flow = core::mem::MaybeUninit::<Flow>::uninit();
    // SAFETY: only read after `parse` reported an ICMP error, for which it
    // wrote every field.
    let flow = unsafe { &mut *flow.as_mut_ptr() };
    if parse(hook, flow) != Parsed::IcmpError {
        return pass();
    }
    error(hook, flow)
}

/// Translates an ICMP error that quotes a tracked flow and forwards it;
/// passes any other. `outer` is the error's own header as `parse` found it.
#[inline(never)]
pub fn error(hook: &mut impl Hook, outer: &mut Flow) -> Action {
    hook.pull(PULL);
    // R lives in the per-CPU scratch buffer: this function's frame sits
    // between `process` and `forward` in the verifier's 512-byte budget.
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return pass();
    };
    // A raw pointer, each borrow of it short: `related` reads the same
    // memory (through SCRATCH) in between.
    // SAFETY: a field of the per-CPU map value, not read here.
    let r = unsafe { &raw mut (*sc).rkey };
    let mut q = Quote { l3: 0, l4: 0, proto: 0, icmp_diff: 0, inner_diff: 0 };
    // SAFETY: per-CPU memory, used by nothing else while this program runs.
    if find(hook, outer, &mut q, unsafe { &mut *r }).is_err() {
        return pass();
    }
    let mut t = core::mem::MaybeUninit::<Target>::uninit();
    // SAFETY: `related` writes src, dst and both ports before `true`; `macs`
    // is only written (by `forward`).
    let t = unsafe { &mut *t.as_mut_ptr() };
    if !conntrack::related(outer.v6, t) {
        return pass();
    }
    // SAFETY: as above; `related` has returned.
    if rewrite(hook, outer, &mut q, unsafe { &*r }, t).is_err() {
        count_verdict(verdict::REWRITE_FAILED);
        return Action::Drop;
    }
    count_verdict(verdict::ICMP_ERROR_NAT);
    // The error itself is routed to its new destination like any packet.
    t.sport = 0;
    t.dport = 0;
    forward(hook, outer, t)
}

/// Finds the quote (`q`) and its reversed tuple (`r`).
#[inline(never)]
fn find(hook: &impl Hook, outer: &Flow, q: &mut Quote, r: &mut CtKey) -> Result<(), ()> {
    *q = quote(hook, outer).ok_or(())?;
    r.proto = q.proto;
    r._pad = [0; 3];
    read_tuple(hook, outer.v6, q, r)
}

#[inline(always)]
fn pass() -> Action {
    count_verdict(verdict::ICMP_ERROR_PASS);
    Action::Pass
}

/// Finds the quoted packet's IP and TCP/UDP headers, or `None` for a quote
/// xlb cannot have translated (another protocol, a non-first fragment, a
/// quote too short for the ports, a family that differs from the outer one).
#[inline(always)]
fn quote(hook: &impl Hook, outer: &Flow) -> Option<Quote> {
    let l3 = outer.l4 + 8;
    if outer.v6 {
        let h: [u8; 8] = read(hook, l3)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let mut next = h[6];
        let mut off = l3 + 40;
        for _ in 0..INNER_EXT_HEADERS {
            match next {
                PROTO_TCP | PROTO_UDP => break,
                // Hop-by-hop, routing, destination options.
                0 | 43 | 60 => {
                    let e: [u8; 2] = read(hook, off)?;
                    next = e[0];
                    off += (e[1] as usize + 1) * 8;
                }
                // Fragment header: only a first fragment quotes the ports.
                44 => {
                    let e: [u8; 4] = read(hook, off)?;
                    if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                        return None;
                    }
                    next = e[0];
                    off += 8;
                }
                _ => return None,
            }
        }
        if next != PROTO_TCP && next != PROTO_UDP {
            return None;
        }
        read::<[u8; 8]>(hook, off)?;
        Some(Quote { l3, l4: off, proto: next, icmp_diff: 0, inner_diff: 0 })
    } else {
        let h: [u8; 10] = read(hook, l3)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let frag = u16::from_be_bytes([h[6], h[7]]);
        if h[0] >> 4 != 4 || ihl < 20 || frag & 0x1fff != 0 || (h[9] != PROTO_TCP && h[9] != PROTO_UDP) {
            return None;
        }
        read::<[u8; 20]>(hook, l3)?;
        read::<[u8; 8]>(hook, l3 + ihl)?;
        Some(Quote { l3, l4: l3 + ihl, proto: h[9], icmp_diff: 0, inner_diff: 0 })
    }
}

/// Fills `r` with the quote's tuple reversed.
#[inline(always)]
fn read_tuple(hook: &impl Hook, v6: bool, q: &Quote, r: &mut CtKey) -> Result<(), ()> {
    if v6 {
        let a = ptr::<[u32; 8]>(hook, q.l3 + 8)? as usize;
        for i in 0..4 {
            // SAFETY: 32 bytes bounds-checked by `ptr`.
            unsafe {
                set_word(&mut r.dst, i, load_word::<u32>(a + 4 * i));
                set_word(&mut r.src, i, load_word::<u32>(a + 16 + 4 * i));
            }
        }
    } else {
        let h = ptr::<[u32; 5]>(hook, q.l3)? as usize;
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        for a in [&mut r.dst, &mut r.src] {
            set_word(a, 0, 0);
            set_word(a, 1, 0);
            set_word(a, 2, mapped);
        }
        // SAFETY: 20 bytes bounds-checked by `ptr`.
        unsafe {
            set_word(&mut r.dst, 3, load_word::<u32>(h + 12));
            set_word(&mut r.src, 3, load_word::<u32>(h + 16));
        }
    }
    let p = ptr::<u32>(hook, q.l4)? as usize;
    // SAFETY: bounds-checked by `ptr`. Ports in memory order: source first.
    let ports = unsafe { load_word::<u32>(p) };
    r.dport = ports as u16;
    r.sport = (ports >> 16) as u16;
    Ok(())
}

#[inline(always)]
fn set_word(a: &mut [u8; 16], i: usize, w: u32) {
    a[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
}

#[inline(always)]
fn read<T: Copy>(hook: &impl Hook, off: usize) -> Option<T> {
    let p = ptr::<T>(hook, off).ok()?;
    // SAFETY: bounds-checked by `ptr`.
    Some(unsafe { (p as *const T).read_unaligned() })
}

/// Replaces the 32-bit word at `p` by `new`; returns the checksum diff.
#[inline(always)]
unsafe fn swap32(p: usize, new: u32) -> u32 {
    // SAFETY: the caller bounds-checked `p`.
    unsafe {
        let old = load_word::<u32>(p);
        store_word(p, new);
        csum::add(!old, new)
    }
}

/// Applies `diff` to the 16-bit checksum at `p`; returns the field's own diff.
#[inline(always)]
unsafe fn fix16(p: usize, diff: u32, udp: bool) -> u32 {
    // SAFETY: the caller bounds-checked `p`.
    unsafe {
        let old = load_word::<u16>(p);
        let new = if udp { csum::apply_udp(old, diff) } else { csum::apply(old, diff) };
        store_word(p, new);
        csum::diff16(old, new)
    }
}

/// Rewrites the error as described in the module header. On return `t.src`
/// holds the outer source the packet now has, for the FIB lookup.
#[inline(always)]
fn rewrite(hook: &mut impl Hook, outer: &Flow, q: &mut Quote, r: &CtKey, t: &mut Target) -> Result<(), ()> {
    // Outer source: translated only when the error comes from the quoted
    // packet's destination itself.
    // (One comparison, not four: each branch here multiplies the paths the
    // verifier walks through the rest of the program.)
    let mut differ = 0;
    for i in 0..4 {
        differ |= word(&outer.src, i) ^ word(&r.src, i);
    }
    let from_peer = differ == 0;
    let new_src = if from_peer { t.src } else { outer.src };
    // The address blocks are bounds-checked here and handed down as
    // packet pointers (a callee taking the hook gets its context loads
    // promoted into arguments, in a shape the verifier refuses).
    if outer.v6 {
        let o = ptr::<[u32; 8]>(hook, outer.l3 + 8)? as usize;
        let a = ptr::<[u32; 8]>(hook, q.l3 + 8)? as usize;
        addresses_v6(o, a, q, t, &new_src);
    } else {
        let o = ptr::<[u32; 5]>(hook, outer.l3)? as usize;
        let h = ptr::<[u32; 5]>(hook, q.l3)? as usize;
        addresses_v4(o, h, q, t, &new_src);
    }
    let (mut icmp, inner) = (q.icmp_diff, q.inner_diff);
    let icmp_csum = ptr::<u16>(hook, outer.l4 + 2)? as usize;
    let ports = ptr::<u32>(hook, q.l4)? as usize;
    // Quoted ports: source ← T's destination port, destination ← T's source port.
    let new_ports = t.dport as u32 | (t.sport as u32) << 16;
    // SAFETY: bounds-checked by `ptr`.
    let port_diff = unsafe { swap32(ports, new_ports) };
    icmp = csum::add(icmp, port_diff);
    // The quoted L4 checksum, when it was quoted (UDP's always is).
    let l4_off = q.l4 + if q.proto == PROTO_UDP { 6 } else { 16 };
    if l4_off + 2 <= outer.l4 + outer.l4_len
        && let Ok(c) = ptr::<u16>(hook, l4_off)
    {
        // SAFETY: bounds-checked by `ptr`.
        icmp = csum::add(icmp, unsafe { fix16(c as usize, csum::add(inner, port_diff), q.proto == PROTO_UDP) });
    }
    // SAFETY: bounds-checked by `ptr`.
    unsafe { fix16(icmp_csum, icmp, false) };
    t.src = new_src;
    Ok(())
}

/// IPv6: the outer addresses at `o` (source `src`, destination T's) and the
/// quoted ones at `a` (both 32 bytes, bounds-checked by the caller); sets
/// `q`'s diffs (the ICMPv6 one includes the pseudo header).
#[inline(never)]
fn addresses_v6(o: usize, a: usize, q: &mut Quote, t: &Target, src: &[u8; 16]) {
    let (mut icmp, mut inner) = (0, 0);
    for i in 0..4 {
        // SAFETY: both 32-byte address blocks bounds-checked by `ptr`.
        unsafe {
            icmp = csum::add(icmp, csum::add(swap32(o + 4 * i, word(src, i)), swap32(o + 16 + 4 * i, word(&t.dst, i))));
            inner = csum::add(
                inner,
                csum::add(swap32(a + 4 * i, word(&t.dst, i)), swap32(a + 16 + 4 * i, word(&t.src, i))),
            );
        }
    }
    q.icmp_diff = csum::add(icmp, inner);
    q.inner_diff = inner;
}

/// IPv4: as [`addresses_v6`] (20-byte headers at `o` and `h`), with both IPv4 header checksums updated (ICMP
/// has no pseudo header; the quoted header's checksum change is inside the
/// message and so part of the ICMP diff).
#[inline(never)]
fn addresses_v4(o: usize, h: usize, q: &mut Quote, t: &Target, src: &[u8; 16]) {
    // SAFETY: both 20-byte headers bounds-checked by the caller.
    unsafe {
        let outer_diff = csum::add(swap32(o + 12, word(src, 3)), swap32(o + 16, word(&t.dst, 3)));
        fix16(o + 10, outer_diff, false);
        let inner = csum::add(swap32(h + 12, word(&t.dst, 3)), swap32(h + 16, word(&t.src, 3)));
        q.icmp_diff = csum::add(inner, fix16(h + 10, inner, false));
        q.inner_diff = inner;
    }
}
