// SPDX-License-Identifier: MIT OR Apache-2.0
//! The weighted sequence of `wrr`, `random` and `wlc`: list positions, each
//! backend's share ∝ its weight, interleaved.
//!
//! `wrr` walks it with the per-CPU cursor, `random` and `wlc` draw from it,
//! so the datapath needs one array read per pick whatever the weights (see
//! `datapath_common::Service`). The order is earliest-deadline-first: the
//! k-th entry of a backend of weight w is due at (k + ½)/w, so 3:1:1 gives
//! A A B C A and no backend waits a long run of the others (IPVS wrr's
//! passes give A A A B C).

/// Longest sequence for `n` backends: 100 per backend (as a Maglev table),
/// at least 1,024 and at most 131,071 entries. Weights whose sum (over
/// their gcd) fits are exact; larger ones are scaled down, every backend
/// keeping at least one entry.
pub fn max_len(n: usize) -> u64 {
    (n as u64 * 100).clamp(1024, 131_071)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `weights` over their gcd; empty when they are all equal (no sequence:
/// a draw is uniform over the list).
pub fn reduce(weights: &[u16]) -> Vec<u16> {
    if weights.windows(2).all(|w| w[0] == w[1]) {
        return Vec::new();
    }
    let g = weights.iter().fold(0u64, |g, w| gcd(g, *w as u64)).max(1);
    weights.iter().map(|w| (*w as u64 / g) as u16).collect()
}

/// The sequence for `weights` (reduced, all above 0): list positions.
pub fn build(weights: &[u16]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| *w as u64).sum();
    let cap = max_len(weights.len());
    let scaled: Vec<u64> = if total <= cap {
        weights.iter().map(|w| *w as u64).collect()
    } else {
        weights.iter().map(|w| ((*w as u64 * cap + total / 2) / total).max(1)).collect()
    };
    // (k, weight, position): due at (2k + 1) / 2w.
    let mut due: Vec<(u64, u64, u32)> =
        scaled.iter().enumerate().flat_map(|(i, w)| (0..*w).map(move |k| (k, *w, i as u32))).collect();
    due.sort_by(|a, b| ((2 * a.0 + 1) * b.1).cmp(&((2 * b.0 + 1) * a.1)).then(a.2.cmp(&b.2)));
    due.into_iter().map(|(_, _, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_interleaved() {
        assert_eq!(build(&reduce(&[3, 1, 1])), vec![0, 0, 1, 2, 0]);
        assert_eq!(build(&reduce(&[6, 2, 2])), vec![0, 0, 1, 2, 0], "over the gcd");
        assert!(reduce(&[4, 4, 4]).is_empty(), "equal weights: no sequence");
        let s = build(&[1, 2, 3, 4]);
        for (i, w) in [1, 2, 3, 4].iter().enumerate() {
            assert_eq!(s.iter().filter(|p| **p == i as u32).count(), *w);
        }
        // No backend of weight 4 in 10 waits more than 3 entries.
        let gaps = s.iter().enumerate().filter(|(_, p)| **p == 3).map(|(i, _)| i).collect::<Vec<_>>();
        assert!(gaps.windows(2).all(|g| g[1] - g[0] <= 3), "{s:?}");
    }

    #[test]
    fn large_weights_are_scaled_within_half_a_percent() {
        let w = [65535u16, 30000, 1, 17];
        let s = build(&reduce(&w));
        assert!(s.len() as u64 <= max_len(4) + 4);
        let total: f64 = w.iter().map(|w| *w as f64).sum();
        for (i, w) in w.iter().enumerate() {
            let n = s.iter().filter(|p| **p == i as u32).count();
            assert!(n >= 1);
            let share = n as f64 / s.len() as f64;
            assert!(*w < 100 || (share - *w as f64 / total).abs() < 0.005, "{i}: {share}");
        }
    }
}
