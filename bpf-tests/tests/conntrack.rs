// SPDX-License-Identifier: MIT OR Apache-2.0
//! Conntrack properties of issue #13, through BPF_PROG_TEST_RUN: a flow has
//! one lifetime (its reply entry, where its SNAT port lives, is never handed
//! to another client while it sends), the close timeout applies only once
//! both sides sent a FIN (Cilium's `tx_closing && rx_closing`; nf_conntrack
//! keeps a half-closed flow in CLOSE_WAIT / FIN_WAIT too), two CPUs racing
//! on a flow's first packets agree on one translation, and a TCP packet
//! without SYN that found no entry is counted (Katran's LRU_MISS).

use bpf_tests::{
    NEIGH_MAC, OUT_MAC, Prog, Verdict,
    fixtures::*,
    packet::{ACK, FIN, PSH, Pkt, SYN},
    svc_key,
};
use datapath_common::{CT_F_REPLY, CtEntry, CtKey, PROTO_UDP, SCHED_MAGLEV, SCHED_RANDOM, ct};

const SEC: u64 = 1_000_000_000;

/// Moves every flow's last-seen time `secs` into the past, as if the flow
/// had been quiet that long.
fn age(w: &mut World, secs: u64) {
    w.lb.dp.conntrack_age(secs);
}

#[test]
fn a_half_closed_flow_outlives_the_close_timeout_and_a_closed_one_does_not() {
    both_families_both_hooks(|prog, v6| {
        let mut w = world();
        let _in = w.env.enter();
        let key = vip_service(&mut w, prog, v6, SCHED_MAGLEV, 0, &backends(v6));
        let (vip, client) = family(v6);
        let syn = Pkt::tcp(client, 40000, vip, 80, SYN);
        let b = expected_backend(&w, &key, &syn);
        let server = backend_addr(b);
        let from_server = |flags| Pkt::tcp(&server, 8080, client, 40000, flags).macs(NEIGH_MAC, OUT_MAC);
        w.lb.run(prog, &syn.build());
        w.lb.run(prog, &from_server(SYN | ACK).build());
        w.lb.run(prog, &Pkt::tcp(client, 40000, vip, 80, ACK).build());
        // The client is done sending (shutdown(SHUT_WR)); the server is not.
        let fin = Pkt::tcp(client, 40000, vip, 80, FIN | ACK);
        assert_eq!(w.lb.run(prog, &fin.build()), (Verdict::Redirect, dnatted(&fin, b)));
        let fwd = w.lb.dp.conntrack_get(&tcp_key(client, 40000, vip, 80)).unwrap();
        let rep = w.lb.dp.conntrack_get(&tcp_key(&server, 8080, client, 40000)).unwrap();
        assert_eq!((fwd.fin_out, fwd.fin_in, rep.fin_out, rep.fin_in), (1, 0, 0, 1), "{prog:?} v6={v6}");
        assert!(!ct::closing(&fwd) && !ct::closing(&rep));

        // Quiet for longer than the close timeout: the flow is still there.
        age(&mut w, ct::TIMEOUT_CLOSE_NS / SEC + 1);
        let data = from_server(ACK | PSH).payload(b"late answer");
        let (v, out) = w.lb.run(prog, &data.build());
        assert_eq!(v, Verdict::Redirect);
        assert_eq!(
            out,
            data.clone().src(vip, 80).macs(OUT_MAC, NEIGH_MAC).hop().build(),
            "{prog:?} v6={v6}: reverse NAT"
        );
        let ack = Pkt::tcp(client, 40000, vip, 80, ACK);
        assert_eq!(w.lb.run(prog, &ack.build()), (Verdict::Redirect, dnatted(&ack, b)));
        assert_eq!((w.lb.verdict("new_flow"), w.lb.verdict("ct_hit")), (1, 3), "{prog:?} v6={v6}: not re-balanced");

        // The server closes too: now the close timeout applies.
        w.lb.run(prog, &from_server(FIN | ACK).build());
        let fwd = w.lb.dp.conntrack_get(&tcp_key(client, 40000, vip, 80)).unwrap();
        assert!(ct::closing(&fwd), "{prog:?} v6={v6}: both FINs seen");
        age(&mut w, ct::TIMEOUT_CLOSE_NS / SEC + 1);
        w.lb.run(prog, &ack.build());
        assert_eq!(w.lb.verdict("new_flow"), 2, "{prog:?} v6={v6}: the closed flow expired");
        assert_eq!(w.lb.verdict("ct_miss_non_syn"), 1, "{prog:?} v6={v6}: an ACK without an entry is counted");
    });
}

