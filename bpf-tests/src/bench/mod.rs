// SPDX-License-Identifier: MIT OR Apache-2.0
//! The side-by-side benchmark behind `cargo xtask bench`: the same traffic
//! through xlb, kube-proxy's iptables rules (nft and legacy backends), its
//! nftables rules, IPVS (when the kernel has it) and a plain XDP forwarder,
//! at several numbers of services; plus BPF_PROG_TEST_RUN ns/packet, the
//! control plane's programming times and xlb's map memory per service.
//!
//! Every (system, services) pair gets a fresh [`net::Net`]. The JSON it
//! produces is described in docs/benchmarks.md ("JSON schema").

pub mod east_west;
pub mod flood;
pub mod model;
pub mod net;
pub mod report;
pub mod stream;
pub mod test_run;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use serde::Serialize;
use xlb::{
    Datapath, MapSizes,
    translate::{NodeInfo, Options, Translator},
    writer::Writer,
};

use self::net::{Net, Sample};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    Xlb,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    Ipvs,
    XdpForward,
}

impl System {
    pub const ALL: [System; 6] =
        [System::Xlb, System::IptablesNft, System::IptablesLegacy, System::Nftables, System::Ipvs, System::XdpForward];

    pub fn name(self) -> &'static str {
        match self {
            System::Xlb => "xlb",
            System::IptablesNft => "iptables-nft",
            System::IptablesLegacy => "iptables-legacy",
            System::Nftables => "nftables",
            System::Ipvs => "ipvs",
            System::XdpForward => "xdp-forward",
        }
    }

    /// Systems whose control plane is measured (the forwarder has none).
    fn programs_services(self) -> bool {
        self != System::XdpForward
    }
}

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub name: &'static str,
    pub services: Vec<u32>,
    /// Seconds of traffic per measurement (after a short warm-up).
    pub seconds: f64,
    /// Distinct flows of the new-flows runs: more than any run sends, so
    /// every packet opens a new flow.
    pub many_flows: u32,
    /// Frame size without FCS.
    pub packet_size: usize,
    /// A system whose rules do not load within this many seconds is
    /// skipped at that size (and at larger sizes when its load time at a
    /// smaller size, at least 1 s and scaled linearly, predicts the same).
    pub load_bound_s: f64,
    /// BPF_PROG_TEST_RUN repetitions per measurement (0: skip).
    pub test_run_repeat: u32,
    /// The systems to measure.
    pub systems: Vec<System>,
    /// Sizes of the east-west connection runs (`east_west`; empty: none),
    /// seconds of connection churn and round trips per path.
    pub east_west_services: Vec<u32>,
    pub east_west_seconds: f64,
    pub east_west_round_trips: u32,
}

impl Plan {
    /// Seconds per size, for the short run inside `cargo xtask test`.
    pub fn smoke() -> Self {
        Self {
            name: "smoke",
            services: vec![1, 100],
            seconds: 0.3,
            many_flows: 1 << 26,
            packet_size: 60,
            load_bound_s: 30.0,
            test_run_repeat: 100_000,
            systems: System::ALL.to_vec(),
            east_west_services: vec![1],
            east_west_seconds: 0.5,
            east_west_round_trips: 500,
        }
    }

    pub fn standard() -> Self {
        Self {
            name: "standard",
            services: vec![1, 1_000, 10_000],
            seconds: 1.0,
            load_bound_s: 60.0,
            test_run_repeat: 1_000_000,
            east_west_services: vec![1, 10_000],
            east_west_seconds: 2.0,
            east_west_round_trips: 5_000,
            ..Self::smoke()
        }
    }

    pub fn full() -> Self {
        Self {
            name: "full",
            services: vec![1, 1_000, 10_000, 100_000],
            seconds: 2.0,
            load_bound_s: 120.0,
            test_run_repeat: 1_000_000,
            east_west_services: vec![1, 10_000],
            east_west_seconds: 3.0,
            east_west_round_trips: 10_000,
            ..Self::smoke()
        }
    }
}

