// SPDX-License-Identifier: MIT OR Apache-2.0
//! The scheduler set and weights of issue #14 with real connections: a
//! two-node cluster in network namespaces (`bpf_tests::cluster`), an
//! `xlb agent --manifests` per node, real TCP and UDP sockets. Annotations
//! are read as from the API server (the same translation). The packet
//! fixtures are in `schedulers.rs`; each test names the IPVS scheduler
//! (`net/netfilter/ipvs/ip_vs_*.c`) or kube-proxy IPVS behaviour it mirrors.

use bpf_tests::cluster::*;

/// The web Service with `annotations` (a YAML flow mapping's body), ports
/// http (80 → 9376), metrics (81 → 9377) and dns (53/UDP → 5353).
fn web(annotations: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo, annotations: {{{annotations}}}}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 9376}}
  - {{name: metrics, port: 81, targetPort: 9377}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
"#
    )
}

/// Pods web-1a, web-1b (node 1), web-2a (node 2), and `clients` client
/// pods on node 1; `not_ready` pods start unready.
fn cluster(svc: &str, clients: usize, not_ready: &[&str]) -> Cluster {
    let mut c = Cluster::new(2, &[9376, 9377, 5353]);
    for (name, node) in [("web-1a", 1), ("web-1b", 1), ("web-2a", 2)] {
        c.add_pod(name, node, "web");
        if not_ready.contains(&name) {
            c.set_pod_state(name, PodState::NotReady);
        }
    }
    for i in 0..clients {
        c.add_pod(&format!("client-{i}"), 1, "");
    }
    c.add_services(svc);
    c.write_manifests(&[]);
    c.start_agents(&[]);
    c
}

fn answers(c: &Cluster, client: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            tcp_request(&c.pod(client).ns, sa("10.96.0.10", 80), &format!("r{i}"))
                .unwrap_or_else(|e| panic!("request {i}: {e}"))
                .0
        })
        .collect()
}

/// `wrr` (ip_vs_wrr.c) with `xlb.io/weights` by pod name: 3:1:1 over 1,000
/// real connections, each pod within ±5 % of its share (the per-CPU cursor
/// is exact per cycle; a connection's CPU may vary). `dump services` shows
/// the scheduler and the weights.
#[test]
fn weighted_round_robin_follows_the_weights_of_the_annotation() {
    let c = cluster(&web("xlb.io/scheduler: wrr, xlb.io/weights: 'web-1a=3, web-1b=1, web-2a=1'"), 1, &[]);
    let n = 1000;
    let s = spread(&answers(&c, "client-0", n));
    eprintln!("wrr 3:1:1 over {n} connections: {s:?}");
    for (pod, want) in [("web-1a", 0.6), ("web-1b", 0.2), ("web-2a", 0.2)] {
        let got = s.get(pod).copied().unwrap_or(0) as f64 / n as f64;
        assert!((got / want - 1.0).abs() <= 0.05, "{pod}: {got:.3} of connections, wants {want}");
    }
    let dump: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "services"])).unwrap();
    let http = dump
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["service"] == "demo/web:http" && f["address"] == "10.96.0.10")
        .expect("the http frontend");
    assert_eq!(http["scheduler"], "weighted-round-robin");
    assert_eq!(http["ipvs_scheduler"], "wrr");
    let weights: Vec<(String, u64)> = http["backends"]
        .as_array()
        .unwrap()
        .iter()
        .zip(http["weights"].as_array().unwrap())
        .map(|(b, w)| (b.as_str().unwrap().to_string(), w.as_u64().unwrap()))
        .collect();
    assert_eq!(
        weights,
        [("10.244.1.10:9376".into(), 3), ("10.244.1.11:9376".into(), 1), ("10.244.2.10:9376".into(), 1)],
        "{http:#}"
    );
}

