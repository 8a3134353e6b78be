// SPDX-License-Identifier: MIT OR Apache-2.0
//! Path-MTU discovery through xlb with real TCP sockets: a 1 MB transfer
//! each way through a VIP across a router whose routes, both ways, have an
//! MTU of 1280, lower than every endpoint's 1500:
//!
//! ```text
//!  client ns            router ns                       node ns (xlb)              server ns
//!  c0 172.31.1.2 ── r0 172.31.1.1 | r1 172.31.3.2 ── n0 172.31.3.1 | n1 172.31.2.1 ── s0 172.31.2.2
//!                   (routes: mtu 1280 both ways)
//! ```
//! Each endpoint advertises an MSS for 1500 bytes, so its big segments meet
//! the router's 1280: towards the VIP the router's "fragmentation needed" /
//! "packet too big" goes to the client directly; towards the client it goes
//! to the VIP, quoting VIP → client, and only reaches the server because xlb
//! translates it (the flow's reversed quote, RFC 5508), as netfilter's
//! `nf_nat_icmp_reply_translation` does for kube-proxy. Without that the
//! download would stall (a PMTU black hole). With SNAT (the XDP NodePort
//! case of a backend on another node) the same error must reach the server
//! as one about its packets to the node's SNAT address and port. Offloads
//! stay on everywhere but
//! on the senders into XDP-attached links (see `Topology::attach_xdp`).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use bpf_tests::{Lb, NetNs, Prog};

const MB: usize = 1 << 20;

struct Net {
    client: NetNs,
    router: NetNs,
    node: NetNs,
    server: NetNs,
}

