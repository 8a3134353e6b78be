// SPDX-License-Identifier: MIT OR Apache-2.0
//! The table's protocol on the host, over real atomics: the same code the
//! datapath runs, on a table in plain memory, with threads for CPUs.

extern crate std;
use super::*;
use crate::{
    CT_F_SNAT, PROTO_UDP,
    ct::{STATE_ESTABLISHED, STATE_SYN_SENT, STATE_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TIMEOUT_UDP_NS},
    ct_table::{CtRecord4, event, expired, ticks_of, w_closing},
};
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64 as Counter, Ordering::Relaxed},
    },
    thread,
    vec::Vec,
};

/// A table in plain memory (what the agent's mappings are too).
struct Mem {
    nb: u32,
    buckets: Vec<CtBucket>,
    records: Vec<CtRecord4>,
    conns: Vec<u64>,
    events: [Counter; event::COUNT as usize],
}

/// Shared between threads: every access goes through the protocol's atomics.
#[derive(Clone)]
struct Shared(Arc<Mem>);
// SAFETY: the table's words are only touched through atomics and volatile
// accesses, as the kernel's CPUs touch the map.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(nb: u32) -> Self {
        Shared(Arc::new(Mem {
            nb,
            buckets: std::vec![CtBucket::default(); 3 * nb as usize],
            records: std::vec![CtRecord4::default(); WAYS * nb as usize],
            conns: std::vec![0; 16],
            events: Default::default(),
        }))
    }
    fn events(&self, ev: u32) -> u64 {
        self.0.events[ev as usize].load(Relaxed)
    }
    fn conns_of(&self, b: u32) -> u64 {
        // SAFETY: a read of an aligned word.
        unsafe { core::ptr::read_volatile(&self.0.conns[b as usize]) }
    }
    /// Live records' (forward tuple, record) and the active ones per backend.
    fn live(&self) -> (Vec<CtRecord4>, [u64; 16]) {
        let mut all = Vec::new();
        let mut act = [0u64; 16];
        records(self, |_, r| {
            if active(r.word) {
                act[r.backend_id as usize] += 1;
            }
            all.push(*r);
        });
        (all, act)
    }
}

impl Table<[u8; 4]> for Shared {
    fn nb(&self) -> u32 {
        self.0.nb
    }
    fn bucket(&self, i: u32) -> Option<*mut CtBucket> {
        self.0.buckets.get(i as usize).map(|b| b as *const _ as *mut _)
    }
    fn record(&self, i: u32) -> Option<*mut CtRecord4> {
        self.0.records.get(i as usize).map(|r| r as *const _ as *mut _)
    }
    fn conns(&self, backend: u32) -> Option<*mut u64> {
        self.0.conns.get(backend as usize).map(|c| c as *const _ as *mut _)
    }
    fn event(&self, ev: u32) {
        self.0.events[ev as usize].fetch_add(1, Relaxed);
    }
    // Threads here may be descheduled anywhere, as the agent's sweep.
    fn late_unlinks(&self) -> bool {
        true
    }
}

const FRONT: [u8; 4] = [10, 96, 0, 1];
const NODE: [u8; 4] = [192, 168, 0, 1];

fn backend_addr(b: u32) -> [u8; 4] {
    [10, 1, 0, b as u8]
}

/// A new flow from client `c`:`port` to the frontend, to backend `b`.
fn flow(c: u32, port: u16, b: u32, proto: u8, flags: u8, snat: bool) -> NewFlow<[u8; 4]> {
    let client = [172, 16, (c >> 8) as u8, c as u8];
    let state = ct::initial_state(proto, flags);
    let mut rec = CtRecord4 {
        word: word(0, state, if snat { CT_F_SNAT } else { 0 }, 0, proto),
        backend_id: b,
        rev_nat_id: 1,
        client,
        front: FRONT,
        backend: backend_addr(b),
        peer: client,
        cport: port.to_be(),
        fport: 80u16.to_be(),
        bport: 8080u16.to_be(),
        pport: port.to_be(),
        ..Default::default()
    };
    let mut nf = NewFlow { snat_hash: c.wrapping_mul(2_654_435_761) ^ port as u32, ..Default::default() };
    if snat {
        rec.peer = NODE;
        (nf.snat_min, nf.snat_max) = (61_000, 61_063);
    }
    nf.rec = rec;
    nf
}

