//! The end-to-end harness: a whole berth cluster on one machine, made of real processes.
//!
//! A [`Cluster`] is etcd, an OCI registry, one `berth-hub` and N `berth-agent`s, each agent in its own
//! network namespace ("host") hanging off a bridge in the root namespace. Every name (namespaces, links,
//! node ids, directories) carries a per-run prefix and the subnet is picked per run, so clusters started
//! in parallel never collide. Dropping the cluster removes everything it made, also when a test panics,
//! including the containers the agents left behind.
//!
//! The same code backs `cargo xtask up`/`down` (a detached cluster with fixed names whose state is written
//! to disk) and `cargo xtask bench`.

pub mod api;
pub mod cleanup;
pub mod cluster;
pub mod image;
pub mod netns;
pub mod paths;
pub mod process;
pub mod prom;
pub mod stream;

pub use api::{Api, Reply};
pub use cluster::{Cluster, ClusterBuilder, ClusterState};
pub use paths::{Binaries, Profile};

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Whether `ip` lies in `cidr` (IPv4, e.g. "10.10.0.0/16"); false when either does not parse.
pub fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (Ok(ip), Some((net, len))) = (ip.parse::<Ipv4Addr>(), cidr.split_once('/')) else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Polls `probe` every `every` until it returns `Ok(Some(_))` or `timeout` passes.
///
/// The error names `what` and carries the last error the probe returned (or the last "not yet"), so a
/// failed wait says what it was waiting on and what it saw.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        std::thread::sleep(every);
    }
}

/// Like [`wait_until`], but the probe reports what it saw when the answer is "not yet", so the timeout
/// error shows the last state (e.g. a container's JSON) rather than a bare "timed out".
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let mut seen = String::new();
    let found = wait_until(what, timeout, Duration::from_millis(100), || {
        match probe()? {
            Ok(v) => Ok(Some(v)),
            Err(state) => {
                seen = state;
                Ok(None)
            }
        }
    });
    found.map_err(|e| {
        if seen.is_empty() {
            e
        } else {
            e.context(format!("last state seen: {seen}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_membership() {
        assert!(in_cidr("10.10.3.7", "10.10.0.0/16"));
        assert!(!in_cidr("10.11.0.1", "10.10.0.0/16"));
        assert!(in_cidr("1.2.3.4", "0.0.0.0/0"));
        assert!(!in_cidr("nope", "10.10.0.0/16"));
        assert!(!in_cidr("10.10.0.1", "10.10.0.0/33"));
    }
}
