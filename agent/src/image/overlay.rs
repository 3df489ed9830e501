//! Per-instance overlayfs rootfs: read-only image layers below, a private writable upper.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::ImageError;

/// The kernel copies at most one page of mount data.
const MAX_MOUNT_DATA: usize = 4095;

/// Directories of one instance's rootfs.
pub(crate) struct InstanceDirs {
    pub(crate) rootfs: PathBuf,
    pub(crate) upper: PathBuf,
    pub(crate) work: PathBuf,
}

impl InstanceDirs {
    pub(crate) fn new(instance_dir: &Path) -> Self {
        Self {
            rootfs: instance_dir.join("rootfs"),
            upper: instance_dir.join("upper"),
            work: instance_dir.join("work"),
        }
    }
}

/// Refuses paths overlayfs option parsing would split (`,` `:`) or unescape (`\`).
pub(crate) fn check_path(path: &Path) -> Result<(), ImageError> {
    let s = path.to_string_lossy();
    if s.contains([',', ':', '\\']) || path.to_str().is_none() {
        return Err(ImageError::UnusablePath {
            path: path.to_owned(),
            reason: "overlayfs cannot take paths with ',', ':', '\\' or non-UTF-8 bytes",
        });
    }
    Ok(())
}

/// Whether `path` is a mount point other than its parent's filesystem (a different device).
fn is_mounted(path: &Path) -> std::io::Result<bool> {
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let own = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(own.dev() != std::fs::metadata(parent)?.dev())
}

/// Mounts `lowers` (bottom first) under `dirs.rootfs`. Already mounted → left as is.
pub(crate) fn mount_overlay(lowers: &[PathBuf], dirs: &InstanceDirs) -> Result<(), ImageError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Io { op, path, source }
    };
    for dir in [&dirs.rootfs, &dirs.upper, &dirs.work] {
        check_path(dir)?;
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    if is_mounted(&dirs.rootfs).map_err(io("stat", &dirs.rootfs))? {
        tracing::info!(rootfs = %dirs.rootfs.display(), "rootfs already mounted, reusing it");
        return Ok(());
    }
    let lowerdir = lowers
        .iter()
        .rev()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        dirs.upper.display(),
        dirs.work.display()
    );
    if data.len() > MAX_MOUNT_DATA {
        return Err(ImageError::TooManyLayers {
            layers: lowers.len(),
            bytes: data.len(),
        });
    }
    mount(
        Some("overlay"),
        &dirs.rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|errno| ImageError::Mount {
        path: dirs.rootfs.clone(),
        source: std::io::Error::from(errno),
    })
}

/// Unmounts `dirs.rootfs` (every stacked mount) and removes rootfs, upper and work.
pub(crate) fn release(dirs: &InstanceDirs) -> Result<(), ImageError> {
    // Bounded: a rootfs is mounted once; more than a few stacked mounts means something else is wrong.
    for _ in 0..8 {
        match umount2(&dirs.rootfs, MntFlags::empty()) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(Errno::EBUSY) => {
                // Still in use (a process cwd or an open file): detach now, the kernel frees it later.
                tracing::warn!(rootfs = %dirs.rootfs.display(), "rootfs busy, detaching lazily");
                umount2(&dirs.rootfs, MntFlags::MNT_DETACH).map_err(|errno| {
                    ImageError::Unmount {
                        path: dirs.rootfs.clone(),
                        source: errno.into(),
                    }
                })?;
            }
            Err(errno) => {
                return Err(ImageError::Unmount {
                    path: dirs.rootfs.clone(),
                    source: errno.into(),
                })
            }
        }
    }
    // Never delete through a live mount: that would delete the image's shared layers.
    let mounted = is_mounted(&dirs.rootfs).map_err(|source| ImageError::Io {
        op: "stat",
        path: dirs.rootfs.clone(),
        source,
    })?;
    if mounted {
        return Err(ImageError::Unmount {
            path: dirs.rootfs.clone(),
            source: std::io::Error::other("still mounted after unmount"),
        });
    }
    for dir in [&dirs.rootfs, &dirs.upper, &dirs.work] {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ImageError::Io {
                    op: "remove",
                    path: dir.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}
