// SPDX-License-Identifier: MIT OR Apache-2.0
//! ns/packet of each datapath path through BPF_PROG_TEST_RUN (XDP program,
//! repeat 1,000,000, median of several runs), printed as a table and
//! optionally written as JSON (`{"test_run": {path: ns_per_packet}, ...}`).
//!
//! BPF_PROG_TEST_RUN reruns the program on the *same* buffer, so every
//! measured packet is made idempotent under the rewrite it gets: the bench
//! service's backend is the VIP itself (DNAT and reverse NAT write the
//! values already there, doing all the work), and `new_flow` uses a TCP
//! SYN|RST, whose conntrack entry is born closed, so the next repetition's
//! SYN starts a new flow again and takes the whole new-flow path (service
//! lookup, Maglev, two conntrack writes) every time.

use std::{collections::BTreeMap, time::Duration};

use aya::programs::Xdp;
use bpf_tests::{FibEnv, Lb, packet::Pkt, run, svc_key};
use datapath_common::{BACKEND_ACTIVE, CFG_F_KEEP_TTL, Config, PROTO_TCP, SCHED_MAGLEV, SCOPE_EXTERNAL};
use xlb::{MapSizes, ServiceSpec};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 5;
const VIP: &str = "10.0.0.10";
const CLIENT: &str = "192.0.2.100";

/// `XLB_BENCH_ONLY=substring` measures only the paths whose name contains it
/// (for profiling one path); the others are reported as 0.
fn median_ns(name: &str, lb: &mut Lb, prog: &str, input: &[u8], expect: u32) -> f64 {
    if std::env::var("XLB_BENCH_ONLY").is_ok_and(|only| !name.contains(&only)) {
        return 0.0;
    }
    let p: &mut Xdp = lb.dp.program_mut(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let mut runs: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let (ret, _, d) = run(p, input, &mut out, REPEAT).expect("test_run");
            assert_eq!(ret, expect, "{prog}: unexpected verdict");
            d
        })
        .collect();
    runs.sort();
    runs[RUNS / 2].as_nanos() as f64
}

fn spec(id: u32) -> ServiceSpec {
    ServiceSpec { id, scheduler: SCHED_MAGLEV, flags: 0, affinity_timeout_s: 0, backends: vec![1], maglev_size: None }
}

/// One datapath with `services` services; the bench VIP is added last.
fn setup(services: u32) -> Lb {
    let sizes = MapSizes {
        services: 16_384,
        backends: 1024,
        slots: 1 << 23,
        conntrack: 65_536,
        affinity: 1024,
        source_ranges: 16,
    };
    let mut lb = Lb::with_sizes(sizes);
    let cfg = Config { flags: CFG_F_KEEP_TTL, ..Config::default() };
    lb.dp.set_config(&cfg).unwrap();
    lb.backend(1, VIP, 80, BACKEND_ACTIVE, 0);
    lb.backend(2, "10.0.5.5", 8080, BACKEND_ACTIVE, 0);
    for i in 1..services {
        let addr = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        let mut s = spec(i + 1);
        s.backends = vec![2];
        lb.dp.set_service(svc_key(&addr, 80, PROTO_TCP, SCOPE_EXTERNAL), &s).unwrap();
    }
    lb.dp.set_service(svc_key(VIP, 80, PROTO_TCP, SCOPE_EXTERNAL), &spec(1)).unwrap();
    lb
}

const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

fn main() {
    let json = std::env::args().skip_while(|a| a != "--json").nth(1);
    let env = FibEnv::new(&[VIP, CLIENT]);
    let _in = env.enter();
    let syn = Pkt::tcp(CLIENT, 40000, VIP, 80, 0x02).payload(b"").build();
    let ack = Pkt::tcp(CLIENT, 40000, VIP, 80, 0x10).payload(b"").build();
    let synrst = Pkt::tcp(CLIENT, 40001, VIP, 80, 0x06).payload(b"").build();
    let reply = Pkt::tcp(VIP, 80, CLIENT, 40000, 0x10).payload(b"").build();
    let other = Pkt::tcp(CLIENT, 40000, "10.0.9.9", 80, 0x10).payload(b"").build();

    let mut results = BTreeMap::new();
    let only = std::env::var("XLB_BENCH_ONLY").ok();
    for services in [1u32, 10_000] {
        if services > 1 && only.as_ref().is_some_and(|o| !o.contains("10k")) {
            continue;
        }
        let mut lb = setup(services);
        let sfx = if services == 1 { String::new() } else { "_10k_services".to_string() };
        // Open the flow the ct_hit and reverse_nat packets belong to.
        let (v, _) = lb.run(bpf_tests::Prog::Xdp, &syn);
        assert_eq!(v, bpf_tests::Verdict::Redirect);
        if services == 1 {
            results.insert(
                "xdp_tx_baseline".to_string(),
                median_ns("xdp_tx_baseline", &mut lb, "xdp_tx_baseline", &syn, XDP_TX),
            );
            results.insert("pass".to_string(), median_ns("pass", &mut lb, "xlb_xdp", &other, XDP_PASS));
            results
                .insert("reverse_nat".to_string(), median_ns("reverse_nat", &mut lb, "xlb_xdp", &reply, XDP_REDIRECT));
        }
        results
            .insert(format!("ct_hit{sfx}"), median_ns(&format!("ct_hit{sfx}"), &mut lb, "xlb_xdp", &ack, XDP_REDIRECT));
        results.insert(
            format!("new_flow{sfx}"),
            median_ns(&format!("new_flow{sfx}"), &mut lb, "xlb_xdp", &synrst, XDP_REDIRECT),
        );
        let v = lb.verdicts();
        assert!(
            results[&format!("new_flow{sfx}")] == 0.0 || v["new_flow"] >= REPEAT as u64,
            "new_flow took the new-flow path: {v:?}"
        );
    }

    let base = results.get("xdp_tx_baseline").copied().unwrap_or(0.0).max(1.0);
    println!("{:<24} {:>10} {:>12}", "path", "ns/packet", "× baseline");
    for (k, v) in &results {
        println!("{k:<24} {v:>10.1} {:>12.2}", v / base);
    }
    if let Some(file) = json {
        let doc = serde_json::json!({
            "test_run": results,
            "repeat": REPEAT,
            "runs": RUNS,
            "statistic": "median",
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        });
        std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).expect("write JSON");
        println!("wrote {file}");
    }
}
