// SPDX-License-Identifier: MIT OR Apache-2.0
//! The packet fuzzer (`cargo xtask fuzz`): valid seeds of every path
//! (`seeds`), mutated (`mutate`), each run through the XDP and the TC
//! ingress program with BPF_PROG_TEST_RUN, every result judged by an
//! independent oracle (`oracle`, with its own parser and checksums in
//! `wire`). The map state is fixed: the world is set up once, and every
//! `RESET` packets conntrack is emptied and the seeds' flows are set up
//! again, so the established / reply / fragment paths stay reachable.

pub mod mutate;
pub mod oracle;
pub mod seeds;
pub mod wire;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use datapath_common::{SCOPE_EXTERNAL, SCOPE_INTERNAL};

use crate::{Lb, Prog, fixtures::World};
use mutate::Rng;
use oracle::{Known, Outcome};

/// Packets between two resets of conntrack.
const RESET: u64 = 4096;
/// Violations described in full in the report.
const DESCRIBED: usize = 20;

pub struct Options {
    pub packets: u64,
    pub seed: u64,
    /// Where each violating packet is saved as a hex fixture.
    pub save_dir: Option<PathBuf>,
}

#[derive(Default)]
pub struct Report {
    pub packets: u64,
    pub runs: u64,
    /// Test runs the kernel refused before any program saw them.
    pub refused: u64,
    pub violations: u64,
    /// (seed class, program, outcome) → runs.
    pub outcomes: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    pub described: Vec<String>,
    pub saved: Vec<PathBuf>,
    pub seconds: f64,
}

impl Report {
    /// Outcomes per seed class, then the summary line.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let mut classes: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
        for ((class, prog, outcome), n) in &self.outcomes {
            *classes.entry(class).or_default().entry(format!("{prog} {outcome}")).or_default() += n;
        }
        let _ = writeln!(s, "outcomes per seed class (runs):");
        for (class, o) in &classes {
            let parts: Vec<String> = o.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(s, "  {class:<15} {}", parts.join(", "));
        }
        if self.refused > 0 {
            let _ = writeln!(s, "  refused by the kernel before the program: {}", self.refused);
        }
        for d in &self.described {
            let _ = writeln!(s, "VIOLATION {d}");
        }
        for p in &self.saved {
            let _ = writeln!(s, "saved {}", p.display());
        }
        let _ = writeln!(
            s,
            "{} runs in {:.1} s ({:.0} packets/s)",
            self.runs,
            self.seconds,
            self.packets as f64 / self.seconds.max(1e-9)
        );
        let _ = writeln!(s, "fuzz: {} packets, {} violations", self.packets, self.violations);
        s
    }
}

const PROGS: [(Prog, &str, u8); 2] = [(Prog::Xdp, "xdp", SCOPE_EXTERNAL), (Prog::TcIngress, "tc", SCOPE_INTERNAL)];

fn reset(w: &mut World) {
    let keys: Vec<_> = w.lb.dp.conntrack().into_iter().map(|(k, _)| k).collect();
    for k in keys {
        w.lb.dp.conntrack_remove(&k).expect("remove a conntrack entry");
    }
    for (prog, ..) in PROGS {
        for p in seeds::setup(prog) {
            w.lb.run(prog, &p);
        }
    }
}

fn verdicts(lb: &Lb) -> Vec<u64> {
    // Per-CPU: the test runs happen on this thread's CPU, the sum is what moved.
    lb.dp.verdicts().expect("read VERDICTS")
}

/// The world with its seeds' flows set up, and the oracle's knowledge of it.
pub struct Fuzzer {
    w: World,
    known: Vec<Known>,
    before: Vec<u64>,
}

/// One program's run of a packet, judged.
pub struct Judged {
    pub prog: &'static str,
    /// `None`: the kernel refused the test run.
    pub outcome: Option<Result<Outcome, String>>,
    /// The verdict reasons the run counted.
    pub reasons: Vec<&'static str>,
    pub output: Vec<u8>,
    verdict: Option<crate::Verdict>,
    delta: Vec<u64>,
    index: usize,
}

impl Fuzzer {
    pub fn new() -> Self {
        let (mut w, frontends) = seeds::build();
        let known = PROGS.iter().map(|&(.., scope)| Known { frontends: frontends.clone(), scope }).collect();
        {
            let _in = w.env.enter();
            reset(&mut w);
        }
        let before = verdicts(&w.lb);
        Self { w, known, before }
    }

