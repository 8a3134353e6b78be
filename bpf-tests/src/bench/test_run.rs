// SPDX-License-Identifier: MIT OR Apache-2.0
//! ns/packet of each datapath path through BPF_PROG_TEST_RUN (the XDP
//! program, `repeat` times, median of several runs), at each number of
//! services.
//!
//! BPF_PROG_TEST_RUN reruns the program on the *same* buffer, so every
//! measured packet is made idempotent under the rewrite it gets: the bench
//! service's backend is the VIP itself (DNAT and reverse NAT write the
//! values already there, doing all the work), and `new_flow` uses a TCP
//! SYN|RST, whose conntrack entry is born closed, so the next repetition's
//! SYN starts a new flow again and takes the whole new-flow path (service
//! lookup, Maglev, two conntrack writes) every time; `new_flow_fib_lookup`
//! is that path with the next-hop cache off (a FIB lookup per new flow);
//! `new_flow_<scheduler>` the path under each scheduler (IPVS names) over
//! four backends weighted 3:1:1:1.
//! `ct_table_*` and `ct_lru_*` are the conntrack work alone (lookup, and
//! refresh or insert), in the set-associative table and in the LRU hash.

use std::{collections::BTreeMap, time::Duration};

use crate::{FibEnv, Lb, packet::Pkt, run, svc_key};
use aya::programs::Xdp;
use datapath_common::{
    BACKEND_ACTIVE, CFG_F_KEEP_TTL, CFG_F_NO_NEXT_HOP_CACHE, Config, PROTO_TCP, SCHED_LEAST_CONN, SCHED_MAGLEV,
    SCHED_RANDOM, SCHED_ROUND_ROBIN, SCHED_SOURCE_HASH, SCHED_WEIGHTED_LC, SCHED_WEIGHTED_RR, SCOPE_EXTERNAL, ct,
    ct_table,
};
use std::os::fd::AsFd as _;
use xlb::ct_table::MappedTable;
use xlb::{MapSizes, ServiceSpec};

const RUNS: usize = 5;
const VIP: &str = "10.0.0.10";
const CLIENT: &str = "192.0.2.100";

/// `XLB_BENCH_ONLY=substring` measures only the paths whose name contains it
/// (for profiling one path); the others are reported as 0.
fn median_ns(name: &str, lb: &mut Lb, prog: &str, input: &[u8], expect: u32, repeat: u32) -> f64 {
    let p: &mut Xdp = lb.dp.program_mut(prog).unwrap().try_into().unwrap();
    median_of(name, p, input, expect, repeat)
}

fn median_of(name: &str, p: &mut Xdp, input: &[u8], expect: u32, repeat: u32) -> f64 {
    if std::env::var("XLB_BENCH_ONLY").is_ok_and(|only| !name.contains(&only)) {
        return 0.0;
    }
    let mut out = vec![0u8; input.len() + 256];
    let mut runs: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let (ret, _, d) = run(p, input, &mut out, repeat).expect("test_run");
            assert_eq!(ret, expect, "{name}: unexpected verdict");
            d
        })
        .collect();
    runs.sort();
    runs[RUNS / 2].as_nanos() as f64
}

