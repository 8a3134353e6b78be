// SPDX-License-Identifier: MIT OR Apache-2.0
//! Real TCP connections (handshake, request, response, close) between a
//! client and a server namespace through xlb attached in a node namespace:
//! DNAT on the way in, reverse NAT on the way back, for XDP and TC, IPv4
//! and IPv6.

use std::net::SocketAddr;

use bpf_tests::{Lb, topo::*};

fn through_vip(tc: bool, v6: bool) {
    let topo = Topology::new();
    let mut lb = Lb::new();
    let (vip, server, client) = if v6 { ("fd96::10", SERVER6, CLIENT6) } else { ("10.96.0.10", SERVER4, CLIENT4) };
    lb.tcp_vip_to(vip, server, tc);
    // The client routes the VIP to the node (its default route); the node
    // itself has no route or address for it: only xlb makes it reachable.
    if tc {
        topo.attach_tc(&mut lb)
    } else {
        topo.attach_xdp(&mut lb)
    }

    let backend = SocketAddr::new(server.parse().unwrap(), 8080);
    let conns = 3;
    let srv = topo.serve(backend, conns);
    let to = SocketAddr::new(vip.parse().unwrap(), 80);
    for i in 0..conns {
        let answer = topo.request(to).unwrap_or_else(|e| panic!("tc={tc} v6={v6}: connection {i} to {to}: {e}"));
        assert!(answer.starts_with("pong "), "got {answer:?}");
        let seen: SocketAddr = answer[5..].split(' ').next().unwrap().parse().unwrap();
        assert_eq!(seen.ip().to_string(), client, "the backend sees the real client address");
    }
    let peers = srv.join().expect("server thread");
    assert_eq!(peers.len(), conns);
    assert!(lb.verdict("new_flow") >= conns as u64, "{:?}", lb.verdicts());
    assert!(lb.verdict("reverse_nat") > 0, "{:?}", lb.verdicts());
    assert!(lb.verdict("ct_hit") > 0, "{:?}", lb.verdicts());
}

#[test]
fn tcp_through_xdp_ipv4() {
    through_vip(false, false);
}

#[test]
fn tcp_through_xdp_ipv6() {
    through_vip(false, true);
}

#[test]
fn tcp_through_tc_ipv4() {
    through_vip(true, false);
}

#[test]
fn tcp_through_tc_ipv6() {
    through_vip(true, true);
}

/// A bulk TCP stream from a pod to a ClusterIP, with TSO/GSO on (64 KiB
/// segments on the pod's veth), stays on xlb's path: conntrack hits one way,
/// reverse NAT the other, and no packet left to the kernel as too big for
/// the MTU (a GSO packet is checked by its segments' size) or unroutable.
/// The bench reports the same streams' Gbit/s (`tcp_stream`).
#[test]
fn bulk_tcp_from_a_pod_to_a_cluster_ip_stays_on_xlbs_path() {
    let s = bpf_tests::bench::stream::measure(1.0, 1).expect("streams");
    for st in &s.streams {
        assert!(st.bytes > 10 << 20, "{st:?}: barely moved");
        eprintln!("{} {}: {:.1} Gbit/s", st.family, st.path, st.gbit_s);
    }
    let v = &s.verdicts;
    assert!(v["ct_hit"] > 1000 && v["reverse_nat"] > 1000, "{v:?}");
    assert_eq!((v["fib_pass"], v["mtu_pass"], v["frag_needed"]), (0, 0, 0), "{v:?}");
}
