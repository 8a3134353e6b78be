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
//!   entry written since.

use crate::{
    PROTO_TCP, ct,
    ct_table::{
        CtAddr, CtBucket, CtRecord, E_GEN_SHIFT, M_COUNTED, M_FIN_FWD, M_FIN_REP, M_REPLIED, Tuple, WAYS, active, age,
        entry, entry_rec, entry_reply, entry_tag, event, evictable, expired, forward_bucket, gen_of, reply_bucket,
        stale, tag, ticks, w_flags, w_marks, w_proto, w_seq, w_state, word,
    },
};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst, compiler_fence};

/// Tries at a bucket lock before the insert gives up (`event::INSERT_BUSY`).
pub const LOCK_TRIES: u32 = 32;
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

#[inline(always)]
fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: as `load`; every concurrent access to these words is atomic
    // (volatile loads and stores of the whole word, or this).
    unsafe { AtomicU64::from_ptr(p) }.compare_exchange(old, new, SeqCst, SeqCst).is_ok()
}

/// Adds `d` (wrapping: `u64::MAX` subtracts one) without a fetched result,
/// which the BPF target emits as an atomic add at any CPU version.
#[inline(always)]
fn add(p: *mut u64, d: u64) {
    // SAFETY: as `cas`.
    unsafe { AtomicU64::from_ptr(p) }.fetch_add(d, SeqCst);
}

#[inline(always)]
fn way(b: *mut CtBucket, i: usize) -> *mut u64 {
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

/// The word of record `r` if it is live and its `reply` tuple is `t`, read
/// consistently (the sequence unchanged across the comparison); else 0.
#[inline(always)]
fn matching<A: CtAddr>(r: *mut CtRecord<A>, t: &Tuple<A>, reply: bool) -> u64 {
    let w = load(word_of(r));
    if !live(w) {
        return 0;
    }
    // SAFETY: table memory; a torn read is caught by the sequence check.
    let rec = unsafe { &*r };
    let same = if reply {
        rec.backend == t.src && rec.peer == t.dst && rec.bport == t.sport && rec.pport == t.dport
    } else {
        rec.client == t.src && rec.front == t.dst && rec.cport == t.sport && rec.fport == t.dport
    };
    compiler_fence(SeqCst);
    if !same || w_proto(w) != t.proto || w_seq(load(word_of(r))) != w_seq(w) {
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

/// True while record `r` still has sequence `seq`: the fields read since
/// the lookup belong to the flow it found.
#[inline(always)]
pub fn still<A>(r: *mut CtRecord<A>, seq: u32) -> bool {
    compiler_fence(SeqCst);
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
        let id = entry_rec(e);
        let Some(r) = tb.record(id) else {
            continue;
        };
        let w = matching(r, t, reply);
        if w != 0 && owns(e, w) {
            return found(id, reply, w_seq(w));
        }
    }
    0
}

/// Advances live record `r` by a packet (TCP `flags`; `reply`: backend →
/// client) at `now` (ticks): its state, its FIN and answered marks, its
/// count in BACKEND_CONNS (exactly once per transition: a swap of the word
/// decides), its last-seen time (at most every `REFRESH_TICKS`, which also
/// drops the reply direction's cached route). False when the record died
/// or changed flows meanwhile: the packet is then a miss.
#[inline(always)]
pub fn touch<A: CtAddr, T: Table<A>>(tb: &T, r: *mut CtRecord<A>, seq: u32, flags: u8, reply: bool, now: u32) -> bool {
    let p = word_of(r);
    let mut changed = false;
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
        let nw = word(seq, state, w_flags(w), marks, proto);
        if nw == w {
            break;
        }
        if cas(p, w, nw) {
            // SAFETY: table memory.
            let backend = unsafe { (*r).backend_id };
            if want != counted
                && let Some(c) = tb.conns(backend)
            {
                add(c, if want { 1 } else { u64::MAX });
            }
            changed = true;
            break;
        }
    }
    // SAFETY: table memory; plain stores any packet of the flow may make.
    unsafe {
        if changed || age((*r).last_seen, now) > REFRESH_TICKS {
            (*r).last_seen = now;
            (*r).rep_ifindex = 0;
        }
    }
    true
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
    // SAFETY: table memory.
    let (hf, hr, backend) = unsafe { ((*r).forward().hash(), (*r).reply().hash(), (*r).backend_id) };
    if !cas(word_of(r), w, dead(w)) {
        return false;
    }
    if w_marks(w) & M_COUNTED != 0
        && let Some(c) = tb.conns(backend)
    {
        add(c, u64::MAX);
    }
    let nb = tb.nb();
    let seq = w_seq(w);
    if let Some(b) = tb.bucket(id / WAYS as u32) {
        cas(way(b, (id % WAYS as u32) as usize), entry(tag(hf), seq, false, id), 0);
    }
    if let Some(b) = tb.bucket(reply_bucket(hr, nb)) {
        let e = entry(tag(hr), seq, true, id);
        for i in 0..WAYS {
            if load(way(b, i)) == e {
                cas(way(b, i), e, 0);
            }
        }
    }
    true
}

/// [`insert`]'s results.
pub mod outcome {
    /// The flow's record was written: `NewFlow::id`.
    pub const WON: u32 = 0;
    /// The same tuple's live record exists (another CPU's first packet of
    /// the flow won): `NewFlow::id`/`seq` name it, to adopt.
    pub const LOST: u32 = 1;
    /// A bucket lock stayed held, or a victim changed under the insert.
    pub const BUSY: u32 = 2;
    /// Every record in the forward bucket is established (or answered UDP).
    pub const FULL: u32 = 3;
    /// No room for the reply entry.
    pub const REPLY_FULL: u32 = 4;
    /// Every SNAT port probed is taken by a live flow.
    pub const SNAT_EXHAUSTED: u32 = 5;
}

/// A new flow for [`insert`]. On the datapath it lives in per-CPU scratch
/// memory (the verifier's stack is 512 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct NewFlow<A> {
    /// The record to write: tuples (`pport` filled in by SNAT probing),
    /// ids, and a word with the state, flags and protocol (its sequence
    /// and marks are the insert's).
    pub rec: CtRecord<A>,
    /// SNAT port range, host order (`snat_min == 0`: no SNAT), and where
    /// the probe starts (the flow's hash).
    pub snat_min: u16,
    pub snat_max: u16,
    pub snat_hash: u32,
    /// Out: the record written (WON) or found (LOST), with its sequence.
    pub id: u32,
    pub seq: u32,
}

