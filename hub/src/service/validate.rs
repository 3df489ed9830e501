//! Input checks shared by every operation. Each failure names the request field it is about.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_proto::duration;

use super::ServiceError;
use crate::store::records::HealthRecord;

/// Most replicas one container may ask for; more is rejected as absurd.
pub const MAX_REPLICAS: i64 = 1000;
/// cpu per replica when the request gives none.
pub const DEFAULT_CPU: &str = "0.1";
/// memory per replica when the request gives none.
pub const DEFAULT_MEMORY: &str = "64MiB";

/// Checks a DNS-1123 label: 1..=63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn name(field: &str, value: &str) -> Result<(), ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::invalid(field, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(ServiceError::invalid(field, "longer than 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ServiceError::invalid(
            field,
            format!("{value:?} may only contain lower-case letters, digits and '-'"),
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(ServiceError::invalid(
            field,
            format!("{value:?} must not start or end with '-'"),
        ));
    }
    Ok(())
}

/// Parses a cpu quantity ("2", "0.5", "500m"); empty means [`DEFAULT_CPU`]. Returns millicores.
pub fn cpu(value: &str) -> Result<u64, ServiceError> {
    let value = if value.is_empty() { DEFAULT_CPU } else { value };
    let millis = berth_proto::units::parse_cpu(value)
        .map_err(|e| ServiceError::invalid("cpu", e.to_string()))?;
    if millis == 0 {
        return Err(ServiceError::invalid("cpu", "must be more than 0"));
    }
    Ok(millis)
}

/// Parses a memory quantity ("64MB", "64MiB", "4GB"); empty means [`DEFAULT_MEMORY`]. Returns bytes.
pub fn memory(value: &str) -> Result<u64, ServiceError> {
    let value = if value.is_empty() {
        DEFAULT_MEMORY
    } else {
        value
    };
    let bytes = berth_proto::units::parse_memory(value)
        .map_err(|e| ServiceError::invalid("memory", e.to_string()))?;
    if bytes == 0 {
        return Err(ServiceError::invalid("memory", "must be more than 0"));
    }
    Ok(bytes)
}

/// Checks a replica count: 0..=[`MAX_REPLICAS`].
pub fn replicas(value: i64) -> Result<u32, ServiceError> {
    if value < 0 {
        return Err(ServiceError::invalid(
            "replicas",
            format!("must not be negative (got {value})"),
        ));
    }
    if value > MAX_REPLICAS {
        return Err(ServiceError::invalid(
            "replicas",
            format!("{value} is absurd (at most {MAX_REPLICAS})"),
        ));
    }
    u32::try_from(value).map_err(|_| ServiceError::invalid("replicas", "out of range"))
}

/// Checks an image reference: non-empty, no whitespace.
pub fn image(value: &str) -> Result<(), ServiceError> {
    if value.trim().is_empty() {
        return Err(ServiceError::invalid("image", "is required"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ServiceError::invalid(
            "image",
            format!("{value:?} contains whitespace"),
        ));
    }
    Ok(())
}

/// Checks a command: every element non-empty.
pub fn command(value: &[String]) -> Result<(), ServiceError> {
    for (i, arg) in value.iter().enumerate() {
        if arg.is_empty() {
            return Err(ServiceError::invalid(
                format!("command[{i}]"),
                "must not be empty",
            ));
        }
        if arg.contains('\0') {
            return Err(ServiceError::invalid(
                format!("command[{i}]"),
                "contains a NUL byte",
            ));
        }
    }
    Ok(())
}

/// Checks environment variables: names non-empty, without '=' or NUL; values without NUL.
pub fn env(value: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    for (k, v) in value {
        if k.is_empty() {
            return Err(ServiceError::invalid(
                "env",
                "variable names must not be empty",
            ));
        }
        if k.contains('=') || k.contains('\0') {
            return Err(ServiceError::invalid(
                format!("env.{k}"),
                "name must not contain '=' or NUL",
            ));
        }
        if v.contains('\0') {
            return Err(ServiceError::invalid(
                format!("env.{k}"),
                "value contains a NUL byte",
            ));
        }
    }
    Ok(())
}

/// Restart policies a container may ask for.
pub const RESTART_POLICIES: [&str; 3] = ["always", "on-failure", "never"];

/// The restart policy (empty: "always") and the restart limit (only with "on-failure"; 0: none).
pub fn restart_policy(
    policy: &str,
    max_restarts: Option<i64>,
) -> Result<(String, u32), ServiceError> {
    let policy = if policy.is_empty() { "always" } else { policy };
    if !RESTART_POLICIES.contains(&policy) {
        return Err(ServiceError::invalid(
            "restart_policy",
            format!("{policy:?} is not one of \"always\", \"on-failure\", \"never\""),
        ));
    }
    let max = match max_restarts {
        None => 0,
        Some(_) if policy != "on-failure" => {
            return Err(ServiceError::invalid(
                "max_restarts",
                format!("only applies to restart_policy \"on-failure\", not {policy:?}"),
            ))
        }
        Some(n) if n < 0 => {
            return Err(ServiceError::invalid(
                "max_restarts",
                format!("{n} is negative"),
            ))
        }
        Some(n) => u32::try_from(n)
            .map_err(|_| ServiceError::invalid("max_restarts", format!("{n} is too large")))?,
    };
    Ok((policy.to_owned(), max))
}

/// A WireGuard public key: base64 of exactly 32 bytes.
pub fn wireguard_key(field: &str, value: &str) -> Result<(), ServiceError> {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(value) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        Ok(bytes) => Err(ServiceError::invalid(
            field,
            format!("a WireGuard key is 32 bytes, this one is {}", bytes.len()),
        )),
        Err(e) => Err(ServiceError::invalid(
            field,
            format!("not a base64 WireGuard key: {e}"),
        )),
    }
}

