// SPDX-License-Identifier: MIT OR Apache-2.0
//! Mutations of a seed frame: bit flips (mostly in the headers),
//! truncation, length / offset / IHL fields, fragment fields, inserted
//! IPv6 extension headers, TCP flags, trailing bytes, zeroed UDP checksums,
//! and sometimes a repaired IPv4 header checksum so the packet looks like
//! one a wire carries.

use super::wire::{self, TCP, UDP};
use crate::packet::{fix_ipv4_checksum, insert_ipv6_ext};

/// splitmix64: small, fast, and the same sequence for the same seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// A mutated copy of `seed`: one to three mutations, or (1 in 16) none.
pub fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut f = seed.to_vec();
    if rng.below(16) == 0 {
        return f;
    }
    for _ in 0..1 + rng.below(3) {
        one(&mut f, rng);
    }
    if rng.below(2) == 0
        && let Some(ip) = wire::frame(&f)
        && !ip.v6
        && ip.hdr >= 20
        && ip.l3 + ip.hdr <= f.len()
    {
        fix_ipv4_checksum(&mut f, ip.l3);
    }
    f
}

fn set16(f: &mut [u8], at: usize, v: u16) {
    if at + 2 <= f.len() {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

fn get16(f: &[u8], at: usize) -> u16 {
    if at + 2 <= f.len() { u16::from_be_bytes([f[at], f[at + 1]]) } else { 0 }
}

/// A length-like value near `v` or anywhere.
fn near(v: u16, rng: &mut Rng) -> u16 {
    match rng.below(4) {
        0 => rng.next_u64() as u16,
        1 => 0,
        _ => v.wrapping_add(rng.below(33) as u16).wrapping_sub(16),
    }
}

fn one(f: &mut Vec<u8>, rng: &mut Rng) {
    let ip = wire::frame(f);
    match rng.below(12) {
        // Bit flips: in the first 96 bytes (headers) three times as often.
        0..=2 => {
            let span = f.len().min(96);
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(span);
                f[i] ^= 1 << rng.below(8);
            }
        }
        3 => {
            let i = rng.below(f.len());
            f[i] ^= 1 << rng.below(8);
        }
        // Truncation (test runs need the Ethernet header).
        4 if f.len() > 15 => {
            let n = 14 + rng.below(f.len() - 14);
            f.truncate(n);
        }
        5 => {
            if let Some(ip) = ip {
                let at = ip.l3 + if ip.v6 { 4 } else { 2 };
                let v = near(get16(f, at), rng);
                set16(f, at, v);
            }
        }
        6 => {
            if let Some(ip) = ip
                && !ip.v6
                && ip.l3 < f.len()
            {
                f[ip.l3] = 0x40 | rng.below(16) as u8;
            }
        }
        7 => {
            if let Some(ip) = ip {
                match ip.proto {
                    UDP => {
                        let v = near(get16(f, ip.l4 + 4), rng);
                        set16(f, ip.l4 + 4, v);
                    }
                    TCP if ip.l4 + 12 < f.len() => f[ip.l4 + 12] = (rng.below(16) as u8) << 4,
                    _ => {}
                }
            }
        }
        8 => {
            if let Some(ip) = ip {
                if ip.v6 {
                    // A fragment header: offset and M at random.
                    let bits = ((rng.below(4) as u16) << 3) | rng.below(2) as u16;
                    let mut rest = vec![0u8];
                    rest.extend_from_slice(&bits.to_be_bytes());
                    rest.extend_from_slice(&(rng.next_u64() as u32 % 4).to_be_bytes());
                    insert_ipv6_ext(f, ip.l3, 44, &rest);
                } else {
                    let v = match rng.below(3) {
                        0 => 0x2000,
                        1 => rng.below(4) as u16,
                        _ => rng.next_u64() as u16,
                    };
                    set16(f, ip.l3 + 6, v);
                }
            }
        }
        9 => {
            if let Some(ip) = ip
                && ip.v6
            {
                let proto = [0u8, 60, 43, 43, 51, 50][rng.below(6)];
                let mut rest = vec![0u8; 7];
                if proto == 43 {
                    rest[2] = rng.below(2) as u8; // segments left
                }
                if rng.below(4) == 0 {
                    rest[0] = rng.byte() % 3; // a length that runs past the packet
                }
                insert_ipv6_ext(f, ip.l3, proto, &rest);
            }
        }
        10 => {
            if let Some(ip) = ip {
                match ip.proto {
                    TCP if ip.l4 + 13 < f.len() => f[ip.l4 + 13] = rng.byte(),
                    UDP => set16(f, ip.l4 + 6, 0),
                    _ => {}
                }
            }
        }
        _ => {
            for _ in 0..1 + rng.below(64) {
                f.push(rng.byte());
            }
        }
    }
}
