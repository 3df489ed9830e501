//! An in-memory [`Netlink`] for unit tests: models links, veth pairs across namespaces, bridge
//! ports and addresses closely enough for the manager's logic, records every call and fails on
//! demand.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::netlink::mac_text;
use super::{
    configure_peer, BridgePortFlags, FdbEntry, Link, LinkKind, Neighbour, Netlink, NetlinkError,
    NetworkError, PeerPlan, VethPlan, VxlanParams,
};

/// A network namespace of the fake: the agent's own, or a container's by init pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ns {
    Host,
    Pid(i32),
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ns::Host => write!(f, "host"),
            Ns::Pid(pid) => write!(f, "pid{pid}"),
        }
    }
}

#[derive(Debug, Clone)]
struct FakeLink {
    ns: Ns,
    link: Link,
    /// The other end of a veth pair.
    peer: Option<u32>,
    addresses: Vec<(Ipv4Addr, u8)>,
    mac: Option<[u8; 6]>,
    default_gateway: Option<Ipv4Addr>,
    /// In kernel order; a MAC may appear with several destinations (as `bridge fdb append`
    /// makes), which only [`FakeNetlink::push_fdb`] produces.
    fdb: Vec<FdbEntry>,
    neighbours: Vec<Neighbour>,
}

#[derive(Debug)]
struct Failure {
    op: &'static str,
    ns: Option<Ns>,
    errno: i32,
}

#[derive(Debug, Default)]
struct State {
    next_index: u32,
    links: Vec<FakeLink>,
    namespaces: HashSet<Ns>,
    dead: HashSet<i32>,
    calls: Vec<String>,
    failures: Vec<Failure>,
    forwarding: bool,
}

/// The fake; clones share one state (as a host handle and the handles "inside" containers do).
#[derive(Debug, Clone)]
pub struct FakeNetlink {
    state: Arc<Mutex<State>>,
    ns: Ns,
}

impl FakeNetlink {
    /// A fake host namespace holding only `lo`.
    pub fn new() -> Self {
        let fake = Self {
            state: Arc::new(Mutex::new(State {
                next_index: 1,
                ..State::default()
            })),
            ns: Ns::Host,
        };
        fake.state().ensure_ns(Ns::Host);
        fake
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake netlink state poisoned")
    }

    /// The next call of `op` (in any namespace) fails with `errno`. Queued failures apply in order.
    pub fn fail(&self, op: &'static str, errno: i32) {
        self.state().failures.push(Failure {
            op,
            ns: None,
            errno,
        });
    }

    /// The next call of `op` in namespace `ns` fails with `errno`.
    pub fn fail_in(&self, ns: Ns, op: &'static str, errno: i32) {
        self.state().failures.push(Failure {
            op,
            ns: Some(ns),
            errno,
        });
    }

    /// The process `pid` is gone: its namespace can't be reached any more, and its links vanish
    /// (a veth pair dies with its namespace).
    pub fn kill(&self, pid: i32) {
        let mut state = self.state();
        state.dead.insert(pid);
        let doomed: Vec<u32> = state
            .links
            .iter()
            .filter(|l| l.ns == Ns::Pid(pid))
            .map(|l| l.link.index)
            .collect();
        for index in doomed {
            state.remove(index);
        }
    }

    /// Adds a link of `kind` named `name` in `ns`, as if someone else had made it.
    pub fn add_link(&self, ns: Ns, name: &str, kind: LinkKind) -> u32 {
        let mut state = self.state();
        state.ensure_ns(ns);
        state.push(ns, name, kind, 1500)
    }

    /// Adds an FDB entry to link `name` of `ns` as is (no replace), as something else might.
    pub fn push_fdb(&self, ns: Ns, name: &str, entry: FdbEntry) {
        if let Some(link) = self.state().by_name(ns, name) {
            link.fdb.push(entry);
        }
    }

