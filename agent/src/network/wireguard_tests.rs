//! Unit tests of `wireguard`'s pure parts: names, key parsing, peer diffing, UAPI text, the key
//! file. The devices themselves are tested for real in `agent/tests/network_wireguard.rs`.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use super::*;

const KEY_A: &str = "DD5yKRfzExcV5+kDnTroDgCU15latdMjiQ59j1hEuk8=";

fn key(byte: u8) -> [u8; 32] {
    [byte; 32]
}

fn wanted(byte: u8, host: u8) -> WantedPeer {
    WantedPeer {
        key: key(byte),
        endpoint: SocketAddr::from(([192, 0, 2, host], 51820)),
        tunnel_ip: Ipv4Addr::new(10, 201, 0, host),
        keepalive: None,
    }
}

fn present(peer: &WantedPeer) -> DevicePeer {
    DevicePeer {
        key: peer.key,
        endpoint: Some(peer.endpoint),
        allowed_ips: vec![(IpAddr::V4(peer.tunnel_ip), 32)],
        ..DevicePeer::default()
    }
}

fn wire_peer(public_key: &str, host: u8) -> Peer {
    Peer {
        public_key: public_key.to_owned(),
        endpoint: SocketAddr::from(([192, 0, 2, host], 51820)),
        tunnel_ip: Ipv4Addr::new(10, 201, 0, host),
        persistent_keepalive: Some(0),
    }
}

#[test]
fn device_shares_and_threads_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<WireguardDevice>();
}

#[test]
fn device_names_fit_the_kernel_and_differ_per_node() {
    let (a, b) = (device_name("node-1"), device_name("node-2"));
    assert_eq!(a.len(), 14);
    assert!(a.starts_with("bw") && a[2..].bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
    assert_eq!(a, device_name("node-1"));
    assert!(valid_name(&a).is_ok());
    assert!(valid_name("sixteen-chars-xx").is_err());
    assert!(valid_name("a/b").is_err());
}

#[test]
fn public_keys_must_be_32_bytes_of_base64() {
    assert_eq!(parse_public_key(KEY_A).unwrap().len(), 32);
    for bad in [
        "",
        "not base64!",
        "AAAA",
        &KEY_A[..40],
        &format!("{KEY_A}AAAA"),
    ] {
        let err = parse_public_key(bad).unwrap_err();
        assert!(
            matches!(err, WireguardError::PeerKeyInvalid { .. }),
            "{bad}: {err}"
        );
    }
}

#[test]
fn one_bad_peer_rejects_the_whole_set_and_self_is_skipped() {
    let own = NodeKey::generate();
    let other = NodeKey::generate().public_key();
    let peers = [wire_peer(&other, 2), wire_peer("garbage", 3)];
    let err = parse_peers(&peers, own.public_bytes()).unwrap_err();
    assert!(err.to_string().contains("garbage"), "{err}");

    let dup = [wire_peer(&other, 2), wire_peer(&other, 3)];
    let err = parse_peers(&dup, own.public_bytes()).unwrap_err();
    assert!(matches!(err, WireguardError::PeerDuplicate { .. }), "{err}");
    let third = NodeKey::generate().public_key();
    let same_ip = [wire_peer(&other, 2), wire_peer(&third, 2)];
    let err = parse_peers(&same_ip, own.public_bytes()).unwrap_err();
    assert!(
        matches!(err, WireguardError::PeerIpDuplicate { .. }),
        "{err}"
    );

    let with_self = [wire_peer(&own.public_key(), 1), wire_peer(&other, 2)];
    let parsed = parse_peers(&with_self, own.public_bytes()).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].keepalive, None, "keepalive 0 means none");
}

