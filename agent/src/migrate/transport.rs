//! The migration link: one QUIC connection (`quinn`) between the source and the target agent,
//! mutually authenticated with node certificates signed by the cluster CA.
//!
//! # Identities
//! A [`NodeIdentity`] is a node's certificate chain, its private key and the cluster CA
//! certificate, loaded from PEM ([`NodeIdentity::from_pem`], [`NodeIdentity::from_pem_files`]) or
//! DER. The node certificate:
//! - is signed by the cluster CA (directly, or through intermediates sent in the chain);
//! - names its node with exactly one DNS subject alternative name `<node-id>.node.berth`
//!   ([`node_dns_name`]); node ids are 1-40 characters of `a-z`, `0-9` and `-`, neither starting
//!   nor ending with `-` (the agent's `--node-id` rule plus DNS's no-trailing-hyphen rule). Other
//!   SANs (an IP, say) are allowed and ignored;
//! - allows both TLS client and server authentication (extended key usages `serverAuth` and
//!   `clientAuth`, or no EKU extension at all), because each agent both dials and accepts.
//!
//! Loading checks all of that against the CA and that the key matches the certificate, so a
//! misissued identity fails at start-up with a clear message rather than at the first migration.
//!
//! # Endpoint
//! [`MigrationEndpoint::bind`] opens one UDP socket that is both the server (accepts migrations
//! from other nodes) and the client (dials peers). TLS 1.3 only, ALPN [`ALPN`]
//! (`berth-migrate/1`), no session resumption or 0-RTT (each migration does a full handshake, so a
//! connection's peer identity always comes from a certificate verified on that connection).
//! - Accepting side: a client certificate signed by the cluster CA is required (rustls
//!   `WebPkiClientVerifier`, the CA as the only root); [`MigrationEndpoint::accept`] returns the
//!   connection with the peer's node id read from its verified certificate. Any CA-signed node may
//!   connect: the caller checks that the id is the node the hub named for this migration.
//! - Dialling side: [`MigrationEndpoint::connect`] verifies the server's certificate against the CA
//!   with `<peer-node-id>.node.berth` as the server name, so a different node (even a valid one)
//!   fails the handshake; the node id in the certificate is checked again after the handshake.
//!
//! Both sides use [`TransportSettings`]: large but bounded flow-control windows for bulk transfer
//! on a LAN (at most `connection_receive_window` bytes buffered per connection on the receiving
//! side and `send_window` on the sending side), and a keep-alive well inside the idle timeout so a
//! cut link or a dead peer fails every pending read and write within `idle_timeout` (5 s by
//! default) instead of hanging.
//!
//! The crypto provider (aws-lc-rs, the one rustls already uses in this binary) is passed
//! explicitly to every config: nothing is installed process-wide.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The ALPN protocol both sides must offer: bump the version when the migration protocol on the
/// streams changes incompatibly, so mismatched agents fail the handshake with a clear reason.
pub const ALPN: &[u8] = b"berth-migrate/1";

/// The DNS suffix of a node's name in its certificate: `<node-id>` + this.
pub const NODE_NAME_SUFFIX: &str = ".node.berth";

/// The longest node id (the agent's `--node-id` limit).
const MAX_NODE_ID_LEN: usize = 40;

