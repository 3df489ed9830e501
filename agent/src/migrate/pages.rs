//! Incremental page deltas for pre-copy migration.
//!
//! These kernels have no soft-dirty tracking, so every `criu dump --leave-running` writes all of
//! the container's memory. Between rounds only pages whose content changed may cross the wire:
//! the source hashes every page of each round's dump ([`PageHashes`]) and [`delta`] streams the
//! pages that differ from the previous round, plus the pages (and processes) that went away. The
//! target keeps the pages it received in a [`PageStore`] on disk and, once the final (frozen)
//! round is applied, writes a `pagemap-*.img` + `pages-*.img` pair per process that `criu
//! restore` reads as if CRIU had written it.
//!
//! CRIU's image format, as read from CRIU's sources (`criu/image.c`, `criu/protobuf.c`,
//! `criu/pagemap.c`, `criu/page-xfer.c`, `images/pagemap.proto`, `criu/include/magic.h`):
//! - `pagemap-<pid>.img` (and `pagemap-shmem-<shmid>.img` for shared anonymous memory) starts
//!   with two little-endian `u32`s, `IMG_COMMON_MAGIC` then `PAGEMAP_MAGIC`, followed by
//!   protobuf messages each preceded by its `u32` size: one `PagemapHead {pages_id}`, then
//!   `PagemapEntry {vaddr, compat_nr_pages, in_parent?, flags?, nr_pages?}` sorted by address. A
//!   file holding only the magic is an empty image (no pages at all).
//! - `pages-<pages_id>.img` is a raw image (no magic): 4 KiB pages in pagemap order, only for
//!   the entries flagged `PE_PRESENT`. `PE_PARENT` pages live in the parent images
//!   (`--prev-images-dir`, pre-dump chains on soft-dirty kernels): they are unchanged since the
//!   parent round. `PE_LAZY` marks pages a lazy-pages restore may fault in later.
//! - CRIU 4.2 moved the page count to the 64-bit field 5 and writes 0 in the old field 2;
//!   older CRIUs only write field 2. Entries without flags are old images' present pages.
//!
//! Architecture invariant: page contents are streamed through fixed-size buffers and spilled to
//! disk on the target; only per-page indexes (about 50 bytes a page) are held in memory, so a
//! 1 GiB dump never sits in RAM.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

/// Size of one memory page in CRIU's images (x86_64 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;

const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// `IMG_COMMON_MAGIC`: first `u32` of every CRIU image except inventory and raw images.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `PAGEMAP_MAGIC` (also `SHMEM_PAGEMAP_MAGIC`): second `u32` of a pagemap image.
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Pages are in the parent snapshot, not in this image.
const PE_PARENT: u32 = 1 << 0;
/// Pages can be restored lazily (userfaultfd).
const PE_LAZY: u32 = 1 << 1;
/// Pages are present in `pages-<id>.img`.
const PE_PRESENT: u32 = 1 << 2;

/// A pagemap message is a handful of varints; anything larger is corruption, and refusing it
/// keeps a corrupt size prefix from allocating gigabytes.
const MAX_MESSAGE_SIZE: u32 = 4096;

/// Buffer for streaming pages files: large enough that reads are sequential and cheap.
const PAGES_READ_BUFFER: usize = 256 * 1024;

/// Pages of one run must fit the old 32-bit `compat_nr_pages` field so that CRIUs older than
/// 4.2 (which only read that field) restore the images too.
const MAX_RUN_PAGES: u64 = u32::MAX as u64;

/// Name of the file holding the page bytes inside a [`PageStore`] directory.
const STORE_DATA_FILE: &str = "pages.data";

