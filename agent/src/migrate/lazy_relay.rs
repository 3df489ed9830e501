//! Carries post-copy page traffic over the migration's QUIC connection.
//!
//! CRIU's lazy-pages daemon (target) speaks plain TCP to the dumping CRIU's page server
//! (source). Neither is exposed: on the target a [`TargetRelay`] listens on `127.0.0.1:0` for the
//! daemon and bridges each accepted connection to a new bidirectional QUIC stream opened to the
//! source; there a [`SourceRelay`] accepts those streams and bridges each to the page server on
//! the source's loopback. So the pages ride the connection both agents authenticated, and a
//! lost connection ends the bridged TCP connections (the daemon then fails instead of waiting).
//!
//! Each stream opens with [`STREAM_MAGIC`] so the source only bridges streams that mean it.
//! Both halves count the pages going to the target by reading CRIU's replies as they pass
//! (`page_proto`); a stream that does not parse is still carried, only no longer counted.
//! Copies go through fixed buffers ([`BUF`]) in each direction; QUIC flow control and TCP
//! windows give back-pressure, so memory stays bounded whatever the page volume. A half-close
//! is passed on (TCP EOF → QUIC `finish`, QUIC end → TCP shutdown), so either side closing ends
//! the bridge cleanly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::page_proto::{PageStreamCounter, RequestTracker, StreamEnd};
use super::pages::PAGE_SIZE;

/// First bytes of every relay stream (opened by the target).
pub const STREAM_MAGIC: &[u8; 8] = b"BERTHLZ1";

/// Bytes buffered per direction of a bridge.
const BUF: usize = 64 * 1024;

/// How long the source waits for a new stream's magic.
const MAGIC_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the source waits for the page server to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The target's listener could not be bound.
    #[error("bind lazy-pages relay listener on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What a relay moved so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Bridges opened (one per TCP connection on the target, one per stream on the source).
    pub connections: u64,
    /// Bridges that ended with an error (reset, lost connection, refused page server).
    pub failed: u64,
    /// Bytes from the target's side (the daemon's requests) to the source's.
    pub to_source: u64,
    /// Bytes from the source's side (pages) to the target's.
    pub to_target: u64,
    /// Pages in CRIU's replies to the target (whole pages that went by).
    pub pages: u64,
    /// Bytes of those pages (`to_target` less the replies' headers and the close status).
    pub page_bytes: u64,
    /// Bridges whose page stream did not parse: carried, but counted only up to that point.
    pub uncounted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    failed: AtomicU64,
    to_source: AtomicU64,
    to_target: AtomicU64,
    pages: AtomicU64,
    page_bytes: AtomicU64,
    uncounted: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayCounters {
        RelayCounters {
            connections: self.connections.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            to_source: self.to_source.load(Ordering::Relaxed),
            to_target: self.to_target.load(Ordering::Relaxed),
            pages: self.pages.load(Ordering::Relaxed),
            page_bytes: self.page_bytes.load(Ordering::Relaxed),
            uncounted: self.uncounted.load(Ordering::Relaxed),
        }
    }
}

/// A live view of a relay's [`RelayCounters`], kept after the relay stopped (e.g. by a progress
/// reporter).
#[derive(Debug, Clone)]
pub struct RelayWatch(Arc<Counters>);

impl RelayWatch {
    /// What crossed so far.
    pub fn counters(&self) -> RelayCounters {
        self.0.snapshot()
    }
}

/// The target's half: a loopback listener for the lazy-pages daemon. Dropping it stops
/// accepting and cuts the bridges.
#[derive(Debug)]
pub struct TargetRelay {
    addr: SocketAddr,
    counters: Arc<Counters>,
    tasks: JoinSet<()>,
}

/// The source's half: bridges the target's relay streams to the page server. Dropping it stops
/// accepting and cuts the bridges.
#[derive(Debug)]
pub struct SourceRelay {
    counters: Arc<Counters>,
    tasks: JoinSet<()>,
}

