// SPDX-License-Identifier: MIT OR Apache-2.0
//! Leases (issue #15) over real HTTP against the API-server emulator
//! (`kube-emu`): the election of `xlb::lease` (client-go's
//! `tryAcquireOrRenew`, `tools/leaderelection/leaderelection.go`, with the
//! holder's deadline counted from its write's send time) and the
//! LoadBalancer allocator's leader writing Service statuses.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_emu::{ApiServer, Kind};
use tokio::sync::watch;
use xlb::{
    lease::{Elector, Step, Timing, boot_ns},
    source::{Selector, Snapshot, kube as source},
};

const FAST: Timing =
    Timing { duration: Duration::from_secs(1), renew: Duration::from_millis(200), margin: Duration::from_millis(100) };

async fn client(api: &ApiServer) -> (kube::Client, tempfile_dir::Dir) {
    let dir = tempfile_dir::Dir::new();
    let path = dir.0.join("kubeconfig");
    std::fs::write(&path, api.kubeconfig()).unwrap();
    (source::client(Some(&path)).await.expect("client"), dir)
}

/// A temporary directory, removed on drop.
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "xlb-leases-{}-{}",
                std::process::id(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn elector(c: &kube::Client, who: &str) -> Elector {
    Elector::new(Api::<Lease>::namespaced(c.clone(), "xlb"), "l".into(), who.into(), FAST)
}

/// Reads the Lease into `e`, as the watch would.
async fn observe(c: &kube::Client, e: &mut Elector) {
    let seen = Api::<Lease>::namespaced(c.clone(), "xlb").get_opt("l").await.unwrap();
    e.observe(seen.as_ref(), boot_ns());
}

/// Five candidates race for one absent Lease: one takes it, the others'
/// creates get 409 and nothing.
#[tokio::test]
async fn of_racing_candidates_exactly_one_takes_a_free_lease() {
    let api = ApiServer::start().await;
    let (c, _d) = client(&api).await;
    let mut es: Vec<Elector> = (0..5).map(|i| elector(&c, &format!("node-{i}"))).collect();
    let steps =
        futures::future::join_all(es.iter_mut().map(|e| e.step(true, Duration::ZERO, Duration::from_secs(2)))).await;
    let won = steps.iter().filter(|s| matches!(s, Step::Acquired(_))).count();
    assert_eq!(won, 1, "{steps:?}");
    assert_eq!(es.iter().filter(|e| e.held().is_some()).count(), 1);
    let stored = api.get(Kind::Lease, "xlb", "l").unwrap();
    let winner = es.iter().position(|e| e.held().is_some()).unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], format!("node-{winner}"));
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 1);
}

