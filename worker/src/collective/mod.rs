//! Collectives behind one trait.
//!
//! A backend implements point-to-point transfers ([`Collective::send`],
//! [`Collective::recv`] and the deadlock-free exchange
//! [`Collective::send_recv`]); the algorithms for all-reduce,
//! reduce-scatter and all-gather are provided on top of them, and every
//! backend sums in the same order (results are bit-identical across
//! backends). Large buffers go round a ring, which moves 2·(n−1)/n of the
//! buffer per rank whatever the group size; small ones (the per-step
//! scalars: the stop flag, the loss, the norm, the stages' records) are
//! gathered in ⌈log₂ n⌉ rounds ([`bruck_all_gather`]) and folded in member
//! order, so a group of 2,048 agrees on a scalar in 11 exchanges rather
//! than 4,094. A backend with native collectives (NCCL) overrides them.
//!
//! Ranks here are indices within the group, `0..size`; the layout maps them to
//! world ranks.
//!
//! These are host collectives, on `f32` slices. [`DeviceCollective`] is
//! the same group's operations on device tensors; [`Staged`] runs a host
//! collective through a staging copy. A rank joins its groups through a
//! [`CollectiveBackend`] (TCP, in-process) and its device groups through a
//! [`DeviceBackend`] (NCCL), each from a [`GroupPlan`].

mod backend;
pub mod conformance;
mod device;
mod local;
pub mod scale;
pub mod tcp;

pub use backend::{CollectiveBackend, DeviceBackend, GroupPlan, JoinError, LocalHub, Member};
pub use device::{DeviceCollective, Staged, gather_ranges};
pub use local::{LocalCollective, local_group};
pub use tcp::{TcpCollective, TcpEndpoint, TcpOptions};

/// What a point-to-point message carries, sent with it and checked on
/// receipt: a pipeline schedule that sends the wrong microbatch, the wrong
/// direction, the wrong model chunk or a stale step fails loudly instead of
/// training on it.
///
/// The bits are the kind (top 8), the step (next 24, modulo 2^24), the
/// virtual pipeline stage the message is for (next 12) and the microbatch
/// (low 20); collective algorithms' own traffic is [`Tag::COLLECTIVE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u64);

impl Tag {
    /// The traffic of the ring algorithms and plain `send`/`recv`.
    pub const COLLECTIVE: Tag = Tag(0);
    const ACTIVATION: u64 = 1;
    const GRADIENT: u64 = 2;

    fn pipeline(kind: u64, step: u64, stage: u32, microbatch: u32) -> Tag {
        Tag(kind << 56
            | (step & 0xFF_FFFF) << 32
            | u64::from(stage & 0xFFF) << 20
            | u64::from(microbatch & 0xF_FFFF))
    }

    /// Microbatch `microbatch`'s activations of step `step`, sent forward
    /// to virtual pipeline stage `stage` (the stage index without
    /// interleaving).
    pub fn activation(step: u64, stage: u32, microbatch: u32) -> Tag {
        Tag::pipeline(Tag::ACTIVATION, step, stage, microbatch)
    }

    /// The gradient of microbatch `microbatch`'s activations at step
    /// `step`, sent back to virtual pipeline stage `stage`, which produced
    /// them.
    pub fn gradient(step: u64, stage: u32, microbatch: u32) -> Tag {
        Tag::pipeline(Tag::GRADIENT, step, stage, microbatch)
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.0 >> 56;
        let (step, stage, mb) = (
            (self.0 >> 32) & 0xFF_FFFF,
            (self.0 >> 20) & 0xFFF,
            self.0 & 0xF_FFFF,
        );
        match kind {
            0 if self.0 == 0 => write!(f, "collective traffic"),
            Tag::ACTIVATION => write!(
                f,
                "the activations of step {step}, microbatch {mb}, for stage {stage}"
            ),
            Tag::GRADIENT => write!(
                f,
                "the gradient of step {step}, microbatch {mb}, for stage {stage}"
            ),
            _ => write!(f, "tag {:#018x}", self.0),
        }
    }
}

