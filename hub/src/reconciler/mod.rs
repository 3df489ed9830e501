//! The scheduler loop. One hub replica at a time (elected in etcd) turns desired state into placements:
//! it materialises instance records from container replica counts, places them with
//! [`crate::scheduler::schedule`] and [`crate::ipam::allocate`], stops what was scaled away and releases
//! what nodes removed. It runs after every change under `/berth/` (coalescing what arrives together) and every
//! [`RESYNC_INTERVAL`].

mod pass;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, LeaderKey, ResignOptions, WatchOptions};

use crate::service::NetConfig;
use crate::store::{keys, Store, StoreError};

pub use pass::{PassReport, Reconciler};

/// Periodic pass even without changes (catches lapsed liveness, release grace, missed events).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Changes already queued within this window after the first one are handled by the same pass.
/// Kept tiny on purpose: a pass starts at once (deploy latency), and bursts still coalesce because
/// whatever arrives while a pass runs is handled by the next one.
pub const COALESCE: Duration = Duration::from_millis(1);
/// TTL of the leader's election lease; a dead leader is replaced after at most this long.
pub const LEADER_LEASE_TTL_SECS: i64 = 5;

/// Runs the scheduler loop until `shutdown` completes: campaigns for leadership, then reconciles while
/// leader; re-campaigns when the leadership lease is lost (etcd unreachable).
pub async fn run(store: Store, candidate: String, shutdown: impl Future<Output = ()> + Send) {
    run_with_config(store, candidate, NetConfig::default(), shutdown).await;
}

/// [`run`] with the cluster's address ranges (those the hub's flags set).
pub async fn run_with_config(
    store: Store,
    candidate: String,
    net: NetConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut reconciler = Reconciler::new(store.clone(), crate::service::lifecycle::RELEASE_GRACE)
        .with_net_config(net);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            result = lead_once(&store, &candidate, &mut reconciler) => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "scheduler leadership lost, campaigning again");
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One term: lease, campaign, reconcile until the lease is lost. Dropping the future (shutdown) leaves
/// the lease to expire; [`run`] callers that want a quick hand-over call [`resign`].
async fn lead_once(
    store: &Store,
    candidate: &str,
    reconciler: &mut Reconciler,
) -> Result<(), StoreError> {
    let mut client = store.client();
    let lease = client.lease_grant(LEADER_LEASE_TTL_SECS, None).await?.id();
    let guard = LeaseGuard {
        client: client.clone(),
        lease,
    };
    let keepalive = keep_lease_alive(client.clone(), lease);
    tokio::pin!(keepalive);
    let leader = tokio::select! {
        e = &mut keepalive => return Err(e),
        resp = client.campaign(keys::ELECTION, candidate, lease) => resp?.take_leader(),
    };
    tracing::info!(candidate, "elected scheduler leader");
    let result = tokio::select! {
        e = &mut keepalive => Err(e),
        e = reconcile_while_leader(store, reconciler) => Err(e),
    };
    if let Some(leader) = leader {
        resign(&mut client, leader).await;
    }
    drop(guard);
    result
}

async fn reconcile_while_leader(store: &Store, reconciler: &mut Reconciler) -> StoreError {
    let mut client = store.client();
    let mut watch = match client
        .watch(keys::ROOT, Some(WatchOptions::new().with_prefix()))
        .await
    {
        Ok(w) => w,
        Err(e) => return e.into(),
    };
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    loop {
        // A node turning DOWN must not wait for the next resync: wake at the reconciler's deadline.
        let deadline = reconciler
            .next_deadline()
            .map(tokio::time::Instant::from_std);
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            () = until_deadline => {}
            msg = watch.message() => match msg {
                Ok(Some(_)) => {
                    while let Ok(Ok(Some(_))) =
                        tokio::time::timeout(COALESCE, watch.message()).await {}
                }
                Ok(None) => return StoreError::Unavailable("watch on /berth/ ended".into()),
                Err(e) => return e.into(),
            },
        }
        match reconciler.pass().await {
            Ok(report) if report.changed() => tracing::debug!(?report, "reconciled"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed"),
        }
    }
}

/// Keeps the lease alive; returns only when it is lost.
async fn keep_lease_alive(mut client: Client, lease: i64) -> StoreError {
    let interval = Duration::from_millis((LEADER_LEASE_TTL_SECS as u64 * 1000) / 3);
    let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
        Ok(pair) => pair,
        Err(e) => return e.into(),
    };
    loop {
        if let Err(e) = keeper.keep_alive().await {
            return e.into();
        }
        match responses.message().await {
            Ok(Some(r)) if r.ttl() > 0 => {}
            Ok(_) => return StoreError::Unavailable(format!("leader lease {lease} expired")),
            Err(e) => return e.into(),
        }
        tokio::time::sleep(interval).await;
    }
}

async fn resign(client: &mut Client, leader: LeaderKey) {
    if let Err(e) = client
        .resign(Some(ResignOptions::new().with_leader(leader)))
        .await
    {
        tracing::debug!(error = %e, "resign failed");
    }
}

/// Revokes the leadership lease when a term ends, so another replica takes over at once.
struct LeaseGuard {
    client: Client,
    lease: i64,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        let lease = self.lease;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.lease_revoke(lease).await;
            });
        }
    }
}
