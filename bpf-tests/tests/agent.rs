// SPDX-License-Identifier: MIT OR Apache-2.0
//! The real `xlb agent` process, from a directory of YAML, in the node
//! namespace of a client / node / server topology: an established TCP
//! connection survives the agent stopping and a new agent taking over from
//! the pins; live edits of the files reach the maps; TC follows interfaces
//! matching a pattern as they come and go.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use bpf_tests::{
    agent::{Agent, PinDir, TempDir, xlb},
    topo::{CLIENT4, SERVER4, Topology},
};

const NODE_ADDR: &str = "172.31.1.1";

fn manifests(endpoints: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| format!("- addresses: [{a}]\n  conditions: {{ready: true}}\n  nodeName: node-t\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: test}}
spec:
  type: NodePort
  clusterIP: 10.96.7.7
  ports: [{{name: tcp, port: 7, targetPort: 8080, nodePort: 30007}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, namespace: test, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports: [{{name: tcp, port: 8080}}]
endpoints:
{eps}"#
    )
}

/// Echoes lines back, prefixed with the peer address the server saw.
fn echo_server(topo: &Topology, addr: SocketAddr) {
    let listener = {
        let _in = topo.server.enter();
        TcpListener::bind(addr).expect("bind")
    };
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { break };
            thread::spawn(move || {
                let peer = s.peer_addr().unwrap();
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(w, "{peer} {line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
}

struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(topo: &Topology, to: SocketAddr) -> Self {
        let s = {
            let _in = topo.client.enter();
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect through xlb")
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self { w: s.try_clone().unwrap(), r: BufReader::new(s) }
    }

    /// Sends a line and returns the echo (peer the server saw, and the line).
    fn say(&mut self, msg: &str) -> String {
        writeln!(self.w, "{msg}").expect("send");
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap_or_else(|e| panic!("no echo of {msg:?}: {e}"));
        line.trim_end().to_string()
    }
}

fn agent_args(pins: &PinDir, dir: &TempDir, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--manifests",
        &dir.path.display().to_string(),
        "--node-name",
        "node-t",
        "--node-address",
        NODE_ADDR,
        "--xdp-interfaces",
        "n0,n1",
        "--pin-dir",
        &pins.arg(),
        "--http-address",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The three namespaces, ready for the agent's XDP on n0 and n1.
fn xdp_topology() -> Topology {
    let topo = Topology::new();
    topo.xdp_senders_fill_checksums();
    topo
}

#[test]
fn established_connection_survives_agent_restart() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    std::fs::write(dir.path.join("echo.yaml"), manifests(&[SERVER4])).unwrap();
    echo_server(&topo, SocketAddr::new(SERVER4.parse().unwrap(), 8080));
    let vip: SocketAddr = format!("{NODE_ADDR}:30007").parse().unwrap();

    let mut first = Agent::start(&topo.node, dir.path.join("agent1.log"), &agent_args(&pins, &dir, &[]));
    assert!(first.log_text().contains("XDP on a veth: its peer must fill in checksums"), "{}", first.log_text());
    let mut conn = Conn::open(&topo, vip);
    let client_port = conn.w.local_addr().unwrap().port();
    let echo = conn.say("before");
    assert_eq!(echo, format!("{CLIENT4}:{client_port} before"), "the backend sees the real client");

    // No agent at all: the pinned datapath keeps forwarding.
    first.stop();
    assert!(first.log_text().contains("programs stay attached"), "{}", first.log_text());
    assert!(conn.say("between").ends_with(" between"));
    // New connections too: the new-flow program is reached through the
    // tail-call table, which lives as long as its pin.
    assert!(Conn::open(&topo, vip).say("new while stopped").ends_with(" new while stopped"));

    // A new agent takes over from the pins without touching the flow.
    let second = Agent::start(&topo.node, dir.path.join("agent2.log"), &agent_args(&pins, &dir, &[]));
    let log = second.log_text();
    // The ClusterIP and the NodePort on n0's and n1's addresses.
    assert!(log.contains("continuing from the pinned maps services=3 backends=1"), "{log}");
    assert!(log.contains("how=Updated"), "the pinned XDP links were swapped to the new programs: {log}");
    assert!(log.contains("changed=0"), "nothing to re-program: {log}");
    for i in 0..20 {
        assert!(conn.say(&format!("after {i}")).ends_with(&format!(" after {i}")));
    }
    // Its conntrack entry is the one from before the restart.
    let ct = xlb(&topo.node, &["dump", "--pin-dir", &pins.arg(), "-o", "json", "conntrack"]);
    let ct: serde_json::Value = serde_json::from_str(&ct).unwrap();
    let mine = format!("{CLIENT4}:{client_port}");
    let fwd = ct.as_array().unwrap().iter().find(|e| e["source"] == mine.as_str() && e["direction"] == "forward");
    let fwd = fwd.unwrap_or_else(|| panic!("no conntrack entry for {mine}: {ct:#}"));
    assert_eq!(fwd["backend"], format!("{SERVER4}:8080").as_str());
    assert_eq!(fwd["state"], "established");
    assert_eq!(fwd["service"], "test/echo:tcp");

    // And new connections are balanced as before.
    assert!(Conn::open(&topo, vip).say("new").ends_with(" new"));
    drop(second);
}

#[test]
fn file_edits_reach_the_maps_and_bad_services_are_isolated() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    let file = dir.path.join("echo.yaml");
    std::fs::write(&file, manifests(&[SERVER4])).unwrap();
    let mut agent = Agent::start(&topo.node, dir.path.join("agent.log"), &agent_args(&pins, &dir, &[]));
    let backends = |pins: &PinDir| -> Vec<String> {
        let out = xlb(&topo.node, &["dump", "--pin-dir", &pins.arg(), "-o", "json", "backends"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array().unwrap().iter().map(|b| b["backend"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(backends(&pins), [format!("{SERVER4}:8080")]);

    // An edit adds a backend; a bad document and an SCTP-only service in a
    // second file are reported without disturbing the good service.
    let started = Instant::now();
    std::fs::write(&file, manifests(&[SERVER4, "172.31.2.3"])).unwrap();
    std::fs::write(
        dir.path.join("bad.yaml"),
        "kind: Service\nmetadata: {name: s, namespace: test}\nspec: {clusterIP: 10.96.7.8, ports: [{port: 9, protocol: SCTP}]}\n---\nkind: Service\nspec: {ports: 7}\n",
    )
    .unwrap();
    agent.wait_log("synced", 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends(&pins).len() != 2 {
        assert!(Instant::now() < deadline, "the edit never reached the maps:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("edit → maps in {:?}", started.elapsed());
    let log = agent.log_text();
    assert!(log.contains("SCTP is not supported"), "{log}");
    assert!(log.contains("bad Service"), "{log}");
    let svcs = xlb(&topo.node, &["dump", "--pin-dir", &pins.arg(), "-o", "json", "services"]);
    let svcs: serde_json::Value = serde_json::from_str(&svcs).unwrap();
    // The ClusterIP, and the NodePort on both of the node's IPv4 addresses
    // (n0's, n1's: NodePorts open on every local address, as kube-proxy's).
    assert_eq!(svcs.as_array().unwrap().len(), 3, "ClusterIP + 2 NodePorts of test/echo: {svcs:#}");

    // Removing the files removes the service and its backends.
    std::fs::remove_file(&file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !backends(&pins).is_empty() {
        assert!(Instant::now() < deadline, "removal never reached the maps:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tc_follows_interfaces_matching_the_pattern() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    std::fs::write(dir.path.join("echo.yaml"), manifests(&[SERVER4])).unwrap();
    let mut agent = Agent::start(
        &topo.node,
        dir.path.join("agent.log"),
        &agent_args(&pins, &dir, &["--tc-interface-pattern", "pod*"]),
    );
    let pin = pins.path.join("links/tc-ingress@podA");
    topo.node.exec(&["ip", "link", "add", "podA", "type", "veth", "peer", "name", "podB"]);
    agent.wait_log("ifname=\"podA\"", 1);
    assert!(pin.exists(), "{}", agent.log_text());
    assert!(pins.path.join("links/tc-ingress@podB").exists(), "both ends match the pattern");
    assert!(!pins.path.join("links/tc-ingress@n0").exists(), "n0 does not match");
    topo.node.exec(&["ip", "link", "del", "podA"]);
    agent.wait_log("interface gone", 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pin.exists() {
        assert!(Instant::now() < deadline, "the pin of a deleted interface stayed:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on `addr` from inside `topo.node`; returns (status, body).
fn http_get(topo: &Topology, addr: &str, path: &str) -> (u16, String) {
    bpf_tests::cluster::http_get(&topo.node, addr.parse().unwrap(), path)
}

#[test]
fn metrics_readiness_and_the_local_traffic_health_check() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    let file = dir.path.join("echo.yaml");
    let local = |node: &str| {
        manifests(&[SERVER4])
            .replace(
                "type: NodePort",
                "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100",
            )
            .replace("nodeName: node-t", &format!("nodeName: {node}"))
    };
    std::fs::write(&file, local("node-t")).unwrap();
    echo_server(&topo, SocketAddr::new(SERVER4.parse().unwrap(), 8080));
    let mut args = agent_args(&pins, &dir, &[]);
    let http = args.iter().position(|a| a == "none").unwrap();
    args[http] = "127.0.0.1:10249".into();
    let mut agent = Agent::start(&topo.node, dir.path.join("agent.log"), &args);

    eprintln!("AGENTLOG {}", agent.log_text());
    assert_eq!(http_get(&topo, "127.0.0.1:10249", "/readyz").0, 200);
    assert_eq!(http_get(&topo, "127.0.0.1:10249", "/healthz").0, 200);
    let (code, body) = http_get(&topo, "127.0.0.1:32100", "/");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["service"]["name"], "echo");

    // Traffic shows up in the metrics, per service and backend.
    let vip: SocketAddr = format!("{NODE_ADDR}:30007").parse().unwrap();
    let mut c = Conn::open(&topo, vip);
    assert!(c.say("hello").ends_with(" hello"));
    let (_, m) = http_get(&topo, "127.0.0.1:10249", "/metrics");
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("xlb_service_packets_total{service=\"test/echo:tcp\",frontend=\"172.31.1.1:30007/tcp\"")
                && l.contains("scope=\"external\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 3, "{line}");
    assert!(m.contains(&format!("xlb_backend_packets_total{{backend=\"{SERVER4}:8080\"}}")), "{m}");
    assert!(m.contains("xlb_packets_by_verdict_total{reason=\"new_flow\"} 1"), "{m}");
    assert!(m.contains("xlb_conntrack_entries 2"), "{m}");
    // The connection is open and answered: one active connection on its
    // backend, counted by the datapath; the table's size and events.
    assert!(m.contains(&format!("xlb_backend_active_connections{{backend=\"{SERVER4}:8080\"}} 1")), "{m}");
    assert!(m.contains("xlb_conntrack_capacity_flows "), "{m}");
    assert!(m.contains("xlb_conntrack_events_total{event=\"insert_full\"} 0"), "{m}");
    assert!(m.contains("xlb_programming_latency_seconds_count 1"), "{m}");

    // The endpoint moves to another node: 503, zero local endpoints.
    std::fs::write(&file, local("elsewhere")).unwrap();
    agent.wait_log("synced", 2);
    let (code, body) = http_get(&topo, "127.0.0.1:32100", "/");
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["localEndpoints"].as_u64(), v["serviceProxyHealthy"].as_bool()), (Some(0), Some(true)), "{body}");
}

/// kube-proxy's health server on its default port, 10256, as
/// `healthcheck/proxy_health.go` answers it and sig-network's
/// "should check kube-proxy urls" (networking.go) probes it: `/healthz`
/// and `/livez` 200 with kube-proxy's JSON; a Node the cluster autoscaler
/// tainted for deletion (then one being deleted) fails `/healthz` only,
/// and a healthCheckNodePort keeps reporting the proxy itself healthy.
#[test]
fn the_health_server_answers_as_kube_proxy() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    let svc = manifests(&[SERVER4])
        .replace("type: NodePort", "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100");
    std::fs::write(dir.path.join("echo.yaml"), &svc).unwrap();
    let node = |rest: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-t{rest}\n");
    std::fs::write(dir.path.join("node.yaml"), node("}")).unwrap();
    let agent = Agent::start(&topo.node, dir.path.join("agent.log"), &agent_args(&pins, &dir, &[]));
    let get = |path: &str| {
        let (code, body) = http_get(&topo, &format!("{NODE_ADDR}:10256"), path);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (code, v)
    };
    // A Node change programs nothing, so it logs nothing: poll.
    let healthz_becomes = |want: u16| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let (code, v) = get("/healthz");
            if code == want {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "/healthz stayed {code}: {v}");
            thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let (code, v) = get("/healthz");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["nodeEligible"], true, "{v}");
    for key in ["lastUpdated", "currentTime"] {
        assert!(v[key].as_str().is_some_and(|t| t.ends_with(" +0000 UTC")), "{key}: {v}");
    }
    let (code, v) = get("/livez");
    assert_eq!(code, 200, "{v}");
    assert!(v.get("nodeEligible").is_none(), "/livez has no node field: {v}");

    for (what, rest) in [
        (
            "tainted",
            "}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]}",
        ),
        ("being deleted", ", deletionTimestamp: '2026-12-02T00:00:00Z'}"),
    ] {
        std::fs::write(dir.path.join("node.yaml"), node(rest)).unwrap();
        let v = healthz_becomes(503);
        assert_eq!(v["nodeEligible"], false, "{what}: {v}");
        assert_eq!(get("/livez").0, 200, "{what}: /livez skips the node checks");
        let (code, body) = http_get(&topo, "127.0.0.1:32100", "/");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((code, &v["serviceProxyHealthy"]), (200, &serde_json::Value::Bool(true)), "{what}: {body}");
        std::fs::write(dir.path.join("node.yaml"), node("}")).unwrap();
        healthz_becomes(200);
    }
    drop(agent);

    // With --nodeport-addresses the healthCheckNodePort listens on the
    // NodePort addresses only (service_health.go), not on loopback.
    let args = agent_args(&pins, &dir, &["--nodeport-addresses", "172.31.1.0/24"]);
    let _agent = Agent::start(&topo.node, dir.path.join("agent2.log"), &args);
    assert_eq!(http_get(&topo, &format!("{NODE_ADDR}:32100"), "/").0, 200);
    let refused = |addr: &str| {
        let c = bpf_tests::cluster::in_ns(&topo.node, || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), std::time::Duration::from_secs(1))
        });
        c.map_err(|e| e.kind()).err() == Some(std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused("127.0.0.1:32100"), "not on loopback");
    assert!(refused("172.31.2.1:32100"), "not on n1's address, outside the CIDR");
    // A new address inside the CIDR: the server reopens on both (the old
    // socket closed before the port is bound again).
    topo.node.exec(&["ip", "addr", "add", "172.31.1.88/24", "dev", "n0"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while refused("172.31.1.88:32100") {
        assert!(std::time::Instant::now() < deadline, "the health check never opened on the new address");
        thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(http_get(&topo, "172.31.1.88:32100", "/").0, 200);
    assert_eq!(http_get(&topo, &format!("{NODE_ADDR}:32100"), "/").0, 200, "still on the first address");
}

#[test]
fn dump_explain_predicts_where_a_flow_lands() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    // Two backends: a second address on the server.
    topo.server.exec(&["ip", "addr", "add", "172.31.2.3/24", "dev", "s0"]);
    std::fs::write(dir.path.join("echo.yaml"), manifests(&[SERVER4, "172.31.2.3"])).unwrap();
    let listener = {
        let _in = topo.server.enter();
        TcpListener::bind("0.0.0.0:8080").unwrap()
    };
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let local = s.local_addr().unwrap();
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if writeln!(w, "{local} {line}").is_err() {
                    break;
                }
            }
        }
    });
    let _agent = Agent::start(&topo.node, dir.path.join("agent.log"), &agent_args(&pins, &dir, &[]));
    let explain = |client: &str| -> serde_json::Value {
        let out = xlb(
            &topo.node,
            &["dump", "--pin-dir", &pins.arg(), "-o", "json", "explain", client, &format!("{NODE_ADDR}:30007"), "tcp"],
        );
        serde_json::from_str(&out).unwrap()
    };
    let mut seen = std::collections::BTreeSet::new();
    for port in 40_000..40_012u16 {
        let client = format!("{CLIENT4}:{port}");
        let before = explain(&client);
        assert_eq!(before["answer"]["reason"], "maglev", "{before:#}");
        let predicted = before["answer"]["backend"].as_str().unwrap().to_string();
        // Connect from exactly that source port.
        let s = {
            let _in = topo.client.enter();
            connect_from(&client, &format!("{NODE_ADDR}:30007"))
        };
        let mut c = Conn { w: s.try_clone().unwrap(), r: BufReader::new(s) };
        let answer = c.say("hi");
        let landed = answer.split(' ').next().unwrap();
        assert_eq!(landed, predicted, "explain predicted the backend of a new flow");
        seen.insert(predicted);
        let after = explain(&client);
        assert_eq!(after["answer"]["reason"], "conntrack", "{after:#}");
        assert_eq!(after["answer"]["backend"], before["answer"]["backend"]);
    }
    assert_eq!(seen.len(), 2, "12 flows over 2 backends used both");
    let none = explain("172.31.1.2:1");
    assert_eq!(none["answer"]["reason"], "maglev");
    let out = xlb(&topo.node, &["dump", "--pin-dir", &pins.arg(), "explain", "1.1.1.1:1", "10.1.2.3:80", "udp"]);
    assert!(out.contains("not a frontend"), "{out}");
}

/// A TCP connection from a fixed source address and port.
fn connect_from(src: &str, dst: &str) -> TcpStream {
    use std::os::fd::FromRawFd as _;
    let src: SocketAddr = src.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    let (SocketAddr::V4(s4), SocketAddr::V4(d4)) = (src, dst) else { panic!("IPv4 only") };
    // SAFETY: plain socket calls on a fresh descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const _, 4);
        let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        };
        let (s, d) = (sa(s4), sa(d4));
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        assert_eq!(
            libc::bind(fd, &s as *const _ as *const _, len),
            0,
            "bind {src}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::connect(fd, &d as *const _ as *const _, len),
            0,
            "connect {dst}: {}",
            std::io::Error::last_os_error()
        );
        let t = TcpStream::from_raw_fd(fd);
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        t
    }
}

#[test]
fn xdp_falls_back_to_generic_mode_where_native_is_missing() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    std::fs::write(dir.path.join("echo.yaml"), manifests(&[SERVER4])).unwrap();
    // A bridge device has no native XDP.
    topo.node.exec(&["ip", "link", "add", "d0", "type", "bridge"]);
    topo.node.exec(&["ip", "link", "set", "d0", "up"]);
    let mut args = agent_args(&pins, &dir, &[]);
    let i = args.iter().position(|a| a == "n0,n1").unwrap();
    args[i] = "n0,d0".into();
    let agent = Agent::start(&topo.node, dir.path.join("agent.log"), &args);
    let log = agent.log_text();
    assert!(log.contains("native XDP failed; using generic (skb) mode"), "{log}");
    assert!(log.contains("ifname=\"d0\" how=Generic"), "{log}");
    assert!(log.contains("ifname=\"n0\" how=New"), "{log}");
    assert!(pins.path.join("links/xdp@d0").exists());
}

/// NodePorts open on the node's own addresses, found over rtnetlink and
/// followed (kube-proxy opens them on every local address): no
/// `--node-address` needed; an address added to n0 gets the NodePort and
/// carries traffic; removed, the NodePort goes with it.
#[test]
fn node_ports_follow_the_node_addresses() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    std::fs::write(dir.path.join("echo.yaml"), manifests(&[SERVER4])).unwrap();
    echo_server(&topo, SocketAddr::new(SERVER4.parse().unwrap(), 8080));
    let mut args = agent_args(&pins, &dir, &[]);
    let at = args.iter().position(|a| a == "--node-address").unwrap();
    args.drain(at..at + 2);
    let _agent = Agent::start(&topo.node, dir.path.join("agent.log"), &args);
    let nodeports = || {
        let out = xlb(&topo.node, &["dump", "--pin-dir", &pins.arg(), "-o", "json", "services"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut a: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["kind"] == "NodePort")
            .map(|f| f["address"].as_str().unwrap().to_string())
            .collect();
        a.sort();
        a
    };
    let until = |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = nodeports();
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "NodePorts on {got:?}, want {want:?}");
            thread::sleep(Duration::from_millis(50));
        }
    };
    until(&[NODE_ADDR, "172.31.2.1"]);
    // `--dry-run` finds the same addresses.
    let dir_arg = dir.path.display().to_string();
    let dry = xlb(&topo.node, &["agent", "--manifests", &dir_arg, "--node-name", "node-t", "--dry-run"]);
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    let mut on: Vec<&str> = dry["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "node-port")
        .map(|f| f["address"].as_str().unwrap())
        .collect();
    on.sort();
    assert_eq!(on, [NODE_ADDR, "172.31.2.1"], "--dry-run: {dry:#}");
    let mut c = Conn::open(&topo, format!("{NODE_ADDR}:30007").parse().unwrap());
    assert!(c.say("first").ends_with(" first"));

    topo.node.exec(&["ip", "addr", "add", "172.31.1.77/24", "dev", "n0"]);
    until(&[NODE_ADDR, "172.31.1.77", "172.31.2.1"]);
    let mut c = Conn::open(&topo, "172.31.1.77:30007".parse().unwrap());
    assert!(c.say("new address").ends_with(" new address"));

    topo.node.exec(&["ip", "addr", "del", "172.31.1.77/24", "dev", "n0"]);
    until(&[NODE_ADDR, "172.31.2.1"]);
}

/// The next-hop cache follows the node's neighbours and rules (issue #13):
/// a backend whose MAC changes behind the same address (a replaced pod, a
/// failover) moves `route_epoch`, so the next connection reaches it at once
/// rather than after the cache's second — a SYN sent to the old MAC would be
/// lost and retried only a second later; an `ip rule` selecting by source
/// turns the per-backend cache off until it is gone.
#[test]
fn new_connections_reach_a_backend_at_its_new_mac_at_once() {
    let topo = xdp_topology();
    let pins = PinDir::new();
    let dir = TempDir::new();
    std::fs::write(dir.path.join("echo.yaml"), manifests(&[SERVER4])).unwrap();
    echo_server(&topo, SocketAddr::new(SERVER4.parse().unwrap(), 8080));
    let _agent = Agent::start(&topo.node, dir.path.join("agent.log"), &agent_args(&pins, &dir, &[]));
    let stats = || -> serde_json::Value {
        serde_json::from_str(&xlb(&topo.node, &["dump", "--pin-dir", &pins.arg(), "-o", "json", "stats"])).unwrap()
    };
    let eventually = |what: &str, ok: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = stats();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    let nodeport: SocketAddr = format!("{NODE_ADDR}:30007").parse().unwrap();
    eventually("the agent is up, caching per backend", &|s| s["next_hop_cache"] == true);
    // The first connection resolves the server's neighbour (its SYN goes to
    // the kernel, `fib_pass`); the second one's route is looked up by XDP
    // and cached.
    let mut c = Conn::open(&topo, nodeport);
    assert!(c.say("first").ends_with(" first"));
    let fib_pass = stats()["verdicts"]["fib_pass"].clone();
    let mut c1 = Conn::open(&topo, nodeport);
    assert!(c1.say("second").ends_with(" second"));
    let s = stats();
    assert_eq!(s["verdicts"]["fib_pass"], fib_pass, "the second connection went by XDP");
    let epoch = s["route_epoch"].as_u64().unwrap();

    // The server gets a new MAC and the node learns it (as from a gratuitous ARP).
    topo.server.exec(&["ip", "link", "set", "s0", "address", "02:00:00:00:5e:01"]);
    topo.node.exec(&["ip", "neigh", "replace", SERVER4, "lladdr", "02:00:00:00:5e:01", "dev", "n1"]);
    eventually("the neighbour change moved the route epoch", &|s| s["route_epoch"].as_u64() != Some(epoch));
    let started = Instant::now();
    let mut c2 = Conn::open(&topo, nodeport);
    assert!(c2.say("after the move").ends_with(" after the move"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "connected in {:?}: its SYN went to the old MAC",
        started.elapsed()
    );

    topo.node.exec(&["ip", "rule", "add", "from", "10.99.0.0/16", "lookup", "100", "pref", "100"]);
    eventually("a source rule turns the cache off", &|s| s["next_hop_cache"] == false);
    let mut c3 = Conn::open(&topo, nodeport);
    assert!(c3.say("no cache").ends_with(" no cache"));
    topo.node.exec(&["ip", "rule", "del", "pref", "100"]);
    eventually("and on again once the rule is gone", &|s| s["next_hop_cache"] == true);
}
