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
//! A frontend that fails (a full map, an id space exhausted) is reported with
//! its `namespace/name:port` and keeps what it had; the others go on.
//!
//! Ids are handed out round-robin over their space and a freed id is reused
//! as late as possible, so a conntrack entry still naming a deleted backend
//! (or a reply entry naming a deleted frontend) does not land on a newcomer.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use datapath_common::{
    BACKEND_ACTIVE, BACKEND_F_NODE_LOCAL, BACKEND_TERMINATING, Backend, FrontendInfo, SVC_F_AFFINITY, SVC_F_EXT_LOCAL,
    SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, ServiceKey,
};
use serde::Serialize;

use crate::{
    Datapath, ServiceSpec,
    datapath::map_addr,
    translate::{BackendState, Desired, Frontend, Kind, Problem, Scope},
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
}

/// The map writer; see the module documentation.
pub struct Writer {
    frontend_ids: Ids,
    backend_ids: Ids,
    frontends: HashMap<ServiceKey, Applied>,
    backends: HashMap<BackendKey, (u32, Backend)>,
}

impl Writer {
    /// A writer for freshly created maps.
    pub fn new(dp: &Datapath) -> Self {
        let s = dp.sizes();
        Self {
            frontend_ids: Ids::new(1, s.services),
            backend_ids: Ids::new(1, s.backends),
            frontends: HashMap::new(),
            backends: HashMap::new(),
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
        }
        for (key, svc) in dp.services() {
            w.frontend_ids.take(svc.id);
            let slots = dp.region_slots(&svc).unwrap_or_default();
            let list: Vec<u32> = slots.iter().take(svc.count as usize).copied().collect();
            let mut refs: BTreeSet<u32> = slots.iter().copied().filter(|id| *id != 0).collect();
            refs.extend(list.iter().copied());
            let spec = ServiceSpec {
                id: svc.id,
                scheduler: svc.scheduler,
                flags: svc.flags,
                affinity_timeout_s: svc.affinity_timeout_s,
                backends: list,
                maglev_size: (svc.maglev_len > 0).then_some(svc.maglev_len),
            };
            let applied = Applied {
                spec,
                backends: refs.into_iter().collect(),
                ranges: dp.source_ranges(svc.id).into_iter().collect(),
                info: dp.frontend(svc.id).unwrap_or_default(),
            };
            w.frontends.insert(key, applied);
        }
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

        // 1. Backends: an endpoint is active if any frontend may pick it.
        let mut want: HashMap<BackendKey, Backend> = HashMap::new();
        for f in &desired.frontends {
            for b in &f.backends {
                let key = (map_addr(b.address), b.port.to_be());
                let e = want.entry(key).or_insert(Backend {
                    addr: key.0,
                    port: key.1,
                    state: BACKEND_TERMINATING,
                    flags: if b.node_local { BACKEND_F_NODE_LOCAL } else { 0 },
                });
                if b.state == BackendState::Active {
                    e.state = BACKEND_ACTIVE;
                }
            }
        }
        let mut unavailable: HashMap<BackendKey, String> = HashMap::new();
        let mut keys: Vec<&BackendKey> = want.keys().collect();
        keys.sort();
        for key in keys {
            let value = want[key];
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
        let mut seen = HashSet::new();
        for f in &desired.frontends {
            let key = service_key(f);
            seen.insert(key);
            match self.apply_frontend(dp, key, f, &unavailable) {
                Ok(true) => report.changed += 1,
                Ok(false) => report.unchanged += 1,
                Err(message) => {
                    let service = f.name.rsplit_once(':').map(|(s, _)| s.to_string()).unwrap_or_default();
                    report
                        .failed
                        .push(Problem { service, message: format!("{} {}: {message}", f.kind.name(), f.name) });
                }
            }
        }

        // 3. Frontends no longer wanted.
        let stale: Vec<ServiceKey> = self.frontends.keys().filter(|k| !seen.contains(*k)).copied().collect();
        for key in stale {
            let a = &self.frontends[&key];
            let id = a.spec.id;
            let ranges = a.ranges.clone();
            let res = dp.remove_service(&key).and_then(|()| {
                for (addr, p) in &ranges {
                    dp.remove_source_range(id, *addr, *p)?;
                }
                dp.remove_frontend_info(id)
            });
            match res {
                Ok(()) => {
                    self.frontends.remove(&key);
                    self.frontend_ids.free(id);
                    report.removed += 1;
                }
                Err(e) => report.failed.push(Problem {
                    service: String::from_utf8_lossy(&a.info.name[..a.info.name_len as usize]).into_owned(),
                    message: format!("removing: {e}"),
                }),
            }
        }

        // 4. Backends nothing references.
        let referenced: HashSet<u32> = self.frontends.values().flat_map(|a| a.backends.iter().copied()).collect();
        let unused: Vec<(BackendKey, u32)> = self
            .backends
            .iter()
            .filter(|(_, (id, _))| !referenced.contains(id))
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        for (key, id) in unused {
            if dp.remove_backend(id).is_ok() {
                self.backends.remove(&key);
                self.backend_ids.free(id);
                report.backends_removed += 1;
            }
        }
        report
    }

    /// Programs one frontend; `Ok(false)` when it was already up to date.
    fn apply_frontend(
        &mut self,
        dp: &mut Datapath,
        key: ServiceKey,
        f: &Frontend,
        unavailable: &HashMap<BackendKey, String>,
    ) -> Result<bool, String> {
        let mut active = Vec::new();
        let mut all = Vec::new();
        for b in &f.backends {
            let bk = (map_addr(b.address), b.port.to_be());
            if let Some(why) = unavailable.get(&bk) {
                return Err(format!("backend {}:{}: {why}", b.address, b.port));
            }
            let (id, _) = self.backends[&bk];
            all.push(id);
            if b.state == BackendState::Active {
                active.push(id);
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
        let spec = ServiceSpec {
            id,
            scheduler: f.scheduler.number(),
            flags,
            affinity_timeout_s: f.affinity_timeout_s.unwrap_or(0),
            backends: active,
            maglev_size: (f.maglev_size > 0).then_some(f.maglev_size),
        };
        let ranges: BTreeSet<(IpAddr, u8)> = f.source_ranges.iter().map(|n| (n.addr(), n.prefix_len())).collect();
        let applied = Applied { spec, backends: all, ranges, info: info(key, f) };
        if existing == Some(&applied) {
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
                self.frontends.insert(key, applied);
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
