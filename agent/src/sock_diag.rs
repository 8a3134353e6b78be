// SPDX-License-Identifier: MIT OR Apache-2.0
//! Connected UDP sockets to a backend that stopped serving, aborted so
//! their applications connect again and socket-LB picks a live backend.
//!
//! A connected UDP socket is balanced once, at connect; the kernel then
//! sends every datagram to the backend's address without asking the
//! cgroup programs again. kube-proxy deletes the UDP conntrack entries of
//! such an endpoint (`conntrack/cleanup.go`) so the next packet is balanced
//! anew; with socket-LB the equivalent is to abort the socket
//! (`SOCK_DESTROY` over sock_diag, `CONFIG_INET_DIAG_DESTROY`): the
//! application's next receive fails with ECONNABORTED and the socket is
//! disconnected, and its next connect is balanced again. As Cilium
//! (`pkg/loadbalancer/reconciler/termination.go`).
//!
//! Which sockets: connected ones (state ESTABLISHED) whose cookie has a
//! reverse entry (SOCK_REV) naming a UDP frontend of the sync's stale list
//! and a backend that frontend no longer keeps, **and** whose current peer
//! is that backend, as Cilium matches them. An unconnected socket is never
//! aborted (each of its datagrams is balanced again anyway), nor one that
//! has connected elsewhere since. Sockets live in the node's namespace and
//! in pods': every network namespace of a process on the node is visited
//! (once each; `host_only` visits the node's alone), its connected UDP
//! sockets dumped and the matching ones destroyed. Cookies are unique
//! across namespaces, so no other socket can match.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` + `struct inet_diag_req_v2`.
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

impl SockId {
    fn cookie(&self) -> u64 {
        self.cookie[0] as u64 | (self.cookie[1] as u64) << 32
    }

    /// The peer address as the maps hold it (an AF_INET socket's is the
    /// first 4 bytes of `dst`).
    fn peer(&self, family: u8) -> [u8; 16] {
        if family == libc::AF_INET as u8 {
            datapath_common::v4_mapped([self.dst[0], self.dst[1], self.dst[2], self.dst[3]])
        } else {
            self.dst
        }
    }
}

/// The sockets to abort: cookie → the stale backends (address IPv4
/// mapped, port network order) its peer may be.
pub type Targets = HashMap<u64, HashSet<([u8; 16], u16)>>;

/// What [`destroy`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    pub sockets: usize,
    /// Namespaces that could not be entered (a container without
    /// `CAP_SYS_ADMIN`/`CAP_SYS_PTRACE`): their sockets were not looked at.
    pub unreachable: usize,
}

/// Aborts the connected UDP sockets `targets` names, in the node's network
/// namespace and (unless `host_only`) every other one on the node.
pub fn destroy(targets: &Targets, host_only: bool) -> io::Result<Destroyed> {
    let mut done = Destroyed::default();
    if targets.is_empty() {
        return Ok(done);
    }
    // The agent's own namespace (the node's) first: a failure there (no
    // INET_DIAG_DESTROY in the kernel, say) is the caller's to report.
    done.sockets += in_current(targets)?;
    if host_only {
        return Ok(done);
    }
    let own = fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).ok();
    for path in namespaces(own) {
        let targets = targets.clone();
        let joined = std::thread::spawn(move || -> io::Result<usize> {
            let f = fs::File::open(&path)?;
            // SAFETY: setns on a namespace descriptor, on this thread only;
            // the thread ends after the dump.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            in_current(&targets)
        })
        .join();
        match joined {
            Ok(Ok(n)) => done.sockets += n,
            _ => done.unreachable += 1,
        }
    }
    Ok(done)
}

/// One `/proc/<pid>/ns/net` per network namespace other than `own`
/// (a namespace the agent may not stat counts once per process, as
/// unreachable, when entering it fails).
fn namespaces(own: Option<u64>) -> Vec<PathBuf> {
    let mut seen: HashSet<u64> = own.into_iter().collect();
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let p = e.path().join("ns/net");
        if let Ok(m) = fs::metadata(&p)
            && seen.insert(m.ino())
        {
            out.push(p);
        }
    }
    out
}

/// Dumps the connected UDP sockets of the current thread's namespace (both
/// families) and destroys those `targets` names whose peer is a stale backend.
fn in_current(targets: &Targets) -> io::Result<usize> {
    // SAFETY: a plain netlink socket, owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut found = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let req =
            request(SOCK_DIAG_BY_FAMILY, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, family, SockId::default());
        send(&fd, &req)?;
        read_msgs(&fd, |fam, id| {
            if targets.get(&id.cookie()).is_some_and(|stale| stale.contains(&(id.peer(fam), id.dport))) {
                found.push((fam, id));
            }
        })?;
    }
    let mut n = 0;
    for (family, id) in found {
        let req = request(SOCK_DESTROY, (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16, family, id);
        send(&fd, &req)?;
        match read_msgs(&fd, |_, _| {}) {
            Ok(()) => n += 1,
            // The kernel cannot (no CONFIG_INET_DIAG_DESTROY): say so once, up.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Err(e),
            // Gone meanwhile.
            Err(e) => tracing::debug!(error = %e, cookie = id.cookie(), "SOCK_DESTROY failed"),
        }
    }
    Ok(n)
}

fn request(kind: u16, flags: u16, family: u8, id: SockId) -> Request {
    Request {
        len: size_of::<Request>() as u32,
        kind,
        flags,
        seq: 1,
        pid: 0,
        family,
        protocol: libc::IPPROTO_UDP as u8,
        ext: 0,
        pad: 0,
        // Connected UDP sockets only (TCP_ESTABLISHED).
        states: 1 << 1,
        id,
    }
}

fn send(fd: &OwnedFd, req: &Request) -> io::Result<()> {
    // SAFETY: sending a plain repr(C) struct of its own size.
    let r = unsafe { libc::send(fd.as_raw_fd(), (req as *const Request).cast(), size_of::<Request>(), 0) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Reads netlink messages until DONE (a dump) or an ERROR/ACK; calls `each`
/// with every `inet_diag_msg`'s family and socket id.
fn read_msgs(fd: &OwnedFd, mut each: impl FnMut(u8, SockId)) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: recv into our buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if len < 16 || off + len > n {
                return Err(io::Error::other("truncated netlink message"));
            }
            let body = &buf[off + 16..off + len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(body.get(..4).unwrap_or(&[0; 4]).try_into().unwrap());
                    return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= 4 + size_of::<SockId>() => {
                    // `struct inet_diag_msg`: family, state, timer, retrans, then the id.
                    // SAFETY: the bounds were checked; an unaligned read of a plain struct.
                    let id = unsafe { std::ptr::read_unaligned(body[4..].as_ptr().cast::<SockId>()) };
                    each(body[0], id);
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// The sockets balanced to a backend outside what their frontend keeps:
/// `keep` maps a UDP frontend id to the (address, port) of the backends it
/// keeps; `entries` are SOCK_REV's. Per cookie, the stale backends.
pub fn stale(
    entries: &[(datapath_common::SockRevKey, datapath_common::SockRevValue)],
    keep: &HashMap<u32, HashSet<([u8; 16], u16)>>,
) -> Targets {
    let mut out = Targets::new();
    for (k, v) in entries {
        if keep.get(&v.rev_nat_id).is_some_and(|kept| !kept.contains(&(k.addr, k.port))) {
            out.entry(k.cookie).or_default().insert((k.addr, k.port));
        }
    }
    out
}
