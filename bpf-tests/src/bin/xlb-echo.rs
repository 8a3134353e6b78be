// SPDX-License-Identifier: MIT OR Apache-2.0
//! The backend pods' echo server: `xlb-echo NAME PORT…` listens on every
//! PORT over TCP and UDP, IPv4 and IPv6 (one dual-stack socket each), and
//! answers every line (TCP) or datagram (UDP) with
//! `NAME <client address as seen> <local port> <the line>`. A TCP line
//! `stream` makes it answer every 200 ms until the client goes away, for
//! long-lived connections.

use bpf_tests::canonical;
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
    time::Duration,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().expect("usage: xlb-echo NAME PORT…");
    let ports: Vec<u16> = args.map(|p| p.parse().expect("port")).collect();
    assert!(!ports.is_empty(), "usage: xlb-echo NAME PORT…");
    for port in ports {
        let addr = SocketAddr::from(([0u16; 8], port));
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let n = name.clone();
        thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                let n = n.clone();
                thread::spawn(move || {
                    let peer = s.peer_addr().map(|p| canonical(p).to_string()).unwrap_or_default();
                    let local = s.local_addr().map(|a| a.port()).unwrap_or(0);
                    // Each answer leaves in one segment at once: one write,
                    // no Nagle (a reply split in two writes would wait for
                    // the client's delayed ACK).
                    let _ = s.set_nodelay(true);
                    let Ok(mut w) = s.try_clone() else { return };
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        if line == "stream" {
                            for i in 0.. {
                                if w.write_all(format!("{n} {peer} {local} tick {i}\n").as_bytes()).is_err() {
                                    return;
                                }
                                thread::sleep(Duration::from_millis(200));
                            }
                        }
                        if w.write_all(format!("{n} {peer} {local} {line}\n").as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let n = name.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, peer)) = udp.recv_from(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..len]);
                let out = format!("{n} {} {port} {}", canonical(peer), msg.trim_end());
                let _ = udp.send_to(out.as_bytes(), peer);
            }
        });
    }
    // Serve until killed.
    loop {
        thread::park();
    }
}
