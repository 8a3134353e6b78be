// SPDX-License-Identifier: MIT OR Apache-2.0
//! A short packet-level demo: three network namespaces (client, node,
//! server), xlb's XDP program on the node, a ClusterIP-style VIP with two
//! backends, and real TCP connections through it. Prints who answered and
//! the datapath's counters, then removes everything.

use std::{collections::BTreeMap, net::SocketAddr};

use bpf_tests::{Lb, svc_key, topo::Topology};
use datapath_common::{BACKEND_ACTIVE, PROTO_TCP, SCHED_MAGLEV, SCOPE_EXTERNAL};
use xlb::ServiceSpec;

const VIP: &str = "10.96.0.10";
const BACKENDS: [&str; 2] = ["172.31.2.2", "172.31.2.3"];
const REQUESTS: usize = 12;

fn main() {
    println!("xlb demo: client ns → node ns (xlb XDP on n0, n1) → server ns");
    let topo = Topology::new();
    topo.server.exec(&["ip", "addr", "add", "172.31.2.3/24", "dev", "s0"]);
    let mut lb = Lb::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        lb.backend(i as u32 + 1, b, 8080, BACKEND_ACTIVE, 0);
    }
    let spec = ServiceSpec {
        id: 1,
        scheduler: SCHED_MAGLEV,
        flags: 0,
        affinity_timeout_s: 0,
        backends: vec![1, 2],
        maglev_size: None,
    };
    lb.dp.set_service(svc_key(VIP, 80, PROTO_TCP, SCOPE_EXTERNAL), &spec).expect("program the service");
    topo.attach_xdp(&mut lb);
    println!("service {VIP}:80/TCP → {}:8080, {}:8080 (Maglev)", BACKENDS[0], BACKENDS[1]);

    let servers: Vec<_> =
        BACKENDS.iter().map(|b| topo.serve(SocketAddr::new(b.parse().unwrap(), 8080), REQUESTS)).collect();
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        let reply = topo.request(SocketAddr::new(VIP.parse().unwrap(), 80)).expect("request through the VIP");
        println!("  request {:>2}: {reply}", i + 1);
        let backend = reply.rsplit(' ').next().unwrap_or("?").to_string();
        *answered.entry(backend).or_default() += 1;
    }
    println!("spread over backends:");
    for (b, n) in &answered {
        println!("  {b:<20} {n:>3} {}", "#".repeat(*n));
    }
    println!("datapath verdict counters:");
    for (name, n) in lb.verdicts() {
        if n > 0 {
            println!("  {name:<20} {n:>6}");
        }
    }
    // The servers still wait for connections that will not come: leave them.
    drop(servers);
    println!("done; namespaces removed");
}