/// The conntrack work alone, per table (the bench object's `ct_table_probe`
/// and `ct_lru_probe`): `ct_table_hit`, `ct_table_new_flow`, `ct_lru_hit`,
/// `ct_lru_new_flow`. Then what the kernel wrote is read back through the
/// host's side of the table (`xlb::ct_table`): the flow's record,
/// established, counted once for its backend.
fn conntrack_tables(results: &mut BTreeMap<String, f64>, syn: &[u8], ack: &[u8], synrst: &[u8], repeat: u32) {
    let mut obj = aya::Ebpf::load(xlb::pktgen::BENCH_OBJECT).expect("load the bench object");
    for (table, prog) in [("ct_table", "ct_table_probe"), ("ct_lru", "ct_lru_probe")] {
        let p: &mut Xdp = obj.program_mut(prog).unwrap().try_into().unwrap();
        p.load().expect("the verifier takes the probe");
        let mut out = vec![0u8; syn.len() + 256];
        assert_eq!(run(p, syn, &mut out, 1).expect("test_run").0, XDP_TX, "{prog}: the SYN is tracked");
        results.insert(format!("{table}_hit"), median_of(&format!("{table}_hit"), p, ack, XDP_TX, repeat));
        results.insert(format!("{table}_new_flow"), median_of(&format!("{table}_new_flow"), p, synrst, XDP_TX, repeat));
    }
    // What the kernel wrote, through the agent's mapping of the same arrays.
    let fd = |name: &str| match obj.map(name) {
        Some(aya::maps::Map::Array(d)) => d.fd().as_fd(),
        _ => panic!("no array {name}"),
    };
    // The bucket count from the index's size (3 buckets per forward bucket).
    let nb = match obj.map("CT_PROBE_INDEX") {
        Some(aya::maps::Map::Array(d)) => d.info().expect("map info").max_entries() / 3,
        _ => panic!("no CT_PROBE_INDEX"),
    };
    let table = MappedTable::<[u8; 4]>::map(nb, fd("CT_PROBE_INDEX"), fd("CT_PROBE_RECORDS"), fd("CT_PROBE_CONNS"), 64)
        .expect("the probe's table maps");
    let live = table.records();
    let (id, flow) = *live.iter().find(|(_, r)| r.cport == 40000u16.to_be()).expect("the ACKed flow's record");
    assert_eq!(ct_table::w_state(flow.word), ct::STATE_ESTABLISHED, "{flow:?}");
    assert_eq!(live.len(), 2, "one record per flow (the ACKed one, the SYN|RST one): {live:?}");
    assert_eq!(table.connections(1), 1, "one established connection to backend 1");
    // The agent unlinks every record; the kernel's next ACK finds none and
    // tracks the flow anew (a new record), counted once again.
    assert_eq!(table.sweep(|_, _| true), 2);
    assert_eq!((table.records().len(), table.connections(1)), (0, 0));
    let p: &mut Xdp = obj.program_mut("ct_table_probe").unwrap().try_into().unwrap();
    let mut out = vec![0u8; ack.len() + 256];
    assert_eq!(run(p, ack, &mut out, 1).expect("test_run").0, XDP_TX);
    let again = table.records();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!((again[0].0, again[0].1.word as u32), (id, flow.word as u32), "a new record, not the swept one");
    assert_eq!(table.connections(1), 1);
}

fn spec(id: u32) -> ServiceSpec {
    ServiceSpec {
        id,
        scheduler: SCHED_MAGLEV,
        flags: 0,
        affinity_timeout_s: 0,
        backends: vec![1],
        weights: Vec::new(),
        maglev_size: None,
    }
}

/// One datapath with `services` services; the bench VIP is added last.
fn setup(services: u32) -> Lb {
    let sizes = MapSizes {
        services: services + 64,
        backends: 1024,
        slots: (services + 64) * 256,
        conntrack: 65_536,
        affinity: 1024,
        source_ranges: 16,
        fragments: 1024,
        sock_rev: 1024,
    };
    let mut lb = Lb::with_sizes(sizes);
    lb.load_all();
    let cfg = Config { flags: CFG_F_KEEP_TTL, ..Config::default() };
    lb.dp.set_config(&cfg).unwrap();
    lb.backend(1, VIP, 80, BACKEND_ACTIVE, 0);
    lb.backend(2, "10.0.5.5", 8080, BACKEND_ACTIVE, 0);
    // More copies of backend 1, for the per-scheduler new-flow paths.
    for id in 3..=5 {
        lb.backend(id, VIP, 80, BACKEND_ACTIVE, 0);
    }
    for i in 1..services {
        let addr = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        let mut s = spec(i + 1);
        s.backends = vec![2];
        lb.dp.set_service(svc_key(&addr, 80, PROTO_TCP, SCOPE_EXTERNAL), &s).unwrap();
    }
    lb.dp.set_service(svc_key(VIP, 80, PROTO_TCP, SCOPE_EXTERNAL), &spec(1)).unwrap();
    lb
}

