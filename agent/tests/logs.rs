//! Container logs: rotation, tail and follow, the log shim as a real process (it outlives its
//! parent and exits on EOF), the agent's logs API over loopback, and a real container whose output
//! reaches the log through the shim's pipes (root).
//!
//! The shim runs as `berth-agent __log-shim`, so these tests need the agent binary's dispatch of
//! that argument. Every test works in its own temp dir; processes are killed in `Drop` guards.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::io::{BufRead, Write};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_agent::logs::{
    self, encode_record, FollowFrom, LogLine, LogShim, RotatingWriter, Stream, LOG_FILE,
};
use futures::StreamExt;

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth-agent"))
}

fn shim(max_size: u64) -> LogShim {
    LogShim {
        max_size,
        ..LogShim::new(agent_bin())
    }
}

fn record(stream: Stream, text: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_record(
        &mut buf,
        &logs::now_timestamp(),
        stream,
        false,
        text.as_bytes(),
    );
    buf
}

fn texts(lines: &[LogLine]) -> Vec<String> {
    lines.iter().map(|l| l.line.clone()).collect()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills a pid we started (if it still runs) when the test ends, even by panic.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Alive and not a zombie.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Waits for our child `pid` and returns its exit code.
fn wait_child(pid: i32, timeout: Duration) -> i32 {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).unwrap() {
            WaitStatus::Exited(_, code) => return code,
            WaitStatus::Signaled(_, sig, _) => return 128 + sig as i32,
            _ => {}
        }
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn rotation_keeps_n_files_and_the_newest_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(LOG_FILE);
    let mut w = RotatingWriter::open(&log, 1024, 3).unwrap();
    for i in 0..500 {
        w.push(&record(Stream::Stdout, &format!("line {i:04}")))
            .unwrap();
        if i % 7 == 0 {
            w.flush().unwrap();
        }
    }
    w.flush().unwrap();
    for name in [
        "container.log",
        "container.log.1",
        "container.log.2",
        "container.log.3",
    ] {
        let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
        assert!(len > 0 && len <= 1024, "{name}: {len} bytes");
    }
    assert!(!dir.path().join("container.log.4").exists());

    // The newest lines survive, in order, across the files; the oldest were dropped.
    let last = logs::tail(dir.path(), 40).unwrap();
    let want: Vec<String> = (460..500).map(|i| format!("line {i:04}")).collect();
    assert_eq!(texts(&last), want);
    let all = logs::tail(dir.path(), usize::MAX).unwrap();
    assert!(all.len() < 500 && all.len() > 40, "{}", all.len());
    assert_eq!(all.last().unwrap().line, "line 0499");
    assert!(
        all.windows(2).all(|p| p[0].line < p[1].line),
        "out of order"
    );
    assert!(logs::tail(dir.path(), 0).unwrap().is_empty());
    assert!(matches!(
        logs::tail(&dir.path().join("nope"), 3),
        Err(logs::LogError::NotFound { .. })
    ));

    // Reopening appends to the existing file rather than truncating it.
    drop(w);
    let mut w = RotatingWriter::open(&log, 1024, 3).unwrap();
    w.push(&record(Stream::Stderr, "after reopen")).unwrap();
    w.flush().unwrap();
    let last = logs::tail(dir.path(), 2).unwrap();
    assert_eq!(texts(&last), ["line 0499", "after reopen"]);
    assert_eq!(last[1].stream, Stream::Stderr);
}

