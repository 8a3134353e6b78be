// SPDX-License-Identifier: MIT OR Apache-2.0
//! Keeps the kernel's neighbour entries for backends' next hops resolved.
//!
//! XDP cannot resolve a neighbour: when `bpf_fib_lookup` finds a route but
//! no MAC, the datapath hands the rewritten packet to the kernel. For a
//! packet SNATed to a node address the kernel drops it (a "martian" with a
//! local source), so the first packets to a remote backend would be lost
//! until something else resolved the next hop. The agent therefore installs
//! a *managed* neighbour entry (`NTF_EXT_MANAGED`, Linux ≥ 5.16) for the
//! next hop of every remote backend: the kernel resolves it at once and
//! keeps it reachable, as Cilium does for its nodes.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    AddressFamily,
    neighbour::{NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};

/// Managed neighbours installed so far (next hop, interface), and the
/// destinations already looked up (each backend address is routed once per
/// agent run, so a sync with 20,000 backends costs no 20,000 route lookups).
#[derive(Default)]
pub struct Neighbours {
    done: HashSet<(IpAddr, u32)>,
    looked_up: HashSet<IpAddr>,
    handle: Option<rtnetlink::Handle>,
}

impl Neighbours {
    fn handle(&mut self) -> anyhow::Result<rtnetlink::Handle> {
        if let Some(h) = &self.handle {
            return Ok(h.clone());
        }
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        self.handle = Some(handle.clone());
        Ok(handle)
    }

    /// The next hop and output interface the kernel would use for `dst`,
    /// `None` for local or unreachable destinations.
    async fn next_hop(handle: &rtnetlink::Handle, dst: IpAddr) -> anyhow::Result<Option<(IpAddr, u32)>> {
        let mut msg = RouteMessage::default();
        let (family, len, addr) = match dst {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(addr));
        let mut req = handle.route().get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build());
        *req.message_mut() = msg;
        let Some(route) = req.execute().try_next().await? else { return Ok(None) };
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let mut gw = None;
        let mut oif = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        Ok(oif.map(|i| (gw.unwrap_or(dst), i)))
    }

    /// Makes sure the next hop of every address in `dsts` has a managed
    /// neighbour entry. Failures are logged, never fatal.
    pub async fn ensure(&mut self, dsts: impl IntoIterator<Item = IpAddr>) {
        let handle = match self.handle() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "netlink unavailable; neighbours not managed");
                return;
            }
        };
        let mut hops = HashSet::new();
        for dst in dsts {
            if !self.looked_up.insert(dst) {
                continue;
            }
            match Self::next_hop(&handle, dst).await {
                Ok(Some(h)) => {
                    hops.insert(h);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(%dst, error = %e, "route lookup failed"),
            }
        }
        for (hop, ifindex) in hops {
            if self.done.contains(&(hop, ifindex)) || is_link_local(hop) {
                continue;
            }
            let mut req = handle.neighbours().add(ifindex, hop).replace();
            let m = req.message_mut();
            m.header.state = NeighbourState::None;
            m.header.flags = NeighbourFlags::ExtLearned;
            m.attributes.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            match req.execute().await {
                Ok(()) => {
                    tracing::info!(%hop, ifindex, "managed neighbour installed");
                    self.done.insert((hop, ifindex));
                }
                Err(e) => {
                    tracing::warn!(%hop, ifindex, error = %e, "could not install a managed neighbour");
                    self.done.insert((hop, ifindex));
                }
            }
        }
    }
}

fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_loopback(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == Ipv6Addr::LOCALHOST,
    }
}