/// Why loading an identity, binding, dialling or accepting failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// PEM text that does not parse, or holds nothing of the expected kind.
    #[error("bad PEM in {what}: {reason}")]
    Pem {
        /// What was being read (a path, or "certificate chain", "private key", "CA certificate").
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A node id that cannot be a node certificate name.
    #[error(
        "invalid node id {0:?}: use 1-40 of a-z, 0-9 and '-', not starting or ending with '-'"
    )]
    InvalidNodeId(String),
    /// A certificate that does not name exactly one node as `<node-id>.node.berth`.
    #[error("certificate is not a berth node certificate: {reason}")]
    NotNodeCert {
        /// What is missing or ambiguous.
        reason: String,
    },
    /// The node's private key does not belong to its certificate.
    #[error("node {node_id}: private key does not match the certificate: {source}")]
    KeyMismatch {
        /// The node the certificate names.
        node_id: String,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The node certificate does not verify under the cluster CA (other CA, expired, wrong key
    /// usage).
    #[error("node {node_id}: certificate not valid under the cluster CA: {source}")]
    Untrusted {
        /// The node the certificate names.
        node_id: String,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The cluster CA certificate cannot be used as a trust anchor.
    #[error("cluster CA certificate unusable: {reason}")]
    CaCert {
        /// Why.
        reason: String,
    },
    /// Building the TLS or QUIC configuration failed.
    #[error("tls configuration for node {node_id}: {reason}")]
    TlsConfig {
        /// This node.
        node_id: String,
        /// Why.
        reason: String,
    },
    /// A setting out of QUIC's range.
    #[error("transport setting {name}: {reason}")]
    Setting {
        /// The setting.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The UDP socket could not be bound (or no tokio runtime is running).
    #[error("bind migration endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// quinn refused to start a connection (endpoint closed, bad address).
    #[error("connect to node {node_id} at {addr}: {source}")]
    Connect {
        /// The peer we dialled.
        node_id: String,
        /// Its address.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The QUIC/TLS handshake failed (certificate rejected, ALPN mismatch, peer closed).
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer's address.
        addr: SocketAddr,
        /// quinn's reason (carries the TLS alert or verification error).
        #[source]
        source: quinn::ConnectionError,
    },
    /// The handshake did not finish in time (nobody listening, link down).
    #[error("handshake with {addr} timed out after {timeout:?}")]
    Timeout {
        /// The peer's address.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The peer authenticated as a different node than the one expected.
    #[error("peer at {addr} is node {actual}, expected node {expected}")]
    PeerMismatch {
        /// The peer's address.
        addr: SocketAddr,
        /// The node we meant to reach.
        expected: String,
        /// The node its certificate names.
        actual: String,
    },
}

/// A node's TLS identity: its certificate chain (leaf first), private key and the cluster CA.
#[derive(Debug)]
pub struct NodeIdentity {
    node_id: String,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_cert: CertificateDer<'static>,
}

/// QUIC settings for migration connections. Both ends should use the same values (the idle
/// timeout in effect is the smaller of the two).
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// How long [`MigrationEndpoint::connect`] and [`MigrationEndpoint::accept`] wait for a
    /// handshake.
    pub connect_timeout: Duration,
    /// A connection that hears nothing from its peer for this long fails (every pending stream
    /// operation returns an error).
    pub idle_timeout: Duration,
    /// Send a keep-alive after this much silence; must be well below `idle_timeout`.
    pub keep_alive: Duration,
    /// Bytes a peer may send on one stream ahead of our reads.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on all streams of a connection ahead of our reads.
    pub connection_receive_window: u32,
    /// Bytes we buffer unacknowledged for sending, over all streams of a connection.
    pub send_window: u64,
    /// Streams of each kind (bidirectional, unidirectional) a peer may have open at once.
    pub max_concurrent_streams: u32,
}

/// One node's migration endpoint: accepts connections from other nodes and dials them.
#[derive(Debug)]
pub struct MigrationEndpoint {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    node_id: String,
    connect_timeout: Duration,
}

impl Default for TransportSettings {
    /// LAN defaults: 16 MiB per stream and 64 MiB per connection in flight (several round trips of
    /// a 10 Gbit/s LAN, far below a node's memory), a lost peer detected within 5 s.
    fn default() -> Self {
        TransportSettings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            stream_receive_window: 16 << 20,
            connection_receive_window: 64 << 20,
            send_window: 64 << 20,
            max_concurrent_streams: 64,
        }
    }
}

impl TransportSettings {
    fn transport_config(&self) -> Result<quinn::TransportConfig, TransportError> {
        let idle =
            IdleTimeout::try_from(self.idle_timeout).map_err(|e| TransportError::Setting {
                name: "idle_timeout",
                reason: e.to_string(),
            })?;
        if self.keep_alive >= self.idle_timeout {
            return Err(TransportError::Setting {
                name: "keep_alive",
                reason: format!(
                    "{:?} must be shorter than the idle timeout {:?}",
                    self.keep_alive, self.idle_timeout
                ),
            });
        }
        let mut config = quinn::TransportConfig::default();
        config
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.connection_receive_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_streams))
            // quinn's default (333 ms) is meant for the internet; on a LAN a lost handshake packet
            // is resent sooner this way.
            .initial_rtt(Duration::from_millis(50));
        Ok(config)
    }
}

