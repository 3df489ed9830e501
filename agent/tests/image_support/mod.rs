//! Test fixtures for image tests: a throwaway local registry and a busybox-static image built
//! with `umoci` and pushed with `skopeo` (no Docker, no internet).
//!
//! Needs root and `/usr/bin/docker-registry`, `umoci`, `skopeo`, `/bin/busybox` (Debian packages
//! `docker-registry umoci skopeo busybox-static`). The end-to-end tests in `tests/` mirror this.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Panics with a clear message when the machine lacks what these tests need.
pub fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "image integration tests need root (overlay mounts, mknod)"
    );
    for tool in [
        "/usr/bin/docker-registry",
        "/usr/bin/umoci",
        "/usr/bin/skopeo",
        "/bin/busybox",
    ] {
        assert!(
            Path::new(tool).exists(),
            "{tool} missing: apt-get install docker-registry umoci skopeo busybox-static"
        );
    }
}

/// A `docker-registry` on a free loopback port with filesystem storage in a temp dir.
/// Killed and removed on drop.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Registry {
    /// Starts a registry and waits until `/v2/` answers.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut registry = Self {
            child: Some(child),
            dir,
            addr,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: registry\r\n\r\n");
                let mut buf = [0u8; 32];
                if let Ok(n) = s.read(&mut buf) {
                    if buf[..n].starts_with(b"HTTP/1.1 200")
                        || buf[..n].starts_with(b"HTTP/1.0 200")
                    {
                        return;
                    }
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("docker-registry exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry on {} not ready: {}", self.addr, self.log());
    }

    /// The registry's storage root (`docker/registry/v2/...` below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Stops the registry now (to test behaviour while it is unreachable).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds a two-layer busybox-static image and pushes it as `<registry>/<repo>:<tag>`.
///
/// Layer 1: `/bin/busybox` with applet symlinks (`sh`, `httpd`, `sleep`, …), `/www/index.html`
/// containing `marker`, and `/etc/removed`. Layer 2 deletes `/etc/removed` (a whiteout).
/// Config: entrypoint `/bin/httpd`, cmd `-f -p 80 -h /www`, env `BERTH_TEST=1`.
/// Returns the reference. `work` is scratch space (the OCI layout and bundle).
pub fn build_busybox_image(
    work: &Path,
    registry: &str,
    repo: &str,
    tag: &str,
    marker: &str,
) -> String {
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let image = format!("{}:{tag}", layout.display());
    if !layout.exists() {
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
    }
    run(Command::new("umoci").args(["new", "--image", &image]));
    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    for dir in ["bin", "www", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "httpd", "sleep", "cat", "ls", "echo", "true", "wget", "ip", "hostname", "env",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("www/index.html"), marker).unwrap();
    std::fs::write(rootfs.join("etc/removed"), "gone in layer 2\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));

    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    std::fs::remove_file(bundle.join("rootfs/etc/removed")).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    let _ = std::fs::remove_dir_all(&bundle);

    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        "/bin/httpd",
        "--config.cmd=-f",
        "--config.cmd=-p",
        "--config.cmd=80",
        "--config.cmd=-h",
        "--config.cmd=/www",
        "--config.env",
        "BERTH_TEST=1",
    ]));
    let reference = format!("{registry}/{repo}:{tag}");
    run(Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--dest-tls-verify=false"])
        .arg(format!("oci:{image}"))
        .arg(format!("docker://{reference}")));
    reference
}

/// The raw manifest the registry serves for `reference` (to check digest pinning).
pub fn raw_manifest(reference: &str) -> Vec<u8> {
    run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}")))
    .into_bytes()
}

/// Whether anything is mounted at `path` (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_ref()))
}

/// A per-run scratch directory for a store root and instance dirs.
pub fn scratch(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let path = dir.path().to_owned();
    (dir, path)
}

/// Unmounts anything left under `dir` on drop, so a failed assertion leaves no mounts behind.
pub struct MountGuard(pub Vec<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        for path in &self.0 {
            while is_mountpoint(path) {
                if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }
}
