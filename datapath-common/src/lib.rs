// SPDX-License-Identifier: MIT OR Apache-2.0
//! The map ABI between xlb's eBPF datapath and its user-space side, plus the
//! small pieces of pure logic both sides must agree on bit for bit: the flow
//! hash, the conntrack state machine and the Internet checksum arithmetic.
//!
//! Conventions for every map type below:
//! - `#[repr(C)]`, `Copy`, no `bool`/`Option`/enums: plain integers with named
//!   constants, explicit `_pad` fields, and a compile-time size assertion.
//! - Addresses are always 16 bytes in network byte order; an IPv4 address is
//!   stored IPv4-mapped (`::ffff:a.b.c.d`, see [`v4_mapped`]).
//! - Ports are `u16` in **network byte order** (as they sit in the packet),
//!   so the datapath compares and copies them without swapping.
//! - Every other integer is in host byte order.
#![no_std]
// The table's atomics on the BPF target, which has no `AtomicU64` swap.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics, asm_experimental_arch), allow(internal_features))]

pub mod csum;
pub mod ct;
pub mod ct_ops;
pub mod ct_table;
pub mod filter;
pub mod hash;

/// IP protocol numbers the datapath load-balances.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Service scope: which hook may match a service entry.
/// `External` entries are matched by the XDP program on node interfaces
/// (NodePort, LoadBalancer ingress IPs, externalIPs); `Internal` entries by
/// the TC programs on pod-facing interfaces (ClusterIP, and in-cluster access
/// to the external addresses). A TC miss on `Internal` retries `External`.
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// How a service picks a backend for a new flow ([`Service::scheduler`]).
/// The names are IPVS's (`ipvsadm -s`); see the README for each one's behaviour.
/// `mh`: Maglev over the flow hash; the table is weighted.
pub const SCHED_MAGLEV: u8 = 0;
/// `rr`: the per-CPU cursor over the list (weights ignored).
pub const SCHED_ROUND_ROBIN: u8 = 1;
/// `random`: a random draw from the weighted sequence (or the list).
pub const SCHED_RANDOM: u8 = 2;
/// `wrr`: the per-CPU cursor over the weighted sequence.
pub const SCHED_WEIGHTED_RR: u8 = 3;
/// `lc`: the fewer active connections of two distinct random backends.
pub const SCHED_LEAST_CONN: u8 = 4;
/// `wlc`: of two distinct weighted random backends, the fewer active
/// connections per weight (`c_a·w_b` against `c_b·w_a`, IPVS's comparison).
pub const SCHED_WEIGHTED_LC: u8 = 5;
/// `sh`: a Maglev table (unweighted) over the client address alone.
pub const SCHED_SOURCE_HASH: u8 = 6;

/// [`Service::flags`] bits.
/// sessionAffinity: ClientIP — consult/refresh the AFFINITY map.
pub const SVC_F_AFFINITY: u8 = 1 << 0;
/// externalTrafficPolicy: Local — never SNAT; the agent lists only node-local backends.
pub const SVC_F_EXT_LOCAL: u8 = 1 << 1;
/// The frontend is a NodePort (informational, shown by `xlb dump`).
pub const SVC_F_NODEPORT: u8 = 1 << 2;
/// loadBalancerSourceRanges set: a source must match SOURCE_RANGES or is dropped.
pub const SVC_F_SOURCE_RANGES: u8 = 1 << 3;
/// The service has usable endpoints, none eligible on this node (a Local
/// policy): a new flow is dropped, not rejected (kube-proxy's DROP "has no
/// local endpoints").
pub const SVC_F_NO_LOCAL_DROP: u8 = 1 << 4;

/// [`Backend::state`] values. `BACKEND_EMPTY` (zero) marks an unused array slot.
pub const BACKEND_EMPTY: u8 = 0;
pub const BACKEND_ACTIVE: u8 = 1;
/// Draining: keeps its existing conntrack flows, never chosen for new ones.
pub const BACKEND_TERMINATING: u8 = 2;

/// [`Backend::flags`] bits.
/// The backend runs on this node: external traffic to it is not SNATed.
pub const BACKEND_F_NODE_LOCAL: u8 = 1 << 0;

