// SPDX-License-Identifier: MIT OR Apache-2.0
//! The benchmark's smoke run (`cargo xtask bench --smoke`), so it never
//! rots: every system at 1 and 100 services with real traffic, then the
//! JSON, Markdown and charts. It checks that each system carried traffic
//! and that xlb DNATed every packet it delivered; it asserts no speed.

use bpf_tests::bench::{self, Plan, System, report};

#[test]
fn smoke_run_measures_every_system_and_writes_the_report() {
    let plan = Plan::smoke();
    let r = bench::run(&plan, &()).expect("the smoke benchmark runs");

    // A kernel that refuses XDP live frames has no generator: each system's
    // traffic is then skipped, and says so (the rest is measured all the same).
    let no_traffic = xlb::pktgen::live_frames_refused();
    for system in [System::Xlb, System::IptablesNft, System::IptablesLegacy, System::Nftables, System::XdpForward] {
        for &n in &plan.services {
            if let Some(reason) = &no_traffic {
                eprintln!("skipped: {system:?} × {n} throughput: {reason}");
                assert!(
                    r.skipped.iter().any(|s| s.system == system && s.services == Some(n) && &s.reason == reason),
                    "{system:?} × {n}: no throughput and no skip: {:?}",
                    r.skipped
                );
                continue;
            }
            for flows in [1, plan.many_flows] {
                let t = r
                    .throughput
                    .iter()
                    .find(|t| t.system == system && t.services == n && t.flows == flows)
                    .unwrap_or_else(|| panic!("no {system:?} at {n} services, {flows} flows: {:#?}", r.skipped));
                assert!(t.pps > 1_000.0, "{system:?} at {n} services carried almost nothing: {t:?}");
                assert!(t.sent_pps >= t.pps * 0.99, "delivered more than sent: {t:?}");
                if system == System::Xlb {
                    assert_eq!(t.leaked, 0, "xlb let a packet through without DNAT: {t:?}");
                }
            }
        }
    }
    // This kernel has no IPVS; the run says so instead of failing.
    if !std::path::Path::new("/proc/net/ip_vs").exists() {
        assert!(r.skipped.iter().any(|s| s.system == System::Ipvs && s.reason.contains("IPVS")), "{:?}", r.skipped);
    }
    for system in [System::Xlb, System::IptablesNft, System::IptablesLegacy, System::Nftables] {
        assert!(
            r.control_plane.iter().any(|c| c.system == system && c.services == 100 && c.endpoint_change_ms > 0.0),
            "no control-plane figure for {system:?}: {:?}",
            r.control_plane
        );
    }
    assert!(r.test_run["new_flow"] > r.test_run["xdp_tx_baseline"], "{:?}", r.test_run);
    assert!(r.test_run.contains_key("ct_hit_100_services"));
    // The flood ran and broke no established connection (the full-size
    // flood, new connections counted, is `tests/conntrack.rs`).
    assert_eq!(r.flood.iter().map(|f| f.snat).collect::<Vec<_>>(), [false, true], "{:?}", r.flood);
    for f in &r.flood {
        println!("flood: {f:?}");
        assert_eq!((f.lost, f.broken), (0, 0), "{f:?}");
        assert!(f.fresh_ok <= f.fresh, "{f:?}");
        assert!(f.ns_per_syn_full > 0.0 && f.verdicts["new_flow"] >= f.established as u64, "{f:?}");
    }
    let m = r.memory.iter().find(|m| m.services == 100).expect("xlb map memory at 100 services");
    assert!(m.bytes_per_service > 1_000.0 && m.bytes_per_service < r.cilium_maglev_bytes_per_service as f64, "{m:?}");

    // The outputs: JSON with the documented top-level keys, Markdown, charts.
    let dir = bpf_tests::agent::TempDir::new();
    report::write_all(&r, &dir.path).expect("write the report");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path.join("results.json")).unwrap()).unwrap();
    for st in &r.tcp_stream {
        assert!(st.gbit_s > 0.1, "a TCP stream barely moved: {st:?}");
    }
    assert_eq!(r.tcp_stream.len(), 4, "floor and ClusterIP, both families: {:?}", r.tcp_stream);
    // East-west connections: every path carried connections, without errors.
    for path in bench::east_west::PATHS {
        let e =
            r.east_west.iter().find(|e| e.path == path && e.services == 1).unwrap_or_else(|| panic!("no {path} row"));
        assert!(e.connections_per_s > 100.0 && e.errors == 0 && e.rr_p50_us > 0.0, "{e:?}");
    }
    for key in [
        "schema",
        "machine",
        "conntrack",
        "throughput",
        "skipped",
        "control_plane",
        "test_run",
        "memory",
        "tcp_stream",
        "east_west",
        "flood",
    ] {
        assert!(json.get(key).is_some(), "results.json lacks {key}");
    }
    let md = std::fs::read_to_string(dir.path.join("results.md")).unwrap();
    assert!(md.contains("East-west") && md.contains("socket-lb"), "{md}");
    if no_traffic.is_some() {
        assert!(json["throughput"].as_array().is_some_and(|t| t.is_empty()), "{}", json["throughput"]);
        return;
    }
    let t = &json["throughput"][0];
    for key in ["system", "services", "flows", "pps"] {
        assert!(t.get(key).is_some(), "a throughput entry lacks {key}: {t}");
    }
    assert!(md.contains("| services | xlb |") && md.contains("iptables-nft"), "{md}");
    for chart in ["pps.svg", "ns_per_packet.svg"] {
        let svg = std::fs::read_to_string(dir.path.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("xlb (one flow)"), "{chart} is not a chart");
    }
}