/// The DNS name a node's certificate carries: `<node-id>.node.berth`.
pub fn node_dns_name(node_id: &str) -> Result<String, TransportError> {
    if !valid_node_id(node_id) {
        return Err(TransportError::InvalidNodeId(node_id.to_string()));
    }
    let name = format!("{node_id}{NODE_NAME_SUFFIX}");
    // The alphabet check above should make this redundant; rustls' own DNS rules decide.
    ServerName::try_from(name.as_str())
        .map_err(|_| TransportError::InvalidNodeId(node_id.to_string()))?;
    Ok(name)
}

/// The node id a certificate names (its single `<node-id>.node.berth` DNS SAN). This only reads
/// the certificate: it does not verify it.
pub fn cert_node_id(cert: &CertificateDer<'_>) -> Result<String, TransportError> {
    let parsed =
        webpki::EndEntityCert::try_from(cert).map_err(|e| TransportError::NotNodeCert {
            reason: format!("unparsable certificate: {e}"),
        })?;
    let names: Vec<&str> = parsed
        .valid_dns_names()
        .filter_map(|name| name.strip_suffix(NODE_NAME_SUFFIX))
        .collect();
    match names.as_slice() {
        [id] if valid_node_id(id) => Ok((*id).to_string()),
        [id] => Err(TransportError::NotNodeCert {
            reason: format!("{id}{NODE_NAME_SUFFIX} does not name a valid node id"),
        }),
        [] => Err(TransportError::NotNodeCert {
            reason: format!("no DNS subject alternative name ending in {NODE_NAME_SUFFIX}"),
        }),
        several => Err(TransportError::NotNodeCert {
            reason: format!("several node names {several:?}"),
        }),
    }
}

/// The node id of a connection's peer, from the certificate it presented in the handshake
/// (verified by the handshake against the cluster CA).
pub fn peer_node_id(connection: &quinn::Connection) -> Result<String, TransportError> {
    let no_cert = || TransportError::NotNodeCert {
        reason: format!(
            "peer at {} presented no certificate",
            connection.remote_address()
        ),
    };
    let identity = connection.peer_identity().ok_or_else(no_cert)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| no_cert())?;
    cert_node_id(chain.first().ok_or_else(no_cert)?)
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn pem_err(what: &str, reason: impl ToString) -> TransportError {
    TransportError::Pem {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, e))?;
    if certs.is_empty() {
        return Err(pem_err(what, "no CERTIFICATE block"));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_err(what, e))
}

fn ca_roots(ca_cert: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_cert.clone())
        .map_err(|e| TransportError::CaCert {
            reason: e.to_string(),
        })?;
    Ok(Arc::new(roots))
}

fn server_verifier(
    ca_cert: &CertificateDer<'static>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TransportError> {
    WebPkiServerVerifier::builder_with_provider(ca_roots(ca_cert)?, provider.clone())
        .build()
        .map_err(|e| TransportError::CaCert {
            reason: e.to_string(),
        })
}

fn client_verifier(
    ca_cert: &CertificateDer<'static>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TransportError> {
    // No `allow_unauthenticated()`: a client without a CA-signed certificate fails the handshake.
    WebPkiClientVerifier::builder_with_provider(ca_roots(ca_cert)?, provider.clone())
        .build()
        .map_err(|e| TransportError::CaCert {
            reason: e.to_string(),
        })
}

