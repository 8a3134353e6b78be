// SPDX-License-Identifier: MIT OR Apache-2.0
//! The map writer against real kernel maps: diffing, make-before-break
//! region flips, failure isolation when maps are full, and recovery from
//! pinned maps. Desired states come from the real translation of YAML.

use bpf_tests::{addr16, agent::PinDir, svc_key, test_sizes};
use datapath_common::{BACKEND_ACTIVE, BACKEND_TERMINATING, PROTO_TCP, SCOPE_INTERNAL};
use xlb::{
    Datapath, MapSizes,
    source::{Snapshot, files::parse_into},
    translate::{Desired, NodeInfo, Options, translate},
    writer::Writer,
};

/// A ClusterIP service `name` at `vip`:80 with the given endpoints
/// (`addr` or `addr!` for a terminating one) on port 8080.
fn svc(name: &str, vip: &str, endpoints: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|e| match e.strip_suffix('!') {
            Some(a) => {
                format!("- addresses: [{a}]\n  conditions: {{ready: false, serving: true, terminating: true}}\n")
            }
            None => format!("- addresses: [{e}]\n"),
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: {vip}, ports: [{{name: p, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints:\n{eps}---\n"
    )
}

fn desired(yaml: &str) -> Desired {
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "test", yaml);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    translate(&snap.services, &snap.slices, &NodeInfo::default(), &Options::default())
}

fn load(sizes: MapSizes) -> Datapath {
    Datapath::load(sizes).expect("load")
}

/// The backend addresses a frontend lists for new flows.
fn listed(dp: &Datapath, vip: &str) -> Vec<[u8; 16]> {
    let s = dp.service(&svc_key(vip, 80, PROTO_TCP, SCOPE_INTERNAL)).expect("service entry");
    let slots = dp.region_slots(&s).unwrap();
    slots.iter().take(s.count as usize).map(|id| dp.backend(*id).expect("listed backend exists").addr).collect()
}

#[test]
fn diffs_flip_regions_and_release_what_is_gone() {
    let mut dp = load(test_sizes());
    let mut w = Writer::new(&dp);
    let r = w.apply(&mut dp, &desired(&svc("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2"])));
    assert_eq!((r.changed, r.backends_written, r.failed.len()), (1, 2, 0));
    let key = svc_key("10.96.0.1", 80, PROTO_TCP, SCOPE_INTERNAL);
    let before = dp.service(&key).unwrap();
    assert_eq!(before.table_len, 251);

    // Same input: nothing is written.
    let r = w.apply(&mut dp, &desired(&svc("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2"])));
    assert_eq!((r.changed, r.unchanged, r.backends_written), (0, 1, 0));
    assert_eq!(dp.service(&key).unwrap(), before);

    // One endpoint terminates, one is added: a fresh region (make before
    // break), the terminating backend stays in BACKENDS for its flows.
    let r = w.apply(&mut dp, &desired(&svc("a", "10.96.0.1", &["10.0.0.1!", "10.0.0.2", "10.0.0.3"])));
    assert_eq!((r.changed, r.backends_written), (1, 2));
    let after = dp.service(&key).unwrap();
    assert_eq!(after.id, before.id, "the frontend keeps its id");
    let (a, b) = (before.list_off..before.list_off + before.count + before.table_len, after.list_off);
    assert!(!a.contains(&b), "the new region was written beside the live one");
    assert_eq!(listed(&dp, "10.96.0.1"), [addr16("10.0.0.2"), addr16("10.0.0.3")]);
    let states: Vec<(String, u8)> =
        dp.backends().iter().map(|(_, b)| (xlb::dump::ip(&b.addr).to_string(), b.state)).collect();
    assert!(states.contains(&("10.0.0.1".into(), BACKEND_TERMINATING)), "{states:?}");
    assert!(states.contains(&("10.0.0.3".into(), BACKEND_ACTIVE)), "{states:?}");

    // The endpoint goes away: its backend slot is emptied.
    let r = w.apply(&mut dp, &desired(&svc("a", "10.96.0.1", &["10.0.0.2", "10.0.0.3"])));
    assert_eq!(r.backends_removed, 1);
    assert_eq!(dp.backends().len(), 2);

    // The service goes away: entry, name and backends are removed.
    let r = w.apply(&mut dp, &desired(&svc("b", "10.96.0.2", &["10.0.0.9"])));
    assert_eq!((r.changed, r.removed, r.backends_removed), (1, 1, 2));
    assert!(dp.service(&key).is_none());
    assert_eq!(dp.frontends().len(), 1);
    assert_eq!(dp.backends().len(), 1);
}

