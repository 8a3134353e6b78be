// SPDX-License-Identifier: MIT OR Apache-2.0
//! The packet fuzzer in the test suite: 50,000 mutated packets with a fixed
//! seed through XDP and TC, every result judged by the independent oracle
//! (`bpf_tests::fuzz`); and the packets earlier runs found, as fixtures.
//! `cargo xtask fuzz` runs the 1,000,000-packet version.

use bpf_tests::fuzz::{self, Fuzzer, Options};

#[test]
fn fifty_thousand_mutated_packets_and_no_violation() {
    let opts = Options { packets: 50_000, seed: 0x5eed, save_dir: Some("../target/fuzz".into()) };
    let report = fuzz::run(&opts);
    eprint!("{}", report.text());
    assert_eq!(report.violations, 0, "{}", report.text());
    // Every class reached the paths it exists for.
    for (class, outcome) in [
        ("new_flow", "translated"),
        ("established", "translated"),
        ("reply", "translated"),
        ("snat_reply", "translated"),
        ("reject", "answered"),
        ("icmp_error", "icmp-translated"),
        ("first_fragment", "translated"),
        ("later_fragment", "translated"),
        ("too_big", "answered"),
        ("non_service", "unchanged"),
    ] {
        let n: u64 = report.outcomes.iter().filter(|((c, _, o), _)| *c == class && *o == outcome).map(|(_, n)| n).sum();
        assert!(n > 0, "no {class} seed was {outcome}: {}", report.text());
    }
}

/// Packets the fuzzer found mishandled, each with what must happen to it
/// now, in every program.
const FOUND: &[(&str, &str, &str)] = &[
    (
        // IPv4 first fragment (MF) whose IP length (22) ends inside the UDP
        // header: the header was read past the packet and a reject quoted
        // bytes that were not the packet's.
        "ipv4 first fragment shorter than a UDP header",
        "02000000dd0102000000cc010800450000160000200040118e09c00002640a60000aa03d0051000e5d1d6e6f626f6479",
        "malformed",
    ),
    (
        // The same over IPv6: a fragment header (offset 0, M) and one byte of UDP.
        "ipv6 first fragment shorter than a UDP header",
        "02000000dd0102000000cc0186dd6000000000092c4020010db8000000000000000000000100fd0000960000000000000000000000101100000100000000a4250051001bf9a36e6f626f6479",
        "malformed",
    ),
];

fn bytes(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn packets_the_fuzzer_found_are_handled() {
    let mut fz = Fuzzer::new();
    for (name, hex, reason) in FOUND {
        for j in fz.judge(&bytes(hex)) {
            let outcome = j.outcome.unwrap_or_else(|| panic!("{name}: the kernel refused the run"));
            outcome.unwrap_or_else(|why| panic!("{name} in {}: {why}", j.prog));
            assert_eq!(j.reasons, [*reason], "{name} in {}", j.prog);
        }
    }
}

/// The oracle is not a rubber stamp: every seed's real output passes it,
/// and the same output with one wrong byte (payload, L4 checksum,
/// destination address, or the input passed on with a changed byte) fails.
#[test]
fn the_oracle_rejects_wrong_outputs() {
    let mut fz = Fuzzer::new();
    let mut checked = 0;
    for seed in fz.seeds() {
        let input = seed.frame.clone();
        for j in fz.judge(&input) {
            let outcome = j.outcome.clone().expect("run").unwrap_or_else(|e| panic!("{} seed: {e}", seed.class));
            // A drop has no output to judge.
            if outcome == fuzz::oracle::Outcome::Dropped {
                continue;
            }
            let Some(ip) = fuzz::wire::frame(&j.output) else { continue };
            let mut wrong = Vec::new();
            let mut last = j.output.clone();
            *last.last_mut().unwrap() ^= 1;
            wrong.push(("last byte", last));
            if let Some(c) = ip.l4_csum_at().filter(|&c| c + 2 <= j.output.len() && ip.frag == fuzz::wire::Frag::No) {
                let mut o = j.output.clone();
                o[c] ^= 0x10;
                wrong.push(("L4 checksum", o));
            }
            let mut o = j.output.clone();
            o[ip.addr_range().end - 1] ^= 1;
            if !ip.v6 {
                bpf_tests::packet::fix_ipv4_checksum(&mut o, ip.l3);
            }
            wrong.push(("destination address", o));
            for (what, o) in wrong {
                // A last byte beyond the IP packet (Ethernet padding) is not the oracle's business.
                if what == "last byte" && ip.end < j.output.len() {
                    continue;
                }
                let r = fz.rejudge(&j, &input, &o);
                assert!(r.is_err(), "{} seed in {} ({outcome:?}): a wrong {what} passed", seed.class, j.prog);
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "{checked}");
}
