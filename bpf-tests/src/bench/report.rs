// SPDX-License-Identifier: MIT OR Apache-2.0
//! The benchmark's outputs: a Markdown report (tables and ratios) and two
//! SVG charts (plotters): delivered pps and CPU ns/packet against the number
//! of services, one line per system and traffic mode.

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use plotters::prelude::*;

use super::{Results, System, Throughput};

fn si(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.2} M", v / 1e6),
        v if v >= 1e3 => format!("{:.0} k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn find(r: &Results, system: System, n: u32, one: bool) -> Option<&Throughput> {
    r.throughput.iter().find(|t| t.system == system && t.services == n && (t.flows == 1) == one)
}

fn systems(r: &Results) -> Vec<System> {
    r.throughput.iter().map(|t| t.system).collect::<BTreeSet<_>>().into_iter().collect()
}

/// "3.1×" of xlb over `other` at (n, mode), if both ran.
fn ratio(r: &Results, other: System, n: u32, one: bool) -> Option<f64> {
    let x = find(r, System::Xlb, n, one)?.pps;
    let o = find(r, other, n, one)?.pps;
    (o > 0.0).then(|| x / o)
}

pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let sizes: Vec<u32> = r.plan.services.clone();
    let _ = writeln!(
        md,
        "Plan `{}`: {} s of UDP traffic ({}-byte frames) per measurement, services = {:?}.\n",
        r.plan.name, r.plan.seconds, r.plan.packet_size, sizes
    );
    let _ = writeln!(
        md,
        "Machine: {}.\n",
        r.machine.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    for (one, title) in [(true, "One established flow"), (false, "A new flow per packet")] {
        let _ = writeln!(md, "### {title}: packets/s delivered to the backend (softirq ns/packet)\n");
        let sys = systems(r);
        let _ = writeln!(md, "| services | {} |", sys.iter().map(|s| s.name()).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(md, "|---:|{}", "---:|".repeat(sys.len()));
        for &n in &sizes {
            let cells: Vec<String> = sys
                .iter()
                .map(|&s| match find(r, s, n, one) {
                    Some(t) => format!("{} ({:.0})", si(t.pps), t.cpu_ns_per_packet),
                    None => "skipped".into(),
                })
                .collect();
            let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
        }
        md.push('\n');
    }
    let _ = writeln!(md, "### Ratios (xlb's delivered pps over the other's)\n");
    let others = [System::IptablesNft, System::IptablesLegacy, System::Nftables, System::XdpForward];
    let _ = writeln!(md, "| services | traffic | {} |", others.map(|s| s.name()).join(" | "));
    let _ = writeln!(md, "|---:|---|{}", "---:|".repeat(others.len()));
    for &n in &sizes {
        for one in [true, false] {
            let cells: Vec<String> =
                others.iter().map(|&o| ratio(r, o, n, one).map(|x| format!("{x:.2}×")).unwrap_or("–".into())).collect();
            let _ = writeln!(md, "| {n} | {} | {} |", if one { "one flow" } else { "new flows" }, cells.join(" | "));
        }
    }
    md.push('\n');
    for one in [true, false] {
        let xs: Vec<f64> = sizes.iter().filter_map(|&n| find(r, System::Xlb, n, one)).map(|t| t.pps).collect();
        if xs.len() > 1 {
            let (lo, hi) = xs.iter().fold((f64::MAX, 0f64), |(l, h), &v| (l.min(v), h.max(v)));
            let _ = writeln!(
                md,
                "xlb, {}: {} to {} pps across {:?} services (lowest is {:.0} % of highest).\n",
                if one { "one flow" } else { "new flows" },
                si(lo),
                si(hi),
                sizes,
                lo / hi * 100.0
            );
        }
    }
    east_west(r, &mut md);
    if !r.tcp_stream.is_empty() {
        let _ = writeln!(md, "### Bulk TCP from a pod, offloads on (Gbit/s)\n");
        let _ = writeln!(md, "| family | pod → pod (floor) | pod → ClusterIP | ratio |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for (family, ratio) in &r.tcp_stream_ratio {
            let g =
                |path| r.tcp_stream.iter().find(|s| s.family == *family && s.path == path).map_or(0.0, |s| s.gbit_s);
            let _ = writeln!(md, "| {family} | {:.1} | {:.1} | {ratio:.2}× |", g("pod_to_pod"), g("pod_to_cluster_ip"));
        }
        md.push('\n');
    }
    let _ = writeln!(md, "### Control plane\n");
    let _ = writeln!(md, "| system | services | program all (s) | one endpoint change (ms) |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for c in &r.control_plane {
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.2} |",
            c.system.name(),
            c.services,
            c.program_seconds,
            c.endpoint_change_ms
        );
    }
    md.push('\n');
    if !r.skipped.is_empty() {
        let _ = writeln!(md, "### Skipped\n");
        for s in &r.skipped {
            let at = s.services.map(|n| format!(" at {n} services")).unwrap_or_default();
            let _ = writeln!(md, "- {}{at}: {}", s.system.name(), s.reason);
        }
        md.push('\n');
    }
    let _ = writeln!(md, "### BPF_PROG_TEST_RUN (ns/packet, median)\n");
    let _ = writeln!(md, "| path | ns/packet |");
    let _ = writeln!(md, "|---|---:|");
    for (k, v) in &r.test_run {
        let _ = writeln!(md, "| {k} | {v:.1} |");
    }
    md.push('\n');
    schedulers(&mut md, r);
    if !r.flood.is_empty() {
        let _ = writeln!(md, "### SYN flood (BPF_PROG_TEST_RUN, XDP, external Maglev service, 4 backends)\n");
        let _ = writeln!(
            md,
            "| SNAT | conntrack entries | established | SYNs | entries lost | connections broken | new connections ok | ns/SYN, table full |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for f in &r.flood {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} of {} | {:.0} |",
                if f.snat { "yes" } else { "no" },
                f.table_entries,
                f.established,
                f.syns,
                f.lost,
                f.broken,
                f.fresh_ok,
                f.fresh,
                f.ns_per_syn_full
            );
        }
        md.push('\n');
    }
    let _ = writeln!(md, "### Map memory per service\n");
    let _ = writeln!(
        md,
        "| services | xlb bytes/service in use | xlb maps, kernel memory (MiB) | Cilium Maglev table bytes/service |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    for m in &r.memory {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} | {} |",
            m.services,
            m.bytes_per_service,
            m.memlock_bytes as f64 / 1048576.0,
            r.cilium_maglev_bytes_per_service
        );
    }
    md
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0x7f, 0x7f, 0x7f),
];

