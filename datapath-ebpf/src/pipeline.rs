// SPDX-License-Identifier: MIT OR GPL-2.0
//! The one load-balancing pipeline, shared by the XDP and TC programs:
//! parse → conntrack → service lookup → select → NAT → forward.

use crate::{
    conntrack::{self, Found},
    fragment,
    hook::{Action, Hook},
    maps::{
        BACKEND_STATS, CONFIG, FILTER, REPLY_BUCKET, SCRATCH, SERVICE_STATS, SOURCE_RANGES, Track, count, count_verdict,
    },
    nat::{Route, Target, emit, load_word, lookup, mtu_len, ptr, rewrite, rewrite_addresses, word},
    next_hop,
    parse::{Flow, Parsed, parse},
    reject::{NO_BACKEND, reject},
    service,
};
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use datapath_common::{
    BACKEND_F_NODE_LOCAL, Backend, PROTO_TCP, REPLY_RATE_DEFAULT, SCOPE_EXTERNAL, SVC_F_EXT_LOCAL, SVC_F_NO_LOCAL_DROP,
    SVC_F_SOURCE_RANGES, Service, SourceRangeKey, ct, hash::flow_hash, tail, verdict,
};
const NS_PER_SEC: u64 = 1_000_000_000;

/// What the conntrack / new-flow stages decided; the programs act on it.
/// Only the answer program calls `reject`, once (the verifier walks a
/// function again at every call site), and the deepest call chain stays
/// within the verifier's 512-byte stack budget.
#[derive(Clone, Copy)]
pub enum Step {
    /// Handled completely (verdict counted): return this action.
    Done(Action),
    /// Rewrite to the `Target` and forward; counted under the reason.
    Nat(u32),
    /// Leave the packet alone; counted under the reason.
    Pass(u32),
    /// Drop; counted under the reason.
    Drop(u32),
    /// No usable backend: send a reject back.
    Reject,
    /// Too big for the egress MTU (given), with DF set or over IPv6: answer
    /// "fragmentation needed" / "packet too big".
    TooBig(u32),
}

/// The main program of a hook: established flows end here; new flows,
/// answers and the rarer paths continue in programs of their own
/// (`datapath_common::tail`), each within its own verifier budget.
#[inline(always)]
pub fn process(hook: &mut impl Hook) -> Action {
    // Not zero-initialised: `parse` writes every field before `Parsed::Flow`,
    // and zeroing 80 bytes per packet is measurable.
    let mut flow = core::mem::MaybeUninit::<Flow>::uninit();
    // SAFETY: only written until `parse` reports a complete Flow.
    let flow = unsafe { &mut *flow.as_mut_ptr() };
    match parse(hook, flow) {
        Parsed::Flow => {}
        Parsed::Other => return done(verdict::PASS, Action::Pass),
        Parsed::Malformed => return done(verdict::MALFORMED, Action::Pass),
        Parsed::ExtHeader => return done(verdict::EXT_HEADER_PASS, Action::Pass),
        Parsed::Fragment => return tail_call(hook, tail::FRAGMENT),
        Parsed::IcmpError => return tail_call(hook, tail::ICMP_ERROR),
    }
    // Not to a frontend, not a backend's reply: nothing to look up.
    if FILTER.get(0).is_some_and(|f| !f.maybe_ours(&flow.src, flow.sport, &flow.dst, flow.dport)) {
        return done(verdict::PASS, Action::Pass);
    }
    // Bytes for the counters from the parsed lengths: no helper call.
    let len = (flow.l4 + flow.l4_len) as u32;
    // Every `Step::Done` path sets src, dst and ports before use; `macs` is
    // only read after `lookup` wrote it.
    let mut t = core::mem::MaybeUninit::<Target>::uninit();
    // SAFETY: see above; no field is read before it is written.
    let t = unsafe { &mut *t.as_mut_ptr() };
    match conntrack::<false>(hook, flow, len, t) {
        Step::Done(action) => action,
        Step::Pass(verdict::PASS) => tail_call(hook, tail::NEW_FLOW),
        Step::TooBig(mtu) => answer_with(hook, mtu),
        Step::Pass(reason) => done(reason, Action::Pass),
        _ => done(verdict::REWRITE_FAILED, Action::Drop),
    }
}