/// Errors of reading CRIU page images, computing deltas and keeping the target's page store.
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The image does not start with the magic numbers of a pagemap image.
    #[error("{}: not a criu pagemap image: {what} magic is {found:#010x}, expected {expected:#010x}", path.display())]
    BadMagic {
        /// The image.
        path: PathBuf,
        /// Which magic (`common` or `pagemap`).
        what: &'static str,
        /// The magic found.
        found: u32,
        /// The magic CRIU writes.
        expected: u32,
    },
    /// The image ends in the middle of something.
    #[error("{}: truncated at byte {offset}: {what} incomplete", path.display())]
    Truncated {
        /// The image.
        path: PathBuf,
        /// Where the incomplete part starts.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A size prefix announces a message far larger than any pagemap message.
    #[error("{}: message at byte {offset} claims {size} bytes (at most {MAX_MESSAGE_SIZE} expected)", path.display())]
    MessageTooLarge {
        /// The image.
        path: PathBuf,
        /// Where the size prefix is.
        offset: u64,
        /// The size it announces.
        size: u32,
    },
    /// A message is not valid protobuf.
    #[error("{}: cannot decode {what} at byte {offset}: {source}", path.display())]
    Decode {
        /// The image.
        path: PathBuf,
        /// Where the message starts.
        offset: u64,
        /// Which message.
        what: &'static str,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
    /// A message lacks a field CRIU always writes.
    #[error("{}: {what} at byte {offset} has no {field}", path.display())]
    MissingField {
        /// The image.
        path: PathBuf,
        /// Where the message starts.
        offset: u64,
        /// Which message.
        what: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A pagemap entry is inconsistent (unaligned, empty, overlapping, overflowing).
    #[error("{}: bad pagemap entry at {vaddr:#x}: {reason}", path.display())]
    BadEntry {
        /// The image.
        path: PathBuf,
        /// The entry's address.
        vaddr: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A pagemap entry carries flags this code does not know.
    #[error("{}: pagemap entry at {vaddr:#x} has unknown flags {flags:#x}", path.display())]
    UnknownFlags {
        /// The image.
        path: PathBuf,
        /// The entry's address.
        vaddr: u64,
        /// All of its flags.
        flags: u32,
    },
    /// A pagemap entry's pages are neither in this image nor in a parent (lazy-only pages of a
    /// `--lazy-pages` dump, or old zero-page entries): this dump cannot be diffed.
    #[error("{}: pages at {vaddr:#x} (flags {flags:#x}) are not in the image", path.display())]
    NotInImage {
        /// The image.
        path: PathBuf,
        /// The entry's address.
        vaddr: u64,
        /// Its flags.
        flags: u32,
    },
    /// A page is marked as in the parent image but the previous round did not have it.
    #[error("{}: page {vaddr:#x} is in the parent image but the previous round has no such page", path.display())]
    ParentPageUnknown {
        /// The pagemap image.
        path: PathBuf,
        /// The page's address.
        vaddr: u64,
    },
    /// The pages image is not as long as its pagemap says.
    #[error("{}: {found} bytes, but the pagemap describes {expected}", path.display())]
    PagesSize {
        /// The pages image.
        path: PathBuf,
        /// Bytes the pagemap's present pages need.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// Two pagemaps name the same pages image.
    #[error("{}: pages image {pages_id} is also used by another pagemap", path.display())]
    DuplicatePagesId {
        /// The second pagemap naming it.
        path: PathBuf,
        /// The pages image id.
        pages_id: u32,
    },
    /// Two pagemap files name the same process or segment (e.g. `pagemap-7.img` and
    /// `pagemap-07.img`).
    #[error("{}: {owner} has two pagemap images", path.display())]
    DuplicateOwner {
        /// The dump directory.
        path: PathBuf,
        /// The process or segment.
        owner: MemoryOwner,
    },
    /// A change does not fit the store's state: the delta stream is out of order or a round
    /// was skipped.
    #[error("{}: cannot apply change: {reason} ({what})", path.display())]
    Inconsistent {
        /// The store directory.
        path: PathBuf,
        /// What went wrong.
        reason: &'static str,
        /// The owner or page concerned.
        what: String,
    },
    /// [`Delta::finish`] was called on a delta that failed or still has changes to read
    /// (they would be lost).
    #[error("{}: delta cannot finish: {reason}", path.display())]
    NotDrained {
        /// The dump directory.
        path: PathBuf,
        /// Failed, or changes left unread.
        reason: &'static str,
    },
    /// An encoded change record is malformed.
    #[error("bad page change record ({len} bytes): {reason}")]
    BadRecord {
        /// The record's length.
        len: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The store has more processes than CRIU's 32-bit pages image ids can name.
    #[error("{}: too many pagemaps to number their pages images", path.display())]
    TooManyOwners {
        /// The output directory.
        path: PathBuf,
    },
}

/// Whose memory a pagemap describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemoryOwner {
    /// A task's private memory: `pagemap-<pid>.img`.
    Task(u32),
    /// A shared anonymous memory segment: `pagemap-shmem-<shmid>.img`.
    Shmem(u64),
}

/// One page of one owner: the unit that is hashed, sent and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageKey {
    /// The process or segment.
    pub owner: MemoryOwner,
    /// The page's address (page-aligned).
    pub vaddr: u64,
}

/// One page read from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpPage {
    /// Which page.
    pub key: PageKey,
    /// CRIU marked it `PE_LAZY` (may be faulted in by a lazy-pages restore).
    pub lazy: bool,
    /// Its content.
    pub content: PageContent,
}

/// What a dump holds for a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageContent {
    /// The page's bytes.
    Bytes(Box<[u8; PAGE_SIZE]>),
    /// The page is in the parent images: unchanged since the parent dump (soft-dirty kernels).
    InParent,
}

/// A page to send: changed or new since the previous round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Which page.
    pub key: PageKey,
    /// CRIU marked it `PE_LAZY`.
    pub lazy: bool,
    /// Its bytes.
    pub data: Box<[u8; PAGE_SIZE]>,
}

/// One change between two rounds, in the order the target must apply them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A process or segment appeared: it comes before any of its pages.
    OwnerAdded(MemoryOwner),
    /// A process or segment is gone with all its pages.
    OwnerGone(MemoryOwner),
    /// A page is new or its content changed.
    Page(Page),
    /// A page of a still-present owner is no longer mapped.
    PageGone(PageKey),
}

/// Counters of one round, for the migration job's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Pages in this round's dump.
    pub pages_total: u64,
    /// Pages sent ([`Change::Page`]): new plus changed.
    pub pages_sent: u64,
    /// Of `pages_sent`, pages the previous round did not have.
    pub pages_new: u64,
    /// Pages equal to the previous round's, not sent.
    pub pages_unchanged: u64,
    /// Pages of the previous round that are gone (individually or with their owner).
    pub pages_gone: u64,
    /// Page bytes sent (`pages_sent * PAGE_SIZE`; the wire's framing is not counted).
    pub bytes_sent: u64,
}

/// Content hashes of every page of one round's dump, kept by the source for the next round.
///
/// A hash is the first 128 bits of the page's SHA-256: a false match would silently leave a
/// stale page in the migrated memory, so the hash must resist collisions even for contents a
/// tenant of the container chooses. `sha2` is already a dependency and uses the SHA-NI
/// instructions where the CPU has them (about 1.7 GB/s a core here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageHashes {
    owners: Vec<MemoryOwner>,
    pages: Vec<HashedPage>,
}

/// Result of a drained [`Delta`].
#[derive(Debug, Clone)]
pub struct DeltaOutcome {
    /// Hashes of this round's dump, to diff the next round against.
    pub hashes: PageHashes,
    /// This round's figures.
    pub stats: DeltaStats,
}

/// Streaming reader of the pages of a CRIU dump directory, in (owner, address) order.
///
/// Pagemaps are parsed and checked against their pages images when opened; page bytes are
/// read one page at a time through a buffered reader.
pub struct DumpPages {
    dir: PathBuf,
    maps: Vec<OwnerMap>,
    next_map: usize,
    cursor: Option<PageCursor>,
    failed: bool,
}