#[test]
fn diff_adds_updates_and_removes() {
    let (a, b, c) = (wanted(1, 1), wanted(2, 2), wanted(3, 3));
    let mut moved = b.clone();
    moved.tunnel_ip = Ipv4Addr::new(10, 201, 0, 9);
    let diff = diff_peers(
        &[a.clone(), moved.clone()],
        &[present(&b), present(&c)],
        &HashMap::new(),
    );
    assert_eq!(
        diff,
        PeerDiff {
            add: vec![a.clone()],
            update: vec![moved],
            remove: vec![c.key],
        }
    );
    assert_eq!(
        diff_peers(std::slice::from_ref(&a), &[present(&a)], &HashMap::new()),
        PeerDiff::default()
    );
    let mut keepalive = a.clone();
    keepalive.keepalive = Some(25);
    assert_eq!(
        diff_peers(&[keepalive.clone()], &[present(&a)], &HashMap::new()).update,
        vec![keepalive]
    );
}

#[test]
fn diff_leaves_a_roamed_endpoint_alone_until_the_wanted_one_changes() {
    let a = wanted(1, 1);
    let mut roamed = present(&a);
    roamed.endpoint = Some(SocketAddr::from(([198, 51, 100, 7], 40000)));
    let applied = HashMap::from([(a.key, a.endpoint)]);
    assert_eq!(
        diff_peers(std::slice::from_ref(&a), &[roamed.clone()], &applied),
        PeerDiff::default()
    );
    // Not configured by us (e.g. a kernel device adopted after a restart): set it.
    assert_eq!(
        diff_peers(std::slice::from_ref(&a), &[roamed.clone()], &HashMap::new()).update,
        vec![a.clone()]
    );
    let mut moved = a.clone();
    moved.endpoint = SocketAddr::from(([192, 0, 2, 99], 51820));
    assert_eq!(
        diff_peers(&[moved.clone()], &[roamed], &applied).update,
        vec![moved]
    );
}

#[test]
fn uapi_requests_and_answers() {
    let mut peer = wanted(0xab, 2);
    peer.keepalive = Some(25);
    let hex_key = "ab".repeat(32);
    assert_eq!(
        uapi_add_peer(&peer),
        format!(
            "public_key={hex_key}\nendpoint=192.0.2.2:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.201.0.2/32\n"
        )
    );
    assert_eq!(
        uapi_remove_peer(&peer.key),
        format!("public_key={hex_key}\nremove=true\n")
    );
    assert_eq!(
        uapi_identity(&Key([1; 32]), 51820),
        format!("private_key={}\nlisten_port=51820\n", "01".repeat(32))
    );

    let answer: Vec<(String, String)> = [
        ("own_public_key", "cd".repeat(32)),
        ("listen_port", "51820".into()),
        ("public_key", hex_key.clone()),
        ("endpoint", "192.0.2.2:51820".into()),
        ("allowed_ip", "10.201.0.2/32".into()),
        ("last_handshake_time_sec", "3".into()),
        ("last_handshake_time_nsec", "500".into()),
        ("rx_bytes", "92".into()),
        ("tx_bytes", "148".into()),
        ("errno", "0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let peers = parse_uapi_peers(&answer).unwrap();
    assert_eq!(
        peers,
        vec![DevicePeer {
            key: peer.key,
            endpoint: Some(peer.endpoint),
            allowed_ips: vec![(IpAddr::V4(peer.tunnel_ip), 32)],
            keepalive: None,
            last_handshake: Some(Duration::new(3, 500)),
            rx_bytes: 92,
            tx_bytes: 148,
        }]
    );
    let bad = [("public_key".to_owned(), "zz".to_owned())];
    assert_eq!(parse_uapi_peers(&bad).unwrap_err(), "public_key=zz");
}

#[test]
fn node_key_is_created_private_once_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/wireguard.key");
    let created = NodeKey::load_or_create(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let reloaded = NodeKey::load_or_create(&path).unwrap();
    assert_eq!(created.public_key(), reloaded.public_key());
    assert_eq!(parse_public_key(&created.public_key()).unwrap().len(), 32);
    assert!(!format!("{created:?}").contains(&created.private.to_base64()));
    let leftovers = fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary file left");

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    NodeKey::load_or_create(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "loose mode fixed");

    fs::write(&path, "not a key\n").unwrap();
    let err = NodeKey::load_or_create(&path).unwrap_err();
    assert!(matches!(err, WireguardError::KeyInvalid { .. }), "{err}");
}
