// SPDX-License-Identifier: MIT OR Apache-2.0
//! Every file under `manifests/` parses as the Kubernetes type it claims to
//! be, the DaemonSet runs real `xlb agent` flags (its ConfigMap's variables
//! included), RBAC grants exactly what the agent uses, and the examples
//! translate without a problem.

use std::{collections::BTreeMap, path::PathBuf};

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;
use xlb::{
    cli::{Cli, Cmd},
    source::files::read_dir,
    translate::{NodeInfo, Options, translate},
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

#[derive(Default)]
struct Objects {
    daemonsets: Vec<DaemonSet>,
    configmaps: Vec<ConfigMap>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    ns_roles: Vec<Role>,
    ns_bindings: Vec<RoleBinding>,
    accounts: Vec<ServiceAccount>,
    namespaces: Vec<Namespace>,
    crds: Vec<CustomResourceDefinition>,
    kustomization: Option<Value>,
}

fn load() -> Objects {
    let mut o = Objects::default();
    for e in std::fs::read_dir(dir()).unwrap().flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for d in docs {
            let kind = d["kind"].as_str().unwrap_or_default().to_string();
            let ctx = format!("{} ({kind})", p.display());
            fn typed<T: serde::de::DeserializeOwned>(d: Value, ctx: &str) -> T {
                serde_json::from_value(d).unwrap_or_else(|e| panic!("{ctx}: {e}"))
            }
            match kind.as_str() {
                "DaemonSet" => o.daemonsets.push(typed(d, &ctx)),
                "ConfigMap" => o.configmaps.push(typed(d, &ctx)),
                "ClusterRole" => o.roles.push(typed(d, &ctx)),
                "ClusterRoleBinding" => o.bindings.push(typed(d, &ctx)),
                "Role" => o.ns_roles.push(typed(d, &ctx)),
                "RoleBinding" => o.ns_bindings.push(typed(d, &ctx)),
                "ServiceAccount" => o.accounts.push(typed(d, &ctx)),
                "Namespace" => o.namespaces.push(typed(d, &ctx)),
                "CustomResourceDefinition" => o.crds.push(typed(d, &ctx)),
                "Kustomization" => o.kustomization = Some(d),
                other => panic!("{ctx}: unexpected kind {other:?}"),
            }
        }
    }
    o
}

/// Environment variable → long flag of `xlb agent`.
fn agent_envs() -> BTreeMap<String, String> {
    let cmd = Cli::command();
    let agent = cmd.find_subcommand("agent").expect("agent subcommand");
    agent
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.get_long()?.to_string())))
        .collect()
}

#[test]
fn every_manifest_parses_and_kustomize_lists_them() {
    let o = load();
    assert_eq!(
        (o.daemonsets.len(), o.configmaps.len(), o.roles.len(), o.bindings.len(), o.accounts.len(), o.namespaces.len()),
        (1, 1, 1, 1, 1, 1)
    );
    assert_eq!(
        o.crds.iter().map(|c| c.metadata.name.clone().unwrap()).collect::<Vec<_>>(),
        ["loadbalancerippools.xlb.io"]
    );
    let k = o.kustomization.expect("kustomization.yaml");
    let resources: Vec<&str> = k["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    for r in &resources {
        assert!(dir().join(r).exists(), "kustomization lists missing {r}");
    }
    assert_eq!(resources.len(), 9);
}

#[test]
fn the_daemonset_runs_real_agent_flags() {
    let o = load();
    let ds = &o.daemonsets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert!(
        pod.tolerations.as_ref().unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists")),
        "runs on every node"
    );
    assert_eq!(ds.spec.update_strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false), "capabilities, not privileged");
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let path = probe.as_ref().unwrap().http_get.as_ref().unwrap().path.clone().unwrap();
        assert!(path == "/healthz" || path == "/readyz");
    }
    let mounts = c.volume_mounts.as_ref().unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/sys/fs/bpf"), "bpffs is mounted");
    assert!(mounts.iter().any(|m| m.mount_path == "/run/xlb/host-cgroup"), "the host's cgroup2 is mounted");
    assert_eq!(pod.host_pid, Some(true), "socket-LB reaches pods' namespaces through the host's /proc");

    // Its args plus its environment (ConfigMap and fieldRef) make a valid `xlb` command line.
    let envs = agent_envs();
    let mut argv = vec!["xlb".to_string()];
    argv.extend(c.args.clone().unwrap());
    for e in c.env.iter().flatten() {
        let flag = envs.get(&e.name).unwrap_or_else(|| panic!("env {} is no xlb agent flag", e.name));
        argv.push(format!("--{flag}=node-x"));
    }
    let cm = &o.configmaps[0];
    assert_eq!(
        c.env_from.as_ref().unwrap()[0].config_map_ref.as_ref().unwrap().name,
        cm.metadata.name.clone().unwrap()
    );
    for (k, v) in cm.data.as_ref().unwrap() {
        let flag = envs.get(k).unwrap_or_else(|| panic!("ConfigMap key {k} is no xlb agent variable; known: {envs:?}"));
        argv.push(format!("--{flag}={v}"));
    }
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Cmd::Agent(a) = cli.cmd else { panic!("not `xlb agent`") };
    let s = xlb::cli::settings(&a).expect("valid settings");
    assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/xlb"));
    assert_eq!(s.xdp_interfaces, ["eth0"]);
    assert!(s.manifests.is_none(), "in a cluster the agent watches the API server");
    assert_eq!(s.socket_lb, xlb::socket_lb::Mode::All);
    assert_eq!(s.cgroup_path.as_deref(), Some(std::path::Path::new("/run/xlb/host-cgroup")));
}

