#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use super::*;

const PS: u64 = 4096;

fn header(cmd: u32, nr_pages: u64, vaddr: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&cmd.to_ne_bytes());
    h.extend_from_slice(&[0xa5; 4]); // padding: not looked at
    h.extend_from_slice(&nr_pages.to_ne_bytes());
    h.extend_from_slice(&vaddr.to_ne_bytes());
    h.extend_from_slice(&77u64.to_ne_bytes());
    h
}

/// A reply as CRIU 4.2.1 sends it, pages filled with a pattern.
fn reply(nr_pages: u64, vaddr: u64) -> Vec<u8> {
    let mut r = header(PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS, nr_pages, vaddr);
    r.extend((0..nr_pages * PS).map(|i| (i % 251) as u8));
    r
}

/// Three replies (1, 0 and 3 pages), then the close status.
fn stream() -> Vec<u8> {
    let mut s = reply(1, 0x7f00_0000_0000);
    s.extend(header(PS_IOV_ADD, 0, 0));
    s.extend(reply(3, 0x40_0000));
    s.extend(0i32.to_ne_bytes());
    s
}

fn want() -> PageCount {
    PageCount {
        replies: 3,
        pages: 4,
        page_bytes: 4 * PS,
    }
}

#[test]
fn the_header_has_criu_s_layout() {
    assert_eq!(header(0, 0, 0).len(), HEADER_LEN);
    let r = reply(2, 0x1000);
    assert_eq!(r.len(), HEADER_LEN + 2 * PS as usize);
}

#[test]
fn a_stream_in_one_piece_counts_every_reply() {
    let mut c = PageStreamCounter::new(PS);
    let fed = c.feed(&stream());
    assert_eq!(fed.counted, want());
    assert_eq!(fed.stopped, None);
    assert_eq!(c.total(), want());
    assert_eq!(c.finish(), Ok(StreamEnd::Closed { status: 0 }));
}

#[test]
fn split_at_every_offset_it_counts_the_same() {
    let s = stream();
    for cut in 0..=s.len() {
        let mut c = PageStreamCounter::new(PS);
        let a = c.feed(&s[..cut]);
        let b = c.feed(&s[cut..]);
        assert_eq!(a.stopped.or(b.stopped), None, "cut at {cut}");
        let mut sum = a.counted;
        sum.add(b.counted);
        assert_eq!(sum, want(), "cut at {cut}");
        assert_eq!(c.total(), want(), "cut at {cut}");
        assert_eq!(
            c.finish(),
            Ok(StreamEnd::Closed { status: 0 }),
            "cut at {cut}"
        );
    }
}

#[test]
fn byte_by_byte_pages_count_as_each_one_completes() {
    let s = reply(3, 0x1000);
    let mut c = PageStreamCounter::new(PS);
    let mut seen = Vec::new();
    for (i, b) in s.iter().enumerate() {
        let fed = c.feed(std::slice::from_ref(b));
        if fed.counted.pages > 0 {
            seen.push(i + 1);
        }
    }
    let at = |n: u64| HEADER_LEN + (n * PS) as usize;
    assert_eq!(seen, vec![at(1), at(2), at(3)]);
    assert_eq!(c.total().page_bytes, 3 * PS);
    assert_eq!(c.finish(), Ok(StreamEnd::AtReply));
}

#[test]
fn odd_chunk_sizes_count_the_same() {
    let mut s = Vec::new();
    for i in 0..40 {
        s.extend(reply(i % 7, 0x10_0000 + i * PS));
    }
    let pages: u64 = (0..40).map(|i| i % 7).sum();
    for size in [1, 3, 31, 32, 33, 4095, 4096, 4097, 65_536] {
        let mut c = PageStreamCounter::new(PS);
        for chunk in s.chunks(size) {
            assert_eq!(c.feed(chunk).stopped, None);
        }
        let t = c.total();
        assert_eq!((t.replies, t.pages, t.page_bytes), (40, pages, pages * PS));
        assert_eq!(c.finish(), Ok(StreamEnd::AtReply));
    }
}

#[test]
fn a_bad_header_stops_the_counting_once_and_keeps_what_came_before() {
    let mut s = reply(2, 0x2000);
    let bad_at = s.len() as u64;
    s.extend(header(7, 1, 0x3000)); // a request (PS_IOV_GET), not a reply
    s.extend(reply(5, 0x4000));
    let mut c = PageStreamCounter::new(PS);
    // Split inside the bad header: found when its last byte arrives.
    let fed = c.feed(&s[..bad_at as usize + 10]);
    assert_eq!((fed.counted.pages, fed.stopped), (2, None));
    let fed = c.feed(&s[bad_at as usize + 10..]);
    assert_eq!(fed.counted, PageCount::default());
    assert!(fed.stopped.is_some());
    let mut c = PageStreamCounter::new(PS);
    let fed = c.feed(&s);
    assert_eq!(
        fed.stopped,
        Some(PageStreamError::Command {
            offset: bad_at,
            cmd: 7
        })
    );
    assert_eq!(fed.counted.pages, 2);
    assert!(!c.is_counting());
    // Later bytes count nothing and report nothing again.
    assert_eq!(c.feed(&reply(1, 0)), Fed::default());
    assert_eq!(c.total().pages, 2);
    assert_eq!(c.finish(), Ok(StreamEnd::Uncounted));
}

