// SPDX-License-Identifier: MIT OR Apache-2.0
//! Bulk TCP from a pod, with the kernel's offloads on (TSO/GSO: the pod
//! hands its veth 64 KiB segments): to a ClusterIP through xlb's TC
//! programs, and in the same run straight to the backend pod's address
//! (the floor: the same hops, with xlb attached but no service involved).
//!
//! ```text
//!   pod ns                  node ns (xlb_tc_ingress on p1 and p2)     backend ns
//!   c0 10.97.1.2 ──veth── p1 10.97.1.1 | p2 10.97.2.1 ──veth── s0 10.97.2.2
//!      fd97:1::2             fd97:1::1   | fd97:2::1                 fd97:2::2
//! ```
//! The ClusterIP 10.96.0.10:80 / fd96::10:80 leads to the backend's :8080.
//! The verdict counters show whether the stream stayed on xlb's path
//! (conntrack hits and reverse NAT) or fell back to the kernel (`fib_pass`,
//! `mtu_pass`: what a GSO packet checked against the MTU as one big packet
//! would do).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use serde::Serialize;

use crate::{Lb, NetNs};

/// One stream's throughput.
#[derive(Clone, Debug, Serialize)]
pub struct Stream {
    /// `pod_to_pod` (the floor) or `pod_to_cluster_ip`.
    pub path: &'static str,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// Payload bits per second the backend received, in 10^9.
    pub gbit_s: f64,
    pub bytes: u64,
    pub seconds: f64,
}

/// The streams of one run, and xlb's verdict counters over all of them.
pub struct Streams {
    pub streams: Vec<Stream>,
    /// `pod_to_cluster_ip` over `pod_to_pod`, per family.
    pub ratios: BTreeMap<&'static str, f64>,
    pub verdicts: BTreeMap<&'static str, u64>,
}

struct Net {
    pod: NetNs,
    node: NetNs,
    backend: NetNs,
}

/// A pod, a node and a backend namespace: the node's `p1` is the pod's
/// `c0`, its `p2` the backend's `s0` (the node sides up, no addresses yet).
pub(crate) fn pod_node_backend(prefixes: [&str; 3]) -> (NetNs, NetNs, NetNs) {
    let (pod, node, backend) = (NetNs::new(prefixes[0]), NetNs::new(prefixes[1]), NetNs::new(prefixes[2]));
    for (ours, peer, ns) in [("p1", "c0", &pod), ("p2", "s0", &backend)] {
        node.exec(&["ip", "link", "add", ours, "type", "veth", "peer", "name", peer]);
        node.exec(&["ip", "link", "set", peer, "netns", &ns.name]);
        node.exec(&["ip", "link", "set", ours, "up"]);
    }
    (pod, node, backend)
}

/// Permanent neighbours on the node, resolved up front as the agent's
/// managed neighbours would be: a FIB lookup cannot resolve one and would
/// leave packets to the kernel.
pub(crate) fn neighbours(node: &NetNs, entries: &[(&str, &str, &str)]) {
    for (addr, mac, dev) in entries {
        node.exec(&["ip", "neigh", "replace", addr, "lladdr", mac, "nud", "permanent", "dev", dev]);
    }
}

impl Net {
    fn new() -> Self {
        let (pod, node, backend) = pod_node_backend(["xlbtp", "xlbtn", "xlbtb"]);
        node.exec_lines(&[
            "ip addr add 10.97.1.1/24 dev p1",
            "ip addr add 10.97.2.1/24 dev p2",
            "ip -6 addr add fd97:1::1/64 dev p1 nodad",
            "ip -6 addr add fd97:2::1/64 dev p2 nodad",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
        ]);
        for (ns, dev, n) in [(&pod, "c0", 1), (&backend, "s0", 2)] {
            ns.exec_lines(&[
                &format!("ip link set {dev} up"),
                &format!("ip addr add 10.97.{n}.2/24 dev {dev}"),
                &format!("ip -6 addr add fd97:{n}::2/64 dev {dev} nodad"),
                &format!("ip route add default via 10.97.{n}.1"),
                &format!("ip -6 route add default via fd97:{n}::1"),
            ]);
        }
        let (c0, s0) = (pod.mac("c0"), backend.mac("s0"));
        neighbours(
            &node,
            &[("10.97.1.2", &c0, "p1"), ("fd97:1::2", &c0, "p1"), ("10.97.2.2", &s0, "p2"), ("fd97:2::2", &s0, "p2")],
        );
        Self { pod, node, backend }
    }
}

/// Sends for `seconds` from the pod to `to`; the backend listens on
/// `listen`. Returns the bytes received and the seconds they took.
fn stream(net: &Net, listen: SocketAddr, to: SocketAddr, seconds: f64) -> anyhow::Result<(u64, f64)> {
    let listener = {
        let _in = net.backend.enter();
        TcpListener::bind(listen)?
    };
    let sink = thread::spawn(move || -> std::io::Result<(u64, f64)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let started = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
        Ok((total, started.elapsed().as_secs_f64()))
    });
    let mut c = {
        let _in = net.pod.enter();
        TcpStream::connect_timeout(&to, Duration::from_secs(5))?
    };
    c.set_write_timeout(Some(Duration::from_secs(10)))?;
    let buf = vec![0x5au8; 256 << 10];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        c.write_all(&buf)?;
    }
    c.shutdown(Shutdown::Write)?;
    let got = sink.join().map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
    Ok(got)
}

/// Measures each family's floor and ClusterIP stream for `seconds` each,
/// `rounds` times alternating (so neither gets the warmer machine), and
/// keeps each one's median round.
pub fn measure(seconds: f64, rounds: usize) -> anyhow::Result<Streams> {
    let net = Net::new();
    let mut lb = Lb::new();
    lb.load(crate::Prog::TcIngress);
    lb.tcp_vip_to("10.96.0.10", "10.97.2.2", true);
    lb.tcp_vip_to_id(2, 2, "fd96::10", "fd97:2::2", true);
    {
        let _in = net.node.enter();
        let p: &mut SchedClassifier = lb.dp.program_mut("xlb_tc_ingress").unwrap().try_into().unwrap();
        for ifname in ["p1", "p2"] {
            p.attach(ifname, TcAttachType::Ingress)?;
        }
    }
    let mut streams = Vec::new();
    let mut ratios = BTreeMap::new();
    for (family, vip, backend) in [("ipv4", "10.96.0.10", "10.97.2.2"), ("ipv6", "fd96::10", "fd97:2::2")] {
        let listen = SocketAddr::new(backend.parse()?, 8080);
        let paths = [("pod_to_pod", listen), ("pod_to_cluster_ip", SocketAddr::new(vip.parse()?, 80))];
        let mut runs: [Vec<Stream>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds.max(1) {
            for (i, (path, to)) in paths.into_iter().enumerate() {
                let (bytes, secs) = stream(&net, listen, to, seconds)?;
                runs[i].push(Stream { path, family, gbit_s: bytes as f64 * 8.0 / secs / 1e9, bytes, seconds: secs });
            }
        }
        let mut gbit = [0.0; 2];
        for (i, mut r) in runs.into_iter().enumerate() {
            r.sort_by(|a, b| a.gbit_s.total_cmp(&b.gbit_s));
            let median = r.swap_remove(r.len() / 2);
            gbit[i] = median.gbit_s;
            streams.push(median);
        }
        ratios.insert(family, if gbit[0] > 0.0 { gbit[1] / gbit[0] } else { 0.0 });
    }
    Ok(Streams { streams, ratios, verdicts: lb.verdicts() })
}
