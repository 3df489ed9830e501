//! `SERVICES` and `BACKENDS`: makes the kernel's view of services equal to a desired list.
//!
//! A service is a VIP with a node-local id and `backend_count` slots `BACKENDS[(id, 0..count)]`.
//! The connect4/sendmsg4 programs read the count and then one slot, so writes are ordered for a
//! program running in between: slots are written before the count grows, and removed only after
//! it shrank; a backend that stays keeps its slot, so existing choices do not move around.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use berth_ebpf_common::{BackendKey, ServiceValue, MAX_BACKENDS, MAX_SERVICES, SERVICES_MAP};
use tracing::{debug, warn};

use super::maps::{snapshot, KvMap};
use super::{ip_to_be, EbpfError};

/// What one [`sync_services`] call changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceChanges {
    /// Services created.
    pub added: usize,
    /// Services whose backends changed.
    pub updated: usize,
    /// Services removed.
    pub removed: usize,
}

/// Makes `services`/`backends` hold exactly `desired` (VIP → backends; a VIP with no backends
/// stays in the map with a count of 0, so connections to it are refused). Duplicate VIPs: the
/// last one wins; duplicate backends count once.
pub fn sync_services<S, B>(
    services: &mut S,
    backends: &mut B,
    desired: &[(Ipv4Addr, Vec<Ipv4Addr>)],
) -> Result<ServiceChanges, EbpfError>
where
    S: KvMap<u32, ServiceValue> + ?Sized,
    B: KvMap<BackendKey, u32> + ?Sized,
{
    let mut want: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (vip, ips) in desired {
        let mut seen = BTreeSet::new();
        let list: Vec<u32> = ips
            .iter()
            .map(|ip| ip_to_be(*ip))
            .filter(|ip| seen.insert(*ip))
            .collect();
        if want.insert(ip_to_be(*vip), list).is_some() {
            warn!(%vip, "service listed twice; the last entry wins");
        }
    }
    if want.len() > MAX_SERVICES as usize {
        return Err(EbpfError::TooMany {
            map: SERVICES_MAP,
            wanted: want.len(),
            limit: MAX_SERVICES as usize,
        });
    }
    let total: usize = want.values().map(Vec::len).sum();
    if total > MAX_BACKENDS as usize {
        return Err(EbpfError::TooMany {
            map: berth_ebpf_common::BACKENDS_MAP,
            wanted: total,
            limit: MAX_BACKENDS as usize,
        });
    }

    let current = snapshot(services)?;
    // Slots per service id, as the kernel has them (including strays beyond the count that an
    // interrupted earlier sync may have left).
    let mut slots: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (key, ip) in backends.entries()? {
        slots
            .entry(key.service_id)
            .or_default()
            .insert(key.index, ip);
    }
    let mut changes = ServiceChanges::default();

    // Removals first: they free ids for the services added below.
    for (vip, value) in &current {
        if want.contains_key(vip) {
            continue;
        }
        services.remove(vip)?;
        for index in slots.remove(&value.service_id).unwrap_or_default().keys() {
            backends.remove(&BackendKey {
                service_id: value.service_id,
                index: *index,
            })?;
        }
        debug!(vip = %super::ip_from_be(*vip), "service removed");
        changes.removed += 1;
    }

    let mut used: BTreeSet<u32> = current
        .iter()
        .filter(|(vip, _)| want.contains_key(vip))
        .map(|(_, v)| v.service_id)
        .collect();
    let mut next_free = 0u32;
    for (vip, ips) in &want {
        let (id, old_count) = match current.get(vip) {
            Some(v) => (v.service_id, Some(v.backend_count)),
            None => {
                while used.contains(&next_free) {
                    next_free += 1;
                }
                used.insert(next_free);
                (next_free, None)
            }
        };
        let old_slots = slots.remove(&id).unwrap_or_default();
        let changed = sync_one(services, backends, *vip, id, old_count, &old_slots, ips)?;
        match (old_count, changed) {
            (None, _) => changes.added += 1,
            (Some(_), true) => changes.updated += 1,
            (Some(_), false) => {}
        }
    }

    // Slots of ids no service has any more (left by an interrupted sync).
    for (id, stray) in slots {
        for index in stray.keys() {
            backends.remove(&BackendKey {
                service_id: id,
                index: *index,
            })?;
        }
    }
    Ok(changes)
}

/// Brings one service to `ips`; returns whether anything was written.
fn sync_one<S, B>(
    services: &mut S,
    backends: &mut B,
    vip: u32,
    id: u32,
    old_count: Option<u32>,
    old_slots: &BTreeMap<u32, u32>,
    ips: &[u32],
) -> Result<bool, EbpfError>
where
    S: KvMap<u32, ServiceValue> + ?Sized,
    B: KvMap<BackendKey, u32> + ?Sized,
{
    let count = u32::try_from(ips.len()).unwrap_or(u32::MAX);
    let new_slots = place(old_slots, old_count.unwrap_or(0), ips);
    let mut changed = false;
    // 1. Slots first: below the old count they replace a backend atomically, above it they are
    //    not visible yet.
    for (index, ip) in (0u32..).zip(&new_slots) {
        if old_slots.get(&index) != Some(ip) {
            backends.insert(
                BackendKey {
                    service_id: id,
                    index,
                },
                *ip,
            )?;
            changed = true;
        }
    }
    // 2. The count: grows over written slots, or shrinks before the tail goes.
    let value = ServiceValue {
        service_id: id,
        backend_count: count,
    };
    if old_count != Some(count) {
        services.insert(vip, value)?;
        changed = true;
    }
    // 3. The tail beyond the new count.
    for index in old_slots.keys().filter(|i| **i >= count) {
        backends.remove(&BackendKey {
            service_id: id,
            index: *index,
        })?;
        changed = true;
    }
    if changed {
        debug!(vip = %super::ip_from_be(vip), service_id = id, backends = count, "service synced");
    }
    Ok(changed)
}

/// New slot contents: a backend that stays keeps its slot when that slot still exists; the others
/// fill the free slots in the order given.
fn place(old_slots: &BTreeMap<u32, u32>, old_count: u32, ips: &[u32]) -> Vec<u32> {
    let n = ips.len();
    let wanted: BTreeSet<u32> = ips.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = vec![None; n];
    let mut placed = BTreeSet::new();
    for (index, slot) in (0u32..).zip(slots.iter_mut()) {
        if index >= old_count {
            break;
        }
        if let Some(ip) = old_slots.get(&index) {
            if wanted.contains(ip) && placed.insert(*ip) {
                *slot = Some(*ip);
            }
        }
    }
    let mut rest = ips.iter().filter(|ip| !placed.contains(*ip));
    slots
        .into_iter()
        .map(|s| s.or_else(|| rest.next().copied()).unwrap_or_default())
        .collect()
}

#[cfg(test)]
#[path = "services_tests.rs"]
mod tests;