#[test]
fn headers_that_cannot_be_replies_are_refused() {
    let bad = |h: Vec<u8>| {
        let mut c = PageStreamCounter::new(PS);
        c.feed(&h).stopped.unwrap()
    };
    let add_f = PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS;
    assert!(matches!(
        bad(header(PS_IOV_ADD_F | PE_PARENT << PS_CMD_BITS, 1, 0)),
        PageStreamError::Command { .. }
    ));
    assert!(matches!(
        bad(header(add_f | 1 << 30, 1, 0)),
        PageStreamError::Command { .. }
    ));
    assert!(matches!(
        bad(header(0x1023, 0, 0)), // PS_IOV_CLOSE
        PageStreamError::Command { .. }
    ));
    assert!(matches!(
        bad(header(add_f, u64::MAX, 0)),
        PageStreamError::TooManyPages { .. }
    ));
    assert_eq!(
        bad(header(add_f, 1, 0x1234)),
        PageStreamError::Misaligned {
            offset: 0,
            vaddr: 0x1234
        }
    );
    // Random bytes: refused at the first header.
    let noise: Vec<u8> = (0..HEADER_LEN as u32)
        .map(|i| (i * 37 + 11) as u8)
        .collect();
    assert!(PageStreamCounter::new(PS).feed(&noise).stopped.is_some());
    // A page size CRIU cannot have: nothing is counted.
    let mut c = PageStreamCounter::new(3000);
    assert_eq!(c.feed(&reply(1, 0)), Fed::default());
    assert!(!c.is_counting());
}

#[test]
fn ends_inside_a_reply_are_told_apart_from_the_close_status() {
    let r = reply(2, 0x2000);
    let mut c = PageStreamCounter::new(PS);
    c.feed(&r[..HEADER_LEN + 100]);
    assert_eq!(
        c.finish(),
        Err(PageStreamError::TruncatedPages {
            offset: HEADER_LEN as u64 + 100,
            missing: 2 * PS - 100
        })
    );
    let mut c = PageStreamCounter::new(PS);
    c.feed(&r);
    c.feed(&r[..10]);
    assert_eq!(
        c.finish(),
        Err(PageStreamError::TruncatedHeader {
            offset: r.len() as u64,
            have: 10
        })
    );
    let mut c = PageStreamCounter::new(PS);
    c.feed(&(-1i32).to_ne_bytes());
    assert_eq!(c.finish(), Ok(StreamEnd::Closed { status: -1 }));
    assert_eq!(PageStreamCounter::new(PS).finish(), Ok(StreamEnd::AtReply));
}

fn request(cmd: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&cmd.to_ne_bytes());
    h[8..16].copy_from_slice(&16u64.to_ne_bytes());
    h
}

#[test]
fn the_daemons_close_is_told_from_a_hang_up_at_any_split() {
    let mut stream = Vec::new();
    for _ in 0..3 {
        stream.extend_from_slice(&request(7));
    }
    stream.extend_from_slice(&request(0x1023));
    for cut in 0..=stream.len() {
        let mut t = RequestTracker::default();
        t.feed(&stream[..cut]);
        t.feed(&stream[cut..]);
        assert_eq!(t.closed_cleanly(), Some(true), "split at {cut}");
    }
    // Forced close (with flag bits above the command) counts too.
    let mut t = RequestTracker::default();
    t.feed(&request(0x1024 | 4 << 16));
    assert_eq!(t.closed_cleanly(), Some(true));
    // Hang-ups: after requests only, mid-header, before anything.
    let mut t = RequestTracker::default();
    t.feed(&stream[..3 * HEADER_LEN]);
    assert_eq!(t.closed_cleanly(), Some(false));
    let mut t = RequestTracker::default();
    t.feed(&stream[..3 * HEADER_LEN + 5]);
    assert_eq!(t.closed_cleanly(), Some(false));
    assert_eq!(RequestTracker::default().closed_cleanly(), Some(false));
    // Bytes that are not requests: no judgement.
    let mut t = RequestTracker::default();
    t.feed(&request(6));
    t.feed(&request(0x1023));
    assert_eq!(t.closed_cleanly(), None);
}
