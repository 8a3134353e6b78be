// SPDX-License-Identifier: MIT OR Apache-2.0
//! The conntrack table of issue #13 as the agent sees it: the index, the
//! records and the per-backend counts memory-mapped (`BPF_F_MMAPABLE`
//! arrays), driven by the very operations the datapath runs
//! (`datapath_common::ct_ops`): reading the live records (`xlb dump`, the
//! metrics), sweeping expired or stale ones, with the same atomics on the
//! same words as the kernel's CPUs. No syscall per flow.

use std::{
    marker::PhantomData,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::maps::{MapData, MapError, PerCpuArray};
use datapath_common::{
    CT_F_REPLY, CT_F_SNAT, CtEntry, CtKey,
    ct_ops::{self, NewFlow, Table, outcome},
    ct_table::{
        self, Addr6, CtAddr, CtBucket, CtRecord, M_FIN_FWD, M_FIN_REP, TICK_SHIFT, Tuple, WAYS, event, expired, ticks,
        ticks_of, w_flags, w_marks, w_proto, w_seq, w_state, word,
    },
    is_v4_mapped, maps,
};

use crate::{
    datapath::{Error, Result},
    mapped::Mapped,
};

/// One family's table, mapped.
pub struct MappedTable<A> {
    nb: u32,
    index: Mapped,
    records: Mapped,
    conns: Mapped,
    backends: u32,
    _addr: PhantomData<A>,
}

impl<A: CtAddr> MappedTable<A> {
    /// Maps a table of `nb` forward buckets (the index has `3 × nb`
    /// buckets, the records `WAYS × nb`) and `backends` counts. `None` when
    /// a map is not mappable.
    pub fn map(
        nb: u32,
        index: BorrowedFd<'_>,
        records: BorrowedFd<'_>,
        conns: BorrowedFd<'_>,
        backends: u32,
    ) -> Option<Self> {
        Some(Self {
            nb,
            index: Mapped::map(index, 3 * nb as usize * size_of::<CtBucket>())?,
            records: Mapped::map(records, WAYS * nb as usize * size_of::<CtRecord<A>>())?,
            conns: Mapped::map(conns, backends as usize * 8)?,
            backends,
            _addr: PhantomData,
        })
    }

    /// Every live record, each read consistently (id, copy).
    pub fn records(&self) -> Vec<(u32, CtRecord<A>)> {
        let mut all = Vec::new();
        ct_ops::records(self, |id, r| all.push((id, *r)));
        all
    }

    /// Unlinks every live record `doom` picks; how many went.
    pub fn sweep(&self, doom: impl FnMut(&CtRecord<A>, u64) -> bool) -> u32 {
        ct_ops::sweep(self, doom)
    }

    /// Active connections of backend `id` (a decrement that overtook its
    /// increment reads as 0, not as 2^64 − 1).
    pub fn connections(&self, id: u32) -> u64 {
        let n = if id < self.backends { self.conns.load::<u64>(id as usize * 8).unwrap_or(0) } else { 0 };
        if n > i64::MAX as u64 { 0 } else { n }
    }
}

impl<A: CtAddr> Table<A> for MappedTable<A> {
    fn nb(&self) -> u32 {
        self.nb
    }
    fn bucket(&self, i: u32) -> Option<*mut CtBucket> {
        self.index.ptr_at(i as usize * size_of::<CtBucket>())
    }
    fn record(&self, i: u32) -> Option<*mut CtRecord<A>> {
        self.records.ptr_at(i as usize * size_of::<CtRecord<A>>())
    }
    fn conns(&self, backend: u32) -> Option<*mut u64> {
        self.conns.ptr_at(backend as usize * 8)
    }
    /// The agent's own evictions are not datapath events.
    fn event(&self, _: u32) {}
    /// The agent's sweeps can be descheduled between the swap and the
    /// removals.
    fn late_unlinks(&self) -> bool {
        true
    }
}

/// The conntrack of a datapath: both families' tables, their per-backend
/// counts (one BACKEND_CONNS, mapped by both) and the event counters.
pub struct Conntrack {
    pub v4: MappedTable<[u8; 4]>,
    pub v6: MappedTable<Addr6>,
    events: PerCpuArray<MapData, u64>,
    /// The maps, for `Maps::infos`.
    maps: Vec<(&'static str, MapData)>,
}

/// A mapping that failed, as a map error.
fn unmappable(name: &'static str) -> Error {
    Error::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error: std::io::Error::last_os_error(),
        }),
    }
}

