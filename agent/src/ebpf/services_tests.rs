use super::*;
use crate::ebpf::maps::fake::{FakeMap, Log, Op};
use berth_ebpf_common::BACKENDS_MAP;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn be(s: &str) -> u32 {
    ip_to_be(ip(s))
}

struct Maps {
    log: Log,
    services: FakeMap<u32, ServiceValue>,
    backends: FakeMap<BackendKey, u32>,
}

impl Maps {
    fn new() -> Self {
        let log = Log::default();
        Self {
            services: FakeMap::new(SERVICES_MAP, &log),
            backends: FakeMap::new(BACKENDS_MAP, &log),
            log,
        }
    }

    fn sync(&mut self, desired: &[(&str, &[&str])]) -> Result<ServiceChanges, EbpfError> {
        let desired: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> = desired
            .iter()
            .map(|(v, b)| (ip(v), b.iter().map(|s| ip(s)).collect()))
            .collect();
        self.log.borrow_mut().clear();
        sync_services(&mut self.services, &mut self.backends, &desired)
    }

    /// What a connect4 program could pick for `vip`, read the way it reads the maps.
    fn backends_of(&self, vip: &str) -> Vec<Ipv4Addr> {
        let Some(v) = self.services.data.get(&be(vip)) else {
            return Vec::new();
        };
        (0..v.backend_count)
            .map(|index| {
                let key = BackendKey {
                    service_id: v.service_id,
                    index,
                };
                crate::ebpf::ip_from_be(*self.backends.data.get(&key).expect("slot below count"))
            })
            .collect()
    }

    fn ops(&self) -> Vec<Op> {
        self.log.borrow().clone()
    }
}

fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    v.sort();
    v
}

#[test]
fn adds_services_with_distinct_ids_and_slots_before_count() {
    let mut m = Maps::new();
    let c = m
        .sync(&[
            ("10.96.0.1", &["10.1.0.2", "10.1.0.3"]),
            ("10.96.0.2", &["10.1.0.9"]),
        ])
        .unwrap();
    assert_eq!(c.added, 2);
    assert_eq!(
        m.backends_of("10.96.0.1"),
        vec![ip("10.1.0.2"), ip("10.1.0.3")]
    );
    assert_eq!(m.backends_of("10.96.0.2"), vec![ip("10.1.0.9")]);
    let ids: BTreeSet<u32> = m.services.data.values().map(|v| v.service_id).collect();
    assert_eq!(ids.len(), 2);
    // For each service, every BACKENDS insert comes before its SERVICES insert.
    let ops = m.ops();
    let first_service = ops
        .iter()
        .position(|o| matches!(o, Op::Insert(SERVICES_MAP, ..)))
        .unwrap();
    assert!(matches!(ops[0], Op::Insert(BACKENDS_MAP, ..)));
    assert!(
        first_service >= 2,
        "two slots written before the first count: {ops:?}"
    );
}

#[test]
fn same_desired_state_writes_nothing() {
    let mut m = Maps::new();
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.3"])]).unwrap();
    let c = m.sync(&[("10.96.0.1", &["10.1.0.3", "10.1.0.2"])]).unwrap();
    assert_eq!(c, ServiceChanges::default());
    assert!(m.ops().is_empty(), "{:?}", m.ops());
}

#[test]
fn growing_writes_slots_before_the_count() {
    let mut m = Maps::new();
    m.sync(&[("10.96.0.1", &["10.1.0.2"])]).unwrap();
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.3", "10.1.0.4"])])
        .unwrap();
    let ops = m.ops();
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert!(matches!(ops[0], Op::Insert(BACKENDS_MAP, ..)));
    assert!(matches!(ops[1], Op::Insert(BACKENDS_MAP, ..)));
    assert!(matches!(ops[2], Op::Insert(SERVICES_MAP, ..)));
    assert_eq!(
        m.backends_of("10.96.0.1"),
        vec![ip("10.1.0.2"), ip("10.1.0.3"), ip("10.1.0.4")]
    );
}

