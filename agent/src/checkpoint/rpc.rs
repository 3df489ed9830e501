//! CRIU's RPC protocol (`criu swrk`): the subset of `images/rpc.proto` berth uses, written as
//! prost derives so no protoc step is needed, and one request/response exchange over the
//! `SOCK_SEQPACKET` socket pair CRIU's service worker is started with.
//!
//! Field numbers are CRIU's (they are the wire contract; CRIU 4.2 keeps old numbers stable).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use prost::Message;

/// `criu_req_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum ReqType {
    Empty = 0,
    Dump = 1,
    Restore = 2,
    Check = 3,
    PreDump = 4,
    PageServer = 5,
    Notify = 6,
    CpuinfoDump = 7,
    CpuinfoCheck = 8,
    FeatureCheck = 9,
    Version = 10,
}

/// `criu_cg_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum CgMode {
    Ignore = 0,
    None = 1,
    Props = 2,
    Soft = 3,
    Full = 4,
    Strict = 5,
    Default = 6,
}

/// `criu_network_lock_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum NetworkLockMethod {
    Iptables = 1,
    Nftables = 2,
    Skip = 3,
}

/// `ext_mount_map`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ExtMountMap {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub val: String,
}

/// `inherit_fd`: `fd` is a descriptor number in the CRIU process.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct InheritFd {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(int32, required, tag = "2")]
    pub fd: i32,
}

/// `cgroup_root`: without `ctrl`, for every controller.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CgroupRoot {
    #[prost(string, optional, tag = "1")]
    pub ctrl: Option<String>,
    #[prost(string, required, tag = "2")]
    pub path: String,
}

/// `criu_page_server_info`: where a page server listens (lazy dumps take only the port).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PageServerInfo {
    #[prost(string, optional, tag = "1")]
    pub address: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub port: Option<i32>,
}

/// `criu_opts` (the options berth sets).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Opts {
    #[prost(int32, required, tag = "1", default = "-1")]
    pub images_dir_fd: i32,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
    #[prost(bool, optional, tag = "3")]
    pub leave_running: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub ext_unix_sk: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub tcp_established: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub shell_job: Option<bool>,
    #[prost(bool, optional, tag = "8")]
    pub file_locks: Option<bool>,
    #[prost(int32, optional, tag = "9")]
    pub log_level: Option<i32>,
    #[prost(string, optional, tag = "10")]
    pub log_file: Option<String>,
    #[prost(message, optional, tag = "11")]
    pub ps: Option<PageServerInfo>,
    #[prost(bool, optional, tag = "12")]
    pub notify_scripts: Option<bool>,
    #[prost(string, optional, tag = "13")]
    pub root: Option<String>,
    #[prost(string, optional, tag = "14")]
    pub parent_img: Option<String>,
    #[prost(bool, optional, tag = "15")]
    pub track_mem: Option<bool>,
    #[prost(message, repeated, tag = "23")]
    pub ext_mnt: Vec<ExtMountMap>,
    #[prost(bool, optional, tag = "24")]
    pub manage_cgroups: Option<bool>,
    #[prost(message, repeated, tag = "25")]
    pub cg_root: Vec<CgroupRoot>,
    #[prost(bool, optional, tag = "26")]
    pub rst_sibling: Option<bool>,
    #[prost(message, repeated, tag = "27")]
    pub inherit_fd: Vec<InheritFd>,
    #[prost(enumeration = "CgMode", optional, tag = "34")]
    pub manage_cgroups_mode: Option<i32>,
    #[prost(string, repeated, tag = "37")]
    pub external: Vec<String>,
    #[prost(string, repeated, tag = "43")]
    pub cgroup_dump_controller: Vec<String>,
    #[prost(string, optional, tag = "44")]
    pub freeze_cgroup: Option<String>,
    #[prost(bool, optional, tag = "46")]
    pub tcp_skip_in_flight: Option<bool>,
    #[prost(uint32, optional, tag = "45")]
    pub timeout: Option<u32>,
    #[prost(bool, optional, tag = "48")]
    pub lazy_pages: Option<bool>,
    #[prost(string, optional, tag = "51")]
    pub config_file: Option<String>,
    #[prost(enumeration = "NetworkLockMethod", optional, tag = "64")]
    pub network_lock: Option<i32>,
    #[prost(string, optional, tag = "68")]
    pub images_dir: Option<String>,
    #[prost(bool, optional, tag = "69")]
    pub leave_stopped: Option<bool>,
}