    /// Empties conntrack and sets the seeds' flows up again.
    pub fn reset(&mut self) {
        let _in = self.w.env.enter();
        reset(&mut self.w);
        self.before = verdicts(&self.w.lb);
    }

    /// Every seed, with the program whose flows it belongs to.
    pub fn seeds(&self) -> Vec<seeds::Seed> {
        let _in = self.w.env.enter();
        PROGS.iter().flat_map(|&(prog, ..)| seeds::seeds(&self.w, prog)).collect()
    }

    /// Runs `input` through every program and judges each run.
    pub fn judge(&mut self, input: &[u8]) -> Vec<Judged> {
        let _in = self.w.env.enter();
        let mut out = Vec::new();
        for (i, &(prog, name, _)) in PROGS.iter().enumerate() {
            let res = self.w.lb.try_run(prog, input);
            let after = verdicts(&self.w.lb);
            let delta: Vec<u64> = after.iter().zip(&self.before).map(|(a, b)| a - b).collect();
            self.before = after;
            let reasons =
                (0..delta.len()).filter(|&r| delta[r] > 0).map(|r| datapath_common::verdict::NAMES[r]).collect();
            let (outcome, output, verdict) = match res {
                Ok((v, o)) => (Some(oracle::judge(&self.w.lb, &self.known[i], input, v, &o, &delta)), o, Some(v)),
                Err(_) => (None, Vec::new(), None),
            };
            out.push(Judged { prog: name, outcome, reasons, output, verdict, delta, index: i });
        }
        out
    }

    /// Judges run `j` of `input` again as if the program had produced
    /// `output` (to show the oracle catches a wrong one).
    pub fn rejudge(&self, j: &Judged, input: &[u8], output: &[u8]) -> Result<Outcome, String> {
        let _in = self.w.env.enter();
        let v = j.verdict.ok_or("the kernel refused this run")?;
        oracle::judge(&self.w.lb, &self.known[j.index], input, v, output, &j.delta)
    }
}

impl Default for Fuzzer {
    fn default() -> Self {
        Self::new()
    }
}

pub fn run(opts: &Options) -> Report {
    let started = std::time::Instant::now();
    let mut fz = Fuzzer::new();
    let all = fz.seeds();
    let mut rng = Rng::new(opts.seed);
    let mut report = Report::default();
    for n in 0..opts.packets {
        if n > 0 && n % RESET == 0 {
            fz.reset();
        }
        let seed = &all[rng.below(all.len())];
        let input = mutate::mutate(&seed.frame, &mut rng);
        report.packets += 1;
        for j in fz.judge(&input) {
            let Some(outcome) = j.outcome else {
                report.refused += 1;
                continue;
            };
            report.runs += 1;
            let label = match &outcome {
                Ok(o) => o.name(),
                Err(_) => "VIOLATION",
            };
            *report.outcomes.entry((seed.class, j.prog, label)).or_default() += 1;
            if let Err(why) = outcome {
                report.violations += 1;
                violation(&mut report, opts, n, j.prog, seed.class, &why, &input, &j.output);
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first 96 bytes, for the report (the saved fixture has them all).
fn head(b: &[u8]) -> String {
    let more = if b.len() > 96 { format!("… ({} bytes)", b.len()) } else { String::new() };
    format!("{}{more}", hex(&b[..b.len().min(96)]))
}

#[allow(clippy::too_many_arguments)]
fn violation(r: &mut Report, opts: &Options, n: u64, prog: &str, class: &str, why: &str, input: &[u8], out: &[u8]) {
    if r.described.len() < DESCRIBED {
        r.described.push(format!(
            "packet {n} ({class} seed) in {prog}: {why}\n  in  {}\n  out {}",
            head(input),
            head(out)
        ));
    }
    if let Some(dir) = &opts.save_dir
        && r.saved.len() < DESCRIBED
    {
        let _ = std::fs::create_dir_all(dir);
        let path = dir.join(format!("violation-{}-{n}-{prog}.hex", opts.seed));
        let text = format!("# {class} seed, {prog}: {why}\n{}\n", hex(input));
        if std::fs::write(&path, text).is_ok() {
            r.saved.push(path);
        }
    }
}
