//! An in-memory [`Netlink`] for unit tests: models links, veth pairs across namespaces, bridge
//! ports and addresses closely enough for the manager's logic, records every call and fails on
//! demand.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{configure_peer, Link, LinkKind, Netlink, NetlinkError, NetworkError, PeerPlan};

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
            },
            peer: None,
            addresses: Vec::new(),
        });
        index
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
            }
        }
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

    async fn link_add_veth(
        &self,
        name: &str,
        mtu: u32,
        peer: &str,
        peer_pid: i32,
    ) -> Result<(), NetlinkError> {
        let args = format!("{name} mtu {mtu} peer {peer} pid {peer_pid}");
        let mut state = self.enter("link_add_veth", args.clone())?;
        if state.dead.contains(&peer_pid) {
            return Err(NetlinkError::from_errno("link_add_veth", args, libc::ESRCH));
        }
        let peer_ns = Ns::Pid(peer_pid);
        state.ensure_ns(peer_ns);
        if state.exists(self.ns, name) || state.exists(peer_ns, peer) {
            return Err(NetlinkError::from_errno(
                "link_add_veth",
                args,
                libc::EEXIST,
            ));
        }
        let here = state.push(self.ns, name, LinkKind::Veth, mtu);
        let there = state.push(peer_ns, peer, LinkKind::Veth, mtu);
        if let Some(l) = state.find(self.ns, here) {
            l.peer = Some(there);
        }
        if let Some(l) = state.find(peer_ns, there) {
            l.peer = Some(here);
        }
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
        link.link.master = Some(master);
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
