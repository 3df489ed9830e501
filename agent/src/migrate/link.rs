//! Which connection belongs to which migration. A node can be the target of several migrations at
//! once (a `drain` of another node sends it many), each on its own QUIC connection from its source.
//! The source names the migration on the connection's first unidirectional stream (a u16
//! big-endian length, the migration id, then one byte: the [`Transfer`] it chose, which an `auto`
//! order leaves to the source's measurement); the target's accept loop hands the connection to the
//! migration that [`Links::expect`]s that id from that very node (the peer's certificate says
//! which node it is), and closes any other: an unknown id, a node the hub did not name, a name that
//! never comes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::transport::{MigrationEndpoint, TransportError};

/// How long a new connection may take to name its migration.
const NAME_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest migration id accepted (ids are `mig-` + 12 hex digits).
const MAX_ID_LEN: usize = 64;
/// QUIC close code for a connection no migration expects.
const UNEXPECTED: u32 = 1;

/// Why a migration's connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("naming migration {migration_id} to node {peer}: {reason}")]
    Name {
        migration_id: String,
        peer: String,
        reason: String,
    },
    #[error("no connection from node {peer} for migration {migration_id} within {waited:?}")]
    NotArrived {
        migration_id: String,
        peer: String,
        waited: Duration,
    },
    #[error("migration {0} is already expected")]
    AlreadyExpected(String),
    #[error("migration id {0:?} is not one (1-{MAX_ID_LEN} characters of a-z, 0-9, '-')")]
    BadId(String),
}

/// How the memory crosses a migration's connection: the two session protocols. The source picks
/// it (the hub's `auto` leaves it to the source's measurement of the write rate) and names it
/// with the migration, so the target runs the matching side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Rounds of page deltas, then the frozen last delta and the restore (`stopcopy` is this
    /// with no rounds before the freeze).
    Precopy,
    /// A lazy dump: the container runs on the target before its memory arrives.
    Postcopy,
}

impl Transfer {
    fn byte(self) -> u8 {
        match self {
            Self::Precopy => 0,
            Self::Postcopy => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Precopy),
            1 => Some(Self::Postcopy),
            _ => None,
        }
    }

    /// The mode's name as the hub spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
        }
    }
}

/// A migration's connection as it arrived: the connection and how the source carries it.
#[derive(Debug)]
pub struct Arrived {
    /// The QUIC connection from the source.
    pub connection: quinn::Connection,
    /// The session protocol the source named.
    pub transfer: Transfer,
}

struct Expected {
    peer: String,
    tx: oneshot::Sender<Arrived>,
}

type Table = Arc<Mutex<HashMap<String, Expected>>>;

fn lock(table: &Table) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
    // One insert or remove per holder: a panic cannot leave the map half-changed.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node's migration connections, both ways.
#[derive(Clone)]
pub struct Links {
    endpoint: Arc<MigrationEndpoint>,
    expected: Table,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("node_id", &self.endpoint.node_id())
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Serves `endpoint`: from now on incoming connections go to the migrations expecting them.
    /// The accept loop ends when the endpoint is closed.
    pub fn start(endpoint: MigrationEndpoint) -> Self {
        let links = Self {
            endpoint: Arc::new(endpoint),
            expected: Arc::default(),
        };
        let (endpoint, table) = (links.endpoint.clone(), links.expected.clone());
        tokio::spawn(async move {
            while let Some(accepted) = endpoint.accept().await {
                match accepted {
                    Ok((conn, peer)) => {
                        tokio::spawn(route(conn, peer, table.clone()));
                    }
                    // One bad handshake is no reason to stop serving the others.
                    Err(e) => tracing::warn!(error = %e, "migration connection refused"),
                }
            }
        });
        links
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Waits for node `peer`'s connection for `migration_id` (the target's side). Dropping the
    /// returned [`Expecting`] stops expecting it.
    pub fn expect(&self, migration_id: &str, peer: &str) -> Result<Expecting, LinkError> {
        check_id(migration_id)?;
        let (tx, rx) = oneshot::channel();
        let mut table = lock(&self.expected);
        if table.contains_key(migration_id) {
            return Err(LinkError::AlreadyExpected(migration_id.to_owned()));
        }
        table.insert(
            migration_id.to_owned(),
            Expected {
                peer: peer.to_owned(),
                tx,
            },
        );
        Ok(Expecting {
            migration_id: migration_id.to_owned(),
            peer: peer.to_owned(),
            rx: Some(rx),
            table: self.expected.clone(),
        })
    }