/// Streaming delta of one round's dump against the previous round's hashes: an iterator of
/// [`Change`]s, then [`Delta::finish`] for the new hashes and the figures.
pub struct Delta<'a> {
    previous: &'a PageHashes,
    dump: DumpPages,
    new_owners: Vec<MemoryOwner>,
    prev_owner: usize,
    new_owner: usize,
    prev_page: usize,
    lookahead: Option<DumpPage>,
    dump_done: bool,
    failed: bool,
    hashes: Vec<HashedPage>,
    stats: DeltaStats,
}

/// The target's copy of the migrating memory: page bytes in one file under a directory, their
/// index in memory. Apply each round's changes in order, then [`PageStore::write_images`].
///
/// The store does not survive a restart of the agent: a migration whose target agent dies
/// fails and starts over.
pub struct PageStore {
    dir: PathBuf,
    data: File,
    owners: BTreeSet<MemoryOwner>,
    slots: BTreeMap<PageKey, Slot>,
    free: Vec<u64>,
    next_slot: u64,
}

/// What [`PageStore::write_images`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrittenImages {
    /// The pagemap and pages images, in the order written.
    pub files: Vec<PathBuf>,
    /// Pages written in all pages images.
    pub pages: u64,
}

/// CRIU's `pagemap_head` message.
#[derive(Clone, PartialEq, prost::Message)]
struct PagemapHead {
    #[prost(uint32, optional, tag = "1")]
    pages_id: Option<u32>,
}

/// CRIU's `pagemap_entry` message. Fields CRIU declares `required` are `optional` here so that
/// their absence is reported instead of silently read as zero; on the wire both are the same.
#[derive(Clone, PartialEq, prost::Message)]
struct PagemapEntry {
    #[prost(uint64, optional, tag = "1")]
    vaddr: Option<u64>,
    #[prost(uint32, optional, tag = "2")]
    compat_nr_pages: Option<u32>,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HashedPage {
    key: PageKey,
    digest: [u8; 16],
    lazy: bool,
}

/// A parsed pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapEntry {
    vaddr: u64,
    nr_pages: u64,
    kind: EntryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Present { lazy: bool },
    InParent,
}

/// A parsed pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pagemap {
    /// `None` for an empty image (magic only).
    pages_id: Option<u32>,
    entries: Vec<MapEntry>,
}

/// One owner's pagemap, parsed and checked, ready to stream.
struct OwnerMap {
    owner: MemoryOwner,
    pages_path: PathBuf,
    entries: Vec<MapEntry>,
    present_pages: u64,
}

struct PageCursor {
    map: usize,
    entry: usize,
    page: u64,
    reader: Option<BufReader<File>>,
    offset: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u64,
    lazy: bool,
}

impl MemoryOwner {
    /// The pagemap image's file name for this owner.
    pub fn pagemap_file_name(&self) -> String {
        match self {
            MemoryOwner::Task(pid) => format!("pagemap-{pid}.img"),
            MemoryOwner::Shmem(id) => format!("pagemap-shmem-{id}.img"),
        }
    }

    /// Parses a pagemap image's file name; `None` for any other file.
    pub fn from_pagemap_file_name(name: &str) -> Option<MemoryOwner> {
        let stem = name.strip_prefix("pagemap-")?.strip_suffix(".img")?;
        match stem.strip_prefix("shmem-") {
            Some(id) => parse_decimal(id).map(MemoryOwner::Shmem),
            None => parse_decimal(stem)
                .and_then(|pid| u32::try_from(pid).ok())
                .map(MemoryOwner::Task),
        }
    }
}

impl fmt::Display for MemoryOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryOwner::Task(pid) => write!(f, "pid {pid}"),
            MemoryOwner::Shmem(id) => write!(f, "shmem {id}"),
        }
    }
}

impl fmt::Display for PageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} page {:#x}", self.owner, self.vaddr)
    }
}

/// Whether a file of a CRIU dump directory holds pages (`pagemap-*.img`, `pages-*.img`): those
/// travel as deltas, and a [`PageStore`] writes their replacements, so transfers of the other
/// image files skip them.
pub fn is_page_image(file_name: &str) -> bool {
    MemoryOwner::from_pagemap_file_name(file_name).is_some()
        || file_name
            .strip_prefix("pages-")
            .and_then(|rest| rest.strip_suffix(".img"))
            .is_some_and(|id| parse_decimal(id).is_some())
}

impl Page {
    /// A page from bytes received off the wire; `None` unless `data` is exactly one page.
    pub fn from_slice(key: PageKey, lazy: bool, data: &[u8]) -> Option<Page> {
        let data: Box<[u8; PAGE_SIZE]> = data.to_vec().into_boxed_slice().try_into().ok()?;
        Some(Page { key, lazy, data })
    }
}

/// Record tags of [`Change::encode`].
const TAG_OWNER_ADDED: u8 = 1;
const TAG_OWNER_GONE: u8 = 2;
const TAG_PAGE: u8 = 3;
const TAG_PAGE_GONE: u8 = 4;
const OWNER_TASK: u8 = 1;
const OWNER_SHMEM: u8 = 2;
const RECORD_OWNER_LEN: usize = 1 + 1 + 8;
const RECORD_PAGE_GONE_LEN: usize = RECORD_OWNER_LEN + 8;
const RECORD_PAGE_LEN: usize = RECORD_PAGE_GONE_LEN + 1 + PAGE_SIZE;

impl Change {
    /// The longest record [`Change::encode`] writes (a page with its header).
    pub const MAX_ENCODED_LEN: usize = RECORD_PAGE_LEN;

