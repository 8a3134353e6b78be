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
}

fn by_frontend(list: &[Keep]) -> HashMap<u32, HashSet<u32>> {
    list.iter().map(|k| (k.frontend, k.keep.iter().copied().collect())).collect()
}

/// Deletes the entries `report` made stale.
pub fn sweep(dp: &mut Datapath, report: &Report) -> Result<Swept, crate::Error> {
    let mut swept = Swept::default();
    if !report.stale_udp.is_empty() {
        let keep = by_frontend(&report.stale_udp);
        swept.conntrack = dp.conntrack_sweep(|k, e| {
            k.proto == PROTO_UDP && keep.get(&e.rev_nat_id).is_some_and(|ids| !ids.contains(&e.backend_id))
        })?;
    }
    if !report.stale_affinity.is_empty() {
        let keep = by_frontend(&report.stale_affinity);
        swept.affinity =
            dp.affinity_sweep(|k, v| keep.get(&k.service_id).is_some_and(|ids| !ids.contains(&v.backend_id)))?;
    }
    Ok(swept)
}