/// `criu_features`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub(crate) struct Features {
    #[prost(bool, optional, tag = "1")]
    pub mem_track: Option<bool>,
    #[prost(bool, optional, tag = "2")]
    pub lazy_pages: Option<bool>,
    #[prost(bool, optional, tag = "3")]
    pub pidfd_store: Option<bool>,
}

/// `criu_req`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Req {
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub opts: Option<Opts>,
    #[prost(bool, optional, tag = "3")]
    pub notify_success: Option<bool>,
    #[prost(message, optional, tag = "5")]
    pub features: Option<Features>,
}

/// `criu_restore_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RestoreResp {
    #[prost(int32, required, tag = "1")]
    pub pid: i32,
}

/// `criu_notify`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Notify {
    #[prost(string, optional, tag = "1")]
    pub script: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
}

/// `criu_version`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Version {
    #[prost(int32, required, tag = "1")]
    pub major_number: i32,
    #[prost(int32, required, tag = "2")]
    pub minor_number: i32,
    #[prost(string, optional, tag = "3")]
    pub gitid: Option<String>,
    #[prost(int32, optional, tag = "4")]
    pub sublevel: Option<i32>,
}

/// `criu_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Resp {
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub r#type: i32,
    #[prost(bool, required, tag = "2")]
    pub success: bool,
    #[prost(message, optional, tag = "4")]
    pub restore: Option<RestoreResp>,
    #[prost(message, optional, tag = "5")]
    pub notify: Option<Notify>,
    #[prost(int32, optional, tag = "7")]
    pub cr_errno: Option<i32>,
    #[prost(message, optional, tag = "8")]
    pub features: Option<Features>,
    #[prost(string, optional, tag = "9")]
    pub cr_errmsg: Option<String>,
    #[prost(message, optional, tag = "10")]
    pub version: Option<Version>,
}

/// Why an exchange with `criu swrk` failed (before CRIU could answer success or failure).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SwrkError {
    #[error("run {criu}: {source}")]
    Spawn {
        criu: String,
        #[source]
        source: io::Error,
    },
    #[error("socket to criu: {0}")]
    Socket(#[source] io::Error),
    #[error("criu sent an undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("criu exited without answering ({0})")]
    Hangup(String),
    #[error("no answer from criu within {0:?}")]
    Timeout(Duration),
    #[error("criu answered a {got:?} request, expected {want:?}")]
    Unexpected { want: ReqType, got: i32 },
    #[error("too many inherited fds ({0}, at most {MAX_FDS})")]
    TooManyFds(usize),
}

/// At most this many fds are passed to CRIU besides its socket.
pub(crate) const MAX_FDS: usize = 16;

/// Where the first inherited fd lands in CRIU (its socket is at 3).
const FIRST_FD: RawFd = 4;

/// Biggest datagram CRIU sends (responses are small; this is generous).
const MAX_MSG: usize = 64 * 1024;

