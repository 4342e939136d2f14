//! The coordinator: it accepts jobs, places their ranks on slots, launches
//! and watches the workers. It never touches tensors.
//!
//! [`placement`] maps a job's world ranks onto an inventory's slots;
//! [`store`] keeps jobs and their step history durably (redb); [`server`]
//! is the engine (queue, attempts, restarts, checkpoint commits) behind the
//! `JobService` and `ControlService` gRPC services, with one supervisor per
//! attempt (`supervisor`: processes, heartbeats, progress, stopping).
//! Wire types stay at the edge ([`convert`]); the engine works on [`job`]'s
//! domain types, and its one error type ([`error`]) becomes a gRPC status
//! in one place. [`sweeps`] runs a sweep file's points as jobs. [`http`]
//! serves Prometheus' `/metrics` and the dashboard (`dashboard`: embedded
//! pages, JSON, and each job's watch stream as server-sent events).

pub mod convert;
mod dashboard;
pub mod error;
pub mod http;
pub mod job;
pub mod placement;
pub mod server;
pub mod store;
mod supervisor;
pub mod sweeps;

pub use server::{Coordinator, CoordinatorConfig};
/// The launchers and slots a coordinator places workers with.
pub use strata_cluster as cluster;
pub use strata_cluster::{Inventory, Node};
