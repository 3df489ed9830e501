use super::*;
use rand::{Rng, RngCore, SeedableRng};

fn sample_frames() -> Vec<Frame> {
    let mut delta = PageDelta::new(42, 64);
    delta.push(0x7f00_0000_0000, &[0xaa; 64]).unwrap();
    delta.push(0x7f00_0000_0040, &[0x55; 64]).unwrap();
    vec![
        Frame::Hello(Hello {
            migration_id: "mig-1".into(),
            instance_id: "ctr-1-0".into(),
            round: 3,
        }),
        Frame::FileStart(FileStart {
            path: "images/pages-1.img".into(),
            mode: 0o100640,
            size: 5,
        }),
        Frame::FileChunk(b"hello".to_vec()),
        Frame::FileChunk(Vec::new()),
        Frame::FileEnd { sha256: [7; 32] },
        Frame::PageDelta(delta),
        Frame::PageDelta(PageDelta::new(1, 4096)),
        Frame::PagesGone(PagesGone {
            pid: 42,
            vaddrs: vec![0x1000, 0x2000, u64::MAX],
        }),
        Frame::RoundEnd(RoundEnd {
            round: 3,
            pages: 2,
            bytes: 128,
        }),
        Frame::Error {
            message: "dump failed: été".into(),
        },
        Frame::Done,
        Frame::Changes(sample_batch()),
        Frame::Changes(ChangeBatch::new()),
        Frame::Ready,
        Frame::Manifest(Manifest {
            entries: 12,
            bytes: u64::MAX,
        }),
        Frame::Entry(TreeEntry {
            kind: TreeEntryKind::Symlink,
            path: "upper/etc/link".into(),
            mode: 0o777,
            uid: 1000,
            gid: 100,
            link_target: "../usr/lib/été".into(),
        }),
        Frame::Entry(TreeEntry {
            kind: TreeEntryKind::Whiteout,
            path: "upper/gone".into(),
            mode: 0,
            uid: 0,
            gid: 0,
            link_target: String::new(),
        }),
        Frame::Restored(Restored {
            pid: 4242,
            images_ms: 1,
            prepare_ms: 2,
            restore_ms: 3,
            adopt_ms: u64::MAX,
        }),
    ]
}

fn sample_batch() -> ChangeBatch {
    let mut batch = ChangeBatch::new();
    batch.push(b"a").unwrap();
    batch.push(&[0xee; 4115]).unwrap();
    batch.push(b"third").unwrap();
    batch
}

/// Encodes `frames`; also returns the stream offset after the header and after each frame.
async fn encode(frames: &[Frame]) -> (Vec<u8>, Vec<usize>) {
    let mut writer = FrameWriter::new(Vec::new());
    let mut boundaries = vec![STREAM_HEADER_LEN];
    for frame in frames {
        writer.send(frame).await.unwrap();
        boundaries.push(writer.get_ref().len());
    }
    (writer.finish().await.unwrap(), boundaries)
}

