// SPDX-License-Identifier: MIT OR Apache-2.0
//! Probes for failover measurements, run from a namespace in a thread:
//! [`ArpProbe`] asks who has an address every few milliseconds and records
//! every answer and announcement for it with the MAC that sent it (what
//! `arping` and `tcpdump arp` show together); [`ConnectProbe`] opens a new
//! TCP connection at a steady rate and records whether each got an answer.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::NetNs;

/// One ARP frame about the probed address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heard {
    pub at: Instant,
    /// The sender's hardware address.
    pub mac: [u8; 6],
    /// A reply (else an announcement: a gratuitous request).
    pub reply: bool,
}

/// An ARP prober: a request for `target` every `every` from `ifname` in `ns`.
pub struct ArpProbe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Heard>>>,
}

const ETH_P_ARP: u16 = 0x0806;

impl ArpProbe {
    pub fn start(ns: &NetNs, ifname: &str, target: Ipv4Addr, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, ifname, stop2) = (ns.name.clone(), ifname.to_string(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let sock = socket(&ifname);
            let mac = xlb::pktgen::mac_of(&ifname).expect("MAC");
            let src: [u8; 4] = own_v4(&ifname);
            let request = request(mac, src, target.octets());
            ready_tx.send(()).unwrap();
            let mut heard = Vec::new();
            let mut next = Instant::now();
            let mut buf = [0u8; 128];
            while !stop2.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    send(&sock, &request);
                    next += every;
                }
                // SAFETY: a valid buffer of its length; the socket's receive timeout bounds the wait.
                let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 42 {
                    continue;
                }
                let f = &buf[..n as usize];
                let (op, sha, spa) = (f[21], &f[22..28], &f[28..32]);
                if f[12..14] == ETH_P_ARP.to_be_bytes() && spa == target.octets() && sha != mac {
                    heard.push(Heard { at: Instant::now(), mac: sha.try_into().unwrap(), reply: op == 2 });
                }
            }
            heard
        });
        ready_rx.recv().expect("the ARP probe started");
        Self { stop, thread: Some(thread) }
    }

    /// Stops and returns what was heard.
    pub fn finish(mut self) -> Vec<Heard> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the ARP probe")
    }
}

impl Drop for ArpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves this (probe's own) thread into namespace `name` for good.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("open netns");
    // SAFETY: plain syscall on a valid namespace fd.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn socket(ifname: &str) -> OwnedFd {
    // SAFETY: a raw packet socket for ARP, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, (ETH_P_ARP.to_be()) as i32) };
    assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ARP.to_be();
    sa.sll_ifindex = xlb::pktgen::ifindex(ifname).expect("ifindex") as i32;
    // SAFETY: a valid address of its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval { tv_sec: 0, tv_usec: 2_000 };
    // SAFETY: a valid timeval of its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

fn send(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: a valid buffer of its length on a bound socket.
    unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
}

/// An ARP request, broadcast, as `arping` sends it (padded to 60 bytes).
fn request(mac: [u8; 6], src: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// The first IPv4 address of `ifname` in the current namespace.
fn own_v4(ifname: &str) -> [u8; 4] {
    let out = std::process::Command::new("ip").args(["-4", "-o", "addr", "show", "dev", ifname]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let cidr = text.split_whitespace().skip_while(|w| *w != "inet").nth(1).expect("an IPv4 address");
    cidr.split('/').next().unwrap().parse::<Ipv4Addr>().unwrap().octets()
}

/// One connection attempt.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub ok: bool,
}

/// A new TCP connection (and one echoed request) to `to` every `every`
/// from `ns`, each given `timeout`.
pub struct ConnectProbe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Attempt>>>,
}

impl ConnectProbe {
    pub fn start(ns: &NetNs, to: SocketAddr, every: Duration, timeout: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, stop2) = (ns.name.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let mut out = Vec::new();
            let mut next = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let at = Instant::now();
                let ok = one(to, timeout);
                out.push(Attempt { at, ok });
                next += every;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            out
        });
        Self { stop, thread: Some(thread) }
    }

    pub fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the connect probe")
    }
}

impl Drop for ConnectProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn one(to: SocketAddr, timeout: Duration) -> bool {
    use std::io::{BufRead as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, timeout) else { return false };
    let _ = s.set_read_timeout(Some(timeout));
    if s.write_all(b"probe\n").is_err() {
        return false;
    }
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).is_ok() && line.contains("probe")
}