    /// Appends this change as a self-contained record: tag `u8`, owner kind `u8`, owner id
    /// `u64` LE, then for pages the address `u64` LE, and for sent pages a flags `u8` (bit 0:
    /// lazy) and the 4096 bytes. Framing and checksums are the wire's job.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (tag, owner) = match self {
            Change::OwnerAdded(owner) => (TAG_OWNER_ADDED, *owner),
            Change::OwnerGone(owner) => (TAG_OWNER_GONE, *owner),
            Change::Page(page) => (TAG_PAGE, page.key.owner),
            Change::PageGone(key) => (TAG_PAGE_GONE, key.owner),
        };
        out.push(tag);
        match owner {
            MemoryOwner::Task(pid) => {
                out.push(OWNER_TASK);
                out.extend_from_slice(&u64::from(pid).to_le_bytes());
            }
            MemoryOwner::Shmem(id) => {
                out.push(OWNER_SHMEM);
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        match self {
            Change::OwnerAdded(_) | Change::OwnerGone(_) => {}
            Change::PageGone(key) => out.extend_from_slice(&key.vaddr.to_le_bytes()),
            Change::Page(page) => {
                out.extend_from_slice(&page.key.vaddr.to_le_bytes());
                out.push(u8::from(page.lazy));
                out.extend_from_slice(&page.data[..]);
            }
        }
    }

    /// Parses one record written by [`Change::encode`].
    pub fn decode(record: &[u8]) -> Result<Change, PagesError> {
        let bad = |reason| PagesError::BadRecord {
            len: record.len(),
            reason,
        };
        let (&tag, rest) = record.split_first().ok_or(bad("empty"))?;
        let expected_len = match tag {
            TAG_OWNER_ADDED | TAG_OWNER_GONE => RECORD_OWNER_LEN,
            TAG_PAGE_GONE => RECORD_PAGE_GONE_LEN,
            TAG_PAGE => RECORD_PAGE_LEN,
            _ => return Err(bad("unknown tag")),
        };
        if record.len() != expected_len {
            return Err(bad("wrong length for its tag"));
        }
        let owner_id = read_u64_le(&rest[1..9]);
        let owner = match rest[0] {
            OWNER_TASK => MemoryOwner::Task(
                u32::try_from(owner_id).map_err(|_| bad("pid does not fit 32 bits"))?,
            ),
            OWNER_SHMEM => MemoryOwner::Shmem(owner_id),
            _ => return Err(bad("unknown owner kind")),
        };
        let rest = &rest[9..];
        Ok(match tag {
            TAG_OWNER_ADDED => Change::OwnerAdded(owner),
            TAG_OWNER_GONE => Change::OwnerGone(owner),
            _ => {
                let key = PageKey {
                    owner,
                    vaddr: read_u64_le(&rest[..8]),
                };
                if !key.vaddr.is_multiple_of(PAGE_SIZE_U64) {
                    return Err(bad("unaligned page address"));
                }
                if tag == TAG_PAGE_GONE {
                    Change::PageGone(key)
                } else {
                    let lazy = match rest[8] {
                        0 => false,
                        1 => true,
                        _ => return Err(bad("unknown page flags")),
                    };
                    let page = Page::from_slice(key, lazy, &rest[9..])
                        .ok_or(bad("page is not 4096 bytes"))?;
                    Change::Page(page)
                }
            }
        })
    }
}

impl PageHashes {
    /// No pages: what the first round is diffed against (every page is new).
    pub fn new() -> PageHashes {
        PageHashes::default()
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The processes and segments of the dump, sorted.
    pub fn owners(&self) -> &[MemoryOwner] {
        &self.owners
    }

    /// The 128-bit content hash of a page, if the dump had it.
    pub fn get(&self, key: &PageKey) -> Option<[u8; 16]> {
        self.pages
            .binary_search_by(|page| page.key.cmp(key))
            .ok()
            .map(|index| self.pages[index].digest)
    }

    /// Hashes every page of a dump directory (streaming). Pages in a parent image take the
    /// hash `previous` has for them.
    pub fn of_dump(previous: &PageHashes, dump_dir: &Path) -> Result<PageHashes, PagesError> {
        let mut delta = delta(previous, dump_dir)?;
        for change in delta.by_ref() {
            change?;
        }
        Ok(delta.finish()?.hashes)
    }
}

/// Opens a CRIU dump directory's pagemaps for streaming their pages in (owner, address) order.
///
/// Every `pagemap-<pid>.img` and `pagemap-shmem-<id>.img` is parsed and checked against the
/// size of its `pages-<id>.img` before the first page is returned, so a corrupt or truncated
/// dump fails here rather than halfway through a transfer.
pub fn read_dump(dump_dir: &Path) -> Result<DumpPages, PagesError> {
    let entries = fs::read_dir(dump_dir).map_err(|source| io_error(dump_dir, source))?;
    let mut owners = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io_error(dump_dir, source))?;
        let name = entry.file_name();
        if let Some(owner) = name.to_str().and_then(MemoryOwner::from_pagemap_file_name) {
            owners.push(owner);
        }
    }
    owners.sort_unstable();
    if let Some(pair) = owners.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(PagesError::DuplicateOwner {
            path: dump_dir.to_path_buf(),
            owner: pair[0],
        });
    }

    let mut maps = Vec::with_capacity(owners.len());
    let mut pages_ids = HashSet::new();
    for owner in owners {
        let pagemap_path = dump_dir.join(owner.pagemap_file_name());
        let bytes = fs::read(&pagemap_path).map_err(|source| io_error(&pagemap_path, source))?;
        let pagemap = parse_pagemap(&pagemap_path, &bytes)?;
        let present_pages = pagemap
            .entries
            .iter()
            .filter(|entry| matches!(entry.kind, EntryKind::Present { .. }))
            .fold(0u64, |sum, entry| sum.saturating_add(entry.nr_pages));
        let pages_path = match pagemap.pages_id {
            Some(id) => {
                if !pages_ids.insert(id) {
                    return Err(PagesError::DuplicatePagesId {
                        path: pagemap_path,
                        pages_id: id,
                    });
                }
                dump_dir.join(format!("pages-{id}.img"))
            }
            None => PathBuf::new(),
        };
        if present_pages > 0 {
            let found = fs::metadata(&pages_path)
                .map_err(|source| io_error(&pages_path, source))?
                .len();
            let expected = present_pages.saturating_mul(PAGE_SIZE_U64);
            if found != expected {
                return Err(PagesError::PagesSize {
                    path: pages_path,
                    expected,
                    found,
                });
            }
        }
        maps.push(OwnerMap {
            owner,
            pages_path,
            entries: pagemap.entries,
            present_pages,
        });
    }
    Ok(DumpPages {
        dir: dump_dir.to_path_buf(),
        maps,
        next_map: 0,
        cursor: None,
        failed: false,
    })
}