/// Reads frames until the end or the first error.
async fn decode(bytes: &[u8]) -> (Vec<Frame>, Result<(), WireError>) {
    let mut reader = FrameReader::new(bytes);
    let mut frames = Vec::new();
    loop {
        match reader.next().await {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, Ok(())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// A frame with any type, flags and length field, with valid checksums.
fn raw_frame(code: u8, flags: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![code, flags];
    out.extend_from_slice(&len.to_be_bytes());
    let header_crc = crc32c::crc32c(&out);
    out.extend_from_slice(&header_crc.to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn stream_with(frame: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(frame);
    out
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn quinn_streams_are_readers_and_writers() {
    fn writer<W: AsyncWrite + Unpin>() {}
    fn reader<R: AsyncRead + Unpin>() {}
    writer::<quinn::SendStream>();
    reader::<quinn::RecvStream>();
}

#[tokio::test]
async fn every_frame_type_round_trips_over_a_pipe() {
    let frames = sample_frames();
    let (client, server) = tokio::io::duplex(256);
    let counters = Arc::new(WireCounters::default());
    let mut writer = FrameWriter::new(client).with_counters(Arc::clone(&counters));
    let to_send = frames.clone();
    let sender = tokio::spawn(async move {
        for frame in &to_send {
            writer.send(frame).await.unwrap();
        }
        writer.finish().await.unwrap();
    });
    let mut reader = FrameReader::new(server).with_counters(Arc::clone(&counters));
    let mut got = Vec::new();
    while let Some(frame) = reader.next().await.unwrap() {
        got.push(frame);
    }
    sender.await.unwrap();
    assert_eq!(got, frames);
    assert!(reader.next().await.unwrap().is_none(), "end stays an end");
    let stats = counters.snapshot();
    assert_eq!(stats.frames_sent, frames.len() as u64);
    assert_eq!(stats.frames_received, frames.len() as u64);
    assert_eq!(stats.bytes_sent, stats.bytes_received);
    let payloads: u64 = frames.iter().map(Frame::payload_len).sum();
    let overhead = (FRAME_HEADER_LEN + FRAME_TRAILER_LEN) as u64 * frames.len() as u64;
    assert_eq!(
        stats.bytes_sent,
        STREAM_HEADER_LEN as u64 + payloads + overhead
    );
}

#[tokio::test]
async fn an_empty_stream_has_a_header_and_no_frame() {
    let bytes = FrameWriter::new(Vec::new()).finish().await.unwrap();
    assert_eq!(bytes.len(), STREAM_HEADER_LEN);
    let (frames, result) = decode(&bytes).await;
    assert!(frames.is_empty());
    result.unwrap();
    let (_, result) = decode(&[]).await;
    assert!(
        matches!(result, Err(WireError::Truncated { got: 0, .. })),
        "{result:?}"
    );
}

#[test]
fn page_delta_helpers() {
    let mut delta = PageDelta::new(7, 4096);
    assert!(delta.is_empty());
    delta.push(0x1000, &[1; 4096]).unwrap();
    delta.push(0x5000, &[2; 4096]).unwrap();
    assert!(matches!(
        delta.push(0x1001, &[0; 4096]),
        Err(WireError::InvalidFrame { .. })
    ));
    assert!(delta.push(0x2000, &[0; 100]).is_err());
    assert_eq!(delta.len(), 2);
    let pages: Vec<(u64, u8)> = delta.pages().map(|(v, p)| (v, p[0])).collect();
    assert_eq!(pages, vec![(0x1000, 1), (0x5000, 2)]);
    let max = PageDelta::max_pages(DEFAULT_MAX_PAYLOAD, 4096);
    assert_eq!(max, 255);
    let mut full = PageDelta::new(7, 4096);
    for i in 0..max as u64 {
        full.push(i * 4096, &[0; 4096]).unwrap();
    }
    assert!(Frame::PageDelta(full.clone()).payload_len() <= u64::from(DEFAULT_MAX_PAYLOAD));
    full.push(max as u64 * 4096, &[0; 4096]).unwrap();
    assert!(Frame::PageDelta(full).payload_len() > u64::from(DEFAULT_MAX_PAYLOAD));
    assert!(PageDelta::new(1, 0).pages().next().is_none());
}

#[tokio::test]
async fn writer_refuses_frames_it_cannot_send_and_writes_nothing() {
    let mut writer = FrameWriter::new(Vec::new()).with_max_payload(100);
    let mut delta = PageDelta::new(1, 64);
    delta.push(0, &[0; 64]).unwrap();
    delta.push(64, &[0; 64]).unwrap();
    let err = writer.send(&Frame::PageDelta(delta)).await.unwrap_err();
    assert!(
        matches!(err, WireError::FrameTooLarge { max: 100, .. }),
        "{err}"
    );
    let bad = PageDelta {
        pid: 1,
        page_size: 64,
        vaddrs: vec![0],
        data: vec![0; 10],
    };
    let err = writer.send(&Frame::PageDelta(bad)).await.unwrap_err();
    assert!(matches!(err, WireError::InvalidFrame { .. }), "{err}");
    let long = Frame::Hello(Hello {
        migration_id: "x".repeat(70_000),
        instance_id: String::new(),
        round: 0,
    });
    let mut big = FrameWriter::new(Vec::new());
    assert!(matches!(
        big.send(&long).await,
        Err(WireError::InvalidFrame { .. })
    ));
    assert!(writer.get_ref().is_empty());
    assert!(big.get_ref().is_empty());
    // Still usable after a refusal: nothing went on the wire.
    writer.send(&Frame::Done).await.unwrap();
}

#[tokio::test]
async fn a_file_of_a_few_mib_streams_in_small_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let mut content = vec![0u8; 3 * 1024 * 1024 + 123];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut content);
    std::fs::write(&src, &content).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o4640)).unwrap();

    let max = 4096;
    // A pipe much smaller than the file: the sender can only go as fast as the receiver.
    let (client, server) = tokio::io::duplex(16 * 1024);
    let src2 = src.clone();
    let sender = tokio::spawn(async move {
        let mut writer = FrameWriter::new(client).with_max_payload(max);
        let sent = writer.send_file(&src2, "dump/pages-1.img").await.unwrap();
        writer.send(&Frame::Done).await.unwrap();
        let stats = writer.counters().snapshot();
        writer.finish().await.unwrap();
        (sent, stats)
    });
    let mut reader = FrameReader::new(server).with_max_payload(max);
    let received = reader.receive_file(&dest).await.unwrap();
    assert_eq!(reader.next().await.unwrap(), Some(Frame::Done));
    assert_eq!(reader.next().await.unwrap(), None);
    let (sent, stats) = sender.await.unwrap();

    let expected: [u8; 32] = Sha256::digest(&content).into();
    assert_eq!(sent.sha256, expected);
    assert_eq!(sent.size, content.len() as u64);
    assert_eq!(received.sha256, expected);
    assert_eq!(received.path, dest.join("dump/pages-1.img"));
    assert_eq!(std::fs::read(&received.path).unwrap(), content);
    let mode = std::fs::metadata(&received.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640, "only permission bits are applied");
    assert_eq!(dir_entries(&dest.join("dump")), vec!["pages-1.img"]);
    let chunks = content.len().div_ceil(max as usize) as u64;
    assert_eq!(stats.frames_sent, chunks + 3);
    assert_eq!(
        reader.counters().snapshot().bytes_received,
        stats.bytes_sent
    );
}

#[tokio::test]
async fn an_empty_file_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("empty");
    std::fs::write(&src, b"").unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let mut writer = FrameWriter::new(Vec::new());
    writer.send_file(&src, "empty").await.unwrap();
    let bytes = writer.finish().await.unwrap();
    let mut reader = FrameReader::new(&bytes[..]);
    let got = reader.receive_file(&dest).await.unwrap();
    assert_eq!(got.size, 0);
    assert_eq!(std::fs::read(dest.join("empty")).unwrap(), b"");
}

#[tokio::test]
async fn send_file_refuses_what_it_cannot_send() {
    let tmp = tempfile::tempdir().unwrap();
    let mut writer = FrameWriter::new(Vec::new());
    let err = writer.send_file(tmp.path(), "dir").await.unwrap_err();
    assert!(matches!(err, WireError::NotRegularFile { .. }), "{err}");
    let file = tmp.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let err = writer.send_file(&file, "../f").await.unwrap_err();
    assert!(matches!(err, WireError::PathRejected { .. }), "{err}");
    let err = writer
        .send_file(&tmp.path().join("missing"), "f")
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::File { op: "stat", .. }), "{err}");
    assert!(writer.get_ref().is_empty());
}

