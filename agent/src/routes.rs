// SPDX-License-Identifier: MIT OR Apache-2.0
//! What the datapath's next-hop cache (`datapath_common::NextHop`) must
//! follow, from rtnetlink: every route, rule or link notification, and every
//! neighbour whose MAC or validity changed, is one more *route change*; the
//! run loop turns the count into `Config::route_epoch`, which retires every
//! cached next hop at once. The `ip rule` list and the routes say whether a
//! per-backend cache is right at all ([`destination_only`],
//! [`single_path`]); the interfaces' forwarding switches, whether it may
//! ignore the interface a packet came in on.
//!
//! Neighbours are filtered because they chatter: a neighbour going
//! REACHABLE → STALE → DELAY → REACHABLE is announced at each step, and
//! none of those change where a packet goes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{FutureExt as _, StreamExt as _};
use rtnetlink::{
    IpVersion, MulticastGroup, RouteMessageBuilder,
    packet_core::{NetlinkPayload, Nla as _},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAttribute, RouteMessage},
        rule::{RuleAttribute, RuleMessage},
    },
};
use tokio::sync::watch;

/// What the run loop writes to the datapath's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteState {
    /// Route changes seen since the agent started.
    pub changes: u32,
    /// The route to an address depends on nothing but the address (no
    /// `ip rule` selects by source, port, interface, TOS or protocol; no
    /// multipath or source-specific route), so a next hop can be cached per
    /// backend.
    pub per_backend: bool,
    /// Some interface does not forward IPv4 / IPv6: a cached next hop is
    /// only for the interface it was looked up from.
    pub per_ingress4: bool,
    pub per_ingress6: bool,
}

/// True when `r` picks a table by the destination at most: the rules a
/// per-backend cache stays right under. A firewall mark or uid selector
/// counts as destination-only, since the datapath's FIB lookups carry
/// neither (they match as for an unmarked packet, every time).
pub fn destination_only(r: &RuleMessage) -> bool {
    r.header.src_len == 0
        && r.header.tos == 0
        && r.attributes.iter().all(|a| {
            !matches!(
                a,
                RuleAttribute::Source(_)
                    | RuleAttribute::Iifname(_)
                    | RuleAttribute::Oifname(_)
                    | RuleAttribute::L3MDev(_)
                    | RuleAttribute::IpProtocol(_)
                    | RuleAttribute::SourcePortRange(_)
                    | RuleAttribute::DestinationPortRange(_)
                    | RuleAttribute::TunId(_)
                    // A selector this code does not know: assume the worst.
                    | RuleAttribute::Other(_)
            )
        })
}

/// `RTA_NH_ID`: the route's next hop is a nexthop object, which may be a
/// multipath group.
const RTA_NH_ID: u16 = 30;

/// True when `r` sends everything to one next hop, whatever the source:
/// not multipath (the kernel picks a path by a hash of the flow, source and
/// perhaps ports included), no nexthop object (it may be a group), not an
/// IPv6 source-specific route (`ip -6 route add … from …`).
pub fn single_path(r: &RouteMessage) -> bool {
    r.header.source_prefix_length == 0
        && r.attributes.iter().all(|a| match a {
            RouteAttribute::MultiPath(_) => false,
            RouteAttribute::Other(nla) => nla.kind() != RTA_NH_ID,
            _ => true,
        })
}

/// Whether every route of both families, in every table, is [`single_path`].
async fn routes_single_path(handle: &rtnetlink::Handle) -> anyhow::Result<bool> {
    let dumps = [
        handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute().boxed(),
        handle.route().get(RouteMessageBuilder::<Ipv6Addr>::new().build()).execute().boxed(),
    ];
    for (v6, mut routes) in dumps.into_iter().enumerate() {
        while let Some(r) = routes.next().await {
            let r = match r {
                Ok(r) => r,
                Err(e) if v6 == 1 && no_family(&e) => break,
                Err(e) => return Err(e.into()),
            };
            if !single_path(&r) {
                tracing::info!(route = ?r, "a multipath or source-specific route: no per-backend next hops");
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The kernel has no such address family (IPv6 compiled out or disabled).
fn no_family(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EAFNOSUPPORT)
}

/// Whether some interface has forwarding off for IPv4 (`v6` false) or IPv6:
/// then the FIB refuses packets that came in on it, whatever the route.
fn some_interface_does_not_forward(v6: bool) -> bool {
    let dir = if v6 { "/proc/sys/net/ipv6/conf" } else { "/proc/sys/net/ipv4/conf" };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        let name = e.file_name();
        name != "all"
            && name != "default"
            && std::fs::read_to_string(e.path().join("forwarding")).is_ok_and(|v| v.trim() == "0")
    })
}

/// The state as the kernel has it now (`changes` aside). A listing that
/// fails turns the cache off: never a guess that could misroute.
async fn current(handle: &rtnetlink::Handle, changes: u32) -> RouteState {
    let rules = rules_destination_only(handle).await;
    let routes = routes_single_path(handle).await;
    let per_backend = match (rules, routes) {
        (Ok(a), Ok(b)) => a && b,
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "listing ip rules or routes failed: no per-backend next hops");
            false
        }
    };
    RouteState {
        changes,
        per_backend,
        per_ingress4: some_interface_does_not_forward(false),
        per_ingress6: some_interface_does_not_forward(true),
    }
}

