//! Input checks shared by every operation. Each failure names the request field it is about.

use std::collections::BTreeMap;

use super::ServiceError;

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
}