/// Address of a v4 address as the 16-byte form every map uses.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// True when a 16-byte map address holds an IPv4-mapped address.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

/// SERVICES: frontend {VIP, port, protocol, scope} → [`Service`].
/// One entry per frontend: a Kubernetes service port exposed on a ClusterIP,
/// a NodePort on a node address, a LoadBalancer ingress IP and an externalIP
/// are four keys that may share one backend region.
// Keys are over-aligned (here and below) so the datapath builds them with
// word moves instead of byte copies; the size, and so the map ABI, is unchanged.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// VIP, network order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Service port, network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
}

/// Value of SERVICES. A service's backends live in the flat SLOTS array, in
/// one region per frontend:
/// - `slots[list_off .. list_off + count]`: the backend ids eligible for new
///   flows (weight 0 leaves a backend out);
/// - when their weights differ (`mh`, `wrr`, `random`, `wlc`; reduced by
///   their gcd), `slots[list_off + count ..][..count]`: the weights, in list
///   order (`wlc` compares by them; a restarted agent recovers them). Then
///   `table_off == list_off + 2·count`;
/// - `slots[table_off .. table_off + table_len]`: the scheduler's table.
///   For `mh` and `sh` the Maglev lookup table (backend ids); for `wrr`,
///   `random` and `wlc` the weighted sequence (list *positions*, each
///   backend's share ∝ its weight, interleaved). `table_len` 0: no table
///   (a draw is uniform over the list).
///
/// The agent writes a fresh region and only then replaces this value, so the
/// datapath never sees a half-written table (the "region flip").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Frontend id: index into REV_NAT, RR_CURSOR, SERVICE_STATS; key part of AFFINITY.
    pub id: u32,
    /// Number of backends eligible for new flows (0 → reject).
    pub count: u32,
    /// `SCHED_*`.
    pub scheduler: u8,
    /// `SVC_F_*`.
    pub flags: u8,
    pub _pad: u16,
    pub list_off: u32,
    pub table_off: u32,
    /// Table length: a Maglev table's size M (a prime), a weighted
    /// sequence's length, or 0.
    pub table_len: u32,
    /// sessionAffinity timeout in seconds (with [`SVC_F_AFFINITY`]).
    pub affinity_timeout_s: u32,
}

/// BACKENDS (array): backend id → [`Backend`]. Id 0 is never used, so a zero
/// slot in SLOTS or a zeroed conntrack entry can never name a real backend.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend (pod) address, network order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Target port, network order.
    pub port: u16,
    /// `BACKEND_*` state.
    pub state: u8,
    /// `BACKEND_F_*`.
    pub flags: u8,
}

/// REV_NAT (array): frontend id → the VIP:port replies must appear to come from.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// VIP, network order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Service port, network order.
    pub port: u16,
    pub _pad: u16,
}

/// CONNTRACK (LRU hash): the 5-tuple of a packet as it arrives → [`CtEntry`].
/// Every balanced flow has two entries: the forward one keyed by
/// client → VIP, and the reply one keyed by backend → client (or → node
/// address and SNAT port when the flow was SNATed).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source address, network order, IPv4 mapped.
    pub src: [u8; 16],
    /// Destination address, network order, IPv4 mapped.
    pub dst: [u8; 16],
    /// Ports, network order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// [`CtEntry::flags`] bits.
/// This is the reply-direction entry (backend → client): reverse-NAT it.
pub const CT_F_REPLY: u8 = 1 << 0;
/// The flow's source was rewritten to a node address (SNAT); `nat_addr`/`nat_port` hold
/// the SNAT source (forward entry) or the original client (reply entry).
pub const CT_F_SNAT: u8 = 1 << 1;

