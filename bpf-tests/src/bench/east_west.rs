// SPDX-License-Identifier: MIT OR Apache-2.0
//! East-west connections from a pod to a ClusterIP, per path: socket-level
//! load balancing (xlb's cgroup programs; TC stays attached, as on a node),
//! xlb's TC programs per packet, kube-proxy's iptables and nftables rules
//! (the same chains as the throughput runs, for a TCP service), and the
//! direct pod → backend floor with nothing installed. At each size the
//! target is the *last* of N ClusterIP services.
//!
//! ```text
//!   pod ns                    node ns (the system under test)       backend ns
//!   c0 10.244.1.2 ──veth── p1 10.244.1.1 | p2 10.98.0.1 ──veth── s0 10.98.0.2, .3 (`xlb-client serve` :8080)
//! ```
//! The client is one `xlb-client` process in the pod's namespace and in a
//! test cgroup (the socket-LB programs attach to that cgroup only for the
//! socket-LB row): `conn-rate` (a pool of threads, each connecting, sending
//! one line, reading the answer and closing) and `rr-latency` (round trips
//! on one connection, p50 / p99).

use std::process::{Child, Command, Stdio};

use aya::programs::{SchedClassifier, TcAttachType};
use serde::Serialize;
use xlb::{Datapath, translate::Options, writer::Writer};

use super::{model, node_info, xlb_sizes};
use crate::{
    NetNs,
    agent::PinDir,
    cgroup::{Cgroup, client},
};

/// One path at one size.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// `socket-lb`, `tc`, `iptables-nft`, `nftables` or `direct`.
    pub path: &'static str,
    pub services: u32,
    /// Connections (connect, one request/response, close) per second.
    pub connections_per_s: f64,
    /// Failed connections during the rate run (should be 0).
    pub errors: u64,
    /// Request/response round trip on one connection, µs.
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
}

pub const PATHS: [&str; 5] = ["socket-lb", "tc", "iptables-nft", "nftables", "direct"];
const THREADS: &str = "4";

struct Net {
    pod: NetNs,
    node: NetNs,
    backend: NetNs,
    echo: Child,
}

