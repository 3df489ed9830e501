#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
use super::*;

const PID_A: MemoryOwner = MemoryOwner::Task(10);
const PID_B: MemoryOwner = MemoryOwner::Task(11);
const PID_C: MemoryOwner = MemoryOwner::Task(12);
const PID_EMPTY: MemoryOwner = MemoryOwner::Task(13);
const SHM: MemoryOwner = MemoryOwner::Shmem(5);

/// Whether an error is the one a corrupt image should give.
type ErrorCheck = fn(&PagesError) -> bool;

/// A synthetic address space: page → (lazy, content seed).
type Memory = BTreeMap<PageKey, (bool, u64)>;

fn key(owner: MemoryOwner, vaddr: u64) -> PageKey {
    PageKey { owner, vaddr }
}

/// Writes `memory` as CRIU would: one pagemap per owner (merged runs) and its pages
/// image. Pages ids start at 40 so that they differ from a store's.
fn write_dump(dir: &Path, owners: &[MemoryOwner], memory: &Memory) {
    fs::create_dir_all(dir).unwrap();
    for (index, owner) in owners.iter().enumerate() {
        let pages_id = 40 + index as u32;
        let mut runs = Vec::new();
        let mut pages = Vec::new();
        for (key, (lazy, seed)) in memory.iter().filter(|(key, _)| key.owner == *owner) {
            push_page_to_runs(&mut runs, key.vaddr, EntryKind::Present { lazy: *lazy });
            pages.extend_from_slice(&test_page(*seed)[..]);
        }
        fs::write(
            dir.join(owner.pagemap_file_name()),
            encode_pagemap(pages_id, &runs),
        )
        .unwrap();
        fs::write(dir.join(format!("pages-{pages_id}.img")), pages).unwrap();
    }
    // Other images of a dump are ignored.
    fs::write(dir.join("core-10.img"), b"not pages").unwrap();
}

fn collect(previous: &PageHashes, dir: &Path) -> (Vec<Change>, DeltaOutcome) {
    let mut delta = delta(previous, dir).unwrap();
    let changes: Vec<Change> = delta.by_ref().map(|change| change.unwrap()).collect();
    (changes, delta.finish().unwrap())
}

fn sent(owner: MemoryOwner, vaddr: u64, seed: u64) -> Change {
    Change::Page(Page {
        key: key(owner, vaddr),
        lazy: false,
        data: test_page(seed),
    })
}

fn dump_pages(dir: &Path) -> Vec<DumpPage> {
    read_dump(dir).unwrap().map(|page| page.unwrap()).collect()
}

/// Pagemap bytes from raw entries, for hand-made (odd or broken) images.
fn pagemap_bytes(pages_id: Option<u32>, entries: &[PagemapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    if let Some(pages_id) = pages_id {
        push_message(
            &mut out,
            &PagemapHead {
                pages_id: Some(pages_id),
            },
        );
    }
    for entry in entries {
        push_message(&mut out, entry);
    }
    out
}

fn entry(vaddr: u64, nr_pages: u64, flags: Option<u32>) -> PagemapEntry {
    PagemapEntry {
        vaddr: Some(vaddr),
        compat_nr_pages: Some(0),
        in_parent: None,
        flags,
        nr_pages: Some(nr_pages),
    }
}

#[test]
fn first_round_sends_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let memory: Memory = [
        (key(PID_A, 0x1000), (false, 1)),
        (key(PID_A, 0x2000), (false, 2)),
        (key(PID_A, 0x7000), (true, 3)),
        (key(SHM, 0), (false, 4)),
    ]
    .into();
    write_dump(dir.path(), &[PID_A, SHM], &memory);

    let (changes, outcome) = collect(&PageHashes::new(), dir.path());
    let lazy_page = Change::Page(Page {
        key: key(PID_A, 0x7000),
        lazy: true,
        data: test_page(3),
    });
    assert_eq!(
        changes,
        vec![
            Change::OwnerAdded(PID_A),
            sent(PID_A, 0x1000, 1),
            sent(PID_A, 0x2000, 2),
            lazy_page,
            Change::OwnerAdded(SHM),
            sent(SHM, 0, 4),
        ]
    );
    assert_eq!(
        outcome.stats,
        DeltaStats {
            pages_total: 4,
            pages_sent: 4,
            pages_new: 4,
            pages_unchanged: 0,
            pages_gone: 0,
            bytes_sent: 4 * PAGE_SIZE_U64,
        }
    );
    assert_eq!(outcome.hashes.len(), 4);
    assert_eq!(outcome.hashes.owners(), &[PID_A, SHM]);
    assert_eq!(
        outcome.hashes.get(&key(PID_A, 0x2000)),
        Some(page_digest(&test_page(2)))
    );
    assert_eq!(outcome.hashes.get(&key(PID_A, 0x3000)), None);
}

