// SPDX-License-Identifier: MIT OR GPL-2.0
//! What the shared pipeline needs from the hook it runs in. XDP and TC differ
//! in how they resize packets, update L4 checksums (TC must respect the
//! skb's CHECKSUM_PARTIAL / COMPLETE state, XDP sees raw frames), resolve
//! routes and spell their verdicts; everything else is written once.

use crate::maps::{TC_CALLS, XDP_CALLS};
use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::{
        bpf_csum_update, bpf_fib_lookup, bpf_l4_csum_replace, bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail,
        bpf_skb_pull_data, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
    },
    programs::{TcContext, XdpContext},
};
use datapath_common::{csum, tail};

/// `bpf_l4_csum_replace`: the checksum belongs to an IPv6 packet (uapi
/// `BPF_F_IPV6`, not in aya's bindings yet).
const BPF_F_IPV6: u64 = 1 << 7;

/// A pipeline outcome, turned into the hook's own return code by [`Hook::verdict`].
#[derive(Clone, Copy)]
pub enum Action {
    /// Hand the packet to the kernel stack.
    Pass,
    Drop,
    /// Send back out of the interface it came in on.
    Tx,
    /// Send out of another interface (after a successful FIB lookup).
    Redirect(u32),
}

pub trait Hook {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Interface the packet is on (FIB lookups use it as the ingress device).
    fn ifindex(&self) -> u32;
    /// Packet length for the byte counters.
    fn len(&self) -> u32;
    /// Makes at least `want` bytes (or the whole packet) directly readable.
    fn pull(&mut self, want: u32);
    /// Adds `diff` (see `csum`) to the L4 checksum at `off`: `addr` is the
    /// pseudo-header part (addresses), `ports` the part inside the L4 header.
    /// For UDP a result of zero is sent as 0xffff (zero means "no checksum",
    /// which stays zero over IPv4; over IPv6 `parse` refuses it).
    fn l4_csum(&mut self, off: usize, addr: u32, ports: u32, udp: bool, v6: bool) -> Result<(), ()>;
    /// The packet's bytes changed by `diff` (see `csum`) with no checksum
    /// field compensating: a CHECKSUM_COMPLETE skb's sum is updated (TC).
    fn csum_changed(&mut self, diff: u32);
    /// Grows the packet by `delta` bytes at the front.
    fn grow_head(&mut self, delta: u32) -> Result<(), ()>;
    /// Cuts the packet to `new_len` bytes.
    fn truncate(&mut self, new_len: u32) -> Result<(), ()>;
    fn fib_lookup(&mut self, params: &mut FibParams, len: u32) -> i64;
    /// The FIB lookup checks the MTU against the skb itself when `tot_len`
    /// is 0 (TC: GSO-aware, `mtu_result` set on success); XDP has no skb
    /// and checks `tot_len`.
    const SKB: bool;
    /// The GSO segment size of the packet (0: not a GSO packet).
    fn gso_size(&self) -> u32;
    fn verdict(&self, action: Action) -> u32;
    /// Continues in the hook's program for tail-call `slot` (`tail::*`);
    /// returns only if that slot is empty.
    fn tail_call(&self, slot: u32);
}

impl Hook for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        // Not `data_end - data`: the verifier forbids arithmetic on pkt_end.
        // SAFETY: plain helper call on our context.
        unsafe { bpf_xdp_get_buff_len(self.ctx.cast()) as u32 }
    }
    #[inline(always)]
    fn pull(&mut self, _want: u32) {}
    #[inline(always)]
    fn l4_csum(&mut self, off: usize, addr: u32, ports: u32, udp: bool, _v6: bool) -> Result<(), ()> {
        let p = self.data() + off;
        if p + 2 > self.data_end() {
            return Err(());
        }
        let p = p as *mut u16;
        // SAFETY: bounds checked above.
        unsafe {
            let old = p.read_unaligned();
            let diff = csum::add(addr, ports);
            let new = if udp { csum::apply_udp(old, diff) } else { csum::apply(old, diff) };
            p.write_unaligned(new);
        }
        Ok(())
    }
    #[inline(always)]
    fn csum_changed(&mut self, _diff: u32) {}
    #[inline(always)]
    fn grow_head(&mut self, delta: u32) -> Result<(), ()> {
        // SAFETY: plain helper call on our context.
        match unsafe { bpf_xdp_adjust_head(self.ctx.cast(), -(delta as i32)) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }
    #[inline(always)]
    fn truncate(&mut self, new_len: u32) -> Result<(), ()> {
        let delta = new_len as i32 - self.len() as i32;
        if delta == 0 {
            return Ok(());
        }
        // SAFETY: plain helper call on our context.
        match unsafe { bpf_xdp_adjust_tail(self.ctx.cast(), delta) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }
    #[inline(always)]
    fn fib_lookup(&mut self, params: &mut FibParams, len: u32) -> i64 {
        // SAFETY: params is a valid, fully initialised struct of the size passed.
        unsafe { bpf_fib_lookup(self.ctx.cast(), params, len as i32, 0) }
    }
    const SKB: bool = false;
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }
    #[inline(always)]
    fn verdict(&self, action: Action) -> u32 {
        match action {
            Action::Pass => xdp_action::XDP_PASS,
            Action::Drop => xdp_action::XDP_DROP,
            // Out of the ingress device through XDP_REDIRECT, not XDP_TX:
            // on veth, XDP_TX frames sit in the peer's queue until its next
            // poll (seen here: a SNATed SYN delayed by a second or more),
            // while redirected frames are flushed at the end of this poll.
            Action::Tx => {
                // SAFETY: plain helper call.
                unsafe { bpf_redirect(self.ifindex(), 0) as u32 }
            }
            Action::Redirect(ifindex) => {
                // SAFETY: plain helper call.
                unsafe { bpf_redirect(ifindex, 0) as u32 }
            }
        }
    }
    #[inline(always)]
    fn tail_call(&self, slot: u32) {
        // SAFETY: the table holds XDP programs only (the kernel enforces it).
        unsafe { XDP_CALLS.tail_call(self, slot) }
    }
}