fn color(s: System) -> RGBColor {
    COLORS[System::ALL.iter().position(|x| *x == s).unwrap_or(0)]
}

/// One chart: `value` of every (system, mode) line against services (log-log).
fn chart(
    r: &Results,
    file: &Path,
    title: &str,
    y_desc: &str,
    value: impl Fn(&Throughput) -> f64,
) -> anyhow::Result<()> {
    let pts: Vec<(System, bool, u32, f64)> =
        r.throughput.iter().map(|t| (t.system, t.flows == 1, t.services, value(t))).filter(|p| p.3 > 0.0).collect();
    anyhow::ensure!(!pts.is_empty(), "nothing to draw");
    let xmax = pts.iter().map(|p| p.2).max().unwrap_or(1).max(10) as f64 * 1.5;
    let ymin = pts.iter().map(|p| p.3).fold(f64::MAX, f64::min) / 2.0;
    let ymax = pts.iter().map(|p| p.3).fold(0.0, f64::max) * 2.0;
    let root = SVGBackend::new(file, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..xmax).log_scale(), (ymin..ymax).log_scale())?;
    c.configure_mesh().x_desc("services").y_desc(y_desc).y_label_formatter(&|v| si(*v)).draw()?;
    for s in systems(r) {
        for one in [true, false] {
            let line: Vec<(f64, f64)> =
                pts.iter().filter(|p| p.0 == s && p.1 == one).map(|p| (p.2 as f64, p.3)).collect();
            if line.is_empty() {
                continue;
            }
            let col = color(s);
            let style = if one { col.stroke_width(2) } else { col.stroke_width(1) };
            let label = format!("{} ({})", s.name(), if one { "one flow" } else { "new flows" });
            c.draw_series(LineSeries::new(line.clone(), style))?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
            if one {
                c.draw_series(line.iter().map(|p| Circle::new(*p, 4, col.filled())))?;
            } else {
                c.draw_series(line.iter().map(|p| TriangleMarker::new(*p, 5, col)))?;
            }
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `results.json`, `results.md`, `pps.svg` and `ns_per_packet.svg` into `dir`.
pub fn write_all(r: &Results, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("results.md"), markdown(r))?;
    if r.throughput.is_empty() {
        // No traffic was generated (see `Results::skipped`): no charts.
        return Ok(());
    }
    chart(
        r,
        &dir.join("pps.svg"),
        "Delivered packets/s vs services (● one flow, ▲ new flows)",
        "packets/s",
        |t| t.pps,
    )?;
    chart(r, &dir.join("ns_per_packet.svg"), "Node CPU (softirq) ns/packet vs services", "ns/packet", |t| {
        t.cpu_ns_per_packet
    })?;
    Ok(())
}

/// The east-west table: connections/s and round-trip latency per path,
/// and socket-LB against the floor and the kube-proxy modes.
fn east_west(r: &Results, md: &mut String) {
    if r.east_west.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### East-west: TCP connections/s from a pod to a ClusterIP (round trip p50 / p99 µs on one connection)\n"
    );
    let paths = super::east_west::PATHS;
    let _ = writeln!(md, "| services | {} |", paths.join(" | "));
    let _ = writeln!(md, "|---:|{}", "---:|".repeat(paths.len()));
    let sizes: BTreeSet<u32> = r.east_west.iter().map(|e| e.services).collect();
    let row = |p: &str, n: u32| r.east_west.iter().find(|e| e.path == p && e.services == n);
    for &n in &sizes {
        let cells: Vec<String> = paths
            .iter()
            .map(|p| match row(p, n) {
                Some(e) => format!("{} ({:.0} / {:.0})", si(e.connections_per_s), e.rr_p50_us, e.rr_p99_us),
                None => "-".into(),
            })
            .collect();
        let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
    }
    let _ = writeln!(md);
    for &n in &sizes {
        let Some(s) = row("socket-lb", n) else { continue };
        let vs = |p: &str| {
            row(p, n).filter(|o| o.connections_per_s > 0.0).map(|o| s.connections_per_s / o.connections_per_s)
        };
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}×"));
        let _ = writeln!(
            md,
            "- {n} services: socket-LB connections/s = {} the direct floor, {} TC, {} iptables, {} nftables.",
            fmt(vs("direct")),
            fmt(vs("tc")),
            fmt(vs("iptables-nft")),
            fmt(vs("nftables"))
        );
    }
    let _ = writeln!(md);
}

