//! Flags that describe a container's spec (health probe, stop signal and grace, cpu, memory, env) and
//! their local checks: a malformed value is refused before any request, with a message naming the
//! flag, so a typo never reaches the hub.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use berth_proto::{duration, units};
use clap::ArgGroup;
use serde_json::{json, Map, Value};

/// `--health-http PATH:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// Absolute URL path, e.g. `/healthz`.
    pub path: String,
    /// 1..=65535.
    pub port: u16,
}

/// `--health-exec 'CMD ARGS...'`, split into words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand(pub Vec<String>);

/// How the agent checks that a replica is healthy (`berth run`).
#[derive(clap::Args, Debug, Default)]
#[command(group(
    ArgGroup::new("probe")
        .args(["health_http", "health_tcp", "health_exec"])
        .multiple(false)
))]
pub struct HealthArgs {
    /// Probe: GET PATH on PORT of each replica must answer 2xx or 3xx (e.g. /healthz:8080).
    #[arg(long, value_name = "PATH:PORT", value_parser = http_target, help_heading = "Health")]
    pub health_http: Option<HttpTarget>,
    /// Probe: a TCP connection to PORT of each replica must open.
    #[arg(long, value_name = "PORT", value_parser = port, help_heading = "Health")]
    pub health_tcp: Option<u16>,
    /// Probe: a command run inside each replica must exit 0. Split into words like a shell does
    /// (quotes respected), but no shell runs it: write `sh -c '...'` for pipes and `||`.
    #[arg(long, value_name = "'CMD ARGS...'", value_parser = exec_command, help_heading = "Health")]
    pub health_exec: Option<ExecCommand>,
    /// Time between probes (default 10s).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag, requires = "probe", help_heading = "Health")]
    pub health_interval: Option<String>,
    /// Time one probe may take (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag, requires = "probe", help_heading = "Health")]
    pub health_timeout: Option<String>,
    /// Consecutive failures that make a replica UNHEALTHY (default 3).
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=100),
        requires = "probe",
        help_heading = "Health"
    )]
    pub health_retries: Option<u32>,
    /// Grace after a replica starts before failures count (default 0s).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag, requires = "probe", help_heading = "Health")]
    pub health_start_period: Option<String>,
}

/// How a replica is stopped (`berth run`).
#[derive(clap::Args, Debug, Default)]
pub struct StopArgs {
    /// Signal a stop sends first: SIGTERM, TERM or 15 (default: the image's StopSignal, else SIGTERM).
    #[arg(long, value_name = "SIGNAL", value_parser = signal_flag)]
    pub stop_signal: Option<String>,
    /// Time between the stop signal and SIGKILL (default 10s).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag)]
    pub stop_timeout: Option<String>,
}

impl HealthArgs {
    /// The `health` object of a create request, or `None` without a probe.
    pub fn to_json(&self) -> Option<Value> {
        let mut health = Map::new();
        if let Some(t) = &self.health_http {
            health.insert("http".into(), json!({ "path": t.path, "port": t.port }));
        } else if let Some(port) = self.health_tcp {
            health.insert("tcp".into(), json!({ "port": port }));
        } else if let Some(ExecCommand(command)) = &self.health_exec {
            health.insert("exec".into(), json!({ "command": command }));
        } else {
            return None;
        }
        let optional = [
            ("interval", self.health_interval.clone().map(Value::from)),
            ("timeout", self.health_timeout.clone().map(Value::from)),
            ("failure_threshold", self.health_retries.map(Value::from)),
            (
                "start_period",
                self.health_start_period.clone().map(Value::from),
            ),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                health.insert(key.into(), value);
            }
        }
        Some(Value::Object(health))
    }
}

impl StopArgs {
    /// Adds `stop_signal` and `stop_timeout` to a create request, when given.
    pub fn add_to(&self, body: &mut Map<String, Value>) {
        if let Some(s) = &self.stop_signal {
            body.insert("stop_signal".into(), s.clone().into());
        }
        if let Some(t) = &self.stop_timeout {
            body.insert("stop_timeout".into(), t.clone().into());
        }
    }
}

/// Parses `PATH:PORT` (`/healthz:8080`); the path may itself contain `:`.
pub fn http_target(s: &str) -> Result<HttpTarget, String> {
    let Some((path, p)) = s.rsplit_once(':') else {
        return Err("expected PATH:PORT, like /healthz:8080".to_owned());
    };
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?} is not an absolute URL path; expected PATH:PORT, like /healthz:8080"
        ));
    }
    Ok(HttpTarget {
        path: path.to_owned(),
        port: port(p)?,
    })
}

/// Parses a port, 1..=65535.
pub fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// Splits a probe command into words.
pub fn exec_command(s: &str) -> Result<ExecCommand, String> {
    let words = split_words(s)?;
    if words.first().is_none_or(String::is_empty) {
        return Err("needs a program to run, like 'cat /tmp/ready'".to_owned());
    }
    Ok(ExecCommand(words))
}

/// Splits a command line into words the way a POSIX shell does, without expanding anything:
/// whitespace separates words, `'...'` is literal, `"..."` is literal but for `\"`, `\\`, `\$` and
/// `` \` ``, and a backslash outside quotes takes the next character as is.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word can be empty yet present (`''`), so track whether one has started.
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated ' in {s:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(format!("unterminated \" in {s:?}")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(format!("unterminated \" in {s:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err(format!("trailing \\ in {s:?}")),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Checks a duration (`"10s"`, `"500ms"`, `"1m30s"`) and keeps it as typed: the hub reads it with the
/// same parser.
pub fn duration_flag(s: &str) -> Result<String, String> {
    duration::parse(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// Checks the shape of a signal (`SIGTERM`, `term`, `15`); which signals a stop may send is the hub's
/// call, and its answer names them.
pub fn signal_flag(s: &str) -> Result<String, String> {
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let ok = match name.parse::<u32>() {
        Ok(n) => (1..=64).contains(&n),
        Err(_) => !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
    };
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a signal; write e.g. SIGTERM, TERM or 15"
        ))
    }
}

/// Checks a cpu quantity (`"0.5"`, `"2"`, `"500m"`) and keeps it as typed.
pub fn cpu_flag(s: &str) -> Result<String, String> {
    units::parse_cpu(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// Checks a memory quantity (`"64MiB"`, `"512MB"`) and keeps it as typed.
pub fn memory_flag(s: &str) -> Result<String, String> {
    units::parse_memory(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// Parses `KEY=VALUE` pairs; the value may contain `=` and be empty, the key may not.
pub fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("invalid --env {pair:?}: expected KEY=VALUE");
        };
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            bail!("invalid --env {pair:?}: the name must be letters, digits and '_', not starting with a digit");
        }
        if value.contains('\0') {
            bail!("invalid --env {pair:?}: the value contains a NUL byte");
        }
        if env.insert(key.to_owned(), value.to_owned()).is_some() {
            bail!("invalid --env {pair:?}: {key} is given twice");
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests;
