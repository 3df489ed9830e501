//! The probe a user declares (`health: {http | tcp | exec, interval, timeout, failure_threshold,
//! start_period}`), the durations users type (`"2s"`, `"500ms"`), and the probe's validation.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::HealthSpecError;

/// Default time between two probes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default time one probe may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of consecutive failures that make an instance unhealthy.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Default grace after the instance starts before the first probe.
pub const DEFAULT_START_PERIOD: Duration = Duration::ZERO;

// Longest duration accepted anywhere in a probe (a day), shared with the hub's validation.
use berth_proto::duration::MAX_DURATION;

/// One instance's health probe, validated by [`ProbeSpec::validate`].
///
/// Its JSON form is the user's: `{"http": {"path": "/healthz", "port": 8080}, "interval": "10s",
/// "timeout": "1s", "failure_threshold": 3, "start_period": "0s"}` (or `"tcp": {"port"}`, or
/// `"exec": {"command": [..]}`), durations as text, omitted fields at their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ProbeSpecJson", into = "ProbeSpecJson")]
pub struct ProbeSpec {
    /// What one probe does.
    pub check: ProbeCheck,
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// Time one probe may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive failures that make the instance unhealthy.
    pub failure_threshold: u32,
    /// Time after the instance starts before the first probe.
    pub start_period: Duration,
}

/// The JSON form: one optional field per kind of check, so "exactly one" gets a clear error and
/// unknown fields are refused.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeSpecJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<HttpJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp: Option<TcpJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec: Option<ExecJson>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    failure_threshold: Option<u32>,
    #[serde(default)]
    start_period: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpJson {
    path: String,
    port: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpJson {
    port: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecJson {
    command: Vec<String>,
}

impl TryFrom<ProbeSpecJson> for ProbeSpec {
    type Error = HealthSpecError;

    fn try_from(j: ProbeSpecJson) -> Result<Self, Self::Error> {
        let check = match (j.http, j.tcp, j.exec) {
            (Some(h), None, None) => ProbeCheck::Http {
                path: h.path,
                port: h.port,
            },
            (None, Some(t), None) => ProbeCheck::Tcp { port: t.port },
            (None, None, Some(e)) => ProbeCheck::Exec { command: e.command },
            _ => {
                return Err(HealthSpecError::Invalid {
                    field: "health",
                    reason: "needs exactly one of http, tcp, exec".to_owned(),
                })
            }
        };
        let duration = |field, text: Option<String>, default| match text {
            Some(t) => parse_duration(field, &t),
            None => Ok(default),
        };
        Ok(Self {
            check,
            interval: duration("health.interval", j.interval, DEFAULT_INTERVAL)?,
            timeout: duration("health.timeout", j.timeout, DEFAULT_TIMEOUT)?,
            failure_threshold: j.failure_threshold.unwrap_or(DEFAULT_FAILURE_THRESHOLD),
            start_period: duration("health.start_period", j.start_period, DEFAULT_START_PERIOD)?,
        })
    }
}

impl From<ProbeSpec> for ProbeSpecJson {
    fn from(s: ProbeSpec) -> Self {
        let (mut http, mut tcp, mut exec) = (None, None, None);
        match s.check {
            ProbeCheck::Http { path, port } => http = Some(HttpJson { path, port }),
            ProbeCheck::Tcp { port } => tcp = Some(TcpJson { port }),
            ProbeCheck::Exec { command } => exec = Some(ExecJson { command }),
        }
        Self {
            http,
            tcp,
            exec,
            interval: Some(format_duration(s.interval)),
            timeout: Some(format_duration(s.timeout)),
            failure_threshold: Some(s.failure_threshold),
            start_period: Some(format_duration(s.start_period)),
        }
    }
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    /// `GET path` on the instance's IP and `port`; healthy for a status in 200..=399.
    Http {
        /// Absolute request path, e.g. `/healthz`.
        path: String,
        /// TCP port on the instance's IP (1..=65535).
        port: u32,
    },
    /// A TCP connect to the instance's IP and `port`; healthy when it is accepted.
    Tcp {
        /// TCP port on the instance's IP (1..=65535).
        port: u32,
    },
    /// `command` run inside the container (its namespaces and cgroup); healthy when it exits 0.
    Exec {
        /// Program and arguments, resolved in the container's `PATH`; not empty.
        command: Vec<String>,
    },
}

impl ProbeSpec {
    /// A probe doing `check` with every other field at its default.
    pub fn new(check: ProbeCheck) -> Self {
        Self {
            check,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            start_period: DEFAULT_START_PERIOD,
        }
    }

    /// Checks everything a user can get wrong; the error names the field (`health.http.port`).
    pub fn validate(&self) -> Result<(), HealthSpecError> {
        let invalid =
            |field: &'static str, reason: String| HealthSpecError::Invalid { field, reason };
        match &self.check {
            ProbeCheck::Http { path, port } => {
                check_port("health.http.port", *port)?;
                if !path.starts_with('/') {
                    return Err(invalid(
                        "health.http.path",
                        format!("{path:?} must start with '/'"),
                    ));
                }
                // The path goes verbatim into the request line: no room for a second header.
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(invalid(
                        "health.http.path",
                        format!("{path:?} must not contain spaces or control characters"),
                    ));
                }
                if path.len() > 2048 {
                    return Err(invalid(
                        "health.http.path",
                        "longer than 2048 bytes".to_owned(),
                    ));
                }
            }
            ProbeCheck::Tcp { port } => check_port("health.tcp.port", *port)?,
            ProbeCheck::Exec { command } => {
                if command.first().is_none_or(|c| c.is_empty()) {
                    return Err(invalid(
                        "health.exec.command",
                        "needs a program to run".to_owned(),
                    ));
                }
                if command.iter().any(|a| a.contains('\0')) {
                    return Err(invalid(
                        "health.exec.command",
                        "arguments must not contain NUL".to_owned(),
                    ));
                }
            }
        }
        if self.timeout.is_zero() {
            return Err(invalid("health.timeout", "must be more than 0s".to_owned()));
        }
        if self.interval < self.timeout {
            return Err(invalid(
                "health.interval",
                format!(
                    "{} is shorter than the timeout {}: probes would overlap",
                    format_duration(self.interval),
                    format_duration(self.timeout)
                ),
            ));
        }
        for (field, d) in [
            ("health.interval", self.interval),
            ("health.timeout", self.timeout),
            ("health.start_period", self.start_period),
        ] {
            if d > MAX_DURATION {
                return Err(invalid(
                    field,
                    format!("{} is longer than 24h", format_duration(d)),
                ));
            }
        }
        if self.failure_threshold == 0 {
            return Err(invalid(
                "health.failure_threshold",
                "must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }
}

fn check_port(field: &'static str, port: u32) -> Result<(), HealthSpecError> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(HealthSpecError::Invalid {
            field,
            reason: format!("{port} is not a port (1-65535)"),
        })
    }
}

impl fmt::Display for ProbeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeCheck::Http { path, port } => write!(f, "http GET :{port}{path}"),
            ProbeCheck::Tcp { port } => write!(f, "tcp :{port}"),
            ProbeCheck::Exec { command } => write!(f, "exec {command:?}"),
        }
    }
}

