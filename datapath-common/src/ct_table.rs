// SPDX-License-Identifier: MIT OR Apache-2.0
//! The conntrack table's layout (issue #13), shared by the datapath, the
//! agent (which reads and sweeps it through memory maps) and the tests.
//!
//! nf_conntrack's shape: one **record** per flow holding both tuples, one
//! lifetime and both directions' state, reached through two **index
//! entries**, one per tuple. Per address family (`CtAddr`: 4- or 16-byte
//! addresses), three `BPF_F_MMAPABLE` arrays:
//! - the index, `3 × nb` 64-byte [`CtBucket`]s: a lock word and seven ways.
//!   Buckets `0..nb` hold forward (original-tuple) entries, `nb..3nb` reply
//!   entries (twice as many buckets: a reply entry must find room in the one
//!   bucket its tuple hashes to, while a forward entry may evict);
//! - the records, `7 × nb` [`CtRecord`]s. A flow's record is positional: the
//!   record of forward way `w` of bucket `b` is `7b + w`, so inserting a flow
//!   allocates nothing — choosing its forward way is choosing its record;
//! - (shared by both families) BACKEND_CONNS, active connections per backend.
//!
//! Concurrency (the protocol is written out in `ct_ops`): lookups take no
//! lock and validate the record's sequence (odd: being written or dead).
//! Inserts lock the forward bucket, then the reply bucket (always in that
//! order: no cycle), with bounded tries. A record dies by a swap of its word,
//! and the one CPU (or the agent's sweep) whose swap succeeds accounts for it
//! (eviction counters, BACKEND_CONNS), exactly once; its entries are then
//! removed by swapping their exact value to 0.

/// Ways per bucket: a 64-byte line is the lock word and seven entries.
pub const WAYS: usize = 7;

/// One index bucket. `lock`: 0 free, 1 held (taken with `cmpxchg`, given
/// back with `cmpxchg`, which orders the writes inside). A way is 0 (empty)
/// or an [`entry`].
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct CtBucket {
    pub lock: u64,
    pub ways: [u64; WAYS],
}

/// An index entry: tag (upper 32 bits, never 0), the reply bit, a
/// generation (7 bits of the record's sequence when the entry was written,
/// so a delayed removal of a dead flow's entry never removes the entry of a
/// flow written into the same record since) and the record id (24 bits). A
/// forward entry's record id is also its position.
pub const E_REPLY: u64 = 1 << 31;
pub const E_GEN_SHIFT: u32 = 24;
pub const E_REC: u64 = (1 << E_GEN_SHIFT) - 1;
/// Records per family at most (the id's 24 bits).
pub const MAX_RECORDS: u32 = 1 << E_GEN_SHIFT;

#[inline(always)]
pub const fn entry(tag: u32, seq: u32, reply: bool, rec: u32) -> u64 {
    ((tag as u64) << 32)
        | if reply { E_REPLY } else { 0 }
        | ((gen_of(seq) as u64) << E_GEN_SHIFT)
        | (rec as u64 & E_REC)
}

/// The generation a record with sequence `seq` gives its entries.
#[inline(always)]
pub const fn gen_of(seq: u32) -> u32 {
    (seq >> 1) & 0x7f
}

#[inline(always)]
pub const fn entry_rec(e: u64) -> u32 {
    (e & E_REC) as u32
}

#[inline(always)]
pub const fn entry_reply(e: u64) -> bool {
    e & E_REPLY != 0
}

#[inline(always)]
pub const fn entry_tag(e: u64) -> u32 {
    (e >> 32) as u32
}

/// The tag of a tuple with hash `h` (never 0, so no entry is 0).
#[inline(always)]
pub const fn tag(h: u32) -> u32 {
    h | 1
}

/// `h` scaled into `0..n` (Lemire's multiply-shift: no division).
#[inline(always)]
pub const fn fast_range(h: u32, n: u32) -> u32 {
    ((h as u64 * n as u64) >> 32) as u32
}

/// Forward bucket of a tuple with hash `h`, of `nb` forward buckets.
#[inline(always)]
pub const fn forward_bucket(h: u32, nb: u32) -> u32 {
    fast_range(h, nb)
}

/// Reply bucket of a tuple with hash `h` (after the `nb` forward ones).
#[inline(always)]
pub const fn reply_bucket(h: u32, nb: u32) -> u32 {
    nb + fast_range(h.rotate_left(16), 2 * nb)
}

