// SPDX-License-Identifier: MIT OR GPL-2.0
//! Address/port rewriting with incremental checksum updates, and forwarding
//! through the FIB. One function serves DNAT, SNAT and reverse NAT: it sets
//! the packet's source and destination to the given values.

use crate::{
    hook::{Action, Hook},
    maps::{CONFIG, count_verdict},
    parse::Flow,
};
use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use datapath_common::{CFG_F_KEEP_TTL, PROTO_UDP, csum, verdict};

/// Pointer to a `T` at `off` in the packet, bounds-checked.
#[inline(always)]
pub fn ptr<T>(hook: &impl Hook, off: usize) -> Result<*mut T, ()> {
    let start = hook.data();
    if start + off + core::mem::size_of::<T>() > hook.data_end() {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// The `i`-th 32-bit word of an address, as it sits in memory.
#[inline(always)]
pub fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
}

/// Word-sized packet access. Packet data is only 2-byte aligned behind an
/// Ethernet header; the verifier allows misaligned packet access where the
/// architecture handles it (CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS: x86-64,
/// arm64), and a typed load is one instruction where `read_unaligned` would
/// be four byte loads and the shifts to join them.
#[inline(always)]
pub unsafe fn load_word<T: Copy>(p: usize) -> T {
    // SAFETY: the caller bounds-checked `p` against the packet.
    unsafe { (p as *const T).read_volatile() }
}

#[inline(always)]
pub unsafe fn store_word<T: Copy>(p: usize, v: T) {
    // SAFETY: the caller bounds-checked `p` against the packet.
    unsafe { (p as *mut T).write_volatile(v) }
}

/// Where a packet's source and destination are to be rewritten to.
/// Addresses IPv4 mapped, ports network order.
#[derive(Default)]
#[repr(C, align(8))]
pub struct Target {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Set by `lookup` on success: the MACs to write (destination, source),
    /// and a packet length known to fit the route's MTU.
    pub macs: [u8; 12],
    pub fits: u16,
}

/// Rewrites source and destination of `flow`'s packet. On `Err` nothing was
/// written, except in the TC case where a checksum helper failed after the
/// address write: the caller then drops the packet.
#[inline(never)]
pub fn rewrite(hook: &mut impl Hook, flow: &Flow, t: &Target) -> Result<(), ()> {
    let ports = ptr::<u32>(hook, flow.l4)? as usize;
    let csum_off = flow.l4 + if flow.proto == PROTO_UDP { 6 } else { 16 };
    ptr::<u16>(hook, csum_off)?;
    let addr_diff = rewrite_addresses(hook, flow, t)?;
    // Source and destination port as one word, in memory order.
    let new_ports = t.sport as u32 | (t.dport as u32) << 16;
    // SAFETY: bounds-checked by `ptr`.
    let port_diff = unsafe {
        let old = load_word::<u32>(ports);
        store_word(ports, new_ports);
        csum::add(!old, new_ports)
    };
    hook.l4_csum(csum_off, addr_diff, port_diff, flow.proto == PROTO_UDP, flow.v6)
}

/// Rewrites the IP source and destination (and the IPv4 header checksum);
/// returns the checksum diff of the address change, which the L4 checksum
/// (its pseudo header) needs. On `Err` nothing was written.
#[inline(always)]
pub fn rewrite_addresses(hook: &mut impl Hook, flow: &Flow, t: &Target) -> Result<u32, ()> {
    let mut addr_diff = 0;
    if flow.v6 {
        let a = ptr::<[u32; 8]>(hook, flow.l3 + 8)? as usize;
        for i in 0..4 {
            // SAFETY: the 32 address bytes were bounds-checked by `ptr`.
            unsafe {
                let (os, ns) = (load_word::<u32>(a + 4 * i), word(&t.src, i));
                let (od, nd) = (load_word::<u32>(a + 16 + 4 * i), word(&t.dst, i));
                addr_diff = csum::add(addr_diff, csum::add(csum::add(!os, ns), csum::add(!od, nd)));
                store_word(a + 4 * i, ns);
                store_word(a + 16 + 4 * i, nd);
            }
        }
    } else {
        let h = ptr::<[u32; 5]>(hook, flow.l3)? as usize;
        // SAFETY: the 20-byte header was bounds-checked by `ptr`.
        unsafe {
            let (os, ns) = (load_word::<u32>(h + 12), word(&t.src, 3));
            let (od, nd) = (load_word::<u32>(h + 16), word(&t.dst, 3));
            addr_diff = csum::add(csum::add(!os, ns), csum::add(!od, nd));
            store_word(h + 12, ns);
            store_word(h + 16, nd);
            let old = load_word::<u16>(h + 10);
            store_word(h + 10, csum::apply(old, addr_diff));
        }
    }
    Ok(addr_diff)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
/// BPF_FIB_LKUP_RET_FRAG_NEEDED.
const FIB_FRAG_NEEDED: i64 = 8;

/// Where [`lookup`] sends a packet.
#[derive(Clone, Copy)]
pub enum Route {
    /// Out of this interface, with `Target::macs`.
    Out(u32),
    /// The FIB cannot resolve it (no route or neighbour): the kernel routes it.
    Kernel,
    /// Longer than the egress MTU (given), and not a GSO packet whose
    /// segments would fit.
    TooBig(u32),
}

/// The IP length of `flow`'s packet, or for a GSO packet the length of its
/// segments (headers plus the segment size), as the MTU is checked.
#[inline(always)]
pub fn mtu_len(hook: &impl Hook, flow: &Flow) -> u32 {
    let gso = hook.gso_size();
    if gso == 0 {
        return (flow.l4 + flow.l4_len - flow.l3) as u32;
    }
    let l4_hdr = if flow.proto == PROTO_UDP {
        8
    } else {
        // SAFETY: `parse` bounds-checked the 20-byte TCP header.
        ptr::<u8>(hook, flow.l4 + 12).map(|p| unsafe { (load_word::<u8>(p as usize) >> 4) as u32 * 4 }).unwrap_or(60)
    };
    (flow.l4 - flow.l3) as u32 + l4_hdr + gso
}

/// Looks up the route to `t.dst` (from `t.src`, ports as rewritten) before
/// the packet is rewritten, with the MTU check: XDP checks the packet's
/// length; TC lets the kernel check the skb, which passes a GSO packet whose
/// segments fit.
#[inline(never)]
pub fn lookup<H: Hook>(hook: &mut H, flow: &Flow, t: &mut Target) -> Route {
    let (src, dst, sport, dport) = (&t.src, &t.dst, t.sport, t.dport);
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.l4_protocol = flow.proto;
    p.sport = sport;
    p.dport = dport;
    p.ifindex = hook.ifindex();
    let len = (flow.l4 + flow.l4_len - flow.l3) as u16;
    p.__bindgen_anon_1.tot_len = if H::SKB { 0 } else { len };
    if flow.v6 {
        p.family = AF_INET6;
        // SAFETY: plain byte reinterpretation of two 16-byte arrays.
        unsafe {
            p.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(*src);
            p.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(*dst);
        }
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(v4(src));
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(v4(dst));
    }
    match hook.fib_lookup(&mut p, core::mem::size_of::<FibParams>() as u32) {
        FIB_SUCCESS => {
            t.macs[..6].copy_from_slice(&p.dmac);
            t.macs[6..].copy_from_slice(&p.smac);
            // SAFETY: a union of two u16s. On success the kernel (5.12 on)
            // writes the MTU it checked against: the route's, path-MTU
            // exceptions included, for XDP; the device's for an skb with
            // tot_len 0. An older kernel leaves XDP's tot_len there, which
            // is still a length known to fit.
            t.fits = unsafe { p.__bindgen_anon_1.mtu_result };
            Route::Out(p.ifindex)
        }
        // SAFETY: a union of two u16s; the kernel set mtu_result.
        FIB_FRAG_NEEDED => Route::TooBig(unsafe { p.__bindgen_anon_1.mtu_result } as u32),
        _ => Route::Kernel,
    }
}

/// Sends a rewritten packet where [`lookup`] said.
#[inline(always)]
pub fn emit(hook: &mut impl Hook, flow: &Flow, t: &Target, route: Route) -> Action {
    match route {
        Route::Out(ifindex) => route_out(hook, flow, &t.macs, ifindex),
        Route::Kernel | Route::TooBig(_) => {
            count_verdict(verdict::FIB_PASS);
            Action::Pass
        }
    }
}

/// After a rewrite to `dst`: look the route up and redirect with fresh MACs,
/// or let the kernel route the packet when the FIB cannot resolve it (for
/// packets xlb builds or translates itself, such as ICMP errors, which are
/// never too big for the route they came by).
#[inline(never)]
pub fn forward(hook: &mut impl Hook, flow: &Flow, t: &mut Target) -> Action {
    let route = lookup(hook, flow, t);
    emit(hook, flow, t, route)
}

/// Sends a rewritten packet out of `ifindex` as a router would: TTL / hop
/// limit decremented (an expiring packet goes to the kernel, which answers
/// with ICMP time exceeded), MACs of the next hop written.
#[inline(always)]
pub fn route_out(hook: &mut impl Hook, flow: &Flow, macs: &[u8; 12], ifindex: u32) -> Action {
    let keep_ttl = CONFIG.get(0).is_some_and(|c| c.flags & CFG_F_KEEP_TTL != 0);
    if (!keep_ttl && decrement_ttl(hook, flow) != Ok(true)) || set_macs(hook, macs).is_err() {
        count_verdict(verdict::FIB_PASS);
        return Action::Pass;
    }
    Action::Redirect(ifindex)
}

/// Decrements the IPv4 TTL (updating the header checksum) or the IPv6 hop
/// limit. `Ok(false)`: it would expire here, nothing was written.
#[inline(always)]
fn decrement_ttl(hook: &mut impl Hook, flow: &Flow) -> Result<bool, ()> {
    if flow.v6 {
        let p = ptr::<u8>(hook, flow.l3 + 7)? as usize;
        // SAFETY: bounds-checked by `ptr`.
        unsafe {
            let hop = load_word::<u8>(p);
            if hop <= 1 {
                return Ok(false);
            }
            store_word(p, hop - 1);
        }
    } else {
        let h = ptr::<[u16; 6]>(hook, flow.l3)? as usize;
        // SAFETY: bounds-checked by `ptr`. Bytes 8-9 are TTL and protocol; as
        // a native (little-endian) word the TTL is the low byte.
        unsafe {
            let old = load_word::<u16>(h + 8);
            if old.to_le_bytes()[0] <= 1 {
                return Ok(false);
            }
            let new = old - 1;
            store_word(h + 8, new);
            let c = load_word::<u16>(h + 10);
            store_word(h + 10, csum::apply(c, csum::diff16(old, new)));
        }
    }
    Ok(true)
}

/// Writes destination and source MAC.
#[inline(always)]
pub fn set_macs(hook: &mut impl Hook, macs: &[u8; 12]) -> Result<(), ()> {
    let eth = ptr::<[u8; 12]>(hook, 0)? as usize;
    // SAFETY: bounds checked by `ptr`.
    unsafe {
        for i in 0..3 {
            store_word(
                eth + 4 * i,
                u32::from_ne_bytes([macs[4 * i], macs[4 * i + 1], macs[4 * i + 2], macs[4 * i + 3]]),
            );
        }
    }
    Ok(())
}
