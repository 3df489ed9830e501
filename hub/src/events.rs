//! The cluster's event log: every state change of containers, instances, nodes and migrations, kept in
//! etcd for a while ([`EventsConfig::ttl`]) and streamed to `GET /v1/events?watch=true`, the gRPC
//! `EventService.Watch` and `berth events`.
//!
//! Layout: `/berth-events/{nonce}` → [`Event`] (JSON). The prefix is deliberately outside `/berth/`:
//! the scheduler watches `/berth/` and reads it whole every pass, and events must neither wake it nor
//! grow its snapshots. Order is etcd's: an event's position is the revision that created its key, then
//! its nonce within that revision (one transaction may write several events). Its id,
//! `"{create_revision}-{nonce}"`, is therefore a resumable cursor ([`Cursor`]), and one read at
//! revision R followed by a watch from R+1 gives a stream with no gap and no duplicate.
//!
//! Expiry: events are bound to a lease per time bucket (1/10 of the TTL, between 1 s and 60 s), not
//! one lease per event: a hub grants one lease per bucket and reuses it for every event it writes in
//! that bucket. Its TTL is the event TTL plus the bucket length, so an event lives between `ttl` and
//! `ttl + bucket`, and a cached lease always has at least `ttl` to live when it is used.
//!
//! Writing: [`Events::put_op`] gives the `TxnOp` to add to the transaction of the state change itself
//! (the event exists exactly when the change does); [`Events::record`] writes one at once;
//! [`Events::emit`] queues it for a background writer (never blocks, drops when the queue is full).

use std::cmp::Ordering;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchStream,
};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::store::{Store, StoreError};
use berth_proto::v1;

/// Prefix of event keys (outside `/berth/` on purpose, see the module docs).
pub const PREFIX: &str = "/berth-events/";
/// How long events are kept by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default page size of [`list`].
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page [`list`] returns.
pub const MAX_LIMIT: usize = 1000;
/// Events queued by [`Events::emit`] before new ones are dropped.
pub const DEFAULT_QUEUE: usize = 4096;
/// Most events the background writer puts in one transaction (etcd allows 128 operations).
const WRITE_BATCH: usize = 100;

/// Event types. Free strings on the wire so later issues can add some; these are the ones berth uses.
pub mod types {
    /// A container (or an instance record) was created.
    pub const CREATED: &str = "created";
    /// An instance was given a node and an address.
    pub const PLACED: &str = "placed";
    /// An instance could not be placed (reason says why); emitted when the reason changes.
    pub const PENDING: &str = "pending";
    /// The reported status of an instance changed (`status` carries the new one).
    pub const STATUS: &str = "status";
    /// An instance was marked stopping (scale down, delete, moved away from a DOWN node).
    pub const STOPPING: &str = "stopping";
    /// The node reported an instance removed and its record was deleted.
    pub const REMOVED: &str = "removed";
    /// A container's replica count changed.
    pub const SCALED: &str = "scaled";
    /// A container was marked for deletion.
    pub const DELETING: &str = "deleting";
    /// A container's record was deleted (its last instance is gone).
    pub const DELETED: &str = "deleted";
    /// A node registered (or registered again).
    pub const REGISTERED: &str = "registered";
    /// A node's liveness lease expired.
    pub const UNHEALTHY: &str = "unhealthy";
    /// A node heartbeats again.
    pub const HEALTHY: &str = "healthy";
    /// A node was declared DOWN and its instances moved.
    pub const DOWN: &str = "down";
    /// A node was cordoned and its instances sent away (`POST /v1/nodes/{id}/drain`).
    pub const DRAINED: &str = "drained";
    /// A cordoned node may receive instances again (`POST /v1/nodes/{id}/uncordon`).
    pub const UNCORDONED: &str = "uncordoned";
    /// A migration started.
    pub const STARTED: &str = "started";
    /// A post-copy migration's target runs the instance; its memory is still arriving.
    pub const SWITCHED: &str = "switched";
    /// A migration finished.
    pub const COMPLETED: &str = "completed";
    /// A migration failed.
    pub const FAILED: &str = "failed";
    /// Replicas were asked to stop (POST .../stop).
    pub const STOP: &str = "stop";
    /// Stopped replicas were asked to start (POST .../start).
    pub const START: &str = "start";
    /// Replicas were asked to restart (POST .../restart).
    pub const RESTART: &str = "restart";
    /// A rolling update to a new revision started.
    pub const UPDATE: &str = "update";
    /// A rollback started (requested, or by itself after new replicas failed).
    pub const ROLLBACK: &str = "rollback";
    /// A rolling update (or rollback) finished: every replica runs the container's revision.
    pub const ROLLOUT_DONE: &str = "rollout_done";
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A container (all its replicas); `id` is the container id.
    Container,
    /// One replica; `id` is the instance id, `container_id` its container.
    Instance,
    /// A node; `id` is the node id.
    Node,
    /// A live migration; `id` is the migration id.
    Migration,
}

