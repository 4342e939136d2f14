//! The coordinator: it accepts jobs, places their ranks on slots, launches
//! and watches the workers. It never touches tensors.
//!
//! [`placement`] maps a job's world ranks onto an inventory's slots;
//! [`store`] keeps jobs and their step history durably (redb); [`server`]
//! is the engine (queue, launch, heartbeats, failure causes) behind the
//! `JobService` and `ControlService` gRPC services. Wire types stay at the
//! edge ([`convert`]); the engine works on [`job`]'s domain types.

pub mod convert;
pub mod job;
pub mod placement;
pub mod server;
pub mod store;

pub use server::{Coordinator, CoordinatorConfig};
/// The slots a coordinator places workers in (its configuration).
pub use strata_cluster::{Inventory, Node};