impl NodeIdentity {
    /// An identity from PEM text: the node certificate (followed by any intermediates), its
    /// private key (PKCS#8, PKCS#1 or SEC1) and the cluster CA certificate. Checks everything
    /// the module doc lists.
    pub fn from_pem(
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        ca_cert_pem: &[u8],
    ) -> Result<Self, TransportError> {
        Self::from_parts_pem(
            cert_chain_pem,
            "certificate chain",
            key_pem,
            "private key",
            ca_cert_pem,
            "CA certificate",
        )
    }

    /// [`NodeIdentity::from_pem`] reading three files.
    pub fn from_pem_files(
        cert_chain: &Path,
        key: &Path,
        ca_cert: &Path,
    ) -> Result<Self, TransportError> {
        Self::from_parts_pem(
            &read_file(cert_chain)?,
            &cert_chain.display().to_string(),
            &read_file(key)?,
            &key.display().to_string(),
            &read_file(ca_cert)?,
            &ca_cert.display().to_string(),
        )
    }

    fn from_parts_pem(
        chain: &[u8],
        chain_what: &str,
        key: &[u8],
        key_what: &str,
        ca: &[u8],
        ca_what: &str,
    ) -> Result<Self, TransportError> {
        let cert_chain = parse_certs(chain, chain_what)?;
        let key = parse_key(key, key_what)?;
        let mut ca_certs = parse_certs(ca, ca_what)?;
        if ca_certs.len() != 1 {
            return Err(pem_err(ca_what, "expected exactly one CA certificate"));
        }
        let ca_cert = ca_certs.remove(0);
        Self::from_der(cert_chain, key, ca_cert)
    }

    /// An identity from DER: the chain leaf first. Checks everything the module doc lists.
    pub fn from_der(
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca_cert: CertificateDer<'static>,
    ) -> Result<Self, TransportError> {
        let leaf = cert_chain
            .first()
            .ok_or_else(|| TransportError::NotNodeCert {
                reason: "empty certificate chain".to_string(),
            })?;
        let node_id = cert_node_id(leaf)?;
        let provider = crypto_provider();
        rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider)
            .map_err(|source| TransportError::KeyMismatch {
                node_id: node_id.clone(),
                source,
            })?;

        // Verify exactly as the peers will: as a server under our own node name, and as a client.
        let untrusted = |source| TransportError::Untrusted {
            node_id: node_id.clone(),
            source,
        };
        let now = UnixTime::now();
        let name = ServerName::try_from(node_dns_name(&node_id)?)
            .map_err(|_| TransportError::InvalidNodeId(node_id.clone()))?;
        server_verifier(&ca_cert, &provider)?
            .verify_server_cert(leaf, &cert_chain[1..], &name, &[], now)
            .map_err(untrusted)?;
        client_verifier(&ca_cert, &provider)?
            .verify_client_cert(leaf, &cert_chain[1..], now)
            .map_err(untrusted)?;

        Ok(NodeIdentity {
            node_id,
            cert_chain,
            key,
            ca_cert,
        })
    }

    /// The node id the certificate names.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn tls_config_err(&self, reason: impl ToString) -> TransportError {
        TransportError::TlsConfig {
            node_id: self.node_id.clone(),
            reason: reason.to_string(),
        }
    }

    fn server_config(
        &self,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TransportError> {
        let provider = crypto_provider();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.tls_config_err(e))?
            .with_client_cert_verifier(client_verifier(&self.ca_cert, &provider)?)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| self.tls_config_err(e))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // No resumption: every connection's peer identity comes from a full certificate check.
        tls.send_tls13_tickets = 0;
        let quic = QuicServerConfig::try_from(tls).map_err(|e| self.tls_config_err(e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport.clone());
        Ok(config)
    }

    fn client_config(
        &self,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TransportError> {
        let provider = crypto_provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.tls_config_err(e))?
            .with_webpki_verifier(server_verifier(&self.ca_cert, &provider)?)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(|e| self.tls_config_err(e))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = Resumption::disabled();
        tls.enable_early_data = false;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| self.tls_config_err(e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport.clone());
        Ok(config)
    }
}

