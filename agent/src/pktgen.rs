// SPDX-License-Identifier: MIT OR Apache-2.0
//! `xlb pktgen`: a pktgen-style traffic generator built on BPF_PROG_TEST_RUN
//! in XDP live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux ≥ 5.18).
//!
//! The kernel runs the bench object's `xlb_pktgen` program over a pool of
//! frames and transmits what it returns XDP_TX for out of `--dev`, as if a
//! NIC had received and bounced them. The program stamps every frame with
//! the headers built here (the pool's pages come back carrying whatever the
//! receivers rewrote) and gives frame n the source port and address of
//! flow n mod `flows`: one flow is one established flow, many flows are a
//! stream of new flows. One thread per chosen CPU, pinned there.
//!
//! Only the sender's count is known here; what arrived is the receiver's
//! business (the benchmark counts it with `xdp_sink`).

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use datapath_common::{PKTGEN_HDR_MAX, PktgenConfig};
use etherparse::PacketBuilder;

use crate::translate::Protocol;

/// The benchmark's eBPF object: `xlb_pktgen`, `xdp_forward`, `xdp_sink`.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench"));

/// Frames per test-run call and per kernel batch.
pub const BATCH: u32 = 256;

/// What to send.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Source address of flow 0; flow i adds `i / 32768` to it.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub protocol: Protocol,
    /// Distinct flows (source port, source address), ≥ 1.
    pub flows: u32,
    /// Frame size without the FCS (≥ the headers, ≥ 60).
    pub size: usize,
}

/// Source ports of flow i: `SPORT_BASE + i % SPORT_SPAN`.
pub const SPORT_BASE: u16 = 1024;
pub const SPORT_SPAN: u16 = 32768;

impl Spec {
    /// The frame of flow 0 and the generator's configuration for it.
    pub fn build(&self) -> anyhow::Result<(Vec<u8>, PktgenConfig)> {
        ensure!(self.flows >= 1, "flows must be at least 1");
        ensure!(self.src.is_ipv4() == self.dst.is_ipv4(), "source and destination are of different families");
        let v4 = self.src.is_ipv4();
        let (l3, l4) = (if v4 { 20 } else { 40 }, if self.protocol == Protocol::Tcp { 20 } else { 8 });
        let hdr_len = 14 + l3 + l4;
        ensure!(self.size >= hdr_len.max(60), "size {} is below the {} bytes of headers (or 60)", self.size, hdr_len);
        ensure!(self.size <= 3500, "size {} does not fit a page of the live-frames pool", self.size);
        let b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let b = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        let payload = vec![0u8; self.size - hdr_len];
        let mut frame = Vec::with_capacity(self.size);
        match self.protocol {
            Protocol::Tcp => b.tcp(SPORT_BASE, self.dport, 1, 64240).syn().write(&mut frame, &payload)?,
            Protocol::Udp => b.udp(SPORT_BASE, self.dport).write(&mut frame, &payload)?,
        }
        let mut cfg = PktgenConfig::ZERO;
        cfg.hdr[..hdr_len].copy_from_slice(&frame[..hdr_len]);
        debug_assert!(hdr_len <= PKTGEN_HDR_MAX);
        cfg.hdr_len = hdr_len as u32;
        cfg.flows = self.flows;
        cfg.src_off = if v4 { 14 + 12 + 4 - 4 } else { 14 + 8 + 16 - 4 } as u16;
        cfg.sport_off = (14 + l3) as u16;
        cfg.ip_csum_off = if v4 { 14 + 10 } else { 0 };
        cfg.l4_csum_off = (14 + l3 + if self.protocol == Protocol::Tcp { 16 } else { 6 }) as u16;
        cfg.sport_base = SPORT_BASE;
        cfg.sport_span = SPORT_SPAN;
        cfg.udp_v4 = (v4 && self.protocol == Protocol::Udp) as u32;
        Ok((frame, cfg))
    }
}

/// What the generator sent.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Sent {
    pub packets: u64,
    pub bytes: u64,
    /// Wall-clock time of the run.
    pub wall_seconds: f64,
    /// Time inside the kernel's test-run loops, summed over the threads:
    /// the generator program and everything its frames set off on the
    /// same CPU (the receivers' XDP programs and softirqs), without the
    /// per-call setup and teardown of the frame pool.
    pub busy_seconds: f64,
    /// Packets per second of busy time, summed over the threads.
    pub pps: f64,
}

