// SPDX-License-Identifier: MIT OR Apache-2.0
//! The writer's sweep against the real programs and maps: flows are made
//! by packets through the TC program, endpoints change through the real
//! translation and writer, and the entries that must go are gone.
//!
//! - kube-proxy's `conntrack/cleanup.go` (`CleanStaleEntries`, and its
//!   cleanup_test.go cases): a UDP flow to an endpoint that was removed or
//!   stopped serving is deleted, so its next datagram is balanced again; a
//!   terminating endpoint that still serves keeps its flows; TCP keeps its
//!   flows (they drain).
//! - sessionAffinity (kube-proxy keeps it per Service endpoint chain): an
//!   affinity entry to an endpoint this Service stopped using goes, even
//!   while another Service keeps the same pod port active.

use bpf_tests::{FibEnv, Lb, Prog, Verdict, fixtures::*, packet::Pkt};
use datapath_common::{PROTO_TCP, PROTO_UDP};
use xlb::{
    source::{Snapshot, files::parse_into},
    translate::{Desired, NodeInfo, Options, translate},
    writer::Writer,
};

/// `dns` (UDP 53) and `web` (TCP 80, ClientIP affinity) on pods .11–.13
/// port 8080; `dns_eps` / `web_eps` are the endpoint lines of each.
fn cluster(dns_eps: &[&str], web_eps: &[&str]) -> Desired {
    let eps = |list: &[&str]| -> String {
        list.iter()
            .map(|e| match e.strip_suffix('!') {
                Some(a) => {
                    format!("- {{addresses: [{a}], conditions: {{ready: false, serving: true, terminating: true}}}}\n")
                }
                None => match e.strip_suffix('?') {
                    Some(a) => format!("- {{addresses: [{a}], conditions: {{ready: false, serving: false}}}}\n"),
                    None => format!("- {{addresses: [{e}]}}\n"),
                },
            })
            .collect()
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: t}}\n\
         spec: {{clusterIP: 10.96.0.10, ports: [{{name: d, port: 53, protocol: UDP, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-1, namespace: t, labels: {{kubernetes.io/service-name: dns}}}}\n\
         addressType: IPv4\nports: [{{name: d, port: 8080, protocol: UDP}}]\nendpoints:\n{}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: t}}\n\
         spec: {{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{{name: w, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: w, port: 8080}}]\nendpoints:\n{}",
        eps(dns_eps),
        eps(web_eps)
    );
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "test", &yaml);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    let d = translate(&snap.services, &snap.slices, &NodeInfo::default(), &Options::default());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    d
}

/// The backend address a packet was DNATed to.
fn dnat_target(out: &[u8]) -> String {
    std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]).to_string()
}

/// Client ports whose flows (UDP to :53) are pinned to each backend.
fn udp_flows(lb: &mut Lb, ports: std::ops::Range<u16>) -> Vec<(u16, String)> {
    ports
        .map(|p| {
            let (v, out) = lb.run(Prog::TcIngress, &Pkt::udp(CLIENT4, p, VIP4, 53).build());
            assert_eq!(v, Verdict::Redirect);
            (p, dnat_target(&out))
        })
        .collect()
}

/// Conntrack entries (both directions) of `proto` that involve `backend`.
fn entries_to(lb: &Lb, proto: u8, backend: &str) -> usize {
    let b = bpf_tests::addr16(backend);
    lb.dp
        .conntrack()
        .iter()
        .filter(|(k, e)| k.proto == proto && lb.dp.backend(e.backend_id).is_some_and(|x| x.addr == b))
        .count()
}

const ALL: [&str; 3] = ["10.0.1.11", "10.0.1.12", "10.0.1.13"];

/// The datapath and a writer, with `dns` and `web` on `all` programmed.
fn programmed(all: &[&str]) -> (Lb, Writer) {
    let mut lb = Lb::new();
    let mut w = Writer::new(&lb.dp);
    w.apply(&mut lb.dp, &cluster(all, all));
    (lb, w)
}

