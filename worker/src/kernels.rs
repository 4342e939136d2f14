//! Where burn's cubecl backends (CUDA, wgpu) keep what they compile and
//! what their autotuner chose, so that only a machine's first run pays for
//! them.

use std::path::{Path, PathBuf};

use burn_cubecl::cubecl;

/// Where compiled kernels and autotune results are kept between runs:
/// `STRATA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/strata/kernels`, else
/// `~/.cache/strata/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STRATA_KERNEL_CACHE") {
        return Some(dir.into());
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(cache.join("strata").join("kernels"))
}

/// Makes burn's cubecl backends keep what they compile: CUDA's PTX of
/// every kernel (NVRTC; off by default) and the autotuner's choices (by
/// default under a `target/` found above the working directory: a
/// deployed worker has none, and a worker started inside a source tree
/// writes into it) go under `dir`. The first step of a run compiles a few
/// hundred kernels and autotunes every matrix shape, minutes on an H200;
/// later runs on the machine read them back. A `cubecl.toml` that names
/// its own caches, and the `CUBECL_*` variables, still apply. Returns
/// whether the configuration was set: `false` once burn has read it (its
/// configuration is set once per process).
pub fn persist(dir: &Path) -> bool {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut state = CubeClRuntimeConfig::storage().lock();
    if state.is_some() {
        return false;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        config.compilation.cache = Some(CacheConfig::File(dir.join("ptx")));
    }
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir.join("autotune"));
    }
    *state = Some(std::sync::Arc::new(config));
    true
}

/// A reader of the bytes of live tensors in the device pools on the
/// calling thread's stream,
/// callable from any thread: cubecl keeps a memory manager per stream (a
/// thread's), and no high-water mark of the bytes in use, so the bench
/// samples them from a thread of its own while the trainer's thread runs.
/// Each reading also hands the stream's queued work to the device (what
/// cubecl does before it reports), which does not change what is
/// allocated.
pub fn pool_reader<R: cubecl::Runtime>(
    device: &R::Device,
) -> impl Fn() -> Option<u64> + Send + Sync + use<R> {
    let stream = cubecl::stream_id::StreamId::current();
    let client = R::client(device);
    move || stream.executes(|| client.memory_usage().ok().map(|m| m.bytes_in_use))
}
