//! DNS for berth names, served by every node on the gateway address of each local network.
//!
//! Containers get a `resolv.conf` ([`resolv_conf`]) naming their network's gateway as
//! nameserver. [`DnsServer`] listens there (UDP and TCP) and answers:
//!
//! - `<container>.<network>.berth` → A record of the container's service VIP;
//!   `<instance>.<container>.<network>.berth` → A record of that replica's address; TTL
//!   [`TTL`] seconds, since replicas move. Names are case-insensitive.
//! - other types of a known name, `berth.` and `<network>.berth` → NOERROR without answers
//!   (NODATA); unknown names under `berth.` → NXDOMAIN. Both authoritative, with the zone's SOA
//!   in the authority section so resolvers cache the miss for [`TTL`] seconds only.
//! - any other name → relayed unchanged to the node's upstream resolvers (read from the host's
//!   `/etc/resolv.conf` with [`upstreams_from_resolv_conf`]), tried in order within
//!   [`DEFAULT_FORWARD_TIMEOUT`] overall; SERVFAIL when none answers in time; NXDOMAIN (not
//!   authoritative) when the node has no upstream.
//! - malformed queries → FORMERR with the query's id when a header is there, else dropped;
//!   other opcodes → NOTIMP. Responses are never answered.
//!
//! The table of names ([`Records`]) is rebuilt by the agent from its view of the cluster and
//! swapped in whole with [`DnsServer::set_records`].
//!
//! Architecture invariant: the server never crashes on input; a listener's sockets close when
//! its address is no longer listed, so a network's bridge can go away.

mod forward;
mod handler;
mod records;
mod resolv;
mod server;

pub use handler::TTL;
pub use records::{instance_name, service_name, Lookup, RecordError, Records, ZONE};
pub use resolv::{resolv_conf, upstreams_from_resolv_conf};
pub use server::{DnsError, DnsServer, DEFAULT_FORWARD_TIMEOUT, DNS_PORT};
