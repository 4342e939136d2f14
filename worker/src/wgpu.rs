//! burn's wgpu backend: WGSL kernels through Vulkan (or Metal, DX12) on
//! whatever adapter the machine has — a GPU, or a CPU through Mesa's
//! software Vulkan (lavapipe). The device path's code (fusion, autotuning,
//! device memory pools, the trainer's device-side buckets and AdamW) is the
//! same as on CUDA, so this is where it runs without a GPU.
//!
//! [`probe`] opens the adapter before the first tensor operation and turns
//! burn's panic on a missing one into an error that says what to install.

use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, WgpuRuntime, graphics::AutoGraphicsApi};
use burn_cubecl::cubecl::Runtime;

/// burn's wgpu backend with kernel fusion, f32.
pub type WgpuFused = burn::backend::Wgpu;

#[derive(Debug, thiserror::Error)]
pub enum WgpuError {
    #[error(
        "no graphics adapter: wgpu found no Vulkan, Metal or DX12 device ({why}); on a machine without a GPU install Mesa's software Vulkan (Debian and Ubuntu: `apt-get install mesa-vulkan-drivers`), or point VK_ICD_FILENAMES at an installed driver's ICD file"
    )]
    NoAdapter { why: String },
}

/// The adapter the backend runs on.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    /// `llvmpipe (LLVM 15.0.6, 256 bits)`, `NVIDIA H100 80GB HBM3`, …
    pub name: String,
    /// `Cpu`, `DiscreteGpu`, `IntegratedGpu`, …
    pub kind: String,
    /// `Vulkan`, `Metal`, …
    pub api: String,
    /// The driver and its version.
    pub driver: String,
}

impl AdapterInfo {
    /// Whether the adapter is a CPU (a software renderer).
    pub fn is_cpu(&self) -> bool {
        self.kind == "Cpu"
    }
}

/// Opens the default adapter for burn's default wgpu device (once per
/// process: later calls return the same adapter), or says why there is none.
pub fn probe() -> Result<AdapterInfo, WgpuError> {
    static OPENED: std::sync::OnceLock<Result<AdapterInfo, String>> = std::sync::OnceLock::new();
    OPENED
        .get_or_init(|| {
            // The autotuner's choices kept between runs, never in a
            // source tree the worker happens to start in.
            if let Some(dir) = crate::kernels::cache_dir() {
                crate::kernels::persist(&dir);
            }
            // burn panics when no adapter is found: caught here and named.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let setup = std::panic::catch_unwind(|| {
                burn::backend::wgpu::init_setup::<AutoGraphicsApi>(
                    &device(),
                    RuntimeOptions {
                        memory_config: memory_config(),
                        ..RuntimeOptions::default()
                    },
                )
            });
            std::panic::set_hook(hook);
            match setup {
                Ok(s) => {
                    let i = s.adapter.get_info();
                    Ok(AdapterInfo {
                        name: i.name,
                        kind: format!("{:?}", i.device_type),
                        api: format!("{:?}", i.backend),
                        driver: format!("{} {}", i.driver, i.driver_info),
                    })
                }
                Err(p) => Err(p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the backend panicked".into())),
            }
        })
        .clone()
        .map_err(|why| WgpuError::NoAdapter { why })
}

/// The device strata trains on: burn's default wgpu device.
pub fn device() -> WgpuDevice {
    WgpuDevice::DefaultDevice
}

/// Device memory burn's pools hold on `device` for the calling thread
/// (reserved, which the pools keep once allocated: the peak so far), in
/// bytes.
pub fn memory_reserved(device: &WgpuDevice) -> Option<u64> {
    WgpuRuntime::client(device)
        .memory_usage()
        .ok()
        .map(|m| m.bytes_reserved)
}

/// The bytes of live tensors in the calling thread's pools on `device`,
/// readable from any thread ([`crate::kernels::pool_reader`]).
pub fn in_use_reader(device: &WgpuDevice) -> impl Fn() -> Option<u64> + Send + Sync + use<> {
    crate::kernels::pool_reader::<WgpuRuntime>(device)
}

/// The device memory pools strata asks cubecl for on wgpu. Its default
/// gives each size class pools of its own (on lavapipe: 8 MiB pages for
/// slices up to 2 MiB, 32 MiB pages up to 16 MiB, 128 MiB pages above),
/// and each class keeps the pages of its own peak: the activations' peak
/// (the forward's end) and the attention blocks' (the backward's) come at
/// different times, but the pools hold both at once, 1.5× the bytes the
/// step ever has live. Here every tensor from 1 MiB to 64 MiB (an
/// attention block is at most that) shares one pool of 64 MiB pages,
/// smaller ones share 8 MiB pages, and larger ones (a big model's
/// weights and optimizer moments, a large vocabulary's chunk of logits)
/// get buffers of their exact size, reused by any tensor that fits. The
/// memory plan counts a part-used page of each sliced pool and the page
/// tails of the largest transients. (cubecl's CUDA runtime takes no
/// options: it keeps its default.)
pub fn memory_config() -> cubecl_runtime::memory_management::MemoryConfiguration {
    use cubecl_runtime::memory_management::{MemoryConfiguration, MemoryPoolOptions, PoolType};
    use strata_dataplane::memory::{POOL_PAGE_BYTES, SMALL_POOL_PAGE_BYTES};
    const MIB: u64 = 1 << 20;
    let sliced = |page_size, max_slice_size| MemoryPoolOptions {
        pool_type: PoolType::SlicedPages {
            page_size,
            max_slice_size,
        },
        dealloc_period: None,
    };
    // Buffers under the device's offset alignment cannot be slices
    // (wgpu), as cubecl's own presets have it.
    let mut pools = vec![
        MemoryPoolOptions {
            pool_type: PoolType::ExclusivePages { max_alloc_size: 0 },
            dealloc_period: None,
        },
        sliced(SMALL_POOL_PAGE_BYTES, MIB),
        sliced(POOL_PAGE_BYTES, POOL_PAGE_BYTES),
    ];
    // One exclusive pool per doubling: a pool's first buffers are the
    // size asked (it sizes new ones by a running mean that starts at half
    // its largest), and an unused one is freed after a while, as in
    // cubecl's exclusive preset.
    let mut max = 2 * POOL_PAGE_BYTES;
    while max <= 1 << 40 {
        pools.push(MemoryPoolOptions {
            pool_type: PoolType::ExclusivePages {
                max_alloc_size: max,
            },
            dealloc_period: Some(5000 * (1 + max / (1 << 30))),
        });
        max *= 2;
    }
    MemoryConfiguration::Custom {
        pool_options: pools,
    }
}