#[test]
fn a_service_that_does_not_fit_fails_alone() {
    // Room for two small services (2 + 251 and 3 + 307 slots), not a third.
    let sizes = MapSizes { slots: 600, ..test_sizes() };
    let mut dp = load(sizes);
    let mut w = Writer::new(&dp);
    let two = svc("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2"])
        + &svc("b", "10.96.0.2", &["10.0.1.1", "10.0.1.2", "10.0.1.3"]);
    let big = svc("c", "10.96.0.3", &["10.0.2.1", "10.0.2.2", "10.0.2.3", "10.0.2.4", "10.0.2.5"]);
    let r = w.apply(&mut dp, &desired(&(two.clone() + &big)));
    assert_eq!(r.changed, 2, "{r:?}");
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].service, "t/c");
    assert!(r.failed[0].message.contains("t/c:p") && r.failed[0].message.contains("SLOTS is full"), "{:?}", r.failed);
    assert_eq!(listed(&dp, "10.96.0.1").len(), 2);
    assert_eq!(listed(&dp, "10.96.0.2").len(), 3);
    assert!(dp.service(&svc_key("10.96.0.3", 80, PROTO_TCP, SCOPE_INTERNAL)).is_none());

    // A live service that cannot grow keeps serving its old backends.
    let grown = svc("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
        + &svc("b", "10.96.0.2", &["10.0.1.1", "10.0.1.2", "10.0.1.3"]);
    let r = w.apply(&mut dp, &desired(&grown));
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].service, "t/a");
    assert_eq!(listed(&dp, "10.96.0.1"), [addr16("10.0.0.1"), addr16("10.0.0.2")], "old state intact");

    // Once the big one is gone, everything fits again.
    let r = w.apply(&mut dp, &desired(&two));
    assert!(r.failed.is_empty(), "{r:?}");
}

#[test]
fn running_out_of_backend_ids_is_a_clear_error() {
    let sizes = MapSizes { backends: 4, ..test_sizes() }; // ids 1..=3
    let mut dp = load(sizes);
    let mut w = Writer::new(&dp);
    let y = svc("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2"]) + &svc("b", "10.96.0.2", &["10.0.1.1", "10.0.1.2"]);
    let r = w.apply(&mut dp, &desired(&y));
    assert_eq!(r.changed, 1);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].service, "t/b");
    assert!(r.failed[0].message.contains("no free backend id"), "{:?}", r.failed);
}

#[test]
fn a_writer_continues_from_pinned_maps() {
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path).unwrap();
    let y = svc("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2"]) + &svc("b", "10.96.0.2", &["10.0.1.1"]);
    let before = {
        let mut dp = Datapath::load_pinned(test_sizes(), Some(&pins.path)).unwrap();
        let mut w = Writer::new(&dp);
        assert_eq!(w.apply(&mut dp, &desired(&y)).changed, 2);
        dp.service(&svc_key("10.96.0.1", 80, PROTO_TCP, SCOPE_INTERNAL)).unwrap()
    };
    // A different size asked for: the pinned maps win, state included.
    let mut dp = Datapath::load_pinned(MapSizes { services: 8192, ..test_sizes() }, Some(&pins.path)).unwrap();
    assert_eq!(dp.sizes().services, test_sizes().services);
    assert_eq!(dp.recover().unwrap(), (2, 3));
    let mut w = Writer::recover(&dp);
    let r = w.apply(&mut dp, &desired(&y));
    assert_eq!((r.changed, r.unchanged, r.backends_written, r.removed), (0, 2, 0, 0), "{r:?}");
    assert_eq!(dp.service(&svc_key("10.96.0.1", 80, PROTO_TCP, SCOPE_INTERNAL)).unwrap(), before);
    // New allocations do not collide with what was recovered.
    let y2 = y + &svc("c", "10.96.0.3", &["10.0.2.1"]);
    let r = w.apply(&mut dp, &desired(&y2));
    assert_eq!((r.changed, r.failed.len()), (1, 0), "{r:?}");
    let ids: std::collections::BTreeSet<u32> = dp.services().iter().map(|(_, s)| s.id).collect();
    assert_eq!(ids.len(), 3);
    let c = dp.service(&svc_key("10.96.0.3", 80, PROTO_TCP, SCOPE_INTERNAL)).unwrap();
    let a = before;
    assert!(c.list_off >= a.list_off + a.count + a.table_len || c.list_off + c.count + c.table_len <= a.list_off);
    assert_eq!(listed(&dp, "10.96.0.3"), [addr16("10.0.2.1")]);
}