    /// Connects to node `peer` at `addr` for `migration_id` (the source's side) and names the
    /// migration and its `transfer`; the connection is then the migration's.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        peer: &str,
        migration_id: &str,
        transfer: Transfer,
    ) -> Result<quinn::Connection, LinkError> {
        check_id(migration_id)?;
        let conn = self.endpoint.connect(addr, peer).await?;
        let name_err = |reason: String| LinkError::Name {
            migration_id: migration_id.to_owned(),
            peer: peer.to_owned(),
            reason,
        };
        let mut stream = conn.open_uni().await.map_err(|e| name_err(e.to_string()))?;
        let mut frame = Vec::with_capacity(3 + migration_id.len());
        // check_id bounds the length well below u16::MAX.
        frame.extend_from_slice(&(migration_id.len() as u16).to_be_bytes());
        frame.extend_from_slice(migration_id.as_bytes());
        frame.push(transfer.byte());
        stream
            .write_all(&frame)
            .await
            .map_err(|e| name_err(e.to_string()))?;
        stream.finish().map_err(|e| name_err(e.to_string()))?;
        Ok(conn)
    }
}

/// A migration waiting for its connection.
pub struct Expecting {
    migration_id: String,
    peer: String,
    rx: Option<oneshot::Receiver<Arrived>>,
    table: Table,
}

impl Expecting {
    /// The connection, once the peer dialled and named this migration; fails after `timeout`.
    pub async fn arrived(mut self, timeout: Duration) -> Result<Arrived, LinkError> {
        let not_arrived = || LinkError::NotArrived {
            migration_id: self.migration_id.clone(),
            peer: self.peer.clone(),
            waited: timeout,
        };
        let Some(rx) = self.rx.take() else {
            return Err(not_arrived());
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(arrived)) => Ok(arrived),
            Ok(Err(_)) | Err(_) => Err(not_arrived()),
        }
    }
}

impl Drop for Expecting {
    fn drop(&mut self) {
        let mut table = lock(&self.table);
        // Only our own entry: a later `expect` of the same id after we arrived is someone else's.
        if table
            .get(&self.migration_id)
            .is_some_and(|e| e.tx.is_closed() || self.rx.is_some())
        {
            table.remove(&self.migration_id);
        }
    }
}

/// Whether `id` can be a migration id: what the hub makes (`mig-` + hex) passes; nothing that could
/// escape a directory name or a log line does.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_id(id: &str) -> Result<(), LinkError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(LinkError::BadId(id.to_owned()))
    }
}

/// Reads the migration's name off a new connection and hands the connection over, or closes it.
async fn route(conn: quinn::Connection, peer: String, table: Table) {
    let named = tokio::time::timeout(NAME_TIMEOUT, read_name(&conn)).await;
    let (id, transfer) = match named {
        Ok(Ok(named)) => named,
        Ok(Err(reason)) => {
            tracing::warn!(peer, %reason, "migration connection without a valid name");
            conn.close(UNEXPECTED.into(), b"no migration named");
            return;
        }
        Err(_) => {
            tracing::warn!(peer, "migration connection never named its migration");
            conn.close(UNEXPECTED.into(), b"no migration named");
            return;
        }
    };
    let waiting = {
        let mut table = lock(&table);
        match table.get(&id) {
            Some(e) if e.peer == peer => table.remove(&id),
            _ => None,
        }
    };
    match waiting {
        Some(e) => {
            if let Err(arrived) = e.tx.send(Arrived {
                connection: conn,
                transfer,
            }) {
                arrived
                    .connection
                    .close(UNEXPECTED.into(), b"migration no longer expected");
            } else {
                tracing::info!(peer, migration_id = %id, transfer = transfer.as_str(), "migration connection arrived");
            }
        }
        None => {
            tracing::warn!(peer, migration_id = %id, "no migration expects this connection");
            conn.close(UNEXPECTED.into(), b"migration not expected from this node");
        }
    }
}

async fn read_name(conn: &quinn::Connection) -> Result<(String, Transfer), String> {
    let mut stream = conn.accept_uni().await.map_err(|e| e.to_string())?;
    let bytes = stream
        .read_to_end(3 + MAX_ID_LEN)
        .await
        .map_err(|e| e.to_string())?;
    parse_name(&bytes)
}

