//! Collectives over device tensors.
//!
//! The trainer's gradient buckets live on the backend's device, and a
//! group sums them there through [`DeviceCollective`]. [`Staged`] runs any
//! host [`Collective`] (the TCP ring, the in-process backend) through a
//! staging copy: on the CPU backend the tensor is host memory already, on
//! a GPU the copy crosses PCIe. A backend that reaches device memory
//! directly (NCCL) implements the same trait in place.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::{Collective, Result};
use crate::model::{from_vec, in_dtype, to_vec};

/// A group's collectives over tensors on backend `I`'s device, from one
/// member's side. Every member calls the same operations in the same
/// order; results keep the input's dtype (sums are taken in f32).
pub trait DeviceCollective<I: Backend> {
    /// This member's index in the group.
    fn rank(&self) -> usize;
    /// Number of members.
    fn size(&self) -> usize;
    /// The element-wise sum of every member's `t`.
    fn all_reduce_sum(&mut self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>>;
    /// `t` holds `size` equal parts: the sum over the group of part
    /// `rank`.
    fn reduce_scatter_sum(&mut self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>>;
    /// Every member's `t`, concatenated in member order.
    fn all_gather(&mut self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>>;
    /// Member `root`'s `t`, on every member (`t` gives the shape elsewhere).
    fn broadcast(&mut self, root: usize, t: Tensor<I, 1>) -> Result<Tensor<I, 1>>;
}

/// A host [`Collective`] used on device tensors through a host staging
/// buffer, all-reduces in calls of at most `chunk` elements (so one
/// message never holds a whole large bucket).
pub struct Staged<'a> {
    group: &'a mut dyn Collective,
    chunk: usize,
}

impl<'a> Staged<'a> {
    pub fn new(group: &'a mut dyn Collective, chunk: usize) -> Staged<'a> {
        Staged {
            group,
            chunk: chunk.max(1),
        }
    }
}

/// `t`'s values on the host, with what it takes to make a tensor like it
/// again.
fn stage<I: Backend>(t: Tensor<I, 1>) -> (Vec<f32>, impl Fn(Vec<f32>) -> Tensor<I, 1>) {
    let (device, dtype) = (t.device(), t.dtype());
    let back = move |v: Vec<f32>| {
        let n = v.len();
        in_dtype(from_vec(v, [n], &device), dtype)
    };
    (to_vec(t), back)
}

impl<I: Backend> DeviceCollective<I> for Staged<'_> {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn size(&self) -> usize {
        self.group.size()
    }

    fn all_reduce_sum(&mut self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        if self.group.size() == 1 {
            return Ok(t);
        }
        let (mut host, back) = stage(t);
        for chunk in host.chunks_mut(self.chunk) {
            self.group.all_reduce_sum(chunk)?;
        }
        Ok(back(host))
    }

    fn reduce_scatter_sum(&mut self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        let n = self.group.size();
        let (host, back) = stage(t);
        let mut out = vec![0f32; host.len() / n];
        self.group.reduce_scatter_sum(&host, &mut out)?;
        Ok(back(out))
    }

    fn all_gather(&mut self, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        let n = self.group.size();
        let (host, back) = stage(t);
        let mut out = vec![0f32; host.len() * n];
        self.group.all_gather(&host, &mut out)?;
        Ok(back(out))
    }

    fn broadcast(&mut self, root: usize, t: Tensor<I, 1>) -> Result<Tensor<I, 1>> {
        let (mut host, back) = stage(t);
        self.group.broadcast(root, &mut host)?;
        Ok(back(host))
    }
}
