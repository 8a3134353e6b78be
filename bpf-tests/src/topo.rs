// SPDX-License-Identifier: MIT OR Apache-2.0
//! A three-namespace topology for real connections through the datapath:
//!
//! ```text
//!  client ns            node ns                       server ns
//!  c0 172.31.1.2 ── n0 172.31.1.1 | n1 172.31.2.1 ── s0 172.31.2.2
//!     fd31:1::2        fd31:1::1  | fd31:2::1           fd31:2::2
//! ```
//! The xlb programs run on the node's n0 and n1 (XDP or TC ingress); the
//! client and server route everything through the node. Interface names
//! are fixed inside the namespaces, which have unique names themselves.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};

use crate::{Lb, NetNs};

pub const CLIENT4: &str = "172.31.1.2";
pub const SERVER4: &str = "172.31.2.2";
pub const CLIENT6: &str = "fd31:1::2";
pub const SERVER6: &str = "fd31:2::2";

pub struct Topology {
    pub client: NetNs,
    pub node: NetNs,
    pub server: NetNs,
}

impl Topology {
    pub fn new() -> Self {
        let client = NetNs::new("xlbc");
        let node = NetNs::new("xlbn");
        let server = NetNs::new("xlbs");
        // Create each veth pair inside the node namespace, then move the peer out.
        for (ours, peer, ns) in [("n0", "c0", &client), ("n1", "s0", &server)] {
            node.exec(&["ip", "link", "add", ours, "type", "veth", "peer", "name", peer]);
            node.exec(&["ip", "link", "set", peer, "netns", &ns.name]);
        }
        node.exec_lines(&[
            "ip link set n0 up",
            "ip link set n1 up",
            "ip addr add 172.31.1.1/24 dev n0",
            "ip addr add 172.31.2.1/24 dev n1",
            "ip -6 addr add fd31:1::1/64 dev n0 nodad",
            "ip -6 addr add fd31:2::1/64 dev n1 nodad",
            "sysctl -qw net.ipv4.conf.all.forwarding=1",
            "sysctl -qw net.ipv6.conf.all.forwarding=1",
        ]);
        // Offloads stay as the kernel sets them (checksum offload, TSO, GSO),
        // except on the sending peers of XDP-attached links (see `attach_xdp`).
        // GRO on lets a veth receive XDP-redirected frames.
        client.exec_lines(&[
            "ip link set c0 up",
            "ip addr add 172.31.1.2/24 dev c0",
            "ip -6 addr add fd31:1::2/64 dev c0 nodad",
            "ip route add default via 172.31.1.1",
            "ip -6 route add default via fd31:1::1",
            "ethtool -K c0 gro on",
        ]);
        server.exec_lines(&[
            "ip link set s0 up",
            "ip addr add 172.31.2.2/24 dev s0",
            "ip -6 addr add fd31:2::2/64 dev s0 nodad",
            "ip route add default via 172.31.2.1",
            "ip -6 route add default via fd31:2::1",
            "ethtool -K s0 gro on",
        ]);
        Self { client, node, server }
    }

    /// Turns TX checksum offload off on c0 and s0, the peers of n0 and n1,
    /// for XDP on those: a veth hands XDP its peer's CHECKSUM_PARTIAL frames
    /// with no way to tell that the checksum is not filled in yet (a physical
    /// NIC delivers complete checksums). The one exception to the kernel's
    /// offload defaults in the tests.
    pub fn xdp_senders_fill_checksums(&self) {
        self.client.exec_lines(&["ethtool -K c0 tx off"]);
        self.server.exec_lines(&["ethtool -K s0 tx off"]);
    }

    /// Attaches xlb's XDP program (native mode) to n0 and n1 (see
    /// [`Topology::xdp_senders_fill_checksums`]).
    pub fn attach_xdp(&self, lb: &mut Lb) {
        self.xdp_senders_fill_checksums();
        lb.load(crate::Prog::Xdp);
        let _in = self.node.enter();
        let p: &mut Xdp = lb.dp.program_mut("xlb_xdp").unwrap().try_into().unwrap();
        for ifname in ["n0", "n1"] {
            p.attach(ifname, XdpMode::Driver).unwrap_or_else(|e| panic!("attach XDP to {ifname}: {e}"));
        }
    }

    /// Attaches xlb's TC ingress program to n0 and n1.
    pub fn attach_tc(&self, lb: &mut Lb) {
        lb.load(crate::Prog::TcIngress);
        let _in = self.node.enter();
        let p: &mut SchedClassifier = lb.dp.program_mut("xlb_tc_ingress").unwrap().try_into().unwrap();
        for ifname in ["n0", "n1"] {
            p.attach(ifname, TcAttachType::Ingress).unwrap_or_else(|e| panic!("attach TC to {ifname}: {e}"));
        }
    }

    /// Starts a TCP echo server in the server namespace on `addr`: for each
    /// connection it reads one request and answers `pong <peer> from <local>`.
    /// Serves `conns` connections, then the thread ends.
    pub fn serve(&self, addr: SocketAddr, conns: usize) -> thread::JoinHandle<Vec<SocketAddr>> {
        let listener = {
            let _in = self.server.enter();
            TcpListener::bind(addr).expect("bind server")
        };
        thread::spawn(move || {
            let mut peers = Vec::new();
            for _ in 0..conns {
                let (mut s, peer) = listener.accept().expect("accept");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).expect("server read");
                assert!(n > 0);
                let local = s.local_addr().unwrap();
                write!(s, "pong {peer} from {local}").unwrap();
                peers.push(peer);
            }
            peers
        })
    }

    /// Connects from the client namespace, sends `ping`, returns the answer.
    pub fn request(&self, to: SocketAddr) -> std::io::Result<String> {
        let mut s = {
            let _in = self.client.enter();
            TcpStream::connect_timeout(&to, Duration::from_secs(5))?
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"ping")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