/// Ranks of a way for a new record: the higher wins.
const R_NONE: u32 = 0;
const R_EVICTABLE: u32 = 1;
const R_EXPIRED: u32 = 2;
/// Empty, or an entry whose record died or moved on (an orphan).
const R_EMPTY: u32 = 3;
/// The same tuple's record: it must be replaced, never duplicated.
const R_SAME: u32 = 4;

/// True when entry `e` belongs to the incarnation of its record whose word
/// is `w` (live, same generation).
#[inline(always)]
fn owns(e: u64, w: u64) -> bool {
    live(w) && e >> E_GEN_SHIFT & 0x7f == gen_of(w_seq(w)) as u64
}

/// How a way holding entry `e`, whose record reads (`w`, `last_seen`),
/// ranks for a new record.
#[inline(always)]
fn rank(e: u64, w: u64, last_seen: u32, now: u32) -> u32 {
    if e == 0 || !owns(e, w) {
        R_EMPTY
    } else if expired(w, last_seen, now) {
        R_EXPIRED
    } else if evictable(w) {
        R_EVICTABLE
    } else {
        R_NONE
    }
}

/// The best way of a bucket scan so far: index (`WAYS`: none), rank, age,
/// and the word its record had (what an eviction swaps from).
#[derive(Clone, Copy)]
struct Best {
    i: usize,
    rank: u32,
    age: u32,
    w: u64,
    id: u32,
}

impl Best {
    const NONE: Best = Best { i: WAYS, rank: R_NONE, age: 0, w: 0, id: 0 };

    /// Keeps way `i` if it ranks higher (the oldest among evictable ones).
    #[inline(always)]
    fn offer(&mut self, i: usize, rank: u32, age: u32, w: u64, id: u32) {
        if rank > self.rank || (rank == self.rank && rank == R_EVICTABLE && age > self.age) {
            *self = Best { i, rank, age, w, id };
        }
    }

