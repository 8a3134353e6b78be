// SPDX-License-Identifier: MIT OR GPL-2.0
//! Service lookup and backend selection: the one implementation that the
//! packet pipeline (`pipeline::new_flow`) and socket-level load balancing
//! (`sock.rs`) both call, so a Service behaves the same whichever hook
//! balances its client (scopes, schedulers, sessionAffinity, the Local
//! policies and terminating endpoints, which the agent leaves out of the
//! eligible list).

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use datapath_common::{
    AffinityKey, AffinityValue, BACKEND_ACTIVE, BACKEND_EMPTY, Backend, SCHED_MAGLEV, SCHED_RANDOM, SCHED_ROUND_ROBIN,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_AFFINITY, Service, ServiceKey,
};

use crate::maps::{AFFINITY, BACKENDS, RR_CURSOR, SERVICES, SLOTS};

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
    let id = select(svc, client, hash, sticky);
    match BACKENDS.get(id) {
        Some(b) if id != 0 && b.state != BACKEND_EMPTY => Some((id, b)),
        _ => None,
    }
}

/// The backend id for a new flow, or 0 when the service has none:
/// sessionAffinity first (a live entry to an active backend), then the
/// service's scheduler over its eligible list.
#[inline(never)]
fn select(svc: &Service, client: &[u8; 16], hash: u32, sticky: bool) -> u32 {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let akey = AffinityKey { client: *client, service_id: svc.id };
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
    let idx = match svc.scheduler {
        SCHED_MAGLEV if svc.maglev_len != 0 => svc.maglev_off + hash % svc.maglev_len,
        _ if sticky => svc.list_off + hash % svc.count,
        SCHED_ROUND_ROBIN => match RR_CURSOR.get_ptr_mut(svc.id) {
            Some(c) => {
                // SAFETY: per-CPU slot.
                let n = unsafe { *c };
                unsafe { *c = n.wrapping_add(1) };
                svc.list_off + n % svc.count
            }
            None => svc.list_off + hash % svc.count,
        },
        // SAFETY: plain helper call.
        SCHED_RANDOM => svc.list_off + unsafe { bpf_get_prandom_u32() } % svc.count,
        _ => svc.list_off + hash % svc.count,
    };
    let id = SLOTS.get(idx).copied().unwrap_or(0);
    if svc.flags & SVC_F_AFFINITY != 0 && id != 0 {
        let v = AffinityValue { last_used_ns: now, backend_id: id, _pad: 0 };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    id
}