#[tokio::test]
async fn any_flipped_byte_is_a_checksum_error_not_garbage() {
    let frames = sample_frames();
    let (bytes, boundaries) = encode(&frames).await;
    for offset in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[offset] ^= mask;
            let (got, result) = decode(&bad).await;
            let err = result.expect_err("corruption must be detected");
            if offset < MAGIC.len() {
                assert!(matches!(err, WireError::BadMagic { .. }), "{offset}: {err}");
            } else if offset < STREAM_HEADER_LEN {
                assert!(
                    matches!(err, WireError::VersionMismatch { .. }),
                    "{offset}: {err}"
                );
            } else {
                assert!(
                    matches!(err, WireError::BadChecksum { .. }),
                    "{offset}: {err}"
                );
                // Frames before the damaged one arrive intact, none after it.
                let damaged = boundaries.iter().filter(|b| **b <= offset).count() - 1;
                assert_eq!(got, frames[..damaged], "offset {offset}");
            }
        }
    }
}

#[tokio::test]
async fn random_corruptions_never_yield_a_wrong_frame() {
    let frames = sample_frames();
    let (bytes, boundaries) = encode(&frames).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for _ in 0..3000 {
        let mut bad = bytes.clone();
        let mut first = usize::MAX;
        for _ in 0..rng.random_range(1..=6) {
            let offset = rng.random_range(STREAM_HEADER_LEN..bad.len());
            bad[offset] ^= rng.random_range(1..=255u8);
            first = first.min(offset);
        }
        let (got, result) = decode(&bad).await;
        let damaged = boundaries.iter().filter(|b| **b <= first).count() - 1;
        assert_eq!(got, frames[..damaged]);
        assert!(
            matches!(result, Err(WireError::BadChecksum { .. })),
            "{result:?}"
        );
    }
    // Pure noise after a valid header, of any length, is refused without panicking.
    for _ in 0..3000 {
        let mut noise = vec![0u8; rng.random_range(1..64)];
        rng.fill_bytes(&mut noise);
        let (got, result) = decode(&stream_with(&noise)).await;
        assert!(got.is_empty());
        assert!(result.is_err());
    }
}

