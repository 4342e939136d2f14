//! Joining a group: the seam between a rank's plan of its groups (which
//! the rendezvous derives from the coordinator's assignment) and the
//! backend that carries them.
//!
//! A [`CollectiveBackend`] turns a [`GroupPlan`] into a host
//! [`Collective`]: over TCP between processes ([`TcpEndpoint`]), or over
//! channels between threads of one process ([`LocalHub`]). A
//! [`DeviceBackend`] joins the same group on device tensors (NCCL on
//! GPUs), bootstrapped over the host group already joined. Neither the
//! trainer nor the rendezvous knows which backend it was given.

use std::collections::HashMap;
use std::sync::Mutex;

use burn::tensor::backend::Backend;

use super::{Collective, CollectiveError, DeviceCollective, LocalCollective, local_group};

/// A member of a planned group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's world rank (to name it in errors).
    pub rank: u32,
    /// Where its backend reaches it (a TCP backend's `host:port`; other
    /// backends may ignore it).
    pub addr: String,
}

/// One group a rank joins: every member joins with the same name and the
/// same members in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// Unique per group within the job's attempt (a worker of an ended
    /// attempt cannot join the next one's groups).
    pub name: String,
    /// The members in group order.
    pub members: Vec<Member>,
    /// This rank's index among them.
    pub me: usize,
}

impl GroupPlan {
    pub fn size(&self) -> usize {
        self.members.len()
    }
}

/// Why joining a group failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "group `{group}`: rank {rank} of {size} has {addrs} member addresses (one per member, in rank order)"
    )]
    BadGroup {
        group: String,
        rank: usize,
        size: usize,
        addrs: usize,
    },
    #[error("group `{group}`: world rank {rank}'s address {addr:?}: {why}")]
    Address {
        group: String,
        rank: u32,
        addr: String,
        why: String,
    },
    #[error("group `{group}`: member {me} joined it twice")]
    Twice { group: String, me: usize },
    #[error("group `{group}`: {size} members planned, but it was first joined with {first}")]
    SizeMismatch {
        group: String,
        size: usize,
        first: usize,
    },
    #[error("group `{group}` on the device: {why}")]
    Device { group: String, why: String },
    #[error("group `{group}`: bootstrapping over the host group: {source}")]
    Bootstrap {
        group: String,
        #[source]
        source: CollectiveError,
    },
}

/// Joins host groups.
pub trait CollectiveBackend: Sync {
    /// The backend's name, for logs (`tcp`, `local`).
    fn name(&self) -> &'static str;

    /// Joins `plan`'s group as member `plan.me`. A backend may connect
    /// nothing yet: a member that never comes is then named by the first
    /// operation that needs it.
    fn join(&self, plan: &GroupPlan) -> Result<Box<dyn Collective>, JoinError>;
}

/// Joins groups on device tensors (the data-parallel gradient sums),
/// over a host group of the same members already joined.
pub trait DeviceBackend<I: Backend> {
    /// The backend's name, for logs (`nccl`).
    fn name(&self) -> &'static str;

    /// Joins `plan`'s group on the device; `host` is the same group on
    /// the host backend, for whatever the device group must agree on
    /// first (NCCL's unique id).
    fn join(
        &self,
        plan: &GroupPlan,
        host: &mut dyn Collective,
    ) -> Result<Box<dyn DeviceCollective<I> + Send>, JoinError>;
}

/// In-process groups: members are threads of one process, each joining
/// the hub with the same plan; the group's channels are made when its
/// first member joins and handed out by index, so joining never waits.
#[derive(Default)]
pub struct LocalHub {
    /// Groups some member has not joined yet: each member's end, taken
    /// when it joins.
    pending: Mutex<HashMap<String, Vec<Option<LocalCollective>>>>,
}

impl LocalHub {
    pub fn new() -> LocalHub {
        LocalHub::default()
    }
}

impl CollectiveBackend for LocalHub {
    fn name(&self) -> &'static str {
        "local"
    }

    fn join(&self, plan: &GroupPlan) -> Result<Box<dyn Collective>, JoinError> {
        let size = plan.size();
        if plan.me >= size {
            return Err(JoinError::BadGroup {
                group: plan.name.clone(),
                rank: plan.me,
                size,
                addrs: size,
            });
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ends = pending
            .entry(plan.name.clone())
            .or_insert_with(|| local_group(size).into_iter().map(Some).collect());
        if ends.len() != size {
            return Err(JoinError::SizeMismatch {
                group: plan.name.clone(),
                size,
                first: ends.len(),
            });
        }
        let mine = ends[plan.me].take().ok_or_else(|| JoinError::Twice {
            group: plan.name.clone(),
            me: plan.me,
        })?;
        let everyone_in = ends.iter().all(Option::is_none);
        if everyone_in {
            pending.remove(&plan.name);
        }
        Ok(Box::new(mine))
    }
}
