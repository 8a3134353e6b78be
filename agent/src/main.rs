// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `xlb` command.
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xlb::{Datapath, MapSizes};

#[derive(Parser)]
#[command(name = "xlb", version, about = "Kubernetes service load balancer with an eBPF datapath")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the version.
    Version,
    /// Load every datapath program into the kernel (through the verifier) and
    /// report its size, without attaching anything.
    Check,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Version => println!("xlb {}", env!("CARGO_PKG_VERSION")),
        Cmd::Check => {
            let mut dp = Datapath::load(MapSizes::default()).context("loading the datapath")?;
            dp.load_programs().context("verifying the programs")?;
            for (name, _) in dp.ebpf.programs() {
                println!("{name}: loaded");
            }
        }
    }
    Ok(())
}