/// Value of CONNTRACK.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns` of the last packet that refreshed the entry.
    pub last_seen_ns: u64,
    /// The backend this flow is pinned to.
    pub backend_id: u32,
    /// Frontend id: index into REV_NAT.
    pub rev_nat_id: u32,
    /// See [`CT_F_SNAT`]; zero otherwise. Network order, IPv4 mapped.
    pub nat_addr: [u8; 16],
    /// See [`CT_F_SNAT`]; network order.
    pub nat_port: u16,
    /// `ct::STATE_*`.
    pub state: u8,
    /// `CT_F_*`.
    pub flags: u8,
    /// Cached FIB result for this direction: egress ifindex (0: none cached)
    /// and the MACs to write (destination, then source). The datapath drops
    /// the cache whenever it refreshes `last_seen_ns`, so it is at most
    /// `ct::REFRESH_NS` old; route and neighbour changes apply within that.
    pub fib_ifindex: u32,
    pub fib_macs: [u8; 12],
    /// With the cached FIB result: a packet length (IP header and payload,
    /// host order) known to fit the egress route's MTU. A longer packet
    /// takes a fresh lookup, which checks the MTU.
    pub fib_mtu: u16,
    /// TCP: 1 once this entry's direction sent a FIN. Written only by that
    /// direction's packets.
    pub fin_out: u8,
    /// TCP: 1 once the other direction sent a FIN. Written only by the other
    /// direction's packets (through its peer update), so neither byte is
    /// ever read-modified-written by two CPUs. Both set: the flow is closing
    /// (`ct::closing`); one set is a half-close, which keeps the flow.
    pub fin_in: u8,
}

/// FRAGS (LRU hash): the ports of a fragmented datagram, recorded by its
/// first fragment when xlb translates it, so that its later fragments (which
/// carry no L4 header) find the same conntrack entry (Cilium's
/// IPV4_FRAG_DATAGRAMS). Datapath-internal and not pinned: a restart loses
/// only datagrams in flight.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    /// The fragment's own addresses (as it arrived), network order, IPv4 mapped.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification, as loaded.
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of FRAGS: the first fragment's ports, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// AFFINITY (LRU hash): {client address, frontend id} → [`AffinityValue`], for
/// sessionAffinity ClientIP.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Client address, network order, IPv4 mapped.
    pub client: [u8; 16],
    pub service_id: u32,
}

/// Value of AFFINITY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_coarse_ns` of the last new flow that used it.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Data part of the SOURCE_RANGES LPM-trie key: {frontend id, source prefix} → `u8` (1).
/// The prefix length counts the 32 bits of `service_id` (big-endian, so it is
/// matched first) plus the address bits (96 + n for an IPv4 /n).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRangeKey {
    /// Frontend id, **big-endian**.
    pub service_id_be: u32,
    /// Source address, network order, IPv4 mapped.
    pub addr: [u8; 16],
}

/// Per-CPU packet and byte counter (SERVICE_STATS by frontend id,
/// BACKEND_STATS by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// FRONTENDS (hash, not preallocated): frontend id → what it is, for `xlb
/// dump` and for an agent restarting from the pinned maps. The programs
/// never read it; only the agent writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendInfo {
    /// The SERVICES key of the frontend.
    pub key: ServiceKey,
    /// Where the address comes from: 0 ClusterIP, 1 NodePort, 2 LoadBalancer, 3 externalIP.
    pub kind: u8,
    /// Bytes of `name` used.
    pub name_len: u8,
    pub _pad: u16,
    /// `namespace/name:port` (UTF-8, truncated to 100 bytes).
    pub name: [u8; 100],
}

impl Default for FrontendInfo {
    fn default() -> Self {
        Self { key: ServiceKey::default(), kind: 0, name_len: 0, _pad: 0, name: [0; 100] }
    }
}

/// CONFIG (array, one entry): node-wide settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Node address used as the SNAT source for IPv4 flows (IPv4 mapped); zero disables SNAT.
    pub snat_v4: [u8; 16],
    /// Node address used as the SNAT source for IPv6 flows; zero disables SNAT.
    pub snat_v6: [u8; 16],
    /// SNAT source-port range, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CFG_F_*`.
    pub flags: u32,
    /// Rejects (RST, ICMP unreachable) and packet-too-big answers each CPU
    /// may send per second, with a burst of as many; 0 means the default,
    /// [`REPLY_RATE_DEFAULT`].
    pub reply_rate: u32,
    /// Bumped by the agent on every route, rule or neighbour change: a
    /// [`NextHop`] filled under another epoch is not used.
    pub route_epoch: u32,
    /// Netns cookie of the node's own network namespace (the agent's), for
    /// socket-level load balancing in host-only mode
    /// ([`CFG_F_SOCK_HOST_ONLY`]).
    pub host_netns: u64,
}

