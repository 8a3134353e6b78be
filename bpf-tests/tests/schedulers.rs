// SPDX-License-Identifier: MIT OR Apache-2.0
//! The scheduler set of issue #14 in the kernel, through BPF_PROG_TEST_RUN:
//! weighted shares (`wrr`, weighted Maglev, weighted `random`, `wlc` with
//! no connection open), source hashing across ports and protocols, and
//! least-connection against the live counts of BACKEND_CONNS. Each test
//! names the IPVS scheduler (`net/netfilter/ipvs/ip_vs_*.c`) whose
//! behaviour it mirrors; the real-connection counterparts are in `e2e.rs`.

use std::collections::BTreeMap;

use bpf_tests::{
    NEIGH_MAC, OUT_MAC, Prog, Verdict,
    fixtures::*,
    packet::{ACK, FIN, Pkt, SYN},
    svc_key,
};
use datapath_common::{
    PROTO_TCP, PROTO_UDP, SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_RANDOM, SCHED_SOURCE_HASH, SCHED_WEIGHTED_LC,
    SCHED_WEIGHTED_RR, SCOPE_EXTERNAL,
};
use xlb::ServiceSpec;

/// Programs VIP4:`port` (TCP and UDP, external scope) with `scheduler`
/// over `list` with `weights` (empty: equal), as the writer does.
fn program(w: &mut World, port: u16, scheduler: u8, list: &[u32], weights: &[u16]) {
    for (i, proto) in [PROTO_TCP, PROTO_UDP].into_iter().enumerate() {
        let spec = ServiceSpec {
            id: 10 + (port as u32 - 80) * 2 + i as u32,
            scheduler,
            flags: 0,
            affinity_timeout_s: 0,
            backends: list.to_vec(),
            weights: xlb::sequence::reduce(weights),
            maglev_size: None,
        };
        w.lb.dp.set_service(svc_key(VIP4, port, proto, SCOPE_EXTERNAL), &spec).expect("set service");
    }
}

/// The backend (1..=4) a forwarded IPv4 packet was sent to.
fn backend_of(v: Verdict, out: &[u8]) -> u32 {
    assert_eq!(v, Verdict::Redirect, "forwarded");
    assert_eq!(out[30..33], [10, 0, 1], "to a backend");
    out[33] as u32 - 10
}

/// The backend a new TCP flow from `client:port` to VIP4:80 goes to.
fn syn(w: &mut World, client: &str, port: u16) -> u32 {
    let (v, out) = w.lb.run(Prog::Xdp, &Pkt::tcp(client, port, VIP4, 80, SYN).build());
    backend_of(v, &out)
}

/// Shares of `n` new flows (distinct source ports) per backend.
fn shares(w: &mut World, n: u16) -> BTreeMap<u32, f64> {
    let mut count: BTreeMap<u32, u32> = BTreeMap::new();
    for port in 0..n {
        *count.entry(syn(w, CLIENT4, 10_000 + port)).or_default() += 1;
    }
    count.into_iter().map(|(b, c)| (b, c as f64 / n as f64)).collect()
}

/// `wrr` (ip_vs_wrr.c), weighted Maglev (ip_vs_mh.c's weighted
/// population; Katran's MaglevHashV2), weighted `random` and `wlc` with no
/// connection open (a tie of zeros keeps the first candidate, drawn by
/// weight; IPVS wlc keeps the first dest of its list): weights 3:1:1 give
/// each backend its share of new flows within ±5 % of it (relative). The
/// round-robin cursor is exact per cycle (4,000 flows); Maglev hashes fixed
/// source ports (deterministic: 20,000 flows); the random draws get 50,000
/// flows, so ±5 % is 5.6 σ of their noise.
#[test]
fn weighted_schedulers_spread_new_flows_by_the_weights() {
    for (name, scheduler, n) in [
        ("wrr", SCHED_WEIGHTED_RR, 4000),
        ("mh", SCHED_MAGLEV, 20_000),
        ("random", SCHED_RANDOM, 50_000),
        ("wlc", SCHED_WEIGHTED_LC, 50_000),
    ] {
        let mut w = world();
        let _in = w.env.enter();
        program(&mut w, 80, scheduler, &[1, 2, 3], &[3, 1, 1]);
        let s = shares(&mut w, n);
        eprintln!("{name} 3:1:1 over {n} new flows: {s:.4?}");
        for (b, want) in [(1, 0.6), (2, 0.2), (3, 0.2)] {
            let got = s.get(&b).copied().unwrap_or(0.0);
            assert!((got / want - 1.0).abs() <= 0.05, "{name}: backend {b} has {got:.4} of new flows, wants {want}");
        }
    }
}

