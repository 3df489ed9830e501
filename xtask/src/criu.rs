//! CRIU for `cargo xtask install`, built from source.
//!
//! Debian 12's `criu` 3.17 fails `criu check` on these kernels (vDSO bounds) and 4.1 cannot dump TCP
//! sockets on 6.18 (the kernel refuses SO_PASSCRED on them); 4.2 works. Bookworm has no such version,
//! so the upstream tarball comes from Debian unstable's *source* index, read through a sources list
//! of our own: sid binary packages never reach apt's configuration. The build dependencies come from
//! bookworm (`install::APT_PACKAGES`). Everything downloaded or built stays under [`CACHE_DIR`], so a
//! rerun after a failure neither downloads nor rebuilds from scratch.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the installed binary goes (ahead of `/usr/sbin` in root's PATH).
pub const CRIU_BIN: &str = "/usr/local/sbin/criu";
/// The oldest CRIU that dumps TCP sockets on these kernels.
const MIN_VERSION: &str = "4.2";
/// The sid sources list, apt's lists for it, the verified tarballs and the build trees.
const CACHE_DIR: &str = "/var/cache/berth/criu";
/// Debian unstable's source index, signed with keys bookworm's `debian-archive-keyring` holds.
const SID_SOURCES: &str = "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                           http://deb.debian.org/debian sid main\n";
/// CRIU's lazy pages (post-copy) move pages through pipes of this size; root here lacks
/// CAP_SYS_RESOURCE, so the kernel caps them at `fs.pipe-max-size` (1 MiB by default) and the
/// lazy-pages daemon fails.
const PIPE_MAX_SIZE: u64 = 4 * 1024 * 1024;
const PIPE_MAX_SIZE_FILE: &str = "/proc/sys/fs/pipe-max-size";

/// Builds and installs CRIU ≥ [`MIN_VERSION`] to [`CRIU_BIN`] unless a working one is there, and
/// raises `fs.pipe-max-size` for lazy pages. Expects the build dependencies to be installed.
pub fn install() -> anyhow::Result<()> {
    raise_pipe_max_size()?;
    if let Some(version) = installed_version() {
        if version_ge(&version, MIN_VERSION)? && criu_check(Path::new(CRIU_BIN)).is_ok() {
            println!("install: {CRIU_BIN} {version} present, criu check passes");
            return Ok(());
        }
        println!("install: {CRIU_BIN} {version} is older than {MIN_VERSION} or fails criu check; rebuilding");
    }
    let cache = Path::new(CACHE_DIR);
    let (version, tarball) = match cached_tarball(cache)? {
        Some(found) => {
            println!(
                "install: CRIU source {} already downloaded",
                found.1.display()
            );
            found
        }
        None => download(cache)?,
    };
    let tree = unpack(cache, &version, &tarball)?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "install: building CRIU {version} in {} (make -j{jobs} criu)",
        tree.display()
    );
    crate::run(
        Command::new("make")
            .arg("-C")
            .arg(&tree)
            .arg(format!("-j{jobs}"))
            .arg("criu"),
    )?;
    let built = tree.join("criu").join("criu");
    let built_version = version_of(&built)
        .with_context(|| format!("{} does not answer --version", built.display()))?;
    place(&built, Path::new(CRIU_BIN))?;
    criu_check(Path::new(CRIU_BIN))?;
    println!("install: installed {CRIU_BIN} {built_version}, criu check passes");
    Ok(())
}

/// Only ever raises the limit: a host that set a higher one keeps it.
fn raise_pipe_max_size() -> anyhow::Result<()> {
    let current: u64 = std::fs::read_to_string(PIPE_MAX_SIZE_FILE)
        .with_context(|| format!("reading {PIPE_MAX_SIZE_FILE}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {PIPE_MAX_SIZE_FILE}"))?;
    if current >= PIPE_MAX_SIZE {
        println!("install: fs.pipe-max-size = {current} (CRIU lazy pages need {PIPE_MAX_SIZE})");
        return Ok(());
    }
    std::fs::write(PIPE_MAX_SIZE_FILE, PIPE_MAX_SIZE.to_string())
        .with_context(|| format!("writing {PIPE_MAX_SIZE} to {PIPE_MAX_SIZE_FILE}"))?;
    println!(
        "install: raised fs.pipe-max-size from {current} to {PIPE_MAX_SIZE} (CRIU lazy pages)"
    );
    Ok(())
}

