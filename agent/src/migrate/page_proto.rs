//! Counts the pages CRIU's page server sends to the lazy-pages daemon, from the bytes the
//! post-copy relay (`lazy_relay`) carries, without touching them.
//!
//! In post-copy the daemon (target) asks the dumping CRIU's page server (source) for pages with
//! `PS_IOV_GET` requests; the server answers each with a `struct page_server_iov` (CRIU 4.2.1,
//! `criu/page-xfer.c`) followed by the pages:
//!
//! ```text
//! offset size  field
//!  0      4    cmd       PS_IOV_ADD_F (6) | PE_PRESENT (4) << 16
//!  4      4    (padding: whatever the request held there)
//!  8      8    nr_pages  pages that follow (CRIU may send fewer than asked)
//! 16      8    vaddr     page-aligned address of the first
//! 24      8    dst_id    the task's id
//! 32           nr_pages × page size bytes of page data
//! ```
//!
//! All in the host's byte order (both CRIUs run on this architecture). A server that finds no
//! pages sends nothing and drops the connection in 4.2.1; a header with `nr_pages` 0 (what
//! `page-xfer.h`'s comment describes, and what the daemon would read as "none") counts as an
//! empty reply. When the daemon is done it sends `PS_IOV_CLOSE` and the server answers with a
//! 4-byte status, the last bytes of the stream.
//!
//! [`PageStreamCounter`] is fed the stream in whatever chunks the relay reads and keeps only a
//! header's 32 bytes between them: no allocation, whatever the volume. It only counts: bytes it
//! cannot make sense of stop the counting, never the stream.

use std::fmt;

/// Bytes of a `struct page_server_iov` on x86-64 and arm64 (a `u32` padded to 8, three `u64`).
pub const HEADER_LEN: usize = 32;

/// Bytes of the server's answer to `PS_IOV_CLOSE` (an `int32_t` status).
pub const CLOSE_STATUS_LEN: usize = 4;

const PS_IOV_ADD: u32 = 1;
const PS_IOV_ADD_F: u32 = 6;
const PS_CMD_BITS: u32 = 16;
const PS_CMD_MASK: u32 = (1 << PS_CMD_BITS) - 1;
const PE_PARENT: u32 = 1 << 0;
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// Most bytes one reply may announce: far beyond any real request (the daemon asks for what its
/// buffer holds), small enough that garbage read as a header is refused.
const MAX_REPLY_BYTES: u64 = 1 << 40;

/// Why a page-server stream stopped being counted (the stream itself goes on untouched).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageStreamError {
    /// The header's command is not a page reply.
    #[error("page-server reply at byte {offset}: command {cmd:#x} is not a page reply")]
    Command {
        /// Stream offset of the header.
        offset: u64,
        /// The command word read.
        cmd: u32,
    },
    /// The header announces more than a reply can carry.
    #[error("page-server reply at byte {offset}: {nr_pages} pages is more than a reply carries")]
    TooManyPages {
        /// Stream offset of the header.
        offset: u64,
        /// The page count read.
        nr_pages: u64,
    },
    /// The header's address is not page-aligned.
    #[error("page-server reply at byte {offset}: address {vaddr:#x} is not page-aligned")]
    Misaligned {
        /// Stream offset of the header.
        offset: u64,
        /// The address read.
        vaddr: u64,
    },
    /// The stream ended inside a header (and not after a 4-byte close status).
    #[error("page-server stream ended {have} bytes into a reply's header (at byte {offset})")]
    TruncatedHeader {
        /// Stream offset of the header.
        offset: u64,
        /// Bytes of it that arrived.
        have: usize,
    },
    /// The stream ended before a reply's pages were all there.
    #[error(
        "page-server stream ended {missing} bytes short of a reply's pages (at byte {offset})"
    )]
    TruncatedPages {
        /// Where the stream ended.
        offset: u64,
        /// Page bytes the last reply still owed.
        missing: u64,
    },
}

/// What a page-server stream carried (or one [`PageStreamCounter::feed`] of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCount {
    /// Reply headers read, empty replies included.
    pub replies: u64,
    /// Whole pages that went by.
    pub pages: u64,
    /// Page bytes that went by (headers not included); `pages × page size` at a reply's end.
    pub page_bytes: u64,
}