/// Whether every rule of both families is [`destination_only`]. A kernel
/// without IPv6 has no IPv6 rules to list.
async fn rules_destination_only(handle: &rtnetlink::Handle) -> anyhow::Result<bool> {
    for v in [IpVersion::V4, IpVersion::V6] {
        let v6 = v == IpVersion::V6;
        let mut rules = handle.rule().get(v).execute();
        while let Some(r) = rules.next().await {
            let r = match r {
                Ok(r) => r,
                Err(e) if v6 && no_family(&e) => break,
                Err(e) => return Err(e.into()),
            };
            if !destination_only(&r) {
                tracing::info!(rule = ?r, "an ip rule selects by more than the destination: no per-backend next hops");
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// A neighbour's identity and where it sends packets: its MAC while its
/// state lets the FIB use it, `None` otherwise.
fn neighbour(m: &NeighbourMessage, gone: bool) -> Option<((u32, IpAddr), Option<Vec<u8>>)> {
    // Bridge FDB entries (a VXLAN's carry its VTEP's IP): not what a FIB
    // lookup resolves.
    if !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    let addr = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let valid = !gone
        && matches!(
            m.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => Some(l.clone()),
        _ => None,
    });
    Some(((m.header.ifindex, addr), mac.filter(|_| valid)))
}

/// Records neighbour message `n`; true when it changes where packets to the
/// neighbour go (a neighbour seen for the first time may have been cached
/// before we knew it: that counts).
fn note_neighbour(known: &mut HashMap<(u32, IpAddr), Option<Vec<u8>>>, n: &NeighbourMessage, gone: bool) -> bool {
    let Some((key, mac)) = neighbour(n, gone) else {
        return false;
    };
    let changed = known.get(&key) != Some(&mac);
    if gone {
        known.remove(&key);
    } else {
        known.insert(key, mac);
    }
    changed
}

/// Follows the changes, publishing on `tx` (first with the state as it is
/// now, before returning). Every route, rule, link, nexthop or forwarding
/// (netconf) notification re-reads the state; neighbours count only when
/// their MAC or validity changed.
pub async fn follow(tx: watch::Sender<RouteState>) -> anyhow::Result<()> {
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
        MulticastGroup::Nexthop,
        MulticastGroup::Ipv4Netconf,
        MulticastGroup::Ipv6Netconf,
    ])?;
    tokio::spawn(conn);
    let mut state = current(&handle, 0).await;
    tx.send_replace(state);
    tokio::spawn(async move {
        let mut neighbours: HashMap<(u32, IpAddr), Option<Vec<u8>>> = HashMap::new();
        while let Some(first) = messages.next().await {
            // A burst of notifications is one change.
            let mut changed = false;
            let mut reread = false;
            let mut next = Some(first);
            // At most this many per burst: a storm still publishes.
            let mut budget = 1024;
            while let Some((m, _)) = next {
                match m.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                        changed |= note_neighbour(&mut neighbours, &n, false);
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => {
                        changed |= note_neighbour(&mut neighbours, &n, true);
                    }
                    NetlinkPayload::InnerMessage(_) => {
                        changed = true;
                        reread = true;
                    }
                    // An overrun (the socket's buffer filled): whatever was
                    // lost may have been a change.
                    _ => {
                        neighbours.clear();
                        changed = true;
                        reread = true;
                    }
                }
                budget -= 1;
                next = if budget > 0 { messages.next().now_or_never().flatten() } else { None };
            }
            if !changed {
                continue;
            }
            let changes = state.changes.wrapping_add(1);
            state = if reread { current(&handle, changes).await } else { RouteState { changes, ..state } };
            if tx.send(state).is_err() {
                return;
            }
        }
        tracing::warn!("route notifications ended: no per-backend next hops from now on");
        let _ = tx.send(RouteState { changes: state.changes.wrapping_add(1), per_backend: false, ..state });
    });
    Ok(())
}
