// SPDX-License-Identifier: MIT OR Apache-2.0
//! `LoadBalancerIPPool` (`xlb.io/v1alpha1`, cluster-scoped): where the
//! addresses of `type: LoadBalancer` Services come from on bare metal.
//!
//! ```yaml
//! apiVersion: xlb.io/v1alpha1
//! kind: LoadBalancerIPPool
//! metadata: {name: public}
//! spec:
//!   blocks:
//!   - cidr: 198.51.100.0/28
//!   - {start: 2001:db8:1::10, stop: 2001:db8:1::1f}
//!   serviceSelector: {matchLabels: {exposure: public}}
//! ```
//!
//! `mode: NodeIPs` hands out no address of its own: a Service it selects
//! gets the addresses of the eligible nodes (each node's ExternalIP, else
//! its InternalIP; `nodeSelector` narrows the nodes), k3s ServiceLB's
//! behaviour.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{
    CustomResource,
    core::{Selector, SelectorExt as _},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pool's spec.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[kube(
    group = "xlb.io",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    plural = "loadbalancerippools",
    shortname = "lbpool",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Disabled","type":"boolean","jsonPath":".spec.disabled"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolSpec {
    /// `Pool` (addresses from `blocks`, the default) or `NodeIPs` (the
    /// eligible nodes' own addresses).
    #[serde(default)]
    pub mode: PoolMode,
    /// Address blocks, both families: a `cidr`, or a `start`–`stop` range
    /// (inclusive). An IPv4 CIDR shorter than /31 leaves out its network and
    /// broadcast addresses.
    #[serde(default)]
    pub blocks: Vec<Block>,
    /// The Services this pool serves (by their labels); none: every Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// The namespaces whose Services this pool serves (by the Namespace's
    /// labels); none: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// `NodeIPs` mode: the nodes whose addresses are handed out; none: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// A disabled pool hands out nothing new; what it gave keeps its address.
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub enum PoolMode {
    #[default]
    Pool,
    #[serde(rename = "NodeIPs")]
    NodeIps,
}

/// One block of a pool: `cidr`, or `start` and `stop`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub struct Block {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
}

/// A parsed block: its first and last usable address (one family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl Range {
    /// A range of unicast addresses only (no multicast, loopback or
    /// unspecified address can be a LoadBalancer's).
    fn checked(first: IpAddr, last: IpAddr) -> Result<Self, String> {
        let bad = |a: &IpAddr| a.is_multicast() || a.is_loopback() || a.is_unspecified();
        if bad(&first) || bad(&last) {
            return Err(format!("{first}–{last} holds multicast, loopback or unspecified addresses"));
        }
        Ok(Self { first, last })
    }

    /// The first address of the range not in `used` (a walk over the used
    /// addresses inside the range: O(used), not O(range)).
    pub fn first_free<V>(&self, used: &std::collections::BTreeMap<IpAddr, V>) -> Option<IpAddr> {
        let v4 = self.first.is_ipv4();
        let mut candidate = to_u128(&self.first);
        for a in used.range(self.first..=self.last).map(|(a, _)| to_u128(a)) {
            if a == candidate {
                candidate += 1;
            } else if a > candidate {
                break;
            }
        }
        (candidate <= to_u128(&self.last)).then(|| from_u128(candidate, v4))
    }

    pub fn contains(&self, a: &IpAddr) -> bool {
        a.is_ipv4() == self.first.is_ipv4() && to_u128(a) >= to_u128(&self.first) && to_u128(a) <= to_u128(&self.last)
    }

    /// The addresses in order, from `first`.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.first.is_ipv4();
        (to_u128(&self.first)..=to_u128(&self.last)).map(move |n| from_u128(n, v4))
    }
}

pub fn to_u128(a: &IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(*a) as u128,
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn from_u128(n: u128, v4: bool) -> IpAddr {
    if v4 { IpAddr::V4((n as u32).into()) } else { IpAddr::V6(n.into()) }
}

impl Block {
    /// The block's range, or why it is not one.
    pub fn range(&self) -> Result<Range, String> {
        match (&self.cidr, &self.start, &self.stop) {
            (Some(c), None, None) => {
                let net: IpNet = c.trim().parse().map_err(|_| format!("cidr {c:?} is not a CIDR"))?;
                let net = net.trunc();
                let (mut first, mut last) = (net.network(), net.broadcast());
                match net {
                    IpNet::V4(n) if n.prefix_len() < 31 => {
                        first = from_u128(to_u128(&first) + 1, true);
                        last = from_u128(to_u128(&last) - 1, true);
                    }
                    // The subnet-router anycast address (RFC 4291 §2.6.1).
                    IpNet::V6(n) if n.prefix_len() < 127 => first = from_u128(to_u128(&first) + 1, false),
                    _ => {}
                }
                Range::checked(first, last)
            }
            (None, Some(s), Some(e)) => {
                let first: IpAddr = s.trim().parse().map_err(|_| format!("start {s:?} is not an address"))?;
                let last: IpAddr = e.trim().parse().map_err(|_| format!("stop {e:?} is not an address"))?;
                if first.is_ipv4() != last.is_ipv4() || to_u128(&first) > to_u128(&last) {
                    return Err(format!("{s}–{e} is not a range"));
                }
                Range::checked(first, last)
            }
            _ => Err("a block is a cidr, or a start and a stop".into()),
        }
    }
}

/// A label selector, or why it is not one. `None` selects everything.
pub fn selector(s: &Option<LabelSelector>) -> Result<Option<Selector>, String> {
    match s {
        None => Ok(None),
        Some(ls) => Selector::try_from(ls.clone()).map(Some).map_err(|e| e.to_string()),
    }
}

/// Whether `sel` (parsed by [`selector`]) selects `labels`.
pub fn selects(sel: &Option<Selector>, labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    match sel {
        None => true,
        Some(s) => s.matches(labels.unwrap_or(&Default::default())),
    }
}
