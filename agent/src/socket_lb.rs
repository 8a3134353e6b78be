// SPDX-License-Identifier: MIT OR Apache-2.0
//! Socket-level load balancing: the cgroup programs (`datapath-ebpf`'s
//! `sock.rs`) attached to a cgroup v2 directory, as pinned links that
//! outlive the agent and are swapped to a new program atomically
//! (`BPF_LINK_UPDATE`) when an agent restarts, like the XDP and TC links.
//!
//! Pins: `links/sock-<hook>@cg<cgroup id>`. A pin for another cgroup (the
//! agent was started with another `--cgroup-path`) is removed once the new
//! cgroup's link is attached; `--socket-lb=off` removes them all.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink};

use crate::Datapath;

/// What socket-level load balancing covers (`--socket-lb`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every socket under the cgroup: the node's own and pods'.
    #[default]
    All,
    /// Only sockets in the node's own network namespace (host processes,
    /// hostNetwork pods); pods are balanced per packet by TC.
    Host,
    /// Not attached: TC and XDP balance everything they see.
    Off,
}

/// The programs and the hooks they attach to (the pin names' `<hook>`),
/// in attach order: the reverse hooks before the ones that translate, so a
/// socket is never translated without its replies being shown as the
/// service.
pub const PROGRAMS: [(&str, &str); 9] = [
    ("xlb_sock_release", "sock_release"),
    ("xlb_sock_recvmsg4", "recvmsg4"),
    ("xlb_sock_recvmsg6", "recvmsg6"),
    ("xlb_sock_getpeername4", "getpeername4"),
    ("xlb_sock_getpeername6", "getpeername6"),
    ("xlb_sock_connect4", "connect4"),
    ("xlb_sock_connect6", "connect6"),
    ("xlb_sock_sendmsg4", "sendmsg4"),
    ("xlb_sock_sendmsg6", "sendmsg6"),
];

/// Where cgroup v2 is mounted, from `/proc/self/mountinfo`: `/sys/fs/cgroup`
/// on a unified host, `/sys/fs/cgroup/unified` on a hybrid v1/v2 host. None
/// when no cgroup2 is mounted.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            // `id parent maj:min root mountpoint opts [optional…] - fstype source opts`
            let (left, right) = l.split_once(" - ")?;
            let mountpoint = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| mounts.contains(p))
        .or_else(|| mounts.into_iter().next())
}

/// Private mount point of cgroup v2 when the node has none (Cilium mounts
/// `/run/cilium/cgroupv2` the same way).
pub const PRIVATE_MOUNT: &str = "/run/xlb/cgroupv2";

/// The cgroup to attach to: `path` if given, else the node's cgroup2 root
/// (mounted at [`PRIVATE_MOUNT`] when nothing mounts it).
pub fn cgroup_path(path: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = path {
        anyhow::ensure!(p.join("cgroup.procs").exists(), "--cgroup-path {}: not a cgroup v2 directory", p.display());
        return Ok(p.to_path_buf());
    }
    if let Some(p) = cgroup2_mount() {
        return Ok(p);
    }
    let p = PathBuf::from(PRIVATE_MOUNT);
    fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    let (src, target, fstype) = (CString::new("none")?, CString::new(PRIVATE_MOUNT)?, CString::new("cgroup2")?);
    // SAFETY: plain mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("mounting cgroup2 at {PRIVATE_MOUNT}"));
    }
    tracing::info!(path = PRIVATE_MOUNT, "no cgroup2 mounted; mounted one for socket-level load balancing");
    Ok(p)
}

/// The netns cookie of the agent's network namespace (the node's):
/// `SO_NETNS_COOKIE` on a fresh socket.
pub fn own_netns_cookie() -> io::Result<u64> {
    static COOKIE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(c) = COOKIE.get() {
        return Ok(*c);
    }
    let c = read_netns_cookie()?;
    Ok(*COOKIE.get_or_init(|| c))
}

fn read_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a plain socket, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the given length.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn pin_name(hook: &str, cgroup_id: u64) -> String {
    format!("sock-{hook}@cg{cgroup_id}")
}

