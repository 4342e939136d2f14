//! NCCL collectives on burn's CUDA tensors, one process (or thread) per
//! GPU: the [`DeviceCollective`] of GPU groups.
//!
//! burn's fused CUDA backend does not hand out device pointers, and
//! cubecl's own NCCL support is for the GPUs of one process (a
//! process-global id map). So each operation takes the narrowest way in:
//! it makes a fresh copy of the tensor (one elementwise kernel; its buffer
//! has no other owner), resolves a clone of it to cubecl's tensor (a
//! clone resolves read-only: burn keeps its own handle to the buffer),
//! synchronizes the device (cubecl does not expose its stream), reads the
//! buffer's address through the compute client (`get_resource`: the
//! allocation's base plus the handle's offset), runs NCCL in place on a
//! stream of the same primary context, and waits for that stream before
//! burn runs anything else. cudarc never owns, and so never frees,
//! cubecl's memory. The cost: one copy of the buffer and two device
//! synchronizations per call, on top of NCCL's own transfer.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result, sys};

use crate::collective::{
    Collective, CollectiveError, DeviceBackend, DeviceCollective, GroupPlan, JoinError,
};
use crate::cuda::{CudaFused, CudaUnfused};
use crate::tensors::in_dtype;

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error(
        "NCCL (libnccl.so.2) was not found: put a CUDA toolkit's lib64, or the lib directory of PyTorch's nvidia-nccl pip package, on LD_LIBRARY_PATH (scripts/gpu-env.sh does)"
    )]
    NoLibrary,
    #[error("NCCL {op} failed with {status:?} ({place})")]
    Call {
        op: &'static str,
        status: sys::ncclResult_t,
        /// Which member, or this process before there is a group.
        place: String,
    },
    #[error("GPU {gpu}: {what}")]
    Device { gpu: usize, what: String },
    #[error("{op}: {what}")]
    Shape { op: &'static str, what: String },
    #[error("exchanging the NCCL id over the host group: {0}")]
    Host(#[from] CollectiveError),
}

/// The error of NCCL call `op` made at `place`.
fn failed(
    op: &'static str,
    place: impl Into<String>,
) -> impl FnOnce(result::NcclError) -> NcclError {
    move |e| NcclError::Call {
        op,
        status: e.0,
        place: place.into(),
    }
}

fn member_of(rank: usize, size: usize) -> String {
    format!("group rank {rank} of {size}")
}

/// Whether the NCCL library can be loaded.
#[allow(unsafe_code)]
pub fn library_present() -> bool {
    // SAFETY: tries to dlopen the library by its usual names; nothing is
    // called through it.
    unsafe { sys::is_culib_present() }
}

/// A communicator's identity: made by one member (`ncclGetUniqueId` opens
/// a socket in the calling process) and handed to the others.
#[derive(Clone, Copy)]
pub struct NcclId([u8; 128]);

impl NcclId {
    pub fn new() -> Result<NcclId, NcclError> {
        if !library_present() {
            return Err(NcclError::NoLibrary);
        }
        let id = result::get_uniqueid().map_err(failed("get_unique_id", "this process"))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// The id as 32 words that a host collective carries bit for bit.
    pub fn to_words(self) -> [f32; 32] {
        std::array::from_fn(|i| {
            f32::from_bits(u32::from_le_bytes(
                self.0[4 * i..4 * i + 4].try_into().expect("4 bytes"),
            ))
        })
    }

    pub fn from_words(words: &[f32; 32]) -> NcclId {
        let mut bytes = [0u8; 128];
        for (chunk, w) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_bits().to_le_bytes());
        }
        NcclId(bytes)
    }
}

