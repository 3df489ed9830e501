//! Framing of the agent-to-agent migration streams.
//!
//! A migration runs over one QUIC connection between the source and the target agent; each of its
//! streams carries a sequence of frames in one direction. This module turns [`Frame`]s into bytes
//! and back over any `AsyncRead`/`AsyncWrite` (quinn's `SendStream`/`RecvStream`, or in-memory
//! pipes in tests), and moves whole files through a stream without holding them in memory.
//!
//! # Layout (protocol version 1; every integer is big-endian)
//!
//! ```text
//! stream header   "BERTHMIG" (8 bytes)  version u16
//! frame           type u8  flags u8  length u32  header_crc u32     (10-byte frame header)
//!                 payload [length]
//!                 crc u32                                           (4-byte trailer)
//! ```
//!
//! - `header_crc` is the CRC32C of the six bytes before it, so a corrupted length is caught before
//!   the reader acts on it (it would otherwise read a wrong number of bytes, or refuse a frame as too
//!   large, instead of reporting a checksum error). The length is then checked against the
//!   reader's maximum payload ([`DEFAULT_MAX_PAYLOAD`], 1 MiB) before anything is allocated.
//! - The trailing `crc` is the CRC32C of the frame header and the payload.
//! - `flags` are reserved: version 1 defines none and a reader rejects any.
//! - The end of the stream at a frame boundary is a clean end ([`FrameReader::next`] returns
//!   `None`); anywhere else it is [`WireError::Truncated`]. A stream must carry at least its
//!   header. Since a cut at a frame boundary looks like a clean end, a sender ends a complete
//!   exchange with [`Frame::Done`] and receivers treat an end without it as a failure.
//!
//! Payloads (a string is a u16 byte length, then UTF-8; `× n` repeats a field n times):
//!
//! | type | frame       | payload                                                                  |
//! |------|-------------|--------------------------------------------------------------------------|
//! | 1    | `Hello`     | migration_id string, instance_id string, round u32                       |
//! | 2    | `FileStart` | path string, mode u32, size u64                                          |
//! | 3    | `FileChunk` | raw bytes (the rest of the payload)                                      |
//! | 4    | `FileEnd`   | sha256 of the whole file, 32 bytes                                       |
//! | 5    | `PageDelta` | pid u32, page_size u32, count u32, vaddr u64 × count, page × count       |
//! | 6    | `PagesGone` | pid u32, count u32, vaddr u64 × count                                    |
//! | 7    | `RoundEnd`  | round u32, pages u64, bytes u64                                          |
//! | 8    | `Error`     | message, UTF-8 (the rest of the payload)                                 |
//! | 9    | `Done`      | empty                                                                    |
//! | 10   | `Changes`   | count u32, (len u16, record [len]) × count                               |
//! | 11   | `Ready`     | empty                                                                    |
//! | 12   | `Manifest`  | entries u64, bytes u64                                                   |
//! | 13   | `Entry`     | kind u8, path string, mode u32, uid u32, gid u32, link target string     |
//! | 14   | `Restored`  | pid u32, images_ms u64, prepare_ms u64, restore_ms u64, adopt_ms u64     |
//!
//! `Changes` carries opaque records (the migration session puts `pages::Change::encode` records
//! there: unlike `PageDelta`/`PagesGone`, they also say which processes appeared and went); the
//! framing only checks that the records tile the payload, each 1 to 65535 bytes. An `Entry`'s
//! kind is 1 directory, 2 regular file (its `FileStart`… follow), 3 symlink, 4 overlay whiteout.
//!
//! Why a fixed binary layout rather than protobuf: page data is most of the traffic and must not be
//! copied through a generic encoder, the structured frames are a handful of integers, and the
//! whole layout fits in the table above. The proto/ contract stays the only thing spoken with the
//! hub; this is a private agent-to-agent format, versioned by the stream header.
//!
//! Why CRC32C: QUIC already authenticates every packet (AEAD), so the checksum is not there against
//! an attacker but against our own bugs (a desynchronised reader, a buffer reused too early) and
//! memory or disk corruption on either host. A 32-bit CRC catches every burst up to 32 bits and
//! anything else with probability 1 − 2⁻³², CRC32C is computed by one instruction per 8 bytes on
//! x86_64 (SSE4.2) and aarch64, so it costs nothing next to the network, and it is the checksum of
//! iSCSI, SCTP and ext4. Whole files are additionally checked end to end with SHA-256.
//!
//! # Files
//!
//! [`FrameWriter::send_file`] sends `FileStart`, the file in chunks of at most the maximum payload
//! (read and hashed as they go, never the whole file in memory), then `FileEnd` with the SHA-256.
//! [`FrameReader::receive_file`] treats the peer as untrusted: the announced path must be relative,
//! made of plain components (no `..`, `.`, empty or NUL), and is resolved below the destination
//! directory one component at a time with `O_NOFOLLOW`, so no symlink (planted there by anyone) can
//! lead outside. Data goes to a temporary name in the final directory and is renamed over the
//! final name only once its size and hash match; on any failure (including cancellation) the
//! temporary file is removed. Directories created on the way are left in place. The announced mode
//! is applied with only the permission bits (`& 0o777`): no set-id bits from a peer. Files are not
//! fsynced: the migration fails as a whole if the target host crashes.
//!
//! Directory trees (a container's overlay upper dir) also need directories, symlinks and
//! whiteouts, and owners: [`create_dir_below`], [`create_symlink_below`],
//! [`create_whiteout_below`] and [`set_attrs_below`] resolve the peer's path the same way
//! (plain components, `O_NOFOLLOW` at each step) and never follow a symlink in the last one
//! either. They block: call them from `spawn_blocking`.
//!
//! # Back-pressure and memory
//!
//! [`FrameWriter::send`] returns only once the frame is handed to the writer, so a slow peer (QUIC
//! flow control) slows the sender down; each side holds at most one frame in memory. The writer
//! does not flush after each frame: with a buffering writer, call [`FrameWriter::flush`] before
//! waiting for an answer. Neither `send` nor `next` is cancel-safe: a cancelled call leaves the
//! stream mid-frame, and the writer or reader then refuses further use ([`WireError::Broken`]).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first bytes of every migration stream.
pub const MAGIC: [u8; 8] = *b"BERTHMIG";
/// The protocol version this agent speaks (see the module doc for its layout).
pub const VERSION: u16 = 1;
/// Length of the stream header: magic and version.
pub const STREAM_HEADER_LEN: usize = MAGIC.len() + 2;
/// Length of a frame header: type, flags, length and header checksum.
pub const FRAME_HEADER_LEN: usize = 10;
/// Length of a frame trailer: the checksum of header and payload.
pub const FRAME_TRAILER_LEN: usize = 4;
/// Default largest payload a frame may carry, on both sides.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 20;
/// Smallest maximum payload [`FrameWriter::with_max_payload`] accepts (tests use small ones).
pub const MIN_MAX_PAYLOAD: u32 = 64;
/// Largest maximum payload [`FrameWriter::with_max_payload`] accepts.
pub const LIMIT_MAX_PAYLOAD: u32 = 16 << 20;

