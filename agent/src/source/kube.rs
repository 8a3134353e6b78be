// SPDX-License-Identifier: MIT OR Apache-2.0
//! The Kubernetes source: kube-rs watchers + reflector stores for Services,
//! EndpointSlices and Nodes (all of them: L2 ownership ranks the nodes), and
//! for the LoadBalancer allocation's LoadBalancerIPPools and Namespaces.
//!
//! The watchers list, then watch from the list's resourceVersion (with
//! bookmarks); on `410 Gone` they re-list, and on any error they retry with
//! exponential backoff. The stores keep their last complete view while the
//! API server is unreachable, so the datapath keeps programming (and
//! forwarding) from it: nothing is ever flushed because of an outage. A
//! re-list replaces a store atomically when it completes.

use std::{path::Path, time::Instant};

use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::watch;

use super::{Selector, Snapshot};
use crate::lbipam::{self, LoadBalancerIPPool};

/// A client from `kubeconfig`, or the in-cluster / default configuration.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Which store an event touched.
#[derive(Clone, Copy, Debug)]
enum Which {
    Services,
    Slices,
    Nodes,
    Pools,
    Namespaces,
}

fn events<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    which: Which,
) -> BoxStream<'static, (Which, Result<bool, watcher::Error>)>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    reflector(writer, watcher(api, config))
        .default_backoff()
        .map(move |ev| (which, ev.map(|e| matches!(e, watcher::Event::InitDone))))
        .boxed()
}

/// Runs the watchers and publishes a [`Snapshot`] after every change once
/// Services, EndpointSlices and Nodes have completed their first list
/// (`synced`); pools and Namespaces only gate the LoadBalancer allocation
/// (`lb_synced`: a cluster without the CRD still gets its Services
/// programmed). Services and EndpointSlices are watched through
/// `selector`'s label selector.
pub async fn run(
    client: Client,
    selector: Selector,
    lb_class: String,
    tx: watch::Sender<Snapshot>,
) -> anyhow::Result<()> {
    let (services, sw) = reflector::store::<Service>();
    let (slices, ew) = reflector::store::<EndpointSlice>();
    let (nodes, nw) = reflector::store::<Node>();
    let (pools, pw) = reflector::store::<LoadBalancerIPPool>();
    let (namespaces, nsw) = reflector::store::<Namespace>();
    let cfg = watcher::Config::default().labels(&selector.label_selector());
    let all = watcher::Config::default();
    let mut stream = futures::stream::select_all([
        events(Api::<Service>::all(client.clone()), cfg.clone(), sw, Which::Services),
        events(Api::<EndpointSlice>::all(client.clone()), cfg, ew, Which::Slices),
        events(Api::<Node>::all(client.clone()), all.clone(), nw, Which::Nodes),
        events(Api::<LoadBalancerIPPool>::all(client.clone()), all.clone(), pw, Which::Pools),
        events(Api::<Namespace>::all(client), all, nsw, Which::Namespaces),
    ]);
    let mut ready = [false; 5];
    // Failures said at warn level once per kind until it works again (a
    // cluster without the pools' CRD would otherwise log at every retry).
    let mut failing = [false; 5];
    let mut handle = |which: Which, ev: Result<bool, watcher::Error>, ready: &mut [bool; 5]| match ev {
        Ok(true) => {
            tracing::info!(?which, "initial list complete");
            ready[which as usize] = true;
            failing[which as usize] = false;
        }
        Ok(false) => failing[which as usize] = false,
        // The stores keep their last view; the watcher backs off and retries.
        Err(e) if !failing[which as usize] => {
            failing[which as usize] = true;
            let hint = if matches!(which, Which::Pools) { " (is the LoadBalancerIPPool CRD installed?)" } else { "" };
            tracing::warn!(?which, error = %e, "watch failed; keeping the last state and retrying{hint}")
        }
        Err(e) => tracing::debug!(?which, error = %e, "watch still failing"),
    };
    while let Some((which, ev)) = stream.next().await {
        let at = Instant::now();
        handle(which, ev, &mut ready);
        // Take every event already waiting too: a burst (a rollout, a
        // re-list) costs one snapshot, with no added latency.
        while let Some(Some((which, ev))) = stream.next().now_or_never() {
            handle(which, ev, &mut ready);
        }
        if !ready[..3].iter().all(|r| *r) {
            continue;
        }
        let mut snap = Snapshot {
            services: services.state(),
            slices: slices.state(),
            nodes: nodes.state(),
            pools: pools.state(),
            namespaces: namespaces.state(),
            changed_at: Some(at),
            synced: true,
            lb_synced: ready[3] && ready[4],
            ..Snapshot::default()
        };
        if snap.lb_synced {
            // The allocation's problems, as the leader sees them (every
            // agent computes the same; each Event is created once).
            // Statuses are the leader's to write (`lbipam::leader`).
            snap.lb_problems = lbipam::problems(&snap, &lb_class);
        }
        if tx.send(snap).is_err() {
            break;
        }
    }
    Ok(())
}
