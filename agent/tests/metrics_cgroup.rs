//! The node's `/metrics` over a real cgroup (needs root: creates cgroups in every hierarchy read).
//!
//! A busy process runs in `berth-test-<hex>/ins-<hex>` of the cpuacct, memory and cgroup2
//! hierarchies; the scrape, served over HTTP and parsed by a real OpenMetrics parser, must show its
//! CPU seconds growing and its memory above zero. The process and the cgroups go in `Drop`.
#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::metrics::{
    serve_listener, CgroupReader, Format, InstanceSample, InstanceSource, NodeCapacity, NodeMetrics,
};
use openmetrics_parser::{openmetrics::parse_openmetrics, OpenMetricsValue};

/// States what this test needs, and fails loudly without it rather than skipping.
fn require_root_and_cgroups() -> CgroupReader {
    assert!(
        nix::unistd::geteuid().is_root(),
        "metrics_cgroup needs root (it creates cgroups); run it as root"
    );
    let r = CgroupReader::from_system().unwrap();
    assert!(
        r.cpuacct_v1.is_some() || r.unified.is_some(),
        "metrics_cgroup needs a cpuacct (v1) or cgroup2 hierarchy mounted: {r:?}"
    );
    assert!(
        r.memory_v1.is_some() || r.unified.is_some(),
        "metrics_cgroup needs a memory (v1) or cgroup2 hierarchy mounted: {r:?}"
    );
    r
}

/// A cgroup `/<parent>/<id>` in every hierarchy the reader reads, with a busy process in it.
struct BusyCgroup {
    parent: String,
    id: String,
    /// `<mount>/<parent>` of each hierarchy, created by us.
    parents: Vec<PathBuf>,
    child: Option<Child>,
}

impl BusyCgroup {
    fn start(reader: &CgroupReader) -> BusyCgroup {
        let parent = format!("berth-test-{:08x}", rand::random::<u32>());
        let id = format!("ins-{:08x}", rand::random::<u32>());
        let mounts: Vec<PathBuf> = [&reader.cpuacct_v1, &reader.memory_v1, &reader.unified]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let mut me = BusyCgroup {
            parent: parent.clone(),
            id: id.clone(),
            parents: Vec::new(),
            child: None,
        };
        let mut procs = Vec::new();
        for m in &mounts {
            let p = m.join(&parent);
            std::fs::create_dir(&p).unwrap();
            me.parents.push(p.clone());
            std::fs::create_dir(p.join(&id)).unwrap();
            procs.push(
                CString::new(p.join(&id).join("cgroup.procs").as_os_str().as_bytes()).unwrap(),
            );
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on
        // paths built before the fork; "0" moves the calling process, so no pid is formatted.
        unsafe {
            cmd.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        me.child = Some(cmd.spawn().unwrap());
        me
    }
}

impl Drop for BusyCgroup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for p in &self.parents {
            let dir = p.join(&self.id);
            // The killed process may take a moment to leave the cgroup.
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() && std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// The one instance in the test cgroup.
struct OneInstance {
    parent: String,
    id: String,
}

impl InstanceSource for OneInstance {
    fn instances(&self) -> Vec<InstanceSample> {
        vec![InstanceSample {
            instance_id: self.id.clone(),
            container_id: "ctr-test".into(),
            container_name: "busy".into(),
            status: "RUNNING".into(),
            cgroup_parent: self.parent.clone(),
            cgroup_id: self.id.clone(),
            cpu_millis: 500,
            memory_bytes: 32 << 20,
            ..Default::default()
        }]
    }
}

/// `GET /metrics` over a real socket, OpenMetrics asked for: the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\n\
         Connection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// (CPU seconds, memory bytes) of instance `id` in a scrape, parsed by a real parser.
fn usage(body: &str, id: &str) -> (f64, f64) {
    let exp = parse_openmetrics(body).unwrap_or_else(|e| panic!("{e:?} in\n{body}"));
    let find = |family: &str| -> f64 {
        let f = exp
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no {family} in\n{body}"));
        let s = f
            .iter_samples()
            .find(|s| s.get_labelset().unwrap().get_label_value("instance_id") == Some(id))
            .unwrap_or_else(|| panic!("no {family} for {id} in\n{body}"));
        match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            v => panic!("unexpected {v:?}"),
        }
    };
    (
        find("berth_instance_cpu_seconds"),
        find("berth_instance_memory_usage_bytes"),
    )
}

#[tokio::test]
async fn cpu_and_memory_come_from_the_real_cgroup() {
    let reader = require_root_and_cgroups();
    let busy = BusyCgroup::start(&reader);
    let source = Arc::new(OneInstance {
        parent: busy.parent.clone(),
        id: busy.id.clone(),
    });
    let metrics = Arc::new(NodeMetrics::with_cgroups(
        "node-test",
        NodeCapacity {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
        },
        source.clone(),
        reader.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_listener(listener, metrics, async move {
        let _ = stopped.await;
    }));

    let (cpu0, mem0) = usage(&scrape(addr).await, &busy.id);
    assert!(mem0 > 0.0, "memory in use must be above zero, got {mem0}");
    // The loop spins on one core: its CPU time must grow by a good part of the wall time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (cpu1, mem1) = usage(&scrape(addr).await, &busy.id);
    assert!(mem1 > 0.0);
    assert!(
        cpu1 - cpu0 > 0.3,
        "CPU seconds grew from {cpu0} to {cpu1} in 1.5 s of a busy loop"
    );

    // Each hierarchy on its own, so both the v1 and the v2 files are read for real where they
    // exist on this host.
    if reader.cpuacct_v1.is_some() {
        let v1 = CgroupReader {
            unified: None,
            ..reader.clone()
        };
        let u = v1.read(&busy.parent, &busy.id);
        assert!(u.cpu_seconds.unwrap() > 0.3, "{u:?}");
        assert!(
            u.memory_bytes.unwrap_or(0) > 0 || reader.memory_v1.is_none(),
            "{u:?}"
        );
    }
    if let Some(unified) = &reader.unified {
        let v2 = CgroupReader {
            unified: Some(unified.clone()),
            ..Default::default()
        };
        let u = v2.read(&busy.parent, &busy.id);
        assert!(u.cpu_seconds.unwrap() > 0.3, "cgroup2 cpu.stat: {u:?}");
        // Only where the memory controller is enabled for the subtree (unified hosts).
        if unified
            .join(&busy.parent)
            .join(&busy.id)
            .join("memory.current")
            .exists()
        {
            assert!(u.memory_bytes.unwrap() > 0, "{u:?}");
        }
    }

    // The Prometheus 0.0.4 rendering of the same registry parses too.
    let m = NodeMetrics::with_cgroups("node-test", NodeCapacity::default(), source, reader);
    let text = m.render(Format::Prometheus).unwrap();
    openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("{e:?} in\n{text}"));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    drop(busy);
}
