// SPDX-License-Identifier: MIT OR Apache-2.0
//! `kube-emu`: the API-server emulator as a process, for the netns
//! cluster and by hand. Seeds objects from a directory of manifests,
//! writes a kubeconfig, logs one line when it listens, and serves until
//! killed. See the `kube_emu` library for what is emulated.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use kube_emu::ApiServer;

#[derive(Parser, Debug)]
#[command(name = "kube-emu", about = "A Kubernetes API-server emulator (plain HTTP, no auth)")]
struct Args {
    /// Address to listen on (port 0: any free port; the log line names it).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Directory of manifests to load first: every `*.yaml` / `*.yml`
    /// file, multi-document, each document applied by its kind (kinds
    /// not served are reported and skipped).
    #[arg(long, value_name = "DIR")]
    seed: Option<PathBuf>,
    /// Write a kubeconfig for this server to FILE.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

fn seed(api: &ApiServer, dir: &PathBuf) -> Result<usize, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut total = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let (n, skipped) = api.apply_all(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        for s in skipped {
            eprintln!("kube-emu: {}: skipped {s} (kind not served)", f.display());
        }
        total += n;
    }
    Ok(total)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let api = ApiServer::start_on(args.listen).await;
    let mut objects = 0;
    if let Some(dir) = &args.seed {
        match seed(&api, dir) {
            Ok(n) => objects = n,
            Err(e) => {
                eprintln!("kube-emu: seed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(path) = &args.kubeconfig
        && let Err(e) = std::fs::write(path, api.kubeconfig())
    {
        eprintln!("kube-emu: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("kube-emu listening on http://{} ({objects} objects seeded)", api.addr);
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