    /// Adds a neighbour entry to link `name` of `ns` as is, as something else might.
    pub fn push_neighbour(&self, ns: Ns, name: &str, neighbour: Neighbour) {
        if let Some(link) = self.state().by_name(ns, name) {
            link.neighbours.push(neighbour);
        }
    }

    /// FDB entries of link `name` in `ns`, sorted.
    pub fn fdb(&self, ns: Ns, name: &str) -> Vec<FdbEntry> {
        let mut entries = self
            .state()
            .by_name(ns, name)
            .map(|l| l.fdb.clone())
            .unwrap_or_default();
        entries.sort();
        entries
    }

    /// Neighbour entries of link `name` in `ns`, sorted.
    pub fn neighbours(&self, ns: Ns, name: &str) -> Vec<Neighbour> {
        let mut entries = self
            .state()
            .by_name(ns, name)
            .map(|l| l.neighbours.clone())
            .unwrap_or_default();
        entries.sort();
        entries
    }

    /// Hardware address given to link `name` of `ns` at creation, if any.
    pub fn mac(&self, ns: Ns, name: &str) -> Option<[u8; 6]> {
        self.state().by_name(ns, name).and_then(|l| l.mac)
    }

    /// The default route's gateway on link `name` of `ns`.
    pub fn default_gateway(&self, ns: Ns, name: &str) -> Option<Ipv4Addr> {
        self.state()
            .by_name(ns, name)
            .and_then(|l| l.default_gateway)
    }

    /// Whether IPv4 forwarding was turned on.
    pub fn forwarding(&self) -> bool {
        self.state().forwarding
    }

    /// Every call so far, as `"<ns> <op> <args>"`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Links of `ns`.
    pub fn links(&self, ns: Ns) -> Vec<Link> {
        self.state()
            .links
            .iter()
            .filter(|l| l.ns == ns)
            .map(|l| l.link.clone())
            .collect()
    }

    /// The link `name` of `ns`.
    pub fn link(&self, ns: Ns, name: &str) -> Option<Link> {
        self.links(ns).into_iter().find(|l| l.name == name)
    }

    /// Addresses of link `name` in `ns`.
    pub fn addresses(&self, ns: Ns, name: &str) -> Vec<(Ipv4Addr, u8)> {
        self.state()
            .links
            .iter()
            .find(|l| l.ns == ns && l.link.name == name)
            .map(|l| l.addresses.clone())
            .unwrap_or_default()
    }

    /// Records the call, then fails it if a failure is queued for it.
    fn enter(&self, op: &'static str, args: String) -> Result<MutexGuard<'_, State>, NetlinkError> {
        let mut state = self.state();
        state.calls.push(format!("{} {op} {args}", self.ns));
        let ns = self.ns;
        if let Some(pos) = state
            .failures
            .iter()
            .position(|f| f.op == op && f.ns.is_none_or(|n| n == ns))
        {
            let failure = state.failures.remove(pos);
            return Err(NetlinkError::from_errno(op, args, failure.errno));
        }
        Ok(state)
    }
}

impl State {
    fn ensure_ns(&mut self, ns: Ns) {
        if self.namespaces.insert(ns) {
            self.push(ns, "lo", LinkKind::Other, 65536);
        }
    }

    fn push(&mut self, ns: Ns, name: &str, kind: LinkKind, mtu: u32) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        self.links.push(FakeLink {
            ns,
            link: Link {
                index,
                name: name.to_owned(),
                kind,
                mtu,
                up: false,
                master: None,
                bridge_port: None,
            },
            peer: None,
            addresses: Vec::new(),
            mac: None,
            default_gateway: None,
            fdb: Vec::new(),
            neighbours: Vec::new(),
        });
        index
    }

    fn by_name(&mut self, ns: Ns, name: &str) -> Option<&mut FakeLink> {
        self.links
            .iter_mut()
            .find(|l| l.ns == ns && l.link.name == name)
    }

    fn find(&mut self, ns: Ns, index: u32) -> Option<&mut FakeLink> {
        self.links
            .iter_mut()
            .find(|l| l.ns == ns && l.link.index == index)
    }

