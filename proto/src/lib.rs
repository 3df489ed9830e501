//! berth's wire contract and the value formats every binary shares.
//!
//! `v1` is generated from `proto/berth/v1/berth.proto` by `tonic-prost-build`; it holds the only types
//! that cross the wire. `units` parses and prints the cpu and memory quantities users type, `duration` the durations.
#![forbid(unsafe_code)]

pub mod duration;
pub mod units;

/// Generated protobuf messages and tonic clients/servers of `berth.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("berth.v1");
}