#[test]
fn second_round_sends_changed_and_new_pages_and_names_the_gone_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (round1, round2) = (dir.path().join("1"), dir.path().join("2"));
    let memory1: Memory = [
        (key(PID_A, 0x1000), (false, 1)),
        (key(PID_A, 0x2000), (false, 2)),
        (key(PID_A, 0x3000), (false, 3)),
        (key(PID_A, 0x5000), (false, 5)),
        (key(PID_A, 0x8000), (false, 8)),
        (key(PID_B, 0x1000), (false, 11)),
    ]
    .into();
    let memory2: Memory = [
        (key(PID_A, 0x1000), (false, 1)),   // unchanged
        (key(PID_A, 0x2000), (false, 22)),  // changed
        (key(PID_A, 0x5000), (false, 5)),   // unchanged; 0x3000 unmapped
        (key(PID_A, 0x6000), (false, 6)),   // new
        (key(PID_A, 0x8000), (true, 8)),    // same bytes, now lazy
        (key(PID_C, 0x4000), (false, 124)), // new process; PID_B exited
    ]
    .into();
    write_dump(&round1, &[PID_A, PID_B], &memory1);
    write_dump(&round2, &[PID_A, PID_C, PID_EMPTY], &memory2);

    let (_, first) = collect(&PageHashes::new(), &round1);
    let (changes, second) = collect(&first.hashes, &round2);
    assert_eq!(
        changes,
        vec![
            sent(PID_A, 0x2000, 22),
            Change::PageGone(key(PID_A, 0x3000)),
            sent(PID_A, 0x6000, 6),
            Change::Page(Page {
                key: key(PID_A, 0x8000),
                lazy: true,
                data: test_page(8),
            }),
            Change::OwnerGone(PID_B),
            Change::OwnerAdded(PID_C),
            sent(PID_C, 0x4000, 124),
            Change::OwnerAdded(PID_EMPTY),
        ]
    );
    assert_eq!(
        second.stats,
        DeltaStats {
            pages_total: 6,
            pages_sent: 4,
            pages_new: 2,
            pages_unchanged: 2,
            pages_gone: 2,
            bytes_sent: 4 * PAGE_SIZE_U64,
        }
    );
    assert_eq!(second.hashes.owners(), &[PID_A, PID_C, PID_EMPTY]);

    // Nothing changed: nothing is sent.
    let (changes, third) = collect(&second.hashes, &round2);
    assert_eq!(changes, vec![]);
    assert_eq!(third.stats.pages_unchanged, 6);
    assert_eq!(third.stats.bytes_sent, 0);
    assert_eq!(third.hashes, second.hashes);
    assert_eq!(
        PageHashes::of_dump(&PageHashes::new(), &round2).unwrap(),
        second.hashes
    );
}