/// [`Config::reply_rate`] when the agent sets none: 1,000 per second per CPU.
pub const REPLY_RATE_DEFAULT: u32 = 1000;

/// [`Config::flags`]: forward without decrementing TTL / hop limit (a
/// transparent NAT rather than a router hop). Off by default; the
/// BPF_PROG_TEST_RUN benchmark sets it because the kernel reruns one buffer.
pub const CFG_F_KEEP_TTL: u32 = 1 << 0;
/// [`Config::flags`]: socket-level load balancing translates only sockets
/// of the node's own network namespace ([`Config::host_netns`]), not pods'
/// (`--socket-lb=host`).
pub const CFG_F_SOCK_HOST_ONLY: u32 = 1 << 1;
/// [`Config::flags`]: every new flow takes a FIB lookup of its own rather
/// than its backend's [`NextHop`]. Set by the agent while an `ip rule`
/// selects routes by something a per-backend cache does not see (source
/// address or port, incoming interface, TOS, protocol, VRF).
pub const CFG_F_NO_NEXT_HOP_CACHE: u32 = 1 << 2;
/// [`Config::flags`]: some interface does not forward IPv4 (its
/// `net.ipv4.conf.<dev>.forwarding` is 0), so the FIB's answer depends on
/// the interface a packet came in on, and a [`NextHop`] is only used for
/// packets from the interface it was looked up from. Otherwise it serves
/// every interface (pods' veths share one entry per backend).
pub const CFG_F_NEXT_HOP_PER_INGRESS4: u32 = 1 << 3;
/// [`CFG_F_NEXT_HOP_PER_INGRESS4`] for IPv6.
pub const CFG_F_NEXT_HOP_PER_INGRESS6: u32 = 1 << 4;

/// The route to a backend as the new-flow path last looked it up (`NEXT_HOP`,
/// at `2 × backend id`, `+ 1` for TC): valid while `addr` is the backend's
/// address, `epoch` [`Config::route_epoch`], `filled_ns` less than
/// [`NEXT_HOP_TTL_NS`] old (what no notification announces, such as a learnt
/// path MTU, applies within that) and, under [`CFG_F_NEXT_HOP_PER_INGRESS4`]
/// / `6`, `ingress` the packet's interface. `filled_ns` is also the entry's
/// lock: a writer takes it by swapping it to 0 and stores it last; a reader
/// uses what it copied only if `filled_ns` was the same before and after.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_ktime_get_coarse_ns` at the fill; 0: never filled;
    /// [`NEXT_HOP_WRITING`] while being written.
    pub filled_ns: u64,
    /// The backend's address, network order, IPv4 mapped.
    pub addr: [u8; 16],
    pub ingress: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// Destination MAC, then source MAC.
    pub macs: [u8; 12],
    /// The route's MTU (IP packet bytes).
    pub mtu: u16,
    pub epoch: u16,
}

/// [`NextHop::filled_ns`] while a CPU writes the entry.
pub const NEXT_HOP_WRITING: u64 = u64::MAX;

/// How long a [`NextHop`] is used without a notification: one second, as a
/// conntrack entry's own cached route.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// SOCK_REV (LRU hash): what socket-level load balancing rewrote, so the
/// socket sees the service's address again where the kernel would show the
/// backend: `recvmsg` (the source of a UDP datagram) and `getpeername`.
/// Written at connect / sendmsg, deleted when the socket is released
/// (connected sockets; an unconnected UDP socket's entries age out).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// The backend the socket was sent to, network order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Backend port, network order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of SOCK_REV.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    /// The service address the socket asked for, network order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Service port, network order.
    pub port: u16,
    pub _pad: u16,
    /// Frontend id: the translation is undone only while REV_NAT still
    /// holds this address and port under this id.
    pub rev_nat_id: u32,
}

