//! Hostile and ordinary layer tarballs, built byte by byte (tar's own `set_path` refuses `..`).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

/// One archive entry; `link` is the symlink/hardlink target.
struct E<'a> {
    path: &'a str,
    kind: EntryType,
    data: &'a [u8],
    link: &'a str,
    mode: u32,
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        path,
        kind: EntryType::Regular,
        data,
        link: "",
        mode: 0o644,
    }
}
fn dir(path: &str) -> E<'_> {
    E {
        path,
        kind: EntryType::Directory,
        data: b"",
        link: "",
        mode: 0o755,
    }
}
fn symlink<'a>(path: &'a str, target: &'a str) -> E<'a> {
    E {
        path,
        kind: EntryType::Symlink,
        data: b"",
        link: target,
        mode: 0o777,
    }
}
fn hardlink<'a>(path: &'a str, target: &'a str) -> E<'a> {
    E {
        path,
        kind: EntryType::Link,
        data: b"",
        link: target,
        mode: 0o644,
    }
}

fn header(e: &E<'_>) -> Header {
    let mut h = Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
        gnu.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
    }
    h.set_entry_type(e.kind);
    h.set_size(e.data.len() as u64);
    h.set_mode(e.mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

fn tarball(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        b.append(&header(e), e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// `<tmp>/a/b/layer`, so `../../x` would land in `<tmp>/x`, inside the test's own directory.
fn layer_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("a/b/layer");
    std::fs::create_dir_all(&layer).unwrap();
    (tmp, layer)
}

fn unpack(entries: &[E<'_>], dest: &Path) -> Result<UnpackStats, UnpackError> {
    unpack_layer(tarball(entries).as_slice(), dest)
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of the length passed.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (rc >= 0).then(|| buf[..rc as usize].to_vec())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn dot_dot_paths_fail_the_layer_and_write_nothing_outside() {
    let (tmp, layer) = layer_dir();
    let err = unpack(
        &[file("../../etc/passwd", b"root::0:0::/:/bin/sh\n")],
        &layer,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
    assert!(err.to_string().contains("../../etc/passwd"), "{err}");
    assert!(!tmp.path().join("etc").exists());
    assert!(!tmp.path().join("a/etc").exists());

    let err = unpack(&[file("ok/../../../x", b"x")], &layer).unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
}

#[test]
fn absolute_paths_are_kept_inside_the_layer() {
    let (_tmp, layer) = layer_dir();
    let unique = format!("berth-test-{:016x}", rand::random::<u64>());
    let path = format!("/etc/{unique}");
    unpack(&[file(&path, b"inside")], &layer).unwrap();
    assert_eq!(
        std::fs::read(layer.join("etc").join(&unique)).unwrap(),
        b"inside"
    );
    assert!(!Path::new(&path).exists());
}

#[test]
fn writing_through_a_symlink_to_root_is_refused() {
    let (tmp, layer) = layer_dir();
    let unique = format!("berth-test-{:016x}", rand::random::<u64>());
    let through = format!("a/tmp/{unique}");
    let err = unpack(&[symlink("a", "/"), file(&through, b"pwned")], &layer).unwrap_err();
    assert!(
        matches!(err, UnpackError::ThroughSymlink { ref parent, .. } if parent == Path::new("a")),
        "{err}"
    );
    assert!(!Path::new("/tmp").join(&unique).exists());
    // The symlink itself is kept verbatim: it only means something inside the container.
    assert_eq!(std::fs::read_link(layer.join("a")).unwrap(), Path::new("/"));
    drop(tmp);
}

#[test]
fn symlink_chains_to_parent_dirs_are_refused() {
    let (tmp, layer) = layer_dir();
    // a -> .. ; a/a/x would be <tmp>/a/x two levels up.
    let err = unpack(&[symlink("a", ".."), file("a/a/x", b"x")], &layer).unwrap_err();
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    assert!(!tmp.path().join("a/x").exists() && !tmp.path().join("a/b/x").exists());

    // A chain: c/d -> ../.. and e -> c/d, then e/x.
    let (tmp, layer) = layer_dir();
    let err = unpack(
        &[
            dir("c"),
            symlink("c/d", "../.."),
            symlink("e", "c/d"),
            file("e/x", b"x"),
            file("c/d/y", b"y"),
        ],
        &layer,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");
    assert!(!tmp.path().join("a/x").exists());
}

#[test]
fn a_symlink_at_the_final_component_is_replaced_not_followed() {
    let (tmp, layer) = layer_dir();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"original").unwrap();
    let victim_str = victim.to_str().unwrap().to_owned();
    unpack(&[symlink("s", &victim_str), file("s", b"replaced")], &layer).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"original");
    let meta = std::fs::symlink_metadata(layer.join("s")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(std::fs::read(layer.join("s")).unwrap(), b"replaced");
}

#[test]
fn hardlinks_must_point_inside_the_layer() {
    let (tmp, layer) = layer_dir();
    std::fs::write(tmp.path().join("a/secret"), b"s").unwrap();
    let err = unpack(&[hardlink("h", "../secret")], &layer).unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");

    // Absolute targets are taken relative to the layer, and must exist there.
    let err = unpack(&[hardlink("h", "/etc/passwd")], &layer).unwrap_err();
    assert!(matches!(err, UnpackError::HardlinkTarget { .. }), "{err}");

    // Through a symlinked directory.
    let (_tmp, layer) = layer_dir();
    let err = unpack(
        &[symlink("etc", "/etc"), hardlink("h", "etc/passwd")],
        &layer,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err}");

    // A legitimate one.
    let (_tmp, layer) = layer_dir();
    unpack(
        &[
            file("bin/busybox", b"elf"),
            hardlink("bin/sh", "bin/busybox"),
        ],
        &layer,
    )
    .unwrap();
    let a = std::fs::metadata(layer.join("bin/busybox")).unwrap();
    let b = std::fs::metadata(layer.join("bin/sh")).unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn whiteouts_and_opaque_dirs_become_overlay_markers() {
    if !is_root() {
        eprintln!("skipped: whiteouts need CAP_MKNOD and trusted xattrs (run as root)");
        return;
    }
    let (_tmp, layer) = layer_dir();
    let stats = unpack(
        &[
            dir("etc"),
            file("etc/.wh.gone", b""),
            file("opq/.wh..wh..opq", b""),
            file("opq/new", b"n"),
            file("x/.wh..wh.plnk", b""),
        ],
        &layer,
    )
    .unwrap();
    assert_eq!(stats.whiteouts, 2);
    let wh = std::fs::symlink_metadata(layer.join("etc/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!layer.join("etc/.wh.gone").exists());
    assert_eq!(
        getxattr(&layer.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!layer.join("opq/.wh..wh..opq").exists());
    assert!(layer.join("opq/new").exists());

    let err = unpack(&[file("etc/.wh...", b"")], &layer).unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
}

#[test]
fn metadata_is_preserved() {
    let (_tmp, layer) = layer_dir();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(&file("usr/bin/su", b"elf"));
    h.set_mode(0o4755);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_mtime(1_234_567_890);
    h.set_cksum();
    b.append(&h, &b"elf"[..]).unwrap();
    let mut d = header(&dir("usr"));
    d.set_mode(0o700);
    d.set_mtime(1_111_111_111);
    d.set_cksum();
    b.append(&d, &b""[..]).unwrap();
    // A child written after the directory entry must not bump the directory's mtime.
    b.append(&header(&file("usr/later", b"l")), &b"l"[..])
        .unwrap();
    b.append(&header(&symlink("usr/link", "bin/su")), &b""[..])
        .unwrap();
    let mut fifo = header(&file("usr/fifo", b""));
    fifo.set_entry_type(EntryType::Fifo);
    fifo.set_cksum();
    b.append(&fifo, &b""[..]).unwrap();
    let mut dev = header(&file("dev/null", b""));
    dev.set_entry_type(EntryType::Char);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    dev.set_cksum();
    b.append(&dev, &b""[..]).unwrap();
    let stats = unpack_layer(b.into_inner().unwrap().as_slice(), &layer).unwrap();
    assert_eq!(stats.skipped, 1);

    let su = std::fs::symlink_metadata(layer.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(su.mtime(), 1_234_567_890);
    if is_root() {
        assert_eq!((su.uid(), su.gid()), (1234, 5678));
    }
    let usr = std::fs::symlink_metadata(layer.join("usr")).unwrap();
    assert_eq!(usr.mode() & 0o7777, 0o700);
    assert_eq!(usr.mtime(), 1_111_111_111);
    assert_eq!(
        std::fs::read_link(layer.join("usr/link")).unwrap(),
        Path::new("bin/su")
    );
    assert!(std::fs::symlink_metadata(layer.join("usr/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!layer.join("dev/null").exists());
}

#[test]
fn later_entries_replace_earlier_ones() {
    let (_tmp, layer) = layer_dir();
    unpack(
        &[
            dir("d"),
            file("d/f", b"1"),
            file("d", b"now a file"),
            file("x", b"old"),
            file("x", b"new"),
        ],
        &layer,
    )
    .unwrap();
    assert_eq!(std::fs::read(layer.join("d")).unwrap(), b"now a file");
    assert_eq!(std::fs::read(layer.join("x")).unwrap(), b"new");
    let err = unpack(&[file("d/under-a-file", b"")], &layer).unwrap_err();
    assert!(matches!(err, UnpackError::NotADirectory { .. }), "{err}");
}

#[test]
fn gzip_blobs_are_unpacked_and_checked_against_the_diff_id() {
    let (tmp, layer) = layer_dir();
    let tar = tarball(&[file("hello", b"world")]);
    let diff_id = Digest::of(&tar).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let blob = tmp.path().join("blob");
    std::fs::write(&blob, gz.finish().unwrap()).unwrap();

    unpack_blob(&blob, Compression::Gzip, Some(&diff_id), &layer).unwrap();
    assert_eq!(std::fs::read(layer.join("hello")).unwrap(), b"world");

    let (_tmp2, other) = layer_dir();
    let wrong = Digest::of(b"not it").to_string();
    let err = unpack_blob(&blob, Compression::Gzip, Some(&wrong), &other).unwrap_err();
    assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");

    let (_tmp3, third) = layer_dir();
    let err = unpack_blob(&blob, Compression::None, None, &third).unwrap_err();
    assert!(matches!(err, UnpackError::Archive(_)), "{err}");
}

#[test]
fn media_types() {
    assert_eq!(
        Compression::for_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
        Some(Compression::Gzip)
    );
    assert_eq!(
        Compression::for_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        Some(Compression::Gzip)
    );
    assert_eq!(
        Compression::for_media_type("application/vnd.oci.image.layer.v1.tar"),
        Some(Compression::None)
    );
    assert_eq!(
        Compression::for_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
        None
    );
}
