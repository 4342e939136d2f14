//! The trainer on burn's wgpu backend, through real jobs: where wgpu finds
//! an adapter (a GPU, or a CPU through Mesa's software Vulkan, which CI
//! installs) a 20-step job under (1,1,1) and (1,1,2) reports the CPU
//! backend's losses within 1e-4, and `strata bench train` at 2,048 and
//! 8,192 tokens a sequence holds the device's memory within the plan. Without an
//! adapter, or in a build without the `wgpu` feature, it says it was
//! skipped, unless `STRATA_REQUIRE_WGPU` is set (then it fails).

mod common;

#[cfg(feature = "wgpu")]
use common::*;
#[cfg(feature = "wgpu")]
use strata_proto::v1 as pb;

const REQUIRE: &str = "STRATA_REQUIRE_WGPU";

#[cfg(not(feature = "wgpu"))]
#[test]
fn a_job_on_wgpu_trains_as_on_the_cpu() {
    assert!(
        std::env::var_os(REQUIRE).is_none(),
        "{REQUIRE} is set and this build has no wgpu feature"
    );
    eprintln!("SKIPPED: built without the wgpu feature (--features strata-cli/wgpu)");
}

#[cfg(feature = "wgpu")]
#[tokio::test(flavor = "multi_thread")]
async fn a_job_on_wgpu_trains_as_on_the_cpu() {
    let adapter = match strata_worker::wgpu::probe() {
        Ok(a) => a,
        Err(e) => {
            assert!(std::env::var_os(REQUIRE).is_none(), "{REQUIRE} is set: {e}");
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    eprintln!("wgpu adapter: {adapter:?}");
    let Setup {
        dir: _dir,
        data,
        c,
        mut cl,
        ..
    } = setup().await;
    for layout in [(1, 1, 1), (1, 1, 2)] {
        let cpu = recipe3d(&data, 20, layout, false);
        let on_wgpu = format!("{cpu}[device]\nbackend = \"wgpu\"\n")
            .replace("name = \"layout", "name = \"wgpu");
        let a = submit(&mut cl, cpu).await.unwrap();
        let b = submit(&mut cl, on_wgpu).await.unwrap();
        for id in [&a, &b] {
            let j = ended(&mut cl, id, 1800).await;
            assert_eq!(
                j.state(),
                pb::JobState::Succeeded,
                "{id}: {}",
                j.failure_reason
            );
        }
        let (ma, mb) = (metrics(&mut cl, &a).await, metrics(&mut cl, &b).await);
        assert_eq!(ma.len(), 20);
        assert_eq!(mb.len(), 20);
        let mut worst = 0f64;
        for (x, y) in ma.iter().zip(&mb) {
            let rel = (x.loss - y.loss).abs() / x.loss.abs();
            worst = worst.max(rel);
            assert!(
                rel < 1e-4,
                "{layout:?} step {}: cpu {} wgpu {} (rel {rel:e})",
                x.step,
                x.loss,
                y.loss
            );
        }
        // Steps 11-20: 256 tokens each.
        let step_s = |m: &[pb::StepMetrics]| {
            m[10..].iter().map(|s| 256.0 / s.tokens_per_s).sum::<f64>() / (m.len() - 10) as f64
        };
        eprintln!(
            "wgpu {layout:?}: 20 steps, losses {:.4} -> {:.4}, worst relative difference from the CPU {worst:.1e}; step {:.3} s on wgpu, {:.3} s on the CPU",
            mb[0].loss,
            mb[19].loss,
            step_s(&mb),
            step_s(&ma)
        );
    }
    c.stop().await;
}

/// One step of `strata bench train` on the adapter, 2 layers, 8 heads,
/// 8,192 tokens as 4 sequences of 2,048 and as one of 8,192: the device
/// pools reserve no more than the memory plan's bound for the rank (before
/// the blocked attention ran on wgpu, one copy of the whole scores alone
/// was 537 MB at 2,048 tokens and 2.1 GB at 8,192, against the plan's
/// 459 MB), the bytes seen in use stay under it, and only the step's
/// token ids and two scalars cross the host. Started under a folder with a
/// `Cargo.toml`, it leaves no `target/` there: cubecl's default keeps the
/// autotuner's choices in the `target/` of the nearest Cargo project, so
/// workers started in a source tree once wrote into it.
#[cfg(feature = "wgpu")]
#[test]
fn bench_on_wgpu_holds_long_sequences_within_the_memory_plan() {
    if let Err(e) = strata_worker::wgpu::probe() {
        assert!(std::env::var_os(REQUIRE).is_none(), "{REQUIRE} is set: {e}");
        eprintln!("SKIPPED: {e}");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    // Started where a `Cargo.toml` is found above the working directory,
    // as a worker started in a source tree is: cubecl would keep its
    // autotuner's choices in a `target/` there, strata keeps them in its
    // kernel cache.
    let here = tempfile::tempdir().unwrap();
    std::fs::write(here.path().join("Cargo.toml"), "[workspace]\n").unwrap();
    let recipe = root.join("examples/tiny-cpu.toml");
    for seq in ["2048", "8192"] {
        let max_seq = format!("model.max_seq_len={seq}");
        let mut args = vec![
            "bench",
            "train",
            recipe.to_str().unwrap(),
            "--backend",
            "wgpu",
        ];
        for set in [
            "parallel.dp=1",
            "model.n_layers=2",
            "model.n_heads=8",
            "model.n_kv_heads=2",
            "model.vocab_size=512",
            &max_seq,
        ] {
            args.extend(["--set", set]);
        }
        args.extend([
            "--seq",
            seq,
            "--tokens-per-step",
            "8192",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--json",
        ]);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(&args)
            .current_dir(here.path())
            .output()
            .expect("run strata");
        assert!(
            out.status.success(),
            "strata bench at {seq} tokens failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let plan = r["memory_plan"]["total_bytes"].as_u64().unwrap();
        let reserved = r["peak_memory_bytes"]
            .as_u64()
            .expect("the pools' reserved bytes");
        let in_use = r["peak_in_use_bytes"]
            .as_u64()
            .expect("the pools' bytes in use");
        eprintln!(
            "bench on wgpu at {seq} tokens: pools reserved {reserved}, in use at most {in_use} (sampled), plan {plan}; step {} s",
            r["step_s"]
        );
        assert!(
            reserved <= plan,
            "at {seq} tokens the device pools reserved {reserved} bytes, over the memory plan's {plan}"
        );
        assert!(in_use <= reserved, "in use {in_use} > reserved {reserved}");
        assert!(r["host_elems_per_step"].as_f64().unwrap() <= 2.0 * 8192.0 + 2.0);
        assert!(r["losses"][0].as_f64().unwrap().is_finite());
    }
    assert!(
        !here.path().join("target").exists(),
        "the autotuner's choices went into the working directory's target/"
    );
    let cache = strata_worker::kernels::cache_dir().expect("a kernel cache");
    assert!(
        cache.join("autotune").is_dir(),
        "no autotune results under {}",
        cache.display()
    );
}

/// Without a Vulkan driver (the loader pointed at a driver file that does
/// not exist) `strata bench train --backend wgpu` exits 2 with strata's
/// own message, which says what to install, instead of burn's panic.
#[cfg(all(feature = "wgpu", target_os = "linux"))]
#[test]
fn no_vulkan_driver_is_a_named_error() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let missing = "/nonexistent/strata-test-icd.json";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["bench", "train", "examples/tiny-cpu.toml"])
        .args(["--backend", "wgpu", "--warmup", "0", "--steps", "1"])
        .current_dir(root)
        .env("VK_ICD_FILENAMES", missing)
        .env("VK_DRIVER_FILES", missing)
        .env_remove("VK_ADD_DRIVER_FILES")
        .output()
        .expect("run strata");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in [
        "error: no graphics adapter",
        "mesa-vulkan-drivers",
        "VK_ICD_FILENAMES",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
