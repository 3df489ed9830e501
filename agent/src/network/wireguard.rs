//! WireGuard between nodes: the encrypted underlay that berth's encrypted networks run their
//! VXLAN over.
//!
//! Each node has one WireGuard device ([`device_name`] of the node id), listening on UDP
//! [`DEFAULT_LISTEN_PORT`], carrying the node's tunnel address (handed out by the hub) whose
//! connected route goes through the device, with MTU [`DEFAULT_MTU`]. Its peers are the other
//! nodes: their public key, their advertise IP and port as endpoint, their tunnel address `/32`
//! as the only allowed IP. The private key ([`NodeKey`]) never leaves the node; the agent
//! publishes [`NodeKey::public_key`] through the hub.
//!
//! Two implementations sit behind [`WireguardDevice`]:
//! - the kernel's (`ip link add type wireguard`), configured with `wireguard-control` over
//!   generic netlink: used wherever the module exists, and it outlives the agent;
//! - `boringtun` in userspace on a TUN device, where the kernel has no WireGuard (the machines
//!   berth is developed on). Its threads and TUN device live inside the agent process and die
//!   with it; [`WireguardDevice::ensure`] makes a new one after a restart.
//!
//! The userspace device is driven through the WireGuard UAPI text protocol over a private
//! socket pair (`DeviceConfig::uapi_fd`), not through the usual `/var/run/wireguard/<name>.sock`
//! that `wireguard-control`'s userspace backend dials, because in that socket mode boringtun
//! blocks SIGINT/SIGTERM in the creating thread and every thread it spawns and consumes them
//! through a signalfd: a SIGTERM meant for the agent could be eaten by boringtun (which then
//! shuts the device down) instead of reaching the agent's handler. With a socket pair boringtun
//! installs no signal handling at all, no path is shared between agents of one machine (the
//! socket directory ignores network namespaces), and closing our end stops the device.
//!
//! Every call acts in the network namespace of the calling thread (netlink sockets and TUN
//! devices belong to the namespace of the thread that opens them): the agent's threads all live
//! in the node's namespace; tests run these calls on a thread that entered a test host's.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use boringtun::device::{DeviceConfig, DeviceHandle};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec, LinkWireguard};
use sha2::{Digest, Sha256};
use tracing::{debug, info, instrument, warn};
pub use wireguard_control::Backend;
use wireguard_control::{DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

/// UDP port WireGuard listens on unless configured otherwise.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

/// MTU of the WireGuard device: 1500 minus the worst-case WireGuard overhead over IPv6 (80).
pub const DEFAULT_MTU: u32 = 1420;

/// How long one UAPI exchange with the userspace device may take before it counts as dead.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the TUN device of a stopped userspace device may take to disappear.
const LINK_GONE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `ensure` waits for a TUN device of its name to go before calling it someone else's.
const STALE_TUN_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the node's WireGuard device and key.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    /// The key file could not be read.
    #[error("reading wireguard key {path}: {error}")]
    KeyRead {
        /// The key file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The key file could not be written.
    #[error("writing wireguard key {path}: {error}")]
    KeyWrite {
        /// The key file (or its temporary sibling).
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The key file does not hold a key.
    #[error("wireguard key {path} does not hold 32 bytes of base64")]
    KeyInvalid {
        /// The key file.
        path: PathBuf,
    },
    /// A peer's public key (from the hub) is not a WireGuard key.
    #[error("peer public key {key:?} is not 32 bytes of base64")]
    PeerKeyInvalid {
        /// The key as received (cut to 64 characters).
        key: String,
    },
    /// The same public key appears twice in one peer set.
    #[error("peer public key {key} appears twice")]
    PeerDuplicate {
        /// The key.
        key: String,
    },
    /// Two peers claim the same tunnel address.
    #[error("tunnel address {ip} is claimed by two peers")]
    PeerIpDuplicate {
        /// The address.
        ip: Ipv4Addr,
    },
    /// A name the kernel would refuse for an interface.
    #[error("invalid wireguard interface name {name:?}: 1 to 15 characters, no '/', NUL or space")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A prefix length no tunnel network can have.
    #[error("invalid tunnel prefix length {prefix_len}: must be 1..=32")]
    InvalidPrefix {
        /// The rejected value.
        prefix_len: u8,
    },
    /// An MTU IPv4 cannot use.
    #[error("invalid mtu {mtu}: must be 576..=65535")]
    InvalidMtu {
        /// The rejected value.
        mtu: u32,
    },
    /// No netlink socket could be opened.
    #[error("opening a netlink socket: {0}")]
    NetlinkConnect(io::Error),
    /// The kernel refused an rtnetlink request.
    #[error("netlink {op} {name}: {message}")]
    Netlink {
        /// The operation.
        op: &'static str,
        /// The interface.
        name: String,
        /// Positive errno from the kernel, if it gave one.
        errno: Option<i32>,
        /// Human-readable reason.
        message: String,
    },
    /// A link with the device's name exists and is not a WireGuard device.
    #[error("link {name} exists and is a {kind}, not a wireguard device")]
    NotWireguard {
        /// The interface.
        name: String,
        /// What it is.
        kind: String,
    },
    /// `reconfigure` was given the config of another device.
    #[error("config for {name} applied to wireguard device {device}")]
    OtherDevice {
        /// The name in the config.
        name: String,
        /// The device's name.
        device: String,
    },
    /// A TUN device of that name exists and stays: another live userspace device (a second
    /// agent in this namespace, or another `WireguardDevice` of this process) or a leftover
    /// persistent TUN device.
    #[error("tun device {name} exists and is in use by someone else")]
    LinkBusy {
        /// The interface.
        name: String,
    },
    /// The device's link vanished under us.
    #[error("link {name} not found")]
    LinkMissing {
        /// The interface.
        name: String,
    },
    /// The userspace device's link was still there after its threads were told to stop.
    #[error("userspace wireguard link {name} still present after removal")]
    LinkStillPresent {
        /// The interface.
        name: String,
    },
    /// boringtun could not create the userspace device.
    #[error("starting userspace wireguard {name}: {error}")]
    Userspace {
        /// The interface.
        name: String,
        /// boringtun's reason.
        error: boringtun::device::Error,
    },
    /// Talking to the userspace device failed (it may have stopped).
    #[error("wireguard uapi of {name}: {error}")]
    Uapi {
        /// The interface.
        name: String,
        /// Why.
        error: io::Error,
    },
    /// The userspace device refused a request.
    #[error("wireguard uapi of {name} refused {op}: errno {errno} ({})", io::Error::from_raw_os_error(*errno))]
    UapiErrno {
        /// The interface.
        name: String,
        /// What was asked.
        op: &'static str,
        /// The device's answer.
        errno: i32,
    },
    /// The userspace device answered something that is not UAPI.
    #[error("wireguard uapi of {name}: unexpected line {line:?}")]
    UapiProtocol {
        /// The interface.
        name: String,
        /// The offending line.
        line: String,
    },
    /// A request to the kernel's WireGuard (generic netlink) failed.
    #[error("kernel wireguard {op} {name}: {error}")]
    Kernel {
        /// The operation.
        op: &'static str,
        /// The interface.
        name: String,
        /// Why.
        error: io::Error,
    },
}

/// The node's WireGuard key pair. The private key stays on the node (in its key file); the
/// public key is what the agent publishes.
pub struct NodeKey {
    private: Key,
}

/// One other node as a WireGuard peer of this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The node's public key, base64 (as [`NodeKey::public_key`] gives it).
    pub public_key: String,
    /// The node's advertise IP and WireGuard port.
    pub endpoint: SocketAddr,
    /// The node's tunnel address: its only allowed IP (`/32`).
    pub tunnel_ip: Ipv4Addr,
    /// Seconds between keepalives (for nodes behind NAT); `None` sends none.
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Public key, base64.
    pub public_key: String,
    /// Where the device sends to: the configured endpoint, or where the peer last spoke from.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs with prefix lengths.
    pub allowed_ips: Vec<(IpAddr, u8)>,
    /// Keepalive interval in seconds, if any.
    pub persistent_keepalive: Option<u16>,
    /// How long ago the last handshake completed; `None` if none has.
    pub last_handshake: Option<Duration>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

/// What [`WireguardDevice::set_peers`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// Peers that were not on the device.
    pub added: usize,
    /// Peers whose endpoint, allowed IPs or keepalive changed.
    pub updated: usize,
    /// Peers on the device that are not wanted any more.
    pub removed: usize,
}

/// How the node's device is set up (see [`WireguardDevice::ensure`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// Interface name ([`device_name`] of the node id).
    pub name: String,
    /// UDP port to listen on.
    pub listen_port: u16,
    /// The node's tunnel address.
    pub tunnel_ip: Ipv4Addr,
    /// Prefix length of the tunnel network: its connected route goes through the device.
    pub prefix_len: u8,
    /// MTU of the device.
    pub mtu: u32,
}

