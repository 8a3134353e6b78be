// SPDX-License-Identifier: MIT OR Apache-2.0
//! The Kubernetes source over real HTTP against the API-server emulator
//! (the `kube-emu` crate): initial lists, watch events, bookmarks, a dropped
//! connection, 410 Gone and a re-list, and an outage during which the last
//! state is kept (never an empty view).

use std::time::Duration;

use kube_emu::{ApiServer, Kind};
use tokio::sync::watch;
use xlb::{
    lbipam::DEFAULT_LB_CLASS,
    source::{Snapshot, kube},
    translate::{NodeInfo, Options, translate},
};

const SERVICE: &str = r#"
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
"#;

fn slice(addrs: &[&str]) -> String {
    let eps: String = addrs.iter().map(|a| format!("- addresses: [{a}]\n  nodeName: node-1\n")).collect();
    format!(
        "metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}"
    )
}

const NODE: &str = r#"
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.7.1}, {type: Hostname, address: node-1}]}
"#;

/// Backends of the ClusterIP frontend, and the NodePort addresses, of a snapshot.
fn view(s: &Snapshot) -> (Vec<String>, Vec<String>) {
    let node1 = s.nodes.iter().find(|n| n.metadata.name.as_deref() == Some("node-1"));
    let node = node1.map(|n| NodeInfo::from_node(n)).unwrap_or_default();
    let d = translate(&s.services, &s.slices, &node, &Options::default());
    let backends = d
        .frontends
        .iter()
        .find(|f| f.key.address.to_string() == "10.96.0.10")
        .map(|f| f.backends.iter().map(|b| b.address.to_string()).collect())
        .unwrap_or_default();
    let nodeports = d.frontends.iter().filter(|f| f.key.port == 30080).map(|f| f.key.address.to_string()).collect();
    (backends, nodeports)
}

/// Waits for a published snapshot satisfying `want`, checking every
/// snapshot on the way with `each`.
async fn until(
    rx: &mut watch::Receiver<Snapshot>,
    what: &str,
    mut each: impl FnMut(&Snapshot),
    want: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        {
            let s = rx.borrow_and_update();
            each(&s);
            if s.synced && want(&s) {
                return s.clone();
            }
        }
        tokio::select! {
            r = rx.changed() => r.expect("source alive"),
            _ = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}; last: {:?}", view(&rx.borrow())),
        }
    }
}