impl Net {
    fn new() -> Self {
        let (pod, node, backend) = super::stream::pod_node_backend(["xlbep", "xlben", "xlbeb"]);
        node.exec_lines(&[
            "ip addr add 10.244.1.1/24 dev p1",
            "ip addr add 10.98.0.1/24 dev p2",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
        ]);
        pod.exec_lines(&[
            "ip link set c0 up",
            "ip addr add 10.244.1.2/24 dev c0",
            "ip route add default via 10.244.1.1",
            // Closed connections' ports come back at once (TIME_WAIT reuse),
            // or a few seconds of churn would run out of them.
            "sysctl -qw net.ipv4.tcp_tw_reuse=1",
        ]);
        backend.exec_lines(&[
            "ip link set s0 up",
            "ip addr add 10.98.0.2/24 dev s0",
            "ip addr add 10.98.0.3/24 dev s0",
            "ip route add default via 10.98.0.1",
        ]);
        let (c0, s0) = (pod.mac("c0"), backend.mac("s0"));
        super::stream::neighbours(
            &node,
            &[("10.244.1.2", &c0, "p1"), ("10.98.0.2", &s0, "p2"), ("10.98.0.3", &s0, "p2")],
        );
        let echo = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", backend.name))
            .arg(crate::cgroup::client_bin())
            .args(["serve", &format!("0.0.0.0:{}", model::TARGET_PORT), "8"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server");
        Self { pod, node, backend, echo }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.echo.kill();
        let _ = self.echo.wait();
        let _ = &self.backend;
    }
}

/// What a path installs on the node; dropped when the path's rows are done.
#[allow(dead_code)]
enum Installed {
    Nothing,
    Xlb { dp: Datapath, pins: Option<PinDir> },
    Rules(crate::agent::TempDir),
}

fn install(path: &str, net: &Net, svcs: &[model::Svc], cg: &Cgroup) -> anyhow::Result<Installed> {
    match path {
        "direct" => Ok(Installed::Nothing),
        "socket-lb" | "tc" => {
            let mut dp = Datapath::load(xlb_sizes(svcs.len() as u32))?;
            dp.load_programs()?;
            let (services, slices) = model::objects_tcp(svcs);
            let d = xlb::translate::Translator::default().translate_shared(
                &services,
                &slices,
                &node_info(),
                &Options::default(),
            );
            let report = Writer::new(&dp).apply(&mut dp, &d);
            anyhow::ensure!(report.failed.is_empty() && d.problems.is_empty(), "xlb did not program everything");
            {
                let _in = net.node.enter();
                let p: &mut SchedClassifier = dp.program_mut("xlb_tc_ingress").unwrap().try_into()?;
                for ifname in ["p1", "p2"] {
                    p.attach(ifname, TcAttachType::Ingress)?;
                }
            }
            let pins = if path == "socket-lb" {
                let pins = PinDir::new();
                xlb::attach::prepare_pin_dir(&pins.path)?;
                xlb::socket_lb::attach(&mut dp, &pins.path, &cg.path)?;
                Some(pins)
            } else {
                None
            };
            Ok(Installed::Xlb { dp, pins })
        }
        "iptables-nft" | "nftables" => {
            let dir = crate::agent::TempDir::new();
            let (file, cmd) = if path == "nftables" {
                (dir.path.join("rules.nft"), vec!["nft", "-f"])
            } else {
                (dir.path.join("rules"), vec!["iptables-nft-restore"])
            };
            let text = if path == "nftables" { model::nft_full(svcs) } else { model::iptables_full(svcs) };
            std::fs::write(&file, model::as_tcp(&text))?;
            let mut args = cmd;
            args.push(file.to_str().unwrap());
            net.node.exec(&args);
            Ok(Installed::Rules(dir))
        }
        other => anyhow::bail!("unknown path {other}"),
    }
}

/// One path, set up and answering.
struct Setup {
    path: &'static str,
    net: Net,
    cg: Cgroup,
    to: String,
    _installed: Installed,
}

impl Setup {
    fn new(path: &'static str, svcs: &[model::Svc]) -> anyhow::Result<Self> {
        let net = Net::new();
        let cg = Cgroup::new();
        let installed = install(path, &net, svcs, &cg)?;
        // The floor connects to the same two backends the service has,
        // alternating (one address would make its own TIME_WAIT contention).
        let to = if path == "direct" {
            model::BACKENDS.map(|b| format!("{b}:{}", model::TARGET_PORT)).join(",")
        } else {
            format!("{}:{}", svcs.last().expect("a service").cluster_ip, model::PORT)
        };
        // The server is up once a request gets its answer.
        for _ in 0..50 {
            if client(&net.pod, &cg, &["tcp", &to, "hello"]).is_ok() {
                return Ok(Self { path, net, cg, to, _installed: installed });
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::bail!("{path} × {}: no answer from {to}", svcs.len())
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec![args[0], self.to.as_str()];
        full.extend_from_slice(&args[1..]);
        client(&self.net.pod, &self.cg, &full).map_err(|e| anyhow::anyhow!("{} {}: {e}", self.path, args[0]))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Measures every path at every size in `sizes`: `rounds` rounds, each
/// running every path in turn (so no path gets a quieter machine), of
/// `seconds` of connection churn and `round_trips` request/responses; the
/// median round of each.
pub fn measure(sizes: &[u32], seconds: f64, round_trips: u32, rounds: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let num = |s: &str, k: &str| crate::cgroup::field(s, k).parse::<f64>().unwrap_or(0.0);
    for &n in sizes {
        let svcs = model::services(n);
        let setups = PATHS.iter().map(|p| Setup::new(p, &svcs)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut rate = vec![Vec::new(); setups.len()];
        let mut errors = vec![0u64; setups.len()];
        let mut p50 = vec![Vec::new(); setups.len()];
        let mut p99 = vec![Vec::new(); setups.len()];
        for _ in 0..rounds.max(1) {
            for (i, s) in setups.iter().enumerate() {
                let r = s.run(&["conn-rate", THREADS, &seconds.to_string()])?;
                rate[i].push(num(&r, "per_sec"));
                errors[i] += num(&r, "errors") as u64;
                let l = s.run(&["rr-latency", &round_trips.to_string()])?;
                p50[i].push(num(&l, "p50_us"));
                p99[i].push(num(&l, "p99_us"));
            }
        }
        for (i, s) in setups.iter().enumerate() {
            rows.push(Row {
                path: s.path,
                services: n,
                connections_per_s: median(std::mem::take(&mut rate[i])),
                errors: errors[i],
                rr_p50_us: median(std::mem::take(&mut p50[i])),
                rr_p99_us: median(std::mem::take(&mut p99[i])),
            });
        }
    }
    Ok(rows)
}
