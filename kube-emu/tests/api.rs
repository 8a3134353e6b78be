// SPDX-License-Identifier: MIT OR Apache-2.0
//! The emulator through real kube-rs clients: Lease create / get / replace
//! with optimistic concurrency (409, 422, create-on-update), delete, a
//! watch under a label selector; the Service status subresource (a merge
//! patch keeps spec, shows in lists and watches, a stale resourceVersion
//! precondition is 409, JSON patch 415, the harness's apply keeps it);
//! LoadBalancerIPPools and Namespaces listed and watched.

mod common;

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use common::{api_error, client, http};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Namespace, Service},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Resource as _,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    core::{WatchEvent, params::WatchParams},
};
use kube_emu::{ApiServer, Kind};
use serde_json::json;

const NS: &str = "xlb-system";
const MODIFIED: &str = "the object has been modified; please apply your changes to the latest version and try again";

fn lease(name: &str, holder: &str, labels: &[(&str, &str)]) -> Lease {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Lease {
        metadata: ObjectMeta { name: Some(name.into()), labels: Some(labels), ..ObjectMeta::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(2),
            ..LeaseSpec::default()
        }),
    }
}

fn holder(l: &Lease) -> &str {
    l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).unwrap_or("")
}

fn rv(l: &impl kube::Resource) -> u64 {
    l.meta().resource_version.as_deref().expect("a resourceVersion").parse().unwrap()
}

/// The next non-bookmark event of a watch, within 5 s.
async fn next<K: Clone + std::fmt::Debug>(
    w: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> WatchEvent<K> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("an event in time");
        match ev.expect("the watch goes on").expect("an event") {
            WatchEvent::Bookmark(_) => continue,
            e => return e,
        }
    }
}