impl EventKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Container => "container",
            EventKind::Instance => "instance",
            EventKind::Node => "node",
            EventKind::Migration => "migration",
        }
    }
}

/// One state change. Stored as JSON without `event_id`, which is derived from the key and its revision
/// when read (it is not known before the write commits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `"{revision}-{nonce}"`: the event's position, usable as `since`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
    /// When the hub recorded it (RFC 3339, UTC).
    pub time: String,
    /// What it is about.
    pub kind: EventKind,
    /// Id of the container, instance, node or migration.
    pub id: String,
    /// The container of an instance or migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The node involved (where an instance runs, the node of a node event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// One of [`types`].
    #[serde(rename = "type")]
    pub event_type: String,
    /// The status after the change (`RUNNING`, `PENDING`, ...), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why (may be empty).
    #[serde(default)]
    pub reason: String,
}

impl Event {
    /// An event stamped now.
    pub fn new(kind: EventKind, id: impl Into<String>, event_type: &str) -> Event {
        Event {
            event_id: String::new(),
            time: crate::service::now_rfc3339(),
            kind,
            id: id.into(),
            container_id: None,
            node_id: None,
            event_type: event_type.to_owned(),
            status: None,
            reason: String::new(),
        }
    }

    /// A container event.
    pub fn container(container_id: impl Into<String>, event_type: &str) -> Event {
        Event::new(EventKind::Container, container_id, event_type)
    }

    /// An instance event.
    pub fn instance(
        container_id: impl Into<String>,
        instance_id: impl Into<String>,
        event_type: &str,
    ) -> Event {
        Event::new(EventKind::Instance, instance_id, event_type).with_container(container_id)
    }

    /// A node event.
    pub fn node(node_id: impl Into<String>, event_type: &str) -> Event {
        let node_id = node_id.into();
        Event::new(EventKind::Node, node_id.clone(), event_type).with_node(node_id)
    }

    /// A migration event.
    pub fn migration(migration_id: impl Into<String>, event_type: &str) -> Event {
        Event::new(EventKind::Migration, migration_id, event_type)
    }

