// SPDX-License-Identifier: MIT OR Apache-2.0
//! L2 ownership with the API server: one Lease per announced address
//! (`xlb-l2-<address>` in the agent's namespace, label `xlb.io/l2=true`),
//! held by the one node that answers ARP / NDP for it.
//!
//! - **Candidates**: the nodes [`super::eligible`] gives (every Node for
//!   `externalTrafficPolicy: Cluster`, the nodes with a ready endpoint for
//!   `Local`), and of them only a node with an L2 interface up and running.
//! - **Spread**: a free Lease (absent, released or expired) is tried by
//!   the candidate of rank k (rendezvous order, the last holder left out)
//!   k × 100 ms after it became free: the top node normally takes it, so
//!   owners spread over the nodes as in `--manifests` mode, not all on one.
//! - **Handover, not preemption**: a holder that stops being a candidate
//!   (its Local endpoint moved, its interface went down, SIGTERM) stops
//!   answering, *then* releases, and another takes over at once. The node
//!   ranked first that finds the Lease held by another (it started later,
//!   or came back) asks for it after being a candidate for two Lease
//!   durations (`spec.preferredHolder`, as Kubernetes' coordinated leader
//!   election does): the holder stops answering, releases, and it takes
//!   over — so owners end up spread as rendezvous hashing ranks them
//!   whatever the order agents started in. `--l2-rebalance=false` keeps
//!   every holder until it fails or stops being eligible (each move breaks
//!   the connections that need the old owner's conntrack).
//! - **Never two answering**: an answer's L2_ADDRS entry is written only
//!   after the write that took or renewed the Lease succeeded, with that
//!   hold's end as its deadline, which the XDP program checks itself: a
//!   holder that dies, freezes or is cut off from the API server falls
//!   silent before any other node may take its Lease (see
//!   [`crate::lease`]). A lost Lease's entry is removed at once.
//!
//! Leases are watched (one reflector on the label); a candidate only reads
//! the store, and writes when it takes or renews.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, reflector::ObjectRef, watcher},
};
use tokio::sync::watch;

use super::Announcer;
use crate::{
    lease::{Elector, Step, Timing, View, boot_ns},
    source::Snapshot,
};

/// The label on every L2 Lease.
pub const LABEL: &str = "xlb.io/l2";
/// The annotation naming a Lease's address.
pub const ADDRESS_ANNOTATION: &str = "xlb.io/address";
/// How long each rank waits after a Lease becomes free.
pub const RANK_DELAY: Duration = Duration::from_millis(100);
/// How often candidacy and Leases are looked at.
const TICK: Duration = Duration::from_millis(50);

/// Settings of the L2 Lease task.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    /// This agent's identity (`node/instance`, [`crate::lease::identity`]).
    pub identity: String,
    pub timing: Timing,
    pub external_ips: bool,
    pub lb_class: String,
    /// Ask for the Leases this node ranks first for (see the module doc).
    pub rebalance: bool,
    pub metrics: crate::metrics::LeaseMetrics,
}

/// The Lease of `addr`: IPv4 dotted, IPv6 as 32 hex digits (`::` could
/// end a name with `-`, which a Lease name may not).
pub fn lease_name(addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("xlb-l2-{a}"),
        IpAddr::V6(a) => format!("xlb-l2-{:032x}", u128::from(*a)),
    }
}