/// The naming frame: u16 length, the id, the transfer byte.
fn parse_name(bytes: &[u8]) -> Result<(String, Transfer), String> {
    let (len, rest) = bytes
        .split_first_chunk::<2>()
        .ok_or_else(|| "shorter than its length".to_owned())?;
    let (transfer, id) = rest
        .split_last()
        .ok_or_else(|| "no transfer mode".to_owned())?;
    if usize::from(u16::from_be_bytes(*len)) != id.len() {
        return Err("length does not match".to_owned());
    }
    let transfer = Transfer::from_byte(*transfer)
        .ok_or_else(|| format!("unknown transfer mode {transfer}"))?;
    let id = String::from_utf8(id.to_vec()).map_err(|_| "not UTF-8".to_owned())?;
    check_id(&id).map_err(|e| e.to_string())?;
    Ok((id, transfer))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_pki::{ca, identity, localhost};
    use super::*;

    fn links(ca: &super::super::test_pki::Ca, node: &str) -> Links {
        Links::start(MigrationEndpoint::bind(localhost(), &identity(ca, node)).unwrap())
    }

    async fn echo_works(a: &quinn::Connection, b: &quinn::Connection) {
        let (mut tx, _) = a.open_bi().await.unwrap();
        tx.write_all(b"hello").await.unwrap();
        tx.finish().unwrap();
        let (_, mut rx) = b.accept_bi().await.unwrap();
        assert_eq!(rx.read_to_end(16).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn each_connection_reaches_the_migration_it_names() {
        let ca = ca("test");
        let (source, target) = (links(&ca, "n1"), links(&ca, "n2"));
        let addr = target.local_addr().unwrap();
        let first = target.expect("mig-aaa", "n1").unwrap();
        let second = target.expect("mig-bbb", "n1").unwrap();
        assert!(matches!(
            target.expect("mig-aaa", "n1"),
            Err(LinkError::AlreadyExpected(_))
        ));
        // Dialled in the other order: each still lands where it belongs.
        let to_second = source
            .dial(addr, "n2", "mig-bbb", Transfer::Postcopy)
            .await
            .unwrap();
        let to_first = source
            .dial(addr, "n2", "mig-aaa", Transfer::Precopy)
            .await
            .unwrap();
        let wait = Duration::from_secs(5);
        let got_first = first.arrived(wait).await.unwrap();
        let got_second = second.arrived(wait).await.unwrap();
        assert_eq!(got_first.transfer, Transfer::Precopy);
        assert_eq!(got_second.transfer, Transfer::Postcopy);
        echo_works(&to_first, &got_first.connection).await;
        echo_works(&to_second, &got_second.connection).await;
    }

    #[tokio::test]
    async fn unexpected_or_wrong_node_connections_are_closed() {
        let ca = ca("test");
        let (n1, n3, target) = (links(&ca, "n1"), links(&ca, "n3"), links(&ca, "n2"));
        let addr = target.local_addr().unwrap();
        let expecting = target.expect("mig-ccc", "n1").unwrap();
        // n3 names n1's migration: refused, and n1's still waits.
        let intruder = n3
            .dial(addr, "n2", "mig-ccc", Transfer::Precopy)
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), intruder.closed())
            .await
            .unwrap();
        assert!(closed.to_string().contains("not expected"), "{closed}");
        // An id nobody expects.
        let stray = n1
            .dial(addr, "n2", "mig-zzz", Transfer::Precopy)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), stray.closed())
            .await
            .unwrap();
        // The right one still arrives.
        let conn = n1
            .dial(addr, "n2", "mig-ccc", Transfer::Precopy)
            .await
            .unwrap();
        let got = expecting.arrived(Duration::from_secs(5)).await.unwrap();
        echo_works(&conn, &got.connection).await;
        // Bad ids never leave this node.
        assert!(matches!(
            n1.dial(addr, "n2", "../x", Transfer::Precopy).await,
            Err(LinkError::BadId(_))
        ));
    }

    #[tokio::test]
    async fn nothing_arriving_is_a_timeout_and_dropping_stops_expecting() {
        let ca = ca("test");
        let (source, target) = (links(&ca, "n1"), links(&ca, "n2"));
        let waited = target
            .expect("mig-ddd", "n1")
            .unwrap()
            .arrived(Duration::from_millis(200))
            .await;
        assert!(matches!(waited, Err(LinkError::NotArrived { .. })));
        // Given up on: a late dial is closed, and the id can be expected again.
        let late = source
            .dial(
                target.local_addr().unwrap(),
                "n2",
                "mig-ddd",
                Transfer::Precopy,
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), late.closed())
            .await
            .unwrap();
        assert!(target.expect("mig-ddd", "n1").is_ok());
    }

    #[test]
    fn names_that_do_not_parse_are_refused() {
        let name = |id: &[u8], len: u16, transfer: &[u8]| {
            let mut b = len.to_be_bytes().to_vec();
            b.extend_from_slice(id);
            b.extend_from_slice(transfer);
            b
        };
        assert_eq!(
            parse_name(&name(b"mig-a1", 6, &[1])).unwrap(),
            ("mig-a1".to_owned(), Transfer::Postcopy)
        );
        assert_eq!(
            parse_name(&name(b"mig-a1", 6, &[0])).unwrap().1,
            Transfer::Precopy
        );
        for (bytes, why) in [
            (vec![0u8], "shorter"),
            (name(b"", 0, &[]), "no transfer"),
            (name(b"mig-a1", 6, &[]), "length"),
            (name(b"mig-a1", 6, &[7]), "unknown transfer"),
            (name(b"mig-a1", 5, &[0]), "length"),
            (name(b"../x", 4, &[0]), "not one"),
            (name(&[0xff, 0xfe], 2, &[0]), "UTF-8"),
        ] {
            let err = parse_name(&bytes).unwrap_err();
            assert!(err.contains(why), "{bytes:?}: {err}");
        }
    }
}
