//! Unpacking one layer tarball into its own directory, safely.
//!
//! The tar crate's `unpack` is not used: its defaults follow symlinks created earlier in the
//! same archive and would apply whiteouts as plain files. Instead every entry is placed by hand:
//!
//! - absolute paths are neutralised (`/etc/x` lands at `<layer>/etc/x`, like GNU tar);
//! - a `..` component anywhere fails the whole layer ([`UnpackError::Escape`]);
//! - parents are resolved one component at a time with `lstat`; a symlink or a non-directory
//!   on the way fails the layer, so nothing is ever written through a symlink. The final
//!   component is removed first and created with `O_EXCL|O_NOFOLLOW`. No other process writes
//!   into the staging directory, so checking then acting is race-free;
//! - hardlink targets obey the same rules and must already exist in this layer;
//! - `.wh.NAME` becomes the overlayfs whiteout (a 0:0 character device named `NAME`) and
//!   `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory;
//! - device nodes are skipped (containers get theirs from the runtime), FIFOs are kept;
//! - mode (incl. setuid), owner, mtime and the `user.*`/`security.capability` xattrs are kept.
//!   Directory metadata is applied last, deepest first, so later children don't bump mtimes.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};
use tar::EntryType;

use super::cache::Digest;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Why a layer could not be unpacked. `entry` is the path as written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive itself is unreadable (corrupt gzip, truncated tar…).
    #[error("reading layer archive: {0}")]
    Archive(#[source] io::Error),
    /// A path or hardlink target climbs out of the layer with `..`.
    #[error("entry {entry:?}: path escapes the layer")]
    Escape {
        /// The offending archive path.
        entry: String,
    },
    /// A parent of the entry is a symlink inside the layer.
    #[error("entry {entry:?}: parent {parent:?} is a symlink, refusing to write through it")]
    ThroughSymlink {
        /// The offending archive path.
        entry: String,
        /// The symlink, relative to the layer.
        parent: PathBuf,
    },
    /// A parent of the entry is a file, not a directory.
    #[error("entry {entry:?}: parent {parent:?} is not a directory")]
    NotADirectory {
        /// The offending archive path.
        entry: String,
        /// The non-directory, relative to the layer.
        parent: PathBuf,
    },
    /// A hardlink whose target is not an earlier non-directory entry of this layer.
    #[error("hardlink {entry:?} -> {target:?}: target is not a file of this layer")]
    HardlinkTarget {
        /// The hardlink's archive path.
        entry: String,
        /// Its target as written in the archive.
        target: String,
    },
    /// An entry the format does not allow (empty name, symlink without target…).
    #[error("entry {entry:?}: {reason}")]
    Invalid {
        /// The offending archive path.
        entry: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error("entry {entry:?}: {op} {path}: {source}")]
    Io {
        /// The archive path being placed.
        entry: String,
        /// The operation (`create`, `symlink`…).
        op: &'static str,
        /// The filesystem path it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The uncompressed tar does not hash to the diff id the image config declares.
    #[error("layer content digest {actual} does not match the image config's diff id {expected}")]
    DiffIdMismatch {
        /// The diff id from the image config.
        expected: String,
        /// What the tar hashed to.
        actual: String,
    },
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members).
    Gzip,
}

impl Compression {
    /// The compression of a layer media type, or `None` when the type is not a supported layer
    /// (zstd, foreign or unknown media types).
    pub fn for_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            _ => None,
        }
    }
}

/// What an unpack did, for logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackStats {
    /// Entries read from the archive.
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteouts and opaque markers turned into their overlayfs form.
    pub whiteouts: u64,
    /// Device nodes and unknown entry types left out.
    pub skipped: u64,
}

