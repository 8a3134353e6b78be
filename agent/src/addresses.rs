// SPDX-License-Identifier: MIT OR Apache-2.0
//! The node's own addresses, from rtnetlink: where NodePorts are opened by
//! default, as kube-proxy opens them on every local address (its iptables
//! `--dst-type LOCAL`, its `GetNodeIPs`). Followed as addresses come and go.
//!
//! Loopback and link-local addresses are left out: XDP and TC never see
//! loopback traffic, and a link-local address (a pod gateway such as
//! 169.254.1.1 or fe80::1, the same on every veth) names no one place.

use std::{collections::BTreeSet, net::IpAddr};

use futures::{FutureExt as _, StreamExt as _};
use rtnetlink::{
    MulticastGroup,
    packet_route::address::{AddressAttribute, AddressMessage},
};
use tokio::sync::watch;

/// Whether `a` can carry a NodePort.
pub fn usable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

/// The address of one rtnetlink address message (IFA_LOCAL first: on a
/// point-to-point link IFA_ADDRESS is the peer's).
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// Every usable address of this network namespace, sorted.
async fn dump(handle: &rtnetlink::Handle) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = BTreeSet::new();
    let mut msgs = handle.address().get().execute();
    while let Some(m) = msgs.next().await {
        if let Some(a) = address_of(&m?).filter(usable) {
            out.insert(a);
        }
    }
    Ok(out.into_iter().collect())
}

/// The addresses now (for `--dry-run`).
pub async fn list() -> anyhow::Result<Vec<IpAddr>> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let out = dump(&handle).await;
    task.abort();
    out
}

/// Publishes the addresses on `tx` now and after every change; returns
/// once the first list is published.
pub async fn follow(tx: watch::Sender<Vec<IpAddr>>) -> anyhow::Result<()> {
    let (conn, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr])?;
    tokio::spawn(conn);
    tx.send_replace(dump(&handle).await?);
    tokio::spawn(async move {
        // Any notification: list again (a burst of them, once), so a missed
        // or reordered message can never leave a stale address behind.
        while messages.next().await.is_some() {
            while let Some(Some(_)) = messages.next().now_or_never() {}
            match dump(&handle).await {
                Ok(now) => {
                    tx.send_if_modified(|old| {
                        let changed = *old != now;
                        if changed {
                            tracing::info!(addresses = ?now, "node addresses changed");
                            *old = now;
                        }
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "listing the node's addresses failed"),
            }
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(())
}