/// The program behind `tail::NEW_FLOW`: a packet of no live tracked flow
/// (parsed again), balanced if it is for a service.
#[inline(always)]
pub fn new_flow_program(hook: &mut impl Hook, scope: u8) -> Action {
    let mut flow = core::mem::MaybeUninit::<Flow>::uninit();
    // SAFETY: only read after `parse` reported a complete Flow.
    let flow = unsafe { &mut *flow.as_mut_ptr() };
    if parse(hook, flow) != Parsed::Flow {
        return done(verdict::PASS, Action::Pass);
    }
    let mut t = core::mem::MaybeUninit::<Target>::uninit();
    // SAFETY: `new_flow` sets src, dst and ports before `Step::Nat`; `macs`
    // is only read after `lookup` wrote it.
    let t = unsafe { &mut *t.as_mut_ptr() };
    match new_flow(flow, scope, t) {
        // Tracked from here, not from `new_flow`: the insert is a global
        // function with a frame of its own, and the two frames would not
        // fit the verifier's 512 bytes on top of each other (nor would this
        // frame, with what `forward_new` keeps in its own).
        Step::Nat(svc) => {
            let reason = conntrack::track(flow, t);
            match forward_new(hook, flow, t, (svc as u64) << 32 | reason as u64) {
                Step::Done(action) => action,
                // (The tail call from here: BPF allows it only in functions
                // returning an int.)
                Step::TooBig(mtu) => answer_with(hook, mtu),
                _ => done(verdict::REWRITE_FAILED, Action::Drop),
            }
        }
        Step::Reject => answer_with(hook, NO_BACKEND),
        Step::Pass(reason) => done(reason, Action::Pass),
        Step::Drop(reason) => done(reason, Action::Drop),
        _ => done(verdict::REWRITE_FAILED, Action::Drop),
    }
}

/// A new flow of frontend `svc`, tracked (`reason`, from `track`; the two
/// in one argument, `svc << 32 | reason`: a function returning a `Step`
/// has one argument less, five in all), counted, routed and translated
/// (`Step::Done`, or `Step::TooBig` to answer), or dropped when it could not
/// be tracked.
#[inline(never)]
fn forward_new(hook: &mut impl Hook, flow: &Flow, t: &mut Target, svc_reason: u64) -> Step {
    let (svc, reason) = ((svc_reason >> 32) as u32, svc_reason as u32);
    if reason == verdict::SNAT_EXHAUSTED || reason == verdict::CT_RACE_DROP || reason == verdict::CT_FULL_DROP {
        return Step::Done(done(reason, Action::Drop));
    }
    if flow.proto == PROTO_TCP && flow.tcp_flags & ct::TCP_SYN == 0 {
        // Katran's LRU_MISS: a connection's packet that found no record
        // (lost to expiry or eviction, or from before a restart without pins).
        count_verdict(verdict::CT_MISS_NON_SYN);
    }
    // The backend `track` settled on (its own choice, or the one a racing
    // CPU's record names).
    // SAFETY (of the read): per-CPU memory, written by `track`.
    let backend =
        SCRATCH.get_ptr(0).map_or(0, |sc| unsafe { core::ptr::read_volatile(&raw const (*sc).req.backend_id) });
    let len = (flow.l4 + flow.l4_len) as u32;
    count(&SERVICE_STATS, svc, len);
    count(&BACKEND_STATS, backend, len);
    let route = next_hop::route(hook, flow, t, backend);
    translate::<false>(hook, flow, t, route, reason)
}

/// Continues in the answer program with `answer` (see `reject`).
#[inline(always)]
fn answer_with(hook: &mut impl Hook, answer: u32) -> Action {
    if let Some(sc) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU memory; the tail call runs on this CPU next.
        unsafe { (*sc).answer = answer };
        return tail_call(hook, tail::ANSWER);
    }
    done(verdict::REWRITE_FAILED, Action::Drop)
}

/// The program behind `tail::ANSWER`: a reject, or "fragmentation needed" /
/// "packet too big" with the MTU (`Scratch::answer`), from the address the
/// sender sent to and quoting its own packet, so its path-MTU discovery
/// works through the VIP (the kernel's own answer, after a DNAT, would quote
/// the backend's address, which the sender ignores). Rate-limited.
#[inline(always)]
pub fn answer_program(hook: &mut impl Hook) -> Action {
    let mut flow = core::mem::MaybeUninit::<Flow>::uninit();
    // SAFETY: only read after `parse` reported a complete Flow.
    let flow = unsafe { &mut *flow.as_mut_ptr() };
    let Some(sc) = SCRATCH.get_ptr(0) else {
        return done(verdict::REWRITE_FAILED, Action::Drop);
    };
    // SAFETY: per-CPU memory, written by the program that tail-called this one.
    let answer = unsafe { (*sc).answer };
    if parse(hook, flow) != Parsed::Flow {
        return done(verdict::REWRITE_FAILED, Action::Drop);
    }
    if !reply_allowed() {
        return done(verdict::REPLY_LIMITED, Action::Drop);
    }
    match reject(hook, flow, answer) {
        Ok(()) => {
            done(if answer == NO_BACKEND { verdict::NO_BACKEND_REJECT } else { verdict::FRAG_NEEDED }, Action::Tx)
        }
        Err(()) => done(verdict::REWRITE_FAILED, Action::Drop),
    }
}

