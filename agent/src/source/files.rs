// SPDX-License-Identifier: MIT OR Apache-2.0
//! The file source: a directory of multi-document YAML (or JSON) holding
//! Services, EndpointSlices and Nodes as `kubectl get -o yaml` prints them
//! (a `kind: List` is unpacked too). The directory is re-read whenever
//! anything in it changes.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::lbipam::{self, LoadBalancerIPPool};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::watch;

use super::{Selector, Snapshot};

/// The YAML parser's limits: its defaults (1,024 documents, 250,000 nodes
/// a file) guard against hostile input, but a cluster's dump holds tens of
/// thousands of objects. Aliases and nesting keep their default limits.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 100_000_000;
    budget.max_events = 200_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    budget.max_reader_input_bytes = Some(1 << 30);
    let mut o = serde_saphyr::Options::default();
    o.budget = Some(budget);
    o
}

/// Parses one file's documents into `snap`; a bad document is reported in
/// `snap.errors` and the others are kept.
pub fn parse_into(snap: &mut Snapshot, origin: &str, text: &str) {
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple_with_options(text, yaml_options()) {
        Ok(d) => d,
        Err(e) => {
            snap.errors.push(format!("{origin}: not YAML: {e}"));
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        add_object(snap, &format!("{origin} document {}", i + 1), doc);
    }
}

fn add_object(snap: &mut Snapshot, origin: &str, doc: serde_json::Value) {
    if doc.is_null() {
        return; // an empty document (e.g. a trailing `---`)
    }
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let res = match kind.as_str() {
        "Service" => serde_json::from_value::<Service>(doc).map(|s| snap.services.push(s.into())),
        "EndpointSlice" => serde_json::from_value::<EndpointSlice>(doc).map(|s| snap.slices.push(s.into())),
        "Node" => serde_json::from_value::<Node>(doc).map(|s| snap.nodes.push(s.into())),
        "Namespace" => serde_json::from_value::<Namespace>(doc).map(|s| snap.namespaces.push(s.into())),
        "LoadBalancerIPPool" => serde_json::from_value::<LoadBalancerIPPool>(doc).map(|s| snap.pools.push(s.into())),
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" | "LoadBalancerIPPoolList" => {
            if let Some(items) = doc.get("items").and_then(|i| i.as_array()) {
                for (j, item) in items.iter().enumerate() {
                    add_object(snap, &format!("{origin} item {}", j + 1), item.clone());
                }
            }
            Ok(())
        }
        // Anything else (Deployments, ConfigMaps …) may share the files.
        _ => Ok(()),
    };
    if let Err(e) = res {
        snap.errors.push(format!("{origin}: bad {kind}: {e}"));
    }
}

fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file under `dir` (recursively,
/// in path order).
pub fn read_dir(dir: &Path) -> Snapshot {
    let mut snap = Snapshot { synced: true, lb_synced: true, ..Snapshot::default() };
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        match std::fs::read_dir(&d) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if is_manifest(&p) {
                        files.push(p);
                    }
                }
            }
            Err(e) => snap.errors.push(format!("{}: {e}", d.display())),
        }
    }
    files.sort();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => parse_into(&mut snap, &f.display().to_string(), &text),
            Err(e) => snap.errors.push(format!("{}: {e}", f.display())),
        }
    }
    snap
}

/// The LoadBalancer addresses of a directory: a function of the files
/// alone (statuses given there, creation times, names), so every agent
/// reading them, and every restart, computes the same allocation (and the
/// same L2 owners). While a file does not read (an editor mid-write), the
/// last good allocation is what the Services hold, so nothing moves.
fn allocate(
    snap: &mut Snapshot,
    last_good: &mut std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    lb_class: &str,
) {
    if snap.errors.is_empty() {
        let mut fresh = std::collections::BTreeMap::new();
        lbipam::apply(snap, &mut fresh, lb_class);
        *last_good = fresh;
    } else {
        let mut held = last_good.clone();
        lbipam::apply(snap, &mut held, lb_class);
    }
}

/// Watches `dir` and publishes a fresh [`Snapshot`] of the objects
/// `selector` makes ours after every burst of changes (debounced by
/// `settle`). LoadBalancer Services of class `lb_class` (or none) get their
/// addresses from the directory's pools here, as the API server's statuses
/// would hold them ([`allocate`]). Runs until the receiver is dropped.
pub async fn watch_dir(
    dir: PathBuf,
    settle: Duration,
    selector: Selector,
    lb_class: String,
    tx: watch::Sender<Snapshot>,
) -> anyhow::Result<()> {
    let mut last_good = std::collections::BTreeMap::new();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    // Only changes to manifests (or to directories) count: a log file or an
    // editor's swap file in the same directory must not trigger re-reads.
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match res {
            Ok(e) => {
                !e.kind.is_access() && e.paths.iter().any(|p| is_manifest(p) || p.is_dir() || p.extension().is_none())
            }
            Err(_) => true,
        };
        if relevant {
            let _ = ev_tx.send(Instant::now());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::Recursive)?;
    let mut first = read_dir(&dir);
    selector.retain(&mut first);
    allocate(&mut first, &mut last_good, &lb_class);
    first.changed_at = Some(Instant::now());
    tx.send_replace(first);
    while let Some(at) = ev_rx.recv().await {
        // Let an editor or `cp` finish, then take everything that queued up.
        tokio::time::sleep(settle).await;
        while ev_rx.try_recv().is_ok() {}
        let mut snap = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || read_dir(&dir)
        })
        .await?;
        selector.retain(&mut snap);
        allocate(&mut snap, &mut last_good, &lb_class);
        snap.changed_at = Some(at);
        if tx.send(snap).is_err() {
            break;
        }
    }
    Ok(())
}
