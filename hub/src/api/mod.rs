//! The API edges: REST (axum) and gRPC (tonic), both thin layers over [`crate::service::Service`].

pub mod events;
pub mod grpc;
pub mod grpc_events;
pub mod lifecycle;
pub mod logs;
pub mod migrations;
pub mod nodes;
pub mod rest;
mod rest_types;

pub use rest_types::{error_body, parse_body};
