// SPDX-License-Identifier: MIT OR Apache-2.0
//! The conntrack table's operations (issue #13): lookup, the hit path's
//! update, insert with eviction, unlink, sweep. One implementation for the
//! datapath (map values) and the agent (the same arrays, memory-mapped):
//! [`Table`] is all that differs. Layout and encodings: [`crate::ct_table`].
//!
//! The protocol, in one place:
//! - A record's `word` is its linearisation point. Its sequence is odd
//!   while the record is written or after it died; a live record has an
//!   even sequence and a state. Every change of state, marks or life is a
//!   compare-and-swap of the whole word, so exactly one CPU (or the agent)
//!   makes each transition and does its accounting (BACKEND_CONNS, events).
//! - Lookups take no lock: tag, then the record's tuple read between two
//!   reads of the word (a changed sequence is a miss).
//! - Inserts hold the forward bucket's lock, then the reply bucket's (every
//!   CPU in that order, a reply lock never held while waiting for a forward
//!   one: no cycle), with bounded tries: under the forward lock one flow's
//!   tuple is inserted once; under the reply lock one reply tuple (one SNAT
//!   port) is given once. Only a lock holder writes a non-zero way.
//! - [`unlink`] needs no lock: the swap of the word to dead decides, then the
//!   two index entries are removed by swapping their exact value (tag,
//!   generation, record) to 0, so a removal that comes late never touches an
//!   entry written since (the datapath, whose removals are never late,
//!   matches a forward entry by generation and record alone:
//!   `Table::late_unlinks`).

use crate::{
    PROTO_TCP, ct,
    ct_table::{
        CtAddr, CtBucket, CtRecord, E_GEN_SHIFT, M_COUNTED, M_FIN_FWD, M_FIN_REP, M_REPLIED, M_TOUCHED, Tuple, WAYS,
        active, age, entry, entry_rec, entry_reply, entry_tag, forward_bucket, gen_of, reply_bucket, tag, ticks,
        w_flags, w_marks, w_proto, w_seq, w_state, word,
    },
};
#[cfg(not(target_arch = "bpf"))]
use core::sync::atomic::Ordering::SeqCst;

/// Tries at a bucket lock before the insert gives up (`event::INSERT_BUSY`).
pub const LOCK_TRIES: u32 = 128;
/// SNAT ports probed for a free reply tuple before a flow is refused.
pub const SNAT_TRIES: u32 = 16;
/// A record's `last_seen` is rewritten at most this often (unless its word
/// changes), so a busy flow does not dirty its line on every packet.
pub const REFRESH_TICKS: u32 = ticks(ct::REFRESH_NS);

/// Where one family's table lives. The datapath answers from its maps
/// (array lookups the verifier inlines), the agent from the mappings.
pub trait Table<A: CtAddr> {
    /// Forward buckets; the index has `3 × nb`, the records `WAYS × nb`.
    fn nb(&self) -> u32;
    fn bucket(&self, i: u32) -> Option<*mut CtBucket>;
    fn record(&self, i: u32) -> Option<*mut CtRecord<A>>;
    /// BACKEND_CONNS slot of a backend id.
    fn conns(&self, backend: u32) -> Option<*mut u64>;
    /// Counts a CT_EVENTS event.
    fn event(&self, ev: u32);
    /// True when an unlink may run late — its removal of the forward entry
    /// after 128 more incarnations of the record (a descheduled agent) —
    /// so it must match the entry's tag too (a hash it then computes).
    /// The datapath's unlinks run in one program run, never that late.
    fn late_unlinks(&self) -> bool {
        false
    }
}

#[inline(always)]
fn load(p: *const u64) -> u64 {
    // SAFETY: callers pass pointers into table memory, 8-byte aligned.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn store(p: *mut u64, v: u64) {
    // SAFETY: as `load`; a plain store is atomic at this size and alignment.
    unsafe { core::ptr::write_volatile(p, v) }
}

/// A compiler barrier: plain accesses stay on their side of it (the
/// processor keeps program order for these on x86-64; see ARCHITECTURE.md).
/// BPF has no fence instruction to select, so there it is an `asm!` that
/// clobbers memory.
#[inline(always)]
pub fn fence() {
    #[cfg(target_arch = "bpf")]
    {
        // A `mov` of a register to itself: an empty template has no
        // instruction, and BTF then gives two line records one offset,
        // which the kernel refuses.
        let mut z = 0u64;
        // SAFETY: moves a register to itself; clobbers memory (a barrier).
        unsafe { core::arch::asm!("{0} = {0}", inout(reg) z, options(nostack)) };
        let _ = z;
    }
    #[cfg(not(target_arch = "bpf"))]
    core::sync::atomic::compiler_fence(SeqCst);
}