    /// Sets `container_id`.
    pub fn with_container(mut self, container_id: impl Into<String>) -> Event {
        self.container_id = Some(container_id.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets `node_id` (an empty id leaves it unset).
    pub fn with_node(mut self, node_id: impl Into<String>) -> Event {
        self.node_id = Some(node_id.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets `status` (an empty status leaves it unset).
    pub fn with_status(mut self, status: impl Into<String>) -> Event {
        self.status = Some(status.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets `reason`.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Event {
        self.reason = reason.into();
        self
    }

    /// The stored form (no `event_id`).
    fn encode(&self) -> Vec<u8> {
        let mut stored = self.clone();
        stored.event_id.clear();
        crate::store::to_json(&stored)
    }
}

impl From<Event> for v1::Event {
    fn from(e: Event) -> Self {
        v1::Event {
            event_id: e.event_id,
            time: e.time,
            kind: e.kind.as_str().to_owned(),
            id: e.id,
            container_id: e.container_id.unwrap_or_default(),
            node_id: e.node_id.unwrap_or_default(),
            r#type: e.event_type,
            status: e.status.unwrap_or_default(),
            reason: e.reason,
        }
    }
}

/// Failures of the event log.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// etcd failed or is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A `since` that is not an event id nor a revision.
    #[error("invalid event id {0:?}: expected REVISION or REVISION-NONCE")]
    BadCursor(String),
    /// The watch could not continue from where it was (its revision was compacted, or etcd cancelled it).
    #[error("event watch cancelled at revision {revision}: {reason}")]
    WatchCancelled {
        /// Last revision the watch had reached.
        revision: i64,
        /// What etcd said.
        reason: String,
    },
}

impl From<etcd_client::Error> for EventsError {
    fn from(e: etcd_client::Error) -> Self {
        EventsError::Store(e.into())
    }
}

impl From<EventsError> for crate::service::ServiceError {
    fn from(e: EventsError) -> Self {
        match e {
            EventsError::Store(s) => s.into(),
            EventsError::BadCursor(_) => {
                crate::service::ServiceError::invalid("since", e.to_string())
            }
            EventsError::WatchCancelled { .. } => {
                crate::service::ServiceError::Unavailable(e.to_string())
            }
        }
    }
}

/// A position in the event log: after every event of `revision`, or (with a nonce) after that one
/// event of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// etcd revision.
    pub revision: i64,
    /// Nonce of the last event seen in that revision; `None`: the whole revision was seen.
    pub nonce: Option<String>,
}

impl Cursor {
    /// Parses an event id (`"1234-00018c..."`) or a bare revision (`"1234"`, `"0"` = from the start).
    pub fn parse(s: &str) -> Result<Cursor, EventsError> {
        let bad = || EventsError::BadCursor(s.to_owned());
        let (rev, nonce) = match s.split_once('-') {
            Some((r, n)) => (r, Some(n)),
            None => (s, None),
        };
        if rev.is_empty() || !rev.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let revision = rev.parse::<i64>().map_err(|_| bad())?;
        if let Some(n) = nonce {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
        }
        Ok(Cursor {
            revision,
            nonce: nonce.map(str::to_owned),
        })
    }

    /// Whether an event at (`revision`, `nonce`) comes after this cursor.
    fn is_before(&self, revision: i64, nonce: &str) -> bool {
        match revision.cmp(&self.revision) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => self.nonce.as_deref().is_some_and(|n| nonce > n),
        }
    }
}

/// Settings of an [`Events`] writer.
#[derive(Debug, Clone, Copy)]
pub struct EventsConfig {
    /// How long events are kept (at least this long, at most this plus one bucket).
    pub ttl: Duration,
    /// Capacity of the [`Events::emit`] queue.
    pub queue: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            ttl: DEFAULT_TTL,
            queue: DEFAULT_QUEUE,
        }
    }
}

impl EventsConfig {
    /// Length of a lease bucket: a tenth of the TTL, between 1 s and 60 s.
    fn bucket(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// TTL of a bucket lease, whole seconds, rounded up.
    fn lease_ttl_secs(&self) -> i64 {
        let total = self.ttl + self.bucket();
        let secs = total.as_secs() + u64::from(total.subsec_nanos() > 0);
        i64::try_from(secs).unwrap_or(i64::MAX)
    }
}

struct BucketLease {
    id: i64,
    granted: Instant,
}

struct Inner {
    store: Store,
    config: EventsConfig,
    lease: tokio::sync::Mutex<Option<BucketLease>>,
    queue: mpsc::Sender<Event>,
    // The writer task is started by the first emit, so `Events::new` needs no runtime.
    pending_writer: Mutex<Option<mpsc::Receiver<Event>>>,
    dropped: AtomicU64,
}

/// The hub's event writer: cheap to clone, one per hub process (its lease cache is per handle).
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Events {
    /// A writer over `store`.
    pub fn new(store: Store, config: EventsConfig) -> Events {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        Events {
            inner: Arc::new(Inner {
                store,
                config,
                lease: tokio::sync::Mutex::new(None),
                queue: tx,
                pending_writer: Mutex::new(Some(rx)),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> EventsConfig {
        self.inner.config
    }

    /// The put of `event` to add to a transaction: the event is recorded exactly when that transaction
    /// commits. Costs an etcd round trip only when a new lease bucket starts.
    pub async fn put_op(&self, event: &Event) -> Result<TxnOp, EventsError> {
        let lease = self.lease().await?;
        Ok(put_with_lease(event, lease))
    }

    /// Writes one event now.
    pub async fn record(&self, event: &Event) -> Result<(), EventsError> {
        self.write_batch(std::slice::from_ref(event)).await
    }

    /// Queues `event` for the background writer and returns at once. When the queue is full (etcd slow
    /// or down) the event is dropped and counted ([`Events::dropped`]): state changes never wait for
    /// their events.
    pub fn emit(&self, event: Event) {
        self.start_writer();
        match self.inner.queue.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) => {
                let n = self.inner.dropped.fetch_add(1, AtomicOrdering::Relaxed) + 1;
                tracing::warn!(kind = e.kind.as_str(), id = %e.id, event_type = %e.event_type, dropped = n, "event queue full, event dropped");
            }
        }
    }

    /// How many emitted events were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(AtomicOrdering::Relaxed)
    }

    fn start_writer(&self) {
        let rx = match self.inner.pending_writer.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(rx) = rx else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                // The task holds a weak handle: it ends when the last `Events` clone is dropped.
                let weak = Arc::downgrade(&self.inner);
                handle.spawn(write_queued(weak, rx));
            }
            Err(_) => tracing::warn!("events emitted outside a tokio runtime are not written"),
        }
    }