/// One throughput measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub system: System,
    pub services: u32,
    /// 1 (one established flow) or [`Plan::many_flows`] (a new flow per packet).
    pub flows: u32,
    /// Packets per second delivered to the backend, DNATed (or, for the
    /// forwarder, routed) correctly, per second the sending CPU was busy.
    pub pps: f64,
    /// Packets per busy second the generator sent.
    pub sent_pps: f64,
    /// Softirq CPU time per delivered packet (the node's receive, the
    /// system's work, the forward, the sink): tick-sampled.
    pub cpu_ns_per_packet: f64,
    /// Service packets that reached the backend without being DNATed (a
    /// load balancer must never let one through); 0 for the forwarder.
    pub leaked: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub system: System,
    pub services: Option<u32>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ControlPlane {
    pub system: System,
    pub services: u32,
    /// From nothing to N services programmed.
    pub program_seconds: f64,
    /// One endpoint of one service replaced: the median of three changes,
    /// or the one change when it took over 5 s.
    pub endpoint_change_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub services: u32,
    /// Map entries in use × entry size, per service (each has three
    /// frontends — ClusterIP, LoadBalancer IP, and the LoadBalancer IP as
    /// pods see it, with the Cluster endpoints, since the Services are
    /// externalTrafficPolicy Local — and two backends).
    pub bytes_per_service: f64,
    /// Kernel memory charged for all of xlb's maps as sized for this run.
    pub memlock_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub schema: &'static str,
    pub plan: Plan,
    pub machine: BTreeMap<&'static str, String>,
    /// Conntrack settings in effect for the kernel baselines.
    pub conntrack: BTreeMap<&'static str, String>,
    pub throughput: Vec<Throughput>,
    pub skipped: Vec<Skipped>,
    pub control_plane: Vec<ControlPlane>,
    /// ns/packet per datapath path (`<path>` at 1 service, `<path>_<N>_services`).
    pub test_run: BTreeMap<String, f64>,
    pub memory: Vec<Memory>,
    /// Bulk TCP from a pod (offloads on): to a ClusterIP through xlb, and
    /// straight to the backend (the floor), per family, same run.
    pub tcp_stream: Vec<stream::Stream>,
    /// `pod_to_cluster_ip` over `pod_to_pod` Gbit/s, per family.
    pub tcp_stream_ratio: BTreeMap<&'static str, f64>,
    /// Cilium's default Maglev table (M = 16381) per service, for comparison.
    pub cilium_maglev_bytes_per_service: u64,
    /// East-west TCP connections from a pod to a ClusterIP, per path
    /// (socket-LB, TC, iptables, nftables, the direct floor) and size.
    pub east_west: Vec<east_west::Row>,
    /// The SYN flood of issue #13, without and with SNAT (with the
    /// BPF_PROG_TEST_RUN figures).
    pub flood: Vec<flood::Flood>,
}

/// Progress reporting (an indicatif bar in the binary, nothing in tests).
pub trait Progress {
    fn step(&self, msg: String);
}

impl Progress for () {
    fn step(&self, _: String) {}
}