/// Socket-level load balancing's own client identity for sessionAffinity:
/// the netns cookie in an address no packet can carry as its source
/// (`ff58:4c42::/64` is multicast), so AFFINITY keeps one key per network
/// namespace, a pod's or the node's (a socket is not bound to its source
/// address when it connects).
#[inline(always)]
pub const fn netns_client(cookie: u64) -> [u8; 16] {
    let c = cookie.to_be_bytes();
    [0xff, 0x58, 0x4c, 0x42, 0, 0, 0, 0, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]
}

/// The netns cookie of an AFFINITY client written by socket-level load
/// balancing ([`netns_client`]), if it is one.
pub fn netns_of_client(a: &[u8; 16]) -> Option<u64> {
    (a[..8] == [0xff, 0x58, 0x4c, 0x42, 0, 0, 0, 0])
        .then(|| u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]))
}

/// VERDICTS (per-CPU array): reason → packets. Every packet a program sees is
/// counted under exactly one reason; `FIB_PASS` or `MTU_PASS` comes on top.
pub mod verdict {
    /// Not for a service and not a tracked reply: passed unchanged.
    pub const PASS: u32 = 0;
    /// New flow balanced (DNAT).
    pub const NEW_FLOW: u32 = 1;
    /// Existing flow forwarded by its conntrack entry.
    pub const CT_HIT: u32 = 2;
    /// Reply reverse-NATed.
    pub const REVERSE_NAT: u32 = 3;
    /// Service without a usable backend: TCP RST / ICMP unreachable sent back.
    pub const NO_BACKEND_REJECT: u32 = 4;
    /// Malformed header (truncated, bad length, bad extension chain, …): passed unchanged.
    pub const MALFORMED: u32 = 5;
    /// Non-first IP fragment of no datagram xlb translated (or arriving before
    /// its first fragment): passed unchanged.
    pub const FRAGMENT: u32 = 6;
    /// Conntrack insert failed: the flow went on by its consistent hash alone.
    pub const CT_FULL: u32 = 7;
    /// No free SNAT port after the bounded probe: dropped.
    pub const SNAT_EXHAUSTED: u32 = 8;
    /// Source not in loadBalancerSourceRanges: dropped.
    pub const SOURCE_RANGE_DROP: u32 = 9;
    /// A rewrite (NAT or reject) failed half-way (e.g. the packet could not be
    /// resized): dropped, never sent half-rewritten.
    pub const REWRITE_FAILED: u32 = 10;
    /// Counted *in addition* to the packet's reason: rewritten, but the FIB had
    /// no usable route or neighbour, so the kernel routes it (XDP_PASS / TC_ACT_OK).
    pub const FIB_PASS: u32 = 11;
    /// An ICMP / ICMPv6 error quoting a tracked flow, translated to follow
    /// it (outer destination, inner addresses and ports, every checksum).
    pub const ICMP_ERROR_NAT: u32 = 12;
    /// An ICMP / ICMPv6 error quoting no tracked flow: passed unchanged.
    pub const ICMP_ERROR_PASS: u32 = 13;
    /// IPv6 with a header xlb must not rewrite behind (a Routing header with
    /// segments left, AH, ESP): passed unchanged.
    pub const EXT_HEADER_PASS: u32 = 14;
    /// Too big for the egress MTU with DF set (or IPv6): answered with ICMP
    /// fragmentation needed / packet too big, before any rewrite.
    pub const FRAG_NEEDED: u32 = 15;
    /// A reject or packet-too-big answer not sent (the per-CPU rate limit):
    /// the packet was dropped.
    pub const REPLY_LIMITED: u32 = 16;
    /// Counted *in addition* to the packet's reason: too big for the egress
    /// MTU without DF, so it went to the kernel to be fragmented.
    pub const MTU_PASS: u32 = 17;
    /// A later fragment of a datagram whose first fragment xlb translated,
    /// given the same translation (addresses only: it has no L4 header).
    pub const FRAGMENT_NAT: u32 = 18;
    /// The program for a rarer path (ICMP error, later fragment, answer) is
    /// missing from the tail-call table (an agent stopped before it pinned
    /// the table): passed unchanged.
    pub const TAIL_CALL_FAILED: u32 = 19;
    /// A new flow to a service whose endpoints are all on other nodes
    /// under a Local policy (`SVC_F_NO_LOCAL_DROP`): dropped, as kube-proxy
    /// does, so the client retransmits.
    pub const NO_LOCAL_ENDPOINT_DROP: u32 = 20;
    // Socket-level load balancing (the cgroup programs) counts sockets
    // and messages, not packets, under these.
    /// A connect (TCP, connected UDP) or an unconnected UDP message to a
    /// service, sent straight to a backend.
    pub const SOCK_XLATE: u32 = 21;
    /// A connect / send to a service without a usable backend: failed with
    /// ECONNREFUSED (kube-proxy's REJECT).
    pub const SOCK_REJECT: u32 = 22;
    /// A connect / send to a service whose endpoints are all on other
    /// nodes under a Local policy: failed with EHOSTUNREACH.
    pub const SOCK_NO_LOCAL: u32 = 23;
    /// A received datagram or a peer address shown as the service again.
    pub const SOCK_REVERSE: u32 = 24;
    /// A connect / send to a service that socket-level load balancing
    /// leaves to the packet path (loadBalancerSourceRanges: the source is
    /// not known at connect).
    pub const SOCK_SKIP: u32 = 25;
    /// A new flow's first packet whose flow another CPU had just started
    /// (both packets missed conntrack at once): given that CPU's backend and
    /// SNAT port, so one flow has one translation.
    pub const CT_RACE: u32 = 26;
    /// As CT_RACE, but the other CPU was still writing its entry: dropped
    /// (the sender retransmits) rather than translated differently.
    pub const CT_RACE_DROP: u32 = 27;
    /// Counted *in addition* to the packet's reason: a TCP packet without
    /// SYN that found no conntrack entry and was balanced as a new flow
    /// (Katran's LRU_MISS): its entry was evicted or expired mid-connection.
    pub const CT_MISS_NON_SYN: u32 = 28;
    /// A new flow that needs SNAT found no room in conntrack (every record
    /// of its bucket established): dropped, since its reply could not be
    /// translated back. (Without SNAT such a flow goes on untracked: CT_FULL.)
    pub const CT_FULL_DROP: u32 = 29;
    /// An ARP request for a LoadBalancer address this node announces
    /// (L2_ADDRS) answered from XDP.
    pub const L2_ARP_REPLY: u32 = 30;
    /// A neighbour solicitation for such an address answered from XDP.
    pub const L2_NDP_REPLY: u32 = 31;
    /// A request for an address whose L2_ADDRS entry's deadline has passed
    /// (the Lease ran out with no agent to renew it): left to the kernel.
    /// Counted *in addition* to the packet's reason.
    pub const L2_EXPIRED: u32 = 32;
    /// Number of reasons (size of VERDICTS).
    pub const COUNT: u32 = 33;
    /// Names in index order, for `xlb dump stats` and the tests.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass",
        "new_flow",
        "ct_hit",
        "reverse_nat",
        "no_backend_reject",
        "malformed",
        "fragment",
        "ct_full",
        "snat_exhausted",
        "source_range_drop",
        "rewrite_failed",
        "fib_pass",
        "icmp_error_nat",
        "icmp_error_pass",
        "ext_header_pass",
        "frag_needed",
        "reply_limited",
        "mtu_pass",
        "fragment_nat",
        "tail_call_failed",
        "no_local_endpoint_drop",
        "sock_xlate",
        "sock_reject",
        "sock_no_local",
        "sock_reverse",
        "sock_skip",
        "ct_race",
        "ct_race_drop",
        "ct_miss_non_syn",
        "ct_full_drop",
        "l2_arp_reply",
        "l2_ndp_reply",
        "l2_expired",
    ];
}

