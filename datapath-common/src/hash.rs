// SPDX-License-Identifier: MIT OR Apache-2.0
//! The flow hash used for Maglev slot selection and SNAT port probing.
//!
//! It deliberately leaves out the destination address: a NodePort flow hits a
//! different VIP (the node address) on every node, and every node must still
//! pick the same backend for it (as Katran and Cilium do).

#[inline(always)]
pub const fn mix(h: u32, k: u32) -> u32 {
    // MurmurHash3's 32-bit block step.
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
pub const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of {source address, source port, destination port, protocol}.
/// Ports in network order, as in the packet and the map keys.
#[inline(always)]
pub fn flow_hash(saddr: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = mix_address(0x9747_b28c_u32, saddr);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h ^ 24)
}

/// Hash of the client address alone, for source hashing (`sh`): every
/// port and protocol of one client gives the same value.
#[inline(always)]
pub fn client_hash(saddr: &[u8; 16]) -> u32 {
    finish(mix_address(0x5f0a_c1e7_u32, saddr) ^ 16)
}

/// `h` with the 16 bytes of an address mixed in, a word at a time.
#[inline(always)]
fn mix_address(mut h: u32, a: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    h = mix(h, w(0));
    h = mix(h, w(4));
    h = mix(h, w(8));
    mix(h, w(12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_on_every_input_but_not_the_vip() {
        let a = [7u8; 16];
        let h = flow_hash(&a, 1, 2, 6);
        assert_ne!(h, flow_hash(&a, 2, 2, 6));
        assert_ne!(h, flow_hash(&a, 1, 3, 6));
        assert_ne!(h, flow_hash(&a, 1, 2, 17));
        let mut b = a;
        b[15] = 8;
        assert_ne!(h, flow_hash(&b, 1, 2, 6));
        assert_eq!(h, flow_hash(&a, 1, 2, 6));
    }
}
