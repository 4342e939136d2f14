//! The Python side of the tests: reference implementations (transformers,
//! datasets' writers, TensorBoard's reader) run as scripts under
//! `scripts/`, each printing one JSON line.

use std::ffi::OsStr;
use std::process::Command;

/// Whether python3 can import every module of `modules` (space
/// separated, as pip names them). Without them the caller's Python side
/// is skipped, saying so, unless `require` (an environment variable's
/// name, which `.ci/run` sets) is set: then it is a failure.
pub fn has(modules: &str, require: &str) -> bool {
    let import = format!(
        "import {}",
        modules.split_whitespace().collect::<Vec<_>>().join(", ")
    );
    let ok = Command::new("python3")
        .args(["-c", &import])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os(require).is_none(),
            "{require} is set and python3 cannot {import}"
        );
        eprintln!("SKIPPED (the Python side): python3 cannot {import} (pip install {modules})");
    }
    ok
}

/// `scripts/SCRIPT` run with `args`: its last line of output, as JSON.
pub fn script_json<S: AsRef<OsStr>>(script: &str, args: &[S]) -> serde_json::Value {
    let path = crate::repo_root().join("scripts").join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("python3 {script}: {e}"));
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script}: {e}: {text}"))
}
