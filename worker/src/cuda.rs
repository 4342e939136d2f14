//! NVIDIA GPUs: finding the driver and the device before burn's CUDA
//! backend touches them (cudarc loads libcuda and NVRTC at run time
//! and panics on a missing library; this module turns that into an error
//! that names what is missing), and what the device is.

use burn::backend::cuda::CudaDevice;
use cudarc::driver::CudaContext;

/// burn's CUDA backend with kernel fusion, f32 by default.
pub type CudaFused = burn::backend::Cuda;
/// burn's CUDA backend without fusion: each tensor operation one kernel.
pub type CudaUnfused = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "the CUDA driver library (libcuda.so) was not found: is the NVIDIA driver installed, and its lib directory on LD_LIBRARY_PATH?"
    )]
    NoDriver,
    #[error(
        "NVRTC (libnvrtc.so) was not found: burn's CUDA backend compiles its kernels with it; put a CUDA toolkit's lib64 (or the nvidia-cuda-nvrtc pip package's lib) on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error(
        "GPU {index} does not exist: this machine has {count} (CUDA_VISIBLE_DEVICES={visible})"
    )]
    NoSuchDevice {
        index: usize,
        count: usize,
        visible: String,
    },
    #[error("CUDA driver: {0}")]
    Driver(String),
}

/// One GPU as the driver describes it.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub capability: (i32, i32),
}

fn driver(e: impl std::fmt::Debug) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// Whether the driver library can be loaded.
#[allow(unsafe_code)]
pub fn driver_present() -> bool {
    // SAFETY: tries to dlopen the library by its usual names; nothing is
    // called through it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
#[allow(unsafe_code)]
pub fn nvrtc_present() -> bool {
    // SAFETY: as in `driver_present`.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// How many GPUs the driver reports (those in `CUDA_VISIBLE_DEVICES`, when
/// set).
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    Ok(CudaContext::device_count().map_err(driver)? as usize)
}

/// GPU `index` (among the visible ones), after checking that the driver
/// and NVRTC load and that the device exists. Also points burn's kernel
/// caches at [`crate::kernels::cache_dir`] ([`crate::kernels::persist`]), so call it
/// before the first tensor operation on the GPU.
pub fn probe(index: usize) -> Result<GpuInfo, CudaError> {
    if let Some(dir) = crate::kernels::cache_dir() {
        crate::kernels::persist(&dir);
    }
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let count = CudaContext::device_count().map_err(driver)? as usize;
    if index >= count {
        return Err(CudaError::NoSuchDevice {
            index,
            count,
            visible: std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into()),
        });
    }
    let ctx = CudaContext::new(index).map_err(driver)?;
    Ok(GpuInfo {
        index,
        name: ctx.name().map_err(driver)?,
        memory_bytes: ctx.total_mem().map_err(driver)? as u64,
        capability: ctx.compute_capability().map_err(driver)?,
    })
}

/// burn's device for GPU `index`, once [`probe`] found it.
pub fn device(index: usize) -> CudaDevice {
    CudaDevice { index }
}

/// Device memory in use on GPU `index` (total − free: burn's memory pools,
/// which keep what they allocated, and the context), in bytes.
pub fn memory_in_use(index: usize) -> Option<u64> {
    let ctx = CudaContext::new(index).ok()?;
    let (free, total) = ctx.mem_get_info().ok()?;
    Some((total - free) as u64)
}

/// The bytes of live tensors in the calling thread's cubecl pools on GPU
/// `index`, readable from any thread ([`crate::kernels::pool_reader`]).
pub fn in_use_reader(index: usize) -> impl Fn() -> Option<u64> + Send + Sync + 'static {
    crate::kernels::pool_reader::<cubecl::cuda::CudaRuntime>(&device(index))
}

pub use crate::kernels::{cache_dir as kernel_cache_dir, persist as persist_kernels};
pub use crate::peak::bf16_peak_tflops;