impl PageCount {
    fn add(&mut self, other: PageCount) {
        self.replies += other.replies;
        self.pages += other.pages;
        self.page_bytes += other.page_bytes;
    }
}

/// What one [`PageStreamCounter::feed`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fed {
    /// Counted in this chunk (before the counting stopped, if it did).
    pub counted: PageCount,
    /// Set on the one call where the stream stopped parsing; later calls count nothing.
    pub stopped: Option<PageStreamError>,
}

/// How a stream ended, by [`PageStreamCounter::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Right after a reply.
    AtReply,
    /// After the server's answer to the daemon's `PS_IOV_CLOSE`, with its status (0: fine).
    Closed {
        /// The status the server sent.
        status: i32,
    },
    /// The counting had stopped before the end.
    Uncounted,
}

/// Counts the replies of a page server's stream fed in arbitrary chunks.
#[derive(Clone)]
pub struct PageStreamCounter {
    page_size: u64,
    /// Bytes fed so far (for error messages).
    offset: u64,
    state: State,
    total: PageCount,
}

#[derive(Clone)]
enum State {
    /// Reading a header: its bytes so far.
    Header { buf: [u8; HEADER_LEN], have: usize },
    /// Inside a reply's pages: bytes still to come, and bytes into the current page.
    Pages { left: u64, into_page: u64 },
    /// The stream did not parse: nothing more is counted.
    Stopped,
}

impl State {
    fn header() -> Self {
        State::Header {
            buf: [0; HEADER_LEN],
            have: 0,
        }
    }
}

impl fmt::Debug for PageStreamCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Header { have, .. } => format!("header ({have} bytes)"),
            State::Pages { left, .. } => format!("pages ({left} bytes left)"),
            State::Stopped => "stopped".to_owned(),
        };
        f.debug_struct("PageStreamCounter")
            .field("page_size", &self.page_size)
            .field("offset", &self.offset)
            .field("state", &state)
            .field("total", &self.total)
            .finish()
    }
}

impl PageStreamCounter {
    /// A counter for pages of `page_size` bytes (CRIU's, i.e. the host's; a power of two).
    /// Any other size counts nothing: every stream stops at its first header.
    pub fn new(page_size: u64) -> Self {
        Self {
            page_size,
            offset: 0,
            state: if page_size.is_power_of_two() {
                State::header()
            } else {
                State::Stopped
            },
            total: PageCount::default(),
        }
    }

    /// Counts what `chunk`, the stream's next bytes, completes.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Fed {
        let mut fed = Fed::default();
        while !chunk.is_empty() {
            match &mut self.state {
                State::Header { buf, have } => {
                    let take = (HEADER_LEN - *have).min(chunk.len());
                    buf[*have..*have + take].copy_from_slice(&chunk[..take]);
                    *have += take;
                    chunk = &chunk[take..];
                    self.offset += take as u64;
                    if *have < HEADER_LEN {
                        break;
                    }
                    let at = self.offset - HEADER_LEN as u64;
                    match parse_header(buf, self.page_size, at) {
                        Ok(nr_pages) => {
                            fed.counted.replies += 1;
                            self.state = if nr_pages == 0 {
                                State::header()
                            } else {
                                State::Pages {
                                    left: nr_pages * self.page_size,
                                    into_page: 0,
                                }
                            };
                        }
                        Err(e) => {
                            self.state = State::Stopped;
                            fed.stopped = Some(e);
                            break;
                        }
                    }
                }
                State::Pages { left, into_page } => {
                    // `take` fits in usize: it is at most `chunk.len()`.
                    let take = (*left).min(chunk.len() as u64);
                    let step = *into_page + take;
                    fed.counted.pages += step / self.page_size;
                    fed.counted.page_bytes += take;
                    *into_page = step % self.page_size;
                    *left -= take;
                    chunk = &chunk[take as usize..];
                    self.offset += take;
                    if *left == 0 {
                        self.state = State::header();
                    }
                }
                State::Stopped => break,
            }
        }
        self.total.add(fed.counted);
        fed
    }

    /// Everything counted so far.
    pub fn total(&self) -> PageCount {
        self.total
    }

    /// False once the stream stopped parsing.
    pub fn is_counting(&self) -> bool {
        !matches!(self.state, State::Stopped)
    }

    /// How the stream ended, once it did: `Err` if it ended inside a reply.
    pub fn finish(&self) -> Result<StreamEnd, PageStreamError> {
        match &self.state {
            State::Header { have: 0, .. } => Ok(StreamEnd::AtReply),
            State::Header { buf, have } if *have == CLOSE_STATUS_LEN => {
                let mut status = [0u8; CLOSE_STATUS_LEN];
                status.copy_from_slice(&buf[..CLOSE_STATUS_LEN]);
                Ok(StreamEnd::Closed {
                    status: i32::from_ne_bytes(status),
                })
            }
            State::Header { have, .. } => Err(PageStreamError::TruncatedHeader {
                offset: self.offset - *have as u64,
                have: *have,
            }),
            State::Pages { left, .. } => Err(PageStreamError::TruncatedPages {
                offset: self.offset,
                missing: *left,
            }),
            State::Stopped => Ok(StreamEnd::Uncounted),
        }
    }
}