/// Makes veth `a` in `ns_a` and its peer `b` in `ns_b`.
fn link(ns_a: &NetNs, a: &str, ns_b: &NetNs, b: &str) {
    ns_a.exec(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
    ns_a.exec(&["ip", "link", "set", b, "netns", &ns_b.name]);
    ns_a.exec(&["ip", "link", "set", a, "up"]);
    ns_b.exec(&["ip", "link", "set", b, "up"]);
}

impl Net {
    fn new() -> Self {
        let (client, router, node, server) =
            (NetNs::new("xlbc"), NetNs::new("xlbr"), NetNs::new("xlbn"), NetNs::new("xlbs"));
        link(&client, "c0", &router, "r0");
        link(&router, "r1", &node, "n0");
        link(&node, "n1", &server, "s0");
        client.exec_lines(&[
            "ip addr add 172.31.1.2/24 dev c0",
            "ip -6 addr add fd31:1::2/64 dev c0 nodad",
            "ip route add default via 172.31.1.1",
            "ip -6 route add default via fd31:1::1",
        ]);
        router.exec_lines(&[
            "ip addr add 172.31.3.2/24 dev r1",
            "ip -6 addr add fd31:3::2/64 dev r1 nodad",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
            // The lower-MTU hop, both ways: route MTUs, so that the
            // endpoints' own links (and so their MSS) stay at 1500.
            "ip addr add 172.31.1.1/24 dev r0 noprefixroute",
            "ip route add 172.31.1.0/24 dev r0 mtu 1280",
            "ip -6 addr add fd31:1::1/64 dev r0 nodad noprefixroute",
            "ip -6 route add fd31:1::/64 dev r0 mtu 1280",
            "ip route add default via 172.31.3.1 mtu 1280",
            "ip -6 route add default via fd31:3::1 mtu 1280",
        ]);
        node.exec_lines(&[
            "ip addr add 172.31.3.1/24 dev n0",
            "ip addr add 172.31.2.1/24 dev n1",
            "ip -6 addr add fd31:3::1/64 dev n0 nodad",
            "ip -6 addr add fd31:2::1/64 dev n1 nodad",
            "ip route add 172.31.1.0/24 via 172.31.3.2",
            "ip -6 route add fd31:1::/64 via fd31:3::2",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
            // GRO on lets a veth receive XDP-redirected frames.
            "ethtool -K n0 gro on",
            "ethtool -K n1 gro on",
        ]);
        server.exec_lines(&[
            "ip addr add 172.31.2.2/24 dev s0",
            "ip -6 addr add fd31:2::2/64 dev s0 nodad",
            "ip route add default via 172.31.2.1",
            "ip -6 route add default via fd31:2::1",
            "ethtool -K s0 gro on",
        ]);
        router.exec_lines(&["ethtool -K r1 gro on"]);
        // The node's neighbours resolved up front (the agent installs managed
        // neighbours for its backends; here the test does): XDP and TC cannot
        // resolve one, and would leave the first packets to the kernel.
        let (s0, r1) = (server.mac("s0"), router.mac("r1"));
        for (addr, mac, dev) in
            [("172.31.2.2", &s0, "n1"), ("fd31:2::2", &s0, "n1"), ("172.31.3.2", &r1, "n0"), ("fd31:3::2", &r1, "n0")]
        {
            node.exec(&["ip", "neigh", "replace", addr, "lladdr", mac, "nud", "permanent", "dev", dev]);
        }
        Self { client, router, node, server }
    }

    /// xlb on n0 and n1: XDP (the senders into them, r1 and s0, fill in
    /// checksums: a veth hands XDP CHECKSUM_PARTIAL frames as if complete)
    /// or TC ingress.
    fn attach(&self, lb: &mut Lb, tc: bool) {
        lb.load(if tc { Prog::TcIngress } else { Prog::Xdp });
        let _in = self.node.enter();
        if tc {
            let p: &mut SchedClassifier = lb.dp.program_mut("xlb_tc_ingress").unwrap().try_into().unwrap();
            for ifname in ["n0", "n1"] {
                p.attach(ifname, TcAttachType::Ingress).unwrap();
            }
        } else {
            self.router.exec_lines(&["ethtool -K r1 tx off"]);
            self.server.exec_lines(&["ethtool -K s0 tx off"]);
            let p: &mut Xdp = lb.dp.program_mut("xlb_xdp").unwrap().try_into().unwrap();
            for ifname in ["n0", "n1"] {
                p.attach(ifname, XdpMode::Driver).unwrap();
            }
        }
    }
}

fn pattern(i: usize) -> u8 {
    (i * 7 + i / 251) as u8
}

/// `snat`: the backend counts as on another node (XDP, external traffic
/// under policy Cluster), so the flow is SNATed to the node's address on n1
/// and the router's error, quoting VIP → client, must reach the server as
/// one about server → node:SNAT port.
fn transfer_both_ways(tc: bool, v6: bool, snat: bool) {
    let net = Net::new();
    let mut lb = Lb::new();
    let (vip, server) = if v6 { ("fd96::10", "fd31:2::2") } else { ("10.96.0.10", "172.31.2.2") };
    net.router.exec(&[
        "ip",
        "route",
        "add",
        if v6 { "fd96::/64" } else { "10.96.0.0/16" },
        "via",
        if v6 { "fd31:3::1" } else { "172.31.3.1" },
        "mtu",
        "1280",
    ]);
    lb.tcp_vip_to(vip, server, tc);
    if snat {
        lb.config_snat("172.31.2.1", "fd31:2::1", 30000, 32767);
    }
    net.attach(&mut lb, tc);

    let listener = {
        let _in = net.server.enter();
        TcpListener::bind(SocketAddr::new(server.parse().unwrap(), 8080)).expect("bind")
    };
    let srv = thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::with_capacity(MB);
        s.read_to_end(&mut got).expect("server read");
        let back: Vec<u8> = (0..MB).map(pattern).collect();
        s.write_all(&back).expect("server write");
        (got, peer)
    });
    let mut c = {
        let _in = net.client.enter();
        TcpStream::connect_timeout(&SocketAddr::new(vip.parse().unwrap(), 80), Duration::from_secs(5)).expect("connect")
    };
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let up: Vec<u8> = (0..MB).map(|i| pattern(i + 3)).collect();
    c.write_all(&up).expect("client write");
    c.shutdown(Shutdown::Write).unwrap();
    let mut down = Vec::with_capacity(MB);
    c.read_to_end(&mut down).unwrap_or_else(|e| panic!("tc={tc} v6={v6}: download: {e} after {} bytes", down.len()));
    let (got, peer) = srv.join().expect("server thread");
    let node = if v6 { "fd31:2::1" } else { "172.31.2.1" };
    assert_eq!(peer.ip().to_string() == node, snat, "tc={tc} v6={v6} snat={snat}: the server saw {peer}");
    assert!(got == up, "tc={tc} v6={v6}: upload intact ({} of {MB} bytes)", got.len());
    assert!(
        down.len() == MB && down.iter().enumerate().all(|(i, &b)| b == pattern(i)),
        "tc={tc} v6={v6}: download intact"
    );
    let v = lb.verdicts();
    assert!(v["icmp_error_nat"] >= 1, "tc={tc} v6={v6}: the router's error reached the server through xlb: {v:?}");
    assert_eq!(v["fib_pass"], 0, "tc={tc} v6={v6}: every packet on xlb's path: {v:?}");
}

#[test]
fn path_mtu_discovery_through_xdp_ipv4() {
    transfer_both_ways(false, false, false);
}

#[test]
fn path_mtu_discovery_through_xdp_ipv6() {
    transfer_both_ways(false, true, false);
}

#[test]
fn path_mtu_discovery_through_tc_ipv4() {
    transfer_both_ways(true, false, false);
}

#[test]
fn path_mtu_discovery_through_tc_ipv6() {
    transfer_both_ways(true, true, false);
}

#[test]
fn path_mtu_discovery_through_xdp_with_snat_ipv4() {
    transfer_both_ways(false, false, true);
}

#[test]
fn path_mtu_discovery_through_xdp_with_snat_ipv6() {
    transfer_both_ways(false, true, true);
}
