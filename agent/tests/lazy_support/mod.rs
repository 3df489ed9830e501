//! What the lazy-pages tests share (checkpoint_lazy.rs, postcopy.rs, postcopy_source_lost.rs): a
//! busybox container whose memory must come back whole, and the target's side of a restore.
#![allow(dead_code)] // each test binary uses its own part
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_agent::checkpoint::{Checkpointer, Criu};

use berth_agent::migrate::transport::{node_dns_name, NodeIdentity};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::runtime_support::{self, Fixture};

/// 8 MB of 'x' in a shell variable (memory the lazy pages must bring back: `${#big}` reads
/// all of it, and a page arriving as zeroes would cut it short), a counter mirrored to /tmp/c,
/// and `tick N len L` every 10 counts.
pub const COUNTER: &str = "big=$(head -c 8000000 /dev/zero | tr '\\0' x); echo ready; i=0; \
                       while true; do i=$((i+1)); echo $i > /tmp/c; \
                       [ $((i % 10)) -eq 0 ] && echo tick $i len ${#big}; sleep 0.1; done";

/// States what these tests need.
pub fn require_lazy_pages() -> Criu {
    let criu = runtime_support::require_criu();
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size").unwrap();
    assert!(
        max.trim().parse::<u64>().unwrap() >= 4_194_304,
        "lazy pages need sysctl fs.pipe-max-size=4194304 (cargo xtask install sets it)"
    );
    assert!(
        criu.features().unwrap().lazy_pages,
        "lazy pages need userfaultfd"
    );
    criu
}

/// A busybox fixture whose rootfs also has `head` and `tr`.
pub fn fixture() -> Fixture {
    let f = Fixture::with_helper();
    for applet in ["head", "tr"] {
        symlink("busybox", f.rootfs.join("bin").join(applet)).unwrap();
    }
    f
}

