// SPDX-License-Identifier: MIT OR Apache-2.0
//! Attaching the programs, pinned so they outlive the agent.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/xlb`, mode 0700):
//! - `<MAP>`: every map (see `datapath_common::maps::PINNED`);
//! - `progs/<program>`: the programs last loaded;
//! - `links/xdp@<ifname>`, `links/tc-ingress@<ifname>`: the bpf_links (XDP
//!   and TCX) that attach them.
//!
//! A restarted agent loads its programs against the pinned maps and
//! atomically swaps each pinned link to the new program
//! (`BPF_LINK_UPDATE`): packets never meet a detached interface, and the
//! conntrack table they use is the same one. `xlb agent --cleanup` unpins
//! the links (which detaches them) and removes every pin.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
    tc::{self, SchedClassifierLink},
    xdp::XdpLink,
};

use crate::Datapath;

pub const XDP_PROGRAM: &str = "xlb_xdp";
pub const TC_INGRESS_PROGRAM: &str = "xlb_tc_ingress";

/// How to attach XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

/// Creates the pin directory tree with mode 0700.
pub fn prepare_pin_dir(dir: &Path) -> anyhow::Result<()> {
    for d in [dir.to_path_buf(), dir.join("progs"), dir.join("links")] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", d.display()))?;
    }
    Ok(())
}

/// Pins every loaded program under `progs/` (replacing older pins).
pub fn pin_programs(dp: &mut Datapath, dir: &Path) -> anyhow::Result<()> {
    for (name, prog) in dp.ebpf.programs_mut() {
        let path = dir.join("progs").join(name);
        let _ = fs::remove_file(&path);
        prog.pin(&path).with_context(|| format!("pinning {name} at {}", path.display()))?;
    }
    Ok(())
}

fn link_path(dir: &Path, what: &str, ifname: &str) -> PathBuf {
    dir.join("links").join(format!("{what}@{ifname}"))
}

/// The pinned link at `path`, if there is a usable one (a stale pin whose
/// interface is gone is removed).
fn pinned(path: &Path) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    match PinnedLink::from_pin(path) {
        Ok(l) => Some(l.into()),
        Err(LinkError::SyscallError(_)) | Err(_) => {
            let _ = fs::remove_file(path);
            None
        }
    }
}

/// Outcome of an attach, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// A pinned link from an earlier agent now runs the new program.
    Updated,
    /// A new link, pinned.
    New,
    /// A new link in generic (skb) mode, after native mode failed.
    Generic,
}

/// Attaches the XDP program to `ifname` (or swaps the pinned link to it).
pub fn xdp(dp: &mut Datapath, dir: &Path, ifname: &str, mode: XdpAttachMode) -> anyhow::Result<Attached> {
    if driver(ifname).as_deref() == Some("veth") {
        tracing::warn!(
            ifname,
            "XDP on a veth: its peer must fill in checksums (`ethtool -K <peer> tx off`); a veth hands XDP the \
             peer's CHECKSUM_PARTIAL frames as if complete, and xlb would forward them with wrong checksums"
        );
    }
    let prog: &mut Xdp = dp.program_mut(XDP_PROGRAM).context("no XDP program")?.try_into().context("program type")?;
    let path = link_path(dir, "xdp", ifname);
    if let Some(link) = pinned(&path) {
        let res = XdpLink::try_from(link).map_err(anyhow::Error::from).and_then(|l| Ok(prog.attach_to_link(l)?));
        match res {
            Ok(id) => {
                let link = prog.take_link(id)?;
                drop(link); // the pin keeps it
                return Ok(Attached::Updated);
            }
            Err(e) => {
                tracing::warn!(ifname, error = %e, "pinned XDP link unusable; attaching afresh");
                let _ = fs::remove_file(&path);
            }
        }
    }
    let (id, how) = match mode {
        XdpAttachMode::Native => (prog.attach(ifname, XdpMode::Driver)?, Attached::New),
        XdpAttachMode::Generic => (prog.attach(ifname, XdpMode::Skb)?, Attached::Generic),
        XdpAttachMode::Auto => match prog.attach(ifname, XdpMode::Driver) {
            Ok(id) => (id, Attached::New),
            Err(e) => {
                tracing::warn!(ifname, error = %e, "native XDP failed; using generic (skb) mode, which is much slower");
                (prog.attach(ifname, XdpMode::Skb)?, Attached::Generic)
            }
        },
    };
    let link = prog.take_link(id)?;
    match FdLink::try_from(link) {
        Ok(fd) => {
            fd.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        }
        Err(_) => {
            bail!("{ifname}: XDP attached through netlink (no bpf_link); it cannot be pinned")
        }
    }
    Ok(how)
}

