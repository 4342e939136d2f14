//! Sweep files expanded into validated points.

use strata_recipe::Recipe;
use strata_sweep::spec::{PointKind, expand, inline_base};

const BASE: &str = include_str!("../../examples/tiny-cpu.toml");

fn sweep(body: &str) -> String {
    inline_base(
        &format!("name = \"sw\"\nbase = \"tiny.toml\"\n{body}"),
        BASE,
        "tiny.toml",
    )
    .unwrap()
}

fn recipe(text: &str) -> Recipe {
    Recipe::from_toml_str(text, "t").unwrap()
}

#[test]
fn a_grid_is_every_combination_size_first() {
    let plan = expand(&sweep(
        r#"
max_concurrent = 2
[sizes]
s = { n_layers = 2, d_model = 64, n_heads = 2, n_kv_heads = 2, d_ffn = 192 }
[grid]
lr = [1e-3, 3e-3, 1e-2]
size = ["s", "2x128"]
"#,
    ))
    .unwrap();
    assert_eq!(plan.max_concurrent, 2);
    let labels: Vec<&str> = plan.points.iter().map(|p| p.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "size=s lr=0.001",
            "size=s lr=0.003",
            "size=s lr=0.01",
            "size=2x128 lr=0.001",
            "size=2x128 lr=0.003",
            "size=2x128 lr=0.01",
        ]
    );
    let p = &plan.points[4];
    assert_eq!(p.name, "sw-2x128-0.003");
    assert_eq!(p.kind, PointKind::Run);
    let r = recipe(&p.recipe);
    assert_eq!(r.name, "sw-2x128-0.003");
    assert_eq!(r.schedule.max_lr(), 3e-3);
    assert_eq!(
        (
            r.model.n_layers,
            r.model.d_model,
            r.model.n_heads,
            r.model.d_ffn
        ),
        (2, 128, 2, 384)
    );
    // What the size does not say stays the base's.
    assert_eq!(r.model.max_seq_len, 256);
    assert_eq!(recipe(&plan.points[0].recipe).model.d_model, 64);
}

#[test]
fn a_branch_sweep_keeps_its_branch_points_and_branches_from_them() {
    let plan = expand(&sweep(
        r#"
[grid]
size = ["2x64", "2x128"]
[branches]
fractions = [0.25, 0.5, 1.0]
cooldown = 0.2
decay_shape = "linear"
"#,
    ))
    .unwrap();
    // Per size: the stable run (fraction 1), then its two branches.
    assert_eq!(plan.points.len(), 6);
    let stable = &plan.points[3];
    assert_eq!(stable.kind, PointKind::Stable);
    assert_eq!(stable.label, "size=2x128 fraction=1");
    let r = recipe(&stable.recipe);
    let n = r.data.n_steps();
    assert_eq!(n, 300);
    // Its own cooldown over the last 20%: 60 steps.
    let decay = r.schedule.decay().unwrap();
    assert_eq!(decay.tokens, 60 * 8192);
    assert_eq!(decay.start_tokens, 240 * 8192);
    // 0.25 of 300 steps = 75, its last 15 a cooldown from step 60; 0.5:
    // 150 steps from step 120.
    assert_eq!(r.checkpoint.as_ref().unwrap().keep_steps, [60, 120]);
    for (p, from, steps) in [(&plan.points[4], 60, 75), (&plan.points[5], 120, 150)] {
        let PointKind::Branch {
            stable,
            from_step,
            decay,
        } = &p.kind
        else {
            panic!("{p:?}")
        };
        assert_eq!((*stable, *from_step), (3, from));
        assert_eq!(decay.start_tokens, from * 8192);
        let b = recipe(&p.recipe);
        assert_eq!(b.data.n_steps(), steps, "{}", p.label);
        assert_eq!(b.schedule.decay().unwrap().start_tokens, from * 8192);
        assert!(b.checkpoint.unwrap().keep_steps.is_empty());
        assert_eq!(p.name, format!("sw-2x128-f{}", p.fraction.unwrap()));
    }
}

fn refused(body: &str) -> String {
    expand(&sweep(body)).unwrap_err().to_string()
}