fn find(t: &Shared, tu: &Tuple<[u8; 4]>) -> u64 {
    lookup(t, tu, tu.hash())
}

/// A packet on tuple `tu` with TCP `flags`, as the datapath's hit path.
fn packet(t: &Shared, tu: &Tuple<[u8; 4]>, flags: u8, now: u32) -> bool {
    let f = find(t, tu);
    f != 0 && touch(t, found_id(f), found_seq(f), flags, found_reply(f), now)
}

#[test]
fn one_record_two_entries_one_lifetime() {
    let t = Shared::new(64);
    let now = 1000;
    let mut nf = flow(1, 40_000, 3, PROTO_TCP, TCP_SYN, false);
    assert_eq!(insert(&t, &mut nf, TCP_SYN, now), outcome::WON);
    let (fwd, rep) = (nf.rec.forward(), nf.rec.reply());
    let (ff, fr) = (find(&t, &fwd), find(&t, &rep));
    assert_eq!((found_id(ff), found_reply(ff)), (nf.id, false));
    assert_eq!((found_id(fr), found_reply(fr)), (nf.id, true), "the reply tuple names the same record");
    assert_eq!(t.conns_of(3), 0, "a SYN is not a connection yet");
    assert!(packet(&t, &rep, TCP_SYN | TCP_ACK, now + 1));
    assert_eq!(t.conns_of(3), 1, "established by the SYN-ACK");
    // A half-close keeps the flow established (and counted).
    assert!(packet(&t, &fwd, TCP_FIN | TCP_ACK, now + 2));
    assert_eq!((t.conns_of(3), w_closing(t.live().0[0].word)), (1, false));
    assert!(packet(&t, &rep, TCP_FIN | TCP_ACK, now + 3));
    assert_eq!(t.conns_of(3), 0, "both FINs: closing, no longer active");
    // A second insert of a live tuple loses to it.
    let mut again = flow(1, 40_000, 4, PROTO_TCP, TCP_ACK, false);
    assert_eq!(insert(&t, &mut again, TCP_ACK, now + 4), outcome::LOST);
    assert_eq!(again.id, nf.id);
    // A new SYN on the closing tuple replaces it: one record for the tuple.
    let mut reuse = flow(1, 40_000, 4, PROTO_TCP, TCP_SYN, false);
    assert_eq!(insert(&t, &mut reuse, TCP_SYN, now + 5), outcome::WON);
    let live = t.live().0;
    assert_eq!((live.len(), live[0].backend_id), (1, 4));
    assert_eq!(find(&t, &rep), 0, "the old flow's reply entry went with its record");
}

#[test]
fn a_live_flows_snat_port_is_never_given_again() {
    let t = Shared::new(64);
    let now = 5000;
    // One-way UDP over SNAT: only the client sends.
    let mut a = flow(1, 5000, 2, PROTO_UDP, 0, true);
    assert_eq!(insert(&t, &mut a, 0, now), outcome::WON);
    let port = a.rec.pport;
    let udp = ticks_of(TIMEOUT_UDP_NS);
    // The client keeps sending past the UDP timeout; every packet refreshes the one record.
    for k in 1..4 {
        assert!(packet(&t, &a.rec.forward(), 0, now + k * udp / 2));
    }
    let later = now + 3 * udp / 2;
    // Another client whose probe starts at the same port gets another one.
    let mut b = flow(2, 5000, 2, PROTO_UDP, 0, true);
    b.snat_hash = a.snat_hash;
    assert_eq!(insert(&t, &mut b, 0, later), outcome::WON);
    assert_ne!(b.rec.pport, port, "the port is a's while a sends");
    // Once a's flow expired, its port is free again.
    let mut c = flow(3, 5000, 2, PROTO_UDP, 0, true);
    c.snat_hash = a.snat_hash;
    assert_eq!(insert(&t, &mut c, 0, later + udp + 1), outcome::WON);
    assert_eq!(c.rec.pport, port);
    assert_eq!(t.events(event::EVICT_EXPIRED), 1);
    // Every port of the range held by live flows: refused, never shared.
    let t = Shared::new(64);
    let mut ports = HashSet::new();
    let mut refused = 0;
    for i in 0..100 {
        let mut f = flow(10 + i, 7000, 2, PROTO_UDP, 0, true);
        f.snat_hash = 0;
        match insert(&t, &mut f, 0, now) {
            outcome::WON => assert!(ports.insert(f.rec.pport), "port given twice"),
            outcome::SNAT_EXHAUSTED => refused += 1,
            o => panic!("outcome {o}"),
        }
    }
    assert_eq!((ports.len(), refused), (SNAT_TRIES as usize, 100 - SNAT_TRIES as usize));
}