/// L2_ADDRS (hash): an address this node announces on an interface (ARP,
/// NDP) → the MAC it answers with. Filled by the agent with the
/// LoadBalancer addresses it owns (issue #15).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L2Key {
    /// Network order, IPv4 mapped.
    pub addr: [u8; 16],
    pub ifindex: u32,
}

/// Value of L2_ADDRS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Value {
    pub mac: [u8; 6],
    pub _pad: u16,
    /// Answered only while `bpf_ktime_get_boot_ns()` is below this
    /// (CLOCK_BOOTTIME): the end of the Lease this node holds for the
    /// address, so an agent that dies or freezes stops answering by itself
    /// when its Lease runs out. `u64::MAX`: no Lease (`--manifests` mode).
    pub deadline_ns: u64,
}

impl L2Value {
    /// An entry that never expires.
    pub const fn forever(mac: [u8; 6]) -> Self {
        Self { mac, _pad: 0, deadline_ns: u64::MAX }
    }
}

/// Map names, shared by the programs and the loader.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SLOTS: &str = "SLOTS";
    pub const REV_NAT: &str = "REV_NAT";
    /// The LRU conntrack of xlb before issue #13: no longer created; an
    /// agent finding it pinned copies its flows into the table once and
    /// removes it (`agent::ct_migrate`).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// The conntrack table (`super::ct_table`), per family: index buckets
    /// and records, memory-mappable; the load-time globals `CT4_NB` and
    /// `CT6_NB` give their forward buckets.
    pub const CT4_INDEX: &str = "CT4_INDEX";
    pub const CT4_RECORDS: &str = "CT4_RECORDS";
    pub const CT6_INDEX: &str = "CT6_INDEX";
    pub const CT6_RECORDS: &str = "CT6_RECORDS";
    /// Active connections per backend id (u64, memory-mappable).
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    /// Per-CPU counters of `super::ct_table::event`.
    pub const CT_EVENTS: &str = "CT_EVENTS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const RR_CURSOR: &str = "RR_CURSOR";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const CONFIG: &str = "CONFIG";
    pub const FRONTENDS: &str = "FRONTENDS";
    pub const SOCK_REV: &str = "SOCK_REV";
    /// Socket-LB's counted TCP sockets: cookie → backend id, so that
    /// `sock_release` takes back the BACKEND_CONNS count `connect` added.
    pub const SOCK_CONNS: &str = "SOCK_CONNS";
    /// The addresses announced on L2 (`super::L2Key`). Not pinned: each
    /// agent fills its programs' copy at its first sync. While no agent
    /// runs the programs answer from it until each entry's deadline (a
    /// Lease's end; never for `--manifests` mode's entries).
    pub const L2_ADDRS: &str = "L2_ADDRS";
    /// Not pinned with the others: see [`super::FragKey`].
    pub const FRAGS: &str = "FRAGS";
    /// The "maybe ours" filter ([`super::filter`]). Not pinned: every agent
    /// rebuilds it from SERVICES and BACKENDS when it loads its programs,
    /// which use their own copy from then on.
    pub const FILTER: &str = "FILTER";
    /// The per-backend next-hop cache ([`super::NextHop`]). Not pinned: a
    /// cache, refilled by the first new flow to each backend.
    pub const NEXT_HOP: &str = "NEXT_HOP";
    /// The tail-call tables (see [`super::tail`]): replaced by every agent
    /// that loads new programs, pinned under `progs/` once they are attached.
    pub const XDP_CALLS: &str = "XDP_CALLS";
    pub const TC_CALLS: &str = "TC_CALLS";
    /// Every map the loader pins, in load order.
    pub const PINNED: [&str; 20] = [
        SERVICES,
        BACKENDS,
        SLOTS,
        REV_NAT,
        CT4_INDEX,
        CT4_RECORDS,
        CT6_INDEX,
        CT6_RECORDS,
        BACKEND_CONNS,
        CT_EVENTS,
        AFFINITY,
        SOURCE_RANGES,
        RR_CURSOR,
        SERVICE_STATS,
        BACKEND_STATS,
        VERDICTS,
        CONFIG,
        FRONTENDS,
        SOCK_REV,
        SOCK_CONNS,
    ];
}

