// SPDX-License-Identifier: MIT OR Apache-2.0
//! A new flow's insert: the forward bucket's lock, the same tuple looked up
//! again under it, a way chosen (empty, expired, the oldest unestablished;
//! never established), the reply tuple's way under the reply bucket's lock
//! (SNAT: the first free port), then the record written and published. The
//! protocol is described in the parent module.

use super::{SNAT_TRIES, Table, add, fence, live, load, lock, matching, owns, store, unlink, unlock, way, word_of};
use crate::{
    ct,
    ct_table::{
        CtAddr, CtBucket, CtRecord, M_COUNTED, WAYS, active, age, entry, entry_rec, entry_tag, event, evictable,
        expired, forward_bucket, reply_bucket, stale, tag, w_flags, w_proto, w_seq, w_state, word,
    },
};

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
    /// Scratch of the insert's bucket scans.
    pub best: Best,
    /// SNAT: the port of the oldest unanswered handshake seen holding a
    /// port tried (0: none), and its age.
    pub cand_port: u16,
    pub _pad: u16,
    pub cand_age: u32,
}

/// How old an unanswered handshake must be before a new SNAT flow may take
/// its port (when every port it tried is held), so that a SYN-ACK still on
/// its way is not reverse-translated to the new flow's client: 100 ms, many
/// round trips between a node and a backend of its cluster (which is the
/// path a SNATed SYN-ACK takes). Not a SYN retransmission timeout (1 s):
/// under a flood the table holds only the last fraction of a second of
/// SYNs, so no holder would ever be that old, and new flows would fail for
/// want of a port exactly when the ports are the flood's.
pub const TAKEOVER_TICKS: u32 = crate::ct_table::ticks(100_000_000);

/// Offers the port being tried, held by an unanswered handshake of age
/// `age`, as the takeover candidate (the oldest wins). Volatile, as `Best`.
#[inline(always)]
fn candidate<A>(nf: *mut NewFlow<A>, port: u16, age: u32) {
    // SAFETY: the caller's NewFlow (per-CPU map memory on the datapath).
    unsafe {
        let p = &raw mut (*nf).cand_port;
        let a = &raw mut (*nf).cand_age;
        if core::ptr::read_volatile(p) == 0 || age > core::ptr::read_volatile(a) {
            core::ptr::write_volatile(p, port);
            core::ptr::write_volatile(a, age);
        }
    }
}

/// [`Best::take`]'s results.
const BUSY: u32 = 0;
const FREE: u32 = 1;
const TAKEN: u32 = 2;

/// Ranks of a way for a new record: the higher wins.
const R_NONE: u32 = 0;
const R_EVICTABLE: u32 = 1;
const R_EXPIRED: u32 = 2;
/// Empty, or an entry whose record died or moved on (an orphan).
const R_EMPTY: u32 = 3;
/// The same tuple's record: it must be replaced, never duplicated.
const R_SAME: u32 = 4;

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
/// and the word its record had (what an eviction swaps from). It lives in
/// the [`NewFlow`] (per-CPU map memory on the datapath) and is read and
/// written volatile: the verifier does not track values in map memory, so
/// the paths through a scan's seven offers converge instead of multiplying
/// (kept in registers, they took the insert past a million instructions).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Best {
    w: u64,
    i: u32,
    rank: u32,
    age: u32,
    id: u32,
}

impl Best {
    const NONE: Best = Best { i: WAYS as u32, rank: R_NONE, age: 0, w: 0, id: 0 };

    #[inline(always)]
    fn reset(this: *mut Best) {
        // SAFETY: a field of the caller's NewFlow.
        unsafe { core::ptr::write_volatile(this, Best::NONE) }
    }

    #[inline(always)]
    fn read(this: *const Best) -> Best {
        // SAFETY: as `reset`.
        unsafe { core::ptr::read_volatile(this) }
    }

    /// Keeps way `i` if it ranks higher (the oldest among evictable ones).
    #[inline(always)]
    fn offer(this: *mut Best, i: usize, rank: u32, age: u32, w: u64, id: u32) {
        // SAFETY: as `reset`.
        let (r, a) = unsafe {
            (core::ptr::read_volatile(&raw const (*this).rank), core::ptr::read_volatile(&raw const (*this).age))
        };
        if rank > r || (rank == r && rank == R_EVICTABLE && age > a) {
            // SAFETY: as `reset`.
            unsafe { core::ptr::write_volatile(this, Best { i: i as u32, rank, age, w, id }) }
        }
    }

