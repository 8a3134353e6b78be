// SPDX-License-Identifier: MIT OR Apache-2.0
//! The map writer: makes the datapath match a [`Desired`] state.
//!
//! Each [`Writer::apply`] diffs the desired frontends against what it last
//! programmed and changes only what differs, in make-before-break order:
//! 1. backends (new ones, state changes), so every id a table will name exists;
//! 2. per frontend, a fresh SLOTS region with its list and Maglev table, then
//!    the SERVICES entry flipped to it (inside [`Datapath::set_service`]),
//!    then its source ranges and FRONTENDS name;
//! 3. frontends no longer wanted;
//! 4. backends no frontend references any more.
//!
//! The work is proportional to what changed: a frontend whose `Arc` is the
//! one applied last time is not looked at (the translator hands out the
//! same `Arc` for an unchanged Service), and backends are reference-counted
//! rather than recomputed from every frontend.
//!
//! A frontend that fails (a full map, an id space exhausted) is reported with
//! its `namespace/name:port` and keeps what it had; the others go on.
//!
//! Ids are handed out round-robin over their space and a freed id is reused
//! as late as possible, so a conntrack entry still naming a deleted backend
//! (or a reply entry naming a deleted frontend) does not land on a newcomer.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use datapath_common::{
    BACKEND_ACTIVE, BACKEND_F_NODE_LOCAL, BACKEND_TERMINATING, Backend, FrontendInfo, SCHED_MAGLEV, SCHED_SOURCE_HASH,
    SVC_F_AFFINITY, SVC_F_EXT_LOCAL, SVC_F_NO_LOCAL_DROP, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceKey,
};
use serde::Serialize;

use crate::{
    Datapath, ServiceSpec,
    datapath::map_addr,
    select::Parts,
    sequence,
    translate::{BackendState, Desired, Frontend, Kind, Problem, Protocol, Scope},
};

/// Round-robin id allocator over `[min, max)`.
#[derive(Debug)]
struct Ids {
    used: HashSet<u32>,
    next: u32,
    min: u32,
    max: u32,
}

impl Ids {
    fn new(min: u32, max: u32) -> Self {
        Self { used: HashSet::new(), next: min, min, max }
    }

    fn alloc(&mut self) -> Option<u32> {
        let span = self.max.saturating_sub(self.min);
        for i in 0..span {
            let id = self.min + (self.next - self.min + i) % span;
            if self.used.insert(id) {
                self.next = if id + 1 >= self.max { self.min } else { id + 1 };
                return Some(id);
            }
        }
        None
    }

    fn take(&mut self, id: u32) {
        self.used.insert(id);
        if id >= self.next && id + 1 < self.max {
            self.next = id + 1;
        }
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A backend as the datapath keys it.
type BackendKey = ([u8; 16], u16);

/// The SERVICES key of a frontend.
pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: map_addr(f.key.address),
        port: f.key.port.to_be(),
        proto: f.key.protocol.number(),
        scope: f.key.scope.number(),
    }
}

fn info(key: ServiceKey, f: &Frontend) -> FrontendInfo {
    let mut i = FrontendInfo { key, kind: f.kind.number(), ..FrontendInfo::default() };
    let mut n = f.name.len().min(i.name.len());
    while !f.name.is_char_boundary(n) {
        n -= 1;
    }
    i.name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
    i.name_len = n as u8;
    i
}

/// What one frontend was programmed with.
#[derive(Clone, Debug, PartialEq)]
struct Applied {
    spec: ServiceSpec,
    /// Every backend id it references, active and draining.
    backends: Vec<u32>,
    ranges: BTreeSet<(IpAddr, u8)>,
    info: FrontendInfo,
}

/// The outcome of one [`Writer::apply`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Frontends written (new or changed).
    pub changed: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Frontends that could not be programmed (they keep their old state).
    pub failed: Vec<Problem>,
    /// UDP frontends that stopped using a backend as serving: their flows
    /// to any backend outside `keep` are to be deleted (see `sweep.rs`).
    pub stale_udp: Vec<Keep>,
    /// sessionAffinity frontends that stopped listing a backend as active:
    /// their affinity entries to any backend outside `keep` are to go.
    pub stale_affinity: Vec<Keep>,
}

/// What one frontend's change makes stale.
#[derive(Default)]
struct Stale {
    udp: Option<Keep>,
    affinity: Option<Keep>,
}

