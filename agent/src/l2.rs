// SPDX-License-Identifier: MIT OR Apache-2.0
//! L2 announcements of LoadBalancer addresses (issue #15): which addresses
//! this node answers ARP and NDP for, the L2_ADDRS entries that make the
//! XDP program answer (`datapath-ebpf/src/l2.rs`), and the gratuitous ARP
//! and unsolicited neighbour advertisements a new owner sends.
//!
//! Ownership, `--manifests` mode: every agent reads the same Nodes, Services
//! and EndpointSlices, so each computes the same owner per address without
//! talking to the others: rendezvous hashing (the eligible node with the
//! highest hash of address and node name), which spreads the addresses
//! over the nodes and moves only a departed node's. Eligible: every Node of
//! the snapshot for `externalTrafficPolicy: Cluster`; for `Local`, the
//! nodes with a ready endpoint of the Service. Without Node objects nothing
//! is announced (no view of the other nodes: two owners would answer).
//! With the API server, ownership is a Lease per address (the next step of
//! the issue); until then nothing is announced there.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use datapath_common::{L2Key, L2Value};
use k8s_openapi::api::core::v1::Service;

use crate::{Datapath, source::Snapshot};

/// The nodes that may announce each LoadBalancer address of `snap`.
pub fn eligible(snap: &Snapshot, external_ips: bool, lb_class: &str) -> BTreeMap<IpAddr, BTreeSet<String>> {
    let nodes: BTreeSet<String> = snap.nodes.iter().filter_map(|n| n.metadata.name.clone()).collect();
    // A node's own address (`NodeIPs` pools hand them out) is its own to
    // answer for: never announced by another.
    let node_addrs: BTreeSet<IpAddr> = snap
        .nodes
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let mut out: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for svc in &snap.services {
        let Some(spec) = svc.spec.as_ref() else { continue };
        let mut addrs = Vec::new();
        // Another controller's LoadBalancer is its to announce.
        let ours = spec.load_balancer_class.as_deref().is_none_or(|c| c == lb_class);
        if spec.type_.as_deref() == Some("LoadBalancer") && ours {
            addrs.extend(crate::lbipam::allocate::held_in_status(svc));
        }
        if external_ips {
            addrs.extend(spec.external_ips.iter().flatten().filter_map(|a| a.parse::<IpAddr>().ok()));
        }
        if addrs.is_empty() {
            continue;
        }
        let who = if spec.external_traffic_policy.as_deref() == Some("Local") {
            local_endpoint_nodes(snap, svc).intersection(&nodes).cloned().collect()
        } else {
            nodes.clone()
        };
        for a in addrs.into_iter().filter(|a| !node_addrs.contains(a)) {
            // Services sharing an address: the nodes eligible for all of
            // them (a Local one's traffic must land where it has an endpoint).
            match out.entry(a) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(who.clone());
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    let both: BTreeSet<String> = o.get().intersection(&who).cloned().collect();
                    o.insert(both);
                }
            }
        }
    }
    out
}

/// Nodes with a ready endpoint of `svc`.
fn local_endpoint_nodes(snap: &Snapshot, svc: &Service) -> BTreeSet<String> {
    let (ns, name) =
        (svc.metadata.namespace.as_deref().unwrap_or("default"), svc.metadata.name.as_deref().unwrap_or(""));
    snap.slices
        .iter()
        .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == ns)
        .filter(|s| {
            s.metadata.labels.as_ref().and_then(|l| l.get(crate::translate::SERVICE_NAME_LABEL)).map(String::as_str)
                == Some(name)
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// Rendezvous hashing: the owner of `addr` among `nodes`.
pub fn owner<'a>(addr: &IpAddr, nodes: &'a BTreeSet<String>) -> Option<&'a String> {
    nodes.iter().max_by_key(|n| {
        let mut key = addr.to_string().into_bytes();
        key.push(0);
        key.extend_from_slice(n.as_bytes());
        crate::maglev::hash64(0x6c32, &key)
    })
}

/// The addresses `node` announces (`--manifests` mode).
pub fn owned(snap: &Snapshot, node: &str, external_ips: bool, lb_class: &str) -> BTreeSet<IpAddr> {
    eligible(snap, external_ips, lb_class)
        .into_iter()
        .filter(|(a, nodes)| owner(a, nodes).is_some_and(|o| o == node))
        .map(|(a, _)| a)
        .collect()
}

/// What is announced now: (address, ifindex) → MAC, shared with the
/// sending thread, which re-checks it before every announcement.
type Owned = std::sync::Arc<std::sync::Mutex<BTreeMap<(IpAddr, u32), [u8; 6]>>>;

