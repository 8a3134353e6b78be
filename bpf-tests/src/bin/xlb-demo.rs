// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask demo`: a two-node cluster in network namespaces running the
//! real `xlb agent` on each node, fed `manifests/examples/` (a ClusterIP, a
//! NodePort, a LoadBalancer and an externalIPs Service over four pods).
//! Sends real TCP requests through each, prints how they spread and an
//! `xlb dump services` table, then removes everything.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Instant};

use bpf_tests::{
    NetNs,
    cluster::{Cluster, EXTERNAL4, node_addr4, sa, tcp_request},
};

const REQUESTS: usize = 24;

struct Progress {
    started: Instant,
    step: usize,
    steps: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.step += 1;
        println!("[{}/{}] {what} ({:.1}s)", self.step, self.steps, self.started.elapsed().as_secs_f64());
    }
}

/// Sends REQUESTS connections and prints who answered and whom they saw.
fn spread(label: &str, from: &NetNs, to: SocketAddr) {
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    let mut clients: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        match tcp_request(from, to, &format!("demo {i}")) {
            Ok((pod, client)) => {
                *pods.entry(pod).or_default() += 1;
                let ip = client.rsplit_once(':').map(|(a, _)| a.to_string()).unwrap_or(client);
                *clients.entry(ip).or_default() += 1;
            }
            Err(e) => *pods.entry(format!("error: {e}")).or_default() += 1,
        }
    }
    println!("  {label:<44} → {to}");
    for (pod, n) in &pods {
        println!("      {pod:<10} {n:>3} {}", "#".repeat(*n));
    }
    let seen: Vec<String> = clients.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
    println!("      backends saw the client as: {}", seen.join(", "));
}

fn main() {
    let mut p = Progress { started: Instant::now(), step: 0, steps: 5 };
    println!("xlb demo: 2 nodes, 4 backend pods, a client pod and an external client, in network namespaces");
    p.step("building the cluster: underlay bridge, nodes, pods, echo servers");
    let mut c = Cluster::new(2, &[9376]);
    for (name, node) in [("web-1a", 1), ("web-1b", 1), ("web-2a", 2), ("web-2b", 2)] {
        c.add_pod(name, node, "web");
    }
    c.add_pod("client", 1, "");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    for e in std::fs::read_dir(&examples).expect("manifests/examples").flatten() {
        std::fs::copy(e.path(), c.manifests().join(e.file_name())).expect("copy an example");
    }
    p.step("starting `xlb agent --manifests manifests/examples` on each node");
    c.start_agents(&[]);

    p.step("sending requests");
    let client = &c.pod("client").ns;
    spread("ClusterIP demo/web from the client pod", client, sa("10.96.0.10", 80));
    spread("NodePort 30036 on node-1 from outside", &c.external, sa(&node_addr4(1), 30036));
    spread("NodePort 30036 on node-2 from outside", &c.external, sa(&node_addr4(2), 30036));
    spread("LoadBalancer demo/example-service from outside", &c.external, sa("198.51.100.10", 8765));
    spread("externalIP demo/web-external from outside", &c.external, sa("80.11.12.10", 80));
    println!(
        "  (from outside, a backend on the receiving node sees the client {EXTERNAL4}; one on the other node sees \
         the receiving node's address: SNAT, externalTrafficPolicy Cluster)"
    );

    p.step("`xlb dump services` on node-1");
    print!("{}", c.dump(1, &["services"]));

    p.step("tearing down");
    drop(c);
    println!("done in {:.1}s; namespaces, agents, pins removed", p.started.elapsed().as_secs_f64());
}