/// Longest path a `FileStart` may announce.
const MAX_PATH_LEN: usize = 4096;
/// Longest component of such a path (Linux's `NAME_MAX`).
const MAX_NAME_LEN: usize = 255;
/// Fixed part of a `PageDelta` payload: pid, page size, count.
const PAGE_DELTA_FIXED: u64 = 12;
/// Prefix of the temporary names files are received under.
const PARTIAL_PREFIX: &str = ".berth-partial-";

/// The type of a frame, as its code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// [`Frame::Hello`].
    Hello = 1,
    /// [`Frame::FileStart`].
    FileStart = 2,
    /// [`Frame::FileChunk`].
    FileChunk = 3,
    /// [`Frame::FileEnd`].
    FileEnd = 4,
    /// [`Frame::PageDelta`].
    PageDelta = 5,
    /// [`Frame::PagesGone`].
    PagesGone = 6,
    /// [`Frame::RoundEnd`].
    RoundEnd = 7,
    /// [`Frame::Error`].
    Error = 8,
    /// [`Frame::Done`].
    Done = 9,
    /// [`Frame::Changes`].
    Changes = 10,
    /// [`Frame::Ready`].
    Ready = 11,
    /// [`Frame::Manifest`].
    Manifest = 12,
    /// [`Frame::Entry`].
    Entry = 13,
    /// [`Frame::Restored`].
    Restored = 14,
}

/// Opens a migration stream: who is migrating what, and which pre-copy round this stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The hub's migration job id.
    pub migration_id: String,
    /// The instance being moved.
    pub instance_id: String,
    /// The pre-copy round (0 for streams that are not tied to one).
    pub round: u32,
}

/// Announces a file; its chunks and a [`Frame::FileEnd`] follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStart {
    /// Relative `/`-separated path below the receiver's destination directory.
    pub path: String,
    /// Unix mode; the receiver applies only the permission bits.
    pub mode: u32,
    /// Exact size in bytes.
    pub size: u64,
}

/// A batch of memory pages of one process: page `i` is at `vaddrs[i]` and its bytes are
/// `data[i * page_size..(i + 1) * page_size]`, kept contiguous so that a batch is one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDelta {
    /// Process id, as in the checkpoint.
    pub pid: u32,
    /// Page size in bytes, a power of two.
    pub page_size: u32,
    /// Page-aligned virtual address of each page.
    pub vaddrs: Vec<u64>,
    /// The pages' bytes, `vaddrs.len() * page_size` of them.
    pub data: Vec<u8>,
}

/// Pages of a process that no longer exist (unmapped since the previous round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesGone {
    /// Process id, as in the checkpoint.
    pub pid: u32,
    /// Virtual address of each page.
    pub vaddrs: Vec<u64>,
}

/// Closes a pre-copy round with what it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round number.
    pub round: u32,
    /// Pages sent in this round.
    pub pages: u64,
    /// Bytes sent in this round.
    pub bytes: u64,
}

/// A batch of opaque records (each 1 to 65535 bytes), kept as one buffer: `count` records, each
/// a `u16` big-endian length then its bytes, exactly the frame's payload after the count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    count: u32,
    data: Vec<u8>,
}

/// What the sender will put on a files stream, announced before the first file so that the
/// receiver can refuse what does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    /// Number of [`Frame::Entry`] frames that follow.
    pub entries: u64,
    /// Sum of the sizes of the regular files among them.
    pub bytes: u64,
}

/// The kind of a [`TreeEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TreeEntryKind {
    /// A directory.
    Dir = 1,
    /// A regular file: its `FileStart`, chunks and `FileEnd` follow the entry.
    File = 2,
    /// A symbolic link to [`TreeEntry::link_target`].
    Symlink = 3,
    /// An overlayfs whiteout (a 0/0 character device: the lower layer's file is deleted).
    Whiteout = 4,
}

/// One entry of a directory tree being moved, in pre-order (a directory before its contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// What it is.
    pub kind: TreeEntryKind,
    /// Relative `/`-separated path below the receiver's destination directory.
    pub path: String,
    /// Unix mode bits (`0o7777` part; the file type is `kind`).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Target of a symlink; empty for other kinds.
    pub link_target: String,
}

/// The target restored the container and it runs: the target's timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restored {
    /// Host pid of the restored init on the target (for the logs).
    pub pid: u32,
    /// Writing the CRIU images from the page store.
    pub images_ms: u64,
    /// The target's preparation (rootfs, network namespace, log pipes).
    pub prepare_ms: u64,
    /// `criu restore`.
    pub restore_ms: u64,
    /// Handing the restored container to the agent's supervision.
    pub adopt_ms: u64,
}

/// One unit of a migration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    Hello(Hello),
    /// Announces a file.
    FileStart(FileStart),
    /// A piece of the announced file.
    FileChunk(Vec<u8>),
    /// Ends the announced file.
    FileEnd {
        /// SHA-256 of the whole file.
        sha256: [u8; 32],
    },
    /// Changed or new pages.
    PageDelta(PageDelta),
    /// Pages that disappeared.
    PagesGone(PagesGone),
    /// End of a pre-copy round.
    RoundEnd(RoundEnd),
    /// The sender gives up; the message says why.
    Error {
        /// Human-readable reason.
        message: String,
    },
    /// The sender has nothing more to say on this stream.
    Done,
    /// A batch of opaque change records.
    Changes(ChangeBatch),
    /// The receiver accepts the migration announced by `Hello`.
    Ready,
    /// What a files stream will carry.
    Manifest(Manifest),
    /// An entry of a directory tree.
    Entry(TreeEntry),
    /// The container runs on the target.
    Restored(Restored),
}