/// New flows per second per scheduler (issue #14), from the test_run
/// `new_flow_<scheduler>[_<N>_services]` medians, one column per size.
fn schedulers(md: &mut String, r: &Results) {
    let names = ["rr", "wrr", "lc", "wlc", "sh", "mh", "random"];
    let mut sizes: Vec<(String, String)> = vec![("1 service".into(), String::new())];
    let mut n: Vec<u64> = r
        .test_run
        .keys()
        .filter_map(|k| k.strip_prefix("new_flow_rr_")?.strip_suffix("_services")?.parse().ok())
        .collect();
    n.sort();
    sizes.extend(n.iter().map(|n| (format!("{n} services"), format!("_{n}_services"))));
    if !r.test_run.contains_key("new_flow_rr") {
        return;
    }
    let _ = writeln!(md, "### New flows per scheduler (BPF_PROG_TEST_RUN, XDP, 4 backends weighted 3:1:1:1)\n");
    let header: Vec<String> = sizes.iter().map(|(h, _)| format!("{h}: ns / Mpps")).collect();
    let _ = writeln!(md, "| scheduler | {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(sizes.len()));
    for name in names {
        let cells: Vec<String> = sizes
            .iter()
            .map(|(_, sfx)| match r.test_run.get(&format!("new_flow_{name}{sfx}")) {
                Some(ns) if *ns > 0.0 => format!("{ns:.0} / {:.2}", 1e3 / ns),
                _ => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
    md.push('\n');
}
