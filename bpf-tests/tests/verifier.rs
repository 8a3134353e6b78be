// SPDX-License-Identifier: MIT OR Apache-2.0
//! Every program of the datapath verifies in this kernel, with headroom
//! under the verifier's limit of 1,000,000 walked instructions: a change
//! that brings a program near it (the conntrack table's scans, inlined into
//! every path of the parser, took the main program past it) fails here with
//! the figures, not somewhere later as a load error.

use bpf_tests::test_sizes;
use xlb::Datapath;

/// The most instructions a program may take the verifier through: 15 %
/// under the limit. (On this 6.18 kernel, with the conntrack table: the
/// new-flow programs 673,000–717,000, the ICMP error programs ≈ 380,000,
/// the main programs 172,000–245,000.)
const HEADROOM: u32 = 850_000;

#[test]
fn every_program_verifies_with_headroom_under_the_verifier_limit() {
    let mut dp = Datapath::load(test_sizes()).expect("load the object");
    let names: Vec<String> = dp.ebpf.programs().map(|(n, _)| n.to_string()).collect();
    let mut failed = Vec::new();
    for name in &names {
        if dp.load_programs_where(|n| n == name).is_err() {
            failed.push(name.clone());
        }
    }
    let counts = dp.verified_instructions();
    for (name, n) in &counts {
        println!("{name:32} {n:>9} instructions verified");
    }
    assert!(failed.is_empty(), "refused by the verifier: {failed:?}");
    let heavy: Vec<_> = counts.iter().filter(|(_, n)| *n > HEADROOM).collect();
    assert!(heavy.is_empty(), "over {HEADROOM} verified instructions: {heavy:?}");
}