/// The node's WireGuard device, kernel or userspace.
///
/// Dropping it stops a userspace device (its link disappears); a kernel device stays, to be
/// adopted by the next [`WireguardDevice::ensure`]. [`WireguardDevice::remove`] deletes either.
pub struct WireguardDevice {
    name: String,
    backend: Backend,
    public_key: [u8; 32],
    engine: Engine,
    /// Endpoint last configured per peer; also serialises `set_peers`.
    applied: Mutex<HashMap<[u8; 32], SocketAddr>>,
}

enum Engine {
    Kernel(InterfaceName),
    // Field order is drop order: closing the UAPI stream first makes boringtun exit too.
    Userspace { uapi: Uapi, _device: DeviceHandle },
}

/// The userspace device's end of the UAPI conversation.
struct Uapi {
    name: String,
    stream: Mutex<UnixStream>,
}

/// A peer as wanted, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WantedPeer {
    key: [u8; 32],
    endpoint: SocketAddr,
    tunnel_ip: Ipv4Addr,
    keepalive: Option<u16>,
}

/// A peer as found on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DevicePeer {
    key: [u8; 32],
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<(IpAddr, u8)>,
    keepalive: Option<u16>,
    last_handshake: Option<Duration>,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// What to change on the device to get from the peers it has to the peers wanted.
