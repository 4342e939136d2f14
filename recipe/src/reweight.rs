//! Loss-based sample reweighting (Sow et al., *Dynamic Loss-Based Sample
//! Reweighting for Improved Large Language Model Pretraining*, ICLR 2025).
//!
//! Each sequence's weight in the step's loss is a function of its own
//! mean token loss, normalized over a group of sequences. The functions
//! follow the authors' code (`h_func`, `f_func_*`, `g_func` of their
//! trainer):
//!
//! - the group's losses are mapped onto `[−δ, δ]`:
//!   `h = (2δ·L − δ·(L_max + L_min)) / max(L_max − L_min, 10⁻⁶)`;
//! - a strategy scores each: `linupper` `min(h + δ, δ)` (down-weights the
//!   lowest losses, the authors' best at 1.4B and 7B), `quadratic`
//!   `1 − h²/δ²` (favours the middle), `extremes` `|h|` (favours both
//!   ends);
//! - the scores become weights by a softmax at temperature `r` (their
//!   `kl_reg`): `w = exp((f − max f) / r) / Σ exp((f − max f) / r)`.
//!
//! strata applies `G · w`, so that uniform weights are 1 and the step's
//! loss keeps its scale: the gradient is that of
//! `Σᵢ mᵢ · (sequence i's summed token loss) / (step's tokens)`, the
//! multipliers `mᵢ` constants in the backward. A group is `group`
//! consecutive sequences of the global step, in data order: the same
//! sequences under any layout, so every layout trains the same model.

use serde::{Deserialize, Serialize};

/// How a group's losses become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every weight 1: the baseline, trained exactly as without
    /// reweighting.
    Uniform,
    /// `min(h + δ, δ)`: low-loss sequences count less.
    Linupper,
    /// `1 − h²/δ²`: the middle of the group counts most.
    Quadratic,
    /// `|h|`: the lowest and highest losses count most.
    Extremes,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Uniform,
        Strategy::Linupper,
        Strategy::Quadratic,
        Strategy::Extremes,
    ];

    /// Its name in a recipe.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Uniform => "uniform",
            Strategy::Linupper => "linupper",
            Strategy::Quadratic => "quadratic",
            Strategy::Extremes => "extremes",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.name() == s)
    }

    /// The score of a loss mapped onto `[−δ, δ]`.
    fn score(self, h: f64, delta: f64) -> f64 {
        match self {
            Strategy::Uniform => 0.0,
            Strategy::Linupper => (h + delta).min(delta),
            Strategy::Quadratic => 1.0 - h * h / (delta * delta),
            Strategy::Extremes => h.abs(),
        }
    }
}

/// `[data.reweighting]` once validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reweighting {
    pub strategy: Strategy,
    /// Sequences per normalization group, consecutive in the step's data
    /// order. Divides every microbatch's rows on every layout the recipe
    /// allows.
    pub group: u32,
    /// The softmax's temperature `r` (the authors' `kl_reg`): larger is
    /// closer to uniform.
    pub temperature: f64,
    /// The half-width `δ` of the interval the losses are mapped onto.
    pub delta: f64,
    /// Tokens trained with uniform weights first (the authors' warm-up,
    /// 1,000 steps in their runs): a model that has not yet learned the
    /// basics of language tells redundant sequences from hard ones badly.
    pub start_tokens: u64,
}

impl Reweighting {
    /// Whether the step that starts after `tokens_before` tokens is
    /// reweighted (past the warm-up, and not uniform).
    pub fn active_at(&self, tokens_before: u64) -> bool {
        self.strategy != Strategy::Uniform && tokens_before >= self.start_tokens
    }

    /// Each sequence's multiplier `G · wᵢ` from its mean token loss, for
    /// consecutive groups of [`Reweighting::group`] sequences (`losses`
    /// holds whole groups). Each group's multipliers average to 1.
    pub fn multipliers(&self, losses: &[f64]) -> Vec<f64> {
        let g = self.group as usize;
        assert!(
            g > 0 && losses.len().is_multiple_of(g),
            "{} sequences are not whole groups of {g}",
            losses.len()
        );
        let mut out = Vec::with_capacity(losses.len());
        for group in losses.chunks(g) {
            out.extend(self.group_multipliers(group));
        }
        out
    }