/// Runs one request through a fresh `criu swrk`. Each of `fds` is placed in CRIU at
/// `FIRST_FD + index` (see [`fd_number`]): `inherit_fd` entries must name those numbers. Notifications
/// (only sent when notify scripts are on) are acknowledged. Without an answer within `timeout`
/// CRIU is killed. The worker is waited for before returning.
pub(crate) fn call(
    criu: &Path,
    req: &Req,
    fds: &[OwnedFd],
    timeout: Duration,
) -> Result<Resp, SwrkError> {
    if fds.len() > MAX_FDS {
        return Err(SwrkError::TooManyFds(fds.len()));
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| SwrkError::Socket(e.into()))?;

    let mut sources = [-1; MAX_FDS + 1];
    sources[0] = theirs.as_raw_fd();
    for (slot, fd) in sources[1..].iter_mut().zip(fds) {
        *slot = fd.as_raw_fd();
    }
    let count = fds.len() + 1;
    let mut cmd = Command::new(criu);
    cmd.arg("swrk")
        .arg("3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec and only calls fcntl and dup2 (async-signal
    // safe) on fds that stay open in the parent until `spawn` returns; no allocation.
    unsafe {
        cmd.pre_exec(move || place(&sources[..count]));
    }
    let mut child = cmd.spawn().map_err(|source| SwrkError::Spawn {
        criu: criu.display().to_string(),
        source,
    })?;
    // CRIU holds its own copies now; ours would keep the socket open past CRIU's exit.
    drop(theirs);

    let result = exchange(&ours, req, timeout);
    if result.is_err() {
        let _ = child.kill();
    }
    reap(&mut child);
    result
}

/// Where `fds[index]` of [`call`] appears in the CRIU process.
pub(crate) fn fd_number(index: usize) -> i32 {
    FIRST_FD + index as i32
}

/// Moves `sources[i]` to fd `3 + i`, not close-on-exec. Through high duplicates first, so a
/// source already sitting on a target number is never overwritten before it is copied.
pub(super) fn place(sources: &[RawFd]) -> io::Result<()> {
    let mut high = [-1; MAX_FDS + 1];
    for (h, fd) in high.iter_mut().zip(sources) {
        // SAFETY: F_DUPFD_CLOEXEC on an fd the parent keeps open; async-signal-safe.
        *h = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100) };
        if *h < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (i, h) in high.iter().take(sources.len()).enumerate() {
        // SAFETY: dup2 onto a fixed small number; the copy is not close-on-exec.
        if unsafe { libc::dup2(*h, 3 + i as RawFd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn exchange(sock: &OwnedFd, req: &Req, timeout: Duration) -> Result<Resp, SwrkError> {
    let want = req.r#type;
    send(sock, &req.encode_to_vec())?;
    let deadline = Instant::now() + timeout;
    loop {
        let resp = Resp::decode(recv(sock, deadline, timeout)?.as_slice())?;
        if resp.r#type == ReqType::Notify as i32 && resp.success {
            let ack = Req {
                r#type: ReqType::Notify as i32,
                notify_success: Some(true),
                ..Default::default()
            };
            send(sock, &ack.encode_to_vec())?;
            continue;
        }
        if resp.r#type != want && resp.success {
            return Err(SwrkError::Unexpected {
                want: ReqType::try_from(want).unwrap_or(ReqType::Empty),
                got: resp.r#type,
            });
        }
        return Ok(resp);
    }
}

pub(super) fn send(sock: &OwnedFd, bytes: &[u8]) -> Result<(), SwrkError> {
    let sent = nix::sys::socket::send(
        sock.as_raw_fd(),
        bytes,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .map_err(|e| SwrkError::Socket(e.into()))?;
    if sent != bytes.len() {
        return Err(SwrkError::Socket(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to criu",
        )));
    }
    Ok(())
}

pub(super) fn recv(
    sock: &OwnedFd,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, SwrkError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SwrkError::Timeout(timeout));
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            break;
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(SwrkError::Socket(e));
            }
        }
    }
    let mut buf = vec![0u8; MAX_MSG];
    let n = nix::sys::socket::recv(
        sock.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .map_err(|e| SwrkError::Socket(e.into()))?;
    if n == 0 {
        return Err(SwrkError::Hangup("connection closed".to_owned()));
    }
    buf.truncate(n);
    Ok(buf)
}

/// Waits for the worker (it exits once it answered; a killed one dies at once).
fn reap(child: &mut Child) {
    match child.wait() {
        Ok(status) if !status.success() => {
            tracing::debug!(%status, "criu swrk exited");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot wait for criu swrk"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_prost() {
        let req = Req {
            r#type: ReqType::Dump as i32,
            opts: Some(Opts {
                images_dir_fd: -1,
                images_dir: Some("/x".into()),
                pid: Some(42),
                leave_stopped: Some(true),
                external: vec!["net[1]:extRootNetNS".into()],
                inherit_fd: vec![InheritFd {
                    key: "pipe:[7]".into(),
                    fd: 4,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let back = Req::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn default_images_dir_fd_is_minus_one() {
        assert_eq!(Opts::default().images_dir_fd, -1);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(Resp::decode(&[0xff, 0xff, 0xff][..]).is_err());
        assert!(Resp::decode(&[0x0a][..]).is_err(), "truncated");
    }
}