#[tokio::test]
async fn truncation_is_an_error_except_at_a_frame_boundary() {
    let frames = sample_frames();
    let (bytes, boundaries) = encode(&frames).await;
    for cut in 0..bytes.len() {
        let (got, result) = decode(&bytes[..cut]).await;
        if let Some(index) = boundaries.iter().position(|b| *b == cut) {
            result.unwrap_or_else(|e| panic!("cut at boundary {cut}: {e}"));
            assert_eq!(got, frames[..index]);
        } else {
            let err = result.expect_err("a cut inside a frame must be reported");
            assert!(matches!(err, WireError::Truncated { .. }), "{cut}: {err}");
            let before = boundaries
                .iter()
                .filter(|b| **b < cut)
                .count()
                .saturating_sub(1);
            assert_eq!(got, frames[..before], "cut {cut}");
        }
    }
}

#[tokio::test]
async fn oversize_length_is_refused_before_reading_the_payload() {
    for len in [DEFAULT_MAX_PAYLOAD + 1, u32::MAX] {
        // No payload follows: the reader must not wait for (or allocate) `len` bytes.
        let bytes = stream_with(&raw_frame(FrameKind::FileChunk as u8, 0, len, &[]));
        let (_, result) = decode(&bytes[..bytes.len() - FRAME_TRAILER_LEN]).await;
        assert!(
            matches!(result, Err(WireError::FrameTooLarge { len: l, .. }) if l == u64::from(len)),
            "{result:?}"
        );
    }
    let small = stream_with(&raw_frame(FrameKind::FileChunk as u8, 0, 200, &[0; 200]));
    let mut reader = FrameReader::new(&small[..]).with_max_payload(100);
    assert!(matches!(
        reader.next().await,
        Err(WireError::FrameTooLarge { max: 100, .. })
    ));
    assert!(matches!(reader.next().await, Err(WireError::Broken)));
}

