// SPDX-License-Identifier: MIT OR Apache-2.0
//! The caching translator: a Service whose objects did not change is not
//! translated again, and a sync after a few changes touches only those.

use std::{borrow::Borrow, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    Desired, FastMap, Frontend, FrontendKey, HealthCheck, NodeInfo, Options, Problem, SERVICE_NAME_LABEL, namespace,
    notes::{NoteKind, Notes},
    service::service_frontends,
};

/// What one Service translated to, and the versions it was translated from.
struct Cached {
    namespace: String,
    name: String,
    /// The Service's resourceVersion, and its EndpointSlices' (name, resourceVersion).
    version: String,
    slices: Vec<(String, String)>,
    frontends: Vec<Arc<Frontend>>,
    problems: Notes,
    health_checks: Vec<HealthCheck>,
    /// The last [`Translator::translate`] call that saw the Service.
    seen: u64,
}

/// [`translate`] with memory: a Service whose object and EndpointSlices
/// carry the same resourceVersions as last time is not translated again,
/// and its frontends are the same `Arc`s, which the map writer skips. A
/// sync after one EndpointSlice change costs one Service's translation plus
/// a hash lookup per other Service; nothing is sorted. Objects without a
/// resourceVersion are translated every time.
///
/// The result is [`translate`]'s with the frontends in input order instead
/// of key order: when two Services claim one frontend, the one first by
/// `namespace/name` still gets it, wherever it comes in the input.
#[derive(Default)]
pub struct Translator {
    node: Option<NodeInfo>,
    opts: Option<Options>,
    cache: FastMap<u64, Cached>,
    hasher: foldhash::fast::RandomState,
    calls: u64,
    prev: Option<Prev>,
}

/// `namespace/name` of a frontend's Service (its name is `namespace/name:port`).
fn owner(f: &Frontend) -> &str {
    f.name.rsplit_once(':').map_or(f.name.as_str(), |(s, _)| s)
}

/// The last [`Translator::translate_shared`] call, for its fast path.
struct Prev {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// By service position.
    per_service: Vec<PrevService>,
    /// By slice position: the position of the service it belongs to.
    slice_owner: Vec<Option<usize>>,
    out: Desired,
}

/// What one service (by input position) contributed to the last output.
#[derive(Default)]
struct PrevService {
    /// Positions of its slices in the input.
    slices: Vec<usize>,
    /// Keys of all its frontends, in order, and where each one sits in the
    /// output (`None`: another Service holds that key).
    keys: Vec<FrontendKey>,
    placed: Vec<Option<usize>>,
    problems: Notes,
    health_checks: Vec<HealthCheck>,
}

/// A change touching more Services than this takes the full path.
const FAST_PATH_MAX: usize = 64;

fn label(s: &EndpointSlice) -> Option<&str> {
    s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str)
}

