//! A small seeded generator (SplitMix64) whose output is fixed by its seed on
//! every platform and every version of strata: datasets and curricula are
//! reproducible from their seed, which a general-purpose RNG crate does not
//! promise across releases. Its whole state is one `u64`, so a loader cursor
//! can carry it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The whole state: `SplitMix64::new(g.state())` continues `g`'s
    /// stream exactly.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// An independent stream for `key` under `seed` (for example one per
    /// document, so parallel workers draw the same numbers as a serial run).
    pub fn for_key(seed: u64, key: u64) -> SplitMix64 {
        let mut mix = SplitMix64::new(seed ^ key.wrapping_mul(0xD1B5_4A32_D192_ED03));
        SplitMix64::new(mix.next_u64())
    }

    /// Moves the stream `n` draws ahead in constant time, as if `next_u64`
    /// had been called `n` times (the state advances by a fixed increment),
    /// so a slice of a long stream is drawn without the values before it.
    pub fn skip(&mut self, n: u64) {
        self.state = self
            .state
            .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` without modulo bias. `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// An index drawn with probability proportional to `weights` (finite,
    /// non-negative, not all zero).
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        assert!(total > 0.0, "weighted choice needs a positive weight");
        let mut x = self.next_f64() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        // Rounding left x just past the end: the last positive weight.
        weights.iter().rposition(|w| *w > 0.0).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_splitmix64_reference_stream() {
        // Reference values of SplitMix64 seeded with 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn skip_lands_where_drawing_would() {
        let mut a = SplitMix64::for_key(9, 4);
        let mut b = a;
        for _ in 0..1000 {
            a.next_u64();
        }
        b.skip(1000);
        assert_eq!(a, b);
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn below_and_weighted_stay_in_range() {
        let mut r = SplitMix64::new(7);
        for n in 1..50 {
            assert!(r.below(n) < n);
        }
        let w = [0.0, 3.0, 0.0, 1.0];
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[r.weighted(&w)] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        // 3:1 odds within 2% (the standard error is about 0.2%).
        let frac = counts[1] as f64 / 40_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn keyed_streams_differ_and_repeat() {
        let a = SplitMix64::for_key(1, 10).next_u64();
        assert_eq!(a, SplitMix64::for_key(1, 10).next_u64());
        assert_ne!(a, SplitMix64::for_key(1, 11).next_u64());
        assert_ne!(a, SplitMix64::for_key(2, 10).next_u64());
    }
}