#[tokio::test]
async fn unknown_type_flags_and_malformed_payloads_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw_frame(0, 0, 0, &[]), "unknown"),
        (raw_frame(200, 0, 3, b"abc"), "unknown"),
        (raw_frame(FrameKind::Done as u8, 1, 0, &[]), "flags"),
        (raw_frame(FrameKind::Done as u8, 0, 1, &[0]), "malformed"),
        (
            raw_frame(FrameKind::FileEnd as u8, 0, 31, &[0; 31]),
            "malformed",
        ),
        (
            raw_frame(FrameKind::Error as u8, 0, 2, &[0xff, 0xfe]),
            "malformed",
        ),
        (
            raw_frame(FrameKind::Hello as u8, 0, 2, &[0xff, 0xff]),
            "malformed",
        ),
        (
            raw_frame(FrameKind::RoundEnd as u8, 0, 21, &[0; 21]),
            "malformed",
        ),
    ];
    let mut cases = cases;
    // A page batch claiming more pages than it carries.
    let mut delta = Vec::new();
    for v in [1u32, 64, 1000] {
        delta.extend_from_slice(&v.to_be_bytes());
    }
    delta.extend_from_slice(&0u64.to_be_bytes());
    delta.extend_from_slice(&[0; 64]);
    cases.push((raw_frame(5, 0, delta.len() as u32, &delta), "malformed"));
    // Page size not a power of two, and a misaligned page.
    let mut odd = Vec::new();
    for v in [1u32, 3, 0] {
        odd.extend_from_slice(&v.to_be_bytes());
    }
    cases.push((raw_frame(5, 0, odd.len() as u32, &odd), "malformed"));
    let mut misaligned = Vec::new();
    for v in [1u32, 64, 1] {
        misaligned.extend_from_slice(&v.to_be_bytes());
    }
    misaligned.extend_from_slice(&8u64.to_be_bytes());
    misaligned.extend_from_slice(&[0; 64]);
    cases.push((
        raw_frame(5, 0, misaligned.len() as u32, &misaligned),
        "malformed",
    ));
    // Pages gone with a count of u32::MAX and no addresses: refused, not allocated.
    let mut gone = Vec::new();
    gone.extend_from_slice(&1u32.to_be_bytes());
    gone.extend_from_slice(&u32::MAX.to_be_bytes());
    cases.push((raw_frame(6, 0, gone.len() as u32, &gone), "malformed"));

    for (frame, want) in cases {
        let (got, result) = decode(&stream_with(&frame)).await;
        assert!(got.is_empty());
        let err = result.expect_err(want);
        let ok = match want {
            "unknown" => matches!(err, WireError::UnknownType { .. }),
            "flags" => matches!(err, WireError::UnknownFlags { flags: 1, .. }),
            _ => matches!(err, WireError::Malformed { .. }),
        };
        assert!(ok, "want {want}, got {err}");
    }
}

#[tokio::test]
async fn bad_magic_and_other_versions_are_named() {
    let (_, result) = decode(b"GET / HTTP/1.1\r\n\r\n").await;
    let err = result.unwrap_err();
    assert!(matches!(err, WireError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("474554"), "{err}");
    // A short stream that is not ours is called so, not "truncated".
    let (_, result) = decode(b"GET").await;
    assert!(
        matches!(result, Err(WireError::BadMagic { .. })),
        "{result:?}"
    );

    let mut other = MAGIC.to_vec();
    other.extend_from_slice(&2u16.to_be_bytes());
    other.extend_from_slice(&raw_frame(FrameKind::Done as u8, 0, 0, &[]));
    let (_, result) = decode(&other).await;
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::VersionMismatch {
                peer: 2,
                ours: VERSION
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "peer speaks migration protocol version 2, this agent speaks version 1"
    );
}

/// Sends FileStart for `path`, the content in one chunk and FileEnd with `sha256`.
async fn file_stream(path: &str, size: u64, content: &[u8], sha256: [u8; 32]) -> Vec<u8> {
    let mut writer = FrameWriter::new(Vec::new());
    writer
        .send(&Frame::FileStart(FileStart {
            path: path.into(),
            mode: 0o644,
            size,
        }))
        .await
        .unwrap();
    writer
        .send(&Frame::FileChunk(content.to_vec()))
        .await
        .unwrap();
    writer.send(&Frame::FileEnd { sha256 }).await.unwrap();
    writer.finish().await.unwrap()
}

fn sha(content: &[u8]) -> [u8; 32] {
    Sha256::digest(content).into()
}

#[tokio::test]
async fn hostile_paths_are_rejected_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let long = "a".repeat(256);
    let hostile = [
        "../x",
        "/etc/passwd",
        "a/../../b",
        "a/..",
        "..",
        "",
        ".",
        "./a",
        "a/./b",
        "a//b",
        "a/",
        "nul\0byte",
        long.as_str(),
    ];
    for path in hostile {
        let bytes = file_stream(path, 2, b"pw", sha(b"pw")).await;
        let err = FrameReader::new(&bytes[..])
            .receive_file(&dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::PathRejected { .. }),
            "{path:?}: {err}"
        );
    }
    assert!(dir_entries(&dest).is_empty());
    assert_eq!(dir_entries(tmp.path()), vec!["dest"]);
}