/// The page count a reply header announces, if it is one.
fn parse_header(h: &[u8; HEADER_LEN], page_size: u64, offset: u64) -> Result<u64, PageStreamError> {
    let u32_at = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_ne_bytes(b)
    };
    let cmd = u32_at(0);
    let (op, flags) = (cmd & PS_CMD_MASK, cmd >> PS_CMD_BITS);
    let reply = match op {
        PS_IOV_ADD_F => flags & PE_PRESENT != 0 && flags & !(PE_PARENT | PE_LAZY | PE_PRESENT) == 0,
        PS_IOV_ADD => flags == 0,
        _ => false,
    };
    if !reply {
        return Err(PageStreamError::Command { offset, cmd });
    }
    let nr_pages = u64_at(8);
    if nr_pages > MAX_REPLY_BYTES / page_size {
        return Err(PageStreamError::TooManyPages { offset, nr_pages });
    }
    let vaddr = u64_at(16);
    if nr_pages > 0 && vaddr % page_size != 0 {
        return Err(PageStreamError::Misaligned { offset, vaddr });
    }
    Ok(nr_pages)
}

/// `PS_IOV_GET`: the daemon asks for pages (a header, nothing after it).
const PS_IOV_GET: u32 = 7;
/// `PS_IOV_CLOSE` / `PS_IOV_FORCE_CLOSE`: the daemon is done.
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

/// Follows the daemon's side of the conversation (headers only: `PS_IOV_GET`s, then
/// `PS_IOV_CLOSE`), to tell its hang-up after the close from a hang-up without one.
///
/// The page server reads a plain end of its connection before the daemon's close as the end of
/// a good transfer (CRIU 4.2.1, `page_server_serve`), so a daemon that died would look, at the
/// source, like every page delivered; the relay resets the connection instead when this says
/// the close never came.
#[derive(Debug, Default, Clone)]
pub struct RequestTracker {
    /// Bytes of the header being read.
    have: usize,
    /// Its command word (the first 4 bytes, host order).
    cmd: [u8; 4],
    /// The last whole header's command (low 16 bits).
    last: Option<u32>,
    /// Something that is not a request came: nothing is judged.
    lost: bool,
}

impl RequestTracker {
    /// Takes the next bytes the daemon sent.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !self.lost && !chunk.is_empty() {
            let take = (HEADER_LEN - self.have).min(chunk.len());
            for (i, b) in chunk[..take].iter().enumerate() {
                if let Some(slot) = self.cmd.get_mut(self.have + i) {
                    *slot = *b;
                }
            }
            self.have += take;
            chunk = &chunk[take..];
            if self.have == HEADER_LEN {
                let cmd = u32::from_ne_bytes(self.cmd) & PS_CMD_MASK;
                if matches!(cmd, PS_IOV_GET | PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE) {
                    self.last = Some(cmd);
                } else {
                    self.lost = true;
                }
                self.have = 0;
            }
        }
    }

    /// At the daemon's end of stream: `Some(true)` after a close, `Some(false)` when it hung up
    /// without one (mid-header, or after a request), `None` when its bytes were not requests.
    pub fn closed_cleanly(&self) -> Option<bool> {
        if self.lost {
            return None;
        }
        Some(self.have == 0 && matches!(self.last, Some(PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE)))
    }
}

#[cfg(test)]
#[path = "page_proto_tests.rs"]
mod tests;
