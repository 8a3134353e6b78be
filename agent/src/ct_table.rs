// SPDX-License-Identifier: MIT OR Apache-2.0
//! The conntrack table of issue #13 as the agent sees it: the index, the
//! records and the per-backend counts memory-mapped (`BPF_F_MMAPABLE`
//! arrays), driven by the very operations the datapath runs
//! (`datapath_common::ct_ops`): reading the live records (`xlb dump`, the
//! metrics), sweeping expired or stale ones, with the same atomics on the
//! same words as the kernel's CPUs. No syscall per flow.

use std::{marker::PhantomData, os::fd::BorrowedFd};

use datapath_common::{
    ct_ops::{self, Table},
    ct_table::{CtAddr, CtBucket, CtRecord, WAYS},
};

use crate::mapped::Mapped;

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
}
