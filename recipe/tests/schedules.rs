//! Learning-rate schedules: values at phase boundaries, continuity, and
//! properties over arbitrary parameters.

use proptest::prelude::*;
use strata_recipe::{Decay, DecayShape, PowerLaw, Schedule, ScheduleKind};

const SHAPES: [DecayShape; 4] = [
    DecayShape::Linear,
    DecayShape::Cosine,
    DecayShape::OneMinusSqrt,
    DecayShape::Exponential,
];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1e-300)
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!(close(a, b), "{what}: {a} != {b}");
}

fn sched(warmup: u64, total: u64, kind: ScheduleKind) -> Schedule {
    Schedule {
        warmup_tokens: warmup,
        total_tokens: total,
        kind,
    }
}

fn wsd(
    peak: f64,
    warmup: u64,
    total: u64,
    decay_tokens: u64,
    shape: DecayShape,
    f: f64,
) -> Schedule {
    sched(
        warmup,
        total,
        ScheduleKind::Wsd {
            peak_lr: peak,
            decay: Decay {
                start_tokens: total - decay_tokens,
                tokens: decay_tokens,
                shape,
                final_lr_fraction: f,
            },
        },
    )
}

/// The LR just before and at `n` differ by at most `tol` of the peak.
fn continuous_at(s: &Schedule, n: u64, tol: f64) {
    let (a, b) = (s.lr_at(n - 1), s.lr_at(n));
    assert!(
        (a - b).abs() <= tol * s.max_lr(),
        "{} jumps at {n}: {a} -> {b}",
        s.name()
    );
}

#[test]
fn warmup_is_linear_from_zero_and_the_first_step_is_not_zero() {
    let s = sched(1000, 10_000, ScheduleKind::Constant { peak_lr: 1e-3 });
    assert_eq!(s.lr_at(0), 0.0);
    assert_close(s.lr_at(250), 2.5e-4, "quarter warmup");
    assert_close(s.lr_at(500), 5e-4, "half warmup");
    assert_eq!(s.lr_at(1000), 1e-3);
    assert_eq!(s.lr_at(9000), 1e-3);
    // A step's LR is the schedule at the tokens seen at the end of the step.
    assert_close(s.lr_for_step(0, 100), 1e-4, "first step");
    assert_close(s.lr_for_step(100, 100), 2e-4, "second step");
}

#[test]
fn constant_without_warmup_starts_at_the_peak() {
    let s = sched(0, 10_000, ScheduleKind::Constant { peak_lr: 1e-3 });
    assert_eq!(s.lr_at(0), 1e-3);
    assert_eq!(s.lr_for_step(0, 10), 1e-3);
}

#[test]
fn cosine_reaches_its_floor_at_the_end() {
    let s = sched(
        1000,
        11_000,
        ScheduleKind::Cosine {
            peak_lr: 1e-3,
            final_lr_fraction: 0.1,
        },
    );
    assert_eq!(s.lr_at(1000), 1e-3);
    assert_close(s.lr_at(6000), 1e-3 * (0.1 + 0.9 * 0.5), "midpoint");
    assert_close(s.lr_at(11_000), 1e-4, "end");
    // Past the end it stays at the floor.
    assert_close(s.lr_at(20_000), 1e-4, "after");
    continuous_at(&s, 1000, 1e-3);
}

#[test]
fn inverse_sqrt_halves_at_four_times_the_warmup() {
    let s = sched(1000, 100_000, ScheduleKind::InverseSqrt { peak_lr: 1e-3 });
    assert_eq!(s.lr_at(1000), 1e-3);
    assert_close(s.lr_at(4000), 5e-4, "4× warmup");
    assert_close(s.lr_at(100_000), 1e-4, "100× warmup");
    continuous_at(&s, 1000, 1e-3);
}

#[test]
fn wsd_decay_shapes_match_their_formulas() {
    let (peak, f) = (2e-3, 0.1);
    for shape in SHAPES {
        let s = wsd(peak, 1000, 11_000, 4000, shape, f);
        // Stable until the decay starts, then the shape, then the floor.
        assert_eq!(s.lr_at(1000), peak);
        assert_eq!(s.lr_at(7000), peak, "{shape:?} at decay start");
        assert_close(s.lr_at(11_000), f * peak, &format!("{shape:?} at end"));
        let p: f64 = 0.25;
        let expected = match shape {
            DecayShape::Linear => 1.0 - (1.0 - f) * p,
            DecayShape::Cosine => f + (1.0 - f) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0,
            DecayShape::OneMinusSqrt => f + (1.0 - f) * (1.0 - p.sqrt()),
            DecayShape::Exponential => {
                let e = std::f64::consts::E;
                ((1.0 - f) * e / (e - 1.0)) * (-p).exp() + (f * e - 1.0) / (e - 1.0)
            }
        };
        assert_close(
            s.lr_at(8000),
            peak * expected,
            &format!("{shape:?} at p = 0.25"),
        );
        for n in [1000, 7000, 11_000] {
            continuous_at(&s, n, 1e-3);
        }
    }
}