#[derive(Debug, Default, PartialEq, Eq)]
struct PeerDiff {
    add: Vec<WantedPeer>,
    update: Vec<WantedPeer>,
    remove: Vec<[u8; 32]>,
}

/// What the device code needs to know about an existing link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkType {
    Wireguard,
    Tun,
    Other,
}

/// An rtnetlink handle bound to the calling thread's network namespace.
struct Rtnl {
    handle: Handle,
}

impl NodeKey {
    /// A fresh random key pair, kept in memory only.
    pub fn generate() -> Self {
        Self {
            private: Key::generate_private(),
        }
    }

    /// Reads the node's private key from `path` (base64, as `wg genkey` writes it), or, when
    /// the file does not exist, generates one and writes it there: mode 0600, created
    /// atomically (a complete file appears or none; of two agents racing, both end up with the
    /// one that landed first). A key file readable by others gets its mode fixed to 0600.
    pub fn load_or_create(path: &Path) -> Result<Self, WireguardError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::from_file_text(path, &text),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(error) => Err(WireguardError::KeyRead {
                path: path.to_owned(),
                error,
            }),
        }
    }

    /// The public key, base64: what peers configure for this node.
    pub fn public_key(&self) -> String {
        self.private.get_public().to_base64()
    }

    fn public_bytes(&self) -> [u8; 32] {
        self.private.get_public().0
    }

    fn from_file_text(path: &Path, text: &str) -> Result<Self, WireguardError> {
        let private = Key::from_base64(text.trim()).map_err(|_| WireguardError::KeyInvalid {
            path: path.to_owned(),
        })?;
        let key_read = |error| WireguardError::KeyRead {
            path: path.to_owned(),
            error,
        };
        let mode = fs::metadata(path).map_err(key_read)?.permissions().mode();
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format!("{mode:o}"), "wireguard key readable by others; setting mode 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|error| {
                WireguardError::KeyWrite {
                    path: path.to_owned(),
                    error,
                }
            })?;
        }
        Ok(Self { private })
    }

    fn create(path: &Path) -> Result<Self, WireguardError> {
        let key_write = |path: &Path, error| WireguardError::KeyWrite {
            path: path.to_owned(),
            error,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir).map_err(|e| key_write(dir, e))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{file_name}.tmp-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let key = Self::generate();
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| {
                file.write_all(format!("{}\n", key.private.to_base64()).as_bytes())?;
                file.sync_all()
            });
        if let Err(error) = written {
            let _ = fs::remove_file(&tmp);
            return Err(key_write(&tmp, error));
        }
        // A hard link, unlike rename, never replaces a key another process put there meanwhile.
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                // The new name must survive a crash too.
                if let Ok(dir) = fs::File::open(dir) {
                    let _ = dir.sync_all();
                }
                info!(path = %path.display(), public_key = %key.public_key(), "created wireguard key");
                Ok(key)
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(path).map_err(|error| WireguardError::KeyRead {
                    path: path.to_owned(),
                    error,
                })?;
                Self::from_file_text(path, &text)
            }
            Err(error) => Err(key_write(path, error)),
        }
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for WireguardDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireguardDevice")
            .field("name", &self.name)
            .field("backend", &self.backend)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl WireguardConfig {
    /// A device named `name` with the node's tunnel address, on port [`DEFAULT_LISTEN_PORT`]
    /// with MTU [`DEFAULT_MTU`].
    pub fn new(name: impl Into<String>, tunnel_ip: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            name: name.into(),
            listen_port: DEFAULT_LISTEN_PORT,
            tunnel_ip,
            prefix_len,
            mtu: DEFAULT_MTU,
        }
    }

    fn validate(&self) -> Result<InterfaceName, WireguardError> {
        let iface = valid_name(&self.name)?;
        if !(1..=32).contains(&self.prefix_len) {
            return Err(WireguardError::InvalidPrefix {
                prefix_len: self.prefix_len,
            });
        }
        if !(576..=65535).contains(&self.mtu) {
            return Err(WireguardError::InvalidMtu { mtu: self.mtu });
        }
        Ok(iface)
    }
}