#[inline(always)]
fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering::SeqCst as S, atomic_cxchg};
        // SAFETY: as `load`; a BPF_CMPXCHG (its flag is computed from the
        // old value it returns).
        unsafe { atomic_cxchg::<u64, { S }, { S }>(p, old, new) }.1
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as `load`; every concurrent access to these words is atomic
    // (volatile loads and stores of the whole word, or this).
    unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }.compare_exchange(old, new, SeqCst, SeqCst).is_ok()
}

/// Adds `d` (wrapping: `u64::MAX` subtracts one) without a fetched result,
/// which the BPF target emits as an atomic add at any CPU version.
#[inline(always)]
pub fn add(p: *mut u64, d: u64) {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering::SeqCst as S, atomic_xadd};
        // SAFETY: as `cas`; the result unused: a BPF atomic add.
        unsafe { atomic_xadd::<u64, u64, { S }>(p, d) };
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as `cas`.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }.fetch_add(d, SeqCst);
}

#[inline(always)]
fn way(b: *mut CtBucket, i: usize) -> *mut u64 {
    // On BPF the index is laundered through an `asm!` and clamped,
    // so the verifier sees the bound on the very register it offsets by
    // (LLVM would otherwise drop a check it can prove, and the one it keeps
    // may be on another copy of the value).
    #[cfg(target_arch = "bpf")]
    let i = {
        let mut x = i as u64;
        // SAFETY: one `mov` of the register to itself; `x` is only made opaque.
        unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(nostack)) };
        if x >= WAYS as u64 { WAYS - 1 } else { x as usize }
    };
    // SAFETY: `i < WAYS`, within the bucket.
    unsafe { (&raw mut (*b).ways).cast::<u64>().add(i) }
}

#[inline(always)]
fn word_of<A>(r: *mut CtRecord<A>) -> *mut u64 {
    // SAFETY: a record pointer; `word` is its first, 8-byte aligned field.
    unsafe { &raw mut (*r).word }
}

/// True for the word of a live record.
#[inline(always)]
pub const fn live(w: u64) -> bool {
    w_seq(w) & 1 == 0 && w_state(w) != 0
}

/// The word a record gets when it dies: the next (odd) sequence, no state.
#[inline(always)]
const fn dead(w: u64) -> u64 {
    word(w_seq(w).wrapping_add(1), 0, 0, 0, w_proto(w))
}