/// `sh` (ip_vs_sh.c, keyed by the client address alone): one client's flows
/// from 20 source ports, over TCP and UDP, to two ports of the Service all
/// reach one backend; different clients spread over the backends.
#[test]
fn source_hash_keeps_a_client_on_one_backend_across_ports_and_protocols() {
    let mut w = world();
    let _in = w.env.enter();
    for port in [80, 81] {
        program(&mut w, port, SCHED_SOURCE_HASH, &[1, 2, 3, 4], &[]);
    }
    let mut seen = std::collections::BTreeSet::new();
    for sport in 0..20u16 {
        for dport in [80, 81] {
            let tcp = Pkt::tcp(CLIENT4, 30_000 + sport, VIP4, dport, SYN).build();
            let udp = Pkt::udp(CLIENT4, 30_000 + sport, VIP4, dport).build();
            for p in [tcp, udp] {
                let (v, out) = w.lb.run(Prog::Xdp, &p);
                seen.insert(backend_of(v, &out));
            }
        }
    }
    assert_eq!(seen.len(), 1, "80 flows of one client reach one backend: {seen:?}");
    let mut per: BTreeMap<u32, u32> = BTreeMap::new();
    for c in 0..64u8 {
        *per.entry(syn(&mut w, &format!("198.51.100.{}", c + 1), 40_000)).or_default() += 1;
    }
    eprintln!("64 clients over 4 backends: {per:?}");
    assert_eq!(per.len(), 4, "every backend gets clients: {per:?}");
    assert!(per.values().all(|n| *n <= 32), "no backend gets half the clients: {per:?}");
}

/// Opens a TCP connection from `CLIENT4:port` through the datapath: the
/// SYN, the backend's SYN-ACK (now an active connection), the ACK.
/// Returns its backend.
fn open(w: &mut World, port: u16) -> u32 {
    let b = syn(w, CLIENT4, port);
    let synack = Pkt::tcp(&backend_addr(b), 8080, CLIENT4, port, SYN | ACK).macs(NEIGH_MAC, OUT_MAC);
    w.lb.run(Prog::Xdp, &synack.build());
    w.lb.run(Prog::Xdp, &Pkt::tcp(CLIENT4, port, VIP4, 80, ACK).build());
    b
}

/// Closes the connection of [`open`]: a FIN each way.
fn close(w: &mut World, port: u16, b: u32) {
    w.lb.run(Prog::Xdp, &Pkt::tcp(CLIENT4, port, VIP4, 80, FIN | ACK).build());
    let fin = Pkt::tcp(&backend_addr(b), 8080, CLIENT4, port, FIN | ACK).macs(NEIGH_MAC, OUT_MAC);
    w.lb.run(Prog::Xdp, &fin.build());
}

fn connections(w: &World, b: u32) -> u64 {
    w.lb.dp.conntrack_table().connections(b)
}

/// `lc` and `wlc` (ip_vs_lc.c, ip_vs_wlc.c): backend 1 holds 50 long-lived
/// connections (it was the only backend; 2 and 3 joined since); of the
/// next 100 short connections at least 90 % go to the others (here all:
/// the two candidates are distinct, so the loaded one always loses).
/// `wlc` the same with backend 1 the heaviest (3:1:1): 50 per 3 still
/// loses to nothing per 1.
#[test]
fn least_connection_sends_new_connections_away_from_the_loaded_backend() {
    for (name, scheduler, weights) in [("lc", SCHED_LEAST_CONN, vec![]), ("wlc", SCHED_WEIGHTED_LC, vec![3u16, 1, 1])] {
        let mut w = world();
        let _in = w.env.enter();
        program(&mut w, 80, scheduler, &[1], &[]);
        for port in 0..50 {
            assert_eq!(open(&mut w, 20_000 + port), 1);
        }
        assert_eq!(connections(&w, 1), 50);
        program(&mut w, 80, scheduler, &[1, 2, 3], &weights);
        let mut per: BTreeMap<u32, u32> = BTreeMap::new();
        for port in 0..100 {
            let b = open(&mut w, 30_000 + port);
            close(&mut w, 30_000 + port, b);
            *per.entry(b).or_default() += 1;
        }
        eprintln!("{name}: 100 short connections with 50 open on backend 1: {per:?}");
        // The issue asks ≥ 90 %; distinct candidates give all of them (drawn
        // with replacement, 1 in 9 would go to backend 1).
        assert_eq!(per.get(&1), None, "{name}: {per:?}");
        assert!(per.contains_key(&2) && per.contains_key(&3), "{name}: {per:?}");
        assert_eq!(connections(&w, 1), 50, "the long-lived ones are still counted");
    }
}

