// SPDX-License-Identifier: MIT OR Apache-2.0
//! The cluster in API mode: an API-server emulator (`kube-emu`) serves on
//! a management network of its own (bridge `br1` in the fabric namespace,
//! each node's `mgmt0`, [`API4`]:6443), as control planes often are, so a
//! node whose underlay link goes down still reaches it; the agents run
//! against it with a kubeconfig — the path a real cluster uses,
//! and the shared store that Lease elections across nodes need — instead of
//! `--manifests`. The harness applies to it the same objects it writes to
//! the manifests directory (an object that goes away from them is deleted),
//! as `kubectl apply --prune` would; a Service's status stays the agents'.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
};

use kube_emu::{ApiServer, Kind};
use serde_json::Value;

use super::Cluster;

/// The API server's address on the management network (10.99.0.0/24;
/// node N is 10.99.0.N).
pub const API4: &str = "10.99.0.250";
/// The agents' namespace (their Leases live there).
pub const AGENT_NAMESPACE: &str = "xlb-system";

/// The emulator of a cluster in API mode.
pub struct Api {
    pub server: ApiServer,
    pub kubeconfig: PathBuf,
    /// (kind, namespace, name) of every object applied from the manifests.
    applied: Mutex<BTreeSet<(Kind, String, String)>>,
}

impl Cluster {
    /// Starts the API server on the underlay; agents started from now on
    /// use it instead of the manifests directory. Call before
    /// [`Cluster::write_manifests`] and [`Cluster::start_agents`].
    pub fn use_api(&mut self) {
        self.fabric.exec_lines(&[
            "ip link add br1 type bridge",
            "ip link set br1 up",
            &format!("ip addr add {API4}/24 dev br1"),
        ]);
        for n in &self.nodes {
            let (port, tmp) = (format!("m{}", n.index), format!("m{}p", n.index));
            self.fabric.exec_lines(&[
                &format!("ip link add {port} type veth peer name {tmp}"),
                &format!("ip link set {tmp} netns {}", n.ns.name),
                &format!("ip link set {port} master br1 up"),
            ]);
            n.ns.exec_lines(&[
                &format!("ip link set {tmp} name mgmt0"),
                "ip link set mgmt0 up",
                &format!("ip addr add 10.99.0.{}/24 dev mgmt0", n.index),
            ]);
        }
        let netns = PathBuf::from(format!("/var/run/netns/{}", self.fabric.name));
        let addr = SocketAddr::new(API4.parse().unwrap(), 6443);
        let server = ApiServer::spawn(Some(&netns), addr);
        let kubeconfig = self.dir.path.join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
        self.api = Some(Api { server, kubeconfig, applied: Mutex::new(BTreeSet::new()) });
    }

    /// The emulator (panics unless [`Cluster::use_api`] was called).
    pub fn api(&self) -> &ApiServer {
        &self.api.as_ref().expect("the cluster runs without an API server").server
    }

    /// Applies the documents of `yaml` to the API server and deletes the
    /// objects applied before that are no longer in it.
    pub(super) fn push_to_api(&self, yaml: &str) {
        let Some(api) = &self.api else { return };
        let mut now = BTreeSet::new();
        for doc in yaml.split("\n---\n").map(str::trim).filter(|d| !d.is_empty()) {
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{e}: {doc}"));
            let kind = Kind::of(v["apiVersion"].as_str().unwrap_or(""), v["kind"].as_str().unwrap_or(""))
                .unwrap_or_else(|| panic!("unknown kind in {doc}"));
            let m = &v["metadata"];
            let ns = m["namespace"].as_str().unwrap_or(if kind.namespaced() { "default" } else { "" });
            let name = m["name"].as_str().expect("a name").to_string();
            api.server.apply(kind, doc);
            now.insert((kind, ns.to_string(), name));
        }
        let mut applied = api.applied.lock().unwrap();
        for (kind, ns, name) in applied.difference(&now) {
            api.server.delete(*kind, ns, name);
        }
        *applied = now;
    }

    /// The agent arguments that reach the API server.
    pub(super) fn api_args(&self) -> Option<Vec<String>> {
        let api = self.api.as_ref()?;
        Some(vec![
            "--kubeconfig".into(),
            api.kubeconfig.display().to_string(),
            "--namespace".into(),
            AGENT_NAMESPACE.into(),
        ])
    }

    /// The node holding an L2 address's Lease (`node-N`), if held.
    pub fn l2_holder(&self, addr: &str) -> Option<String> {
        let ip: IpAddr = addr.parse().unwrap();
        let lease = self.api().get(Kind::Lease, AGENT_NAMESPACE, &xlb::l2::leases::lease_name(&ip))?;
        let holder = lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty())?;
        Some(xlb::lease::node_of(holder).to_string())
    }

    /// A Service's `status.loadBalancer.ingress` addresses, as stored.
    pub fn ingress(&self, ns: &str, name: &str) -> Vec<String> {
        let Some(svc) = self.api().get(Kind::Service, ns, name) else { return Vec::new() };
        let ingress = svc["status"]["loadBalancer"]["ingress"].as_array().cloned().unwrap_or_default();
        ingress.iter().filter_map(|i| i["ip"].as_str().map(str::to_string)).collect()
    }
}
