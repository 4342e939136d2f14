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

use std::ops::Range;

use super::{Collective, Result, chunk, shard_ranges};
use crate::tensors::{from_vec, in_dtype, to_vec};

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

    /// This member's shard of the group's sum of `t`: the elements
    /// [`shard_ranges`]`(len, piece, size, rank)` names, concatenated (a
    /// sharded optimizer's gradients). With `piece` the all-reduce's call
    /// size, each element is summed as [`DeviceCollective::all_reduce_sum`]
    /// sums it. The default sums the whole of `t` and keeps the shard.
    fn reduce_scatter_shard(&mut self, t: Tensor<I, 1>, piece: usize) -> Result<Tensor<I, 1>> {
        let ranges = shard_ranges(t.dims()[0], piece, self.size(), self.rank());
        let sum = self.all_reduce_sum(t)?;
        Ok(gather_ranges(sum, &ranges))
    }

    /// The inverse of [`DeviceCollective::reduce_scatter_shard`]: a tensor
    /// of `len` elements holding every member's `shard` in its place (a
    /// sharded optimizer's updated parameters). The default places this
    /// member's shard in zeros and sums over the group: exact, but for a
    /// `-0.0` that comes back `+0.0`, at twice the traffic.
    fn all_gather_shard(
        &mut self,
        shard: Tensor<I, 1>,
        len: usize,
        piece: usize,
    ) -> Result<Tensor<I, 1>> {
        let ranges = shard_ranges(len, piece, self.size(), self.rank());
        let device = shard.device();
        let mut full = in_dtype(Tensor::<I, 1>::zeros([len], &device), shard.dtype());
        let mut at = 0;
        for r in ranges {
            let n = r.len();
            full = full.slice_assign(r, shard.clone().slice(at..at + n));
            at += n;
        }
        self.all_reduce_sum(full)
    }
}

/// The elements of `t` in `ranges`, concatenated (`t` itself when they
/// cover it).
pub fn gather_ranges<I: Backend>(t: Tensor<I, 1>, ranges: &[Range<usize>]) -> Tensor<I, 1> {
    let len = t.dims()[0];
    match ranges {
        [r] if *r == (0..len) => t,
        [r] => t.slice(r.clone()),
        _ => Tensor::cat(
            ranges.iter().map(|r| t.clone().slice(r.clone())).collect(),
            0,
        ),
    }
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

    /// The ring all-reduce's first half on each piece: this member keeps
    /// the chunk it finished, half the traffic of the all-reduce.
    fn reduce_scatter_shard(&mut self, t: Tensor<I, 1>, piece: usize) -> Result<Tensor<I, 1>> {
        let (n, rank) = (self.group.size(), self.group.rank());
        if n == 1 {
            return Ok(t);
        }
        let (mut host, back) = stage(t);
        let mut out = Vec::with_capacity(host.len() / n + n);
        for p in host.chunks_mut(piece.max(1)) {
            self.group.reduce_scatter_in_place(p)?;
            out.extend_from_slice(&p[chunk(p.len(), n, rank)]);
        }
        Ok(back(out))
    }

    /// The ring all-reduce's second half on each piece.
    fn all_gather_shard(
        &mut self,
        shard: Tensor<I, 1>,
        len: usize,
        piece: usize,
    ) -> Result<Tensor<I, 1>> {
        let (n, rank) = (self.group.size(), self.group.rank());
        if n == 1 {
            return Ok(shard);
        }
        let (host, back) = stage(shard);
        let mut full = vec![0f32; len];
        let mut at = 0;
        for p in full.chunks_mut(piece.max(1)) {
            let mine = chunk(p.len(), n, rank);
            p[mine.clone()].copy_from_slice(&host[at..at + mine.len()]);
            at += mine.len();
            self.group.all_gather_in_place(p)?;
        }
        Ok(back(full))
    }
}
