// SPDX-License-Identifier: MIT OR Apache-2.0
//! API mode: the one agent holding the `xlb-lbipam` Lease allocates and
//! writes each LoadBalancer Service's `status.loadBalancer.ingress`
//! (`ipMode: VIP`) through the status subresource, as a cloud's service
//! controller does (`k8s.io/cloud-provider` `controllers/service`).
//!
//! - Elected with [`crate::lease::Elector`] and client-go's timings (15 s,
//!   renewed every 2 s): allocation is not latency-bound.
//! - The allocation is [`super::allocate`] on the leader's snapshot: the
//!   state is the Services' statuses, plus what this leader wrote and its
//!   watch has not shown yet (so a lagging watch never gives an address
//!   twice).
//! - Each write is a merge patch carrying the Service's resourceVersion as
//!   a precondition: a write from a stale view gets 409 and is redone from
//!   the next snapshot. No write is sent once the hold has ended, and none
//!   may outlive it (its timeout is the time left).
//! - A Service that stops being `type: LoadBalancer` loses its status in
//!   the API server itself (the Service registry clears it on that update),
//!   so its addresses are free for the next allocation.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;

use super::allocate::{self, Inputs, held_in_status, id_of};
use crate::{
    lease::{Elector, Step, Timing, boot_ns},
    source::Snapshot,
};

/// The allocator's Lease, in the agent's namespace.
pub const LEASE: &str = "xlb-lbipam";

/// What the leader wrote and its watch has not shown yet, per Service
/// (`namespace/name`): the Service's UID and the resourceVersion the write
/// was fenced with, and the addresses. An entry stands while the snapshot
/// still shows that very version of that very Service.
pub type Written = BTreeMap<String, (String, String, Vec<IpAddr>)>;

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs for the agent's life: stands for election (every renewal period,
/// as client-go), and while leading keeps the statuses equal to the
/// allocation. Releases the Lease on `stop`.
pub async fn run(
    client: Client,
    namespace: String,
    identity: String,
    lb_class: String,
    metrics: crate::metrics::LeaseMetrics,
    mut snaps: watch::Receiver<Snapshot>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let timing = Timing::ALLOCATOR;
    let mut e = Elector::new(api.clone(), LEASE.into(), identity, timing);
    let mut tick = tokio::time::interval(timing.renew);
    let mut written = Written::new();
    loop {
        let elect = tokio::select! {
            _ = tick.tick() => true,
            r = snaps.changed() => if r.is_err() { break } else { false },
            _ = stop.changed() => break,
        };
        if elect {
            if e.held().is_none() {
                e.refresh(CALL_TIMEOUT).await;
            }
            match e.step(true, Duration::ZERO, CALL_TIMEOUT).await {
                Step::Acquired(_) => tracing::info!(lease = LEASE, "leading the LoadBalancer address allocation"),
                Step::Lost => tracing::warn!(lease = LEASE, "no longer leading the LoadBalancer address allocation"),
                Step::Failed(m) => tracing::debug!(lease = LEASE, error = m, "allocator lease write failed"),
                _ => {}
            }
        }
        metrics.allocator_leader.set(i64::from(e.held().is_some()));
        let Some(held) = e.held() else {
            written.clear();
            continue;
        };
        let snap = snaps.borrow_and_update().clone();
        if snap.synced && snap.lb_synced {
            let n = write_statuses(&client, &snap, &lb_class, &mut written, held.until).await;
            metrics.status_writes.inc_by(n);
        }
    }
    e.release(Duration::from_secs(1)).await;
    metrics.allocator_leader.set(0);
}

/// Brings every Service's status to the allocation of `snap`; stops at
/// `until` (boot ns), and no write outlives it. Returns the writes made.
pub async fn write_statuses(
    client: &Client,
    snap: &Snapshot,
    lb_class: &str,
    written: &mut Written,
    until: u64,
) -> u64 {
    let mut n = 0;
    written.retain(|id, (uid, rv, _)| {
        snap.services.iter().any(|s| {
            id_of(s) == *id
                && s.metadata.uid.as_deref() == Some(uid.as_str())
                && s.metadata.resource_version.as_deref() == Some(rv.as_str())
        })
    });
    let previous: BTreeMap<String, Vec<IpAddr>> =
        written.iter().map(|(id, (_, _, a))| (id.clone(), a.clone())).collect();
    let inputs = Inputs {
        services: &snap.services,
        pools: &snap.pools,
        namespaces: &snap.namespaces,
        nodes: &snap.nodes,
        previous: &previous,
        lb_class,
    };
    let a = allocate::allocate(&inputs);
    for svc in &snap.services {
        let id = id_of(svc);
        let Some(want) = a.addresses.get(&id).filter(|w| **w != held_in_status(svc)) else { continue };
        if written.contains_key(&id) {
            continue; // written; the watch has not shown it yet
        }
        let left = until.saturating_sub(boot_ns());
        if left == 0 {
            return n;
        }
        let call = patch(client, svc, want);
        match tokio::time::timeout(Duration::from_nanos(left).min(CALL_TIMEOUT), call).await {
            Ok(Ok(())) => {
                tracing::info!(service = %id, addresses = ?want, "LoadBalancer status written");
                let uid = svc.metadata.uid.clone().unwrap_or_default();
                let rv = svc.metadata.resource_version.clone().unwrap_or_default();
                written.insert(id, (uid, rv, want.clone()));
                n += 1;
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                tracing::debug!(service = %id, "status write from a stale view; redone on the next snapshot");
            }
            Ok(Err(err)) => tracing::warn!(service = %id, error = %err, "writing the LoadBalancer status failed"),
            Err(_) => tracing::warn!(service = %id, "writing the LoadBalancer status timed out"),
        }
    }
    n
}

/// A merge patch of `status.loadBalancer`, fenced by the resourceVersion seen.
async fn patch(client: &Client, svc: &Service, addrs: &[IpAddr]) -> Result<(), kube::Error> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    // `ingress: null` removes the list (a revoked allocation).
    let lb = match addrs.is_empty() {
        true => serde_json::json!({"ingress": null}),
        false => serde_json::to_value(super::status_of(addrs)).unwrap_or_default(),
    };
    let body = serde_json::json!({
        "metadata": {"resourceVersion": svc.metadata.resource_version},
        "status": {"loadBalancer": lb},
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body)).await.map(|_| ())
}
