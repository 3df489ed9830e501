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
        encrypted: bool,
    ) -> Result<v1::Network, ServiceError> {
        validate::name("name", name)?;
        let net = ipam::parse_network_cidr(cidr)
            .map_err(|e| ServiceError::invalid("cidr", e.to_string()))?;
        let ranges = self.net_config();
        for (range, what) in [
            (ranges.service_cidr, "the service IP range (--service-cidr)"),
            (ranges.tunnel_cidr, "the node tunnel range (--tunnel-cidr)"),
        ] {
            if ipam::overlaps(&net, &range) {
                return Err(ServiceError::invalid(
                    "cidr",
                    format!("{net} overlaps {what} {range}"),
                ));
            }
        }
        for _ in 0..CONFLICT_RETRIES {
            let (kvs, revision) = self.store.get_prefix(keys::NETWORKS).await?;
            let mut used_vnis = std::collections::HashSet::new();
            for kv in &kvs {
                let other: Versioned<NetworkRecord> = crate::store::decode_versioned(kv)?;
                used_vnis.insert(other.value.vni);
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
            let vni = ipam::allocate_vni(&used_vnis)
                .ok_or_else(|| ServiceError::Unavailable("every VXLAN id is in use".to_owned()))?;
            let record = NetworkRecord {
                network_id: new_id("net"),
                name: name.to_owned(),
                cidr: net.to_string(),
                gateway: ipam::gateway(&net).to_string(),
                created_at: now_rfc3339(),
                encrypted,
                vni,
                links: Vec::new(),
            };
            let name_key = keys::network_name(name);
            // The prefix compare makes the overlap check and the VNI choice above serializable: any network
            // created since our read has a newer mod_revision and fails the transaction.
            let txn = Txn::new()
                .when([
                    Compare::create_revision(name_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(keys::vni(vni), CompareOp::Equal, 0),
                    Compare::mod_revision(keys::NETWORKS, CompareOp::Less, revision + 1)
                        .with_prefix(),
                ])
                .and_then([
                    TxnOp::put(keys::network(&record.network_id), to_json(&record), None),
                    TxnOp::put(name_key.clone(), record.network_id.clone(), None),
                    TxnOp::put(keys::vni(vni), record.network_id.clone(), None),
                ]);
            if self.store.txn(txn).await?.succeeded() {
                tracing::info!(network_id = %record.network_id, name, cidr = %record.cidr, vni,
                    encrypted, "network created");
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
            match self
                .create_network(DEFAULT_NETWORK_NAME, DEFAULT_NETWORK_CIDR, false)
                .await
            {
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
    /// Its links go with it.
    pub async fn delete_network(&self, id_or_name: &str) -> Result<(), ServiceError> {
        let Some(found) = self.resolve_network("network_id", id_or_name).await? else {
            return Err(ServiceError::NotFound(format!(
                "network {id_or_name} not found"
            )));
        };
        let id = found.value.network_id.clone();
        let use_prefix = keys::netuse_prefix(&id);
        // "No key under the prefix" as a compare: every key (none) has create_revision 0.
        let mut compares = vec![
            Compare::mod_revision(keys::network(&id), CompareOp::Equal, found.mod_revision),
            Compare::create_revision(use_prefix.clone(), CompareOp::Equal, 0).with_prefix(),
        ];
        let mut ops = vec![
            TxnOp::delete(keys::network(&id), None),
            TxnOp::delete(keys::network_name(&found.value.name), None),
            TxnOp::delete(
                keys::ipam_prefix(&id),
                Some(DeleteOptions::new().with_prefix()),
            ),
        ];
        if found.value.vni != 0 {
            ops.push(TxnOp::delete(keys::vni(found.value.vni), None));
        }
        // Links are symmetric: drop this network from each peer's record in the same transaction.
        for peer_id in &found.value.links {
            if let Some(mut peer) = self
                .store
                .get_json::<NetworkRecord>(&keys::network(peer_id))
                .await?
            {
                compares.push(Compare::mod_revision(
                    keys::network(peer_id),
                    CompareOp::Equal,
                    peer.mod_revision,
                ));
                peer.value.links.retain(|l| l != &id);
                ops.push(TxnOp::put(
                    keys::network(peer_id),
                    to_json(&peer.value),
                    None,
                ));
            }
        }
        let txn = Txn::new().when(compares).and_then(ops);
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

impl Service {
    /// Links two networks (ids or names) so their instances may reach each other; idempotent.
    /// Returns the first network. Errors: unknown → NotFound; a network with itself → InvalidArgument.
    pub async fn link_networks(&self, a: &str, b: &str) -> Result<v1::Network, ServiceError> {
        self.change_link(a, b, true).await
    }

    /// Removes the link between two networks; NotFound when they are not linked.
    pub async fn unlink_networks(&self, a: &str, b: &str) -> Result<v1::Network, ServiceError> {
        self.change_link(a, b, false).await
    }

    async fn change_link(&self, a: &str, b: &str, link: bool) -> Result<v1::Network, ServiceError> {
        for _ in 0..CONFLICT_RETRIES {
            let Some(mut first) = self.resolve_network("network_id", a).await? else {
                return Err(ServiceError::NotFound(format!("network {a} not found")));
            };
            // The peer comes from the request body: an unknown one is a bad argument, not a missing URL.
            let Some(mut second) = self.resolve_network("peer_network_id", b).await? else {
                return Err(ServiceError::invalid(
                    "network_id",
                    format!("network {b} not found"),
                ));
            };
            let (id_a, id_b) = (
                first.value.network_id.clone(),
                second.value.network_id.clone(),
            );
            if id_a == id_b {
                return Err(ServiceError::invalid(
                    "network_id",
                    "a network cannot be linked to itself",
                ));
            }
            let linked = first.value.links.contains(&id_b);
            match (link, linked) {
                (true, true) => return Ok(network_to_proto(&first.value)),
                (false, false) => {
                    return Err(ServiceError::NotFound(format!(
                        "networks {id_a} and {id_b} are not linked"
                    )))
                }
                (true, false) => {
                    first.value.links.push(id_b.clone());
                    if !second.value.links.contains(&id_a) {
                        second.value.links.push(id_a.clone());
                    }
                }
                (false, true) => {
                    first.value.links.retain(|l| l != &id_b);
                    second.value.links.retain(|l| l != &id_a);
                }
            }
            first.value.links.sort();
            second.value.links.sort();
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(
                        keys::network(&id_a),
                        CompareOp::Equal,
                        first.mod_revision,
                    ),
                    Compare::mod_revision(
                        keys::network(&id_b),
                        CompareOp::Equal,
                        second.mod_revision,
                    ),
                ])
                .and_then([
                    TxnOp::put(keys::network(&id_a), to_json(&first.value), None),
                    TxnOp::put(keys::network(&id_b), to_json(&second.value), None),
                ]);
            if self.store.txn(txn).await?.succeeded() {
                tracing::info!(network_id = %id_a, peer_network_id = %id_b, link, "network link changed");
                return Ok(network_to_proto(&first.value));
            }
        }
        Err(ServiceError::Conflict(
            "networks changed concurrently, try again".into(),
        ))
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
        encrypted: r.encrypted,
        vni: r.vni,
        linked_network_ids: r.links.clone(),
    }
}
