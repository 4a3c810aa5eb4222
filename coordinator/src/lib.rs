//! FaaSNet coordinator: the control plane of the function trees.
//!
//! For every (tenant, function) the coordinator keeps one balanced binary tree of the VMs
//! that run the function, and tells each VM only who its upstream is: its parent's peer
//! address, or "you are the root: read the registry". Image bytes never pass through it.
//!
//! - [`client`]: the library VMs (the snapshotter) use: [`client::CoordinatorClient`] for
//!   single calls and [`client::TreeMembership`] to stay in a tree in the background.
//! - [`server::serve`]: runs the gRPC service from a [`config::Config`].
//! - [`function_tree`]: the balanced tree itself, pure and property-tested.
//! - [`stripe_tree`]: the placement of a second stripe tree whose inner nodes are the
//!   function tree's leaves (not used by the service yet).
//! - [`forest`]: all trees with leases, watchers and persistence, without the network.
//!
//! See `docs/coordinator.md` for the design.

#![warn(missing_docs)]
// `tonic::Status` is large, but it is the error type tonic services and clients speak;
// boxing it everywhere would only add noise.
#![allow(clippy::result_large_err)]

pub mod client;
pub mod config;
pub mod forest;
pub mod function_tree;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod stripe_tree;
pub mod upstream;
pub mod validate;

/// Generated gRPC types and stubs (`proto/coordinator.proto`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("faasnet.coordinator.v1");
}

pub use client::{CoordinatorClient, MembershipOptions, TreeMembership};
pub use upstream::{Source, TreeKey, Upstream};
