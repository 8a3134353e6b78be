// SPDX-License-Identifier: MIT OR Apache-2.0
//! Host mirror of the datapath's backend selection for a new flow
//! (`datapath-ebpf/src/service.rs`, `xlb_select`), for "which backend would
//! this flow hit" answers and distribution tests. It reads the same inputs
//! the kernel does: the service entry and its SLOTS region.

use datapath_common::{
    SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_RANDOM, SCHED_ROUND_ROBIN, SCHED_SOURCE_HASH, SCHED_WEIGHTED_LC,
    SCHED_WEIGHTED_RR, Service,
    hash::{client_hash, flow_hash},
};

/// A service's SLOTS region split into its parts (see
/// `datapath_common::Service`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts<'a> {
    /// Backend ids eligible for new flows.
    pub list: &'a [u32],
    /// Their weights, reduced by their gcd; empty when they are equal.
    pub weights: &'a [u32],
    /// The Maglev table (ids) or weighted sequence (list positions).
    pub table: &'a [u32],
}

impl<'a> Parts<'a> {
    /// `slots`: the region from its start (`Maps::region_slots`). A region
    /// written before weights existed (list, then table) reads as unweighted.
    pub fn of(svc: &Service, slots: &'a [u32]) -> Self {
        let base = svc.list_off.min(svc.table_off);
        let part = |off: u32, len: u32| {
            let from = (off.saturating_sub(base) as usize).min(slots.len());
            &slots[from..(from + len as usize).min(slots.len())]
        };
        let weighted = svc.count > 0 && svc.table_off == svc.list_off + 2 * svc.count;
        Self {
            list: part(svc.list_off, svc.count),
            weights: if weighted { part(svc.list_off + svc.count, svc.count) } else { &[] },
            table: part(svc.table_off, svc.table_len),
        }
    }

    /// The weight of list position `pos` (1 without weights), clamped to
    /// 1..=65535 as the datapath reads it.
    pub fn weight(&self, pos: usize) -> u32 {
        self.weights.get(pos).copied().unwrap_or(1).clamp(1, u16::MAX as u32)
    }

    /// The list position for draw `r`, as the datapath's `draw`.
    pub fn draw(&self, r: u32) -> u32 {
        let n = self.list.len() as u32;
        let pos = if self.table.is_empty() { r } else { self.table[(r % self.table.len() as u32) as usize] };
        pos % n.max(1)
    }

    fn listed(&self, pos: u32) -> u32 {
        self.list.get(pos as usize).copied().unwrap_or(0)
    }
}

/// How a new flow's backend was (or would be) chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Slot `slot` of the service's Maglev table (`mh` by the flow hash,
    /// `sh` by the client address).
    Maglev { slot: u32, backend: u32 },
    /// List position `index` (round-robin, weighted round-robin and random:
    /// by the cursor or the draw given).
    List { index: u32, backend: u32 },
    /// `lc`/`wlc`: candidates `a` and `b` (list positions), `backend` the one
    /// with fewer active connections per weight given the counts.
    LeastConnections { a: u32, b: u32, backend: u32 },
    /// The service has no eligible backend: the flow is rejected.
    Reject,
}

impl Pick {
    pub fn backend(self) -> Option<u32> {
        match self {
            Self::Maglev { backend, .. } | Self::List { backend, .. } | Self::LeastConnections { backend, .. } => {
                Some(backend)
            }
            Self::Reject => None,
        }
    }
}

/// The flow a pick is for.
#[derive(Clone, Copy, Debug)]
pub struct Flow<'a> {
    pub saddr: &'a [u8; 16],
    /// Ports in network order, as in the maps.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// The backend a new flow gets (sessionAffinity aside), given the service
/// entry, its SLOTS region as `slots` (from the region's start), the
/// datapath's draws (`draws[0]`: the CPU's cursor for round-robin, the
/// random number for random and the first `lc` candidate; `draws[1..]`:
/// the second candidate and its fallback) and `connections` (backend id →
/// active connections) for `lc`/`wlc`. Not modelled: socket-LB's
/// unconnected UDP (`sticky`), which picks by the socket's hash under every
/// scheduler.
pub fn pick(svc: &Service, slots: &[u32], flow: Flow, draws: [u32; 3], connections: impl Fn(u32) -> u64) -> Pick {
    if svc.count == 0 {
        return Pick::Reject;
    }
    let parts = Parts::of(svc, slots);
    let maglev = |h: u32| {
        let slot = h % svc.table_len;
        Pick::Maglev { slot, backend: parts.table.get(slot as usize).copied().unwrap_or(0) }
    };
    let list = |index: u32| Pick::List { index, backend: parts.listed(index) };
    let hash = flow_hash(flow.saddr, flow.sport, flow.dport, flow.proto);
    match svc.scheduler {
        SCHED_MAGLEV if svc.table_len != 0 => maglev(hash),
        SCHED_SOURCE_HASH if svc.table_len != 0 => maglev(client_hash(flow.saddr)),
        SCHED_ROUND_ROBIN | SCHED_WEIGHTED_RR | SCHED_RANDOM => list(parts.draw(draws[0])),
        SCHED_LEAST_CONN | SCHED_WEIGHTED_LC => least_connections(svc, &parts, draws, connections),
        _ => list(parts.draw(hash)),
    }
}

/// `lc`/`wlc` as the datapath's `least_connections`.
fn least_connections(svc: &Service, parts: &Parts, draws: [u32; 3], connections: impl Fn(u32) -> u64) -> Pick {
    let n = svc.count;
    let a = parts.draw(draws[0]);
    if n < 2 {
        return Pick::LeastConnections { a, b: a, backend: parts.listed(a) };
    }
    let mut b = parts.draw(draws[1]);
    if b == a {
        b = (a + 1 + draws[2] % (n - 1)) % n;
    }
    let weighted = svc.scheduler == SCHED_WEIGHTED_LC && svc.table_len != 0;
    let (wa, wb) = if weighted { (parts.weight(a as usize), parts.weight(b as usize)) } else { (1, 1) };
    let (ia, ib) = (parts.listed(a), parts.listed(b));
    let clamp = |c: u64| if c <= u32::MAX as u64 { c } else { 0 };
    let (wa, wb) = (u64::from(wa), u64::from(wb));
    let backend = if clamp(connections(ib)) * wa < clamp(connections(ia)) * wb { ib } else { ia };
    Pick::LeastConnections { a, b, backend }
}
