//! `berth_agent::dns::DnsServer` over real sockets on loopback.
//!
//! Needs nothing special: no root, no namespaces. Every server, client and fake upstream binds
//! port 0 on an address of 127.0.0.0/8 (all of it is loopback on Linux), so parallel runs never
//! collide, and nothing leaves the machine: the upstreams the server forwards to are fakes
//! started by the test.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::dns::{DnsServer, Records, TTL};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 5);
const REPLICA_1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const REPLICA_2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
/// What the fake upstream answers for every name.
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// How long a test client waits for an answer it expects.
const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// The one precondition of every test here.
fn requires_loopback_only() {
    // Nothing to check beyond a working loopback, which binding below proves; this names the
    // requirement for readers (no root, no network namespace, no outside traffic).
}

fn records() -> Records {
    let mut records = Records::new();
    records
        .add_service("web", "front", VIP)
        .unwrap()
        .add_instance("ins-1a2b3c", "web", "front", REPLICA_1)
        .unwrap()
        .add_instance("ins-4d5e6f", "web", "front", REPLICA_2)
        .unwrap();
    records
}

/// A server with `records()` listening on 127.0.0.1, port picked by the kernel.
async fn start(
    upstreams: Vec<SocketAddr>,
    forward_timeout: Option<Duration>,
) -> (DnsServer, SocketAddr) {
    let mut server = DnsServer::new(upstreams);
    if let Some(t) = forward_timeout {
        server = server.with_forward_timeout(t);
    }
    server.set_records(records());
    let requested: SocketAddr = "127.0.0.1:0".parse().unwrap();
    server.ensure_listeners(&[requested]).await.unwrap();
    let bound = server.local_addr(requested).await.unwrap();
    assert_ne!(bound.port(), 0);
    (server, bound)
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

/// Sends raw bytes over UDP; the reply's bytes, or `None` if nothing came back in `wait`
/// (including an ICMP port unreachable).
async fn exchange_udp(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(server).await.unwrap();
    socket.send(bytes).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Ok(len)) => Some(buf[..len].to_vec()),
        Ok(Err(_)) | Err(_) => None,
    }
}

/// Asks over UDP and checks the reply answers this very query.
async fn ask(server: SocketAddr, q: &Message) -> Message {
    let bytes = exchange_udp(server, &q.to_vec().unwrap(), CLIENT_WAIT)
        .await
        .unwrap_or_else(|| panic!("no udp answer from {server} to {:?}", q.queries));
    let reply = Message::from_vec(&bytes).unwrap();
    check_reply_to(q, &reply);
    reply
}

async fn ask_tcp(server: SocketAddr, q: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    write_framed(&mut stream, &q.to_vec().unwrap()).await;
    let bytes = tokio::time::timeout(CLIENT_WAIT, read_framed(&mut stream))
        .await
        .expect("tcp answer in time")
        .expect("tcp answer");
    let reply = Message::from_vec(&bytes).unwrap();
    check_reply_to(q, &reply);
    reply
}

fn check_reply_to(q: &Message, reply: &Message) {
    assert_eq!(reply.metadata.id, q.metadata.id, "reply keeps the query id");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.queries, q.queries, "reply keeps the question");
}