impl TargetRelay {
    /// Listens on `127.0.0.1:0`; each connection accepted there is bridged to a new stream on
    /// `conn`. Give [`TargetRelay::local_addr`] to the daemon as its page server.
    pub async fn start(conn: quinn::Connection) -> Result<Self, RelayError> {
        let want = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = TcpListener::bind(want)
            .await
            .map_err(|source| RelayError::Bind { addr: want, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| RelayError::Bind { addr: want, source })?;
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let c = counters.clone();
        tasks.spawn(async move {
            let mut bridges = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (tcp, peer) = match accepted {
                            Ok(a) => a,
                            Err(e) => {
                                tracing::warn!(error = %e, "lazy-pages relay cannot accept");
                                continue;
                            }
                        };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let (conn, c) = (conn.clone(), c.clone());
                        bridges.spawn(async move {
                            if let Err(e) = target_bridge(tcp, &conn, &c).await {
                                c.failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%peer, error = %e, "lazy-pages relay bridge failed");
                            }
                        });
                    }
                    reason = conn.closed() => {
                        tracing::debug!(%reason, "migration connection closed: relay stops");
                        break;
                    }
                    Some(_) = bridges.join_next(), if !bridges.is_empty() => {}
                }
            }
        });
        tracing::debug!(%addr, "lazy-pages relay listening");
        Ok(Self {
            addr,
            counters,
            tasks,
        })
    }

    /// Where the lazy-pages daemon connects.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What crossed so far.
    pub fn counters(&self) -> RelayCounters {
        self.counters.snapshot()
    }

    /// A view of the counters that outlives this relay.
    pub fn watch(&self) -> RelayWatch {
        RelayWatch(self.counters.clone())
    }

    /// Stops accepting and cuts the bridges.
    pub fn stop(mut self) -> RelayCounters {
        self.tasks.abort_all();
        self.counters.snapshot()
    }
}

impl SourceRelay {
    /// Accepts relay streams on `conn` and bridges each to `page_server` (CRIU's, on this node's
    /// loopback), until `conn` closes or this is dropped. Only streams opened with
    /// [`STREAM_MAGIC`] are bridged: the migration must open no other stream toward the source
    /// while this runs.
    pub fn start(conn: quinn::Connection, page_server: SocketAddr) -> Self {
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let c = counters.clone();
        tasks.spawn(async move {
            let mut bridges = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = conn.accept_bi() => {
                        let (send, recv) = match accepted {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::debug!(error = %e, "migration connection ended: relay stops");
                                break;
                            }
                        };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        let c = c.clone();
                        bridges.spawn(async move {
                            if let Err(e) = source_bridge(send, recv, page_server, &c).await {
                                c.failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%page_server, error = %e, "lazy-pages relay bridge failed");
                            }
                        });
                    }
                    Some(_) = bridges.join_next(), if !bridges.is_empty() => {}
                }
            }
            // Let running bridges end on their own (the connection is gone: they will).
            while bridges.join_next().await.is_some() {}
        });
        Self { counters, tasks }
    }

    /// What crossed so far.
    pub fn counters(&self) -> RelayCounters {
        self.counters.snapshot()
    }

    /// A view of the counters that outlives this relay.
    pub fn watch(&self) -> RelayWatch {
        RelayWatch(self.counters.clone())
    }

    /// Stops accepting and cuts the bridges.
    pub fn stop(mut self) -> RelayCounters {
        self.tasks.abort_all();
        self.counters.snapshot()
    }
}

async fn target_bridge(
    tcp: TcpStream,
    conn: &quinn::Connection,
    c: &Counters,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let (mut send, recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
    // Page requests are small and a faulting task waits on each: ahead of bulk transfers.
    let _ = send.set_priority(1);
    send.write_all(STREAM_MAGIC)
        .await
        .map_err(std::io::Error::other)?;
    bridge(tcp, send, recv, c, Side::Target).await
}

async fn source_bridge(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    page_server: SocketAddr,
    c: &Counters,
) -> std::io::Result<()> {
    let mut magic = [0u8; STREAM_MAGIC.len()];
    tokio::time::timeout(MAGIC_TIMEOUT, recv.read_exact(&mut magic))
        .await
        .map_err(|_| std::io::Error::other("no relay header in time"))?
        .map_err(std::io::Error::other)?;
    if &magic != STREAM_MAGIC {
        return Err(std::io::Error::other("not a lazy-pages relay stream"));
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(page_server))
        .await
        .map_err(|_| std::io::Error::other(format!("page server {page_server}: timed out")))??;
    tcp.set_nodelay(true)?;
    bridge(tcp, send, recv, c, Side::Source).await
}

/// Which half a bridge runs in: the pages go TCP → QUIC on the source, QUIC → TCP on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

/// Counts the pages of one bridge's page direction into the relay's counters.
struct PageTally<'a> {
    parser: PageStreamCounter,
    c: &'a Counters,
}