pub fn run(plan: &Plan, progress: &dyn Progress) -> anyhow::Result<Results> {
    let _ct = ConntrackMax::raise((plan.seconds * 400_000.0) as u64 + 262_144);
    let mut res = Results {
        schema: "xlb-bench/1",
        plan: plan.clone(),
        machine: machine(),
        conntrack: conntrack_settings(),
        throughput: Vec::new(),
        skipped: Vec::new(),
        control_plane: Vec::new(),
        test_run: BTreeMap::new(),
        memory: Vec::new(),
        tcp_stream: Vec::new(),
        tcp_stream_ratio: BTreeMap::new(),
        cilium_maglev_bytes_per_service: 16_381 * 4,
        east_west: Vec::new(),
        flood: Vec::new(),
    };
    if plan.systems.contains(&System::Ipvs)
        && let Some(reason) = ipvs_unavailable()
    {
        res.skipped.push(Skipped { system: System::Ipvs, services: None, reason });
    }
    // Without live frames there is no generator: every system is still
    // programmed (load time, endpoint change, memory), its traffic skipped.
    let no_traffic = xlb::pktgen::live_frames_refused();
    // Load time per system at the previous size, for the linear prediction.
    let mut last_load: BTreeMap<System, (u32, f64)> = BTreeMap::new();
    for &n in &plan.services {
        let svcs = model::services(n);
        for &system in &plan.systems {
            if system == System::Ipvs && res.skipped.iter().any(|s| s.system == System::Ipvs) {
                continue;
            }
            // A load under a second is mostly fixed cost: no basis for scaling.
            if let Some((m, t)) = last_load.get(&system)
                && *t >= 1.0
                && t * n as f64 / *m as f64 > plan.load_bound_s
            {
                res.skipped.push(Skipped {
                    system,
                    services: Some(n),
                    reason: format!(
                        "loading {m} services took {t:.1} s; {n} would take ≥ {:.0} s (bound {} s)",
                        t * n as f64 / *m as f64,
                        plan.load_bound_s
                    ),
                });
                continue;
            }
            progress.step(format!("{} × {n}: programming", system.name()));
            let mut net = Net::new();
            let installed = match install(system, &net, &svcs, plan) {
                Ok(i) => i,
                Err(e) => {
                    res.skipped.push(Skipped { system, services: Some(n), reason: format!("{e:#}") });
                    continue;
                }
            };
            last_load.insert(system, (n, installed.program_seconds));
            if let Some(m) = installed.memory(n) {
                res.memory.push(m);
            }
            if let Some(reason) = &no_traffic {
                res.skipped.push(Skipped { system, services: Some(n), reason: reason.clone() });
            }
            for flows in [1, plan.many_flows] {
                if no_traffic.is_some() {
                    break;
                }
                progress.step(format!(
                    "{} × {n}: {}",
                    system.name(),
                    if flows == 1 { "one flow" } else { "new flows" }
                ));
                net.generator(model::target(n).into(), flows, plan.packet_size)?;
                net.measure(plan.seconds.min(0.3) / 2.0)?; // warm-up: caches, conntrack of the one flow
                let s = net.measure(plan.seconds)?;
                res.throughput.push(throughput(system, n, flows, &s));
            }
            if system.programs_services() {
                progress.step(format!("{} × {n}: endpoint change", system.name()));
                let program_seconds = installed.program_seconds;
                let ms = installed.endpoint_change(&net, &svcs)?;
                res.control_plane.push(ControlPlane { system, services: n, program_seconds, endpoint_change_ms: ms });
            }
        }
    }
    if plan.systems.contains(&System::Xlb) {
        progress.step("bulk TCP from a pod".into());
        let s = stream::measure(plan.seconds.max(1.0), if plan.name == "smoke" { 1 } else { 3 })?;
        res.tcp_stream = s.streams;
        res.tcp_stream_ratio = s.ratios;
        if !plan.east_west_services.is_empty() {
            progress.step("east-west connections from a pod".into());
            res.east_west = east_west::measure(
                &plan.east_west_services,
                plan.east_west_seconds,
                plan.east_west_round_trips,
                if plan.name == "smoke" { 1 } else { 3 },
            )?;
        }
    }
    if plan.test_run_repeat > 0 {
        progress.step("BPF_PROG_TEST_RUN".into());
        res.test_run = test_run::measure(&plan.services, plan.test_run_repeat);
        progress.step("SYN flood".into());
        // (table entries, established connections, SYNs, fresh connections)
        let (table, est, syns, fresh) =
            if plan.name == "smoke" { (8_192, 1_000, 20_000, 200) } else { (262_144, 10_000, 2_000_000, 1_000) };
        res.flood = [false, true].map(|snat| flood::measure(snat, table, est, syns, fresh)).to_vec();
    }
    Ok(res)
}