/// Continues in the hook's program for `slot`; counts the packet as passed
/// if the table has none.
#[inline(always)]
fn tail_call(hook: &mut impl Hook, slot: u32) -> Action {
    hook.tail_call(slot);
    done(verdict::TAIL_CALL_FAILED, Action::Pass)
}

/// Rewrites the packet to `t` and sends it by `route`, counted under
/// `reason` (`Step::Done`). A packet too big for the route, decided before
/// any rewrite: with DF set (IPv4), and always over IPv6 (routers never
/// fragment it), the sender is to be answered (`Step::TooBig`); without DF
/// a router fragments, so the packet is rewritten and the kernel fragments
/// and sends it. `LATER`: a later fragment, which has no L4 header to
/// rewrite and is never answered (it goes to the kernel when too big).
#[inline(always)]
fn translate<const LATER: bool>(hook: &mut impl Hook, flow: &Flow, t: &Target, route: Route, reason: u32) -> Step {
    if let Route::TooBig(mtu) = route
        && !LATER
        && dont_fragment(hook, flow)
    {
        return Step::TooBig(mtu);
    }
    let rewritten = if LATER {
        // Over IPv6 no checksum covers the addresses of a later fragment
        // (its first fragment's L4 checksum does, and was updated there).
        rewrite_addresses(hook, flow, t).map(|diff| {
            if flow.v6 {
                hook.csum_changed(diff);
            }
        })
    } else {
        rewrite(hook, flow, t)
    };
    if rewritten.is_err() {
        return Step::Done(done(verdict::REWRITE_FAILED, Action::Drop));
    }
    if !LATER && flow.first_fragment {
        fragment::record(flow);
    }
    count_verdict(reason);
    if let Route::TooBig(_) = route {
        return Step::Done(done(verdict::MTU_PASS, Action::Pass));
    }
    Step::Done(emit(hook, flow, t, route))
}

/// IPv6, or IPv4 with DF set.
#[inline(always)]
fn dont_fragment(hook: &impl Hook, flow: &Flow) -> bool {
    // SAFETY (of the load): `parse` bounds-checked the IPv4 header.
    flow.v6
        || ptr::<u16>(hook, flow.l3 + 6)
            .is_ok_and(|p| unsafe { load_word::<u16>(p as usize) }.to_ne_bytes()[0] & 0x40 != 0)
}