/// The one-way UDP over SNAT (syslog, statsd, OTLP): replies never
/// come, so only the forward direction refreshes the flow. Its reply entry,
/// which holds its SNAT port, must live as long as the forward one.
#[test]
fn one_way_udp_keeps_its_snat_port_from_other_clients() {
    for v6 in [false, true] {
        let mut w = world();
        let _in = w.env.enter();
        // One SNAT port: a second client can only have it once the first is gone.
        w.lb.config_snat(NODE4, NODE6, 61000, 61000);
        vip_service(&mut w, Prog::Xdp, v6, SCHED_MAGLEV, 0, &backends(v6)[..1]);
        let (vip, a) = family(v6);
        let b = if v6 { "2001:db8::101" } else { "192.0.2.101" };
        let from = |c: &str| Pkt::udp(c, 5140, vip, 80).payload(b"<13>log line");
        let snat_port = |out: &[u8]| {
            let l4 = 14 + if v6 { 40 } else { 20 };
            u16::from_be_bytes([out[l4], out[l4 + 1]])
        };
        let (v, out) = w.lb.run(Prog::Xdp, &from(a).build());
        assert_eq!((v, snat_port(&out)), (Verdict::Redirect, 61000));
        for _ in 0..2 {
            age(&mut w, 50);
            let (v, out) = w.lb.run(Prog::Xdp, &from(a).build());
            assert_eq!((v, snat_port(&out)), (Verdict::Redirect, 61000), "v6={v6}: a's flow goes on");
        }
        // 100 s since a's reply entry was written, 0 s since a last sent.
        let (v, _) = w.lb.run(Prog::Xdp, &from(b).build());
        assert_eq!(v, Verdict::Drop, "v6={v6}: the port is a's while a sends");
        assert_eq!(w.lb.verdict("snat_exhausted"), 1);
        let reply = w.lb.dp.conntrack().into_iter().find(|(k, e)| e.flags & CT_F_REPLY != 0 && k.proto == PROTO_UDP);
        assert!(!ct::expired(&reply.expect("a's reply entry").1, xlb::dump::now_ns()), "v6={v6}");

        // Once a has been quiet past the UDP timeout, b gets the port.
        age(&mut w, ct::TIMEOUT_UDP_NS / SEC + 1);
        let (v, out) = w.lb.run(Prog::Xdp, &from(b).build());
        assert_eq!((v, snat_port(&out)), (Verdict::Redirect, 61000), "v6={v6}");
    }
}

/// Both CPUs run the first packet of the same flow at once, a thousand
/// flows over: under a random scheduler with four backends (and SNAT, over
/// XDP) each flow must come out of both CPUs translated the same way, or
/// be dropped on the CPU that lost while the other was still writing.
#[test]
fn two_cpus_racing_on_a_flows_first_packet_agree_on_its_translation() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "needs two CPUs, found {cpus}");
    for prog in [Prog::Xdp, Prog::TcIngress] {
        let mut w = world();
        w.lb.config_snat(NODE4, NODE6, 61000, 62999);
        vip_service(&mut w, prog, false, SCHED_RANDOM, 0, &[1, 2, 3, 4]);
        let key = svc_key(VIP4, 80, datapath_common::PROTO_TCP, scope(prog));
        assert!(w.lb.dp.service(&key).is_some());
        let flows: Vec<Vec<u8>> = (0..1000u16).map(|i| Pkt::tcp(CLIENT4, 20000 + i, VIP4, 80, SYN).build()).collect();
        let runs = w.lb.race(prog, &w.env, &flows);
        let mut agreed = 0;
        for (i, [(v0, o0), (v1, o1)]) in runs.iter().enumerate() {
            match (v0, v1) {
                (Verdict::Redirect, Verdict::Redirect) => {
                    assert_eq!(o0, o1, "{prog:?} flow {i}: both CPUs translated it, differently");
                    agreed += 1;
                }
                (Verdict::Redirect, Verdict::Drop) | (Verdict::Drop, Verdict::Redirect) => {}
                other => panic!("{prog:?} flow {i}: {other:?}"),
            }
        }
        let raced = w.lb.verdict("ct_race") + w.lb.verdict("ct_race_drop");
        println!("{prog:?}: {agreed} flows translated on both CPUs, {raced} first packets lost the race");
        assert_eq!(w.lb.verdict("ct_race_drop") as usize, runs.len() - agreed);
        // Every flow has one forward entry, and its SNAT port one reply entry.
        let entries = w.lb.dp.conntrack();
        let replies = entries.iter().filter(|(_, e)| e.flags & CT_F_REPLY != 0).count();
        let forwards = entries.len() - replies;
        assert_eq!(forwards, flows.len(), "{prog:?}");
        if prog == Prog::Xdp {
            assert_eq!(replies, flows.len(), "{prog:?}: no SNAT port claimed twice or left behind");
        }
    }
}

