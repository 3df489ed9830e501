use super::super::test_pki::{ca, identity, leaf, localhost, Ca};
use super::*;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// An identity that skips the load-time checks, to play a misbehaving peer.
fn unchecked_identity(node_id: &str, signer: &Ca, sans: &[&str], trusted: &Ca) -> NodeIdentity {
    let (cert, key) = leaf(signer, sans);
    NodeIdentity {
        node_id: node_id.to_string(),
        cert_chain: parse_certs(cert.as_bytes(), "test cert").unwrap(),
        key: parse_key(key.as_bytes(), "test key").unwrap(),
        ca_cert: parse_certs(trusted.pem.as_bytes(), "test ca")
            .unwrap()
            .remove(0),
    }
}

fn endpoint(identity: &NodeIdentity, settings: &TransportSettings) -> MigrationEndpoint {
    MigrationEndpoint::bind_with(localhost(), identity, settings).unwrap()
}

fn fast() -> TransportSettings {
    TransportSettings {
        connect_timeout: Duration::from_secs(3),
        ..TransportSettings::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer cannot pass by luck.
fn payload(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The connection as the client sees it once the server has judged it: `Ok` means it stayed
/// usable (a round trip on a stream worked), `Err` carries why it ended.
async fn client_outcome(result: Result<quinn::Connection, TransportError>) -> Result<(), String> {
    let conn = result.map_err(|e| e.to_string())?;
    // TLS 1.3 lets the client finish its side before the server has checked the client's
    // certificate: the refusal arrives as a close right after.
    let round_trip = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"x").await?;
        send.finish()?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(3), round_trip).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => panic!("client connection neither worked nor failed within 3 s"),
    }
}

/// A UDP relay between a client and `server` that can be cut (drops everything after).
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(server: SocketAddr) -> Relay {
    let front = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
    let back = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    let task = tokio::spawn(async move {
        let mut client = None;
        let mut up = vec![0u8; 65536];
        let mut down = vec![0u8; 65536];
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((n, from)) = r else { continue };
                    client = Some(from);
                    if !flag.load(Ordering::SeqCst) {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                r = back.recv(&mut down) => {
                    let Ok(n) = r else { continue };
                    if let (Some(to), false) = (client, flag.load(Ordering::SeqCst)) {
                        let _ = front.send_to(&down[..n], to).await;
                    }
                }
            }
        }
    });
    Relay { addr, cut, task }
}

