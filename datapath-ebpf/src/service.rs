// SPDX-License-Identifier: MIT OR GPL-2.0
//! Service lookup and backend selection: the one implementation that the
//! packet pipeline (`pipeline::new_flow`) and socket-level load balancing
//! (`sock.rs`) both call, so a Service behaves the same whichever hook
//! balances its client (scopes, schedulers, sessionAffinity, the Local
//! policies and terminating endpoints, which the agent leaves out of the
//! eligible list).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use datapath_common::{
    AffinityKey, AffinityValue, BACKEND_ACTIVE, BACKEND_EMPTY, Backend, SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_RANDOM,
    SCHED_ROUND_ROBIN, SCHED_SOURCE_HASH, SCHED_WEIGHTED_LC, SCHED_WEIGHTED_RR, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_F_AFFINITY, Service, ServiceKey, hash::client_hash,
};

use crate::maps::{AFFINITY, BACKEND_CONNS, BACKENDS, RR_CURSOR, SERVICES, SLOTS};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The frontend `addr:port/proto` as seen from `scope`: a client inside the
/// cluster (a pod, the node itself) reaching a NodePort, LoadBalancer or
/// external address finds the internal-scope frontend first (a Local
/// Service's address gives in-cluster clients all endpoints, as kube-proxy
/// does), else the external one.
#[inline(always)]
pub fn lookup(addr: &[u8; 16], port: u16, proto: u8, scope: u8) -> Option<Service> {
    let mut k = ServiceKey { addr: *addr, port, proto, scope };
    // SAFETY: values are plain data copied out at once.
    if let Some(s) = unsafe { SERVICES.get(&k) } {
        return Some(*s);
    }
    if scope == SCOPE_INTERNAL {
        k.scope = SCOPE_EXTERNAL;
        // SAFETY: as above.
        return unsafe { SERVICES.get(&k) }.copied();
    }
    None
}

/// The backend for a new flow or socket of `client` (its address, or the
/// identity socket-LB gives a network namespace), with `hash` for the
/// hashing schedulers; `None` when the service has no usable backend (the
/// caller rejects, or drops under `SVC_F_NO_LOCAL_DROP`). `sticky`: pick by
/// `hash` whatever the scheduler (an unconnected UDP socket is balanced at
/// every datagram, and must keep one backend as a tracked flow does).
#[inline(always)]
pub fn backend(svc: &Service, client: &[u8; 16], hash: u32, sticky: bool) -> Option<(u32, &'static Backend)> {
    let input = Select { svc: *svc, client: *client, hash, sticky: u32::from(sticky) };
    let id = xlb_select(&input);
    match BACKENDS.get(id) {
        Some(b) if id != 0 && b.state != BACKEND_EMPTY => Some((id, b)),
        _ => None,
    }
}

/// The input of [`xlb_select`], on the caller's stack.
#[repr(C)]
pub struct Select {
    pub svc: Service,
    pub client: [u8; 16],
    pub hash: u32,
    pub sticky: u32,
}

