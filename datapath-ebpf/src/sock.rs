// SPDX-License-Identifier: MIT OR GPL-2.0
//! Socket-level load balancing: cgroup programs that balance a connection
//! once, when its socket connects (TCP, connected UDP) or sends (unconnected
//! UDP), by rewriting the destination from the service to a backend; and
//! that show the service again where the kernel would show the backend
//! (`recvmsg`: the source of a datagram; `getpeername`). No packet of such a
//! socket needs NAT: it leaves for the backend's own address and the
//! backend answers the client's own address, so the TC and XDP programs
//! find no service and no conntrack entry for it and pass it untouched.
//!
//! The service lookup and the backend choice are the packet pipeline's
//! (`service.rs`). What differs because a socket is not a packet:
//! - the client identity for sessionAffinity is the socket's network
//!   namespace (`datapath_common::netns_client`): an unbound socket has no
//!   source address yet at connect;
//! - the hash for the hashing schedulers is random for TCP and the socket
//!   cookie for UDP, as Cilium; an unconnected UDP socket's datagrams are
//!   picked by that hash under every scheduler, so the socket keeps one
//!   backend (as a tracked UDP flow does on the packet path);
//! - no backend: the call fails with ECONNREFUSED, what kube-proxy's REJECT
//!   gives; under a Local policy with no local endpoint, EHOSTUNREACH (the
//!   packet path drops, and the client waits for its timeout);
//! - loadBalancerSourceRanges need the source address: those frontends are
//!   left to the packet path;
//! - a TCP socket balanced here counts as an active connection of its
//!   backend from `connect` to `sock_release` (SOCK_CONNS), for `lc`/`wlc`:
//!   conntrack, which counts the packet path's, never sees it.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use datapath_common::{
    CFG_F_SOCK_HOST_ONLY, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, SVC_F_NO_LOCAL_DROP, SVC_F_SOURCE_RANGES, SockRevKey,
    SockRevValue, is_v4_mapped, netns_client, v4_mapped, verdict,
};

use crate::{
    maps::{BACKEND_CONNS, CONFIG, REV_NAT, SOCK_CONNS, SOCK_REV, count_verdict},
    service,
};

/// What a cgroup sock_addr program returns: let the call go on (with the
/// address as the program left it) or fail it (with `bpf_set_retval`'s error).
pub const PROCEED: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;
const ENOMEM: i32 = 12;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The address in a sock_addr context (`user_ip4` / `user_ip6`), IPv4
/// mapped. `user_ip6` is read a word at a time: the verifier takes only
/// 4-byte accesses there, and volatile loads keep LLVM from merging them.
#[inline(always)]
fn user_addr<const V6: bool>(ctx: &SockAddrContext) -> [u8; 16] {
    let sa = ctx.sock_addr;
    // SAFETY: the context is the kernel's bpf_sock_addr; each load is a
    // 4-byte read of a readable field.
    unsafe {
        if V6 {
            words([
                core::ptr::read_volatile(&(*sa).user_ip6[0]),
                core::ptr::read_volatile(&(*sa).user_ip6[1]),
                core::ptr::read_volatile(&(*sa).user_ip6[2]),
                core::ptr::read_volatile(&(*sa).user_ip6[3]),
            ])
        } else {
            v4_mapped(core::ptr::read_volatile(&(*sa).user_ip4).to_ne_bytes())
        }
    }
}

/// The port in a sock_addr context, network order (`user_port` holds it in
/// its first two bytes; the kernel takes only 4-byte accesses).
#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: a 4-byte read of a readable field.
    unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) as u16 }
}

/// Rewrites the context's address and port.
#[inline(always)]
fn set_user<const V6: bool>(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) {
    let sa = ctx.sock_addr;
    let word = |i: usize| u32::from_ne_bytes([addr[i * 4], addr[i * 4 + 1], addr[i * 4 + 2], addr[i * 4 + 3]]);
    // SAFETY: 4-byte stores to the fields the kernel lets these hooks write.
    unsafe {
        if V6 {
            // One statement per word: the verifier refuses a context pointer
            // that LLVM advanced in a loop.
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], word(0));
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], word(1));
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], word(2));
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], word(3));
        } else {
            core::ptr::write_volatile(&mut (*sa).user_ip4, word(3));
        }
        core::ptr::write_volatile(&mut (*sa).user_port, port as u32);
    }
}

/// Fails the call with `errno`, counted under `reason`.
#[inline(always)]
fn fail(reason: u32, errno: i32) -> i32 {
    count_verdict(reason);
    // SAFETY: plain helper call (connect and sendmsg hooks may set it).
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// connect4 / connect6: TCP and UDP sockets connecting to a service.
#[inline(always)]
pub fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: a 4-byte read of a readable field.
    let proto = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) };
    match proto as u8 {
        PROTO_TCP | PROTO_UDP if proto < 256 => forward::<V6>(ctx, proto as u8, false),
        _ => PROCEED,
    }
}

/// sendmsg4 / sendmsg6: an unconnected UDP socket sending to a service (the
/// kernel runs these hooks only for datagrams with an address).
#[inline(always)]
pub fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: a 4-byte read of a readable field.
    let proto = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) };
    if proto != PROTO_UDP as u32 {
        return PROCEED;
    }
    forward::<V6>(ctx, PROTO_UDP, true)
}