#[test]
fn one_minus_sqrt_is_halfway_at_a_quarter() {
    let s = wsd(1.0, 0, 100, 100, DecayShape::OneMinusSqrt, 0.0);
    assert_close(s.lr_at(25), 0.5, "1 - sqrt(1/4)");
}

#[test]
fn exponential_decay_runs_from_one_to_the_final_fraction() {
    for f in [0.0, 0.1, 0.5, 1.0] {
        assert_close(DecayShape::Exponential.factor(0.0, f), 1.0, "p = 0");
        assert!(
            (DecayShape::Exponential.factor(1.0, f) - f).abs() < 1e-15,
            "p = 1, f = {f}"
        );
    }
}

#[test]
fn a_cooldown_can_start_anywhere_after_warmup() {
    // The branch of a WSD run from its stable-phase checkpoint at 50k tokens.
    let s = sched(
        1000,
        60_000,
        ScheduleKind::Wsd {
            peak_lr: 1e-3,
            decay: Decay {
                start_tokens: 50_000,
                tokens: 10_000,
                shape: DecayShape::Linear,
                final_lr_fraction: 0.0,
            },
        },
    );
    assert_eq!(s.lr_at(50_000), 1e-3);
    assert_close(s.lr_at(55_000), 5e-4, "half-way through the cooldown");
    assert_eq!(s.lr_at(60_000), 0.0);
    let names: Vec<&str> = s.phases().iter().map(|p| p.name).collect();
    assert_eq!(names, ["warmup", "stable", "decay"]);
}

#[test]
fn a_decay_that_ends_early_leaves_a_floor_phase() {
    let s = sched(
        0,
        100,
        ScheduleKind::Wsd {
            peak_lr: 1.0,
            decay: Decay {
                start_tokens: 50,
                tokens: 20,
                shape: DecayShape::Linear,
                final_lr_fraction: 0.2,
            },
        },
    );
    assert_close(s.lr_at(90), 0.2, "floor");
    let names: Vec<&str> = s.phases().iter().map(|p| p.name).collect();
    assert_eq!(names, ["stable", "decay", "floor"]);
}

fn power(warmup: u64, total: u64, decay_tokens: u64, beta: f64) -> Schedule {
    sched(
        warmup,
        total,
        ScheduleKind::Power {
            law: PowerLaw {
                a: 4.0,
                b: -0.51,
                lr_max: 0.02,
                batch_sequences: beta,
            },
            decay: Decay {
                start_tokens: total - decay_tokens,
                tokens: decay_tokens,
                shape: DecayShape::Exponential,
                final_lr_fraction: 0.0,
            },
        },
    )
}

#[test]
fn power_follows_its_law_between_warmup_and_decay() {
    let (nw, total, nd, beta) = (
        1_000_000_000u64,
        100_000_000_000u64,
        10_000_000_000u64,
        256.0,
    );
    let s = power(nw, total, nd, beta);
    let law = |n: f64| (beta * 4.0 * n.powf(-0.51)).min(0.02);
    // Warmup is linear to η_power(N_w).
    assert_close(s.lr_at(nw), law(nw as f64), "end of warmup");
    assert_close(s.lr_at(nw / 2), law(nw as f64) / 2.0, "half warmup");
    // The law itself: 256·4·(1e10)^−0.51.
    assert_close(
        s.lr_at(10_000_000_000),
        1024.0 * 1e10f64.powf(-0.51),
        "at 1e10",
    );
    // The decay starts from η_power(N − N_d) and ends at 0.
    let start = total - nd;
    assert_close(s.lr_at(start), law(start as f64), "decay start");
    assert!(s.lr_at(total).abs() < 1e-18);
    for n in [nw, start] {
        continuous_at(&s, n, 1e-6);
    }
}

#[test]
fn power_is_capped_at_lr_max() {
    // β·a·n^b exceeds lr_max early on: the cap binds.
    let s = power(0, 1_000_000_000, 0, 1024.0);
    assert_eq!(s.lr_at(1000), 0.02);
    assert_eq!(s.max_lr(), 0.02);
    // Without a decay, the last token still follows the law.
    let n = 1_000_000_000f64;
    assert_close(
        s.lr_at(1_000_000_000),
        (1024.0 * 4.0 * n.powf(-0.51)).min(0.02),
        "end",
    );
}

