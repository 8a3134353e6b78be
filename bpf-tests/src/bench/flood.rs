// SPDX-License-Identifier: MIT OR Apache-2.0
//! The SYN flood of issue #13, through BPF_PROG_TEST_RUN on the XDP
//! program (live frames are refused on the CI kernel): `established`
//! connections to an external Maglev service with four remote backends are
//! opened and answered, then `syns` SYNs from random sources flood it, then
//! every established connection sends again. Its packet is *lost* when it
//! finds no conntrack entry (no `ct_hit`: the table evicted it), and
//! the connection *broken* when the packet is not translated exactly as
//! before the flood (dropped, or another backend or SNAT port: the server
//! would answer with a RST). Last, `fresh` new connections (SYN, then ACK)
//! are opened: one succeeds when both come out translated the same way.
//!
//! Two runs: without SNAT (the flood fills the table: what eviction does),
//! and with SNAT (external traffic to remote backends: each flow holds a
//! node port toward its backend, so the flood exhausts the ports first).
//! The conntrack table never evicts an established flow, so nothing is
//! lost or broken (`tests/conntrack.rs` asserts it at full size); before the
//! table, the LRU hash lost half of them without SNAT and all with SNAT
//! (`docs/design/conntrack-v2.md`).
//! `ns_per_syn_full` is the datapath's own time per SYN (the kernel's
//! test-run clock, one packet per run) once the table is full.

use std::collections::BTreeMap;

use aya::programs::Xdp;
use datapath_common::{BACKEND_ACTIVE, CFG_F_KEEP_TTL, Config, PROTO_TCP, SCHED_MAGLEV, SCOPE_EXTERNAL};
use serde::Serialize;
use xlb::{MapSizes, ServiceSpec};

use crate::{
    FibEnv, Lb, Prog, Verdict, addr16,
    fuzz::mutate::Rng,
    packet::{ACK, Pkt, SYN},
    run, svc_key,
};

const VIP: &str = "10.0.0.10";
const CLIENT: &str = "192.0.2.100";
const NODE: &str = "10.0.0.1";

#[derive(Clone, Debug, Serialize)]
pub struct Flood {
    pub snat: bool,
    /// Conntrack entries (`--conntrack-size`: two per flow).
    pub table_entries: u32,
    pub established: u32,
    pub syns: u64,
    /// Established connections whose next packet found no entry (no ct_hit).
    pub lost: u32,
    /// Established connections whose next packet was not translated as before.
    pub broken: u32,
    pub fresh: u32,
    pub fresh_ok: u32,
    /// ns per SYN in the datapath with the table full (median of 1,000-SYN blocks).
    pub ns_per_syn_full: f64,
    /// Verdict counts over the whole run.
    pub verdicts: BTreeMap<&'static str, u64>,
}

pub fn measure(snat: bool, table_entries: u32, established: u32, syns: u64, fresh: u32) -> Flood {
    let env = FibEnv::new(&[VIP, CLIENT]);
    let _in = env.enter();
    let sizes = MapSizes {
        services: 64,
        backends: 64,
        slots: 64 * 256,
        conntrack: table_entries,
        affinity: 64,
        source_ranges: 16,
        fragments: 64,
        sock_rev: 64,
    };
    let mut lb = Lb::with_sizes(sizes);
    lb.load(Prog::Xdp);
    let cfg = Config {
        flags: CFG_F_KEEP_TTL,
        snat_v4: addr16(NODE),
        snat_port_min: if snat { 1024 } else { 0 },
        snat_port_max: if snat { 65535 } else { 0 },
        ..Config::default()
    };
    lb.dp.set_config(&cfg).unwrap();
    // Four backends at the VIP's address (routable in the test-run
    // namespace), remote ones of an external frontend: SNATed when SNAT is on.
    for id in 1..=4 {
        lb.backend(id, VIP, 8079 + id as u16, BACKEND_ACTIVE, 0);
    }
    let spec = ServiceSpec {
        id: 1,
        scheduler: SCHED_MAGLEV,
        flags: 0,
        affinity_timeout_s: 0,
        backends: vec![1, 2, 3, 4],
        weights: Vec::new(),
        maglev_size: None,
    };
    lb.dp.set_service(svc_key(VIP, 80, PROTO_TCP, SCOPE_EXTERNAL), &spec).unwrap();

    // Open and answer the established connections; keep their translation.
    let conn = |i: u32, flags| Pkt::tcp(CLIENT, 20_000 + i as u16, VIP, 80, flags).build();
    let mut before = Vec::with_capacity(established as usize);
    for i in 0..established {
        let (v, _) = lb.run(Prog::Xdp, &conn(i, SYN));
        assert_eq!(v, Verdict::Redirect, "connection {i}: SYN");
        let (v, out) = lb.run(Prog::Xdp, &conn(i, ACK));
        assert_eq!(v, Verdict::Redirect, "connection {i}: ACK");
        before.push(out);
    }

    // The flood: SYNs from random sources, timed in blocks once the table is full.
    // The fuzzer's generator: the same sources every run, so runs compare.
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let p: &Xdp = lb.dp.program("xlb_xdp").unwrap().try_into().unwrap();
    let mut out = vec![0u8; 256];
    let mut blocks = Vec::new();
    let (mut block_ns, mut in_block) = (0u128, 0u32);
    let full_after = table_entries as u64 / 2;
    for n in 0..syns {
        let r = rng.next_u64();
        let src = format!("198.18.{}.{}", (r >> 8) as u8, r as u8);
        let syn = Pkt::tcp(&src, 1024 + (r >> 16) as u16 % 60_000, VIP, 80, SYN).build();
        let (_, _, d) = run(p, &syn, &mut out, 1).expect("test_run");
        if n >= full_after {
            block_ns += d.as_nanos();
            in_block += 1;
            if in_block == 1000 {
                blocks.push(block_ns as f64 / 1000.0);
                (block_ns, in_block) = (0, 0);
            }
        }
    }
    blocks.sort_by(f64::total_cmp);
    let ns_per_syn_full = blocks.get(blocks.len() / 2).copied().unwrap_or(0.0);

    // Every established connection sends again.
    let (mut lost, mut broken) = (0, 0);
    for i in 0..established {
        let hits = lb.verdict("ct_hit");
        let (v, out) = lb.run(Prog::Xdp, &conn(i, ACK));
        lost += (lb.verdict("ct_hit") == hits) as u32;
        broken += (v != Verdict::Redirect || out != before[i as usize]) as u32;
    }

    // New connections after the flood.
    let fresh_ok = (0..fresh)
        .filter(|&i| {
            let c = |flags| Pkt::tcp(CLIENT, 40_000 + i as u16, VIP, 80, flags).build();
            let (v1, o1) = lb.run(Prog::Xdp, &c(SYN));
            let (v2, o2) = lb.run(Prog::Xdp, &c(ACK));
            // Same translation: same addresses and ports (bytes 26..38 of the frame).
            v1 == Verdict::Redirect && v2 == Verdict::Redirect && o1.get(26..38) == o2.get(26..38)
        })
        .count() as u32;

    let verdicts = lb.verdicts().into_iter().filter(|(_, n)| *n > 0).collect();
    Flood { snat, table_entries, established, syns, lost, broken, fresh, fresh_ok, ns_per_syn_full, verdicts }
}
