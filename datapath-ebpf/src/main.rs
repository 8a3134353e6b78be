// SPDX-License-Identifier: MIT OR GPL-2.0
//! xlb's eBPF programs. The entry points are thin: each runs the shared
//! pipeline with its hook and scope and turns the outcome into its verdict.
#![no_std]
#![no_main]

mod hook;
mod icmp;
mod maps;
mod nat;
mod parse;
mod pipeline;
mod reject;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use datapath_common::{SCOPE_EXTERNAL, SCOPE_INTERNAL};
use hook::{Hook, Tc};

/// North-south: NodePort, LoadBalancer ingress IPs and externalIPs arriving on
/// node interfaces, plus replies coming back from remote backends.
#[xdp]
pub fn xlb_xdp(mut ctx: XdpContext) -> u32 {
    let action = pipeline::process(&mut ctx, SCOPE_EXTERNAL);
    ctx.verdict(action)
}

/// East-west: packets from pods (ClusterIP) and replies from local backends,
/// on the pod-facing side of an interface.
#[classifier]
pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
    let mut hook = Tc::<false>(ctx);
    let action = pipeline::process(&mut hook, SCOPE_INTERNAL);
    hook.verdict(action) as i32
}

/// The same pipeline on the egress side (host-originated traffic to services).
#[classifier]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    let mut hook = Tc::<true>(ctx);
    let action = pipeline::process(&mut hook, SCOPE_INTERNAL);
    hook.verdict(action) as i32
}

/// Benchmark floor: swap MAC addresses and send the frame back. No lookups.
#[xdp]
pub fn xdp_tx_baseline(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 12 > end {
        return xdp_action::XDP_PASS;
    }
    let p = start as *mut [u8; 12];
    // SAFETY: bounds checked above.
    unsafe {
        let m = p.read_unaligned();
        let mut s = [0u8; 12];
        s[..6].copy_from_slice(&m[6..]);
        s[6..].copy_from_slice(&m[..6]);
        p.write_unaligned(s);
    }
    xdp_action::XDP_TX
}

datapath_ebpf::object_boilerplate!();