/// Forward buckets for a table of `entries` index entries (two per flow,
/// the meaning `--conntrack-size` always had): one record per flow.
pub const fn buckets_for(entries: u32) -> u32 {
    let flows = entries / 2;
    let nb = flows.div_ceil(WAYS as u32);
    let most = MAX_RECORDS / WAYS as u32;
    if nb == 0 {
        1
    } else if nb > most {
        most
    } else {
        nb
    }
}

/// Address forms: IPv4 records keep 4-byte addresses, IPv6 ones 16.
pub trait CtAddr: Copy + Default + PartialEq {
    fn mix_into(&self, h: u32) -> u32;
    /// From the datapath's 16-byte form (IPv4 mapped).
    fn from16(a: &[u8; 16]) -> Self;
    /// To the datapath's 16-byte form (IPv4 mapped).
    fn to16(&self) -> [u8; 16];
}

impl CtAddr for [u8; 4] {
    #[inline(always)]
    fn mix_into(&self, h: u32) -> u32 {
        crate::hash::mix(h, u32::from_le_bytes(*self))
    }
    #[inline(always)]
    fn from16(a: &[u8; 16]) -> Self {
        [a[12], a[13], a[14], a[15]]
    }
    #[inline(always)]
    fn to16(&self) -> [u8; 16] {
        crate::v4_mapped(*self)
    }
}

/// An IPv6 address in the table: 16 bytes, 4-aligned (a record's address
/// fields sit at 4-byte offsets), so the datapath compares and copies it in
/// 32-bit words; as bytes, each byte is a load, and the verifier walks them.
#[repr(C, align(4))]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct Addr6(pub [u8; 16]);

impl CtAddr for Addr6 {
    #[inline(always)]
    fn from16(a: &[u8; 16]) -> Self {
        Addr6(*a)
    }
    #[inline(always)]
    fn to16(&self) -> [u8; 16] {
        self.0
    }
    #[inline(always)]
    fn mix_into(&self, mut h: u32) -> u32 {
        let a = &self.0;
        h = crate::hash::mix(h, u32::from_le_bytes([a[0], a[1], a[2], a[3]]));
        h = crate::hash::mix(h, u32::from_le_bytes([a[4], a[5], a[6], a[7]]));
        h = crate::hash::mix(h, u32::from_le_bytes([a[8], a[9], a[10], a[11]]));
        crate::hash::mix(h, u32::from_le_bytes([a[12], a[13], a[14], a[15]]))
    }
}

/// A packet's tuple. Ports in network order.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct Tuple<A> {
    pub src: A,
    pub dst: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<A: CtAddr> Tuple<A> {
    /// The conntrack hash of the whole tuple (the Maglev hash leaves the
    /// destination out; this one cannot).
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        hash_of(&self.src, &self.dst, self.sport, self.dport, self.proto)
    }
}

/// [`Tuple::hash`] of a tuple given by its parts (a record's fields, read
/// in place: on the datapath a tuple copied out is stack it cannot spare).
#[inline(always)]
pub fn hash_of<A: CtAddr>(src: &A, dst: &A, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x5bd1_e995_u32;
    h = src.mix_into(h);
    h = dst.mix_into(h);
    h = crate::hash::mix(h, ((sport as u32) << 16) | dport as u32);
    h = crate::hash::mix(h, proto as u32);
    crate::hash::finish(h)
}

/// [`CtRecord::word`]: sequence (low 32 bits: odd while the record is
/// written or after it was unlinked), state, flags, marks, protocol.
#[inline(always)]
pub const fn word(seq: u32, state: u8, flags: u8, marks: u8, proto: u8) -> u64 {
    seq as u64 | (state as u64) << 32 | (flags as u64) << 40 | (marks as u64) << 48 | (proto as u64) << 56
}
#[inline(always)]
pub const fn w_seq(w: u64) -> u32 {
    w as u32
}
#[inline(always)]
pub const fn w_state(w: u64) -> u8 {
    (w >> 32) as u8
}
#[inline(always)]
pub const fn w_flags(w: u64) -> u8 {
    (w >> 40) as u8
}
#[inline(always)]
pub const fn w_marks(w: u64) -> u8 {
    (w >> 48) as u8
}
#[inline(always)]
pub const fn w_proto(w: u64) -> u8 {
    (w >> 56) as u8
}

/// Marks: the client sent a FIN; the backend sent a FIN; the flow counts in
/// BACKEND_CONNS; the backend answered (nf_conntrack's SEEN_REPLY: a UDP
/// flow with an answer is kept under pressure, as IPS_ASSURED is).
pub const M_FIN_FWD: u8 = 1;
pub const M_FIN_REP: u8 = 2;
pub const M_COUNTED: u8 = 4;
pub const M_REPLIED: u8 = 8;
/// Flipped by every refresh of `last_seen` (see `ct_ops::touch`).
pub const M_TOUCHED: u8 = 16;