#[test]
fn three_rounds_applied_on_the_store_rebuild_the_last_dump() {
    let dir = tempfile::tempdir().unwrap();
    let rounds = [
        dir.path().join("1"),
        dir.path().join("2"),
        dir.path().join("3"),
    ];
    let mut memory: Memory = Memory::new();
    for page in 0..64u64 {
        memory.insert(key(PID_A, 0x40_0000 + page * 0x1000), (page % 3 == 0, page));
    }
    for page in 0..8u64 {
        memory.insert(
            key(PID_B, 0x7f00_0000 + page * 0x2000),
            (false, 1000 + page),
        );
        memory.insert(key(SHM, page * 0x1000), (false, 2000 + page));
    }
    write_dump(&rounds[0], &[PID_A, PID_B, SHM], &memory);
    // Round 2: writes, an unmap in the middle of a run, a new mapping.
    for page in (0..64u64).step_by(5) {
        memory.insert(key(PID_A, 0x40_0000 + page * 0x1000), (false, 500 + page));
    }
    for page in 20..30u64 {
        memory.remove(&key(PID_A, 0x40_0000 + page * 0x1000));
    }
    for page in 0..4u64 {
        memory.insert(key(PID_A, 0x90_0000 + page * 0x1000), (false, 900 + page));
    }
    write_dump(&rounds[1], &[PID_A, PID_B, SHM], &memory);
    // Round 3: PID_B exits, PID_C appears, the hole is mapped again.
    memory.retain(|key, _| key.owner != PID_B);
    for page in 20..25u64 {
        memory.insert(key(PID_A, 0x40_0000 + page * 0x1000), (false, 700 + page));
    }
    memory.insert(key(PID_C, 0x1000), (false, 3000));
    memory.insert(key(SHM, 0x3000), (false, 3001));
    write_dump(&rounds[2], &[PID_A, PID_C, SHM], &memory);

    let store_dir = dir.path().join("store");
    let mut store = PageStore::create(&store_dir).unwrap();
    let mut hashes = PageHashes::new();
    let mut sent_per_round = Vec::new();
    let mut record = Vec::new();
    for round in &rounds {
        let (changes, outcome) = collect(&hashes, round);
        for change in &changes {
            // Through the record codec, as over the wire.
            record.clear();
            change.encode(&mut record);
            assert!(record.len() <= Change::MAX_ENCODED_LEN);
            store.apply(&Change::decode(&record).unwrap()).unwrap();
        }
        sent_per_round.push(outcome.stats.pages_sent);
        hashes = outcome.hashes;
    }
    assert_eq!(sent_per_round[0], 80);
    assert!(sent_per_round[1] < 30, "{sent_per_round:?}");
    assert!(sent_per_round[2] < 10, "{sent_per_round:?}");
    assert_eq!(store.page_count(), memory.len() as u64);
    // Freed slots are reused: the data file never held more pages than the largest round.
    let data_len = fs::metadata(store_dir.join(STORE_DATA_FILE)).unwrap().len();
    assert!(data_len <= 84 * PAGE_SIZE_U64, "{data_len}");

    let out = dir.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let written = store.write_images(&out).unwrap();
    assert_eq!(written.pages, memory.len() as u64);
    assert_eq!(written.files.len(), 6);

    // Same pages, same bytes, same flags as the last dump.
    assert_eq!(dump_pages(&out), dump_pages(&rounds[2]));
    // Same entries: sorted, contiguous pages of the same flags merged.
    for owner in [PID_A, PID_C, SHM] {
        let name = owner.pagemap_file_name();
        let ours = parse_pagemap(&out.join(&name), &fs::read(out.join(&name)).unwrap());
        let source = fs::read(rounds[2].join(&name)).unwrap();
        let source = parse_pagemap(&rounds[2].join(&name), &source).unwrap();
        assert_eq!(ours.unwrap().entries, source.entries, "{owner}");
    }
    assert!(!out.join(PID_B.pagemap_file_name()).exists());
}

#[test]
fn pages_in_the_parent_image_count_as_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let round1 = dir.path().join("1");
    let memory: Memory = (0..4u64)
        .map(|page| (key(PID_A, 0x1000 * (page + 1)), (false, page)))
        .collect();
    write_dump(&round1, &[PID_A], &memory);
    let (_, first) = collect(&PageHashes::new(), &round1);

    // A pre-dump chain's image: pages 1-2 and 4 in the parent, page 3 rewritten.
    let round2 = dir.path().join("2");
    fs::create_dir_all(&round2).unwrap();
    let entries = [
        PagemapEntry {
            in_parent: Some(true),
            flags: None,
            ..entry(0x1000, 2, None)
        },
        entry(0x3000, 1, Some(PE_PRESENT)),
        entry(0x4000, 1, Some(PE_PARENT)),
    ];
    fs::write(
        round2.join("pagemap-10.img"),
        pagemap_bytes(Some(7), &entries),
    )
    .unwrap();
    fs::write(round2.join("pages-7.img"), &test_page(33)[..]).unwrap();
    let (changes, second) = collect(&first.hashes, &round2);
    assert_eq!(changes, vec![sent(PID_A, 0x3000, 33)]);
    assert_eq!(second.stats.pages_unchanged, 3);
    assert_eq!(
        second.hashes.get(&key(PID_A, 0x1000)),
        first.hashes.get(&key(PID_A, 0x1000))
    );

    // Without a previous round the parent's pages are unknown.
    let empty = PageHashes::new();
    let mut delta = delta(&empty, &round2).unwrap();
    let errors: Vec<_> = delta.by_ref().filter_map(Result::err).collect();
    assert!(
        matches!(
            errors[..],
            [PagesError::ParentPageUnknown { vaddr: 0x1000, .. }]
        ),
        "{errors:?}"
    );
    assert!(matches!(delta.finish(), Err(PagesError::NotDrained { .. })));
}