    /// Frees the chosen way's record if it is a live one (an eviction, or
    /// the same tuple's stale record). False when it changed since the scan.
    #[inline(always)]
    fn take<A: CtAddr, T: Table<A>>(&self, tb: &T) -> bool {
        if self.rank == R_EMPTY {
            return true;
        }
        if !unlink(tb, self.id, self.w) {
            tb.event(event::INSERT_BUSY);
            return false;
        }
        if self.rank != R_SAME {
            tb.event(if self.rank == R_EVICTABLE { event::EVICT_UNESTABLISHED } else { event::EVICT_EXPIRED });
        }
        true
    }
}

/// Writes the record of a new flow (TCP `flags` of its first packet, at
/// `now` in ticks) and its two index entries, evicting for room: an
/// expired record first, then the oldest unestablished or closing one;
/// established flows never. See [`outcome`]. On `LOST`, nothing was written.
#[inline(always)]
pub fn insert<A: CtAddr, T: Table<A>>(tb: &T, nf: &mut NewFlow<A>, flags: u8, now: u32) -> u32 {
    let hf = nf.rec.forward().hash();
    let fbi = forward_bucket(hf, tb.nb());
    let Some(fb) = tb.bucket(fbi) else {
        return outcome::BUSY;
    };
    if !lock(fb) {
        tb.event(event::INSERT_BUSY);
        return outcome::BUSY;
    }
    let r = insert_locked(tb, nf, fb, fbi, hf, flags, now);
    unlock(fb);
    r
}

/// [`insert`] with the forward bucket `fb` (index `fbi`) locked.
#[inline(always)]
fn insert_locked<A: CtAddr, T: Table<A>>(
    tb: &T,
    nf: &mut NewFlow<A>,
    fb: *mut CtBucket,
    fbi: u32,
    hf: u32,
    flags: u8,
    now: u32,
) -> u32 {
    let fwd = nf.rec.forward();
    let mut best = Best::NONE;
    for i in 0..WAYS {
        let id = fbi * WAYS as u32 + i as u32;
        let Some(r) = tb.record(id) else {
            continue;
        };
        let e = load(way(fb, i));
        // SAFETY: table memory; the word read first decides what counts.
        let (w, seen) = (load(word_of(r)), unsafe { (*r).last_seen });
        let mut rk = rank(e, w, seen, now);
        if rk != R_EMPTY && entry_tag(e) == tag(hf) && matching(r, &fwd, false) == w {
            if !stale(w, seen, now, flags) {
                nf.id = id;
                nf.seq = w_seq(w);
                return outcome::LOST;
            }
            rk = R_SAME;
        }
        best.offer(i, rk, age(seen, now), w, id);
    }
    if best.rank == R_NONE || best.i >= WAYS {
        tb.event(event::INSERT_FULL);
        return outcome::FULL;
    }
    let Some(r) = tb.record(best.id) else {
        return outcome::BUSY;
    };
    if !best.take(tb) {
        return outcome::BUSY;
    }
    let snat = nf.snat_min != 0;
    let tries = if snat { SNAT_TRIES } else { 1 };
    let range = (nf.snat_max as u32).wrapping_sub(nf.snat_min as u32).wrapping_add(1);
    for i in 0..tries {
        if snat {
            nf.rec.pport = ((nf.snat_min as u32 + nf.snat_hash.wrapping_add(i) % range) as u16).to_be();
        }
        let rep = nf.rec.reply();
        let hr = rep.hash();
        let Some(rb) = tb.bucket(reply_bucket(hr, tb.nb())) else {
            return outcome::BUSY;
        };
        if !lock(rb) {
            tb.event(event::INSERT_BUSY);
            return outcome::BUSY;
        }
        let rw = reply_way(tb, rb, &rep, hr, snat, now);
        if rw < WAYS {
            write(tb, nf, r, best.id, (fb, best.i, hf), (rb, rw, hr), now);
            unlock(rb);
            return outcome::WON;
        }
        unlock(rb);
        if rw == WAYS + 1 {
            return outcome::BUSY;
        }
    }
    if snat {
        return outcome::SNAT_EXHAUSTED;
    }
    tb.event(event::INSERT_REPLY_FULL);
    outcome::REPLY_FULL
}