/// A TC (clsact / tcx) context; `EGRESS` tells which side it is attached to.
pub struct Tc<const EGRESS: bool>(pub TcContext);

impl<const EGRESS: bool> Hook for Tc<EGRESS> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context the kernel gave us.
        unsafe { (*self.0.skb.skb).ifindex }
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        self.0.len()
    }
    #[inline(always)]
    fn pull(&mut self, want: u32) {
        let len = self.0.len();
        let want = if want > len { len } else { want };
        if self.data() + want as usize > self.data_end() {
            // SAFETY: plain helper call; failure leaves a shorter linear part,
            // which the parser's bounds checks treat as a truncated packet.
            unsafe { bpf_skb_pull_data(self.0.skb.skb, want) };
        }
    }
    #[inline(always)]
    fn l4_csum(&mut self, off: usize, addr: u32, ports: u32, udp: bool, v6: bool) -> Result<(), ()> {
        let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let skb = self.0.skb.skb;
        // Size 0 in the flags: `to` is a precomputed diff. The address part is a
        // pseudo-header change (also applied to CHECKSUM_PARTIAL skbs), the port part is not.
        // SAFETY: plain helper calls; the kernel bounds-checks `off`.
        unsafe {
            if addr != 0 {
                let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
                // BPF_F_IPV6: over IPv6 the pseudo-header change is no change of
                // the packet's sum, so a CHECKSUM_COMPLETE skb's csum must stay
                // as it is. A kernel without the flag refuses it: then without.
                let done = v6 && bpf_l4_csum_replace(skb, off as u32, 0, addr as u64, pseudo | BPF_F_IPV6) == 0;
                if !done && bpf_l4_csum_replace(skb, off as u32, 0, addr as u64, pseudo) != 0 {
                    return Err(());
                }
            }
            if ports != 0 && bpf_l4_csum_replace(skb, off as u32, 0, ports as u64, mangled) != 0 {
                return Err(());
            }
        }
        Ok(())
    }
    #[inline(always)]
    fn csum_changed(&mut self, diff: u32) {
        // SAFETY: plain helper call; it does nothing (-ENOTSUPP) unless the
        // skb is CHECKSUM_COMPLETE.
        unsafe { bpf_csum_update(self.0.skb.skb, diff) };
    }
    #[inline(always)]
    fn grow_head(&mut self, delta: u32) -> Result<(), ()> {
        // SAFETY: plain helper call.
        match unsafe { bpf_skb_change_head(self.0.skb.skb, delta, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }
    #[inline(always)]
    fn truncate(&mut self, new_len: u32) -> Result<(), ()> {
        // SAFETY: plain helper call.
        match unsafe { bpf_skb_change_tail(self.0.skb.skb, new_len, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }
    #[inline(always)]
    fn fib_lookup(&mut self, params: &mut FibParams, len: u32) -> i64 {
        // SAFETY: params is a valid, fully initialised struct of the size passed.
        unsafe { bpf_fib_lookup(self.0.skb.skb.cast(), params, len as i32, 0) }
    }
    const SKB: bool = true;
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: reading a field of the context the kernel gave us.
        unsafe { (*self.0.skb.skb).gso_size }
    }
    #[inline(always)]
    fn verdict(&self, action: Action) -> u32 {
        match action {
            Action::Pass => TC_ACT_OK as u32,
            Action::Drop => TC_ACT_SHOT as u32,
            // Ingress: back out of the device towards the sender. Egress: back
            // into the stack the packet came from.
            Action::Tx => {
                let flags = if EGRESS { BPF_F_INGRESS as u64 } else { 0 };
                // SAFETY: plain helper call.
                unsafe { bpf_redirect(self.ifindex(), flags) as u32 }
            }
            // SAFETY: plain helper call.
            Action::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
        }
    }
    #[inline(always)]
    fn tail_call(&self, slot: u32) {
        let slot = if EGRESS { tail::PER_HOOK + slot } else { slot };
        // SAFETY: the table holds TC programs only (the kernel enforces it).
        unsafe { TC_CALLS.tail_call(&self.0, slot) }
    }
}
