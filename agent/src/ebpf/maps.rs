//! The one operation set the map-filling logic needs, over real aya maps and (in unit tests) over
//! a fake that records every call.

use std::collections::BTreeMap;

use aya::maps::{lpm_trie, HashMap, LpmTrie, MapData, MapError};
use aya::Pod;
use ipnet::Ipv4Net;

use super::EbpfError;

/// A key/value map as the sync logic sees it: read everything, then write the differences.
pub trait KvMap<K, V> {
    /// Every entry.
    fn entries(&self) -> Result<Vec<(K, V)>, EbpfError>;
    /// Creates or replaces `key`.
    fn insert(&mut self, key: K, value: V) -> Result<(), EbpfError>;
    /// Removes `key`; a missing key is not an error.
    fn remove(&mut self, key: &K) -> Result<(), EbpfError>;
}

/// A `BPF_MAP_TYPE_HASH` with its name (for errors).
pub struct NamedHashMap<K, V> {
    pub(crate) name: &'static str,
    pub(crate) map: HashMap<MapData, K, V>,
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl<K: Pod + Ord, V: Pod> KvMap<K, V> for NamedHashMap<K, V> {
    fn entries(&self) -> Result<Vec<(K, V)>, EbpfError> {
        let mut out = Vec::new();
        for entry in self.map.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                // An entry removed between "next key" and "lookup": skip it.
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(EbpfError::map(self.name, "iterate", source)),
            }
        }
        Ok(out)
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), EbpfError> {
        self.map
            .insert(key, value, 0)
            .map_err(|source| EbpfError::map(self.name, "insert", source))
    }

    fn remove(&mut self, key: &K) -> Result<(), EbpfError> {
        match self.map.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(EbpfError::map(self.name, "remove", source)),
        }
    }
}

/// The `NETWORKS` LPM trie, keyed by CIDR.
pub struct NetworksTrie {
    pub(crate) map: LpmTrie<MapData, u32, u32>,
}

const NETWORKS: &str = berth_ebpf_common::NETWORKS_MAP;

fn lpm_key(net: &Ipv4Net) -> lpm_trie::Key<u32> {
    lpm_trie::Key::new(u32::from(net.prefix_len()), super::ip_to_be(net.network()))
}

impl KvMap<Ipv4Net, u32> for NetworksTrie {
    fn entries(&self) -> Result<Vec<(Ipv4Net, u32)>, EbpfError> {
        let mut out = Vec::new();
        for entry in self.map.iter() {
            match entry {
                Ok((key, id)) => {
                    let addr = super::ip_from_be(key.data());
                    let prefix = u8::try_from(key.prefix_len()).unwrap_or(32).min(32);
                    if let Ok(net) = Ipv4Net::new(addr, prefix) {
                        out.push((net, id));
                    }
                }
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(EbpfError::map(NETWORKS, "iterate", source)),
            }
        }
        Ok(out)
    }

    fn insert(&mut self, key: Ipv4Net, value: u32) -> Result<(), EbpfError> {
        self.map
            .insert(&lpm_key(&key), value, 0)
            .map_err(|source| EbpfError::map(NETWORKS, "insert", source))
    }

    fn remove(&mut self, key: &Ipv4Net) -> Result<(), EbpfError> {
        match self.map.remove(&lpm_key(key)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(EbpfError::map(NETWORKS, "remove", source)),
        }
    }
}

/// Reads a whole map into a sorted map (the sync logic's view of "what the kernel has").
pub(crate) fn snapshot<K: Ord, V, M: KvMap<K, V> + ?Sized>(
    map: &M,
) -> Result<BTreeMap<K, V>, EbpfError> {
    Ok(map.entries()?.into_iter().collect())
}

/// A `BTreeMap` standing in for a kernel map; every write is appended to a shared log (so tests
/// can check the order of writes across maps) and a write can be made to fail.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::cell::RefCell;
    use std::fmt::Debug;
    use std::rc::Rc;

    /// One recorded write.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Op {
        Insert(&'static str, String, String),
        Remove(&'static str, String),
    }

    pub(crate) type Log = Rc<RefCell<Vec<Op>>>;

    pub(crate) struct FakeMap<K, V> {
        pub(crate) name: &'static str,
        pub(crate) data: BTreeMap<K, V>,
        pub(crate) log: Log,
        /// The next write fails with this many successful writes left (`Some(0)`: the next one).
        pub(crate) fail_after: Option<usize>,
    }

    impl<K, V> FakeMap<K, V> {
        pub(crate) fn new(name: &'static str, log: &Log) -> Self {
            Self {
                name,
                data: BTreeMap::new(),
                log: Rc::clone(log),
                fail_after: None,
            }
        }

        fn check_fail(&mut self, op: &'static str) -> Result<(), EbpfError> {
            match self.fail_after {
                Some(0) => {
                    self.fail_after = None;
                    Err(EbpfError::map(self.name, op, MapError::KeyNotFound))
                }
                Some(n) => {
                    self.fail_after = Some(n - 1);
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }

    impl<K: Ord + Clone + Debug, V: Clone + Debug> KvMap<K, V> for FakeMap<K, V> {
        fn entries(&self) -> Result<Vec<(K, V)>, EbpfError> {
            Ok(self
                .data
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }

        fn insert(&mut self, key: K, value: V) -> Result<(), EbpfError> {
            self.check_fail("insert")?;
            self.log.borrow_mut().push(Op::Insert(
                self.name,
                format!("{key:?}"),
                format!("{value:?}"),
            ));
            self.data.insert(key, value);
            Ok(())
        }

        fn remove(&mut self, key: &K) -> Result<(), EbpfError> {
            self.check_fail("remove")?;
            self.log
                .borrow_mut()
                .push(Op::Remove(self.name, format!("{key:?}")));
            self.data.remove(key);
            Ok(())
        }
    }
}