/// Unpacks a layer blob into `dest` (an existing, empty directory), decompressing it and, when
/// `diff_id` is given, checking the uncompressed stream against it.
pub fn unpack_blob(
    blob: &Path,
    compression: Compression,
    diff_id: Option<&str>,
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    let file = std::fs::File::open(blob).map_err(|source| UnpackError::Io {
        entry: String::new(),
        op: "open blob",
        path: blob.to_owned(),
        source,
    })?;
    let file = BufReader::with_capacity(256 * 1024, file);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
    };
    let mut hashing = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
    };
    let stats = unpack_layer(&mut hashing, dest)?;
    // The tar reader stops at the end-of-archive marker; the diff id covers the padding after it.
    io::copy(&mut hashing, &mut io::sink()).map_err(UnpackError::Archive)?;
    let actual = Digest::from_hasher(hashing.hasher).to_string();
    if let Some(expected) = diff_id {
        if expected != actual {
            return Err(UnpackError::DiffIdMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    Ok(stats)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// File metadata taken from a tar header.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Unpacks an uncompressed layer tar from `reader` into `dest` (an existing directory).
/// See the module documentation for the rules.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    let mut dirs: HashMap<PathBuf, Meta> = HashMap::new();
    for entry in archive.entries().map_err(UnpackError::Archive)? {
        let mut entry = entry.map_err(UnpackError::Archive)?;
        stats.entries += 1;
        let raw = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let name = raw.display().to_string();
        let rel = normalise(&raw).ok_or_else(|| UnpackError::Escape {
            entry: name.clone(),
        })?;
        let kind = entry.header().entry_type();
        let Some(file_name) = rel.file_name().map(|f| f.to_owned()) else {
            // The layer root itself ("./"): its attributes come from the overlay's upper dir.
            if kind.is_dir() {
                continue;
            }
            return Err(UnpackError::Invalid {
                entry: name,
                reason: "empty path",
            });
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let file_name_str = file_name.to_string_lossy();

        if file_name_str == OPAQUE_MARKER {
            let dir = resolve_parent(dest, parent_rel, &name)?;
            set_xattr(&dir, OPAQUE_XATTR, b"y").map_err(|source| UnpackError::Io {
                entry: name.clone(),
                op: "set opaque xattr on",
                path: dir.clone(),
                source,
            })?;
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = file_name_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                // Other `.wh..wh.*` names are aufs bookkeeping with no meaning for overlayfs.
                stats.skipped += 1;
                continue;
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(UnpackError::Escape { entry: name });
            }
            let parent = resolve_parent(dest, parent_rel, &name)?;
            let target = parent.join(hidden);
            remove_existing(&target, &name)?;
            nix::sys::stat::mknod(&target, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| {
                UnpackError::Io {
                    entry: name.clone(),
                    op: "create whiteout",
                    path: target.clone(),
                    source: e.into(),
                }
            })?;
            stats.whiteouts += 1;
            continue;
        }

        let meta = header_meta(&mut entry, &name)?;
        let parent = resolve_parent(dest, parent_rel, &name)?;
        let path = parent.join(&file_name);
        match kind {
            EntryType::Directory => {
                let is_dir = std::fs::symlink_metadata(&path)
                    .map(|m| m.file_type().is_dir())
                    .unwrap_or(false);
                if !is_dir {
                    remove_existing(&path, &name)?;
                    std::fs::create_dir(&path).map_err(io_err(&name, "mkdir", &path))?;
                }
                dirs.insert(rel, meta);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&path, &name)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_err(&name, "create", &path))?;
                stats.bytes +=
                    io::copy(&mut entry, &mut file).map_err(io_err(&name, "write", &path))?;
                drop(file);
                apply_meta(&path, &meta, false, &name)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| UnpackError::Invalid {
                        entry: name.clone(),
                        reason: "symlink without a target",
                    })?
                    .into_owned();
                remove_existing(&path, &name)?;
                // The target is stored verbatim: it is only ever resolved inside the container,
                // whose root is the overlay, never by this unpacker.
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(io_err(&name, "symlink", &path))?;
                apply_meta(&path, &meta, true, &name)?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| UnpackError::Invalid {
                        entry: name.clone(),
                        reason: "hardlink without a target",
                    })?
                    .into_owned();
                let target = hardlink_target(dest, &target_raw, &name)?;
                if target != path {
                    remove_existing(&path, &name)?;
                    // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                    std::fs::hard_link(&target, &path).map_err(io_err(&name, "link", &path))?;
                }
            }
            EntryType::Fifo => {
                remove_existing(&path, &name)?;
                nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600))
                    .map_err(|e| io_err(&name, "mkfifo", &path)(e.into()))?;
                apply_meta(&path, &meta, false, &name)?;
            }
            EntryType::Char | EntryType::Block => {
                tracing::debug!(entry = %name, "skipping device node in layer");
                stats.skipped += 1;
            }
            other => {
                tracing::debug!(entry = %name, kind = ?other, "skipping unsupported tar entry type");
                stats.skipped += 1;
            }
        }
    }
    let mut dirs: Vec<_> = dirs.into_iter().collect();
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, meta) in dirs {
        let path = dest.join(&rel);
        // A later entry may have replaced the directory; its own metadata is already in place.
        let still_dir = std::fs::symlink_metadata(&path)
            .map(|m| m.file_type().is_dir())
            .unwrap_or(false);
        if still_dir {
            apply_meta(&path, &meta, false, &rel.display().to_string())?;
        }
    }
    Ok(stats)
}