/// Errors of the migration stream framing.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended in the middle of its header or of a frame.
    #[error("migration stream ended inside {what}: got {got} of {expected} bytes")]
    Truncated {
        /// The part being read (`stream header`, `frame header`, `payload`, `trailer`).
        what: &'static str,
        /// Bytes received of that part.
        got: usize,
        /// Bytes that part has.
        expected: usize,
    },
    /// The stream ended cleanly where the protocol needs another frame.
    #[error("migration stream ended where a {expected} frame was expected")]
    UnexpectedEnd {
        /// What was expected.
        expected: &'static str,
    },
    /// The stream does not start with [`MAGIC`].
    #[error("not a berth migration stream: it starts with {}", hex::encode(.found))]
    BadMagic {
        /// The first bytes received.
        found: Vec<u8>,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks migration protocol version {peer}, this agent speaks version {ours}")]
    VersionMismatch {
        /// The peer's version.
        peer: u16,
        /// Ours, [`VERSION`].
        ours: u16,
    },
    /// A frame's header or payload does not match its checksum.
    #[error(
        "bad {part} checksum in frame #{frame}: computed {computed:08x}, frame says {stated:08x}"
    )]
    BadChecksum {
        /// Index of the frame in the stream, from 0.
        frame: u64,
        /// `header` or `payload`.
        part: &'static str,
        /// The checksum of what arrived.
        computed: u32,
        /// The checksum the frame carries.
        stated: u32,
    },
    /// A frame is longer than the maximum payload.
    #[error("frame #{frame} has a {len}-byte payload, over the {max}-byte limit")]
    FrameTooLarge {
        /// Index of the frame in the stream, from 0.
        frame: u64,
        /// Its payload length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame type this version does not know.
    #[error("unknown frame type {code} in frame #{frame}")]
    UnknownType {
        /// Index of the frame in the stream, from 0.
        frame: u64,
        /// The type code.
        code: u8,
    },
    /// Flags this version does not define.
    #[error("unknown flags {flags:#04x} on {kind} frame #{frame}")]
    UnknownFlags {
        /// Index of the frame in the stream, from 0.
        frame: u64,
        /// The frame's type.
        kind: FrameKind,
        /// The flags.
        flags: u8,
    },
    /// A frame whose checksum is right but whose payload does not follow the layout.
    #[error("malformed {kind} frame #{frame}: {reason}")]
    Malformed {
        /// Index of the frame in the stream, from 0.
        frame: u64,
        /// The frame's type.
        kind: FrameKind,
        /// What is wrong.
        reason: &'static str,
    },
    /// This side was asked to send a frame that breaks the layout.
    #[error("invalid {kind} frame to send: {reason}")]
    InvalidFrame {
        /// The frame's type.
        kind: FrameKind,
        /// What is wrong.
        reason: &'static str,
    },
    /// A well-formed frame that does not belong here.
    #[error("unexpected {got} frame, expected {expected}")]
    UnexpectedFrame {
        /// The frame received.
        got: FrameKind,
        /// What was expected.
        expected: &'static str,
    },
    /// The peer sent [`Frame::Error`].
    #[error("peer reported an error: {message}")]
    Peer {
        /// The peer's message.
        message: String,
    },
    /// A file path that could lead outside the destination directory, or is otherwise unusable.
    #[error("file path {path:?} rejected: {reason}")]
    PathRejected {
        /// The path as announced.
        path: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A received file's size differs from the announced one.
    #[error("file {path}: announced {expected} bytes, received {actual}")]
    SizeMismatch {
        /// The path as announced.
        path: String,
        /// Announced size.
        expected: u64,
        /// Bytes received (so far, when there were too many).
        actual: u64,
    },
    /// A received file's SHA-256 differs from the one in its `FileEnd`.
    #[error("file {path}: sha256 {actual} differs from the announced {expected}")]
    HashMismatch {
        /// The path as announced.
        path: String,
        /// Announced hash, hex.
        expected: String,
        /// Hash of what arrived, hex.
        actual: String,
    },
    /// A file to send is not a regular file.
    #[error("{path} is not a regular file")]
    NotRegularFile {
        /// The local path.
        path: PathBuf,
    },
    /// A file to send changed size while it was read.
    #[error("{path} changed size while it was being sent (announced {announced} bytes)")]
    FileChanged {
        /// The local path.
        path: PathBuf,
        /// The size announced to the peer.
        announced: u64,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    File {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the stream failed.
    #[error("migration stream i/o: {0}")]
    Stream(#[source] io::Error),
    /// An earlier error or a cancelled call left the stream mid-frame.
    #[error("migration stream is unusable after an earlier error")]
    Broken,
}

/// Traffic counters, shareable between the streams of one migration and the job reporting them.
#[derive(Debug, Default)]
pub struct WireCounters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
}

/// A snapshot of [`WireCounters`]. Bytes count everything on the wire, headers included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames written.
    pub frames_sent: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Frames read.
    pub frames_received: u64,
    /// Bytes read.
    pub bytes_received: u64,
}

/// What [`FrameWriter::send_file`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentFile {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
}

/// What [`FrameReader::receive_file`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    /// Final path, below the destination directory.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
}

/// Writes frames to a stream.
pub struct FrameWriter<W> {
    inner: W,
    max_payload: u32,
    header_sent: bool,
    /// Set while a write is under way: still set afterwards means it failed or was cancelled.
    broken: bool,
    frames: u64,
    /// One frame, encoded; reused so that sending allocates nothing in the steady state.
    buf: Vec<u8>,
    counters: Arc<WireCounters>,
}

/// Reads frames from a stream.
pub struct FrameReader<R> {
    inner: R,
    max_payload: u32,
    header_read: bool,
    broken: bool,
    frames: u64,
    counters: Arc<WireCounters>,
}

impl FrameKind {
    /// The kind for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Hello,
            2 => Self::FileStart,
            3 => Self::FileChunk,
            4 => Self::FileEnd,
            5 => Self::PageDelta,
            6 => Self::PagesGone,
            7 => Self::RoundEnd,
            8 => Self::Error,
            9 => Self::Done,
            10 => Self::Changes,
            11 => Self::Ready,
            12 => Self::Manifest,
            13 => Self::Entry,
            14 => Self::Restored,
            _ => return None,
        })
    }

    /// Lower-case name, as in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::FileStart => "file-start",
            Self::FileChunk => "file-chunk",
            Self::FileEnd => "file-end",
            Self::PageDelta => "page-delta",
            Self::PagesGone => "pages-gone",
            Self::RoundEnd => "round-end",
            Self::Error => "error",
            Self::Done => "done",
            Self::Changes => "changes",
            Self::Ready => "ready",
            Self::Manifest => "manifest",
            Self::Entry => "entry",
            Self::Restored => "restored",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PageDelta {
    /// An empty batch.
    pub fn new(pid: u32, page_size: u32) -> Self {
        Self {
            pid,
            page_size,
            vaddrs: Vec::new(),
            data: Vec::new(),
        }
    }

    /// How many pages of `page_size` fit in one frame of at most `max_payload` bytes.
    pub fn max_pages(max_payload: u32, page_size: u32) -> usize {
        let room = u64::from(max_payload).saturating_sub(PAGE_DELTA_FIXED);
        usize::try_from(room / (8 + u64::from(page_size))).unwrap_or(usize::MAX)
    }

    /// Appends a page; `page` must be exactly one page and `vaddr` page-aligned.
    pub fn push(&mut self, vaddr: u64, page: &[u8]) -> Result<(), WireError> {
        let invalid = |reason| WireError::InvalidFrame {
            kind: FrameKind::PageDelta,
            reason,
        };
        if !self.page_size.is_power_of_two() {
            return Err(invalid("page size is not a power of two"));
        }
        if page.len() as u64 != u64::from(self.page_size) {
            return Err(invalid("page is not page_size bytes long"));
        }
        if !vaddr.is_multiple_of(u64::from(self.page_size)) {
            return Err(invalid("page address is not page-aligned"));
        }
        self.vaddrs.push(vaddr);
        self.data.extend_from_slice(page);
        Ok(())
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.vaddrs.len()
    }

    /// Whether the batch has no page.
    pub fn is_empty(&self) -> bool {
        self.vaddrs.is_empty()
    }

    /// Each page's address and bytes.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        // max(1): chunks_exact panics on 0, and a hand-built batch may carry any page size.
        let size = usize::try_from(self.page_size.max(1)).unwrap_or(usize::MAX);
        self.vaddrs
            .iter()
            .copied()
            .zip(self.data.chunks_exact(size))
    }

    fn check(&self) -> Result<(), &'static str> {
        if !self.page_size.is_power_of_two() {
            return Err("page size is not a power of two");
        }
        if u32::try_from(self.vaddrs.len()).is_err() {
            return Err("too many pages");
        }
        if self.data.len() as u64 != self.vaddrs.len() as u64 * u64::from(self.page_size) {
            return Err("page data is not count * page_size bytes");
        }
        let size = u64::from(self.page_size);
        if self.vaddrs.iter().any(|v| !v.is_multiple_of(size)) {
            return Err("page address is not page-aligned");
        }
        Ok(())
    }
}