impl DumpPages {
    /// The processes and segments that have a pagemap in this dump, sorted.
    pub fn owners(&self) -> Vec<MemoryOwner> {
        self.maps.iter().map(|map| map.owner).collect()
    }

    /// Pages (present or in a parent image) in this dump.
    pub fn total_pages(&self) -> u64 {
        self.maps
            .iter()
            .flat_map(|map| map.entries.iter())
            .fold(0u64, |sum, entry| sum.saturating_add(entry.nr_pages))
    }

    /// Page bytes held in this dump's pages images.
    pub fn present_bytes(&self) -> u64 {
        self.maps.iter().fold(0u64, |sum, map| {
            sum.saturating_add(map.present_pages.saturating_mul(PAGE_SIZE_U64))
        })
    }

    /// The dump directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn next_page(&mut self) -> Option<Result<DumpPage, PagesError>> {
        loop {
            let cursor = match &mut self.cursor {
                Some(cursor) => cursor,
                None => {
                    if self.next_map >= self.maps.len() {
                        return None;
                    }
                    self.next_map += 1;
                    self.cursor.insert(PageCursor {
                        map: self.next_map - 1,
                        entry: 0,
                        page: 0,
                        reader: None,
                        offset: 0,
                    })
                }
            };
            let map = &self.maps[cursor.map];
            let Some(entry) = map.entries.get(cursor.entry) else {
                self.cursor = None;
                continue;
            };
            if cursor.page >= entry.nr_pages {
                cursor.entry += 1;
                cursor.page = 0;
                continue;
            }
            // Entries were checked not to overflow the address space.
            let key = PageKey {
                owner: map.owner,
                vaddr: entry.vaddr + cursor.page * PAGE_SIZE_U64,
            };
            cursor.page += 1;
            let (lazy, content) = match entry.kind {
                EntryKind::InParent => (false, PageContent::InParent),
                EntryKind::Present { lazy } => match read_page(map, cursor) {
                    Ok(data) => (lazy, PageContent::Bytes(data)),
                    Err(err) => return Some(Err(err)),
                },
            };
            return Some(Ok(DumpPage { key, lazy, content }));
        }
    }
}

impl Iterator for DumpPages {
    type Item = Result<DumpPage, PagesError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.next_page();
        if matches!(item, Some(Err(_))) {
            self.failed = true;
        }
        item
    }
}

/// Diffs a dump directory against the previous round's hashes (streaming).
///
/// Iterate the returned [`Delta`] to get the changes in the order the target applies them
/// (pages the previous round already had, with equal content, are not among them), then call
/// [`Delta::finish`] for the new hashes and the round's figures. The first round passes
/// [`PageHashes::new`].
pub fn delta<'a>(previous: &'a PageHashes, dump_dir: &Path) -> Result<Delta<'a>, PagesError> {
    let dump = read_dump(dump_dir)?;
    let new_owners = dump.owners();
    // Present pages were checked against the pages images' sizes; in-parent counts were not,
    // and must not size an allocation.
    let capacity = usize::try_from(dump.present_bytes() / PAGE_SIZE_U64).unwrap_or(0);
    Ok(Delta {
        previous,
        dump,
        new_owners,
        prev_owner: 0,
        new_owner: 0,
        prev_page: 0,
        lookahead: None,
        dump_done: false,
        failed: false,
        hashes: Vec::with_capacity(capacity),
        stats: DeltaStats::default(),
    })
}