/// The tail-call tables. Each hook's main program handles the packets of
/// established and new flows itself and tail-calls a program of its own for
/// the rarer paths, so that each program stays within the verifier's budget
/// (one million instructions explored per program). XDP programs use
/// `XDP_CALLS`; the TC ingress programs `TC_CALLS` from 0, the TC egress ones
/// from [`tail::PER_HOOK`].
pub mod tail {
    /// An ICMP / ICMPv6 error (`icmp.rs`).
    pub const ICMP_ERROR: u32 = 0;
    /// A later fragment (`fragment.rs`).
    pub const FRAGMENT: u32 = 1;
    /// A packet of no live tracked flow: service lookup and balancing.
    pub const NEW_FLOW: u32 = 2;
    /// A reject or packet-too-big answer (`reject.rs`).
    pub const ANSWER: u32 = 3;
    /// Slots per hook.
    pub const PER_HOOK: u32 = 4;
    /// The programs of each hook, by slot, after the main program's name.
    pub const SUFFIXES: [&str; PER_HOOK as usize] = ["_icmp_error", "_fragment", "_new_flow", "_answer"];
    /// (main program, its table, its first slot).
    pub const HOOKS: [(&str, &str, u32); 3] = [
        ("xlb_xdp", super::maps::XDP_CALLS, 0),
        ("xlb_tc_ingress", super::maps::TC_CALLS, 0),
        ("xlb_tc_egress", super::maps::TC_CALLS, PER_HOOK),
    ];
}

