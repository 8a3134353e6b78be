// SPDX-License-Identifier: MIT OR GPL-2.0
//! xlb's eBPF programs. The entry points are thin: each runs the shared
//! pipeline with its hook and scope and turns the outcome into its verdict.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod fragment;
mod hook;
mod icmp;
mod l2;
mod maps;
mod nat;
mod next_hop;
mod parse;
mod pipeline;
mod reject;
mod service;
mod sock;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use datapath_common::{SCOPE_EXTERNAL, SCOPE_INTERNAL};
use hook::{Hook, Tc};

// Each hook has a main program and, in its tail-call table, one program per
// rarer path (`datapath_common::tail`; the loader finds them by name: the
// main program's name and `tail::SUFFIXES`).

/// North-south: NodePort, LoadBalancer ingress IPs and externalIPs arriving on
/// node interfaces, plus replies coming back from remote backends.
#[xdp]
pub fn xlb_xdp(mut ctx: XdpContext) -> u32 {
    // ARP and neighbour solicitations for the LoadBalancer addresses this
    // node announces (L2_ADDRS); everything else goes on.
    if let Some(action) = l2::answer(&mut ctx) {
        return ctx.verdict(action);
    }
    let action = pipeline::process(&mut ctx);
    ctx.verdict(action)
}

#[xdp]
pub fn xlb_xdp_icmp_error(mut ctx: XdpContext) -> u32 {
    let action = icmp::program(&mut ctx);
    ctx.verdict(action)
}

#[xdp]
pub fn xlb_xdp_fragment(mut ctx: XdpContext) -> u32 {
    let action = fragment::follow(&mut ctx);
    ctx.verdict(action)
}

#[xdp]
pub fn xlb_xdp_new_flow(mut ctx: XdpContext) -> u32 {
    let action = pipeline::new_flow_program(&mut ctx, SCOPE_EXTERNAL);
    ctx.verdict(action)
}

#[xdp]
pub fn xlb_xdp_answer(mut ctx: XdpContext) -> u32 {
    let action = pipeline::answer_program(&mut ctx);
    ctx.verdict(action)
}

/// The programs of one TC side: `$egress` tells which.
macro_rules! tc_programs {
    ($egress:literal, $main:ident, $icmp:ident, $frag:ident, $new:ident, $answer:ident) => {
        #[classifier]
        pub fn $main(ctx: TcContext) -> i32 {
            let mut hook = Tc::<$egress>(ctx);
            let action = pipeline::process(&mut hook);
            hook.verdict(action) as i32
        }

        #[classifier]
        pub fn $icmp(ctx: TcContext) -> i32 {
            let mut hook = Tc::<$egress>(ctx);
            let action = icmp::program(&mut hook);
            hook.verdict(action) as i32
        }

        #[classifier]
        pub fn $frag(ctx: TcContext) -> i32 {
            let mut hook = Tc::<$egress>(ctx);
            let action = fragment::follow(&mut hook);
            hook.verdict(action) as i32
        }

        #[classifier]
        pub fn $new(ctx: TcContext) -> i32 {
            let mut hook = Tc::<$egress>(ctx);
            let action = pipeline::new_flow_program(&mut hook, SCOPE_INTERNAL);
            hook.verdict(action) as i32
        }

        #[classifier]
        pub fn $answer(ctx: TcContext) -> i32 {
            let mut hook = Tc::<$egress>(ctx);
            let action = pipeline::answer_program(&mut hook);
            hook.verdict(action) as i32
        }
    };
}

// East-west: packets from pods (ClusterIP) and replies from local backends,
// on the pod-facing side of an interface.
tc_programs!(
    false,
    xlb_tc_ingress,
    xlb_tc_ingress_icmp_error,
    xlb_tc_ingress_fragment,
    xlb_tc_ingress_new_flow,
    xlb_tc_ingress_answer
);

// The same pipeline on the egress side (host-originated traffic to services).
tc_programs!(
    true,
    xlb_tc_egress,
    xlb_tc_egress_icmp_error,
    xlb_tc_egress_fragment,
    xlb_tc_egress_new_flow,
    xlb_tc_egress_answer
);

// Socket-level load balancing (`sock.rs`), attached to a cgroup: the
// node's own sockets and, with `--socket-lb=all`, pods'.

#[cgroup_sock_addr(connect4)]
pub fn xlb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn xlb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect::<true>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn xlb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<true>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn xlb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn xlb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn xlb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse::<true>(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn xlb_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
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