impl Delta<'_> {
    /// The figures so far (complete once the iterator is exhausted).
    pub fn stats(&self) -> DeltaStats {
        self.stats
    }

    /// Total pages in this round's dump (for progress).
    pub fn total_pages(&self) -> u64 {
        self.dump.total_pages()
    }

    /// The new hashes and the figures; fails if changes are left unread (they would be lost).
    pub fn finish(self) -> Result<DeltaOutcome, PagesError> {
        let drained = self.dump_done
            && self.lookahead.is_none()
            && self.prev_page >= self.previous.pages.len()
            && self.prev_owner >= self.previous.owners.len()
            && self.new_owner >= self.new_owners.len();
        if self.failed || !drained {
            return Err(PagesError::NotDrained {
                path: self.dump.dir.clone(),
                reason: if self.failed {
                    "it failed"
                } else {
                    "changes are left unread"
                },
            });
        }
        tracing::debug!(
            dump = %self.dump.dir.display(),
            pages_total = self.stats.pages_total,
            pages_sent = self.stats.pages_sent,
            pages_new = self.stats.pages_new,
            pages_unchanged = self.stats.pages_unchanged,
            pages_gone = self.stats.pages_gone,
            "page delta computed"
        );
        Ok(DeltaOutcome {
            hashes: PageHashes {
                owners: self.new_owners,
                pages: self.hashes,
            },
            stats: self.stats,
        })
    }

    fn pagemap_path(&self, owner: MemoryOwner) -> PathBuf {
        self.dump.dir.join(owner.pagemap_file_name())
    }

    /// The next change, merging three sorted streams: owner events (previous vs. this dump),
    /// the previous round's pages and this dump's pages. An owner's event comes before its
    /// pages.
    fn next_change(&mut self) -> Result<Option<Change>, PagesError> {
        loop {
            if self.lookahead.is_none() && !self.dump_done {
                match self.dump.next() {
                    Some(page) => self.lookahead = Some(page?),
                    None => self.dump_done = true,
                }
            }
            let prev_owner = self.previous.owners.get(self.prev_owner).copied();
            let new_owner = self.new_owners.get(self.new_owner).copied();
            let event_owner = match (prev_owner, new_owner) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let prev_page = self.previous.pages.get(self.prev_page).copied();
            let next_key = match (&self.lookahead, prev_page) {
                (Some(page), Some(prev)) => Some(page.key.min(prev.key)),
                (Some(page), None) => Some(page.key),
                (None, Some(prev)) => Some(prev.key),
                (None, None) => None,
            };

            if let Some(owner) = event_owner {
                if next_key.is_none_or(|key| owner <= key.owner) {
                    let in_prev = prev_owner == Some(owner);
                    let in_new = new_owner == Some(owner);
                    if in_prev {
                        self.prev_owner += 1;
                    }
                    if in_new {
                        self.new_owner += 1;
                    }
                    match (in_prev, in_new) {
                        (true, false) => return Ok(Some(Change::OwnerGone(owner))),
                        (false, true) => return Ok(Some(Change::OwnerAdded(owner))),
                        _ => continue,
                    }
                }
            }

            let Some(key) = next_key else {
                return Ok(None);
            };
            match prev_page {
                Some(prev) if prev.key == key => {
                    self.prev_page += 1;
                    match self.lookahead.take_if(|page| page.key == key) {
                        Some(page) => {
                            if let Some(change) = self.compare(Some(prev), page)? {
                                return Ok(Some(change));
                            }
                        }
                        None => {
                            self.stats.pages_gone += 1;
                            // A vanished owner's pages go with its OwnerGone.
                            if self.new_owners.binary_search(&key.owner).is_ok() {
                                return Ok(Some(Change::PageGone(key)));
                            }
                        }
                    }
                }
                _ => {
                    if let Some(page) = self.lookahead.take() {
                        if let Some(change) = self.compare(None, page)? {
                            return Ok(Some(change));
                        }
                    }
                }
            }
        }
    }

    /// Records a dump page's hash and says whether it must be sent.
    fn compare(
        &mut self,
        prev: Option<HashedPage>,
        page: DumpPage,
    ) -> Result<Option<Change>, PagesError> {
        self.stats.pages_total += 1;
        let data = match page.content {
            PageContent::InParent => {
                let Some(prev) = prev else {
                    return Err(PagesError::ParentPageUnknown {
                        path: self.pagemap_path(page.key.owner),
                        vaddr: page.key.vaddr,
                    });
                };
                self.hashes.push(prev);
                self.stats.pages_unchanged += 1;
                return Ok(None);
            }
            PageContent::Bytes(data) => data,
        };
        let hashed = HashedPage {
            key: page.key,
            digest: page_digest(&data),
            lazy: page.lazy,
        };
        self.hashes.push(hashed);
        if prev == Some(hashed) {
            self.stats.pages_unchanged += 1;
            return Ok(None);
        }
        if prev.is_none() {
            self.stats.pages_new += 1;
        }
        self.stats.pages_sent += 1;
        self.stats.bytes_sent += PAGE_SIZE_U64;
        Ok(Some(Change::Page(Page {
            key: page.key,
            lazy: page.lazy,
            data,
        })))
    }
}

