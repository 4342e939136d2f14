//! The recipes shipped in `examples/` and the README's set-up commands stay
//! true to the code.

use strata_recipe::Recipe;
use strata_recipe::plan::Plan;
use strata_tests::{example_recipes, readme_commands, repo_root};

#[test]
fn every_example_recipe_is_valid_and_plans() {
    let paths = example_recipes();
    assert!(
        paths.len() >= 2,
        "examples/ holds the tiny CPU and the 1B recipes"
    );
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let stem = path.file_stem().unwrap().to_string_lossy();
        let recipe = Recipe::from_toml_str(&text, &stem)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            recipe.name,
            stem,
            "{}: name matches the file",
            path.display()
        );
        let plan = Plan::new(&recipe);
        assert!(plan.n_steps > 0);
        assert_eq!(plan.total_tokens, plan.n_steps * plan.tokens_per_step);
        assert!(plan.schedule.first_step_lr > 0.0, "{}", path.display());
    }
}

#[test]
fn the_tiny_cpu_example_fits_two_cpu_processes() {
    let text = std::fs::read_to_string(repo_root().join("examples/tiny-cpu.toml")).unwrap();
    let r = Recipe::from_toml_str(&text, "tiny-cpu").unwrap();
    assert_eq!(r.parallel.layout.world_size(), 2);
    assert!(
        r.model.total_params() < 20_000_000,
        "small enough for a CPU"
    );
}

#[test]
fn the_1b_example_is_1b_scale() {
    let text = std::fs::read_to_string(repo_root().join("examples/llama-1b.toml")).unwrap();
    let r = Recipe::from_toml_str(&text, "llama-1b").unwrap();
    let total = r.model.total_params();
    assert!((1_000_000_000..1_500_000_000).contains(&total), "{total}");
}

#[test]
fn the_readme_gives_exactly_two_setup_commands_and_they_name_real_files() {
    let commands = readme_commands();
    let setup: Vec<&String> = commands.iter().take(2).collect();
    assert_eq!(setup.len(), 2, "README: {commands:?}");
    // The main job is the demo on the embedded defaults; the tests run what
    // .ci/run runs.
    assert_eq!(setup[0], "cargo run --release -p strata-cli -- demo");
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    assert!(
        ci.contains(setup[1].as_str()),
        ".ci/run must run `{}`",
        setup[1]
    );
}

/// Every sweep in `examples/sweeps/` expands into valid jobs.
#[test]
fn every_example_sweep_expands() {
    let dir = repo_root().join("examples/sweeps");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let base = strata_sweep::spec::base_path(&text).unwrap().unwrap();
        let base_text = std::fs::read_to_string(dir.join(&base)).unwrap();
        let inlined = strata_sweep::spec::inline_base(&text, &base_text, &base).unwrap();
        let plan = strata_sweep::spec::expand(&inlined)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(plan.points.len(), 9, "{}", path.display());
        n += 1;
    }
    assert_eq!(n, 2);
}