/// Weighted services of every scheduler survive an agent restart as they
/// were: the recovered writer finds the weights in each region (list,
/// weights, table) and rewrites nothing; and the region's parts read back
/// as written (a weighted sequence holds list positions, not backend ids).
/// (A frontend with a draining backend, terminating or weight 0, is
/// rewritten once after a restart: the region does not list it.)
#[test]
fn weighted_services_are_recovered_unchanged_after_a_restart() {
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path).unwrap();
    let scheds = ["rr", "wrr", "lc", "wlc", "sh", "mh", "random"];
    let y: String = scheds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            svc(s, &format!("10.96.1.{i}"), &["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]).replace(
                "namespace: t}",
                &format!("namespace: t, annotations: {{xlb.io/scheduler: {s}, xlb.io/weights: '10.0.0.1=6 10.0.0.2=2 10.0.0.3=2'}}}}"),
            )
        })
        .collect();
    let d = desired(&y);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    {
        let mut dp = Datapath::load_pinned(test_sizes(), Some(&pins.path)).unwrap();
        let r = Writer::new(&dp).apply(&mut dp, &d);
        assert_eq!((r.changed, r.failed.len()), (scheds.len(), 0), "{r:?}");
        for (i, s) in scheds.iter().enumerate() {
            let svc = dp.service(&svc_key(&format!("10.96.1.{i}"), 80, PROTO_TCP, SCOPE_INTERNAL)).unwrap();
            let slots = dp.region_slots(&svc).unwrap();
            let parts = xlb::select::Parts::of(&svc, &slots);
            assert_eq!(parts.list.len(), 4, "{s}");
            let weighted = matches!(*s, "wrr" | "wlc" | "mh" | "random");
            let want: &[u32] = if weighted { &[6, 2, 2, 1] } else { &[] };
            assert_eq!(parts.weights, want, "{s}");
            if matches!(*s, "wrr" | "wlc" | "random") {
                assert_eq!(parts.table.len(), 11, "{s}: the sequence, one entry per unit of weight");
                assert!(parts.table.iter().all(|p| *p < 4), "{s}: list positions");
            }
        }
    }
    let mut dp = Datapath::load_pinned(test_sizes(), Some(&pins.path)).unwrap();
    dp.recover().unwrap();
    let mut w = Writer::recover(&dp);
    let r = w.apply(&mut dp, &d);
    assert_eq!((r.changed, r.unchanged, r.backends_written), (0, scheds.len(), 0), "{r:?}");
}

/// `svc` with resourceVersions, so the translator can skip what did not change.
fn svc_v(name: &str, vip: &str, endpoints: &[&str], version: u32) -> String {
    svc(name, vip, endpoints)
        .replace("namespace: t}", &format!("namespace: t, resourceVersion: \"{version}\"}}"))
        .replace("namespace: t, labels", &format!("namespace: t, resourceVersion: \"{version}\", labels"))
}

/// Every frontend's listed backends, and every backend's state, by address.
type State = (Vec<(String, Vec<[u8; 16]>)>, Vec<([u8; 16], u8)>);