#[tokio::test]
async fn lease_writes_follow_the_generic_store() {
    let emu = ApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(client(&emu), NS);
    let pp = PostParams::default();

    let (code, reason, _) = api_error(leases.get("l").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert!(leases.get_opt("l").await.unwrap().is_none());

    // Create: the server sets uid, creationTimestamp, resourceVersion, namespace.
    let created = leases.create(&pp, &lease("l", "node-1", &[])).await.unwrap();
    let m = &created.metadata;
    assert_eq!(m.namespace.as_deref(), Some(NS));
    assert!(m.uid.is_some() && m.creation_timestamp.is_some(), "{m:?}");
    let (code, reason, msg) = api_error(leases.create(&pp, &lease("l", "node-2", &[])).await);
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(msg, r#"leases.coordination.k8s.io "l" already exists"#);
    assert_eq!(leases.get("l").await.unwrap(), created);
    assert_eq!(emu.get(Kind::Lease, NS, "l").unwrap()["spec"]["holderIdentity"], "node-1");

    // Replace from the current resourceVersion: a new one, identity kept.
    let mut next_lease = created.clone();
    next_lease.spec.as_mut().unwrap().holder_identity = Some("node-2".into());
    let replaced = leases.replace("l", &pp, &next_lease).await.unwrap();
    assert!(rv(&replaced) > rv(&created));
    assert_eq!((holder(&replaced), &replaced.metadata.uid), ("node-2", &created.metadata.uid));
    assert_eq!(replaced.metadata.creation_timestamp, created.metadata.creation_timestamp);

    // Two takers from one resourceVersion: one wins, the other gets 409 Conflict.
    let mut a = replaced.clone();
    a.spec.as_mut().unwrap().holder_identity = Some("node-3".into());
    let mut b = replaced.clone();
    b.spec.as_mut().unwrap().holder_identity = Some("node-4".into());
    let (ra, rb) = tokio::join!(leases.replace("l", &pp, &a), leases.replace("l", &pp, &b));
    let (won, lost) = if ra.is_ok() { (ra, rb) } else { (rb, ra) };
    let won = won.expect("one replace wins");
    let (code, reason, msg) = api_error(lost);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(msg, format!(r#"Operation cannot be fulfilled on leases.coordination.k8s.io "l": {MODIFIED}"#));
    assert_eq!(holder(&leases.get("l").await.unwrap()), holder(&won));

    // No resourceVersion: 422 Invalid (Leases allow no unconditional update).
    let mut unconditional = won.clone();
    unconditional.metadata.resource_version = None;
    let (code, reason, msg) = api_error(leases.replace("l", &pp, &unconditional).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(msg.ends_with("metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"), "{msg}");

    // A PUT of a missing Lease creates it (AllowCreateOnUpdate).
    let fresh = leases.replace("m", &pp, &lease("m", "node-1", &[])).await.unwrap();
    assert_eq!(holder(&leases.get("m").await.unwrap()), "node-1");
    assert!(fresh.metadata.uid.is_some());

    // Delete: gone; again: 404. A stale precondition: 409.
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions { resource_version: Some("1".into()), uid: None }),
        ..DeleteParams::default()
    };
    assert_eq!(api_error(leases.delete("m", &stale).await).0, 409);
    leases.delete("m", &DeleteParams::default()).await.unwrap();
    assert!(leases.get_opt("m").await.unwrap().is_none());
    assert_eq!(api_error(leases.delete("m", &DeleteParams::default()).await).0, 404);

    // Writes: create, replace, one of the two, create-on-update, delete.
    assert_eq!(emu.inner.lease_writes.load(Ordering::Relaxed), 5);
    assert_eq!(emu.inner.conflicts.load(Ordering::Relaxed), 3, "AlreadyExists, Conflict, precondition");
    // Leases of every namespace, cluster-wide.
    let all: Api<Lease> = Api::all(client(&emu));
    assert_eq!(all.list(&ListParams::default()).await.unwrap().items.len(), 1);
    assert_eq!(emu.list(Kind::Lease).len(), 1);
}

#[tokio::test]
async fn lease_watch_under_a_label_selector() {
    let emu = ApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(client(&emu), NS);
    let other_ns: Api<Lease> = Api::namespaced(client(&emu), "elsewhere");
    let pp = PostParams::default();
    let a = leases.create(&pp, &lease("a", "node-1", &[("xlb.io/l2", "true")])).await.unwrap();
    let b = leases.create(&pp, &lease("b", "node-1", &[])).await.unwrap();
    other_ns.create(&pp, &lease("a", "node-1", &[("xlb.io/l2", "true")])).await.unwrap();

    let lp = ListParams::default().labels("xlb.io/l2=true");
    let list = leases.list(&lp).await.unwrap();
    assert_eq!(list.items.iter().map(|l| l.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["a"]);
    let from = list.metadata.resource_version.unwrap();
    let wp = WatchParams::default().labels("xlb.io/l2=true");
    let mut w = leases.watch(&wp, &from).await.unwrap().boxed();

    // Unlabelled and other-namespace writes are not seen; a renewal is MODIFIED.
    let mut b2 = b.clone();
    b2.spec.as_mut().unwrap().holder_identity = Some("node-9".into());
    let b2 = leases.replace("b", &pp, &b2).await.unwrap();
    let mut o = other_ns.get("a").await.unwrap();
    o.spec.as_mut().unwrap().holder_identity = Some("node-9".into());
    other_ns.replace("a", &pp, &o).await.unwrap();
    let mut a2 = a.clone();
    a2.spec.as_mut().unwrap().holder_identity = Some("node-2".into());
    let a2 = leases.replace("a", &pp, &a2).await.unwrap();
    match next(&mut w).await {
        WatchEvent::Modified(l) => {
            assert_eq!((l.metadata.name.as_deref(), holder(&l), rv(&l)), (Some("a"), "node-2", rv(&a2)))
        }
        e => panic!("{e:?}"),
    }
    // b gains the label: ADDED to this watch; a loses it: DELETED.
    let mut b3 = b2.clone();
    b3.metadata.labels = Some([("xlb.io/l2".to_string(), "true".to_string())].into());
    leases.replace("b", &pp, &b3).await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Added(l) if l.metadata.name.as_deref() == Some("b")));
    let mut a3 = a2.clone();
    a3.metadata.labels = None;
    leases.replace("a", &pp, &a3).await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Deleted(l) if l.metadata.name.as_deref() == Some("a")));
    leases.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next(&mut w).await, WatchEvent::Deleted(l) if l.metadata.name.as_deref() == Some("b")));

    // A watch from "0" starts with the current state as ADDED.
    let mut w0 = leases.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    assert!(matches!(next(&mut w0).await, WatchEvent::Added(l) if l.metadata.name.as_deref() == Some("a")));
}

