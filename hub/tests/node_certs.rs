//! The cluster CA against a real etcd: every hub replica uses the same one, and a node that sends a
//! certificate request at registration gets a certificate for its own name, signed by it.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod common;

use berth_hub::ca::ClusterCa;
use berth_proto::v1;
use berth_proto::v1::agent_service_server::AgentService;
use common::Hub;
use rcgen::{CertificateParams, KeyPair, PublicKeyData};

fn csr(key: &KeyPair) -> String {
    CertificateParams::new(vec!["n1.node.berth".to_owned()])
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

fn register(node: &str, csr_pem: String) -> v1::RegisterRequest {
    v1::RegisterRequest {
        node_id: node.into(),
        hostname: node.into(),
        advertise_ip: "127.0.0.1".into(),
        cpu_millis: 1000,
        memory_bytes: 1 << 30,
        csr_pem,
        ..Default::default()
    }
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

#[tokio::test]
async fn replicas_share_one_ca_and_nodes_get_certificates_for_their_own_name() {
    let hub = Hub::start(false).await;
    // A second replica (and a restart) finds the CA the first one created.
    let again = ClusterCa::load_or_create(&hub.store).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let resp = hub
        .grpc
        .register(tonic::Request::new(register("n1", csr(&key))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.ca_cert_pem, again.cert_pem());

    let cert_der = der(&resp.node_cert_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
    let ca_der = der(&resp.ca_cert_pem);
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
    assert_eq!(cert.public_key().raw, key.subject_public_key_info());
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

    // Without a request the node registers as before and gets no certificate.
    let plain = hub
        .grpc
        .register(tonic::Request::new(register("n2", String::new())))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.node_cert_pem.is_empty() && plain.ca_cert_pem.is_empty());
}

#[tokio::test]
async fn a_bad_request_registers_nothing() {
    let hub = Hub::start(false).await;
    let err = hub
        .grpc
        .register(tonic::Request::new(register(
            "n3",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("csr_pem"), "{}", err.message());
    let nodes = hub.store.get_prefix("/berth/nodes/").await.unwrap().0;
    assert!(nodes.is_empty(), "a node was recorded");
}
