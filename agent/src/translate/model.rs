// SPDX-License-Identifier: MIT OR Apache-2.0
//! The desired state's vocabulary: frontends, their keys and backends.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => datapath_common::PROTO_TCP,
            Self::Udp => datapath_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            datapath_common::PROTO_TCP => Some(Self::Tcp),
            datapath_common::PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// Which hook matches a frontend (see `datapath_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    External,
    Internal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Self::External => datapath_common::SCOPE_EXTERNAL,
            Self::Internal => datapath_common::SCOPE_INTERNAL,
        }
    }
}

/// Where a frontend address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl Kind {
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u8) -> Option<Self> {
        [Self::ClusterIp, Self::NodePort, Self::LoadBalancer, Self::ExternalIp].get(n as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "externalIP",
        }
    }
}

/// How a frontend picks a backend for a new flow. Serialised (dry-run,
/// dump) by its long name; [`Scheduler::parse`] also takes IPVS's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// `mh`: Maglev over the flow hash, weighted.
    Maglev,
    /// `rr`: per-CPU round-robin over the list; weights ignored.
    RoundRobin,
    /// `random`: weighted random.
    Random,
    /// `wrr`: per-CPU round-robin over the weighted, interleaved sequence.
    WeightedRoundRobin,
    /// `lc`: fewer active connections of two distinct random backends.
    LeastConnection,
    /// `wlc`: fewer active connections per weight of two distinct weighted
    /// random backends.
    WeightedLeastConnection,
    /// `sh`: Maglev over the client address alone; weights ignored.
    SourceHash,
}

impl Scheduler {
    pub const ALL: [Self; 7] = [
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnection,
        Self::WeightedLeastConnection,
        Self::SourceHash,
        Self::Maglev,
        Self::Random,
    ];

    pub fn number(self) -> u8 {
        use datapath_common::*;
        match self {
            Self::Maglev => SCHED_MAGLEV,
            Self::RoundRobin => SCHED_ROUND_ROBIN,
            Self::Random => SCHED_RANDOM,
            Self::WeightedRoundRobin => SCHED_WEIGHTED_RR,
            Self::LeastConnection => SCHED_LEAST_CONN,
            Self::WeightedLeastConnection => SCHED_WEIGHTED_LC,
            Self::SourceHash => SCHED_SOURCE_HASH,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.number() == n)
    }

    /// IPVS's name (`ipvsadm -s`).
    pub fn ipvs_name(self) -> &'static str {
        match self {
            Self::Maglev => "mh",
            Self::RoundRobin => "rr",
            Self::Random => "random",
            Self::WeightedRoundRobin => "wrr",
            Self::LeastConnection => "lc",
            Self::WeightedLeastConnection => "wlc",
            Self::SourceHash => "sh",
        }
    }

    /// The long name (the serialised form).
    pub fn long_name(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::LeastConnection => "least-connection",
            Self::WeightedLeastConnection => "weighted-least-connection",
            Self::SourceHash => "source-hash",
        }
    }

    /// By IPVS's name or the long one (`--scheduler`, `xlb.io/scheduler`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL.into_iter().find(|k| k.ipvs_name().eq_ignore_ascii_case(s) || k.long_name().eq_ignore_ascii_case(s))
    }

    /// The names `parse` takes, for messages.
    pub fn names() -> String {
        Self::ALL.iter().map(|s| s.ipvs_name()).collect::<Vec<_>>().join(", ")
    }

    /// Honours backend weights beyond 0 (which drains under every scheduler).
    pub fn weighted(self) -> bool {
        matches!(self, Self::Maglev | Self::Random | Self::WeightedRoundRobin | Self::WeightedLeastConnection)
    }

    /// Uses a Maglev table (sized by `xlb.io/maglev-table-size` or adaptively).
    pub fn maglev(self) -> bool {
        matches!(self, Self::Maglev | Self::SourceHash)
    }
}

impl std::str::FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("unknown scheduler {s:?} (one of {})", Self::names()))
    }
}

/// The (address, port, protocol, scope) a frontend is matched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FrontendKey {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub port: u16,
    /// `active`: eligible for new flows; `terminating`: keeps its flows only.
    pub state: BackendState,
    /// The endpoint runs on this node.
    pub node_local: bool,
    /// Its `serving` condition (ready, or terminating and still serving): a
    /// UDP flow pinned to an endpoint that is not is moved at its next
    /// packet (kube-proxy's `conntrack/cleanup.go`).
    pub serving: bool,
    /// From `xlb.io/weights` (1 when not named there): 0 takes no new
    /// flows (its established ones go on); the weighted schedulers give it
    /// a share ∝ weight.
    pub weight: u16,
}

impl BackendSpec {
    /// Takes new flows: active, and a weight above 0.
    pub fn eligible(&self) -> bool {
        self.state == BackendState::Active && self.weight > 0
    }
}

/// One frontend of the desired state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Frontend {
    /// `namespace/name:port`, the port's name (or number when unnamed).
    pub name: String,
    pub kind: Kind,
    #[serde(flatten)]
    pub key: FrontendKey,
    pub scheduler: Scheduler,
    /// sessionAffinity ClientIP timeout; `None` without affinity.
    pub affinity_timeout_s: Option<u32>,
    /// externalTrafficPolicy (external frontends) or internalTrafficPolicy
    /// (ClusterIP) is `Local`: only node-local endpoints, never SNAT.
    pub local_only: bool,
    /// A `Local` policy whose Service has usable endpoints, none of them on
    /// this node: new flows are dropped, not rejected (kube-proxy's DROP
    /// "has no local endpoints"), so clients retransmit while a load
    /// balancer's health checks move traffic elsewhere. A Service with no
    /// usable endpoint at all is rejected.
    pub no_local_endpoints: bool,
    /// Maglev table size (prime) for `mh` and `sh`; 0 for other schedulers
    /// or no eligible backend.
    pub maglev_size: u32,
    /// loadBalancerSourceRanges of a LoadBalancer frontend; empty: any source.
    pub source_ranges: Vec<IpNet>,
    /// Active backends first, then draining ones; sorted within each.
    /// Those [`BackendSpec::eligible`] take new flows.
    pub backends: Vec<BackendSpec>,
}

impl Frontend {
    /// The backends that take new flows (active, weight above 0).
    pub fn eligible(&self) -> impl Iterator<Item = &BackendSpec> {
        self.backends.iter().filter(|b| b.eligible())
    }
}
