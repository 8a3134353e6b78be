// SPDX-License-Identifier: MIT OR Apache-2.0
//! A client process for the socket-level load-balancing tests and bench.
//! Socket-LB works on processes (the cgroup they are in), not threads, so
//! the tests run their clients as this binary, moved into a test cgroup and
//! network namespace before it starts (`bpf_tests::cgroup::spawn_in`).
//! Every command prints `key=value` words on one line per result.
//!
//! ```text
//! xlb-client tcp ADDR MSG            one request on a new connection: peer= (getpeername) and the echo
//! xlb-client repeat ADDR N MSG       N such requests, one line each
//! xlb-client udp ADDR MSG            unconnected: sendto, recvfrom → from= and the echo
//! xlb-client udp-connected ADDR MSG  connect, send, recvfrom → peer=, from= and the echo
//! xlb-client connect-error ADDR tcp|udp|udp-connect   how a connect / sendto fails: err=<errno> ms=<time>, or ok
//! xlb-client stream ADDR             a long-lived connection: one line per tick, until killed
//! xlb-client hold ADDR N             N connections, one request each (a line per connection), kept open until killed
//! xlb-client udp-hold ADDR [unconnected]  a UDP socket kept open (connected, or sendto each time):
//!                                    a request per line read on stdin (reconnects after an error)
//! xlb-client conn-rate ADDR[,ADDR…] THREADS SECS  connect (to each address in turn), one request/response, close, in a loop per thread
//! xlb-client rr-latency ADDR N       N request/responses on one connection: p50 / p99 in µs
//! xlb-client serve ADDR THREADS      the benchmark's server: a pool of threads, each accepting one
//!                                    connection at a time and answering each line with one line
//! ```

use bpf_tests::canonical;
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    // ADDR[,ADDR…]: conn-rate spreads its connections over the list; the
    // other commands take the first.
    let addrs = || -> Vec<SocketAddr> {
        a(1).split(',').map(|s| s.parse().unwrap_or_else(|e| fail(&format!("address {s}: {e}")))).collect()
    };
    let addr = || addrs()[0];
    match a(0) {
        "tcp" => println!("{}", tcp(addr(), a(2))),
        "repeat" => {
            for i in 0..a(2).parse::<usize>().expect("N") {
                println!("{}", tcp(addr(), &format!("{} {i}", a(3))));
            }
        }
        "udp" => println!("{}", udp(addr(), a(2), false)),
        "udp-connected" => println!("{}", udp(addr(), a(2), true)),
        "connect-error" => println!("{}", connect_error(addr(), a(2))),
        "stream" => stream(addr()),
        "hold" => hold(addr(), a(2).parse().expect("N")),
        "udp-hold" => udp_hold(addr(), args.get(2).map(String::as_str) == Some("unconnected")),
        "conn-rate" => conn_rate(addrs(), a(2).parse().expect("THREADS"), a(3).parse().expect("SECS")),
        "rr-latency" => rr_latency(addr(), a(2).parse().expect("N")),
        "serve" => serve(addr(), a(2).parse().expect("THREADS")),
        _ => usage(),
    }
}

fn usage() -> ! {
    fail("usage: xlb-client tcp|repeat|udp|udp-connected|connect-error|stream|udp-hold|conn-rate|rr-latency ADDR …")
}

fn fail(msg: &str) -> ! {
    eprintln!("xlb-client: {msg}");
    std::process::exit(2)
}

fn connect(to: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&to, TIMEOUT).unwrap_or_else(|e| fail(&format!("connect {to}: {e}")));
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// One request on a fresh connection.
fn tcp(to: SocketAddr, msg: &str) -> String {
    let s = connect(to);
    let peer = s.peer_addr().map(canonical).map(|p| p.to_string()).unwrap_or_default();
    let mut w = s.try_clone().expect("dup");
    writeln!(w, "{msg}").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap_or_else(|e| fail(&format!("read from {to}: {e}")));
    format!("peer={peer} echo={}", line.trim_end().replace(' ', ","))
}

fn any(to: SocketAddr) -> SocketAddr {
    if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() }
}

fn udp(to: SocketAddr, msg: &str, connected: bool) -> String {
    let s = UdpSocket::bind(any(to)).expect("bind");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut peer = String::new();
    if connected {
        s.connect(to).unwrap_or_else(|e| fail(&format!("connect {to}: {e}")));
        peer = s.peer_addr().map(canonical).map(|p| p.to_string()).unwrap_or_default();
        s.send(msg.as_bytes()).unwrap_or_else(|e| fail(&format!("send {to}: {e}")));
    } else {
        s.send_to(msg.as_bytes(), to).unwrap_or_else(|e| fail(&format!("sendto {to}: {e}")));
    }
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| fail(&format!("recv from {to}: {e}")));
    let echo = String::from_utf8_lossy(&buf[..n]).trim_end().replace(' ', ",");
    format!("peer={peer} from={} echo={echo}", canonical(from))
}