#[test]
fn an_unanswered_handshake_gives_up_its_snat_port_to_a_new_flow_but_an_answered_one_never() {
    let t = Shared::new(64);
    let now = 5000;
    let syn = |i: u32| {
        let mut f = flow(10 + i, 7000, 2, PROTO_TCP, TCP_SYN, true);
        f.snat_hash = 0;
        f
    };
    // Every port tried is held by an unanswered SYN (a flood's), the first
    // ones oldest.
    let mut held = Vec::new();
    for i in 0..SNAT_TRIES {
        let mut f = syn(i);
        assert_eq!(insert(&t, &mut f, TCP_SYN, now + i), outcome::WON);
        held.push(f);
    }
    // Younger than a SYN retransmission: none is taken (its SYN-ACK may be
    // on its way).
    let mut young = syn(99);
    assert_eq!(insert(&t, &mut young, TCP_SYN, now + TAKEOVER_TICKS - 1), outcome::SNAT_EXHAUSTED);
    // Older: the next SYN takes the port of the oldest, which goes.
    let later = now + 2 * TAKEOVER_TICKS;
    let mut f = syn(100);
    assert_eq!(insert(&t, &mut f, TCP_SYN, later), outcome::WON);
    let oldest = &held[0];
    assert_eq!(f.rec.pport, oldest.rec.pport);
    assert_eq!(find(&t, &oldest.rec.forward()), 0, "the holder went, both tuples");
    assert_eq!(found_id(find(&t, &f.rec.reply())), f.id, "the port's reply tuple is the new flow's");
    assert_eq!(t.events(event::REPLY_OVERWRITE), 1);
    // Answered handshakes (established) keep their ports: refused.
    for h in &held[1..] {
        assert!(packet(&t, &h.rec.reply(), TCP_SYN | TCP_ACK, later + 1));
    }
    assert!(packet(&t, &f.rec.reply(), TCP_SYN | TCP_ACK, later + 1));
    let mut g = syn(101);
    assert_eq!(insert(&t, &mut g, TCP_SYN, later + 2 * TAKEOVER_TICKS), outcome::SNAT_EXHAUSTED);
    assert_eq!(t.live().0.len(), SNAT_TRIES as usize);
    assert_eq!(t.events(event::REPLY_OVERWRITE), 1);
}

/// Flows whose forward tuples all land in forward bucket 0 of a table with
/// `nb` buckets.
fn same_bucket(nb: u32, n: usize, proto: u8, flags: u8) -> Vec<NewFlow<[u8; 4]>> {
    (0..20_000u32)
        .map(|c| flow(c, 1234, 1, proto, flags, false))
        .filter(|f| forward_bucket(f.rec.forward().hash(), nb) == 0)
        .take(n)
        .collect()
}