    /// The current bucket's lease, granting a new one when the bucket is over.
    async fn lease(&self) -> Result<i64, EventsError> {
        let mut slot = self.inner.lease.lock().await;
        if let Some(l) = slot.as_ref() {
            if l.granted.elapsed() < self.inner.config.bucket() {
                return Ok(l.id);
            }
        }
        let ttl = self.inner.config.lease_ttl_secs();
        let granted = Instant::now();
        let id = self
            .inner
            .store
            .client()
            .lease_grant(ttl, None)
            .await
            .map_err(StoreError::from)?
            .id();
        tracing::debug!(lease = id, ttl_secs = ttl, "event lease granted");
        *slot = Some(BucketLease { id, granted });
        Ok(id)
    }

    /// Forgets the cached lease, so the next write grants a fresh one. Call it when a transaction
    /// holding a [`Events::put_op`] failed with "requested lease not found" (only possible when this
    /// process was frozen for longer than the TTL).
    pub async fn forget_lease(&self) {
        *self.inner.lease.lock().await = None;
    }

    /// Puts `events` in one transaction; retried once with a fresh lease, in case the cached one was
    /// lost.
    async fn write_batch(&self, events: &[Event]) -> Result<(), EventsError> {
        let mut last = None;
        for _ in 0..2 {
            let lease = self.lease().await?;
            let ops: Vec<TxnOp> = events.iter().map(|e| put_with_lease(e, lease)).collect();
            match self.inner.store.txn(Txn::new().and_then(ops)).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    self.forget_lease().await;
                    last = Some(e);
                }
            }
        }
        Err(last
            .map(EventsError::from)
            .unwrap_or_else(|| StoreError::Unavailable("event write failed".into()).into()))
    }
}

/// The background writer of [`Events::emit`]: batches what is queued, in order.
async fn write_queued(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<Event>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        // The queue's only sender lives in `Inner`: `None` once the last handle is gone.
        match rx.recv().await {
            Some(e) => batch.push(e),
            None => return,
        }
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let events = Events { inner: strong };
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=5 {
            match events.write_batch(&batch).await {
                Ok(()) => break,
                Err(e) if attempt == 5 => {
                    let n = events
                        .inner
                        .dropped
                        .fetch_add(batch.len() as u64, AtomicOrdering::Relaxed);
                    tracing::warn!(error = %e, events = batch.len(), dropped = n + batch.len() as u64, "events not written, dropped");
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "event write failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        batch.clear();
    }
}

/// A key unique to this process and increasing in it: nanoseconds since the epoch (bumped when two
/// calls land on the same one) followed by a random per-process tag, so two hubs never collide and
/// the events of one transaction sort in the order they were made.
fn next_nonce() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static TAG: LazyLock<u32> = LazyLock::new(rand::random);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default();
    let prev = LAST
        .fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    let value = now.max(prev + 1);
    format!("{value:016x}{:08x}", *TAG)
}

fn put_with_lease(event: &Event, lease: i64) -> TxnOp {
    TxnOp::put(
        format!("{PREFIX}{}", next_nonce()),
        event.encode(),
        Some(PutOptions::new().with_lease(lease)),
    )
}

/// Decodes a stored event; `None` (logged) for a key that is not one.
fn decode(kv: &KeyValue) -> Option<(i64, String, Event)> {
    let key = String::from_utf8_lossy(kv.key());
    let nonce = key.strip_prefix(PREFIX)?.to_owned();
    match serde_json::from_slice::<Event>(kv.value()) {
        Ok(mut e) => {
            let revision = kv.create_revision();
            e.event_id = format!("{revision}-{nonce}");
            Some((revision, nonce, e))
        }
        Err(err) => {
            tracing::warn!(key = %key, error = %err, "undecodable event skipped");
            None
        }
    }
}

/// Reads the events after `since` (all retained ones when `None`), in order, with the read's revision.
async fn read_after(
    store: &Store,
    since: Option<&Cursor>,
) -> Result<(Vec<Event>, i64), EventsError> {
    let mut options = GetOptions::new().with_prefix();
    if let Some(c) = since {
        // Server-side filter; the nonce part is applied below.
        options = options.with_min_create_revision(c.revision.max(0));
    }
    let mut resp = store
        .client()
        .kv_client()
        .get(PREFIX, Some(options))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
    let mut events: Vec<(i64, String, Event)> = resp
        .take_kvs()
        .iter()
        .filter_map(decode)
        .filter(|(rev, nonce, _)| since.is_none_or(|c| c.is_before(*rev, nonce)))
        .collect();
    events.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok((events.into_iter().map(|(_, _, e)| e).collect(), revision))
}

/// One page of [`list`].
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Oldest first.
    pub events: Vec<Event>,
    /// More events follow (with `since`) or precede (without) this page.
    pub more: bool,
    /// The `since` that continues right after this page: the last event's id when the page was cut
    /// short, else the read's revision (so a later call sees exactly what came after this one).
    pub next: String,
}