#[tokio::test]
async fn symlinks_below_the_destination_lead_nowhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&dest).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("evil")).unwrap();
    std::fs::create_dir(dest.join("sub")).unwrap();
    std::os::unix::fs::symlink("../../outside", dest.join("sub/up")).unwrap();
    std::fs::write(dest.join("plain"), b"").unwrap();

    for path in ["evil/x", "sub/up/x", "evil/new/x", "plain/x"] {
        let bytes = file_stream(path, 2, b"hi", sha(b"hi")).await;
        let err = FrameReader::new(&bytes[..])
            .receive_file(&dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::PathRejected { .. }),
            "{path}: {err}"
        );
    }
    assert!(dir_entries(&outside).is_empty());

    // A symlink as the final name is replaced, not followed.
    std::os::unix::fs::symlink(outside.join("target"), dest.join("link")).unwrap();
    let bytes = file_stream("link", 2, b"hi", sha(b"hi")).await;
    FrameReader::new(&bytes[..])
        .receive_file(&dest)
        .await
        .unwrap();
    assert!(std::fs::symlink_metadata(dest.join("link"))
        .unwrap()
        .is_file());
    assert_eq!(std::fs::read(dest.join("link")).unwrap(), b"hi");
    assert!(dir_entries(&outside).is_empty());
}

#[tokio::test]
async fn failed_files_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep"), b"old").unwrap();

    let short = file_stream("keep", 10, b"12345", sha(b"12345")).await;
    let long = file_stream("keep", 4, b"0123456789", sha(b"0123456789")).await;
    let wrong_hash = file_stream("keep", 5, b"12345", sha(b"54321")).await;
    let peer_error = {
        let mut w = FrameWriter::new(Vec::new());
        let start = FileStart {
            path: "keep".into(),
            mode: 0o644,
            size: 5,
        };
        w.send(&Frame::FileStart(start)).await.unwrap();
        w.send(&Frame::FileChunk(b"12".to_vec())).await.unwrap();
        w.send(&Frame::Error {
            message: "disk on fire".into(),
        })
        .await
        .unwrap();
        w.finish().await.unwrap()
    };
    let mut ended = peer_error.clone();
    let error_frame_len = FRAME_HEADER_LEN + "disk on fire".len() + FRAME_TRAILER_LEN;
    ended.truncate(ended.len() - error_frame_len);
    let mut unexpected = ended.clone();
    unexpected.extend_from_slice(&raw_frame(FrameKind::Done as u8, 0, 0, &[]));
    let mut truncated = ended.clone();
    truncated.extend_from_slice(&raw_frame(FrameKind::Done as u8, 0, 0, &[])[..5]);

    for (name, bytes) in [
        ("short", short),
        ("long", long),
        ("wrong hash", wrong_hash),
        ("peer error", peer_error),
        ("clean end", ended),
        ("unexpected", unexpected),
        ("truncated", truncated),
    ] {
        let err = FrameReader::new(&bytes[..])
            .receive_file(&dest)
            .await
            .unwrap_err();
        let ok = match name {
            "short" => matches!(
                err,
                WireError::SizeMismatch {
                    expected: 10,
                    actual: 5,
                    ..
                }
            ),
            "long" => matches!(
                err,
                WireError::SizeMismatch {
                    expected: 4,
                    actual: 10,
                    ..
                }
            ),
            "wrong hash" => matches!(err, WireError::HashMismatch { .. }),
            "peer error" => {
                matches!(&err, WireError::Peer { message } if message == "disk on fire")
            }
            "clean end" => matches!(err, WireError::UnexpectedEnd { .. }),
            "unexpected" => matches!(
                err,
                WireError::UnexpectedFrame {
                    got: FrameKind::Done,
                    ..
                }
            ),
            _ => matches!(err, WireError::Truncated { .. }),
        };
        assert!(ok, "{name}: {err}");
        assert_eq!(dir_entries(&dest), vec!["keep"], "{name}");
        assert_eq!(std::fs::read(dest.join("keep")).unwrap(), b"old", "{name}");
    }

    let (_, result) = decode(&file_stream("keep", 5, b"12345", sha(b"12345")).await).await;
    result.unwrap();
    let not_a_file = encode(&[Frame::Done]).await.0;
    let err = FrameReader::new(&not_a_file[..])
        .receive_file(&dest)
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::UnexpectedFrame { .. }), "{err}");
}

