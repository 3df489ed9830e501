//! Containers: create, get, list, scale, delete. The service only writes the container record (desired
//! replicas, deleting flag); the reconciler turns it into instance records, places and releases them.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::view::container_to_proto;
use super::{
    new_id, now_rfc3339, validate, CreateContainer, Service, ServiceError, CONFLICT_RETRIES,
};
use crate::events::{types, Event};
use crate::ipam;
use crate::store::records::{
    ContainerRecord, InstanceRecord, NetworkRecord, RevisionRecord, StatusRecord,
};
use crate::store::{keys, to_json, StoredInstance, Versioned};
use berth_proto::v1;

impl Service {
    /// Validates and records a container; replicas are placed asynchronously. Returns its id.
    pub async fn create_container(&self, req: CreateContainer) -> Result<String, ServiceError> {
        validate::image(&req.image)?;
        let cpu_millis = validate::cpu(&req.cpu)?;
        let memory_bytes = validate::memory(&req.memory)?;
        let replicas = validate::replicas(req.replicas.unwrap_or(1))?;
        if !req.name.is_empty() {
            validate::name("name", &req.name)?;
        }
        validate::command(&req.command)?;
        validate::env(&req.env)?;
        let (restart_policy, max_restarts) =
            validate::restart_policy(&req.restart_policy, req.max_restarts)?;
        let health = req.health.as_ref().map(validate::health).transpose()?;
        let stop_signal = validate::stop_signal(&req.stop_signal)?;
        let stop_timeout_ms = validate::stop_timeout(&req.stop_timeout)?;
        let network = if req.network_id.is_empty() {
            self.default_network().await?
        } else {
            self.resolve_network("network_id", &req.network_id)
                .await?
                .ok_or_else(|| {
                    ServiceError::invalid(
                        "network_id",
                        format!("network {} not found", req.network_id),
                    )
                })?
        };
        let container_id = new_id("ctr");
        for _ in 0..CONFLICT_RETRIES {
            let service_ip = self.pick_service_ip(&container_id).await?;
            let record = ContainerRecord {
                container_id: container_id.clone(),
                name: req.name.clone(),
                image: req.image.clone(),
                network_id: network.value.network_id.clone(),
                cpu_millis,
                memory_bytes,
                replicas,
                command: req.command.clone(),
                env: req.env.clone(),
                created_at: now_rfc3339(),
                deleting: false,
                next_ordinal: 0,
                service_ip: service_ip.to_string(),
                restart_policy: restart_policy.clone(),
                max_restarts,
                health: health.clone(),
                stop_signal: stop_signal.clone(),
                stop_timeout_ms,
                stopped: false,
                revision: 1,
                rollout: None,
                last_rollout: None,
            };
            let id = record.container_id.clone();
            let first = RevisionRecord {
                cause: "create".to_owned(),
                ..crate::store::current_revision(&record)
            };
            let vip_key = keys::vip(&record.service_ip);
            let mut compares = vec![
                Compare::mod_revision(
                    keys::network(&record.network_id),
                    CompareOp::Equal,
                    network.mod_revision,
                ),
                Compare::create_revision(vip_key.clone(), CompareOp::Equal, 0),
            ];
            let mut ops = vec![
                TxnOp::put(keys::container(&id), to_json(&record), None),
                TxnOp::put(keys::netuse(&record.network_id, &id), "", None),
                TxnOp::put(vip_key.clone(), id.clone(), None),
                TxnOp::put(keys::revision(&id, 1), to_json(&first), None),
            ];
            if !record.name.is_empty() {
                compares.push(Compare::create_revision(
                    keys::container_name(&record.name),
                    CompareOp::Equal,
                    0,
                ));
                ops.push(TxnOp::put(
                    keys::container_name(&record.name),
                    id.clone(),
                    None,
                ));
            }
            if self
                .store
                .txn(Txn::new().when(compares).and_then(ops))
                .await?
                .succeeded()
            {
                tracing::info!(container_id = %id, image = %record.image, replicas, network_id = %record.network_id,
                    service_ip = %record.service_ip, "container created");
                self.events.emit(
                    Event::container(&id, types::CREATED)
                        .with_reason(format!("{} x{replicas}", record.image)),
                );
                return Ok(id);
            }
            if !record.name.is_empty()
                && self
                    .store
                    .get_raw(&keys::container_name(&record.name))
                    .await?
                    .is_some()
            {
                return Err(ServiceError::Conflict(format!(
                    "container name {:?} already exists",
                    record.name
                )));
            }
            if self.store.get_raw(&vip_key).await?.is_none() {
                // Not the service IP: the network changed under us.
                return Err(ServiceError::invalid(
                    "network_id",
                    format!(
                        "network {} was deleted or changed meanwhile",
                        record.network_id
                    ),
                ));
            }
            // Another container claimed that service IP first: pick again.
        }
        Err(ServiceError::Conflict(
            "service IPs changed concurrently, try again".into(),
        ))
    }

    /// A service IP not claimed yet (the claim itself is made by the caller's transaction).
    async fn pick_service_ip(&self, container_id: &str) -> Result<Ipv4Addr, ServiceError> {
        let (claims, _) = self.store.get_prefix(keys::VIPS).await?;
        let used: HashSet<Ipv4Addr> = claims
            .iter()
            .filter_map(|kv| {
                String::from_utf8_lossy(kv.key())
                    .strip_prefix(keys::VIPS)
                    .and_then(|ip| ip.parse().ok())
            })
            .collect();
        // Start from a point derived from the id so concurrent creates rarely race for one address.
        let hint = container_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let range = self.net_config().service_cidr;
        ipam::allocate_host(&range, &used, hint).ok_or_else(|| {
            ServiceError::Unavailable(format!("the service IP range {range} is full"))
        })
    }