    fn group_multipliers(&self, losses: &[f64]) -> Vec<f64> {
        let n = losses.len() as f64;
        if self.strategy == Strategy::Uniform {
            return vec![1.0; losses.len()];
        }
        let (lo, hi) = losses
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &l| {
                (lo.min(l), hi.max(l))
            });
        let width = (hi - lo).max(1e-6);
        let d = self.delta;
        let scores: Vec<f64> = losses
            .iter()
            .map(|&l| {
                let h = 2.0 * d * l / width - d * (hi + lo) / width;
                self.strategy.score(h, d)
            })
            .collect();
        let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores
            .iter()
            .map(|s| ((s - top) / self.temperature).exp())
            .collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| n * x / sum).collect()
    }
}

/// The spread of a step's multipliers, from sums that add over ranks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WeightSpread {
    /// Sequences weighed.
    pub rows: u64,
    /// Σ mᵢ² over them.
    pub sum_sq: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for WeightSpread {
    /// No sequence weighed yet: what [`WeightSpread::push`] starts from.
    fn default() -> WeightSpread {
        WeightSpread {
            rows: 0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl WeightSpread {
    /// Counts one sequence's multiplier.
    pub fn push(&mut self, m: f64) {
        self.rows += 1;
        self.sum_sq += m * m;
        self.min = self.min.min(m);
        self.max = self.max.max(m);
    }

    /// The multipliers' standard deviation (their mean is 1).
    pub fn std(&self) -> f64 {
        if self.rows == 0 {
            return 0.0;
        }
        (self.sum_sq / self.rows as f64 - 1.0).max(0.0).sqrt()
    }

    /// Kish's effective sample size as a fraction of the sequences:
    /// `(Σm)² / (n·Σm²) = n / Σm²`; 1 when uniform.
    pub fn effective_fraction(&self) -> f64 {
        if self.sum_sq <= 0.0 {
            return 1.0;
        }
        self.rows as f64 / self.sum_sq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(strategy: Strategy, group: u32) -> Reweighting {
        Reweighting {
            strategy,
            group,
            temperature: 1.0,
            delta: 1.0,
            start_tokens: 0,
        }
    }

    #[test]
    fn each_group_averages_to_one_and_uniform_is_one() {
        let losses = [3.0, 2.0, 5.0, 4.0, 1.0, 1.5, 7.0, 2.5];
        for s in [Strategy::Linupper, Strategy::Quadratic, Strategy::Extremes] {
            let m = rw(s, 4).multipliers(&losses);
            for g in m.chunks(4) {
                assert!((g.iter().sum::<f64>() - 4.0).abs() < 1e-12, "{s:?}: {g:?}");
            }
        }
        assert_eq!(rw(Strategy::Uniform, 4).multipliers(&losses), vec![1.0; 8]);
    }

    #[test]
    fn linupper_mutes_the_lowest_losses_and_keeps_the_rest_equal() {
        // h = -1, -1/3, 1/3, 1: scores 0, 2/3, 1, 1.
        let m = rw(Strategy::Linupper, 4).multipliers(&[1.0, 2.0, 3.0, 4.0]);
        let e = [(-1.0f64).exp(), (-1.0f64 / 3.0).exp(), 1.0, 1.0];
        let s: f64 = e.iter().sum();
        for (a, b) in m.iter().zip(e) {
            assert!((a - 4.0 * b / s).abs() < 1e-12, "{m:?}");
        }
        assert!(m[0] < m[1] && m[1] < m[2] && m[2] == m[3]);
    }

    #[test]
    fn equal_losses_weigh_equally() {
        for s in [Strategy::Linupper, Strategy::Quadratic, Strategy::Extremes] {
            assert_eq!(rw(s, 3).multipliers(&[2.5, 2.5, 2.5]), vec![1.0; 3]);
        }
    }

    #[test]
    fn spread_of_uniform_weights_is_nil() {
        let s = WeightSpread {
            rows: 8,
            sum_sq: 8.0,
            min: 1.0,
            max: 1.0,
        };
        assert_eq!(s.std(), 0.0);
        assert_eq!(s.effective_fraction(), 1.0);
    }
}
