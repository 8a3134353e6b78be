// SPDX-License-Identifier: MIT OR Apache-2.0
//! Host mirror of the datapath's backend selection for a new flow, for
//! "which backend would this flow hit" answers and distribution tests.
//! It reads the same inputs the kernel does: the service entry and its
//! SLOTS region.

use datapath_common::{SCHED_MAGLEV, SCHED_RANDOM, SCHED_ROUND_ROBIN, Service, hash::flow_hash};

/// How a new flow's backend was (or would be) chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Maglev slot `slot` of the service's table.
    Maglev { slot: u32, backend: u32 },
    /// Entry `index` of the service's backend list (round-robin, random).
    List { index: u32, backend: u32 },
    /// The service has no eligible backend: the flow is rejected.
    Reject,
}

/// The backend a new flow gets, given the service entry, its SLOTS region
/// as `slots` (indexed from 0 = the region's start) and, for round-robin, the
/// CPU's cursor value, or for random, the random draw.
pub fn pick(
    svc: &Service,
    slots: &[u32],
    saddr: &[u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    cursor_or_rand: u32,
) -> Pick {
    if svc.count == 0 {
        return Pick::Reject;
    }
    let hash = flow_hash(saddr, sport, dport, proto);
    let base = svc.list_off.min(svc.maglev_off);
    let at = |abs: u32| slots.get((abs - base) as usize).copied().unwrap_or(0);
    match svc.scheduler {
        SCHED_MAGLEV if svc.maglev_len != 0 => {
            let slot = hash % svc.maglev_len;
            Pick::Maglev { slot, backend: at(svc.maglev_off + slot) }
        }
        SCHED_ROUND_ROBIN | SCHED_RANDOM => {
            let index = cursor_or_rand % svc.count;
            Pick::List { index, backend: at(svc.list_off + index) }
        }
        _ => {
            let index = hash % svc.count;
            Pick::List { index, backend: at(svc.list_off + index) }
        }
    }
}
