// SPDX-License-Identifier: MIT OR GPL-2.0
//! The conntrack table's operations (`datapath_common::ct_ops`) in the
//! kernel, next to what the LRU table costs for the same work (issue #13):
//! the numbers that chose the table, and proof that the verifier takes the
//! shared code and that the host reads what the kernel wrote.
//!
//! Both programs do a flow's conntrack work and nothing else, on an IPv4 TCP
//! frame (Ethernet, 20-byte IP header): look the tuple up; a live flow is
//! refreshed (a hit: `XDP_TX`); a new flow, or a SYN on a closed one, is
//! inserted (`XDP_TX`), an insert that fails drops. The backend is the
//! destination itself, as in the datapath's bench.
//! - `ct_table_probe`: the set-associative table (one record, two index
//!   entries, forward and reply bucket locks).
//! - `ct_lru_probe`: the LRU hash as the datapath used it: two 40-byte-key
//!   entries per flow, each written with an update.

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use datapath_common::{
    CT_F_REPLY, CtEntry, CtKey, PROTO_TCP, ct,
    ct_ops::{self, NewFlow, Table, found_id, found_reply, found_seq, outcome},
    ct_table::{CtBucket, CtRecord4, Tuple, WAYS, event, stale, ticks, w_seq},
    v4_mapped,
};

/// Forward buckets of the probe's table (7 × 4096 flows).
pub const PROBE_NB: u32 = 4096;
const BPF_F_MMAPABLE: u32 = 1024;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

#[map]
static CT_PROBE_INDEX: Array<CtBucket> = Array::with_max_entries(3 * PROBE_NB, BPF_F_MMAPABLE);
#[map]
static CT_PROBE_RECORDS: Array<CtRecord4> = Array::with_max_entries(WAYS as u32 * PROBE_NB, BPF_F_MMAPABLE);
/// Active connections per backend id.
#[map]
static CT_PROBE_CONNS: Array<u64> = Array::with_max_entries(64, BPF_F_MMAPABLE);
#[map]
static CT_PROBE_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(event::COUNT, 0);
/// The insert's request (off the verifier's 512-byte stack).
#[map]
static CT_PROBE_NEW: PerCpuArray<NewFlow<[u8; 4]>> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CT_PROBE_LRU: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(2 * WAYS as u32 * PROBE_NB, 0);

struct Probe;

impl Table<[u8; 4]> for Probe {
    #[inline(always)]
    fn nb(&self) -> u32 {
        PROBE_NB
    }
    #[inline(always)]
    fn bucket(&self, i: u32) -> Option<*mut CtBucket> {
        CT_PROBE_INDEX.get_ptr_mut(i)
    }
    #[inline(always)]
    fn record(&self, i: u32) -> Option<*mut CtRecord4> {
        CT_PROBE_RECORDS.get_ptr_mut(i)
    }
    #[inline(always)]
    fn conns(&self, backend: u32) -> Option<*mut u64> {
        CT_PROBE_CONNS.get_ptr_mut(backend)
    }
    #[inline(always)]
    fn event(&self, ev: u32) {
        if let Some(c) = CT_PROBE_EVENTS.get_ptr_mut(ev) {
            // SAFETY: per-CPU slot.
            unsafe { *c += 1 };
        }
    }
}

/// An IPv4 TCP frame's tuple and flags.
#[inline(always)]
fn tuple(ctx: &XdpContext) -> Option<(Tuple<[u8; 4]>, u8)> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 + 20 + 20 > end {
        return None;
    }
    // SAFETY: 54 bytes are in bounds (checked above).
    unsafe {
        let l3 = start + 14;
        if *((start + 12) as *const [u8; 2]) != [0x08, 0x00] || *(l3 as *const u8) != 0x45 {
            return None;
        }
        if *((l3 + 9) as *const u8) != PROTO_TCP {
            return None;
        }
        let l4 = l3 + 20;
        let t = Tuple {
            src: *((l3 + 12) as *const [u8; 4]),
            dst: *((l3 + 16) as *const [u8; 4]),
            sport: (l4 as *const u16).read_unaligned(),
            dport: ((l4 + 2) as *const u16).read_unaligned(),
            proto: PROTO_TCP,
        };
        Some((t, *((l4 + 13) as *const u8)))
    }
}

