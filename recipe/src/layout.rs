//! The 3D parallel layout, computed in one place.
//!
//! World ranks map to coordinates with tensor parallel innermost, then
//! pipeline, then data parallel (Megatron-LM's order): consecutive ranks form a
//! tensor-parallel group, so placing consecutive ranks on one node keeps the
//! chattiest group on the fastest links. Every process group is derived here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A process's index in the job's world, `0..world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rank(pub u32);

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {}", self.0)
    }
}

/// A rank's position in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coords {
    pub dp: u32,
    pub pp: u32,
    pub tp: u32,
}

/// Sizes of the three parallel dimensions. All are at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub tp: u32,
    pub pp: u32,
    pub dp: u32,
}

impl Layout {
    /// # Panics
    /// If a size is zero; recipes are validated before a layout is built.
    pub fn new(tp: u32, pp: u32, dp: u32) -> Layout {
        assert!(tp > 0 && pp > 0 && dp > 0, "layout sizes must be positive");
        Layout { tp, pp, dp }
    }

    pub fn world_size(&self) -> u32 {
        self.tp * self.pp * self.dp
    }

    /// Coordinates of `rank`; `None` outside the world.
    pub fn coords(&self, rank: Rank) -> Option<Coords> {
        let r = rank.0;
        (r < self.world_size()).then(|| Coords {
            tp: r % self.tp,
            pp: (r / self.tp) % self.pp,
            dp: r / (self.tp * self.pp),
        })
    }

    /// The rank at `coords`; `None` if a coordinate is out of range.
    pub fn rank(&self, c: Coords) -> Option<Rank> {
        (c.tp < self.tp && c.pp < self.pp && c.dp < self.dp)
            .then(|| Rank(c.tp + self.tp * (c.pp + self.pp * c.dp)))
    }

    fn group(&self, rank: Rank, vary: impl Fn(Coords, u32) -> Coords, size: u32) -> Vec<Rank> {
        let c = self
            .coords(rank)
            .unwrap_or_else(|| panic!("{rank} is outside a world of {}", self.world_size()));
        (0..size)
            .map(|i| self.rank(vary(c, i)).expect("in range by construction"))
            .collect()
    }

    /// The ranks that share `rank`'s pipeline stage and data-parallel replica,
    /// in tensor-parallel order.
    pub fn tp_group(&self, rank: Rank) -> Vec<Rank> {
        self.group(rank, |c, i| Coords { tp: i, ..c }, self.tp)
    }

    /// The stages of `rank`'s pipeline, first stage first.
    pub fn pp_group(&self, rank: Rank) -> Vec<Rank> {
        self.group(rank, |c, i| Coords { pp: i, ..c }, self.pp)
    }

    /// The replicas of `rank`'s shard, which all-reduce its gradients.
    pub fn dp_group(&self, rank: Rank) -> Vec<Rank> {
        self.group(rank, |c, i| Coords { dp: i, ..c }, self.dp)
    }

    /// The fraction of a step's pipeline time each stage of a 1F1B (or
    /// GPipe) pipeline idles with `m` microbatches of equal cost and `v`
    /// model chunks per stage (interleaved 1F1B; 1 otherwise):
    /// `(p − 1) / (m·v + p − 1)` (Narayanan et al. 2021: the bubble is
    /// `(p − 1)/(m·v)` of the ideal time).
    pub fn bubble_fraction(&self, microbatches: u32, virtual_stages: u32) -> f64 {
        let p = f64::from(self.pp);
        let mv = f64::from(microbatches.max(1)) * f64::from(virtual_stages.max(1));
        (p - 1.0) / (mv + p - 1.0)
    }

    /// The layers of pipeline stage `stage` when `n_layers` layers are split
    /// over `pp` stages as evenly as possible: every stage gets
    /// ⌊n_layers / pp⌋ layers and the first `n_layers mod pp` stages one
    /// more. The last stage, which also computes the final norm, the output
    /// head and the loss, therefore never gets an extra layer; the first,
    /// whose extra work is only the embedding lookup, gets one first.
    ///
    /// # Panics
    /// If `stage >= pp`.
    pub fn stage_layers(&self, n_layers: u32, stage: u32) -> std::ops::Range<u32> {
        self.chunk_layers(n_layers, 1, stage, 0)
    }