impl Stale {
    /// What entries made under `old` may point to that `new` (frontend
    /// `f`, whose serving backends are `serving`) no longer allows.
    fn between(old: &Applied, new: &Applied, f: &Frontend, serving: &[u32]) -> Self {
        let id = new.spec.id;
        let mut stale = Self::default();
        // kube-proxy leaves a Service without serving endpoints alone.
        if f.key.protocol == Protocol::Udp && !serving.is_empty() && old.backends.iter().any(|b| !serving.contains(b)) {
            stale.udp = Some(Keep { frontend: id, keep: serving.to_vec() });
        }
        let active = &new.spec.backends;
        if f.affinity_timeout_s.is_some() && old.spec.backends.iter().any(|b| !active.contains(b)) {
            stale.affinity = Some(Keep { frontend: id, keep: active.clone() });
        }
        stale
    }

    fn report(self, report: &mut Report) {
        report.stale_udp.extend(self.udp);
        report.stale_affinity.extend(self.affinity);
    }
}

/// A frontend id and the backend ids its entries may still point to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Keep {
    pub frontend: u32,
    pub keep: Vec<u32>,
}

/// How many of the last desired frontends name a backend, and how many of
/// them as eligible for new flows.
#[derive(Clone, Copy, Debug, Default)]
struct Refs {
    total: u32,
    active: u32,
    local: bool,
}

/// The map writer; see the module documentation.
pub struct Writer {
    frontend_ids: Ids,
    backend_ids: Ids,
    /// What the maps hold, per frontend.
    frontends: FastMap<ServiceKey, Applied>,
    backends: HashMap<BackendKey, (u32, Backend)>,
    by_id: HashMap<u32, BackendKey>,
    /// The last desired version of each frontend, and whether the maps hold
    /// it. A frontend whose `Arc` is the same as last time and was applied
    /// is skipped without a look: that makes a sync O(changes).
    last: FastMap<ServiceKey, (Arc<Frontend>, bool)>,
    /// Over `last`: the frontends naming each backend.
    refs: HashMap<BackendKey, Refs>,
    /// Over `frontends`: how many name each backend id.
    applied_refs: HashMap<u32, u32>,
    /// After [`Writer::recover`]: look at every backend once for removal.
    full_check: bool,
    /// The frontends of the last apply, when all of them were applied.
    prev: Vec<Arc<Frontend>>,
    prev_ok: bool,
}

impl Writer {
    /// A writer for freshly created maps.
    pub fn new(dp: &Datapath) -> Self {
        let s = dp.sizes();
        Self {
            frontend_ids: Ids::new(1, s.services),
            backend_ids: Ids::new(1, s.backends),
            frontends: FastMap::default(),
            backends: HashMap::new(),
            by_id: HashMap::new(),
            last: FastMap::default(),
            refs: HashMap::new(),
            applied_refs: HashMap::new(),
            full_check: false,
            prev: Vec::new(),
            prev_ok: false,
        }
    }

    /// A writer that continues from the state in the (pinned) maps, so the
    /// first [`Writer::apply`] after an agent restart changes only what the
    /// source changed meanwhile. Call after [`Datapath::recover`].
    pub fn recover(dp: &Datapath) -> Self {
        let mut w = Self::new(dp);
        for (id, b) in dp.backends() {
            w.backend_ids.take(id);
            w.backends.insert((b.addr, b.port), (id, b));
            w.by_id.insert(id, (b.addr, b.port));
        }
        for (key, svc) in dp.services() {
            w.frontend_ids.take(svc.id);
            let slots = dp.region_slots(&svc).unwrap_or_default();
            let region = Parts::of(&svc, &slots);
            let maglev = matches!(svc.scheduler, SCHED_MAGLEV | SCHED_SOURCE_HASH);
            let mut refs: BTreeSet<u32> = region.list.iter().copied().collect();
            if maglev {
                refs.extend(region.table.iter().copied().filter(|id| *id != 0));
            }
            let spec = ServiceSpec {
                id: svc.id,
                scheduler: svc.scheduler,
                flags: svc.flags,
                affinity_timeout_s: svc.affinity_timeout_s,
                backends: region.list.to_vec(),
                weights: region.weights.iter().map(|w| *w as u16).collect(),
                maglev_size: (maglev && svc.table_len > 0).then_some(svc.table_len),
            };
            let applied = Applied {
                spec,
                backends: refs.into_iter().collect(),
                ranges: dp.source_ranges(svc.id).into_iter().collect(),
                info: dp.frontend(svc.id).unwrap_or_default(),
            };
            w.swap_applied(key, Some(applied), &mut Vec::new());
        }
        w.full_check = true;
        w
    }