#[test]
fn shrinking_keeps_slots_of_survivors_and_removes_the_tail_after_the_count() {
    let mut m = Maps::new();
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.3", "10.1.0.4"])])
        .unwrap();
    // 10.1.0.3 (slot 1) goes: 10.1.0.4 moves into slot 1, the count drops, slot 2 goes.
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.4"])]).unwrap();
    let ops = m.ops();
    let svc = ops
        .iter()
        .position(|o| matches!(o, Op::Insert(SERVICES_MAP, ..)))
        .unwrap();
    let overwrite = ops
        .iter()
        .position(|o| matches!(o, Op::Insert(BACKENDS_MAP, ..)))
        .unwrap();
    let tail = ops
        .iter()
        .position(|o| matches!(o, Op::Remove(BACKENDS_MAP, ..)))
        .unwrap();
    assert!(overwrite < svc && svc < tail, "{ops:?}");
    assert_eq!(
        m.backends_of("10.96.0.1"),
        vec![ip("10.1.0.2"), ip("10.1.0.4")]
    );
    assert_eq!(m.backends.data.len(), 2);
}

#[test]
fn replacing_a_backend_touches_only_its_slot() {
    let mut m = Maps::new();
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.3"])]).unwrap();
    m.sync(&[("10.96.0.1", &["10.1.0.9", "10.1.0.3"])]).unwrap();
    assert_eq!(m.ops().len(), 1, "{:?}", m.ops());
    assert_eq!(
        m.backends_of("10.96.0.1"),
        vec![ip("10.1.0.9"), ip("10.1.0.3")]
    );
}

#[test]
fn no_backends_keeps_the_vip_with_count_zero() {
    let mut m = Maps::new();
    m.sync(&[("10.96.0.1", &["10.1.0.2"])]).unwrap();
    m.sync(&[("10.96.0.1", &[])]).unwrap();
    assert_eq!(m.services.data[&be("10.96.0.1")].backend_count, 0);
    assert!(m.backends.data.is_empty());
}

#[test]
fn removed_service_goes_count_first_and_its_id_is_reused() {
    let mut m = Maps::new();
    m.sync(&[("10.96.0.1", &["10.1.0.2"]), ("10.96.0.2", &["10.1.0.3"])])
        .unwrap();
    let old_id = m.services.data[&be("10.96.0.1")].service_id;
    let c = m
        .sync(&[("10.96.0.2", &["10.1.0.3"]), ("10.96.0.3", &["10.1.0.4"])])
        .unwrap();
    assert_eq!((c.added, c.removed), (1, 1));
    let ops = m.ops();
    assert!(matches!(ops[0], Op::Remove(SERVICES_MAP, ..)), "{ops:?}");
    assert!(matches!(ops[1], Op::Remove(BACKENDS_MAP, ..)), "{ops:?}");
    assert_eq!(m.services.data[&be("10.96.0.3")].service_id, old_id);
    assert_eq!(m.backends_of("10.96.0.3"), vec![ip("10.1.0.4")]);
    assert_eq!(m.backends_of("10.96.0.2"), vec![ip("10.1.0.3")]);
    assert_eq!(m.backends.data.len(), 2);
}

#[test]
fn duplicates_collapse_and_strays_are_cleaned() {
    let mut m = Maps::new();
    // A stray slot of an id no service uses, as an interrupted sync could leave.
    m.backends.data.insert(
        BackendKey {
            service_id: 7,
            index: 0,
        },
        be("10.1.0.7"),
    );
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.2", "10.1.0.3"])])
        .unwrap();
    assert_eq!(
        sorted(m.backends_of("10.96.0.1")),
        vec![ip("10.1.0.2"), ip("10.1.0.3")]
    );
    assert_eq!(m.backends.data.len(), 2);
}

#[test]
fn a_failed_write_is_reported_with_the_map_and_the_next_sync_repairs() {
    let mut m = Maps::new();
    m.backends.fail_after = Some(1);
    let err = m
        .sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.3"])])
        .unwrap_err();
    assert!(err.to_string().contains(BACKENDS_MAP), "{err}");
    // The count was never raised over the missing slot.
    assert!(m.services.data.is_empty());
    m.sync(&[("10.96.0.1", &["10.1.0.2", "10.1.0.3"])]).unwrap();
    assert_eq!(m.backends_of("10.96.0.1").len(), 2);
}

#[test]
fn too_many_services_is_refused_before_any_write() {
    let mut m = Maps::new();
    let desired: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> = (0..=MAX_SERVICES)
        .map(|i| (Ipv4Addr::from(0x0a60_0000 + i), Vec::new()))
        .collect();
    let err = sync_services(&mut m.services, &mut m.backends, &desired).unwrap_err();
    assert!(matches!(err, EbpfError::TooMany { .. }), "{err}");
    assert!(m.ops().is_empty());
}