/// One member of an NCCL communicator on one GPU.
pub struct NcclGroup {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    gpu: usize,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is used by one thread at a time (`&mut self`
// for every operation), which is all NCCL asks of a communicator.
#[allow(unsafe_code)]
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Member `rank` of `size` of the communicator `id`, on GPU `gpu`
    /// (among the visible ones). Blocks until every member has joined.
    pub fn new(gpu: usize, rank: usize, size: usize, id: NcclId) -> Result<NcclGroup, NcclError> {
        if !library_present() {
            return Err(NcclError::NoLibrary);
        }
        let device = |e: &dyn std::fmt::Debug| NcclError::Device {
            gpu,
            what: format!("{e:?}"),
        };
        crate::cuda::probe(gpu).map_err(|e| device(&e))?;
        // The primary context, the one burn's CUDA backend uses.
        let ctx = CudaContext::new(gpu).map_err(|e| device(&e))?;
        let stream = ctx.new_stream().map_err(|e| device(&e))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        let unique = sys::ncclUniqueId {
            internal: id.0.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: `comm` is written by a successful call, and only then
        // assumed initialized; the current context is this GPU's (set by
        // `CudaContext::new`).
        #[allow(unsafe_code)]
        let comm = unsafe {
            ctx.bind_to_thread().map_err(|e| device(&e))?;
            result::comm_init_rank(comm.as_mut_ptr(), size as i32, unique, rank as i32)
                .map_err(failed("comm_init_rank", member_of(rank, size)))?;
            comm.assume_init()
        };
        Ok(NcclGroup {
            comm,
            stream,
            gpu,
            rank,
            size,
        })
    }

    /// The communicator of the members of host group `group` (each on its
    /// own GPU `gpu`): member 0 makes the id and broadcasts it over the
    /// host group.
    pub fn over(group: &mut dyn Collective, gpu: usize) -> Result<NcclGroup, NcclError> {
        let mut words = if group.rank() == 0 {
            NcclId::new()?.to_words()
        } else {
            [0f32; 32]
        };
        group.broadcast(0, &mut words)?;
        NcclGroup::new(gpu, group.rank(), group.size(), NcclId::from_words(&words))
    }

    fn call(
        &self,
        op: &'static str,
        r: Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), NcclError> {
        r.map(|_| ())
            .map_err(failed(op, member_of(self.rank, self.size)))
    }

    /// Runs `f` with the device address of a fresh copy of `t` (`len`
    /// elements of its dtype), then returns that copy: what `f` wrote
    /// there in place.
    fn in_place(
        &mut self,
        op: &'static str,
        t: Tensor<CudaFused, 1>,
        f: impl FnOnce(&mut Self, u64, usize, sys::ncclDataType_t) -> Result<(), NcclError>,
    ) -> Result<Tensor<CudaFused, 1>, NcclError> {
        let dtype = match t.dtype() {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
            other => {
                return Err(NcclError::Shape {
                    op,
                    what: format!("{other:?} tensors are not carried"),
                });
            }
        };
        let len = t.dims()[0];
        let device = t.device();
        // A buffer no other tensor shares.
        let fresh = t.mul_scalar(1.0);
        let TensorPrimitive::Float(fused) = fresh.clone().into_primitive() else {
            unreachable!("a float tensor")
        };
        let cube = fused
            .client
            .clone()
            .resolve_tensor_float::<CudaUnfused>(fused);
        let sync = |what: &str| {
            <CudaFused as Backend>::sync(&device).map_err(|e| NcclError::Device {
                gpu: self.gpu,
                what: format!("synchronizing burn's stream {what}: {e:?}"),
            })
        };
        sync("before NCCL")?;
        let resource =
            cube.client
                .get_resource(cube.handle.clone())
                .map_err(|e| NcclError::Device {
                    gpu: self.gpu,
                    what: format!("the tensor's device memory: {e:?}"),
                })?;
        let elem = elem_bytes(dtype);
        let ptr = resource.resource().ptr;
        if (resource.resource().size as usize) < len * elem {
            return Err(NcclError::Shape {
                op,
                what: format!(
                    "{len} elements but a buffer of {} bytes",
                    resource.resource().size
                ),
            });
        }
        f(self, ptr, len, dtype)?;
        self.stream.synchronize().map_err(|e| NcclError::Device {
            gpu: self.gpu,
            what: format!("waiting for NCCL's stream: {e:?}"),
        })?;
        drop(resource);
        Ok(fresh)
    }

    fn stream_raw(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialized by `new` and is
        // destroyed once.
        #[allow(unsafe_code)]
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

/// Bytes per element of the dtypes carried (f32, bf16).
fn elem_bytes(dtype: sys::ncclDataType_t) -> usize {
    if dtype == sys::ncclDataType_t::ncclFloat32 {
        4
    } else {
        2
    }
}

/// NCCL as a [`DeviceBackend`]: each member on its GPU `gpu` (the one its
/// launcher made visible), the id exchanged over the host group.
pub struct Nccl {
    pub gpu: usize,
}

impl DeviceBackend<CudaFused> for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn join(
        &self,
        plan: &GroupPlan,
        host: &mut dyn Collective,
    ) -> Result<Box<dyn DeviceCollective<CudaFused> + Send>, JoinError> {
        match NcclGroup::over(host, self.gpu) {
            Ok(g) => Ok(Box::new(g)),
            Err(NcclError::Host(source)) => Err(JoinError::Bootstrap {
                group: plan.name.clone(),
                source,
            }),
            Err(e) => Err(JoinError::Device {
                group: plan.name.clone(),
                why: e.to_string(),
            }),
        }
    }
}

fn to_collective(e: NcclError) -> CollectiveError {
    CollectiveError::Device(e.to_string())
}

#[allow(unsafe_code)] // NCCL's raw interface on addresses checked above
impl DeviceCollective<CudaFused> for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(
        &mut self,
        t: Tensor<CudaFused, 1>,
    ) -> crate::collective::Result<Tensor<CudaFused, 1>> {
        // Even a group of one goes through NCCL: the conformance run on a
        // machine with one GPU then still checks the way to the memory.
        self.in_place("all_reduce", t, |g, ptr, len, dtype| {
            // SAFETY: `ptr` addresses `len` live elements of `dtype`,
            // read and written in place on NCCL's stream, which is waited
            // for before the buffer is used again.
            let r = unsafe {
                result::all_reduce(
                    ptr as *const _,
                    ptr as *mut _,
                    len,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    g.comm,
                    g.stream_raw(),
                )
            };
            g.call("all_reduce", r)
        })
        .map_err(to_collective)
    }

    fn reduce_scatter_sum(
        &mut self,
        t: Tensor<CudaFused, 1>,
    ) -> crate::collective::Result<Tensor<CudaFused, 1>> {
        let (n, len) = (self.size, t.dims()[0]);
        if len % n != 0 {
            return Err(CollectiveError::BadBuffer {
                op: "reduce_scatter",
                expected: len.next_multiple_of(n),
                got: len,
            });
        }
        let part = len / n;
        let rank = self.rank;
        // In place: member r's part r of the buffer receives the result.
        let out = self
            .in_place("reduce_scatter", t, |g, ptr, len, dtype| {
                let elem = elem_bytes(dtype);
                // SAFETY: as in all_reduce; the receive buffer is part
                // `rank` of the same buffer, which NCCL allows in place.
                let r = unsafe {
                    result::reduce_scatter(
                        ptr as *const _,
                        (ptr + (rank * part * elem) as u64) as *mut _,
                        len / g.size,
                        dtype,
                        sys::ncclRedOp_t::ncclSum,
                        g.comm,
                        g.stream_raw(),
                    )
                };
                g.call("reduce_scatter", r)
            })
            .map_err(to_collective)?;
        Ok(out.slice(rank * part..(rank + 1) * part))
    }

    fn all_gather(
        &mut self,
        t: Tensor<CudaFused, 1>,
    ) -> crate::collective::Result<Tensor<CudaFused, 1>> {
        let (n, len, rank) = (self.size, t.dims()[0], self.rank);
        // In place: each member's input sits at its part of the output.
        let (device, dtype) = (t.device(), t.dtype());
        let mut parts: Vec<Tensor<CudaFused, 1>> = (0..n)
            .map(|_| in_dtype(Tensor::<CudaFused, 1>::zeros([len], &device), dtype))
            .collect();
        parts[rank] = t;
        let whole = Tensor::cat(parts, 0);
        self.in_place("all_gather", whole, |g, ptr, total, dtype| {
            let elem = elem_bytes(dtype);
            // SAFETY: as in all_reduce; the send buffer is part `rank` of
            // the receive buffer, which NCCL allows in place.
            let r = unsafe {
                result::all_gather(
                    (ptr + (rank * len * elem) as u64) as *const _,
                    ptr as *mut _,
                    total / g.size,
                    dtype,
                    g.comm,
                    g.stream_raw(),
                )
            };
            g.call("all_gather", r)
        })
        .map_err(to_collective)
    }

    fn broadcast(
        &mut self,
        root: usize,
        t: Tensor<CudaFused, 1>,
    ) -> crate::collective::Result<Tensor<CudaFused, 1>> {
        if root >= self.size {
            return Err(CollectiveError::NoSuchPeer {
                peer: root,
                size: self.size,
            });
        }
        self.in_place("broadcast", t, |g, ptr, len, dtype| {
            // SAFETY: as in all_reduce.
            let r = unsafe {
                result::broadcast(
                    ptr as *const _,
                    ptr as *mut _,
                    len,
                    dtype,
                    root as i32,
                    g.comm,
                    g.stream_raw(),
                )
            };
            g.call("broadcast", r)
        })
        .map_err(to_collective)
    }
}

/// One check of the conformance run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub op: &'static str,
    pub dtype: &'static str,
    pub pass: bool,
    /// The first wrong element, when one was.
    pub detail: Option<String>,
}

/// What [`conformance`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conformance {
    pub world_size: usize,
    pub nccl_version: i32,
    pub checks: Vec<Check>,
    /// Seconds per all-reduce of a 64 MiB f32 buffer (after one warm-up).
    pub all_reduce_64mib_s: f64,
    pub pass: bool,
}