/// A live holder is never preempted; when it stops renewing, a candidate
/// takes over only a full duration after it *saw* the last renewal, and the
/// holder's own hold had ended before (no moment with two holders). The
/// old holder's next renewal gets 409 and it knows it lost.
#[tokio::test]
async fn a_candidate_takes_over_only_after_the_holders_hold_has_ended() {
    let api = ApiServer::start().await;
    let (c, _d) = client(&api).await;
    let (mut a, mut b) = (elector(&c, "node-a"), elector(&c, "node-b"));
    assert!(matches!(a.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Acquired(_)));
    // While `a` renews, `b` stays out.
    for _ in 0..10 {
        a.step(true, Duration::ZERO, Duration::from_secs(1)).await;
        observe(&c, &mut b).await;
        assert_eq!(b.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held_until = a.held().unwrap().until;
    // `a` stops renewing (frozen); `b` polls.
    let taken = loop {
        observe(&c, &mut b).await;
        if let Step::Acquired(_) = b.step(true, Duration::ZERO, Duration::from_secs(1)).await {
            break boot_ns();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(held_until < taken, "the old hold ended {} ms before the takeover", (taken - held_until) / 1_000_000);
    let waited = Duration::from_nanos(taken - (held_until - 900_000_000));
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_millis(1600), "took over after {waited:?}");
    assert_eq!(a.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Lost);
    let stored = api.get(Kind::Lease, "xlb", "l").unwrap();
    assert_eq!(
        (stored["spec"]["holderIdentity"].as_str(), stored["spec"]["leaseTransitions"].as_i64()),
        (Some("node-b"), Some(1))
    );
}

/// A release (no holder, 1 s) lets the next candidate take the Lease at
/// once, not after the duration; a rank's delay is waited out.
#[tokio::test]
async fn a_released_lease_is_taken_at_once_after_the_rank_delay() {
    let api = ApiServer::start().await;
    let (c, _d) = client(&api).await;
    let (mut a, mut b) = (elector(&c, "node-a"), elector(&c, "node-b"));
    a.step(true, Duration::ZERO, Duration::from_secs(1)).await;
    observe(&c, &mut b).await;
    a.release(Duration::from_secs(1)).await;
    assert!(a.held().is_none());
    let released = boot_ns();
    let taken = loop {
        observe(&c, &mut b).await;
        if let Step::Acquired(_) = b.step(true, Duration::from_millis(200), Duration::from_secs(1)).await {
            break boot_ns();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let after = Duration::from_nanos(taken - released);
    assert!(after >= Duration::from_millis(200) && after < Duration::from_millis(700), "taken after {after:?}");
}

/// A candidate that ranks first asks a live holder for the Lease
/// (`spec.preferredHolder`): the holder's next renewal gets 409, it sees it
/// was asked, releases, and the candidate takes it at once — never both.
#[tokio::test]
async fn a_holder_asked_for_its_lease_hands_it_over() {
    let api = ApiServer::start().await;
    let (c, _d) = client(&api).await;
    let (mut a, mut b) = (elector(&c, "node-a"), elector(&c, "node-b"));
    assert!(matches!(a.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Acquired(_)));
    observe(&c, &mut b).await;
    assert!(b.prefer(Duration::from_secs(1)).await);
    assert_eq!(b.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Idle, "still held by a");
    tokio::time::sleep(FAST.renew).await;
    assert_eq!(a.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Lost);
    assert!(a.asked_to_yield());
    // `a` does not take it back while `b` is preferred.
    assert_eq!(a.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Idle);
    a.release(Duration::from_secs(1)).await;
    let released = boot_ns();
    observe(&c, &mut b).await;
    assert!(matches!(b.step(true, Duration::ZERO, Duration::from_secs(1)).await, Step::Acquired(_)));
    assert!(Duration::from_nanos(boot_ns() - released) < Duration::from_millis(200));
    let stored = api.get(Kind::Lease, "xlb", "l").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "node-b");
    assert!(
        stored["metadata"]["annotations"].get(xlb::lease::PREFERRED_HOLDER_ANNOTATION).is_none(),
        "cleared by the take: {stored}"
    );
}

const POOL: &str = r#"
metadata: {name: p}
spec: {blocks: [{start: 198.51.100.1, stop: 198.51.100.3}]}
"#;

fn lb(name: &str, created: &str) -> String {
    format!(
        "metadata: {{name: {name}, namespace: shop, creationTimestamp: \"{created}\"}}\n\
         spec: {{type: LoadBalancer, clusterIP: 10.96.0.1, ports: [{{port: 80, nodePort: 30080}}]}}\n"
    )
}

/// Runs one agent's source and allocator (`identity`) until `stop`.
fn run_agent(c: &kube::Client, identity: &str, stop: watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(Snapshot::default());
    tokio::spawn(source::run(c.clone(), Selector::default(), xlb::lbipam::DEFAULT_LB_CLASS.into(), tx));
    tokio::spawn(xlb::lbipam::leader::run(
        c.clone(),
        "xlb".into(),
        identity.into(),
        xlb::lbipam::DEFAULT_LB_CLASS.into(),
        Default::default(),
        rx,
        stop,
    ));
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ingress(api: &ApiServer, name: &str) -> Vec<String> {
    let Some(s) = api.get(Kind::Service, "shop", name) else { return Vec::new() };
    s["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| format!("{} {}", i["ip"].as_str().unwrap_or(""), i["ipMode"].as_str().unwrap_or("")))
        .collect()
}

/// Two agents: one leads and writes each LoadBalancer Service's status
/// (`ipMode: VIP`) through the status subresource; a Service that stops
/// being a LoadBalancer (its status cleared by the API server) frees its
/// address for the next. When
/// the leader stops (its Lease released), the other takes over.
#[tokio::test]
async fn one_leader_writes_the_statuses_and_the_other_takes_over() {
    let api = ApiServer::start().await;
    let (c, _d) = client(&api).await;
    api.apply(Kind::LoadBalancerIPPool, POOL);
    api.apply(Kind::Service, &lb("a", "2026-01-01T00:00:00Z"));
    api.apply(Kind::Service, &lb("b", "2026-01-02T00:00:00Z"));
    let (stop1, rx1) = watch::channel(false);
    let (_stop2, rx2) = watch::channel(false);
    run_agent(&c, "node-1", rx1);
    wait_for("a leader", || api.get(Kind::Lease, "xlb", "xlb-lbipam").is_some()).await;
    run_agent(&c, "node-2", rx2);
    wait_for("both statuses", || ingress(&api, "a").len() == 1 && ingress(&api, "b").len() == 1).await;
    assert_eq!(ingress(&api, "a"), ["198.51.100.1 VIP"]);
    assert_eq!(ingress(&api, "b"), ["198.51.100.2 VIP"]);
    let leader = api.get(Kind::Lease, "xlb", "xlb-lbipam").unwrap();
    assert_eq!(leader["spec"]["holderIdentity"], "node-1");
    // `a` becomes a NodePort Service: the API server clears its status.
    api.apply(
        Kind::Service,
        "metadata: {name: a, namespace: shop, creationTimestamp: \"2026-01-01T00:00:00Z\"}\n\
         spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 30080}]}\n",
    );
    wait_for("a's status cleared", || ingress(&api, "a").is_empty()).await;
    // The leader stops; node-2 takes over and serves a new Service.
    stop1.send(true).unwrap();
    wait_for("node-2 leading", || {
        api.get(Kind::Lease, "xlb", "xlb-lbipam").is_some_and(|l| l["spec"]["holderIdentity"] == "node-2")
    })
    .await;
    api.apply(Kind::Service, &lb("c", "2026-01-03T00:00:00Z"));
    wait_for("c's status", || ingress(&api, "c").len() == 1).await;
    assert_eq!(ingress(&api, "c"), ["198.51.100.1 VIP"], "a's address, free again");
    assert_eq!(ingress(&api, "b"), ["198.51.100.2 VIP"], "kept");
    // `b` deleted and created again (a new UID): allocated afresh.
    api.delete(Kind::Service, "shop", "b");
    api.apply(Kind::Service, &lb("b", "2026-01-04T00:00:00Z"));
    wait_for("the new b's status", || ingress(&api, "b").len() == 1).await;
    assert_eq!(ingress(&api, "b"), ["198.51.100.2 VIP"]);
}