impl WireguardDevice {
    /// Makes sure the device `config.name` exists in the calling thread's network namespace
    /// with `key`, the listen port, `tunnel_ip/prefix_len`, the MTU, and is up.
    ///
    /// - A kernel WireGuard link of that name (left by an earlier agent) is adopted: its peers
    ///   stay until the next [`Self::set_peers`].
    /// - Otherwise a kernel link is created; where the kernel has no WireGuard (`EOPNOTSUPP`),
    ///   a boringtun device on a TUN device of that name instead, living in this process.
    /// - A TUN device of that name left by a dead process vanishes with it; one that stays is
    ///   someone else's ([`WireguardError::LinkBusy`]).
    ///
    /// Other IPv4 addresses on the link are removed. On error nothing this call created is
    /// left behind. Keep the returned value for as long as the device should run.
    #[instrument(skip_all, fields(name = %config.name, tunnel_ip = %config.tunnel_ip), err)]
    pub async fn ensure(config: &WireguardConfig, key: &NodeKey) -> Result<Self, WireguardError> {
        let iface = config.validate()?;
        let name = config.name.as_str();
        let rtnl = Rtnl::connect()?;

        let mut created_kernel_link = false;
        let mut existing = rtnl.link(name).await?;
        if let Some((_, LinkType::Tun)) = existing {
            // The TUN device of a userspace device dropped a moment ago goes once its threads
            // have stopped.
            if !rtnl.wait_gone(name, STALE_TUN_TIMEOUT).await? {
                return Err(WireguardError::LinkBusy {
                    name: name.to_owned(),
                });
            }
            existing = None;
        }
        let engine = match existing {
            Some((_, LinkType::Wireguard)) => {
                info!("adopting existing kernel wireguard device");
                Engine::Kernel(iface)
            }
            Some((_, kind)) => {
                return Err(WireguardError::NotWireguard {
                    name: name.to_owned(),
                    kind: format!("{kind:?}").to_lowercase(),
                })
            }
            None => match rtnl.add_wireguard(name).await {
                Ok(()) => {
                    created_kernel_link = true;
                    info!("created kernel wireguard device");
                    Engine::Kernel(iface)
                }
                Err(WireguardError::Netlink {
                    errno: Some(libc::EOPNOTSUPP),
                    ..
                }) => {
                    let engine = Engine::start_userspace(name)?;
                    info!("kernel has no wireguard: started userspace (boringtun) device");
                    engine
                }
                Err(error) => return Err(error),
            },
        };
        let device = Self {
            name: name.to_owned(),
            backend: engine.backend(),
            public_key: key.public_bytes(),
            engine,
            applied: Mutex::new(HashMap::new()),
        };
        match device.configure(&rtnl, config, Some(key)).await {
            Ok(()) => {
                info!(backend = %device.backend, public_key = %key.public_key(), "wireguard device ready");
                Ok(device)
            }
            Err(error) => {
                // A userspace device goes with `device`; a kernel link only if we made it.
                if created_kernel_link {
                    if let Err(cleanup) = rtnl.del_by_name(name).await {
                        warn!(%cleanup, "deleting the kernel wireguard link after a failed ensure");
                    }
                }
                Err(error)
            }
        }
    }