/// How one hook was attached, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// The pinned link from an earlier agent now runs the new program.
    Updated,
    /// A new link, pinned.
    New,
}

/// Attaches every socket-LB program to `cgroup` (or swaps the pinned links
/// to them), then removes pins for other cgroups. When one fails, the links
/// this call created are removed again (a swapped one keeps running).
pub fn attach(dp: &mut Datapath, dir: &Path, cgroup: &Path) -> anyhow::Result<Vec<(&'static str, Attached)>> {
    let id = fs::metadata(cgroup).with_context(|| format!("cgroup {}", cgroup.display()))?.ino();
    let mut out = Vec::new();
    let r = attach_all(dp, dir, cgroup, id, &mut out);
    if r.is_err() {
        for (hook, how) in &out {
            if *how == Attached::New {
                let _ = fs::remove_file(dir.join("links").join(pin_name(hook, id)));
            }
        }
    }
    r?;
    detach_except(dir, Some(id));
    Ok(out)
}

fn attach_all(
    dp: &mut Datapath,
    dir: &Path,
    cgroup: &Path,
    id: u64,
    out: &mut Vec<(&'static str, Attached)>,
) -> anyhow::Result<()> {
    let links = dir.join("links");
    for (name, hook) in PROGRAMS {
        let path = links.join(pin_name(hook, id));
        let prog = dp.program_mut(name).with_context(|| format!("no program {name}"))?;
        let prog_fd = prog.fd().with_context(|| format!("{name} is not loaded"))?.as_fd().as_raw_fd();
        if path.exists() {
            match obj_get(&path).and_then(|link| link_update(&link, prog_fd)) {
                Ok(()) => {
                    out.push((hook, Attached::Updated));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(hook, error = %e, "pinned socket-LB link unusable; attaching afresh");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let file = fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let link: FdLink = if hook == "sock_release" {
            let p: &mut CgroupSock = prog.try_into().context("program type")?;
            let lid = p.attach(&file, CgroupAttachMode::Single).with_context(|| format!("attaching {name}"))?;
            p.take_link(lid)?.try_into().context("socket-LB needs bpf_link (kernel ≥ 5.7)")?
        } else {
            let p: &mut CgroupSockAddr = prog.try_into().context("program type")?;
            let lid = p.attach(&file, CgroupAttachMode::Single).with_context(|| format!("attaching {name}"))?;
            p.take_link(lid)?.try_into().context("socket-LB needs bpf_link (kernel ≥ 5.7)")?
        };
        link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        out.push((hook, Attached::New));
    }
    Ok(())
}

/// Removes the socket-LB link pins (detaching them) except those of cgroup
/// `keep`; returns how many went.
pub fn detach_except(dir: &Path, keep: Option<u64>) -> usize {
    let keep = keep.map(|id| format!("@cg{id}"));
    let Ok(rd) = fs::read_dir(dir.join("links")) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("sock-") && keep.as_ref().is_none_or(|k| !name.ends_with(k.as_str())) {
            // The pin holds the link's last reference: removing it detaches.
            if fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Socket-LB link pins under `dir`: (hook, cgroup id).
pub fn pinned(dir: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = fs::read_dir(dir.join("links")) else { return Vec::new() };
    let mut v: Vec<(String, u64)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (hook, id) = name.strip_prefix("sock-")?.split_once("@cg")?;
            Some((hook.to_string(), id.parse().ok()?))
        })
        .collect();
    v.sort();
    v
}

/// `BPF_OBJ_GET`: a descriptor for the pinned object at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u8; 108],
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = Attr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: [0; 108] };
    // SAFETY: bpf(2) with a zeroed attr of the kernel's layout; the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &mut attr as *mut Attr, size_of::<Attr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel handed us a new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: the link runs `prog_fd` from now on, atomically.
fn link_update(link: &OwnedFd, prog_fd: i32) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
        _pad: [u8; 112],
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
        _pad: [0; 112],
    };
    // SAFETY: bpf(2) with a zeroed attr of the kernel's layout.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &mut attr as *mut Attr, size_of::<Attr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
