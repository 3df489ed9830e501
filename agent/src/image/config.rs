//! The parts of an OCI / Docker image config the runtime needs.

use serde::{Deserialize, Serialize};

/// The process defaults an image declares (`config` in the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`; empty when unset.
    pub entrypoint: Vec<String>,
    /// `Cmd`; empty when unset.
    pub cmd: Vec<String>,
    /// `Env` as `KEY=VALUE` strings, in image order.
    pub env: Vec<String>,
    /// `WorkingDir`; `None` when unset or empty.
    pub working_dir: Option<String>,
    /// `User` (`uid`, `uid:gid`, or names to resolve inside the rootfs); `None` when unset or empty.
    pub user: Option<String>,
    /// `StopSignal` (`SIGQUIT`, `QUIT`, `3`…) as written; `None` when unset or empty (SIGTERM).
    /// Defaulted so image records written before it existed still load.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

/// What the image config says about the image, beyond the process defaults.
#[derive(Debug, Clone)]
pub(crate) struct ParsedConfig {
    pub(crate) config: ImageConfig,
    /// `rootfs.diff_ids`: digests of the uncompressed layer tars, bottom first.
    pub(crate) diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

// Docker writes `null` for unset lists, so every field is optional.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Parses an image config blob.
pub(crate) fn parse(bytes: &[u8]) -> Result<ParsedConfig, serde_json::Error> {
    let raw: RawFile = serde_json::from_slice(bytes)?;
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = match raw.config {
        Some(c) => ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: non_empty(c.working_dir),
            user: non_empty(c.user),
            stop_signal: non_empty(c.stop_signal),
        },
        None => ImageConfig::default(),
    };
    Ok(ParsedConfig {
        config,
        diff_ids: raw.rootfs.map(|r| r.diff_ids).unwrap_or_default(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_oci_and_docker_configs() {
        let oci = br#"{"architecture":"amd64","os":"linux",
            "config":{"Entrypoint":["/bin/httpd"],"Cmd":["-f","-p","80"],"Env":["PATH=/bin"],"WorkingDir":"/www","User":"1000:1000","StopSignal":"SIGQUIT"},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let p = parse(oci).unwrap();
        assert_eq!(p.config.entrypoint, ["/bin/httpd"]);
        assert_eq!(p.config.cmd, ["-f", "-p", "80"]);
        assert_eq!(p.config.env, ["PATH=/bin"]);
        assert_eq!(p.config.working_dir.as_deref(), Some("/www"));
        assert_eq!(p.config.user.as_deref(), Some("1000:1000"));
        assert_eq!(p.config.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(p.diff_ids, ["sha256:aa"]);

        let docker = br#"{"config":{"Entrypoint":null,"Cmd":["sh"],"Env":null,"WorkingDir":"","User":""},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let p = parse(docker).unwrap();
        assert!(p.config.entrypoint.is_empty());
        assert_eq!(p.config.cmd, ["sh"]);
        assert_eq!(p.config.working_dir, None);
        assert_eq!(p.config.user, None);
        assert_eq!(p.config.stop_signal, None);

        assert_eq!(parse(b"{}").unwrap().config, ImageConfig::default());
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"config":{"Cmd":"sh"}}"#).is_err());
    }

    #[test]
    fn records_written_before_stop_signal_still_load() {
        let old = r#"{"entrypoint":[],"cmd":["sh"],"env":[],"working_dir":null,"user":null}"#;
        let c: ImageConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.stop_signal, None);
        assert_eq!(c.cmd, ["sh"]);
    }
}
