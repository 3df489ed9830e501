//! Networks: create (unique name, non-overlapping CIDR), get, list, delete (refused while in use).

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};

use super::{new_id, now_rfc3339, validate, Service, ServiceError, CONFLICT_RETRIES};
use crate::ipam;
use crate::store::records::NetworkRecord;
use crate::store::{keys, to_json, Versioned};
use berth_proto::v1;

/// Name of the network used when a container names none.
pub const DEFAULT_NETWORK_NAME: &str = "default";
/// CIDR of the default network, created on first use.
pub const DEFAULT_NETWORK_CIDR: &str = "10.88.0.0/16";

impl Service {
    /// Creates a network. Errors: bad name/cidr or overlap → InvalidArgument; name taken → Conflict.
    pub async fn create_network(
        &self,
        name: &str,
        cidr: &str,
    ) -> Result<v1::Network, ServiceError> {
        validate::name("name", name)?;
        let net = ipam::parse_network_cidr(cidr)
            .map_err(|e| ServiceError::invalid("cidr", e.to_string()))?;
        for _ in 0..CONFLICT_RETRIES {
            let (kvs, revision) = self.store.get_prefix(keys::NETWORKS).await?;
            for kv in &kvs {
                let other: Versioned<NetworkRecord> = crate::store::decode_versioned(kv)?;
                let other_net = ipam::parse_network_cidr(&other.value.cidr).map_err(|e| {
                    ServiceError::Internal(format!(
                        "stored network {}: {e}",
                        other.value.network_id
                    ))
                })?;
                if other.value.name == name {
                    return Err(ServiceError::Conflict(format!(
                        "network name {name:?} already exists"
                    )));
                }
                if ipam::overlaps(&net, &other_net) {
                    return Err(ServiceError::invalid(
                        "cidr",
                        format!(
                            "{net} overlaps network {} ({}, {})",
                            other.value.name, other.value.network_id, other.value.cidr
                        ),
                    ));
                }
            }
            let record = NetworkRecord {
                network_id: new_id("net"),
                name: name.to_owned(),
                cidr: net.to_string(),
                gateway: ipam::gateway(&net).to_string(),
                created_at: now_rfc3339(),
            };
            let name_key = keys::network_name(name);
            // The prefix compare makes the overlap check above serializable: any network created since
            // our read has a newer mod_revision and fails the transaction.
            let txn = Txn::new()
                .when([
                    Compare::create_revision(name_key.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(keys::NETWORKS, CompareOp::Less, revision + 1)
                        .with_prefix(),
                ])
                .and_then([
                    TxnOp::put(keys::network(&record.network_id), to_json(&record), None),
                    TxnOp::put(name_key.clone(), record.network_id.clone(), None),
                ]);
            if self.store.txn(txn).await?.succeeded() {
                tracing::info!(network_id = %record.network_id, name, cidr = %record.cidr, "network created");
                return Ok(network_to_proto(&record));
            }
            if self.store.get_raw(&name_key).await?.is_some() {
                return Err(ServiceError::Conflict(format!(
                    "network name {name:?} already exists"
                )));
            }
        }
        Err(ServiceError::Conflict(
            "networks changed concurrently, try again".into(),
        ))
    }

    /// Finds a network by id or name.
    pub(crate) async fn resolve_network(
        &self,
        field: &str,
        id_or_name: &str,
    ) -> Result<Option<Versioned<NetworkRecord>>, ServiceError> {
        validate::reference(field, id_or_name)?;
        if let Some(found) = self.store.get_json(&keys::network(id_or_name)).await? {
            return Ok(Some(found));
        }
        match self
            .store
            .get_string(&keys::network_name(id_or_name))
            .await?
        {
            Some(id) => Ok(self.store.get_json(&keys::network(&id)).await?),
            None => Ok(None),
        }
    }

    /// The default network, created if absent. Conflict when a user network overlaps its CIDR.
    pub(crate) async fn default_network(&self) -> Result<Versioned<NetworkRecord>, ServiceError> {
        for _ in 0..CONFLICT_RETRIES {
            if let Some(found) = self
                .resolve_network("network_id", DEFAULT_NETWORK_NAME)
                .await?
            {
                return Ok(found);
            }
            match self.create_network(DEFAULT_NETWORK_NAME, DEFAULT_NETWORK_CIDR).await {
                Ok(_) => {}
                // Someone else created it meanwhile: read it on the next round.
                Err(ServiceError::Conflict(_)) => {}
                Err(ServiceError::InvalidArgument { message, .. }) => {
                    return Err(ServiceError::Conflict(format!(
                        "the default network ({DEFAULT_NETWORK_CIDR}) cannot be created: {message}; \
                         pass network_id"
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        Err(ServiceError::Conflict(
            "default network changed concurrently, try again".into(),
        ))
    }

    /// A network by id or name.
    pub async fn get_network(&self, id_or_name: &str) -> Result<v1::Network, ServiceError> {
        match self.resolve_network("network_id", id_or_name).await? {
            Some(found) => Ok(network_to_proto(&found.value)),
            None => Err(ServiceError::NotFound(format!(
                "network {id_or_name} not found"
            ))),
        }
    }

    /// Every network, sorted by name.
    pub async fn list_networks(&self) -> Result<Vec<v1::Network>, ServiceError> {
        let mut records: Vec<Versioned<NetworkRecord>> =
            self.store.list_json(keys::NETWORKS).await?;
        records.sort_by(|a, b| a.value.name.cmp(&b.value.name));
        Ok(records.iter().map(|r| network_to_proto(&r.value)).collect())
    }

    /// Deletes a network; Conflict while a container uses it.
    pub async fn delete_network(&self, id_or_name: &str) -> Result<(), ServiceError> {
        let Some(found) = self.resolve_network("network_id", id_or_name).await? else {
            return Err(ServiceError::NotFound(format!(
                "network {id_or_name} not found"
            )));
        };
        let id = found.value.network_id.clone();
        let use_prefix = keys::netuse_prefix(&id);
        // "No key under the prefix" as a compare: every key (none) has create_revision 0.
        let txn = Txn::new()
            .when([
                Compare::mod_revision(keys::network(&id), CompareOp::Equal, found.mod_revision),
                Compare::create_revision(use_prefix.clone(), CompareOp::Equal, 0).with_prefix(),
            ])
            .and_then([
                TxnOp::delete(keys::network(&id), None),
                TxnOp::delete(keys::network_name(&found.value.name), None),
                TxnOp::delete(
                    keys::ipam_prefix(&id),
                    Some(DeleteOptions::new().with_prefix()),
                ),
            ]);
        if self.store.txn(txn).await?.succeeded() {
            tracing::info!(network_id = %id, "network deleted");
            return Ok(());
        }
        let (users, _) = self.store.get_prefix(&use_prefix).await?;
        if users.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "network {id} changed concurrently, try again"
            )));
        }
        let names: Vec<String> = users
            .iter()
            .map(|kv| {
                String::from_utf8_lossy(kv.key())
                    .trim_start_matches(&use_prefix)
                    .to_owned()
            })
            .collect();
        Err(ServiceError::Conflict(format!(
            "network {id} is in use by {}",
            names.join(", ")
        )))
    }
}

/// The wire form of a network.
pub fn network_to_proto(r: &NetworkRecord) -> v1::Network {
    v1::Network {
        network_id: r.network_id.clone(),
        name: r.name.clone(),
        cidr: r.cidr.clone(),
        gateway: r.gateway.clone(),
        created_at: r.created_at.clone(),
    }
}
