// SPDX-License-Identifier: MIT OR Apache-2.0
//! The benchmark topology, built anew for every (system, services) pair so
//! no conntrack entry, rule or program carries over:
//!
//! ```text
//!   gen ns                  node ns                              backend ns
//!   g0 10.99.0.2 ──veth── n0 10.99.0.1 | n1 10.98.0.1 ──veth── b0 10.98.0.2, .3
//!   xlb_pktgen              system under test                    xdp_sink
//! ```
//! The generator's frames are addressed to n0's MAC and a load-balancer
//! IP; the node forwards them (DNAT to an endpoint, or plainly routed by
//! the XDP forwarder) out of n1; the sink counts what arrives, and
//! separately what arrives DNATed (destination port 8080), then drops it.

use std::{net::IpAddr, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use datapath_common::Counter;
use xlb::pktgen::{self, BENCH_OBJECT, Generator, Sent, Spec};

use super::model::{BACKENDS, PORT, TARGET_PORT};
use crate::NetNs;

pub struct Net {
    pub gen_ns: NetNs,
    pub node: NetNs,
    pub backend: NetNs,
    sink: Ebpf,
    generator: Option<Generator>,
}

/// What one measurement saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub sent: Sent,
    /// Frames that reached the backend DNATed to it (port 8080), and those
    /// still addressed to the service port (80).
    pub dnated: u64,
    pub undnated: u64,
    /// Softirq CPU time (all CPUs) during the run, in ns.
    pub softirq_ns: u64,
}

impl Net {
    pub fn new() -> Self {
        let gen_ns = NetNs::new("xlbbg");
        let node = NetNs::new("xlbbn");
        let backend = NetNs::new("xlbbb");
        for (ours, peer, ns) in [("n0", "g0", &gen_ns), ("n1", "b0", &backend)] {
            node.exec(&["ip", "link", "add", ours, "type", "veth", "peer", "name", peer]);
            node.exec(&["ip", "link", "set", peer, "netns", &ns.name]);
        }
        gen_ns.exec_lines(&[
            "ip link set g0 up",
            "ip addr add 10.99.0.2/24 dev g0",
            "ip route add default via 10.99.0.1",
        ]);
        backend.exec_lines(&[
            "ip link set b0 up",
            "ip addr add 10.98.0.2/24 dev b0",
            "ip addr add 10.98.0.3/24 dev b0",
            "ip route add default via 10.98.0.1",
        ]);
        let b0_mac = backend.mac("b0");
        node.exec_lines(&[
            "ip link set n0 up",
            "ip link set n1 up",
            "ip addr add 10.99.0.1/24 dev n0",
            "ip addr add 10.98.0.1/24 dev n1",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "sysctl -qw net.ipv4.conf.all.rp_filter=0",
            "sysctl -qw net.ipv4.conf.default.rp_filter=0",
            "sysctl -qw net.ipv4.conf.n0.rp_filter=0",
            // Replies and the generator's source range go back to the generator.
            "ip route add 10.200.0.0/14 via 10.99.0.2 dev n0",
            // What the XDP forwarder (no DNAT) routes the load-balancer IPs to.
            "ip route add 198.18.0.0/15 via 10.98.0.2 dev n1",
            // Without GRO (or an XDP program) a veth drops XDP-redirected frames.
            "ethtool -K n0 gro on",
            "ethtool -K n1 gro on",
        ]);
        for a in BACKENDS {
            node.exec(&["ip", "neigh", "replace", &a.to_string(), "lladdr", &b0_mac, "nud", "permanent", "dev", "n1"]);
        }
        let mut sink = Ebpf::load(BENCH_OBJECT).expect("load the bench object");
        {
            let _in = backend.enter();
            let p: &mut Xdp = sink.program_mut("xdp_sink").unwrap().try_into().unwrap();
            p.load().expect("verify xdp_sink");
            p.attach("b0", XdpMode::Driver).expect("attach xdp_sink to b0");
        }
        let mut ports: Array<_, u32> = Array::try_from(sink.map_mut("SINK_PORTS").unwrap()).unwrap();
        ports.set(0, TARGET_PORT as u32, 0).unwrap();
        ports.set(1, PORT as u32, 0).unwrap();
        Self { gen_ns, node, backend, sink, generator: None }
    }

    /// n0's MAC, the generator's next hop.
    pub fn n0_mac(&self) -> [u8; 6] {
        xlb::cli::parse_mac(&self.node.mac("n0")).unwrap()
    }

    /// Prepares the generator for traffic to `dst`:80 over `flows` flows.
    pub fn generator(&mut self, dst: IpAddr, flows: u32, size: usize) -> anyhow::Result<()> {
        let _in = self.gen_ns.enter();
        let spec = Spec {
            src_mac: pktgen::mac_of("g0")?,
            dst_mac: self.n0_mac(),
            src: "10.200.0.1".parse()?,
            dst,
            dport: super::model::PORT,
            protocol: xlb::translate::Protocol::Udp,
            flows,
            size,
        };
        self.generator = Some(Generator::new("g0", &spec)?);
        Ok(())
    }

    /// Sink counters 1 and 2: DNATed, and still addressed to the service port.
    fn sink_counts(&self) -> [u64; 2] {
        let m: PerCpuArray<_, Counter> = PerCpuArray::try_from(self.sink.map("SINK").unwrap()).unwrap();
        let sum = |i| m.get(&i, 0).map(|v| v.iter().map(|c| c.packets).sum::<u64>()).unwrap_or(0);
        [sum(1), sum(2)]
    }

    /// Sends for `secs` from one generator thread (pinned to the last CPU)
    /// and reports what arrived and the softirq time spent.
    pub fn measure(&mut self, secs: f64) -> anyhow::Result<Sample> {
        // The flows go on from where the last run stopped: after a warm-up,
        // a new-flows run still opens a new flow with every packet.
        assert!(self.generator.is_some(), "generator() first");
        let c0 = self.sink_counts();
        let cpu0 = softirq_ns();
        let sent = {
            let _in = self.gen_ns.enter();
            self.generator.as_ref().unwrap().run_on(&[last_cpu()], None, Some(Duration::from_secs_f64(secs)))?
        };
        let cpu1 = softirq_ns();
        let c1 = self.sink_counts();
        Ok(Sample { sent, dnated: c1[0] - c0[0], undnated: c1[1] - c0[1], softirq_ns: cpu1.saturating_sub(cpu0) })
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

fn last_cpu() -> usize {
    std::thread::available_parallelism().map(|n| n.get() - 1).unwrap_or(0)
}

/// Softirq time of all CPUs so far (/proc/stat, USER_HZ ticks), in ns.
pub fn softirq_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}