/// Why a collective failed; each names the peer involved.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("group rank {peer} is gone (its end of the link closed)")]
    PeerGone { peer: usize },
    #[error("group rank {peer} sent {got} where {expected} was expected (a schedule bug)")]
    WrongMessage {
        peer: usize,
        expected: Tag,
        got: Tag,
    },
    #[error("group rank {peer} sent {got} elements where {expected} were expected")]
    SizeMismatch {
        peer: usize,
        expected: usize,
        got: usize,
    },
    #[error("group rank {peer} is outside a group of {size}")]
    NoSuchPeer { peer: usize, size: usize },
    #[error("{op}: buffer of {got} elements, expected {expected}")]
    BadBuffer {
        op: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("link to group rank {peer}: {source}")]
    Io { peer: usize, source: std::io::Error },
    /// No link to the peer could be made (it never connected, or its
    /// endpoint could not be reached or proved itself).
    #[error("group rank {peer} could not be linked: {why}")]
    Unreachable { peer: usize, why: String },
    /// A device collective (NCCL) failed on this member's side; no peer
    /// is known to be the cause.
    #[error("on the device: {0}")]
    Device(String),
}

impl CollectiveError {
    /// The group rank of the peer the failure involves, when it is one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CollectiveError::PeerGone { peer }
            | CollectiveError::WrongMessage { peer, .. }
            | CollectiveError::SizeMismatch { peer, .. }
            | CollectiveError::Io { peer, .. }
            | CollectiveError::Unreachable { peer, .. } => Some(*peer),
            CollectiveError::NoSuchPeer { .. }
            | CollectiveError::BadBuffer { .. }
            | CollectiveError::Device(_) => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

/// The range of chunk `i` when `len` elements are split into `n` chunks as
/// evenly as possible: the part of a buffer that member `i` of a group of
/// `n` reduces in the ring algorithms.
pub fn chunk(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    (i * len / n)..((i + 1) * len / n)
}

/// Member `rank`'s shard of a buffer of `len` elements that a group of `n`
/// all-reduces in calls of at most `piece` elements: in each piece, the
/// chunk the ring reduces at `rank` ([`chunk`]). A sharded optimizer owns
/// exactly these elements, so its reduce-scatter sums each of them in the
/// order the all-reduce would, and the results are bit-identical.
pub fn shard_ranges(
    len: usize,
    piece: usize,
    n: usize,
    rank: usize,
) -> Vec<std::ops::Range<usize>> {
    let piece = piece.max(1);
    (0..len.div_ceil(piece))
        .map(|k| {
            let start = k * piece;
            let c = chunk((len - start).min(piece), n, rank);
            start + c.start..start + c.end
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// A reduction or gather of at most this many elements over the whole
/// group (a reduction's buffer times the group's size; a gather's output)
/// takes [`bruck_all_gather`]'s ⌈log₂ n⌉ rounds instead of a ring's
/// n − 1 or 2·(n − 1): latency, not bandwidth, is what such a message
/// costs.
pub const SMALL_ELEMS: usize = 1 << 15;

/// A process group's collective operations, from one member's side. Every
/// member must call the same operations in the same order.
pub trait Collective: Send {
    /// This member's index in the group.
    fn rank(&self) -> usize;
    /// Number of members.
    fn size(&self) -> usize;

    /// Sends `data` to `peer`, labelled `tag`. Never waits for the peer
    /// to receive (messages are queued), so any order of sends and
    /// receives that a schedule allows cannot deadlock on a send.
    fn send_tagged(&mut self, peer: usize, tag: Tag, data: &[f32]) -> Result<()>;
    /// Receives exactly `out.len()` elements from `peer`, which must be the
    /// next message it sent this member and must carry `tag`.
    fn recv_tagged(&mut self, peer: usize, tag: Tag, out: &mut [f32]) -> Result<()>;

    /// Sends `data` to `peer` ([`Tag::COLLECTIVE`]).
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        self.send_tagged(peer, Tag::COLLECTIVE, data)
    }
    /// Receives exactly `out.len()` elements from `peer` ([`Tag::COLLECTIVE`]).
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        self.recv_tagged(peer, Tag::COLLECTIVE, out)
    }

    /// Sends to `to` while receiving from `from`. Backends whose `send` can
    /// block until the peer receives (TCP) must override this so that a ring
    /// of members all exchanging at once cannot deadlock.
    fn send_recv(&mut self, to: usize, data: &[f32], from: usize, out: &mut [f32]) -> Result<()> {
        self.send(to, data)?;
        self.recv(from, out)
    }

    /// Element-wise sum over the group, in place on every member.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        if buf.len() * n <= SMALL_ELEMS {
            return gather_fold(self, buf, |x, y| *x += y);
        }
        ring_reduce_scatter(self, buf, |x, y| *x += y)?;
        ring_all_gather(self, buf)
    }