/// One flow. Forward tuple `client:cport → front:fport`; reply tuple
/// `backend:bport → peer:pport`, where `peer` is the SNAT source (flag
/// `CT_F_SNAT`) or the client. 64 bytes for IPv4, 112 for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct CtRecord<A> {
    /// See [`word`]. State changes and the sequence go through `cmpxchg` on it.
    pub word: u64,
    /// [`ticks`] of the last packet that refreshed the flow (either way).
    pub last_seen: u32,
    pub backend_id: u32,
    /// Frontend id (SERVICE_STATS, FRONTENDS).
    pub rev_nat_id: u32,
    pub client: A,
    pub front: A,
    pub backend: A,
    pub peer: A,
    pub cport: u16,
    pub fport: u16,
    pub bport: u16,
    pub pport: u16,
    /// The reply direction's cached route (egress ifindex, 0: none; MACs;
    /// a length known to fit), dropped whenever `last_seen` moves, and valid
    /// only while `rep_gen` is the low 16 bits of the record's sequence: a
    /// late fill by a CPU that read an earlier flow of this record is never
    /// used by the next one.
    pub rep_ifindex: u32,
    pub rep_macs: [u8; 12],
    pub rep_mtu: u16,
    pub rep_gen: u16,
}

pub type CtRecord4 = CtRecord<[u8; 4]>;
pub type CtRecord6 = CtRecord<Addr6>;

const _: () = assert!(size_of::<CtBucket>() == 64);
const _: () = assert!(size_of::<CtRecord4>() == 64);
const _: () = assert!(size_of::<CtRecord6>() == 112);

impl<A: CtAddr> CtRecord<A> {
    #[inline(always)]
    pub fn forward(&self) -> Tuple<A> {
        Tuple { src: self.client, dst: self.front, sport: self.cport, dport: self.fport, proto: w_proto(self.word) }
    }

    #[inline(always)]
    pub fn reply(&self) -> Tuple<A> {
        Tuple { src: self.backend, dst: self.peer, sport: self.bport, dport: self.pport, proto: w_proto(self.word) }
    }

    #[inline(always)]
    pub fn forward_hash(&self) -> u32 {
        hash_of(&self.client, &self.front, self.cport, self.fport, w_proto(self.word))
    }

    #[inline(always)]
    pub fn reply_hash(&self) -> u32 {
        hash_of(&self.backend, &self.peer, self.bport, self.pport, w_proto(self.word))
    }
}

/// Time in the table: `CLOCK_MONOTONIC_COARSE` nanoseconds / 2^20 (≈ 1.05
/// ms), so a record's time is 4 bytes. Wraps after 52 days; an age is the
/// wrapping difference, and the agent's sweep reclaims expired records long
/// before one could look young again.
pub const TICK_SHIFT: u32 = 20;

#[inline(always)]
pub const fn ticks(ns: u64) -> u32 {
    (ns >> TICK_SHIFT) as u32
}

#[inline(always)]
pub const fn ticks_of(ns: u64) -> u32 {
    ns.div_ceil(1 << TICK_SHIFT) as u32
}

/// True when both directions sent a FIN (or the state says closing).
#[inline(always)]
pub const fn w_closing(w: u64) -> bool {
    crate::ct::closing_of(w_state(w), w_marks(w) & M_FIN_FWD != 0, w_marks(w) & M_FIN_REP != 0)
}

/// How long a record with word `w` lives without traffic, in ticks.
#[inline(always)]
pub const fn timeout_ticks(w: u64) -> u32 {
    ticks_of(crate::ct::timeout_of(w_state(w), w_closing(w)))
}

/// Age in ticks (0 when the clock reads earlier than `last_seen`).
#[inline(always)]
pub const fn age(last_seen: u32, now: u32) -> u32 {
    let a = now.wrapping_sub(last_seen);
    if a > u32::MAX / 2 { 0 } else { a }
}

#[inline(always)]
pub const fn expired(w: u64, last_seen: u32, now: u32) -> bool {
    age(last_seen, now) > timeout_ticks(w)
}

/// True when a packet with TCP `flags` on the forward tuple of the record
/// (`w`, `last_seen`) must start a new flow: the record expired, or the flow
/// is closing or closed and a new SYN reuses the tuple (a client port reused
/// after TIME_WAIT gets a fresh pick). A SYN on a half-closed flow does not.
#[inline(always)]
pub const fn stale(w: u64, last_seen: u32, now: u32, flags: u8) -> bool {
    expired(w, last_seen, now) || crate::ct::reopens(w_proto(w), w_state(w), w_closing(w), flags)
}

