//! Live migration: a running container moves to another node with its memory, files, IP and open
//! connections. CRIU checkpoints it; only the pages that changed since the previous round cross
//! the wire (`pages`), framed and checksummed on QUIC streams (`wire`).

/// UDP port of the migration endpoint unless `--listen-migration` says otherwise.
pub const DEFAULT_PORT: u16 = 9752;

pub mod lazy_relay;
pub mod link;
pub mod page_proto;
pub mod pages;
pub mod postcopy;
pub mod session;
pub mod transport;
pub mod wire;
pub mod write_rate;

#[cfg(test)]
mod test_pki;