// Multi-threaded: the test body blocks (writer thread, sleeps) while the follower runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_reads_across_rotation_and_ends_when_the_instance_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("ins-0123456789ab");
    std::fs::create_dir(&inst).unwrap();
    let log = inst.join(LOG_FILE);
    let mut w = RotatingWriter::open(&log, 2048, 3).unwrap();
    for i in 0..5 {
        w.push(&record(Stream::Stdout, &format!("old {i}")))
            .unwrap();
    }
    w.flush().unwrap();

    let stream = logs::follow(inst.clone(), FollowFrom::Tail(2))
        .await
        .unwrap();
    let collector = tokio::spawn(stream.collect::<Vec<LogLine>>());
    // Written while the follower polls: many rotations (2 KiB files, ~50 bytes a line), with
    // pauses so the follower sees each file before it is rotated past `.3`.
    let writer = std::thread::spawn(move || {
        for i in 0..300 {
            w.push(&record(Stream::Stdout, &format!("new {i:03}")))
                .unwrap();
            w.flush().unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    });
    writer.join().unwrap();
    assert!(log.with_extension("log.3").exists(), "no rotation happened");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!collector.is_finished(), "ended while the instance exists");
    std::fs::remove_dir_all(&inst).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), collector)
        .await
        .expect("follow did not end after the instance dir went")
        .unwrap();
    let mut want = vec!["old 3".to_owned(), "old 4".to_owned()];
    want.extend((0..300).map(|i| format!("new {i:03}")));
    assert_eq!(texts(&got), want);

    // Plain reading from the beginning stops at the end.
    std::fs::create_dir(&inst).unwrap();
    let mut w = RotatingWriter::open(&inst.join(LOG_FILE), 100, 3).unwrap();
    for i in 0..4 {
        w.push(&record(Stream::Stdout, &format!("x{i}"))).unwrap();
    }
    w.flush().unwrap();
    let all: Vec<LogLine> = logs::lines(inst.clone(), FollowFrom::Beginning)
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(texts(&all), ["x0", "x1", "x2", "x3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_writes_both_streams_rotates_and_is_followed_until_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("ins-00000000abcd");
    std::fs::create_dir(&inst).unwrap();
    let log = inst.join(LOG_FILE);
    let pipes = shim(4096).spawn(&log).unwrap();
    let _guard = KillOnDrop(pipes.pid);
    // Its own session: the agent's terminal and process group signals do not reach it.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pipes.pid))).unwrap();
    assert_eq!(sid.as_raw(), pipes.pid);
    wait_for("shim lock", Duration::from_secs(5), || {
        logs::shim_running(&log)
    });

    let stream = logs::follow(inst.clone(), FollowFrom::Tail(0))
        .await
        .unwrap();
    let collector = tokio::spawn(stream.collect::<Vec<LogLine>>());
    let mut out = std::fs::File::from(pipes.stdout);
    let mut err = std::fs::File::from(pipes.stderr);
    for i in 0..400 {
        writeln!(out, "out {i:03}").unwrap();
        if i % 50 == 0 {
            writeln!(err, "err {i:03}").unwrap();
            // Longer than the follower's poll: 50 lines are less than one 4 KiB file, so it never
            // falls more than `keep` rotations behind (which, like `tail -F`, would lose lines;
            // seen once in CI when the writes came faster than a loaded follower read).
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    // Pieces of a line written close together make one record (`writeln!` above writes each
    // line in pieces); a piece left alone for a while is a partial record, then the rest.
    write!(out, "half-").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    writeln!(out, "done").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(inst.join("container.log.1").exists(), "no rotation");
    assert!(!inst.join("container.log.4").exists());

    // The instance dir goes first; the follower keeps reading while the shim lives.
    std::fs::remove_dir_all(&inst).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!collector.is_finished(), "ended while the shim still runs");
    drop((out, err)); // EOF: the container "exited"
    assert_eq!(wait_child(pipes.pid, Duration::from_secs(5)), 0);
    let got = tokio::time::timeout(Duration::from_secs(5), collector)
        .await
        .expect("follow did not end after the shim exited")
        .unwrap();
    let outs: Vec<String> = got
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.line.clone())
        .collect();
    let mut want: Vec<String> = (0..400).map(|i| format!("out {i:03}")).collect();
    want.extend(["half-".to_owned(), "done".to_owned()]);
    assert_eq!(outs, want);
    let errs: Vec<&LogLine> = got.iter().filter(|l| l.stream == Stream::Stderr).collect();
    assert_eq!(errs.len(), 8);
    assert_eq!(errs[7].line, "err 350");
    let half = got.iter().find(|l| l.line == "half-").unwrap();
    assert!(half.partial);
    assert!(!got.last().unwrap().partial);
}

/// Not a test of its own: the "agent" of `shim_survives_its_parent_being_killed`, run in a child
/// process (this test binary re-executed with `BERTH_LOGS_TEST_PARENT` set). Starts a shim and a
/// "container" writing through its pipes, prints their pids and waits to be killed.
#[test]
fn shim_parent_process() {
    let Ok(dir) = std::env::var("BERTH_LOGS_TEST_PARENT") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let pipes = shim(1 << 20).spawn(&dir.join(LOG_FILE)).unwrap();
    let fifo = dir.join("go");
    // Never waited for here: this process is SIGKILLed, and the test (subreaper) reaps the orphan.
    #[allow(clippy::zombie_processes)]
    let container = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo before; echo warn >&2; cat {} >/dev/null; echo after",
            fifo.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(pipes.stdout)
        .stderr(pipes.stderr)
        .spawn()
        .unwrap();
    println!("PIDS {} {}", pipes.pid, container.id());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn shim_survives_its_parent_being_killed_and_exits_on_eof() {
    // As subreaper, the orphaned shim and "container" become our children, so we can see how the
    // shim exits.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    nix::unistd::mkfifo(&dir.path().join("go"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shim_parent_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BERTH_LOGS_TEST_PARENT", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _parent_guard = KillOnDrop(parent.id() as i32);
    let mut lines = std::io::BufReader::new(parent.stdout.take().unwrap()).lines();
    let pids = loop {
        let line = lines.next().expect("parent ended without pids").unwrap();
        // libtest may have printed "test shim_parent_process ... " on the same line.
        if let Some((_, rest)) = line.split_once("PIDS ") {
            break rest
                .split(' ')
                .map(|p| p.parse::<i32>().unwrap())
                .collect::<Vec<_>>();
        }
    };
    let (shim_pid, container_pid) = (pids[0], pids[1]);
    let _guards = (KillOnDrop(shim_pid), KillOnDrop(container_pid));
    let log = dir.path().join(LOG_FILE);
    wait_for("first lines", Duration::from_secs(5), || {
        logs::tail(dir.path(), 10).is_ok_and(|l| l.len() == 2)
    });

    parent.kill().unwrap(); // SIGKILL
    parent.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(running(shim_pid), "the shim died with its parent");
    assert!(logs::shim_running(&log));

    // Let the "container" finish: it writes once more and exits, closing the pipes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("go"))
        .unwrap();
    assert_eq!(
        wait_child(shim_pid, Duration::from_secs(5)),
        0,
        "shim exit code"
    );
    assert!(!logs::shim_running(&log));
    let got = logs::tail(dir.path(), 10).unwrap();
    let mut seen: Vec<(Stream, String)> = got.iter().map(|l| (l.stream, l.line.clone())).collect();
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        seen,
        [
            (Stream::Stdout, "after".to_owned()),
            (Stream::Stdout, "before".to_owned()),
            (Stream::Stderr, "warn".to_owned()),
        ]
    );
    let _ = wait_child(container_pid, Duration::from_secs(5));
}

/// A running `api::serve_on` on loopback; stops it on drop.
struct Api {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start_api(instances: &Path) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let dir = instances.to_owned();
    tokio::spawn(async move {
        berth_agent::api::serve_on(listener, dir, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Api {
        base,
        stop: Some(tx),
    }
}

async fn read_lines(resp: &mut reqwest::Response, buf: &mut Vec<u8>, n: usize) -> Vec<LogLine> {
    let mut out = Vec::new();
    while out.len() < n {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=nl).collect();
            out.push(serde_json::from_slice(&raw).unwrap());
        }
        if out.len() >= n {
            break;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("no more lines")
            .unwrap()
            .expect("stream ended early");
        buf.extend_from_slice(&chunk);
    }
    out
}

#[tokio::test]
async fn api_serves_tail_and_follow_and_checks_ids() {
    let dir = tempfile::tempdir().unwrap();
    let id = "ins-0123456789ab";
    let inst = dir.path().join(id);
    std::fs::create_dir(&inst).unwrap();
    let mut w = RotatingWriter::open(&inst.join(LOG_FILE), 1 << 20, 3).unwrap();
    for i in 0..5 {
        w.push(&record(Stream::Stdout, &format!("l{i}"))).unwrap();
    }
    w.push(&record(Stream::Stderr, "e5")).unwrap();
    w.flush().unwrap();
    let api = start_api(dir.path()).await;
    let http = reqwest::Client::new();
    let base = api.base.clone();
    let get = |path: String| http.get(format!("{base}{path}")).send();

    for (path, status) in [
        ("/v1/instances/ins-XYZ/logs".to_owned(), 400),
        ("/v1/instances/..%2F..%2Fetc/logs".to_owned(), 400),
        (format!("/v1/instances/{id}/logs?tail=x"), 400),
        (format!("/v1/instances/{id}/logs?follow=maybe"), 400),
        ("/v1/instances/ins-ffffffffffff/logs".to_owned(), 404),
        ("/v1/nothing".to_owned(), 404),
    ] {
        let resp = get(path.clone()).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{path}: {v}");
    }

    let resp = get(format!("/v1/instances/{id}/logs?tail=2"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let body = resp.text().await.unwrap();
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["line"], "l4");
    assert_eq!(lines[1]["stream"], "stderr");
    assert!(lines[1]["time"].as_str().unwrap().ends_with('Z'));
    let all = get(format!("/v1/instances/{id}/logs")).await.unwrap();
    assert_eq!(all.text().await.unwrap().lines().count(), 6);

    // Follow: the tail first, then lines as they are written, until the instance is gone.
    let mut resp = get(format!("/v1/instances/{id}/logs?follow=true&tail=1"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    assert_eq!(texts(&read_lines(&mut resp, &mut buf, 1).await), ["e5"]);
    w.push(&record(Stream::Stdout, "live")).unwrap();
    w.flush().unwrap();
    assert_eq!(texts(&read_lines(&mut resp, &mut buf, 1).await), ["live"]);
    std::fs::remove_dir_all(&inst).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("follow did not end when the instance went");
    assert!(end.unwrap().is_none());

    // A follow still open ends when the server shuts down.
    std::fs::create_dir(&inst).unwrap();
    let mut resp = get(format!("/v1/instances/{id}/logs?follow=true"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(api);
    let end = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("follow kept the server from shutting down");
    assert!(matches!(end, Ok(None) | Err(_)));
}

mod container {
    //! A real container (root): its stdout and stderr are pipes to the shim, never a host file.

    use super::*;
    use berth_agent::runtime::{cgroup, ContainerConfig, Runtime};
    use std::os::unix::fs::symlink;

    /// States what this test needs, and fails loudly without it rather than skipping.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the container logs test needs root (namespaces, cgroups, pivot_root)"
        );
        assert!(
            Path::new("/bin/busybox").exists(),
            "the container logs test needs /bin/busybox (apt-get install busybox-static)"
        );
    }

    /// Removes the container and its cgroup parent, whatever happened.
    struct Cleanup<'a> {
        runtime: &'a Runtime,
        id: String,
        parent: String,
    }

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if let Err(e) = self.runtime.remove(&self.id, Duration::ZERO) {
                eprintln!("cleanup of {} failed: {e}", self.id);
            }
            for dir in cgroup::parent_dirs(&self.parent) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }

    #[test]
    fn container_output_reaches_the_log_through_the_shim() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "cat", "echo", "readlink"] {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let suffix = format!("{:08x}", rand::random::<u32>());
        let parent = format!("berth-test-logs-{suffix}");
        let runtime = Runtime::new(&dir.path().join("runtime"), parent.clone())
            .unwrap()
            .with_log_shim(shim(1 << 20));
        let id = format!("ins-{suffix}0000");
        let _cleanup = Cleanup {
            runtime: &runtime,
            id: id.clone(),
            parent,
        };
        let inst = dir.path().join("instances").join(&id);
        std::fs::create_dir_all(&inst).unwrap();
        let cfg = ContainerConfig {
            id: id.clone(),
            rootfs,
            args: [
                "sh",
                "-c",
                "readlink /proc/self/fd/1; echo oops >&2; sleep 0.3; echo bye",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "logs".into(),
            cpu_millis: 0,
            memory_bytes: 0,
            resolv_conf: None,
        };
        let pid = runtime.create(&cfg, &inst.join(LOG_FILE)).unwrap();
        // From the host: the init's stdout and stderr are pipes (checkpointable), not the log.
        for fd in [1, 2] {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert!(
                target.to_string_lossy().starts_with("pipe:["),
                "fd {fd} is {target:?}"
            );
        }
        assert!(logs::shim_running(&inst.join(LOG_FILE)));
        let shim_pid = shim_of(&inst.join(LOG_FILE)).expect("no shim process for the log");
        runtime.start(&id).unwrap();
        wait_for("the container's exit", Duration::from_secs(10), || {
            !runtime.reap().is_empty()
        });
        wait_for("the shim's exit", Duration::from_secs(5), || {
            !logs::shim_running(&inst.join(LOG_FILE))
        });
        let got = logs::tail(&inst, 10).unwrap();
        let seen: Vec<(Stream, &str)> = got.iter().map(|l| (l.stream, l.line.as_str())).collect();
        assert!(seen.contains(&(Stream::Stderr, "oops")), "{seen:?}");
        let outs: Vec<&str> = got
            .iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.line.as_str())
            .collect();
        // Seen from inside too: fd 1 is a pipe.
        assert_eq!(outs.len(), 2, "{seen:?}");
        assert!(outs[0].starts_with("pipe:["), "{seen:?}");
        assert_eq!(outs[1], "bye");
        // The shim was our child: `reap` collects it, no zombie stays.
        runtime.reap();
        assert!(
            !Path::new(&format!("/proc/{shim_pid}")).exists(),
            "shim {shim_pid} not reaped"
        );
    }

    /// The pid of the shim writing `log` (found by its command line).
    fn shim_of(log: &Path) -> Option<i32> {
        let log = log.as_os_str().as_encoded_bytes();
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            (args.any(|a| a == logs::SHIM_ARG.as_bytes()) && args.any(|a| a == log)).then_some(pid)
        })
    }
}
