//! Health probes for real: HTTP and TCP probes against servers on 127.0.0.1 (no privileges), and
//! exec probes inside real busybox containers made with the runtime (needs root: namespaces,
//! cgroups, pivot_root). Every container test uses its own runtime root and cgroup parent
//! (random suffix) and cleans up in `Drop` even when it panics.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_agent::health::{
    Check, HealthEvent, HttpCheck, ProbeCheck, ProbeSpec, ProbeTarget, Prober, TcpCheck,
};
use berth_agent::runtime::exec::{Exec, ExecError, ExecStatus, EXEC_HELPER_ARG};
use berth_agent::runtime::{cgroup, run_exec_helper, ContainerConfig, Runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------------
// HTTP and TCP
// ---------------------------------------------------------------------------------------------

/// An HTTP server on 127.0.0.1 answering every request with the current `status`, recording the
/// request heads it received.
struct HttpServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    async fn start(status: u16) -> Self {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (st, reqs) = (status.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (st, reqs) = (st.clone(), reqs.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    reqs.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let code = st.load(Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.0 {code} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self {
            addr,
            status,
            requests,
            task,
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server that accepts and reads but never answers.
async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (addr, task)
}

/// A port on 127.0.0.1 nobody listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

fn fast(check: ProbeCheck, threshold: u32) -> ProbeSpec {
    ProbeSpec {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        failure_threshold: threshold,
        ..ProbeSpec::new(check)
    }
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<HealthEvent>) -> HealthEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no health event within 10s")
        .expect("event channel closed")
}

fn target(ip: IpAddr) -> ProbeTarget {
    ProbeTarget {
        ip: Some(ip),
        exec: None,
    }
}

#[tokio::test]
async fn http_check_sees_the_status_and_sends_the_path() {
    let server = HttpServer::start(204).await;
    let check = HttpCheck::new(server.addr, "/healthz?full=1".into());
    assert_eq!(
        check.run(Duration::from_secs(1)).await,
        Ok("status 204".into())
    );
    server.status.store(302, Ordering::SeqCst);
    assert!(
        check.run(Duration::from_secs(1)).await.is_ok(),
        "3xx is healthy"
    );
    server.status.store(404, Ordering::SeqCst);
    assert_eq!(
        check.run(Duration::from_secs(1)).await,
        Err("status 404".into())
    );
    let req = server.requests.lock().unwrap()[0].clone();
    assert!(
        req.starts_with("GET /healthz?full=1 HTTP/1.0\r\n"),
        "{req:?}"
    );
    assert!(
        req.contains(&format!("Host: {}\r\n", server.addr)),
        "{req:?}"
    );
}

#[tokio::test]
async fn http_probe_goes_unhealthy_on_500_and_back() {
    let server = HttpServer::start(200).await;
    let prober = Prober::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let spec = fast(
        ProbeCheck::Http {
            path: "/health".into(),
            port: server.addr.port().into(),
        },
        2,
    );
    prober
        .start("ins-http", target(LOCALHOST), &spec, tx)
        .unwrap();

    let e = next_event(&mut rx).await;
    assert!(e.healthy, "{e:?}");
    assert_eq!(e.instance_id, "ins-http");
    assert_eq!(
        e.reason,
        format!("http GET {}/health: status 200", server.addr)
    );

    server.status.store(500, Ordering::SeqCst);
    let e = next_event(&mut rx).await;
    assert!(!e.healthy, "{e:?}");
    assert!(
        e.reason.ends_with("status 500 (2 consecutive failures)"),
        "{}",
        e.reason
    );
    let snap = prober.snapshot("ins-http").unwrap();
    assert_eq!(snap.healthy, Some(false));
    assert!(snap.failures_total >= 2);

    server.status.store(200, Ordering::SeqCst);
    let e = next_event(&mut rx).await;
    assert!(e.healthy, "{e:?}");
    assert_eq!(prober.snapshot("ins-http").unwrap().consecutive_failures, 0);

    prober.stop("ins-http");
    let seen = server.requests.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        server.requests.lock().unwrap().len(),
        seen,
        "probes continued after stop"
    );
}

#[tokio::test]
async fn probes_of_a_closed_port_fail() {
    let port = closed_port();
    let check = TcpCheck::new((LOCALHOST, port).into());
    let err = check.run(Duration::from_secs(1)).await.unwrap_err();
    assert!(err.starts_with("connect: "), "{err}");
    let err = HttpCheck::new((LOCALHOST, port).into(), "/".into())
        .run(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.starts_with("connect: "), "{err}");

    let prober = Prober::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober
        .start(
            "ins-tcp",
            target(LOCALHOST),
            &fast(ProbeCheck::Tcp { port: port.into() }, 1),
            tx,
        )
        .unwrap();
    let e = next_event(&mut rx).await;
    assert!(!e.healthy);
    assert!(e.reason.contains("connect: "), "{}", e.reason);
}

#[tokio::test]
async fn tcp_probe_is_healthy_when_the_port_accepts() {
    let (addr, server) = silent_server().await;
    let prober = Prober::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    prober
        .start(
            "ins-tcp",
            target(LOCALHOST),
            &fast(
                ProbeCheck::Tcp {
                    port: addr.port().into(),
                },
                1,
            ),
            tx,
        )
        .unwrap();
    let e = next_event(&mut rx).await;
    assert!(e.healthy, "{e:?}");
    assert_eq!(e.reason, format!("tcp {addr}: connected"));
    server.abort();
}

#[tokio::test]
async fn http_probe_of_a_server_that_never_answers_times_out() {
    let (addr, server) = silent_server().await;
    let prober = Prober::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let spec = ProbeSpec {
        interval: Duration::from_millis(300),
        timeout: Duration::from_millis(200),
        failure_threshold: 1,
        ..ProbeSpec::new(ProbeCheck::Http {
            path: "/".into(),
            port: addr.port().into(),
        })
    };
    let started = Instant::now();
    prober
        .start("ins-slow", target(LOCALHOST), &spec, tx)
        .unwrap();
    let e = next_event(&mut rx).await;
    assert!(!e.healthy);
    assert!(
        e.reason
            .ends_with("timed out after 200ms (1 consecutive failures)"),
        "{}",
        e.reason
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let last = prober.snapshot("ins-slow").unwrap().last_result.unwrap();
    assert!(last.took >= Duration::from_millis(200), "{last:?}");
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// Exec inside real containers
// ---------------------------------------------------------------------------------------------

/// Env var that turns this test binary into an exec helper (see [`exec_helper_entry`]).
const AS_HELPER_ENV: &str = "BERTH_TEST_EXEC_HELPER";

/// Not a test: when this binary is started as an exec helper (the env var set), it becomes one.
/// Lets the exec tests run before (and independently of) the agent binary's dispatch of
/// `__runtime-exec`; the agent binary is used instead when it has it.
#[test]
fn exec_helper_entry() {
    if std::env::var_os(AS_HELPER_ENV).is_some() {
        std::process::exit(run_exec_helper());
    }
}

/// States what the exec tests need, and fails loudly without it rather than skipping.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "exec probe tests need root (namespaces, cgroups, pivot_root); run them as root"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "exec probe tests need /bin/busybox (apt-get install busybox-static)"
    );
}

/// The exec helper: the agent binary if it dispatches `__runtime-exec`, else this test binary.
fn exec_helper() -> Exec {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_berth-agent"));
    let probe = std::process::Command::new(&agent)
        .arg(EXEC_HELPER_ARG)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    if String::from_utf8_lossy(&probe.stderr).contains("bad exec request") {
        return Exec::new(agent);
    }
    eprintln!(
        "berth-agent does not dispatch {EXEC_HELPER_ARG} yet: this test binary is the helper"
    );
    Exec::new(std::env::current_exe().unwrap()).with_invocation(
        [
            "exec_helper_entry",
            "--exact",
            "--nocapture",
            "-q",
            "--test-threads=1",
        ]
        .map(Into::into)
        .to_vec(),
        vec![(AS_HELPER_ENV.into(), "1".into())],
    )
}

fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A busybox rootfs: bin/busybox with applet symlinks and the usual empty mount points.
fn make_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "true", "false", "echo", "cat", "hostname"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

/// One running busybox container (`sleep 1000`) made through the create helper, as the agent
/// does; removes everything on drop.
struct Container {
    dir: tempfile::TempDir,
    parent: String,
    runtime: Runtime,
    id: String,
}

impl Container {
    fn start() -> Self {
        require_root();
        // Inits are orphaned when the create helper exits: as subreaper this test inherits them.
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = make_rootfs(dir.path());
        let parent = format!("berth-test-{}", suffix());
        let runtime = Runtime::new(&dir.path().join("runtime"), parent.clone())
            .unwrap()
            .with_create_helper(PathBuf::from(env!("CARGO_BIN_EXE_berth-agent")));
        let id = format!("ins-{}", suffix());
        let c = Self {
            dir,
            parent,
            runtime,
            id,
        };
        let cfg = ContainerConfig {
            id: c.id.clone(),
            rootfs,
            args: vec!["sleep".into(), "1000".into()],
            env: vec!["GREETING=hello".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "probed".into(),
            cpu_millis: 0,
            memory_bytes: 64 * 1024 * 1024,
            resolv_conf: None,
        };
        c.runtime
            .create(&cfg, &c.dir.path().join("container.log"))
            .unwrap();
        c.runtime.start(&c.id).unwrap();
        c
    }

    fn state_dir(&self) -> PathBuf {
        self.runtime.state_dir(&self.id)
    }

    /// Command lines of the processes in the container's cgroups.
    fn processes(&self) -> Vec<String> {
        cgroup::pids(&cgroup::container_dirs(&self.parent, &self.id))
            .into_iter()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .trim()
                    .to_owned()
            })
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.runtime.remove(&self.id, Duration::ZERO) {
            eprintln!("cleanup of {} failed: {e}", self.id);
        }
        // Whatever a failed test left in our parent's cgroups: kill, then rmdir leaves first.
        for parent in cgroup::parent_dirs(&self.parent) {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    for pid in cgroup::pids(&[e.path()]) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Zombie children of this process other than container inits: what a helper failed to reap.
fn stray_zombies() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        // Helpers themselves are tokio's children, reaped by it a moment after they exit.
        let helper = comm.starts_with("berth-agent") || comm.starts_with("health_probes");
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str()) && !helper {
            found.push(comm.to_owned());
        }
    }
    found
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_inside_the_container_and_reports_exit_codes() {
    let c = Container::start();
    let exec = exec_helper();
    let second = Duration::from_secs(5);

    let out = exec
        .run(&c.state_dir(), &cmd(&["true"]), second)
        .await
        .unwrap();
    assert_eq!(out.status, ExecStatus::Exited(0));

    let out = exec
        .run(&c.state_dir(), &cmd(&["false"]), second)
        .await
        .unwrap();
    assert_eq!(out.status, ExecStatus::Exited(1));

    // Inside: the container's hostname and environment, its pid namespace and its cgroup.
    let out = exec
        .run(
            &c.state_dir(),
            &cmd(&[
                "sh",
                "-c",
                "echo $(hostname) $GREETING; cat /proc/1/cmdline; echo; exit 3",
            ]),
            second,
        )
        .await
        .unwrap();
    assert_eq!(out.status, ExecStatus::Exited(3));
    assert_eq!(
        out.output.replace('\0', " "),
        "probed hello\nsleep 1000 \n",
        "{out:?}"
    );

    let err = exec
        .run(&c.state_dir(), &cmd(&["no-such-program"]), second)
        .await;
    match err {
        Err(ExecError::Failed { .. }) | Ok(_) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    if let Ok(out) = err {
        assert_ne!(out.status, ExecStatus::Exited(0), "{out:?}");
    }

    let missing = c.state_dir().with_file_name("ins-not-there");
    let e = exec
        .run(&missing, &cmd(&["true"]), second)
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::Failed { .. }), "{e}");

    // Only the init is left, nothing unreaped, no tenant sockets piling up in youki's state.
    assert_eq!(c.processes(), vec!["sleep 1000".to_owned()]);
    assert!(stray_zombies().is_empty(), "{:?}", stray_zombies());
    let leftovers: Vec<_> = std::fs::read_dir(c.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tenant-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_past_its_timeout_is_killed() {
    let c = Container::start();
    let exec = exec_helper();
    let started = Instant::now();
    let out = exec
        .run(
            &c.state_dir(),
            &cmd(&["sleep", "5"]),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status, ExecStatus::TimedOut);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        !c.processes().iter().any(|p| p == "sleep 5"),
        "{:?}",
        c.processes()
    );
    assert!(stray_zombies().is_empty(), "{:?}", stray_zombies());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_probes_report_healthy_unhealthy_and_timeouts() {
    let c = Container::start();
    let exec = exec_helper();
    let prober = Prober::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let probe = |command: &[&str], timeout_ms: u64| ProbeSpec {
        interval: Duration::from_millis(1500),
        timeout: Duration::from_millis(timeout_ms),
        failure_threshold: 1,
        ..ProbeSpec::new(ProbeCheck::Exec {
            command: cmd(command),
        })
    };
    let target = ProbeTarget {
        ip: None,
        exec: Some((exec, c.state_dir())),
    };

    prober
        .start(
            "ins-ok",
            target.clone(),
            &probe(&["true"], 1000),
            tx.clone(),
        )
        .unwrap();
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.instance_id.as_str(), e.healthy),
        ("ins-ok", true),
        "{e:?}"
    );
    assert_eq!(e.reason, "exec [\"true\"]: exit code 0");
    prober.stop("ins-ok");

    prober
        .start(
            "ins-false",
            target.clone(),
            &probe(&["false"], 1000),
            tx.clone(),
        )
        .unwrap();
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.instance_id.as_str(), e.healthy),
        ("ins-false", false),
        "{e:?}"
    );
    assert!(e.reason.contains("exit code 1"), "{}", e.reason);
    prober.stop("ins-false");

    prober
        .start(
            "ins-exit3",
            target.clone(),
            &probe(&["sh", "-c", "echo sick; exit 3"], 1000),
            tx.clone(),
        )
        .unwrap();
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.instance_id.as_str(), e.healthy),
        ("ins-exit3", false),
        "{e:?}"
    );
    assert!(
        e.reason
            .contains("exit code 3: sick (1 consecutive failures)"),
        "{}",
        e.reason
    );
    prober.stop("ins-exit3");

    let started = Instant::now();
    prober
        .start("ins-slow", target, &probe(&["sleep", "5"], 1000), tx)
        .unwrap();
    let e = next_event(&mut rx).await;
    assert_eq!(
        (e.instance_id.as_str(), e.healthy),
        ("ins-slow", false),
        "{e:?}"
    );
    assert!(
        e.reason.contains("timed out after 1s (killed)"),
        "{}",
        e.reason
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(!c.processes().iter().any(|p| p == "sleep 5"));

    // Stopping while an exec runs kills it (the helper gets SIGTERM and kills its command).
    let snap_before = prober.snapshot("ins-slow").unwrap().failures_total;
    tokio::time::sleep(Duration::from_millis(700)).await; // into the next probe (every 1.5s)
    let deadline = Instant::now() + Duration::from_secs(3);
    while !c.processes().iter().any(|p| p == "sleep 5") {
        assert!(Instant::now() < deadline, "second probe never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    prober.stop("ins-slow");
    let deadline = Instant::now() + Duration::from_secs(3);
    while c.processes().iter().any(|p| p == "sleep 5") {
        assert!(
            Instant::now() < deadline,
            "exec survived stop: {:?}",
            c.processes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(snap_before >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stray_zombies().is_empty(), "{:?}", stray_zombies());
}