    /// Re-applies `config` (listen port, MTU, tunnel address, up) to this running device, e.g.
    /// when the hub moved the node's tunnel address: [`Self::ensure`] creates or adopts the
    /// device, this keeps it in line afterwards (a second `ensure` for a userspace device this
    /// process runs fails with [`WireguardError::LinkBusy`]). Idempotent; peers are untouched.
    /// Call from the device's network namespace.
    #[instrument(skip_all, fields(name = %self.name, tunnel_ip = %config.tunnel_ip), err)]
    pub async fn reconfigure(&self, config: &WireguardConfig) -> Result<(), WireguardError> {
        config.validate()?;
        if config.name != self.name {
            return Err(WireguardError::OtherDevice {
                name: config.name.clone(),
                device: self.name.clone(),
            });
        }
        let rtnl = Rtnl::connect()?;
        self.configure(&rtnl, config, None).await
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which implementation runs the device (`kernel` or `userspace` when displayed).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// This node's public key, base64.
    pub fn public_key(&self) -> String {
        Key(self.public_key).to_base64()
    }

    /// Makes the device's peer set equal to `peers`: adds the missing ones, updates those whose
    /// endpoint, tunnel address or keepalive changed, removes the others. A peer with this
    /// node's own key is skipped, so the hub's full node list can be passed as is.
    ///
    /// Every key is checked first: a bad or duplicate key, or two peers with one tunnel
    /// address, fail the call before anything changes. An endpoint the device learned by
    /// roaming (the peer spoke from another address) is left alone until the wanted endpoint
    /// itself changes. Blocking: one short local exchange per changed peer (userspace) or a few
    /// netlink requests (kernel).
    #[instrument(skip_all, fields(name = %self.name, peers = peers.len()), err)]
    pub fn set_peers(&self, peers: &[Peer]) -> Result<PeerChanges, WireguardError> {
        let wanted = parse_peers(peers, self.public_key)?;
        let mut applied = lock(&self.applied);
        let present = self.engine.peers()?;
        let diff = diff_peers(&wanted, &present, &applied);
        let changes = PeerChanges {
            added: diff.add.len(),
            updated: diff.update.len(),
            removed: diff.remove.len(),
        };
        if diff == PeerDiff::default() {
            debug!("peers already as wanted");
            return Ok(changes);
        }
        self.engine.apply(&diff)?;
        for key in &diff.remove {
            applied.remove(key);
        }
        for peer in diff.add.iter().chain(&diff.update) {
            applied.insert(peer.key, peer.endpoint);
        }
        info!(
            added = changes.added,
            updated = changes.updated,
            removed = changes.removed,
            "wireguard peers changed"
        );
        Ok(changes)
    }

    /// The peers as the device reports them, with handshake and traffic counters.
    pub fn peers(&self) -> Result<Vec<PeerStatus>, WireguardError> {
        Ok(self
            .engine
            .peers()?
            .into_iter()
            .map(|peer| PeerStatus {
                public_key: Key(peer.key).to_base64(),
                endpoint: peer.endpoint,
                allowed_ips: peer.allowed_ips,
                persistent_keepalive: peer.keepalive,
                last_handshake: peer.last_handshake,
                rx_bytes: peer.rx_bytes,
                tx_bytes: peer.tx_bytes,
            })
            .collect())
    }

    /// Deletes the device: the kernel link, or the userspace device's threads, sockets and
    /// TUN link (waiting until the link is gone). Call from the device's network namespace.
    #[instrument(skip_all, fields(name = %self.name, backend = %self.backend), err)]
    pub async fn remove(self) -> Result<(), WireguardError> {
        let rtnl = Rtnl::connect()?;
        let Self { name, engine, .. } = self;
        match engine {
            Engine::Kernel(_) => rtnl.del_by_name(&name).await?,
            Engine::Userspace { .. } => {
                drop(engine);
                if !rtnl.wait_gone(&name, LINK_GONE_TIMEOUT).await? {
                    return Err(WireguardError::LinkStillPresent { name });
                }
            }
        }
        info!("wireguard device removed");
        Ok(())
    }

    /// Sets key (when given) and port, then the link's MTU, address and state.
    async fn configure(
        &self,
        rtnl: &Rtnl,
        config: &WireguardConfig,
        key: Option<&NodeKey>,
    ) -> Result<(), WireguardError> {
        match key {
            Some(key) => self.engine.set_identity(&key.private, config.listen_port)?,
            None => self.engine.set_listen_port(config.listen_port)?,
        }
        let Some((index, _)) = rtnl.link(&self.name).await? else {
            return Err(WireguardError::LinkMissing {
                name: self.name.clone(),
            });
        };
        rtnl.set_mtu_up(&self.name, index, config.mtu).await?;
        let wanted = (config.tunnel_ip, config.prefix_len);
        let addresses = rtnl.addresses(&self.name, index).await?;
        for &(ip, prefix_len) in addresses.iter().filter(|&&a| a != wanted) {
            debug!(%ip, prefix_len, "removing stale address");
            rtnl.addr_del(&self.name, index, ip, prefix_len).await?;
        }
        if !addresses.contains(&wanted) {
            rtnl.addr_add(&self.name, index, wanted.0, wanted.1).await?;
        }
        Ok(())
    }
}

impl Engine {
    fn start_userspace(name: &str) -> Result<Self, WireguardError> {
        let uapi_error = |error| WireguardError::Uapi {
            name: name.to_owned(),
            error,
        };
        let (ours, theirs) = UnixStream::pair().map_err(uapi_error)?;
        ours.set_read_timeout(Some(UAPI_TIMEOUT))
            .and_then(|()| ours.set_write_timeout(Some(UAPI_TIMEOUT)))
            .map_err(uapi_error)?;
        let config = DeviceConfig {
            n_threads: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4)),
            use_connected_socket: true,
            use_multi_queue: true,
            // boringtun owns this end from here on (it closes it when the device stops; if it
            // fails before taking it, one descriptor leaks on that error path).
            uapi_fd: theirs.into_raw_fd(),
        };
        // The TUN device, the UDP sockets and boringtun's threads (spawned from this one)
        // belong to the calling thread's network namespace.
        let device =
            DeviceHandle::new(name, config).map_err(|error| WireguardError::Userspace {
                name: name.to_owned(),
                error,
            })?;
        Ok(Self::Userspace {
            uapi: Uapi {
                name: name.to_owned(),
                stream: Mutex::new(ours),
            },
            _device: device,
        })
    }

    fn backend(&self) -> Backend {
        match self {
            Self::Kernel(_) => Backend::Kernel,
            Self::Userspace { .. } => Backend::Userspace,
        }
    }

    fn set_identity(&self, private: &Key, listen_port: u16) -> Result<(), WireguardError> {
        match self {
            Self::Kernel(iface) => DeviceUpdate::new()
                .set_private_key(private.clone())
                .set_listen_port(listen_port)
                .apply(iface, Backend::Kernel)
                .map_err(|error| kernel_error("set key and port", iface, error)),
            Self::Userspace { uapi, .. } => {
                uapi.set("set key and port", &uapi_identity(private, listen_port))
            }
        }
    }

    fn set_listen_port(&self, listen_port: u16) -> Result<(), WireguardError> {
        match self {
            Self::Kernel(iface) => DeviceUpdate::new()
                .set_listen_port(listen_port)
                .apply(iface, Backend::Kernel)
                .map_err(|error| kernel_error("set port", iface, error)),
            Self::Userspace { uapi, .. } => {
                // boringtun rebinds on every listen_port line (and keeps the old socket open):
                // only when the port really changes.
                let pairs = uapi.exchange("get", "get=1\n\n")?;
                let current = pairs.iter().find(|(k, _)| k == "listen_port");
                if current.is_some_and(|(_, v)| *v == listen_port.to_string()) {
                    return Ok(());
                }
                uapi.set("set port", &format!("listen_port={listen_port}\n"))
            }
        }
    }

    fn peers(&self) -> Result<Vec<DevicePeer>, WireguardError> {
        match self {
            Self::Kernel(iface) => {
                let device = wireguard_control::Device::get(iface, Backend::Kernel)
                    .map_err(|error| kernel_error("get", iface, error))?;
                let now = SystemTime::now();
                Ok(device
                    .peers
                    .into_iter()
                    .map(|info| DevicePeer {
                        key: info.config.public_key.0,
                        endpoint: info.config.endpoint,
                        allowed_ips: info
                            .config
                            .allowed_ips
                            .iter()
                            .map(|a| (a.address, a.cidr))
                            .collect(),
                        keepalive: info.config.persistent_keepalive_interval.filter(|&k| k > 0),
                        last_handshake: info
                            .stats
                            .last_handshake_time
                            .and_then(|t| now.duration_since(t).ok()),
                        rx_bytes: info.stats.rx_bytes,
                        tx_bytes: info.stats.tx_bytes,
                    })
                    .collect())
            }
            Self::Userspace { uapi, .. } => {
                let pairs = uapi.exchange("get", "get=1\n\n")?;
                parse_uapi_peers(&pairs).map_err(|line| WireguardError::UapiProtocol {
                    name: uapi.name.clone(),
                    line,
                })
            }
        }
    }

    fn apply(&self, diff: &PeerDiff) -> Result<(), WireguardError> {
        match self {
            Self::Kernel(iface) => {
                let mut update = DeviceUpdate::new();
                for key in &diff.remove {
                    update = update.remove_peer_by_key(&Key(*key));
                }
                for peer in diff.add.iter().chain(&diff.update) {
                    update = update.add_peer(
                        PeerConfigBuilder::new(&Key(peer.key))
                            .set_endpoint(peer.endpoint)
                            .replace_allowed_ips()
                            .add_allowed_ip(IpAddr::V4(peer.tunnel_ip), 32)
                            .set_persistent_keepalive_interval(peer.keepalive.unwrap_or(0)),
                    );
                }
                update
                    .apply(iface, Backend::Kernel)
                    .map_err(|error| kernel_error("set peers", iface, error))
            }
            Self::Userspace { uapi, .. } => {
                // One transaction per peer: boringtun 0.7 carries `remove`, endpoint and
                // keepalive over from one peer section to the next, and panics when a set
                // touches an existing peer, so an update is a removal and then an addition.
                for key in diff.remove.iter().chain(diff.update.iter().map(|p| &p.key)) {
                    uapi.set("remove peer", &uapi_remove_peer(key))?;
                }
                for peer in diff.add.iter().chain(&diff.update) {
                    uapi.set("add peer", &uapi_add_peer(peer))?;
                }
                Ok(())
            }
        }
    }
}