#[tokio::test]
async fn a_cancelled_receive_removes_its_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut client, server) = tokio::io::duplex(1024);
    let mut writer = FrameWriter::new(&mut client);
    let start = FileStart {
        path: "f".into(),
        mode: 0o644,
        size: 10,
    };
    writer.send(&Frame::FileStart(start)).await.unwrap();
    writer
        .send(&Frame::FileChunk(b"12345".to_vec()))
        .await
        .unwrap();
    let mut reader = FrameReader::new(server);
    let receive = reader.receive_file(tmp.path());
    let result = tokio::time::timeout(std::time::Duration::from_millis(200), receive).await;
    assert!(result.is_err(), "the rest never comes");
    assert!(dir_entries(tmp.path()).is_empty());
    assert!(matches!(reader.next().await, Err(WireError::Broken)));
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_holds_the_writer_back() {
    let (client, _server) = tokio::io::duplex(1024);
    let mut writer = FrameWriter::new(client);
    let chunk = Frame::FileChunk(vec![0; 64 * 1024]);
    let send = writer.send(&chunk);
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), send).await;
    assert!(
        result.is_err(),
        "a full pipe blocks the sender instead of buffering"
    );
    // The frame went out in part: the stream cannot be used any more.
    assert!(matches!(
        writer.send(&Frame::Done).await,
        Err(WireError::Broken)
    ));
}

#[test]
fn change_batches_keep_their_records_and_refuse_bad_ones() {
    let batch = sample_batch();
    assert_eq!(batch.len(), 3);
    let records: Vec<&[u8]> = batch.records().collect();
    assert_eq!(records, vec![&b"a"[..], &[0xee; 4115][..], &b"third"[..]]);
    assert_eq!(
        batch.payload_len(),
        (ChangeBatch::FIXED_LEN + 3 * ChangeBatch::RECORD_OVERHEAD + 1 + 4115 + 5) as u64
    );
    let mut empty = ChangeBatch::new();
    assert!(empty.is_empty());
    assert!(empty.fits(4115, 4121));
    assert!(!empty.fits(4116, 4121));
    assert!(matches!(
        empty.push(&[]),
        Err(WireError::InvalidFrame { .. })
    ));
    assert!(matches!(
        empty.push(&vec![0; 65536]),
        Err(WireError::InvalidFrame { .. })
    ));
    assert!(empty.is_empty(), "refused records leave no trace");
}