/// Makes an archive path relative to the layer: drops `/` and `.`, refuses `..`.
fn normalise(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Walks `rel` below `dest` one component at a time without following symlinks, creating
/// missing directories (mode 0755; a later directory entry sets the real metadata).
fn resolve_parent(dest: &Path, rel: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
    walk(dest, rel, entry, true)
}

fn walk(dest: &Path, rel: &Path, entry: &str, create: bool) -> Result<PathBuf, UnpackError> {
    let mut current = dest.to_path_buf();
    let mut so_far = PathBuf::new();
    for component in rel.components() {
        current.push(component);
        so_far.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink {
                    entry: entry.to_owned(),
                    parent: so_far,
                })
            }
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(UnpackError::NotADirectory {
                    entry: entry.to_owned(),
                    parent: so_far,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&current).map_err(io_err(entry, "mkdir", &current))?;
            }
            Err(e) => return Err(io_err(entry, "stat", &current)(e)),
        }
    }
    Ok(current)
}

/// Resolves a hardlink target inside the layer: no `..`, no symlinked parents, must exist and
/// must not be a directory.
fn hardlink_target(dest: &Path, target_raw: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
    let not_here = || UnpackError::HardlinkTarget {
        entry: entry.to_owned(),
        target: target_raw.display().to_string(),
    };
    let rel = normalise(target_raw).ok_or_else(|| UnpackError::Escape {
        entry: entry.to_owned(),
    })?;
    let file_name = rel.file_name().ok_or_else(not_here)?;
    let parent = match walk(dest, rel.parent().unwrap_or(Path::new("")), entry, false) {
        Ok(p) => p,
        Err(UnpackError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(not_here())
        }
        Err(e) => return Err(e),
    };
    let target = parent.join(file_name);
    match std::fs::symlink_metadata(&target) {
        Ok(m) if !m.file_type().is_dir() => Ok(target),
        _ => Err(not_here()),
    }
}

/// Removes whatever is at `path` (never following a symlink there) so the entry can replace it.
fn remove_existing(path: &Path, entry: &str) -> Result<(), UnpackError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(entry, "stat", path)(e)),
        Ok(m) if m.file_type().is_dir() => {
            std::fs::remove_dir_all(path).map_err(io_err(entry, "remove", path))
        }
        Ok(_) => std::fs::remove_file(path).map_err(io_err(entry, "remove", path)),
    }
}

fn header_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, UnpackError> {
    let header = entry.header();
    let invalid = |reason| UnpackError::Invalid {
        entry: name.to_owned(),
        reason,
    };
    let mode = header.mode().map_err(|_| invalid("bad mode"))? & 0o7777;
    let uid = header.uid().map_err(|_| invalid("bad uid"))?;
    let gid = header.gid().map_err(|_| invalid("bad gid"))?;
    let uid = u32::try_from(uid).map_err(|_| invalid("uid out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| invalid("gid out of range"))?;
    let mtime = header.mtime().unwrap_or(0);
    let mtime = i64::try_from(mtime).unwrap_or(i64::MAX);
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(UnpackError::Archive)? {
        for extension in extensions {
            let extension = extension.map_err(UnpackError::Archive)?;
            let Ok(key) = extension.key() else { continue };
            if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                // trusted.* (overlay's own attributes among them) and security labels stay host-controlled.
                if xattr.starts_with("user.") || xattr == "security.capability" {
                    xattrs.push((xattr.to_owned(), extension.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// Owner, then mode (chown clears setuid), then xattrs (chown clears capabilities), then mtime.
fn apply_meta(path: &Path, meta: &Meta, symlink: bool, entry: &str) -> Result<(), UnpackError> {
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
        .map_err(io_err(entry, "chown", path))?;
    if !symlink {
        // `path` was just created by us and is not a symlink, so following is moot.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode))
            .map_err(io_err(entry, "chmod", path))?;
    }
    for (name, value) in &meta.xattrs {
        if let Err(e) = set_xattr(path, name, value) {
            tracing::warn!(entry, xattr = %name, error = %e, "could not keep xattr from layer");
        }
    }
    let time = TimeSpec::new(meta.mtime, 0);
    nix::sys::stat::utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| io_err(entry, "set mtime of", path)(e.into()))
}

/// `lsetxattr(2)`: sets an attribute on `path` itself, never on a symlink's target.
fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let c_name = CString::new(name)?;
    // SAFETY: `c_path` and `c_name` are NUL-terminated and outlive the call; `value` is valid
    // for `value.len()` bytes; the kernel copies all three and keeps no pointer.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn io_err<'a>(
    entry: &'a str,
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        entry: entry.to_owned(),
        op,
        path: path.to_owned(),
        source,
    }
}