impl Iterator for Delta<'_> {
    type Item = Result<Change, PagesError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_change() {
            Ok(change) => change.map(Ok),
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

impl PageStore {
    /// Creates a store under `dir` (created if missing); a page file left there by an earlier
    /// store is truncated.
    pub fn create(dir: &Path) -> Result<PageStore, PagesError> {
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        let data_path = dir.join(STORE_DATA_FILE);
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|source| io_error(&data_path, source))?;
        Ok(PageStore {
            dir: dir.to_path_buf(),
            data,
            owners: BTreeSet::new(),
            slots: BTreeMap::new(),
            free: Vec::new(),
            next_slot: 0,
        })
    }

    /// Applies one change of a round, in the order [`Delta`] produced them.
    pub fn apply(&mut self, change: &Change) -> Result<(), PagesError> {
        match change {
            Change::OwnerAdded(owner) => {
                if !self.owners.insert(*owner) {
                    return Err(self.inconsistent("owner added twice", owner));
                }
            }
            Change::OwnerGone(owner) => {
                if !self.owners.remove(owner) {
                    return Err(self.inconsistent("unknown owner gone", owner));
                }
                let range = PageKey {
                    owner: *owner,
                    vaddr: 0,
                }..=PageKey {
                    owner: *owner,
                    vaddr: u64::MAX,
                };
                let keys: Vec<PageKey> = self.slots.range(range).map(|(key, _)| *key).collect();
                for key in keys {
                    if let Some(slot) = self.slots.remove(&key) {
                        self.free.push(slot.index);
                    }
                }
            }
            Change::Page(page) => {
                if !self.owners.contains(&page.key.owner) {
                    return Err(self.inconsistent("page of an unknown owner", page.key));
                }
                let index = match self.slots.get(&page.key) {
                    Some(slot) => slot.index,
                    None => match self.free.pop() {
                        Some(index) => index,
                        None => {
                            self.next_slot += 1;
                            self.next_slot - 1
                        }
                    },
                };
                // Recorded only once the bytes are written: a failed write leaves the index as
                // it was (a popped free slot is merely leaked).
                self.data
                    .write_all_at(&page.data[..], index * PAGE_SIZE_U64)
                    .map_err(|source| io_error(&self.dir.join(STORE_DATA_FILE), source))?;
                self.slots.insert(
                    page.key,
                    Slot {
                        index,
                        lazy: page.lazy,
                    },
                );
            }
            Change::PageGone(key) => match self.slots.remove(key) {
                Some(slot) => self.free.push(slot.index),
                None => return Err(self.inconsistent("unknown page gone", key)),
            },
        }
        Ok(())
    }

    /// Pages held.
    pub fn page_count(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Processes and segments held, sorted.
    pub fn owners(&self) -> Vec<MemoryOwner> {
        self.owners.iter().copied().collect()
    }

    /// Writes a `pagemap-*.img` + `pages-<id>.img` pair per owner into `out_dir` (files of the
    /// same names are replaced), as CRIU writes them: entries sorted by address, contiguous
    /// pages with the same flags merged into one entry, flags `PE_PRESENT` (plus `PE_LAZY`
    /// where the source dump had it). Pages images are numbered from 1 in owner order, so the
    /// source dump's own pagemap and pages images must not be copied into `out_dir`
    /// (see [`is_page_image`]).
    pub fn write_images(&self, out_dir: &Path) -> Result<WrittenImages, PagesError> {
        let mut written = WrittenImages::default();
        let data_path = self.dir.join(STORE_DATA_FILE);
        let mut buffer = [0u8; PAGE_SIZE];
        for (index, owner) in self.owners.iter().enumerate() {
            let pages_id = u32::try_from(index + 1).map_err(|_| PagesError::TooManyOwners {
                path: out_dir.to_path_buf(),
            })?;
            let range = PageKey {
                owner: *owner,
                vaddr: 0,
            }..=PageKey {
                owner: *owner,
                vaddr: u64::MAX,
            };

            let mut runs: Vec<MapEntry> = Vec::new();
            let pages_path = out_dir.join(format!("pages-{pages_id}.img"));
            let mut pages = BufWriter::new(create_file(&pages_path)?);
            for (key, slot) in self.slots.range(range) {
                self.data
                    .read_exact_at(&mut buffer, slot.index * PAGE_SIZE_U64)
                    .map_err(|source| io_error(&data_path, source))?;
                pages
                    .write_all(&buffer)
                    .map_err(|source| io_error(&pages_path, source))?;
                push_page_to_runs(&mut runs, key.vaddr, EntryKind::Present { lazy: slot.lazy });
                written.pages += 1;
            }
            pages
                .into_inner()
                .map_err(|err| io_error(&pages_path, err.into_error()))?;

            let pagemap_path = out_dir.join(owner.pagemap_file_name());
            let encoded = encode_pagemap(pages_id, &runs);
            fs::write(&pagemap_path, encoded).map_err(|source| io_error(&pagemap_path, source))?;
            written.files.push(pagemap_path);
            written.files.push(pages_path);
        }
        tracing::debug!(
            out = %out_dir.display(),
            owners = self.owners.len(),
            pages = written.pages,
            "page images written"
        );
        Ok(written)
    }

    fn inconsistent(&self, reason: &'static str, what: impl fmt::Display) -> PagesError {
        PagesError::Inconsistent {
            path: self.dir.clone(),
            reason,
            what: what.to_string(),
        }
    }
}

fn io_error(path: &Path, source: io::Error) -> PagesError {
    PagesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_file(path: &Path) -> Result<File, PagesError> {
    File::create(path).map_err(|source| io_error(path, source))
}

/// Strict decimal as CRIU prints ids (`%lu`): digits only, no sign, no leading zero.
fn parse_decimal(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical {
        text.parse().ok()
    } else {
        None
    }
}

fn read_u64_le(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(raw)
}

fn page_digest(data: &[u8; PAGE_SIZE]) -> [u8; 16] {
    let full = Sha256::digest(data);
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

fn read_page(map: &OwnerMap, cursor: &mut PageCursor) -> Result<Box<[u8; PAGE_SIZE]>, PagesError> {
    let path = &map.pages_path;
    if cursor.reader.is_none() {
        let file = File::open(path).map_err(|source| io_error(path, source))?;
        cursor.reader = Some(BufReader::with_capacity(PAGES_READ_BUFFER, file));
    }
    let mut data = Box::new([0u8; PAGE_SIZE]);
    if let Some(reader) = cursor.reader.as_mut() {
        reader.read_exact(&mut data[..]).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                PagesError::Truncated {
                    path: path.clone(),
                    offset: cursor.offset,
                    what: "page data",
                }
            } else {
                io_error(path, source)
            }
        })?;
    }
    cursor.offset += PAGE_SIZE_U64;
    Ok(data)
}

