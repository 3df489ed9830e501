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
const APPLETS: [&str; 25] = [
    "sh", "httpd", "sleep", "cat", "echo", "wget", "ls", "ps", "hostname", "env", "true", "ip",
    "nc", "nslookup", "sed", "tail", "head", "awk", "printf", "mkdir", "chmod", "seq", "ping",
    "grep", "tr",
];
/// Bump when the recipe changes, so stale cached layouts are not reused.
const RECIPE: &str = "r3";

/// CGI scripts of the demo image, for tests that need a client *inside* a container (where berth's
/// service routing and DNS apply): `GET /cgi-bin/fetch?TARGET` answers the body that `http://TARGET/`
/// served (TARGET an address or a name, resolved by the container's DNS), or `ERROR …`;
/// `GET /cgi-bin/resolve?NAME` answers the address the container's resolver gives for NAME.
pub const CGI_SCRIPTS: [(&str, &str); 2] = [
    (
        "www/cgi-bin/fetch",
        r#"#!/bin/sh
echo "Content-Type: text/plain"
echo
t="$QUERY_STRING"
case "$t" in ''|*[!a-zA-Z0-9.-]*) echo "ERROR bad target"; exit 0;; esac
case "$t" in
  *[a-z]*) ip=$(nslookup "$t" 2>/dev/null | awk '/^Name:/ { n = 1 } n && /^Address/ { a = $NF } END { print a }') ;;
  *) ip="$t" ;;
esac
[ -n "$ip" ] || { echo "ERROR cannot resolve $t"; exit 0; }
out=$(printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 2 "$ip" 80 2>&1) || true
body=$(printf '%s\n' "$out" | tr -d '\r' | sed '1,/^$/d')
[ -n "$body" ] && printf '%s\n' "$body" || echo "ERROR no answer from $ip"
"#,
    ),
    (
        "www/cgi-bin/resolve",
        r#"#!/bin/sh
echo "Content-Type: text/plain"
echo
t="$QUERY_STRING"
case "$t" in ''|*[!a-zA-Z0-9.-]*) echo "ERROR bad name"; exit 0;; esac
nslookup "$t" 2>/dev/null | awk '/^Name:/ { n = 1 } n && /^Address/ { a = $NF } END { if (a == "") print "NXDOMAIN"; else print a }'
"#,
    ),
];

/// The cached OCI layout holding the demo image under tag [`DEMO_TAG`]; built on first use.
pub fn demo_layout() -> anyhow::Result<PathBuf> {
    cached_layout(&format!("httpd-{RECIPE}"), None)
}

/// The cached OCI layout of a variant of the demo image (tag [`DEMO_TAG`]): the same image plus
/// `/etc/berth-variant` holding `variant`, so it has a digest of its own (a "new version" for
/// rolling updates). `variant`: lower-case letters, digits and '-'.
pub fn variant_layout(variant: &str) -> anyhow::Result<PathBuf> {
    if variant.is_empty()
        || !variant
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("image variant {variant:?}: use lower-case letters, digits and '-'");
    }
    cached_layout(&format!("httpd-{RECIPE}-{variant}"), Some(variant))
}

fn cached_layout(name: &str, variant: Option<&str>) -> anyhow::Result<PathBuf> {
    let cache = crate::paths::harness_dir().join("oci");
    let layout = cache.join(name);
    if layout.join("index.json").exists() {
        return Ok(layout);
    }
    std::fs::create_dir_all(&cache)?;
    // Built aside and renamed into place, so parallel tests never see (or use) half a layout.
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&cache)?;
    let staged = tmp.path().join("layout");
    build_image(&staged, DEMO_TAG, variant)?;
    if std::fs::rename(&staged, &layout).is_err() && !layout.join("index.json").exists() {
        bail!("could not move the image into {}", layout.display());
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
    for d in ["bin", "www/cgi-bin", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for (path, script) in CGI_SCRIPTS {
        let file = root.join(path);
        std::fs::write(&file, script)?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
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

/// Adds the host file `src` to the image `layout:tag` as `dest` (a path inside the rootfs, mode
/// 0755), in a layer of its own: for a benchmark's own program next to the demo image's busybox.
pub fn add_file(layout: &Path, tag: &str, src: &Path, dest: &str) -> anyhow::Result<()> {
    let image = format!("{}:{tag}", layout.display());
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))?;
    let file = bundle.join("rootfs").join(dest.trim_start_matches('/'));
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(src, &file).with_context(|| format!("copying {}", src.display()))?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))
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
