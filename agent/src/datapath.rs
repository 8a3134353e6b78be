// SPDX-License-Identifier: MIT OR Apache-2.0
//! Loading the embedded eBPF object and writing its maps.
//!
//! [`Datapath`] is the only writer of the datapath's maps. It applies every
//! change in make-before-break order: backends first, then a freshly written
//! SLOTS region, then the SERVICES entry that points at it (the "flip"), and
//! only then the old region is released. A reader in the kernel therefore
//! never sees a count or a table that points at unwritten entries.

use std::{
    collections::HashMap,
    net::IpAddr,
    ops::Deref,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, ProgramArray, lpm_trie::Key},
    programs::Program,
    util::nr_cpus,
};
use datapath_common::{
    AffinityKey, AffinityValue, Backend, Config, CtEntry, CtKey, FrontendInfo, L2Key, L2Value, NextHop, RevNat,
    SCHED_MAGLEV, SCHED_RANDOM, SCHED_SOURCE_HASH, SCHED_WEIGHTED_LC, SCHED_WEIGHTED_RR, Service, ServiceKey,
    SockRevKey, SourceRangeKey,
    ct_table::{WAYS, buckets_for},
    maps, tail, v4_mapped,
};

use crate::{
    filter::{Dir, Filter},
    maglev,
    mapped::Mapped,
    region::{Allocator, Region},
    sequence,
};

mod handles;
pub use handles::Maps;
use handles::{open_pin, replaceable};

/// The eBPF object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));

/// A handle on L2_ADDRS of its own ([`Datapath::l2_map`]).
pub type L2Map = BpfHashMap<MapData, L2Key, L2Value>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("SLOTS is full: {needed} entries needed, {available} free of {capacity}")]
    SlotsFull { needed: u32, available: u32, capacity: u32 },
    #[error("backend id {0} is out of range (1..{1})")]
    BackendId(u32, u32),
    #[error("service id {0} is out of range (0..{1})")]
    ServiceId(u32, u32),
    #[error("service references backend {0}, which was never written")]
    UnknownBackend(u32),
    #[error("Maglev table size {0} is not a prime")]
    MaglevSize(u32),
    #[error("{weights} weights for {backends} backends (need one per backend, each above 0)")]
    Weights { weights: usize, backends: usize },
    #[error("bad source range {0}")]
    SourceRange(String),
    #[error(
        "pinned map {path} has key/value size {found:?}, this xlb expects {expected:?}: it was left by an \
         incompatible version; remove it with `xlb agent --cleanup` (this breaks open connections)"
    )]
    Incompatible { path: PathBuf, found: (u32, u32), expected: (u32, u32) },
    #[error("pinned map {path}: {source}")]
    Pin { path: PathBuf, source: MapError },
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(String),
    #[error("adding {name} to its tail-call table: {source}")]
    TailCall { name: String, source: MapError },
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// Map sizes, chosen by the loader (never hard-coded in the programs).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// SERVICES entries, and the number of frontend ids (REV_NAT, RR_CURSOR, SERVICE_STATS).
    pub services: u32,
    /// Backend ids (BACKENDS, BACKEND_STATS); id 0 is reserved.
    pub backends: u32,
    /// SLOTS entries shared by all services' lists and Maglev tables.
    pub slots: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub source_ranges: u32,
    /// FRAGS: fragmented datagrams in flight whose later fragments follow the first.
    pub fragments: u32,
    /// SOCK_REV: socket-LB reverse translations (one per connected socket,
    /// one per backend an unconnected UDP socket sent to).
    pub sock_rev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 65_536,
            backends: 65_536,
            slots: 1 << 22,
            conntrack: 262_144,
            affinity: 65_536,
            source_ranges: 16_384,
            fragments: 8192,
            sock_rev: 65_536,
        }
    }
}