impl<'a> PageTally<'a> {
    fn new(c: &'a Counters) -> Self {
        Self {
            parser: PageStreamCounter::new(PAGE_SIZE as u64),
            c,
        }
    }

    /// Counted after the bytes were passed on, so the counts never run ahead of the stream.
    fn feed(&mut self, chunk: &[u8]) {
        if !self.parser.is_counting() {
            return;
        }
        let fed = self.parser.feed(chunk);
        if fed.counted.pages > 0 {
            self.c.pages.fetch_add(fed.counted.pages, Ordering::Relaxed);
        }
        if fed.counted.page_bytes > 0 {
            self.c
                .page_bytes
                .fetch_add(fed.counted.page_bytes, Ordering::Relaxed);
        }
        if let Some(error) = fed.stopped {
            self.c.uncounted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "lazy-pages relay: pages no longer counted on this bridge (still carried)");
        }
    }

    /// At the page direction's clean end.
    fn finish(&self) {
        let total = self.parser.total();
        match self.parser.finish() {
            Ok(StreamEnd::Uncounted) => {}
            Ok(end) => tracing::debug!(
                ?end,
                replies = total.replies,
                pages = total.pages,
                "lazy-pages relay: page stream ended"
            ),
            Err(error) => {
                tracing::warn!(%error, pages = total.pages, "lazy-pages relay: page stream ended inside a reply")
            }
        }
    }
}

