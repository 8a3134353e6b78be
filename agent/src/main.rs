// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `xlb` command.
use std::{net::{IpAddr, SocketAddr}, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use xlb::{
    Datapath, MapSizes,
    agent::{self, Settings},
    attach::{self, XdpAttachMode},
    dump, maglev,
    source::Snapshot,
    translate::Options,
};

#[derive(Parser)]
#[command(name = "xlb", version, about = "Kubernetes service load balancer with an eBPF datapath")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: watch Services and EndpointSlices (from the API
    /// server, or from --manifests), program the datapath, serve metrics.
    Agent(Box<AgentArgs>),
    /// Show what the datapath holds, from the pinned maps (read-only).
    Dump {
        /// Where the agent pinned its maps.
        #[arg(long, env = "XLB_PIN_DIR", default_value = "/sys/fs/bpf/xlb")]
        pin_dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: dump::Format,
        #[command(subcommand)]
        what: dump::What,
    },
    /// Print the version.
    Version,
    /// Load every datapath program into the kernel (through the verifier)
    /// and report it, without attaching anything.
    Check,
}

#[derive(Args, Clone, Debug)]
struct AgentArgs {
    /// Read Services, EndpointSlices and Nodes from the YAML files in this
    /// directory (re-read on every change) instead of the API server.
    #[arg(long, env = "XLB_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; default: in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (matched against endpoints' nodeName and the Node object).
    #[arg(long, env = "NODE_NAME", default_value_t = default_node_name())]
    node_name: String,
    /// Node addresses for NodePorts and SNAT, added to the Node object's
    /// InternalIP/ExternalIP addresses (comma-separated).
    #[arg(long, env = "XLB_NODE_ADDRESSES", value_delimiter = ',')]
    node_address: Vec<IpAddr>,
    /// Interfaces that get the XDP program (north-south traffic), comma-separated.
    #[arg(long, env = "XLB_XDP_INTERFACES", value_delimiter = ',')]
    xdp_interfaces: Vec<String>,
    /// XDP attach mode.
    #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value = "auto")]
    xdp_mode: XdpAttachMode,
    /// Interfaces that get the TC ingress program (pod-facing), comma-separated.
    #[arg(long, env = "XLB_TC_INTERFACES", value_delimiter = ',')]
    tc_interfaces: Vec<String>,
    /// Glob patterns of pod-facing interfaces (e.g. `veth*,cali*,lxc*`): TC
    /// is attached to every matching interface as it appears.
    #[arg(long, env = "XLB_TC_INTERFACE_PATTERN", value_delimiter = ',')]
    tc_interface_pattern: Vec<String>,
    /// bpffs directory for the pinned maps, programs and links.
    #[arg(long, env = "XLB_PIN_DIR", default_value = "/sys/fs/bpf/xlb")]
    pin_dir: PathBuf,
    /// Detach the programs, remove every pin and exit (breaks open connections).
    #[arg(long)]
    cleanup: bool,
    /// Print the desired datapath state computed from the source and exit,
    /// without touching the kernel.
    #[arg(long)]
    dry_run: bool,
    /// Format of --dry-run.
    #[arg(short, long, value_enum, default_value = "json")]
    output: DryRunFormat,
    /// Valid NodePort range.
    #[arg(long, env = "XLB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = agent::port_range)]
    node_port_range: (u16, u16),
    /// Only node addresses in these CIDRs carry NodePorts (default: all).
    #[arg(long, env = "XLB_NODEPORT_ADDRESSES", value_delimiter = ',', value_parser = agent::cidr)]
    nodeport_addresses: Vec<IpNet>,
    /// Allowed externalIPs (default: any). Set it to mitigate CVE-2020-8554.
    #[arg(long, env = "XLB_EXTERNAL_IP_CIDRS", value_delimiter = ',', value_parser = agent::cidr)]
    external_ip_cidrs: Vec<IpNet>,
    /// Smallest Maglev table size (the smallest prime ≥ 100 × backends is used within the bounds).
    #[arg(long, env = "XLB_MAGLEV_MIN", default_value_t = maglev::MIN_SIZE)]
    maglev_min: u32,
    /// Largest Maglev table size.
    #[arg(long, env = "XLB_MAGLEV_MAX", default_value_t = maglev::MAX_SIZE)]
    maglev_max: u32,
    /// IPv4 SNAT source (default: the node's first IPv4 address).
    #[arg(long, env = "XLB_SNAT_IPV4")]
    snat_ipv4: Option<IpAddr>,
    /// IPv6 SNAT source (default: the node's first IPv6 address).
    #[arg(long, env = "XLB_SNAT_IPV6")]
    snat_ipv6: Option<IpAddr>,
    /// Source ports for SNAT (keep them out of net.ipv4.ip_local_port_range).
    #[arg(long, env = "XLB_SNAT_PORT_RANGE", default_value = "61000-65535", value_parser = agent::port_range)]
    snat_port_range: (u16, u16),
    /// Frontends (SERVICES entries and frontend ids).
    #[arg(long, env = "XLB_MAX_SERVICES", default_value_t = MapSizes::default().services)]
    max_services: u32,
    /// Backend ids.
    #[arg(long, env = "XLB_MAX_BACKENDS", default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    /// SLOTS entries shared by all backend lists and Maglev tables.
    #[arg(long, env = "XLB_SLOTS", default_value_t = MapSizes::default().slots)]
    slots: u32,
    /// Conntrack entries (two per flow).
    #[arg(long, env = "XLB_CONNTRACK_SIZE", default_value_t = MapSizes::default().conntrack)]
    conntrack_size: u32,
    /// sessionAffinity entries.
    #[arg(long, env = "XLB_AFFINITY_SIZE", default_value_t = MapSizes::default().affinity)]
    affinity_size: u32,
    /// Address for /metrics, /healthz and /readyz; `none` disables.
    #[arg(long, env = "XLB_HTTP_ADDRESS", default_value = "0.0.0.0:10249")]
    http_address: String,
    /// Log format.
    #[arg(long, env = "XLB_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "XLB_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DryRunFormat {
    Json,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn settings(a: &AgentArgs) -> anyhow::Result<Settings> {
    let tc_patterns = a
        .tc_interface_pattern
        .iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("--tc-interface-pattern {p:?}")))
        .collect::<anyhow::Result<_>>()?;
    let http_address = match a.http_address.as_str() {
        "none" | "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--http-address {s:?}"))?),
    };
    if a.maglev_min > a.maglev_max || a.maglev_min < 2 {
        anyhow::bail!("--maglev-min {} / --maglev-max {}: need 2 ≤ min ≤ max", a.maglev_min, a.maglev_max);
    }
    Ok(Settings {
        manifests: a.manifests.clone(),
        kubeconfig: a.kubeconfig.clone(),
        node_name: a.node_name.clone(),
        node_addresses: a.node_address.clone(),
        options: Options {
            node_port_range: a.node_port_range,
            nodeport_cidrs: a.nodeport_addresses.clone(),
            external_ip_cidrs: a.external_ip_cidrs.clone(),
            maglev_min: a.maglev_min,
            maglev_max: a.maglev_max,
        },
        xdp_interfaces: a.xdp_interfaces.clone(),
        xdp_mode: a.xdp_mode,
        tc_interfaces: a.tc_interfaces.clone(),
        tc_patterns,
        pin_dir: a.pin_dir.clone(),
        sizes: MapSizes {
            services: a.max_services,
            backends: a.max_backends,
            slots: a.slots,
            conntrack: a.conntrack_size,
            affinity: a.affinity_size,
            ..MapSizes::default()
        },
        snat_v4: a.snat_ipv4,
        snat_v6: a.snat_ipv6,
        snat_ports: a.snat_port_range,
        http_address,
    })
}

