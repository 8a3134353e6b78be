// SPDX-License-Identifier: MIT OR Apache-2.0
//! A Kubernetes-shaped cluster in network namespaces, with a real
//! `xlb agent` per node: the harness the end-to-end tests and the demo use.
//!
//! ```text
//!                          fabric ns: bridge br0 (the underlay)
//!        ┌──────────────────────┬──────────────────────┬──────────────────┐
//!   node-1 eth0 192.168.60.1   node-2 eth0 192.168.60.2   external 192.168.60.200
//!   (XDP)  fd60::1             (XDP)  fd60::2              fd60::200
//!    │ vethN (TC) ─ pod eth0 10.244.1.x, fd44:1::x
//!    │ …
//! ```
//! - Each node has pod CIDRs 10.244.N.0/24 and fd44:N::/64, routes to the
//!   other nodes' pod CIDRs over the underlay, and runs `xlb agent
//!   --manifests DIR --xdp-interfaces eth0 --tc-interface-pattern 'veth*'`
//!   with its own pin directory.
//! - A pod is a namespace behind a veth; its default gateway is the node side
//!   (169.254.1.1 / fe80::1, as Calico does). Backend pods run `xlb-echo`.
//! - The external client routes the LoadBalancer and externalIP ranges
//!   (198.51.100.0/24, 80.11.12.0/24, 2001:db8:5::/64) to node-1, as an
//!   upstream router would.
//! - The harness writes the Services it is given and EndpointSlices it
//!   derives from the pods (selector `app`, conditions, nodeName) into the
//!   shared manifests directory; every agent picks changes up.
//! - Or, in API mode ([`Cluster::use_api`], `api.rs`), the agents watch an
//!   API-server emulator on the underlay, to which the harness applies the
//!   same objects.
//!
//! Names are unique per run; namespaces, processes, pins and files are
//! removed on drop, also when a test fails. `cargo xtask clean` removes the
//! leftovers of a killed run.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

mod api;
pub mod lb;
pub mod probe;
pub use api::{AGENT_NAMESPACE, API4, Api};

use crate::{
    NetNs,
    agent::{Agent, PinDir, TempDir, xlb, xlb_bin},
    cgroup::{Cgroup, Running},
};

/// Underlay address of node `i` (1-based).
pub fn node_addr4(i: usize) -> String {
    format!("192.168.60.{i}")
}

pub fn node_addr6(i: usize) -> String {
    format!("fd60::{i}")
}

pub const EXTERNAL4: &str = "192.168.60.200";
pub const EXTERNAL6: &str = "fd60::200";

/// Readiness of a pod as the EndpointSlices show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    Ready,
    /// Being deleted: `ready: false, serving: true, terminating: true`.
    Terminating,
    /// Failing its readiness probe: `ready: false, serving: false`.
    NotReady,
    /// Not in any EndpointSlice.
    Gone,
}

pub struct Node {
    pub ns: NetNs,
    pub index: usize,
    pub pins: PinDir,
    /// The node's cgroup: its agent attaches socket-LB here
    /// (`--cgroup-path`), and the node's client processes run in it
    /// (`Cluster::client`).
    pub cgroup: Cgroup,
    pub agent: Option<Agent>,
}

pub struct Pod {
    pub ns: NetNs,
    pub name: String,
    /// 1-based node index.
    pub node: usize,
    pub ip4: String,
    pub ip6: String,
    /// `app` label; empty for a plain client pod.
    pub app: String,
    pub state: PodState,
    echo: Option<Child>,
}

pub struct Cluster {
    pub fabric: NetNs,
    pub external: NetNs,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub dir: TempDir,
    /// Service YAML documents as given (without generated slices).
    services: Vec<String>,
    /// Ports every backend pod serves (echo on TCP and UDP).
    echo_ports: Vec<u16>,
    /// Per node: veths created so far.
    veths: Vec<usize>,
    /// Per node (index 0 = node-1): its zone. When set, the manifests hold
    /// a Node per node with its `topology.kubernetes.io/zone` label, and
    /// each endpoint its node's zone (as the EndpointSlice controller
    /// writes it).
    pub zones: Vec<String>,
    /// API mode ([`Cluster::use_api`]): the API server the agents use.
    pub api: Option<Api>,
}

