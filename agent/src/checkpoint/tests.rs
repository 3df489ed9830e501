//! Unit tests of the checkpoint module (no root, no CRIU): request validation, the fake, log
//! tails, bind mount discovery.

use super::fake::{Call, FakeCheckpointer, Op};
use super::*;

fn criu_nowhere() -> Criu {
    Criu::new(PathBuf::from("/nonexistent/criu"))
}

#[test]
fn bad_dump_requests_are_refused_before_criu_runs() {
    let c = criu_nowhere();
    let mut req = DumpRequest::new(0, PathBuf::from("/tmp/x"), DumpMode::LeaveRunning);
    assert!(matches!(
        c.dump(&req),
        Err(CheckpointError::InvalidRequest(_))
    ));
    req.pid = 1;
    req.images_dir = PathBuf::from("relative/images");
    assert!(matches!(
        c.dump(&req),
        Err(CheckpointError::InvalidRequest(_))
    ));
    req.images_dir = PathBuf::from("/tmp/../etc");
    assert!(matches!(
        c.dump(&req),
        Err(CheckpointError::InvalidRequest(_))
    ));
    req.images_dir = PathBuf::from("/tmp/x");
    req.external_mounts = vec!["etc/resolv.conf".into()];
    assert!(matches!(
        c.dump(&req),
        Err(CheckpointError::InvalidRequest(_))
    ));
}

#[test]
fn missing_criu_binary_is_an_rpc_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = criu_nowhere().features().unwrap_err();
    assert!(
        matches!(err, CheckpointError::Rpc { op: "features", .. }),
        "{err}"
    );
    let _ = dir;
}

#[test]
fn restore_refuses_relative_or_symlinked_rootfs() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let c = criu_nowhere();
    let mut req = RestoreRequest {
        images_dir: dir.path().to_owned(),
        rootfs: PathBuf::from("rootfs"),
        netns: None,
        stdio: [None, None, None],
        cgroup_root: None,
        external_mounts: Vec::new(),
        tcp_established: false,
        timeout: Duration::from_secs(1),
    };
    assert!(matches!(
        c.restore(&req),
        Err(CheckpointError::InvalidRequest(_))
    ));
    req.rootfs = link;
    let err = c.restore(&req).unwrap_err();
    assert!(err.to_string().contains("symlinks"), "{err}");
    // A real rootfs but no metadata: an io error naming the file.
    req.rootfs = real.canonicalize().unwrap();
    let err = c.restore(&req).unwrap_err();
    assert!(err.to_string().contains(METADATA_FILE), "{err}");
}

#[test]
fn restore_needs_a_netns_and_pipe_keys_from_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().canonicalize().unwrap();
    let meta = Metadata {
        stdio: vec!["/dev/null".into(), "pipe:[5]".into(), "pipe:[6]".into()],
        external_netns: true,
        external_mounts: vec!["/etc/resolv.conf".into()],
        pid: 7,
    };
    std::fs::write(
        images.join(METADATA_FILE),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    assert_eq!(Metadata::read(&images).unwrap(), meta);
    let c = criu_nowhere();
    let devnull = File::open("/dev/null").unwrap();
    let mut req = RestoreRequest {
        images_dir: images.clone(),
        rootfs: images.clone(),
        netns: None,
        stdio: [None, None, None],
        cgroup_root: None,
        external_mounts: Vec::new(),
        tcp_established: false,
        timeout: Duration::from_secs(1),
    };
    let err = c.restore(&req).unwrap_err();
    assert!(err.to_string().contains("network namespace"), "{err}");
    req.netns = Some(PathBuf::from("/proc/self/ns/net"));
    // fd 0 was /dev/null: nothing to replace there.
    req.stdio[0] = Some(std::os::fd::AsFd::as_fd(&devnull));
    let err = c.restore(&req).unwrap_err();
    assert!(err.to_string().contains("not a pipe"), "{err}");
    req.stdio[0] = None;
    let err = c.restore(&req).unwrap_err();
    assert!(err.to_string().contains("/etc/resolv.conf"), "{err}");
    req.external_mounts = vec![("/etc/resolv.conf".into(), PathBuf::from("/etc/hosts"))];
    req.cgroup_root = Some("/../x".into());
    let err = c.restore(&req).unwrap_err();
    assert!(err.to_string().contains("cgroup root"), "{err}");
}