/// What a frontend should look like; see [`Datapath::set_service`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Frontend id, unique per SERVICES key.
    pub id: u32,
    pub scheduler: u8,
    /// `SVC_F_*`.
    pub flags: u8,
    pub affinity_timeout_s: u32,
    /// Backend ids eligible for new flows (active ones; terminating backends
    /// are left out but stay in BACKENDS so their flows drain).
    pub backends: Vec<u32>,
    /// Their weights (all above 0), reduced by their gcd
    /// ([`sequence::reduce`]); empty when they are equal or the scheduler
    /// ignores them.
    pub weights: Vec<u16>,
    /// Maglev table size (`mh`, `sh`); `None` picks [`maglev::size_for`].
    pub maglev_size: Option<u32>,
}

impl ServiceSpec {
    /// The SLOTS region's parts: the weights (stored when there are any,
    /// for `wlc`'s comparison and so a restarted agent recovers them) and
    /// the scheduler's table (Maglev table, or weighted sequence).
    fn region_parts(&self, backends: &HashMap<u32, Backend>) -> Result<(Vec<u32>, Vec<u32>)> {
        let n = self.backends.len();
        if !self.weights.is_empty() && (self.weights.len() != n || self.weights.contains(&0)) {
            return Err(Error::Weights { weights: self.weights.len(), backends: n });
        }
        let weight = |i: usize| self.weights.get(i).copied().unwrap_or(1);
        let weights: Vec<u32> = self.weights.iter().map(|w| *w as u32).collect();
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let table = match self.scheduler {
            SCHED_MAGLEV | SCHED_SOURCE_HASH => {
                let mut entries = Vec::with_capacity(n);
                for (i, id) in self.backends.iter().enumerate() {
                    let b = backends.get(id).ok_or(Error::UnknownBackend(*id))?;
                    // `sh` keys a backend by its address alone: every port
                    // of a Service builds the same table, so one client
                    // reaches one pod on all of them.
                    let key = if self.scheduler == SCHED_SOURCE_HASH {
                        b.addr.to_vec()
                    } else {
                        maglev::backend_key(&b.addr, b.port)
                    };
                    entries.push(maglev::Entry { key, id: *id, weight: weight(i) });
                }
                let m = self.maglev_size.unwrap_or_else(|| maglev::size_for(n));
                if maglev::next_prime(m) != m {
                    return Err(Error::MaglevSize(m));
                }
                maglev::build(&entries, m)
            }
            _ if weights.is_empty() => Vec::new(),
            SCHED_WEIGHTED_RR | SCHED_RANDOM | SCHED_WEIGHTED_LC => sequence::build(&self.weights),
            _ => Vec::new(),
        };
        Ok((weights, table))
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Deref for Datapath {
    type Target = Maps;

    fn deref(&self) -> &Maps {
        &self.maps
    }
}

/// SLOTS mapped into our memory (the map is `BPF_F_MMAPABLE`): a region is
/// written with plain stores.
struct SlotsMem {
    mem: Mapped,
    len: usize,
}

impl SlotsMem {
    /// Maps `entries` u32s of the array map `fd`; `None` if the map is not
    /// mappable (e.g. pinned by an older agent).
    fn map(fd: std::os::fd::BorrowedFd<'_>, entries: u32) -> Option<Self> {
        let mem = Mapped::map(fd, entries as usize * SLOT_STRIDE * 4)?;
        Some(Self { mem, len: entries as usize })
    }

    fn write(&mut self, off: u32, values: &[u32]) -> bool {
        let off = off as usize;
        if off + values.len() > self.len {
            return false;
        }
        for (i, v) in values.iter().enumerate() {
            self.mem.store((off + i) * SLOT_STRIDE * 4, *v);
        }
        // The region must be visible before the SERVICES flip that follows.
        self.mem.publish();
        true
    }
}

/// An array map stores each value in 8 bytes (value size rounded up to 8):
/// slot i of SLOTS is the `u32` at index 2i of the mapping.
const SLOT_STRIDE: usize = 2;

/// `BPF_MAP_UPDATE_BATCH` of `values` into a `u32` array at keys `off..`.
fn update_batch_u32(fd: std::os::fd::BorrowedFd<'_>, off: u32, values: &[u32]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let keys: Vec<u32> = (off..off + values.len() as u32).collect();
    let mut done = 0usize;
    while done < values.len() {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (values.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at live key and value buffers of `count`
        // elements of the map's key and value size (4 bytes each).
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The kernel reports how many it wrote; a short write continues.
        if attr.count == 0 {
            return Err(std::io::Error::other("batch update wrote nothing"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

/// An address in the 16-byte form every map uses (IPv4 mapped).
pub fn map_addr(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn source_range_key(id: u32, addr: IpAddr, prefix: u8) -> Result<Key<SourceRangeKey>> {
    let bits = match addr {
        IpAddr::V4(_) if prefix <= 32 => 96 + prefix as u32,
        IpAddr::V6(_) if prefix <= 128 => prefix as u32,
        _ => return Err(Error::SourceRange(format!("{addr}/{prefix}"))),
    };
    Ok(Key::new(32 + bits, SourceRangeKey { service_id_be: id.to_be(), addr: map_addr(addr) }))
}

/// Maps this object's FILTER and lists every frontend and backend the
/// (possibly pinned) maps already hold, so the new programs pass no packet
/// of a flow that exists.
fn filter(ebpf: &Ebpf, maps: &Maps) -> Result<Filter> {
    let fd = match ebpf.map(maps::FILTER) {
        Some(aya::maps::Map::Array(d)) => d.fd().as_fd(),
        _ => return Err(Error::MissingMap(maps::FILTER)),
    };
    let mem = Mapped::map(fd, size_of::<datapath_common::filter::FlowFilter>()).ok_or_else(|| Error::Map {
        name: maps::FILTER,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error: std::io::Error::last_os_error(),
        }),
    })?;
    let mut filter = Filter::new(mem);
    filter.rebuild(
        maps.services().into_iter().map(|(k, _)| (k.addr, k.port)),
        maps.backends().into_iter().map(|(_, b)| (b.addr, b.port)),
    );
    Ok(filter)
}

/// A loaded datapath: the programs (not attached) and typed handles on every map.
pub struct Datapath {
    pub ebpf: Ebpf,
    maps: Maps,
    sizes: MapSizes,
    alloc: Allocator,
    /// SLOTS mapped into memory, when the map allows it.
    slots_mem: Option<SlotsMem>,
    /// Where each frontend's current region is.
    regions: HashMap<ServiceKey, Region>,
    /// Backends as written, for the Maglev keys.
    backends: HashMap<u32, Backend>,
    /// The "maybe ours" filter, rebuilt from SERVICES and BACKENDS at load.
    filter: Filter,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl Datapath {
    /// Loads the embedded object with the given map sizes (nothing is attached).
    pub fn load(sizes: MapSizes) -> Result<Self> {
        Self::load_pinned(sizes, None)
    }

    /// Loads the embedded object, with its maps pinned under `pin_dir`.
    /// Maps already pinned there (by an earlier agent) are reused, state
    /// and size included, after their key and value sizes are checked; the
    /// others are created and pinned. Call [`Datapath::recover`] next to
    /// pick up the services and backends they hold.
    pub fn load_pinned(mut sizes: MapSizes, pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let mut paths = Vec::new();
        // Forward buckets of the conntrack tables: the pinned ones' own, or
        // as many as `sizes.conntrack` entries need (two per flow).
        let (mut nb4, mut nb6) = (None, None);
        if let Some(dir) = pin_dir {
            for name in maps::PINNED {
                let path = dir.join(name);
                if path.exists() && replaceable(dir, name) {
                    tracing::info!(
                        map = name,
                        "pinned map from an older datapath; replacing it (it holds no flow state)"
                    );
                    let _ = std::fs::remove_file(&path);
                }
                if path.exists() {
                    let max = open_pin(dir, name)?.info().map_err(map_err(name))?.max_entries();
                    match name {
                        maps::SERVICES => sizes.services = max,
                        maps::BACKENDS => sizes.backends = max,
                        maps::SLOTS => sizes.slots = max,
                        maps::CT4_INDEX => {
                            sizes.conntrack = max / 3 * WAYS as u32 * 2;
                            nb4 = Some(max / 3);
                        }
                        maps::CT6_INDEX => nb6 = Some(max / 3),
                        maps::AFFINITY => sizes.affinity = max,
                        maps::SOURCE_RANGES => sizes.source_ranges = max,
                        maps::SOCK_REV => sizes.sock_rev = max,
                        _ => {}
                    }
                }
                paths.push((name, path));
            }
        }
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let nb4: u32 = nb4.unwrap_or(buckets_for(sizes.conntrack));
        let nb6: u32 = nb6.unwrap_or(buckets_for(sizes.conntrack));
        let mut ebpf = loader
            .map_max_entries(maps::SERVICES, sizes.services)
            .map_max_entries(maps::REV_NAT, sizes.services)
            .map_max_entries(maps::RR_CURSOR, sizes.services)
            .map_max_entries(maps::SERVICE_STATS, sizes.services)
            .map_max_entries(maps::BACKENDS, sizes.backends)
            .map_max_entries(maps::BACKEND_STATS, sizes.backends)
            .map_max_entries(maps::SLOTS, sizes.slots)
            .map_max_entries(maps::CT4_INDEX, 3 * nb4)
            .map_max_entries(maps::CT4_RECORDS, WAYS as u32 * nb4)
            .map_max_entries(maps::CT6_INDEX, 3 * nb6)
            .map_max_entries(maps::CT6_RECORDS, WAYS as u32 * nb6)
            .map_max_entries(maps::BACKEND_CONNS, sizes.backends)
            .override_global("CT4_NB", &nb4, true)
            .override_global("CT6_NB", &nb6, true)
            .map_max_entries(maps::AFFINITY, sizes.affinity)
            .map_max_entries(maps::SOURCE_RANGES, sizes.source_ranges)
            .map_max_entries(maps::FRONTENDS, sizes.services)
            .map_max_entries(maps::FRAGS, sizes.fragments)
            .map_max_entries(maps::SOCK_REV, sizes.sock_rev)
            .map_max_entries(maps::SOCK_CONNS, sizes.sock_rev)
            .map_max_entries(maps::NEXT_HOP, sizes.backends.saturating_mul(2))
            .load(OBJECT)?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let filter = filter(&ebpf, &maps)?;
        Ok(Self {
            ebpf,
            maps,
            sizes,
            alloc: Allocator::new(sizes.slots),
            slots_mem: None,
            regions: HashMap::new(),
            backends: HashMap::new(),
            filter,
        })
    }

    /// True when FILTER lets packets to (`Dir::Dst`) or from (`Dir::Src`)
    /// `addr:port` (network order) through to conntrack and the service lookup.
    pub fn filter_passes(&self, dir: Dir, addr: &[u8; 16], port_be: u16) -> bool {
        self.filter.passes(dir, addr, port_be)
    }

    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Loads (verifies) every program of the object and fills the
    /// tail-call tables (`datapath_common::tail`) with them.
    pub fn load_programs(&mut self) -> Result<()> {
        self.load_programs_where(|_| true)
    }

    /// As [`Datapath::load_programs`], for the programs whose name `pick`
    /// accepts (tests verify only the hook they run: the verifier's time is
    /// most of a datapath's load).
    pub fn load_programs_where(&mut self, pick: impl Fn(&str) -> bool) -> Result<()> {
        self.verify_programs(&pick)?;
        let programs = tail::HOOKS.iter().flat_map(|&(main, table, first)| {
            tail::SUFFIXES
                .iter()
                .enumerate()
                .map(move |(i, suffix)| (table, first + i as u32, format!("{main}{suffix}")))
        });
        for (table, slot, name) in programs.filter(|(_, _, name)| pick(name)) {
            let prog = self.ebpf.program(&name).ok_or_else(|| Error::MissingProgram(name.clone()))?;
            let fd = prog.fd()?.try_clone().map_err(|io_error| Error::TailCall {
                name: name.clone(),
                source: MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }),
            })?;
            let map = self.ebpf.map_mut(table).ok_or(Error::MissingMap(table))?;
            let mut calls = ProgramArray::try_from(map).map_err(map_err(table))?;
            calls.set(slot, &fd, 0).map_err(|source| Error::TailCall { name, source })?;
        }
        Ok(())
    }

    /// Copies the live flows of the LRU conntrack an xlb from before the
    /// table left pinned under `pin_dir` (`Conntrack::migrate_lru`); with
    /// `remove`, removes that pin afterwards. The agent copies twice: before
    /// it attaches the new programs (the old ones still run), and once they
    /// run, removing the pin (the flows the old programs created meanwhile;
    /// those already copied are found in place). `Ok(None)`: no such pin.
    pub fn copy_lru_conntrack(&self, pin_dir: &Path, remove: bool) -> Result<Option<crate::ct_table::Migrated>> {
        let backend = |id| self.maps.backend(id).map(|b| (b.addr, b.port));
        self.maps.conntrack.migrate_lru(&pin_dir.join(maps::CONNTRACK), backend, remove)
    }

    /// Instructions the verifier walked for each loaded program (the
    /// kernel's `verified_insns`; its limit is 1,000,000), by name.
    pub fn verified_instructions(&self) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| Some((name.to_string(), p.info().ok()?.verified_instruction_count()?)))
            .collect();
        out.sort();
        out
    }

    /// Pins the tail-call tables under `progs/`, replacing an earlier
    /// agent's. A table is emptied when its last pin or descriptor goes, so
    /// this comes after the new programs are attached: until then the old
    /// programs still run with the old tables.
    pub fn pin_tail_calls(&mut self, dir: &Path) -> Result<()> {
        for name in [maps::XDP_CALLS, maps::TC_CALLS] {
            let path = dir.join("progs").join(name);
            let _ = std::fs::remove_file(&path);
            let map = self.ebpf.map(name).ok_or(Error::MissingMap(name))?;
            let data = match map {
                aya::maps::Map::ProgramArray(d) => d,
                _ => return Err(Error::MissingMap(name)),
            };
            data.pin(&path)
                .map_err(|error| Error::Pin { path: path.clone(), source: MapError::PinError { name: None, error } })?;
        }
        Ok(())
    }

    /// Like libbpf, retries a load the verifier abandoned with EAGAIN (it
    /// gives up when a signal is pending, e.g. a child process exiting
    /// during a long verification).
    fn verify_programs(&mut self, pick: &impl Fn(&str) -> bool) -> Result<()> {
        // (A program loaded earlier keeps its descriptor: `fd` is Ok.)
        for (name, prog) in self.ebpf.programs_mut().filter(|(name, p)| pick(name) && p.fd().is_err()) {
            let mut tries = 0;
            loop {
                let r = match prog {
                    Program::Xdp(p) => p.load(),
                    Program::SchedClassifier(p) => p.load(),
                    Program::CgroupSockAddr(p) => p.load(),
                    Program::CgroupSock(p) => p.load(),
                    _ => Ok(()),
                };
                match r {
                    Err(aya::programs::ProgramError::LoadError { io_error, .. })
                        if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 20 =>
                    {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10 * tries));
                    }
                    Err(e) => {
                        eprintln!("loading {name} failed after {tries} EAGAIN retries");
                        if let aya::programs::ProgramError::LoadError { io_error, verifier_log } = &e {
                            eprintln!("{io_error}\n{verifier_log}");
                        }
                        return Err(e.into());
                    }
                    Ok(()) => break,
                }
            }
        }
        Ok(())
    }

    /// A program of the object by name (`xlb_xdp`, `xlb_tc_ingress`, …).
    pub fn program(&self, name: &str) -> Option<&Program> {
        self.ebpf.program(name)
    }

    /// As [`Datapath::program`], to attach or detach it.
    pub fn program_mut(&mut self, name: &str) -> Option<&mut Program> {
        self.ebpf.program_mut(name)
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.maps.config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
    }

    /// Announces `key`'s address on its interface with `value`'s MAC (L2_ADDRS).
    pub fn set_l2(&mut self, key: &L2Key, value: &L2Value) -> Result<()> {
        let map = self.ebpf.map_mut(maps::L2_ADDRS).ok_or(Error::MissingMap(maps::L2_ADDRS))?;
        let mut m: BpfHashMap<&mut MapData, L2Key, L2Value> =
            BpfHashMap::try_from(map).map_err(map_err(maps::L2_ADDRS))?;
        m.insert(key, value, 0).map_err(map_err(maps::L2_ADDRS))
    }

    /// A handle of its own on L2_ADDRS (a duplicate of the map's fd), for
    /// the L2 announcer, which runs apart from the task owning `self`.
    pub fn l2_map(&self) -> Result<L2Map> {
        let map = self.ebpf.map(maps::L2_ADDRS).ok_or(Error::MissingMap(maps::L2_ADDRS))?;
        let data: &MapData = match map {
            aya::maps::Map::HashMap(d) => d,
            _ => return Err(Error::MissingMap(maps::L2_ADDRS)),
        };
        let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| map_err(maps::L2_ADDRS)(MapError::from(e)))?;
        let data = MapData::from_fd(fd).map_err(map_err(maps::L2_ADDRS))?;
        BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(maps::L2_ADDRS))
    }

