//! Tensors between the host and a backend's device, counted, and the
//! small conversions every part of the worker shares.
//!
//! Every transfer of the worker goes through [`to_vec`], [`from_vec`] and
//! the token-id uploads ([`ids`], [`token_ids`]), which count the elements
//! they move on this thread ([`host_transfers`]), so that a test or a
//! benchmark can tell that nothing model-sized crosses the host per step.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};

/// `t` in `dtype`: the same tensor when it already is (f32 training never
/// casts), else a cast, which autodiff differentiates back to `t`'s dtype.
pub fn in_dtype<X: Backend, const D: usize>(t: Tensor<X, D>, dtype: DType) -> Tensor<X, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

thread_local! {
    static HOST_ELEMS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Elements this thread has moved between the host and a backend's device
/// (both ways): every transfer of the worker goes through [`to_vec`],
/// [`from_vec`] and the token-id uploads, so that a test or a benchmark can
/// tell that nothing model-sized crosses the host per step.
pub fn host_transfers() -> u64 {
    HOST_ELEMS.with(|c| c.get())
}

pub(crate) fn count_transfer(n: usize) {
    HOST_ELEMS.with(|c| c.set(c.get() + n as u64));
}

/// Adds `t` to the running sum `acc` (empty before the first term).
pub fn accumulate<X: Backend, const D: usize>(acc: &mut Option<Tensor<X, D>>, t: Tensor<X, D>) {
    *acc = Some(match acc.take() {
        Some(a) => a + t,
        None => t,
    });
}

/// A tensor's values on the host.
pub fn to_vec<X: Backend, const D: usize>(t: Tensor<X, D>) -> Vec<f32> {
    count_transfer(t.shape().num_elements());
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 tensor data")
}

pub fn from_vec<X: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    device: &X::Device,
) -> Tensor<X, D> {
    count_transfer(v.len());
    Tensor::from_data(TensorData::new(v, shape), device)
}

pub fn ids<X: Backend>(v: Vec<i64>, device: &X::Device) -> Tensor<X, 1, Int> {
    let n = v.len();
    count_transfer(n);
    Tensor::from_data(TensorData::new(v, [n]), device)
}

pub fn token_ids<X: Backend>(tokens: &[u32], device: &X::Device) -> Tensor<X, 1, Int> {
    ids(tokens.iter().map(|&x| i64::from(x)).collect(), device)
}
