// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `xlb` command line (clap, derive + environment variables). In the
//! library so tests can check that the DaemonSet's arguments parse.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    MapSizes,
    agent::{self, Settings},
    attach::XdpAttachMode,
    dump, maglev,
    translate::{Options, Scheduler},
};

#[derive(Parser)]
#[command(name = "xlb", version, about = "Kubernetes service load balancer with an eBPF datapath")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// Print the CustomResourceDefinitions xlb reads (LoadBalancerIPPool),
    /// as YAML for `kubectl apply -f -`.
    Crd,
    /// Load every datapath program into the kernel (through the verifier)
    /// and report it, without attaching anything.
    Check,
    /// Send test traffic out of an interface (XDP live frames, Linux ≥ 5.18):
    /// UDP or TCP SYN to ADDR:PORT over one flow or many new flows.
    Pktgen(PktgenArgs),
}

#[derive(Args, Clone, Debug)]
pub struct PktgenArgs {
    /// Interface to send from (in the current network namespace).
    #[arg(long)]
    pub dev: String,
    /// Destination MAC: the next hop's (the receiving interface's) address.
    #[arg(long, value_parser = parse_mac)]
    pub dst_mac: [u8; 6],
    /// Source MAC (default: --dev's own).
    #[arg(long, value_parser = parse_mac)]
    pub src_mac: Option<[u8; 6]>,
    /// Source address of flow 0.
    #[arg(long)]
    pub src: IpAddr,
    /// Destination, e.g. 198.51.100.10:80 or [2001:db8::10]:80.
    #[arg(long)]
    pub dst: SocketAddr,
    #[arg(long, value_enum, default_value = "udp")]
    pub proto: PktgenProto,
    /// Distinct flows: 1 is one established flow; flow i has source port
    /// 1024 + i mod 32768 and source address + i / 32768.
    #[arg(long, default_value_t = 1)]
    pub flows: u32,
    /// Frame size in bytes, without the FCS.
    #[arg(long, default_value_t = 60)]
    pub size: usize,
    /// Packets to send (default: as many as --duration allows).
    #[arg(long)]
    pub count: Option<u64>,
    /// Seconds to send for.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Sending threads, pinned to CPUs 0, 1, ….
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: dump::Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PktgenProto {
    Udp,
    Tcp,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address"));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

/// `xlb pktgen`: sends, then reports what was sent.
pub fn pktgen(a: &PktgenArgs) -> anyhow::Result<String> {
    use crate::{pktgen, translate::Protocol};
    let src_mac = match a.src_mac {
        Some(m) => m,
        None => pktgen::mac_of(&a.dev)?,
    };
    let spec = pktgen::Spec {
        src_mac,
        dst_mac: a.dst_mac,
        src: a.src,
        dst: a.dst.ip(),
        dport: a.dst.port(),
        protocol: match a.proto {
            PktgenProto::Udp => Protocol::Udp,
            PktgenProto::Tcp => Protocol::Tcp,
        },
        flows: a.flows,
        size: a.size,
    };
    let g = pktgen::Generator::new(&a.dev, &spec)?;
    let cpus: Vec<usize> = (0..a.threads.max(1)).collect();
    let sent = g.run_on(&cpus, a.count, Some(std::time::Duration::from_secs_f64(a.duration)))?;
    Ok(match a.output {
        dump::Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({
                "dev": a.dev, "dst": a.dst, "proto": format!("{:?}", a.proto).to_lowercase(), "flows": a.flows,
                "size": a.size, "threads": a.threads, "sent": sent,
            }))? + "\n"
        }
        dump::Format::Table => format!(
            "sent {} packets ({} bytes) in {:.3} s ({:.3} s busy in the kernel's send loop): \
             {:.3} Mpps per busy second, {:.2} Gbit/s (+ FCS and preamble on a wire)\n",
            sent.packets,
            sent.bytes,
            sent.wall_seconds,
            sent.busy_seconds,
            sent.pps / 1e6,
            sent.pps * sent.bytes as f64 / sent.packets.max(1) as f64 * 8.0 / 1e9
        ),
    })
}

