// SPDX-License-Identifier: MIT OR GPL-2.0
//! The benchmark's own XDP programs, a separate object from the datapath:
//!
//! - `xlb_pktgen`: the traffic generator. Run by BPF_PROG_TEST_RUN in
//!   live-frames mode, it stamps each frame with the configured headers and
//!   its flow's source port and address, then transmits it (XDP_TX).
//! - `xdp_forward`: the physical floor: a plain router (FIB lookup, TTL,
//!   MACs, redirect) with no load-balancing logic at all.
//! - `xdp_sink`: counts what reaches the backend and drops it.
//! - `ct_table_probe`, `ct_lru_probe` (`ct_probe.rs`): the conntrack
//!   table's operations alone, and the LRU table's, for BPF_PROG_TEST_RUN.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use datapath_common::{Counter, PktgenConfig, csum};

mod ct_probe;

#[map]
static PKTGEN: Array<PktgenConfig> = Array::with_max_entries(1, 0);
/// Per-CPU packet sequence of the generator (frame n is flow n mod flows).
#[map]
static PKTGEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Index 0: packets and bytes that reached the sink; 1 + i: those of them
/// addressed to UDP/TCP port `SINK_PORTS[i]` (the benchmark watches the
/// DNATed port and the service port).
#[map]
static SINK: PerCpuArray<Counter> = PerCpuArray::with_max_entries(3, 0);
/// Destination ports the sink counts separately (host order; 0: unused).
#[map]
static SINK_PORTS: Array<u32> = Array::with_max_entries(2, 0);
/// `xdp_forward`'s outcomes: 0 redirected, 1 passed to the kernel.
#[map]
static FORWARD: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[xdp]
pub fn xlb_pktgen(ctx: XdpContext) -> u32 {
    let Some(cfg) = PKTGEN.get(0) else { return xdp_action::XDP_ABORTED };
    let Some(seq) = PKTGEN_SEQ.get_ptr_mut(0) else { return xdp_action::XDP_ABORTED };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    // Each CPU walks the flows from its own starting point (set by the
    // loader, spread evenly), so threads do not repeat each other's flows.
    let flows = if cfg.flows == 0 { 1 } else { cfg.flows as u64 };
    let flow = (n % flows) as u32;
    let stamped = match cfg.hdr_len {
        42 => stamp::<42>(&ctx, cfg),
        54 => stamp::<54>(&ctx, cfg),
        62 => stamp::<62>(&ctx, cfg),
        74 => stamp::<74>(&ctx, cfg),
        _ => None,
    };
    match stamped.and_then(|p| set_flow(p, ctx.data_end(), cfg, flow)) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}

/// Writes the template headers; the frame's start on success.
#[inline(always)]
fn stamp<const N: usize>(ctx: &XdpContext, cfg: &PktgenConfig) -> Option<usize> {
    let start = ctx.data();
    if start + N > ctx.data_end() || N > cfg.hdr.len() {
        return None;
    }
    // SAFETY: N bytes of packet are in bounds (checked above) and the
    // template has at least N bytes.
    // (Word by word: a whole-array copy would go through the stack.)
    let (src, dst) = (cfg.hdr.as_ptr() as *const u16, start as *mut u16);
    for i in 0..N / 2 {
        unsafe { dst.add(i).write_unaligned(src.add(i).read_unaligned()) };
    }
    Some(start)
}

/// Moves the stamped flow-0 headers to flow `flow`.
#[inline(always)]
fn set_flow(start: usize, end: usize, cfg: &PktgenConfig, flow: u32) -> Option<()> {
    if flow == 0 {
        return Some(());
    }
    let span = if cfg.sport_span == 0 { 1 } else { cfg.sport_span as u32 };
    let sport = (cfg.sport_base as u32 + flow % span) as u16;
    let add = flow / span;
    let src = field::<[u8; 4]>(start, end, cfg.src_off)?;
    let port = field::<[u8; 2]>(start, end, cfg.sport_off)?;
    // SAFETY: `field` checked both are inside the frame.
    let (old_src, old_port) = unsafe { (src.read_unaligned(), port.read_unaligned()) };
    let new_src = u32::from_be_bytes(old_src).wrapping_add(add).to_be_bytes();
    let new_port = sport.to_be_bytes();
    let addr_diff = csum::diff4(&old_src, &new_src);
    let port_diff = csum::diff16(u16::from_ne_bytes(old_port), u16::from_ne_bytes(new_port));
    // SAFETY: as above.
    unsafe {
        src.write_unaligned(new_src);
        port.write_unaligned(new_port);
    }
    if cfg.ip_csum_off != 0 {
        let c = field::<u16>(start, end, cfg.ip_csum_off)?;
        // SAFETY: inside the frame.
        unsafe { c.write_unaligned(csum::apply(c.read_unaligned(), addr_diff)) };
    }
    let c = field::<u16>(start, end, cfg.l4_csum_off)?;
    let diff = csum::add(addr_diff, port_diff);
    // SAFETY: inside the frame.
    unsafe {
        let old = c.read_unaligned();
        c.write_unaligned(if cfg.udp_v4 != 0 { csum::apply_udp(old, diff) } else { csum::apply(old, diff) });
    }
    Some(())
}

