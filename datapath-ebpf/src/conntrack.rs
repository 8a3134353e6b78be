// SPDX-License-Identifier: MIT OR GPL-2.0
//! The conntrack table in the datapath (issue #13; layout in
//! `datapath_common::ct_table`, the protocol in `ct_ops`): one table per
//! address family over its maps, a packet's lookup and translation, and a
//! new flow's insert. The agent runs the same operations on the same arrays
//! through memory maps (`agent::ct_table`).
//!
//! A flow is one record reached from two index entries: its forward tuple
//! (client → frontend) and its reply tuple (backend → client, or → the SNAT
//! source). The record holds every address of the translation, so neither
//! direction reads BACKENDS or REV_NAT for it; the forward direction checks
//! only that its backend still exists (a deleted backend's flow is balanced
//! again), and is routed by the per-backend next-hop cache (`next_hop.rs`),
//! the reply direction by the route cached in the record.

use crate::{
    maps::{
        BACKEND_CONNS, BACKENDS, CT_EVENTS, CT4_INDEX, CT4_RECORDS, CT6_INDEX, CT6_RECORDS, SCRATCH, Scratch, Track,
    },
    nat::{Target, word},
    parse::Flow,
};
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use core::ptr::{read_volatile, write_volatile};
use datapath_common::{
    BACKEND_EMPTY, CT_F_SNAT, ct,
    ct_ops::{self, NewFlow, Table, found_id, found_reply, found_seq, outcome, still},
    ct_table::{self, Addr6, CtAddr, CtBucket, CtRecord, Tuple, expired, stale, ticks, w_flags, w_seq},
    verdict,
};

/// Forward buckets of each family's table, set by the loader
/// (`EbpfLoader::set_global`) to the size it gave the maps. Read-only data:
/// the verifier knows them as constants.
#[unsafe(no_mangle)]
static CT4_NB: u32 = 1;
#[unsafe(no_mangle)]
static CT6_NB: u32 = 1;

/// The IPv4 table (CT4_INDEX, CT4_RECORDS).
pub struct Ct4;
/// The IPv6 table (CT6_INDEX, CT6_RECORDS).
pub struct Ct6;

macro_rules! table {
    ($t:ty, $a:ty, $nb:ident, $index:ident, $records:ident) => {
        impl Table<$a> for $t {
            #[inline(always)]
            fn nb(&self) -> u32 {
                // SAFETY: a static, written only by the loader.
                unsafe { read_volatile(&$nb) }
            }
            #[inline(always)]
            fn bucket(&self, i: u32) -> Option<*mut CtBucket> {
                $index.get_ptr_mut(i)
            }
            #[inline(always)]
            fn record(&self, i: u32) -> Option<*mut CtRecord<$a>> {
                $records.get_ptr_mut(i)
            }
            #[inline(always)]
            fn conns(&self, backend: u32) -> Option<*mut u64> {
                BACKEND_CONNS.get_ptr_mut(backend)
            }
            #[inline(always)]
            fn event(&self, ev: u32) {
                if let Some(c) = CT_EVENTS.get_ptr_mut(ev) {
                    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
                    unsafe { *c += 1 };
                }
            }
        }
    };
}
table!(Ct4, [u8; 4], CT4_NB, CT4_INDEX, CT4_RECORDS);
table!(Ct6, Addr6, CT6_NB, CT6_INDEX, CT6_RECORDS);

/// Coarse monotonic time in ns, read once per packet (a helper call); the
/// table counts it in ticks (`ct_table::ticks`, ≈ 1 ms).
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// What a lookup found; the translation itself is written to the caller's
/// `Target`.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Found {
    pub word: u64,
    /// The packet's time (coarse monotonic ns), read once the lookup found
    /// a record (a miss reads no clock), and reused for its route.
    pub now_ns: u64,
    pub id: u32,
    pub seq: u32,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// Reply direction: the record's cached route (egress ifindex, 0 when
    /// none is valid) and the length known to fit it; its MACs are in
    /// `Target::macs`.
    pub route: u32,
    pub mtu: u16,
    pub reply: bool,
}