    /// Element-wise maximum over the group, in place on every member.
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        if buf.len() * n <= SMALL_ELEMS {
            return gather_fold(self, buf, |x, y| *x = x.max(y));
        }
        ring_reduce_scatter(self, buf, |x, y| *x = x.max(y))?;
        ring_all_gather(self, buf)
    }

    /// `input` holds `size` equal parts; member r receives in `out` the sum
    /// over the group of part r.
    fn reduce_scatter_sum(&mut self, input: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.size();
        if input.len() != out.len() * n {
            return Err(CollectiveError::BadBuffer {
                op: "reduce_scatter",
                expected: out.len() * n,
                got: input.len(),
            });
        }
        let mut work = input.to_vec();
        ring_reduce_scatter(self, &mut work, |x, y| *x += y)?;
        out.copy_from_slice(&work[chunk(work.len(), n, self.rank())]);
        Ok(())
    }

    /// Member r's `input` lands in part r of every member's `out`.
    fn all_gather(&mut self, input: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.size();
        if out.len() != input.len() * n {
            return Err(CollectiveError::BadBuffer {
                op: "all_gather",
                expected: input.len() * n,
                got: out.len(),
            });
        }
        if out.len() <= SMALL_ELEMS {
            return bruck_all_gather(self, input, out);
        }
        let mine = chunk(out.len(), n, self.rank());
        out[mine].copy_from_slice(input);
        ring_all_gather(self, out)
    }

    /// The first half of [`Collective::all_reduce_sum`]: afterwards
    /// `buf[chunk(len, size, rank)]` holds the group's sum of that part
    /// (the rest holds partial sums, or sums too), each element summed in the
    /// same order as by the all-reduce.
    fn reduce_scatter_in_place(&mut self, buf: &mut [f32]) -> Result<()> {
        // A small buffer is summed whole, as the all-reduce sums it (the
        // rest of the buffer then holds the sums too).
        if buf.len() * self.size() <= SMALL_ELEMS {
            return gather_fold(self, buf, |x, y| *x += y);
        }
        ring_reduce_scatter(self, buf, |x, y| *x += y)
    }

    /// The second half of [`Collective::all_reduce_sum`]: every member's
    /// `buf[chunk(len, size, rank)]` lands in the same place of every
    /// member's `buf`.
    fn all_gather_in_place(&mut self, buf: &mut [f32]) -> Result<()> {
        ring_all_gather(self, buf)
    }

    /// `root`'s `buf` is copied to every member's `buf`.
    fn broadcast(&mut self, root: usize, buf: &mut [f32]) -> Result<()> {
        let n = self.size();
        if root >= n {
            return Err(CollectiveError::NoSuchPeer {
                peer: root,
                size: n,
            });
        }
        // A pipelined chain from the root: each member forwards what it got,
        // so the root sends the buffer once however large the group.
        let me = (self.rank() + n - root) % n;
        if me > 0 {
            self.recv((self.rank() + n - 1) % n, buf)?;
        }
        if me + 1 < n {
            self.send((self.rank() + 1) % n, buf)?;
        }
        Ok(())
    }

    /// Returns once every member has entered the barrier.
    fn barrier(&mut self) -> Result<()> {
        let mut token = [0f32];
        self.all_reduce_sum(&mut token)
    }
}

/// Every member's `input` (all of one length `k`) lands in `out[r·k..]`
/// for its rank `r`, in ⌈log₂ n⌉ rounds for any n (Bruck et al., 1997):
/// in round i a member sends what it holds of the members after it, at
/// most 2^i of them, to the member 2^i before it, and receives as much
/// from the member 2^i after it. Each member sends n − 1 inputs in all,
/// as round a ring, but waits on ⌈log₂ n⌉ messages instead of n − 1.
pub fn bruck_all_gather<C: Collective + ?Sized>(
    c: &mut C,
    input: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let (n, r, k) = (c.size(), c.rank(), input.len());
    if out.len() != k * n {
        return Err(CollectiveError::BadBuffer {
            op: "all_gather",
            expected: k * n,
            got: out.len(),
        });
    }
    // `held[i·k..]` is member (r + i) mod n's input.
    let mut held = Vec::with_capacity(k * n);
    held.extend_from_slice(input);
    let mut incoming = Vec::new();
    let mut dist = 1;
    while dist < n {
        let count = dist.min(n - dist);
        incoming.resize(count * k, 0.0);
        c.send_recv(
            (r + n - dist) % n,
            &held[..count * k],
            (r + dist) % n,
            &mut incoming,
        )?;
        held.extend_from_slice(&incoming);
        dist *= 2;
    }
    for (i, part) in held.chunks(k.max(1)).take(n).enumerate() {
        let m = (r + i) % n;
        out[m * k..(m + 1) * k].copy_from_slice(part);
    }
    Ok(())
}

