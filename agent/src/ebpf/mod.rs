//! berth's eBPF data plane: service routing and network policy, loaded from the object built out
//! of `ebpf/` (embedded at build time) and driven through typed maps.
//!
//! - Service routing: `cgroup/connect4`, `sendmsg4` and `recvmsg4` on the node's cgroup2 directory
//!   (`<cgroup2 mount>/berth-<node-id>`) point sockets aimed at a service VIP at one backend,
//!   chosen at random, before any packet is sent; UDP replies are shown as coming from the VIP.
//!   Maps: `SERVICES`, `BACKENDS` ([`services`]), `UDP_REVERSE` (kernel only).
//! - Policy and counters: tc classifiers on both directions of each instance's host-side veth
//!   drop traffic between two berth networks that are not linked and count packets and bytes.
//!   Maps: `NETWORKS`, `LINKS` ([`policy`]), `IFACES`, `COUNTERS` ([`ifaces`]).
//!
//! Everything survives the agent: maps and the three cgroup links are pinned under
//! `/sys/fs/bpf/berth/<node-id>/` (maps by name, links as `link_<program>`), tc filters are
//! netlink (legacy) filters owned by the interface. A new agent process loads the object again,
//! reuses the pinned maps, and swaps its programs into the pinned links with `BPF_LINK_UPDATE`
//! (atomic: routing never stops, and there is never a second attachment). [`DataPlane::unload`]
//! removes everything for a clean shutdown.
//!
//! The map-filling logic ([`services::sync_services`], [`policy::sync_networks`],
//! [`policy::sync_links`]) works on the [`maps::KvMap`] trait, tested on a fake without root.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use berth_ebpf_common::{
    BackendKey, IfaceValue, LinkKey, ServiceValue, ALL_MAPS, BACKENDS_MAP, CONNECT4_PROG,
    COUNTERS_MAP, IFACES_MAP, LINKS_MAP, NETWORKS_MAP, RECVMSG4_PROG, SENDMSG4_PROG, SERVICES_MAP,
    TC_EGRESS_PROG, TC_INGRESS_PROG,
};
use ipnet::Ipv4Net;
use tracing::{debug, info, instrument, warn};

pub mod ifaces;
pub mod maps;
pub mod policy;
pub mod services;
pub mod sys;

pub use berth_ebpf_common::Counters;
pub use services::ServiceChanges;
pub use sys::{cgroup2_mount, BPFFS_ROOT};

use maps::{NamedHashMap, NetworksTrie};

/// The object `cargo xtask build-ebpf` built, copied into OUT_DIR by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth-ebpf.o"));

/// The cgroup programs and the name of their link pin.
const CGROUP_PROGRAMS: [(&str, &str); 3] = [
    (CONNECT4_PROG, "link_connect4"),
    (SENDMSG4_PROG, "link_sendmsg4"),
    (RECVMSG4_PROG, "link_recvmsg4"),
];

