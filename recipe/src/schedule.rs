//! Learning-rate schedules as pure functions of tokens seen.
//!
//! Every schedule is a function of tokens seen `n`, never of the step index,
//! so that variable batch sizes (dataset decomposition) and a resume with a
//! different batch size keep the curve the recipe asked for. The learning rate
//! used for a step is the schedule evaluated at the tokens seen at the *end*
//! of that step ([`Schedule::lr_for_step`]), so the first step never gets 0.

use std::f64::consts::{E, PI};

use serde::{Deserialize, Serialize};

/// The shape of a decay phase, as a multiplier of the LR at the decay's start.
///
/// With progress `p ∈ [0, 1]` and final fraction `f`:
/// - linear: `1 − (1−f)·p`
/// - cosine: `f + (1−f)·(1 + cos πp)/2`
/// - one_minus_sqrt: `f + (1−f)·(1 − √p)` (Hägele et al. 2024)
/// - exponential: `((1−f)e/(e−1))·e^(−p) + (fe−1)/(e−1)`, 1 at p = 0 and f at
///   p = 1; the Power scheduler's reference implementation uses this form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayShape {
    Linear,
    Cosine,
    #[serde(alias = "1-sqrt")]
    OneMinusSqrt,
    Exponential,
}

impl DecayShape {
    pub fn name(self) -> &'static str {
        match self {
            DecayShape::Linear => "linear",
            DecayShape::Cosine => "cosine",
            DecayShape::OneMinusSqrt => "one_minus_sqrt",
            DecayShape::Exponential => "exponential",
        }
    }

    /// The multiplier at progress `p` (clamped to [0, 1]) towards `final_fraction`.
    pub fn factor(self, p: f64, final_fraction: f64) -> f64 {
        let p = p.clamp(0.0, 1.0);
        let f = final_fraction;
        match self {
            DecayShape::Linear => 1.0 - (1.0 - f) * p,
            DecayShape::Cosine => f + (1.0 - f) * (1.0 + (PI * p).cos()) / 2.0,
            DecayShape::OneMinusSqrt => f + (1.0 - f) * (1.0 - p.sqrt()),
            DecayShape::Exponential => {
                ((1.0 - f) * E / (E - 1.0)) * (-p).exp() + (f * E - 1.0) / (E - 1.0)
            }
        }
    }
}

/// A decay phase: from `start_tokens` over `tokens`, of `shape`, down to
/// `final_lr_fraction` of the LR at its start.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decay {
    pub start_tokens: u64,
    pub tokens: u64,
    pub shape: DecayShape,
    pub final_lr_fraction: f64,
}

impl Decay {
    pub fn end_tokens(&self) -> u64 {
        self.start_tokens + self.tokens
    }

    fn factor_at(&self, n: f64) -> f64 {
        // A zero-length decay is no decay (the power schedule allows it).
        if self.tokens == 0 {
            return 1.0;
        }
        let p = (n - self.start_tokens as f64) / self.tokens as f64;
        self.shape.factor(p, self.final_lr_fraction)
    }
}

/// The Power scheduler's law (Shen et al. 2024, Eq. 7–8):
/// `η_power(n) = min(lr_max, β·a·n^b)` with β the batch size in sequences.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerLaw {
    pub a: f64,
    pub b: f64,
    pub lr_max: f64,
    pub batch_sequences: f64,
}

impl PowerLaw {
    pub fn lr(&self, n: f64) -> f64 {
        if n <= 0.0 {
            return self.lr_max;
        }
        (self.batch_sequences * self.a * n.powf(self.b)).min(self.lr_max)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant {
        peak_lr: f64,
    },
    /// Cosine from the peak at the end of warmup to `final_lr_fraction`·peak
    /// at the end of the run.
    Cosine {
        peak_lr: f64,
        final_lr_fraction: f64,
    },
    /// `peak·√(warmup_tokens / n)` after warmup.
    InverseSqrt {
        peak_lr: f64,
    },
    /// Warmup, stable at the peak, then the decay.
    Wsd {
        peak_lr: f64,
        decay: Decay,
    },
    /// Warmup to `η_power(N_w)`, then `η_power(n)`, then the decay applied to
    /// `η_power(decay start)`.
    Power {
        law: PowerLaw,
        decay: Decay,
    },
}

/// A resolved schedule: a pure function from tokens seen to learning rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub warmup_tokens: u64,
    pub total_tokens: u64,
    #[serde(flatten)]
    pub kind: ScheduleKind,
}

/// A named span of the schedule, for previews and plots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub start_tokens: u64,
    pub end_tokens: u64,
}