#[inline(always)]
fn tuple<A: CtAddr>(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> Tuple<A> {
    Tuple { src: A::from16(src), dst: A::from16(dst), sport, dport, proto }
}

/// The translation record `rec` (word `w`) gives a packet of its `reply`
/// or forward direction: a forward packet goes to the backend (from the
/// SNAT source if the flow is SNATed), a reply comes from the frontend to
/// the client.
#[inline(always)]
fn translation<A: CtAddr>(rec: &CtRecord<A>, w: u64, reply: bool, t: &mut Target) {
    if reply {
        t.src = rec.front.to16();
        t.sport = rec.fport;
        t.dst = rec.client.to16();
        t.dport = rec.cport;
    } else {
        (t.src, t.sport) =
            if w_flags(w) & CT_F_SNAT != 0 { (rec.peer.to16(), rec.pport) } else { (rec.client.to16(), rec.cport) };
        t.dst = rec.backend.to16();
        t.dport = rec.bport;
    }
}

/// Looks `tu` up: a live record, not expired (a forward packet with TCP
/// `flags`: not to start a new flow, `ct_table::stale`), its translation
/// written to `t` and its ids to `f`, all read under one sequence.
#[inline(always)]
fn find<A: CtAddr, T: Table<A>>(tb: &T, tu: &Tuple<A>, flags: u8, t: &mut Target, f: &mut Found) -> bool {
    let hit = ct_ops::lookup(tb, tu, tu.hash());
    if hit == 0 {
        return false;
    }
    f.now_ns = now_ns();
    let now = ticks(f.now_ns);
    let (id, seq, reply) = (found_id(hit), found_seq(hit), found_reply(hit));
    let Some(r) = tb.record(id) else {
        return false;
    };
    // SAFETY: a map value (array values are never freed); what is read here
    // is checked against the sequence at the end.
    let rec = unsafe { &*r };
    // SAFETY: as above.
    let (w, seen) = unsafe { (read_volatile(&rec.word), read_volatile(&rec.last_seen)) };
    if w_seq(w) != seq || if reply { expired(w, seen, now) } else { stale(w, seen, now, flags) } {
        return false;
    }
    translation(rec, w, reply, t);
    f.route = 0;
    if reply {
        // The cached route, read as a seqlock: its generation, the fields,
        // the generation again (odd while a fill writes).
        // SAFETY: as above.
        let seen_gen = unsafe { read_volatile(&rec.rep_gen) };
        ct_ops::fence();
        let (ifindex, mtu, macs) = (rec.rep_ifindex, rec.rep_mtu, rec.rep_macs);
        ct_ops::fence();
        // SAFETY: as above.
        if seen_gen == seq as u16 && unsafe { read_volatile(&rec.rep_gen) } == seen_gen {
            f.route = ifindex;
            f.mtu = mtu;
            t.macs = macs;
        }
    }
    f.word = w;
    f.id = id;
    f.seq = seq;
    f.reply = reply;
    f.backend_id = rec.backend_id;
    f.rev_nat_id = rec.rev_nat_id;
    still(r, seq)
}

/// True while BACKENDS slot `id` still holds the backend at `addr:port` (a
/// deleted backend's flow is balanced again; a reused id is another backend).
#[inline(always)]
fn backend_serves(id: u32, addr: &[u8; 16], port: u16) -> bool {
    let Some(b) = BACKENDS.get(id) else {
        return false;
    };
    let mut differ = (b.port ^ port) as u32;
    for i in 0..4 {
        differ |= word(&b.addr, i) ^ word(addr, i);
    }
    b.state != BACKEND_EMPTY && differ == 0
}

/// A packet of a tracked flow: found, its backend still there, its record
/// advanced by the packet (`ct_ops::touch`). False: not a tracked flow (a
/// miss, an expired or stale record, a record that changed meanwhile, a
/// deleted backend, whose record is unlinked here).
#[inline(always)]
fn hit<A: CtAddr, T: Table<A>>(tb: &T, tu: &Tuple<A>, flags: u8, t: &mut Target, f: &mut Found) -> bool {
    if !find(tb, tu, flags, t, f) {
        return false;
    }
    if !f.reply && !backend_serves(f.backend_id, &t.dst, t.dport) {
        ct_ops::unlink(tb, f.id, f.word);
        return false;
    }
    ct_ops::touch(tb, f.id, f.seq, flags, f.reply, ticks(f.now_ns))
}

// The entry points below are *global* BPF functions (exported, `extern
// "C"`): the verifier checks each once, on its own, for any arguments, and
// a caller's call is one instruction to it. As static functions (or
// inlined) they were checked again for every path of the parser that
// reaches them, each with its own header offsets, and the table's scans
// took the programs past the verifier's limit. What they work on is in
// SCRATCH, not behind pointers to the caller's stack: memory a global
// function may write is unknown to its caller afterwards (the parsed
// headers' offsets with it), and the stack is short. The one pointer, to
// the caller's `Target`, is an output, checked for null (the verifier
// assumes a global function's pointer may be).

/// Puts `flow`'s tuple, in its family's form, and TCP flags where the
/// global functions read them.
#[inline(always)]
fn set_query(sc: *mut Scratch, flow: &Flow) {
    // SAFETY: per-CPU memory, used by nothing else while this program runs.
    unsafe {
        if flow.v6 {
            (*sc).q6 = tuple(&flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
        } else {
            (*sc).q4 = tuple(&flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
        }
        (*sc).q_flags = flow.tcp_flags;
    }
}

/// [`hit`] for `flow`, in its family: `t` gets the translation, and the
/// result points at what was found (SCRATCH's `found`).
#[inline(always)]
pub fn lookup(flow: &Flow, t: &mut Target) -> Option<*const Found> {
    let sc = SCRATCH.get_ptr_mut(0)?;
    set_query(sc, flow);
    let hit = if flow.v6 { xlb_ct_lookup6(t) } else { xlb_ct_lookup4(t) };
    if hit == 0 {
        return None;
    }
    // SAFETY: a field of the per-CPU map value.
    Some(unsafe { &raw const (*sc).found })
}

macro_rules! global_lookup {
    ($name:ident, $table:expr, $q:ident) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(t: *mut Target) -> u32 {
            let Some(sc) = SCRATCH.get_ptr_mut(0) else {
                return 0;
            };
            if t.is_null() {
                return 0;
            }
            // SAFETY: the caller's output (non-null, its size checked by
            // the verifier); per-CPU memory, used by nothing else meanwhile.
            let (sc, t) = unsafe { (&mut *sc, &mut *t) };
            u32::from(hit(&$table, &sc.$q, sc.q_flags, t, &mut sc.found))
        }
    };
}
global_lookup!(xlb_ct_lookup4, Ct4, q4);
global_lookup!(xlb_ct_lookup6, Ct6, q6);

/// The translation of a packet with SCRATCH's `rkey` as its tuple (an
/// ICMP error's reversed quote): a live record's, without advancing it.
#[inline(always)]
pub fn related(v6: bool, t: &mut Target) -> bool {
    xlb_ct_related(u32::from(v6), t) != 0
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_ct_related(v6: u32, t: *mut Target) -> u32 {
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    if t.is_null() {
        return 0;
    }
    // SAFETY: as in `xlb_ct_lookup4`.
    let (sc, t) = unsafe { (&mut *sc, &mut *t) };
    let k = sc.rkey;
    u32::from(if v6 != 0 {
        sc.q6 = tuple(&k.src, &k.dst, k.sport, k.dport, k.proto);
        find(&Ct6, &sc.q6, 0, t, &mut sc.found)
    } else {
        sc.q4 = tuple(&k.src, &k.dst, k.sport, k.dport, k.proto);
        find(&Ct4, &sc.q4, 0, t, &mut sc.found)
    })
}

/// Caches the reply direction's route (`t.macs`, `t.fits`, `ifindex`) in
/// the record `f` found; its generation last, so a reader takes the route
/// only whole and only for this flow.
#[inline(always)]
pub fn cache_reply_route(v6: bool, f: &Found, t: &Target, ifindex: u32) {
    if v6 { fill(&Ct6, f, t, ifindex) } else { fill(&Ct4, f, t, ifindex) }
}

#[inline(always)]
fn fill<A: CtAddr, T: Table<A>>(tb: &T, f: &Found, t: &Target, ifindex: u32) {
    let Some(r) = tb.record(f.id) else { return };
    // Only for the flow found: a record rewritten since is another's.
    if !ct_ops::still(r, f.seq) {
        return;
    }
    // SAFETY: a map value. A seqlock's writer: the generation odd (never a
    // live sequence's low bits, which are even) while the fields change,
    // then the flow's. Two fills of one flow write the same route; a fill
    // by a CPU that found an earlier flow of the record ends with that
    // flow's generation, which no reader of the later one takes.
    unsafe {
        write_volatile(&raw mut (*r).rep_gen, f.seq as u16 | 1);
        ct_ops::fence();
        (*r).rep_macs = t.macs;
        (*r).rep_mtu = t.fits;
        (*r).rep_ifindex = ifindex;
        ct_ops::fence();
        write_volatile(&raw mut (*r).rep_gen, f.seq as u16);
    }
}

/// Tracks a new flow: its record written (with a SNAT port claimed when
/// the request asks for SNAT) and `t` completed with the source. The
/// request is SCRATCH's `req`; `t.dst`/`t.dport` hold the backend it chose.
/// Returns the verdict reason: NEW_FLOW; CT_RACE (the same flow's record
/// exists, written by another CPU's first packet: `t` and `req.backend_id`
/// now hold its translation); CT_FULL (no room, no SNAT: the flow goes on
/// untracked, by its consistent hash); CT_FULL_DROP (no room, SNAT);
/// SNAT_EXHAUSTED; CT_RACE_DROP (a bucket stayed locked, or the record
/// found is unusable: the sender retransmits). Global functions, one per
/// family, as [`lookup`].
#[inline(always)]
pub fn track(flow: &Flow, t: &mut Target) -> u32 {
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return verdict::CT_RACE_DROP;
    };
    set_query(sc, flow);
    if flow.v6 { xlb_ct_track6(t) } else { xlb_ct_track4(t) }
}

macro_rules! global_track {
    ($name:ident, $table:expr, $q:ident, $new:ident) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(t: *mut Target) -> u32 {
            let Some(sc) = SCRATCH.get_ptr_mut(0) else {
                return verdict::CT_RACE_DROP;
            };
            if t.is_null() {
                return verdict::CT_RACE_DROP;
            }
            // SAFETY: as in `xlb_ct_lookup4`.
            let (sc, t) = unsafe { (&mut *sc, &mut *t) };
            // The time, for the new flow's route too (SCRATCH's `found`).
            sc.found.now_ns = now_ns();
            track_in(&$table, &mut sc.$new, &mut sc.req, &sc.$q, sc.q_flags, t, ticks(sc.found.now_ns))
        }
    };
}
global_track!(xlb_ct_track4, Ct4, q4, new4);
global_track!(xlb_ct_track6, Ct6, q6, new6);

#[inline(always)]
fn track_in<A: CtAddr, T: Table<A>>(
    tb: &T,
    nf: &mut NewFlow<A>,
    req: &mut Track,
    q: &Tuple<A>,
    flags: u8,
    t: &mut Target,
    now: u32,
) -> u32 {
    let snat = req.snat_min != 0;
    let r = &mut nf.rec;
    let state = ct::initial_state(q.proto, flags);
    r.word = ct_table::word(0, state, if snat { CT_F_SNAT } else { 0 }, 0, q.proto);
    r.last_seen = now;
    r.backend_id = req.backend_id;
    r.rev_nat_id = req.rev_nat_id;
    r.client = q.src;
    r.front = q.dst;
    r.backend = A::from16(&t.dst);
    r.peer = if snat { A::from16(&req.snat_node) } else { q.src };
    r.cport = q.sport;
    r.fport = q.dport;
    r.bport = t.dport;
    r.pport = q.sport;
    r.rep_ifindex = 0;
    r.rep_gen = 0;
    nf.snat_min = req.snat_min;
    nf.snat_max = req.snat_max;
    nf.snat_hash = req.hash;
    match ct_ops::insert(tb, nf, flags, now) {
        outcome::WON => {
            t.src = nf.rec.peer.to16();
            t.sport = nf.rec.pport;
            verdict::NEW_FLOW
        }
        outcome::LOST => {
            if !adopt(tb, nf.id, nf.seq, t, req) {
                return verdict::CT_RACE_DROP;
            }
            verdict::CT_RACE
        }
        outcome::FULL | outcome::REPLY_FULL if !snat => {
            t.src = q.src.to16();
            t.sport = q.sport;
            verdict::CT_FULL
        }
        outcome::FULL | outcome::REPLY_FULL => verdict::CT_FULL_DROP,
        outcome::SNAT_EXHAUSTED => verdict::SNAT_EXHAUSTED,
        _ => verdict::CT_RACE_DROP,
    }
}

/// Takes the translation of the live record `id` (sequence `seq`), the
/// flow's own written by another CPU: `t` and `req.backend_id`. False when
/// it changed meanwhile or its backend is gone.
#[inline(always)]
fn adopt<A: CtAddr, T: Table<A>>(tb: &T, id: u32, seq: u32, t: &mut Target, req: &mut Track) -> bool {
    let Some(r) = tb.record(id) else {
        return false;
    };
    // SAFETY: a map value, checked against the sequence below.
    let rec = unsafe { &*r };
    // SAFETY: as above.
    let w = unsafe { read_volatile(&rec.word) };
    translation(rec, w, false, t);
    req.backend_id = rec.backend_id;
    w_seq(w) == seq && still(r, seq) && backend_serves(req.backend_id, &t.dst, t.dport)
}