#[derive(Debug, Clone)]
struct Case {
    schedule: Schedule,
    peak: f64,
}

fn any_schedule() -> impl Strategy<Value = Case> {
    (
        0usize..5,
        1e-5f64..1e-1,
        0.0f64..=1.0,
        prop::sample::select(SHAPES.to_vec()),
        1_000u64..10_000_000_000,
        0.0f64..0.5,
        0.0f64..0.5,
        1.0f64..4096.0,
    )
        .prop_map(|(kind, peak, f, shape, total, w_frac, d_frac, beta)| {
            let warmup = ((total as f64 * w_frac) as u64).max(1);
            let decay_tokens = ((total as f64 * d_frac) as u64).max(1);
            let decay = Decay {
                start_tokens: total - decay_tokens,
                tokens: decay_tokens,
                shape,
                final_lr_fraction: f,
            };
            let kind = match kind {
                0 => ScheduleKind::Constant { peak_lr: peak },
                1 => ScheduleKind::Cosine {
                    peak_lr: peak,
                    final_lr_fraction: f,
                },
                2 => ScheduleKind::InverseSqrt { peak_lr: peak },
                3 => ScheduleKind::Wsd {
                    peak_lr: peak,
                    decay,
                },
                _ => ScheduleKind::Power {
                    law: PowerLaw {
                        a: 4.0,
                        b: -0.51,
                        lr_max: peak * 10.0,
                        batch_sequences: beta,
                    },
                    decay,
                },
            };
            let schedule = Schedule {
                warmup_tokens: warmup,
                total_tokens: total,
                kind,
            };
            Case {
                peak: schedule.max_lr(),
                schedule,
            }
        })
}

proptest! {
    #[test]
    fn lr_is_finite_non_negative_and_capped(case in any_schedule(), x in 0.0f64..1.2) {
        let s = &case.schedule;
        let n = (s.total_tokens as f64 * x) as u64;
        let lr = s.lr_at(n);
        prop_assert!(lr.is_finite());
        prop_assert!(lr >= -1e-18 * case.peak, "{lr} at {n}");
        prop_assert!(lr <= case.peak * (1.0 + 1e-12), "{lr} > {} at {n}", case.peak);
        if let ScheduleKind::Power { law, .. } = &s.kind {
            prop_assert!(lr <= law.lr_max);
        }
    }

    #[test]
    fn warmup_rises_and_everything_after_it_never_rises(case in any_schedule(), a in 0.0f64..1.0, b in 0.0f64..1.0) {
        let s = &case.schedule;
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let nw = s.warmup_tokens as f64;
        // Inside the warmup: non-decreasing.
        let (w1, w2) = ((nw * lo) as u64, (nw * hi) as u64);
        prop_assert!(s.lr_at(w1) <= s.lr_at(w2) * (1.0 + 1e-12));
        // After it: non-increasing (constant, stable, decays and the power law).
        let span = s.total_tokens as f64 - nw;
        let (n1, n2) = ((nw + span * lo) as u64, (nw + span * hi) as u64);
        prop_assert!(
            s.lr_at(n2) <= s.lr_at(n1) * (1.0 + 1e-12),
            "{} rises from {} at {n1} to {} at {n2}", s.name(), s.lr_at(n1), s.lr_at(n2)
        );
    }

    #[test]
    fn no_schedule_jumps_at_a_phase_boundary(case in any_schedule()) {
        let s = &case.schedule;
        for phase in s.phases() {
            for n in [phase.start_tokens, phase.end_tokens] {
                if n == 0 { continue; }
                // One token moves the LR by at most a step of the steepest
                // piece: the warmup's slope, or a decay's over its length.
                let steepest = 1.0 / (s.warmup_tokens.min(
                    s.decay().map_or(u64::MAX, |d| d.tokens)).max(1) as f64);
                let jump = (s.lr_at(n) - s.lr_at(n - 1)).abs();
                prop_assert!(
                    jump <= case.peak * (4.0 * steepest + 1e-9),
                    "{} jumps by {jump} at {n} ({})", s.name(), phase.name
                );
            }
        }
    }

    #[test]
    fn decays_end_at_their_final_fraction(case in any_schedule()) {
        let s = &case.schedule;
        if let Some(d) = s.decay() {
            let at_start = s.lr_at(d.start_tokens);
            let at_end = s.lr_at(d.end_tokens());
            prop_assert!((at_end - at_start * d.final_lr_fraction).abs() <= 1e-12 * at_start.max(1e-300));
        }
    }
}