/// The announcing side of one agent: its L2 interfaces, what it announces,
/// and one thread sending the announcements of newly owned addresses.
pub struct Announcer {
    interfaces: Vec<String>,
    owned: Owned,
    missing: BTreeSet<String>,
    queue: std::sync::mpsc::Sender<(IpAddr, u32)>,
}

impl Announcer {
    pub fn new(interfaces: Vec<String>) -> Self {
        let owned = Owned::default();
        let (queue, rx) = std::sync::mpsc::channel();
        let shared = owned.clone();
        std::thread::Builder::new()
            .name("xlb-l2-announce".into())
            .spawn(move || announcer(rx, shared))
            .expect("spawning the L2 announcer");
        Self { interfaces, owned, missing: BTreeSet::new(), queue }
    }

    /// Makes L2_ADDRS hold exactly `want` on every L2 interface there is
    /// (with each interface's current MAC); a newly owned address is
    /// announced (gratuitous ARPs or unsolicited advertisements, spaced).
    /// Stops answering first, then answers: an address never has two MACs
    /// here. Returns the addresses gained.
    pub fn sync(&mut self, dp: &mut Datapath, want: &BTreeSet<IpAddr>) -> anyhow::Result<Vec<IpAddr>> {
        let mut now: BTreeMap<(IpAddr, u32), [u8; 6]> = BTreeMap::new();
        for name in &self.interfaces {
            match (crate::pktgen::ifindex(name), crate::pktgen::mac_of(name)) {
                (Ok(ifindex), Ok(mac)) => {
                    self.missing.remove(name);
                    now.extend(want.iter().map(|a| ((*a, ifindex), mac)));
                }
                _ => {
                    if self.missing.insert(name.clone()) {
                        tracing::warn!(interface = name, "no such L2 interface (yet): nothing announced on it");
                    }
                }
            }
        }
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<(IpAddr, u32)> = owned.keys().filter(|k| !now.contains_key(k)).copied().collect();
        for (a, ifindex) in gone {
            dp.remove_l2(&L2Key { addr: crate::datapath::map_addr(a), ifindex })?;
            owned.remove(&(a, ifindex));
        }
        let mut gained = Vec::new();
        for (&(a, ifindex), mac) in &now {
            if owned.get(&(a, ifindex)) == Some(mac) {
                continue;
            }
            dp.set_l2(&L2Key { addr: crate::datapath::map_addr(a), ifindex }, &L2Value { mac: *mac, _pad: 0 })?;
            owned.insert((a, ifindex), *mac);
            gained.push(a);
            let _ = self.queue.send((a, ifindex));
        }
        gained.dedup();
        Ok(gained)
    }
}

/// The sending thread: three announcements per newly owned address, 0,
/// 0.5 and 1.5 s after it was taken (an ARP cache that missed one gets the
/// next), each only while the address is still owned, with its MAC then.
fn announcer(rx: std::sync::mpsc::Receiver<(IpAddr, u32)>, owned: Owned) {
    let mut due: BTreeMap<std::time::Instant, Vec<(IpAddr, u32)>> = BTreeMap::new();
    loop {
        let wait = due.keys().next().map(|t| t.saturating_duration_since(std::time::Instant::now()));
        let got = match wait {
            Some(w) => rx.recv_timeout(w).map_err(|e| e == std::sync::mpsc::RecvTimeoutError::Disconnected),
            None => rx.recv().map_err(|_| true),
        };
        match got {
            Ok(k) => {
                let t = std::time::Instant::now();
                for ms in [0u64, 500, 1500] {
                    due.entry(t + Duration::from_millis(ms)).or_default().push(k);
                }
            }
            Err(true) => return,
            Err(false) => {}
        }
        let now = std::time::Instant::now();
        while let Some(e) = due.first_entry() {
            if *e.key() > now {
                break;
            }
            for (a, ifindex) in e.remove() {
                let mac = owned.lock().unwrap_or_else(|e| e.into_inner()).get(&(a, ifindex)).copied();
                if let Some(mac) = mac
                    && let Err(err) = send(ifindex, &frame(a, mac))
                {
                    tracing::warn!(addr = %a, ifindex, error = %err, "sending an L2 announcement failed");
                }
            }
        }
    }
}