/// The losing side of the race, made deterministic: the flow's forward
/// bucket is locked by another CPU's insert (held here through the agent's
/// mapping of the table) for longer than the insert's bounded tries. The
/// first packet is dropped, not translated on its own, and no SNAT port is
/// taken for it.
#[test]
fn a_first_packet_finding_its_bucket_locked_is_dropped_and_takes_no_port() {
    use datapath_common::{
        ct_ops::Table,
        ct_table::{Tuple, event, forward_bucket},
    };
    let mut w = world();
    let _in = w.env.enter();
    w.lb.config_snat(NODE4, NODE6, 61000, 61015);
    vip_service(&mut w, Prog::Xdp, false, SCHED_MAGLEV, 0, &[1, 2]);
    let k = tcp_key(CLIENT4, 40000, VIP4, 80);
    let v4 = |a: &[u8; 16]| -> [u8; 4] { a[12..].try_into().unwrap() };
    let t = Tuple { src: v4(&k.src), dst: v4(&k.dst), sport: k.sport, dport: k.dport, proto: k.proto };
    let table = &w.lb.dp.conntrack_table().v4;
    let lock = table.bucket(forward_bucket(t.hash(), table.nb())).unwrap().cast::<u64>();
    // SAFETY: the mapping of the table; the lock word, as another CPU takes it.
    unsafe { lock.write_volatile(1) };
    let syn = Pkt::tcp(CLIENT4, 40000, VIP4, 80, SYN);
    assert_eq!(w.lb.run(Prog::Xdp, &syn.build()).0, Verdict::Drop);
    assert_eq!((w.lb.verdict("ct_race_drop"), w.lb.verdict("new_flow")), (1, 0));
    assert_eq!(w.lb.dp.conntrack(), vec![], "nothing written, no SNAT port taken");
    assert_eq!(w.lb.dp.conntrack_table().events()[event::INSERT_BUSY as usize], 1);

    // The other CPU finished: the retransmitted SYN is tracked.
    // SAFETY: as above.
    unsafe { lock.write_volatile(0) };
    assert_eq!(w.lb.run(Prog::Xdp, &syn.build()).0, Verdict::Redirect);
    assert_eq!(w.lb.verdict("new_flow"), 1);
    assert_eq!(w.lb.dp.conntrack().len(), 2, "forward and reply entry");
}

/// The flood of issue #13: 10,000 established connections through an
/// external Maglev service, then 2,000,000 SYNs from random sources fill the
/// table, then every established connection sends again and 1,000 new ones
/// open. Established flows are never evicted (nf_conntrack's early_drop
/// spares assured flows; Cilium's LRU and Katran's do not), so none is lost
/// or broken, and new connections evict the flood's unanswered SYNs. With
/// SNAT too: a flood flow holds a node port only while it lives, and a new
/// flow whose ports are all held takes one from the oldest unanswered SYN
/// among them.
#[test]
fn a_syn_flood_breaks_no_established_connection_and_new_ones_get_through() {
    for snat in [false, true] {
        let f = bpf_tests::bench::flood::measure(snat, 262_144, 10_000, 2_000_000, 1_000);
        println!("{f:?}");
        assert_eq!((f.lost, f.broken), (0, 0), "snat={snat}: {f:?}");
        // New connections: all of them without SNAT; with SNAT a new flow
        // fails only when each of its 16 ports is held by a flow younger
        // than TAKEOVER_TICKS (the flood's last SYNs), rarely.
        let least = if snat { f.fresh - f.fresh / 200 } else { f.fresh };
        assert!(f.fresh_ok >= least, "snat={snat}: {} of {} new connections: {f:?}", f.fresh_ok, f.fresh);
        assert!(f.verdicts.get("ct_full").copied().unwrap_or(0) < 100, "snat={snat}: {f:?}");
    }
}

