// SPDX-License-Identifier: MIT OR Apache-2.0
//! Test cgroups for socket-level load balancing: a cgroup v2 directory per
//! test (or per node of a test cluster) under the node's cgroup2 root
//! (`…/xlb-test-<unique>`), removed on drop, and client processes started
//! inside one and inside a network namespace. Socket-LB programs attached
//! to such a cgroup see only the processes a test moved into it, so
//! nothing else on the machine is affected and tests run in parallel.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::{NetNs, agent::xlb_bin, unique};

/// A cgroup v2 directory, removed on drop (after moving any process still
/// in it back to the root: it only holds processes the test started, which
/// the test ends first).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let root = xlb::socket_lb::cgroup2_mount().expect("no cgroup2 mounted: socket-LB tests need cgroup v2");
        let path = root.join(unique("xlb-test-"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let root = self.path.parent().map(|p| p.join("cgroup.procs"));
        if let (Ok(pids), Some(root)) = (fs::read_to_string(self.path.join("cgroup.procs")), root) {
            for pid in pids.lines() {
                let _ = fs::write(&root, pid);
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// `xlb-client`, built next to the test binaries.
pub fn client_bin() -> PathBuf {
    let b = xlb_bin().with_file_name("xlb-client");
    assert!(b.exists(), "{} is missing: build bpf-tests' binaries", b.display());
    b
}

/// A command that starts inside cgroup `cg` and network namespace `ns`:
/// the child moves itself (writes 0 to `cgroup.procs`, then `setns`) before
/// it executes, so its very first socket is covered.
pub fn command_in(ns: &NetNs, cg: &Cgroup, program: &std::path::Path) -> (Command, [fs::File; 2]) {
    let procs = fs::OpenOptions::new().write(true).open(cg.path.join("cgroup.procs")).expect("cgroup.procs");
    let netns = fs::File::open(format!("/var/run/netns/{}", ns.name)).expect("netns");
    let (p, n) = (procs.as_raw_fd(), netns.as_raw_fd());
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls on descriptors opened before
    // the fork (they stay open until spawn returns: the caller holds them).
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(p, b"0".as_ptr().cast(), 1) != 1 || libc::setns(n, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    (cmd, [procs, netns])
}

/// Runs `xlb-client args…` in `ns` and `cg` to completion; its stdout, or
/// its stderr as the error.
pub fn client(ns: &NetNs, cg: &Cgroup, args: &[&str]) -> Result<String, String> {
    let (mut cmd, _fds) = command_in(ns, cg, &client_bin());
    let out = cmd.args(args).output().map_err(|e| format!("xlb-client: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The value of `key=` in a line of `xlb-client` output.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The pod that answered, from an `echo=` field (`POD,CLIENT,PORT,…`).
pub fn echo_pod(line: &str) -> String {
    field(line, "echo").split(',').next().unwrap_or_default().to_string()
}

/// A long-running `xlb-client` (`stream`, `udp-hold`), ended by PID on drop.
pub struct Running {
    child: Child,
    out: BufReader<ChildStdout>,
    pub stdin: Option<ChildStdin>,
}

impl Running {
    pub fn start(ns: &NetNs, cg: &Cgroup, args: &[&str]) -> Self {
        let (mut cmd, _fds) = command_in(ns, cg, &client_bin());
        let mut child = cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start xlb-client");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let stdin = child.stdin.take();
        Self { child, out, stdin }
    }

    /// The next line it prints ("" at end of output).
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.out.read_line(&mut l);
        l.trim_end().to_string()
    }

    /// Sends one line to its stdin (`udp-hold`: one request) and returns
    /// the answer line.
    pub fn ask(&mut self, msg: &str) -> String {
        use std::io::Write as _;
        let w = self.stdin.as_mut().expect("stdin");
        writeln!(w, "{msg}").expect("write to xlb-client");
        w.flush().expect("flush");
        self.line()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