impl ChangeBatch {
    /// Bytes a record adds to a batch besides itself (its length prefix).
    pub const RECORD_OVERHEAD: usize = 2;
    /// Bytes of a batch's payload besides its records (the count).
    pub const FIXED_LEN: usize = 4;

    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a record of 1 to 65535 bytes.
    pub fn push(&mut self, record: &[u8]) -> Result<(), WireError> {
        let invalid = |reason| WireError::InvalidFrame {
            kind: FrameKind::Changes,
            reason,
        };
        if record.is_empty() {
            return Err(invalid("empty record"));
        }
        let len = u16::try_from(record.len()).map_err(|_| invalid("record over 65535 bytes"))?;
        let count = self
            .count
            .checked_add(1)
            .ok_or(invalid("too many records"))?;
        self.data.extend_from_slice(&len.to_be_bytes());
        self.data.extend_from_slice(record);
        self.count = count;
        Ok(())
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch has no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Length of the frame payload this batch makes.
    pub fn payload_len(&self) -> u64 {
        Self::FIXED_LEN as u64 + self.data.len() as u64
    }

    /// Whether a record of `len` bytes still fits a payload of at most `max_payload` bytes.
    pub fn fits(&self, len: usize, max_payload: u32) -> bool {
        self.payload_len() + (Self::RECORD_OVERHEAD + len) as u64 <= u64::from(max_payload)
    }

    /// The records, in order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.data.as_slice();
        std::iter::from_fn(move || {
            // Well-formed by construction (`push`) or by `decode`'s checks.
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (record, tail) = tail.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
            rest = tail;
            Some(record)
        })
    }

    fn decode(payload: Vec<u8>) -> Result<Self, &'static str> {
        let (count, data) = payload
            .split_first_chunk::<4>()
            .ok_or("payload too short")?;
        let count = u32::from_be_bytes(*count);
        let mut rest = data;
        let mut seen = 0u32;
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<2>()
                .ok_or("record length cut short")?;
            let len = usize::from(u16::from_be_bytes(*len));
            if len == 0 {
                return Err("empty record");
            }
            rest = tail.get(len..).ok_or("record runs past the payload")?;
            seen = seen.checked_add(1).ok_or("too many records")?;
        }
        if seen != count {
            return Err("record count does not match the records");
        }
        Ok(Self {
            count,
            data: data.to_vec(),
        })
    }
}

impl TreeEntryKind {
    /// The kind for a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Dir,
            2 => Self::File,
            3 => Self::Symlink,
            4 => Self::Whiteout,
            _ => return None,
        })
    }

    /// Lower-case name, as in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dir => "directory",
            Self::File => "file",
            Self::Symlink => "symlink",
            Self::Whiteout => "whiteout",
        }
    }
}