#[test]
fn eviction_prefers_expired_then_the_oldest_unestablished_and_never_established() {
    let nb = 8;
    let t = Shared::new(nb);
    let fl = same_bucket(nb, 12, PROTO_TCP, TCP_SYN);
    let ins = |i: usize, flags: u8, now: u32| {
        let mut f = fl[i];
        f.rec.word = word(0, ct::initial_state(PROTO_TCP, flags), 0, 0, PROTO_TCP);
        insert(&t, &mut f, flags, now)
    };
    // Five established flows, two SYNs (the first older): the bucket is full.
    for i in 0..5 {
        assert_eq!(ins(i, TCP_ACK, 100), outcome::WON);
    }
    assert_eq!(ins(5, TCP_SYN, 100), outcome::WON);
    assert_eq!(ins(6, TCP_SYN, 200), outcome::WON);
    assert_eq!(t.conns_of(1), 5);
    // A new flow takes the oldest SYN's record.
    assert_eq!(ins(7, TCP_SYN, 300), outcome::WON);
    assert_eq!(t.events(event::EVICT_UNESTABLISHED), 1);
    let gone = fl[5].rec.forward();
    assert_eq!(find(&t, &gone), 0, "the oldest unestablished flow went");
    assert_ne!(find(&t, &fl[6].rec.forward()), 0);
    // Once that one expired, it goes before any live unestablished one.
    let late = 200 + ticks_of(ct::TIMEOUT_SYN_NS) + 1;
    assert!(packet(&t, &fl[7].rec.forward(), TCP_SYN, late));
    assert_eq!(ins(8, TCP_SYN, late), outcome::WON);
    assert_eq!((t.events(event::EVICT_EXPIRED), find(&t, &fl[6].rec.forward())), (1, 0));
    // Established flows (and their count) survive any number of new flows.
    for f in &fl[7..9] {
        let tu = f.rec.forward();
        assert!(packet(&t, &tu, TCP_ACK, late));
    }
    assert_eq!(t.conns_of(1), 7);
    assert_eq!(ins(9, TCP_SYN, late), outcome::FULL);
    assert_eq!(t.events(event::INSERT_FULL), 1);
    for f in &fl[..5] {
        assert_ne!(find(&t, &f.rec.forward()), 0, "established flows stay");
    }
    // Answered UDP is kept too; UDP never answered is not.
    let t = Shared::new(nb);
    let ud = same_bucket(nb, 8, PROTO_UDP, 0);
    for (i, f) in ud.iter().take(7).enumerate() {
        let mut f = *f;
        assert_eq!(insert(&t, &mut f, 0, 10 + i as u32), outcome::WON);
        if i > 0 {
            assert!(packet(&t, &f.rec.reply(), 0, 20));
        }
    }
    let mut f = ud[7];
    assert_eq!(insert(&t, &mut f, 0, 30), outcome::WON);
    assert_eq!(find(&t, &ud[0].rec.forward()), 0, "the one flow never answered went");
}