    fn exists(&self, ns: Ns, name: &str) -> bool {
        self.links.iter().any(|l| l.ns == ns && l.link.name == name)
    }

    /// Removes a link like the kernel does: a veth takes its peer along, a bridge frees its ports.
    fn remove(&mut self, index: u32) {
        let Some(pos) = self.links.iter().position(|l| l.link.index == index) else {
            return;
        };
        let gone = self.links.remove(pos);
        if let Some(peer) = gone.peer {
            self.links.retain(|l| l.link.index != peer);
        }
        for link in &mut self.links {
            if link.link.master == Some(index) {
                link.link.master = None;
                link.link.bridge_port = None;
                link.fdb.retain(|e| e.dst.is_some());
            }
        }
    }
}

fn fdb_args(index: u32, entry: FdbEntry) -> String {
    match entry.dst {
        Some(dst) => format!("#{index} {} dst {dst}", mac_text(&entry.mac)),
        None => format!("#{index} {} master", mac_text(&entry.mac)),
    }
}

fn no_such_device(op: &'static str, target: String) -> NetlinkError {
    NetlinkError::from_errno(op, target, libc::ENODEV)
}

impl Netlink for FakeNetlink {
    async fn link_get(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let state = self.enter("link_get", name.to_owned())?;
        Ok(state
            .links
            .iter()
            .find(|l| l.ns == self.ns && l.link.name == name)
            .map(|l| l.link.clone()))
    }

    async fn link_list(&self) -> Result<Vec<Link>, NetlinkError> {
        let state = self.enter("link_list", String::new())?;
        Ok(state
            .links
            .iter()
            .filter(|l| l.ns == self.ns)
            .map(|l| l.link.clone())
            .collect())
    }

    async fn link_add_bridge(&self, name: &str, mac: [u8; 6]) -> Result<(), NetlinkError> {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        let mut state = self.enter("link_add_bridge", format!("{name} mac {mac}"))?;
        if state.exists(self.ns, name) {
            return Err(NetlinkError::from_errno(
                "link_add_bridge",
                name,
                libc::EEXIST,
            ));
        }
        state.push(self.ns, name, LinkKind::Bridge, 1500);
        Ok(())
    }

    async fn link_add_veth(&self, plan: &VethPlan) -> Result<(), NetlinkError> {
        let VethPlan {
            name,
            mtu,
            peer,
            peer_pid,
            peer_mac,
        } = plan;
        let args = format!(
            "{name} mtu {mtu} peer {peer} pid {peer_pid} mac {}",
            mac_text(peer_mac)
        );
        let mut state = self.enter("link_add_veth", args.clone())?;
        if state.dead.contains(peer_pid) {
            return Err(NetlinkError::from_errno("link_add_veth", args, libc::ESRCH));
        }
        let peer_ns = Ns::Pid(*peer_pid);
        state.ensure_ns(peer_ns);
        if state.exists(self.ns, name) || state.exists(peer_ns, peer) {
            return Err(NetlinkError::from_errno(
                "link_add_veth",
                args,
                libc::EEXIST,
            ));
        }
        let here = state.push(self.ns, name, LinkKind::Veth, *mtu);
        let there = state.push(peer_ns, peer, LinkKind::Veth, *mtu);
        if let Some(l) = state.find(self.ns, here) {
            l.peer = Some(there);
        }
        if let Some(l) = state.find(peer_ns, there) {
            l.peer = Some(here);
            l.mac = Some(*peer_mac);
        }
        Ok(())
    }

