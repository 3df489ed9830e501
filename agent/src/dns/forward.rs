//! Relaying queries for names outside `berth.` to the node's upstream resolvers.
//!
//! The query bytes go out unchanged (same id, flags, EDNS), from a fresh socket with a random
//! port per query, so an upstream reply can only be matched by whoever can see the query, and
//! the upstream's answer comes back unchanged too.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

use super::handler::is_reply_to;

/// Largest DNS message over UDP (and the largest that fits TCP's 16-bit length prefix).
pub(crate) const MAX_MESSAGE: usize = 65_535;

/// How a query reached the server, and so how it travels upstream: a client that retried over
/// TCP after a truncated answer needs the full answer, which only TCP carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("no answer from upstream {upstream} in time")]
    Timeout { upstream: SocketAddr },
    #[error("asking upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        source: io::Error,
    },
}

/// Asks `upstreams` in order until one answers, within `budget` overall. Each upstream gets an
/// equal share of what is left, so one that fails fast (port unreachable) leaves more time to
/// the next, and a dead first upstream does not use up the whole budget.
pub(crate) async fn forward(
    query: &[u8],
    id: u16,
    upstreams: &[SocketAddr],
    budget: Duration,
    transport: Transport,
) -> Result<Vec<u8>, ForwardError> {
    let deadline = Instant::now() + budget;
    let mut last = ForwardError::NoUpstream;
    for (i, &upstream) in upstreams.iter().enumerate() {
        let left = upstreams.len() - i;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt_deadline = Instant::now() + remaining / u32::try_from(left).unwrap_or(u32::MAX);
        let attempt = async {
            match transport {
                Transport::Udp => ask_udp(query, id, upstream).await,
                Transport::Tcp => ask_tcp(query, id, upstream).await,
            }
        };
        match timeout_at(attempt_deadline, attempt).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(source)) => last = ForwardError::Io { upstream, source },
            Err(_) => last = ForwardError::Timeout { upstream },
        }
        tracing::debug!(error = %last, id, "upstream failed, trying the next");
    }
    Err(last)
}

async fn ask_udp(query: &[u8], id: u16, upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let local = match upstream {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from anyone but the upstream, and reports its
    // ICMP port-unreachable as an error instead of a silent wait.
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await?;
        if is_reply_to(&buf[..len], id) {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(query: &[u8], id: u16, upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    let reply = read_framed(&mut stream).await?;
    if !is_reply_to(&reply, id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "tcp reply does not answer the query",
        ));
    }
    Ok(reply)
}

/// Reads one length-prefixed DNS message from a TCP stream.
pub(crate) async fn read_framed<S: AsyncReadExt + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

/// Writes one DNS message with its length prefix, in one write so it leaves in one segment.
pub(crate) async fn write_framed<S: AsyncWriteExt + Unpin>(
    stream: &mut S,
    message: &[u8],
) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too long for tcp"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}