impl fmt::Display for TreeEntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Frame {
    /// The frame's type.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Hello(_) => FrameKind::Hello,
            Self::FileStart(_) => FrameKind::FileStart,
            Self::FileChunk(_) => FrameKind::FileChunk,
            Self::FileEnd { .. } => FrameKind::FileEnd,
            Self::PageDelta(_) => FrameKind::PageDelta,
            Self::PagesGone(_) => FrameKind::PagesGone,
            Self::RoundEnd(_) => FrameKind::RoundEnd,
            Self::Error { .. } => FrameKind::Error,
            Self::Done => FrameKind::Done,
            Self::Changes(_) => FrameKind::Changes,
            Self::Ready => FrameKind::Ready,
            Self::Manifest(_) => FrameKind::Manifest,
            Self::Entry(_) => FrameKind::Entry,
            Self::Restored(_) => FrameKind::Restored,
        }
    }

    /// Length of the encoded payload (without frame header and trailer).
    pub fn payload_len(&self) -> u64 {
        let s = |s: &String| 2 + s.len() as u64;
        match self {
            Self::Hello(h) => s(&h.migration_id) + s(&h.instance_id) + 4,
            Self::FileStart(f) => s(&f.path) + 4 + 8,
            Self::FileChunk(data) => data.len() as u64,
            Self::FileEnd { .. } => 32,
            Self::PageDelta(p) => {
                PAGE_DELTA_FIXED + 8 * p.vaddrs.len() as u64 + p.data.len() as u64
            }
            Self::PagesGone(p) => 8 + 8 * p.vaddrs.len() as u64,
            Self::RoundEnd(_) => 4 + 8 + 8,
            Self::Error { message } => message.len() as u64,
            Self::Done | Self::Ready => 0,
            Self::Changes(batch) => batch.payload_len(),
            Self::Manifest(_) => 8 + 8,
            Self::Entry(e) => 1 + s(&e.path) + 4 + 4 + 4 + s(&e.link_target),
            Self::Restored(_) => 4 + 8 * 4,
        }
    }

    /// Appends the payload to `out`, or says why this frame cannot be sent.
    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), &'static str> {
        match self {
            Self::Hello(h) => {
                put_str(out, &h.migration_id)?;
                put_str(out, &h.instance_id)?;
                out.extend_from_slice(&h.round.to_be_bytes());
            }
            Self::FileStart(f) => {
                put_str(out, &f.path)?;
                out.extend_from_slice(&f.mode.to_be_bytes());
                out.extend_from_slice(&f.size.to_be_bytes());
            }
            Self::FileChunk(data) => out.extend_from_slice(data),
            Self::FileEnd { sha256 } => out.extend_from_slice(sha256),
            Self::PageDelta(p) => {
                p.check()?;
                let count = u32::try_from(p.vaddrs.len()).map_err(|_| "too many pages")?;
                out.extend_from_slice(&p.pid.to_be_bytes());
                out.extend_from_slice(&p.page_size.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                for v in &p.vaddrs {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.extend_from_slice(&p.data);
            }
            Self::PagesGone(p) => {
                let count = u32::try_from(p.vaddrs.len()).map_err(|_| "too many pages")?;
                out.extend_from_slice(&p.pid.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                for v in &p.vaddrs {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Self::RoundEnd(r) => {
                out.extend_from_slice(&r.round.to_be_bytes());
                out.extend_from_slice(&r.pages.to_be_bytes());
                out.extend_from_slice(&r.bytes.to_be_bytes());
            }
            Self::Error { message } => out.extend_from_slice(message.as_bytes()),
            Self::Done | Self::Ready => {}
            Self::Changes(batch) => {
                out.extend_from_slice(&batch.count.to_be_bytes());
                out.extend_from_slice(&batch.data);
            }
            Self::Manifest(m) => {
                out.extend_from_slice(&m.entries.to_be_bytes());
                out.extend_from_slice(&m.bytes.to_be_bytes());
            }
            Self::Entry(e) => {
                out.push(e.kind as u8);
                put_str(out, &e.path)?;
                out.extend_from_slice(&e.mode.to_be_bytes());
                out.extend_from_slice(&e.uid.to_be_bytes());
                out.extend_from_slice(&e.gid.to_be_bytes());
                put_str(out, &e.link_target)?;
            }
            Self::Restored(r) => {
                out.extend_from_slice(&r.pid.to_be_bytes());
                for ms in [r.images_ms, r.prepare_ms, r.restore_ms, r.adopt_ms] {
                    out.extend_from_slice(&ms.to_be_bytes());
                }
            }
        }
        Ok(())
    }

    /// Parses a payload whose checksum was verified; lengths come from the payload itself and
    /// are checked against its size before anything is allocated.
    fn decode(kind: FrameKind, payload: Vec<u8>) -> Result<Self, &'static str> {
        match kind {
            FrameKind::FileChunk => Ok(Self::FileChunk(payload)),
            FrameKind::Error => String::from_utf8(payload)
                .map(|message| Self::Error { message })
                .map_err(|_| "message is not utf-8"),
            FrameKind::Hello => parse(&payload, |c| {
                Ok(Self::Hello(Hello {
                    migration_id: c.string()?,
                    instance_id: c.string()?,
                    round: c.u32()?,
                }))
            }),
            FrameKind::FileStart => parse(&payload, |c| {
                Ok(Self::FileStart(FileStart {
                    path: c.string()?,
                    mode: c.u32()?,
                    size: c.u64()?,
                }))
            }),
            FrameKind::FileEnd => parse(&payload, |c| Ok(Self::FileEnd { sha256: c.array()? })),
            FrameKind::PageDelta => parse(&payload, |c| {
                let pid = c.u32()?;
                let page_size = c.u32()?;
                let count = c.u32()?;
                if !page_size.is_power_of_two() {
                    return Err("page size is not a power of two");
                }
                let need = u64::from(count) * (8 + u64::from(page_size));
                if need != c.remaining() as u64 {
                    return Err("page count does not match the payload length");
                }
                // count * 8 <= payload length: checked just above.
                let mut vaddrs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let vaddr = c.u64()?;
                    if !vaddr.is_multiple_of(u64::from(page_size)) {
                        return Err("page address is not page-aligned");
                    }
                    vaddrs.push(vaddr);
                }
                let data = c.take(c.remaining())?.to_vec();
                Ok(Self::PageDelta(PageDelta {
                    pid,
                    page_size,
                    vaddrs,
                    data,
                }))
            }),
            FrameKind::PagesGone => parse(&payload, |c| {
                let pid = c.u32()?;
                let count = c.u32()?;
                if u64::from(count) * 8 != c.remaining() as u64 {
                    return Err("address count does not match the payload length");
                }
                let mut vaddrs = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    vaddrs.push(c.u64()?);
                }
                Ok(Self::PagesGone(PagesGone { pid, vaddrs }))
            }),
            FrameKind::RoundEnd => parse(&payload, |c| {
                Ok(Self::RoundEnd(RoundEnd {
                    round: c.u32()?,
                    pages: c.u64()?,
                    bytes: c.u64()?,
                }))
            }),
            FrameKind::Done => parse(&payload, |_| Ok(Self::Done)),
            FrameKind::Ready => parse(&payload, |_| Ok(Self::Ready)),
            FrameKind::Changes => ChangeBatch::decode(payload).map(Self::Changes),
            FrameKind::Manifest => parse(&payload, |c| {
                Ok(Self::Manifest(Manifest {
                    entries: c.u64()?,
                    bytes: c.u64()?,
                }))
            }),
            FrameKind::Entry => parse(&payload, |c| {
                let [code] = c.array()?;
                let kind = TreeEntryKind::from_code(code).ok_or("unknown entry kind")?;
                Ok(Self::Entry(TreeEntry {
                    kind,
                    path: c.string()?,
                    mode: c.u32()?,
                    uid: c.u32()?,
                    gid: c.u32()?,
                    link_target: c.string()?,
                }))
            }),
            FrameKind::Restored => parse(&payload, |c| {
                Ok(Self::Restored(Restored {
                    pid: c.u32()?,
                    images_ms: c.u64()?,
                    prepare_ms: c.u64()?,
                    restore_ms: c.u64()?,
                    adopt_ms: c.u64()?,
                }))
            }),
        }
    }
}