/// A gratuitous ARP request (IPv4) or an unsolicited neighbour
/// advertisement to all nodes (IPv6, flag O; RFC 4861 §7.2.6).
pub fn frame(addr: IpAddr, mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(86);
    match addr {
        IpAddr::V4(a) => {
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            let all_nodes: [u8; 16] = "ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
            f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
            f.extend_from_slice(&mac);
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&all_nodes);
            let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
            icmp.extend_from_slice(&a.octets());
            icmp.extend_from_slice(&[2, 1]);
            icmp.extend_from_slice(&mac);
            let mut sum = 0u32;
            let mut add = |b: &[u8]| {
                for w in b.chunks(2) {
                    sum += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
                }
            };
            add(&a.octets());
            add(&all_nodes);
            add(&[0, 0, 0, 32, 0, 0, 0, 58]);
            add(&icmp);
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let c = !(sum as u16);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&icmp);
        }
    }
    f
}

/// Sends one Ethernet frame out of `ifindex` (AF_PACKET).
fn send(ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: a raw packet socket, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = ifindex as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: valid buffer and address of the sizes given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::files::parse_into;

    const C: &str = crate::lbipam::DEFAULT_LB_CLASS;

    fn snap(nodes: usize, services: usize, local_on: Option<&str>) -> Snapshot {
        let mut y = String::new();
        for n in 1..=nodes {
            y += &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}}}\n---\n");
        }
        for s in 0..services {
            let policy = if local_on.is_some() { ", externalTrafficPolicy: Local" } else { "" };
            y += &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{s}, namespace: t}}\n\
                 spec: {{type: LoadBalancer, ports: [{{port: 80}}]{policy}}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 10.9.{}.{}}}]}}}}\n---\n",
                s / 250,
                s % 250 + 1
            );
            if let Some(node) = local_on {
                y += &format!(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{s}-1, namespace: t, labels: {{kubernetes.io/service-name: s{s}}}}}\n\
                     addressType: IPv4\nendpoints: [{{addresses: [10.244.0.1], nodeName: {node}, conditions: {{ready: true}}}}, \
                     {{addresses: [10.244.0.2], nodeName: node-3, conditions: {{ready: false}}}}]\n---\n"
                );
            }
        }
        let mut s = Snapshot::default();
        parse_into(&mut s, "test", &y);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        s
    }

    /// One owner per address, spread over the nodes; a node leaving moves
    /// only its own addresses (rendezvous hashing).
    #[test]
    fn one_owner_per_address_spread_and_stable() {
        let three = snap(3, 300, None);
        let had: Vec<BTreeSet<IpAddr>> = (1..=3).map(|n| owned(&three, &format!("node-{n}"), false, C)).collect();
        assert_eq!(had.iter().map(BTreeSet::len).sum::<usize>(), 300, "every address exactly once");
        assert!(had.iter().all(|o| o.len() > 70), "spread: {:?}", had.iter().map(BTreeSet::len).collect::<Vec<_>>());
        let two = snap(2, 300, None);
        for n in 1..=2 {
            let now = owned(&two, &format!("node-{n}"), false, C);
            assert!(had[n - 1].is_subset(&now), "node-{n} keeps what it had");
        }
    }

    /// `externalTrafficPolicy: Local`: only nodes with a ready endpoint.
    #[test]
    fn local_policy_announces_from_nodes_with_a_ready_endpoint() {
        let s = snap(3, 20, Some("node-2"));
        assert_eq!(owned(&s, "node-2", false, C).len(), 20);
        assert!(owned(&s, "node-1", false, C).is_empty() && owned(&s, "node-3", false, C).is_empty());
        assert!(owned(&snap(0, 5, None), "node-1", false, C).is_empty(), "no Node objects: nothing");
    }

    /// A node's own address (a `NodeIPs` pool's) is never announced by another.
    #[test]
    fn node_addresses_are_not_announced() {
        let mut s = snap(2, 1, None);
        let y = "apiVersion: v1\nkind: Node\nmetadata: {name: node-9}\nstatus: {addresses: [{type: InternalIP, address: 10.9.0.1}]}\n";
        parse_into(&mut s, "node", y);
        assert!((1..=9).all(|n| owned(&s, &format!("node-{n}"), false, C).is_empty()));
    }

    #[test]
    fn announcements_are_well_formed() {
        let mac = [2, 0, 0, 0, 0, 1];
        let arp = frame("192.168.60.100".parse().unwrap(), mac);
        assert_eq!(arp.len(), 42);
        assert_eq!(arp[28..32], arp[38..42], "gratuitous: sender = target address");
        let na = frame("fd60::100".parse().unwrap(), mac);
        assert_eq!(na.len(), 86);
        let mut s = 0u32;
        for part in [&na[22..54], &[0, 0, 0, 32, 0, 0, 0, 58][..], &na[54..]] {
            for w in part.chunks(2) {
                s += u16::from_be_bytes([w[0], w[1]]) as u32;
            }
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        assert_eq!(s, 0xffff, "ICMPv6 checksum");
    }
}
