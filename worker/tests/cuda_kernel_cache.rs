//! burn's CUDA backend keeps what it compiles under strata's cache
//! (feature `cuda`; needs no GPU: it is configuration, read before the
//! first kernel). Its own test binary, because the configuration is set
//! once per process.
#![cfg(feature = "cuda")]

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use strata_worker::cuda;

#[test]
fn compiled_kernels_and_autotune_results_go_under_the_strata_cache() {
    let dir = std::env::temp_dir().join(format!("strata-kernels-{}", std::process::id()));
    assert!(cuda::persist_kernels(&dir), "the first call sets it");
    let config = CubeClRuntimeConfig::get();
    match &config.compilation.cache {
        Some(CacheConfig::File(path)) => assert_eq!(path, &dir.join("ptx")),
        other => panic!("the PTX cache is {other:?}"),
    }
    assert_eq!(config.autotune.cache.root(), dir.join("autotune"));
    // burn has read it now: a second call cannot change it, and says so.
    assert!(!cuda::persist_kernels(&dir.join("elsewhere")));
    assert_eq!(
        CubeClRuntimeConfig::get().autotune.cache.root(),
        dir.join("autotune")
    );
}