fn throughput(system: System, services: u32, flows: u32, s: &Sample) -> Throughput {
    // The forwarder does not DNAT: it delivers to the service port.
    let delivered = if system == System::XdpForward { s.undnated } else { s.dnated };
    Throughput {
        system,
        services,
        flows,
        pps: if s.sent.busy_seconds > 0.0 { delivered as f64 / s.sent.busy_seconds } else { 0.0 },
        sent_pps: s.sent.pps,
        cpu_ns_per_packet: if delivered > 0 { s.softirq_ns as f64 / delivered as f64 } else { 0.0 },
        leaked: if system == System::XdpForward { 0 } else { s.undnated },
    }
}

/// A system with N services programmed into a [`Net`]'s node.
struct Installed {
    system: System,
    program_seconds: f64,
    xlb: Option<XlbState>,
    dir: Option<crate::agent::TempDir>,
    /// The XDP forwarder's object: its program is attached while it lives.
    forward: Option<aya::Ebpf>,
}

struct XlbState {
    dp: Datapath,
    writer: Writer,
    translator: Translator,
    services: Vec<std::sync::Arc<k8s_openapi::api::core::v1::Service>>,
    slices: Vec<std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>>,
    memlock: u64,
}

fn node_info() -> NodeInfo {
    NodeInfo { name: model::NODE.into(), addresses: vec!["10.99.0.1".parse().unwrap()], ..NodeInfo::default() }
}

fn xlb_sizes(n: u32) -> MapSizes {
    // ClusterIP, LoadBalancer IP, and its internal-scope twin (Local policy).
    let frontends = 3 * n + 64;
    MapSizes {
        services: frontends,
        backends: 2 * n + 64,
        // A region per frontend (Maglev 251 + list 2), room to rebuild some.
        slots: frontends * 256 + (1 << 16),
        conntrack: MapSizes::default().conntrack,
        affinity: 1024,
        source_ranges: 1024,
        fragments: 1024,
        sock_rev: 65_536,
    }
}

fn install(system: System, net: &Net, svcs: &[model::Svc], plan: &Plan) -> anyhow::Result<Installed> {
    let mut inst = Installed { system, program_seconds: 0.0, xlb: None, dir: None, forward: None };
    match system {
        System::Xlb => {
            let before = memlock_total();
            let mut dp = Datapath::load(xlb_sizes(svcs.len() as u32))?;
            dp.load_programs()?;
            let memlock = memlock_total() - before;
            let (services, slices) = model::objects(svcs);
            let mut writer = Writer::new(&dp);
            let mut translator = Translator::default();
            let t = Instant::now();
            let d = translator.translate_shared(&services, &slices, &node_info(), &Options::default());
            let report = writer.apply(&mut dp, &d);
            inst.program_seconds = t.elapsed().as_secs_f64();
            anyhow::ensure!(
                d.problems.is_empty() && report.failed.is_empty(),
                "xlb did not program everything: {:?} {:?}",
                d.problems.first(),
                report.failed.first()
            );
            {
                let _in = net.node.enter();
                let p: &mut Xdp = dp.program_mut("xlb_xdp").unwrap().try_into()?;
                p.attach("n0", XdpMode::Driver)?;
            }
            inst.xlb = Some(XlbState { dp, writer, translator, services, slices, memlock });
        }
        System::IptablesNft | System::IptablesLegacy => {
            let dir = crate::agent::TempDir::new();
            let file = dir.path.join("rules");
            std::fs::write(&file, model::iptables_full(svcs))?;
            let t = Instant::now();
            in_node(net, &[restore_cmd(system), file.to_str().unwrap()], plan.load_bound_s)?;
            inst.program_seconds = t.elapsed().as_secs_f64();
            inst.dir = Some(dir);
        }
        System::Nftables => {
            let dir = crate::agent::TempDir::new();
            let file = dir.path.join("rules.nft");
            std::fs::write(&file, model::nft_full(svcs))?;
            let t = Instant::now();
            in_node(net, &["nft", "-f", file.to_str().unwrap()], plan.load_bound_s)?;
            inst.program_seconds = t.elapsed().as_secs_f64();
            inst.dir = Some(dir);
        }
        System::Ipvs => anyhow::bail!("IPVS is detected but not measured by this benchmark yet"),
        System::XdpForward => {
            let mut obj = aya::Ebpf::load(xlb::pktgen::BENCH_OBJECT)?;
            {
                let _in = net.node.enter();
                let p: &mut Xdp = obj.program_mut("xdp_forward").unwrap().try_into()?;
                p.load()?;
                p.attach("n0", XdpMode::Driver)?;
            }
            inst.forward = Some(obj);
        }
    }
    Ok(inst)
}