#[xdp]
pub fn ct_table_probe(ctx: XdpContext) -> u32 {
    let Some((t, flags)) = tuple(&ctx) else { return XDP_PASS };
    // SAFETY: plain helper call.
    let now = ticks(unsafe { bpf_ktime_get_coarse_ns() });
    let f = ct_ops::lookup(&Probe, &t, t.hash());
    if f != 0
        && let Some(r) = Probe.record(found_id(f))
    {
        // SAFETY: a map value; `touch` re-checks the sequence.
        let (w, seen) = unsafe { ((*r).word, (*r).last_seen) };
        let renew = !found_reply(f) && (w_seq(w) != found_seq(f) || stale(w, seen, now, flags));
        if !renew && ct_ops::touch(&Probe, found_id(f), found_seq(f), flags, found_reply(f), now) {
            return XDP_TX;
        }
    }
    insert(&t, flags, now)
}

/// The new flow's record, to backend 1 = the destination itself.
#[inline(never)]
fn insert(t: &Tuple<[u8; 4]>, flags: u8, now: u32) -> u32 {
    let Some(nf) = CT_PROBE_NEW.get_ptr_mut(0) else { return XDP_DROP };
    // SAFETY: per-CPU memory, used by nothing else while this program runs.
    let nf = unsafe { &mut *nf };
    let r = &mut nf.rec;
    r.word = datapath_common::ct_table::word(0, ct::initial_state(PROTO_TCP, flags), 0, 0, PROTO_TCP);
    r.backend_id = 1;
    r.rev_nat_id = 1;
    (r.client, r.front, r.backend, r.peer) = (t.src, t.dst, t.dst, t.src);
    (r.cport, r.fport, r.bport, r.pport) = (t.sport, t.dport, t.dport, t.sport);
    nf.snat_min = 0;
    match ct_ops::insert(&Probe, nf, flags, now) {
        outcome::WON | outcome::LOST => XDP_TX,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn ct_lru_probe(ctx: XdpContext) -> u32 {
    let Some((t, flags)) = tuple(&ctx) else { return XDP_PASS };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = CtKey {
        src: v4_mapped(t.src),
        dst: v4_mapped(t.dst),
        sport: t.sport,
        dport: t.dport,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    if let Some(e) = CT_PROBE_LRU.get_ptr_mut(&key) {
        // SAFETY: a live map value.
        let e = unsafe { &mut *e };
        if !ct::starts_new_flow(PROTO_TCP, e, now, flags) {
            let s = ct::next_state(PROTO_TCP, e.state, flags, e.flags & CT_F_REPLY != 0);
            if s != e.state || now.wrapping_sub(e.last_seen_ns) > ct::REFRESH_NS {
                e.state = s;
                e.last_seen_ns = now;
            }
            return XDP_TX;
        }
    }
    lru_insert(&key, flags, now)
}

/// The forward and reply entries of a new flow.
#[inline(never)]
fn lru_insert(key: &CtKey, flags: u8, now: u64) -> u32 {
    let mut e = CtEntry {
        last_seen_ns: now,
        backend_id: 1,
        rev_nat_id: 1,
        state: ct::initial_state(PROTO_TCP, flags),
        ..CtEntry::default()
    };
    let rkey = CtKey { src: key.dst, dst: key.src, sport: key.dport, dport: key.sport, proto: PROTO_TCP, _pad: [0; 3] };
    e.flags = CT_F_REPLY;
    if CT_PROBE_LRU.insert(&rkey, &e, 0).is_err() {
        return XDP_DROP;
    }
    e.flags = 0;
    if CT_PROBE_LRU.insert(key, &e, 0).is_err() {
        return XDP_DROP;
    }
    XDP_TX
}