/// How a connect (TCP) or a datagram (UDP) to `to` fails, and how fast.
fn connect_error(to: SocketAddr, proto: &str) -> String {
    let started = Instant::now();
    let r = match proto {
        "tcp" => TcpStream::connect_timeout(&to, TIMEOUT).map(drop),
        "udp-connect" => UdpSocket::bind(any(to)).and_then(|s| s.connect(to)),
        _ => UdpSocket::bind(any(to)).and_then(|s| s.send_to(b"x", to)).map(drop),
    };
    let ms = started.elapsed().as_millis();
    match r {
        Ok(()) => format!("ok ms={ms}"),
        Err(e) => format!("err={} kind={:?} ms={ms}", e.raw_os_error().unwrap_or(0), e.kind()),
    }
}

/// A long-lived connection (xlb-echo's `stream`): prints `peer=` once, then
/// every tick as it comes; exits 1 when the connection breaks.
fn hold(to: SocketAddr, n: usize) {
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let s = connect(to);
        let mut w = s.try_clone().expect("dup");
        writeln!(w, "hold{i}").expect("send");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap_or_else(|e| fail(&format!("read from {to}: {e}")));
        println!("echo={}", line.trim_end().replace(' ', ","));
        open.push(r);
    }
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn stream(to: SocketAddr) {
    let s = connect(to);
    let peer = s.peer_addr().map(canonical).map(|p| p.to_string()).unwrap_or_default();
    println!("peer={peer}");
    let mut w = s.try_clone().expect("dup");
    writeln!(w, "stream").expect("send");
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => {
                println!("tick={}", line.trim_end().replace(' ', ","));
                let _ = std::io::stdout().flush();
            }
            other => {
                println!("broken={other:?}");
                std::process::exit(1);
            }
        }
    }
}

/// A connected UDP socket kept open: for every line on stdin, one request
/// and its answer (`peer=`, `from=`, the echo). A call that fails is
/// retried after connecting again (what a resilient client does when its
/// socket is aborted), up to three times; the errors met are listed first
/// (`errors=89,103`).
fn udp_hold(to: SocketAddr, unconnected: bool) {
    let s = UdpSocket::bind(any(to)).expect("bind");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    if !unconnected {
        s.connect(to).unwrap_or_else(|e| fail(&format!("connect {to}: {e}")));
    }
    let mut buf = vec![0u8; 65536];
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        let mut errors = Vec::new();
        let answer = loop {
            let sent = if unconnected { s.send_to(line.as_bytes(), to) } else { s.send(line.as_bytes()) };
            match sent.and_then(|_| s.recv_from(&mut buf)) {
                Ok((n, from)) => break Some((n, from)),
                Err(e) if errors.len() < 3 => {
                    errors.push(e.raw_os_error().unwrap_or(0).to_string());
                    if !unconnected {
                        let _ = s.connect(to);
                    }
                }
                Err(_) => break None,
            }
        };
        let errors = if errors.is_empty() { String::new() } else { format!("errors={} ", errors.join(",")) };
        match answer {
            Some((n, from)) => {
                let peer = s.peer_addr().map(canonical).map(|p| p.to_string()).unwrap_or_default();
                let echo = String::from_utf8_lossy(&buf[..n]).trim_end().replace(' ', ",");
                println!("{errors}peer={peer} from={} echo={echo}", canonical(from));
            }
            None => println!("{errors}failed"),
        }
        let _ = std::io::stdout().flush();
    }
}

/// Connections per second: every thread connects, sends one line, reads
/// the answer and closes, until the time is up.
fn conn_rate(to: Vec<SocketAddr>, threads: usize, secs: f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, done, errors, to) = (stop.clone(), done.clone(), errors.clone(), to.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let ok = TcpStream::connect_timeout(&to[i % to.len()], TIMEOUT).and_then(|mut s| {
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(TIMEOUT))?;
                        s.write_all(b"x\n")?;
                        let n = s.read(&mut buf)?;
                        if n == 0 { Err(std::io::Error::other("closed")) } else { Ok(()) }
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!("conns={n} errors={} secs={elapsed:.3} per_sec={:.0}", errors.load(Ordering::Relaxed), n as f64 / elapsed);
}

/// Round trips on one connection: p50 and p99 of N request/responses.
fn rr_latency(to: SocketAddr, n: usize) {
    let mut s = connect(to);
    let mut r = BufReader::new(s.try_clone().expect("dup"));
    let mut line = String::new();
    let mut rtt = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(b"x\n").expect("send");
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            fail("connection closed");
        }
        // The first tenth warms up caches and the connection.
        if i >= n / 10 {
            rtt.push(t.elapsed().as_nanos() as u64);
        }
    }
    rtt.sort_unstable();
    let p = |q: f64| rtt[((rtt.len() as f64 * q) as usize).min(rtt.len() - 1)] as f64 / 1000.0;
    println!("n={} p50_us={:.1} p99_us={:.1}", rtt.len(), p(0.50), p(0.99));
}

/// The benchmark's server: `threads` threads share the listener, each
/// serving one connection at a time (no thread per connection, so the
/// connection rate measures the network path more than thread creation).
fn serve(addr: SocketAddr, threads: usize) {
    let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| fail(&format!("bind {addr}: {e}")));
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let l = listener.try_clone().expect("dup listener");
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let _ = s.set_nodelay(true);
                    let Ok(mut w) = s.try_clone() else { continue };
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if w.write_all(b"ok\n").is_err() {
                            break;
                        }
                        line.clear();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}