#[test]
fn old_images_without_flags_or_the_64_bit_count_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let old = PagemapEntry {
        vaddr: Some(0x2000),
        compat_nr_pages: Some(2),
        in_parent: None,
        flags: None,
        nr_pages: None,
    };
    fs::write(
        dir.path().join("pagemap-10.img"),
        pagemap_bytes(Some(1), &[old]),
    )
    .unwrap();
    let mut pages = test_page(1).to_vec();
    pages.extend_from_slice(&test_page(2)[..]);
    fs::write(dir.path().join("pages-1.img"), pages).unwrap();
    let read = dump_pages(dir.path());
    let keys: Vec<_> = read.iter().map(|page| (page.key, page.lazy)).collect();
    assert_eq!(
        keys,
        vec![(key(PID_A, 0x2000), false), (key(PID_A, 0x3000), false)]
    );
    assert_eq!(read[1].content, PageContent::Bytes(test_page(2)));
}

#[test]
fn an_empty_pagemap_image_is_an_owner_without_pages() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pagemap-10.img"), pagemap_bytes(None, &[])).unwrap();
    let (changes, outcome) = collect(&PageHashes::new(), dir.path());
    assert_eq!(changes, vec![Change::OwnerAdded(PID_A)]);
    assert!(outcome.hashes.is_empty());
}