/// Weight 0 drains (IPVS's "quiesced" dest; kube-proxy IPVS's graceful
/// termination sets weight 0): the connections open on the pod go on, no
/// new one reaches it, whatever the scheduler.
#[test]
fn weight_zero_takes_no_new_connections_and_keeps_the_open_ones() {
    for sched in ["mh", "rr", "lc"] {
        let mut c = cluster(&web(&format!("xlb.io/scheduler: {sched}")), 1, &["web-1b"]);
        let client = &c.pod("client-0").ns;
        let mut streams: Vec<Stream> =
            (0..12).map(|_| Stream::open(client, sa("10.96.0.10", 80)).expect("stream")).collect();
        assert!(streams.iter().any(|s| s.pod == "web-2a"), "{sched}: some streams on web-2a");
        c.set_services(&[&web(&format!("xlb.io/scheduler: {sched}, xlb.io/weights: web-2a=0"))]);
        c.write_manifests(&[]);
        c.wait_synced(2);
        for _ in 0..3 {
            for s in &mut streams {
                s.tick().unwrap_or_else(|e| panic!("{sched}: stream on {} broke: {e}", s.pod));
            }
        }
        let s = spread(&answers(&c, "client-0", 30));
        assert_eq!(s.keys().collect::<Vec<_>>(), ["web-1a"], "{sched}: new connections avoid the drained pod");
    }
}

/// `sh` (ip_vs_sh.c without sh-port: the client address alone): each
/// client reaches one pod on every port and protocol of the Service, over
/// 20 connections each from its own source port; different clients spread.
#[test]
fn source_hashing_keeps_each_client_on_one_pod_across_ports_and_protocols() {
    let c = cluster(&web("xlb.io/scheduler: sh"), 8, &[]);
    let mut per_client = Vec::new();
    for i in 0..8 {
        let ns = &c.pod(&format!("client-{i}")).ns;
        let mut pods = Vec::new();
        for r in 0..20 {
            pods.push(tcp_request(ns, sa("10.96.0.10", 80), &format!("h{r}")).expect("http").0);
        }
        for r in 0..5 {
            pods.push(tcp_request(ns, sa("10.96.0.10", 81), &format!("m{r}")).expect("metrics").0);
            pods.push(udp_request(ns, sa("10.96.0.10", 53), &format!("d{r}")).expect("dns").0);
        }
        let s = spread(&pods);
        assert_eq!(s.len(), 1, "client-{i}: one pod for all its ports and protocols: {s:?}");
        let pod = s.into_keys().next().unwrap();
        // `xlb dump explain` predicts it from any source port.
        let client_ip = &c.pod(&format!("client-{i}")).ip4;
        let explain = |port: u16, proto: &str| -> serde_json::Value {
            let out =
                c.dump(1, &["-o", "json", "explain", &format!("{client_ip}:1"), &format!("10.96.0.10:{port}"), proto]);
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["answer"].clone()
        };
        for (port, proto, target) in [(80, "tcp", 9376), (81, "tcp", 9377), (53, "udp", 5353)] {
            let a = explain(port, proto);
            assert_eq!(a["reason"], "source_hash", "{a:#}");
            assert_eq!(a["backend"], format!("{}:{target}", c.pod(&pod).ip4), "client-{i} → {pod}: {a:#}");
        }
        per_client.push(pod);
    }
    let s = spread(&per_client);
    eprintln!("sh: 8 clients over 3 pods: {s:?}");
    assert!(s.len() >= 2, "clients spread: {s:?}");
}