/// Errors of the data plane; each names the map, program, interface or path involved.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The object could not be loaded (or its pinned maps reused).
    #[error("loading the eBPF object with maps pinned under {pin_dir}: {source}")]
    Load {
        /// The pin directory.
        pin_dir: PathBuf,
        /// What aya said.
        source: Box<aya::EbpfError>,
    },
    /// The object lacks a program the agent expects (object and agent out of step).
    #[error("eBPF object has no program {name}")]
    MissingProgram {
        /// Program name.
        name: &'static str,
    },
    /// The object lacks a map the agent expects.
    #[error("eBPF object has no usable map {name}: {source}")]
    MissingMap {
        /// Map name.
        name: &'static str,
        /// What aya said (absent or of another type).
        source: Box<MapError>,
    },
    /// Loading or handling a program failed.
    #[error("eBPF program {program}: {op}: {source}")]
    Program {
        /// Program name.
        program: &'static str,
        /// What was being done.
        op: &'static str,
        /// What aya said.
        source: Box<ProgramError>,
    },
    /// Attaching a cgroup program failed.
    #[error("attaching {program} to cgroup {cgroup}: {source}")]
    AttachCgroup {
        /// Program name.
        program: &'static str,
        /// The cgroup2 directory.
        cgroup: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// Pinning a link failed.
    #[error("pinning link {path}: {source}")]
    PinLink {
        /// Pin path.
        path: PathBuf,
        /// What aya said.
        source: Box<aya::pin::PinError>,
    },
    /// A link could not be turned into a pinnable one.
    #[error("link of {program}: {source}")]
    Link {
        /// Program name.
        program: &'static str,
        /// What aya said.
        source: Box<LinkError>,
    },
    /// A map operation failed.
    #[error("map {map}: {op}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Operation.
        op: &'static str,
        /// What aya said.
        source: Box<MapError>,
    },
    /// More entries than a map holds; nothing was written.
    #[error("map {map}: {wanted} entries wanted, room for {limit}")]
    TooMany {
        /// Map name.
        map: &'static str,
        /// Entries asked for.
        wanted: usize,
        /// The map's size.
        limit: usize,
    },
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The pin directory is not on bpffs and cannot be made so.
    #[error("pin directory {path} is not on a bpf file system (mount bpffs at {BPFFS_ROOT})")]
    NotBpffs {
        /// The pin directory.
        path: PathBuf,
    },
    /// No cgroup2 hierarchy is mounted.
    #[error("no cgroup2 file system in /proc/self/mountinfo")]
    NoCgroup2,
    /// An interface could not be found.
    #[error("interface {iface}: {source}")]
    Iface {
        /// Interface name.
        iface: String,
        /// The OS error.
        source: io::Error,
    },
    /// Attaching or detaching a tc filter failed.
    #[error("tc {program} on interface {iface}: {source}")]
    Tc {
        /// Interface name.
        iface: String,
        /// Program name.
        program: &'static str,
        /// What aya said.
        source: Box<ProgramError>,
    },
    /// The interface has no entry in `IFACES`/`COUNTERS`.
    #[error("interface index {ifindex} is not attached to the data plane")]
    NotAttached {
        /// Interface index.
        ifindex: u32,
    },
}