/// The backend id for a new flow, or 0 when the service has none:
/// sessionAffinity first (a live entry to an active backend), then the
/// service's scheduler over its eligible list.
///
/// A *global* BPF function: the verifier checks it once per program
/// instead of again on every path that reaches it (the new-flow programs'
/// budget, see ARCHITECTURE.md), so the scheduler set costs them nothing.
/// It only reads behind `input`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_select(input: *const Select) -> u32 {
    if input.is_null() {
        return 0;
    }
    // SAFETY: the caller's input, its size checked by the verifier.
    let input = unsafe { &*input };
    // A copy: the compiler then knows no helper call changes it (the
    // divisions below stay proven non-zero).
    let svc = &input.svc.clone();
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let akey = AffinityKey { client: input.client, service_id: svc.id };
    if svc.flags & SVC_F_AFFINITY != 0
        && let Some(a) = AFFINITY.get_ptr_mut(&akey)
    {
        // SAFETY: a live map value.
        let a = unsafe { &mut *a };
        let fresh = now.wrapping_sub(a.last_used_ns) <= svc.affinity_timeout_s as u64 * NS_PER_SEC;
        if fresh && BACKENDS.get(a.backend_id).is_some_and(|b: &Backend| b.state == BACKEND_ACTIVE) {
            a.last_used_ns = now;
            return a.backend_id;
        }
    }
    if svc.count == 0 {
        return 0;
    }
    let id = match svc.scheduler {
        SCHED_MAGLEV if svc.table_len != 0 => slot(svc.table_off + input.hash % svc.table_len),
        SCHED_SOURCE_HASH if svc.table_len != 0 => slot(svc.table_off + client_hash(&input.client) % svc.table_len),
        _ if input.sticky != 0 => listed(svc, draw(svc, input.hash)),
        SCHED_ROUND_ROBIN | SCHED_WEIGHTED_RR => match RR_CURSOR.get_ptr_mut(svc.id) {
            Some(c) => {
                // SAFETY: per-CPU slot.
                let n = unsafe { *c };
                unsafe { *c = n.wrapping_add(1) };
                listed(svc, draw(svc, n))
            }
            None => listed(svc, draw(svc, input.hash)),
        },
        SCHED_RANDOM => listed(svc, draw(svc, random())),
        SCHED_LEAST_CONN | SCHED_WEIGHTED_LC => least_connections(svc),
        _ => listed(svc, draw(svc, input.hash)),
    };
    if svc.flags & SVC_F_AFFINITY != 0 && id != 0 {
        let v = AffinityValue { last_used_ns: now, backend_id: id, _pad: 0 };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    id
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
fn slot(i: u32) -> u32 {
    SLOTS.get(i).copied().unwrap_or(0)
}

/// The list position for draw `r` (a cursor, a random number, a hash): by
/// the weighted sequence when the service has one, else uniform. Always
/// below `svc.count` (non-zero).
#[inline(always)]
fn draw(svc: &Service, r: u32) -> u32 {
    let pos = if svc.table_len != 0 { slot(svc.table_off + r % svc.table_len) } else { r };
    pos % svc.count
}

/// The backend id at list position `pos`.
#[inline(always)]
fn listed(svc: &Service, pos: u32) -> u32 {
    slot(svc.list_off + pos)
}

/// `lc`/`wlc`: of two *distinct* candidates (drawn by weight for `wlc`),
/// the one with fewer active connections per weight; a tie keeps the first
/// (so, with no connections open, the shares follow the weights). Distinct,
/// so a backend is never chosen over a less loaded one: with replacement,
/// two backends and one of them loaded, the loaded one would win 1 in 4.
/// O(1) whatever the number of backends: the power of two choices
/// (Mitzenmacher), with IPVS wlc's comparison `c_a·w_b > c_b·w_a`.
#[inline(always)]
fn least_connections(svc: &Service) -> u32 {
    let n = svc.count;
    let a = draw(svc, random());
    if n < 2 {
        return listed(svc, a);
    }
    let mut b = draw(svc, random());
    if b == a {
        b = (a + 1 + random() % (n - 1)) % n;
    }
    let (id_a, id_b) = (listed(svc, a), listed(svc, b));
    // Weights are stored only when they differ, and then with a sequence.
    let weighted = svc.scheduler == SCHED_WEIGHTED_LC && svc.table_len != 0;
    let (wa, wb) = if weighted { (weight(svc, a), weight(svc, b)) } else { (1, 1) };
    if connections(id_b) * wa < connections(id_a) * wb { id_b } else { id_a }
}

/// Active connections to backend `id` through this node (BACKEND_CONNS); a
/// decrement that overtook its increment reads as 0.
#[inline(always)]
fn connections(id: u32) -> u64 {
    match BACKEND_CONNS.get(id) {
        Some(c) if *c <= u32::MAX as u64 => *c,
        _ => 0,
    }
}

/// The `wlc` weight at list position `pos` (1..=65535).
#[inline(always)]
fn weight(svc: &Service, pos: u32) -> u64 {
    slot(svc.list_off + svc.count + pos).clamp(1, u16::MAX as u32) as u64
}