/// The LRU conntrack of an xlb from before the table (one entry per
/// direction), pinned at `path`, as that agent left it.
fn old_conntrack(path: &std::path::Path) -> aya::maps::HashMap<aya::maps::MapData, CtKey, CtEntry> {
    use std::os::unix::ffi::OsStrExt as _;
    // bpf(BPF_MAP_CREATE): type LRU_HASH, key and value sizes, entries.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[9, size_of::<CtKey>() as u32, size_of::<CtEntry>() as u32, 1024]);
    // SAFETY: the bpf syscall with a zeroed attribute of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), size_of_val(&attr)) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // bpf(BPF_OBJ_PIN): path, descriptor.
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let pin = [name.as_ptr() as u64, fd as u64, 0, 0];
    // SAFETY: as above; `name` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), size_of_val(&pin)) };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our descriptor, closed once (the pin keeps the map).
    unsafe { libc::close(fd as i32) };
    let data = aya::maps::MapData::from_pin(path).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap()
}

/// An upgrade from the LRU conntrack (issue #13's "upgrade from the
/// previous map layout"): the new agent finds the old CONNTRACK pin next to
/// the maps it reuses and copies each live flow into the table (its
/// backend, SNAT port and state) before its programs run, and again once
/// they do (the flows the old programs created meanwhile), then removes the
/// pin. The flows' next
/// packets go on as before, here to a backend Maglev would not pick now,
/// and through the SNAT port the old entry held.
#[test]
fn an_upgrade_copies_the_flows_of_the_old_lru_conntrack_into_the_table() {
    let pins = bpf_tests::agent::PinDir::new();
    std::fs::create_dir_all(&pins.path).unwrap();
    let now = xlb::dump::now_ns();
    let syn = Pkt::tcp(CLIENT4, 40000, VIP4, 80, SYN);
    let (plain, snatted) = {
        let mut w = world_pinned(&pins.path);
        let key = vip_service(&mut w, Prog::Xdp, false, SCHED_MAGLEV, 0, &[1, 2, 3, 4]);
        let pick = expected_backend(&w, &key, &syn);
        let other = |n: u32| (1..=4).find(|b| *b != pick && *b != n).unwrap();
        (other(0), other(other(0)))
    };
    let mut old = old_conntrack(&pins.path.join(datapath_common::maps::CONNTRACK));
    let e = |backend_id| CtEntry {
        last_seen_ns: now,
        backend_id,
        rev_nat_id: 10,
        state: ct::STATE_ESTABLISHED,
        ..CtEntry::default()
    };
    // A flow without SNAT, its two entries.
    old.insert(tcp_key(CLIENT4, 40000, VIP4, 80), e(plain), 0).unwrap();
    let rep = CtEntry { flags: CT_F_REPLY, ..e(plain) };
    old.insert(tcp_key(&backend_addr(plain), 8080, CLIENT4, 40000), rep, 0).unwrap();
    // A SNATed flow (node 10.0.0.1, port 61000), its forward entry.
    let s = CtEntry {
        flags: datapath_common::CT_F_SNAT,
        nat_addr: bpf_tests::addr16(NODE4),
        nat_port: 61000u16.to_be(),
        ..e(snatted)
    };
    old.insert(tcp_key(CLIENT4, 40001, VIP4, 80), s, 0).unwrap();
    // An expired one: not copied.
    let gone = CtEntry { last_seen_ns: now.saturating_sub(ct::TIMEOUT_ESTABLISHED_NS + SEC), ..e(plain) };
    old.insert(tcp_key(CLIENT4, 40002, VIP4, 80), gone, 0).unwrap();

    // The new agent's first copy, while the old programs still run.
    let mut w = world_pinned(&pins.path);
    let _in = w.env.enter();
    let m = w.lb.dp.copy_lru_conntrack(&pins.path, false).unwrap().unwrap();
    assert_eq!((m.flows, m.present, m.dropped), (2, 0, 0), "{m:?}");
    // A flow the old programs created meanwhile; then the second copy, once
    // the new programs run: it alone is new, and the old pin goes.
    old.insert(tcp_key(CLIENT4, 40003, VIP4, 80), e(plain), 0).unwrap();
    drop(old);
    let m = w.lb.dp.copy_lru_conntrack(&pins.path, true).unwrap().unwrap();
    assert_eq!((m.flows, m.present, m.dropped), (1, 2, 0), "{m:?}");
    assert!(!pins.path.join(datapath_common::maps::CONNTRACK).exists(), "the old pin is removed");
    assert_eq!(w.lb.dp.copy_lru_conntrack(&pins.path, true).unwrap(), None);
    assert_eq!(w.lb.dp.conntrack().len(), 6, "three flows, two entries each: {:?}", w.lb.dp.conntrack());
    let got = w.lb.dp.conntrack_get(&tcp_key(CLIENT4, 40000, VIP4, 80)).unwrap();
    assert_eq!((got.backend_id, got.state), (plain, ct::STATE_ESTABLISHED));
    assert_eq!(w.lb.dp.conntrack_table().connections(plain), 2, "counted as active connections");
    let ack = Pkt::tcp(CLIENT4, 40000, VIP4, 80, ACK | PSH).payload(b"after the upgrade");
    assert_eq!(w.lb.run(Prog::Xdp, &ack.build()), (Verdict::Redirect, dnatted(&ack, plain)));
    let ack = Pkt::tcp(CLIENT4, 40001, VIP4, 80, ACK | PSH).payload(b"after the upgrade");
    let (v, out) = w.lb.run(Prog::Xdp, &ack.build());
    assert_eq!((v, u16::from_be_bytes([out[34], out[35]])), (Verdict::Redirect, 61000), "the SNAT port kept");
    assert_eq!((w.lb.verdict("ct_hit"), w.lb.verdict("new_flow")), (2, 0));
}