    /// Frontends currently programmed.
    pub fn len(&self) -> usize {
        self.frontends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }

    /// Makes the maps match `desired`.
    pub fn apply(&mut self, dp: &mut Datapath, desired: &Desired) -> Report {
        let mut report = Report::default();

        // 0. What changed: frontends not applied as this very `Arc`, and
        //    keys no longer desired (looked for only when the counts say so).
        //    When the last apply succeeded and the list has the same shape
        //    (same length, same key at each position), a pointer comparison
        //    per position finds the changes, with no hashing at all.
        let mut changed: Vec<(ServiceKey, &Arc<Frontend>)> = Vec::new();
        let mut positional = self.prev_ok && self.prev.len() == desired.frontends.len();
        if positional {
            for (old, f) in self.prev.iter().zip(&desired.frontends) {
                if Arc::ptr_eq(old, f) {
                    continue;
                }
                if old.key != f.key {
                    positional = false;
                    changed.clear();
                    break;
                }
                changed.push((service_key(f), f));
            }
        }
        let (stale_applied, stale_last) = if positional {
            report.unchanged = desired.frontends.len() - changed.len();
            (Vec::new(), Vec::new())
        } else {
            let (mut in_applied, mut in_last) = (0, 0);
            for f in &desired.frontends {
                let key = service_key(f);
                in_applied += self.frontends.contains_key(&key) as usize;
                match self.last.get(&key) {
                    Some((old, true)) if Arc::ptr_eq(old, f) => {
                        in_last += 1;
                        report.unchanged += 1;
                    }
                    Some(_) => {
                        in_last += 1;
                        changed.push((key, f));
                    }
                    None => changed.push((key, f)),
                }
            }
            if in_applied == self.frontends.len() && in_last == self.last.len() {
                (Vec::new(), Vec::new())
            } else {
                let wanted: HashSet<ServiceKey> = desired.frontends.iter().map(|f| service_key(f)).collect();
                (
                    self.frontends.keys().filter(|k| !wanted.contains(*k)).copied().collect::<Vec<_>>(),
                    self.last.keys().filter(|k| !wanted.contains(*k)).copied().collect::<Vec<_>>(),
                )
            }
        };
        let mut touched: HashSet<BackendKey> = HashSet::new();
        for (key, f) in &changed {
            if let Some((old, _)) = self.last.insert(*key, (Arc::clone(f), false)) {
                self.count_refs(&old, false, &mut touched);
            }
            self.count_refs(f, true, &mut touched);
        }
        for key in &stale_last {
            if let Some((old, _)) = self.last.remove(key) {
                self.count_refs(&old, false, &mut touched);
            }
        }

        // 1. Backends: an endpoint is active if any frontend may pick it.
        let mut unavailable: HashMap<BackendKey, String> = HashMap::new();
        let mut keys: Vec<&BackendKey> = touched.iter().filter(|k| self.refs.contains_key(*k)).collect();
        keys.sort();
        for key in keys {
            let r = self.refs[key];
            let value = Backend {
                addr: key.0,
                port: key.1,
                state: if r.active > 0 { BACKEND_ACTIVE } else { BACKEND_TERMINATING },
                flags: if r.local { BACKEND_F_NODE_LOCAL } else { 0 },
            };
            let id = match self.backends.get(key) {
                Some((_, old)) if *old == value => continue,
                Some((id, _)) => *id,
                None => match self.backend_ids.alloc() {
                    Some(id) => id,
                    None => {
                        unavailable
                            .insert(*key, format!("no free backend id (--max-backends {})", dp.sizes().backends));
                        continue;
                    }
                },
            };
            match dp.set_backend(id, &value) {
                Ok(()) => {
                    self.backends.insert(*key, (id, value));
                    self.by_id.insert(id, *key);
                    report.backends_written += 1;
                }
                Err(e) => {
                    if !self.backends.contains_key(key) {
                        self.backend_ids.free(id);
                    }
                    unavailable.insert(*key, e.to_string());
                }
            }
        }

        // 2. Frontends, new or changed.
        let port_serving = self.port_serving(desired, &changed);
        let mut released = Vec::new();
        for (key, f) in &changed {
            let serving = port_serving.get(&(f.name.as_str(), f.key.address.is_ipv4())).map_or(&[][..], Vec::as_slice);
            match self.apply_frontend(dp, *key, f, &unavailable, &mut released, &mut report, serving) {
                Ok(written) => {
                    if written {
                        report.changed += 1;
                    } else {
                        report.unchanged += 1;
                    }
                    if let Some(l) = self.last.get_mut(key) {
                        l.1 = true;
                    }
                }
                Err(message) => {
                    let service = f.name.rsplit_once(':').map(|(s, _)| s.to_string()).unwrap_or_default();
                    report
                        .failed
                        .push(Problem { service, message: format!("{} {}: {message}", f.kind.name(), f.name) });
                }
            }
        }

        // 3. Frontends no longer wanted.
        for key in stale_applied {
            let a = &self.frontends[&key];
            let (id, ranges) = (a.spec.id, a.ranges.clone());
            let name = String::from_utf8_lossy(&a.info.name[..a.info.name_len as usize]).into_owned();
            let res = dp.remove_service(&key).and_then(|()| {
                for (addr, p) in &ranges {
                    dp.remove_source_range(id, *addr, *p)?;
                }
                dp.remove_frontend_info(id)
            });
            match res {
                Ok(()) => {
                    self.swap_applied(key, None, &mut released);
                    self.frontend_ids.free(id);
                    report.removed += 1;
                }
                Err(e) => report.failed.push(Problem { service: name, message: format!("removing: {e}") }),
            }
        }

        // 4. Backends no desired frontend names and no programmed one uses.
        let candidates: Vec<BackendKey> = if std::mem::take(&mut self.full_check) {
            self.backends.keys().copied().collect()
        } else {
            touched.into_iter().chain(released.iter().filter_map(|id| self.by_id.get(id).copied())).collect()
        };
        for key in candidates {
            let Some(&(id, _)) = self.backends.get(&key) else { continue };
            if self.refs.contains_key(&key) || self.applied_refs.get(&id).is_some_and(|n| *n > 0) {
                continue;
            }
            if dp.remove_backend(id).is_ok() {
                self.backends.remove(&key);
                self.by_id.remove(&id);
                self.backend_ids.free(id);
                report.backends_removed += 1;
            }
        }
        self.prev_ok = report.failed.is_empty();
        self.prev = if self.prev_ok { desired.frontends.clone() } else { Vec::new() };
        report
    }