#[test]
fn corrupt_pagemaps_give_errors_naming_the_file() {
    let mut bad_common = pagemap_bytes(Some(1), &[]);
    bad_common[0] ^= 0xff;
    let mut inventory = pagemap_bytes(Some(1), &[]);
    inventory[4..8].copy_from_slice(&0x5831_3116u32.to_le_bytes());
    let head_only = pagemap_bytes(Some(1), &[]);
    let mut short_size = head_only.clone();
    short_size.extend_from_slice(&[5, 0]);
    let mut short_message = head_only.clone();
    short_message.extend_from_slice(&[10, 0, 0, 0, 8, 1]);
    let mut huge = head_only.clone();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut garbage = head_only.clone();
    garbage.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
    let mut no_pages_id = pagemap_bytes(None, &[]);
    no_pages_id.extend_from_slice(&[0, 0, 0, 0]);
    let no_vaddr = PagemapEntry {
        vaddr: None,
        ..entry(0, 1, Some(PE_PRESENT))
    };
    let no_count = PagemapEntry {
        compat_nr_pages: None,
        nr_pages: None,
        ..entry(0x1000, 1, Some(PE_PRESENT))
    };
    let cases: Vec<(&str, Vec<u8>, ErrorCheck)> = vec![
        ("common magic", bad_common, |e| {
            matches!(e, PagesError::BadMagic { what: "common", .. })
        }),
        ("pagemap magic", inventory, |e| {
            matches!(
                e,
                PagesError::BadMagic {
                    what: "pagemap",
                    found: 0x5831_3116,
                    ..
                }
            )
        }),
        ("short header", vec![0x19, 0x43, 0x56], |e| {
            matches!(e, PagesError::Truncated { offset: 0, .. })
        }),
        ("short size", short_size, |e| {
            matches!(
                e,
                PagesError::Truncated {
                    what: "message size",
                    ..
                }
            )
        }),
        ("short message", short_message, |e| {
            matches!(
                e,
                PagesError::Truncated {
                    what: "pagemap entry",
                    ..
                }
            )
        }),
        ("huge message", huge, |e| {
            matches!(e, PagesError::MessageTooLarge { size: u32::MAX, .. })
        }),
        ("garbage", garbage, |e| {
            matches!(e, PagesError::Decode { .. })
        }),
        ("no pages_id", no_pages_id, |e| {
            matches!(
                e,
                PagesError::MissingField {
                    field: "pages_id",
                    ..
                }
            )
        }),
        ("no vaddr", pagemap_bytes(Some(1), &[no_vaddr]), |e| {
            matches!(e, PagesError::MissingField { field: "vaddr", .. })
        }),
        ("no count", pagemap_bytes(Some(1), &[no_count]), |e| {
            matches!(
                e,
                PagesError::MissingField {
                    field: "nr_pages",
                    ..
                }
            )
        }),
        (
            "unaligned",
            pagemap_bytes(Some(1), &[entry(0x1234, 1, Some(PE_PRESENT))]),
            |e| matches!(e, PagesError::BadEntry { vaddr: 0x1234, .. }),
        ),
        (
            "empty entry",
            pagemap_bytes(Some(1), &[entry(0x1000, 0, Some(PE_PRESENT))]),
            |e| {
                matches!(
                    e,
                    PagesError::BadEntry {
                        reason: "no pages",
                        ..
                    }
                )
            },
        ),
        (
            "overflow",
            pagemap_bytes(
                Some(1),
                &[entry(0xffff_ffff_ffff_f000, 2, Some(PE_PRESENT))],
            ),
            |e| matches!(e, PagesError::BadEntry { .. }),
        ),
        (
            "overlap",
            pagemap_bytes(
                Some(1),
                &[
                    entry(0x1000, 2, Some(PE_PARENT)),
                    entry(0x2000, 1, Some(PE_PARENT)),
                ],
            ),
            |e| matches!(e, PagesError::BadEntry { vaddr: 0x2000, .. }),
        ),
        (
            "unknown flags",
            pagemap_bytes(Some(1), &[entry(0x1000, 1, Some(PE_PRESENT | 8))]),
            |e| matches!(e, PagesError::UnknownFlags { flags: 12, .. }),
        ),
        (
            "lazy only",
            pagemap_bytes(Some(1), &[entry(0x1000, 1, Some(PE_LAZY))]),
            |e| matches!(e, PagesError::NotInImage { .. }),
        ),
        (
            "present and parent",
            pagemap_bytes(Some(1), &[entry(0x1000, 1, Some(PE_PRESENT | PE_PARENT))]),
            |e| matches!(e, PagesError::BadEntry { .. }),
        ),
    ];
    for (name, bytes, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pagemap-10.img");
        fs::write(&path, bytes).unwrap();
        let err = match read_dump(dir.path()) {
            Ok(_) => panic!("{name}: corrupt pagemap accepted"),
            Err(err) => err,
        };
        assert!(expected(&err), "{name}: unexpected error {err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&*path.to_string_lossy()),
            "{name}: {message}"
        );
    }
}