#[test]
fn node_names() {
    assert_eq!(node_dns_name("n1").unwrap(), "n1.node.berth");
    assert_eq!(
        node_dns_name("bt9f624c-n1").unwrap(),
        "bt9f624c-n1.node.berth"
    );
    for bad in ["", "-n1", "n1-", "N1", "n1.x", "*", &"a".repeat(41)] {
        assert!(
            matches!(node_dns_name(bad), Err(TransportError::InvalidNodeId(_))),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn identity_loading_checks_the_certificate() {
    let ca1 = ca("cluster");
    let ca2 = ca("other");
    let id = identity(&ca1, "bt9f624c-n1");
    assert_eq!(id.node_id(), "bt9f624c-n1");

    // Extra non-node SANs are fine.
    let (cert, key) = leaf(&ca1, &["n4.node.berth", "localhost"]);
    let id = NodeIdentity::from_pem(cert.as_bytes(), key.as_bytes(), ca1.pem.as_bytes());
    assert_eq!(id.unwrap().node_id(), "n4");

    let err = NodeIdentity::from_pem(b"garbage", key.as_bytes(), ca1.pem.as_bytes());
    assert!(matches!(err, Err(TransportError::Pem { .. })), "{err:?}");
    let err = NodeIdentity::from_pem(cert.as_bytes(), b"", ca1.pem.as_bytes());
    assert!(matches!(err, Err(TransportError::Pem { .. })), "{err:?}");

    for sans in [
        &["localhost"][..],
        &["n1.node.berth", "n2.node.berth"][..],
        &["*.node.berth"][..],
    ] {
        let (cert, key) = leaf(&ca1, sans);
        let err = NodeIdentity::from_pem(cert.as_bytes(), key.as_bytes(), ca1.pem.as_bytes());
        assert!(
            matches!(err, Err(TransportError::NotNodeCert { .. })),
            "{sans:?}: {err:?}"
        );
    }

    let (other_cert, other_key) = leaf(&ca1, &["n5.node.berth"]);
    let (cert, _) = leaf(&ca1, &["n6.node.berth"]);
    let err = NodeIdentity::from_pem(cert.as_bytes(), other_key.as_bytes(), ca1.pem.as_bytes());
    assert!(
        matches!(err, Err(TransportError::KeyMismatch { .. })),
        "{err:?}"
    );

    let err = NodeIdentity::from_pem(
        other_cert.as_bytes(),
        other_key.as_bytes(),
        ca2.pem.as_bytes(),
    );
    assert!(
        matches!(err, Err(TransportError::Untrusted { .. })),
        "{err:?}"
    );
}

#[test]
fn identity_from_files() {
    let ca1 = ca("cluster");
    let (cert, key) = leaf(&ca1, &["n7.node.berth"]);
    let dir = tempfile::tempdir().unwrap();
    let paths = ["node.crt", "node.key", "ca.crt"].map(|name| dir.path().join(name));
    std::fs::write(&paths[0], cert).unwrap();
    std::fs::write(&paths[1], key).unwrap();
    std::fs::write(&paths[2], &ca1.pem).unwrap();
    let id = NodeIdentity::from_pem_files(&paths[0], &paths[1], &paths[2]).unwrap();
    assert_eq!(id.node_id(), "n7");
    let missing = dir.path().join("missing");
    let err = NodeIdentity::from_pem_files(&paths[0], &missing, &paths[2]);
    assert!(
        matches!(err, Err(TransportError::Read { ref path, .. }) if *path == missing),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_bulk_transfer_both_ways() {
    const LEN: usize = 8 << 20;
    let ca1 = ca("cluster");
    let server = endpoint(&identity(&ca1, "n1"), &fast());
    let client = endpoint(&identity(&ca1, "n2"), &fast());
    let server_addr = server.local_addr().unwrap();

    let serve = tokio::spawn(async move {
        let (conn, peer) = server.accept().await.unwrap().unwrap();
        assert_eq!(peer, "n2");
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        // Echo every byte flipped, while the client is still sending (both directions at once).
        let mut buf = vec![0u8; 64 << 10];
        let mut echoed = 0;
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            buf[..n].iter_mut().for_each(|b| *b ^= 0x5a);
            send.write_all(&buf[..n]).await.unwrap();
            echoed += n;
        }
        send.finish().unwrap();
        conn.closed().await;
        echoed
    });

    let conn = client.connect(server_addr, "n1").await.unwrap();
    assert_eq!(peer_node_id(&conn).unwrap(), "n1");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let data = payload(LEN, 0x9e37_79b9_7f4a_7c15);
    let expected: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    let write = tokio::spawn(async move {
        for chunk in data.chunks(100_000) {
            send.write_all(chunk).await.unwrap();
        }
        send.finish().unwrap();
    });
    let received = recv.read_to_end(LEN + 1).await.unwrap();
    write.await.unwrap();
    assert_eq!(received.len(), LEN);
    assert_eq!(
        Sha256::digest(&received),
        Sha256::digest(&expected),
        "echoed bytes differ"
    );
    conn.close(VarInt::from_u32(0), b"done");
    assert_eq!(serve.await.unwrap(), LEN);
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let ca1 = ca("cluster");
    let ca2 = ca("intruder");
    let server = endpoint(&identity(&ca1, "n1"), &fast());
    // Trusts the real CA (so it accepts the server) but its own cert is from another CA.
    let rogue = unchecked_identity("n2", &ca2, &["n2.node.berth"], &ca1);
    let client = endpoint(&rogue, &fast());
    let server_addr = server.local_addr().unwrap();

    let (accepted, dialled) = tokio::join!(server.accept(), async {
        client_outcome(client.connect(server_addr, "n1").await).await
    });
    let accepted = accepted.unwrap();
    assert!(
        matches!(accepted, Err(TransportError::Handshake { .. })),
        "server accepted a client from another CA: {accepted:?}"
    );
    assert!(dialled.is_err(), "client connection stayed usable");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca1 = ca("cluster");
    let server = endpoint(&identity(&ca1, "n1"), &fast());
    let server_addr = server.local_addr().unwrap();

    let provider = crypto_provider();
    let ca_der = parse_certs(ca1.pem.as_bytes(), "ca").unwrap().remove(0);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_webpki_verifier(server_verifier(&ca_der, &provider).unwrap())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let anonymous = quinn::Endpoint::client(localhost()).unwrap();

    let (accepted, dialled) = tokio::join!(server.accept(), async {
        let connecting = anonymous
            .connect_with(config, server_addr, "n1.node.berth")
            .unwrap();
        let result = connecting
            .await
            .map_err(|source| TransportError::Handshake {
                addr: server_addr,
                source,
            });
        client_outcome(result).await
    });
    let accepted = accepted.unwrap();
    assert!(
        matches!(accepted, Err(TransportError::Handshake { .. })),
        "server accepted a client without a certificate: {accepted:?}"
    );
    assert!(dialled.is_err(), "client connection stayed usable");
}

#[tokio::test]
async fn server_naming_another_node_is_refused() {
    let ca1 = ca("cluster");
    let server = endpoint(&identity(&ca1, "n2"), &fast());
    let client = endpoint(&identity(&ca1, "n1"), &fast());
    let server_addr = server.local_addr().unwrap();

    let (accepted, dialled) = tokio::join!(server.accept(), client.connect(server_addr, "n3"));
    match dialled {
        Err(TransportError::Handshake { addr, source }) => {
            assert_eq!(addr, server_addr);
            assert!(
                source.to_string().contains("n3.node.berth"),
                "reason does not name the expected node: {source}"
            );
        }
        other => panic!("client accepted node n2 as n3: {other:?}"),
    }
    // The client's alert reaches the server as a failed handshake too.
    assert!(matches!(accepted, Some(Err(_))), "{accepted:?}");
}

#[tokio::test]
async fn wildcard_server_certificate_is_refused() {
    let ca1 = ca("cluster");
    // TLS name matching would let `*.node.berth` pass for any node.
    let wildcard = unchecked_identity("n2", &ca1, &["*.node.berth"], &ca1);
    let server = endpoint(&wildcard, &fast());
    let client = endpoint(&identity(&ca1, "n1"), &fast());
    let server_addr = server.local_addr().unwrap();

    let (_, dialled) = tokio::join!(server.accept(), client.connect(server_addr, "n3"));
    assert!(
        matches!(dialled, Err(TransportError::NotNodeCert { .. })),
        "{dialled:?}"
    );
}

#[tokio::test]
async fn dialling_a_dead_port_fails_within_the_timeout() {
    let ca1 = ca("cluster");
    let timeout = Duration::from_millis(500);
    let client = endpoint(
        &identity(&ca1, "n1"),
        &TransportSettings {
            connect_timeout: timeout,
            ..TransportSettings::default()
        },
    );
    let dead = std::net::UdpSocket::bind(localhost())
        .unwrap()
        .local_addr()
        .unwrap();
    let start = Instant::now();
    let result = client.connect(dead, "n2").await;
    let elapsed = start.elapsed();
    assert!(
        matches!(
            result,
            Err(TransportError::Timeout { .. } | TransportError::Handshake { .. })
        ),
        "{result:?}"
    );
    assert!(
        elapsed < timeout + Duration::from_secs(1),
        "took {elapsed:?}"
    );
}

#[tokio::test]
async fn closing_one_side_fails_the_other_sides_read_at_once() {
    let ca1 = ca("cluster");
    // The default 5 s idle timeout would be too slow for the bound below: only the close
    // itself can make this pass.
    let server = endpoint(&identity(&ca1, "n1"), &fast());
    let client = endpoint(&identity(&ca1, "n2"), &fast());
    let server_addr = server.local_addr().unwrap();
    let (accepted, dialled) = tokio::join!(server.accept(), client.connect(server_addr, "n1"));
    let (server_conn, _) = accepted.unwrap().unwrap();
    let client_conn = dialled.unwrap();

    let (mut send, mut client_recv) = client_conn.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    let (_server_send, mut server_recv) = server_conn.accept_bi().await.unwrap();
    let mut buf = [0u8; 5];
    server_recv.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");

    let pending = tokio::spawn(async move {
        let mut buf = [0u8; 1];
        client_recv.read(&mut buf).await
    });
    server_conn.close(VarInt::from_u32(7), b"source gone");
    let read = tokio::time::timeout(Duration::from_secs(1), pending)
        .await
        .expect("read still pending 1 s after the peer closed")
        .unwrap();
    match read {
        Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))) => {
            assert_eq!(close.error_code, VarInt::from_u32(7))
        }
        other => panic!("read after close: {other:?}"),
    }
}

#[tokio::test]
async fn a_cut_link_fails_both_sides_within_the_idle_timeout() {
    let ca1 = ca("cluster");
    let settings = TransportSettings {
        connect_timeout: Duration::from_secs(3),
        idle_timeout: Duration::from_millis(1000),
        keep_alive: Duration::from_millis(200),
        ..TransportSettings::default()
    };
    let server = endpoint(&identity(&ca1, "n1"), &settings);
    let client = endpoint(&identity(&ca1, "n2"), &settings);
    let link = relay(server.local_addr().unwrap()).await;
    let (accepted, dialled) = tokio::join!(server.accept(), client.connect(link.addr, "n1"));
    let (server_conn, _) = accepted.unwrap().unwrap();
    let client_conn = dialled.unwrap();

    let (mut client_send, mut client_recv) = client_conn.open_bi().await.unwrap();
    client_send.write_all(b"a").await.unwrap();
    let (mut server_send, mut server_recv) = server_conn.accept_bi().await.unwrap();
    let mut buf = [0u8; 1];
    server_recv.read_exact(&mut buf).await.unwrap();

    // Silent for three idle timeouts: the keep-alives must hold the connection open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    server_send.write_all(b"b").await.unwrap();
    client_recv.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"b", "connection did not survive an idle period");

    link.cut.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let (client_read, server_read) = tokio::time::timeout(Duration::from_secs(3), async {
        let mut a = [0u8; 1];
        let mut b = [0u8; 1];
        tokio::join!(client_recv.read(&mut a), server_recv.read(&mut b))
    })
    .await
    .expect("reads still pending 3 s after the link was cut");
    for (side, read) in [("client", client_read), ("server", server_read)] {
        assert!(
            matches!(
                read,
                Err(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::TimedOut
                ))
            ),
            "{side} read after cut: {read:?}"
        );
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "failed before the idle timeout: {:?}",
        start.elapsed()
    );
}
