//! Hosts made of network namespaces: a bridge in the root namespace and one veth-attached netns per host.
//!
//! Hosts get no default route: traffic meant for an address the test did not create fails at once
//! instead of leaving the machine (where the sandbox gateway would answer anything).

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::process::Command;

/// One host: a network namespace with `eth0` on the bridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostNet {
    /// Name under `/run/netns`.
    pub netns: String,
    /// Root-namespace end of the veth (on the bridge).
    pub veth: String,
    /// The host's address on the bridge subnet.
    pub ip: Ipv4Addr,
}

impl HostNet {
    /// `/run/netns/<name>`, what `nsenter --net=` takes.
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// A command that runs `program` inside this host's network namespace.
    ///
    /// `nsenter --net` rather than `ip netns exec`: the latter remounts `/sys`, which hides the cgroup
    /// mounts the container runtime needs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(program);
        cmd
    }
}

/// The bridge and its hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topology {
    /// Bridge in the root namespace.
    pub bridge: String,
    /// First three octets of the /24 (the bridge is `.1`, hosts `.11`, `.12`, …).
    pub subnet: [u8; 3],
    /// The hosts.
    pub hosts: Vec<HostNet>,
}

impl Topology {
    /// Names and addresses for `hosts` hosts, nothing created yet.
    pub fn plan(bridge: &str, subnet: [u8; 3], hosts: &[(String, String)]) -> Topology {
        let hosts = hosts
            .iter()
            .enumerate()
            .map(|(i, (netns, veth))| HostNet {
                netns: netns.clone(),
                veth: veth.clone(),
                ip: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 11 + i as u8),
            })
            .collect();
        Topology {
            bridge: bridge.to_string(),
            subnet,
            hosts,
        }
    }

    /// The bridge's address: where hosts reach the hub and the registry.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    /// Creates the bridge and the hosts. On error, what was made stays for [`Topology::destroy`].
    pub fn create(&self) -> anyhow::Result<()> {
        let br = &self.bridge;
        ip(&["link", "add", br, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.bridge_ip()),
            "dev",
            br,
        ])?;
        ip(&["link", "set", br, "up"])?;
        for h in &self.hosts {
            self.create_host(h)?;
        }
        Ok(())
    }

    /// Creates one host (its netns, veth and address) on the existing bridge.
    pub fn create_host(&self, h: &HostNet) -> anyhow::Result<()> {
        ip(&["netns", "add", &h.netns])?;
        ip(&[
            "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.netns,
        ])?;
        ip(&["link", "set", &h.veth, "master", &self.bridge, "up"])?;
        ip(&[
            "-n",
            &h.netns,
            "addr",
            "add",
            &format!("{}/24", h.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &h.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Removes the hosts and the bridge, whatever exists of them. Returns what could not be removed.
    ///
    /// Deleting a namespace deletes the links inside it (the veth peers, the agents' bridges) once no
    /// process holds it any more; the root ends go with their peers, and are deleted again to be sure.
    pub fn destroy(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for h in &self.hosts {
            errors.extend(destroy_host(h));
        }
        if link_exists(&self.bridge) {
            if let Err(e) = ip(&["link", "del", &self.bridge]) {
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }
}

/// Removes one host (its netns and veth), whatever exists of it. Returns what could not be removed.
pub fn destroy_host(h: &HostNet) -> Vec<String> {
    let mut errors = Vec::new();
    if std::path::Path::new(&h.netns_path()).exists() {
        if let Err(e) = ip(&["netns", "del", &h.netns]) {
            errors.push(format!("{e:#}"));
        }
    }
    // The root end vanishes asynchronously once its namespace is gone: a failure only counts if the
    // link is still there afterwards.
    if link_exists(&h.veth) {
        if let Err(e) = ip(&["link", "del", &h.veth]) {
            if link_exists(&h.veth) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    errors
}

/// A /24 in 10.200.0.0–10.249.255.0 that no root-namespace address or route uses yet.
pub fn free_subnet() -> anyhow::Result<[u8; 3]> {
    use rand::Rng;
    let used = ip(&["-4", "-o", "addr", "show"])? + &ip(&["-4", "route", "show", "table", "all"])?;
    let mut rng = rand::rng();
    for _ in 0..100 {
        let s = [10, rng.random_range(200..250u8), rng.random::<u8>()];
        let probe = format!(" {}.{}.{}.", s[0], s[1], s[2]);
        if !used.contains(&probe) {
            return Ok(s);
        }
    }
    bail!("no free 10.2xx.x.0/24 found")
}

/// Whether a link of that name exists in the root namespace.
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Runs `ip ARGS`, returning stdout; the error carries the command and its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