#[test]
fn corrupt_metadata_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(METADATA_FILE), b"{not json").unwrap();
    assert!(matches!(
        Metadata::read(dir.path()),
        Err(CheckpointError::InvalidRequest(_))
    ));
}

#[test]
fn only_hierarchies_with_a_cgroup_of_their_own_are_dumped() {
    let text = "9:name=systemd:/\n4:memory:/berth-n1/ins-1\n3:cpu,cpuacct:/berth-n1/ins-1\n\
                0::/\n1:pids:/\n";
    assert_eq!(hierarchies_below_root(text), ["memory", "cpu,cpuacct"]);
    assert_eq!(hierarchies_below_root("0::/berth-n1/ins-1\n"), [""]);
    assert!(hierarchies_below_root("0::/\n").is_empty());
    assert!(hierarchies_below_root("garbage\n").is_empty());
}

#[test]
fn log_tail_prefers_error_lines() {
    let log = "(00.1) a\n(00.2) Error (criu/x.c:1): boom\n(00.3) b\n(00.4) Error (y): bang\n";
    assert_eq!(
        tail_of(log),
        "(00.2) Error (criu/x.c:1): boom | (00.4) Error (y): bang"
    );
    let many: String = (0..20).map(|i| format!("line {i}\n")).collect();
    let t = tail_of(&many);
    assert!(t.starts_with("line 12") && t.ends_with("line 19"), "{t}");
    assert!(log_tail(Path::new("/nonexistent/dump.log")).contains("no log"));
    // A stall is told by where the log stops, errors or not.
    assert_eq!(last_lines(log), log.trim_end().replace('\n', " | "));
    assert!(last_lines(&many).starts_with("line 12"));
}

#[test]
fn bind_mounts_of_a_spec() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"mounts":[{"destination":"/proc","type":"proc","source":"proc"},
        {"destination":"/etc/resolv.conf","type":"bind","source":"/x","options":["rbind","ro"]},
        {"destination":"/data","type":"none","source":"/y","options":["bind"]}]}"#,
    )
    .unwrap();
    assert_eq!(
        bind_mount_points(&cfg).unwrap(),
        vec!["/etc/resolv.conf".to_owned(), "/data".to_owned()]
    );
    std::fs::write(&cfg, "[").unwrap();
    assert!(bind_mount_points(&cfg).is_err());
}

#[test]
fn images_size_skips_logs_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pages-1.img"), [0u8; 4096]).unwrap();
    std::fs::write(dir.path().join("dump.log"), [0u8; 100]).unwrap();
    std::fs::write(dir.path().join(METADATA_FILE), [0u8; 10]).unwrap();
    assert_eq!(images_size(dir.path()).unwrap(), 4096);
}

#[test]
fn fake_records_calls_and_scripted_failures() {
    let fake = FakeCheckpointer::new(Features::default());
    let req = DumpRequest::new(42, PathBuf::from("/img/1"), DumpMode::LeaveStopped);
    fake.fail(Op::Restore, "no netns");
    assert!(fake.dump(&req).is_ok());
    let resume = ResumeRequest {
        pid: 42,
        unlock_network: true,
    };
    assert_eq!(fake.resume(&resume).unwrap().tasks, vec![42]);
    let restore = RestoreRequest {
        images_dir: PathBuf::from("/img/1"),
        rootfs: PathBuf::from("/r"),
        netns: None,
        stdio: [None, None, None],
        cgroup_root: None,
        external_mounts: Vec::new(),
        tcp_established: true,
        timeout: Duration::from_secs(1),
    };
    let err = fake.restore(&restore).unwrap_err();
    assert!(err.to_string().contains("no netns"), "{err}");
    assert_eq!(fake.restore(&restore).unwrap().pid, 1001);
    let calls = fake.calls();
    assert_eq!(calls.len(), 4);
    assert!(matches!(
        calls[0],
        Call::Dump {
            pid: 42,
            mode: DumpMode::LeaveStopped,
            ..
        }
    ));
    assert_eq!(calls[1], Call::Resume(resume));
}