impl Translator {
    /// Translates objects of any origin (no fast path; see [`Translator::translate_shared`]).
    pub fn translate<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
        &mut self,
        services: &[S],
        slices: &[E],
        node: &NodeInfo,
        opts: &Options,
    ) -> Desired {
        self.prev = None;
        self.full(services, slices, node, opts, false)
    }

    /// Translates a [`crate::source::Snapshot`]'s shared objects. When the
    /// input has the same shape as last time (same lengths, the changed
    /// objects at the positions of the ones they replace, as in a reflector
    /// store after updates) and few objects changed, only the Services they
    /// touch are translated, in place, and the rest is not looked at: the
    /// cost of a sync is then that of a pointer comparison per object.
    pub fn translate_shared(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
        opts: &Options,
    ) -> Desired {
        if self.node.as_ref() == Some(node)
            && self.opts.as_ref() == Some(opts)
            && let Some(d) = self.fast(services, slices, node, opts)
        {
            return d;
        }
        let d = self.full(services, slices, node, opts, true);
        if let Some(p) = self.prev.as_mut() {
            p.services = services.to_vec();
            p.slices = slices.to_vec();
        }
        d
    }

    fn fast(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
        opts: &Options,
    ) -> Option<Desired> {
        let p = self.prev.as_mut()?;
        if p.services.len() != services.len() || p.slices.len() != slices.len() {
            return None;
        }
        let mut affected: Vec<usize> = Vec::new();
        for (i, (old, new)) in p.services.iter().zip(services).enumerate() {
            if !Arc::ptr_eq(old, new) {
                let same =
                    old.metadata.name == new.metadata.name && namespace(&old.metadata) == namespace(&new.metadata);
                if !same || affected.len() == FAST_PATH_MAX {
                    return None;
                }
                affected.push(i);
            }
        }
        for (j, (old, new)) in p.slices.iter().zip(slices).enumerate() {
            if !Arc::ptr_eq(old, new) {
                // Same owner, or the grouping changed: start over.
                if label(old) != label(new) || namespace(&old.metadata) != namespace(&new.metadata) {
                    return None;
                }
                if let Some(i) = p.slice_owner[j] {
                    if affected.len() == FAST_PATH_MAX {
                        return None;
                    }
                    affected.push(i);
                }
            }
        }
        affected.sort_unstable();
        affected.dedup();
        let mut out = p.out.clone();
        let mut redone = Vec::with_capacity(affected.len());
        for &i in &affected {
            let (svc, ps) = (&*services[i], &p.per_service[i]);
            let sl: Vec<&EndpointSlice> = ps.slices.iter().map(|&j| &*slices[j]).collect();
            let id = format!("{}/{}", namespace(&svc.metadata), svc.metadata.name.as_deref().unwrap_or(""));
            let (mut problems, mut health) = (Notes::default(), Vec::new());
            let frontends = service_frontends(svc, &id, &sl, node, opts, &mut problems, &mut health);
            // Only endpoints changed: the same frontends, problems and health checks.
            if frontends.len() != ps.keys.len()
                || frontends.iter().zip(&ps.keys).any(|(f, k)| f.key != *k)
                || problems != ps.problems
                || health != ps.health_checks
            {
                return None;
            }
            redone.push(frontends);
        }
        for (&i, frontends) in affected.iter().zip(redone) {
            for (f, at) in frontends.into_iter().zip(&p.per_service[i].placed) {
                if let Some(pos) = *at {
                    out.frontends[pos] = Arc::new(f);
                }
            }
        }
        p.services.clone_from_slice(services);
        p.slices.clone_from_slice(slices);
        p.out = out.clone();
        Some(out)
    }

    fn full<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
        &mut self,
        services: &[S],
        slices: &[E],
        node: &NodeInfo,
        opts: &Options,
        record: bool,
    ) -> Desired {
        if self.node.as_ref() != Some(node) || self.opts.as_ref() != Some(opts) {
            self.cache.clear();
            self.node = Some(node.clone());
            self.opts = Some(opts.clone());
        }
        self.calls += 1;
        let call = self.calls;
        // EndpointSlices (by position) by (namespace, service name).
        let mut by_service: FastMap<(&str, &str), Vec<usize>> =
            FastMap::with_capacity_and_hasher(slices.len(), self.hasher.clone());
        for (j, s) in slices.iter().enumerate() {
            let s = s.borrow();
            if let Some(svc) = label(s) {
                by_service.entry((namespace(&s.metadata), svc)).or_default().push(j);
            }
        }
        let mut placing = Placing {
            out: Desired::default(),
            taken: FastMap::with_capacity_and_hasher(services.len() * 2, self.hasher.clone()),
            holder: Vec::new(),
            per_service: Vec::new(),
            problems: Vec::new(),
            lost: Vec::new(),
            record,
        };
        let mut slice_owner: Vec<Option<usize>> = vec![None; if record { slices.len() } else { 0 }];
        for (i, svc) in services.iter().enumerate() {
            let svc = svc.borrow();
            let (ns, name) = (namespace(&svc.metadata), svc.metadata.name.as_deref().unwrap_or(""));
            let positions = by_service.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
            let sl: Vec<&EndpointSlice> = positions.iter().map(|&j| slices[j].borrow()).collect();
            let c = self.cached(svc, ns, name, &sl, node, opts, call);
            if record {
                for &j in positions {
                    slice_owner[j] = Some(i);
                }
            }
            placing.service(i, c, positions);
        }
        self.cache.retain(|_, c| c.seen == call);
        let (mut out, per_service, mut problems) = placing.finish();
        // By Service (stable: each one's own problems before its duplicates).
        problems.sort_by(|a, b| a.service.cmp(&b.service));
        out.problems = problems;
        if record {
            self.prev =
                Some(Prev { services: Vec::new(), slices: Vec::new(), per_service, slice_owner, out: out.clone() });
        }
        out
    }

    /// The Service's translation: the cached one if its objects carry the
    /// same versions as last time, else a new one (cached).
    #[allow(clippy::too_many_arguments)]
    fn cached(
        &mut self,
        svc: &Service,
        ns: &str,
        name: &str,
        sl: &[&EndpointSlice],
        node: &NodeInfo,
        opts: &Options,
        call: u64,
    ) -> &Cached {
        use std::hash::BuildHasher as _;
        let h = self.hasher.hash_one((ns, name));
        let hit = self.cache.get(&h).is_some_and(|c| c.namespace == ns && c.name == name && up_to_date(c, svc, sl));
        if !hit {
            let id = format!("{ns}/{name}");
            let (mut p, mut health) = (Notes::default(), Vec::new());
            let frontends = service_frontends(svc, &id, sl, node, opts, &mut p, &mut health);
            let versioned =
                svc.metadata.resource_version.is_some() && sl.iter().all(|s| s.metadata.resource_version.is_some());
            let version = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                m.resource_version.clone().unwrap_or_default()
            };
            let c = Cached {
                namespace: ns.to_string(),
                name: name.to_string(),
                // Empty: never up to date (see `up_to_date`).
                version: if versioned { version(&svc.metadata) } else { String::new() },
                slices: sl
                    .iter()
                    .map(|s| (s.metadata.name.clone().unwrap_or_default(), version(&s.metadata)))
                    .collect(),
                frontends: frontends.into_iter().map(Arc::new).collect(),
                problems: p,
                health_checks: health,
                seen: call,
            };
            self.cache.insert(h, c);
        }
        let c = self.cache.get_mut(&h).expect("cached above");
        c.seen = call;
        c
    }
}

