//! The node's key and the certificate the hub's cluster CA signed for it (see `hub::ca`), kept
//! under `<data-dir>/tls/`: `node.key` (never leaves the node, mode 0600), `node.crt`, `ca.crt`.
//!
//! The key is made once and kept across restarts; the agent sends a certificate request for it at
//! every registration and stores the certificate it gets back, so a restarted or re-registered
//! agent always holds a fresh one. Other nodes authenticate this node by that certificate
//! (`migrate::transport`).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::migrate::transport::{node_dns_name, NodeIdentity, TransportError};

/// What can go wrong with the node's key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate request: {0}")]
    Request(String),
    #[error("the hub's certificate: {0}")]
    Certificate(#[from] TransportError),
}

/// The node's key pair and where its certificates go.
pub struct NodeTls {
    dir: PathBuf,
    node_id: String,
    key: KeyPair,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("NodeTls")
            .field("dir", &self.dir)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads `dir/node.key`, or makes one (ECDSA P-256) if there is none yet.
    pub fn load_or_create(dir: &Path, node_id: &str) -> Result<Self, TlsError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", dir))?;
        let path = dir.join("node.key");
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| TlsError::Key {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(|e| TlsError::Key {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                write_private(&path, key.serialize_pem().as_bytes())?;
                tracing::info!(path = %path.display(), "node key created");
                key
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        Ok(Self {
            dir: dir.to_owned(),
            node_id: node_id.to_owned(),
            key,
        })
    }

    /// A PKCS#10 request (PEM) for the node's key, naming the node as the CA will.
    pub fn csr_pem(&self) -> Result<String, TlsError> {
        let dns = node_dns_name(&self.node_id)?;
        let mut params =
            CertificateParams::new(vec![dns]).map_err(|e| TlsError::Request(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.node_id.as_str());
        params.distinguished_name = dn;
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(|e| TlsError::Request(e.to_string()))
    }

    /// Checks what the hub sent (it must be for this node and this key, and chain to `ca_pem`),
    /// then stores it; returns the identity the migration endpoint uses.
    pub fn store(&self, cert_pem: &str, ca_pem: &str) -> Result<NodeIdentity, TlsError> {
        let identity = NodeIdentity::from_pem(
            cert_pem.as_bytes(),
            self.key.serialize_pem().as_bytes(),
            ca_pem.as_bytes(),
        )?;
        if identity.node_id() != self.node_id {
            return Err(TlsError::Certificate(TransportError::NotNodeCert {
                reason: format!(
                    "it names node {:?}, this is {:?}",
                    identity.node_id(),
                    self.node_id
                ),
            }));
        }
        write_public(&self.dir.join("ca.crt"), ca_pem.as_bytes())?;
        write_public(&self.dir.join("node.crt"), cert_pem.as_bytes())?;
        Ok(identity)
    }

    /// The identity stored by an earlier registration, if any (what a restarted agent uses until
    /// it has registered again).
    pub fn stored_identity(&self) -> Option<NodeIdentity> {
        let cert = std::fs::read(self.dir.join("node.crt")).ok()?;
        let ca = std::fs::read(self.dir.join("ca.crt")).ok()?;
        match NodeIdentity::from_pem(&cert, self.key.serialize_pem().as_bytes(), &ca) {
            Ok(identity) if identity.node_id() == self.node_id => Some(identity),
            Ok(_) | Err(_) => None,
        }
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Io { op, path, source }
}

/// Writes through a temp file and a rename, so a crash never leaves half a key or certificate.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_atomic(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    write_atomic(path, bytes, 0o644)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
    };

    /// What the hub's CA does, in small: sign the request's key for `node`.
    fn sign(csr_pem: &str, node: &str) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        csr.params = CertificateParams::new(vec![format!("{node}.node.berth")]).unwrap();
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = csr.signed_by(&issuer).unwrap();
        (cert.pem(), ca_cert.pem())
    }

    #[test]
    fn the_key_is_kept_private_and_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let first = NodeTls::load_or_create(&tls_dir, "n1").unwrap();
        let mode = std::fs::metadata(tls_dir.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = NodeTls::load_or_create(&tls_dir, "n1").unwrap();
        assert_eq!(first.key.serialize_pem(), again.key.serialize_pem());
    }

    #[test]
    fn a_certificate_for_this_node_is_stored_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls::load_or_create(dir.path(), "n1").unwrap();
        assert!(tls.stored_identity().is_none());
        let (cert, ca) = sign(&tls.csr_pem().unwrap(), "n1");
        let identity = tls.store(&cert, &ca).unwrap();
        assert_eq!(identity.node_id(), "n1");
        let restarted = NodeTls::load_or_create(dir.path(), "n1").unwrap();
        assert_eq!(restarted.stored_identity().unwrap().node_id(), "n1");
    }

    #[test]
    fn a_certificate_for_another_node_or_key_is_refused_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls::load_or_create(dir.path(), "n1").unwrap();
        let (cert, ca) = sign(&tls.csr_pem().unwrap(), "n2");
        assert!(tls.store(&cert, &ca).is_err());
        let other = NodeTls::load_or_create(&dir.path().join("other"), "n1").unwrap();
        let (cert, ca) = sign(&other.csr_pem().unwrap(), "n1");
        assert!(tls.store(&cert, &ca).is_err(), "someone else's key");
        assert!(!dir.path().join("node.crt").exists());
        assert!(tls.stored_identity().is_none());
    }

    #[test]
    fn a_damaged_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.key"), "not a key").unwrap();
        assert!(matches!(
            NodeTls::load_or_create(dir.path(), "n1"),
            Err(TlsError::Key { .. })
        ));
    }
}
