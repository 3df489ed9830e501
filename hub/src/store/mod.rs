//! etcd access: the key layout ([`keys`]), the records stored there ([`records`]) and a thin typed
//! client ([`Store`]). Writes that go together are built by the callers as one [`etcd_client::Txn`]
//! guarded by compares, and committed with [`Store::txn`].
//!
//! Every request made through [`Store`] is timed into `berth_hub_etcd_request_duration_seconds{op}`
//! (`get`, `range`, `snapshot`, `txn`, `watch`); failures also count in `berth_hub_etcd_failures_total`.

pub mod keys;
pub mod records;
mod snapshot;

use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, KeyValue, Txn, TxnResponse, WatchOptions, WatchStream,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::metrics;

pub use snapshot::{current_revision, Snapshot, StoredInstance};

/// Failures talking to etcd or decoding what it holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached (down, partitioned, timed out).
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// etcd answered with an error.
    #[error("etcd error: {0}")]
    Etcd(#[source] etcd_client::Error),
    /// A stored value is not what the hub wrote.
    #[error("cannot decode {key}: {message}")]
    Decode {
        /// Key whose value is broken.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match &e {
            E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(e.to_string()),
            E::GRpcStatus(s) if is_unavailable(s) => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Etcd(e),
        }
    }
}

/// Whether a gRPC status from etcd means "not reachable" rather than "refused".
fn is_unavailable(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => true,
        // A broken connection surfaces as Unknown with the transport error as its source.
        tonic::Code::Unknown => std::error::Error::source(s).is_some(),
        _ => false,
    }
}

/// A decoded value with the revisions needed to guard a later write.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// Revision of the last write to the key (for optimistic concurrency).
    pub mod_revision: i64,
    /// Revision the key was created at (identifies one incarnation of the key).
    pub create_revision: i64,
}

/// A cheaply clonable handle on etcd.
#[derive(Clone)]
pub struct Store {
    client: Client,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Connects to etcd and checks it answers, retrying until `wait` has passed.
    pub async fn connect(endpoints: &[String], wait: Duration) -> Result<Store, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::try_connect(endpoints).await {
                Ok(store) => return Ok(store),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "etcd not reachable yet, retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    async fn try_connect(endpoints: &[String]) -> Result<Store, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options)).await?;
        let store = Store { client };
        // connect() may be lazy: a read proves etcd answers.
        store.get_raw(keys::ROOT).await?;
        Ok(store)
    }

    /// The raw client, for watches, leases and elections.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Reads one key's raw value.
    pub async fn get_raw(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let mut resp = metrics::global()
            .time_etcd("get", kv.get(key, None))
            .await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Reads every key under `prefix`, with the revision the read happened at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        self.read_prefix("range", prefix).await
    }

    /// [`Store::get_prefix`], timed under `op`.
    async fn read_prefix(
        &self,
        op: &'static str,
        prefix: &str,
    ) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut kv = self.client.kv_client();
        let mut resp = metrics::global()
            .time_etcd(op, kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok((resp.take_kvs(), revision))
    }

    /// Reads one key and decodes it as JSON.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(decode_versioned(&kv)?)),
        }
    }

    /// Reads every key under `prefix` decoded as JSON.
    pub async fn list_json<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let (kvs, _) = self.get_prefix(prefix).await?;
        kvs.iter().map(decode_versioned).collect()
    }

    /// Reads one key as a UTF-8 string.
    pub async fn get_string(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(decode_string(&kv)?)),
        }
    }

    /// Commits a transaction.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut kv = self.client.kv_client();
        Ok(metrics::global().time_etcd("txn", kv.txn(txn)).await?)
    }

    /// Opens a watch stream (timed until etcd accepted the stream).
    pub async fn watch(
        &self,
        key: &str,
        options: Option<WatchOptions>,
    ) -> Result<WatchStream, StoreError> {
        let mut client = self.client.clone();
        Ok(metrics::global()
            .time_etcd("watch", client.watch(key, options))
            .await?)
    }

    /// Reads all of berth's state at one revision.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let (kvs, revision) = self.read_prefix("snapshot", keys::ROOT).await?;
        Snapshot::from_kvs(&kvs, revision)
    }
}

/// Encodes a record for storage.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are plain structs of strings, numbers and maps with string keys: serialisation cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes a stored JSON value with its revisions.
pub fn decode_versioned<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>, StoreError> {
    let value = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Decode {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        message: e.to_string(),
    })?;
    Ok(Versioned {
        value,
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
    })
}

/// Decodes a stored UTF-8 value.
pub fn decode_string(kv: &KeyValue) -> Result<String, StoreError> {
    String::from_utf8(kv.value().to_vec()).map_err(|e| StoreError::Decode {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        message: e.to_string(),
    })
}
