//! berth's node agent.
//!
//! The agent turns the desired state the hub streams for this node into running containers and
//! reports back what it sees. Each module owns one responsibility and one kind of kernel object:
//! `image` (OCI pulls, layer cache, overlay rootfs), `runtime` (youki's libcontainer), `network`
//! (bridges and veths over netlink), `reconcile` (desired vs actual), `hub` (the gRPC link).

pub mod api;
pub mod checkpoint;
pub mod dataplane;
pub mod dns;
pub mod ebpf;
pub mod health;
pub mod host;
pub mod hub;
pub mod image;
pub mod logs;
pub mod metrics;
pub mod migrate;
pub mod network;
pub mod reconcile;
pub mod runtime;
pub mod status;
pub mod tls;
