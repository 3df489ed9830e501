//! A throwaway cluster CA and node identities for the migration tests (what `hub::ca` does for
//! real).
#![allow(clippy::unwrap_used)] // test support may unwrap

use std::net::SocketAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::transport::{node_dns_name, NodeIdentity};

pub(crate) struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

pub(crate) fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// A certificate with these DNS SANs signed by `ca`, as (cert PEM, key PEM).
pub(crate) fn leaf(ca: &Ca, sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Node `node_id`'s identity under `ca`.
pub(crate) fn identity(ca: &Ca, node_id: &str) -> NodeIdentity {
    let (cert, key) = leaf(ca, &[&node_dns_name(node_id).unwrap()]);
    NodeIdentity::from_pem(cert.as_bytes(), key.as_bytes(), ca.pem.as_bytes()).unwrap()
}

/// 127.0.0.1, any port.
pub(crate) fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