impl WireCounters {
    /// Current values.
    pub fn snapshot(&self) -> WireStats {
        WireStats {
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            frames_received: self.frames_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
        }
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer with the default maximum payload and its own counters. The stream header is
    /// written with the first frame (or by [`finish`](Self::finish)).
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            max_payload: DEFAULT_MAX_PAYLOAD,
            header_sent: false,
            broken: false,
            frames: 0,
            buf: Vec::new(),
            counters: Arc::default(),
        }
    }

    /// Sets the largest payload sent in one frame (and the size of file chunks), clamped to
    /// [`MIN_MAX_PAYLOAD`]..=[`LIMIT_MAX_PAYLOAD`]. The receiver must accept at least as much.
    pub fn with_max_payload(mut self, max: u32) -> Self {
        self.max_payload = max.clamp(MIN_MAX_PAYLOAD, LIMIT_MAX_PAYLOAD);
        self
    }

    /// Counts into `counters` (shared, e.g. by all streams of a migration) instead of its own.
    pub fn with_counters(mut self, counters: Arc<WireCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// The largest payload this writer sends in one frame.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// The counters this writer adds to.
    pub fn counters(&self) -> Arc<WireCounters> {
        Arc::clone(&self.counters)
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Sends one frame; returns once the writer has taken all of it.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        let kind = frame.kind();
        let len = frame.payload_len();
        if len > u64::from(self.max_payload) {
            return Err(WireError::FrameTooLarge {
                frame: self.frames,
                len,
                max: self.max_payload,
            });
        }
        self.buf.clear();
        self.buf.resize(FRAME_HEADER_LEN, 0);
        frame
            .encode_payload(&mut self.buf)
            .map_err(|reason| WireError::InvalidFrame { kind, reason })?;
        self.write_buffered(kind).await
    }

    /// Sends the regular file at `local` as `remote_path` (relative, checked like the receiver
    /// does): `FileStart`, chunks of at most the maximum payload, `FileEnd` with its SHA-256.
    /// If the file changes size meanwhile, the peer gets an `Error` frame and this returns
    /// [`WireError::FileChanged`].
    pub async fn send_file(
        &mut self,
        local: &Path,
        remote_path: &str,
    ) -> Result<SentFile, WireError> {
        split_remote_path(remote_path)?;
        let file_err = |op| {
            move |source| WireError::File {
                op,
                path: local.to_owned(),
                source,
            }
        };
        // Checked before opening: opening a FIFO would block until someone writes to it.
        let meta = tokio::fs::metadata(local).await.map_err(file_err("stat"))?;
        if !meta.is_file() {
            return Err(WireError::NotRegularFile {
                path: local.to_owned(),
            });
        }
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(file_err("open"))?;
        let meta = file.metadata().await.map_err(file_err("stat"))?;
        if !meta.is_file() {
            return Err(WireError::NotRegularFile {
                path: local.to_owned(),
            });
        }
        let size = meta.len();
        self.send(&Frame::FileStart(FileStart {
            path: remote_path.to_owned(),
            mode: meta.permissions().mode(),
            size,
        }))
        .await?;

        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        while sent < size {
            let want = usize::try_from((size - sent).min(u64::from(self.max_payload)))
                .unwrap_or(usize::MAX);
            self.buf.resize(FRAME_HEADER_LEN + want, 0);
            let got = read_full(&mut file, &mut self.buf[FRAME_HEADER_LEN..])
                .await
                .map_err(file_err("read"))?;
            if got < want {
                return Err(self.abort_file(local, size).await);
            }
            hasher.update(&self.buf[FRAME_HEADER_LEN..]);
            self.write_buffered(FrameKind::FileChunk).await?;
            sent += want as u64;
        }
        let mut probe = [0u8; 1];
        if file.read(&mut probe).await.map_err(file_err("read"))? != 0 {
            return Err(self.abort_file(local, size).await);
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        self.send(&Frame::FileEnd { sha256 }).await?;
        tracing::debug!(local = %local.display(), remote = remote_path, size, "migration file sent");
        Ok(SentFile { size, sha256 })
    }

    /// Flushes the underlying writer.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().await.map_err(WireError::Stream)
    }

    /// Writes the stream header if no frame was sent, flushes, and shuts the writer down (a
    /// quinn `SendStream` is then finished). Returns the writer, e.g. to wait for the peer.
    pub async fn finish(mut self) -> Result<W, WireError> {
        if self.broken {
            return Err(WireError::Broken);
        }
        if !self.header_sent {
            self.write_stream_header().await?;
        }
        self.inner.shutdown().await.map_err(WireError::Stream)?;
        Ok(self.inner)
    }

    /// Tells the peer the file cannot be sent as announced.
    async fn abort_file(&mut self, local: &Path, announced: u64) -> WireError {
        let err = WireError::FileChanged {
            path: local.to_owned(),
            announced,
        };
        let message = err.to_string();
        if let Err(send_err) = self.send(&Frame::Error { message }).await {
            tracing::warn!(error = %send_err, "telling the peer a file changed failed");
        }
        err
    }

    async fn write_stream_header(&mut self) -> Result<(), WireError> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        header[..MAGIC.len()].copy_from_slice(&MAGIC);
        header[MAGIC.len()..].copy_from_slice(&VERSION.to_be_bytes());
        self.broken = true;
        self.inner
            .write_all(&header)
            .await
            .map_err(WireError::Stream)?;
        self.broken = false;
        self.header_sent = true;
        self.counters
            .bytes_sent
            .fetch_add(STREAM_HEADER_LEN as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Completes the frame whose payload follows a header-sized gap in `buf`, and writes it.
    async fn write_buffered(&mut self, kind: FrameKind) -> Result<(), WireError> {
        if self.broken {
            return Err(WireError::Broken);
        }
        let len = self.buf.len() - FRAME_HEADER_LEN;
        let len = u32::try_from(len)
            .ok()
            .filter(|len| *len <= self.max_payload)
            .ok_or(WireError::FrameTooLarge {
                frame: self.frames,
                len: len as u64,
                max: self.max_payload,
            })?;
        self.buf[0] = kind as u8;
        self.buf[1] = 0;
        self.buf[2..6].copy_from_slice(&len.to_be_bytes());
        let header_crc = crc32c::crc32c(&self.buf[..6]);
        self.buf[6..10].copy_from_slice(&header_crc.to_be_bytes());
        let crc = crc32c::crc32c(&self.buf);
        self.buf.extend_from_slice(&crc.to_be_bytes());

        if !self.header_sent {
            self.write_stream_header().await?;
        }
        self.broken = true;
        self.inner
            .write_all(&self.buf)
            .await
            .map_err(WireError::Stream)?;
        self.broken = false;
        self.frames += 1;
        self.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_sent
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the default maximum payload and its own counters.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            max_payload: DEFAULT_MAX_PAYLOAD,
            header_read: false,
            broken: false,
            frames: 0,
            counters: Arc::default(),
        }
    }

    /// Sets the largest payload accepted in one frame, clamped like
    /// [`FrameWriter::with_max_payload`].
    pub fn with_max_payload(mut self, max: u32) -> Self {
        self.max_payload = max.clamp(MIN_MAX_PAYLOAD, LIMIT_MAX_PAYLOAD);
        self
    }

    /// Counts into `counters` (shared, e.g. by all streams of a migration) instead of its own.
    pub fn with_counters(mut self, counters: Arc<WireCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// The counters this reader adds to.
    pub fn counters(&self) -> Arc<WireCounters> {
        Arc::clone(&self.counters)
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next frame, or `None` when the stream ends cleanly at a frame boundary (after its
    /// header). After an error, every call returns [`WireError::Broken`].
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        if self.broken {
            return Err(WireError::Broken);
        }
        // Set until the frame is fully read: an error or a cancelled call leaves it set.
        self.broken = true;
        let frame = self.read_frame().await?;
        self.broken = false;
        Ok(frame)
    }

    /// Receives the next file (which must be announced by the next frame) below `dest_dir`.
    pub async fn receive_file(&mut self, dest_dir: &Path) -> Result<ReceivedFile, WireError> {
        match self.next().await? {
            Some(Frame::FileStart(start)) => self.receive_announced_file(start, dest_dir).await,
            Some(Frame::Error { message }) => Err(WireError::Peer { message }),
            Some(other) => Err(WireError::UnexpectedFrame {
                got: other.kind(),
                expected: "file-start",
            }),
            None => Err(WireError::UnexpectedEnd {
                expected: "file-start",
            }),
        }
    }

    /// Receives the file that `start` (already read with [`next`](Self::next)) announced, below
    /// `dest_dir`; see the module doc for how the path is checked and the file written.
    pub async fn receive_announced_file(
        &mut self,
        start: FileStart,
        dest_dir: &Path,
    ) -> Result<ReceivedFile, WireError> {
        let components: Vec<String> = split_remote_path(&start.path)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let final_path = dest_dir.join(&start.path);
        let (partial, file) = {
            let dest_dir = dest_dir.to_owned();
            let announced = start.path.clone();
            tokio::task::spawn_blocking(move || Partial::create(&dest_dir, &announced, components))
                .await
                .map_err(|e| WireError::File {
                    op: "create temporary file for",
                    path: final_path.clone(),
                    source: io::Error::other(e),
                })??
        };
        let mut file = tokio::fs::File::from_std(file);
        let write_err = |op| {
            let path = final_path.clone();
            move |source| WireError::File { op, path, source }
        };

        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let stated = loop {
            match self.next().await? {
                Some(Frame::FileChunk(data)) => {
                    received += data.len() as u64;
                    // Stop at once: a peer must not fill the disk past what it announced.
                    if received > start.size {
                        return Err(WireError::SizeMismatch {
                            path: start.path,
                            expected: start.size,
                            actual: received,
                        });
                    }
                    hasher.update(&data);
                    file.write_all(&data).await.map_err(write_err("write"))?;
                }
                Some(Frame::FileEnd { sha256 }) => break sha256,
                Some(Frame::Error { message }) => return Err(WireError::Peer { message }),
                Some(other) => {
                    return Err(WireError::UnexpectedFrame {
                        got: other.kind(),
                        expected: "file-chunk or file-end",
                    })
                }
                None => {
                    return Err(WireError::UnexpectedEnd {
                        expected: "file-chunk or file-end",
                    })
                }
            }
        };
        if received != start.size {
            return Err(WireError::SizeMismatch {
                path: start.path,
                expected: start.size,
                actual: received,
            });
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        if sha256 != stated {
            return Err(WireError::HashMismatch {
                path: start.path,
                expected: hex::encode(stated),
                actual: hex::encode(sha256),
            });
        }
        file.flush().await.map_err(write_err("write"))?;
        file.set_permissions(std::fs::Permissions::from_mode(start.mode & 0o777))
            .await
            .map_err(write_err("chmod"))?;
        drop(file);
        tokio::task::spawn_blocking(move || partial.commit())
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(write_err("rename into place"))?;
        tracing::debug!(path = %final_path.display(), size = received, "migration file received");
        Ok(ReceivedFile {
            path: final_path,
            size: received,
            sha256,
        })
    }

    async fn read_stream_header(&mut self) -> Result<(), WireError> {
        let mut header = [0u8; STREAM_HEADER_LEN];
        let got = read_full(&mut self.inner, &mut header)
            .await
            .map_err(WireError::Stream)?;
        self.counters
            .bytes_received
            .fetch_add(got as u64, Ordering::Relaxed);
        let magic_got = got.min(MAGIC.len());
        if header[..magic_got] != MAGIC[..magic_got] {
            return Err(WireError::BadMagic {
                found: header[..magic_got].to_vec(),
            });
        }
        if got < STREAM_HEADER_LEN {
            return Err(WireError::Truncated {
                what: "stream header",
                got,
                expected: STREAM_HEADER_LEN,
            });
        }
        let peer = u16::from_be_bytes([header[8], header[9]]);
        if peer != VERSION {
            return Err(WireError::VersionMismatch {
                peer,
                ours: VERSION,
            });
        }
        self.header_read = true;
        Ok(())
    }

    async fn read_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if !self.header_read {
            self.read_stream_header().await?;
        }
        let frame = self.frames;
        let mut header = [0u8; FRAME_HEADER_LEN];
        let got = self.read_part(&mut header, "frame header").await?;
        if got == 0 {
            return Ok(None);
        }
        let [code, flags, l0, l1, l2, l3, c0, c1, c2, c3] = header;
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let stated = u32::from_be_bytes([c0, c1, c2, c3]);
        let computed = crc32c::crc32c(&header[..6]);
        if computed != stated {
            return Err(WireError::BadChecksum {
                frame,
                part: "header",
                computed,
                stated,
            });
        }
        if len > self.max_payload {
            return Err(WireError::FrameTooLarge {
                frame,
                len: u64::from(len),
                max: self.max_payload,
            });
        }
        let kind = FrameKind::from_code(code).ok_or(WireError::UnknownType { frame, code })?;
        if flags != 0 {
            return Err(WireError::UnknownFlags { frame, kind, flags });
        }
        // len <= max_payload <= LIMIT_MAX_PAYLOAD: checked above.
        let mut payload = vec![0u8; len as usize];
        self.read_part(&mut payload, "payload").await?;
        let mut trailer = [0u8; FRAME_TRAILER_LEN];
        self.read_part(&mut trailer, "trailer").await?;
        let stated = u32::from_be_bytes(trailer);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header), &payload);
        if computed != stated {
            return Err(WireError::BadChecksum {
                frame,
                part: "payload",
                computed,
                stated,
            });
        }
        self.frames += 1;
        self.counters
            .frames_received
            .fetch_add(1, Ordering::Relaxed);
        let frame = Frame::decode(kind, payload).map_err(|reason| WireError::Malformed {
            frame,
            kind,
            reason,
        })?;
        Ok(Some(frame))
    }

    /// Fills `buf`; a frame header may find the stream ended (returns 0), any other part may not.
    async fn read_part(&mut self, buf: &mut [u8], what: &'static str) -> Result<usize, WireError> {
        let got = read_full(&mut self.inner, buf)
            .await
            .map_err(WireError::Stream)?;
        self.counters
            .bytes_received
            .fetch_add(got as u64, Ordering::Relaxed);
        let clean_end = got == 0 && what == "frame header";
        if got < buf.len() && !clean_end {
            return Err(WireError::Truncated {
                what,
                got,
                expected: buf.len(),
            });
        }
        Ok(got)
    }
}

