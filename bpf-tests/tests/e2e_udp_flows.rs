// SPDX-License-Identifier: MIT OR Apache-2.0
//! A UDP client with a fixed source port (a resolver) across its endpoint
//! going unready, then away, on the two-node cluster: sig-network's "should
//! be able to preserve UDP traffic when server pod cycles for a ClusterIP
//! service" (conntrack.go), which kube-proxy passes by deleting the flow's
//! conntrack entries (`conntrack/cleanup.go`). A removed endpoint's backend
//! is gone from the maps, so its flows move anyway; an unready one stays
//! as a draining backend, and only the sweep moves its UDP flows.

use std::{net::UdpSocket, time::Duration};

use bpf_tests::cluster::*;

const DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: demo}
spec:
  clusterIP: 10.96.0.53
  selector: {app: dns}
  ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]
"#;

/// The pods that answered `n` datagrams sent every 100 ms from one socket.
fn answers(sock: &UdpSocket, n: usize, tag: &str) -> Vec<String> {
    let mut buf = [0u8; 2048];
    let mut pods = Vec::new();
    for i in 0..n {
        sock.send_to(format!("{tag}{i}").as_bytes(), sa("10.96.0.53", 53)).unwrap();
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            let line = String::from_utf8_lossy(&buf[..len]).to_string();
            pods.push(line.split_whitespace().next().unwrap_or_default().to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pods
}

#[test]
fn a_fixed_port_udp_client_moves_off_an_endpoint_that_goes() {
    let mut c = Cluster::new(2, &[5353]);
    c.add_pod("dns-1a", 1, "dns");
    c.add_pod("dns-2a", 2, "dns");
    c.add_pod("resolver", 1, "");
    c.add_services(DNS);
    c.write_manifests(&[]);
    c.start_agents(&[]);
    let sock = in_ns(&c.pod("resolver").ns, || UdpSocket::bind("0.0.0.0:5300")).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    // One flow (one source port): one pod answers every datagram.
    let before = answers(&sock, 10, "a");
    assert_eq!(before.len(), 10, "{before:?}");
    let pinned = before[0].clone();
    assert!(before.iter().all(|p| *p == pinned), "{before:?}");
    let other = if pinned == "dns-1a" { "dns-2a" } else { "dns-1a" };

    // The pinned pod fails its readiness probe (its process keeps
    // answering, so only the conntrack entry could keep the flow there).
    c.set_pod_state(&pinned, PodState::NotReady);
    c.write_manifests(&[]);
    c.wait_synced(2);
    let after = answers(&sock, 10, "b");
    assert_eq!(after.len(), 10, "no datagram lost: {after:?}");
    assert!(after.iter().all(|p| p == other), "the same source port moved to {other}: {after:?}");
    // Back: the flow stays where it is now (nothing made it stale).
    c.set_pod_state(&pinned, PodState::Ready);
    c.write_manifests(&[]);
    c.wait_synced(3);
    let back = answers(&sock, 5, "c");
    assert_eq!(back, vec![other.to_string(); 5]);
    // The pod that answers now goes away altogether: moved again.
    c.set_pod_state(other, PodState::Gone);
    c.write_manifests(&[]);
    c.wait_synced(4);
    let last = answers(&sock, 5, "d");
    assert_eq!(last, vec![pinned.clone(); 5]);
    for n in [1, 2] {
        let stats: serde_json::Value = serde_json::from_str(&c.dump(n, &["-o", "json", "stats"])).unwrap();
        assert_eq!(stats["verdicts"]["malformed"], 0, "{stats:#}");
    }
}