    /// The layers of model chunk `chunk` of pipeline stage `stage` when
    /// each stage holds `virtual_stages` chunks (interleaved 1F1B): chunk
    /// c of stage s is virtual stage `c·pp + s` of `pp·virtual_stages`,
    /// and layers are split over the virtual stages as
    /// [`Layout::stage_layers`] splits them over stages.
    ///
    /// # Panics
    /// If `stage >= pp` or `chunk >= virtual_stages`.
    pub fn chunk_layers(
        &self,
        n_layers: u32,
        virtual_stages: u32,
        stage: u32,
        chunk: u32,
    ) -> std::ops::Range<u32> {
        assert!(
            stage < self.pp,
            "stage {stage} of a {}-stage pipeline",
            self.pp
        );
        assert!(chunk < virtual_stages, "chunk {chunk} of {virtual_stages}");
        let n = self.pp * virtual_stages;
        let k = chunk * self.pp + stage;
        let (base, extra) = (n_layers / n, n_layers % n);
        let start = k * base + k.min(extra);
        let len = base + u32::from(k < extra);
        start..start + len
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tp={} pp={} dp={}", self.tp, self.pp, self.dp)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn tensor_parallel_is_innermost() {
        let l = Layout::new(2, 3, 2);
        assert_eq!(l.world_size(), 12);
        assert_eq!(
            l.coords(Rank(0)),
            Some(Coords {
                dp: 0,
                pp: 0,
                tp: 0
            })
        );
        assert_eq!(
            l.coords(Rank(1)),
            Some(Coords {
                dp: 0,
                pp: 0,
                tp: 1
            })
        );
        assert_eq!(
            l.coords(Rank(2)),
            Some(Coords {
                dp: 0,
                pp: 1,
                tp: 0
            })
        );
        assert_eq!(
            l.coords(Rank(6)),
            Some(Coords {
                dp: 1,
                pp: 0,
                tp: 0
            })
        );
        assert_eq!(l.coords(Rank(12)), None);
        assert_eq!(l.tp_group(Rank(3)), vec![Rank(2), Rank(3)]);
        assert_eq!(l.pp_group(Rank(7)), vec![Rank(7), Rank(9), Rank(11)]);
        assert_eq!(l.dp_group(Rank(5)), vec![Rank(5), Rank(11)]);
    }

    #[test]
    fn bubble_matches_narayanan() {
        assert_eq!(Layout::new(1, 4, 1).bubble_fraction(8, 1), 3.0 / 11.0);
        assert_eq!(Layout::new(1, 2, 1).bubble_fraction(4, 1), 1.0 / 5.0);
        assert_eq!(Layout::new(1, 1, 1).bubble_fraction(1, 1), 0.0);
        // Interleaving v chunks divides the bubble's cost by v.
        assert_eq!(Layout::new(1, 4, 1).bubble_fraction(8, 2), 3.0 / 19.0);
    }

    #[test]
    fn chunks_interleave_layers_over_stages() {
        let l = Layout::new(1, 2, 1);
        // 8 layers, 2 stages × 2 chunks: stage 0 holds 0..2 and 4..6.
        assert_eq!(l.chunk_layers(8, 2, 0, 0), 0..2);
        assert_eq!(l.chunk_layers(8, 2, 1, 0), 2..4);
        assert_eq!(l.chunk_layers(8, 2, 0, 1), 4..6);
        assert_eq!(l.chunk_layers(8, 2, 1, 1), 6..8);
        // 5 layers over 4 virtual stages: the first gets the extra one.
        assert_eq!(l.chunk_layers(5, 2, 0, 0), 0..2);
        assert_eq!(l.chunk_layers(5, 2, 1, 1), 4..5);
    }

    #[test]
    fn uneven_layer_splits_spare_the_last_stage() {
        let stages = |l: u32, p: u32| -> Vec<std::ops::Range<u32>> {
            let layout = Layout::new(1, p, 1);
            (0..p).map(|s| layout.stage_layers(l, s)).collect()
        };
        assert_eq!(stages(4, 2), vec![0..2, 2..4]);
        assert_eq!(stages(5, 2), vec![0..3, 3..5]);
        assert_eq!(stages(7, 4), vec![0..2, 2..4, 4..6, 6..7]);
        assert_eq!(stages(3, 3), vec![0..1, 1..2, 2..3]);
        assert_eq!(stages(6, 1), vec![0..6]);
    }

    proptest! {
        #[test]
        fn stages_cover_every_layer_once(l in 1u32..40, p in 1u32..10) {
            prop_assume!(p <= l);
            let layout = Layout::new(1, p, 1);
            let mut next = 0;
            for s in 0..p {
                let r = layout.stage_layers(l, s);
                prop_assert_eq!(r.start, next);
                prop_assert!(!r.is_empty());
                prop_assert!(r.len() as u32 <= l / p + 1);
                next = r.end;
            }
            prop_assert_eq!(next, l);
        }
    }

    proptest! {
        #[test]
        fn ranks_and_coords_are_a_bijection(tp in 1u32..5, pp in 1u32..5, dp in 1u32..5) {
            let l = Layout::new(tp, pp, dp);
            let mut seen = HashSet::new();
            for r in 0..l.world_size() {
                let c = l.coords(Rank(r)).unwrap();
                prop_assert_eq!(l.rank(c), Some(Rank(r)));
                prop_assert!(seen.insert((c.dp, c.pp, c.tp)));
            }
        }

        #[test]
        fn each_kind_of_group_partitions_the_world(tp in 1u32..5, pp in 1u32..5, dp in 1u32..5) {
            let l = Layout::new(tp, pp, dp);
            type GroupFn = fn(&Layout, Rank) -> Vec<Rank>;
            let kinds: [(GroupFn, u32); 3] =
                [(Layout::tp_group, tp), (Layout::pp_group, pp), (Layout::dp_group, dp)];
            for (group_of, size) in kinds {
                let mut groups = HashSet::new();
                for r in 0..l.world_size() {
                    let g = group_of(&l, Rank(r));
                    prop_assert_eq!(g.len() as u32, size);
                    prop_assert!(g.contains(&Rank(r)));
                    // Every member sees the same group.
                    for m in &g {
                        prop_assert_eq!(&group_of(&l, *m), &g);
                    }
                    groups.insert(g);
                }
                prop_assert_eq!(groups.len() as u32 * size, l.world_size());
            }
        }
    }
}
