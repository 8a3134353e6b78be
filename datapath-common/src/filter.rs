// SPDX-License-Identifier: MIT OR Apache-2.0
//! FILTER, the "can this packet be ours?" test: a packet can only belong to
//! xlb if its destination is a frontend (a service address and port, a
//! NodePort on a node address) or its source is a backend (a reply). The
//! datapath tests one bit for each before any conntrack or service lookup,
//! so traffic that is not ours (the node's own connections, pods calling
//! addresses outside the cluster on the same ports as a Service) passes
//! after two array reads instead of a hash lookup, a tail call and a second
//! hash lookup.
//!
//! Each direction is a one-hash Bloom filter of [`BITS`] bits over
//! (address, port): a set bit means "maybe ours" (the full lookups decide),
//! a clear one "certainly not". With 100,000 frontends about 9 % of the
//! bits are set. The agent keeps a reference count per bit
//! (`agent/src/filter.rs`), setting it before the first frontend or backend
//! that hashes there is written and clearing it after the last one is
//! removed, so no packet of a live flow ever finds its bit clear.

/// Bits per direction.
pub const BITS: usize = 1 << 20;
/// 64-bit words per direction.
pub const WORDS: usize = BITS / 64;

/// The single value of the FILTER array (`BPF_F_MMAPABLE`: the agent sets
/// and clears bits with plain stores).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowFilter {
    /// Frontends: packets to them.
    pub dst: [u64; WORDS],
    /// Backends: their replies.
    pub src: [u64; WORDS],
}

/// The bit of `addr:port` (both network order, the address IPv4 mapped):
/// a multiplicative mix of the address words and the port (murmur3's
/// finaliser constants), its top 20 bits.
#[inline(always)]
pub fn bit(addr: &[u8; 16], port_be: u16) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([addr[4 * i], addr[4 * i + 1], addr[4 * i + 2], addr[4 * i + 3]]);
    let mut x = w(0) ^ w(1).rotate_left(8) ^ w(2).rotate_left(16) ^ w(3).rotate_left(24) ^ port_be as u32;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x >> (32 - 20)
}

/// Word index and mask of bit `b`.
#[inline(always)]
pub const fn slot(b: u32) -> (usize, u64) {
    ((b >> 6) as usize, 1 << (b & 63))
}

#[inline(always)]
fn has(words: &[u64; WORDS], b: u32) -> bool {
    let (w, m) = slot(b);
    words[w] & m != 0
}

impl FlowFilter {
    /// May a packet from `src:sport` to `dst:dport` (network order, as
    /// parsed) be ours?
    #[inline(always)]
    pub fn maybe_ours(&self, src: &[u8; 16], sport_be: u16, dst: &[u8; 16], dport_be: u16) -> bool {
        has(&self.dst, bit(dst, dport_be)) || has(&self.src, bit(src, sport_be))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        crate::v4_mapped(a)
    }

    #[test]
    fn bits_by_direction() {
        let mut f = Box::new(FlowFilter { dst: [0; WORDS], src: [0; WORDS] });
        let (vip, backend, client) = (v4([10, 0, 0, 10]), v4([10, 1, 0, 5]), v4([192, 0, 2, 1]));
        let (w, m) = slot(bit(&vip, 80u16.to_be()));
        f.dst[w] |= m;
        let (w, m) = slot(bit(&backend, 8080u16.to_be()));
        f.src[w] |= m;
        let p = u16::to_be;
        assert!(f.maybe_ours(&client, p(40000), &vip, p(80)), "to a frontend");
        assert!(f.maybe_ours(&backend, p(8080), &client, p(40000)), "a backend's reply");
        assert!(!f.maybe_ours(&client, p(40000), &v4([10, 0, 0, 11]), p(80)), "another address, same port");
        assert!(!f.maybe_ours(&client, p(40000), &vip, p(81)), "same address, another port");
        assert!(!f.maybe_ours(&vip, p(80), &backend, p(8080)), "the directions are not mixed");
    }

    #[test]
    fn bits_spread() {
        // 100,000 frontends (consecutive addresses, one port, as a cluster's
        // ClusterIPs are) land on distinct bits about as a random hash would.
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            let b = i.to_be_bytes();
            seen.insert(bit(&v4([10, b[1], b[2], b[3]]), 443u16.to_be()));
        }
        // Expected distinct for random: BITS (1 - e^{-n/BITS}) ≈ 95,400.
        assert!(seen.len() > 94_000, "{} distinct bits", seen.len());
    }
}
