//! The coordinator: it accepts jobs, places their ranks on slots, launches
//! and watches the workers. It never touches tensors.
//!
//! Types sit at the bottom and know nothing above them: [`job`] and
//! [`sweep`] (the records), [`ranges`] (ranks named as ranges),
//! [`error`], [`store`] (the durable store, one writer thread),
//! [`placement`] and [`config`], and [`tensorboard`] (each job's event
//! files, one writer thread). The [`engine`] alone owns the state —
//! queue, attempts, checkpoint commits, resume planning, sweeps — and
//! decides under its lock, acting outside it. The adapters sit on top:
//! [`rpc`] (the gRPC services, with every protobuf conversion in
//! [`rpc::convert`]) and [`http`] (`/metrics` and the dashboard). The
//! [`server`] runs them; [`startup`] turns the command line's options
//! into a running coordinator.

pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod job;
pub mod net;
pub mod placement;
pub mod ranges;
pub mod rpc;
pub mod server;
pub mod startup;
pub mod store;
pub mod sweep;
pub mod tensorboard;
pub mod tls;

pub use config::CoordinatorConfig;
pub use server::{Coordinator, StartError};
/// The launchers and slots a coordinator places workers with.
pub use strata_cluster as cluster;
pub use strata_cluster::{Inventory, Node};