#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Read Services, EndpointSlices and Nodes from the YAML files in this
    /// directory (re-read on every change) instead of the API server.
    #[arg(long, env = "XLB_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; default: in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (matched against endpoints' nodeName and the Node object).
    #[arg(long, env = "NODE_NAME", default_value_t = default_node_name())]
    pub node_name: String,
    /// Node addresses for NodePorts and SNAT, added to the Node object's
    /// InternalIP/ExternalIP addresses (comma-separated).
    #[arg(long, env = "XLB_NODE_ADDRESSES", value_delimiter = ',')]
    pub node_address: Vec<IpAddr>,
    /// Serve only the Services labelled `service.kubernetes.io/service-proxy-name`
    /// with this name (default: only those without the label, as kube-proxy).
    #[arg(long, env = "XLB_SERVICE_PROXY_NAME")]
    pub service_proxy_name: Option<String>,
    /// This node's zone for topology-aware routing (default: the Node's
    /// `topology.kubernetes.io/zone` label).
    #[arg(long, env = "XLB_ZONE")]
    pub zone: Option<String>,
    /// Interfaces that get the XDP program (north-south traffic), comma-separated.
    #[arg(long, env = "XLB_XDP_INTERFACES", value_delimiter = ',')]
    pub xdp_interfaces: Vec<String>,
    /// Interfaces where this node answers ARP and NDP for the
    /// LoadBalancer addresses it owns (default: the XDP interfaces).
    #[arg(long, env = "XLB_L2_INTERFACES", value_delimiter = ',')]
    pub l2_interfaces: Vec<String>,
    /// Announce externalIPs on L2 too (the owner answers ARP / NDP for them).
    #[arg(long, env = "XLB_L2_EXTERNAL_IPS")]
    pub l2_external_ips: bool,
    /// The duration of each address's L2 Lease (whole seconds, e.g. `2s`):
    /// after a node dies, another answers for its addresses within about
    /// this long.
    #[arg(long, env = "XLB_L2_LEASE_DURATION", default_value = "2s", value_parser = agent::duration)]
    pub l2_lease_duration: std::time::Duration,
    /// How often a holder renews its L2 Leases (e.g. `500ms`).
    #[arg(long, env = "XLB_L2_RENEW_INTERVAL", default_value = "500ms", value_parser = agent::duration)]
    pub l2_renew_interval: std::time::Duration,
    /// Hand an L2 address over to the node that ranks first for it when
    /// that node comes (back): owners stay spread over the nodes. Each
    /// move breaks the connections that need the old owner's conntrack.
    #[arg(long, env = "XLB_L2_REBALANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub l2_rebalance: bool,
    /// The namespace of the agent's Leases (the allocator's and the L2
    /// addresses'): the agent's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub namespace: String,
    /// XDP attach mode.
    #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value = "auto")]
    pub xdp_mode: XdpAttachMode,
    /// Interfaces that get the TC ingress program (pod-facing), comma-separated.
    #[arg(long, env = "XLB_TC_INTERFACES", value_delimiter = ',')]
    pub tc_interfaces: Vec<String>,
    /// Glob patterns of pod-facing interfaces (e.g. `veth*,cali*,lxc*`): TC
    /// is attached to every matching interface as it appears.
    #[arg(long, env = "XLB_TC_INTERFACE_PATTERN", value_delimiter = ',')]
    pub tc_interface_pattern: Vec<String>,
    /// Socket-level load balancing (cgroup connect/sendmsg/recvmsg/getpeername
    /// hooks): `all` balances the node's own sockets and pods' at connect,
    /// `host` only the node's (its network namespace), `off` leaves
    /// everything to TC and XDP.
    #[arg(long, env = "XLB_SOCKET_LB", value_enum, default_value = "all")]
    pub socket_lb: crate::socket_lb::Mode,
    /// cgroup v2 directory the socket-LB programs attach to (every process
    /// below it is covered; default: the node's cgroup2 root, found from the
    /// mounts, or one mounted at /run/xlb/cgroupv2 when none is).
    #[arg(long, env = "XLB_CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// Socket-LB reverse entries (what `recvmsg` / `getpeername` show as the
    /// service), an LRU map.
    #[arg(long, env = "XLB_SOCKET_LB_REVERSE_SIZE", default_value_t = MapSizes::default().sock_rev)]
    pub socket_lb_reverse_size: u32,
    /// bpffs directory for the pinned maps, programs and links.
    #[arg(long, env = "XLB_PIN_DIR", default_value = "/sys/fs/bpf/xlb")]
    pub pin_dir: PathBuf,
    /// Detach the programs, remove every pin and exit (breaks open connections).
    #[arg(long)]
    pub cleanup: bool,
    /// Print the desired datapath state computed from the source and exit,
    /// without touching the kernel.
    #[arg(long)]
    pub dry_run: bool,
    /// Format of --dry-run.
    #[arg(short, long, value_enum, default_value = "json")]
    pub output: DryRunFormat,
    /// Valid NodePort range.
    #[arg(long, env = "XLB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = agent::port_range)]
    pub node_port_range: (u16, u16),
    /// Only node addresses in these CIDRs carry NodePorts, per family (a
    /// family with no CIDR listed: all its addresses), or `primary`: the
    /// node's primary address of each family (default: every address).
    #[arg(long, env = "XLB_NODEPORT_ADDRESSES", value_delimiter = ',', value_parser = nodeport_address)]
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Allowed externalIPs (default: any). Set it to mitigate CVE-2020-8554.
    #[arg(long, env = "XLB_EXTERNAL_IP_CIDRS", value_delimiter = ',', value_parser = agent::cidr)]
    pub external_ip_cidrs: Vec<IpNet>,
    /// The `spec.loadBalancerClass` of the LoadBalancer Services whose
    /// addresses xlb allocates from its LoadBalancerIPPools (Services
    /// without a class too; none is allocated while no pool exists).
    #[arg(long, env = "XLB_LB_CLASS", default_value = crate::lbipam::DEFAULT_LB_CLASS)]
    pub lb_class: String,
    /// The scheduler of a Service without `xlb.io/scheduler`: rr, wrr, lc,
    /// wlc, sh, mh (maglev) or random.
    #[arg(long, env = "XLB_SCHEDULER", default_value = "mh")]
    pub scheduler: Scheduler,
    /// Smallest Maglev table size (the smallest prime ≥ 100 × backends is used within the bounds).
    #[arg(long, env = "XLB_MAGLEV_MIN", default_value_t = maglev::MIN_SIZE)]
    pub maglev_min: u32,
    /// Largest Maglev table size.
    #[arg(long, env = "XLB_MAGLEV_MAX", default_value_t = maglev::MAX_SIZE)]
    pub maglev_max: u32,
    /// IPv4 SNAT source (default: the node's first IPv4 address).
    #[arg(long, env = "XLB_SNAT_IPV4")]
    snat_ipv4: Option<IpAddr>,
    /// IPv6 SNAT source (default: the node's first IPv6 address).
    #[arg(long, env = "XLB_SNAT_IPV6")]
    snat_ipv6: Option<IpAddr>,
    /// Source ports for SNAT (keep them out of net.ipv4.ip_local_port_range).
    #[arg(long, env = "XLB_SNAT_PORT_RANGE", default_value = "61000-65535", value_parser = agent::port_range)]
    pub snat_port_range: (u16, u16),
    /// Rejects (TCP RST, ICMP port unreachable) and packet-too-big answers
    /// each CPU may send per second (a token bucket with a burst of as many).
    #[arg(long, env = "XLB_REPLY_RATE", default_value_t = datapath_common::REPLY_RATE_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub reply_rate: u32,
    /// Frontends (SERVICES entries and frontend ids).
    #[arg(long, env = "XLB_MAX_SERVICES", default_value_t = MapSizes::default().services)]
    pub max_services: u32,
    /// Backend ids.
    #[arg(long, env = "XLB_MAX_BACKENDS", default_value_t = MapSizes::default().backends)]
    pub max_backends: u32,
    /// SLOTS entries shared by all backend lists and Maglev tables.
    #[arg(long, env = "XLB_SLOTS", default_value_t = MapSizes::default().slots)]
    pub slots: u32,
    /// Conntrack entries (two per flow).
    #[arg(long, env = "XLB_CONNTRACK_SIZE", default_value_t = MapSizes::default().conntrack)]
    pub conntrack_size: u32,
    /// sessionAffinity entries.
    #[arg(long, env = "XLB_AFFINITY_SIZE", default_value_t = MapSizes::default().affinity)]
    pub affinity_size: u32,
    /// Address for /metrics, /healthz and /readyz; `none` disables.
    #[arg(long, env = "XLB_HTTP_ADDRESS", default_value = "0.0.0.0:10249")]
    pub http_address: String,
    /// kube-proxy's health server (`/healthz`, `/livez`), which cloud load
    /// balancers probe; `none` disables. `0.0.0.0` listens on IPv6 too.
    #[arg(long, env = "XLB_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Seconds a change may wait to reach the maps before `/healthz` says
    /// 503 (kube-proxy: twice its sync period, 60 s).
    #[arg(long, env = "XLB_HEALTHZ_TIMEOUT", default_value_t = crate::health::DEFAULT_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub healthz_timeout: u64,
    /// Log format.
    #[arg(long, env = "XLB_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "XLB_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DryRunFormat {
    Json,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// One `--nodeport-addresses` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(IpNet),
    Primary,
}

