// SPDX-License-Identifier: MIT OR GPL-2.0
//! Address/port rewriting with incremental checksum updates, and forwarding
//! through the FIB. One function serves DNAT, SNAT and reverse NAT: it sets
//! the packet's source and destination to the given values.

use crate::{
    hook::{Action, Hook},
    maps::count_verdict,
    parse::Flow,
};
use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use datapath_common::{PROTO_UDP, csum, verdict};

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

/// Where a packet's source and destination are to be rewritten to.
/// Addresses IPv4 mapped, ports network order.
#[derive(Default)]
pub struct Target {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Rewrites source and destination of `flow`'s packet. On `Err` nothing was
/// written, except in the TC case where a checksum helper failed after the
/// address write: the caller then drops the packet.
#[inline(never)]
pub fn rewrite(hook: &mut impl Hook, flow: &Flow, t: &Target) -> Result<(), ()> {
    let (src, dst, sport, dport) = (&t.src, &t.dst, t.sport, t.dport);
    let ports: *mut [u16; 2] = ptr(hook, flow.l4)?;
    let csum_off = flow.l4 + if flow.proto == PROTO_UDP { 6 } else { 16 };
    ptr::<u16>(hook, csum_off)?;
    let addr_diff;
    if flow.v6 {
        let addrs: *mut [[u8; 16]; 2] = ptr(hook, flow.l3 + 8)?;
        addr_diff = csum::add(csum::diff16b(&flow.src, src), csum::diff16b(&flow.dst, dst));
        // SAFETY: bounds checked by `ptr`.
        unsafe { addrs.write_unaligned([*src, *dst]) };
    } else {
        let hdr: *mut [u8; 20] = ptr(hook, flow.l3)?;
        let (os, od, ns, nd) = (v4(&flow.src), v4(&flow.dst), v4(src), v4(dst));
        addr_diff = csum::add(csum::diff4(&os, &ns), csum::diff4(&od, &nd));
        // SAFETY: bounds checked by `ptr`.
        unsafe {
            let h = &mut *hdr;
            h[12..16].copy_from_slice(&ns);
            h[16..20].copy_from_slice(&nd);
            let old = u16::from_ne_bytes([h[10], h[11]]);
            h[10..12].copy_from_slice(&csum::apply(old, addr_diff).to_ne_bytes());
        }
    }
    let port_diff = csum::add(csum::diff16(flow.sport, sport), csum::diff16(flow.dport, dport));
    // SAFETY: bounds checked by `ptr`.
    unsafe { ports.write_unaligned([sport, dport]) };
    let udp_v4 = flow.proto == PROTO_UDP && !flow.v6;
    hook.l4_csum(csum_off, addr_diff, port_diff, udp_v4)
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;

/// After a rewrite to `dst`: look the route up and redirect with fresh MACs,
/// or let the kernel route the packet when the FIB cannot resolve it.
#[inline(never)]
pub fn forward(hook: &mut impl Hook, flow: &Flow, t: &Target) -> Action {
    let (src, dst, sport, dport) = (&t.src, &t.dst, t.sport, t.dport);
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.l4_protocol = flow.proto;
    p.sport = sport;
    p.dport = dport;
    p.ifindex = hook.ifindex();
    if flow.v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_1.tot_len = (40 + flow.l4_len) as u16;
        // SAFETY: plain byte reinterpretation of two 16-byte arrays.
        unsafe {
            p.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(*src);
            p.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(*dst);
        }
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_1.tot_len = (flow.ihl + flow.l4_len) as u16;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(v4(src));
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(v4(dst));
    }
    if hook.fib_lookup(&mut p, core::mem::size_of::<FibParams>() as u32) != FIB_SUCCESS {
        count_verdict(verdict::FIB_PASS);
        return Action::Pass;
    }
    let Ok(eth) = ptr::<[u8; 12]>(hook, 0) else {
        count_verdict(verdict::FIB_PASS);
        return Action::Pass;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    // SAFETY: bounds checked by `ptr`.
    unsafe { eth.write_unaligned(macs) };
    Action::Redirect(p.ifindex)
}