/// Attaches the TC ingress program to `ifname` (TCX where the kernel has
/// it, else a clsact filter), or swaps the pinned link to it.
pub fn tc_ingress(dp: &mut Datapath, dir: &Path, ifname: &str) -> anyhow::Result<Attached> {
    let prog: &mut SchedClassifier =
        dp.program_mut(TC_INGRESS_PROGRAM).context("no TC program")?.try_into().context("program type")?;
    let path = link_path(dir, "tc-ingress", ifname);
    if let Some(link) = pinned(&path) {
        let res =
            SchedClassifierLink::try_from(link).map_err(anyhow::Error::from).and_then(|l| Ok(prog.attach_to_link(l)?));
        match res {
            Ok(id) => {
                drop(prog.take_link(id)?);
                return Ok(Attached::Updated);
            }
            Err(e) => {
                tracing::warn!(ifname, error = %e, "pinned TC link unusable; attaching afresh");
                let _ = fs::remove_file(&path);
            }
        }
    }
    // Only needed by the netlink fallback; harmless (EEXIST) otherwise.
    let _ = tc::qdisc_add_clsact(ifname);
    let id = prog.attach(ifname, TcAttachType::Ingress)?;
    let link = prog.take_link(id)?;
    match FdLink::try_from(link) {
        Ok(fd) => {
            fd.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        }
        // A netlink filter stays on the interface without a pin.
        Err(_) => tracing::info!(ifname, "TC attached as a clsact filter (no TCX)"),
    }
    Ok(Attached::New)
}

/// Forgets the pins of an interface that went away (its links died with it).
pub fn forget_interface(dir: &Path, ifname: &str) {
    for what in ["xdp", "tc-ingress"] {
        let _ = fs::remove_file(link_path(dir, what, ifname));
    }
}

/// Detaches everything xlb attached and removes every pin under `dir`.
pub fn cleanup(dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    if let Ok(rd) = fs::read_dir(dir.join("links")) {
        for e in rd.flatten() {
            if let Ok(l) = PinnedLink::from_pin(e.path()) {
                // Unpinning drops the last reference: the link detaches.
                drop(l.unpin()?);
            } else {
                fs::remove_file(e.path())?;
            }
            removed += 1;
        }
    }
    for sub in ["progs", ""] {
        let d = dir.join(sub);
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.path().is_file() || e.file_type().map(|t| !t.is_dir()).unwrap_or(false) {
                    fs::remove_file(e.path())?;
                    removed += 1;
                }
            }
        }
    }
    for sub in ["links", "progs", ""] {
        let _ = fs::remove_dir(dir.join(sub));
    }
    Ok(removed)
}

/// The driver of interface `ifname` (ETHTOOL_GDRVINFO, as `ethtool -i`
/// prints it), if the kernel tells.
pub fn driver(ifname: &str) -> Option<String> {
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    /// `struct ifreq` with `ifr_data`.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if ifname.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 32 * 4 + 12 + 4 * 5] };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _pad: [0; 16] };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: a plain socket and an ioctl on structs laid out as the kernel's;
    // the socket is closed before returning.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let r = libc::ioctl(fd, SIOCETHTOOL, &mut req);
        libc::close(fd);
        r == 0
    };
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    ok.then(|| String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// True when `ifname` matches one of the glob `patterns`.
pub fn matches(patterns: &[glob::Pattern], ifname: &str) -> bool {
    patterns.iter().any(|p| p.matches(ifname))
}
