#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use crate::migrate::session::{scan_images, ImageSet};
use crate::migrate::wire::TreeEntryKind;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::super::session::{
    HookError, PrecopyPolicy, ProgressSink, Received, RestorePlan, SessionError, SourceConfig,
    TargetConfig, TargetHost, Timeouts,
};
use super::super::test_pki::{ca, identity, localhost};
use super::super::transport::MigrationEndpoint;
use super::super::wire::DEFAULT_MAX_PAYLOAD;
use super::*;
use crate::checkpoint::{Criu, DumpMode, DumpRequest, RestoreReport};

#[test]
fn every_image_of_a_lazy_dump_travels_but_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "pagemap-1.img",
        "pages-1.img",
        "core-1.img",
        "dump.log",
        "berth-checkpoint.json",
    ] {
        std::fs::write(dir.path().join(name), name).unwrap();
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let out = scan_images(dir.path(), ImageSet::All, Phase::Transfer).unwrap();
    let paths: Vec<&str> = out.iter().map(|o| o.entry.path.as_str()).collect();
    // The pagemaps say which pages are lazy and the page images hold the others.
    assert_eq!(
        paths,
        [
            "images/berth-checkpoint.json",
            "images/core-1.img",
            "images/pagemap-1.img",
            "images/pages-1.img"
        ]
    );
    assert!(out.iter().all(|o| o.entry.kind == TreeEntryKind::File));
    assert_eq!(out[3].size, "pages-1.img".len() as u64);
}

/// A host that must never be asked anything.
struct Untouched(Mutex<u32>);

impl TargetHost for Untouched {
    async fn prepare(&self, _: &Received) -> Result<RestorePlan, HookError> {
        *self.0.lock().unwrap() += 1;
        Err("unexpected".into())
    }
    async fn adopt(&self, _: &RestoreReport) -> Result<(), HookError> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
    async fn abort(&self, _: Option<i32>) {
        *self.0.lock().unwrap() += 1;
    }
}

#[tokio::test]
async fn a_target_expecting_another_migration_refuses_before_anything_freezes() {
    let ca = ca("postcopy-test");
    let src = MigrationEndpoint::bind(localhost(), &identity(&ca, "n1")).unwrap();
    let dst = MigrationEndpoint::bind(localhost(), &identity(&ca, "n2")).unwrap();
    let addr = dst.local_addr().unwrap();
    let (dialled, accepted) = tokio::join!(src.connect(addr, "n2"), dst.accept());
    let (src_conn, dst_conn) = (dialled.unwrap(), accepted.unwrap().unwrap().0);
    let dir = tempfile::tempdir().unwrap();
    // A pid that is not frozen by anyone: a resume would be a bug, a dump impossible.
    let pid = i32::MAX;
    let source = SourceConfig {
        migration_id: "mig-1".into(),
        instance_id: "ins-1".into(),
        dump: DumpRequest::new(pid, dir.path().join("d"), DumpMode::LeaveRunning),
        work_dir: dir.path().join("out"),
        upper_dir: None,
        precopy: PrecopyPolicy::default(),
        timeouts: Timeouts {
            handshake: Duration::from_secs(5),
            ..Timeouts::default()
        },
        max_payload: DEFAULT_MAX_PAYLOAD,
    };
    let target = TargetConfig {
        migration_id: "mig-2".into(),
        instance_id: "ins-1".into(),
        staging_dir: dir.path().join("in/staging"),
        max_bytes: 1 << 20,
        chown: false,
        timeouts: source.timeouts,
        max_payload: DEFAULT_MAX_PAYLOAD,
    };
    let criu = Arc::new(Criu::new(PathBuf::from("/nonexistent/criu")));
    let host = Untouched(Mutex::new(0));
    let progress: ProgressSink = Arc::new(|_| {});
    let (sent, landed) = tokio::join!(
        run_source_postcopy_quic(&src_conn, criu.clone(), &source, &progress),
        run_target_postcopy_quic(&dst_conn, criu, &host, &target, &progress),
    );
    let err = landed.unwrap_err();
    assert!(matches!(err, SessionError::Refused { .. }), "{err}");
    let err = sent.unwrap_err();
    assert_eq!(err.phase(), Phase::Prepare, "{err}");
    assert!(
        !matches!(err, SessionError::ResumeFailed { .. }),
        "nothing to resume: {err}"
    );
    assert_eq!(*host.0.lock().unwrap(), 0, "the host was never asked");
    assert!(!target.staging_dir.exists());
    assert!(!source.work_dir.join("lazy").exists());
}