async fn write_framed(stream: &mut TcpStream, bytes: &[u8]) {
    let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.unwrap();
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

fn addresses(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A fake upstream resolver on 127.0.0.1 (UDP and TCP, same port) that answers every query
/// with `UPSTREAM_ANSWER`, or never answers when `silent`. Counts the queries it saw.
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FakeUpstream {
    async fn start(silent: bool) -> Self {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let udp_seen = seen.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let (len, peer) = udp.recv_from(&mut buf).await.unwrap();
                udp_seen.fetch_add(1, Ordering::SeqCst);
                if !silent {
                    let reply = Self::answer(&buf[..len]);
                    udp.send_to(&reply, peer).await.unwrap();
                }
            }
        });
        let tcp_seen = seen.clone();
        let tcp_task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = tcp.accept().await.unwrap();
                let seen = tcp_seen.clone();
                tokio::spawn(async move {
                    while let Ok(bytes) = read_framed(&mut stream).await {
                        seen.fetch_add(1, Ordering::SeqCst);
                        if !silent {
                            write_framed(&mut stream, &Self::answer(&bytes)).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn answer(bytes: &[u8]) -> Vec<u8> {
        let q = Message::from_vec(bytes).unwrap();
        let mut reply = Message::response(q.metadata.id, q.metadata.op_code);
        reply.metadata.recursion_desired = q.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_queries(q.queries.iter().cloned());
        reply.add_answer(Record::from_rdata(
            q.queries[0].name().clone(),
            300,
            RData::A(A(UPSTREAM_ANSWER)),
        ));
        reply.to_vec().unwrap()
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn service_and_instance_names_resolve_in_any_case() {
    requires_loopback_only();
    let (server, addr) = start(vec![], None).await;

    let r = ask(addr, &query("web.front.berth.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(addresses(&r), [VIP]);
    assert_eq!(r.answers[0].ttl, TTL);

    let r = ask(addr, &query("ins-4d5e6f.web.front.berth.", RecordType::A)).await;
    assert_eq!(addresses(&r), [REPLICA_2]);

    let r = ask(addr, &query("INS-1A2B3C.Web.FRONT.Berth.", RecordType::A)).await;
    assert_eq!(addresses(&r), [REPLICA_1]);
    // The question comes back as it was asked (checked in `ask`), and so does the owner name.
    assert_eq!(r.answers[0].name.to_string(), "INS-1A2B3C.Web.FRONT.Berth.");

    let r = ask_tcp(addr, &query("Web.Front.Berth.", RecordType::A)).await;
    assert_eq!(addresses(&r), [VIP]);

    let mut with_edns = query("web.front.berth.", RecordType::A);
    with_edns.set_edns(Edns::new());
    let r = ask(addr, &with_edns).await;
    assert!(r.edns.is_some(), "an EDNS query gets an OPT record back");
    assert_eq!(addresses(&r), [VIP]);

    server.shutdown().await;
}

#[tokio::test]
async fn unknown_names_are_nxdomain_and_other_types_nodata() {
    requires_loopback_only();
    let upstream = FakeUpstream::start(false).await;
    let (server, addr) = start(vec![upstream.addr], None).await;

    for name in [
        "db.front.berth.",
        "ins-zzz.web.front.berth.",
        "web.back.berth.",
    ] {
        let r = ask(addr, &query(name, RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(r.metadata.authoritative, "{name}");
        assert!(r.answers.is_empty(), "{name}");
    }
    for (name, qtype) in [
        ("web.front.berth.", RecordType::AAAA),
        ("ins-1a2b3c.web.front.berth.", RecordType::TXT),
        ("front.berth.", RecordType::A),
    ] {
        let r = ask(addr, &query(name, qtype)).await;
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NoError,
            "{name} {qtype}"
        );
        assert!(r.answers.is_empty(), "{name} {qtype}");
    }
    assert_eq!(upstream.seen(), 0, "berth names never go upstream");
    server.shutdown().await;
}

#[tokio::test]
async fn other_names_are_relayed_to_the_upstream() {
    requires_loopback_only();
    let upstream = FakeUpstream::start(false).await;
    let (server, addr) = start(vec![upstream.addr], None).await;

    let r = ask(addr, &query("www.example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(!r.metadata.authoritative);
    assert_eq!(addresses(&r), [UPSTREAM_ANSWER]);
    assert_eq!(
        r.answers[0].ttl, 300,
        "the upstream's answer is relayed as it is"
    );

    let r = ask_tcp(addr, &query("tcp.example.com.", RecordType::A)).await;
    assert_eq!(addresses(&r), [UPSTREAM_ANSWER]);
    assert_eq!(upstream.seen(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_after_the_timeout() {
    requires_loopback_only();
    let upstream = FakeUpstream::start(true).await;
    // The default timeout, as the agent runs it.
    let (server, addr) = start(vec![upstream.addr], None).await;

    let started = Instant::now();
    let r = ask(addr, &query("slow.example.com.", RecordType::A)).await;
    let waited = started.elapsed();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(r.answers.is_empty());
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(3500),
        "servfail after about 2 s, got {waited:?}"
    );
    assert_eq!(upstream.seen(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_dead_first_upstream_falls_back_to_the_next() {
    requires_loopback_only();
    let silent = FakeUpstream::start(true).await;
    let answering = FakeUpstream::start(false).await;
    let (server, addr) = start(
        vec![silent.addr, answering.addr],
        Some(Duration::from_millis(600)),
    )
    .await;

    let r = ask(addr, &query("www.example.com.", RecordType::A)).await;
    assert_eq!(addresses(&r), [UPSTREAM_ANSWER]);
    assert_eq!((silent.seen(), answering.seen()), (1, 1));

    // Nothing listening at all: the port-unreachable makes the server move on at once.
    let closed = {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.local_addr().unwrap()
    };
    // A budget long enough that waiting out the first upstream's share (2 s) shows.
    let (server2, addr2) = start(vec![closed, answering.addr], Some(Duration::from_secs(4))).await;
    let started = Instant::now();
    let r = ask(addr2, &query("www.example.org.", RecordType::A)).await;
    assert_eq!(addresses(&r), [UPSTREAM_ANSWER]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    server.shutdown().await;
    server2.shutdown().await;
}

#[tokio::test]
async fn without_upstream_other_names_do_not_exist() {
    requires_loopback_only();
    let (server, addr) = start(vec![], None).await;
    let r = ask(addr, &query("www.example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(!r.metadata.recursion_available);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_swapped_while_serving() {
    requires_loopback_only();
    let (server, addr) = start(vec![], None).await;
    let server = Arc::new(server);
    let old = VIP;
    let new = Ipv4Addr::new(10, 96, 0, 99);

    let swapper = {
        let server = server.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                let mut records = Records::new();
                let vip = if i % 2 == 0 { new } else { old };
                records.add_service("web", "front", vip).unwrap();
                server.set_records(records);
                tokio::task::yield_now().await;
            }
        })
    };
    for _ in 0..100 {
        let r = ask(addr, &query("web.front.berth.", RecordType::A)).await;
        let got = addresses(&r);
        assert!(got == [old] || got == [new], "{got:?}");
    }
    swapper.await.unwrap();

    let mut records = Records::new();
    records.add_service("web", "front", new).unwrap();
    server.set_records(records);
    let r = ask(addr, &query("web.front.berth.", RecordType::A)).await;
    assert_eq!(addresses(&r), [new]);
    let r = ask(addr, &query("ins-1a2b3c.web.front.berth.", RecordType::A)).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::NXDomain,
        "the old table is gone"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_removed_listener_stops_answering_and_can_come_back() {
    requires_loopback_only();
    let server = DnsServer::new(vec![]);
    server.set_records(records());
    let first: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let second: SocketAddr = "127.0.0.2:0".parse().unwrap();
    server.ensure_listeners(&[first, second]).await.unwrap();
    // Idempotent: the same list again changes nothing.
    let first_bound = server.local_addr(first).await.unwrap();
    let second_bound = server.local_addr(second).await.unwrap();
    server.ensure_listeners(&[first, second]).await.unwrap();
    assert_eq!(server.local_addr(first).await, Some(first_bound));

    let q = query("web.front.berth.", RecordType::A);
    assert_eq!(addresses(&ask(first_bound, &q).await), [VIP]);
    assert_eq!(addresses(&ask(second_bound, &q).await), [VIP]);

    server.ensure_listeners(&[second]).await.unwrap();
    assert_eq!(server.listening().await, [second]);
    assert!(
        exchange_udp(
            first_bound,
            &q.to_vec().unwrap(),
            Duration::from_millis(500)
        )
        .await
        .is_none(),
        "the removed udp listener still answers"
    );
    assert!(
        TcpStream::connect(first_bound).await.is_err(),
        "the removed tcp listener still accepts"
    );
    assert_eq!(addresses(&ask(second_bound, &q).await), [VIP]);

    // The port was released: the same address can be served again at once.
    server
        .ensure_listeners(&[second, first_bound])
        .await
        .unwrap();
    assert_eq!(addresses(&ask(first_bound, &q).await), [VIP]);

    // An address this machine does not have is an error naming it, and the others stay up.
    let foreign: SocketAddr = "192.0.2.1:0".parse().unwrap();
    let error = server
        .ensure_listeners(&[second, first_bound, foreign])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("192.0.2.1"), "{error}");
    assert_eq!(addresses(&ask(second_bound, &q).await), [VIP]);

    server.shutdown().await;
    assert!(server.listening().await.is_empty());
    assert!(exchange_udp(
        second_bound,
        &q.to_vec().unwrap(),
        Duration::from_millis(300)
    )
    .await
    .is_none());
}

#[tokio::test]
async fn garbage_never_kills_the_server() {
    requires_loopback_only();
    let upstream = FakeUpstream::start(false).await;
    let (server, addr) = start(vec![upstream.addr], None).await;
    let wait = Duration::from_millis(300);

    // Too short for a header: dropped.
    assert!(exchange_udp(addr, &[], wait).await.is_none());
    assert!(exchange_udp(addr, &[0x12, 0x34, 0x01], wait)
        .await
        .is_none());
    // A header whose question runs past the end: FORMERR with the id.
    let reply = exchange_udp(
        addr,
        &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f, b'x'],
        CLIENT_WAIT,
    )
    .await
    .expect("formerr");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // A compression pointer loop.
    let looped = [
        0x56, 0x78, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ];
    let reply = exchange_udp(addr, &looped, CLIENT_WAIT)
        .await
        .expect("formerr");
    assert_eq!(
        Message::from_vec(&reply).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    // A response is never answered (no reflection loops).
    let mut response = query("web.front.berth.", RecordType::A).to_vec().unwrap();
    response[2] |= 0x80;
    assert!(exchange_udp(addr, &response, wait).await.is_none());
    // Random datagrams of many sizes, up to the largest UDP payload.
    for len in [12, 13, 50, 512, 4096, 65_507] {
        let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        let _ = exchange_udp(addr, &bytes, Duration::from_millis(50)).await;
    }
    // Over TCP: a garbage message, a truncated length prefix, a connection left hanging.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    write_framed(&mut stream, &[0xff; 40]).await;
    let _ = tokio::time::timeout(Duration::from_millis(300), read_framed(&mut stream)).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0x00]).await.unwrap();
    drop(stream);
    let _hanging = TcpStream::connect(addr).await.unwrap();

    // Still serving both transports, berth names and forwarded ones.
    let r = ask(addr, &query("web.front.berth.", RecordType::A)).await;
    assert_eq!(addresses(&r), [VIP]);
    let r = ask_tcp(addr, &query("web.front.berth.", RecordType::A)).await;
    assert_eq!(addresses(&r), [VIP]);
    let r = ask(addr, &query("www.example.com.", RecordType::A)).await;
    assert_eq!(addresses(&r), [UPSTREAM_ANSWER]);
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_connections_carry_several_queries() {
    requires_loopback_only();
    let upstream = FakeUpstream::start(false).await;
    let (server, addr) = start(vec![upstream.addr], None).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for (name, expected) in [
        ("web.front.berth.", VIP),
        ("ins-1a2b3c.web.front.berth.", REPLICA_1),
        ("www.example.com.", UPSTREAM_ANSWER),
    ] {
        let q = query(name, RecordType::A);
        write_framed(&mut stream, &q.to_vec().unwrap()).await;
        let reply = Message::from_vec(&read_framed(&mut stream).await.unwrap()).unwrap();
        check_reply_to(&q, &reply);
        assert_eq!(addresses(&reply), [expected]);
    }
    server.shutdown().await;
}
