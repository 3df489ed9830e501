//! `NETWORKS` and `LINKS`: which addresses belong to which berth network, and which networks may
//! talk to each other. Read by the tc classifiers on the instance veths.

use std::collections::{BTreeMap, BTreeSet};

use berth_ebpf_common::{LinkKey, LINKS_MAP, MAX_LINKS, MAX_NETWORKS, NETWORKS_MAP};
use ipnet::Ipv4Net;
use tracing::{debug, warn};

use super::maps::{snapshot, KvMap};
use super::EbpfError;

/// Makes the `NETWORKS` trie hold exactly `desired` (CIDR → network id; host bits are ignored).
/// New and changed entries are written before stale ones go. Returns the number of writes.
pub fn sync_networks<M>(map: &mut M, desired: &[(Ipv4Net, u32)]) -> Result<usize, EbpfError>
where
    M: KvMap<Ipv4Net, u32> + ?Sized,
{
    let mut want = BTreeMap::new();
    for (net, id) in desired {
        if let Some(prev) = want.insert(net.trunc(), *id) {
            if prev != *id {
                warn!(%net, prev, id, "network listed twice; the last entry wins");
            }
        }
    }
    if want.len() > MAX_NETWORKS as usize {
        return Err(EbpfError::TooMany {
            map: NETWORKS_MAP,
            wanted: want.len(),
            limit: MAX_NETWORKS as usize,
        });
    }
    let current = snapshot(map)?;
    let mut writes = 0;
    for (net, id) in &want {
        if current.get(net) != Some(id) {
            map.insert(*net, *id)?;
            debug!(%net, id, "network set");
            writes += 1;
        }
    }
    for net in current.keys().filter(|n| !want.contains_key(n)) {
        map.remove(net)?;
        debug!(%net, "network removed");
        writes += 1;
    }
    Ok(writes)
}

/// Makes `LINKS` hold exactly the pairs in `desired` (order within a pair does not matter; a
/// network linked to itself is ignored). Returns the number of writes.
pub fn sync_links<M>(map: &mut M, desired: &[(u32, u32)]) -> Result<usize, EbpfError>
where
    M: KvMap<LinkKey, u32> + ?Sized,
{
    let want: BTreeSet<LinkKey> = desired
        .iter()
        .filter(|(a, b)| a != b)
        .map(|(a, b)| LinkKey::new(*a, *b))
        .collect();
    if want.len() > MAX_LINKS as usize {
        return Err(EbpfError::TooMany {
            map: LINKS_MAP,
            wanted: want.len(),
            limit: MAX_LINKS as usize,
        });
    }
    let current = snapshot(map)?;
    let mut writes = 0;
    for key in want.iter().filter(|k| !current.contains_key(k)) {
        map.insert(*key, 1)?;
        debug!(a = key.a, b = key.b, "networks linked");
        writes += 1;
    }
    for key in current.keys().filter(|k| !want.contains(k)) {
        map.remove(key)?;
        debug!(a = key.a, b = key.b, "networks unlinked");
        writes += 1;
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::maps::fake::{FakeMap, Log, Op};

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn networks_follow_the_desired_set() {
        let log = Log::default();
        let mut m = FakeMap::new(NETWORKS_MAP, &log);
        let n = sync_networks(&mut m, &[(net("10.1.0.0/24"), 1), (net("10.2.0.7/24"), 2)]).unwrap();
        assert_eq!(n, 2);
        assert_eq!(m.data[&net("10.2.0.0/24")], 2, "host bits dropped");
        assert_eq!(
            sync_networks(&mut m, &[(net("10.1.0.0/24"), 1), (net("10.2.0.0/24"), 2)]).unwrap(),
            0
        );
        log.borrow_mut().clear();
        sync_networks(&mut m, &[(net("10.1.0.0/24"), 3), (net("10.3.0.0/16"), 4)]).unwrap();
        let ops = log.borrow().clone();
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(
            matches!(ops[2], Op::Remove(NETWORKS_MAP, _)),
            "inserts before removals: {ops:?}"
        );
        assert_eq!(m.data.len(), 2);
        assert_eq!(m.data[&net("10.1.0.0/24")], 3);
    }

    #[test]
    fn links_are_unordered_pairs() {
        let log = Log::default();
        let mut m = FakeMap::new(LINKS_MAP, &log);
        assert_eq!(
            sync_links(&mut m, &[(2, 1), (1, 2), (3, 3), (4, 1)]).unwrap(),
            2
        );
        assert!(m.data.contains_key(&LinkKey { a: 1, b: 2 }));
        assert!(m.data.contains_key(&LinkKey { a: 1, b: 4 }));
        assert_eq!(sync_links(&mut m, &[(1, 4), (2, 1)]).unwrap(), 0);
        assert_eq!(sync_links(&mut m, &[(1, 4)]).unwrap(), 1);
        assert_eq!(m.data.len(), 1);
        assert_eq!(sync_links(&mut m, &[]).unwrap(), 1);
        assert!(m.data.is_empty());
    }

    #[test]
    fn a_failing_map_names_itself() {
        let log = Log::default();
        let mut m = FakeMap::new(LINKS_MAP, &log);
        m.fail_after = Some(0);
        let err = sync_links(&mut m, &[(1, 2)]).unwrap_err();
        assert!(err.to_string().contains(LINKS_MAP), "{err}");
    }
}