fn backends_are(want: &'static [&'static str]) -> impl Fn(&Snapshot) -> bool {
    move |s| view(s).0 == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_watches_survives_drops_gone_and_outages() {
    let api = ApiServer::start().await;
    api.apply(Kind::Service, SERVICE);
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.1"]));
    api.apply(Kind::Node, NODE);
    api.apply(Kind::Node, "metadata: {name: node-2}\nstatus: {addresses: [{type: InternalIP, address: 192.168.7.2}]}");

    let dir = std::env::temp_dir().join(format!("xlb-kubeconfig-{}", std::process::id()));
    std::fs::write(&dir, api.kubeconfig()).unwrap();
    let client = kube::client(Some(&dir)).await.expect("client");
    std::fs::remove_file(&dir).unwrap();
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(kube::run(client, Default::default(), DEFAULT_LB_CLASS.into(), tx));
    // Never an empty view once synced: the datapath must not be flushed.
    let never_empty = |s: &Snapshot| {
        if s.synced {
            assert!(!s.services.is_empty() && !s.slices.is_empty(), "a synced snapshot lost objects: {:?}", view(s));
        }
    };

    // 1. Initial lists: every Node (L2 ownership ranks them); this node's
    // InternalIP gets the NodePort.
    let s = until(&mut rx, "the initial lists", never_empty, backends_are(&["10.0.0.1"])).await;
    assert_eq!(s.nodes.len(), 2, "every node is watched");
    assert_eq!(view(&s).1, ["192.168.7.1"]);

    // 2. A watch event.
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.1", "10.0.0.2"]));
    until(&mut rx, "a watched change", never_empty, backends_are(&["10.0.0.1", "10.0.0.2"])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(api.inner.bookmarks.load(std::sync::atomic::Ordering::Relaxed) > 0, "bookmarks were requested and sent");

    // 3. Dropped connections: the watchers resume from their resourceVersion.
    let lists = api.inner.lists.load(std::sync::atomic::Ordering::Relaxed);
    api.drop_watches();
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    until(&mut rx, "a change after a dropped watch", never_empty, backends_are(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
        .await;
    assert_eq!(api.inner.lists.load(std::sync::atomic::Ordering::Relaxed), lists, "resumed without re-listing");

    // 4. 410 Gone: history compacted while disconnected → re-list.
    // (Watches held meanwhile, so none can resume before the compaction.)
    api.pause_watches(true).await;
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.4"]));
    api.compact();
    api.pause_watches(false).await;
    until(&mut rx, "the state after 410 Gone and a re-list", never_empty, backends_are(&["10.0.0.4"])).await;
    assert!(api.inner.gone.load(std::sync::atomic::Ordering::Relaxed) > 0, "a watch was answered 410");
    assert!(api.inner.lists.load(std::sync::atomic::Ordering::Relaxed) > lists, "the source re-listed");

    // 5. Outage: the last state stays; afterwards changes flow again.
    api.set_down(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let s = rx.borrow();
        never_empty(&s);
        assert_eq!(view(&s).0, ["10.0.0.4"], "the last state is kept while the API server is down");
    }
    api.set_down(false);
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.4", "10.0.0.5"]));
    until(&mut rx, "a change after the outage", never_empty, backends_are(&["10.0.0.4", "10.0.0.5"])).await;

    // 6. Deletion is seen too.
    api.delete(Kind::Service, "shop", "web");
    until(&mut rx, "a deleted service", |_| {}, |s| s.services.is_empty()).await;
    task.abort();
}

/// The real `xlb agent` process against the emulator: Services and
/// EndpointSlices from the API server end up in the (pinned) maps, changes
/// follow, and a Service xlb cannot program gets a Warning Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_programs_the_maps_from_the_api_server() {
    use std::process::{Command, Stdio};
    let api = ApiServer::start().await;
    api.apply(Kind::Service, SERVICE);
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.1"]));
    api.apply(Kind::Node, NODE);
    api.apply(
        Kind::Service,
        "metadata: {name: bad, namespace: shop}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 9, protocol: SCTP}]}",
    );
    let id = format!("{}-{}", std::process::id(), api.addr.port());
    let tmp = std::env::temp_dir().join(format!("xlb-kube-{id}"));
    std::fs::create_dir_all(&tmp).unwrap();
    let kubeconfig = tmp.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/xlbk-{id}"));
    let xlb = env!("CARGO_BIN_EXE_xlb");
    struct Cleanup(std::process::Child, std::path::PathBuf, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
            let _ = Command::new(env!("CARGO_BIN_EXE_xlb"))
                .args(["agent", "--cleanup", "--pin-dir"])
                .arg(&self.1)
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.1);
            let _ = std::fs::remove_dir_all(&self.2);
        }
    }
    let log = tmp.join("agent.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(xlb)
        .args([
            "agent",
            "--node-name",
            "node-1",
            "--http-address",
            "none",
            "--healthz-bind-address",
            "none",
            // Never the machine's root cgroup: this test is about the source.
            "--socket-lb",
            "off",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .arg("--pin-dir")
        .arg(&pins)
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let _guard = Cleanup(child, pins.clone(), tmp.clone());
    let dump = |what: &str| -> serde_json::Value {
        let out = Command::new(xlb).args(["dump", "-o", "json", "--pin-dir"]).arg(&pins).arg(what).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let backends_of_web = || -> Vec<String> {
        dump("services")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|f| f["address"] == "10.96.0.10")
                    .flat_map(|f| f["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; agent log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("the first sync", &|| backends_of_web() == ["10.0.0.1:8080"]);
    let services = dump("services");
    // On the Node object's InternalIP (and on the host's own addresses).
    let nodeport = services
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "NodePort" && f["address"] == "192.168.7.1")
        .unwrap_or_else(|| panic!("no NodePort on the Node object's InternalIP: {services:#}"));
    assert_eq!(nodeport["service"], "shop/web:http");

    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.1", "10.0.0.2"]));
    wait("a watched change in the maps", &|| backends_of_web() == ["10.0.0.1:8080", "10.0.0.2:8080"]);

    wait("a Warning Event for shop/bad", &|| {
        api.inner.events_posted.lock().unwrap().iter().any(|e| {
            e["regarding"]["name"] == "bad"
                && e["type"] == "Warning"
                && e["note"].as_str().unwrap_or("").contains("SCTP")
        })
    });
}

/// kube-proxy's informer selector (`cmd/kube-proxy/app/server.go`):
/// Services another proxy serves (`service.kubernetes.io/service-proxy-name`)
/// and headless EndpointSlices are never listed or held; a Service that
/// gains the label leaves the view (the watch says DELETED). With
/// `--service-proxy-name` exactly the named class is served. The file
/// source applies the same rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_our_services_and_no_headless_slices_are_watched() {
    use xlb::source::Selector;
    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-1, namespace: shop, labels: {kubernetes.io/service-name: other, service.kubernetes.io/service-proxy-name: other-proxy}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.9]}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db, service.kubernetes.io/headless: ""}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.8]}]
