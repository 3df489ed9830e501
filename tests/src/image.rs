//! The demo image: busybox-static serving a page with `httpd`, built with umoci and pushed with skopeo.
//!
//! No network and no Docker: the layer is the host's `/bin/busybox` plus applet symlinks and
//! `/www/index.html`. The OCI layout is cached under the target dir (it never changes between runs);
//! each cluster pushes it to its own registry.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the demo image's httpd serves at `/`.
pub const DEMO_BODY: &str = "hello from berth demo httpd\n";
/// Repository of the demo image in a cluster's registry.
pub const DEMO_REPO: &str = "demo/httpd";
/// Tag of the demo image.
pub const DEMO_TAG: &str = "1";
/// The image's entrypoint: httpd in the foreground on port 80.
pub const DEMO_ENTRYPOINT: [&str; 6] = ["/bin/httpd", "-f", "-p", "80", "-h", "/www"];

/// Busybox applets linked into the image.
const APPLETS: [&str; 12] = [
    "sh", "httpd", "sleep", "cat", "echo", "wget", "ls", "ps", "hostname", "env", "true", "ip",
];
/// Bump when the recipe changes, so stale cached layouts are not reused.
const RECIPE: &str = "r1";

/// The cached OCI layout holding the demo image under tag [`DEMO_TAG`]; built on first use.
pub fn demo_layout() -> anyhow::Result<PathBuf> {
    let cache = crate::paths::harness_dir().join("oci");
    let layout = cache.join(format!("httpd-{RECIPE}"));
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    std::fs::create_dir_all(&cache)?;
    // Built aside and renamed into place, so parallel tests never see (or use) half a layout.
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&cache)?;
    let staged = tmp.path().join("layout");
    build_image(&staged, DEMO_TAG, None)?;
    if std::fs::rename(&staged, &layout).is_err() && !layout.join("index.json").exists() {
        bail!("could not move the demo image into {}", layout.display());
    }
    Ok(layout)
}

/// Adds the demo image to the OCI layout `layout` under `tag` (creating the layout if needed).
///
/// `variant` adds `/etc/berth-variant` with that text to the same layer, so each variant has a layer
/// of its own: pulling it is a cold pull even when another variant is cached.
pub fn build_image(layout: &Path, tag: &str, variant: Option<&str>) -> anyhow::Result<()> {
    if !layout.join("index.json").exists() {
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(layout))?;
    }
    let image = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))?;
    let root = bundle.join("rootfs");
    for d in ["bin", "www", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (apt package busybox-static)")?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("www/index.html"), DEMO_BODY)?;
    if let Some(v) = variant {
        std::fs::write(root.join("etc/berth-variant"), v)?;
    }
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))?;
    let mut config = Command::new("umoci");
    config.args(["config", "--image", &image]);
    for part in DEMO_ENTRYPOINT {
        config.arg(format!("--config.entrypoint={part}"));
    }
    config.args(["--config.workingdir", "/www"]);
    run(&mut config)
}

/// Pushes `layout:tag` to `dest` (`HOST:PORT/REPO:TAG`) over plain HTTP.
pub fn push(layout: &Path, tag: &str, dest: &str) -> anyhow::Result<()> {
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{dest}"),
    ]))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (apt packages umoci, skopeo)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