/// Member `rank`'s input: whole numbers, exact in bf16 and in any order of
/// summation.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 7 + i * 3) % 61) as f32 - 30.0)
        .collect()
}

/// NCCL's operations on burn's CUDA tensors over the first `gpus` visible
/// GPUs, one thread per GPU in this process, in f32 and bf16, each result
/// compared with the sums computed on the host; then the time of a 64 MiB
/// all-reduce.
pub fn conformance(gpus: usize) -> Result<Conformance, NcclError> {
    if !library_present() {
        return Err(NcclError::NoLibrary);
    }
    let version = result::get_nccl_version().map_err(failed("get_version", "this process"))?;
    let id = NcclId::new()?;
    let results: Vec<Result<(Vec<Check>, f64), NcclError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..gpus)
            .map(|rank| s.spawn(move || member(rank, gpus, id)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a conformance thread panicked"))
            .collect()
    });
    let mut checks = Vec::new();
    let mut seconds = 0f64;
    for r in results {
        let (c, t) = r?;
        checks.extend(c);
        seconds = seconds.max(t);
    }
    let pass = checks.iter().all(|c| c.pass);
    Ok(Conformance {
        world_size: gpus,
        nccl_version: version,
        checks,
        all_reduce_64mib_s: seconds,
        pass,
    })
}

