//! The trainer on burn's wgpu backend, through real jobs: where wgpu finds
//! an adapter (a GPU, or a CPU through Mesa's software Vulkan, which CI
//! installs) a 20-step job under (1,1,1) and (1,1,2) reports the CPU
//! backend's losses within 1e-4. Without an adapter, or in a build without
//! the `wgpu` feature, it says it was skipped, unless `STRATA_REQUIRE_WGPU`
//! is set (then it fails).

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
