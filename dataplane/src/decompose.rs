//! Dataset decomposition of one document (Pouransari et al. 2024).
//!
//! A document of `len` tokens (end-of-text appended) is cut, from its start,
//! into adjacent, non-overlapping pieces of `2^k + 1` tokens, so that a
//! piece's inputs and its targets (shifted by one) are both `2^k` long. Each
//! cut takes the largest `k` with `2^k + 1 ≤ remaining`; when that `k` is
//! above the largest bucket, the piece is the largest bucket's
//! ([`SplitLong::Largest`]) or, as in the reference code, a bucket drawn from
//! `min..=max` with odds `2^(max−k)` ([`SplitLong::Random`], seeded). A
//! remainder shorter than `2^min + 1` is dropped and counted.
//!
//! With buckets 2^8..2^13: a 1000-token document gives one D9 piece (513
//! tokens) and one D8 piece (257), 230 tokens dropped; 8193 tokens give
//! exactly one D13 piece.

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// How to cut a document longer than the largest bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitLong {
    /// Always the largest bucket.
    Largest,
    /// A bucket drawn with odds `2^(max−k)` (the reference code's choice).
    Random,
}

/// The bucket range: pieces hold `2^k + 1` tokens for `min_log2 ≤ k ≤ max_log2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    pub min_log2: u32,
    pub max_log2: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BucketsError {
    #[error("min_log2 = {min} is greater than max_log2 = {max}")]
    Inverted { min: u32, max: u32 },
    #[error("max_log2 = {max} is above 30: a bucket's sequences would exceed 2^30 tokens")]
    TooLarge { max: u32 },
}

impl Buckets {
    pub fn new(min_log2: u32, max_log2: u32) -> Result<Buckets, BucketsError> {
        if min_log2 > max_log2 {
            return Err(BucketsError::Inverted {
                min: min_log2,
                max: max_log2,
            });
        }
        if max_log2 > 30 {
            return Err(BucketsError::TooLarge { max: max_log2 });
        }
        Ok(Buckets { min_log2, max_log2 })
    }

    /// Tokens stored per piece of bucket `k`.
    pub fn piece_len(k: u32) -> u64 {
        (1u64 << k) + 1
    }
}

/// A piece of a document: tokens `offset .. offset + 2^log2 + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub log2: u32,
    pub offset: u64,
}

/// Cuts a document of `len` tokens. Returns the pieces in document order and
/// the number of tokens dropped at the end. `rng` is only drawn from for
/// [`SplitLong::Random`] cuts of long documents; give each document its own
/// stream ([`SplitMix64::for_key`]) so the result does not depend on the
/// order documents are processed in.
pub fn decompose(
    len: u64,
    buckets: Buckets,
    split_long: SplitLong,
    rng: &mut SplitMix64,
) -> (Vec<Piece>, u64) {
    let Buckets { min_log2, max_log2 } = buckets;
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    let mut remaining = len;
    // Odds 2^(max−k) for k = min..=max, for the random split of long documents.
    let mut odds: Vec<f64> = Vec::new();
    while remaining > Buckets::piece_len(min_log2) - 1 {
        let k = (remaining - 1).ilog2();
        let k = if k <= max_log2 {
            k
        } else {
            match split_long {
                SplitLong::Largest => max_log2,
                SplitLong::Random => {
                    if odds.is_empty() {
                        odds = (min_log2..=max_log2)
                            .map(|k| 2f64.powi((max_log2 - k) as i32))
                            .collect();
                    }
                    min_log2 + rng.weighted(&odds) as u32
                }
            }
        };
        pieces.push(Piece { log2: k, offset });
        offset += Buckets::piece_len(k);
        remaining -= Buckets::piece_len(k);
    }
    (pieces, remaining)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn dd(len: u64) -> (Vec<Piece>, u64) {
        decompose(
            len,
            Buckets::new(8, 13).unwrap(),
            SplitLong::Largest,
            &mut SplitMix64::new(0),
        )
    }

    #[test]
    fn the_papers_examples() {
        let (p, dropped) = dd(1000);
        assert_eq!(
            p,
            [
                Piece { log2: 9, offset: 0 },
                Piece {
                    log2: 8,
                    offset: 513
                }
            ]
        );
        assert_eq!(dropped, 230);
        let (p, dropped) = dd(8193);
        assert_eq!(
            p,
            [Piece {
                log2: 13,
                offset: 0
            }]
        );
        assert_eq!(dropped, 0);
    }

    #[test]
    fn short_documents_are_dropped_whole() {
        assert_eq!(dd(0), (vec![], 0));
        assert_eq!(dd(256), (vec![], 256));
        assert_eq!(dd(257), (vec![Piece { log2: 8, offset: 0 }], 0));
    }

    #[test]
    fn long_documents_fill_the_largest_bucket() {
        let (p, dropped) = dd(3 * 8193 + 300);
        assert_eq!(p.iter().filter(|x| x.log2 == 13).count(), 3);
        assert_eq!(p.last().unwrap().log2, 8);
        assert_eq!(dropped, 300 - 257);
    }

    #[test]
    fn bad_bucket_ranges_are_named() {
        assert_eq!(
            Buckets::new(9, 8).unwrap_err().to_string(),
            "min_log2 = 9 is greater than max_log2 = 8"
        );
        assert!(Buckets::new(8, 31).is_err());
    }

    #[test]
    fn random_split_draws_small_buckets_more_often_and_repeats_from_its_seed() {
        let b = Buckets::new(8, 13).unwrap();
        let cut = |seed| decompose(1 << 22, b, SplitLong::Random, &mut SplitMix64::new(seed));
        assert_eq!(cut(5), cut(5));
        assert_ne!(cut(5), cut(6));
        let (pieces, _) = cut(5);
        let count = |k| pieces.iter().filter(|p| p.log2 == k).count();
        // Odds 32:1 between D8 and D13.
        assert!(count(8) > 10 * count(13), "{} vs {}", count(8), count(13));
    }

    proptest! {
        #[test]
        fn pieces_tile_the_document_from_offset_zero(
            len in 0u64..200_000,
            min in 0u32..10,
            span in 0u32..6,
            random in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let b = Buckets::new(min, min + span).unwrap();
            let policy = if random { SplitLong::Random } else { SplitLong::Largest };
            let (pieces, dropped) = decompose(len, b, policy, &mut SplitMix64::new(seed));
            let mut next = 0;
            for p in &pieces {
                // Each piece is a power of two plus one, in range, adjacent.
                prop_assert!(p.log2 >= b.min_log2 && p.log2 <= b.max_log2);
                prop_assert_eq!(p.offset, next);
                next += Buckets::piece_len(p.log2);
            }
            // The pieces and the dropped tail cover the document exactly.
            prop_assert_eq!(next + dropped, len);
            prop_assert!(dropped < Buckets::piece_len(b.min_log2));
            // Greedy: while the document fits the largest bucket, every cut
            // is the largest power that fits what remains.
            if policy == SplitLong::Largest {
                for p in &pieces {
                    let remaining = len - p.offset;
                    let greedy = (remaining - 1).ilog2().min(b.max_log2);
                    prop_assert_eq!(p.log2, greedy);
                }
            }
        }
    }
}
