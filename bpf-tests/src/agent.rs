// SPDX-License-Identifier: MIT OR Apache-2.0
//! Running the real `xlb agent` binary inside a test namespace.
//!
//! [`PinDir`] is a unique bpffs directory that is detached and unpinned
//! (`xlb agent --cleanup`) on drop; [`Agent`] is one agent process, stopped
//! by PID on drop. Both clean up when a test panics.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{NetNs, unique};

/// The `xlb` binary of this build: next to the running executable (a
/// binary in `target/<profile>/`) or one level up (a test in
/// `target/<profile>/deps/`). `cargo xtask test` and `demo` build it first.
fn find_xlb() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("xlb"), dir.parent()?.join("xlb")].into_iter().find(|p| p.exists())
}

pub fn xlb_bin() -> PathBuf {
    find_xlb().expect("the xlb binary is missing: run `cargo build --release -p agent` (cargo xtask test does)")
}

/// Runs `xlb args…` inside `ns` and returns its stdout (panics on failure).
pub fn xlb(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg(xlb_bin())
        .args(args)
        .output()
        .expect("run xlb");
    assert!(
        out.status.success(),
        "xlb {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A unique pin directory on the host's bpffs, cleaned up on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self { path: PathBuf::from("/sys/fs/bpf").join(unique("xlbt")) }
    }

    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let Some(xlb) = find_xlb() else { return };
        let _ =
            Command::new(xlb).args(["agent", "--cleanup", "--pin-dir"]).arg(&self.path).stderr(Stdio::null()).status();
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("xlb-test-"));
        fs::create_dir_all(&path).expect("temp dir");
        Self { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// One `xlb agent` process in a namespace; its log goes to `log`.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    /// The test cgroup its socket-LB programs attach to, unless the test
    /// chose (`--cgroup-path`, `--socket-lb`): never the machine's root,
    /// where they would balance every process on it, other tests included.
    pub cgroup: Option<crate::cgroup::Cgroup>,
}

impl Agent {
    /// Starts `xlb agent <args>` in `ns` and waits for its first sync.
    pub fn start(ns: &NetNs, log: PathBuf, args: &[String]) -> Self {
        let out = fs::File::create(&log).expect("log file");
        let chosen = args.iter().any(|a| a.starts_with("--cgroup-path"))
            || args.windows(2).any(|w| w[0] == "--socket-lb" && w[1] == "off")
            || args.iter().any(|a| a == "--socket-lb=off");
        let cgroup = (!chosen).then(crate::cgroup::Cgroup::new);
        let mut args = args.to_vec();
        if let Some(cg) = &cgroup {
            args.extend(["--cgroup-path".to_string(), cg.arg()]);
        }
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg(xlb_bin())
            .arg("agent")
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start xlb agent");
        let mut a = Self { child: Some(child), log, cgroup };
        a.wait_log("synced", 1);
        a
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` appears at least `times` times in the log.
    pub fn wait_log(&mut self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.log_text();
            if text.matches(needle).count() >= times {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("xlb agent exited ({status}) before {needle:?}:\n{text}");
            }
            assert!(Instant::now() < deadline, "no {needle:?} ×{times} in the agent log:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent with SIGKILL (no cleanup, no Lease released: a
    /// crashed agent) and waits for it. Its programs stay attached.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- xlb agent log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}