impl MigrationEndpoint {
    /// Bind with [`TransportSettings::default`]. Must run inside a tokio runtime.
    pub fn bind(addr: SocketAddr, identity: &NodeIdentity) -> Result<Self, TransportError> {
        Self::bind_with(addr, identity, &TransportSettings::default())
    }

    /// Bind a UDP socket on `addr` (port 0 picks one: see [`MigrationEndpoint::local_addr`]) that
    /// accepts and dials migration connections as `identity`. Must run inside a tokio runtime.
    pub fn bind_with(
        addr: SocketAddr,
        identity: &NodeIdentity,
        settings: &TransportSettings,
    ) -> Result<Self, TransportError> {
        let transport = Arc::new(settings.transport_config()?);
        let server_config = identity.server_config(&transport)?;
        let client_config = identity.client_config(&transport)?;
        let endpoint = quinn::Endpoint::server(server_config, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        tracing::debug!(node_id = %identity.node_id, %addr, "migration endpoint bound");
        Ok(MigrationEndpoint {
            endpoint,
            client_config,
            node_id: identity.node_id.clone(),
            connect_timeout: settings.connect_timeout,
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.endpoint.local_addr()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Dial node `peer_node_id` at `peer_addr`. Succeeds only if the peer proves, with a
    /// certificate signed by the cluster CA, that it is that node; fails after the connect
    /// timeout if nobody answers.
    pub async fn connect(
        &self,
        peer_addr: SocketAddr,
        peer_node_id: &str,
    ) -> Result<quinn::Connection, TransportError> {
        let server_name = node_dns_name(peer_node_id)?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), peer_addr, &server_name)
            .map_err(|source| TransportError::Connect {
                node_id: peer_node_id.to_string(),
                addr: peer_addr,
                source,
            })?;
        let connection = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| TransportError::Timeout {
                addr: peer_addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| TransportError::Handshake {
                addr: peer_addr,
                source,
            })?;
        // The TLS name check already pinned the node; this also refuses a wildcard certificate
        // that would match any node.
        let actual = peer_node_id_or_close(&connection)?;
        if actual != peer_node_id {
            connection.close(VarInt::from_u32(1), b"unexpected node");
            return Err(TransportError::PeerMismatch {
                addr: peer_addr,
                expected: peer_node_id.to_string(),
                actual,
            });
        }
        let node_id = &self.node_id;
        tracing::debug!(%node_id, peer = %actual, %peer_addr, "migration connection dialled");
        Ok(connection)
    }

    /// The next incoming connection, handshake done, with the peer's authenticated node id.
    /// `None` once the endpoint is closed. An `Err` concerns that one connection attempt
    /// (certificate rejected, timeout): keep calling. Handshakes are awaited here one at a time,
    /// each bounded by the connect timeout.
    pub async fn accept(&self) -> Option<Result<(quinn::Connection, String), TransportError>> {
        let incoming = self.endpoint.accept().await?;
        let addr = incoming.remote_address();
        let result = match tokio::time::timeout(self.connect_timeout, incoming).await {
            Err(_) => Err(TransportError::Timeout {
                addr,
                timeout: self.connect_timeout,
            }),
            Ok(Err(source)) => Err(TransportError::Handshake { addr, source }),
            Ok(Ok(connection)) => peer_node_id_or_close(&connection).map(|peer| (connection, peer)),
        };
        let node_id = &self.node_id;
        match &result {
            Ok((_, peer)) => {
                tracing::debug!(%node_id, %peer, peer_addr = %addr, "migration peer accepted");
            }
            Err(error) => {
                tracing::warn!(%node_id, peer_addr = %addr, %error, "migration connection refused");
            }
        }
        Some(result)
    }

    /// Close every connection at once (peers see the close, not a timeout) and stop accepting.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"endpoint closed");
    }

    /// Wait until every connection's close has been delivered (or timed out); call after
    /// [`MigrationEndpoint::close`] before the process exits.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

fn peer_node_id_or_close(connection: &quinn::Connection) -> Result<String, TransportError> {
    peer_node_id(connection).inspect_err(|_| {
        connection.close(VarInt::from_u32(1), b"not a node certificate");
    })
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