#[test]
fn missing_short_or_shared_pages_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pagemap = pagemap_bytes(Some(3), &[entry(0x1000, 2, Some(PE_PRESENT))]);
    fs::write(dir.path().join("pagemap-10.img"), &pagemap).unwrap();
    let pages_path = dir.path().join("pages-3.img");
    assert!(matches!(
        read_dump(dir.path()),
        Err(PagesError::Io { path, .. }) if path == pages_path
    ));

    fs::write(&pages_path, &test_page(1)[..]).unwrap();
    let err = read_dump(dir.path()).err().unwrap();
    assert!(
        matches!(
            &err,
            PagesError::PagesSize { expected: 8192, found: 4096, path } if *path == pages_path
        ),
        "{err:?}"
    );

    // Truncated after the check (the dump changed under us): an error, then the end.
    let mut both = test_page(1).to_vec();
    both.extend_from_slice(&test_page(2)[..]);
    fs::write(&pages_path, &both).unwrap();
    let mut pages = read_dump(dir.path()).unwrap();
    File::options()
        .write(true)
        .open(&pages_path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert!(pages.next().unwrap().is_ok());
    let err = pages.next().unwrap().err().unwrap();
    assert!(
        matches!(
            &err,
            PagesError::Truncated {
                offset: 4096,
                what: "page data",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(pages.next().is_none());

    fs::write(&pages_path, &both).unwrap();
    fs::write(dir.path().join("pagemap-11.img"), &pagemap).unwrap();
    assert!(matches!(
        read_dump(dir.path()),
        Err(PagesError::DuplicatePagesId { pages_id: 3, .. })
    ));
    fs::remove_file(dir.path().join("pagemap-11.img")).unwrap();
    fs::write(dir.path().join("pagemap-010.img"), &pagemap).unwrap();
    // A non-canonical number is not a pagemap name; the dump reads as before.
    assert_eq!(dump_pages(dir.path()).len(), 2);
}

#[test]
fn the_store_refuses_changes_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = PageStore::create(dir.path()).unwrap();
    let err = store.apply(&sent(PID_A, 0x1000, 1)).err().unwrap();
    assert!(matches!(err, PagesError::Inconsistent { .. }), "{err:?}");
    assert!(err.to_string().contains("pid 10 page 0x1000"), "{err}");
    store.apply(&Change::OwnerAdded(PID_A)).unwrap();
    assert!(store.apply(&Change::OwnerAdded(PID_A)).is_err());
    assert!(store.apply(&Change::PageGone(key(PID_A, 0x1000))).is_err());
    assert!(store.apply(&Change::OwnerGone(PID_B)).is_err());
    store.apply(&sent(PID_A, 0x1000, 1)).unwrap();
    store.apply(&Change::OwnerGone(PID_A)).unwrap();
    assert_eq!(store.page_count(), 0);
    assert!(store.owners().is_empty());
}

#[test]
fn a_delta_cannot_finish_with_unread_changes() {
    let dir = tempfile::tempdir().unwrap();
    write_dump(dir.path(), &[PID_A], &[(key(PID_A, 0), (false, 1))].into());
    let empty = PageHashes::new();
    let mut delta = delta(&empty, dir.path()).unwrap();
    assert!(delta.next().is_some());
    assert!(matches!(
        delta.finish(),
        Err(PagesError::NotDrained {
            reason: "changes are left unread",
            ..
        })
    ));
}

#[test]
fn change_records_round_trip_and_reject_garbage() {
    let changes = [
        Change::OwnerAdded(MemoryOwner::Task(u32::MAX)),
        Change::OwnerGone(MemoryOwner::Shmem(u64::MAX)),
        Change::PageGone(key(PID_A, 0x7fff_ffff_f000)),
        Change::Page(Page {
            key: key(SHM, 0x1000),
            lazy: true,
            data: test_page(9),
        }),
    ];
    for change in &changes {
        let mut record = Vec::new();
        change.encode(&mut record);
        assert_eq!(&Change::decode(&record).unwrap(), change);
        let mut short = record.clone();
        short.pop();
        assert!(matches!(
            Change::decode(&short),
            Err(PagesError::BadRecord { .. })
        ));
    }
    let mut record = Vec::new();
    Change::PageGone(key(PID_A, 0x1000)).encode(&mut record);
    record[10] = 0x01; // vaddr 0x1001
    assert!(Change::decode(&record).is_err());
    record[0] = 99;
    assert!(Change::decode(&record).is_err());
    assert!(Change::decode(&[]).is_err());
    let mut task = Vec::new();
    Change::OwnerAdded(MemoryOwner::Shmem(u64::MAX)).encode(&mut task);
    task[1] = OWNER_TASK;
    assert!(Change::decode(&task).is_err());
}

#[test]
fn page_image_names() {
    assert_eq!(
        MemoryOwner::from_pagemap_file_name("pagemap-1.img"),
        Some(MemoryOwner::Task(1))
    );
    assert_eq!(
        MemoryOwner::from_pagemap_file_name("pagemap-shmem-12345.img"),
        Some(MemoryOwner::Shmem(12345))
    );
    for other in [
        "pagemap-.img",
        "pagemap-01.img",
        "pagemap-+1.img",
        "pagemap-4294967296.img",
        "pagemap-1.img.tmp",
        "pages-1.img",
    ] {
        assert_eq!(MemoryOwner::from_pagemap_file_name(other), None, "{other}");
    }
    for owner in [MemoryOwner::Task(7), MemoryOwner::Shmem(9)] {
        let name = owner.pagemap_file_name();
        assert_eq!(MemoryOwner::from_pagemap_file_name(&name), Some(owner));
    }
    assert!(is_page_image("pages-3.img"));
    assert!(is_page_image("pagemap-shmem-3.img"));
    assert!(!is_page_image("pages-x.img"));
    assert!(!is_page_image("core-3.img"));
    assert!(!is_page_image("mm-3.img"));
}

/// CRIU for the real test: root and a CRIU binary are needed (CRIU ≥ 4.2 on these
/// kernels, see ENVIRONMENT.md); `None`, and the test skips, when either is missing.
fn criu_for_tests() -> Option<PathBuf> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the real CRIU test needs root");
        return None;
    }
    let installed = PathBuf::from("/usr/local/sbin/criu");
    if installed.exists() {
        return Some(installed);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("criu"))
            .find(|candidate| candidate.exists())
    });
    if found.is_none() {
        eprintln!("skipped: no criu in /usr/local/sbin or PATH");
    }
    found
}