/// A pointer to a `T` at `off`, if it lies inside the frame.
#[inline(always)]
fn field<T>(start: usize, end: usize, off: u16) -> Option<*mut T> {
    let off = (off as usize) & 0x7f;
    let p = start + off;
    if p + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(p as *mut T)
}

#[xdp]
pub fn xdp_sink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = (end - start) as u64;
    count(0, len);
    if let Some(port) = dst_port(start, end) {
        for i in 0..2 {
            if SINK_PORTS.get(i).is_some_and(|p| *p != 0 && *p == port as u32) {
                count(1 + i, len);
            }
        }
    }
    xdp_action::XDP_DROP
}

#[inline(always)]
fn count(i: u32, bytes: u64) {
    if let Some(c) = SINK.get_ptr_mut(i) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// The TCP/UDP destination port of an IPv4 (no options) or IPv6 (no
/// extension headers) frame.
#[inline(always)]
fn dst_port(start: usize, end: usize) -> Option<u16> {
    if start + 14 > end {
        return None;
    }
    // SAFETY: every read below is bounds-checked first.
    let (l4, proto) = match u16::from_be(unsafe { ((start + 12) as *const u16).read_unaligned() }) {
        ETH_P_IP if start + 34 <= end => (start + 34, unsafe { *((start + 23) as *const u8) }),
        ETH_P_IPV6 if start + 54 <= end => (start + 54, unsafe { *((start + 20) as *const u8) }),
        _ => return None,
    };
    if (proto != 6 && proto != 17) || l4 + 4 > end {
        return None;
    }
    Some(u16::from_be(unsafe { ((l4 + 2) as *const u16).read_unaligned() }))
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A router in XDP, the floor every load balancer on this path pays:
/// parse, FIB lookup, TTL, MACs, redirect. Anything else goes to the kernel.
#[xdp]
pub fn xdp_forward(ctx: XdpContext) -> u32 {
    let action = forward(&ctx).unwrap_or(xdp_action::XDP_PASS);
    if let Some(c) = FORWARD.get_ptr_mut(if action == xdp_action::XDP_REDIRECT { 0 } else { 1 }) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    action
}

#[inline(always)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 > end {
        return None;
    }
    // SAFETY: bounds checked above and below before each access.
    let proto = u16::from_be(unsafe { ((start + 12) as *const u16).read_unaligned() });
    // SAFETY: an all-zero bpf_fib_lookup is a valid input.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: the context is valid for the program's lifetime.
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let l3 = start + 14;
    match proto {
        ETH_P_IP => {
            if l3 + 20 > end {
                return None;
            }
            // SAFETY: the 20-byte header is in bounds.
            unsafe {
                let ttl = *((l3 + 8) as *const u8);
                if ttl <= 1 {
                    return None;
                }
                p.family = AF_INET;
                p.__bindgen_anon_2.tos = *((l3 + 1) as *const u8);
                p.l4_protocol = *((l3 + 9) as *const u8);
                p.__bindgen_anon_1.tot_len = u16::from_be(((l3 + 2) as *const u16).read_unaligned());
                p.__bindgen_anon_3.ipv4_src = ((l3 + 12) as *const u32).read_unaligned();
                p.__bindgen_anon_4.ipv4_dst = ((l3 + 16) as *const u32).read_unaligned();
            }
        }
        ETH_P_IPV6 => {
            if l3 + 40 > end {
                return None;
            }
            // SAFETY: the 40-byte header is in bounds.
            unsafe {
                if *((l3 + 7) as *const u8) <= 1 {
                    return None;
                }
                p.family = AF_INET6;
                p.l4_protocol = *((l3 + 6) as *const u8);
                p.__bindgen_anon_1.tot_len = u16::from_be(((l3 + 4) as *const u16).read_unaligned()) + 40;
                p.__bindgen_anon_3.ipv6_src = ((l3 + 8) as *const [u32; 4]).read_unaligned();
                p.__bindgen_anon_4.ipv6_dst = ((l3 + 24) as *const [u32; 4]).read_unaligned();
            }
        }
        _ => return None,
    }
    // SAFETY: plain helper call on a valid context and parameter block.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut p, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the headers were bounds-checked above.
    unsafe {
        if proto == ETH_P_IP {
            // The checksum covers TTL and protocol as one 16-bit word.
            let word = (l3 + 8) as *mut [u8; 2];
            let [ttl, l4] = word.read_unaligned();
            word.write_unaligned([ttl - 1, l4]);
            let sum = (l3 + 10) as *mut u16;
            let diff = csum::diff16(u16::from_ne_bytes([ttl, l4]), u16::from_ne_bytes([ttl - 1, l4]));
            sum.write_unaligned(csum::apply(sum.read_unaligned(), diff));
        } else {
            *((l3 + 7) as *mut u8) -= 1;
        }
        (start as *mut [u8; 6]).write_unaligned(p.dmac);
        ((start + 6) as *mut [u8; 6]).write_unaligned(p.smac);
        Some(bpf_redirect(p.ifindex, 0) as u32)
    }
}

datapath_ebpf::object_boilerplate!();
