//! Flow-level discrete-event simulator of FaaSNet cold starts (issue 5).
//!
//! The model (docs/simulator.md): VMs and a registry are nodes with an uplink and a downlink;
//! image blocks move as flows with max-min fair rates ([`network`]); VMs are placed in the
//! function tree by the coordinator's own [`faasnet_coordinator::function_tree::FunctionTree`]
//! ([`tree`]); each VM reads its start working set in the recorded order ([`model`]).

pub mod error;
pub mod model;
pub mod network;
pub mod trace;
pub mod tree;

pub use error::{Result, SimError};
pub mod calibrate;
pub mod plot;
pub mod replay;
pub mod scenario;
