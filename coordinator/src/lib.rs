//! The coordinator: it accepts jobs, places their ranks on slots, launches
//! and watches the workers. It never touches tensors.
//!
//! Today: [`placement`], which maps a job's world ranks onto an inventory's
//! slots. The job store, the gRPC services and health checks build on it.

pub mod placement;