/// A way for reply tuple `rep` (hash `hr`) in the locked reply bucket `rb`:
/// `WAYS` when there is none (with SNAT: the port is held by a live flow),
/// `WAYS + 1` when a victim changed under us. Without SNAT, a live flow with
/// the same reply tuple (one client port to one backend through two
/// frontends) gives up its entry to the new flow (`REPLY_OVERWRITE`).
#[inline(always)]
fn reply_way<A: CtAddr, T: Table<A>>(
    tb: &T,
    rb: *mut CtBucket,
    rep: &Tuple<A>,
    hr: u32,
    snat: bool,
    now: u32,
) -> usize {
    let mut best = Best::NONE;
    for i in 0..WAYS {
        let e = load(way(rb, i));
        let id = entry_rec(e);
        let (mut w, mut seen) = (0, 0);
        if e != 0
            && let Some(r) = tb.record(id)
        {
            // SAFETY: table memory.
            (w, seen) = (load(word_of(r)), unsafe { (*r).last_seen });
            if owns(e, w) && entry_tag(e) == tag(hr) && matching(r, rep, true) == w {
                // The reply tuple is taken: by a live flow (SNAT: try
                // another port; else the newer flow takes the tuple over),
                // or by an expired one, replaced so the tuple has one entry.
                let old = expired(w, seen, now);
                if snat && !old {
                    return WAYS;
                }
                tb.event(if old { event::EVICT_EXPIRED } else { event::REPLY_OVERWRITE });
                best.offer(i, R_SAME, 0, w, id);
                continue;
            }
        }
        best.offer(i, rank(e, w, seen, now), age(seen, now), w, id);
    }
    if best.rank == R_NONE || best.i >= WAYS {
        return WAYS;
    }
    if !best.take(tb) {
        return WAYS + 1;
    }
    best.i
}

/// Writes the new flow's record `r` (id `id`, dead) and publishes it: the
/// word live first, then the reply entry, then the forward one, so a reader
/// that finds an entry finds a live record.
#[inline(always)]
fn write<A: CtAddr, T: Table<A>>(
    tb: &T,
    nf: &mut NewFlow<A>,
    r: *mut CtRecord<A>,
    id: u32,
    fwd: (*mut CtBucket, usize, u32),
    rep: (*mut CtBucket, usize, u32),
    now: u32,
) {
    let p = word_of(r);
    let old = load(p);
    let writing = w_seq(old) | 1;
    store(p, word(writing, 0, 0, 0, 0));
    compiler_fence(SeqCst);
    let w = nf.rec.word;
    let mut rec = nf.rec;
    rec.word = word(writing, 0, 0, 0, 0);
    rec.last_seen = now;
    rec.rep_ifindex = 0;
    // SAFETY: table memory; this CPU owns the dead record (forward lock).
    unsafe { *r = rec };
    let seq = writing.wrapping_add(1);
    let marks = if active(w) { M_COUNTED } else { 0 };
    if marks != 0
        && let Some(c) = tb.conns(rec.backend_id)
    {
        add(c, 1);
    }
    compiler_fence(SeqCst);
    store(p, word(seq, w_state(w), w_flags(w), marks, w_proto(w)));
    store(way(rep.0, rep.1), entry(tag(rep.2), seq, true, id));
    store(way(fwd.0, fwd.1), entry(tag(fwd.2), seq, false, id));
    nf.id = id;
    nf.seq = seq;
}

/// Unlinks every live record `doom` picks (given a consistent copy and its
/// word): the agent's sweep of expired records, and of UDP flows to
/// backends that stopped serving. Returns how many this call unlinked.
pub fn sweep<A: CtAddr, T: Table<A>>(tb: &T, mut doom: impl FnMut(&CtRecord<A>, u64) -> bool) -> u32 {
    let mut n = 0;
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
        if !still(r, w_seq(w)) {
            continue;
        }
        if doom(&copy, w) && unlink(tb, id, w) {
            n += 1;
        }
    }
    n
}

/// Every live record, each a consistent copy (the agent's `dump` and its
/// views of the table).
pub fn records<A: CtAddr, T: Table<A>>(tb: &T, mut each: impl FnMut(u32, &CtRecord<A>)) {
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
            each(id, &copy);
        }
    }
}

#[cfg(test)]
#[path = "ct_ops_tests.rs"]
mod tests;