const _: () = {
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragPorts>() == 4);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<Service>() == 28);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<RevNat>() == 20);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtEntry>() == 56);
    assert!(core::mem::size_of::<AffinityKey>() == 20);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<SourceRangeKey>() == 20);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<Config>() == 56);
    assert!(core::mem::size_of::<SockRevKey>() == 32);
    assert!(core::mem::size_of::<SockRevValue>() == 24);
    assert!(core::mem::size_of::<FrontendInfo>() == 124);
    assert!(core::mem::size_of::<PktgenConfig>() == 104);
};

/// Largest header template of the traffic generator: Ethernet + IPv6 + TCP.
pub const PKTGEN_HDR_MAX: usize = 80;

/// The traffic generator's configuration (the `PKTGEN` map of the bench
/// object, one entry). Every packet gets the template headers written anew
/// (the live-frames pages come back with the receivers' rewrites), then its
/// flow's source port and address; the checksums are adjusted incrementally.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PktgenConfig {
    /// Ethernet + IP + L4 headers of flow 0, checksums complete.
    pub hdr: [u8; PKTGEN_HDR_MAX],
    /// 42 (IPv4 UDP), 54 (IPv4 TCP), 62 (IPv6 UDP) or 74 (IPv6 TCP).
    pub hdr_len: u32,
    /// Distinct flows, ≥ 1: packet n belongs to flow n mod flows.
    pub flows: u32,
    /// Offsets in the frame: the last 4 bytes of the source address, the
    /// source port, the IPv4 header checksum (0 for IPv6), the L4 checksum.
    pub src_off: u16,
    pub sport_off: u16,
    pub ip_csum_off: u16,
    pub l4_csum_off: u16,
    /// Flow i uses source port `sport_base + i % sport_span` and source
    /// address + `i / sport_span` (host order).
    pub sport_base: u16,
    pub sport_span: u16,
    /// 1: UDP over IPv4, whose zero checksum means "none" (RFC 768).
    pub udp_v4: u32,
}

impl PktgenConfig {
    pub const ZERO: Self = Self {
        hdr: [0; PKTGEN_HDR_MAX],
        hdr_len: 0,
        flows: 1,
        src_off: 0,
        sport_off: 0,
        ip_csum_off: 0,
        l4_csum_off: 0,
        sport_base: 0,
        sport_span: 1,
        udp_v4: 0,
    };
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] structs of integers and byte
    // arrays with explicit padding, valid for every bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for ct_table::CtBucket {}
    unsafe impl aya::Pod for ct_table::CtRecord4 {}
    unsafe impl aya::Pod for ct_table::CtRecord6 {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FrontendInfo {}
    unsafe impl aya::Pod for PktgenConfig {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for L2Key {}
    unsafe impl aya::Pod for L2Value {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
}