#[test]
fn rbac_grants_only_what_the_agent_uses() {
    let o = load();
    type Grants = Vec<(String, String, String)>;
    fn grants(rules: &[k8s_openapi::api::rbac::v1::PolicyRule]) -> Grants {
        let mut granted = Grants::new();
        for r in rules {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    for v in &r.verbs {
                        granted.push((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
        granted.sort();
        granted
    }
    fn want(rules: &[(&str, &str, &[&str])]) -> Grants {
        let mut w: Grants = rules
            .iter()
            .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string())))
            .collect();
        w.sort();
        w
    }
    let watch: &[&str] = &["get", "list", "watch"];
    let cluster = want(&[
        // The source's watches (`source/kube.rs`).
        ("", "services", watch),
        ("", "nodes", watch),
        ("", "namespaces", watch),
        ("discovery.k8s.io", "endpointslices", watch),
        ("xlb.io", "loadbalancerippools", watch),
        // The allocator's status writes (`lbipam/leader.rs`: patch_status).
        ("", "services/status", &["patch"]),
        // Events (`events.rs`).
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ]);
    assert_eq!(grants(o.roles[0].rules.as_deref().unwrap_or_default()), cluster);
    // Leases (`lease.rs`: get, create, replace; `l2/leases.rs`: list and
    // watch), in the agent's namespace only.
    let leases = want(&[("coordination.k8s.io", "leases", &["get", "list", "watch", "create", "update"])]);
    assert_eq!(grants(o.ns_roles[0].rules.as_deref().unwrap_or_default()), leases);
    let b = &o.bindings[0];
    assert_eq!(b.role_ref.name, o.roles[0].metadata.name.clone().unwrap());
    let subject = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(subject.name.clone()), o.accounts[0].metadata.name);
    assert_eq!(subject.namespace, o.accounts[0].metadata.namespace);
    let rb = &o.ns_bindings[0];
    assert_eq!(
        (rb.role_ref.kind.as_str(), Some(rb.role_ref.name.clone())),
        ("Role", o.ns_roles[0].metadata.name.clone())
    );
    let subject = &rb.subjects.as_ref().unwrap()[0];
    assert_eq!(Some(subject.name.clone()), o.accounts[0].metadata.name);
    assert_eq!(subject.namespace, o.accounts[0].metadata.namespace);
    // The Role lives where the agent runs: its Leases' namespace (POD_NAMESPACE).
    let k = o.kustomization.as_ref().unwrap();
    assert_eq!(Some(k["namespace"].as_str().unwrap().to_string()), o.accounts[0].metadata.namespace);
    let ds = &o.daemonsets[0].spec.template.spec.as_ref().unwrap().containers[0];
    let pod_ns = ds.env.iter().flatten().find(|e| e.name == "POD_NAMESPACE").expect("POD_NAMESPACE");
    let field = pod_ns.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("metadata.namespace"));
}

#[test]
fn the_examples_translate_cleanly() {
    let snap = read_dir(&dir().join("examples"));
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    assert_eq!((snap.services.len(), snap.slices.len()), (4, 4));
    let node =
        NodeInfo { name: "node-1".into(), addresses: vec!["192.168.50.1".parse().unwrap()], ..NodeInfo::default() };
    let d = translate(&snap.services, &snap.slices, &node, &Options::default());
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    // 4 ClusterIPs, 2 NodePorts, 1 LoadBalancer IP, 1 externalIP; 4 pods each.
    assert_eq!(d.frontends.len(), 8);
    assert!(d.frontends.iter().all(|f| f.eligible().count() == 4));
    assert!(d.frontends.iter().any(|f| f.key.port == 30036));
    assert!(d.frontends.iter().any(|f| f.key.port == 8765 && f.backends[0].port == 9376));
}