impl Uapi {
    /// Sends one `set=1` transaction made of `body` lines.
    fn set(&self, op: &'static str, body: &str) -> Result<(), WireguardError> {
        self.exchange(op, &format!("set=1\n{body}\n")).map(drop)
    }

    /// Sends `request` and reads the answer up to its empty line; `Err` unless it ends with
    /// `errno=0`. Returns the answer's `key=value` pairs.
    fn exchange(
        &self,
        op: &'static str,
        request: &str,
    ) -> Result<Vec<(String, String)>, WireguardError> {
        let stream = lock(&self.stream);
        let io_error = |error| WireguardError::Uapi {
            name: self.name.clone(),
            error,
        };
        // One write: boringtun reads a request through an 8 KiB buffer it drops afterwards,
        // so a request must arrive whole and alone.
        (&*stream).write_all(request.as_bytes()).map_err(io_error)?;
        let mut reader = BufReader::new(&*stream);
        let mut pairs = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io_error)? == 0 {
                return Err(io_error(io::ErrorKind::UnexpectedEof.into()));
            }
            let trimmed = line.trim_end_matches('\n');
            if trimmed.is_empty() {
                break;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(WireguardError::UapiProtocol {
                    name: self.name.clone(),
                    line: trimmed.to_owned(),
                });
            };
            pairs.push((key.to_owned(), value.to_owned()));
        }
        match pairs.last() {
            Some((key, value)) if key == "errno" => match value.parse::<i32>() {
                Ok(0) => Ok(pairs),
                Ok(errno) => Err(WireguardError::UapiErrno {
                    name: self.name.clone(),
                    op,
                    errno,
                }),
                Err(_) => Err(WireguardError::UapiProtocol {
                    name: self.name.clone(),
                    line: format!("errno={value}"),
                }),
            },
            _ => Err(WireguardError::UapiProtocol {
                name: self.name.clone(),
                line: "(answer without errno)".to_owned(),
            }),
        }
    }
}