fn init_logs(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// `--dry-run`: one snapshot from the source, translated, printed.
async fn dry_run(s: &Settings) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::watch::channel(Snapshot::default());
    let source = agent::spawn_source(s, tx);
    let snap = loop {
        tokio::select! {
            r = rx.changed() => {
                r.context("the source ended before a complete view")?;
                if rx.borrow().synced {
                    break rx.borrow().clone();
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => anyhow::bail!("no complete view from the source in 60 s"),
        }
    };
    source.abort();
    let d = agent::desired(s, &snap);
    println!("{}", serde_json::to_string_pretty(&d)?);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Version => println!("xlb {}", env!("CARGO_PKG_VERSION")),
        Cmd::Check => {
            let mut dp = Datapath::load(MapSizes::default()).context("loading the datapath")?;
            dp.load_programs().context("verifying the programs")?;
            for (name, _) in dp.ebpf.programs() {
                println!("{name}: loaded");
            }
        }
        Cmd::Dump { pin_dir, output, what } => print!("{}", dump::run(&pin_dir, &what, output)?),
        Cmd::Agent(a) => {
            init_logs(a.log_format, &a.log);
            let s = settings(&a)?;
            if a.cleanup {
                let n = attach::cleanup(&s.pin_dir)?;
                tracing::info!(removed = n, dir = %s.pin_dir.display(), "detached and unpinned");
            } else if a.dry_run {
                dry_run(&s).await?;
            } else {
                agent::run(s).await?;
            }
        }
    }
    Ok(())
}
