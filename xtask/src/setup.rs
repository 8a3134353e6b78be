// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask setup`: everything the build and the tests need, installed
//! idempotently. Each step checks first and does nothing when satisfied.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Debian packages the tests and benchmarks use: (a command it provides, package).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("tcpdump", "tcpdump"),
    ("nsenter", "util-linux"),
];

pub fn run() -> anyhow::Result<()> {
    toolchain()?;
    packages()?;
    bpffs()?;
    Ok(())
}

/// Only what building needs (nightly, rust-src, bpf-linker): for image builds.
pub fn toolchain() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}

fn output(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &str, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<()> {
    let mut c = Command::new(cmd);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let s = c.status().with_context(|| format!("running {cmd}"))?;
    if !s.success() {
        bail!("{cmd} {} failed ({s})", args.join(" "));
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        status("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"], &[])?;
    }
    let installed = output("rustup", &["component", "list", "--installed", "--toolchain", "nightly"])?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        status("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"], &[])?;
    }
    Ok(())
}

/// bpf-linker must be built against the very LLVM the nightly rustc uses:
/// the nightly's own `libLLVM.so.<ver>-rust-<ver>`, reached through a
/// prefix directory holding two symlinks to it (`libLLVM.so` to link, and the
/// exact file name for bpf-linker's RUNPATH). A stamp records which library
/// the installed bpf-linker was built for, so a new nightly triggers a rebuild.
fn bpf_linker() -> anyhow::Result<()> {
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let vv = output("rustc", &["+nightly", "-vV"])?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_string();
    let lib = fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        .context("the nightly toolchain ships no libLLVM")?;
    let home = std::env::var("HOME").context("HOME")?;
    let prefix = PathBuf::from(home).join(".local/share/xlb-llvm");
    let stamp = prefix.join("stamp");
    let want = format!("{lib}\n");
    if have("bpf-linker") && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM {major} ({lib}); this takes a minute or two");
    let libdir = prefix.join("lib");
    fs::create_dir_all(&libdir)?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = libdir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&lib), &link)?;
    }
    let feature = format!("llvm-{major}");
    status(
        "cargo",
        &["install", "bpf-linker", "--force", "--no-default-features", "--features", &feature],
        &[("LLVM_PREFIX", &prefix)],
    )?;
    fs::write(&stamp, want)?;
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(cmd, _)| !have(cmd)).map(|(_, p)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    status("apt-get", &["update", "-qq"], &[])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    status("apt-get", &args, &[])
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    status("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"], &[])
}
