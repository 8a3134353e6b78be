// SPDX-License-Identifier: MIT OR Apache-2.0
//! Project workflows: `cargo xtask setup | test | demo | bench | fuzz | clean`.
mod bench;
mod clean;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent, quick when done):
    /// rust-src for nightly, bpf-linker built against nightly's LLVM, Debian
    /// packages, a mounted bpffs.
    Setup {
        /// Only the build toolchain (nightly, rust-src, bpf-linker): no
        /// Debian packages, no bpffs. For container image builds.
        #[arg(long)]
        toolchain_only: bool,
    },
    /// Setup, then every test: host unit tests, packet tests, netns tests.
    Test,
    /// Setup, then the demo: a two-node cluster in network namespaces with
    /// an `xlb agent` per node, fed manifests/examples, real requests
    /// through every Service type, then an `xlb dump services` table.
    Demo,
    /// Remove what a killed test or demo run left behind (namespaces named
    /// xlb…, their processes, test pins and temp directories).
    Clean,
    /// Setup, then the side-by-side benchmark: xlb vs kube-proxy's
    /// iptables and nftables rules vs a plain XDP forwarder, with XDP
    /// live-frames traffic, control-plane times, test_run ns/packet and map
    /// memory. `--full` is the run docs/benchmarks.md shows.
    Bench(bench::Args),
    /// Setup, then the packet fuzzer: mutated seeds of every datapath path
    /// through the XDP and TC programs, each result checked by an
    /// independent oracle; ends with `fuzz: N packets, V violations` and
    /// fails on any violation (each saved under target/fuzz as hex).
    Fuzz {
        /// Packets to generate (each runs through both programs).
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// The mutation sequence's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup { toolchain_only: true } => setup::toolchain(),
        Cmd::Setup { toolchain_only: false } => setup::run(),
        Cmd::Test => {
            setup::run()?;
            cargo(&["fmt", "--all", "--check"]).context("code is not formatted: run `cargo fmt --all`")?;
            // The agent binary first: the netns tests run it as a process.
            cargo(&["build", "--release", "-p", "agent", "--bin", "xlb"]).context("building xlb")?;
            cargo(&["build", "--release", "-p", "bpf-tests", "--bins"]).context("building the test binaries")?;
            cargo(&["test", "--release"]).context("tests failed")
        }
        Cmd::Fuzz { packets, seed } => {
            setup::run()?;
            cargo(&["build", "--release", "--quiet", "-p", "bpf-tests", "--bin", "xlb-fuzz"])
                .context("building the fuzzer")?;
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let status = Command::new(root.join("target/release/xlb-fuzz"))
                .current_dir(&root)
                .args(["--packets", &packets.to_string(), "--seed", &seed.to_string()])
                .status()
                .context("running xlb-fuzz")?;
            if !status.success() {
                bail!("the fuzzer found violations (see target/fuzz)");
            }
            Ok(())
        }
        Cmd::Demo => {
            setup::run()?;
            cargo(&["build", "--release", "--quiet", "-p", "agent", "--bin", "xlb"]).context("building xlb")?;
            cargo(&["build", "--release", "--quiet", "-p", "bpf-tests", "--bins"]).context("building the demo")?;
            cargo(&["run", "--release", "--quiet", "-p", "bpf-tests", "--bin", "xlb-demo"])
        }
        Cmd::Clean => clean::run(),
        Cmd::Bench(args) => {
            setup::run()?;
            bench::run(args)
        }
    }
}

/// Runs cargo with `args` from the workspace root, inheriting output.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(args).current_dir(root).status().context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