    /// Frees the chosen way's record if it is a live one (an eviction, or
    /// the same tuple's stale record): `TAKEN` when this call unlinked it,
    /// `FREE` when there was nothing to unlink (an empty way, or a record
    /// another unlink ended first), `BUSY` when it changed since the scan.
    #[inline(always)]
    fn take<A: CtAddr, T: Table<A>>(&self, tb: &T) -> u32 {
        if self.rank == R_EMPTY {
            return FREE;
        }
        // Already dead (the reply scan of this very insert may have taken
        // the same record): free, and no hashing for a swap bound to fail.
        if tb.record(self.id).is_some_and(|r| !live(load(word_of(r)))) {
            return FREE;
        }
        if !unlink(tb, self.id, self.w) {
            // Dead since the scan (another CPU's eviction, the sweep, the
            // reply scan of this very insert): the way is free all the same.
            if tb.record(self.id).is_some_and(|r| !live(load(word_of(r)))) {
                return FREE;
            }
            tb.event(event::INSERT_BUSY);
            return BUSY;
        }
        if self.rank != R_SAME {
            tb.event(if self.rank == R_EVICTABLE { event::EVICT_UNESTABLISHED } else { event::EVICT_EXPIRED });
        }
        TAKEN
    }
}

/// Writes the record of a new flow (TCP `flags` of its first packet, at
/// `now` in ticks) and its two index entries, evicting for room: an
/// expired record first, then the oldest unestablished or closing one;
/// established flows never. See [`outcome`]. On `LOST`, nothing was written.
#[inline(always)]
pub fn insert<A: CtAddr, T: Table<A>>(tb: &T, nf: &mut NewFlow<A>, flags: u8, now: u32) -> u32 {
    let hf = nf.rec.forward_hash();
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
    let bp = &raw mut nf.best;
    Best::reset(bp);
    for i in 0..WAYS {
        let id = fbi * WAYS as u32 + i as u32;
        let Some(r) = tb.record(id) else {
            continue;
        };
        let e = load(way(fb, i));
        // SAFETY: table memory; the word read first decides what counts.
        let (mut w, seen) = (load(word_of(r)), unsafe { (*r).last_seen });
        // The tuple compared under the word it returns: a concurrent `touch`
        // may change the word (never the sequence, under this lock) between
        // the two reads, and the record is still this flow's.
        let q = &nf.rec;
        let m = if e != 0 && entry_tag(e) == tag(hf) {
            matching(r, &q.client, &q.front, q.cport, q.fport, w_proto(q.word), false)
        } else {
            0
        };
        if m != 0 && owns(e, m) {
            w = m;
        }
        let mut rk = rank(e, w, seen, now);
        if e == 0 && live(w) {
            // A live record whose forward entry is gone (a removal that came
            // 128 generations late): reclaimed, accounted, never overwritten.
            rk = R_EXPIRED;
        }
        if rk != R_EMPTY && m != 0 && m == w {
            if !stale(w, seen, now, flags) {
                nf.id = id;
                nf.seq = w_seq(w);
                return outcome::LOST;
            }
            rk = R_SAME;
        }
        Best::offer(bp, i, rk, age(seen, now), w, id);
    }
    let best = Best::read(bp);
    if best.rank == R_NONE || best.i >= WAYS as u32 {
        tb.event(event::INSERT_FULL);
        return outcome::FULL;
    }
    let Some(r) = tb.record(best.id) else {
        return outcome::BUSY;
    };
    let snat = nf.snat_min != 0;
    if snat && nf.snat_max < nf.snat_min {
        return outcome::SNAT_EXHAUSTED;
    }
    // With SNAT, SNAT_TRIES ports, then one more round on the port of the
    // oldest unanswered handshake among those held (if old enough).
    let rounds = if snat { SNAT_TRIES + 1 } else { 1 };
    // Never 0 (no division by zero to panic on, which BPF cannot take).
    let range = nf.snat_max.wrapping_sub(nf.snat_min) as u32 + 1;
    let nfp: *mut NewFlow<A> = nf;
    // SAFETY: the caller's NewFlow.
    unsafe { core::ptr::write_volatile(&raw mut (*nfp).cand_port, 0) };
    for i in 0..rounds {
        let takeover = snat && i == SNAT_TRIES;
        if takeover {
            // SAFETY: as above.
            let port = unsafe { core::ptr::read_volatile(&raw const (*nfp).cand_port) };
            if port == 0 {
                break;
            }
            nf.rec.pport = port;
        } else if snat {
            nf.rec.pport = ((nf.snat_min as u32 + nf.snat_hash.wrapping_add(i) % range) as u16).to_be();
        }
        let hr = nf.rec.reply_hash();
        let Some(rb) = tb.bucket(reply_bucket(hr, tb.nb())) else {
            return outcome::BUSY;
        };
        if !lock(rb) {
            tb.event(event::INSERT_BUSY);
            return outcome::BUSY;
        }
        let rw = reply_way(tb, rb, nfp, hr, snat, takeover, now);
        // The forward victim goes only once the reply way is secured: a
        // flow refused for want of a port or a reply way evicts nothing.
        if rw < WAYS {
            if best.take(tb) == BUSY {
                unlock(rb);
                return outcome::BUSY;
            }
            write(tb, nf, r, best.id, (fb, best.i as usize, hf), (rb, rw, hr), now);
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

/// A way for the reply tuple of `nf`'s record (hash `hr`) in the locked
/// reply bucket `rb`: `WAYS` when there is none (with SNAT: the port is
/// held by a live flow), `WAYS + 1` when a victim changed under us. With
/// SNAT, a port held by an unanswered handshake old enough is offered as
/// the takeover candidate, and on the `takeover` round (that port again)
/// its holder is ended and the port given to the new flow — nf_conntrack's
/// early_drop of a flow not assured: under a SYN flood the ports are the
/// flood's, and a new flow must not fail for want of one. Never an answered
/// flow, and never a UDP flow (one-way UDP is a flow: its client must not
/// share its port with another). Without SNAT, an unestablished flow with
/// the same reply tuple (one client port to one backend through two
/// frontends) gives it up to the new flow (`REPLY_OVERWRITE`); an
/// established one keeps it.
#[inline(always)]
fn reply_way<A: CtAddr, T: Table<A>>(
    tb: &T,
    rb: *mut CtBucket,
    nf: *mut NewFlow<A>,
    hr: u32,
    snat: bool,
    takeover: bool,
    now: u32,
) -> usize {
    // SAFETY: the caller's NewFlow; the record is only read here.
    let (want, bp) = unsafe { (&(*nf).rec, &raw mut (*nf).best) };
    Best::reset(bp);
    for i in 0..WAYS {
        let e = load(way(rb, i));
        let id = entry_rec(e);
        let (mut w, mut seen) = (0, 0);
        if e != 0
            && let Some(r) = tb.record(id)
        {
            // SAFETY: table memory.
            (w, seen) = (load(word_of(r)), unsafe { (*r).last_seen });
            // As in the forward scan: the word `matching` read it under.
            let m = if entry_tag(e) == tag(hr) {
                matching(r, &want.backend, &want.peer, want.bport, want.pport, w_proto(want.word), true)
            } else {
                0
            };
            if m != 0 {
                w = m;
            }
            if m != 0 && owns(e, w) {
                // The reply tuple is taken: by a live flow, or by an
                // expired one, replaced so the tuple has one entry.
                let old = expired(w, seen, now);
                let handshake = w_state(w) == ct::STATE_SYN_SENT && age(seen, now) >= TAKEOVER_TICKS;
                let keep = if !snat {
                    !evictable(w)
                } else if takeover {
                    !handshake
                } else {
                    if handshake {
                        candidate(nf, want.pport, age(seen, now));
                    }
                    true
                };
                if !old && keep {
                    return WAYS;
                }
                // (Its age says which: counted once this insert took it.)
                Best::offer(bp, i, R_SAME, if old { 1 } else { 0 }, w, id);
                continue;
            }
        }
        Best::offer(bp, i, rank(e, w, seen, now), age(seen, now), w, id);
    }
    let best = Best::read(bp);
    if best.rank == R_NONE || best.i >= WAYS as u32 {
        return WAYS;
    }
    let took = best.take(tb);
    if took == BUSY {
        return WAYS + 1;
    }
    if best.rank == R_SAME && took == TAKEN {
        tb.event(if best.age != 0 { event::EVICT_EXPIRED } else { event::REPLY_OVERWRITE });
    }
    best.i as usize
}

/// Writes the new flow's record `r` (id `id`, dead) and publishes it: the
/// entries first, then the live word. Until the word is live a lookup that
/// finds an entry misses (odd sequence), and the agent's sweep, which walks
/// records, cannot unlink the record before its entries exist (an unlink
/// then would leave them behind).
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
    fence();
    // Copied from the request in place (a copy on the way would be stack
    // the datapath cannot spare), with the "being written" word: the
    // requested one goes live last.
    let w = nf.rec.word;
    nf.rec.word = word(writing, 0, 0, 0, 0);
    nf.rec.last_seen = now;
    nf.rec.rep_ifindex = 0;
    // SAFETY: table memory; this CPU owns the dead record (forward lock).
    unsafe { core::ptr::copy_nonoverlapping(&raw const nf.rec, r, 1) };
    nf.rec.word = w;
    let backend_id = nf.rec.backend_id;
    let seq = writing.wrapping_add(1);
    let marks = if active(w) { M_COUNTED } else { 0 };
    if marks != 0
        && let Some(c) = tb.conns(backend_id)
    {
        add(c, 1);
    }
    fence();
    store(way(rep.0, rep.1), entry(tag(rep.2), seq, true, id));
    store(way(fwd.0, fwd.1), entry(tag(fwd.2), seq, false, id));
    // (Volatile stores keep their order among themselves.)
    store(p, word(seq, w_state(w), w_flags(w), marks, w_proto(w)));
    nf.id = id;
    nf.seq = seq;
}