fn state(dp: &Datapath) -> State {
    let mut fronts: Vec<(String, Vec<[u8; 16]>)> = dp
        .services()
        .iter()
        .map(|(k, s)| {
            let slots = dp.region_slots(s).unwrap();
            let mut l: Vec<[u8; 16]> =
                slots.iter().take(s.count as usize).map(|id| dp.backend(*id).unwrap().addr).collect();
            l.sort();
            (xlb::dump::ip(&k.addr).to_string(), l)
        })
        .collect();
    fronts.sort();
    let mut backs: Vec<([u8; 16], u8)> = dp.backends().iter().map(|(_, b)| (b.addr, b.state)).collect();
    backs.sort();
    (fronts, backs)
}

#[test]
fn incremental_syncs_end_where_a_fresh_writer_does() {
    use xlb::translate::Translator;
    let steps = [
        // Two services share backend 10.0.0.2.
        svc_v("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2"], 1) + &svc_v("b", "10.96.0.2", &["10.0.0.2"], 1),
        // a's copy of the shared backend terminates; b still uses it actively.
        svc_v("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2!"], 2) + &svc_v("b", "10.96.0.2", &["10.0.0.2"], 1),
        // b moves away from it: it is only a's draining backend now.
        svc_v("a", "10.96.0.1", &["10.0.0.1", "10.0.0.2!"], 2) + &svc_v("b", "10.96.0.2", &["10.0.0.3"], 2),
        // a drops it; c appears; nothing references 10.0.0.2 any more.
        svc_v("a", "10.96.0.1", &["10.0.0.1"], 3)
            + &svc_v("b", "10.96.0.2", &["10.0.0.3"], 2)
            + &svc_v("c", "10.96.0.3", &["10.0.0.4"], 1),
        // b goes away.
        svc_v("a", "10.96.0.1", &["10.0.0.1"], 3) + &svc_v("c", "10.96.0.3", &["10.0.0.4"], 1),
    ];
    let mut dp = load(test_sizes());
    let mut w = Writer::new(&dp);
    let mut t = Translator::default();
    for (i, yaml) in steps.iter().enumerate() {
        let mut snap = Snapshot::default();
        parse_into(&mut snap, "test", yaml);
        let d = t.translate(&snap.services, &snap.slices, &NodeInfo::default(), &Options::default());
        let r = w.apply(&mut dp, &d);
        assert!(r.failed.is_empty(), "step {i}: {r:?}");
        // The incremental writer ends where a fresh one does from scratch.
        let mut fresh = load(test_sizes());
        Writer::new(&fresh).apply(&mut fresh, &desired(yaml));
        assert_eq!(state(&dp), state(&fresh), "step {i}");
    }
    let (_, backs) = state(&dp);
    assert_eq!(backs.iter().map(|b| b.0).collect::<Vec<_>>(), [addr16("10.0.0.1"), addr16("10.0.0.4")]);

    // An unchanged sync looks at nothing and writes nothing.
    let mut snap = Snapshot::default();
    parse_into(&mut snap, "test", &steps[4]);
    let (node, opts) = (NodeInfo::default(), Options::default());
    let d = t.translate_shared(&snap.services, &snap.slices, &node, &opts);
    let r = w.apply(&mut dp, &d);
    assert_eq!((r.changed, r.unchanged, r.removed, r.backends_written, r.backends_removed), (0, 2, 0, 0, 0));

    // The shared fast path (one slice replaced in place, as a reflector
    // store does) and the writer's positional path end where a fresh writer does.
    for (k, addr) in ["10.0.0.5", "10.0.0.6"].iter().enumerate() {
        let mut slice = (*snap.slices[1]).clone();
        slice.endpoints.as_mut().unwrap()[0].addresses = vec![addr.to_string()];
        slice.metadata.resource_version = Some(format!("{}", 10 + k));
        snap.slices[1] = std::sync::Arc::new(slice);
        let d = t.translate_shared(&snap.services, &snap.slices, &node, &opts);
        let r = w.apply(&mut dp, &d);
        assert_eq!((r.changed, r.unchanged, r.backends_written, r.backends_removed), (1, 1, 1, 1), "{r:?}");
        let mut fresh = load(test_sizes());
        Writer::new(&fresh).apply(&mut fresh, &translate(&snap.services, &snap.slices, &node, &opts));
        assert_eq!(state(&dp), state(&fresh));
    }
}
