// SPDX-License-Identifier: MIT OR GPL-2.0
//! The one load-balancing pipeline, shared by the XDP and TC programs:
//! parse → conntrack → service lookup → select → NAT → forward.

use crate::{
    fragment,
    hook::{Action, Hook},
    maps::{
        BACKEND_STATS, BACKENDS, CONFIG, CONNTRACK, FILTER, REPLY_BUCKET, REV_NAT, SCRATCH, SERVICE_STATS,
        SOURCE_RANGES, Scratch, Track, count, count_verdict,
    },
    nat::{Route, Target, emit, load_word, lookup, mtu_len, ptr, rewrite, rewrite_addresses, word},
    next_hop,
    parse::{Flow, Parsed, parse},
    reject::{NO_BACKEND, reject},
    service,
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg};
use datapath_common::{
    BACKEND_EMPTY, BACKEND_F_NODE_LOCAL, Backend, CT_F_REPLY, CT_F_SNAT, CtEntry, CtKey, PROTO_TCP, REPLY_RATE_DEFAULT,
    SCOPE_EXTERNAL, SVC_F_EXT_LOCAL, SVC_F_NO_LOCAL_DROP, SVC_F_SOURCE_RANGES, Service, SourceRangeKey, ct,
    hash::flow_hash, tail, verdict,
};