impl Conntrack {
    /// Maps the tables whose maps `open` gives (from a loaded object or
    /// from pins). The forward bucket counts follow from the index sizes.
    pub fn open(mut open: impl FnMut(&'static str) -> Result<MapData>) -> Result<Self> {
        let mut maps = Vec::new();
        for name in [maps::CT4_INDEX, maps::CT4_RECORDS, maps::CT6_INDEX, maps::CT6_RECORDS, maps::BACKEND_CONNS] {
            maps.push((name, open(name)?));
        }
        let max = |i: usize| {
            maps[i].1.info().map(|info| info.max_entries()).map_err(|e| Error::Map { name: maps[i].0, source: e })
        };
        let (nb4, nb6, backends) = (max(0)? / 3, max(2)? / 3, max(4)?);
        let fd = |i: usize| maps[i].1.fd().as_fd();
        let v4 = MappedTable::map(nb4, fd(0), fd(1), fd(4), backends).ok_or_else(|| unmappable(maps::CT4_INDEX))?;
        let v6 = MappedTable::map(nb6, fd(2), fd(3), fd(4), backends).ok_or_else(|| unmappable(maps::CT6_INDEX))?;
        let ev = open(maps::CT_EVENTS)?;
        let events = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(ev))
            .map_err(|source| Error::Map { name: maps::CT_EVENTS, source })?;
        Ok(Self { v4, v6, events, maps })
    }

    /// Flows the tables hold at most (both families).
    pub fn capacity(&self) -> u64 {
        (self.v4.nb() as u64 + self.v6.nb() as u64) * WAYS as u64
    }

    /// Every live flow, as its two directions' entries (forward first).
    pub fn entries(&self) -> Vec<(CtKey, CtEntry)> {
        let now = crate::dump::now_ns();
        let mut out = Vec::new();
        for (_, r) in self.v4.records() {
            out.extend(entries(&r, now));
        }
        for (_, r) in self.v6.records() {
            out.extend(entries(&r, now));
        }
        out
    }

    /// Live flows (records).
    pub fn flows(&self) -> usize {
        let mut n = 0;
        ct_ops::records(&self.v4, |_, _| n += 1);
        ct_ops::records(&self.v6, |_, _| n += 1);
        n
    }

    /// The entry of the flow whose forward or reply tuple is `key`.
    pub fn get(&self, key: &CtKey) -> Option<CtEntry> {
        let now = crate::dump::now_ns();
        if is_v4_mapped(&key.src) {
            find(&self.v4, key).map(|(_, r, reply)| entries(&r, now)[reply as usize].1)
        } else {
            find(&self.v6, key).map(|(_, r, reply)| entries(&r, now)[reply as usize].1)
        }
    }

    /// Unlinks the flow whose forward or reply tuple is `key`; false when
    /// there is none.
    pub fn remove(&self, key: &CtKey) -> bool {
        if is_v4_mapped(&key.src) {
            find(&self.v4, key).is_some_and(|(id, r, _)| ct_ops::unlink(&self.v4, id, r.word))
        } else {
            find(&self.v6, key).is_some_and(|(id, r, _)| ct_ops::unlink(&self.v6, id, r.word))
        }
    }

    /// Unlinks every flow one of whose entries `drop` picks; returns how
    /// many entries went (two per flow).
    pub fn sweep(&self, mut drop: impl FnMut(&CtKey, &CtEntry) -> bool) -> usize {
        let now = crate::dump::now_ns();
        let n4 = self.v4.sweep(|r, _| entries(r, now).iter().any(|(k, e)| drop(k, e)));
        let n6 = self.v6.sweep(|r, _| entries(r, now).iter().any(|(k, e)| drop(k, e)));
        2 * (n4 + n6) as usize
    }

    /// Unlinks every expired flow, so its backend's active count drops and
    /// its SNAT port is free without waiting for a packet to evict it.
    /// Returns how many flows went.
    pub fn expire(&self) -> usize {
        let now = ticks(crate::dump::now_ns());
        (self.v4.sweep(|r, w| expired(w, r.last_seen, now)) + self.v6.sweep(|r, w| expired(w, r.last_seen, now)))
            as usize
    }

