// SPDX-License-Identifier: MIT OR Apache-2.0
//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4): the lookup
//! table builder, and the prime-size helpers.
//!
//! Each backend has a preference list, the permutation
//! `(offset + j·skip) mod M` with `offset = h1(key) mod M` and
//! `skip = h2(key) mod (M−1) + 1`; backends take turns claiming their next
//! preferred free slot until the table is full. With M prime every
//! permutation visits every slot, each backend ends up with ⌊M/N⌋ or ⌈M/N⌉
//! slots, and removing one backend moves little more than its own slots.
//!
//! The key is the backend's address and port, never a node-local id, so
//! every node builds the same table and picks the same backend for a flow.
//!
//! Weights (the paper's §3.4 leaves them to "the populating procedure"):
//! every turn adds a backend's weight to its credit, and it claims a slot
//! only when the credit reaches the largest weight, paying that back; so
//! the heaviest backends claim at every turn and each one's share of the
//! table is ∝ its weight (Katran's `MaglevHashV2` does the same). The first
//! turn is every backend's, on credit, so the lightest still has a slot.
//! Equal weights give exactly the unweighted table.

/// Smallest Maglev table size the agent uses.
pub const MIN_SIZE: u32 = 251;
/// Largest table size (Cilium's upper bound).
pub const MAX_SIZE: u32 = 131_071;

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime ≥ `n`.
pub fn next_prime(n: u32) -> u32 {
    let mut p = n.max(2);
    while !is_prime(p) {
        p += 1;
    }
    p
}

/// The largest prime ≤ `n` (2 when there is none).
pub fn prev_prime(n: u32) -> u32 {
    (2..=n).rev().find(|p| is_prime(*p)).unwrap_or(2)
}

/// The table size for `backends` backends: the smallest prime ≥ 100·N,
/// clamped to [`MIN_SIZE`, `MAX_SIZE`] (≤ 1 % imbalance up to 1,310 backends).
pub fn size_for(backends: usize) -> u32 {
    let want = (backends as u64 * 100).clamp(MIN_SIZE as u64, MAX_SIZE as u64) as u32;
    next_prime(want).min(MAX_SIZE)
}

/// FNV-1a of `bytes` from `seed`, avalanched (also the L2 owners' rendezvous hash).
pub fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    // FNV-1a, then the splitmix64 finaliser for avalanche.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A backend as Maglev sees it: the stable key it is hashed by, the
/// value its slots hold (the backend id in the BACKENDS map) and its
/// weight (above 0).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub key: Vec<u8>,
    pub id: u32,
    pub weight: u16,
}

/// The stable Maglev key of a backend: its 16-byte address and port.
pub fn backend_key(addr: &[u8; 16], port_be: u16) -> Vec<u8> {
    let mut k = addr.to_vec();
    k.extend_from_slice(&port_be.to_ne_bytes());
    k
}