    /// Finds a container by id or name.
    pub(crate) async fn resolve_container(
        &self,
        id_or_name: &str,
    ) -> Result<Versioned<ContainerRecord>, ServiceError> {
        validate::reference("container_id", id_or_name)?;
        if let Some(found) = self.store.get_json(&keys::container(id_or_name)).await? {
            return Ok(found);
        }
        if let Some(id) = self
            .store
            .get_string(&keys::container_name(id_or_name))
            .await?
        {
            if let Some(found) = self.store.get_json(&keys::container(&id)).await? {
                return Ok(found);
            }
        }
        Err(ServiceError::NotFound(format!(
            "container {id_or_name} not found"
        )))
    }

    /// A container with its instances, by id or name.
    pub async fn get_container(&self, id_or_name: &str) -> Result<v1::Container, ServiceError> {
        let found = self.resolve_container(id_or_name).await?;
        let id = &found.value.container_id;
        // Instances and statuses in one read, so they are consistent with each other.
        let mut kv = self.store.client().kv_client();
        let txn = Txn::new().and_then([
            TxnOp::get(
                keys::instances_prefix(id),
                Some(GetOptions::new().with_prefix()),
            ),
            TxnOp::get(
                keys::status_prefix(id),
                Some(GetOptions::new().with_prefix()),
            ),
        ]);
        let resp = kv.txn(txn).await.map_err(crate::store::StoreError::from)?;
        let mut instances: Vec<StoredInstance> = Vec::new();
        let mut statuses = std::collections::HashMap::new();
        for (i, op) in resp.op_responses().into_iter().enumerate() {
            let etcd_client::TxnOpResponse::Get(get) = op else {
                continue;
            };
            for kv in get.kvs() {
                if i == 0 {
                    let record: Versioned<InstanceRecord> = crate::store::decode_versioned(kv)?;
                    instances.push(StoredInstance {
                        record,
                        status: None,
                    });
                } else {
                    let status: Versioned<StatusRecord> = crate::store::decode_versioned(kv)?;
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let iid = key.rsplit('/').next().unwrap_or_default().to_owned();
                    statuses.insert(iid, status.value);
                }
            }
        }
        for inst in &mut instances {
            inst.status = statuses.remove(&inst.record.value.instance_id);
        }
        let refs: Vec<&StoredInstance> = instances.iter().collect();
        let network_name = self
            .store
            .get_json::<NetworkRecord>(&keys::network(&found.value.network_id))
            .await?
            .map(|n| n.value.name)
            .unwrap_or_default();
        Ok(container_to_proto(&found.value, &network_name, &refs))
    }

    /// Every container, oldest first.
    pub async fn list_containers(&self) -> Result<Vec<v1::Container>, ServiceError> {
        let snap = self.store.snapshot().await?;
        let mut out: Vec<v1::Container> = snap
            .containers
            .values()
            .map(|c| {
                let network_name = snap
                    .networks
                    .get(&c.value.network_id)
                    .map(|n| n.value.name.as_str())
                    .unwrap_or_default();
                container_to_proto(
                    &c.value,
                    network_name,
                    &snap.instances_of(&c.value.container_id),
                )
            })
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.container_id.cmp(&b.container_id))
        });
        Ok(out)
    }

    /// Sets the desired replica count.
    pub async fn scale_container(
        &self,
        id_or_name: &str,
        replicas: i64,
    ) -> Result<(), ServiceError> {
        let replicas = validate::replicas(replicas)?;
        let id = self
            .change_container(id_or_name, |c| {
                if c.deleting {
                    return Err(ServiceError::Conflict(format!(
                        "container {} is being deleted",
                        c.container_id
                    )));
                }
                c.replicas = replicas;
                Ok(())
            })
            .await?;
        self.events
            .emit(Event::container(id, types::SCALED).with_reason(format!("{replicas} replicas")));
        Ok(())
    }

    /// Marks a container for deletion; its replicas are stopped and released, then the record goes.
    pub async fn delete_container(&self, id_or_name: &str) -> Result<(), ServiceError> {
        let id = self
            .change_container(id_or_name, |c| {
                c.deleting = true;
                Ok(())
            })
            .await?;
        tracing::info!(container_id = %id, "container marked for deletion");
        self.events.emit(Event::container(id, types::DELETING));
        Ok(())
    }

    /// Read-modify-write of a container record under optimistic concurrency.
    pub(super) async fn change_container(
        &self,
        id_or_name: &str,
        change: impl Fn(&mut ContainerRecord) -> Result<(), ServiceError>,
    ) -> Result<String, ServiceError> {
        for _ in 0..CONFLICT_RETRIES {
            let found = self.resolve_container(id_or_name).await?;
            let mut record = found.value.clone();
            change(&mut record)?;
            let key = keys::container(&record.container_id);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    found.mod_revision,
                )])
                .and_then([TxnOp::put(key, to_json(&record), None)]);
            if self.store.txn(txn).await?.succeeded() {
                return Ok(record.container_id);
            }
        }
        Err(ServiceError::Conflict(format!(
            "container {id_or_name} changed concurrently, try again"
        )))
    }
}