/// The service → backend rewrite, shared by connect and sendmsg
/// (`datagram`: an unconnected socket's message, balanced by its cookie so
/// the socket keeps one backend under every scheduler).
#[inline(never)]
fn forward<const V6: bool>(ctx: &SockAddrContext, proto: u8, datagram: bool) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return PROCEED;
    };
    // SAFETY: plain helper call on this program's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if cfg.flags & CFG_F_SOCK_HOST_ONLY != 0 && netns != cfg.host_netns {
        return PROCEED;
    }
    let addr = user_addr::<V6>(ctx);
    let port = user_port(ctx);
    let Some(svc) = service::lookup(&addr, port, proto, SCOPE_INTERNAL) else {
        return PROCEED;
    };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        count_verdict(verdict::SOCK_SKIP);
        return PROCEED;
    }
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let hash = if proto == PROTO_TCP {
        // SAFETY: plain helper call.
        unsafe { bpf_get_prandom_u32() }
    } else {
        mix(cookie)
    };
    let Some((id, b)) = service::backend(&svc, &netns_client(netns), hash, datagram) else {
        return if svc.flags & SVC_F_NO_LOCAL_DROP != 0 {
            fail(verdict::SOCK_NO_LOCAL, EHOSTUNREACH)
        } else {
            fail(verdict::SOCK_REJECT, ECONNREFUSED)
        };
    };
    // An IPv4 socket can only reach an IPv4 backend (an IPv6 one connecting
    // to a mapped address reaches IPv4 backends through its mapped form).
    if !V6 && !is_v4_mapped(&b.addr) {
        return PROCEED;
    }
    let key = SockRevKey { cookie, addr: b.addr, port: b.port, _pad: [0; 6] };
    let rev = SockRevValue { addr, port, _pad: 0, rev_nat_id: svc.id };
    if SOCK_REV.insert(&key, &rev, 0).is_err() {
        // Without it the socket would see the backend where it expects the
        // service (a UDP client drops such replies): fail, as Cilium does.
        return fail(verdict::SOCK_REJECT, ENOMEM);
    }
    set_user::<V6>(ctx, &b.addr, b.port);
    if proto == PROTO_TCP {
        count_connection(cookie, id);
    }
    count_verdict(verdict::SOCK_XLATE);
    PROCEED
}

/// Counts a TCP socket balanced here as an active connection of backend
/// `id` (BACKEND_CONNS, what `lc`/`wlc` compare) until `sock_release`
/// (its close): its packets never reach conntrack, which counts the
/// others. A socket connecting again (after a failed attempt) moves its
/// count. Not counted when SOCK_CONNS is full.
#[inline(always)]
fn count_connection(cookie: u64, id: u32) {
    // SAFETY: the value is copied out at once.
    if let Some(old) = unsafe { SOCK_CONNS.get(&cookie) }.copied() {
        add_connections(old, u64::MAX);
    }
    if SOCK_CONNS.insert(&cookie, &id, 0).is_ok() {
        add_connections(id, 1);
    } else {
        let _ = SOCK_CONNS.remove(&cookie);
    }
}

#[inline(always)]
fn add_connections(id: u32, d: u64) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(id) {
        datapath_common::ct_ops::add(c, d);
    }
}

/// recvmsg4/6 and getpeername4/6: a backend address this socket was sent to
/// is shown as the service it asked for, while that frontend still exists.
#[inline(always)]
pub fn reverse<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let addr = user_addr::<V6>(ctx);
    let port = user_port(ctx);
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey { cookie, addr, port, _pad: [0; 6] };
    // SAFETY: the value is copied out at once.
    let Some(rev) = (unsafe { SOCK_REV.get(&key) }).copied() else {
        return PROCEED;
    };
    match REV_NAT.get(rev.rev_nat_id) {
        Some(r) if r.addr == rev.addr && r.port == rev.port => {}
        _ => {
            let _ = SOCK_REV.remove(&key);
            return PROCEED;
        }
    }
    set_user::<V6>(ctx, &rev.addr, rev.port);
    count_verdict(verdict::SOCK_REVERSE);
    PROCEED
}

/// sock_release: forgets the reverse entry of the socket's connected peer
/// (TCP, connected UDP). An unconnected UDP socket's entries age out of the
/// LRU map.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // Every field is loaded before any branch, each from the context
    // pointer itself: the verifier refuses a context pointer LLVM advanced
    // to share one load between the two families.
    // SAFETY: reads of bpf_sock fields a sock_release program may read.
    let (family, port, ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).family),
            core::ptr::read_volatile(&(*sk).dst_port),
            core::ptr::read_volatile(&(*sk).dst_ip4),
            [
                core::ptr::read_volatile(&(*sk).dst_ip6[0]),
                core::ptr::read_volatile(&(*sk).dst_ip6[1]),
                core::ptr::read_volatile(&(*sk).dst_ip6[2]),
                core::ptr::read_volatile(&(*sk).dst_ip6[3]),
            ],
        )
    };
    let addr = match family {
        AF_INET => v4_mapped(ip4.to_ne_bytes()),
        AF_INET6 => words(ip6),
        _ => return PROCEED,
    };
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_REV.remove(&SockRevKey { cookie, addr, port, _pad: [0; 6] });
    // SAFETY: the value is copied out at once.
    if let Some(id) = unsafe { SOCK_CONNS.get(&cookie) }.copied() {
        let _ = SOCK_CONNS.remove(&cookie);
        add_connections(id, u64::MAX);
    }
    PROCEED
}

/// Four address words as loaded (network order in memory) → 16 bytes.
#[inline(always)]
fn words(w: [u32; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&w[0].to_ne_bytes());
    a[4..8].copy_from_slice(&w[1].to_ne_bytes());
    a[8..12].copy_from_slice(&w[2].to_ne_bytes());
    a[12..].copy_from_slice(&w[3].to_ne_bytes());
    a
}

/// A 32-bit hash of a socket cookie (a counter, so its low bits alone
/// would cycle through the backends in order).
#[inline(always)]
fn mix(c: u64) -> u32 {
    let x = c.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 32) as u32 ^ x as u32
}