impl Rtnl {
    /// Opens a netlink socket in the calling thread's network namespace, driven on the current
    /// tokio runtime.
    fn connect() -> Result<Self, WireguardError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(WireguardError::NetlinkConnect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn link(&self, name: &str) -> Result<Option<(u32, LinkType)>, WireguardError> {
        let mut replies = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match replies.try_next().await {
            Ok(Some(message)) => Ok(Some((message.header.index, link_type(&message)))),
            Ok(None) => Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink_error("link_get", name, e)),
        }
    }

    async fn add_wireguard(&self, name: &str) -> Result<(), WireguardError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
            .map_err(|e| netlink_error("link_add_wireguard", name, e))
    }

    async fn set_mtu_up(&self, name: &str, index: u32, mtu: u32) -> Result<(), WireguardError> {
        let message = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .change(message)
            .execute()
            .await
            .map_err(|e| netlink_error("link_set_mtu_up", name, e))
    }

    async fn del_by_name(&self, name: &str) -> Result<(), WireguardError> {
        let Some((index, _)) = self.link(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(netlink_error("link_del", name, e)),
        }
    }

    /// Waits until no link is called `name`; `false` if one still is after `timeout`.
    async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<bool, WireguardError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.link(name).await?.is_none() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn addresses(
        &self,
        name: &str,
        index: u32,
    ) -> Result<Vec<(Ipv4Addr, u8)>, WireguardError> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_error("addr_list", name, e))?;
        Ok(messages
            .iter()
            .filter_map(super::netlink::ipv4_of)
            .collect())
    }

    async fn addr_add(
        &self,
        name: &str,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), WireguardError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(netlink_error("addr_add", name, e)),
        }
    }

    async fn addr_del(
        &self,
        name: &str,
        index: u32,
        ip: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), WireguardError> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix_len)
            .build();
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(netlink_error("addr_del", name, e)),
        }
    }
}

/// Name of the WireGuard device of node `node_id`: `bw` and 12 hex digits of a hash of the id
/// (14 characters, within the kernel's 15), so agents of several nodes sharing one machine
/// never share a name.
pub fn device_name(node_id: &str) -> String {
    let digest = Sha256::digest(format!("berth wireguard {node_id}").as_bytes());
    format!("bw{}", hex::encode(&digest[..6]))
}

/// Checks peers from the wire and turns them into keys; skips the node itself.
fn parse_peers(peers: &[Peer], own_key: [u8; 32]) -> Result<Vec<WantedPeer>, WireguardError> {
    let mut keys = HashSet::new();
    let mut ips = HashSet::new();
    let mut wanted = Vec::with_capacity(peers.len());
    for peer in peers {
        let key = parse_public_key(&peer.public_key)?;
        if key == own_key {
            debug!(public_key = %peer.public_key, "skipping this node in its own peer list");
            continue;
        }
        if !keys.insert(key) {
            return Err(WireguardError::PeerDuplicate {
                key: peer.public_key.clone(),
            });
        }
        if !ips.insert(peer.tunnel_ip) {
            return Err(WireguardError::PeerIpDuplicate { ip: peer.tunnel_ip });
        }
        wanted.push(WantedPeer {
            key,
            endpoint: peer.endpoint,
            tunnel_ip: peer.tunnel_ip,
            keepalive: peer.persistent_keepalive.filter(|&k| k > 0),
        });
    }
    Ok(wanted)
}

/// A public key as the hub relays it: exactly 32 bytes in standard base64.
fn parse_public_key(text: &str) -> Result<[u8; 32], WireguardError> {
    Key::from_base64(text)
        .map(|key| key.0)
        .map_err(|_| WireguardError::PeerKeyInvalid {
            key: text.chars().take(64).collect(),
        })
}

/// The changes that take the device from `present` to `wanted`.
///
/// `applied` holds the endpoint last configured per peer: a present endpoint that differs
/// from the wanted one only because the peer roamed (we configured the wanted one already) is
/// not a change, else every call would reset that peer (boringtun updates by re-adding).
fn diff_peers(
    wanted: &[WantedPeer],
    present: &[DevicePeer],
    applied: &HashMap<[u8; 32], SocketAddr>,
) -> PeerDiff {
    let mut diff = PeerDiff::default();
    for peer in wanted {
        match present.iter().find(|p| p.key == peer.key) {
            None => diff.add.push(peer.clone()),
            Some(found) => {
                let allowed_ok = found.allowed_ips == [(IpAddr::V4(peer.tunnel_ip), 32)];
                let endpoint_ok = found.endpoint == Some(peer.endpoint)
                    || applied.get(&peer.key) == Some(&peer.endpoint);
                if !allowed_ok || !endpoint_ok || found.keepalive != peer.keepalive {
                    diff.update.push(peer.clone());
                }
            }
        }
    }
    diff.remove = present
        .iter()
        .filter(|p| !wanted.iter().any(|w| w.key == p.key))
        .map(|p| p.key)
        .collect();
    diff
}