/// `lc` and `wlc` (ip_vs_lc.c, ip_vs_wlc.c) by the node's active-connection
/// counts: web-1a holds 50 long-lived connections (it was the only ready
/// pod); once web-1b and web-2a are ready, at least 90 % of the next 100
/// short connections go to them. `wlc` gives web-1a the largest weight (3)
/// and still avoids it: 50 per 3 is more than nothing per 1.
#[test]
fn least_connection_avoids_the_pod_holding_long_lived_connections() {
    for (sched, weights) in [("lc", ""), ("wlc", ", xlb.io/weights: 'web-1a=3'")] {
        let svc = web(&format!("xlb.io/scheduler: {sched}{weights}"));
        let mut c = cluster(&svc, 1, &["web-1b", "web-2a"]);
        let client = &c.pod("client-0").ns;
        let mut streams: Vec<Stream> =
            (0..50).map(|_| Stream::open(client, sa("10.96.0.10", 80)).expect("stream")).collect();
        assert!(streams.iter().all(|s| s.pod == "web-1a"));
        c.set_pod_state("web-1b", PodState::Ready);
        c.set_pod_state("web-2a", PodState::Ready);
        c.write_manifests(&[]);
        c.wait_synced(2);
        let s = spread(&answers(&c, "client-0", 100));
        eprintln!("{sched}: 100 short connections with 50 open on web-1a: {s:?}");
        let on_a = s.get("web-1a").copied().unwrap_or(0);
        assert!(on_a <= 10, "{sched}: {on_a} of 100 went to the loaded pod: {s:?}");
        for st in &mut streams {
            st.tick().unwrap_or_else(|e| panic!("{sched}: a long-lived connection broke: {e}"));
        }
        let backends: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "backends"])).unwrap();
        let a = backends.as_array().unwrap().iter().find(|b| b["backend"] == "10.244.1.10:9376").unwrap();
        assert_eq!(a["connections"], 50, "{a:#}");
        // `explain` cannot predict it: it lists the candidates and their counts.
        let ip = &c.pod("client-0").ip4;
        let out = c.dump(1, &["-o", "json", "explain", &format!("{ip}:1"), "10.96.0.10:80", "tcp"]);
        let answer = serde_json::from_str::<serde_json::Value>(&out).unwrap()["answer"].clone();
        assert_eq!((&answer["scheduler"], &answer["backend"]), (&serde_json::json!(sched), &serde_json::Value::Null));
        assert_eq!(answer["reason"], "least connections");
        let loaded =
            answer["candidate_details"].as_array().unwrap().iter().find(|b| b["backend"] == "10.244.1.10:9376");
        assert_eq!(loaded.unwrap()["connections"], 50, "{answer:#}");
    }
}

/// `lc` sees the connections socket-level load balancing made (a pod's
/// process in the agent's cgroup: its socket is rewritten at `connect`, so
/// conntrack never sees it, and SOCK_CONNS counts it from `connect` to
/// close): 50 held from a client process on web-1a, the next 100 short
/// ones from another go to the others; closing the 50 takes the count
/// back to 0.
#[test]
fn least_connection_counts_connections_balanced_at_the_socket() {
    let mut c = cluster(&web("xlb.io/scheduler: lc"), 1, &["web-1b", "web-2a"]);
    let vip = sa("10.96.0.10", 80).to_string();
    let pod = |line: &str| line.split("echo=").nth(1).and_then(|e| e.split(',').next()).unwrap_or("").to_string();
    let mut holder = c.client_running(1, &c.pod("client-0").ns, &["hold", &vip, "50"]);
    for _ in 0..50 {
        assert_eq!(pod(&holder.line()), "web-1a");
    }
    let connections = |c: &Cluster, backend: &str| -> u64 {
        let b: serde_json::Value = serde_json::from_str(&c.dump(1, &["-o", "json", "backends"])).unwrap();
        b.as_array().unwrap().iter().find(|b| b["backend"] == backend).map_or(0, |b| b["connections"].as_u64().unwrap())
    };
    assert_eq!(connections(&c, "10.244.1.10:9376"), 50, "socket-balanced connections are counted");
    assert!(c.verdict(1, "sock_xlate") >= 50, "balanced at the socket");
    c.set_pod_state("web-1b", PodState::Ready);
    c.set_pod_state("web-2a", PodState::Ready);
    c.write_manifests(&[]);
    c.wait_synced(2);
    let out = c.client(1, &c.pod("client-0").ns, &["repeat", &vip, "100", "short"]).expect("100 requests");
    let pods: Vec<String> = out.lines().map(pod).collect();
    let s = spread(&pods);
    eprintln!("lc, socket-LB: 100 short connections with 50 open on web-1a: {s:?}");
    assert_eq!(pods.len(), 100);
    assert!(s.get("web-1a").copied().unwrap_or(0) <= 10, "{s:?}");
    assert_eq!(connections(&c, "10.244.1.11:9376") + connections(&c, "10.244.2.10:9376"), 0, "short ones closed");
    drop(holder);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while connections(&c, "10.244.1.10:9376") != 0 {
        assert!(std::time::Instant::now() < deadline, "the held connections were never uncounted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
