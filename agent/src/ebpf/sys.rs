//! The few kernel calls aya 0.14 does not expose: open a pinned object, replace a link's program,
//! read a cgroup link's target; plus finding the cgroup2 mount and making sure bpffs is mounted.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tracing::info;

use super::EbpfError;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `statfs.f_type` of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid and
    // exclusively borrowed for the call; the kernel reads (and for some commands writes) at most
    // `size_of::<T>()` bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("BPF_OBJ_GET: fd out of range"))?;
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Atomically makes `link` run `prog` instead of its current program (`BPF_LINK_UPDATE`): the
/// attachment never goes away, so there is no window without the program.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: fd_u32(link)?,
        new_prog_fd: fd_u32(prog)?,
        ..LinkUpdateAttr::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The cgroup id and attach type of a cgroup link (0 when the cgroup is gone).
pub fn cgroup_link_target(link: BorrowedFd<'_>) -> io::Result<(u64, u32)> {
    // `struct bpf_link_info`: type, id, prog_id (u32 each), then an 8-aligned union whose cgroup
    // member is { u64 cgroup_id; u32 attach_type; }. The rest stays zero, as the kernel wants.
    let mut info = [0u64; 16];
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(link)?,
        info_len: u32::try_from(size_of::<[u64; 16]>()).unwrap_or(128),
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info[2], (info[3] & 0xffff_ffff) as u32))
}

fn fd_u32(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))
}

/// The id the kernel gives the cgroup at `dir` (its inode number in cgroup2).
pub fn cgroup_id(dir: &Path) -> Result<u64, EbpfError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| EbpfError::io("stat cgroup", dir, source))
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let text =
        std::fs::read_to_string(path).map_err(|source| EbpfError::io("read", path, source))?;
    mount_point_of(&text, "cgroup2").ok_or(EbpfError::NoCgroup2)
}

/// The first mount point of a filesystem type in mountinfo text.
pub(crate) fn mount_point_of(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != fstype {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes sure `pin_dir` will be on bpffs: mounts bpffs at [`BPFFS_ROOT`] when `pin_dir` is under
/// it and it is not mounted yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), EbpfError> {
    if on_bpffs(pin_dir)? {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !pin_dir.starts_with(root) {
        return Err(EbpfError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    std::fs::create_dir_all(root).map_err(|source| EbpfError::io("create", root, source))?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| EbpfError::io("mount bpffs on", root, io::Error::from(e)))?;
    info!(path = %root.display(), "mounted bpffs");
    if on_bpffs(pin_dir)? {
        Ok(())
    } else {
        Err(EbpfError::NotBpffs {
            path: pin_dir.to_owned(),
        })
    }
}

/// Whether the nearest existing ancestor of `path` (itself included) is on bpffs.
fn on_bpffs(path: &Path) -> Result<bool, EbpfError> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st = nix::sys::statfs::statfs(existing)
        .map_err(|e| EbpfError::io("statfs", existing, io::Error::from(e)))?;
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libcs"
    )]
    let magic = st.filesystem_type().0 as i64;
    Ok(magic == BPF_FS_MAGIC)
}

/// `if_nametoindex`.
pub fn if_index(name: &str) -> Result<u32, EbpfError> {
    nix::net::if_::if_nametoindex(name).map_err(|e| EbpfError::Iface {
        iface: name.to_owned(),
        source: io::Error::from(e),
    })
}

/// `if_indextoname`; `None` when no interface has that index (any more).
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write, NUL included.
    let ret = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if ret.is_null() {
        return None;
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_hosts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:7 - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            mount_point_of(hybrid, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            mount_point_of(pure, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            mount_point_of("1 0 0:1 / / rw - ext4 /dev/vda rw\n", "cgroup2"),
            None
        );
        assert_eq!(unescape(r"/a\040b"), "/a b");
    }
}
