//! The agent side: registration with a lease-bound liveness key, heartbeats, the desired-state stream
//! of a node and status reports.

use std::net::IpAddr;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::lifecycle::{finalize_container, release_instance};
use super::view::status_from_proto;
use super::{
    now_rfc3339, validate, RegisterNode, Service, ServiceError, CONFLICT_RETRIES,
    NODE_LEASE_TTL_SECS,
};
use crate::ca::{CaError, NodeCert};
use crate::events::{types, Event};
use crate::store::records::{InstanceRecord, NodeRecord, StatusRecord};
use crate::store::{keys, to_json, Store, StoreError, Versioned};
use berth_proto::v1;

impl Service {
    /// Records a node and (re)binds its liveness key to a fresh lease; signs the node's key when it
    /// sent a certificate request. The request is checked and signed before anything is written,
    /// so a bad one leaves no registration behind.
    pub async fn register_node(&self, req: RegisterNode) -> Result<Option<NodeCert>, ServiceError> {
        validate::name("node_id", &req.node_id)?;
        req.advertise_ip.parse::<IpAddr>().map_err(|_| {
            ServiceError::invalid(
                "advertise_ip",
                format!("{:?} is not an IP address", req.advertise_ip),
            )
        })?;
        if req.cpu_millis == 0 {
            return Err(ServiceError::invalid("cpu_millis", "must be more than 0"));
        }
        if req.memory_bytes == 0 {
            return Err(ServiceError::invalid("memory_bytes", "must be more than 0"));
        }
        if !req.wireguard_public_key.is_empty() {
            validate::wireguard_key("wireguard_public_key", &req.wireguard_public_key)?;
        }
        if !req.api_addr.is_empty() && req.api_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ServiceError::invalid(
                "api_addr",
                format!("{:?} is not an address like 10.0.0.5:9750", req.api_addr),
            ));
        }
        if !req.migration_addr.is_empty()
            && req.migration_addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ServiceError::invalid(
                "migration_addr",
                format!(
                    "{:?} is not an address like 10.0.0.5:9752",
                    req.migration_addr
                ),
            ));
        }
        let cert = match (req.csr_pem.is_empty(), &self.ca) {
            (true, _) => None,
            (false, None) => {
                return Err(ServiceError::Internal(
                    "this hub has no cluster CA to sign node certificates with".to_owned(),
                ))
            }
            (false, Some(ca)) => Some(ca.sign_node(&req.node_id, &req.csr_pem).map_err(
                |e| match e {
                    CaError::BadRequest(_) => ServiceError::invalid("csr_pem", e.to_string()),
                    other => ServiceError::Internal(other.to_string()),
                },
            )?),
        };
        let mut client = self.store.client();
        let lease = client
            .lease_grant(NODE_LEASE_TTL_SECS, None)
            .await
            .map_err(StoreError::from)?;
        for _ in 0..CONFLICT_RETRIES {
            let previous = self
                .store
                .get_json::<NodeRecord>(&keys::node(&req.node_id))
                .await?;
            let kept_tunnel = previous
                .as_ref()
                .map(|p| p.value.tunnel_ip.clone())
                .filter(|ip| !ip.is_empty());
            let tunnel_ip = match &kept_tunnel {
                Some(ip) => ip.clone(),
                None => self.pick_tunnel_ip(&req.node_id).await?.to_string(),
            };
            let record = NodeRecord {
                node_id: req.node_id.clone(),
                hostname: req.hostname.clone(),
                ip: req.advertise_ip.clone(),
                cpu_millis: req.cpu_millis,
                memory_bytes: req.memory_bytes,
                lease_id: lease.id(),
                registered_at: now_rfc3339(),
                tunnel_ip: tunnel_ip.clone(),
                wireguard_public_key: req.wireguard_public_key.clone(),
                api_addr: req.api_addr.clone(),
                migration_addr: req.migration_addr.clone(),
                // A cordon outlives the agent's restarts: only `/uncordon` lifts it.
                unschedulable: previous.as_ref().is_some_and(|p| p.value.unschedulable),
            };
            // Guarded on the record read, so a drain or uncordon committed meanwhile is not lost.
            let mut compares = vec![Compare::mod_revision(
                keys::node(&req.node_id),
                CompareOp::Equal,
                previous.as_ref().map_or(0, |p| p.mod_revision),
            )];
            let mut ops = vec![
                TxnOp::put(keys::node(&record.node_id), to_json(&record), None),
                TxnOp::put(
                    keys::alive(&record.node_id),
                    "",
                    Some(PutOptions::new().with_lease(lease.id())),
                ),
                // Back from DOWN: what was moved away stays moved (the node is told to stop it).
                TxnOp::delete(keys::down(&record.node_id), None),
            ];
            if kept_tunnel.is_none() {
                compares.push(Compare::create_revision(
                    keys::tunnel(&tunnel_ip),
                    CompareOp::Equal,
                    0,
                ));
                ops.push(TxnOp::put(
                    keys::tunnel(&tunnel_ip),
                    record.node_id.clone(),
                    None,
                ));
            }
            if !self
                .store
                .txn(Txn::new().when(compares).and_then(ops))
                .await?
                .succeeded()
            {
                // Another node claimed that tunnel address first, or the record changed: again.
                continue;
            }
            tracing::info!(node_id = %record.node_id, ip = %record.ip, cpu_millis = record.cpu_millis,
                memory_bytes = record.memory_bytes, lease_id = record.lease_id, tunnel_ip = %record.tunnel_ip,
                "node registered");
            self.events.emit(
                Event::node(&record.node_id, types::REGISTERED).with_reason(record.ip.clone()),
            );
            return Ok(cert);
        }
        Err(ServiceError::Conflict(
            "tunnel addresses changed concurrently, try again".into(),
        ))
    }

    /// A tunnel address not claimed yet (the caller's transaction claims it).
    async fn pick_tunnel_ip(&self, node_id: &str) -> Result<std::net::Ipv4Addr, ServiceError> {
        let (claims, _) = self.store.get_prefix(keys::TUNNELS).await?;
        let used: std::collections::HashSet<std::net::Ipv4Addr> = claims
            .iter()
            .filter_map(|kv| {
                String::from_utf8_lossy(kv.key())
                    .strip_prefix(keys::TUNNELS)
                    .and_then(|ip| ip.parse().ok())
            })
            .collect();
        let hint = node_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let range = self.net_config().tunnel_cidr;
        crate::ipam::allocate_host(&range, &used, hint)
            .ok_or_else(|| ServiceError::Unavailable(format!("the tunnel range {range} is full")))
    }

    /// Keeps a node's lease alive. `false` when the hub does not know the node (or its lease expired):
    /// the agent then registers again.
    pub async fn heartbeat(&self, node_id: &str) -> Result<bool, ServiceError> {
        validate::reference("node_id", node_id)?;
        let Some(node) = self
            .store
            .get_json::<NodeRecord>(&keys::node(node_id))
            .await?
        else {
            return Ok(false);
        };
        if self.store.get_raw(&keys::alive(node_id)).await?.is_none() {
            return Ok(false);
        }
        let mut client = self.store.client();
        let (mut keeper, mut responses) = client
            .lease_keep_alive(node.value.lease_id)
            .await
            .map_err(StoreError::from)?;
        keeper.keep_alive().await.map_err(StoreError::from)?;
        let ttl = match responses.message().await.map_err(StoreError::from)? {
            Some(resp) => resp.ttl(),
            None => 0,
        };
        Ok(ttl > 0)
    }

    /// The node's desired state now and after every change, until the receiver goes away.
    pub fn watch_assignments(
        &self,
        node_id: &str,
    ) -> Result<
        impl Stream<Item = Result<v1::DesiredState, ServiceError>> + Send + 'static,
        ServiceError,
    > {
        validate::reference("node_id", node_id)?;
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        let node_id = node_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = stream_assignments(&store, &node_id, &tx).await {
                tracing::warn!(node_id, error = %e, "assignment stream ended");
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Records the statuses a node reports and releases what it removed.
    pub async fn report_status(
        &self,
        node_id: &str,
        reports: &[v1::InstanceReport],
        removed: &[String],
    ) -> Result<(), ServiceError> {
        validate::reference("node_id", node_id)?;
        for report in reports {
            // First: a target's "done" moves the instance to it, and then its status counts.
            if let Some(p) = &report.migration {
                self.migration_progress(node_id, report, p).await?;
            }
            let Some(inst) = self.instance_on(node_id, &report.instance_id).await? else {
                tracing::debug!(node_id, instance_id = %report.instance_id, "status for an unknown instance");
                continue;
            };
            let status = v1::InstanceStatus::try_from(report.status)
                .unwrap_or(v1::InstanceStatus::Unspecified);
            let mut phases_ms: std::collections::BTreeMap<String, f64> = report
                .phases_ms
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let previous = self
                .store
                .get_json::<StatusRecord>(&keys::status(
                    &inst.value.container_id,
                    &inst.value.instance_id,
                ))
                .await?
                .map(|p| p.value);
            if phases_ms.is_empty() {
                // Later reports (e.g. STOPPED) carry no phases: keep the deploy's.
                phases_ms = previous
                    .as_ref()
                    .map(|p| p.phases_ms.clone())
                    .unwrap_or_default();
            }
            let image_digest = if report.image_digest.is_empty() {
                previous
                    .as_ref()
                    .map(|p| p.image_digest.clone())
                    .unwrap_or_default()
            } else {
                report.image_digest.clone()
            };
            let record = StatusRecord {
                status: status_from_proto(status).to_owned(),
                reason: report.reason.clone(),
                node_id: node_id.to_owned(),
                updated_at: now_rfc3339(),
                phases_ms,
                restarts: report.restarts,
                image_digest,
            };
            let changed = previous.as_ref().is_none_or(|p| {
                p.status != record.status
                    || p.reason != record.reason
                    || p.restarts != record.restarts
            });
            let r = &inst.value;
            // Only for this incarnation of the instance: never resurrect a status after a release.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    keys::instance(&r.container_id, &r.instance_id),
                    CompareOp::Equal,
                    inst.create_revision,
                )])
                .and_then([TxnOp::put(
                    keys::status(&r.container_id, &r.instance_id),
                    to_json(&record),
                    None,
                )]);
            if self.store.txn(txn).await?.succeeded() && changed {
                self.events.emit(
                    Event::instance(&r.container_id, &r.instance_id, types::STATUS)
                        .with_node(node_id)
                        .with_status(record.status.clone())
                        .with_reason(record.reason.clone()),
                );
            }
            tracing::debug!(node_id, instance_id = %r.instance_id, status = %record.status, "status reported");
        }
        for iid in removed {
            let Some(inst) = self.instance_on(node_id, iid).await? else {
                continue;
            };
            if !inst.value.stopping {
                // Still desired: the node will start it again from its assignments.
                tracing::warn!(node_id, instance_id = %iid, "node removed an instance that is still desired");
                continue;
            }
            if release_instance(&self.store, &inst).await? {
                self.events.emit(
                    Event::instance(&inst.value.container_id, iid, types::REMOVED)
                        .with_node(node_id),
                );
                if finalize_container(&self.store, &inst.value.container_id).await? {
                    self.events
                        .emit(Event::container(&inst.value.container_id, types::DELETED));
                }
            }
        }
        Ok(())
    }

    /// An instance placed on `node_id`, if it exists.
    async fn instance_on(
        &self,
        node_id: &str,
        instance_id: &str,
    ) -> Result<Option<Versioned<InstanceRecord>>, ServiceError> {
        if instance_id.is_empty() || instance_id.contains('/') {
            return Ok(None);
        }
        let Some(cid) = self.store.get_string(&keys::owner(instance_id)).await? else {
            return Ok(None);
        };
        let inst = self
            .store
            .get_json::<InstanceRecord>(&keys::instance(&cid, instance_id))
            .await?;
        Ok(inst.filter(|i| i.value.node_id == node_id))
    }
}