#[test]
fn udp_flows_to_an_endpoint_that_stops_serving_move_and_tcp_drains() {
    let env = FibEnv::new(NEIGHBOURS);
    let _in = env.enter();
    let (mut lb, mut w) = programmed(&ALL);
    let before = udp_flows(&mut lb, 40000..40060);
    let to12: Vec<u16> = before.iter().filter(|(_, b)| b == "10.0.1.12").map(|(p, _)| *p).collect();
    assert!(!to12.is_empty(), "{before:?}");
    for sport in 41000..41010 {
        lb.run(Prog::TcIngress, &Pkt::tcp(CLIENT4, sport, VIP4, 80, 0x02).build());
    }
    let tcp12 = entries_to(&lb, PROTO_TCP, "10.0.1.12");

    // Terminating but serving: its UDP flows stay (cleanup.go keeps serving endpoints).
    let r = w.apply(&mut lb.dp, &cluster(&["10.0.1.11", "10.0.1.12!", "10.0.1.13"], &ALL));
    assert!(r.stale_udp.is_empty(), "{:?}", r.stale_udp);
    assert_eq!(xlb::sweep::sweep(&mut lb.dp, &r).unwrap().conntrack, 0);
    assert_eq!(entries_to(&lb, PROTO_UDP, "10.0.1.12"), 2 * to12.len());

    // Not serving: its UDP flows are deleted, both directions; `web` (TCP)
    // loses the same endpoint and keeps its flows (they drain).
    let unready = ["10.0.1.11", "10.0.1.12?", "10.0.1.13"];
    let r = w.apply(&mut lb.dp, &cluster(&unready, &unready));
    let swept = xlb::sweep::sweep(&mut lb.dp, &r).unwrap();
    assert_eq!(swept.conntrack, 2 * to12.len(), "{r:?}");
    assert_eq!(entries_to(&lb, PROTO_UDP, "10.0.1.12"), 0);
    assert_eq!(
        entries_to(&lb, PROTO_UDP, "10.0.1.11") + entries_to(&lb, PROTO_UDP, "10.0.1.13"),
        2 * (60 - to12.len())
    );
    // TCP is another frontend, and drains: untouched.
    assert_eq!(entries_to(&lb, PROTO_TCP, "10.0.1.12"), tcp12);
    // The resolver's next datagram (same source port) lands on a serving endpoint.
    for (p, b) in udp_flows(&mut lb, to12[0]..to12[0] + 1) {
        assert_ne!(b, "10.0.1.12", "port {p}");
    }
    // The flows of the other endpoints kept their backends.
    let after = udp_flows(&mut lb, 40000..40060);
    for ((p, was), (_, now)) in before.iter().zip(&after) {
        if was != "10.0.1.12" {
            assert_eq!(was, now, "port {p} moved");
        }
    }
    // No serving endpoint at all: kube-proxy leaves the flows.
    let r = w.apply(&mut lb.dp, &cluster(&["10.0.1.11?", "10.0.1.12?", "10.0.1.13?"], &ALL));
    assert!(r.stale_udp.is_empty());
}

#[test]
fn affinity_to_an_endpoint_the_service_stopped_using_goes() {
    let env = FibEnv::new(NEIGHBOURS);
    let _in = env.enter();
    let (mut lb, mut w) = programmed(&ALL);
    let (_, out) = lb.run(Prog::TcIngress, &Pkt::tcp(CLIENT4, 42000, VIP4, 80, 0x02).build());
    let pinned = dnat_target(&out);
    for sport in 42001..42010 {
        let (_, out) = lb.run(Prog::TcIngress, &Pkt::tcp(CLIENT4, sport, VIP4, 80, 0x02).build());
        assert_eq!(dnat_target(&out), pinned, "ClientIP affinity");
    }
    // `web` drops the pinned pod; `dns` still lists the same pod port
    // active, so BACKENDS keeps it active.
    let rest: Vec<&str> = ALL.iter().copied().filter(|a| *a != pinned).collect();
    let r = w.apply(&mut lb.dp, &cluster(&ALL, &rest));
    let swept = xlb::sweep::sweep(&mut lb.dp, &r).unwrap();
    assert_eq!(swept.affinity, 1, "{r:?}");
    for sport in 42100..42110 {
        let (_, out) = lb.run(Prog::TcIngress, &Pkt::tcp(CLIENT4, sport, VIP4, 80, 0x02).build());
        assert_ne!(dnat_target(&out), pinned, "a new connection must not return to a pod the Service dropped");
    }
}
