// SPDX-License-Identifier: MIT OR Apache-2.0
//! Test harness for xlb's datapath in the real kernel: network-namespace
//! guards, a packet builder on top of etherparse, BPF_PROG_TEST_RUN
//! runners for the XDP and TC programs, and an independent checksum checker.
//!
//! Every namespace has a unique name (pid + counter) and is removed on drop,
//! also when a test panics, so tests run in parallel and CI can run twice.

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod cluster;
pub mod fixtures;
pub mod fuzz;
pub mod packet;
pub mod topo;

use std::{
    fs::File,
    os::fd::AsFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp};
use datapath_common::{Backend, Config, ServiceKey, v4_mapped};
use xlb::{Datapath, MapSizes};

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An IPv4-mapped IPv6 socket address as the IPv4 address it stands for
/// (what a dual-stack server reports for IPv4 peers); others unchanged.
pub fn canonical(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        a => a,
    }
}

/// A unique name for a test resource: `prefix` + pid + counter (≤ 15 chars for interfaces).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id() & 0xfffff)
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace (`ip -n` style, through nsenter so
    /// /sys stays as it is).
    pub fn exec(&self, args: &[&str]) {
        let path = format!("--net=/var/run/netns/{}", self.name);
        let mut full = vec!["nsenter", path.as_str()];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Runs each command line (words separated by single spaces) inside the namespace.
    pub fn exec_lines(&self, lines: &[&str]) {
        for l in lines {
            self.exec(&l.split(' ').collect::<Vec<_>>());
        }
    }

    /// The MAC address of interface `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> String {
        let _in = self.enter();
        mac_str(&xlb::pktgen::mac_of(dev).expect("interface MAC"))
    }

    /// Enters the namespace on the current thread until the guard drops.
    pub fn enter(&self) -> Entered {
        let orig = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = File::open(format!("/var/run/netns/{}", self.name)).expect("open netns");
        setns(&target);
        Entered { orig }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn setns(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid namespace fd.
    let rc = unsafe { libc::setns(f.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The current thread is inside a namespace; dropping returns it home.
pub struct Entered {
    orig: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        setns(&self.orig);
    }
}

/// MAC of the FIB environment's outgoing interface.
pub const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];
/// MAC every backend and client neighbour resolves to.
pub const NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x01];

/// A namespace in which `bpf_fib_lookup` resolves deterministically:
/// forwarding on, a veth `o0` (MAC [`OUT_MAC`]) holding 10.0.0.1/16 and
/// fd00::1/64, and permanent neighbours (MAC [`NEIGH_MAC`]) for the given
/// addresses. BPF_PROG_TEST_RUN runs the program against the calling
/// thread's namespace, so run the packets while [`FibEnv::enter`]ed.
pub struct FibEnv {
    pub ns: NetNs,
    pub out_ifindex: u32,
}

impl FibEnv {
    pub fn new(neighbours: &[&str]) -> Self {
        let ns = NetNs::new("xlbf");
        ns.exec(&["ip", "link", "add", "o0", "address", &mac_str(&OUT_MAC), "type", "veth", "peer", "name", "o1"]);
        ns.exec_lines(&[
            "ip link set o0 up",
            "ip link set o1 up",
            "ip addr add 10.0.0.1/16 dev o0",
            "ip addr add 192.0.2.1/24 dev o0",
            "ip -6 addr add fd00::1/64 dev o0 nodad",
            "ip -6 addr add 2001:db8::1/64 dev o0 nodad",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
        ]);
        for n in neighbours {
            ns.exec(&["ip", "neigh", "replace", n, "lladdr", &mac_str(&NEIGH_MAC), "nud", "permanent", "dev", "o0"]);
        }
        let out_ifindex = {
            let _in = ns.enter();
            xlb::pktgen::ifindex("o0").expect("o0 exists")
        };
        Self { ns, out_ifindex }
    }

    pub fn enter(&self) -> Entered {
        self.ns.enter()
    }
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Prog {
    pub const ALL: [Prog; 3] = [Prog::Xdp, Prog::TcIngress, Prog::TcEgress];

    pub fn is_tc(self) -> bool {
        self != Prog::Xdp
    }

    /// The hook's main program; its tail calls share the prefix.
    pub fn main_program(self) -> &'static str {
        match self {
            Prog::Xdp => "xlb_xdp",
            Prog::TcIngress => "xlb_tc_ingress",
            Prog::TcEgress => "xlb_tc_egress",
        }
    }
}

/// Return codes.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The hook-neutral outcome of a test run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// XDP_TX (only the benchmark floor uses it; xlb redirects to the ingress device instead).
    Tx,
    Redirect,
}

/// Map sizes small enough to load many datapaths side by side in tests.
pub fn test_sizes() -> MapSizes {
    MapSizes {
        services: 4096,
        backends: 4096,
        slots: 1 << 18,
        conntrack: 16_384,
        affinity: 4096,
        source_ranges: 1024,
        fragments: 1024,
        sock_rev: 1024,
    }
}

/// A loaded datapath (maps created; not attached). A hook's programs are
/// verified the first time a packet is run through it ([`Lb::load`]): the
/// verifier is most of a datapath's load, and most tests run one hook.
pub struct Lb {
    pub dp: Datapath,
    loaded: [bool; 3],
}

impl Lb {
    pub fn new() -> Self {
        Self::with_sizes(test_sizes())
    }

    pub fn with_sizes(sizes: MapSizes) -> Self {
        Self { dp: Datapath::load(sizes).expect("load datapath"), loaded: [false; 3] }
    }

    /// A datapath whose maps are pinned under `dir` (reused when there), as
    /// an agent loads it.
    pub fn pinned(dir: &std::path::Path) -> Self {
        Self { dp: Datapath::load_pinned(test_sizes(), Some(dir)).expect("load pinned datapath"), loaded: [false; 3] }
    }

    /// Verifies `prog`'s main program and its tail calls, once.
    pub fn load(&mut self, prog: Prog) {
        if !self.loaded[prog as usize] {
            let main = prog.main_program();
            self.dp.load_programs_where(|name| name.starts_with(main)).expect("verify the programs");
            self.loaded[prog as usize] = true;
        }
    }

    /// Verifies every program of the object (the benchmark's floor too).
    pub fn load_all(&mut self) {
        self.dp.load_programs().expect("verify the programs");
        self.loaded = [true; 3];
    }

    /// Runs one packet through `prog`; returns the verdict and the output frame.
    pub fn run(&mut self, prog: Prog, input: &[u8]) -> (Verdict, Vec<u8>) {
        self.try_run(prog, input).unwrap_or_else(|e| panic!("test_run {prog:?}: {e}"))
    }

    /// As [`Lb::run`], but returns the kernel's refusal (the skb test-run
    /// path rejects some frames before any program sees them).
    pub fn try_run(&mut self, prog: Prog, input: &[u8]) -> Result<(Verdict, Vec<u8>), ProgramError> {
        self.load(prog);
        self.run_loaded(prog, input)
    }

    fn run_loaded(&self, prog: Prog, input: &[u8]) -> Result<(Verdict, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; input.len() + 256];
        let (ret, size) = match prog {
            Prog::Xdp => {
                let p: &Xdp = self.dp.program("xlb_xdp").unwrap().try_into().unwrap();
                let r = run(p, input, &mut out, 1)?;
                (r.0, r.1)
            }
            Prog::TcIngress | Prog::TcEgress => {
                let name = if prog == Prog::TcIngress { "xlb_tc_ingress" } else { "xlb_tc_egress" };
                let p: &SchedClassifier = self.dp.program(name).unwrap().try_into().unwrap();
                let r = run(p, input, &mut out, 1)?;
                (r.0, r.1)
            }
        };
        out.truncate(size as usize);
        let v = match (prog.is_tc(), ret) {
            (false, XDP_PASS) | (true, TC_ACT_OK) => Verdict::Pass,
            (false, XDP_DROP) | (true, TC_ACT_SHOT) => Verdict::Drop,
            (false, XDP_TX) => Verdict::Tx,
            (false, XDP_REDIRECT) => Verdict::Redirect,
            // TC's "Tx" is a redirect to the packet's own device (loopback in test runs).
            (true, TC_ACT_REDIRECT) => Verdict::Redirect,
            other => panic!("unexpected return code {other:?}"),
        };
        Ok((v, out))
    }

    /// Runs every frame on CPU 0 and CPU 1 at once: one thread pinned to
    /// each, in `env`'s namespace, both released by a barrier before each
    /// frame. Per frame: CPU 0's verdict and output, then CPU 1's.
    pub fn race(&mut self, prog: Prog, env: &FibEnv, frames: &[Vec<u8>]) -> Vec<[(Verdict, Vec<u8>); 2]> {
        self.load(prog);
        let this = &*self;
        let barrier = std::sync::Barrier::new(2);
        let mut per_cpu = std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|cpu| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        xlb::pktgen::pin_to_cpu(cpu);
                        let _in = env.enter();
                        let mut out = Vec::with_capacity(frames.len());
                        for f in frames {
                            barrier.wait();
                            out.push(this.run_loaded(prog, f).unwrap_or_else(|e| panic!("test_run {prog:?}: {e}")));
                        }
                        out
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("racing thread")).collect::<Vec<_>>()
        });
        let cpu1 = per_cpu.pop().unwrap();
        let cpu0 = per_cpu.pop().unwrap();
        cpu0.into_iter().zip(cpu1).map(|(a, b)| [a, b]).collect()
    }

    /// Verdict counters by name.
    pub fn verdicts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let v = self.dp.verdicts().expect("read VERDICTS");
        datapath_common::verdict::NAMES.iter().copied().zip(v).collect()
    }

    pub fn verdict(&self, name: &str) -> u64 {
        self.verdicts()[name]
    }

    /// One TCP service `vip:80` in `scope` (TC: internal, XDP: external) with
    /// the single backend `addr:8080` (id 1), Maglev.
    pub fn tcp_vip_to(&mut self, vip: &str, addr: &str, tc: bool) {
        self.tcp_vip_to_id(1, 1, vip, addr, tc);
    }

    /// As [`Lb::tcp_vip_to`], with the backend and frontend ids to use.
    pub fn tcp_vip_to_id(&mut self, backend: u32, id: u32, vip: &str, addr: &str, tc: bool) {
        use datapath_common::{BACKEND_ACTIVE, PROTO_TCP, SCHED_MAGLEV, SCOPE_EXTERNAL, SCOPE_INTERNAL};
        self.backend(backend, addr, 8080, BACKEND_ACTIVE, 0);
        let scope = if tc { SCOPE_INTERNAL } else { SCOPE_EXTERNAL };
        let spec = xlb::ServiceSpec {
            id,
            scheduler: SCHED_MAGLEV,
            flags: 0,
            affinity_timeout_s: 0,
            backends: vec![backend],
            weights: Vec::new(),
            maglev_size: None,
        };
        self.dp.set_service(svc_key(vip, 80, PROTO_TCP, scope), &spec).expect("set service");
    }

    pub fn backend(&mut self, id: u32, addr: &str, port: u16, state: u8, flags: u8) {
        let b = Backend { addr: addr16(addr), port: port.to_be(), state, flags };
        self.dp.set_backend(id, &b).expect("set backend");
    }

    pub fn config_snat(&mut self, v4: &str, v6: &str, min: u16, max: u16) {
        let cfg = Config {
            snat_v4: addr16(v4),
            snat_v6: addr16(v6),
            snat_port_min: min,
            snat_port_max: max,
            ..Config::default()
        };
        self.dp.set_config(&cfg).expect("set config");
    }
}

impl Default for Lb {
    fn default() -> Self {
        Self::new()
    }
}

/// One BPF_PROG_TEST_RUN: (return value, output size, duration per repeat).
pub fn run<P>(
    prog: &P,
    input: &[u8],
    out: &mut [u8],
    repeat: u32,
) -> Result<(u32, u32, std::time::Duration), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let opts = TestRunOptions { data_in: Some(input), data_out: Some(out), repeat, ..TestRunOptions::new() };
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.data_size_out, r.duration))
}

/// Parses "10.0.0.1" or "fd00::1" into the 16-byte map form.
pub fn addr16(s: &str) -> [u8; 16] {
    match s.parse::<std::net::IpAddr>().unwrap_or_else(|_| panic!("bad address {s}")) {
        std::net::IpAddr::V4(a) => v4_mapped(a.octets()),
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

/// A SERVICES key.
pub fn svc_key(addr: &str, port: u16, proto: u8, scope: u8) -> ServiceKey {
    ServiceKey { addr: addr16(addr), port: port.to_be(), proto, scope }
}