/// Runs until `stop`: stands for the Lease of every address this node may
/// announce and answers for the ones it holds; on `stop` answers nothing
/// and releases them all.
pub async fn run(
    client: Client,
    s: Settings,
    mut announcer: Announcer,
    mut snaps: watch::Receiver<Snapshot>,
    mut stop: watch::Receiver<bool>,
) {
    if !announcer.can_answer() {
        tracing::warn!("no L2_ADDRS map: not standing for any L2 address's Lease");
        return;
    }
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    let (store, writer) = reflector::store::<Lease>();
    let cfg = watcher::Config::default().labels(&format!("{LABEL}=true"));
    let stream = reflector(writer, watcher(api.clone(), cfg)).default_backoff();
    let watching = tokio::spawn(stream.for_each(|ev| async move {
        if let Err(e) = ev {
            tracing::warn!(error = %e, "watching the L2 leases failed; retrying");
        }
    }));
    let _abort = AbortOnDrop(watching);
    tokio::select! {
        r = store.wait_until_ready() => if r.is_err() { return },
        _ = stop.changed() => return,
    }
    let node = crate::lease::node_of(&s.identity).to_string();
    let mut electors: BTreeMap<IpAddr, Elector> = BTreeMap::new();
    // Per address: since when this node is a candidate, when it last asked.
    let mut since: BTreeMap<IpAddr, u64> = BTreeMap::new();
    let mut asked: BTreeMap<IpAddr, u64> = BTreeMap::new();
    let settle = 2 * s.timing.duration.as_nanos() as u64;
    // Per address: the eligible nodes, best ranked first (recomputed only
    // when the snapshot changes).
    let mut ranked: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if snaps.has_changed().unwrap_or(false) {
            let snap = snaps.borrow_and_update().clone();
            if snap.synced {
                ranked = super::eligible(&snap, s.external_ips, &s.lb_class)
                    .into_iter()
                    .map(|(a, nodes)| (a, super::ranked(&a, &nodes)))
                    .collect();
            }
        }
        let up = !announcer.interfaces_up().is_empty();
        let candidate = |a: &IpAddr| up && ranked.get(a).is_some_and(|n| n.contains(&node));
        // No longer a candidate: stop answering, then release.
        let leaving: Vec<IpAddr> = electors.keys().filter(|a| !candidate(a)).copied().collect();
        if !leaving.is_empty() {
            for a in &leaving {
                since.remove(a);
                asked.remove(a);
            }
            let mut gone: Vec<Elector> = leaving.iter().filter_map(|a| electors.remove(a)).collect();
            if sync(&mut announcer, &electors) {
                futures::future::join_all(gone.iter_mut().filter(|e| e.held().is_some()).map(|e| {
                    tracing::info!(lease = %e.name, "giving the L2 lease up");
                    e.release(s.timing.renew)
                }))
                .await;
            }
        }
        for a in ranked.keys().filter(|a| candidate(a)) {
            since.entry(*a).or_insert_with(boot_ns);
            electors.entry(*a).or_insert_with(|| {
                let labels = BTreeMap::from([(LABEL.to_string(), "true".to_string())]);
                let annotations = BTreeMap::from([(ADDRESS_ANNOTATION.to_string(), a.to_string())]);
                Elector::new(api.clone(), lease_name(a), s.identity.clone(), s.timing)
                    .with_metadata(labels, annotations)
            });
        }
        let now = boot_ns();
        for e in electors.values_mut() {
            let seen = store.get(&ObjectRef::new(&e.name).within(&s.namespace));
            e.observe(seen.as_deref(), now);
        }
        let steps = futures::future::join_all(electors.iter_mut().map(|(a, e)| {
            // Rank among the eligible nodes, the recorded holder's left out
            // (a dead holder stays a Node: its successor must not wait).
            let holder = e.recorded_holder().map(crate::lease::node_of);
            let order = ranked.get(a).into_iter().flatten();
            let k = order.filter(|n| Some(n.as_str()) != holder).position(|n| *n == node).unwrap_or(0);
            let delay = RANK_DELAY * k as u32;
            async move { (*a, e.step(true, delay, s.timing.renew).await) }
        }))
        .await;
        let mut changed = false;
        for (a, step) in steps {
            match step {
                Step::Acquired(_) => {
                    tracing::info!(addr = %a, "took the L2 lease: answering ARP / NDP");
                    s.metrics.l2_acquired.inc();
                    changed = true;
                }
                Step::Renewed(_) => changed = true,
                Step::Lost => {
                    tracing::warn!(addr = %a, "lost the L2 lease: no longer answering");
                    s.metrics.l2_lost.inc();
                    changed = true;
                }
                Step::Failed(m) => tracing::debug!(addr = %a, error = m, "L2 lease write failed"),
                Step::Idle => {}
            }
        }
        let synced = !changed || sync(&mut announcer, &electors);
        s.metrics.l2_answered.set(announcer.answered().len() as i64);
        // Asked to hand over: no longer answering (synced above), release.
        if synced {
            futures::future::join_all(electors.values_mut().filter(|e| e.asked_to_yield()).map(|e| {
                tracing::info!(lease = %e.name, to = ?e.recorded_preferred(), "handing the L2 lease over");
                e.release(s.timing.renew)
            }))
            .await;
        }
        if s.rebalance {
            let now = boot_ns();
            let asking: Vec<IpAddr> = electors
                .iter()
                .filter(|(a, e)| {
                    let View::Other(_) = e.view(now) else { return false };
                    // First-ranked, over a holder on another node (a second
                    // agent on this node is not asked), not too eagerly.
                    let first = ranked.get(*a).and_then(|n| n.first()) == Some(&node);
                    let other_node = e.recorded_holder().is_some_and(|h| crate::lease::node_of(h) != node);
                    let settled = since.get(*a).is_some_and(|t| now >= t + settle);
                    let recently = asked.get(*a).is_some_and(|t| now < t + settle);
                    first && other_node && settled && !recently && e.recorded_preferred() != Some(s.identity.as_str())
                })
                .map(|(a, _)| *a)
                .collect();
            for a in &asking {
                asked.insert(*a, now);
            }
            futures::future::join_all(electors.iter_mut().filter(|(a, _)| asking.contains(a)).map(
                |(a, e)| async move {
                    if e.prefer(s.timing.renew).await {
                        tracing::info!(addr = %a, "asked for the L2 lease (this node ranks first)");
                    }
                },
            ))
            .await;
        }
    }
    // Stopping: answer nothing, then give every Lease up.
    let none = BTreeMap::new();
    if let Err(e) = announcer.sync(&none) {
        tracing::warn!(error = %e, "clearing the L2 answers failed; the Leases are left to expire");
        return;
    }
    futures::future::join_all(electors.values_mut().map(|e| e.release(Duration::from_secs(1)))).await;
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Answers for exactly the addresses held, each until its hold ends.
/// False when the map could not be brought there (a release must wait:
/// the entry's deadline ends the answers instead).
fn sync(announcer: &mut Announcer, electors: &BTreeMap<IpAddr, Elector>) -> bool {
    let want: BTreeMap<IpAddr, u64> = electors.iter().filter_map(|(a, e)| Some((*a, e.held()?.until))).collect();
    match announcer.sync(&want) {
        Ok(gained) => {
            if !gained.is_empty() {
                tracing::info!(?gained, "announcing on L2");
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "updating the L2 answers failed");
            false
        }
    }
}