/// Builds the lookup table of size `m` (a prime) for `entries`.
/// The result does not depend on the order of `entries`. Empty input gives
/// an all-zero table (id 0 is never a backend).
pub fn build(entries: &[Entry], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "Maglev table size {m} must be prime");
    let mut entries = entries.to_vec();
    entries.sort();
    entries.dedup_by(|a, b| a.key == b.key);
    let mut table = vec![0u32; m as usize];
    if entries.is_empty() {
        return table;
    }
    let m64 = m as u64;
    let perm: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| (hash64(0x6d61_676c_6576, &e.key) % m64, hash64(0x736b_6970, &e.key) % (m64 - 1) + 1))
        .collect();
    let mut next = vec![0u64; entries.len()];
    let mut taken = vec![false; m as usize];
    let mut filled = 0u32;
    let max_weight = entries.iter().map(|e| e.weight.max(1) as i64).max().unwrap_or(1);
    let mut credit = vec![0i64; entries.len()];
    let mut first = true;
    'fill: loop {
        for (i, e) in entries.iter().enumerate() {
            credit[i] += e.weight.max(1) as i64;
            // The first turn is every backend's, on credit: each has a slot
            // however light (as IPVS mh's `?: 1`), and pays it back later.
            if credit[i] < max_weight && !first {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = perm[i];
            let mut c = ((offset + next[i] * skip) % m64) as usize;
            while taken[c] {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m64) as usize;
            }
            taken[c] = true;
            table[c] = e.id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
        first = false;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entries(n: u32) -> Vec<Entry> {
        (1..=n)
            .map(|i| Entry {
                key: backend_key(&datapath_common::v4_mapped([10, 0, (i >> 8) as u8, i as u8]), 8080u16.to_be()),
                id: i,
                weight: 1,
            })
            .collect()
    }

    fn loads(t: &[u32]) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for id in t {
            *m.entry(*id).or_default() += 1;
        }
        m
    }

    #[test]
    fn primes() {
        assert_eq!(next_prime(100), 101);
        assert_eq!(next_prime(251), 251);
        assert_eq!(size_for(1), 251);
        assert_eq!(size_for(10), 1009);
        assert_eq!(size_for(1_000_000), MAX_SIZE);
        assert!(is_prime(16381) && is_prime(65537) && is_prime(MAX_SIZE));
    }

    #[test]
    fn balanced_within_one_percent_when_m_is_100n() {
        for n in [1u32, 2, 3, 7, 10, 33, 100, 250] {
            let m = size_for(n as usize);
            assert!(m >= 100 * n);
            let t = build(&entries(n), m);
            let l = loads(&t);
            assert_eq!(l.len(), n as usize, "every backend gets slots");
            let mean = m as f64 / n as f64;
            let max = *l.values().max().unwrap() as f64;
            assert!(max <= 1.01 * mean, "n={n} m={m}: max {max} > 1.01 × mean {mean}");
        }
    }

    /// Worst share of slots that change owner when one of `n` backends is removed.
    fn worst_disruption(n: u32, m: u32) -> f64 {
        let all = entries(n);
        let before = build(&all, m);
        (1..=n)
            .map(|removed| {
                let rest: Vec<Entry> = all.iter().filter(|e| e.id != removed).cloned().collect();
                let after = build(&rest, m);
                assert!(after.iter().all(|id| *id != removed));
                before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / m as f64
            })
            .fold(0.0, f64::max)
    }

    /// The paper's algorithm is not minimally disruptive: besides the removed
    /// backend's own 1/N, the refill reshuffles a few percent more when M is
    /// only 100·N (measured ≤ 3.5 %), and under 1 % once M ≥ 1000·N.
    #[test]
    fn removing_one_backend_moves_few_slots() {
        for n in [3u32, 5, 10, 40, 100] {
            let d = worst_disruption(n, next_prime(1000 * n));
            assert!(d <= 1.0 / n as f64 + 0.01, "n={n} M≈1000N: {d:.4} of slots moved");
            let d = worst_disruption(n, size_for(n as usize));
            assert!(d <= 1.0 / n as f64 + 0.04, "n={n} M≈100N: {d:.4} of slots moved");
        }
    }

    /// Shares follow the weights within 0.5 % of the table (here 3:1:1 and
    /// a spread of weights), and equal weights (any value) give the
    /// unweighted table, so an upgrade moves no flow.
    #[test]
    fn weighted_shares_follow_the_weights() {
        for weights in [vec![3u16, 1, 1], vec![1, 2, 3, 4, 5, 6, 7, 8], vec![65535, 1, 100]] {
            let mut e = entries(weights.len() as u32);
            for (e, w) in e.iter_mut().zip(&weights) {
                e.weight = *w;
            }
            let m = size_for(e.len());
            let l = loads(&build(&e, m));
            let total: u64 = weights.iter().map(|w| *w as u64).sum();
            for (e, w) in e.iter().zip(&weights) {
                assert!(l.get(&e.id).copied().unwrap_or(0) >= 1, "{weights:?}: id {} has no slot", e.id);
                let share = l.get(&e.id).copied().unwrap_or(0) as f64 / m as f64;
                let want = *w as f64 / total as f64;
                assert!((share - want).abs() <= 0.005, "{weights:?}: id {} has {share:.4}, wants {want:.4}", e.id);
            }
        }
        let mut e = entries(7);
        let plain = build(&e, 1009);
        e.iter_mut().for_each(|e| e.weight = 9);
        assert_eq!(build(&e, 1009), plain);
    }

    #[test]
    fn independent_of_input_order_and_deterministic() {
        let mut e = entries(17);
        let a = build(&e, 1709);
        e.reverse();
        assert_eq!(a, build(&e, 1709));
        assert!(build(&[], 251).iter().all(|id| *id == 0));
    }
}
