// SPDX-License-Identifier: MIT OR Apache-2.0
//! After a sync: entries that would keep sending traffic where a frontend
//! no longer sends it go.
//!
//! - UDP conntrack entries to a backend that is no longer a *serving*
//!   endpoint of their frontend (removed, or not serving), as kube-proxy's
//!   `conntrack/cleanup.go`: a client with a fixed source port (a DNS
//!   resolver) would otherwise keep its flow to the dead endpoint for as
//!   long as it keeps sending. Its next packet is a new flow and is balanced
//!   again. TCP is left to finish (its flows drain). As kube-proxy: traffic
//!   policy and topology changes move nothing (the serving set is the service
//!   port's, over all its frontends; only a Service whose every frontend is
//!   Local, a ClusterIP-only one with `internalTrafficPolicy: Local`, loses
//!   its flows to other nodes' endpoints when it turns Local), a terminating
//!   endpoint that still serves keeps its flows, and a frontend left with
//!   no serving endpoint keeps them all.
//! - sessionAffinity entries to a backend the frontend no longer lists as
//!   active: kube-proxy's affinity lives in the endpoint chains of one
//!   Service, so it can only ever return an endpoint that Service still
//!   uses; in xlb the BACKENDS state is shared by every frontend naming the
//!   endpoint, so the datapath alone cannot tell.
//!
//! Each sweep walks the map once, and only after a sync that made an entry
//! stale ([`Report::stale_udp`], [`Report::stale_affinity`]). Between the
//! sync and the sweep (milliseconds) an entry can still be used.

use std::collections::{HashMap, HashSet};

use datapath_common::PROTO_UDP;

use crate::{
    Datapath,
    writer::{Keep, Report},
};

/// What a sweep deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub conntrack: usize,
    pub affinity: usize,
    /// Connected UDP sockets (socket-LB) aborted: see `sock_diag`.
    pub sockets: usize,
}

fn by_frontend(list: &[Keep]) -> HashMap<u32, HashSet<u32>> {
    list.iter().map(|k| (k.frontend, k.keep.iter().copied().collect())).collect()
}

/// Aborts the connected UDP sockets socket-LB sent to a backend their UDP
/// frontend no longer keeps, and forgets their reverse entries.
fn sockets(dp: &mut Datapath, keep: &HashMap<u32, HashSet<u32>>) -> Result<usize, crate::Error> {
    let entries = dp.sock_rev();
    if entries.is_empty() {
        return Ok(0);
    }
    let stale: HashMap<u32, HashSet<([u8; 16], u16)>> = keep
        .iter()
        .filter(|(id, _)| dp.frontend(**id).is_some_and(|f| f.key.proto == PROTO_UDP))
        .map(|(id, ids)| (*id, ids.iter().filter_map(|b| dp.backend(*b)).map(|b| (b.addr, b.port)).collect()))
        .collect();
    let targets = crate::sock_diag::stale(&entries, &stale);
    if targets.is_empty() {
        return Ok(0);
    }
    // The stale reverse entries go whatever the sockets are (an unconnected
    // socket's next datagram is balanced again and writes a new one).
    for (k, _) in entries.iter().filter(|(k, _)| targets.get(&k.cookie).is_some_and(|s| s.contains(&(k.addr, k.port))))
    {
        dp.sock_rev_remove(k)?;
    }
    let host_only = dp.config().is_ok_and(|c| c.flags & datapath_common::CFG_F_SOCK_HOST_ONLY != 0);
    match crate::sock_diag::destroy(&targets, host_only) {
        Ok(d) => {
            if d.unreachable > 0 {
                tracing::warn!(
                    namespaces = d.unreachable,
                    "could not enter some network namespaces to abort their UDP sockets to removed backends \
                     (needs CAP_SYS_ADMIN and CAP_SYS_PTRACE, and the host's PIDs)"
                );
            }
            Ok(d.sockets)
        }
        Err(e) => {
            tracing::warn!(error = %e, "aborting connected UDP sockets to removed backends failed (sock_diag SOCK_DESTROY)");
            Ok(0)
        }
    }
}

/// Deletes the entries `report` made stale.
pub fn sweep(dp: &mut Datapath, report: &Report) -> Result<Swept, crate::Error> {
    let mut swept = Swept::default();
    if !report.stale_udp.is_empty() {
        let keep = by_frontend(&report.stale_udp);
        swept.conntrack = dp.conntrack_sweep(|k, e| {
            k.proto == PROTO_UDP && keep.get(&e.rev_nat_id).is_some_and(|ids| !ids.contains(&e.backend_id))
        })?;
        swept.sockets = sockets(dp, &keep)?;
    }
    if !report.stale_affinity.is_empty() {
        let keep = by_frontend(&report.stale_affinity);
        swept.affinity =
            dp.affinity_sweep(|k, v| keep.get(&k.service_id).is_some_and(|ids| !ids.contains(&v.backend_id)))?;
    }
    Ok(swept)
}
