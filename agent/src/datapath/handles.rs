// SPDX-License-Identifier: MIT OR Apache-2.0
//! Typed handles on every map of the datapath ([`Maps`]), from a loaded
//! object or from the pins, and the pinned maps' layouts: what `xlb dump`,
//! the metrics and `Datapath` itself read through.

use std::{net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues},
};
use datapath_common::{
    AffinityKey, AffinityValue, Backend, Config, Counter, CtEntry, CtKey, FrontendInfo, RevNat, Service, ServiceKey,
    SockRevKey, SockRevValue, SourceRangeKey, maps, verdict,
};

use super::{Error, Result, map_err, take};
use crate::ct_table::Conntrack;

/// Typed handles on every map of the datapath, from a loaded object or
/// from the pins (the read-only side `xlb dump` uses).
pub struct Maps {
    pub(super) services: BpfHashMap<MapData, ServiceKey, Service>,
    pub(super) backends: Array<MapData, Backend>,
    pub(super) slots: Array<MapData, u32>,
    pub(super) rev_nat: Array<MapData, RevNat>,
    pub(super) conntrack: Conntrack,
    pub(super) affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    pub(super) source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub(super) service_stats: PerCpuArray<MapData, Counter>,
    pub(super) backend_stats: PerCpuArray<MapData, Counter>,
    pub(super) verdicts: PerCpuArray<MapData, u64>,
    pub(super) config: Array<MapData, Config>,
    pub(super) frontends: BpfHashMap<MapData, u32, FrontendInfo>,
    /// Absent in a pin directory of an agent older than socket-LB.
    pub(super) sock_rev: Option<BpfHashMap<MapData, SockRevKey, SockRevValue>>,
}

