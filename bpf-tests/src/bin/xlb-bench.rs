// SPDX-License-Identifier: MIT OR Apache-2.0
//! `xlb-bench`: the side-by-side benchmark (see `bpf_tests::bench`).
//! `cargo xtask bench [--full]` builds and runs it.
//!
//! ```text
//! xlb-bench [--plan smoke|standard|full] [--systems xlb,nftables,…]
//!           [--services 1,1000] [--seconds S] [--no-test-run | --test-run-only]
//!           [--out DIR] [--json FILE]
//! ```
//! Prints the Markdown report; with `--out`, writes results.json,
//! results.md and the SVG charts there.

use std::path::PathBuf;

use bpf_tests::bench::{self, Plan, Progress, report};
use indicatif::{ProgressBar, ProgressStyle};

struct Bar(ProgressBar);

impl Progress for Bar {
    fn step(&self, msg: String) {
        self.0.inc(1);
        self.0.set_message(msg);
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let mut plan = match arg("--plan").as_deref().unwrap_or("standard") {
        "smoke" => Plan::smoke(),
        "standard" => Plan::standard(),
        "full" => Plan::full(),
        other => anyhow::bail!("unknown plan {other:?} (smoke, standard, full)"),
    };
    if let Some(list) = arg("--systems") {
        plan.systems = list
            .split(',')
            .map(|name| {
                bench::System::ALL
                    .into_iter()
                    .find(|s| s.name() == name)
                    .ok_or_else(|| anyhow::anyhow!("no system {name:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(s) = arg("--seconds") {
        plan.seconds = s.parse()?;
    }
    if let Some(s) = arg("--services") {
        plan.services = s.split(',').map(str::parse).collect::<Result<_, _>>()?;
    }
    if args.iter().any(|a| a == "--no-test-run") {
        plan.test_run_repeat = 0;
    }
    // Only the BPF_PROG_TEST_RUN figures (seconds, for iterating on the datapath).
    if args.iter().any(|a| a == "--test-run-only") {
        plan.systems.clear();
    }
    // Programming + two traffic modes + endpoint change per (size, system), then TCP streams and test_run.
    let steps = plan.services.len() as u64 * bench::System::ALL.len() as u64 * 4 + 2;
    let bar = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?.progress_chars("=> "),
    );
    let results = bench::run(&plan, &Bar(bar.clone()))?;
    bar.finish_and_clear();
    println!("{}", report::markdown(&results));
    if let Some(dir) = arg("--out") {
        let dir = PathBuf::from(dir);
        report::write_all(&results, &dir)?;
        println!("wrote {}/{{results.json,results.md,pps.svg,ns_per_packet.svg}}", dir.display());
    }
    if let Some(file) = arg("--json") {
        std::fs::write(&file, serde_json::to_string_pretty(&results)?)?;
        println!("wrote {file}");
    }
    Ok(())
}