/// Kills a process on drop, so a failing test leaves no `sleep` behind.
struct KillOnDrop {
    pid: i32,
    child: Option<std::process::Child>,
}

impl KillOnDrop {
    fn kill_and_reap(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn run_criu(criu: &Path, args: &[&str], dir: &Path, log: &str) {
    let status = std::process::Command::new(criu)
        .args(args)
        .arg("-D")
        .arg(dir)
        .arg("-o")
        .arg(log)
        .status()
        .unwrap();
    if !status.success() {
        let log = fs::read_to_string(dir.join(log)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!("criu {args:?} failed ({status}):\n{}", tail.join("\n"));
    }
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()
}

/// Dumps a running `sleep` twice with `criu dump --leave-running`, moves the deltas into a
/// store, and restores the process with `criu restore` from the store's images plus the
/// rest of the last dump; then dumps the restored process and checks its memory is the one
/// written.
#[test]
fn real_criu_restores_from_the_store_images() {
    let Some(criu) = criu_for_tests() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new("setsid")
        .args(["sleep", "1000"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let mut original = KillOnDrop {
        pid,
        child: Some(child),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while comm(pid) != "sleep\n" {
        assert!(std::time::Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let pid_arg = pid.to_string();
    let store_dir = dir.path().join("store");
    let mut store = PageStore::create(&store_dir).unwrap();
    let mut hashes = PageHashes::new();
    let mut stats = Vec::new();
    let rounds = [dir.path().join("1"), dir.path().join("2")];
    for round in &rounds {
        fs::create_dir_all(round).unwrap();
        let args = ["dump", "--leave-running", "-t", &pid_arg];
        run_criu(&criu, &args, round, "dump.log");
        let mut delta = delta(&hashes, round).unwrap();
        for change in delta.by_ref() {
            store.apply(&change.unwrap()).unwrap();
        }
        let outcome = delta.finish().unwrap();
        stats.push(outcome.stats);
        hashes = outcome.hashes;
    }
    eprintln!("criu rounds: {stats:?}");
    assert!(stats[0].pages_total > 0);
    assert_eq!(stats[0].pages_sent, stats[0].pages_total);
    assert!(
        stats[1].pages_sent * 2 < stats[1].pages_total,
        "a sleeping process changed most of its pages: {stats:?}"
    );

    let out = dir.path().join("out");
    fs::create_dir_all(&out).unwrap();
    for entry in fs::read_dir(&rounds[1]).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !is_page_image(&name) && !name.ends_with(".log") {
            fs::copy(entry.path(), out.join(&name)).unwrap();
        }
    }
    store.write_images(&out).unwrap();
    assert_eq!(dump_pages(&out), dump_pages(&rounds[1]));

    // Restoring needs the PID free: the original is our child, so it is reaped now.
    original.kill_and_reap();
    run_criu(&criu, &["restore", "-d"], &out, "restore.log");
    let _restored = KillOnDrop { pid, child: None };
    assert_eq!(comm(pid), "sleep\n");

    let after = dir.path().join("after");
    fs::create_dir_all(&after).unwrap();
    run_criu(
        &criu,
        &["dump", "--leave-running", "-t", &pid_arg],
        &after,
        "dump.log",
    );
    let (_, restored) = collect(&hashes, &after);
    eprintln!(
        "restored process against the last round: {:?}",
        restored.stats
    );
    assert!(
        restored.stats.pages_unchanged * 10 >= restored.stats.pages_total * 9,
        "the restored memory differs from the images: {:?}",
        restored.stats
    );
}