fn uapi_identity(private: &Key, listen_port: u16) -> String {
    format!(
        "private_key={}\nlisten_port={listen_port}\n",
        hex::encode(private.0)
    )
}

fn uapi_remove_peer(key: &[u8; 32]) -> String {
    format!("public_key={}\nremove=true\n", hex::encode(key))
}

fn uapi_add_peer(peer: &WantedPeer) -> String {
    let mut text = format!(
        "public_key={}\nendpoint={}\n",
        hex::encode(peer.key),
        peer.endpoint
    );
    if let Some(interval) = peer.keepalive {
        text.push_str(&format!("persistent_keepalive_interval={interval}\n"));
    }
    text.push_str(&format!(
        "replace_allowed_ips=true\nallowed_ip={}/32\n",
        peer.tunnel_ip
    ));
    text
}

/// The peers in a UAPI `get` answer; `Err` carries the line that made no sense.
///
/// boringtun 0.7 reports `last_handshake_time_*` as the time elapsed since the handshake, not
/// as a point in time like the kernel's UAPI does.
fn parse_uapi_peers(pairs: &[(String, String)]) -> Result<Vec<DevicePeer>, String> {
    let mut peers: Vec<DevicePeer> = Vec::new();
    for (key, value) in pairs {
        let bad = || format!("{key}={value}");
        if key == "public_key" {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(value, &mut bytes).map_err(|_| bad())?;
            peers.push(DevicePeer {
                key: bytes,
                ..DevicePeer::default()
            });
            continue;
        }
        // Device-wide lines come before the first peer.
        let Some(peer) = peers.last_mut() else {
            continue;
        };
        match key.as_str() {
            "endpoint" => peer.endpoint = Some(value.parse().map_err(|_| bad())?),
            "allowed_ip" => {
                let (ip, prefix) = value.split_once('/').ok_or_else(bad)?;
                let ip = ip.parse().map_err(|_| bad())?;
                let prefix = prefix.parse().map_err(|_| bad())?;
                peer.allowed_ips.push((ip, prefix));
            }
            "persistent_keepalive_interval" => {
                let interval: u16 = value.parse().map_err(|_| bad())?;
                peer.keepalive = Some(interval).filter(|&k| k > 0);
            }
            "last_handshake_time_sec" => {
                let secs = value.parse().map_err(|_| bad())?;
                let nanos = peer.last_handshake.map_or(0, |d| d.subsec_nanos());
                peer.last_handshake = Some(Duration::new(secs, nanos));
            }
            "last_handshake_time_nsec" => {
                let nanos: u32 = value.parse().map_err(|_| bad())?;
                if nanos >= 1_000_000_000 {
                    return Err(bad());
                }
                let secs = peer.last_handshake.map_or(0, |d| d.as_secs());
                peer.last_handshake = Some(Duration::new(secs, nanos));
            }
            "rx_bytes" => peer.rx_bytes = value.parse().map_err(|_| bad())?,
            "tx_bytes" => peer.tx_bytes = value.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    Ok(peers)
}

fn valid_name(name: &str) -> Result<InterfaceName, WireguardError> {
    let invalid = || WireguardError::InvalidName {
        name: name.to_owned(),
    };
    // The kernel also refuses "." and ".."; InterfaceName checks length and characters.
    if name == "." || name == ".." {
        return Err(invalid());
    }
    name.parse().map_err(|_| invalid())
}

fn kernel_error(op: &'static str, iface: &InterfaceName, error: io::Error) -> WireguardError {
    WireguardError::Kernel {
        op,
        name: iface.to_string(),
        error,
    }
}

fn netlink_error(op: &'static str, name: &str, err: rtnetlink::Error) -> WireguardError {
    let errno = errno_of(&err);
    let message = match errno {
        Some(errno) => io::Error::from_raw_os_error(errno).to_string(),
        None => err.to_string(),
    };
    WireguardError::Netlink {
        op,
        name: name.to_owned(),
        errno,
        message,
    }
}

fn errno_of(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| code.get().abs()),
        _ => None,
    }
}

fn link_type(message: &LinkMessage) -> LinkType {
    for attribute in &message.attributes {
        if let LinkAttribute::LinkInfo(infos) = attribute {
            for info in infos {
                match info {
                    LinkInfo::Kind(InfoKind::Wireguard) => return LinkType::Wireguard,
                    LinkInfo::Kind(InfoKind::Tun) => return LinkType::Tun,
                    _ => {}
                }
            }
        }
    }
    LinkType::Other
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves nothing half-written that matters.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[path = "wireguard_tests.rs"]
mod tests;
