// SPDX-License-Identifier: MIT OR GPL-2.0
//! The datapath's maps. What each one means is documented once, beside its
//! key/value types in `datapath-common`. The sizes here are placeholders:
//! the loader sets every size (`aya::EbpfLoader::set_max_entries`).

use crate::conntrack::Found;
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use datapath_common::{
    AffinityKey, AffinityValue, Backend, Config, Counter, CtKey, FragKey, FragPorts, FrontendInfo, L2Key, L2Value,
    NextHop, RevNat, Service, ServiceKey, SockRevKey, SockRevValue, SourceRangeKey,
    ct_ops::NewFlow,
    ct_table::{Addr6, CtBucket, CtRecord4, CtRecord6, Tuple, event},
    filter::FlowFilter,
    tail, verdict,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(1, 0);
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(1, 0);
/// Memory-mappable: the agent writes regions with plain stores, no syscall.
#[map]
pub static SLOTS: Array<u32> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static REV_NAT: Array<RevNat> = Array::with_max_entries(1, 0);
/// The conntrack table (`conntrack.rs`, `datapath_common::ct_table`), one
/// per family; sized by the loader (`3 × nb` buckets, `7 × nb` records).
#[map]
pub static CT4_INDEX: Array<CtBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static CT4_RECORDS: Array<CtRecord4> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static CT6_INDEX: Array<CtBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static CT6_RECORDS: Array<CtRecord6> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Active connections per backend id, both families.
#[map]
pub static BACKEND_CONNS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
pub static CT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(event::COUNT, 0);
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(1, 0);
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::with_max_entries(1, 0);
#[map]
pub static RR_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static SERVICE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(verdict::COUNT, 0);
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Written and read by the agent only; declared here so the loader creates
/// and pins it with the others.
#[map]
pub static FRONTENDS: HashMap<u32, FrontendInfo> = HashMap::with_max_entries(1, BPF_F_NO_PREALLOC);

/// Socket-level load balancing's reverse translations (`sock.rs`).
#[map]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::with_max_entries(1, 0);
/// The addresses this node announces on L2 (`l2.rs`).
#[map]
pub static L2_ADDRS: HashMap<L2Key, L2Value> = HashMap::with_max_entries(4096, 0);
/// Socket-LB's TCP sockets counted in BACKEND_CONNS: cookie → backend id
/// (not LRU: an evicted socket would keep its count forever).
#[map]
pub static SOCK_CONNS: HashMap<u64, u32> = HashMap::with_max_entries(1, 0);

/// The "maybe ours" filter (`datapath_common::filter`), memory-mapped by the agent.
#[map]
pub static FILTER: Array<FlowFilter> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The new-flow path's next-hop cache (`next_hop.rs`); sized by the loader
/// to two entries per backend.
#[map]
pub static NEXT_HOP: Array<NextHop> = Array::with_max_entries(1, 0);

#[map]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(1, 0);
/// The tail-call tables, filled by the loader (`datapath_common::tail`).
#[map]
pub static XDP_CALLS: ProgramArray = ProgramArray::with_max_entries(tail::PER_HOOK, 0);
#[map]
pub static TC_CALLS: ProgramArray = ProgramArray::with_max_entries(2 * tail::PER_HOOK, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1024;

/// Per-CPU working memory of the new-flow path (not part of the ABI; nothing
/// outside the datapath reads it): the conntrack records and keys being
/// built, kept off the 512-byte stack.
#[repr(C)]
pub struct Scratch {
    /// The new flow being tracked (`pipeline::new_flow` → `conntrack::track`).
    pub req: Track,
    pub new4: NewFlow<[u8; 4]>,
    pub new6: NewFlow<Addr6>,
    /// The reversed quote of an ICMP error (`icmp.rs`).
    pub rkey: CtKey,
    /// What conntrack's global functions work on (`conntrack.rs`): the
    /// packet's tuple in its family's form, its TCP flags, and what a
    /// lookup found.
    pub q4: Tuple<[u8; 4]>,
    pub q6: Tuple<Addr6>,
    pub q_flags: u8,
    pub found: Found,
    /// What the answer program is to send (`reject::reject`'s `too_big`),
    /// set by the program that tail-calls it.
    pub answer: u32,
    pub _pad: u32,
}

/// What `conntrack::track` needs to know about a new flow.
#[repr(C)]
pub struct Track {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub hash: u32,
    /// SNAT port range, host order (`snat_min` 0: no SNAT).
    pub snat_min: u16,
    pub snat_max: u16,
    /// SNAT source address. Plain fields rather than an `Option`: LLVM
    /// leaves a `None`'s payload uninitialised, and the verifier rejects
    /// copying uninitialised memory.
    pub snat_node: [u8; 16],
}

/// The token bucket of the answers a CPU builds (rejects, packet too big):
/// tokens left times 10^9 (so refilling needs no division), and the time of
/// the last refill. Datapath-internal, not pinned: a restart refills it.
#[repr(C)]
pub struct ReplyBucket {
    pub credit: u64,
    pub last_ns: u64,
}

#[map]
pub static REPLY_BUCKET: PerCpuArray<ReplyBucket> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count_verdict(reason: u32) {
    if let Some(c) = VERDICTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count(map: &PerCpuArray<Counter>, index: u32, bytes: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}