/// Parses a pagemap image (see the module documentation for the format).
fn parse_pagemap(path: &Path, bytes: &[u8]) -> Result<Pagemap, PagesError> {
    let truncated = |offset: usize, what| PagesError::Truncated {
        path: path.to_path_buf(),
        offset: offset as u64,
        what,
    };
    let (Some(common), Some(magic)) = (bytes.get(0..4), bytes.get(4..8)) else {
        return Err(truncated(0, "image header"));
    };
    for (raw, what, expected) in [
        (common, "common", IMG_COMMON_MAGIC),
        (magic, "pagemap", PAGEMAP_MAGIC),
    ] {
        let found = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if found != expected {
            return Err(PagesError::BadMagic {
                path: path.to_path_buf(),
                what,
                found,
                expected,
            });
        }
    }

    let mut offset = 8;
    let mut pages_id = None;
    let mut entries: Vec<MapEntry> = Vec::new();
    while offset < bytes.len() {
        let message_offset = offset;
        let Some(size) = bytes.get(offset..offset + 4) else {
            return Err(truncated(offset, "message size"));
        };
        let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]);
        if size > MAX_MESSAGE_SIZE {
            return Err(PagesError::MessageTooLarge {
                path: path.to_path_buf(),
                offset: offset as u64,
                size,
            });
        }
        offset += 4;
        let what = if pages_id.is_none() {
            "pagemap head"
        } else {
            "pagemap entry"
        };
        let Some(message) = bytes.get(offset..offset + size as usize) else {
            return Err(truncated(message_offset, what));
        };
        offset += size as usize;
        let decode_error = |source| PagesError::Decode {
            path: path.to_path_buf(),
            offset: message_offset as u64,
            what,
            source,
        };
        let missing = |field| PagesError::MissingField {
            path: path.to_path_buf(),
            offset: message_offset as u64,
            what,
            field,
        };

        if pages_id.is_none() {
            let head = PagemapHead::decode(message).map_err(decode_error)?;
            pages_id = Some(head.pages_id.ok_or(missing("pages_id"))?);
            continue;
        }
        let raw = PagemapEntry::decode(message).map_err(decode_error)?;
        let vaddr = raw.vaddr.ok_or(missing("vaddr"))?;
        let nr_pages = raw
            .nr_pages
            .or(raw.compat_nr_pages.map(u64::from))
            .ok_or(missing("nr_pages"))?;
        let entry = map_entry(path, vaddr, nr_pages, &raw)?;
        if let Some(last) = entries.last() {
            if vaddr < last.vaddr + last.nr_pages * PAGE_SIZE_U64 {
                return Err(bad_entry(
                    path,
                    vaddr,
                    "overlaps or precedes the previous entry",
                ));
            }
        }
        entries.push(entry);
    }
    Ok(Pagemap { pages_id, entries })
}

/// Checks one entry and reads its flags the way CRIU's `init_compat_pagemap_entry` does.
fn map_entry(
    path: &Path,
    vaddr: u64,
    nr_pages: u64,
    raw: &PagemapEntry,
) -> Result<MapEntry, PagesError> {
    if !vaddr.is_multiple_of(PAGE_SIZE_U64) {
        return Err(bad_entry(path, vaddr, "address is not page-aligned"));
    }
    if nr_pages == 0 {
        return Err(bad_entry(path, vaddr, "no pages"));
    }
    let fits = nr_pages
        .checked_mul(PAGE_SIZE_U64)
        .and_then(|len| vaddr.checked_add(len))
        .is_some();
    if !fits {
        return Err(bad_entry(
            path,
            vaddr,
            "runs past the end of the address space",
        ));
    }
    let flags = if raw.in_parent == Some(true) {
        raw.flags.unwrap_or(0) | PE_PARENT
    } else {
        raw.flags.unwrap_or(PE_PRESENT)
    };
    if flags & !(PE_PARENT | PE_LAZY | PE_PRESENT) != 0 {
        return Err(PagesError::UnknownFlags {
            path: path.to_path_buf(),
            vaddr,
            flags,
        });
    }
    let kind = match (flags & PE_PRESENT != 0, flags & PE_PARENT != 0) {
        (true, false) => EntryKind::Present {
            lazy: flags & PE_LAZY != 0,
        },
        (false, true) => EntryKind::InParent,
        (true, true) => return Err(bad_entry(path, vaddr, "both present and in the parent")),
        (false, false) => {
            return Err(PagesError::NotInImage {
                path: path.to_path_buf(),
                vaddr,
                flags,
            })
        }
    };
    Ok(MapEntry {
        vaddr,
        nr_pages,
        kind,
    })
}

/// Extends the last run with the page at `vaddr` if it is contiguous and alike, else starts a
/// new run: pages must come in address order.
fn push_page_to_runs(runs: &mut Vec<MapEntry>, vaddr: u64, kind: EntryKind) {
    match runs.last_mut() {
        Some(run)
            if run.kind == kind
                && run.nr_pages < MAX_RUN_PAGES
                && run.vaddr + run.nr_pages * PAGE_SIZE_U64 == vaddr =>
        {
            run.nr_pages += 1;
        }
        _ => runs.push(MapEntry {
            vaddr,
            nr_pages: 1,
            kind,
        }),
    }
}

fn bad_entry(path: &Path, vaddr: u64, reason: &'static str) -> PagesError {
    PagesError::BadEntry {
        path: path.to_path_buf(),
        vaddr,
        reason,
    }
}

/// Encodes a pagemap image as CRIU 4.2 writes it, with the page count in both the 64-bit field
/// and the old 32-bit one so that older CRIUs read it too.
fn encode_pagemap(pages_id: u32, entries: &[MapEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 24);
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    push_message(
        &mut out,
        &PagemapHead {
            pages_id: Some(pages_id),
        },
    );
    for entry in entries {
        let flags = match entry.kind {
            EntryKind::Present { lazy: false } => PE_PRESENT,
            EntryKind::Present { lazy: true } => PE_PRESENT | PE_LAZY,
            EntryKind::InParent => PE_PARENT,
        };
        push_message(
            &mut out,
            &PagemapEntry {
                vaddr: Some(entry.vaddr),
                compat_nr_pages: Some(u32::try_from(entry.nr_pages).unwrap_or(0)),
                in_parent: None,
                flags: Some(flags),
                nr_pages: Some(entry.nr_pages),
            },
        );
    }
    out
}

fn push_message(out: &mut Vec<u8>, message: &impl Message) {
    let encoded = message.encode_to_vec();
    // Pagemap messages are a few dozen bytes: the length always fits.
    out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    out.extend_from_slice(&encoded);
}

/// A page of test memory whose bytes depend on `seed` (the pages and session tests share it).
#[cfg(test)]
pub(crate) fn test_page(seed: u64) -> Box<[u8; PAGE_SIZE]> {
    let mut data = Box::new([0u8; PAGE_SIZE]);
    for (index, chunk) in data.chunks_exact_mut(8).enumerate() {
        let word = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    data
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