/// Parses a duration as users type it (see [`berth_proto::duration::parse`]); `field` names the
/// setting in the error (`health.interval`).
pub fn parse_duration(field: &'static str, text: &str) -> Result<Duration, HealthSpecError> {
    let d = berth_proto::duration::parse(text).map_err(|e| HealthSpecError::Duration {
        field,
        text: e.text,
        reason: e.reason,
    })?;
    Ok(d)
}

pub use berth_proto::duration::format as format_duration;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn durations_parse_as_users_write_them() {
        for (text, want) in [
            ("2s", ms(2000)),
            ("500ms", ms(500)),
            ("0s", ms(0)),
            ("1.5s", ms(1500)),
            ("0.1s", ms(100)),
            (".25s", ms(250)),
            ("1m30s", ms(90_000)),
            ("1h", ms(3_600_000)),
            (" 10s ", ms(10_000)),
            ("1s500ms", ms(1500)),
        ] {
            assert_eq!(
                parse_duration("health.interval", text).unwrap(),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn bad_durations_name_the_field_and_the_text() {
        for (text, reason) in [
            ("", "empty"),
            ("10", "missing unit"),
            ("10x", "unknown unit"),
            ("s", "expected a number"),
            ("-1s", "negative"),
            ("1.2.3s", "not a number"),
            (".s", "not a number"),
            ("25h", "longer than 24h"),
            ("99999999999999999999999h", "large"),
        ] {
            let e = parse_duration("health.timeout", text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("health.timeout"), "{e}");
            assert!(e.contains(&format!("{text:?}")), "{e}");
            assert!(e.contains(reason), "{text:?}: {e}");
        }
    }

    #[test]
    fn durations_print_back_to_what_parses() {
        for d in [
            ms(0),
            ms(500),
            ms(1000),
            ms(1500),
            ms(90_000),
            ms(3_661_000),
        ] {
            let text = format_duration(d);
            assert_eq!(parse_duration("x", &text).unwrap(), d, "{text}");
        }
        assert_eq!(format_duration(ms(90_000)), "1m30s");
        assert_eq!(format_duration(ms(10_000)), "10s");
    }

    #[test]
    fn json_takes_the_users_shape_with_defaults() {
        let spec: ProbeSpec =
            serde_json::from_str(r#"{"http": {"path": "/healthz", "port": 8080}}"#).unwrap();
        assert_eq!(
            spec,
            ProbeSpec::new(ProbeCheck::Http {
                path: "/healthz".into(),
                port: 8080
            })
        );
        assert_eq!(spec.interval, ms(10_000));
        assert_eq!(spec.timeout, ms(1000));
        assert_eq!(spec.failure_threshold, 3);
        assert_eq!(spec.start_period, ms(0));

        let spec: ProbeSpec = serde_json::from_str(
            r#"{"exec": {"command": ["true"]}, "interval": "2s", "timeout": "500ms",
                "failure_threshold": 1, "start_period": "1m"}"#,
        )
        .unwrap();
        assert_eq!(
            spec.check,
            ProbeCheck::Exec {
                command: vec!["true".into()]
            }
        );
        assert_eq!(
            (spec.interval, spec.timeout, spec.start_period),
            (ms(2000), ms(500), ms(60_000))
        );
        let back: ProbeSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);

        let e = serde_json::from_str::<ProbeSpec>(r#"{"tcp": {"port": 1}, "interval": "10"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("health.interval") && e.contains("missing unit"),
            "{e}"
        );
        for bad in [
            r#"{"tcp": {"port": 1}, "http": {"path": "/", "port": 1}}"#,
            r#"{"interval": "1s"}"#,
        ] {
            let e = serde_json::from_str::<ProbeSpec>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("exactly one of http, tcp, exec"), "{e}");
        }
        let e = serde_json::from_str::<ProbeSpec>(r#"{"tcp": {"port": 1}, "intervall": "1s"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `intervall`"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let ok = ProbeSpec::new(ProbeCheck::Tcp { port: 80 });
        ok.validate().unwrap();
        let cases = [
            (ProbeCheck::Tcp { port: 0 }, "health.tcp.port"),
            (ProbeCheck::Tcp { port: 65536 }, "health.tcp.port"),
            (
                ProbeCheck::Http {
                    path: "healthz".into(),
                    port: 80,
                },
                "health.http.path",
            ),
            (
                ProbeCheck::Http {
                    path: "/a\r\nX-Evil: 1".into(),
                    port: 80,
                },
                "health.http.path",
            ),
            (
                ProbeCheck::Http {
                    path: "/".into(),
                    port: 0,
                },
                "health.http.port",
            ),
            (ProbeCheck::Exec { command: vec![] }, "health.exec.command"),
            (
                ProbeCheck::Exec {
                    command: vec![String::new()],
                },
                "health.exec.command",
            ),
        ];
        for (check, field) in cases {
            let e = ProbeSpec::new(check.clone()).validate().unwrap_err();
            assert!(e.to_string().starts_with(field), "{check:?}: {e}");
        }
        let timing = [
            (ms(1000), ms(0), 3, "health.timeout"),
            (ms(500), ms(1000), 3, "health.interval"),
            (ms(1000), ms(1000), 0, "health.failure_threshold"),
            (ms(25 * 3600 * 1000), ms(1000), 1, "health.interval"),
        ];
        for (interval, timeout, threshold, field) in timing {
            let spec = ProbeSpec {
                interval,
                timeout,
                failure_threshold: threshold,
                ..ok.clone()
            };
            let e = spec.validate().unwrap_err();
            assert!(e.to_string().starts_with(field), "{e}");
        }
        // interval == timeout is fine: the next probe starts when the previous one gave up.
        ProbeSpec {
            interval: ms(1000),
            timeout: ms(1000),
            ..ok
        }
        .validate()
        .unwrap();
    }
}