/// The per-CPU token bucket for the answers xlb builds (rejects, packet too
/// big): `Config::reply_rate` per second with a burst of as many, so a
/// spoofed flood is not reflected at line rate.
#[inline(always)]
fn reply_allowed() -> bool {
    let Some(b) = REPLY_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let b = unsafe { &mut *b };
    let rate = match CONFIG.get(0).map(|c| c.reply_rate) {
        Some(r) if r != 0 => r as u64,
        _ => REPLY_RATE_DEFAULT as u64,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let full = rate * NS_PER_SEC;
    let elapsed = now.wrapping_sub(b.last_ns);
    b.last_ns = now;
    b.credit = if elapsed >= NS_PER_SEC { full } else { (b.credit + elapsed * rate).min(full) };
    if b.credit < NS_PER_SEC {
        return false;
    }
    b.credit -= NS_PER_SEC;
    true
}

#[inline(always)]
pub fn done(reason: u32, action: Action) -> Action {
    count_verdict(reason);
    action
}

/// Existing flows: a live record DNATs a forward packet to its backend (and
/// SNATs it if the flow was SNATed), reverse-NATs a reply; the forward
/// direction is routed by the per-backend next-hop cache, the reply by the
/// route cached in the record. `Pass(PASS)` means "not a tracked flow".
/// `LATER`: `flow` is a later fragment, with the ports its first fragment
/// recorded. Inlined, so that the lookup (a global function with its own
/// stack frame) is called from the program's frame, not from one more.
#[inline(always)]
pub fn conntrack<const LATER: bool>(hook: &mut impl Hook, flow: &Flow, len: u32, t: &mut Target) -> Step {
    match conntrack::lookup(flow, t) {
        Some(f) => tracked::<LATER>(hook, flow, len, t, f),
        None => Step::Pass(verdict::PASS),
    }
}

/// A tracked flow's packet (`f`: what the lookup found), translated by
/// [`conntrack`]'s rules.
#[inline(never)]
fn tracked<const LATER: bool>(hook: &mut impl Hook, flow: &Flow, len: u32, t: &mut Target, f: *const Found) -> Step {
    // SAFETY: per-CPU map memory, written by the lookup just now.
    let f = unsafe { &*f };
    let reason = if LATER {
        verdict::FRAGMENT_NAT
    } else if f.reply {
        verdict::REVERSE_NAT
    } else {
        verdict::CT_HIT
    };
    let route = if !f.reply {
        count(&SERVICE_STATS, f.rev_nat_id, len);
        count(&BACKEND_STATS, f.backend_id, len);
        next_hop::route(hook, flow, t, f.backend_id)
    } else if f.route != 0 && mtu_len(hook, flow) <= f.mtu as u32 {
        Route::Out(f.route)
    } else {
        let route = lookup(hook, flow, t);
        if let Route::Out(ifindex) = route {
            conntrack::cache_reply_route(flow.v6, &f, t, ifindex);
        }
        route
    };
    translate::<LATER>(hook, flow, t, route, reason)
}

/// A packet without a live conntrack record: service lookup, source-range
/// check, backend selection (`t.dst`/`t.dport`) and the SNAT decision, as
/// SCRATCH's request for `conntrack::track`. `Step::Nat(frontend id)`: a
/// backend was chosen.
#[inline(never)]
fn new_flow(flow: &Flow, scope: u8, t: &mut Target) -> Step {
    let Some(svc) = service::lookup(&flow.dst, flow.dport, flow.proto, scope) else {
        return Step::Pass(verdict::PASS);
    };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        let k = Key::new(32 + 128, SourceRangeKey { service_id_be: svc.id.to_be(), addr: flow.src });
        if SOURCE_RANGES.get(&k).is_none() {
            return Step::Drop(verdict::SOURCE_RANGE_DROP);
        }
    }
    let hash = flow_hash(&flow.src, flow.sport, flow.dport, flow.proto);
    let (backend_id, b) = match service::backend(&svc, &flow.src, hash, false) {
        Some(chosen) => chosen,
        None if svc.flags & SVC_F_NO_LOCAL_DROP != 0 => return Step::Drop(verdict::NO_LOCAL_ENDPOINT_DROP),
        None => return Step::Reject,
    };
    t.dst = b.addr;
    t.dport = b.port;
    // The request lives in per-CPU scratch memory, not on the stack.
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return Step::Drop(verdict::REWRITE_FAILED);
    };
    // SAFETY: per-CPU memory, used by nothing else while this program runs.
    let req = unsafe { &mut (*sc).req };
    *req = Track { backend_id, rev_nat_id: svc.id, hash, snat_min: 0, snat_max: 0, snat_node: [0; 16] };
    snat_source(&svc, b, flow, scope, req);
    Step::Nat(svc.id)
}

/// The node address and port range to SNAT to, when this flow needs SNAT:
/// - external traffic under externalTrafficPolicy Cluster to a backend on
///   another node (its reply must come back through us);
/// - hairpin: a backend reaching its own service and landing on itself.
///   Without SNAT it would answer itself from its own address, locally, and
///   the client socket (expecting the VIP) would never see the reply.
#[inline(always)]
fn snat_source(svc: &Service, b: &Backend, flow: &Flow, scope: u8, req: &mut Track) {
    let hairpin = (0..4).all(|i| word(&flow.src, i) == word(&b.addr, i));
    let external_remote =
        scope == SCOPE_EXTERNAL && svc.flags & SVC_F_EXT_LOCAL == 0 && b.flags & BACKEND_F_NODE_LOCAL == 0;
    if !hairpin && !external_remote {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else { return };
    if cfg.snat_port_min == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return;
    }
    req.snat_node = if flow.v6 { cfg.snat_v6 } else { cfg.snat_v4 };
    req.snat_min = cfg.snat_port_min;
    req.snat_max = cfg.snat_port_max;
}