/// The scheduler set (issue #14), by IPVS name.
const SCHEDULERS: [(&str, u8); 7] = [
    ("rr", SCHED_ROUND_ROBIN),
    ("wrr", SCHED_WEIGHTED_RR),
    ("lc", SCHED_LEAST_CONN),
    ("wlc", SCHED_WEIGHTED_LC),
    ("sh", SCHED_SOURCE_HASH),
    ("mh", SCHED_MAGLEV),
    ("random", SCHED_RANDOM),
];

const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// `<path>` → ns/packet at 1 service; `<path>_<N>_services` at the others.
pub fn measure(sizes: &[u32], repeat: u32) -> BTreeMap<String, f64> {
    let env = FibEnv::new(&[VIP, CLIENT]);
    let _in = env.enter();
    let syn = Pkt::tcp(CLIENT, 40000, VIP, 80, 0x02).payload(b"").build();
    let ack = Pkt::tcp(CLIENT, 40000, VIP, 80, 0x10).payload(b"").build();
    let synrst = Pkt::tcp(CLIENT, 40001, VIP, 80, 0x06).payload(b"").build();
    let reply = Pkt::tcp(VIP, 80, CLIENT, 40000, 0x10).payload(b"").build();
    let other = Pkt::tcp(CLIENT, 40000, "10.0.9.9", 80, 0x10).payload(b"").build();

    let mut results = BTreeMap::new();
    conntrack_tables(&mut results, &syn, &ack, &synrst, repeat);
    for &services in sizes {
        let mut lb = setup(services);
        let sfx = if services == 1 { String::new() } else { format!("_{services}_services") };
        // Open the flow the ct_hit and reverse_nat packets belong to.
        let (v, _) = lb.run(crate::Prog::Xdp, &syn);
        assert_eq!(v, crate::Verdict::Redirect);
        let mut m = |lb: &mut Lb, path: &str, prog: &str, input: &[u8], expect: u32| {
            let name = format!("{path}{sfx}");
            let ns = median_ns(&name, lb, prog, input, expect, repeat);
            results.insert(name, ns);
        };
        if services == 1 {
            m(&mut lb, "xdp_tx_baseline", "xdp_tx_baseline", &syn, XDP_TX);
            m(&mut lb, "pass", "xlb_xdp", &other, XDP_PASS);
            m(&mut lb, "reverse_nat", "xlb_xdp", &reply, XDP_REDIRECT);
        }
        m(&mut lb, "ct_hit", "xlb_xdp", &ack, XDP_REDIRECT);
        m(&mut lb, "new_flow", "xlb_xdp", &synrst, XDP_REDIRECT);
        // The new-flow path per scheduler: the bench VIP over four
        // backends weighted 3:1:1:1 (all the VIP itself, so the rewrite is
        // idempotent); `new_flow_<ipvs name>`.
        for (name, scheduler) in SCHEDULERS {
            let spec = ServiceSpec { scheduler, backends: vec![1, 3, 4, 5], weights: vec![3, 1, 1, 1], ..spec(1) };
            lb.dp.set_service(svc_key(VIP, 80, PROTO_TCP, SCOPE_EXTERNAL), &spec).unwrap();
            m(&mut lb, &format!("new_flow_{name}"), "xlb_xdp", &synrst, XDP_REDIRECT);
        }
        lb.dp.set_service(svc_key(VIP, 80, PROTO_TCP, SCOPE_EXTERNAL), &spec(1)).unwrap();
        if services == 1 {
            // The same path with a FIB lookup per new flow (the next-hop
            // cache off, as under source-selecting ip rules).
            let cfg = lb.dp.config().unwrap();
            lb.dp.set_config(&Config { flags: cfg.flags | CFG_F_NO_NEXT_HOP_CACHE, ..cfg }).unwrap();
            m(&mut lb, "new_flow_fib_lookup", "xlb_xdp", &synrst, XDP_REDIRECT);
            lb.dp.set_config(&cfg).unwrap();
        }
        let v = lb.verdicts();
        assert!(
            results[&format!("new_flow{sfx}")] == 0.0 || v["new_flow"] >= repeat as u64,
            "new_flow took the new-flow path: {v:?}"
        );
    }
    results
}
