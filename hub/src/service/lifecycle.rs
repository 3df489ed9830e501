//! The last steps of an instance's and a container's life, shared by agent reports and the reconciler.

use etcd_client::{Compare, CompareOp, DeleteOptions, Txn, TxnOp};

use crate::store::records::{ContainerRecord, InstanceRecord};
use crate::store::{keys, Store, StoreError, Versioned};

/// How long after a node's liveness lapsed the hub releases the instances it was stopping anyway, so a
/// dead node cannot pin addresses forever.
pub const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes an instance with everything it holds (status, address claim, assignment, owner index) in one
/// transaction, if it has not changed since it was read. Returns whether it was deleted.
pub async fn release_instance(
    store: &Store,
    inst: &Versioned<InstanceRecord>,
) -> Result<bool, StoreError> {
    let r = &inst.value;
    let mut ops = vec![
        TxnOp::delete(keys::instance(&r.container_id, &r.instance_id), None),
        TxnOp::delete(keys::owner(&r.instance_id), None),
        TxnOp::delete(keys::status(&r.container_id, &r.instance_id), None),
    ];
    if !r.ip.is_empty() {
        ops.push(TxnOp::delete(keys::ipam(&r.network_id, &r.ip), None));
    }
    if !r.node_id.is_empty() {
        ops.push(TxnOp::delete(
            keys::assign(&r.node_id, &r.instance_id),
            None,
        ));
        ops.push(TxnOp::delete(
            keys::stopping(&r.node_id, &r.instance_id),
            None,
        ));
    }
    let txn = Txn::new()
        .when([Compare::mod_revision(
            keys::instance(&r.container_id, &r.instance_id),
            CompareOp::Equal,
            inst.mod_revision,
        )])
        .and_then(ops);
    let done = store.txn(txn).await?.succeeded();
    if done {
        tracing::info!(instance_id = %r.instance_id, container_id = %r.container_id, node_id = %r.node_id,
            ip = %r.ip, "instance released");
    }
    Ok(done)
}

/// Deletes a container marked for deletion once it has no instance left (record, name, network use, in
/// one transaction). Returns whether it was deleted.
pub async fn finalize_container(store: &Store, container_id: &str) -> Result<bool, StoreError> {
    let Some(found) = store
        .get_json::<ContainerRecord>(&keys::container(container_id))
        .await?
    else {
        return Ok(false);
    };
    finalize_container_record(store, &found).await
}

/// [`finalize_container`] on a record already read.
pub async fn finalize_container_record(
    store: &Store,
    found: &Versioned<ContainerRecord>,
) -> Result<bool, StoreError> {
    let c = &found.value;
    if !c.deleting {
        return Ok(false);
    }
    let mut ops = vec![
        TxnOp::delete(keys::container(&c.container_id), None),
        TxnOp::delete(keys::netuse(&c.network_id, &c.container_id), None),
        TxnOp::delete(
            keys::status_prefix(&c.container_id),
            Some(DeleteOptions::new().with_prefix()),
        ),
        TxnOp::delete(
            keys::revisions_prefix(&c.container_id),
            Some(DeleteOptions::new().with_prefix()),
        ),
    ];
    if !c.name.is_empty() {
        ops.push(TxnOp::delete(keys::container_name(&c.name), None));
    }
    if !c.service_ip.is_empty() {
        ops.push(TxnOp::delete(keys::vip(&c.service_ip), None));
    }
    let txn = Txn::new()
        .when([
            Compare::mod_revision(
                keys::container(&c.container_id),
                CompareOp::Equal,
                found.mod_revision,
            ),
            // No instance left: every key under the prefix (none) has create_revision 0.
            Compare::create_revision(keys::instances_prefix(&c.container_id), CompareOp::Equal, 0)
                .with_prefix(),
        ])
        .and_then(ops);
    let done = store.txn(txn).await?.succeeded();
    if done {
        tracing::info!(container_id = %c.container_id, "container deleted");
    }
    Ok(done)
}