impl NodePortAddress {
    fn cidr(&self) -> Option<IpNet> {
        match self {
            Self::Cidr(c) => Some(*c),
            Self::Primary => None,
        }
    }
}

fn nodeport_address(s: &str) -> Result<NodePortAddress, String> {
    if s.trim() == "primary" {
        return Ok(NodePortAddress::Primary);
    }
    agent::cidr(s.trim()).map(NodePortAddress::Cidr)
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

pub fn settings(a: &AgentArgs) -> anyhow::Result<Settings> {
    let tc_patterns = a
        .tc_interface_pattern
        .iter()
        .map(|p| glob::Pattern::new(p).with_context(|| format!("--tc-interface-pattern {p:?}")))
        .collect::<anyhow::Result<_>>()?;
    let http_address = match a.http_address.as_str() {
        "none" | "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--http-address {s:?}"))?),
    };
    let healthz_address = match a.healthz_bind_address.as_str() {
        "none" | "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--healthz-bind-address {s:?}"))?),
    };
    if a.nodeport_addresses.contains(&NodePortAddress::Primary) && a.nodeport_addresses.len() > 1 {
        anyhow::bail!("--nodeport-addresses: `primary` stands alone (no CIDRs with it), as in kube-proxy");
    }
    if a.maglev_min > a.maglev_max || a.maglev_min < 2 {
        anyhow::bail!("--maglev-min {} / --maglev-max {}: need 2 ≤ min ≤ max", a.maglev_min, a.maglev_max);
    }
    // The answers come from the XDP program: an L2 interface without it
    // would hold Leases and answer nothing (a black hole nobody replaces).
    if let Some(i) = a.l2_interfaces.iter().find(|i| !a.xdp_interfaces.contains(i)) {
        anyhow::bail!("--l2-interfaces {i}: not an XDP interface (--xdp-interfaces); ARP and NDP are answered by XDP");
    }
    Ok(Settings {
        manifests: a.manifests.clone(),
        kubeconfig: a.kubeconfig.clone(),
        lb_class: a.lb_class.clone(),
        selector: crate::source::Selector { proxy_name: a.service_proxy_name.clone().filter(|n| !n.is_empty()) },
        node_name: a.node_name.clone(),
        node_addresses: a.node_address.clone(),
        zone: a.zone.clone().filter(|z| !z.is_empty()),
        options: Options {
            node_port_range: a.node_port_range,
            nodeport_cidrs: a.nodeport_addresses.iter().filter_map(NodePortAddress::cidr).collect(),
            nodeport_primary: a.nodeport_addresses.contains(&NodePortAddress::Primary),
            external_ip_cidrs: a.external_ip_cidrs.clone(),
            maglev_min: a.maglev_min,
            maglev_max: a.maglev_max,
            scheduler: a.scheduler,
            // No EndpointSlice controller writes hints into a directory.
            derive_hints: a.manifests.is_some(),
        },
        xdp_interfaces: a.xdp_interfaces.clone(),
        l2_interfaces: if a.l2_interfaces.is_empty() { a.xdp_interfaces.clone() } else { a.l2_interfaces.clone() },
        l2_external_ips: a.l2_external_ips,
        l2_lease: crate::lease::Timing {
            duration: a.l2_lease_duration,
            renew: a.l2_renew_interval,
            // Clock rate error grows with the duration: an eighth of it,
            // at least 250 ms.
            margin: crate::lease::Timing::L2.margin.max(a.l2_lease_duration / 8),
        }
        .check()
        .map_err(|e| anyhow::anyhow!("--l2-lease-duration / --l2-renew-interval: {e}"))?,
        namespace: a.namespace.clone(),
        l2_rebalance: a.l2_rebalance,
        xdp_mode: a.xdp_mode,
        tc_interfaces: a.tc_interfaces.clone(),
        tc_patterns,
        pin_dir: a.pin_dir.clone(),
        socket_lb: a.socket_lb,
        cgroup_path: a.cgroup_path.clone(),
        sizes: MapSizes {
            services: a.max_services,
            backends: a.max_backends,
            slots: a.slots,
            conntrack: a.conntrack_size,
            affinity: a.affinity_size,
            sock_rev: a.socket_lb_reverse_size,
            ..MapSizes::default()
        },
        snat_v4: a.snat_ipv4,
        snat_v6: a.snat_ipv6,
        snat_ports: a.snat_port_range,
        reply_rate: a.reply_rate,
        http_address,
        healthz_address,
        healthz_timeout: std::time::Duration::from_secs(a.healthz_timeout),
    })
}