/// Checks an id or name given in a path or reference field.
pub fn reference(field: &str, value: &str) -> Result<(), ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::invalid(field, "must not be empty"));
    }
    if value.contains('/') || value.len() > 253 {
        return Err(ServiceError::invalid(
            field,
            format!("{value:?} is not an id or name"),
        ));
    }
    Ok(())
}

/// Default grace between the stop signal and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest grace a stop may give.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(3600);

/// Parses `stop_timeout` ("10s"; empty: the default). Returns milliseconds.
pub fn stop_timeout(value: &str) -> Result<u64, ServiceError> {
    if value.is_empty() {
        return Ok(DEFAULT_STOP_TIMEOUT.as_millis() as u64);
    }
    let d =
        duration::parse(value).map_err(|e| ServiceError::invalid("stop_timeout", e.to_string()))?;
    if d > MAX_STOP_TIMEOUT {
        return Err(ServiceError::invalid("stop_timeout", "longer than 1h"));
    }
    Ok(d.as_millis() as u64)
}

/// Signals a stop may send, by their usual names (number, name with and without `SIG`).
const SIGNALS: &[(&str, u32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
    ("WINCH", 28),
    ("PWR", 30),
];

/// Normalises `stop_signal` ("SIGTERM", "TERM", "15", "sigterm") to "SIGTERM"; empty stays empty (the
/// image's own StopSignal, else SIGTERM).
pub fn stop_signal(value: &str) -> Result<String, ServiceError> {
    if value.is_empty() {
        return Ok(String::new());
    }
    let upper = value.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let found = match name.parse::<u32>() {
        Ok(n) => SIGNALS.iter().find(|(_, num)| *num == n),
        Err(_) => SIGNALS.iter().find(|(sig, _)| *sig == name),
    };
    match found {
        Some((sig, _)) => Ok(format!("SIG{sig}")),
        None => Err(ServiceError::invalid(
            "stop_signal",
            format!(
                "{value:?} is not a signal a stop can send; use one of {}",
                SIGNALS
                    .iter()
                    .map(|(s, _)| format!("SIG{s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Checks `max_unavailable` (0: the default 1).
pub fn max_unavailable(value: i64) -> Result<u32, ServiceError> {
    match value {
        0 => Ok(1),
        v if v < 0 => Err(ServiceError::invalid(
            "max_unavailable",
            format!("{v} is negative"),
        )),
        v if v > MAX_REPLICAS => Err(ServiceError::invalid(
            "max_unavailable",
            format!("{v} is more than {MAX_REPLICAS}"),
        )),
        v => Ok(v as u32),
    }
}

/// Probe defaults, as users write them.
const DEFAULT_PROBE_INTERVAL: &str = "10s";
const DEFAULT_PROBE_TIMEOUT: &str = "1s";
const DEFAULT_PROBE_START_PERIOD: &str = "0s";
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Most consecutive failures a probe may wait for.
const MAX_FAILURE_THRESHOLD: u32 = 100;

/// Checks a health probe and fills in its defaults (so what is stored and shown is what runs).
pub fn health(h: &HealthRecord) -> Result<HealthRecord, ServiceError> {
    let kinds = usize::from(h.http.is_some())
        + usize::from(h.tcp.is_some())
        + usize::from(h.exec.is_some());
    if kinds != 1 {
        return Err(ServiceError::invalid(
            "health",
            "give exactly one of http, tcp or exec",
        ));
    }
    let port_ok = |field: &str, port: u32| {
        if (1..=65535).contains(&port) {
            Ok(())
        } else {
            Err(ServiceError::invalid(
                field,
                format!("{port} is not a port (1-65535)"),
            ))
        }
    };
    if let Some(http) = &h.http {
        port_ok("health.http.port", http.port)?;
        if !http.path.starts_with('/')
            || http
                .path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ServiceError::invalid(
                "health.http.path",
                format!(
                    "{:?} is not an absolute URL path like \"/healthz\"",
                    http.path
                ),
            ));
        }
    }
    if let Some(tcp) = &h.tcp {
        port_ok("health.tcp.port", tcp.port)?;
    }
    if let Some(exec) = &h.exec {
        if exec.command.first().is_none_or(|p| p.is_empty()) {
            return Err(ServiceError::invalid(
                "health.exec.command",
                "needs a program to run",
            ));
        }
        if exec.command.iter().any(|a| a.contains('\0')) {
            return Err(ServiceError::invalid(
                "health.exec.command",
                "arguments must not contain NUL",
            ));
        }
    }
    let parse =
        |field: &str, text: &str, default: &str| -> Result<(String, Duration), ServiceError> {
            let text = if text.is_empty() { default } else { text };
            let d =
                duration::parse(text).map_err(|e| ServiceError::invalid(field, e.to_string()))?;
            Ok((duration::format(d), d))
        };
    let (interval, interval_d) = parse("health.interval", &h.interval, DEFAULT_PROBE_INTERVAL)?;
    let (timeout, timeout_d) = parse("health.timeout", &h.timeout, DEFAULT_PROBE_TIMEOUT)?;
    let (start_period, _) = parse(
        "health.start_period",
        &h.start_period,
        DEFAULT_PROBE_START_PERIOD,
    )?;
    if timeout_d.is_zero() {
        return Err(ServiceError::invalid(
            "health.timeout",
            "must be more than 0s",
        ));
    }
    if interval_d < timeout_d {
        return Err(ServiceError::invalid(
            "health.interval",
            format!("{interval} is shorter than the timeout {timeout}: probes would overlap"),
        ));
    }
    let failure_threshold = match h.failure_threshold {
        0 => DEFAULT_FAILURE_THRESHOLD,
        n if n > MAX_FAILURE_THRESHOLD => {
            return Err(ServiceError::invalid(
                "health.failure_threshold",
                format!("{n} is more than {MAX_FAILURE_THRESHOLD}"),
            ))
        }
        n => n,
    };
    Ok(HealthRecord {
        interval,
        timeout,
        start_period,
        failure_threshold,
        ..h.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: ServiceError) -> String {
        match e {
            ServiceError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "web", "web-1", "0abc", &"a".repeat(63)] {
            name("name", ok).unwrap();
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"a".repeat(64)] {
            assert_eq!(field_of(name("name", bad).unwrap_err()), "name", "{bad:?}");
        }
    }

    #[test]
    fn replica_bounds() {
        assert_eq!(replicas(0).unwrap(), 0);
        assert_eq!(replicas(1000).unwrap(), 1000);
        assert!(replicas(-1)
            .unwrap_err()
            .to_string()
            .starts_with("replicas: "));
        assert!(replicas(1001).unwrap_err().to_string().contains("absurd"));
    }

    #[test]
    fn images_commands_env() {
        image("registry:5000/demo/httpd:1").unwrap();
        assert_eq!(field_of(image("").unwrap_err()), "image");
        assert_eq!(field_of(image("a b").unwrap_err()), "image");
        command(&["sh".into(), "-c".into()]).unwrap();
        assert_eq!(
            field_of(command(&["sh".into(), String::new()]).unwrap_err()),
            "command[1]"
        );
        let mut e = BTreeMap::new();
        e.insert("A".to_owned(), "1".to_owned());
        env(&e).unwrap();
        e.insert("B=C".to_owned(), "1".to_owned());
        assert_eq!(field_of(env(&e).unwrap_err()), "env.B=C");
        let mut e = BTreeMap::new();
        e.insert(String::new(), "1".to_owned());
        assert_eq!(field_of(env(&e).unwrap_err()), "env");
    }

    #[test]
    fn references() {
        reference("network_id", "net-0123456789ab").unwrap();
        assert_eq!(
            field_of(reference("network_id", "").unwrap_err()),
            "network_id"
        );
        assert_eq!(
            field_of(reference("network_id", "a/b").unwrap_err()),
            "network_id"
        );
    }

    #[test]
    fn stop_signals_normalise_and_unknown_ones_are_refused() {
        for (given, want) in [
            ("SIGTERM", "SIGTERM"),
            ("term", "SIGTERM"),
            ("15", "SIGTERM"),
            ("SIGQUIT", "SIGQUIT"),
            ("", ""),
        ] {
            assert_eq!(stop_signal(given).unwrap(), want, "{given}");
        }
        for bad in ["SIGFOO", "99", "-1", "TERM TERM"] {
            let e = stop_signal(bad).unwrap_err();
            assert!(e.to_string().starts_with("stop_signal:"), "{e}");
        }
    }

    #[test]
    fn stop_timeouts_parse_with_a_default_and_a_ceiling() {
        assert_eq!(stop_timeout("").unwrap(), 10_000);
        assert_eq!(stop_timeout("1.5s").unwrap(), 1_500);
        assert!(stop_timeout("2h").is_err());
        assert!(stop_timeout("10")
            .unwrap_err()
            .to_string()
            .contains("stop_timeout"));
    }

    #[test]
    fn health_defaults_fill_in_and_bad_probes_name_the_field() {
        use crate::store::records::{ExecProbeRecord, HttpProbeRecord, TcpProbeRecord};
        let empty = HealthRecord {
            http: None,
            tcp: None,
            exec: None,
            interval: String::new(),
            timeout: String::new(),
            failure_threshold: 0,
            start_period: String::new(),
        };
        let http = HealthRecord {
            http: Some(HttpProbeRecord {
                path: "/healthz".into(),
                port: 8080,
            }),
            ..empty.clone()
        };
        let ok = health(&http).unwrap();
        assert_eq!(
            (
                ok.interval.as_str(),
                ok.timeout.as_str(),
                ok.start_period.as_str(),
                ok.failure_threshold
            ),
            ("10s", "1s", "0s", 3)
        );
        let field = |h: HealthRecord| match health(&h).unwrap_err() {
            ServiceError::InvalidArgument { field, .. } => field,
            e => panic!("{e}"),
        };
        assert_eq!(field(empty.clone()), "health");
        assert_eq!(
            field(HealthRecord {
                tcp: Some(TcpProbeRecord { port: 1 }),
                ..http.clone()
            }),
            "health"
        );
        assert_eq!(
            field(HealthRecord {
                tcp: Some(TcpProbeRecord { port: 0 }),
                ..empty.clone()
            }),
            "health.tcp.port"
        );
        assert_eq!(
            field(HealthRecord {
                http: Some(HttpProbeRecord {
                    path: "healthz".into(),
                    port: 80
                }),
                ..empty.clone()
            }),
            "health.http.path"
        );
        assert_eq!(
            field(HealthRecord {
                exec: Some(ExecProbeRecord { command: vec![] }),
                ..empty.clone()
            }),
            "health.exec.command"
        );
        assert_eq!(
            field(HealthRecord {
                interval: "1s".into(),
                timeout: "2s".into(),
                ..http.clone()
            }),
            "health.interval"
        );
        assert_eq!(
            field(HealthRecord {
                interval: "ten".into(),
                ..http.clone()
            }),
            "health.interval"
        );
        assert_eq!(
            field(HealthRecord {
                failure_threshold: 1000,
                ..http
            }),
            "health.failure_threshold"
        );
    }

    #[test]
    fn max_unavailable_defaults_to_one() {
        assert_eq!(max_unavailable(0).unwrap(), 1);
        assert_eq!(max_unavailable(3).unwrap(), 3);
        assert!(max_unavailable(-1).is_err());
    }
}