"#;
    let names = |s: &Snapshot| {
        let mut v: Vec<String> = s.services.iter().map(|o| o.metadata.name.clone().unwrap_or_default()).collect();
        v.extend(s.slices.iter().map(|o| o.metadata.name.clone().unwrap_or_default()));
        v.sort();
        v
    };
    let api = ApiServer::start().await;
    api.apply(Kind::Service, SERVICE);
    api.apply(Kind::EndpointSlice, &slice(&["10.0.0.1"]));
    api.apply(Kind::Node, NODE);
    for doc in OBJECTS.split("\n---\n") {
        let kind = if doc.contains("kind: Service\n") { Kind::Service } else { Kind::EndpointSlice };
        api.apply(kind, doc);
    }
    let path = std::env::temp_dir().join(format!("xlb-kubeconfig-sel-{}", std::process::id()));
    std::fs::write(&path, api.kubeconfig()).unwrap();
    let client = kube::client(Some(&path)).await.expect("client");
    std::fs::remove_file(&path).unwrap();

    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(kube::run(client.clone(), Selector::default(), DEFAULT_LB_CLASS.into(), tx));
    // The headless Service itself comes (translation skips it); its slice does not.
    let s = until(&mut rx, "the initial lists", |_| {}, |s| !s.services.is_empty() && !s.slices.is_empty()).await;
    assert_eq!(names(&s), ["db", "web", "web-1"]);
    // `web` is handed to another proxy: it leaves the view.
    api.apply(
        Kind::Service,
        &SERVICE.replace("namespace: shop}", "namespace: shop, labels: {service.kubernetes.io/service-proxy-name: x}}"),
    );
    until(&mut rx, "web handed to another proxy", |_| {}, |s| names(s) == ["db", "web-1"]).await;
    task.abort();

    let named = Selector { proxy_name: Some("other-proxy".into()) };
    let (tx, mut rx) = watch::channel(Snapshot::default());
    let task = tokio::spawn(kube::run(client, named.clone(), DEFAULT_LB_CLASS.into(), tx));
    until(&mut rx, "the named class", |_| {}, |s| names(s) == ["other", "other-1"]).await;
    task.abort();

    // The files source: the same rule.
    let mut snap = Snapshot::default();
    xlb::source::files::parse_into(
        &mut snap,
        "objects",
        &format!("apiVersion: v1\nkind: Service{SERVICE}---\n{OBJECTS}"),
    );
    let mut ours = snap.clone();
    Selector::default().retain(&mut ours);
    assert_eq!(names(&ours), ["db", "web"]);
    named.retain(&mut snap);
    assert_eq!(names(&snap), ["other", "other-1"]);
}

/// One Warning Event per problem in the whole cluster, not one per node
/// per sync: two agents (node-1, node-2) report the same translation
/// problem, the first creates the Event and the second's create is
/// `409 AlreadyExists`; a problem of one node's maps is that node's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_per_problem_in_the_cluster() {
    use xlb::{
        events::{EventSink, Origin},
        translate::Problem,
    };
    let api = ApiServer::start().await;
    let path = std::env::temp_dir().join(format!("xlb-kubeconfig-ev-{}", std::process::id()));
    std::fs::write(&path, api.kubeconfig()).unwrap();
    let client = kube::client(Some(&path)).await.expect("client");
    std::fs::remove_file(&path).unwrap();
    let mut snap = Snapshot::default();
    xlb::source::files::parse_into(
        &mut snap,
        "svc",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop, uid: 6f1c-uid}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 9, protocol: SCTP}]}",
    );
    let problem = |m: &str| vec![Problem { service: "shop/bad".into(), message: m.into() }];
    let mut sinks = [EventSink::new(client.clone(), "node-1"), EventSink::new(client, "node-2")];
    for _sync in 0..3 {
        for s in &mut sinks {
            s.publish(&snap, &problem("port 9: protocol SCTP is not supported by xlb; skipped"), Origin::Cluster);
            s.publish(&snap, &problem("no free backend id"), Origin::Node);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let counts = || {
        let posted = api.inner.events_posted.lock().unwrap();
        let of = |needle: &str| posted.iter().filter(|e| e["note"].as_str().unwrap_or("").contains(needle)).count();
        (of("SCTP"), of("backend id"), api.inner.events_conflicts.load(std::sync::atomic::Ordering::Relaxed))
    };
    while counts() != (1, 2, 1) {
        assert!(std::time::Instant::now() < deadline, "(cluster Events, node Events, conflicts) = {:?}", counts());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And no more come.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(), (1, 2, 1));
    let posted = api.inner.events_posted.lock().unwrap();
    let e = posted.iter().find(|e| e["note"].as_str().unwrap_or("").contains("SCTP")).unwrap();
    assert_eq!((e["type"].as_str(), e["reason"].as_str()), (Some("Warning"), Some("XlbNotProgrammed")), "{e:#}");
    assert_eq!(e["regarding"]["uid"], "6f1c-uid", "{e:#}");
    assert!(e["eventTime"].is_string() && e["reportingController"] == "xlb.io/agent", "{e:#}");
}