/// True for a record the eviction may take for a new flow when its bucket
/// is full: not established (a SYN not yet answered, UDP never answered), or
/// closing or closed — nf_conntrack's early_drop of flows not assured.
/// Established TCP and answered UDP are never evicted, so a flood of new
/// flows cannot push them out.
#[inline(always)]
pub const fn evictable(w: u64) -> bool {
    match w_state(w) {
        crate::ct::STATE_ESTABLISHED => w_closing(w),
        crate::ct::STATE_UDP => w_marks(w) & M_REPLIED == 0,
        _ => true,
    }
}

/// Whether a record with word `w` counts as an active connection
/// (BACKEND_CONNS): established TCP, not closing.
#[inline(always)]
pub const fn active(w: u64) -> bool {
    w_state(w) == crate::ct::STATE_ESTABLISHED && !w_closing(w)
}

/// CT_EVENTS (per-CPU counters) indices.
pub mod event {
    /// A new flow took the record of an expired one.
    pub const EVICT_EXPIRED: u32 = 0;
    /// A new flow took the record of an unestablished or closing one (full bucket).
    pub const EVICT_UNESTABLISHED: u32 = 1;
    /// No way in the forward bucket: every record there is established.
    pub const INSERT_FULL: u32 = 2;
    /// No way in the reply bucket (every entry there belongs to a live flow).
    pub const INSERT_REPLY_FULL: u32 = 3;
    /// A bucket lock stayed held past the bounded tries.
    pub const INSERT_BUSY: u32 = 4;
    /// A reply entry of a live flow replaced by a new flow with the same reply tuple.
    pub const REPLY_OVERWRITE: u32 = 5;
    pub const COUNT: u32 = 6;
    pub const NAMES: [&str; COUNT as usize] =
        ["evict_expired", "evict_unestablished", "insert_full", "insert_reply_full", "insert_busy", "reply_overwrite"];
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    #[test]
    fn entries_and_words_round_trip() {
        let e = entry(0xdead_beef, 6, true, 12345);
        assert_eq!((entry_tag(e), entry_reply(e), entry_rec(e)), (0xdead_beef, true, 12345));
        assert_ne!(entry(0xdead_beef, 8, true, 12345), e, "another generation, another entry");
        assert_eq!(entry_rec(entry(1, 0xffff_ffff, false, MAX_RECORDS - 1)), MAX_RECORDS - 1);
        assert_ne!(entry(tag(0), 0, false, 0), 0, "no entry is the empty way");
        let w = word(7, 2, 1, M_COUNTED, 6);
        assert_eq!((w_seq(w), w_state(w), w_flags(w), w_marks(w), w_proto(w)), (7, 2, 1, M_COUNTED, 6));
    }

    #[test]
    fn buckets_cover_the_table_and_spread() {
        let nb = buckets_for(262_144);
        assert!(nb as usize * WAYS >= 131_072);
        let mut seen_f = vec![0u32; nb as usize];
        let mut seen_r = vec![0u32; 2 * nb as usize];
        for i in 0..100_000u32 {
            let t = Tuple { src: i.to_be_bytes(), dst: [10, 0, 0, 1], sport: 80, dport: 40000, proto: 6 };
            let h = t.hash();
            seen_f[forward_bucket(h, nb) as usize] += 1;
            let r = reply_bucket(h, nb);
            assert!((nb..3 * nb).contains(&r));
            seen_r[(r - nb) as usize] += 1;
        }
        let worst = *seen_f.iter().max().unwrap();
        assert!(worst < 25, "forward buckets unbalanced: {worst}");
        assert!(*seen_r.iter().max().unwrap() < 16);
    }

    #[test]
    fn a_clock_that_went_back_never_expires_a_record() {
        let w = word(0, crate::ct::STATE_UDP, 0, 0, 17);
        assert!(!expired(w, 1000, 999));
        assert!(!expired(w, 1000, 1000 + ticks_of(crate::ct::TIMEOUT_UDP_NS)));
        assert!(expired(w, 1000, 1001 + ticks_of(crate::ct::TIMEOUT_UDP_NS)));
        assert!(!evictable(word(0, crate::ct::STATE_ESTABLISHED, 0, 0, 6)));
        assert!(evictable(word(0, crate::ct::STATE_ESTABLISHED, 0, M_FIN_FWD | M_FIN_REP, 6)));
        assert!(evictable(word(0, crate::ct::STATE_SYN_SENT, 0, 0, 6)));
    }
}