fn installed_version() -> Option<String> {
    version_of(Path::new(CRIU_BIN))
}

/// The `Version: 4.2.1` line of `criu --version`.
fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
}

fn criu_check(bin: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .arg("check")
        .output()
        .with_context(|| format!("running {} check", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.contains("Looks good") {
        bail!(
            "{} check failed ({}): {}",
            bin.display(),
            out.status,
            text.trim()
        );
    }
    Ok(())
}

/// Debian version order (`dpkg --compare-versions A ge B`), which also orders upstream versions.
fn version_ge(a: &str, b: &str) -> anyhow::Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "ge", b])
        .status()
        .context("running dpkg --compare-versions")?;
    Ok(status.success())
}

/// The upstream version in `criu_4.2.1.orig.tar.xz`.
fn orig_version(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix("criu_")?;
    let (version, ext) = rest.split_once(".orig.tar.")?;
    (!version.is_empty() && !ext.contains('/') && !ext.ends_with(".asc")).then_some(version)
}

/// The newest tarball ≥ [`MIN_VERSION`] in `<cache>/src` (only verified ones are moved there).
fn cached_tarball(cache: &Path) -> anyhow::Result<Option<(String, PathBuf)>> {
    let dir = cache.join("src");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut best: Option<(String, PathBuf)> = None;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(orig_version) else {
            continue;
        };
        if !version_ge(version, MIN_VERSION)? {
            continue;
        }
        if let Some((b, _)) = &best {
            if version_ge(b, version)? {
                continue;
            }
        }
        best = Some((version.to_owned(), entry.path()));
    }
    Ok(best)
}

/// One source package version from `apt-cache showsrc`, with its orig tarball.
#[derive(Debug, PartialEq)]
struct SourceEntry {
    version: String,
    orig_name: String,
    orig_sha256: String,
}

/// The `criu` stanzas of `apt-cache showsrc criu` that carry an orig tarball with a SHA-256.
fn parse_showsrc(text: &str) -> Vec<SourceEntry> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let mut package = None;
        let mut version = None;
        let mut orig = None;
        let mut in_sha256 = false;
        for line in stanza.lines() {
            if let Some(cont) = line.strip_prefix(' ') {
                if in_sha256 {
                    let fields: Vec<&str> = cont.split_whitespace().collect();
                    if let [hash, _size, name] = fields[..] {
                        if orig_version(name).is_some() {
                            orig = Some((name.to_owned(), hash.to_owned()));
                        }
                    }
                }
                continue;
            }
            in_sha256 = line.starts_with("Checksums-Sha256:");
            if let Some(p) = line.strip_prefix("Package:") {
                package = Some(p.trim());
            } else if let Some(v) = line.strip_prefix("Version:") {
                version = Some(v.trim());
            }
        }
        if let (Some("criu"), Some(version), Some((orig_name, orig_sha256))) =
            (package, version, orig)
        {
            entries.push(SourceEntry {
                version: version.to_owned(),
                orig_name,
                orig_sha256,
            });
        }
    }
    entries
}

/// `apt-get`/`apt-cache` reading only our sid `deb-src` list and lists directory; the binary
/// caches are disabled so apt's own `pkgcache.bin` is never rebuilt from sid's index.
fn apt_sid(tool: &str, cache: &Path) -> Command {
    let mut cmd = Command::new(tool);
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .arg("-o")
        .arg(format!(
            "Dir::Etc::SourceList={}",
            cache.join("sid.list").display()
        ))
        .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
        .arg(format!(
            "Dir::State::Lists={}",
            cache.join("lists").display()
        ))
        .args([
            "-o",
            "Dir::Cache::pkgcache=",
            "-o",
            "Dir::Cache::srcpkgcache=",
        ]);
    cmd
}