/// A file being received under a temporary name; removed on drop unless committed.
struct Partial {
    dir: OwnedFd,
    temp: String,
    name: String,
    committed: bool,
}

impl Partial {
    /// Opens (creating as needed, never following a symlink) the directories of `components`
    /// below `dest_dir`, and creates a temporary file in the last one.
    fn create(
        dest_dir: &Path,
        announced: &str,
        components: Vec<String>,
    ) -> Result<(Self, std::fs::File), WireError> {
        let io_err = |op, source| WireError::File {
            op,
            path: dest_dir.join(announced),
            source,
        };
        let (dir, name) = open_parent_below(dest_dir, announced, components)?;
        let file_flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut attempts = 0;
        loop {
            let temp = format!("{PARTIAL_PREFIX}{:016x}", rand::random::<u64>());
            match openat_owned(&dir, &temp, file_flags, Mode::from_bits_truncate(0o600)) {
                Ok(fd) => {
                    let partial = Self {
                        dir,
                        temp,
                        name,
                        committed: false,
                    };
                    return Ok((partial, std::fs::File::from(fd)));
                }
                Err(Errno::EEXIST) if attempts < 3 => attempts += 1,
                Err(e) => return Err(io_err("create temporary file for", e.into())),
            }
        }
    }

    /// Renames the temporary file to its final name (replacing a file or symlink there).
    fn commit(mut self) -> io::Result<()> {
        nix::fcntl::renameat(
            Some(self.dir.as_raw_fd()),
            self.temp.as_str(),
            Some(self.dir.as_raw_fd()),
            self.name.as_str(),
        )?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Err(e) = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            self.temp.as_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            tracing::warn!(temp = %self.temp, error = %e, "removing a partly received file failed");
        }
    }
}

/// Reads a payload field by field; every read is bounds-checked.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or("payload too short")?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        self.take(N)?.try_into().map_err(|_| "payload too short")
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, &'static str> {
        let len = self.u16()?;
        let bytes = self.take(usize::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not utf-8")
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }
}