impl Cluster {
    /// `nodes` nodes, no pods yet, agents not started.
    pub fn new(nodes: usize, echo_ports: &[u16]) -> Self {
        let fabric = NetNs::new("xlbf");
        fabric.exec_lines(&["ip link add br0 type bridge", "ip link set br0 up"]);
        let external = NetNs::new("xlbx");
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.path.join("manifests")).unwrap();
        let mut c = Self {
            fabric,
            external,
            nodes: Vec::new(),
            pods: Vec::new(),
            dir,
            services: Vec::new(),
            echo_ports: echo_ports.to_vec(),
            veths: vec![0; nodes + 1],
            zones: Vec::new(),
            api: None,
        };
        c.uplink(&c.external, "x0", EXTERNAL4, EXTERNAL6, false);
        for r in ["198.51.100.0/24", "80.11.12.0/24"] {
            c.external.exec(&["ip", "route", "add", r, "via", &node_addr4(1)]);
        }
        c.external.exec(&["ip", "-6", "route", "add", "2001:db8:5::/64", "via", &node_addr6(1)]);
        for i in 1..=nodes {
            let ns = NetNs::new("xlbn");
            c.uplink(&ns, &format!("u{i}"), &node_addr4(i), &node_addr6(i), true);
            ns.exec_lines(&["sysctl -qw net.ipv4.conf.all.forwarding=1", "sysctl -qw net.ipv6.conf.all.forwarding=1"]);
            for j in 1..=nodes {
                if j != i {
                    ns.exec(&["ip", "route", "add", &format!("10.244.{j}.0/24"), "via", &node_addr4(j)]);
                    ns.exec(&["ip", "-6", "route", "add", &format!("fd44:{j}::/64"), "via", &node_addr6(j)]);
                }
            }
            c.nodes.push(Node { ns, index: i, pins: PinDir::new(), cgroup: Cgroup::new(), agent: None });
        }
        c
    }

    /// Connects `ns` to the bridge with its interface named `eth0` (`xdp`:
    /// a node's, where the agent attaches XDP).
    fn uplink(&self, ns: &NetNs, fabric_side: &str, a4: &str, a6: &str, xdp: bool) {
        let tmp = format!("{fabric_side}p");
        self.fabric.exec_lines(&[&format!("ip link add {fabric_side} type veth peer name {tmp}")]);
        self.fabric.exec(&["ip", "link", "set", &tmp, "netns", &ns.name]);
        // XDP on a node's eth0 sees frames before checksums are completed: a
        // veth hands XDP its peer's CHECKSUM_PARTIAL frames with no way to
        // tell (a physical NIC delivers complete checksums), so the sending
        // peer, the bridge port, fills them in (tx off; TSO goes with it and
        // the port segments in software). The one exception to the kernel's
        // offload defaults; the external client has no XDP. GRO on lets a
        // veth receive frames redirected to it.
        let tx = if xdp { "tx off " } else { "" };
        self.fabric.exec_lines(&[
            &format!("ip link set {fabric_side} master br0 up"),
            &format!("ethtool -K {fabric_side} {tx}gro on"),
        ]);
        ns.exec_lines(&[
            &format!("ip link set {tmp} name eth0"),
            "ip link set eth0 up",
            &format!("ip addr add {a4}/24 dev eth0"),
            &format!("ip -6 addr add {a6}/64 dev eth0 nodad"),
            "ethtool -K eth0 gro on",
        ]);
    }

    /// Adds a pod on node `node` (1-based). Backend pods (non-empty `app`)
    /// run `xlb-echo` on the cluster's echo ports.
    pub fn add_pod(&mut self, name: &str, node: usize, app: &str) -> usize {
        self.veths[node] += 1;
        let k = self.veths[node];
        let ip4 = format!("10.244.{node}.{}", 9 + k);
        let ip6 = format!("fd44:{node}::{:x}", 9 + k);
        let ns = NetNs::new("xlbp");
        let n = &self.nodes[node - 1].ns;
        let veth = format!("veth{k}");
        n.exec_lines(&[&format!("ip link add {veth} type veth peer name tmp{k}")]);
        n.exec(&["ip", "link", "set", &format!("tmp{k}"), "netns", &ns.name]);
        ns.exec_lines(&[
            &format!("ip link set tmp{k} name eth0"),
            "ip link set eth0 up",
            &format!("ip addr add {ip4}/32 dev eth0"),
            &format!("ip -6 addr add {ip6}/128 dev eth0 nodad"),
            "ip route add 169.254.1.1 dev eth0 scope link",
            "ip route add default via 169.254.1.1 dev eth0",
            "ip -6 route add default via fe80::1 dev eth0",
            "ethtool -K eth0 gro on",
        ]);
        n.exec_lines(&[
            &format!("ip link set {veth} up"),
            &format!("ip addr add 169.254.1.1/32 dev {veth} scope link"),
            &format!("ip -6 addr add fe80::1/64 dev {veth} nodad"),
            &format!("ip route add {ip4}/32 dev {veth}"),
            &format!("ip -6 route add {ip6}/128 dev {veth}"),
            &format!("ethtool -K {veth} gro on"),
        ]);
        let echo = (!app.is_empty()).then(|| {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/var/run/netns/{}", ns.name)).arg(echo_bin()).arg(name);
            for p in &self.echo_ports {
                cmd.arg(p.to_string());
            }
            cmd.stdout(Stdio::null()).spawn().expect("start xlb-echo")
        });
        self.pods.push(Pod {
            ns,
            name: name.to_string(),
            node,
            ip4,
            ip6,
            app: app.to_string(),
            state: PodState::Ready,
            echo,
        });
        self.pods.len() - 1
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Adds Service YAML (one or more documents) to the manifests.
    pub fn add_services(&mut self, yaml: &str) {
        self.services.push(yaml.to_string());
    }

    /// Replaces the Service YAML documents.
    pub fn set_services(&mut self, yamls: &[&str]) {
        self.services = yamls.iter().map(|s| s.to_string()).collect();
    }

    pub fn set_pod_state(&mut self, name: &str, state: PodState) {
        self.pods.iter_mut().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}")).state = state;
    }

    /// Writes the Services and the EndpointSlices derived from the pods.
    /// Every Service must have `selector: {app: X}` and ports whose
    /// targetPort is a number or a name from `named_ports`.
    pub fn write_manifests(&self, named_ports: &[(&str, u16)]) {
        let mut out = String::new();
        // A Node per node (with its zone label when zones are set): the
        // agents' shared view of the cluster (L2 ownership needs it).
        for i in 0..self.nodes.len() {
            let labels = match self.zones.get(i) {
                Some(zone) => format!(", labels: {{topology.kubernetes.io/zone: {zone}}}"),
                None => String::new(),
            };
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}{labels}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: \"{}\"}}, {{type: InternalIP, address: \"{}\"}}]}}\n---\n",
                node_addr4(i + 1),
                node_addr6(i + 1),
                n = i + 1
            );
        }
        for s in &self.services {
            out.push_str(s.trim());
            out.push_str("\n---\n");
        }
        let mut snap = xlb::source::Snapshot::default();
        xlb::source::files::parse_into(&mut snap, "services", &out);
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        for svc in &snap.services {
            let spec = svc.spec.as_ref().unwrap();
            let Some(app) = spec.selector.as_ref().and_then(|s| s.get("app")) else { continue };
            let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let name = svc.metadata.name.clone().unwrap();
            let mut ports = String::new();
            for p in spec.ports.iter().flatten() {
                let target = match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n as u16,
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => {
                        named_ports.iter().find(|(n, _)| n == s).map(|(_, p)| *p).expect("named port")
                    }
                    None => p.port as u16,
                };
                let pname = p.name.clone().unwrap_or_default();
                let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                let _ = writeln!(ports, "- {{name: \"{pname}\", port: {target}, protocol: {proto}}}");
            }
            for (family, v6) in [("IPv4", false), ("IPv6", true)] {
                let mut eps = String::new();
                for p in self.pods.iter().filter(|p| &p.app == app && p.state != PodState::Gone) {
                    let cond = match p.state {
                        PodState::Ready => "{ready: true, serving: true, terminating: false}",
                        PodState::NotReady => "{ready: false, serving: false, terminating: false}",
                        _ => "{ready: false, serving: true, terminating: true}",
                    };
                    let addr = if v6 { &p.ip6 } else { &p.ip4 };
                    let zone = self.zones.get(p.node - 1).map(|z| format!("\n  zone: {z}")).unwrap_or_default();
                    let _ = writeln!(
                        eps,
                        "- addresses: [\"{addr}\"]\n  conditions: {cond}\n  nodeName: node-{}{zone}\n  targetRef: {{kind: Pod, namespace: {ns}, name: {}}}",
                        p.node, p.name
                    );
                }
                let eps = if eps.is_empty() { "[]\n".to_string() } else { format!("\n{eps}") };
                let _ = write!(
                    out,
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n{ports}endpoints: {eps}---\n",
                    family.to_lowercase()
                );
            }
        }
        // Write-then-rename, so an agent never reads half a file.
        let tmp = self.dir.path.join("cluster.yaml.tmp");
        std::fs::write(&tmp, &out).unwrap();
        std::fs::rename(&tmp, self.manifests().join("cluster.yaml")).unwrap();
        self.push_to_api(&out);
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path.join("manifests")
    }

    /// Starts (or restarts) the agent of every node and waits for its first sync.
    pub fn start_agents(&mut self, extra: &[&str]) {
        for i in 0..self.nodes.len() {
            self.start_agent(i + 1, extra);
        }
    }

    pub fn agent_args(&self, node: usize, extra: &[&str]) -> Vec<String> {
        let n = &self.nodes[node - 1];
        let source =
            self.api_args().unwrap_or_else(|| vec!["--manifests".into(), self.manifests().display().to_string()]);
        let mut a: Vec<String> = source;
        a.extend([
            "--node-name".into(),
            format!("node-{node}"),
            "--node-address".into(),
            format!("{},{}", node_addr4(node), node_addr6(node)),
            "--xdp-interfaces".into(),
            "eth0".into(),
            "--tc-interface-pattern".into(),
            "veth*".into(),
            "--pin-dir".into(),
            n.pins.arg(),
            "--cgroup-path".into(),
            n.cgroup.arg(),
            "--http-address".into(),
            "127.0.0.1:10249".into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    pub fn start_agent(&mut self, node: usize, extra: &[&str]) {
        let args = self.agent_args(node, extra);
        let log = self.dir.path.join(format!("agent-node-{node}-{}.log", unique_suffix()));
        let n = &mut self.nodes[node - 1];
        n.agent = None; // stop a running one first
        n.agent = Some(Agent::start(&n.ns, log, &args));
    }

    /// Kills node `node`'s agent with SIGKILL (a crash: nothing released).
    pub fn kill_agent(&mut self, node: usize) {
        if let Some(mut a) = self.nodes[node - 1].agent.take() {
            a.kill();
        }
    }

    pub fn stop_agent(&mut self, node: usize) {
        if let Some(mut a) = self.nodes[node - 1].agent.take() {
            a.stop();
        }
    }

    /// Waits until every running agent has synced `times` times in total
    /// since it started (each write of the manifests adds one).
    pub fn wait_synced(&mut self, times: usize) {
        for n in &mut self.nodes {
            if let Some(a) = n.agent.as_mut() {
                a.wait_log("synced", times);
            }
        }
    }

    /// Runs `xlb-client args…` on node `node`: in `ns` (the node's own
    /// namespace, or one of its pods') and in the node's cgroup, where its
    /// agent's socket-LB programs see it.
    pub fn client(&self, node: usize, ns: &NetNs, args: &[&str]) -> Result<String, String> {
        crate::cgroup::client(ns, &self.nodes[node - 1].cgroup, args)
    }

    /// A long-running `xlb-client` on node `node` (see [`Cluster::client`]).
    pub fn client_running(&self, node: usize, ns: &NetNs, args: &[&str]) -> Running {
        Running::start(ns, &self.nodes[node - 1].cgroup, args)
    }

    /// The verdict counters of node `node` (`xlb dump stats`).
    pub fn verdicts(&self, node: usize) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.dump(node, &["-o", "json", "stats"])).expect("stats json");
        v["verdicts"].clone()
    }

    /// One verdict counter of node `node`.
    pub fn verdict(&self, node: usize, name: &str) -> u64 {
        self.verdicts(node)[name].as_u64().unwrap_or_else(|| panic!("no verdict {name}"))
    }

    /// `xlb dump …` on node `node`.
    pub fn dump(&self, node: usize, args: &[&str]) -> String {
        let pins = self.nodes[node - 1].pins.arg();
        let mut full = vec!["dump", "--pin-dir", pins.as_str()];
        full.extend_from_slice(args);
        xlb(&self.nodes[node - 1].ns, &full)
    }
}

