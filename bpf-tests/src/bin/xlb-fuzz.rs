// SPDX-License-Identifier: MIT OR Apache-2.0
//! `xlb-fuzz [--packets N] [--seed S] [--save DIR]`: the packet fuzzer
//! (`bpf_tests::fuzz`); `cargo xtask fuzz` builds and runs it. Exits
//! non-zero on any violation, each saved under DIR (default target/fuzz)
//! as a hex fixture.

use bpf_tests::fuzz::{self, Options};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let opts = Options {
        packets: arg("--packets").map(|s| s.replace('_', "").parse()).transpose()?.unwrap_or(1_000_000),
        seed: arg("--seed").map(|s| s.parse()).transpose()?.unwrap_or(1),
        save_dir: Some(arg("--save").unwrap_or_else(|| "target/fuzz".into()).into()),
    };
    let report = fuzz::run(&opts);
    print!("{}", report.text());
    if report.violations > 0 {
        anyhow::bail!("{} violations", report.violations);
    }
    Ok(())
}