#[tokio::test]
async fn malformed_batches_entries_and_verdicts_are_refused() {
    let batch = |count: u32, body: &[u8]| {
        let mut payload = count.to_be_bytes().to_vec();
        payload.extend_from_slice(body);
        raw_frame(FrameKind::Changes as u8, 0, payload.len() as u32, &payload)
    };
    let entry = |kind: u8| {
        let mut payload = vec![kind];
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.push(b'x');
        payload.extend_from_slice(&[0; 12]);
        payload.extend_from_slice(&0u16.to_be_bytes());
        raw_frame(FrameKind::Entry as u8, 0, payload.len() as u32, &payload)
    };
    let good_entry = entry(1);
    let (frames, result) = decode(&stream_with(&good_entry)).await;
    result.unwrap();
    assert_eq!(frames.len(), 1, "the hand-made entry is well-formed");
    let cases = vec![
        // More records announced than carried, and fewer.
        batch(2, &[0, 1, b'a']),
        batch(0, &[0, 1, b'a']),
        // A record running past the payload, an empty record, a cut length.
        batch(1, &[0, 5, b'a']),
        batch(1, &[0, 0]),
        batch(1, &[0]),
        raw_frame(FrameKind::Changes as u8, 0, 3, &[0, 0, 0]),
        entry(0),
        entry(5),
        raw_frame(FrameKind::Manifest as u8, 0, 15, &[0; 15]),
        raw_frame(FrameKind::Ready as u8, 0, 1, &[0]),
        raw_frame(FrameKind::Restored as u8, 0, 35, &[0; 35]),
    ];
    for frame in cases {
        let (got, result) = decode(&stream_with(&frame)).await;
        assert!(got.is_empty());
        let err = result.unwrap_err();
        assert!(matches!(err, WireError::Malformed { .. }), "{err}");
    }
}

#[test]
fn trees_are_built_below_the_destination_only() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path();
    create_dir_below(dest, "upper", 0o700).unwrap();
    create_dir_below(dest, "upper/a/b", 0o700).unwrap();
    create_dir_below(dest, "upper/a/b", 0o700).unwrap();
    create_symlink_below(dest, "upper/a/link", "/etc").unwrap();
    set_attrs_below(dest, "upper/a/b", Some(0o1750), None).unwrap();
    let meta = std::fs::metadata(dest.join("upper/a/b")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o1750);
    assert_eq!(
        std::fs::read_link(dest.join("upper/a/link")).unwrap(),
        Path::new("/etc")
    );
    // A mode on a symlink is ignored, never applied to its target.
    set_attrs_below(dest, "upper/a/link", Some(0o777), None).unwrap();
    // Nothing goes through the symlink.
    for result in [
        create_dir_below(dest, "upper/a/link/x", 0o700),
        create_symlink_below(dest, "upper/a/link/y", "z"),
        create_whiteout_below(dest, "upper/a/link/w"),
        set_attrs_below(dest, "upper/a/link/passwd", Some(0o777), None),
    ] {
        assert!(
            matches!(result, Err(WireError::PathRejected { .. })),
            "{result:?}"
        );
    }
    // A name taken by something else, bad paths and bad targets.
    assert!(create_dir_below(dest, "upper/a/link", 0o700).is_err());
    assert!(create_symlink_below(dest, "upper/a/link", "again").is_err());
    assert!(create_symlink_below(dest, "../escape", "x").is_err());
    assert!(create_dir_below(dest, "/abs", 0o700).is_err());
    assert!(create_symlink_below(dest, "upper/nul", "a\0b").is_err());
    assert!(create_symlink_below(dest, "upper/empty", "").is_err());
    assert_eq!(dir_entries(dest), vec!["upper"]);
}

#[test]
fn whiteouts_are_zero_zero_character_devices() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: creating a whiteout needs CAP_MKNOD (root)");
        return;
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = tempfile::tempdir().unwrap();
    create_whiteout_below(dir.path(), "upper/deleted").unwrap();
    set_attrs_below(dir.path(), "upper/deleted", None, Some((1000, 1000))).unwrap();
    let meta = std::fs::symlink_metadata(dir.path().join("upper/deleted")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), 0);
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
}