fn unique_suffix() -> String {
    crate::unique("")
}

fn echo_bin() -> PathBuf {
    let b = xlb_bin().with_file_name("xlb-echo");
    assert!(b.exists(), "{} is missing: build bpf-tests' binaries", b.display());
    b
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (by PID), then the echo servers, then the namespaces.
        for n in &mut self.nodes {
            n.agent = None;
        }
        for p in &mut self.pods {
            if let Some(mut c) = p.echo.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Runs `f` with the current thread inside `ns`.
pub fn in_ns<T>(ns: &NetNs, f: impl FnOnce() -> T) -> T {
    let _in = ns.enter();
    f()
}

/// One request over TCP from `ns` to `to`: sends `msg`, returns the echo
/// line `POD CLIENT PORT msg`, as (pod, client address as the backend saw
/// it); [`tcp_request_port`] also returns the port the backend served on.
pub fn tcp_request(ns: &NetNs, to: SocketAddr, msg: &str) -> std::io::Result<(String, String)> {
    tcp_request_port(ns, to, msg).map(|(pod, client, _)| (pod, client))
}

pub fn tcp_request_port(ns: &NetNs, to: SocketAddr, msg: &str) -> std::io::Result<(String, String, u16)> {
    let s = in_ns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(3)))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut w = s.try_clone()?;
    writeln!(w, "{msg}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let (pod, client) = parse_echo(&line)?;
    let port = line.split_whitespace().nth(2).and_then(|p| p.parse().ok()).unwrap_or(0);
    Ok((pod, client, port))
}

/// One UDP request from `ns` to `to`.
pub fn udp_request(ns: &NetNs, to: SocketAddr, msg: &str) -> std::io::Result<(String, String)> {
    parse_echo(&udp_echo(ns, to, msg)?)
}

/// One datagram to an echo server and its whole answer (`xlb-echo`'s
/// `NAME <client> <port> <msg>`), from a fresh socket.
pub fn udp_echo(ns: &NetNs, to: SocketAddr, msg: &str) -> std::io::Result<String> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = in_ns(ns, || UdpSocket::bind(any))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = vec![0u8; 65536];
    let (n, _) = s.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn parse_echo(line: &str) -> std::io::Result<(String, String)> {
    let mut it = line.split_whitespace();
    match (it.next(), it.next()) {
        (Some(pod), Some(client)) => Ok((pod.to_string(), client.to_string())),
        _ => Err(std::io::Error::other(format!("bad echo {line:?}"))),
    }
}

/// A long-lived TCP connection to an echo server (see `xlb-echo`'s `stream`).
pub struct Stream {
    r: BufReader<TcpStream>,
    pub pod: String,
}

impl Stream {
    pub fn open(ns: &NetNs, to: SocketAddr) -> std::io::Result<Self> {
        let s = in_ns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(3)))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut w = s.try_clone()?;
        writeln!(w, "stream")?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let (pod, _) = parse_echo(&line)?;
        Ok(Self { r, pod })
    }

    /// Reads the next tick; an error means the connection broke.
    pub fn tick(&mut self) -> std::io::Result<()> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        let (pod, _) = parse_echo(&line)?;
        if pod != self.pod {
            return Err(std::io::Error::other(format!("answered by {pod}, not {}", self.pod)));
        }
        Ok(())
    }
}

/// How requests spread over pods.
pub fn spread(answers: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.clone()).or_default() += 1;
    }
    m
}

/// True when connecting to `to` from `ns` is refused quickly (RST or ICMP
/// unreachable), not timed out.
pub fn refused(ns: &NetNs, to: SocketAddr) -> bool {
    match in_ns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(3))) {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// A TCP connect from `ns` to `to` gets no answer at all within 2 s (the
/// SYN was dropped): neither a connection nor a refusal.
pub fn unanswered(ns: &NetNs, to: SocketAddr) -> bool {
    match in_ns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(2))) {
        Err(e) => e.kind() == std::io::ErrorKind::TimedOut,
        Ok(_) => false,
    }
}

/// Parses an address for the request helpers.
pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// `GET path` over HTTP/1.1 from `ns`; returns (status, body). For the
/// agent's metrics and health endpoints.
pub fn http_get(ns: &NetNs, to: SocketAddr, path: &str) -> (u16, String) {
    let mut s = in_ns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("GET {to}{path}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}