/// A small all-reduce: every member's buffer gathered
/// ([`bruck_all_gather`]), then folded with `op` in member order, so every
/// member computes the same result from the same operands in the same
/// order.
fn gather_fold<C: Collective + ?Sized>(
    c: &mut C,
    buf: &mut [f32],
    op: impl Fn(&mut f32, f32),
) -> Result<()> {
    let k = buf.len();
    if k == 0 {
        return Ok(());
    }
    let mut all = vec![0f32; k * c.size()];
    bruck_all_gather(c, buf, &mut all)?;
    buf.copy_from_slice(&all[..k]);
    for member in all.chunks(k).skip(1) {
        for (x, &y) in buf.iter_mut().zip(member) {
            op(x, y);
        }
    }
    Ok(())
}

/// The ring all-reduce whatever the buffer's size: 2·(n − 1) exchanges
/// (what [`Collective::all_reduce_sum`] does for large buffers; exposed
/// to measure it against the log-round algorithm on small ones).
pub fn ring_all_reduce_sum<C: Collective + ?Sized>(c: &mut C, buf: &mut [f32]) -> Result<()> {
    ring_reduce_scatter(c, buf, |x, y| *x += y)?;
    ring_all_gather(c, buf)
}

/// `buf[s]` to read and `buf[d]` to write, for ranges that do not overlap.
fn disjoint(
    buf: &mut [f32],
    s: std::ops::Range<usize>,
    d: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if s.end <= d.start {
        let (a, b) = buf.split_at_mut(d.start);
        (&a[s], &mut b[..d.len()])
    } else {
        debug_assert!(d.end <= s.start, "{s:?} and {d:?} overlap");
        let (a, b) = buf.split_at_mut(s.start);
        (&b[..s.len()], &mut a[d])
    }
}

/// Ring reduce-scatter in place: afterwards chunk `rank` of `buf` holds the
/// group's reduction (`op` folds an incoming value into the local one) of
/// that chunk; other chunks hold partial reductions.
fn ring_reduce_scatter<C: Collective + ?Sized>(
    c: &mut C,
    buf: &mut [f32],
    op: impl Fn(&mut f32, f32),
) -> Result<()> {
    let (n, r) = (c.size(), c.rank());
    if n == 1 {
        return Ok(());
    }
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    let mut incoming = vec![0f32; buf.len().div_ceil(n) + 1];
    for step in 0..n - 1 {
        let send_idx = (r + 2 * n - step - 1) % n;
        let recv_idx = (r + 2 * n - step - 2) % n;
        let (s, d) = (chunk(buf.len(), n, send_idx), chunk(buf.len(), n, recv_idx));
        let inc = &mut incoming[..d.len()];
        c.send_recv(right, &buf[s], left, inc)?;
        for (x, y) in buf[d].iter_mut().zip(inc.iter()) {
            op(x, *y);
        }
    }
    Ok(())
}

/// Ring all-gather in place: chunk `rank` of `buf` is this member's; afterwards
/// every chunk holds its owner's.
fn ring_all_gather<C: Collective + ?Sized>(c: &mut C, buf: &mut [f32]) -> Result<()> {
    let (n, r) = (c.size(), c.rank());
    if n == 1 {
        return Ok(());
    }
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    for step in 0..n - 1 {
        let send_idx = (r + n - step) % n;
        let recv_idx = (r + 2 * n - step - 1) % n;
        let (s, d) = (chunk(buf.len(), n, send_idx), chunk(buf.len(), n, recv_idx));
        let (outgoing, incoming) = disjoint(buf, s, d);
        c.send_recv(right, outgoing, left, incoming)?;
    }
    Ok(())
}
