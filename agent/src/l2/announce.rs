// SPDX-License-Identifier: MIT OR Apache-2.0
//! The announcing side of one agent: the L2_ADDRS entries that make the XDP
//! program answer ARP and NDP for the addresses this node owns, and the
//! gratuitous ARPs / unsolicited neighbour advertisements of a new owner.
//!
//! Each entry carries a deadline (CLOCK_BOOTTIME): the end of this node's
//! hold on the address's Lease, after which the XDP program stops answering
//! by itself, agent or not. The announcer keeps its own handle on the map
//! ([`crate::datapath::L2Map`]), so the Lease task can stop an answer the
//! moment it loses a Lease, without going through the task that owns the
//! datapath.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::MapError;
use datapath_common::{L2Key, L2Value};

use crate::{datapath::L2Map, lease::boot_ns};

/// An entry: the MAC answered with, until a deadline (boot ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    mac: [u8; 6],
    deadline: u64,
}

/// What is answered now, (address, ifindex) → entry: shared with the
/// sending thread, which re-checks it before every announcement.
type Owned = Arc<Mutex<BTreeMap<(IpAddr, u32), Entry>>>;

/// No deadline: `--manifests` mode, where no Lease decides.
pub const FOREVER: u64 = u64::MAX;

/// One agent's L2 answers and announcements.
pub struct Announcer {
    interfaces: Vec<String>,
    map: Option<L2Map>,
    owned: Owned,
    missing: BTreeSet<String>,
    queue: std::sync::mpsc::Sender<(IpAddr, u32)>,
}

impl Announcer {
    /// Announces on `interfaces` through `map` (`None`: a datapath without
    /// L2_ADDRS; nothing is answered, and [`Announcer::sync`] says so).
    pub fn new(interfaces: Vec<String>, map: Option<L2Map>) -> Self {
        let owned = Owned::default();
        let (queue, rx) = std::sync::mpsc::channel();
        let shared = owned.clone();
        std::thread::Builder::new()
            .name("xlb-l2-announce".into())
            .spawn(move || announcer(rx, shared))
            .expect("spawning the L2 announcer");
        Self { interfaces, map, owned, missing: BTreeSet::new(), queue }
    }

    /// The L2 interfaces that exist and are up with a carrier now, with
    /// their index and MAC.
    pub fn interfaces_up(&mut self) -> Vec<(u32, [u8; 6])> {
        let mut up = Vec::new();
        for name in &self.interfaces {
            match (crate::pktgen::ifindex(name), crate::pktgen::mac_of(name)) {
                (Ok(ifindex), Ok(mac)) => {
                    self.missing.remove(name);
                    if crate::pktgen::is_running(name) {
                        up.push((ifindex, mac));
                    }
                }
                _ => {
                    if self.missing.insert(name.clone()) {
                        tracing::warn!(interface = name, "no such L2 interface (yet): nothing announced on it");
                    }
                }
            }
        }
        up
    }

    /// Makes L2_ADDRS hold exactly `want` (address → deadline) on every L2
    /// interface up (with each interface's current MAC). Stops answering
    /// first, then answers: an address never has two MACs here. A newly
    /// answered address is announced (three times, spaced). Returns the
    /// addresses gained.
    pub fn sync(&mut self, want: &BTreeMap<IpAddr, u64>) -> Result<Vec<IpAddr>, MapError> {
        let up = self.interfaces_up();
        let mut now: BTreeMap<(IpAddr, u32), Entry> = BTreeMap::new();
        for (ifindex, mac) in up {
            now.extend(want.iter().map(|(a, d)| ((*a, ifindex), Entry { mac, deadline: *d })));
        }
        // Without the map nothing can be answered (`can_answer`: the Lease
        // task does not even stand then).
        let Some(map) = self.map.as_mut() else { return Ok(Vec::new()) };
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<(IpAddr, u32)> = owned.keys().filter(|k| !now.contains_key(k)).copied().collect();
        for (a, ifindex) in gone {
            match map.remove(&L2Key { addr: crate::datapath::map_addr(a), ifindex }) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
            owned.remove(&(a, ifindex));
        }
        let mut gained = Vec::new();
        for (&(a, ifindex), e) in &now {
            let had = owned.get(&(a, ifindex)).copied();
            if had == Some(*e) {
                continue;
            }
            let value = L2Value { mac: e.mac, _pad: 0, deadline_ns: e.deadline };
            map.insert(L2Key { addr: crate::datapath::map_addr(a), ifindex }, value, 0)?;
            owned.insert((a, ifindex), *e);
            // A renewal (a later deadline, the same MAC) is not news.
            if had.map(|h| h.mac) != Some(e.mac) {
                gained.push(a);
                let _ = self.queue.send((a, ifindex));
            }
        }
        gained.dedup();
        Ok(gained)
    }

    /// Whether this announcer can answer at all (it has L2_ADDRS).
    pub fn can_answer(&self) -> bool {
        self.map.is_some()
    }

    /// The addresses answered now (whatever their deadline).
    pub fn answered(&self) -> BTreeSet<IpAddr> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).keys().map(|(a, _)| *a).collect()
    }
}

/// The sending thread: three announcements per newly owned address, 0,
/// 0.5 and 1.5 s after it was taken (an ARP cache that missed one gets the
/// next), each only while the address is still answered, before its
/// deadline, with its MAC then.
fn announcer(rx: std::sync::mpsc::Receiver<(IpAddr, u32)>, owned: Owned) {
    let mut due: BTreeMap<Instant, Vec<(IpAddr, u32)>> = BTreeMap::new();
    loop {
        let wait = due.keys().next().map(|t| t.saturating_duration_since(Instant::now()));
        let got = match wait {
            Some(w) => rx.recv_timeout(w).map_err(|e| e == std::sync::mpsc::RecvTimeoutError::Disconnected),
            None => rx.recv().map_err(|_| true),
        };
        match got {
            Ok(k) => {
                let t = Instant::now();
                for ms in [0u64, 500, 1500] {
                    due.entry(t + Duration::from_millis(ms)).or_default().push(k);
                }
            }
            Err(true) => return,
            Err(false) => {}
        }
        let now = Instant::now();
        while let Some(e) = due.first_entry() {
            if *e.key() > now {
                break;
            }
            for (a, ifindex) in e.remove() {
                // Held across the send: an entry removed meanwhile (a lost
                // Lease) is never announced after its removal.
                let owned = owned.lock().unwrap_or_else(|e| e.into_inner());
                let Some(entry) = owned.get(&(a, ifindex)).filter(|e| boot_ns() < e.deadline) else { continue };
                if let Err(err) = send(ifindex, &frame(a, entry.mac)) {
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
