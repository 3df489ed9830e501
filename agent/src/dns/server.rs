//! The listeners: one UDP socket and one TCP listener per served address, each in its own task.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout};
use tracing::{debug, info, warn};

use super::forward::{forward, read_framed, write_framed, Transport, MAX_MESSAGE};
use super::handler::{handle, server_failure, Outcome};
use super::records::Records;

/// The DNS port, where containers' resolvers look.
pub const DNS_PORT: u16 = 53;

/// How long a forwarded query may wait for the upstreams, all of them together. Below the
/// containers' resolver timeout (2 s per try in [`super::resolv_conf`]) it would be too short
/// for slow upstreams; equal to it, the client retries about when the SERVFAIL arrives.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Forwarded UDP queries in flight per listener; beyond that, new ones get SERVFAIL at once
/// rather than a socket each.
const MAX_UDP_IN_FLIGHT: usize = 256;

/// Open TCP connections per listener; beyond that, new ones are closed at once.
const MAX_TCP_CONNECTIONS: usize = 64;

/// A TCP connection idle (or stalled mid-message) this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Tries at finding a port free for both UDP and TCP when asked for port 0.
const EPHEMERAL_BIND_TRIES: usize = 8;

/// Errors of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// An address could not be served (e.g. the bridge does not carry it yet).
    #[error("serving dns on {addr} ({protocol}): {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// Why the kernel refused.
        source: io::Error,
    },
}

/// The node's DNS server: answers berth names from the current [`Records`] and relays other
/// names to the upstream resolvers, on every address given to [`DnsServer::ensure_listeners`].
///
/// Dropping it stops every listener (without waiting); [`DnsServer::shutdown`] also waits until
/// their sockets are closed.
pub struct DnsServer {
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<SocketAddr, Listener>>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("upstreams", &self.shared.upstreams)
            .field("forward_timeout", &self.shared.forward_timeout)
            .finish_non_exhaustive()
    }
}

/// What every listener task reads.
struct Shared {
    /// Swapped whole; readers hold the lock only to clone the `Arc`.
    records: RwLock<Arc<Records>>,
    upstreams: Vec<SocketAddr>,
    forward_timeout: Duration,
}

struct Listener {
    bound: SocketAddr,
    tasks: [AbortOnDrop; 2],
}

