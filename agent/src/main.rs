// SPDX-License-Identifier: MIT OR Apache-2.0
//! The `xlb` command.
use anyhow::Context as _;
use clap::Parser as _;
use xlb::{
    Datapath, MapSizes,
    agent::{self, Settings},
    attach,
    cli::{Cli, Cmd, LogFormat, settings},
    dump,
    source::Snapshot,
};

fn init_logs(format: LogFormat, filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// `--dry-run`: one snapshot from the source, translated, printed.
async fn dry_run(s: &Settings) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::watch::channel(Snapshot::default());
    let source = agent::spawn_source(s, agent::client(s).await?, tx);
    let snap = loop {
        tokio::select! {
            r = rx.changed() => {
                r.context("the source ended before a complete view")?;
                if rx.borrow().synced {
                    break rx.borrow().clone();
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => anyhow::bail!("no complete view from the source in 60 s"),
        }
    };
    source.abort();
    let local = xlb::addresses::list().await.context("listing the node's addresses")?;
    let d = agent::desired(s, &snap, &local);
    println!("{}", serde_json::to_string_pretty(&d)?);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Version => println!("xlb {}", env!("CARGO_PKG_VERSION")),
        Cmd::Crd => print!("{}", xlb::lbipam::crd_yaml()),
        Cmd::Check => {
            let mut dp = Datapath::load(MapSizes::default()).context("loading the datapath")?;
            dp.load_programs().context("verifying the programs")?;
            for (name, prog) in dp.ebpf.programs() {
                // The verifier's effort per program, against its limit of 1,000,000.
                match prog.info().ok().and_then(|i| i.verified_instruction_count()) {
                    Some(n) => println!("{name}: loaded, {n} instructions verified"),
                    None => println!("{name}: loaded"),
                }
            }
        }
        Cmd::Dump { pin_dir, output, what } => print!("{}", dump::run(&pin_dir, &what, output)?),
        Cmd::Pktgen(a) => print!("{}", xlb::cli::pktgen(&a)?),
        Cmd::Agent(a) => {
            init_logs(a.log_format, &a.log);
            let s = settings(&a)?;
            if a.cleanup {
                let n = attach::cleanup(&s.pin_dir)?;
                tracing::info!(removed = n, dir = %s.pin_dir.display(), "detached and unpinned");
            } else if a.dry_run {
                dry_run(&s).await?;
            } else {
                agent::run(s).await?;
            }
        }
    }
    Ok(())
}