    async fn link_add_vxlan(
        &self,
        name: &str,
        params: VxlanParams,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let local = params.local.map(|ip| ip.to_string()).unwrap_or_default();
        let args = format!(
            "{name} vni {} local {local} port {} learning {} proxy {} mtu {mtu}",
            params.vni, params.port, params.learning, params.proxy
        );
        let mut state = self.enter("link_add_vxlan", args.clone())?;
        let ns = self.ns;
        let clash = state.links.iter().any(|l| {
            l.ns == ns
                && (l.link.name == name
                    || matches!(l.link.kind, LinkKind::Vxlan(p)
                        if p.vni == params.vni && p.local == params.local && p.port == params.port))
        });
        if clash {
            return Err(NetlinkError::from_errno(
                "link_add_vxlan",
                args,
                libc::EEXIST,
            ));
        }
        state.push(ns, name, LinkKind::Vxlan(params), mtu);
        Ok(())
    }

    async fn link_set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let args = format!("#{index} mtu {mtu}");
        let mut state = self.enter("link_set_mtu", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("link_set_mtu", args))?;
        link.link.mtu = mtu;
        Ok(())
    }

    async fn link_set_bridge_port(
        &self,
        index: u32,
        flags: BridgePortFlags,
    ) -> Result<(), NetlinkError> {
        let args = format!(
            "#{index} learning {} neigh_suppress {}",
            flags.learning, flags.neigh_suppress
        );
        let mut state = self.enter("link_set_bridge_port", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("link_set_bridge_port", args.clone()))?;
        if link.link.master.is_none() {
            return Err(NetlinkError::from_errno(
                "link_set_bridge_port",
                args,
                libc::EOPNOTSUPP,
            ));
        }
        link.link.bridge_port = Some(flags);
        Ok(())
    }

    async fn link_set_master(&self, index: u32, master: u32) -> Result<(), NetlinkError> {
        let args = format!("#{index} master #{master}");
        let mut state = self.enter("link_set_master", args.clone())?;
        let ns = self.ns;
        let is_bridge = state
            .links
            .iter()
            .any(|l| l.ns == ns && l.link.index == master && l.link.kind == LinkKind::Bridge);
        if !is_bridge {
            return Err(no_such_device("link_set_master", args));
        }
        let link = state
            .find(ns, index)
            .ok_or_else(|| no_such_device("link_set_master", args))?;
        if link.link.master != Some(master) {
            link.link.master = Some(master);
            // A new port starts with the kernel's defaults.
            link.link.bridge_port = Some(BridgePortFlags {
                learning: true,
                neigh_suppress: false,
            });
        }
        Ok(())
    }

    async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let args = format!("#{index}");
        let mut state = self.enter("link_set_up", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("link_set_up", args))?;
        link.link.up = true;
        Ok(())
    }

    async fn link_del(&self, index: u32) -> Result<(), NetlinkError> {
        let args = format!("#{index}");
        let mut state = self.enter("link_del", args.clone())?;
        if state.find(self.ns, index).is_none() {
            return Err(no_such_device("link_del", args));
        }
        state.remove(index);
        Ok(())
    }

    async fn addr_list(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let args = format!("#{index}");
        let mut state = self.enter("addr_list", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("addr_list", args))?;
        Ok(link.addresses.clone())
    }

    async fn addr_add(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        let args = format!("#{index} {ip}/{prefix_len}");
        let mut state = self.enter("addr_add", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("addr_add", args.clone()))?;
        if link.addresses.iter().any(|&(a, _)| a == ip) {
            return Err(NetlinkError::from_errno("addr_add", args, libc::EEXIST));
        }
        link.addresses.push((ip, prefix_len));
        Ok(())
    }

    async fn addr_del(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), NetlinkError> {
        let args = format!("#{index} {ip}/{prefix_len}");
        let mut state = self.enter("addr_del", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("addr_del", args.clone()))?;
        let before = link.addresses.len();
        link.addresses.retain(|&a| a != (ip, prefix_len));
        if link.addresses.len() == before {
            return Err(NetlinkError::from_errno(
                "addr_del",
                args,
                libc::EADDRNOTAVAIL,
            ));
        }
        Ok(())
    }

    async fn route_replace_default(
        &self,
        index: u32,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let args = format!("#{index} via {gateway}");
        let mut state = self.enter("route_replace_default", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("route_replace_default", args.clone()))?;
        // Like the kernel: the gateway must be on a connected subnet of an up link.
        let connected = link.addresses.iter().any(|&(ip, prefix)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(gateway) & mask
        });
        if !link.link.up || !connected {
            return Err(NetlinkError::from_errno(
                "route_replace_default",
                args,
                libc::ENETUNREACH,
            ));
        }
        link.default_gateway = Some(gateway);
        Ok(())
    }

    async fn fdb_list(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let args = format!("#{index}");
        let mut state = self.enter("fdb_list", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("fdb_list", args))?;
        Ok(link.fdb.clone())
    }

    async fn fdb_replace(&self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
        let args = fdb_args(index, entry);
        let mut state = self.enter("fdb_replace", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("fdb_replace", args.clone()))?;
        let allowed = match entry.dst {
            Some(_) => matches!(link.link.kind, LinkKind::Vxlan(_)),
            None => link.link.master.is_some(),
        };
        if !allowed {
            return Err(NetlinkError::from_errno(
                "fdb_replace",
                args,
                libc::EOPNOTSUPP,
            ));
        }
        // Replace: the first entry of this kind for the MAC takes the new destination.
        match link
            .fdb
            .iter_mut()
            .find(|e| e.mac == entry.mac && e.dst.is_some() == entry.dst.is_some())
        {
            Some(existing) => *existing = entry,
            None => link.fdb.push(entry),
        }
        Ok(())
    }

    async fn fdb_del(&self, index: u32, entry: FdbEntry) -> Result<(), NetlinkError> {
        let args = fdb_args(index, entry);
        let mut state = self.enter("fdb_del", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("fdb_del", args.clone()))?;
        let before = link.fdb.len();
        link.fdb
            .retain(|e| !(e.mac == entry.mac && e.dst.is_some() == entry.dst.is_some()));
        if link.fdb.len() == before {
            return Err(NetlinkError::from_errno("fdb_del", args, libc::ENOENT));
        }
        Ok(())
    }

    async fn neigh_list(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let args = format!("#{index}");
        let mut state = self.enter("neigh_list", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("neigh_list", args))?;
        Ok(link.neighbours.clone())
    }

    async fn neigh_replace(&self, index: u32, neighbour: Neighbour) -> Result<(), NetlinkError> {
        let args = format!(
            "#{index} {} lladdr {}",
            neighbour.ip,
            mac_text(&neighbour.mac)
        );
        let mut state = self.enter("neigh_replace", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("neigh_replace", args))?;
        link.neighbours.retain(|n| n.ip != neighbour.ip);
        link.neighbours.push(neighbour);
        Ok(())
    }

    async fn neigh_del(&self, index: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let args = format!("#{index} {ip}");
        let mut state = self.enter("neigh_del", args.clone())?;
        let link = state
            .find(self.ns, index)
            .ok_or_else(|| no_such_device("neigh_del", args.clone()))?;
        let before = link.neighbours.len();
        link.neighbours.retain(|n| n.ip != ip);
        if link.neighbours.len() == before {
            return Err(NetlinkError::from_errno("neigh_del", args, libc::ENOENT));
        }
        Ok(())
    }

    async fn enable_ipv4_forwarding(&self) -> Result<(), NetlinkError> {
        let mut state = self.enter("enable_ipv4_forwarding", String::new())?;
        state.forwarding = true;
        Ok(())
    }

    async fn configure_netns(&self, pid: i32, plan: PeerPlan) -> Result<(), NetworkError> {
        {
            let mut state = self.enter("configure_netns", format!("pid {pid}"))?;
            if state.dead.contains(&pid) {
                return Err(NetworkError::Netns {
                    pid,
                    error: std::io::Error::from_raw_os_error(libc::ENOENT),
                });
            }
            state.ensure_ns(Ns::Pid(pid));
        }
        let inside = FakeNetlink {
            state: Arc::clone(&self.state),
            ns: Ns::Pid(pid),
        };
        configure_peer(&inside, &plan).await
    }
}