impl Installed {
    fn memory(&self, n: u32) -> Option<Memory> {
        let x = self.xlb.as_ref()?;
        use datapath_common::{Backend, FrontendInfo, RevNat, Service, ServiceKey};
        use std::mem::size_of;
        let services = x.dp.services();
        // List, weights (when they differ) and table: one run from list_off.
        let slots: u64 = services
            .iter()
            .map(|(_, s)| ((s.list_off + s.count).max(s.table_off + s.table_len) - s.list_off) as u64)
            .sum();
        let per_frontend =
            size_of::<ServiceKey>() + size_of::<Service>() + size_of::<RevNat>() + 4 + size_of::<FrontendInfo>();
        let bytes = services.len() as u64 * per_frontend as u64
            + slots * 4
            + x.dp.backends().len() as u64 * size_of::<Backend>() as u64;
        Some(Memory { services: n, bytes_per_service: bytes as f64 / n as f64, memlock_bytes: x.memlock })
    }

    /// Replaces the second endpoint of the middle service, three times; the
    /// median in ms (one change only when it takes over 5 s).
    fn endpoint_change(mut self, net: &Net, svcs: &[model::Svc]) -> anyhow::Result<f64> {
        let idx = svcs.len() / 2;
        let alt = |k: usize| std::net::Ipv4Addr::new(10, 127, 255, 10 + k as u8);
        let mut times = Vec::new();
        for k in 0..3 {
            let mut moved = svcs.to_vec();
            moved[idx].endpoints[1] = alt(k);
            let prev = if k == 0 { svcs[idx].endpoints[1] } else { alt(k - 1) };
            let mut base = svcs.to_vec();
            base[idx].endpoints[1] = prev;
            let ms = match self.system {
                System::Xlb => {
                    let x = self.xlb.as_mut().unwrap();
                    x.slices[idx] = model::slice(&moved[idx], &moved[idx].endpoints, 2 + k as u32).into();
                    let t = Instant::now();
                    let d = x.translator.translate_shared(&x.services, &x.slices, &node_info(), &Options::default());
                    let r = x.writer.apply(&mut x.dp, &d);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    anyhow::ensure!(
                        r.changed >= 1 && r.failed.is_empty(),
                        "the endpoint change was not applied: {r:?}"
                    );
                    ms
                }
                System::IptablesNft | System::IptablesLegacy | System::Nftables => {
                    let (text, cmd): (String, Vec<&str>) = if self.system == System::Nftables {
                        (model::nft_endpoint_change(&base, idx, alt(k)), vec!["nft", "-f"])
                    } else {
                        (
                            model::iptables_endpoint_change(&base, idx, alt(k)),
                            vec![restore_cmd(self.system), "--noflush"],
                        )
                    };
                    let file = self.dir.as_ref().unwrap().path.join(format!("change{k}"));
                    std::fs::write(&file, text)?;
                    let mut args = cmd;
                    args.push(file.to_str().unwrap());
                    let t = Instant::now();
                    in_node(net, &args, 600.0)?;
                    t.elapsed().as_secs_f64() * 1e3
                }
                System::Ipvs | System::XdpForward => 0.0,
            };
            times.push(ms);
            if ms > 5_000.0 {
                return Ok(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[1])
    }
}

fn restore_cmd(system: System) -> &'static str {
    if system == System::IptablesLegacy { "iptables-legacy-restore" } else { "iptables-nft-restore" }
}

/// Runs a command in the node namespace; kills it (our own child, by PID)
/// when it outlives `bound_s`.
fn in_node(net: &Net, args: &[&str], bound_s: f64) -> anyhow::Result<()> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", net.node.name))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs_f64(bound_s);
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            use std::io::Read as _;
            child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            anyhow::bail!("{} failed ({status}): {}", args[0], err.lines().take(3).collect::<Vec<_>>().join(" / "));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{} did not finish within {bound_s} s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Why IPVS cannot be measured here, if it cannot.
fn ipvs_unavailable() -> Option<String> {
    let loaded = Path::new("/proc/net/ip_vs").exists()
        || Command::new("modprobe").arg("ip_vs").stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !loaded {
        return Some("the kernel has no IPVS (CONFIG_IP_VS off, no ip_vs module)".into());
    }
    Some("IPVS is present, but this benchmark does not measure it yet".into())
}

/// Kernel memory charged to every BPF map this process holds, in bytes.
fn memlock_total() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else { return 0 };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines().find_map(|l| l.strip_prefix("memlock:").and_then(|v| v.trim().parse::<u64>().ok()))
        })
        .sum()
}

