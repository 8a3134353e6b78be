// SPDX-License-Identifier: MIT OR GPL-2.0
//! The new-flow path's next-hop cache: the route to a backend, looked up by
//! the first new flow to it and then reused by the next ones, so a new flow
//! normally takes no `bpf_fib_lookup` (issue #13). One entry per backend and
//! hook kind (`datapath_common::NextHop`); the agent bumps
//! `Config::route_epoch` on every route, rule and neighbour notification,
//! which retires all of them at once.
//!
//! A per-backend cache is only right while the route to a backend depends on
//! its address alone: the agent turns it off (`CFG_F_NO_NEXT_HOP_CACHE`)
//! while an `ip rule` selects by anything else.

use crate::{
    hook::Hook,
    maps::{CONFIG, NEXT_HOP, SCRATCH},
    nat::{Route, Target, lookup, mtu_len, word},
    parse::Flow,
};
use core::{
    intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg},
    ptr::{read_volatile, write_volatile},
};
use datapath_common::{
    CFG_F_NEXT_HOP_PER_INGRESS4, CFG_F_NEXT_HOP_PER_INGRESS6, CFG_F_NO_NEXT_HOP_CACHE, NEXT_HOP_TTL_NS,
    NEXT_HOP_WRITING, NextHop,
};

/// The route for a new flow's packet to backend `backend` (at `t.dst`): the
/// cached one when it is still valid and the packet is known to fit it,
/// else a FIB lookup, whose success is cached.
/// The time is the packet's, read by conntrack's lookup or insert just
/// before (SCRATCH's `found.now_ns`): no second clock read.
#[inline(never)]
pub fn route<H: Hook>(hook: &mut H, flow: &Flow, t: &mut Target, backend: u32) -> Route {
    // SAFETY (of the read): per-CPU memory, written by this program.
    let now = SCRATCH.get_ptr(0).map_or(0, |sc| unsafe { read_volatile(&raw const (*sc).found.now_ns) });
    let Some(cfg) = CONFIG.get(0) else {
        return lookup(hook, flow, t);
    };
    // An IPv6 link-local source is never forwarded (the FIB says so, per
    // packet); a cached route must not forward it either.
    let link_local = flow.v6 && t.src[0] == 0xfe && t.src[1] & 0xc0 == 0x80;
    if backend == 0 || link_local || cfg.flags & CFG_F_NO_NEXT_HOP_CACHE != 0 {
        return lookup(hook, flow, t);
    }
    let per_ingress = cfg.flags & if flow.v6 { CFG_F_NEXT_HOP_PER_INGRESS6 } else { CFG_F_NEXT_HOP_PER_INGRESS4 } != 0;
    let ingress = if per_ingress { hook.ifindex() } else { 0 };
    let epoch = cfg.route_epoch as u16;
    let Some(nh) = NEXT_HOP.get_ptr_mut(backend.wrapping_mul(2).wrapping_add(H::SKB as u32)) else {
        return lookup(hook, flow, t);
    };
    // SAFETY: a live map value (array values are never freed).
    if let Some(route) = unsafe { cached(nh, hook, flow, t, now, epoch, ingress) } {
        return route;
    }
    let route = lookup(hook, flow, t);
    if let Route::Out(ifindex) = route {
        // SAFETY: as above.
        unsafe { fill(nh, t, ifindex, now, epoch, ingress) };
    }
    route
}

/// The cached route, if `nh` holds a valid one that `flow`'s packet fits;
/// `t` gets its MACs. Fields are read between two reads of `filled_ns`,
/// which a writer holds at `NEXT_HOP_WRITING` while it writes.
#[inline(always)]
unsafe fn cached(
    nh: *mut NextHop,
    hook: &impl Hook,
    flow: &Flow,
    t: &mut Target,
    now: u64,
    epoch: u16,
    ingress: u32,
) -> Option<Route> {
    // SAFETY (all): `nh` is a live map value; see `fill` for the protocol.
    unsafe {
        let filled = read_volatile(&raw const (*nh).filled_ns);
        if filled == 0
            || filled == NEXT_HOP_WRITING
            || now.wrapping_sub(filled) >= NEXT_HOP_TTL_NS
            || (*nh).epoch != epoch
        {
            return None;
        }
        if (*nh).ingress != ingress
            || !(0..4).all(|i| word(&(*nh).addr, i) == word(&t.dst, i))
            || mtu_len(hook, flow) > (*nh).mtu as u32
        {
            return None;
        }
        let macs = (*nh).macs;
        let ifindex = (*nh).ifindex;
        let mtu = (*nh).mtu;
        if read_volatile(&raw const (*nh).filled_ns) != filled {
            return None;
        }
        t.macs = macs;
        t.fits = mtu;
        Some(Route::Out(ifindex))
    }
}

/// Caches the route just looked up (`t.macs`, `t.fits`, `ifindex`) in `nh`,
/// tagged with the epoch read *before* the lookup (a lookup that raced a
/// change is retired by the bump that follows it). The writer takes the
/// entry by swapping `filled_ns` to `NEXT_HOP_WRITING`; a CPU that finds it
/// taken leaves the fill to the other one.
#[inline(always)]
unsafe fn fill(nh: *mut NextHop, t: &Target, ifindex: u32, now: u64, epoch: u16, ingress: u32) {
    // SAFETY (all): `nh` is a live map value; `filled_ns` is its first,
    // 8-byte aligned field. The swap is a BPF_CMPXCHG (fully ordered); the
    // closing store is ordered after the field stores on x86-64 (TSO).
    unsafe {
        let word = &raw mut (*nh).filled_ns;
        let seen = read_volatile(word);
        if seen == NEXT_HOP_WRITING {
            return;
        }
        let (_, taken) = atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(word, seen, NEXT_HOP_WRITING);
        if !taken {
            return;
        }
        (*nh).addr = t.dst;
        (*nh).ingress = ingress;
        (*nh).ifindex = ifindex;
        (*nh).macs = t.macs;
        (*nh).mtu = t.fits;
        (*nh).epoch = epoch;
        write_volatile(word, now);
    }
}