/// Test-run calls aim at this much busy time each: long enough to make the
/// per-call setup (tens of ms) negligible, short enough to stop on time.
const CALL_TARGET_NS: u64 = 200_000_000;
const FIRST_CALL: u32 = 65_536;

/// Why this kernel cannot generate traffic, if it cannot: some sandboxed
/// kernels refuse BPF_PROG_TEST_RUN in live-frames mode with EPERM, even to
/// root and on loopback (the Firecracker kernel of this project's CI since
/// December 2026). Probed once per process with one frame on `lo` of the
/// caller's network namespace (`xlb_pktgen` unconfigured: it aborts the
/// frame, nothing is sent). Any other failure is not a refusal: `None`, and
/// the real run reports it.
pub fn live_frames_refused() -> Option<String> {
    static PROBE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let mut ebpf = Ebpf::load(BENCH_OBJECT).ok()?;
            let prog: &mut Xdp = ebpf.program_mut("xlb_pktgen")?.try_into().ok()?;
            prog.load().ok()?;
            let frame = [0u8; 64];
            let ctx = xdp_md(ifindex("lo").ok()?, frame.len());
            let opts = TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: 1,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::new()
            };
            let err = prog.test_run(opts).err()?;
            let mut source: Option<&dyn std::error::Error> = Some(&err);
            while let Some(e) = source {
                if let Some(io) = e.downcast_ref::<std::io::Error>()
                    && io.raw_os_error() == Some(libc::EPERM)
                {
                    return Some(
                        "this kernel refuses XDP live frames (BPF_PROG_TEST_RUN: EPERM): no traffic generator".into(),
                    );
                }
                source = e.source();
            }
            None
        })
        .clone()
}

/// A loaded generator for one [`Spec`], bound to an interface of the
/// calling thread's network namespace.
pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
    ifindex: u32,
    flows: u32,
    /// Packets claimed so far, readable while [`Generator::run_on`] runs.
    pub progress: Arc<AtomicU64>,
}

impl Generator {
    pub fn new(dev: &str, spec: &Spec) -> anyhow::Result<Self> {
        let (frame, cfg) = spec.build()?;
        let ifindex = ifindex(dev)?;
        let mut ebpf = Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
        let prog: &mut Xdp = ebpf.program_mut("xlb_pktgen").context("no xlb_pktgen")?.try_into()?;
        prog.load().context("verifying xlb_pktgen")?;
        let mut map: Array<_, PktgenConfig> = Array::try_from(ebpf.map_mut("PKTGEN").context("no PKTGEN map")?)?;
        map.set(0, cfg, 0)?;
        let mut g = Self { ebpf, frame, ifindex, flows: spec.flows, progress: Arc::new(AtomicU64::new(0)) };
        g.reset()?;
        Ok(g)
    }

    /// Runs the generator once without live frames (plain BPF_PROG_TEST_RUN,
    /// which a kernel refusing live frames still takes) and returns the frame
    /// it would have sent: the stamping (headers, the flow's source port and
    /// address, checksums) checked where nothing can be sent.
    pub fn stamp(&self) -> anyhow::Result<Vec<u8>> {
        let prog: &Xdp = self.ebpf.program("xlb_pktgen").context("no xlb_pktgen")?.try_into()?;
        let mut out = vec![0u8; self.frame.len() + 256];
        let opts =
            TestRunOptions { data_in: Some(&self.frame), data_out: Some(&mut out), repeat: 1, ..TestRunOptions::new() };
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        ensure!(r.return_value == 3, "xlb_pktgen returned {} instead of XDP_TX", r.return_value);
        out.truncate(r.data_size_out as usize);
        Ok(out)
    }