fn machine() -> BTreeMap<&'static str, String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|v| v.trim_start_matches([' ', '\t', ':']));
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut m = BTreeMap::new();
    m.insert("kernel", read("/proc/sys/kernel/osrelease").trim().to_string());
    m.insert("cpu", model.unwrap_or("unknown").to_string());
    m.insert("cpus", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0).to_string());
    m.insert("memory_gib", format!("{:.1}", mem_kib as f64 / 1048576.0));
    m.insert(
        "date",
        Command::new("date")
            .arg("-u")
            .arg("+%F")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
    );
    m.insert(
        "generator",
        "xlb pktgen (XDP live frames), 1 thread on the last CPU; node and sink share that CPU".into(),
    );
    m
}

fn conntrack_settings() -> BTreeMap<&'static str, String> {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    let mut m = BTreeMap::new();
    m.insert("nf_conntrack_max", read("/proc/sys/net/netfilter/nf_conntrack_max"));
    m.insert("nf_conntrack_buckets", read("/proc/sys/net/netfilter/nf_conntrack_buckets"));
    m.insert("nf_conntrack_udp_timeout", read("/proc/sys/net/netfilter/nf_conntrack_udp_timeout"));
    m.insert("xlb_conntrack_entries", xlb_sizes(1).conntrack.to_string());
    m
}

/// Raises the (machine-wide: not settable per namespace) conntrack limit
/// for the run so the kernel baselines' new-flow runs never hit a full
/// table; restores it on drop.
struct ConntrackMax(Option<u64>);

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

impl ConntrackMax {
    fn raise(want: u64) -> Self {
        let old: Option<u64> = std::fs::read_to_string(CT_MAX).ok().and_then(|s| s.trim().parse().ok());
        match old {
            Some(o) if o < want => {
                let ok = std::fs::OpenOptions::new()
                    .write(true)
                    .open(CT_MAX)
                    .and_then(|mut f| f.write_all(want.to_string().as_bytes()))
                    .is_ok();
                Self(ok.then_some(o))
            }
            _ => Self(None),
        }
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        if let Some(o) = self.0 {
            let _ = std::fs::write(CT_MAX, o.to_string());
        }
    }
}