fn member(rank: usize, n: usize, id: NcclId) -> Result<(Vec<Check>, f64), NcclError> {
    let mut g = NcclGroup::new(rank, rank, n, id)?;
    let device = crate::cuda::device(rank);
    let len = 6 * n;
    let host = |v: Vec<f32>, dtype: DType| {
        let n = v.len();
        in_dtype(
            crate::tensors::from_vec::<CudaFused, 1>(v, [n], &device),
            dtype,
        )
    };
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
    let sum: Vec<f32> = (0..len)
        .map(|i| inputs.iter().map(|x| x[i]).sum())
        .collect();
    let mut checks = Vec::new();
    let mut check = |op: &'static str, dtype: &'static str, got: Vec<f32>, want: &[f32]| {
        let detail = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .map(|i| format!("rank {rank} element {i}: {} vs {}", got[i], want[i]))
            .or_else(|| {
                (got.len() != want.len())
                    .then(|| format!("rank {rank}: {} elements vs {}", got.len(), want.len()))
            });
        checks.push(Check {
            op,
            dtype,
            pass: detail.is_none(),
            detail,
        });
    };
    let err = |e: CollectiveError| NcclError::Device {
        gpu: rank,
        what: e.to_string(),
    };
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let mine = || host(inputs[rank].clone(), dtype);
        let got = g.all_reduce_sum(mine()).map_err(err)?;
        check("all_reduce", name, crate::tensors::to_vec(got), &sum);
        let got = g.reduce_scatter_sum(mine()).map_err(err)?;
        check(
            "reduce_scatter",
            name,
            crate::tensors::to_vec(got),
            &sum[rank * 6..rank * 6 + 6],
        );
        let got = g.all_gather(host(input(rank, 6), dtype)).map_err(err)?;
        let all: Vec<f32> = (0..n).flat_map(|r| input(r, 6)).collect();
        check("all_gather", name, crate::tensors::to_vec(got), &all);
        let root = n - 1;
        let got = g.broadcast(root, mine()).map_err(err)?;
        check(
            "broadcast",
            name,
            crate::tensors::to_vec(got),
            &inputs[root],
        );
    }
    let big = Tensor::<CudaFused, 1>::ones([16 << 20], &device);
    let big = g.all_reduce_sum(big).map_err(err)?;
    let t = std::time::Instant::now();
    let big = g.all_reduce_sum(big).map_err(err)?;
    <CudaFused as Backend>::sync(&device).map_err(|e| NcclError::Device {
        gpu: rank,
        what: format!("{e:?}"),
    })?;
    let seconds = t.elapsed().as_secs_f64();
    drop(big);
    Ok((checks, seconds))
}