/// A task that is cancelled when its handle goes away, so nothing outlives the server.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl DnsServer {
    /// A server with no listener and no records, relaying other names to `upstreams` (tried in
    /// order; empty: such names do not exist, NXDOMAIN).
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        Self {
            shared: Arc::new(Shared {
                records: RwLock::new(Arc::new(Records::new())),
                upstreams,
                forward_timeout: DEFAULT_FORWARD_TIMEOUT,
            }),
            listeners: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces [`DEFAULT_FORWARD_TIMEOUT`]. Call before [`DnsServer::ensure_listeners`].
    #[must_use]
    pub fn with_forward_timeout(self, forward_timeout: Duration) -> Self {
        let shared = Shared {
            records: RwLock::new(self.records()),
            upstreams: self.shared.upstreams.clone(),
            forward_timeout,
        };
        Self {
            shared: Arc::new(shared),
            listeners: self.listeners,
        }
    }

    /// The upstream resolvers, in the order they are tried.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.shared.upstreams
    }

    /// Replaces the whole table of names. Queries being answered finish with the table they
    /// started with; the next ones see the new one.
    pub fn set_records(&self, records: Records) {
        let records = Arc::new(records);
        *self
            .shared
            .records
            .write()
            .unwrap_or_else(PoisonError::into_inner) = records;
    }

    /// The table of names in use.
    pub fn records(&self) -> Arc<Records> {
        self.shared.records()
    }

    /// Serves exactly `addrs`: binds UDP and TCP on each address not yet served and stops
    /// (waiting until their sockets are closed) the listeners of addresses no longer listed.
    ///
    /// Every address is tried; the first failure is returned (the others are logged) and the
    /// failed addresses stay unserved, to be tried again on the next call. Port 0 picks one
    /// free port for both protocols: see [`DnsServer::local_addr`].
    pub async fn ensure_listeners(&self, addrs: &[SocketAddr]) -> Result<(), DnsError> {
        let mut listeners = self.listeners.lock().await;
        let gone: Vec<SocketAddr> = listeners
            .keys()
            .filter(|addr| !addrs.contains(addr))
            .copied()
            .collect();
        for addr in gone {
            if let Some(listener) = listeners.remove(&addr) {
                listener.stop().await;
                info!(%addr, "dns listener stopped");
            }
        }
        let mut first_error = None;
        for &addr in addrs {
            if listeners.contains_key(&addr) {
                continue;
            }
            match self.listen(addr).await {
                Ok(listener) => {
                    info!(%addr, bound = %listener.bound, "dns listener started");
                    listeners.insert(addr, listener);
                }
                Err(error) => {
                    warn!(%error, "dns listener not started");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The address a listener asked for as `requested` is bound to (they differ for port 0).
    pub async fn local_addr(&self, requested: SocketAddr) -> Option<SocketAddr> {
        self.listeners.lock().await.get(&requested).map(|l| l.bound)
    }

    /// The addresses being served, as given to [`DnsServer::ensure_listeners`].
    pub async fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.lock().await.keys().copied().collect()
    }

    /// Stops every listener and waits until their sockets are closed. The server can listen
    /// again afterwards.
    pub async fn shutdown(&self) {
        let listeners: Vec<Listener> = self
            .listeners
            .lock()
            .await
            .drain()
            .map(|(_, l)| l)
            .collect();
        for listener in listeners {
            listener.stop().await;
        }
    }

    async fn listen(&self, addr: SocketAddr) -> Result<Listener, DnsError> {
        let (udp, tcp) = bind_both(addr).await?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind {
            addr,
            protocol: "udp",
            source,
        })?;
        let udp_task = tokio::spawn(serve_udp(Arc::new(udp), self.shared.clone(), bound));
        let tcp_task = tokio::spawn(serve_tcp(tcp, self.shared.clone(), bound));
        Ok(Listener {
            bound,
            tasks: [AbortOnDrop(udp_task), AbortOnDrop(tcp_task)],
        })
    }
}

impl Shared {
    fn records(&self) -> Arc<Records> {
        self.records
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The upstream's answer to a forwarded query, or SERVFAIL.
    async fn relay(&self, packet: &[u8], query: &Message, transport: Transport) -> Option<Vec<u8>> {
        let id = query.metadata.id;
        match forward(packet, id, &self.upstreams, self.forward_timeout, transport).await {
            Ok(reply) => Some(reply),
            Err(error) => {
                let name = query.queries.first().map(|q| q.name().to_string());
                debug!(%error, id, ?name, "forwarded dns query failed");
                server_failure(query)
            }
        }
    }
}

impl Listener {
    async fn stop(mut self) {
        for task in &mut self.tasks {
            task.0.abort();
            // Awaiting the cancelled task makes sure its sockets are closed before the address
            // may be bound again.
            let _ = (&mut task.0).await;
        }
    }
}

async fn bind_both(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let tries = if addr.port() == 0 {
        EPHEMERAL_BIND_TRIES
    } else {
        1
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                addr,
                protocol: "udp",
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| DnsError::Bind {
            addr,
            protocol: "udp",
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // The kernel's free UDP port may be a busy TCP one: pick another.
            Err(error) if attempt < tries && error.kind() == io::ErrorKind::AddrInUse => {}
            Err(source) => {
                return Err(DnsError::Bind {
                    addr,
                    protocol: "tcp",
                    source,
                })
            }
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>, bound: SocketAddr) {
    // Dropped with this task, which cancels the forwarded queries still waiting.
    let mut in_flight = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        tokio::select! {
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            received = socket.recv_from(&mut buf) => {
                let (len, peer) = match received {
                    Ok(received) => received,
                    Err(error) => {
                        warn!(%error, %bound, "dns udp receive failed");
                        // Whatever it is, do not spin on it.
                        sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let packet = &buf[..len];
                let records = shared.records();
                match handle(packet, &records, !shared.upstreams.is_empty()) {
                    Outcome::Reply(reply) => send_udp(&socket, &reply, peer).await,
                    Outcome::Drop => debug!(%peer, %bound, len, "dns datagram dropped"),
                    Outcome::Forward(query) if in_flight.len() >= MAX_UDP_IN_FLIGHT => {
                        warn!(%peer, %bound, "too many forwarded dns queries in flight");
                        if let Some(reply) = server_failure(&query) {
                            send_udp(&socket, &reply, peer).await;
                        }
                    }
                    Outcome::Forward(query) => {
                        let packet = packet.to_vec();
                        let socket = socket.clone();
                        let shared = shared.clone();
                        in_flight.spawn(async move {
                            if let Some(reply) = shared.relay(&packet, &query, Transport::Udp).await {
                                send_udp(&socket, &reply, peer).await;
                            }
                        });
                    }
                }
            }
        }
    }
}

async fn send_udp(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(error) = socket.send_to(reply, peer).await {
        debug!(%error, %peer, "dns udp reply not sent");
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, bound: SocketAddr) {
    // Dropped with this task, which closes every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= MAX_TCP_CONNECTIONS {
                        warn!(%peer, %bound, "too many dns tcp connections, closing a new one");
                        continue;
                    }
                    connections.spawn(serve_connection(stream, peer, shared.clone()));
                }
                Err(error) => {
                    // Typically out of file descriptors: wait for some to be freed.
                    warn!(%error, %bound, "dns tcp accept failed");
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Answers the queries of one TCP connection in turn until the client closes it, goes idle,
/// or sends something that gets no answer.
async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok(Ok(packet)) = timeout(TCP_IDLE, read_framed(&mut stream)).await else {
            return;
        };
        let records = shared.records();
        let reply = match handle(&packet, &records, !shared.upstreams.is_empty()) {
            Outcome::Reply(reply) => reply,
            Outcome::Drop => {
                debug!(%peer, "dns tcp message dropped, closing");
                return;
            }
            Outcome::Forward(query) => match shared.relay(&packet, &query, Transport::Tcp).await {
                Some(reply) => reply,
                None => return,
            },
        };
        match timeout(TCP_IDLE, write_framed(&mut stream, &reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