/// Key and value sizes of each pinned map, checked before a pin is reused.
pub(super) const LAYOUT: [(&str, usize, usize); 21] = {
    use datapath_common::ct_table::{CtBucket, CtRecord4, CtRecord6};
    use std::mem::size_of;
    [
        (maps::SERVICES, size_of::<ServiceKey>(), size_of::<Service>()),
        (maps::BACKENDS, 4, size_of::<Backend>()),
        (maps::SLOTS, 4, 4),
        (maps::REV_NAT, 4, size_of::<RevNat>()),
        (maps::CONNTRACK, size_of::<CtKey>(), size_of::<CtEntry>()),
        (maps::CT4_INDEX, 4, size_of::<CtBucket>()),
        (maps::CT4_RECORDS, 4, size_of::<CtRecord4>()),
        (maps::CT6_INDEX, 4, size_of::<CtBucket>()),
        (maps::CT6_RECORDS, 4, size_of::<CtRecord6>()),
        (maps::BACKEND_CONNS, 4, 8),
        (maps::CT_EVENTS, 4, 8),
        (maps::AFFINITY, size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        (maps::SOURCE_RANGES, 4 + size_of::<SourceRangeKey>(), 1),
        (maps::RR_CURSOR, 4, 4),
        (maps::SERVICE_STATS, 4, size_of::<Counter>()),
        (maps::BACKEND_STATS, 4, size_of::<Counter>()),
        (maps::VERDICTS, 4, 8),
        (maps::CONFIG, 4, size_of::<Config>()),
        (maps::FRONTENDS, 4, size_of::<FrontendInfo>()),
        (maps::SOCK_REV, size_of::<SockRevKey>(), size_of::<SockRevValue>()),
        (maps::SOCK_CONNS, 8, 4),
    ]
};

pub(super) fn open_pin(dir: &Path, name: &'static str) -> Result<MapData> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::Pin { path: path.clone(), source })?;
    let info = data.info().map_err(map_err(name))?;
    let (_, k, v) = LAYOUT.iter().find(|(n, ..)| *n == name).copied().ok_or(Error::MissingMap(name))?;
    if (info.key_size(), info.value_size()) != (k as u32, v as u32) {
        return Err(Error::Incompatible {
            path,
            found: (info.key_size(), info.value_size()),
            expected: (k as u32, v as u32),
        });
    }
    Ok(data)
}

/// True for a pinned map that a new datapath may replace when its layout
/// changed: CONFIG (the agent writes it whole at start) and VERDICTS
/// (counters; a newer datapath may count more reasons). Flow and service
/// state is never replaced.
pub(super) fn replaceable(dir: &Path, name: &'static str) -> bool {
    let stale = |data: MapData| {
        let Ok(info) = data.info() else { return false };
        let (_, k, v) = LAYOUT.iter().find(|(n, ..)| *n == name).copied().unwrap_or_default();
        (info.key_size(), info.value_size()) != (k as u32, v as u32)
            || (name == maps::VERDICTS && info.max_entries() < verdict::COUNT)
    };
    matches!(name, maps::CONFIG | maps::VERDICTS) && MapData::from_pin(dir.join(name)).map(stale).unwrap_or(false)
}

pub(super) fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(data: MapData, name: &'static str) -> Result<T> {
    T::try_from(aya::maps::Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

impl Maps {
    pub fn service(&self, key: &ServiceKey) -> Option<Service> {
        self.services.get(key, 0).ok()
    }

    /// The SLOTS entries of `svc`'s region (list, weights when they differ,
    /// table; split by `select::Parts`).
    pub fn region_slots(&self, svc: &Service) -> Result<Vec<u32>> {
        let start = svc.list_off.min(svc.table_off);
        (start..svc.table_off + svc.table_len).map(|i| self.slots.get(&i, 0).map_err(map_err(maps::SLOTS))).collect()
    }

    /// Every live flow as its two entries, forward then reply
    /// (`ct_table::entries`).
    pub fn conntrack(&self) -> Vec<(CtKey, CtEntry)> {
        self.conntrack.entries()
    }

    /// The entry (direction) of the live flow with tuple `key`.
    pub fn conntrack_get(&self, key: &CtKey) -> Option<CtEntry> {
        self.conntrack.get(key)
    }

    /// The conntrack table itself (both families, counts, events).
    pub fn conntrack_table(&self) -> &Conntrack {
        &self.conntrack
    }

    pub fn affinity_get(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.affinity.get(key, 0).ok()
    }

    /// Packets per verdict reason, summed over CPUs, in `verdict::NAMES` order.
    pub fn verdicts(&self) -> Result<Vec<u64>> {
        (0..verdict::COUNT)
            .map(|i| {
                let v: PerCpuValues<u64> = self.verdicts.get(&i, 0).map_err(map_err(maps::VERDICTS))?;
                Ok(v.iter().sum())
            })
            .collect()
    }

    fn sum(map: &PerCpuArray<MapData, Counter>, name: &'static str, i: u32) -> Result<Counter> {
        let v = map.get(&i, 0).map_err(map_err(name))?;
        Ok(v.iter()
            .fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes }))
    }

    pub fn service_stats(&self, id: u32) -> Result<Counter> {
        Self::sum(&self.service_stats, maps::SERVICE_STATS, id)
    }

    pub fn backend_stats(&self, id: u32) -> Result<Counter> {
        Self::sum(&self.backend_stats, maps::BACKEND_STATS, id)
    }

    /// Number of conntrack entries: two per flow (its forward and reply
    /// tuples), as the LRU table counted them.
    pub fn conntrack_len(&self) -> usize {
        2 * self.conntrack.flows()
    }

    /// Every SERVICES entry.
    pub fn services(&self) -> Vec<(ServiceKey, Service)> {
        self.services.iter().filter_map(|r| r.ok()).collect()
    }

    /// Every used BACKENDS entry (state not `BACKEND_EMPTY`), by id.
    pub fn backends(&self) -> Vec<(u32, Backend)> {
        (1..self.backends.len())
            .filter_map(|i| self.backends.get(&i, 0).ok().map(|b| (i, b)))
            .filter(|(_, b)| b.state != datapath_common::BACKEND_EMPTY)
            .collect()
    }

    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id, 0).ok().filter(|b| b.state != datapath_common::BACKEND_EMPTY)
    }

    /// Socket-LB's reverse translations (SOCK_REV).
    pub fn sock_rev(&self) -> Vec<(SockRevKey, SockRevValue)> {
        self.sock_rev.as_ref().map(|m| m.iter().filter_map(|r| r.ok()).collect()).unwrap_or_default()
    }

    /// Every FRONTENDS entry, by frontend id.
    pub fn frontends(&self) -> Vec<(u32, FrontendInfo)> {
        self.frontends.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn frontend(&self, id: u32) -> Option<FrontendInfo> {
        self.frontends.get(&id, 0).ok()
    }

    pub fn affinity(&self) -> Vec<(AffinityKey, AffinityValue)> {
        self.affinity.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn config(&self) -> Result<Config> {
        self.config.get(&0, 0).map_err(map_err(maps::CONFIG))
    }

    /// The allowed source prefixes of frontend `id` (loadBalancerSourceRanges).
    pub fn source_ranges(&self, id: u32) -> Vec<(IpAddr, u8)> {
        self.source_ranges
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| u32::from_be(k.data().service_id_be) == id)
            .map(|k| {
                let a = k.data().addr;
                let bits = k.prefix_len() - 32;
                if datapath_common::is_v4_mapped(&a) {
                    (IpAddr::from([a[12], a[13], a[14], a[15]]), (bits - 96) as u8)
                } else {
                    (IpAddr::from(a), bits as u8)
                }
            })
            .collect()
    }

    /// The kernel's description (type, sizes, id) of every map, by name.
    pub fn infos(&self) -> Vec<(&'static str, aya::maps::MapInfo)> {
        use aya::maps::IterableMap as _;
        let mut out = Vec::new();
        let mut add = |name, d: &MapData| {
            if let Ok(i) = d.info() {
                out.push((name, i));
            }
        };
        add(maps::SERVICES, self.services.map());
        add(maps::BACKENDS, self.backends.map());
        add(maps::SLOTS, self.slots.map());
        add(maps::REV_NAT, self.rev_nat.map());
        add(maps::AFFINITY, self.affinity.map());
        add(maps::SOURCE_RANGES, self.source_ranges.map());
        add(maps::SERVICE_STATS, self.service_stats.map());
        add(maps::BACKEND_STATS, self.backend_stats.map());
        add(maps::VERDICTS, self.verdicts.map());
        add(maps::CONFIG, self.config.map());
        add(maps::FRONTENDS, self.frontends.map());
        if let Some(m) = &self.sock_rev {
            add(maps::SOCK_REV, m.map());
        }
        out.extend(self.conntrack.infos());
        out
    }

    pub(super) fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            slots: take(ebpf, maps::SLOTS)?,
            rev_nat: take(ebpf, maps::REV_NAT)?,
            conntrack: Conntrack::open(|name| match ebpf.take_map(name) {
                Some(aya::maps::Map::Array(d) | aya::maps::Map::PerCpuArray(d)) => Ok(d),
                _ => Err(Error::MissingMap(name)),
            })?,
            affinity: take(ebpf, maps::AFFINITY)?,
            source_ranges: take(ebpf, maps::SOURCE_RANGES)?,
            service_stats: take(ebpf, maps::SERVICE_STATS)?,
            backend_stats: take(ebpf, maps::BACKEND_STATS)?,
            verdicts: take(ebpf, maps::VERDICTS)?,
            config: take(ebpf, maps::CONFIG)?,
            frontends: take(ebpf, maps::FRONTENDS)?,
            sock_rev: Some(take(ebpf, maps::SOCK_REV)?),
        })
    }

    /// Opens the maps pinned under `dir` (by a running or exited agent)
    /// without loading any program.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        let o = |name| open_pin(dir, name);
        Ok(Self {
            services: typed(o(maps::SERVICES)?, maps::SERVICES)?,
            backends: typed(o(maps::BACKENDS)?, maps::BACKENDS)?,
            slots: typed(o(maps::SLOTS)?, maps::SLOTS)?,
            rev_nat: typed(o(maps::REV_NAT)?, maps::REV_NAT)?,
            conntrack: Conntrack::open(o)?,
            affinity: typed(o(maps::AFFINITY)?, maps::AFFINITY)?,
            source_ranges: typed(o(maps::SOURCE_RANGES)?, maps::SOURCE_RANGES)?,
            service_stats: typed(o(maps::SERVICE_STATS)?, maps::SERVICE_STATS)?,
            backend_stats: typed(o(maps::BACKEND_STATS)?, maps::BACKEND_STATS)?,
            verdicts: typed(o(maps::VERDICTS)?, maps::VERDICTS)?,
            config: typed(o(maps::CONFIG)?, maps::CONFIG)?,
            frontends: typed(o(maps::FRONTENDS)?, maps::FRONTENDS)?,
            sock_rev: o(maps::SOCK_REV).ok().map(|d| typed(d, maps::SOCK_REV)).transpose()?,
        })
    }
}