    /// Adds (`add`) or takes away the backends of desired frontend `f`.
    fn count_refs(&mut self, f: &Frontend, add: bool, touched: &mut HashSet<BackendKey>) {
        for b in &f.backends {
            let key = (map_addr(b.address), b.port.to_be());
            touched.insert(key);
            let r = self.refs.entry(key).or_default();
            let active = (b.state == BackendState::Active) as u32;
            if add {
                r.total += 1;
                r.active += active;
                r.local = b.node_local;
            } else {
                r.total -= 1;
                r.active -= active;
                if r.total == 0 {
                    self.refs.remove(&key);
                }
            }
        }
    }

    /// Records what the maps now hold for `key` (`None`: nothing), keeping
    /// the per-id counts; ids no longer used by any frontend go to `released`.
    fn swap_applied(&mut self, key: ServiceKey, new: Option<Applied>, released: &mut Vec<u32>) {
        if let Some(a) = &new {
            for id in &a.backends {
                *self.applied_refs.entry(*id).or_default() += 1;
            }
        }
        let old = match new {
            Some(a) => self.frontends.insert(key, a),
            None => self.frontends.remove(&key),
        };
        for id in old.iter().flat_map(|a| a.backends.iter()) {
            if let Some(n) = self.applied_refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.applied_refs.remove(id);
                    released.push(*id);
                }
            }
        }
    }

    /// For each changed UDP frontend's service port and family: the ids of
    /// its serving endpoints over all its frontends (a Local frontend lists
    /// only this node's, but a policy change must move no flow, as in
    /// kube-proxy's cleanup.go).
    fn port_serving<'d>(
        &self,
        desired: &'d Desired,
        changed: &[(ServiceKey, &Arc<Frontend>)],
    ) -> HashMap<(&'d str, bool), Vec<u32>> {
        let udp: HashSet<&str> =
            changed.iter().filter(|(_, f)| f.key.protocol == Protocol::Udp).map(|(_, f)| f.name.as_str()).collect();
        let mut out: HashMap<(&str, bool), Vec<u32>> = HashMap::new();
        if udp.is_empty() {
            return out;
        }
        for f in desired.frontends.iter().filter(|f| f.key.protocol == Protocol::Udp && udp.contains(f.name.as_str())) {
            let ids = out.entry((f.name.as_str(), f.key.address.is_ipv4())).or_default();
            for b in f.backends.iter().filter(|b| b.serving) {
                if let Some((id, _)) = self.backends.get(&(map_addr(b.address), b.port.to_be()))
                    && !ids.contains(id)
                {
                    ids.push(*id);
                }
            }
        }
        out
    }

    /// Programs one frontend; `Ok(false)` when it was already up to date.
    /// `serving`: the serving endpoints of its service port (for the sweep).
    #[allow(clippy::too_many_arguments)]
    fn apply_frontend(
        &mut self,
        dp: &mut Datapath,
        key: ServiceKey,
        f: &Frontend,
        unavailable: &HashMap<BackendKey, String>,
        released: &mut Vec<u32>,
        report: &mut Report,
        serving: &[u32],
    ) -> Result<bool, String> {
        let mut active = Vec::new();
        let mut weights = Vec::new();
        let mut all = Vec::new();
        for b in &f.backends {
            let bk = (map_addr(b.address), b.port.to_be());
            if let Some(why) = unavailable.get(&bk) {
                return Err(format!("backend {}:{}: {why}", b.address, b.port));
            }
            let (id, _) = self.backends[&bk];
            all.push(id);
            if b.eligible() {
                active.push(id);
                weights.push(b.weight);
            }
        }
        let existing = self.frontends.get(&key);
        let id = match existing {
            Some(a) => a.spec.id,
            None => self
                .frontend_ids
                .alloc()
                .ok_or_else(|| format!("no free frontend id (--max-services {})", dp.sizes().services))?,
        };
        let mut flags = 0;
        if f.affinity_timeout_s.is_some() {
            flags |= SVC_F_AFFINITY;
        }
        if f.local_only && f.key.scope == Scope::External {
            flags |= SVC_F_EXT_LOCAL;
        }
        if f.kind == Kind::NodePort {
            flags |= SVC_F_NODEPORT;
        }
        if !f.source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
        }
        if f.no_local_endpoints {
            flags |= SVC_F_NO_LOCAL_DROP;
        }
        let spec = ServiceSpec {
            id,
            scheduler: f.scheduler.number(),
            flags,
            affinity_timeout_s: f.affinity_timeout_s.unwrap_or(0),
            backends: active,
            weights: if f.scheduler.weighted() { sequence::reduce(&weights) } else { Vec::new() },
            maglev_size: (f.maglev_size > 0).then_some(f.maglev_size),
        };
        let ranges: BTreeSet<(IpAddr, u8)> = f.source_ranges.iter().map(|n| (n.addr(), n.prefix_len())).collect();
        let applied = Applied { spec, backends: all, ranges, info: info(key, f) };
        // A backend's serving condition is not part of the programmed
        // state: an unchanged frontend may still make some entries stale.
        let stale = existing.map(|old| Stale::between(old, &applied, f, serving)).unwrap_or_default();
        if existing == Some(&applied) {
            stale.report(report);
            return Ok(false);
        }
        let fresh = existing.is_none();
        let old_ranges = existing.map(|a| a.ranges.clone()).unwrap_or_default();
        let result = (|| {
            // Allowed sources before the flag that enforces them.
            for (a, p) in applied.ranges.difference(&old_ranges) {
                dp.add_source_range(id, *a, *p)?;
            }
            dp.set_service(key, &applied.spec)?;
            for (a, p) in old_ranges.difference(&applied.ranges) {
                dp.remove_source_range(id, *a, *p)?;
            }
            dp.set_frontend_info(id, &applied.info)
        })();
        match result {
            Ok(()) => {
                stale.report(report);
                self.swap_applied(key, Some(applied), released);
                Ok(true)
            }
            Err(e) => {
                if fresh {
                    self.frontend_ids.free(id);
                }
                Err(e.to_string())
            }
        }
    }
}
