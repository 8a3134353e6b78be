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
//!   the next snapshot. No write is sent once the hold has ended.
//! - A Service that stops being `type: LoadBalancer` has its ingress
//!   cleared (the service controller's cleanup): its addresses are free.

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

/// What the leader writes: Service `namespace/name` → its addresses.
pub type Written = BTreeMap<String, Vec<IpAddr>>;

/// Runs for the agent's life: stands for election, and while leading keeps
/// the statuses equal to the allocation. Releases the Lease on `stop`.
pub async fn run(
    client: Client,
    namespace: String,
    identity: String,
    lb_class: String,
    mut snaps: watch::Receiver<Snapshot>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let mut e = Elector::new(api.clone(), LEASE.into(), identity, Timing::ALLOCATOR);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut written = Written::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = snaps.changed() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
        if e.held().is_none() {
            match api.get_opt(LEASE).await {
                Ok(seen) => e.observe(seen.as_ref(), boot_ns()),
                Err(err) => tracing::debug!(error = %err, "reading the allocator lease failed"),
            }
        }
        match e.step(true, Duration::ZERO, Duration::from_secs(5)).await {
            Step::Acquired(_) => tracing::info!(lease = LEASE, "leading the LoadBalancer address allocation"),
            Step::Lost => tracing::warn!(lease = LEASE, "no longer leading the LoadBalancer address allocation"),
            Step::Failed(m) => tracing::debug!(lease = LEASE, error = m, "allocator lease write failed"),
            _ => {}
        }
        let Some(held) = e.held() else {
            written.clear();
            continue;
        };
        let snap = snaps.borrow_and_update().clone();
        if snap.synced && snap.lb_synced {
            write_statuses(&client, &snap, &lb_class, &mut written, held.until).await;
        }
    }
    e.release(Duration::from_secs(1)).await;
}

/// Brings every Service's status to the allocation of `snap`; stops at `until`.
pub async fn write_statuses(client: &Client, snap: &Snapshot, lb_class: &str, written: &mut Written, until: u64) {
    // What was written and not yet seen in a status counts as held.
    written.retain(|id, addrs| snap.services.iter().any(|s| id_of(s) == *id && held_in_status(s) != *addrs));
    let inputs = Inputs {
        services: &snap.services,
        pools: &snap.pools,
        namespaces: &snap.namespaces,
        nodes: &snap.nodes,
        previous: written,
        lb_class,
    };
    let a = allocate::allocate(&inputs);
    for svc in &snap.services {
        let id = id_of(svc);
        let have = held_in_status(svc);
        let want = match a.addresses.get(&id) {
            Some(want) if *want != have => want.clone(),
            Some(_) => continue,
            // Not a LoadBalancer (any more): its ingress is cleared.
            None if !have.is_empty() && !is_load_balancer(svc) => Vec::new(),
            None => continue,
        };
        if written.get(&id) == Some(&want) {
            continue; // written; the watch has not shown it yet
        }
        if boot_ns() >= until {
            return;
        }
        match patch(client, svc, &want).await {
            Ok(()) => {
                tracing::info!(service = %id, addresses = ?want, "LoadBalancer status written");
                written.insert(id, want);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(service = %id, "status write from a stale view; redone on the next snapshot");
            }
            Err(err) => tracing::warn!(service = %id, error = %err, "writing the LoadBalancer status failed"),
        }
    }
}

fn is_load_balancer(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

/// A merge patch of `status.loadBalancer`, fenced by the resourceVersion seen.
async fn patch(client: &Client, svc: &Service, addrs: &[IpAddr]) -> Result<(), kube::Error> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut lb = serde_json::to_value(super::status_of(addrs)).unwrap_or_default();
    if addrs.is_empty() {
        lb = serde_json::json!({"ingress": null});
    }
    let body = serde_json::json!({
        "metadata": {"resourceVersion": svc.metadata.resource_version},
        "status": {"loadBalancer": lb},
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body)).await.map(|_| ())
}