/// Reads the node's assignments.
async fn read_desired(store: &Store, node_id: &str) -> Result<v1::DesiredState, StoreError> {
    let (kvs, revision) = store.get_prefix(&keys::assign_prefix(node_id)).await?;
    let mut assignments = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        let a = v1::Assignment::decode(kv.value()).map_err(|e| StoreError::Decode {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            message: e.to_string(),
        })?;
        assignments.push(a);
    }
    // Read after the assignments, not at their revision: a stopping id is only a prompt to report a
    // removal, which the hub checks against the instance record anyway.
    let (stopping, _) = store.get_prefix(&keys::stopping_prefix(node_id)).await?;
    let stopping = stopping
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            key.rsplit('/').next().map(str::to_owned)
        })
        .collect();
    let network_view = match store.get_raw(&keys::netview(node_id)).await? {
        Some(kv) => Some(
            v1::NetworkView::decode(kv.value()).map_err(|e| StoreError::Decode {
                key: keys::netview(node_id),
                message: e.to_string(),
            })?,
        ),
        None => None,
    };
    Ok(v1::DesiredState {
        assignments,
        revision,
        stopping,
        network_view,
    })
}

async fn stream_assignments(
    store: &Store,
    node_id: &str,
    tx: &mpsc::Sender<Result<v1::DesiredState, ServiceError>>,
) -> Result<(), StoreError> {
    let prefix = keys::assign_prefix(node_id);
    let stopping_prefix = keys::stopping_prefix(node_id);
    'resync: loop {
        let state = read_desired(store, node_id).await?;
        let mut revision = state.revision;
        if tx.send(Ok(state)).await.is_err() {
            return Ok(());
        }
        let mut client = store.client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut watch = client.watch(prefix.clone(), Some(options.clone())).await?;
        let mut stopping_watch = client
            .watch(stopping_prefix.clone(), Some(options.clone()))
            .await?;
        let view_options = WatchOptions::new().with_start_revision(revision + 1);
        let mut view_watch = client
            .watch(keys::netview(node_id), Some(view_options))
            .await?;
        loop {
            let msg = tokio::select! {
                msg = watch.message() => msg?,
                msg = stopping_watch.message() => msg?,
                msg = view_watch.message() => msg?,
                () = tx.closed() => return Ok(()),
            };
            let Some(msg) = msg else { continue 'resync };
            if msg.canceled() || msg.compact_revision() > 0 {
                // Compacted past our revision: start over from a fresh read.
                continue 'resync;
            }
            let newest = msg
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max();
            let changed = msg
                .events()
                .iter()
                .any(|e| matches!(e.event_type(), EventType::Put | EventType::Delete));
            if !changed || newest.is_some_and(|r| r <= revision) {
                continue;
            }
            let state = read_desired(store, node_id).await?;
            revision = state.revision;
            if tx.send(Ok(state)).await.is_err() {
                return Ok(());
            }
        }
    }
}
