// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench`: builds `xlb` and the benchmark, then runs
//! bpf-tests' `xlb-bench` (see bpf_tests::bench and docs/benchmarks.md).

use std::path::Path;

use clap::Parser;

#[derive(Parser)]
pub struct Args {
    /// Every size up to 100,000 services, 2 s per measurement, results into
    /// docs/bench/ (what docs/benchmarks.md shows).
    #[arg(long, conflicts_with = "smoke")]
    full: bool,
    /// The few-seconds version that `cargo xtask test` also runs.
    #[arg(long)]
    smoke: bool,
    /// Where to write results.json, results.md and the SVG charts
    /// (default: docs/bench with --full, target/bench otherwise).
    #[arg(long)]
    out: Option<String>,
    /// Only these systems (comma-separated: xlb, iptables-nft,
    /// iptables-legacy, nftables, ipvs, xdp-forward).
    #[arg(long)]
    systems: Option<String>,
    /// Only these numbers of services (comma-separated).
    #[arg(long)]
    services: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::cargo(&["build", "--release", "--quiet", "-p", "bpf-tests", "--bin", "xlb-bench"])?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let plan = if args.full {
        "full"
    } else if args.smoke {
        "smoke"
    } else {
        "standard"
    };
    let out = args.out.unwrap_or_else(|| if args.full { "docs/bench".into() } else { "target/bench".into() });
    let out = root.join(out);
    let mut cmd = std::process::Command::new(root.join("target/release/xlb-bench"));
    cmd.args(["--plan", plan, "--out"]).arg(&out);
    if let Some(s) = &args.systems {
        cmd.args(["--systems", s]);
    }
    if let Some(s) = &args.services {
        cmd.args(["--services", s]);
    }
    let status = cmd.status()?;
    anyhow::ensure!(status.success(), "xlb-bench failed ({status})");
    Ok(())
}