/// The output of a full translation as it is assembled, Service by
/// Service: who holds each frontend key, and (when `record`) where each
/// Service's frontends sit, for the fast path.
struct Placing {
    out: Desired,
    /// Frontend key → its index in `out.frontends`.
    taken: FastMap<FrontendKey, usize>,
    /// Index in `out.frontends` → (service, frontend) positions.
    holder: Vec<(usize, usize)>,
    per_service: Vec<PrevService>,
    problems: Vec<Problem>,
    /// Frontends that lost a claim, and where the key's holder sits.
    lost: Vec<(Arc<Frontend>, usize)>,
    record: bool,
}

impl Placing {
    /// Adds service `i`'s translation `c` (its slices at `positions`).
    fn service(&mut self, i: usize, c: &Cached, positions: &[usize]) {
        let id = || format!("{}/{}", c.namespace, c.name);
        for n in &c.problems.0 {
            let p = Problem { service: id(), message: n.message.clone() };
            match n.kind {
                NoteKind::Problem => self.problems.push(p),
                NoteKind::Skip => self.out.skipped.push(p),
                NoteKind::Notice => self.out.notices.push(p),
            }
        }
        self.out.health_checks.extend(c.health_checks.iter().cloned());
        let mut mine = PrevService::default();
        if self.record {
            mine = PrevService {
                slices: positions.to_vec(),
                keys: c.frontends.iter().map(|f| f.key).collect(),
                placed: vec![None; c.frontends.len()],
                problems: c.problems.clone(),
                health_checks: c.health_checks.clone(),
            };
        }
        for (k, f) in c.frontends.iter().enumerate() {
            self.claim(i, k, f, &mut mine);
        }
        if self.record {
            self.per_service.push(mine);
        }
    }

    /// Service `i` claims frontend `f` (its `k`th); of two claims on one
    /// key, the Service first by namespace/name keeps it.
    fn claim(&mut self, i: usize, k: usize, f: &Arc<Frontend>, mine: &mut PrevService) {
        let out = &mut self.out;
        let Some(&at) = self.taken.get(&f.key) else {
            self.taken.insert(f.key, out.frontends.len());
            if self.record {
                mine.placed[k] = Some(out.frontends.len());
                self.holder.push((i, k));
            }
            out.frontends.push(Arc::clone(f));
            return;
        };
        let held = &out.frontends[at];
        let loser = if owner(f) < owner(held) {
            let lost = std::mem::replace(&mut out.frontends[at], Arc::clone(f));
            if self.record {
                let (oi, ok) = std::mem::replace(&mut self.holder[at], (i, k));
                if oi == i {
                    mine.placed[ok] = None;
                } else {
                    self.per_service[oi].placed[ok] = None;
                }
                mine.placed[k] = Some(at);
            }
            lost
        } else {
            Arc::clone(f)
        };
        // Named once every claim is in: the final holder, whatever the order.
        self.lost.push((loser, at));
    }

    /// The problems of the frontends that lost a claim, naming the winner.
    fn finish(mut self) -> (Desired, Vec<PrevService>, Vec<Problem>) {
        for (loser, at) in std::mem::take(&mut self.lost) {
            let winner = &self.out.frontends[at];
            self.problems.push(Problem {
                service: owner(&loser).to_string(),
                message: format!(
                    "{} {}:{}/{:?} is already used by {}; skipped",
                    loser.kind.name(),
                    loser.key.address,
                    loser.key.port,
                    loser.key.protocol,
                    winner.name
                ),
            });
        }
        (self.out, self.per_service, self.problems)
    }
}

/// The cached translation still holds: same Service version, same slices
/// at the same versions. Never for objects without versions.
fn up_to_date(c: &Cached, svc: &Service, slices: &[&EndpointSlice]) -> bool {
    if c.version.is_empty() || svc.metadata.resource_version.as_deref() != Some(c.version.as_str()) {
        return false;
    }
    c.slices.len() == slices.len()
        && c.slices.iter().zip(slices).all(|((name, version), s)| {
            s.metadata.name.as_deref() == Some(name.as_str())
                && s.metadata.resource_version.as_deref() == Some(version.as_str())
        })
}