/// Why two choices (the issue's "justify the choice with the balance
/// figures"): 400 long-lived connections opened one after the other over
/// 4 backends. `random` leaves the counts as a binomial draw (σ ≈ 8.7 per
/// backend, a spread of tens); `lc`'s two distinct candidates keep every
/// count within a few of the mean (Mitzenmacher's power of two choices);
/// `wlc` 3:1:1:1 keeps counts ∝ weights.
#[test]
fn least_connection_keeps_long_lived_connections_balanced() {
    let mut spread = BTreeMap::new();
    for (name, scheduler, weights) in [
        ("random", SCHED_RANDOM, vec![]),
        ("lc", SCHED_LEAST_CONN, vec![]),
        ("wlc", SCHED_WEIGHTED_LC, vec![3u16, 1, 1, 1]),
    ] {
        let mut w = world();
        let _in = w.env.enter();
        program(&mut w, 80, scheduler, &[1, 2, 3, 4], &weights);
        for port in 0..400 {
            open(&mut w, 20_000 + port);
        }
        let counts: Vec<u64> = (1..=4).map(|b| connections(&w, b)).collect();
        assert_eq!(counts.iter().sum::<u64>(), 400);
        // Connections per unit of weight.
        let w8: Vec<u64> = if weights.is_empty() { vec![1; 4] } else { weights.iter().map(|w| *w as u64).collect() };
        let per: Vec<f64> = counts.iter().zip(&w8).map(|(c, w)| *c as f64 / *w as f64).collect();
        let max = per.iter().cloned().fold(f64::MIN, f64::max);
        let min = per.iter().cloned().fold(f64::MAX, f64::min);
        eprintln!(
            "{name}: 400 long-lived connections over 4 backends: {counts:?}, max − min per weight {:.1}",
            max - min
        );
        spread.insert(name, max - min);
    }
    // Typically 0–2; above 3 in under 1 % of runs (simulated), never near
    // random's tens.
    assert!(spread["lc"] <= 6.0, "lc: {spread:?}");
    assert!(spread["wlc"] <= 6.0, "wlc: {spread:?}");
}

/// Pins the calling thread to CPU 0, so the per-CPU round-robin cursor the
/// test reads is the one the datapath steps.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

/// The host mirror (`xlb::select::pick`, behind `xlb dump explain`) walks
/// the weighted sequence as the datapath does: on one CPU, a fresh `wrr`
/// service's cursor starts at 0, and the i-th new flow lands where the
/// mirror says for draw i (3:1:1 interleaved: 1 1 2 3 1, twice).
#[test]
fn the_host_mirror_walks_the_weighted_sequence_as_the_datapath() {
    pin_to_cpu0();
    let mut w = world();
    let _in = w.env.enter();
    program(&mut w, 80, SCHED_WEIGHTED_RR, &[1, 2, 3], &[3, 1, 1]);
    let key = svc_key(VIP4, 80, PROTO_TCP, SCOPE_EXTERNAL);
    let svc = w.lb.dp.service(&key).unwrap();
    let slots = w.lb.dp.region_slots(&svc).unwrap();
    let mut landed = Vec::new();
    for i in 0..10u16 {
        let saddr = bpf_tests::addr16(CLIENT4);
        let flow =
            xlb::select::Flow { saddr: &saddr, sport: (20_000 + i).to_be(), dport: 80u16.to_be(), proto: PROTO_TCP };
        let predicted = xlb::select::pick(&svc, &slots, flow, [i as u32, 0, 0], |_| 0).backend().unwrap();
        let b = syn(&mut w, CLIENT4, 20_000 + i);
        assert_eq!(b, predicted, "flow {i}");
        landed.push(b);
    }
    assert_eq!(landed, [1, 1, 2, 3, 1, 1, 1, 2, 3, 1]);
}