impl EbpfError {
    pub(crate) fn map(map: &'static str, op: &'static str, source: MapError) -> Self {
        Self::Map {
            map,
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// An IPv4 address as the kernel hands it to BPF programs: the bytes in network order, read as a
/// native-endian `u32`.
pub fn ip_to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_to_be`].
pub fn ip_from_be(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// The cgroup2 directory holding one agent's containers: `<cgroup2 mount>/berth-<node-id>`.
pub fn node_cgroup_dir(node_id: &str) -> Result<PathBuf, EbpfError> {
    Ok(cgroup2_mount()?.join(format!("berth-{node_id}")))
}

/// Where one agent pins its maps and links: `/sys/fs/bpf/berth/<node-id>` (one directory per
/// node, so agents sharing a machine never collide).
pub fn node_pin_dir(node_id: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join("berth").join(node_id)
}

/// The loaded data plane of one node. Dropping it leaves everything in place (pinned maps and
/// links, tc filters), so traffic keeps flowing while the agent is away; [`DataPlane::unload`]
/// removes it all.
pub struct DataPlane {
    node_id: String,
    pin_dir: PathBuf,
    cgroup_dir: PathBuf,
    bpf: Ebpf,
    services: NamedHashMap<u32, ServiceValue>,
    backends: NamedHashMap<BackendKey, u32>,
    networks: NetworksTrie,
    links: NamedHashMap<LinkKey, u32>,
    ifaces: HashMap<MapData, u32, IfaceValue>,
    counters: PerCpuHashMap<MapData, u32, Counters>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("node_id", &self.node_id)
            .field("pin_dir", &self.pin_dir)
            .field("cgroup_dir", &self.cgroup_dir)
            .finish_non_exhaustive()
    }
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<Map, EbpfError> {
    bpf.take_map(name).ok_or_else(|| EbpfError::MissingMap {
        name,
        source: Box::new(MapError::InvalidName {
            name: name.to_owned(),
        }),
    })
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    bpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    T::try_from(take_map(bpf, name)?).map_err(|source| EbpfError::MissingMap {
        name,
        source: Box::new(source),
    })
}

impl DataPlane {
    /// Loads the programs, reusing the maps pinned under `pin_dir` (creating and pinning them the
    /// first time), and attaches the cgroup programs to `cgroup2_dir` (created if missing).
    ///
    /// After a previous agent process died, its pinned links are still attached: the new programs
    /// replace the old ones inside those links atomically, so routing continues without a gap and
    /// without a second attachment. bpffs is mounted at `/sys/fs/bpf` if needed.
    #[instrument(skip_all, fields(node_id, pin_dir = %pin_dir.display(), cgroup = %cgroup2_dir.display()))]
    pub fn load(node_id: &str, cgroup2_dir: &Path, pin_dir: &Path) -> Result<Self, EbpfError> {
        sys::ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir)
            .map_err(|source| EbpfError::io("create pin directory", pin_dir, source))?;
        std::fs::create_dir_all(cgroup2_dir)
            .map_err(|source| EbpfError::io("create cgroup", cgroup2_dir, source))?;
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .map_err(|source| EbpfError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;
        let cgroup = File::open(cgroup2_dir)
            .map_err(|source| EbpfError::io("open cgroup", cgroup2_dir, source))?;
        let cgroup_id = sys::cgroup_id(cgroup2_dir)?;
        for (program, pin_name) in CGROUP_PROGRAMS {
            attach_cgroup(
                &mut bpf,
                program,
                &cgroup,
                cgroup2_dir,
                cgroup_id,
                &pin_dir.join(pin_name),
            )?;
        }
        for program in [TC_INGRESS_PROG, TC_EGRESS_PROG] {
            tc_program(&mut bpf, program)?
                .load()
                .map_err(|source| EbpfError::Program {
                    program,
                    op: "load",
                    source: Box::new(source),
                })?;
        }
        let plane = Self {
            node_id: node_id.to_owned(),
            pin_dir: pin_dir.to_owned(),
            cgroup_dir: cgroup2_dir.to_owned(),
            services: NamedHashMap {
                name: SERVICES_MAP,
                map: typed(&mut bpf, SERVICES_MAP)?,
            },
            backends: NamedHashMap {
                name: BACKENDS_MAP,
                map: typed(&mut bpf, BACKENDS_MAP)?,
            },
            networks: NetworksTrie {
                map: typed::<LpmTrie<MapData, u32, u32>>(&mut bpf, NETWORKS_MAP)?,
            },
            links: NamedHashMap {
                name: LINKS_MAP,
                map: typed(&mut bpf, LINKS_MAP)?,
            },
            ifaces: typed(&mut bpf, IFACES_MAP)?,
            counters: typed(&mut bpf, COUNTERS_MAP)?,
            bpf,
        };
        info!("eBPF data plane loaded");
        Ok(plane)
    }

    /// The node this data plane serves.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The cgroup2 directory the routing programs are attached to.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// Makes the service maps equal to `services` (VIP → backend addresses): adds, changes and
    /// removes; a removed backend gets no new connection once this returns. A VIP with no
    /// backends refuses connections (EPERM) instead of sending to the VIP.
    #[instrument(skip_all, fields(node_id = %self.node_id, services = services.len()))]
    pub fn set_services(
        &mut self,
        services: &[(Ipv4Addr, Vec<Ipv4Addr>)],
    ) -> Result<ServiceChanges, EbpfError> {
        let changes = services::sync_services(&mut self.services, &mut self.backends, services)?;
        debug!(?changes, "services synced");
        Ok(changes)
    }

    /// Makes `NETWORKS` equal to `networks` (every berth network CIDR the node knows → its id).
    pub fn set_networks(&mut self, networks: &[(Ipv4Net, u32)]) -> Result<(), EbpfError> {
        policy::sync_networks(&mut self.networks, networks).map(|_| ())
    }

    /// Makes `LINKS` equal to `links` (unordered pairs of network ids that may talk).
    pub fn set_links(&mut self, links: &[(u32, u32)]) -> Result<(), EbpfError> {
        policy::sync_links(&mut self.links, links).map(|_| ())
    }

    /// Detaches the cgroup programs, the tc filters of every interface still attached, and removes
    /// every pin and the pin directory. For a clean shutdown when no instance is left.
    #[instrument(skip_all, fields(node_id = %self.node_id, pin_dir = %self.pin_dir.display()))]
    pub fn unload(mut self) -> Result<(), EbpfError> {
        let ifindexes: BTreeSet<u32> = self.ifaces.keys().filter_map(Result::ok).collect();
        for ifindex in ifindexes {
            self.detach_iface(ifindex)?;
        }
        // A link is detached when its last reference goes: the pin is the only one (this process
        // keeps no link fd).
        for (_, pin_name) in CGROUP_PROGRAMS {
            remove_pin(&self.pin_dir.join(pin_name))?;
        }
        for name in ALL_MAPS {
            remove_pin(&self.pin_dir.join(name))?;
        }
        let pin_dir = self.pin_dir.clone();
        drop(self);
        std::fs::remove_dir(&pin_dir)
            .map_err(|source| EbpfError::io("remove pin directory", &pin_dir, source))?;
        // The shared parent (`/sys/fs/bpf/berth`) goes too once no agent uses it.
        if let Some(parent) = pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        info!("eBPF data plane unloaded");
        Ok(())
    }
}

fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::io("remove pin", path, source)),
    }
}

pub(crate) fn tc_program<'a>(
    bpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    bpf.program_mut(program)
        .ok_or(EbpfError::MissingProgram { name: program })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program,
            op: "type",
            source: Box::new(source),
        })
}

/// Loads `program` and puts it in the link pinned at `pin`: swapped into the existing link when
/// that one is attached to this cgroup, else attached anew and pinned.
fn attach_cgroup(
    bpf: &mut Ebpf,
    program: &'static str,
    cgroup: &File,
    cgroup_dir: &Path,
    cgroup_id: u64,
    pin: &Path,
) -> Result<(), EbpfError> {
    let prog: &mut CgroupSockAddr = bpf
        .program_mut(program)
        .ok_or(EbpfError::MissingProgram { name: program })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program,
            op: "type",
            source: Box::new(source),
        })?;
    prog.load().map_err(|source| EbpfError::Program {
        program,
        op: "load",
        source: Box::new(source),
    })?;
    let prog_fd = prog.fd().map_err(|source| EbpfError::Program {
        program,
        op: "fd",
        source: Box::new(source),
    })?;
    match sys::obj_get(pin) {
        Ok(link) => {
            let target = sys::cgroup_link_target(link.as_fd());
            match target {
                Ok((id, _)) if id == cgroup_id => {
                    sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|source| {
                        EbpfError::AttachCgroup {
                            program,
                            cgroup: cgroup_dir.to_owned(),
                            source,
                        }
                    })?;
                    info!(program, pin = %pin.display(), "program swapped into the pinned link");
                    return Ok(());
                }
                other => {
                    // The cgroup was removed (id 0) or the pin belongs to another one: drop the
                    // pin, which detaches that link, and attach afresh.
                    warn!(program, pin = %pin.display(), ?other, "stale link pin replaced");
                    drop(link);
                    remove_pin(pin)?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EbpfError::io("open link pin", pin, source));
        }
    }
    let link_id = prog
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|source| EbpfError::Program {
            program,
            op: "attach",
            source: Box::new(source),
        })?;
    let link = prog
        .take_link(link_id)
        .map_err(|source| EbpfError::Program {
            program,
            op: "take link",
            source: Box::new(source),
        })?;
    let link: FdLink = link.try_into().map_err(|source| EbpfError::Link {
        program,
        source: Box::new(source),
    })?;
    // Dropping the returned PinnedLink closes our fd; the pin keeps the link attached.
    link.pin(pin).map_err(|source| EbpfError::PinLink {
        path: pin.to_owned(),
        source: Box::new(source),
    })?;
    info!(program, pin = %pin.display(), "program attached and link pinned");
    Ok(())
}