    /// Moves every live flow's last-seen time `secs` into the past, as if it
    /// had been quiet that long (tests of timeouts).
    pub fn age(&self, secs: u64) {
        let by = ticks_of(secs * 1_000_000_000);
        age_all(&self.v4, by);
        age_all(&self.v6, by);
    }

    /// Writes a live flow as the datapath would, from its forward entry `e`
    /// at `key` (not a reply entry) and the backend `backend:bport`: the
    /// upgrade's copy, and tests that need a flow in a given state. The
    /// insert's outcome (`ct_ops::outcome`).
    pub fn insert(&self, key: &CtKey, e: &CtEntry, backend: &[u8; 16], bport: u16) -> u32 {
        if e.flags & CT_F_REPLY != 0 {
            return outcome::FULL;
        }
        if is_v4_mapped(&key.src) {
            insert(&self.v4, key, e, backend, bport)
        } else {
            insert(&self.v6, key, e, backend, bport)
        }
    }

    /// Active connections of backend `id`.
    pub fn connections(&self, id: u32) -> u64 {
        self.v4.connections(id)
    }

    /// The events of `ct_table::event`, summed over CPUs, in index order.
    pub fn events(&self) -> Vec<u64> {
        (0..event::COUNT).map(|i| self.events.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)).collect()
    }

    /// The maps' kernel descriptions, by name.
    pub fn infos(&self) -> Vec<(&'static str, aya::maps::MapInfo)> {
        let mut out: Vec<_> = self.maps.iter().filter_map(|(n, d)| d.info().ok().map(|i| (*n, i))).collect();
        use aya::maps::IterableMap as _;
        if let Ok(i) = self.events.map().info() {
            out.push((maps::CT_EVENTS, i));
        }
        out
    }
}

/// The live record with forward or reply tuple `key`: id, copy, direction.
fn find<A: CtAddr>(tb: &MappedTable<A>, key: &CtKey) -> Option<(u32, CtRecord<A>, bool)> {
    let t = Tuple {
        src: A::from16(&key.src),
        dst: A::from16(&key.dst),
        sport: key.sport,
        dport: key.dport,
        proto: key.proto,
    };
    let f = ct_ops::lookup(tb, &t, t.hash());
    if f == 0 {
        return None;
    }
    let (id, seq) = (ct_ops::found_id(f), ct_ops::found_seq(f));
    let r = tb.record(id)?;
    // SAFETY: the mapping; the copy is checked against the sequence.
    let copy = unsafe { r.read_volatile() };
    (w_seq(copy.word) == seq && ct_ops::still(r, seq)).then_some((id, copy, ct_ops::found_reply(f)))
}

fn age_all<A: CtAddr>(tb: &MappedTable<A>, by: u32) {
    ct_ops::records(tb, |id, r| {
        if let Some(p) = tb.record(id) {
            // SAFETY: the mapping; a plain store any packet could make.
            unsafe { (&raw mut (*p).last_seen).write_volatile(r.last_seen.wrapping_sub(by)) };
        }
    });
}

fn insert<A: CtAddr>(tb: &MappedTable<A>, key: &CtKey, e: &CtEntry, backend: &[u8; 16], bport: u16) -> u32 {
    let snat = e.flags & CT_F_SNAT != 0;
    let client = A::from16(&key.src);
    let mut nf = NewFlow::<A>::default();
    let r = &mut nf.rec;
    r.word = word(0, e.state, e.flags & CT_F_SNAT, 0, key.proto);
    r.backend_id = e.backend_id;
    r.rev_nat_id = e.rev_nat_id;
    (r.client, r.front, r.backend) = (client, A::from16(&key.dst), A::from16(backend));
    r.peer = if snat { A::from16(&e.nat_addr) } else { client };
    (r.cport, r.fport, r.bport, r.pport) = (key.sport, key.dport, bport, if snat { e.nat_port } else { key.sport });
    let now = crate::dump::now_ns();
    let won = ct_ops::insert(tb, &mut nf, 0, ticks(now));
    if won == outcome::WON
        && let Some(p) = tb.record(nf.id)
    {
        // SAFETY: the mapping; the record was just written.
        unsafe { (&raw mut (*p).last_seen).write_volatile(ticks(e.last_seen_ns.min(now))) };
    }
    won
}

