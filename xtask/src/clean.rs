// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask clean`: removes what a killed test or demo run left behind
//! (its destructors never ran). Only the project's own resources: network
//! namespaces named `xlb…` (and the processes inside them, by PID), test pin
//! directories under /sys/fs/bpf (`xlbt…`, `xlbk-…`, never the agent's own
//! `/sys/fs/bpf/xlb`), test cgroups (`xlb-test-…`), and test temp directories. Do not run it while tests run.

use std::{fs, path::Path, process::Command};

fn netns_names() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("xlb"))
        .map(str::to_string)
        .collect()
}

pub fn run() -> anyhow::Result<()> {
    let mut killed = 0;
    let namespaces = netns_names();
    for ns in &namespaces {
        // Processes still running inside a leftover namespace (agents, echo
        // servers) were started by a test run: end them by PID.
        let out = Command::new("ip").args(["netns", "pids", ns]).output()?;
        for pid in String::from_utf8_lossy(&out.stdout).lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: plain kill(2) of a PID listed for the namespace.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    let xlb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb");
    let mut pins = 0;
    if let Ok(rd) = fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !(name.starts_with("xlbt") || name.starts_with("xlbk-")) {
                continue;
            }
            if xlb.exists() {
                let _ = Command::new(&xlb).args(["agent", "--cleanup", "--pin-dir"]).arg(e.path()).output();
            }
            let _ = fs::remove_dir_all(e.path());
            pins += 1;
        }
    }
    for ns in &namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    // Test cgroups (`xlb-test-…` under the cgroup2 root): their processes
    // were ended with the namespaces above; move any left to the root.
    let mut cgroups = 0;
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let Ok(rd) = fs::read_dir(root) else { continue };
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with("xlb-test-") {
                continue;
            }
            if let Ok(pids) = fs::read_to_string(e.path().join("cgroup.procs")) {
                for pid in pids.lines() {
                    let _ = fs::write(Path::new(root).join("cgroup.procs"), pid);
                }
            }
            if fs::remove_dir(e.path()).is_ok() {
                cgroups += 1;
            }
        }
    }
    let mut dirs = 0;
    for e in fs::read_dir(std::env::temp_dir())?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("xlb-test-") || name.starts_with("xlb-kube-") {
            let _ = fs::remove_dir_all(e.path());
            dirs += 1;
        }
    }
    println!(
        "clean: {} namespaces, {killed} processes, {pins} pin directories, {cgroups} cgroups, {dirs} temp directories removed",
        namespaces.len()
    );
    Ok(())
}