    /// Restarts the flow numbering: CPU k of n starts at flow k × flows / n,
    /// so threads on different CPUs send different flows.
    pub fn reset(&mut self) -> anyhow::Result<()> {
        let flows = self.flows as u64;
        let mut seq: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map_mut("PKTGEN_SEQ").context("no map")?)?;
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let starts: Vec<u64> = (0..n as u64).map(|k| k * flows / n as u64).collect();
        seq.set(0, aya::maps::PerCpuValues::try_from(starts)?, 0)?;
        Ok(())
    }

    /// Sends until `count` packets or `duration` have passed (whichever
    /// comes first), from one thread per CPU in `cpus`, pinned there. Every
    /// thread works in the caller's network namespace.
    pub fn run_on(&self, cpus: &[usize], count: Option<u64>, duration: Option<Duration>) -> anyhow::Result<Sent> {
        ensure!(count.is_some() || duration.is_some(), "give a packet count or a duration");
        ensure!(!cpus.is_empty(), "no CPU to send from");
        let prog: &Xdp = self.ebpf.program("xlb_pktgen").context("no xlb_pktgen")?.try_into()?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
        let stop = AtomicBool::new(false);
        self.progress.store(0, Ordering::Relaxed);
        let start = Instant::now();
        let per_thread = std::thread::scope(|s| {
            let handles: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    let (netns, stop, progress, frame) = (&netns, &stop, &self.progress, &self.frame);
                    let ifindex = self.ifindex;
                    s.spawn(move || -> anyhow::Result<(u64, Duration)> {
                        enter(netns)?;
                        pin_to_cpu(cpu);
                        let ctx = xdp_md(ifindex, frame.len());
                        let (mut sent, mut busy, mut call) = (0u64, Duration::ZERO, FIRST_CALL);
                        while !stop.load(Ordering::Relaxed) {
                            // Claim `call` packets of the total, or what is left of it.
                            let total = progress.fetch_add(call as u64, Ordering::Relaxed);
                            let repeat = match count {
                                Some(c) if total >= c => {
                                    progress.fetch_sub(call as u64, Ordering::Relaxed);
                                    break;
                                }
                                Some(c) if c - total < call as u64 => {
                                    progress.fetch_sub(call as u64 - (c - total), Ordering::Relaxed);
                                    (c - total) as u32
                                }
                                _ => call,
                            };
                            let opts = TestRunOptions {
                                data_in: Some(frame),
                                ctx_in: Some(&ctx),
                                repeat,
                                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                                ..TestRunOptions::new()
                            };
                            let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN (live frames)")?;
                            sent += repeat as u64;
                            busy += r.duration * repeat;
                            let per_packet = (r.duration.as_nanos() as u64).max(1);
                            call = (CALL_TARGET_NS / per_packet).clamp(FIRST_CALL as u64, 1 << 24) as u32;
                            if let Some(d) = duration {
                                let left = d.saturating_sub(start.elapsed());
                                if left.is_zero() {
                                    stop.store(true, Ordering::Relaxed);
                                }
                                let fits = (left.as_nanos() as u64 / per_packet).max(BATCH as u64);
                                call = call.min(fits as u32);
                            }
                        }
                        Ok((sent, busy))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("generator thread panicked"))?)
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let packets: u64 = per_thread.iter().map(|t| t.0).sum();
        Ok(Sent {
            packets,
            bytes: packets * self.frame.len() as u64,
            wall_seconds: start.elapsed().as_secs_f64(),
            busy_seconds: per_thread.iter().map(|t| t.1.as_secs_f64()).sum(),
            pps: per_thread.iter().filter(|t| !t.1.is_zero()).map(|t| t.0 as f64 / t.1.as_secs_f64()).sum(),
        })
    }
}

/// A `struct xdp_md` naming the device the frames "arrive" on; the kernel
/// wants `data_end` to be the frame's length.
fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// The index of interface `dev` in the calling thread's namespace.
pub fn ifindex(dev: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(i != 0, "no interface {dev}: {}", std::io::Error::last_os_error());
    Ok(i)
}

/// The MAC address of interface `dev` in the calling thread's namespace
/// (by ioctl: /sys/class/net shows the namespace sysfs was mounted in).
pub fn mac_of(dev: &str) -> anyhow::Result<[u8; 6]> {
    ensure!(dev.len() < libc::IFNAMSIZ, "interface name {dev:?} is too long");
    // SAFETY: a datagram socket only for the ioctl, closed by OwnedFd.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(sock >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    ensure!(rc == 0, "no interface {dev}: {}", std::io::Error::last_os_error());
    // SAFETY: the ioctl set the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

/// Whether interface `dev` (in the calling thread's namespace) is up with
/// a carrier (IFF_UP and IFF_RUNNING); false when it does not exist.
pub fn is_running(dev: &str) -> bool {
    if dev.len() >= libc::IFNAMSIZ {
        return false;
    }
    // SAFETY: a datagram socket only for the ioctl, closed by OwnedFd.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return false;
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of a valid ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    // SAFETY: the ioctl set the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags } as i32;
    rc == 0 && flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0
}

fn enter(netns: &std::fs::File) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid namespace fd.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % 1024, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