const WEB: &str = "metadata: {name: web, namespace: demo, labels: {app: web}}
spec: {type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}]}";

#[tokio::test]
async fn service_status_subresource() {
    let emu = ApiServer::start().await;
    emu.apply(Kind::Service, WEB);
    let svcs: Api<Service> = Api::namespaced(client(&emu), "demo");
    let all: Api<Service> = Api::all(client(&emu));
    let list = all.list(&ListParams::default()).await.unwrap();
    let mut w = all.watch(&WatchParams::default(), &list.metadata.resource_version.unwrap()).await.unwrap().boxed();

    // A merge patch writes status only: spec and metadata stay.
    let patch = json!({
        "spec": {"clusterIP": "10.96.9.9"},
        "metadata": {"labels": {"app": "changed"}},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "VIP"}]}},
    });
    let s = svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let ingress = |s: &Service| {
        let lb = s.status.as_ref().and_then(|st| st.load_balancer.as_ref());
        lb.and_then(|lb| lb.ingress.as_ref()).map(|i| i.iter().filter_map(|i| i.ip.clone()).collect::<Vec<_>>())
    };
    assert_eq!(ingress(&s).unwrap(), ["198.51.100.7"]);
    assert_eq!(s.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("10.96.0.10"), "a status write keeps spec");
    assert_eq!(s.metadata.labels.as_ref().unwrap()["app"], "web", "and metadata");
    assert_eq!(ingress(&all.list(&ListParams::default()).await.unwrap().items[0]).unwrap(), ["198.51.100.7"]);
    match next(&mut w).await {
        WatchEvent::Modified(m) => assert_eq!(ingress(&m).unwrap(), ["198.51.100.7"]),
        e => panic!("{e:?}"),
    }
    assert_eq!(ingress(&svcs.get_status("web").await.unwrap()).unwrap(), ["198.51.100.7"]);

    // The same patch again changes nothing: no write, no new resourceVersion.
    let again = svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    assert_eq!(rv(&again), rv(&s));

    // A resourceVersion in the patch is a precondition: a stale one is 409.
    let stale = json!({"metadata": {"resourceVersion": "1"}, "status": {"loadBalancer": {}}});
    let (code, reason, msg) = api_error(svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&stale)).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(msg, format!(r#"Operation cannot be fulfilled on services "web": {MODIFIED}"#));
    let current = json!({"metadata": {"resourceVersion": s.metadata.resource_version},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.8"}]}}});
    let s = svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&current)).await.unwrap();
    assert_eq!(ingress(&s).unwrap(), ["198.51.100.8"]);

    // PUT status: without a resourceVersion (Services allow it), spec kept.
    let mut put = s.clone();
    put.metadata.resource_version = None;
    put.spec.as_mut().unwrap().cluster_ip = Some("10.96.9.9".into());
    put.status.as_mut().unwrap().load_balancer = None;
    let s = svcs.replace_status("web", &PostParams::default(), &put).await.unwrap();
    assert_eq!((ingress(&s), s.spec.unwrap().cluster_ip.as_deref()), (None, Some("10.96.0.10")));

    // JSON patch: 415. A missing Service: 404.
    let (code, _) = http(
        None,
        emu.addr,
        "PATCH",
        "/api/v1/namespaces/demo/services/web/status",
        "application/json-patch+json",
        r#"[{"op":"remove","path":"/status"}]"#,
    )
    .await;
    assert_eq!(code, 415);
    assert_eq!(api_error(svcs.patch_status("nope", &PatchParams::default(), &Patch::Merge(&patch)).await).0, 404);
    // Writes of Services themselves are not served.
    assert_eq!(api_error(svcs.replace("web", &PostParams::default(), &put).await).0, 405);

    // The harness re-applying the Service keeps the agents' status ...
    svcs.patch_status("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    emu.apply(Kind::Service, &WEB.replace("port: 80", "port: 81"));
    let stored = emu.get(Kind::Service, "demo", "web").unwrap();
    assert_eq!(stored["spec"]["ports"][0]["port"], 81);
    assert_eq!(stored["status"]["loadBalancer"]["ingress"][0]["ip"], "198.51.100.7");
    // ... unless it says otherwise.
    emu.apply(Kind::Service, &format!("{WEB}\nstatus: {{loadBalancer: {{}}}}"));
    assert_eq!(emu.get(Kind::Service, "demo", "web").unwrap()["status"], json!({"loadBalancer": {}}));

    assert_eq!(emu.inner.status_writes.load(Ordering::Relaxed), 5);
    assert_eq!(emu.inner.conflicts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn pools_and_namespaces_are_listed_and_watched() {
    let emu = ApiServer::start().await;
    emu.apply(
        Kind::LoadBalancerIPPool,
        "metadata: {name: blue, namespace: ignored}\nspec: {blocks: [{cidr: 198.51.100.0/24}]}",
    );
    emu.apply(Kind::Namespace, "metadata: {name: demo, labels: {team: a}}");
    let gvk = GroupVersionKind::gvk("xlb.io", "v1alpha1", "LoadBalancerIPPool");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "loadbalancerippools");
    let pools: Api<DynamicObject> = Api::all_with(client(&emu), &ar);
    let list = pools.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let blue = &list.items[0];
    assert_eq!((blue.metadata.name.as_deref(), blue.metadata.namespace.as_deref()), (Some("blue"), None));
    assert_eq!(blue.data["spec"]["blocks"][0]["cidr"], "198.51.100.0/24");
    assert_eq!(pools.get("blue").await.unwrap().metadata.uid, blue.metadata.uid);
    assert_eq!(api_error(pools.get("red").await).0, 404);

    let mut w = pools.watch(&WatchParams::default(), &list.metadata.resource_version.unwrap()).await.unwrap().boxed();
    emu.apply(Kind::LoadBalancerIPPool, "metadata: {name: red}\nspec: {blocks: [{cidr: 203.0.113.0/24}]}");
    assert!(matches!(next(&mut w).await, WatchEvent::Added(p) if p.metadata.name.as_deref() == Some("red")));
    emu.delete(Kind::LoadBalancerIPPool, "", "blue");
    assert!(matches!(next(&mut w).await, WatchEvent::Deleted(p) if p.metadata.name.as_deref() == Some("blue")));
    assert_eq!(emu.list(Kind::LoadBalancerIPPool).len(), 1);

    let namespaces: Api<Namespace> = Api::all(client(&emu));
    let ns = namespaces.list(&ListParams::default().labels("team=a")).await.unwrap();
    assert_eq!(ns.items.len(), 1);
    assert_eq!(namespaces.get("demo").await.unwrap().metadata.labels.unwrap()["team"], "a");
    let ns: Vec<Namespace> = namespaces
        .watch(&WatchParams::default().fields("metadata.name=demo"), "0")
        .await
        .unwrap()
        .try_filter_map(|e| async move {
            Ok(match e {
                WatchEvent::Added(n) => Some(n),
                _ => None,
            })
        })
        .take(1)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(ns[0].meta().name.as_deref(), Some("demo"));
}

/// What the registries do beyond the generic store: a Lease's
/// `spec.preferredHolder` and `spec.strategy` are dropped (the
/// CoordinatedLeaderElection gate is off by default), and a Service that
/// stops being a LoadBalancer loses its load-balancer status.
#[tokio::test]
async fn registry_strategies_drop_gated_lease_fields_and_stale_lb_status() {
    let emu = ApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(client(&emu), NS);
    let mut l = lease("gated", "node-1", &[]);
    let spec = l.spec.as_mut().unwrap();
    spec.preferred_holder = Some("node-2".into());
    spec.strategy = Some("OldestEmulationVersion".into());
    let created = leases.create(&PostParams::default(), &l).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!((spec.preferred_holder, spec.strategy), (None, None));
    assert_eq!(spec.holder_identity.as_deref(), Some("node-1"));

    emu.apply(Kind::Service, &format!("{WEB}\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.51.100.7}}]}}}}"));
    assert_eq!(
        emu.get(Kind::Service, "demo", "web").unwrap()["status"]["loadBalancer"]["ingress"][0]["ip"],
        "198.51.100.7"
    );
    emu.apply(Kind::Service, &WEB.replace("type: LoadBalancer", "type: NodePort"));
    assert_eq!(emu.get(Kind::Service, "demo", "web").unwrap()["status"], json!({"loadBalancer": {}}));
}