/// Copies both ways until both directions ended, counting bytes each way and the pages in the
/// direction `side` says. An error in either direction ends both, resetting the QUIC stream so
/// the other side sees a failure rather than a clean end.
async fn bridge(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    c: &Counters,
    side: Side,
) -> std::io::Result<()> {
    // TCP → QUIC is toward the target on the source, toward the source on the target.
    let (up, down) = match side {
        Side::Source => (&c.to_target, &c.to_source),
        Side::Target => (&c.to_source, &c.to_target),
    };
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let tcp_to_quic = async {
        let mut buf = vec![0u8; BUF];
        let mut pages = (side == Side::Source).then(|| PageTally::new(c));
        let mut requests = (side == Side::Target).then(RequestTracker::default);
        loop {
            let n = tcp_r.read(&mut buf).await?;
            if n == 0 {
                // A daemon that hangs up without its close died: passed on as a plain end, the
                // page server would take it for a finished transfer.
                if requests.as_ref().and_then(RequestTracker::closed_cleanly) == Some(false) {
                    return Err(std::io::Error::other(
                        "the lazy-pages daemon hung up before its close: pages not all delivered",
                    ));
                }
                break;
            }
            if let Some(r) = &mut requests {
                r.feed(&buf[..n]);
            }
            send.write_all(&buf[..n])
                .await
                .map_err(std::io::Error::other)?;
            up.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(p) = &mut pages {
                p.feed(&buf[..n]);
            }
        }
        send.finish().map_err(std::io::Error::other)?;
        if let Some(p) = &pages {
            p.finish();
        }
        std::io::Result::Ok(())
    };
    let quic_to_tcp = async {
        let mut buf = vec![0u8; BUF];
        let mut pages = (side == Side::Target).then(|| PageTally::new(c));
        loop {
            let Some(n) = recv.read(&mut buf).await.map_err(std::io::Error::other)? else {
                break;
            };
            tcp_w.write_all(&buf[..n]).await?;
            down.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(p) = &mut pages {
                p.feed(&buf[..n]);
            }
        }
        tcp_w.shutdown().await?;
        if let Some(p) = &pages {
            p.finish();
        }
        std::io::Result::Ok(())
    };
    let result = tokio::try_join!(tcp_to_quic, quic_to_tcp).map(|_| ());
    if result.is_err() {
        let _ = send.reset(quinn::VarInt::from_u32(1));
        let _ = recv.stop(quinn::VarInt::from_u32(1));
        // The TCP side is reset too, not closed: CRIU's page server takes an EOF before the
        // daemon's close for the end of a good transfer, and would report every page served
        // after the link to the target was lost.
        if let Ok(tcp) = tcp_r.reunite(tcp_w) {
            let _ = tcp.set_zero_linger();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::AsyncReadExt;

    use super::super::test_pki::{ca, identity, localhost};
    use super::super::transport::{MigrationEndpoint, TransportSettings};
    use super::*;

    /// A connected pair over loopback: (target's end, source's end), with their endpoints.
    struct Pair {
        target: quinn::Connection,
        source: quinn::Connection,
        _endpoints: (MigrationEndpoint, MigrationEndpoint),
    }

    async fn pair() -> Pair {
        let ca = ca("relay-test-ca");
        let settings = TransportSettings {
            connect_timeout: Duration::from_secs(3),
            ..TransportSettings::default()
        };
        let src =
            MigrationEndpoint::bind_with(localhost(), &identity(&ca, "n1"), &settings).unwrap();
        let dst =
            MigrationEndpoint::bind_with(localhost(), &identity(&ca, "n2"), &settings).unwrap();
        let addr = src.local_addr().unwrap();
        let (accepted, dialled) = tokio::join!(src.accept(), dst.connect(addr, "n1"));
        Pair {
            target: dialled.unwrap(),
            source: accepted.unwrap().unwrap().0,
            _endpoints: (src, dst),
        }
    }

    /// A TCP server echoing every byte XOR 0x5a until EOF, then closing its side.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind(localhost()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        buf[..n].iter_mut().for_each(|b| *b ^= 0x5a);
                        s.write_all(&buf[..n]).await.unwrap();
                    }
                    s.shutdown().await.unwrap();
                });
            }
        });
        addr
    }

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

    /// Sends `data` through `addr` and returns everything read back until EOF.
    async fn round_trip(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        let writer = tokio::spawn(async move {
            for chunk in data.chunks(50_000) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        back
    }

    #[tokio::test]
    async fn connections_are_bridged_both_ways_and_half_closes_pass() {
        let p = pair().await;
        let page_server = echo_server().await;
        let source = SourceRelay::start(p.source.clone(), page_server);
        let target = TargetRelay::start(p.target.clone()).await.unwrap();
        let addr = target.local_addr();
        assert!(addr.ip().is_loopback());

        const LEN: usize = 3_000_000;
        let runs: Vec<_> = (0..3u64)
            .map(|i| {
                let data = payload(LEN, 0x9e37_79b9_7f4a_7c15 + i);
                tokio::spawn(async move {
                    let back = round_trip(addr, data.clone()).await;
                    let want: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
                    assert!(back == want, "connection {i}: echoed bytes differ");
                })
            })
            .collect();
        for r in runs {
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .unwrap()
                .unwrap();
        }
        let t = target.counters();
        let s = source.counters();
        assert_eq!((t.connections, t.failed), (3, 0), "{t:?}");
        assert_eq!((s.connections, s.failed), (3, 0), "{s:?}");
        assert_eq!(t.to_source, 3 * LEN as u64);
        assert_eq!(s.to_target, 3 * LEN as u64);
        assert_eq!(s.to_source, 3 * LEN as u64);
        // Not CRIU's protocol: carried whole, but no pages counted.
        assert_eq!((s.pages, s.uncounted), (0, 3), "{s:?}");
        assert_eq!((t.pages, t.uncounted), (0, 3), "{t:?}");
        target.stop();
        source.stop();
    }

    /// A `struct page_server_iov` as CRIU 4.2.1 lays it out.
    fn psi(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&cmd.to_ne_bytes());
        h[8..16].copy_from_slice(&nr_pages.to_ne_bytes());
        h[16..24].copy_from_slice(&vaddr.to_ne_bytes());
        h[24..].copy_from_slice(&dst_id.to_ne_bytes());
        h
    }

    const PS_IOV_GET: u32 = 7;
    const PS_IOV_CLOSE: u32 = 0x1023;
    const PAGE_REPLY: u32 = 6 | 4 << 16; // PS_IOV_ADD_F, PE_PRESENT

    /// A page server answering each `PS_IOV_GET` as CRIU's does (header, then the pages) and a
    /// `PS_IOV_CLOSE` with a 4-byte status.
    async fn fake_page_server() -> SocketAddr {
        let l = TcpListener::bind(localhost()).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut h = [0u8; 32];
                    loop {
                        if s.read_exact(&mut h).await.is_err() {
                            return;
                        }
                        let cmd = u32::from_ne_bytes(h[..4].try_into().unwrap());
                        let nr = u64::from_ne_bytes(h[8..16].try_into().unwrap());
                        let vaddr = u64::from_ne_bytes(h[16..24].try_into().unwrap());
                        if cmd == PS_IOV_CLOSE {
                            s.write_all(&0i32.to_ne_bytes()).await.unwrap();
                            let mut rest = Vec::new();
                            let _ = s.read_to_end(&mut rest).await;
                            return;
                        }
                        assert_eq!(cmd, PS_IOV_GET);
                        s.write_all(&psi(PAGE_REPLY, nr, vaddr, 1)).await.unwrap();
                        let pages = payload(nr as usize * PAGE_SIZE, vaddr);
                        s.write_all(&pages).await.unwrap();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn pages_of_criu_replies_are_counted_on_both_halves() {
        let p = pair().await;
        let source = SourceRelay::start(p.source.clone(), fake_page_server().await);
        let target = TargetRelay::start(p.target.clone()).await.unwrap();
        let watch = source.watch();
        // Two daemon connections, as a restore with several page readers would open.
        let daemon = |sizes: Vec<u64>| {
            let addr = target.local_addr();
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                for (i, nr) in sizes.into_iter().enumerate() {
                    let vaddr = 0x7f00_0000_0000 + (i as u64) * 0x10_0000;
                    tcp.write_all(&psi(PS_IOV_GET, nr, vaddr, 1)).await.unwrap();
                    let mut h = [0u8; 32];
                    tcp.read_exact(&mut h).await.unwrap();
                    assert_eq!(h[8..16], nr.to_ne_bytes());
                    let mut pages = vec![0u8; nr as usize * PAGE_SIZE];
                    tcp.read_exact(&mut pages).await.unwrap();
                    assert!(pages == payload(pages.len(), vaddr), "page bytes changed");
                }
                tcp.write_all(&psi(PS_IOV_CLOSE, 0, 0, 0)).await.unwrap();
                let mut status = [0u8; 4];
                tcp.read_exact(&mut status).await.unwrap();
                tcp.shutdown().await.unwrap();
                let mut rest = Vec::new();
                tcp.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
            })
        };
        let runs = [daemon(vec![1, 16, 3, 512]), daemon(vec![7; 20])];
        for r in runs {
            tokio::time::timeout(Duration::from_secs(30), r)
                .await
                .unwrap()
                .unwrap();
        }
        let pages = 1 + 16 + 3 + 512 + 7 * 20;
        let replies = 4 + 20;
        // The source's bridges end once the page server closed its side.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = source.counters();
        let t = target.counters();
        assert_eq!(s, watch.counters());
        assert_eq!(
            (s.pages, s.page_bytes, s.uncounted),
            (pages, pages * PAGE_SIZE as u64, 0),
            "{s:?}"
        );
        assert_eq!(s.to_target, replies * 32 + pages * PAGE_SIZE as u64 + 2 * 4);
        assert_eq!(s.to_source, (replies + 2) * 32);
        assert_eq!(
            (t.pages, t.page_bytes, t.uncounted),
            (s.pages, s.page_bytes, 0)
        );
        assert_eq!(t.to_target, s.to_target);
        // The watch outlives the relay.
        source.stop();
        assert_eq!(watch.counters().pages, pages);
    }

    /// A daemon that dies after its requests, without the close: the page server must see its
    /// connection reset (CRIU then fails the transfer), not the plain end it would take for a
    /// finished one. After a close, the plain end passes.
    #[tokio::test]
    async fn a_daemon_hanging_up_without_its_close_resets_the_page_server() {
        async fn ending(close: bool) -> std::io::ErrorKind {
            let p = pair().await;
            let l = TcpListener::bind(localhost()).await.unwrap();
            let page_server = l.local_addr().unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut h = [0u8; 32];
                let end = loop {
                    if let Err(e) = s.read_exact(&mut h).await {
                        break e.kind();
                    }
                    let cmd = u32::from_ne_bytes(h[..4].try_into().unwrap());
                    if cmd == PS_IOV_CLOSE {
                        s.write_all(&0i32.to_ne_bytes()).await.unwrap();
                        continue;
                    }
                    let nr = u64::from_ne_bytes(h[8..16].try_into().unwrap());
                    s.write_all(&psi(PAGE_REPLY, nr, 0x1000, 1)).await.unwrap();
                    s.write_all(&payload(nr as usize * PAGE_SIZE, 1))
                        .await
                        .unwrap();
                };
                let _ = tx.send(end);
            });
            let _source = SourceRelay::start(p.source.clone(), page_server);
            let target = TargetRelay::start(p.target.clone()).await.unwrap();
            let mut tcp = TcpStream::connect(target.local_addr()).await.unwrap();
            tcp.write_all(&psi(PS_IOV_GET, 2, 0x1000, 1)).await.unwrap();
            let mut reply = vec![0u8; 32 + 2 * PAGE_SIZE];
            tcp.read_exact(&mut reply).await.unwrap();
            if close {
                tcp.write_all(&psi(PS_IOV_CLOSE, 0, 0, 0)).await.unwrap();
                let mut status = [0u8; 4];
                tcp.read_exact(&mut status).await.unwrap();
            }
            drop(tcp);
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .unwrap()
                .unwrap()
        }
        assert_eq!(ending(false).await, std::io::ErrorKind::ConnectionReset);
        assert_eq!(ending(true).await, std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_page_server_closing_ends_the_daemon_side() {
        let p = pair().await;
        let l = TcpListener::bind(localhost()).await.unwrap();
        let page_server = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"bye").await.unwrap();
            // Dropped: closed without reading.
        });
        let _source = SourceRelay::start(p.source.clone(), page_server);
        let target = TargetRelay::start(p.target.clone()).await.unwrap();
        let mut tcp = TcpStream::connect(target.local_addr()).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"bye");
    }

    #[tokio::test]
    async fn a_lost_connection_or_missing_page_server_ends_the_bridge() {
        // Nobody listens on the page server's port: the daemon's connection ends at once.
        let p = pair().await;
        let gone = TcpListener::bind(localhost())
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let source = SourceRelay::start(p.source.clone(), gone);
        let target = TargetRelay::start(p.target.clone()).await.unwrap();
        let mut tcp = TcpStream::connect(target.local_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(source.counters().failed, 1);

        // The migration connection goes while a bridge is open: the daemon's side ends.
        let page_server = echo_server().await;
        let p = pair().await;
        let _source = SourceRelay::start(p.source.clone(), page_server);
        let target = TargetRelay::start(p.target.clone()).await.unwrap();
        let mut tcp = TcpStream::connect(target.local_addr()).await.unwrap();
        tcp.write_all(b"ping").await.unwrap();
        let mut four = [0u8; 4];
        tcp.read_exact(&mut four).await.unwrap();
        let started = Instant::now();
        p.source.close(0u32.into(), b"source gone");
        let r = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // No new connection is bridged any more.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = TcpStream::connect(target.local_addr()).await;
        assert!(refused.is_err(), "listener closed with the connection");
        drop(target);
    }

    #[tokio::test]
    async fn streams_without_the_header_are_not_bridged() {
        let p = pair().await;
        let page_server = echo_server().await;
        let source = SourceRelay::start(p.source.clone(), page_server);
        let (mut send, mut recv) = p.target.open_bi().await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024))
            .await
            .unwrap();
        assert!(r.is_err() || r.unwrap().is_empty());
        assert_eq!(source.counters().failed, 1);
        assert_eq!(source.counters().to_source, 0);
    }

    #[tokio::test]
    async fn a_reader_that_stalls_holds_the_page_server_back() {
        // The page server writes as fast as it can; the daemon reads nothing. What the relay
        // lets through is bounded by windows and buffers, not by what the server has.
        let p = pair().await;
        let l = TcpListener::bind(localhost()).await.unwrap();
        let page_server = l.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let chunk = vec![7u8; 64 << 10];
            while s.write_all(&chunk).await.is_ok() {
                w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        let _source = SourceRelay::start(p.source.clone(), page_server);
        let target = TargetRelay::start(p.target.clone()).await.unwrap();
        let mut tcp = TcpStream::connect(target.local_addr()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stalled = written.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            written.load(Ordering::Relaxed),
            stalled,
            "the server kept writing"
        );
        assert!(
            stalled < 64 << 20,
            "{stalled} bytes in flight for a reader that read nothing"
        );
        // Reading again lets it go on.
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..64 {
            tcp.read_exact(&mut buf).await.unwrap();
        }
        assert!(written.load(Ordering::Relaxed) > stalled);
        eprintln!("bytes buffered end to end while stalled: {stalled}");
    }
}