/// Lists events: with `since`, the first `limit` after it (page forward with `next`); without, the
/// most recent `limit`.
pub async fn list(
    store: &Store,
    since: Option<&Cursor>,
    limit: usize,
) -> Result<Page, EventsError> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let (mut events, revision) = read_after(store, since).await?;
    let more = events.len() > limit;
    if since.is_some() {
        events.truncate(limit);
    } else if more {
        events.drain(..events.len() - limit);
    }
    let next = match events.last() {
        Some(last) if more && since.is_some() => last.event_id.clone(),
        _ => revision.to_string(),
    };
    Ok(Page { events, more, next })
}

/// A stream of events, in order.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, EventsError>> + Send>>;

/// Every event after `since` and then every new one as it is written, in order, with no gap and no
/// duplicate across the two (one read at revision R, then a watch from R+1). Without `since`, only
/// events written from now on. Ends with an error item when etcd cancels the watch, and at once
/// (without error) after [`close_streams`].
pub async fn watch(store: &Store, since: Option<Cursor>) -> Result<EventStream, EventsError> {
    let (backlog, revision) = match &since {
        Some(c) => read_after(store, Some(c)).await?,
        None => {
            // Only the revision is needed: a count-only read of the prefix gives it.
            let resp = store
                .client()
                .kv_client()
                .get(
                    PREFIX,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            (
                vec![],
                resp.header().map(|h| h.revision()).unwrap_or_default(),
            )
        }
    };
    let watch = store
        .client()
        .watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    // Expiry deletes every key; only creations are events.
                    .with_filters([WatchFilterType::NoDelete]),
            ),
        )
        .await?;
    let state = WatchState {
        backlog: backlog.into(),
        watch: Some(watch),
        since,
        revision,
        closed: CLOSE.subscribe(),
    };
    Ok(Box::pin(futures::stream::unfold(state, next_event)))
}

struct WatchState {
    backlog: std::collections::VecDeque<Event>,
    watch: Option<WatchStream>,
    since: Option<Cursor>,
    revision: i64,
    closed: tokio::sync::watch::Receiver<bool>,
}

async fn next_event(mut st: WatchState) -> Option<(Result<Event, EventsError>, WatchState)> {
    loop {
        if let Some(e) = st.backlog.pop_front() {
            return Some((Ok(e), st));
        }
        let watch = st.watch.as_mut()?;
        let msg = tokio::select! {
            biased;
            _ = st.closed.wait_for(|c| *c) => return None,
            msg = watch.message() => msg,
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                st.watch = None;
                let err = EventsError::WatchCancelled {
                    revision: st.revision,
                    reason: "etcd closed the watch".into(),
                };
                return Some((Err(err), st));
            }
            Err(e) => {
                st.watch = None;
                return Some((Err(e.into()), st));
            }
        };
        if resp.canceled() {
            st.watch = None;
            let reason = if resp.compact_revision() > 0 {
                format!("revision {} was compacted", resp.compact_revision())
            } else {
                resp.cancel_reason().to_owned()
            };
            let err = EventsError::WatchCancelled {
                revision: st.revision,
                reason,
            };
            return Some((Err(err), st));
        }
        // etcd never splits a revision across responses, so sorting a response orders each revision
        // like the backlog read does.
        let mut fresh: Vec<(i64, String, Event)> = resp
            .events()
            .iter()
            .filter(|ev| ev.event_type() == EventType::Put)
            .filter_map(|ev| ev.kv())
            // A rewritten key would be an old event again.
            .filter(|kv| kv.version() == 1)
            .filter_map(decode)
            .filter(|(rev, nonce, _)| st.since.as_ref().is_none_or(|c| c.is_before(*rev, nonce)))
            .collect();
        fresh.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        if let Some((rev, _, _)) = fresh.last() {
            st.revision = *rev;
        }
        st.backlog.extend(fresh.into_iter().map(|(_, _, e)| e));
    }
}

static CLOSE: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Ends every event stream of this process (at shutdown: a graceful HTTP/gRPC shutdown waits for open
/// responses, and an event stream never ends by itself). Streams opened afterwards end at once.
pub fn close_streams() {
    CLOSE.send_replace(true);
}
