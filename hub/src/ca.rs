//! The cluster CA: it signs each node's key at registration, so agents can authenticate each other
//! (the migration link between two nodes is mutual TLS with these certificates).
//!
//! One CA per cluster, shared by every hub replica: the first replica to start creates it and
//! stores it in etcd with a create-if-absent transaction; the others (and later restarts) load it.
//! The private key sits in etcd in the clear, like Kubernetes secrets without encryption at rest:
//! whoever can read etcd can mint node certificates, so etcd must be reachable by the hubs only.
//!
//! A node certificate names the node in exactly one DNS SAN, `<node-id>.node.berth` (the form the
//! agent's `migrate::transport` checks), is valid for server and client authentication, and lasts
//! [`NODE_CERT_DAYS`]; agents get a fresh one each time they register.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::store::{keys, to_json, Store, StoreError};

/// Suffix of the DNS name that carries a node id in its certificate.
pub const NODE_NAME_SUFFIX: &str = ".node.berth";
/// How long a node certificate is valid; nodes renew by registering again.
pub const NODE_CERT_DAYS: i64 = 365;
/// How long the CA is valid.
const CA_YEARS: i64 = 10;
/// The CA's common name.
const CA_NAME: &str = "berth cluster CA";
/// Tolerated clock difference between the hub and the nodes.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// What can go wrong with the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the cluster CA stored at {key} is unusable: {reason}")]
    Stored { key: String, reason: String },
    #[error("cannot create the cluster CA: {0}")]
    Create(String),
    #[error("certificate signing request: {0}")]
    BadRequest(String),
    #[error("cannot sign a certificate for node {node_id}: {reason}")]
    Sign { node_id: String, reason: String },
}

/// The CA as stored at [`keys::CA`].
#[derive(Serialize, Deserialize)]
struct CaRecord {
    cert_pem: String,
    key_pem: String,
    created_at: String,
}

/// A node's signed certificate and the CA that signed it (both PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub cert_pem: String,
    pub ca_cert_pem: String,
}

/// The cluster CA, loaded once per hub process.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Loads the cluster's CA from etcd, creating it if no replica has yet.
    pub async fn load_or_create(store: &Store) -> Result<Self, CaError> {
        if let Some(ca) = Self::load(store).await? {
            return Ok(ca);
        }
        let (record, ca) = Self::generate()?;
        let key = keys::CA;
        let txn = Txn::new()
            .when(vec![Compare::version(key, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, to_json(&record), None)]);
        if store.txn(txn).await?.succeeded() {
            tracing::info!("created the cluster CA");
            return Ok(ca);
        }
        // Another replica created it between our read and our write: use theirs.
        Self::load(store).await?.ok_or_else(|| CaError::Stored {
            key: key.to_owned(),
            reason: "vanished right after another hub created it".to_owned(),
        })
    }

    async fn load(store: &Store) -> Result<Option<Self>, CaError> {
        let Some(found) = store.get_json::<CaRecord>(keys::CA).await? else {
            return Ok(None);
        };
        let stored = |reason: String| CaError::Stored {
            key: keys::CA.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&found.value.key_pem)
            .map_err(|e| stored(format!("private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&found.value.cert_pem, key)
            .map_err(|e| stored(format!("certificate: {e}")))?;
        Ok(Some(Self {
            cert_pem: found.value.cert_pem,
            issuer,
        }))
    }

    fn generate() -> Result<(CaRecord, Self), CaError> {
        let create = |e: rcgen::Error| CaError::Create(e.to_string());
        let key = KeyPair::generate().map_err(create)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(CA_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(365 * CA_YEARS);
        let cert = params.self_signed(&key).map_err(create)?;
        let record = CaRecord {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            created_at: crate::service::now_rfc3339(),
        };
        let ca = Self {
            cert_pem: record.cert_pem.clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((record, ca))
    }

    /// The CA certificate (PEM) nodes trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs the key of `csr_pem` (a PKCS#10 request, whose signature proves the node holds the
    /// key) for `node_id`. Only the key is taken from the request: names, usages and validity are
    /// the CA's choice, so a node cannot ask for another node's name or for CA powers.
    pub fn sign_node(&self, node_id: &str, csr_pem: &str) -> Result<NodeCert, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadRequest(e.to_string()))?;
        let sign = |reason: String| CaError::Sign {
            node_id: node_id.to_owned(),
            reason,
        };
        if !is_dns_label(node_id) {
            return Err(sign(
                "a node id must be a DNS label (a-z, 0-9, '-' inside, at most 63)".to_owned(),
            ));
        }
        let dns = format!("{node_id}{NODE_NAME_SUFFIX}");
        let mut params = CertificateParams::default();
        params.distinguished_name = name(node_id);
        params.subject_alt_names =
            vec![SanType::DnsName(dns.as_str().try_into().map_err(|e| {
                sign(format!("{dns:?} is not a DNS name: {e}"))
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(NODE_CERT_DAYS);
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|e| sign(e.to_string()))?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            ca_cert_pem: self.cert_pem.clone(),
        })
    }
}

/// The node id goes into a DNS name, where anything else would be refused by the verifying side.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "berth");
    dn.push(DnType::CommonName, common_name);
    dn
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    fn csr(key: &KeyPair, sans: &[&str]) -> String {
        let params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_node_gets_its_own_name_whatever_it_asked_for() {
        let (_, ca) = ClusterCa::generate().unwrap();
        let key = KeyPair::generate().unwrap();
        let signed = ca
            .sign_node("n1", &csr(&key, &["n2.node.berth", "*.node.berth"]))
            .unwrap();
        assert_eq!(signed.ca_cert_pem, ca.cert_pem());
        let pem = pem_der(&signed.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&pem).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec!["DNSName(n1.node.berth)".to_owned()]);
        assert!(!cert.is_ca());
        // The node's key, not one of ours.
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        // Signed by the CA.
        let ca_der = pem_der(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert!(ca_cert.is_ca());
    }

    #[test]
    fn garbage_and_forged_requests_are_refused() {
        let (_, ca) = ClusterCa::generate().unwrap();
        assert!(matches!(
            ca.sign_node("n1", "not a csr"),
            Err(CaError::BadRequest(_))
        ));
        // A request whose signature does not match its key proves nothing.
        let key = KeyPair::generate().unwrap();
        let good = csr(&key, &["n1.node.berth"]);
        let mut der = pem_der(&good);
        let last = der.len() - 1;
        der[last] ^= 0x55;
        let forged = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(
            ca.sign_node("n1", &forged),
            Err(CaError::BadRequest(_))
        ));
    }

    #[test]
    fn an_invalid_node_name_is_refused() {
        let (_, ca) = ClusterCa::generate().unwrap();
        let key = KeyPair::generate().unwrap();
        for bad in ["bad name", "n1.evil", "-n1", "n1-", "N1", ""] {
            assert!(
                matches!(
                    ca.sign_node(bad, &csr(&key, &[])),
                    Err(CaError::Sign { .. })
                ),
                "{bad:?}"
            );
        }
    }

    fn pem_der(pem_text: &str) -> Vec<u8> {
        pem::parse(pem_text).unwrap().into_contents()
    }
}