/// Active connections per backend (BACKEND_CONNS, the basis of
/// least-connection scheduling): counted when the datapath sees a
/// connection established, uncounted once both sides closed, or when the
/// agent's sweep unlinks it expired — never twice, never left behind.
#[test]
fn active_connections_per_backend_follow_establish_close_and_expiry() {
    let mut w = world();
    let _in = w.env.enter();
    let key = vip_service(&mut w, Prog::Xdp, false, SCHED_MAGLEV, 0, &backends(false));
    let conns = |w: &World| (1..=4).map(|b| w.lb.dp.conntrack_table().connections(b)).collect::<Vec<_>>();
    let mut opened = [0u64; 4];
    let mut flows = Vec::new();
    for port in 40000..40012u16 {
        let syn = Pkt::tcp(CLIENT4, port, VIP4, 80, SYN);
        let b = expected_backend(&w, &key, &syn);
        w.lb.run(Prog::Xdp, &syn.build());
        assert_eq!(conns(&w), opened, "a SYN is not a connection yet");
        let answer = Pkt::tcp(&backend_addr(b), 8080, CLIENT4, port, SYN | ACK).macs(NEIGH_MAC, OUT_MAC);
        w.lb.run(Prog::Xdp, &answer.build());
        opened[b as usize - 1] += 1;
        assert_eq!(conns(&w), opened);
        // The client's ACK (and a retransmitted one) count nothing more.
        w.lb.run(Prog::Xdp, &Pkt::tcp(CLIENT4, port, VIP4, 80, ACK).build());
        w.lb.run(Prog::Xdp, &Pkt::tcp(CLIENT4, port, VIP4, 80, ACK).build());
        assert_eq!(conns(&w), opened);
        flows.push((port, b));
    }
    // Half of them close: a FIN each way (a half-close still counts).
    for &(port, b) in &flows[..6] {
        w.lb.run(Prog::Xdp, &Pkt::tcp(CLIENT4, port, VIP4, 80, FIN | ACK).build());
        assert_eq!(conns(&w), opened, "half-closed: still a connection");
        let fin = Pkt::tcp(&backend_addr(b), 8080, CLIENT4, port, FIN | ACK).macs(NEIGH_MAC, OUT_MAC);
        w.lb.run(Prog::Xdp, &fin.build());
        opened[b as usize - 1] -= 1;
        assert_eq!(conns(&w), opened);
    }
    // The others go quiet past the established timeout; the agent's sweep
    // unlinks them (the closed ones too), and the counts drop to 0.
    w.lb.dp.conntrack_age(ct::TIMEOUT_ESTABLISHED_NS / SEC + 1);
    assert_eq!(w.lb.dp.conntrack_expire(), flows.len());
    assert_eq!(conns(&w), [0; 4]);
    assert_eq!(w.lb.dp.conntrack_expire(), 0);
}