pub fn counter(rootfs: &Path) -> u64 {
    // The shell rewrites the file every 100 ms: retry a torn read.
    for _ in 0..50 {
        if let Ok(n) = std::fs::read_to_string(rootfs.join("tmp/c"))
            .unwrap_or_default()
            .trim()
            .parse()
        {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no counter in {}", rootfs.display());
}

/// The target's copy of the files (a migration carries the upper dir separately).
pub fn copy_rootfs(f: &Fixture, name: &str) -> PathBuf {
    let to = f.dir.path().join(name);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&f.rootfs)
        .arg(&to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a rootfs");
    to.canonicalize().unwrap()
}

/// Collects what is written to a pipe's write end (returned) into a string.
pub struct PipeReader {
    output: Arc<Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PipeReader {
    pub fn new() -> (Self, std::os::fd::OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let thread = {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut file = std::fs::File::from(r);
                let mut buf = [0u8; 256];
                while let Ok(n) = file.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        (
            Self {
                output,
                thread: Some(thread),
            },
            w,
        )
    }

    pub fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        // The writers are gone once the restored tree is; the thread then sees EOF.
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// `(count, len)` of the first `tick N len L` line.
pub fn first_tick(out: &str) -> Option<(u64, u64)> {
    out.lines().find_map(|l| {
        let rest = l.strip_prefix("tick ")?;
        let (n, len) = rest.split_once(" len ")?;
        Some((n.trim().parse().ok()?, len.trim().parse().ok()?))
    })
}

/// Two node identities signed by one throwaway CA: (n1 = source, n2 = target).
pub fn identities() -> (NodeIdentity, NodeIdentity) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "berth-test-ca");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = params.self_signed(&key).unwrap().pem();
    let issuer = Issuer::new(params, key);
    let identity = |node: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![node_dns_name(node).unwrap()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap().pem();
        NodeIdentity::from_pem(
            cert.as_bytes(),
            key.serialize_pem().as_bytes(),
            ca_pem.as_bytes(),
        )
        .unwrap()
    };
    (identity("n1"), identity("n2"))
}

/// Where a post-copy test's target restores: a copy of the source's rootfs, its own netns,
/// cgroup and output pipes.
pub struct LandingSite {
    /// The source's files, copied to `rootfs` once the source is frozen (as a migration's upper
    /// dir arrives after the freeze): a copy taken earlier would hold files the container changed
    /// since, and CRIU refuses an open file whose size moved.
    pub from: PathBuf,
    pub rootfs: PathBuf,
    pub netns: PathBuf,
    pub cgroup_root: String,
    pub resolv: PathBuf,
    /// Write ends of the output pipes, handed to the restore once.
    pub stdio: Mutex<Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>>,
}

impl LandingSite {
    /// A site for `f`'s container in network namespace `netns`: `rootfs2` and a resolv.conf of
    /// its own under the fixture's dir, cgroup `/<parent>/ins-<tag>-<random>`, and the read ends
    /// of its output pipes (stdout, stderr).
    pub fn new(f: &Fixture, netns: PathBuf, tag: &str) -> (Self, PipeReader, PipeReader) {
        let work = f.dir.path().canonicalize().unwrap();
        let (out, out_w) = PipeReader::new();
        let (err, err_w) = PipeReader::new();
        let resolv = work.join("resolv.target");
        std::fs::write(&resolv, "nameserver 10.0.0.2\n").unwrap();
        let site = LandingSite {
            from: f.rootfs.clone(),
            rootfs: work.join("rootfs2"),
            netns,
            cgroup_root: format!("/{}/ins-{tag}-{}", f.parent, runtime_support::suffix()),
            resolv,
            stdio: Mutex::new(Some((out_w, err_w))),
        };
        (site, out, err)
    }

    /// The restore `received` asks for, into this site (the rootfs copied now).
    pub fn plan(
        &self,
        received: &berth_agent::migrate::session::Received,
    ) -> Result<berth_agent::migrate::session::RestorePlan, berth_agent::migrate::session::HookError>
    {
        let (out, err) = self.stdio.lock().unwrap().take().ok_or("prepared twice")?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&self.from)
            .arg(&self.rootfs)
            .status()?;
        if !copied.success() {
            return Err("cp -a rootfs".into());
        }
        let external_mounts = received
            .metadata
            .external_mounts
            .iter()
            .map(|m| (m.clone(), self.resolv.clone()))
            .collect();
        Ok(berth_agent::migrate::session::RestorePlan {
            rootfs: self.rootfs.clone(),
            netns: Some(self.netns.clone()),
            stdio: [None, Some(out), Some(err)],
            cgroup_root: Some(self.cgroup_root.clone()),
            external_mounts,
            tcp_established: true,
            timeout: Duration::from_secs(30),
        })
    }
}

/// The two sides' configs for moving container `id` (init `pid`) of `f`: a leave-running dump
/// with its bind mounts and established connections, a staging dir on the target, one
/// migration id for both.
pub fn session_configs(
    f: &Fixture,
    id: &str,
    pid: i32,
) -> (
    berth_agent::migrate::session::SourceConfig,
    berth_agent::migrate::session::TargetConfig,
) {
    use berth_agent::checkpoint::{bind_mount_points, DumpMode, DumpRequest};
    use berth_agent::migrate::session::{PrecopyPolicy, SourceConfig, TargetConfig, Timeouts};
    use berth_agent::migrate::wire::DEFAULT_MAX_PAYLOAD;
    let work = f.dir.path().canonicalize().unwrap();
    let mut dump = DumpRequest::new(pid, work.join("out/dump"), DumpMode::LeaveRunning);
    dump.external_mounts =
        bind_mount_points(&f.runtime.bundle_dir(id).join("config.json")).unwrap();
    dump.tcp_established = true;
    let mid = format!("mig-{}", runtime_support::suffix());
    let source = SourceConfig {
        migration_id: mid.clone(),
        instance_id: id.to_owned(),
        dump,
        work_dir: work.join("out"),
        upper_dir: None,
        precopy: PrecopyPolicy::default(),
        timeouts: Timeouts::default(),
        max_payload: DEFAULT_MAX_PAYLOAD,
    };
    let target = TargetConfig {
        migration_id: mid,
        instance_id: id.to_owned(),
        staging_dir: work.join("in/staging"),
        max_bytes: 1 << 30,
        chown: true,
        timeouts: Timeouts::default(),
        max_payload: DEFAULT_MAX_PAYLOAD,
    };
    (source, target)
}

/// A progress sink for a session and what it was told, in order.
pub fn progress_log() -> (
    berth_agent::migrate::session::ProgressSink,
    Arc<Mutex<Vec<berth_agent::migrate::session::MigrationProgress>>>,
) {
    use berth_agent::migrate::session::{MigrationProgress, ProgressSink};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink: ProgressSink = {
        let seen = seen.clone();
        Arc::new(move |p: &MigrationProgress| seen.lock().unwrap().push(*p))
    };
    (sink, seen)
}

/// A runtime for both sides of a session in one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}