#[test]
fn an_invalid_point_is_named_with_its_field() {
    let e = refused(
        r#"
[sizes]
odd = { d_model = 96, n_heads = 5 }
[grid]
size = ["2x64", "odd"]
lr = [1e-3, 2e-3]
"#,
    );
    assert!(
        e.contains(
            "point 3 (size=odd lr=0.001): model.d_model: 96 is not divisible by model.n_heads = 5"
        ),
        "{e}"
    );
    assert!(e.contains("point 4 (size=odd lr=0.002): model."), "{e}");
    assert!(!e.contains("size=2x64"), "{e}");

    let e = refused("[grid]\n\"optimizer.lrr\" = [1e-3]\n");
    assert!(
        e.contains("point 1 (optimizer.lrr=0.001): optimizer.lrr"),
        "{e}"
    );
    let e = refused("[grid]\nsize = [\"tiny\"]\n");
    assert!(e.contains("grid.size[0]: \"tiny\" is neither"), "{e}");
    let e = refused("[grid]\nlr = []\n");
    assert!(e.contains("grid.lr: has no values"), "{e}");
    let e = refused("max_concurrent = 0\n");
    assert!(e.contains("max_concurrent: must be 1 or more"), "{e}");
    let e = expand("name = \"x\"\nbase = \"b.toml\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("base: the base recipe b.toml was not inlined"),
        "{e}"
    );
    let e = expand("name = \"x\"\nbogus = 1\n").unwrap_err().to_string();
    assert!(e.contains("sweep: unknown field `bogus`"), "{e}");
}

#[test]
fn a_branch_sweep_refuses_what_cannot_branch() {
    let e = refused("[branches]\nfractions = [0.05, 0.5, 0.5, 1.5]\n");
    assert!(
        e.contains("branches.fractions[0]") && e.contains("inside the warmup"),
        "{e}"
    );
    assert!(
        e.contains("branches.fractions[2]: branches at step 120 like fractions[1]"),
        "{e}"
    );
    assert!(
        e.contains("branches.fractions[3]: must be in (0, 1]"),
        "{e}"
    );
    let e = refused(
        "[grid]\nschedule = [{ kind = \"cosine\", warmup_tokens = 8192 }]\n[branches]\nfractions = [0.5]\n",
    );
    assert!(e.contains("schedule.kind: cosine"), "{e}");
    let e = refused("[branches]\nfractions = [0.5]\ncooldown = 1.0\n");
    assert!(e.contains("branches.cooldown: must be in (0, 1)"), "{e}");
}

mod adversarial {
    //! Sweep files come from users: any text expands to points or to an
    //! error, never a panic, and never more than `MAX_POINTS` points.
    use super::*;
    use proptest::prelude::*;

    const GRID: &str = "max_concurrent = 2\n[grid]\nlr = [1e-3, 3e-3]\nseed = [1, 2, 3]\n";

    /// `body` under the usual header with the base inlined, or its error.
    fn try_sweep(body: &str) -> Result<strata_sweep::spec::Plan, strata_sweep::spec::SweepError> {
        let text = inline_base(
            &format!("name = \"sw\"\nbase = \"tiny.toml\"\n{body}"),
            BASE,
            "tiny.toml",
        )?;
        expand(&text)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_text_expands_or_is_refused(text in "\\PC{0,300}") {
            let _ = expand(&text);
            let _ = try_sweep(&text);
        }

        /// The grid sweep with one byte changed, or cut short.
        #[test]
        fn damaged_sweeps_expand_or_are_refused(cut in 0usize..GRID.len(), byte in any::<u8>()) {
            let mut b = GRID.as_bytes().to_vec();
            b[cut] = byte;
            if let Ok(body) = std::str::from_utf8(&b) {
                let _ = try_sweep(body);
            }
            let _ = try_sweep(&GRID[..GRID.floor_char_boundary(cut)]);
        }

        /// Axes whose product is past the cap are refused before any
        /// point is made.
        #[test]
        fn huge_grids_are_refused(n in 101usize..400) {
            let seeds: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let lrs: Vec<String> = (0..n).map(|i| format!("{}e-5", i + 1)).collect();
            let body = format!("[grid]\nseed = [{}]\nlr = [{}]\n", seeds.join(", "), lrs.join(", "));
            let Err(e) = try_sweep(&body) else {
                return Err(TestCaseError::fail("a grid past the cap was expanded"));
            };
            prop_assert!(e.to_string().contains("points"), "{e}");
        }
    }
}
