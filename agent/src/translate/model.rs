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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    Maglev,
    RoundRobin,
    Random,
}

impl Scheduler {
    pub fn number(self) -> u8 {
        match self {
            Self::Maglev => datapath_common::SCHED_MAGLEV,
            Self::RoundRobin => datapath_common::SCHED_ROUND_ROBIN,
            Self::Random => datapath_common::SCHED_RANDOM,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            datapath_common::SCHED_MAGLEV => Some(Self::Maglev),
            datapath_common::SCHED_ROUND_ROBIN => Some(Self::RoundRobin),
            datapath_common::SCHED_RANDOM => Some(Self::Random),
            _ => None,
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "maglev" => Some(Self::Maglev),
            "round-robin" | "rr" => Some(Self::RoundRobin),
            "random" => Some(Self::Random),
            _ => None,
        }
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
    /// Maglev table size (prime), 0 for other schedulers or no backends.
    pub maglev_size: u32,
    /// loadBalancerSourceRanges of a LoadBalancer frontend; empty: any source.
    pub source_ranges: Vec<IpNet>,
    /// Eligible (`active`) backends first, then draining ones; sorted within each.
    pub backends: Vec<BackendSpec>,
}

impl Frontend {
    pub fn active(&self) -> impl Iterator<Item = &BackendSpec> {
        self.backends.iter().filter(|b| b.state == BackendState::Active)
    }
}
