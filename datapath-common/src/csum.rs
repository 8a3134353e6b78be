// SPDX-License-Identifier: MIT OR Apache-2.0
//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! Words are read in native byte order straight from packet bytes and the
//! checksum field is handled the same way: the one's-complement sum is
//! byte-order independent as long as both sides agree (RFC 1071 §2(B)).
//! A "diff" is the one's-complement sum of `~old` and `new` words; applying it
//! implements RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`.

/// One's-complement addition with end-around carry, kept in 32 bits.
#[inline(always)]
pub const fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

/// Folds a 32-bit partial sum to 16 bits.
#[inline(always)]
pub const fn fold(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Diff for replacing the 16-bit word `old` by `new`.
#[inline(always)]
pub const fn diff16(old: u16, new: u16) -> u32 {
    add(!old as u32, new as u32)
}

/// Diff for replacing 4 bytes (an IPv4 address).
#[inline(always)]
pub fn diff4(old: &[u8; 4], new: &[u8; 4]) -> u32 {
    let o = u32::from_ne_bytes(*old);
    let n = u32::from_ne_bytes(*new);
    add(!o, n)
}

/// Diff for replacing 16 bytes (an IPv6 address).
#[inline(always)]
pub fn diff16b(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < 16 {
        let o = u32::from_ne_bytes([old[i], old[i + 1], old[i + 2], old[i + 3]]);
        let n = u32::from_ne_bytes([new[i], new[i + 1], new[i + 2], new[i + 3]]);
        s = add(s, add(!o, n));
        i += 4;
    }
    s
}

/// Applies `diff` to a checksum field value (as read, native order).
#[inline(always)]
pub const fn apply(csum: u16, diff: u32) -> u16 {
    !fold(add(!csum as u32, diff))
}

/// Applies `diff` to a UDP-over-IPv4 checksum: zero means "no checksum" and
/// stays zero; a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn apply_udp(csum: u16, diff: u32) -> u16 {
    if csum == 0 {
        return 0;
    }
    match apply(csum, diff) {
        0 => 0xffff,
        c => c,
    }
}

/// One's-complement sum of a byte slice (odd tail padded with zero), not folded.
#[inline(always)]
pub fn sum_bytes(mut s: u32, b: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        s = add(s, u16::from_ne_bytes([b[i], b[i + 1]]) as u32);
        i += 2;
    }
    if i < b.len() {
        s = add(s, u16::from_ne_bytes([b[i], 0]) as u32);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(b: &[u8]) -> u16 {
        !fold(sum_bytes(0, b))
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut hdr =
            [0x45u8, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 0xac, 0x10, 0x0a, 0x63, 0xac, 0x10, 0x0a, 0x0c];
        let c = full(&hdr);
        hdr[10..12].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(full(&hdr), 0);
        let old: [u8; 4] = hdr[16..20].try_into().unwrap();
        let new = [10, 96, 0, 7];
        hdr[16..20].copy_from_slice(&new);
        let c2 = apply(c, diff4(&old, &new));
        hdr[10..12].copy_from_slice(&c2.to_ne_bytes());
        assert_eq!(full(&hdr), 0, "header checksums to zero after update");
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(apply_udp(0, diff16(80, 8080)), 0);
        // A result of zero is transmitted as all ones.
        let c = apply(0x1234, diff16(1, 2));
        assert_ne!(apply_udp(0x1234, diff16(1, 2)), 0);
        assert_eq!(apply_udp(0x1234, diff16(1, 2)), if c == 0 { 0xffff } else { c });
    }
}
