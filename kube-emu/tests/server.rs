// SPDX-License-Identifier: MIT OR Apache-2.0
//! The server's life and faults: `block` partitions one client address
//! (its requests 503, its watches ended) while another's go on; `spawn`
//! from a plain thread, and into a network namespace; the `kube-emu`
//! binary seeded from a directory.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use common::{api_error, client, get_blocking, http};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams, core::params::WatchParams};
use kube_emu::{ApiServer, Kind};

const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[tokio::test]
async fn block_partitions_one_client() {
    let emu = ApiServer::start().await;
    emu.apply(Kind::Node, "metadata: {name: node-1}");
    let nodes: Api<Node> = Api::all(client(&emu));
    let mut w = nodes.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    assert!(w.next().await.is_some(), "the watch runs");

    // The kube-rs client (127.0.0.1) is cut off, with its watch; 127.0.0.2 is not.
    emu.block(LOCAL, true);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = w.next().await {} // bookmarks until the end
    });
    ended.await.expect("a blocked client's watch ends");
    assert_eq!(api_error(nodes.list(&ListParams::default()).await).0, 503);
    let (code, body) = http(Some(OTHER), emu.addr, "GET", "/api/v1/nodes", "application/json", "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("node-1"), "{body}");

    // And the other way round.
    emu.block(LOCAL, false);
    emu.block(OTHER, true);
    assert_eq!(nodes.list(&ListParams::default()).await.unwrap().items.len(), 1);
    let (code, _) = http(Some(OTHER), emu.addr, "GET", "/api/v1/nodes", "application/json", "").await;
    assert_eq!(code, 503);
    assert_eq!(emu.inner.unavailable.load(Ordering::Relaxed), 2);

    // set_down: everyone.
    emu.block(OTHER, false);
    emu.set_down(true);
    assert_eq!(http(Some(OTHER), emu.addr, "GET", "/api/v1/nodes", "", "").await.0, 503);
    assert_eq!(api_error(nodes.list(&ListParams::default()).await).0, 503);
    emu.set_down(false);
    assert_eq!(http(Some(OTHER), emu.addr, "GET", "/api/v1/nodes/node-1", "", "").await.0, 200);
}

/// `spawn` from a thread with no runtime; the sync methods from it too.
#[test]
fn spawn_serves_from_its_own_thread() {
    let emu = ApiServer::spawn(None, SocketAddr::from((LOCAL, 0)));
    assert_ne!(emu.addr.port(), 0);
    assert!(emu.kubeconfig().contains(&format!("http://{}", emu.addr)));
    emu.apply(Kind::Lease, "metadata: {name: l, namespace: xlb-system}\nspec: {holderIdentity: node-1}");
    let (code, body) = get_blocking(emu.addr, "/apis/coordination.k8s.io/v1/namespaces/xlb-system/leases/l");
    assert_eq!(code, 200, "{body}");
    let lease: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-1");
    assert_eq!(
        lease["metadata"]["resourceVersion"],
        emu.get(Kind::Lease, "xlb-system", "l").unwrap()["metadata"]["resourceVersion"]
    );
    let (code, body) = get_blocking(emu.addr, "/apis/coordination.k8s.io/v1/namespaces/xlb-system/leases/m");
    assert_eq!(code, 404);
    assert!(body.contains(r#""reason":"NotFound""#), "{body}");
    emu.delete(Kind::Lease, "xlb-system", "l");
    assert!(emu.list(Kind::Lease).is_empty());
}

/// `spawn` into a network namespace: reachable from a thread in that
/// namespace on its loopback. Needs root (skipped otherwise).
#[test]
fn spawn_enters_a_network_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    let (ns_tx, ns_rx) = std::sync::mpsc::channel();
    let inside = std::thread::spawn(move || {
        // SAFETY: unshare(2) moves only this thread into a new network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        let status = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
        assert!(status.success());
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        ns_tx.send(format!("/proc/{}/task/{tid}/ns/net", std::process::id())).unwrap();
        let addr = rx.recv().unwrap();
        get_blocking(addr, "/api/v1/namespaces")
    });
    let ns = ns_rx.recv().unwrap();
    let emu = ApiServer::spawn(Some(std::path::Path::new(&ns)), SocketAddr::from((LOCAL, 0)));
    emu.apply(Kind::Namespace, "metadata: {name: inside}");
    tx.send(emu.addr).unwrap();
    let (code, body) = inside.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""name":"inside""#), "{body}");
}

#[test]
fn the_binary_serves_its_seed() {
    let dir = std::env::temp_dir().join(format!("kube-emu-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("objects.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.10}\n---\n\
         apiVersion: xlb.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: blue}\nspec: {blocks: []}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nope}\n",
    )
    .unwrap();
    std::fs::write(dir.join("nodes.yml"), "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n- {apiVersion: v1, kind: Node, metadata: {name: n2}}\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-emu"))
        .args(["--listen", "127.0.0.1:0", "--seed"])
        .arg(&dir)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _kill = Kill(pid);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{line}"));
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    assert!(line.contains("(4 objects seeded)"), "{line}");
    assert!(std::fs::read_to_string(&kubeconfig).unwrap().contains(url));

    let (code, body) = get_blocking(addr, "/api/v1/namespaces/demo/services");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (list["kind"].as_str(), list["items"][0]["metadata"]["name"].as_str()),
        (Some("ServiceList"), Some("web"))
    );
    let (_, body) = get_blocking(addr, "/api/v1/nodes");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["items"].as_array().unwrap().len(), 2);
    let (_, body) = get_blocking(addr, "/apis/xlb.io/v1alpha1/loadbalancerippools/blue");
    assert!(body.contains(r#""kind":"LoadBalancerIPPool""#), "{body}");

    drop(_kill);
    let _ = child.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("skipped apps/v1 Deployment nope"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