/// Record `r` as the two entries the LRU conntrack kept for a flow (its
/// forward entry, then its reply entry): the form `xlb dump conntrack`,
/// `explain`, the sweeps and the tests read. `now`: monotonic coarse ns,
/// from which the last-seen time is rebuilt (ticks wrap; ages do not).
pub fn entries<A: CtAddr>(r: &CtRecord<A>, now: u64) -> [(CtKey, CtEntry); 2] {
    let w = r.word;
    let (marks, proto) = (w_marks(w), w_proto(w));
    let snat = w_flags(w) & CT_F_SNAT != 0;
    let age = (ct_table::age(r.last_seen, ticks(now)) as u64) << TICK_SHIFT;
    let base = CtEntry {
        last_seen_ns: now.saturating_sub(age).max(1),
        backend_id: r.backend_id,
        rev_nat_id: r.rev_nat_id,
        state: w_state(w),
        ..CtEntry::default()
    };
    let fin = |m: u8| u8::from(marks & m != 0);
    let fwd = CtEntry {
        flags: if snat { CT_F_SNAT } else { 0 },
        nat_addr: if snat { r.peer.to16() } else { [0; 16] },
        nat_port: if snat { r.pport } else { 0 },
        fin_out: fin(M_FIN_FWD),
        fin_in: fin(M_FIN_REP),
        ..base
    };
    let rep = CtEntry {
        flags: CT_F_REPLY | if snat { CT_F_SNAT } else { 0 },
        nat_addr: if snat { r.client.to16() } else { [0; 16] },
        nat_port: if snat { r.cport } else { 0 },
        fin_out: fin(M_FIN_REP),
        fin_in: fin(M_FIN_FWD),
        fib_ifindex: r.rep_ifindex,
        fib_macs: r.rep_macs,
        fib_mtu: r.rep_mtu,
        ..base
    };
    let key = |t: Tuple<A>| CtKey {
        src: t.src.to16(),
        dst: t.dst.to16(),
        sport: t.sport,
        dport: t.dport,
        proto,
        _pad: [0; 3],
    };
    [(key(r.forward()), fwd), (key(r.reply()), rep)]
}

/// What [`Conntrack::migrate_lru`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Live flows copied into the table.
    pub flows: usize,
    /// Live flows already in the table (copied before, or tracked anew).
    pub present: usize,
    /// Live flows left behind: their backend is gone, or their bucket full.
    pub dropped: usize,
}

impl Conntrack {
    /// Copies the live flows of the LRU conntrack pinned at `path` by an
    /// xlb from before the table (issue #13: one entry per direction) into
    /// the table, and with `remove` then removes that pin: each forward
    /// entry becomes a record with its state, SNAT source and last-seen
    /// time (the reply entries only repeat them; a FIN seen is not carried
    /// over, so a half-closed flow starts its close anew). `backend` gives a
    /// backend id's address. `Ok(None)` when there is no such pin.
    pub fn migrate_lru(
        &self,
        path: &std::path::Path,
        backend: impl Fn(u32) -> Option<([u8; 16], u16)>,
        remove: bool,
    ) -> Result<Option<Migrated>> {
        if !path.exists() {
            return Ok(None);
        }
        let pin_err = |source| Error::Pin { path: path.to_path_buf(), source };
        let data = MapData::from_pin(path).map_err(pin_err)?;
        let info = data.info().map_err(|source| Error::Map { name: maps::CONNTRACK, source })?;
        let expected = (size_of::<CtKey>() as u32, size_of::<CtEntry>() as u32);
        if (info.key_size(), info.value_size()) != expected {
            return Err(Error::Incompatible {
                path: path.to_path_buf(),
                found: (info.key_size(), info.value_size()),
                expected,
            });
        }
        let old: aya::maps::HashMap<MapData, CtKey, CtEntry> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(|source| Error::Map { name: maps::CONNTRACK, source })?;
        let now = crate::dump::now_ns();
        let mut m = Migrated::default();
        for (k, e) in old.iter().filter_map(|r| r.ok()) {
            if e.flags & CT_F_REPLY != 0 || datapath_common::ct::expired(&e, now) {
                continue;
            }
            match backend(e.backend_id).map(|(addr, port)| self.insert(&k, &e, &addr, port)) {
                Some(outcome::WON) => m.flows += 1,
                Some(outcome::LOST) => m.present += 1,
                _ => m.dropped += 1,
            }
        }
        drop(old);
        if remove {
            std::fs::remove_file(path).map_err(|io_error| {
                pin_err(MapError::SyscallError(aya::sys::SyscallError { call: "unlink", io_error }))
            })?;
        }
        Ok(Some(m))
    }
}