#[inline(always)]
fn lock(b: *mut CtBucket) -> bool {
    // SAFETY: a bucket pointer.
    let l = unsafe { &raw mut (*b).lock };
    for _ in 0..LOCK_TRIES {
        if load(l) == 0 && cas(l, 0, 1) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn unlock(b: *mut CtBucket) {
    // SAFETY: a bucket pointer. A swap, not a store: it orders the writes
    // made under the lock before the release on every architecture.
    cas(unsafe { &raw mut (*b).lock }, 1, 0);
}

/// The word of record `r` if it is live and its `reply` (else forward)
/// tuple is `src:sport → dst:dport` over `proto`, read consistently (the
/// sequence unchanged across the comparison); else 0. The tuple is given
/// by reference to its parts, which may be another record's fields.
#[inline(always)]
fn matching<A: CtAddr>(r: *mut CtRecord<A>, src: &A, dst: &A, sport: u16, dport: u16, proto: u8, reply: bool) -> u64 {
    let w = load(word_of(r));
    if !live(w) {
        return 0;
    }
    // SAFETY: table memory; a torn read is caught by the sequence check.
    let rec = unsafe { &*r };
    let same = if reply {
        rec.backend == *src && rec.peer == *dst && rec.bport == sport && rec.pport == dport
    } else {
        rec.client == *src && rec.front == *dst && rec.cport == sport && rec.fport == dport
    };
    fence();
    if !same || w_proto(w) != proto || w_seq(load(word_of(r))) != w_seq(w) {
        return 0;
    }
    w
}

/// A lookup's result: 0 (none), or the record's id, direction and sequence.
#[inline(always)]
pub const fn found(id: u32, reply: bool, seq: u32) -> u64 {
    (seq as u64) << 32 | (reply as u64) << 31 | id as u64
}
#[inline(always)]
pub const fn found_id(f: u64) -> u32 {
    (f as u32) & 0x7fff_ffff
}
#[inline(always)]
pub const fn found_reply(f: u64) -> bool {
    f & (1 << 31) != 0
}
#[inline(always)]
pub const fn found_seq(f: u64) -> u32 {
    (f >> 32) as u32
}

/// True when entry `e` belongs to the incarnation of its record whose word
/// is `w` (live, same generation).
#[inline(always)]
fn owns(e: u64, w: u64) -> bool {
    live(w) && e >> E_GEN_SHIFT & 0x7f == gen_of(w_seq(w)) as u64
}

/// True while record `r` still has sequence `seq`: the fields read since
/// the lookup belong to the flow it found.
#[inline(always)]
pub fn still<A>(r: *mut CtRecord<A>, seq: u32) -> bool {
    fence();
    w_seq(load(word_of(r))) == seq
}

/// Finds the live record whose forward or reply tuple is `t` (hash `h`,
/// [`Tuple::hash`]): the forward bucket first, then the reply bucket.
#[inline(always)]
pub fn lookup<A: CtAddr, T: Table<A>>(tb: &T, t: &Tuple<A>, h: u32) -> u64 {
    let nb = tb.nb();
    let f = scan(tb, forward_bucket(h, nb), t, h, false);
    if f != 0 {
        return f;
    }
    scan(tb, reply_bucket(h, nb), t, h, true)
}

#[inline(always)]
fn scan<A: CtAddr, T: Table<A>>(tb: &T, bi: u32, t: &Tuple<A>, h: u32, reply: bool) -> u64 {
    let Some(b) = tb.bucket(bi) else {
        return 0;
    };
    let want = tag(h);
    for i in 0..WAYS {
        let e = load(way(b, i));
        if e == 0 || entry_tag(e) != want || entry_reply(e) != reply {
            continue;
        }
        let f = confirm(tb, e, t, reply);
        if f != 0 {
            return f;
        }
    }
    0
}

/// The lookup's answer if the record of entry `e` (whose tag matched) is
/// the live flow with tuple `t`; else 0. On BPF a call of its own: the
/// paths through the record's checks then end in one scalar, and the
/// verifier walks the scan's seven ways once each instead of once per
/// combination of the ways before.
#[cfg_attr(target_arch = "bpf", inline(never))]
#[cfg_attr(not(target_arch = "bpf"), inline(always))]
fn confirm<A: CtAddr, T: Table<A>>(tb: &T, e: u64, t: &Tuple<A>, reply: bool) -> u64 {
    let id = entry_rec(e);
    let Some(r) = tb.record(id) else {
        return 0;
    };
    let w = matching(r, &t.src, &t.dst, t.sport, t.dport, t.proto, reply);
    if w != 0 && owns(e, w) { found(id, reply, w_seq(w)) } else { 0 }
}

/// Advances live record `id` (sequence `seq`) by a packet (TCP `flags`;
/// `reply`: backend → client) at `now` (ticks): its state, its FIN and
/// answered marks, its count in BACKEND_CONNS (exactly once per
/// transition: a swap of the word decides), its last-seen time (at most
/// every `REFRESH_TICKS`; the refresh drops the reply direction's cached
/// route). False when the record died or changed flows meanwhile, or the
/// update could not be applied: the packet is then a miss.
///
/// A refresh stores `last_seen` first and then swaps the word with
/// `M_TOUCHED` flipped, so whoever judged the record expired from an older
/// `last_seen` holds an older word too, and its `unlink` fails: a flow that
/// just passed a packet is never reclaimed as expired.
#[inline(always)]
pub fn touch<A: CtAddr, T: Table<A>>(tb: &T, id: u32, seq: u32, flags: u8, reply: bool, now: u32) -> bool {
    let Some(r) = tb.record(id) else {
        return false;
    };
    let p = word_of(r);
    // Read before the swap, as `unlink` does: a swap under the same
    // sequence proves it was this flow's (after it, the record may be
    // unlinked and rewritten for another backend).
    // SAFETY: table memory.
    let backend = unsafe { (*r).backend_id };
    for _ in 0..4 {
        let w = load(p);
        if w_seq(w) != seq || !live(w) {
            return false;
        }
        let proto = w_proto(w);
        let state = ct::next_state(proto, w_state(w), flags, reply);
        let mut marks = w_marks(w);
        if proto == PROTO_TCP && flags & ct::TCP_FIN != 0 {
            marks |= if reply { M_FIN_REP } else { M_FIN_FWD };
        }
        if reply {
            marks |= M_REPLIED;
        }
        let counted = marks & M_COUNTED != 0;
        let want = active(word(seq, state, 0, marks, proto));
        marks = if want { marks | M_COUNTED } else { marks & !M_COUNTED };
        // SAFETY: table memory.
        let refresh = state != w_state(w) || age(unsafe { (*r).last_seen }, now) > REFRESH_TICKS;
        if refresh {
            marks ^= M_TOUCHED;
        }
        let nw = word(seq, state, w_flags(w), marks, proto);
        if nw == w {
            return true;
        }
        if refresh {
            fence();
            // SAFETY: table memory; plain stores any packet of the flow may
            // make, published by the swap below (a record recycled since
            // gets a harmless later time, and its swap fails).
            unsafe {
                (*r).last_seen = now;
                (*r).rep_ifindex = 0;
            }
            fence();
        }
        if cas(p, w, nw) {
            if want != counted
                && let Some(c) = tb.conns(backend)
            {
                add(c, if want { 1 } else { u64::MAX });
            }
            return true;
        }
    }
    false
}

/// Kills record `id`, read live as word `w`, and removes its two index
/// entries. True for the one caller whose swap of the word succeeded: it
/// has accounted for the flow (BACKEND_CONNS).
#[inline(always)]
pub fn unlink<A: CtAddr, T: Table<A>>(tb: &T, id: u32, w: u64) -> bool {
    let Some(r) = tb.record(id) else {
        return false;
    };
    // Read before the swap; the swap succeeding proves they were the flow's.
    // The forward tuple's hash only where an unlink may come late: the
    // forward entry's bucket is the record id's, and on the datapath
    // hashing both tuples at once needs more registers than BPF has (the
    // spills cost stack it does not have).
    let late = tb.late_unlinks();
    // SAFETY: table memory.
    let (hr, hf, backend) = unsafe { ((*r).reply_hash(), if late { (*r).forward_hash() } else { 0 }, (*r).backend_id) };
    if !cas(word_of(r), w, dead(w)) {
        return false;
    }
    if w_marks(w) & M_COUNTED != 0
        && let Some(c) = tb.conns(backend)
    {
        add(c, u64::MAX);
    }
    let seq = w_seq(w);
    let fwd_mask = if late { u64::MAX } else { u32::MAX as u64 };
    remove(tb, id / WAYS as u32, entry(tag(hf), seq, false, id), fwd_mask);
    remove(tb, reply_bucket(hr, tb.nb()), entry(tag(hr), seq, true, id), u64::MAX);
    true
}

/// Removes from bucket `bi` the entry equal to `e` in the bits of `mask`,
/// if it is still there: the whole value (tag, direction, generation,
/// record), or on the datapath, for a forward entry, the low 32 bits
/// (direction, generation, record: one incarnation of one record, which a
/// removal made within the same program run cannot outlive). (The forward
/// way is known from the record id, but a scan keeps every way's offset a
/// constant the verifier can check.)
#[inline(always)]
fn remove<A: CtAddr, T: Table<A>>(tb: &T, bi: u32, e: u64, mask: u64) {
    if let Some(b) = tb.bucket(bi) {
        for i in 0..WAYS {
            let v = load(way(b, i));
            if v != 0 && (v ^ e) & mask == 0 {
                cas(way(b, i), v, 0);
            }
        }
    }
}

mod insert;
pub use insert::{Best, NewFlow, TAKEOVER_TICKS, insert, outcome};

/// Unlinks every live record `doom` picks (given a consistent copy and its
/// word): the agent's sweep of expired records, and of UDP flows to
/// backends that stopped serving. Returns how many this call unlinked.
pub fn sweep<A: CtAddr, T: Table<A>>(tb: &T, mut doom: impl FnMut(&CtRecord<A>, u64) -> bool) -> u32 {
    let mut n = 0;
    each_live(tb, |id, r, w| {
        if doom(r, w) && unlink(tb, id, w) {
            n += 1;
        }
    });
    n
}

/// Every live record, each a consistent copy (the agent's `dump` and its
/// views of the table).
pub fn records<A: CtAddr, T: Table<A>>(tb: &T, mut each: impl FnMut(u32, &CtRecord<A>)) {
    each_live(tb, |id, r, _| each(id, r));
}

/// Every live record: its id, a copy read under one sequence, its word.
fn each_live<A: CtAddr, T: Table<A>>(tb: &T, mut each: impl FnMut(u32, &CtRecord<A>, u64)) {
    for id in 0..tb.nb() * WAYS as u32 {
        let Some(r) = tb.record(id) else {
            continue;
        };
        let w = load(word_of(r));
        if !live(w) {
            continue;
        }
        // SAFETY: table memory; checked against the sequence below.
        let copy = unsafe { *r };
        if still(r, w_seq(w)) {
            each(id, &copy, w);
        }
    }
}

#[cfg(test)]
#[path = "ct_ops_tests.rs"]
mod tests;
