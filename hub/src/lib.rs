//! berth-hub: the REST + gRPC API over etcd and the scheduler loop.
//!
//! Layering: `api` (REST and gRPC edges) → `service` (one code path for both, validation, errors) →
//! `store` (etcd key layout, typed records, transactions). `reconciler` is the leader-elected loop that
//! places instances with `scheduler` and `ipam` and releases what agents removed.
#![forbid(unsafe_code)]
// Tests may unwrap (COMMON.md): a failing test should point at the line.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod alerts;
pub mod api;
pub mod ca;
pub mod events;
pub mod ipam;
pub mod metrics;
pub mod netview;
pub mod reconciler;
pub mod scheduler;
pub mod service;
pub mod store;