impl Schedule {
    /// The learning rate after `tokens_seen` tokens.
    pub fn lr_at(&self, tokens_seen: u64) -> f64 {
        self.lr_at_f64(tokens_seen as f64)
    }

    /// The learning rate of a step that starts with `tokens_before` tokens seen
    /// and trains on `step_tokens`: the schedule at the end of the step.
    pub fn lr_for_step(&self, tokens_before: u64, step_tokens: u64) -> f64 {
        self.lr_at(tokens_before + step_tokens)
    }

    /// The same as [`Schedule::lr_at`] on a real-valued token count (for plots).
    pub fn lr_at_f64(&self, n: f64) -> f64 {
        let n = n.max(0.0);
        let nw = self.warmup_tokens as f64;
        let in_warmup = n < nw;
        let warm = |target: f64| target * n / nw;
        match &self.kind {
            ScheduleKind::Constant { peak_lr } => {
                if in_warmup {
                    warm(*peak_lr)
                } else {
                    *peak_lr
                }
            }
            ScheduleKind::Cosine {
                peak_lr,
                final_lr_fraction,
            } => {
                if in_warmup {
                    return warm(*peak_lr);
                }
                let span = self.total_tokens as f64 - nw;
                let p = if span > 0.0 { (n - nw) / span } else { 1.0 };
                peak_lr * DecayShape::Cosine.factor(p, *final_lr_fraction)
            }
            ScheduleKind::InverseSqrt { peak_lr } => {
                if in_warmup {
                    warm(*peak_lr)
                } else {
                    peak_lr * (nw / n).sqrt()
                }
            }
            ScheduleKind::Wsd { peak_lr, decay } => {
                if in_warmup {
                    warm(*peak_lr)
                } else {
                    peak_lr * decay.factor_at(n)
                }
            }
            ScheduleKind::Power { law, decay } => {
                if in_warmup {
                    warm(law.lr(nw))
                } else if n < decay.start_tokens as f64 {
                    law.lr(n)
                } else {
                    law.lr(decay.start_tokens as f64) * decay.factor_at(n)
                }
            }
        }
    }

    /// The highest LR the schedule can reach: the peak, or for `power` the
    /// largest of its warmup target and `lr_max`'s cap.
    pub fn max_lr(&self) -> f64 {
        match &self.kind {
            ScheduleKind::Constant { peak_lr }
            | ScheduleKind::Cosine { peak_lr, .. }
            | ScheduleKind::InverseSqrt { peak_lr }
            | ScheduleKind::Wsd { peak_lr, .. } => *peak_lr,
            ScheduleKind::Power { law, .. } => law.lr(self.warmup_tokens.max(1) as f64),
        }
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            ScheduleKind::Constant { .. } => "constant",
            ScheduleKind::Cosine { .. } => "cosine",
            ScheduleKind::InverseSqrt { .. } => "inverse_sqrt",
            ScheduleKind::Wsd { .. } => "wsd",
            ScheduleKind::Power { .. } => "power",
        }
    }

    pub fn decay(&self) -> Option<&Decay> {
        match &self.kind {
            ScheduleKind::Wsd { decay, .. } | ScheduleKind::Power { decay, .. } => Some(decay),
            _ => None,
        }
    }

    /// The schedule's phases in order, covering `[0, total_tokens]`.
    pub fn phases(&self) -> Vec<Phase> {
        let total = self.total_tokens;
        let warm_end = self.warmup_tokens.min(total);
        let mut phases = Vec::new();
        if warm_end > 0 {
            phases.push(Phase {
                name: "warmup",
                start_tokens: 0,
                end_tokens: warm_end,
            });
        }
        let main = match self.kind {
            ScheduleKind::Constant { .. } => "constant",
            ScheduleKind::Cosine { .. } => "cosine decay",
            ScheduleKind::InverseSqrt { .. } => "inverse sqrt",
            ScheduleKind::Wsd { .. } => "stable",
            ScheduleKind::Power { .. } => "power",
        };
        match self.decay() {
            Some(decay) => {
                let start = decay.start_tokens.clamp(warm_end, total);
                let end = decay.end_tokens().min(total);
                if start > warm_end {
                    phases.push(Phase {
                        name: main,
                        start_tokens: warm_end,
                        end_tokens: start,
                    });
                }
                if end > start {
                    phases.push(Phase {
                        name: "decay",
                        start_tokens: start,
                        end_tokens: end,
                    });
                }
                if total > end {
                    phases.push(Phase {
                        name: "floor",
                        start_tokens: end,
                        end_tokens: total,
                    });
                }
            }
            None if total > warm_end => phases.push(Phase {
                name: main,
                start_tokens: warm_end,
                end_tokens: total,
            }),
            None => {}
        }
        phases
    }
}