#[test]
fn two_cpus_on_one_flow_agree_and_snat_ports_stay_unique() {
    // Both threads insert the same flows at the same moment (a barrier),
    // round after round on fresh tables: each flow ends with one record,
    // each reply tuple (each SNAT port) belongs to one flow, and every
    // insert that won is a live record.
    // At least 40 rounds, and on until the threads were seen to overlap (on
    // a machine busy with other tests one may finish before the other
    // starts, round after round), for at most 10 s.
    let mut races = 0;
    let since = std::time::Instant::now();
    for round in 0u32.. {
        if round >= 40 && (races > 0 || since.elapsed().as_secs() >= 10) {
            break;
        }
        let snat = round % 2 == 0;
        // Large enough that no bucket overflows (no eviction to account for).
        let t = Shared::new(4096);
        let n = 1500u32;
        let won = Arc::new(Counter::new(0));
        let lost = Arc::new(Counter::new(0));
        // Wins of the first thread: 0 < first < won when they interleaved.
        let first = Arc::new(Counter::new(0));
        let start = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|k| {
                let (t, won, lost, start, first) = (t.clone(), won.clone(), lost.clone(), start.clone(), first.clone());
                thread::spawn(move || {
                    start.wait();
                    for c in 0..n {
                        // Few client ports, few SNAT ports: flows collide on reply tuples.
                        let mut f = flow(c, 3000, 1 + c % 4, PROTO_TCP, TCP_SYN, snat);
                        (f.snat_hash, f.snat_max) = (c % 64, 61_000 + 4095);
                        match insert(&t, &mut f, TCP_SYN, 7) {
                            outcome::WON => {
                                first.fetch_add((k == 0) as u64, Relaxed);
                                won.fetch_add(1, Relaxed)
                            }
                            outcome::LOST => lost.fetch_add(1, Relaxed),
                            _ => 0,
                        };
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|h| h.join().unwrap());
        let live = t.live().0;
        let fwd: HashSet<_> = live.iter().map(|r| r.forward()).collect();
        let rep: HashSet<_> = live.iter().map(|r| r.reply()).collect();
        assert_eq!((fwd.len(), rep.len()), (live.len(), live.len()), "snat={snat}: one record per tuple");
        let ev: Vec<u64> = (0..event::COUNT).map(|e| t.events(e)).collect();
        // A flow whose last SNAT port tried was held by an unanswered
        // handshake took it over (`REPLY_OVERWRITE`): that flow went.
        let taken = t.events(event::REPLY_OVERWRITE) as usize;
        assert_eq!(won.load(Relaxed) as usize - taken, live.len(), "snat={snat} {ev:?} lost {}", lost.load(Relaxed));
        assert_eq!(t.events(event::EVICT_UNESTABLISHED) + t.events(event::INSERT_FULL), 0, "snat={snat}");
        for r in &live {
            let f = find(&t, &r.reply());
            assert_eq!(t.0.records[found_id(f) as usize].forward(), r.forward(), "reply entry names its flow");
        }
        // Both threads won some flows: they ran at the same time, not one after the other.
        races += (first.load(Relaxed) > 0 && first.load(Relaxed) < won.load(Relaxed)) as u32;
    }
    assert!(races > 0, "the threads never overlapped");
}

#[test]
fn connection_counts_stay_exact_through_churn_eviction_and_sweeps() {
    // Two threads open, establish, half-close, close, reset and abandon
    // flows in a small table (evictions), while the clock advances past
    // timeouts and a sweep reclaims expired records; at the end the counts
    // equal the live established records.
    let t = Shared::new(16);
    let clock = Arc::new(Counter::new(1));
    let threads: Vec<_> = (0..2u32)
        .map(|k| {
            let (t, clock) = (t.clone(), clock.clone());
            thread::spawn(move || {
                let mut x = 0x9e37_79b9u32.wrapping_mul(k + 1);
                for i in 0..20_000u32 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let now = clock.load(Relaxed) as u32;
                    let c = x % 300;
                    let f = flow(c, 2000 + (x >> 20) as u16 % 4, 1 + c % 8, PROTO_TCP, TCP_SYN, false);
                    match x >> 28 {
                        0..=4 => {
                            let mut f = f;
                            insert(&t, &mut f, TCP_SYN, now);
                        }
                        5..=8 => {
                            packet(&t, &f.rec.reply(), TCP_SYN | TCP_ACK, now);
                        }
                        9..=10 => {
                            packet(&t, &f.rec.forward(), TCP_FIN | TCP_ACK, now);
                        }
                        11..=12 => {
                            packet(&t, &f.rec.reply(), TCP_FIN | TCP_ACK, now);
                        }
                        13 => {
                            packet(&t, &f.rec.forward(), TCP_RST, now);
                        }
                        _ if k == 0 && i % 50 == 0 => {
                            sweep(&t, |r, w| expired(w, r.last_seen, now));
                        }
                        _ => {}
                    }
                    if k == 1 && i % 1000 == 0 {
                        clock.fetch_add(ticks_of(ct::TIMEOUT_SYN_NS) as u64 / 4, Relaxed);
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
    let (live, active) = t.live();
    for b in 0..16 {
        assert_eq!(t.conns_of(b), active[b as usize], "backend {b}");
    }
    assert!(active.iter().sum::<u64>() > 0 && t.events(event::EVICT_UNESTABLISHED) > 0);
    // A final sweep of everything leaves every count at zero.
    let n = sweep(&t, |_, _| true) as usize;
    assert_eq!(n, live.len());
    assert!((0..16).all(|b| t.conns_of(b) == 0));
    assert!(t.0.buckets.iter().all(|b| b.ways.iter().all(|&e| e == 0) && b.lock == 0), "no entry outlives its record");
    assert!(matches!(w_state(word(0, STATE_UDP, 0, 0, 0)), STATE_UDP) && STATE_ESTABLISHED != STATE_SYN_SENT);
    let _ = TCP_RST;
}

/// Runs `f(k)` on two threads started together.
fn both(f: impl Fn(u32) + Send + Sync + 'static) {
    let f = Arc::new(f);
    let start = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|k| {
            let (f, start) = (f.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                f(k)
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
}

/// Every index entry belongs to the live record it names (no orphan, none
/// pointing at a record of another flow), and the counts match the records.
fn consistent(t: &Shared) {
    let (_, act) = t.live();
    for (bi, b) in t.0.buckets.iter().enumerate() {
        for &e in b.ways.iter().filter(|&&e| e != 0) {
            let r = &t.0.records[entry_rec(e) as usize];
            assert!(owns(e, r.word), "bucket {bi}: entry {e:#x} outlived its record {r:?}");
            let tu = if entry_reply(e) { r.reply() } else { r.forward() };
            assert_eq!(entry_tag(e), tag(tu.hash()), "bucket {bi}: entry names another tuple");
        }
    }
    for b in 0..16 {
        assert_eq!(t.conns_of(b), act[b as usize], "backend {b}");
    }
}

#[test]
fn a_flow_answered_while_another_cpu_inserts_it_keeps_one_record() {
    // Both threads insert each flow, then answer it (SYN-ACK, ACK: the word
    // changes under the other thread's insert scan): every flow ends with
    // one record, counted once.
    for _ in 0..20 {
        let t = Shared::new(4096);
        let won = Arc::new(Counter::new(0));
        let (tt, w2) = (t.clone(), won.clone());
        both(move |_| {
            for c in 0..1000 {
                let mut f = flow(c, 4000, 1 + c % 4, PROTO_TCP, TCP_SYN, false);
                if insert(&tt, &mut f, TCP_SYN, 9) == outcome::WON {
                    w2.fetch_add(1, Relaxed);
                }
                packet(&tt, &f.rec.reply(), TCP_SYN | TCP_ACK, 9);
                packet(&tt, &f.rec.forward(), TCP_ACK, 9);
            }
        });
        let live = t.live().0;
        let fwd: HashSet<_> = live.iter().map(|r| r.forward()).collect();
        assert_eq!((fwd.len(), live.len(), won.load(Relaxed)), (1000, 1000, 1000));
        consistent(&t);
        assert_eq!((1..5).map(|b| t.conns_of(b)).sum::<u64>(), 1000);
    }
}

#[test]
fn sweeps_racing_inserts_and_lookups_leave_no_orphan_and_no_wrong_answer() {
    // One thread inserts flows (with SNAT for half, in a small table:
    // evictions) and checks each record it wrote right away: if a sweep
    // took it already, none of its entries may remain. The other thread
    // sweeps every record it sees, fresh or not, and looks flows up: a
    // lookup answers only with a record holding the tuple asked for.
    for _ in 0..10 {
        let t = Shared::new(4);
        let tt = t.clone();
        let done = Arc::new(Counter::new(0));
        both(move |k| {
            let mut i = 0u32;
            while (k == 0 && i < 20_000) || (k == 1 && done.load(Relaxed) == 0) {
                i += 1;
                let c = i.wrapping_mul(7919) % 400;
                let mut f = flow(c, 5000, 1 + c % 8, PROTO_TCP, TCP_SYN, c.is_multiple_of(2));
                if k == 0 {
                    if insert(&tt, &mut f, TCP_SYN, 50) == outcome::WON {
                        let r = &tt.0.records[f.id as usize];
                        // SAFETY: a read of an aligned word.
                        if w_seq(unsafe { core::ptr::read_volatile(&r.word) }) != f.seq {
                            let mine = |e: u64| e != 0 && entry_rec(e) == f.id && owns(e, word(f.seq, 1, 0, 0, 0));
                            // The sweep may still be removing them: give it 100 ms (only
                            // this thread writes entries, so none is overwritten meanwhile).
                            let since = std::time::Instant::now();
                            let left = || tt.0.buckets.iter().flat_map(|b| b.ways).filter(|&e| mine(e)).count();
                            while left() != 0 && since.elapsed().as_millis() < 100 {
                                thread::yield_now();
                            }
                            assert_eq!(left(), 0, "a swept record's entries stayed behind");
                        }
                    }
                } else if i.is_multiple_of(2) {
                    sweep(&tt, |_, _| true);
                } else {
                    let tu = f.rec.forward();
                    let got = find(&tt, &tu);
                    if got != 0 {
                        let r = tt.record(found_id(got)).unwrap();
                        // SAFETY: a copy checked against the sequence.
                        let copy = unsafe { *r };
                        if still(r, found_seq(got)) {
                            assert_eq!(copy.forward(), tu, "a lookup answered with another flow");
                        }
                    }
                }
            }
            if k == 0 {
                done.store(1, Relaxed);
            }
        });
        consistent(&t);
    }
}