    /// Stops announcing `key` (no error when it was not announced).
    pub fn remove_l2(&mut self, key: &L2Key) -> Result<()> {
        let map = self.ebpf.map_mut(maps::L2_ADDRS).ok_or(Error::MissingMap(maps::L2_ADDRS))?;
        let mut m: BpfHashMap<&mut MapData, L2Key, L2Value> =
            BpfHashMap::try_from(map).map_err(map_err(maps::L2_ADDRS))?;
        match m.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::L2_ADDRS)(e)),
        }
    }

    /// Backend `id`'s next-hop cache entry for XDP (`tc` false) or TC, as
    /// the new-flow path left it (see `datapath_common::NextHop`).
    pub fn next_hop(&self, id: u32, tc: bool) -> Result<NextHop> {
        let map = self.ebpf.map(maps::NEXT_HOP).ok_or(Error::MissingMap(maps::NEXT_HOP))?;
        let a: Array<&MapData, NextHop> = Array::try_from(map).map_err(map_err(maps::NEXT_HOP))?;
        a.get(&(id * 2 + tc as u32), 0).map_err(map_err(maps::NEXT_HOP))
    }

    /// Writes (or overwrites) backend `id`. Write backends before any
    /// service that lists them.
    pub fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        if id == 0 || id >= self.sizes.backends {
            return Err(Error::BackendId(id, self.sizes.backends));
        }
        self.filter.add(Dir::Src, &b.addr, b.port);
        if let Err(e) = self.maps.backends.set(id, b, 0) {
            self.filter.remove(Dir::Src, &b.addr, b.port);
            return Err(map_err(maps::BACKENDS)(e));
        }
        if let Some(old) = self.backends.insert(id, *b) {
            self.filter.remove(Dir::Src, &old.addr, old.port);
        }
        Ok(())
    }

    /// Programs frontend `key`: writes the reverse-NAT entry and a fresh
    /// region, flips the SERVICES entry to it, then releases the old region.
    pub fn set_service(&mut self, key: ServiceKey, spec: &ServiceSpec) -> Result<()> {
        if spec.id >= self.sizes.services {
            return Err(Error::ServiceId(spec.id, self.sizes.services));
        }
        for id in &spec.backends {
            self.backends.get(id).ok_or(Error::UnknownBackend(*id))?;
        }
        let (weights, table) = spec.region_parts(&self.backends)?;
        let count = spec.backends.len() as u32;
        let len = count + weights.len() as u32 + table.len() as u32;
        let region = self.alloc.alloc(len).ok_or(Error::SlotsFull {
            needed: len,
            available: self.alloc.available(),
            capacity: self.alloc.capacity(),
        })?;
        let written = self.write_region(region, &[&spec.backends, &weights, &table]);
        if let Err(e) = written {
            self.alloc.release(region);
            return Err(e);
        }
        self.maps
            .rev_nat
            .set(spec.id, RevNat { addr: key.addr, port: key.port, _pad: 0 }, 0)
            .map_err(map_err(maps::REV_NAT))?;
        let value = Service {
            id: spec.id,
            count,
            scheduler: spec.scheduler,
            flags: spec.flags,
            _pad: 0,
            list_off: region.off,
            table_off: region.off + count + weights.len() as u32,
            table_len: table.len() as u32,
            affinity_timeout_s: spec.affinity_timeout_s,
        };
        // A frontend counts once however often it is rewritten: only a new
        // key (no region yet) adds a reference to its port.
        let new = !self.regions.contains_key(&key);
        if new {
            self.filter.add(Dir::Dst, &key.addr, key.port);
        }
        if let Err(e) = self.maps.services.insert(key, value, 0) {
            self.alloc.release(region);
            if new {
                self.filter.remove(Dir::Dst, &key.addr, key.port);
            }
            return Err(map_err(maps::SERVICES)(e));
        }
        if let Some(old) = self.regions.insert(key, region) {
            self.alloc.release(old);
        }
        Ok(())
    }

    /// Writes a region's parts (list, weights, table): plain stores into the mapped map,
    /// or (a map that cannot be mapped) one `BPF_MAP_UPDATE_BATCH` (Linux
    /// ≥ 5.6) instead of a syscall per slot, or single updates.
    fn write_region(&mut self, region: Region, parts: &[&[u32]]) -> Result<()> {
        let values: Vec<u32> = parts.concat();
        if values.is_empty() {
            return Ok(());
        }
        use aya::maps::IterableMap as _;
        if self.slots_mem.is_none() {
            self.slots_mem = SlotsMem::map(self.maps.slots.map().fd().as_fd(), self.sizes.slots);
        }
        if let Some(m) = self.slots_mem.as_mut()
            && m.write(region.off, &values)
        {
            return Ok(());
        }
        match update_batch_u32(self.maps.slots.map().fd().as_fd(), region.off, &values) {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
            Err(e) => {
                return Err(Error::Map {
                    name: maps::SLOTS,
                    source: MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_batch",
                        io_error: e,
                    }),
                });
            }
        }
        for (i, id) in values.iter().enumerate() {
            self.maps.slots.set(region.off + i as u32, id, 0).map_err(map_err(maps::SLOTS))?;
        }
        Ok(())
    }

    /// Removes frontend `key` and releases its region.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        match self.maps.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::SERVICES)(e)),
        }
        if let Some(r) = self.regions.remove(key) {
            self.alloc.release(r);
            self.filter.remove(Dir::Dst, &key.addr, key.port);
        }
        Ok(())
    }

    /// Marks backend `id` unused (`BACKEND_EMPTY`): flows still pinned to
    /// it pick a new backend. Remove it from every service first.
    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        if id == 0 || id >= self.sizes.backends {
            return Err(Error::BackendId(id, self.sizes.backends));
        }
        self.maps.backends.set(id, Backend::default(), 0).map_err(map_err(maps::BACKENDS))?;
        if let Some(old) = self.backends.remove(&id) {
            self.filter.remove(Dir::Src, &old.addr, old.port);
        }
        Ok(())
    }

    pub fn set_frontend_info(&mut self, id: u32, info: &FrontendInfo) -> Result<()> {
        self.maps.frontends.insert(id, info, 0).map_err(map_err(maps::FRONTENDS))
    }

    pub fn remove_frontend_info(&mut self, id: u32) -> Result<()> {
        match self.maps.frontends.remove(&id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::FRONTENDS)(e)),
        }
    }

    /// Rebuilds the writer's bookkeeping (SLOTS regions, written backends)
    /// from the maps, after [`Datapath::load_pinned`] reused pinned maps.
    /// Returns the number of services and backends found.
    pub fn recover(&mut self) -> Result<(usize, usize)> {
        let services = self.maps.services();
        for (key, svc) in &services {
            // List, weights (if any) and table are one run from `list_off`.
            let end = (svc.list_off + svc.count).max(svc.table_off + svc.table_len);
            let region = Region { off: svc.list_off, len: end - svc.list_off };
            if self.alloc.reserve(region) {
                self.regions.insert(*key, region);
            }
        }
        let backends = self.maps.backends();
        self.backends = backends.iter().copied().collect();
        // `load_pinned` listed every pinned frontend and backend in FILTER;
        // from here on the counts follow `regions` and `backends`.
        self.filter
            .rebuild(self.regions.keys().map(|k| (k.addr, k.port)), self.backends.values().map(|b| (b.addr, b.port)));
        Ok((services.len(), backends.len()))
    }

    /// Disallows a source prefix added by [`Datapath::add_source_range`].
    pub fn remove_source_range(&mut self, id: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        let key = source_range_key(id, addr, prefix)?;
        match self.maps.source_ranges.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::SOURCE_RANGES)(e)),
        }
    }

    /// Allows `addr/prefix` as a source for frontend `id` (loadBalancerSourceRanges).
    pub fn add_source_range(&mut self, id: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        let key = source_range_key(id, addr, prefix)?;
        self.maps.source_ranges.insert(&key, 1, 0).map_err(map_err(maps::SOURCE_RANGES))
    }

    /// Removes a socket-LB reverse entry; absent is not an error.
    pub fn sock_rev_remove(&mut self, key: &SockRevKey) -> Result<()> {
        match self.maps.sock_rev.as_mut().map(|m| m.remove(key)) {
            None | Some(Ok(())) | Some(Err(MapError::KeyNotFound)) => Ok(()),
            Some(Err(e)) => Err(map_err(maps::SOCK_REV)(e)),
        }
    }

    /// Writes a live flow as the datapath would, from its forward entry
    /// (`e` at `key`; its backend from BACKENDS): for tests that need a flow
    /// in a given state.
    pub fn conntrack_insert(&mut self, key: &CtKey, e: &CtEntry) -> Result<()> {
        let b = self.maps.backend(e.backend_id).ok_or(Error::MissingMap(maps::BACKENDS))?;
        if self.maps.conntrack.insert(key, e, &b.addr, b.port) == datapath_common::ct_ops::outcome::WON {
            Ok(())
        } else {
            Err(Error::Map { name: maps::CT4_INDEX, source: MapError::KeyNotFound })
        }
    }

    /// Removes the flow with forward or reply tuple `key` (both its
    /// entries); absent is not an error.
    pub fn conntrack_remove(&mut self, key: &CtKey) -> Result<()> {
        self.maps.conntrack.remove(key);
        Ok(())
    }

    /// Removes every flow one of whose entries `drop` picks; returns how
    /// many entries went (two per flow). Flows come and go meanwhile.
    pub fn conntrack_sweep(&mut self, drop: impl FnMut(&CtKey, &CtEntry) -> bool) -> Result<usize> {
        Ok(self.maps.conntrack.sweep(drop))
    }

    /// Removes every expired flow (see `Conntrack::expire`); how many went.
    pub fn conntrack_expire(&mut self) -> usize {
        self.maps.conntrack.expire()
    }

    /// Moves every flow's last-seen time `secs` into the past (tests).
    pub fn conntrack_age(&mut self, secs: u64) {
        self.maps.conntrack.age(secs)
    }

    /// Deletes the sessionAffinity entries `drop` picks; returns how many went.
    pub fn affinity_sweep(&mut self, mut drop: impl FnMut(&AffinityKey, &AffinityValue) -> bool) -> Result<usize> {
        let doomed: Vec<AffinityKey> =
            self.maps.affinity.iter().filter_map(|r| r.ok()).filter(|(k, v)| drop(k, v)).map(|(k, _)| k).collect();
        for k in &doomed {
            match self.maps.affinity.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::AFFINITY)(e)),
            }
        }
        Ok(doomed.len())
    }

    pub fn affinity_set(&mut self, key: &AffinityKey, v: &AffinityValue) -> Result<()> {
        self.maps.affinity.insert(key, v, 0).map_err(map_err(maps::AFFINITY))
    }

    /// Number of possible CPUs (per-CPU map width).
    pub fn cpus() -> usize {
        nr_cpus().unwrap_or(1)
    }
}