/// Runs `f` over `payload` and insists that it used all of it.
fn parse<T>(
    payload: &[u8],
    f: impl FnOnce(&mut Cursor<'_>) -> Result<T, &'static str>,
) -> Result<T, &'static str> {
    let mut cursor = Cursor { rest: payload };
    let value = f(&mut cursor)?;
    if cursor.remaining() != 0 {
        return Err("trailing bytes after the payload");
    }
    Ok(value)
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), &'static str> {
    let len = u16::try_from(s.len()).map_err(|_| "string longer than 65535 bytes")?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Splits a peer-supplied path into plain components, or rejects it.
fn split_remote_path(path: &str) -> Result<Vec<&str>, WireError> {
    let reject = |reason| {
        Err(WireError::PathRejected {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return reject("empty");
    }
    if path.len() > MAX_PATH_LEN {
        return reject("longer than 4096 bytes");
    }
    if path.contains('\0') {
        return reject("contains a NUL byte");
    }
    if path.starts_with('/') {
        return reject("absolute");
    }
    let components: Vec<&str> = path.split('/').collect();
    for component in &components {
        match *component {
            "" => return reject("has an empty component"),
            "." | ".." => return reject("has a '.' or '..' component"),
            c if c.len() > MAX_NAME_LEN => return reject("has a component over 255 bytes"),
            _ => {}
        }
    }
    Ok(components)
}

/// Opens (creating as needed with mode 0755, never following a symlink) the directories of
/// `components` but the last below `dest_dir`; returns that directory and the last component.
fn open_parent_below(
    dest_dir: &Path,
    announced: &str,
    mut components: Vec<String>,
) -> Result<(OwnedFd, String), WireError> {
    let io_err = |op, source| WireError::File {
        op,
        path: dest_dir.join(announced),
        source,
    };
    let rejected = |reason| WireError::PathRejected {
        path: announced.to_owned(),
        reason,
    };
    let name = components.pop().ok_or(rejected("empty"))?;
    // The destination itself is ours and may be reached through symlinks; only what is
    // below it comes from the peer.
    let mut dir: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dest_dir)
        .map_err(|source| WireError::File {
            op: "open destination directory",
            path: dest_dir.to_owned(),
            source,
        })?
        .into();
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    for component in &components {
        let next = match openat_owned(&dir, component, dir_flags, Mode::empty()) {
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    component.as_str(),
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io_err("create directory for", e.into())),
                }
                openat_owned(&dir, component, dir_flags, Mode::empty())
            }
            other => other,
        };
        dir = match next {
            Ok(fd) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                return Err(rejected("goes through a symlink or a non-directory"))
            }
            Err(e) => return Err(io_err("open directory for", e.into())),
        };
    }
    Ok((dir, name))
}

/// Checks a peer's path and opens its parent below `dest_dir` (see [`open_parent_below`]).
fn parent_of_remote(dest_dir: &Path, path: &str) -> Result<(OwnedFd, String), WireError> {
    let components = split_remote_path(path)?
        .into_iter()
        .map(str::to_owned)
        .collect();
    open_parent_below(dest_dir, path, components)
}

/// Creates the directory `path` (a peer's path, checked like a received file's) below
/// `dest_dir` with `mode & 0o7777` (before the umask). An existing directory there is accepted
/// as it is; anything else there is an error. Blocks.
pub fn create_dir_below(dest_dir: &Path, path: &str, mode: u32) -> Result<(), WireError> {
    let (dir, name) = parent_of_remote(dest_dir, path)?;
    let err = |op, source: Errno| WireError::File {
        op,
        path: dest_dir.join(path),
        source: source.into(),
    };
    match nix::sys::stat::mkdirat(
        Some(dir.as_raw_fd()),
        name.as_str(),
        Mode::from_bits_truncate(mode & 0o7777),
    ) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => {
            let stat = nix::sys::stat::fstatat(
                Some(dir.as_raw_fd()),
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| err("stat", e))?;
            if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
                Ok(())
            } else {
                Err(err("create directory", Errno::EEXIST))
            }
        }
        Err(e) => Err(err("create directory", e)),
    }
}

/// Creates a symlink `path` → `target` below `dest_dir`. The target is stored as given (it is
/// resolved inside the container, never by this function); it must be 1 to 4096 bytes without
/// NUL. Blocks.
pub fn create_symlink_below(dest_dir: &Path, path: &str, target: &str) -> Result<(), WireError> {
    if target.is_empty() || target.len() > MAX_PATH_LEN || target.contains('\0') {
        return Err(WireError::PathRejected {
            path: path.to_owned(),
            reason: "symlink target empty, over 4096 bytes or with a NUL byte",
        });
    }
    let (dir, name) = parent_of_remote(dest_dir, path)?;
    nix::unistd::symlinkat(target, Some(dir.as_raw_fd()), name.as_str()).map_err(|e| {
        WireError::File {
            op: "create symlink",
            path: dest_dir.join(path),
            source: e.into(),
        }
    })
}

/// Creates an overlayfs whiteout (a 0/0 character device) at `path` below `dest_dir`. Needs
/// `CAP_MKNOD`. Blocks.
pub fn create_whiteout_below(dest_dir: &Path, path: &str) -> Result<(), WireError> {
    let (dir, name) = parent_of_remote(dest_dir, path)?;
    nix::sys::stat::mknodat(
        Some(dir.as_raw_fd()),
        name.as_str(),
        nix::sys::stat::SFlag::S_IFCHR,
        Mode::empty(),
        0,
    )
    .map_err(|e| WireError::File {
        op: "create whiteout",
        path: dest_dir.join(path),
        source: e.into(),
    })
}

/// Sets the owner (when `owner` is given) and then the mode (`mode & 0o7777`, set-id bits
/// included, when given; the chown would clear them otherwise) of `path` below `dest_dir`. A
/// symlink there gets its own owner and keeps its mode (Linux has none to set); the link is
/// never followed. Blocks.
pub fn set_attrs_below(
    dest_dir: &Path,
    path: &str,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
) -> Result<(), WireError> {
    let (dir, name) = parent_of_remote(dest_dir, path)?;
    let err = |op, source: Errno| WireError::File {
        op,
        path: dest_dir.join(path),
        source: source.into(),
    };
    let nofollow = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchownat(
            Some(dir.as_raw_fd()),
            name.as_str(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nofollow,
        )
        .map_err(|e| err("chown", e))?;
    }
    if let Some(mode) = mode {
        let stat = nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name.as_str(), nofollow)
            .map_err(|e| err("stat", e))?;
        // Only this agent writes below its staging directory, so the entry checked here is
        // still no symlink when fchmodat (which cannot refuse to follow one) runs.
        if stat.st_mode & libc::S_IFMT != libc::S_IFLNK {
            nix::sys::stat::fchmodat(
                Some(dir.as_raw_fd()),
                name.as_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| err("chmod", e))?;
        }
    }
    Ok(())
}

fn openat_owned(dir: &OwnedFd, path: &str, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), path, flags, mode)?;
    // SAFETY: `openat` just returned this descriptor, open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