/// SNAT ports probed for a free one before the flow is dropped.
const SNAT_TRIES: u32 = 16;
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
    let len = (flow.l4 + flow.l4_len) as u32;
    let mut t = core::mem::MaybeUninit::<Target>::uninit();
    // SAFETY: `new_flow` sets src, dst and ports before `Step::Nat`; `macs`
    // is only read after `lookup` wrote it.
    let t = unsafe { &mut *t.as_mut_ptr() };
    match new_flow(flow, scope, len, t) {
        Step::Nat(reason) => {
            // The backend `track` settled on (its own choice, or the one a
            // racing CPU's entry names).
            let backend = SCRATCH.get(0).map_or(0, |sc| sc.req.backend_id);
            let route = next_hop::route(hook, flow, t, backend);
            match translate::<false>(hook, flow, t, route, reason) {
                Step::Done(action) => action,
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

#[inline(always)]
fn ct_key(flow: &Flow) -> CtKey {
    CtKey { src: flow.src, dst: flow.dst, sport: flow.sport, dport: flow.dport, proto: flow.proto, _pad: [0; 3] }
}

/// Existing flows: a live forward entry DNATs to its backend (and SNATs if
/// the flow was SNATed), a live reply entry reverse-NATs; both forward by
/// the entry's cached FIB result when it has one. `Pass(PASS)` means "not a
/// tracked flow". `LATER`: `flow` is a later fragment, with the ports its
/// first fragment recorded.
#[inline(never)]
pub fn conntrack<const LATER: bool>(hook: &mut impl Hook, flow: &Flow, len: u32, t: &mut Target) -> Step {
    let key = ct_key(flow);
    let Some(e) = CONNTRACK.get_ptr_mut(&key) else {
        return Step::Pass(verdict::PASS);
    };
    // SAFETY: a live map value; concurrent updates race benignly (last writer wins).
    let e = unsafe { &mut *e };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let reply = e.flags & CT_F_REPLY != 0;
    let stale = if reply { ct::expired(e, now) } else { ct::starts_new_flow(flow.proto, e, now, flow.tcp_flags) };
    if stale || !target(e, &key, t) {
        return Step::Pass(verdict::PASS);
    }
    if refresh(e, flow, reply, now) {
        touch_peer(flow, t, e, now);
    }
    if !reply {
        count(&SERVICE_STATS, e.rev_nat_id, len);
        count(&BACKEND_STATS, e.backend_id, len);
    }
    nat_cached::<LATER>(hook, flow, t, e)
}

/// The translation conntrack entry `e` gives a packet with tuple `k`: a reply
/// entry comes from the frontend (to the original client if the flow was
/// SNATed), a forward entry goes to its backend (from the SNAT source if
/// SNATed). False when the entry no longer has a frontend or a backend (a
/// deleted backend: the flow is balanced again).
#[inline(always)]
pub fn target(e: &CtEntry, k: &CtKey, t: &mut Target) -> bool {
    let snat = e.flags & CT_F_SNAT != 0;
    if e.flags & CT_F_REPLY != 0 {
        let Some(rev) = REV_NAT.get(e.rev_nat_id) else {
            return false;
        };
        t.src = rev.addr;
        t.sport = rev.port;
        (t.dst, t.dport) = if snat { (e.nat_addr, e.nat_port) } else { (k.dst, k.dport) };
        return true;
    }
    let b = match BACKENDS.get(e.backend_id) {
        Some(b) if b.state != BACKEND_EMPTY => b,
        _ => return false,
    };
    (t.src, t.sport) = if snat { (e.nat_addr, e.nat_port) } else { (k.src, k.sport) };
    t.dst = b.addr;
    t.dport = b.port;
    true
}

/// Rewrites and forwards a tracked packet, by the entry's cached FIB result
/// when there is one and the packet is known to fit its MTU, else by a FIB
/// lookup whose result is cached.
#[inline(never)]
fn nat_cached<const LATER: bool>(hook: &mut impl Hook, flow: &Flow, t: &mut Target, e: &mut CtEntry) -> Step {
    let reason = if LATER {
        verdict::FRAGMENT_NAT
    } else if e.flags & CT_F_REPLY != 0 {
        verdict::REVERSE_NAT
    } else {
        verdict::CT_HIT
    };
    let route = if e.fib_ifindex != 0 && mtu_len(hook, flow) <= e.fib_mtu as u32 {
        t.macs = e.fib_macs;
        Route::Out(e.fib_ifindex)
    } else {
        let route = lookup(hook, flow, t);
        if let Route::Out(ifindex) = route {
            e.fib_macs = t.macs;
            e.fib_ifindex = ifindex;
            e.fib_mtu = t.fits;
        }
        route
    };
    translate::<LATER>(hook, flow, t, route, reason)
}

/// Advances entry `e` by this packet: its state, its FIN byte, its last-seen
/// time (at most every `REFRESH_NS`). True when the flow's other entry must
/// follow (`touch_peer`): the time was rewritten, the state changed, or the
/// packet carries a FIN.
#[inline(always)]
fn refresh(e: &mut CtEntry, flow: &Flow, reply: bool, now: u64) -> bool {
    let s = ct::next_state(flow.proto, e.state, flow.tcp_flags, reply);
    let fin = flow.proto == PROTO_TCP && flow.tcp_flags & ct::TCP_FIN != 0;
    if fin && e.fin_out == 0 {
        e.fin_out = 1;
    }
    let changed = s != e.state || now.wrapping_sub(e.last_seen_ns) > ct::REFRESH_NS;
    if changed {
        e.state = s;
        e.last_seen_ns = now;
        // Re-resolve the route with this packet: the cache lives at most REFRESH_NS.
        e.fib_ifindex = 0;
    }
    changed || fin
}

/// Brings the flow's other entry (the reply entry of a forward packet, the
/// forward entry of a reply) along with the one this packet refreshed: the
/// same last-seen time, so the flow has one lifetime (one-way UDP keeps the
/// reply entry its SNAT port lives in, and the port is never handed to a
/// second client while the first still sends); its `fin_in` when the packet
/// carries a FIN (the close timeout needs both); closed by a RST (as
/// nf_conntrack's CLOSE). The other entry's key is the reverse of this
/// packet's translation `t`; the entry there is touched only if it is `e`'s
/// own peer — the other direction of the same frontend and backend, alive,
/// and not being taken over by a new flow (`claim`) — never a dead flow's
/// leftover that happens to share the tuple.
#[inline(always)]
fn touch_peer(flow: &Flow, t: &Target, e: &CtEntry, now: u64) {
    let key = CtKey { src: t.dst, dst: t.src, sport: t.dport, dport: t.sport, proto: flow.proto, _pad: [0; 3] };
    let Some(p) = CONNTRACK.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a live map value; each field written here has this direction
    // as its only writer, or is a plain store any packet may make.
    let p = unsafe { &mut *p };
    if (p.flags ^ e.flags) & CT_F_REPLY == 0
        || p.rev_nat_id != e.rev_nat_id
        || p.backend_id != e.backend_id
        || ct::expired(p, now)
    {
        return;
    }
    if flow.proto == PROTO_TCP {
        if flow.tcp_flags & ct::TCP_FIN != 0 && p.fin_in == 0 {
            p.fin_in = 1;
        }
        if flow.tcp_flags & ct::TCP_RST != 0 {
            p.state = ct::STATE_CLOSED;
        }
    }
    p.last_seen_ns = now;
    // As in `refresh`: a route cached by the other direction lives at most REFRESH_NS.
    p.fib_ifindex = 0;
}

/// A packet without a live conntrack entry: service lookup, source-range
/// check, backend selection, SNAT decision, conntrack entries.
#[inline(never)]
fn new_flow(flow: &Flow, scope: u8, len: u32, t: &mut Target) -> Step {
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
    // The request and the entries `track` builds live in per-CPU scratch
    // memory, not on the stack: the new-flow call chain (this program, the
    // service lookup, `track`, `claim`) must fit the verifier's 512 bytes.
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return Step::Drop(verdict::REWRITE_FAILED);
    };
    // SAFETY: per-CPU memory, used by nothing else while this program runs.
    let sc = unsafe { &mut *sc };
    sc.req = Track { backend_id, rev_nat_id: svc.id, hash, snat_min: 0, snat_max: 0, snat_node: [0; 16] };
    snat_source(&svc, b, flow, scope, &mut sc.req);
    let reason = track(flow, sc, t);
    if reason == verdict::SNAT_EXHAUSTED || reason == verdict::CT_RACE_DROP {
        return Step::Drop(reason);
    }
    if flow.proto == PROTO_TCP && flow.tcp_flags & ct::TCP_SYN == 0 {
        // Katran's LRU_MISS: a connection's packet that found no entry (lost
        // to eviction or expiry, or from before a restart without pins).
        count_verdict(verdict::CT_MISS_NON_SYN);
    }
    count(&SERVICE_STATS, svc.id, len);
    count(&BACKEND_STATS, sc.req.backend_id, len);
    Step::Nat(reason)
}

/// Writes the new flow's conntrack entries (claiming a SNAT port when
/// needed) and completes `t` with the source. `t.dst`/`t.dport` hold the
/// backend. Returns the verdict reason: NEW_FLOW; CT_FULL (the flow goes on
/// by its consistent hash alone); SNAT_EXHAUSTED; CT_RACE (the same flow's
/// first packet on another CPU claimed the forward key first: `t` and
/// `req.backend_id` now hold its translation, and this CPU's reply entry is
/// withdrawn); CT_RACE_DROP (that CPU is still writing its entry).
///
/// The reply entry is written first and the forward entry claimed last, as
/// Cilium's `__snat_create` orders its two tuples: the forward key is the
/// one point where two CPUs racing on one flow are ordered, so they agree
/// on one backend and one SNAT port.
#[inline(never)]
fn track(flow: &Flow, sc: &mut Scratch, t: &mut Target) -> u32 {
    let req = &mut sc.req;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let fwd = &mut sc.fwd;
    fwd.last_seen_ns = now;
    fwd.backend_id = req.backend_id;
    fwd.rev_nat_id = req.rev_nat_id;
    fwd.nat_addr = [0; 16];
    fwd.nat_port = 0;
    fwd.state = ct::initial_state(flow.proto, flow.tcp_flags);
    fwd.flags = 0;
    fwd.fib_ifindex = 0;
    fwd.fib_macs = [0; 12];
    fwd.fib_mtu = 0;
    fwd.fin_out = 0;
    fwd.fin_in = 0;
    sc.rep = sc.fwd;
    sc.rep.flags = CT_F_REPLY;
    sc.rkey = CtKey { src: t.dst, dst: flow.src, sport: t.dport, dport: flow.sport, proto: flow.proto, _pad: [0; 3] };
    sc.key = ct_key(flow);
    let mut reason = verdict::NEW_FLOW;
    let snat = req.snat_min != 0;
    if snat {
        sc.rep.flags |= CT_F_SNAT;
        sc.rep.nat_addr = flow.src;
        sc.rep.nat_port = flow.sport;
        sc.rkey.dst = req.snat_node;
        let Some(port) = snat_claim(&mut sc.rkey, &sc.rep, req.snat_min, req.snat_max, req.hash, now) else {
            return verdict::SNAT_EXHAUSTED;
        };
        sc.fwd.flags = CT_F_SNAT;
        sc.fwd.nat_addr = req.snat_node;
        sc.fwd.nat_port = port;
        t.src = req.snat_node;
        t.sport = port;
    } else {
        if CONNTRACK.insert(&sc.rkey, &sc.rep, 0).is_err() {
            reason = verdict::CT_FULL;
        }
        t.src = flow.src;
        t.sport = flow.sport;
    }
    let proto = flow.proto;
    let flags = flow.tcp_flags;
    match claim(&sc.key, &sc.fwd, |e| ct::starts_new_flow(proto, e, now, flags) || !backend_live(e.backend_id)) {
        Claim::Won => reason,
        // Maglev picks the same backend for the next packet as long as the
        // service's table is unchanged.
        Claim::Failed => verdict::CT_FULL,
        Claim::Lost => {
            let winner = adopt(&sc.key, t);
            // A SNAT reply key is this CPU's alone (its port was claimed);
            // without SNAT it is the winner's too when both chose one backend.
            if snat || (winner >= 0 && winner != req.backend_id as i64) {
                let _ = CONNTRACK.remove(&sc.rkey);
            }
            if winner < 0 {
                return verdict::CT_RACE_DROP;
            }
            req.backend_id = winner as u32;
            verdict::CT_RACE
        }
        Claim::Busy => {
            if snat {
                let _ = CONNTRACK.remove(&sc.rkey);
            }
            verdict::CT_RACE_DROP
        }
    }
}

/// The backend of the live forward entry at `key`, with its translation
/// written to `t`; -1 when there is none to take. A scalar result (not an
/// `Option` of the entry): LLVM would pack the map value pointer into it,
/// which the verifier rejects.
#[inline(never)]
fn adopt(key: &CtKey, t: &mut Target) -> i64 {
    let Some(e) = CONNTRACK.get_ptr(key) else {
        return -1;
    };
    // SAFETY: a live map value, read in place.
    let e = unsafe { &*e };
    if target(e, key, t) { e.backend_id as i64 } else { -1 }
}

/// How claiming a conntrack key for a new flow went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The entry is ours, written whole.
    Won,
    /// A live entry holds the key (another CPU's claim of the same flow won).
    Lost,
    /// Another CPU is taking the same dead entry over right now.
    Busy,
    /// Neither inserted nor found (the table could not take it).
    Failed,
}

/// Claims `key` for the new entry `e`: inserted if absent; if an entry is
/// there and `dead` says so, taken over by one compare-and-swap of its
/// `last_seen_ns` to 0 ("being rewritten", dead to every reader) and then
/// replaced whole. Of two CPUs claiming one key, exactly one wins: the
/// kernel's insert without overwrite, or the swap, orders them. A call of
/// its own: inlined into the SNAT probe loop it pushed the new-flow chain
/// past the verifier's 512-byte stack budget.
#[inline(never)]
fn claim(key: &CtKey, e: &CtEntry, dead: impl Fn(&CtEntry) -> bool) -> Claim {
    if CONNTRACK.insert(key, e, BPF_NOEXIST as u64).is_ok() {
        return Claim::Won;
    }
    let Some(old) = CONNTRACK.get_ptr_mut(key) else {
        return Claim::Failed;
    };
    // SAFETY: a live map value; the word is 8-byte aligned (first field).
    let word = unsafe { &raw mut (*old).last_seen_ns };
    // SAFETY: as above.
    let seen = unsafe { core::ptr::read_volatile(word) };
    if seen == 0 {
        return Claim::Busy;
    }
    // SAFETY: as above; a torn read of the other fields only misjudges an
    // entry another CPU is writing, which the swap below then refuses.
    if !dead(unsafe { &*old }) {
        return Claim::Lost;
    }
    // SAFETY: as above. A BPF_CMPXCHG on the map value (the result's flag
    // is computed from the old value: no fetch result is needed).
    let (_, swapped) = unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(word, seen, 0) };
    if !swapped {
        return Claim::Busy;
    }
    if CONNTRACK.insert(key, e, 0).is_ok() {
        return Claim::Won;
    }
    // Never leave the key marked "being rewritten": every later packet of
    // the tuple would count as a lost race.
    let _ = CONNTRACK.remove(key);
    Claim::Failed
}

/// True while backend `id` exists (a forward entry of a deleted backend is
/// balanced again).
#[inline(always)]
fn backend_live(id: u32) -> bool {
    BACKENDS.get(id).is_some_and(|b| b.state != BACKEND_EMPTY)
}

/// Claims a SNAT port for the reply key `rkey` (its `dport` is set here):
/// probes up to `SNAT_TRIES` ports from the flow's hash and takes the first
/// whose reply tuple is free, or held by an expired flow (both of a flow's
/// entries live as long as either sees traffic: `touch_peer`), writing the
/// reply entry in the same step (`claim`: one port, one CPU). Returns the
/// port, network order.
#[inline(always)]
fn snat_claim(rkey: &mut CtKey, rep: &CtEntry, min: u16, max: u16, hash: u32, now: u64) -> Option<u16> {
    let range = (max - min) as u32 + 1;
    for i in 0..SNAT_TRIES {
        let port = ((min as u32 + hash.wrapping_add(i) % range) as u16).to_be();
        rkey.dport = port;
        if claim(rkey, rep, |e| ct::expired(e, now)) == Claim::Won {
            return Some(port);
        }
    }
    None
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