/// Fetches sid's source index, picks the newest `criu` ≥ [`MIN_VERSION`], downloads its orig
/// tarball, checks its SHA-256 against the index and moves it to `<cache>/src`.
fn download(cache: &Path) -> anyhow::Result<(String, PathBuf)> {
    let lists = cache.join("lists");
    std::fs::create_dir_all(lists.join("partial"))
        .with_context(|| format!("creating {}", lists.display()))?;
    let list = cache.join("sid.list");
    std::fs::write(&list, SID_SOURCES).with_context(|| format!("writing {}", list.display()))?;
    println!(
        "install: reading Debian sid's source index for criu ({})",
        list.display()
    );
    crate::run(apt_sid("apt-get", cache).args(["update", "-q"]))?;
    let out = apt_sid("apt-cache", cache)
        .args(["showsrc", "criu"])
        .output()
        .context("running apt-cache showsrc criu")?;
    if !out.status.success() {
        bail!(
            "apt-cache showsrc criu failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut best: Option<SourceEntry> = None;
    for entry in parse_showsrc(&String::from_utf8_lossy(&out.stdout)) {
        if !version_ge(&entry.version, MIN_VERSION)? {
            continue;
        }
        if let Some(b) = &best {
            if version_ge(&b.version, &entry.version)? {
                continue;
            }
        }
        best = Some(entry);
    }
    let Some(entry) = best else {
        bail!("Debian sid lists no criu source >= {MIN_VERSION} (apt-cache showsrc criu)");
    };

    // A fresh directory per attempt: what a killed download left behind is never taken for a tarball.
    let staging = cache.join("download");
    remove_dir_if_present(&staging)?;
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    println!(
        "install: downloading criu {} source ({}) from Debian sid",
        entry.version, entry.orig_name
    );
    // The Debian packaging tarball sometimes 404s on the mirror; only the orig tarball matters, and
    // its checksum below decides.
    let status = apt_sid("apt-get", cache)
        // The staging directory is root's; apt would otherwise warn that `_apt` cannot write to it
        // and download as root anyway.
        .args(["-o", "APT::Sandbox::User=root"])
        .args(["source", "--download-only", "-q"])
        .arg(format!("criu={}", entry.version))
        .current_dir(&staging)
        .status()
        .context("running apt-get source --download-only criu")?;
    let downloaded = staging.join(&entry.orig_name);
    if !downloaded.is_file() {
        bail!(
            "apt-get source criu={} ({status}) did not download {}",
            entry.version,
            entry.orig_name
        );
    }
    if !status.success() {
        println!(
            "install: apt-get source exited with {status}, but {} arrived; checking it",
            entry.orig_name
        );
    }
    let actual = sha256(&downloaded)?;
    if actual != entry.orig_sha256 {
        bail!(
            "{}: SHA-256 {actual}, Debian's index says {}",
            downloaded.display(),
            entry.orig_sha256
        );
    }
    let src = cache.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let tarball = src.join(&entry.orig_name);
    std::fs::rename(&downloaded, &tarball)
        .with_context(|| format!("moving {} to {}", downloaded.display(), tarball.display()))?;
    remove_dir_if_present(&staging)?;
    let version = orig_version(&entry.orig_name)
        .with_context(|| format!("no version in {}", entry.orig_name))?
        .to_owned();
    Ok((version, tarball))
}

fn sha256(file: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .with_context(|| format!("running sha256sum {}", file.display()))?;
    if !out.status.success() {
        bail!("sha256sum {} failed ({})", file.display(), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("sha256sum {}: empty output", file.display()))
}

/// Unpacks the tarball to `<cache>/build/criu-<version>` unless an earlier run did; a half-done
/// unpack stays in a scratch directory that the next run removes.
fn unpack(cache: &Path, version: &str, tarball: &Path) -> anyhow::Result<PathBuf> {
    let build = cache.join("build");
    let tree = build.join(format!("criu-{version}"));
    if tree.join("Makefile").is_file() {
        println!("install: reusing CRIU build tree {}", tree.display());
        return Ok(tree);
    }
    let scratch = build.join(".unpack");
    remove_dir_if_present(&scratch)?;
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    crate::run(
        Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(&scratch),
    )?;
    let mut tops = std::fs::read_dir(&scratch)
        .with_context(|| format!("reading {}", scratch.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", scratch.display()))?;
    let top = match tops.len() {
        1 => tops.remove(0).path(),
        n => bail!(
            "{}: expected one top-level directory, found {n}",
            tarball.display()
        ),
    };
    remove_dir_if_present(&tree)?;
    std::fs::rename(&top, &tree)
        .with_context(|| format!("moving {} to {}", top.display(), tree.display()))?;
    remove_dir_if_present(&scratch)?;
    Ok(tree)
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Copies next to the destination, then renames over it: a running `criu` or a crash mid-copy
/// never sees a half-written binary.
fn place(built: &Path, dest: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".criu.berth-install");
    std::fs::copy(built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", tmp.display()))?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("moving {} to {}", tmp.display(), dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOWSRC: &str = "Package: criu
Binary: criu, python3-criu, crit
Version: 4.2.1-1
Format: 3.0 (quilt)
Files:
 15af4ed4460591e31fc5be6cab994ac9 1038700 criu_4.2.1.orig.tar.xz
 fa44a793db247d17dce76d0cf84033b9 12964 criu_4.2.1-1.debian.tar.xz
Checksums-Sha256:
 9286c86e5adfd70b97a68e117c2905d91bf9e31132296e7ebf57066189a2f0b0 2901 criu_4.2.1-1.dsc
 29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9 1038700 criu_4.2.1.orig.tar.xz
 e9f797a19f0e7dd66d480bea47f2ef261b3d9aee6bab5059882c0074b1b84d2d 12964 criu_4.2.1-1.debian.tar.xz
Package-List: 
 criu deb admin optional arch=amd64,arm64

Package: criu
Version: 4.3-1
Checksums-Sha256:
 aaaa 10 criu_4.3.orig.tar.xz
 bbbb 20 criu_4.3.orig.tar.xz.asc

Package: criu-other
Version: 9.9-1
Checksums-Sha256:
 cccc 10 criu_9.9.orig.tar.gz

";

    #[test]
    fn showsrc_stanzas_with_orig_tarballs() {
        assert_eq!(
            parse_showsrc(SHOWSRC),
            vec![
                SourceEntry {
                    version: "4.2.1-1".into(),
                    orig_name: "criu_4.2.1.orig.tar.xz".into(),
                    orig_sha256: "29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9"
                        .into(),
                },
                SourceEntry {
                    version: "4.3-1".into(),
                    orig_name: "criu_4.3.orig.tar.xz".into(),
                    orig_sha256: "aaaa".into(),
                },
            ]
        );
    }

    #[test]
    fn orig_tarball_names() {
        assert_eq!(orig_version("criu_4.2.1.orig.tar.xz"), Some("4.2.1"));
        assert_eq!(orig_version("criu_4.3.orig.tar.gz"), Some("4.3"));
        assert_eq!(orig_version("criu_4.3.orig.tar.xz.asc"), None);
        assert_eq!(orig_version("criu_4.2.1-1.debian.tar.xz"), None);
        assert_eq!(orig_version("criu_4.2.1-1.dsc"), None);
    }

    #[test]
    fn debian_version_order() {
        // Needs dpkg, which every Debian machine has.
        assert!(version_ge("4.2.1-1", "4.2").unwrap());
        assert!(version_ge("4.2", "4.2").unwrap());
        assert!(version_ge("4.10", "4.2").unwrap());
        assert!(!version_ge("4.1.1-2", "4.2").unwrap());
        assert!(!version_ge("3.17.1", "4.2").unwrap());
    }
}
