// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench`: runs the benchmark binary (bpf-tests' `xlb-bench`).

use clap::Parser;

#[derive(Parser)]
pub struct Args {
    /// The short BPF_PROG_TEST_RUN benchmark (the only one so far).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let _ = args.quick;
    let mut cmd = vec!["run", "--release", "--quiet", "-p", "bpf-tests", "--bin", "xlb-bench", "--"];
    let json;
    if let Some(file) = &args.json {
        json = std::fs::canonicalize(".").map(|d| d.join(file))?.display().to_string();
        cmd.extend(["--json", json.as_str()]);
    }
    crate::cargo(&cmd)
}
