//! The durations users type (`"10s"`, `"500ms"`, `"1m30s"`): probe intervals, stop timeouts, alert
//! windows. Shared so that the hub validates exactly what the agent and the CLI read back.

use std::time::Duration;

/// Longest duration accepted: a day. Longer values are typos, and they keep `Instant` arithmetic far
/// from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration: {reason}")]
pub struct DurationError {
    /// What the user wrote.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses a duration as users type it: one or more `<number><unit>` parts, units `ms`, `s`, `m`,
/// `h`, numbers with an optional fraction (`"2s"`, `"500ms"`, `"1.5s"`, `"1m30s"`), at most a day.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = |reason: &str| DurationError {
        text: text.to_owned(),
        reason: reason.to_owned(),
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err("empty; write e.g. \"10s\" or \"500ms\""));
    }
    if s.starts_with('-') {
        return Err(err("must not be negative"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() {
            return Err(err("expected a number before the unit"));
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(err("missing unit; use ms, s, m or h (e.g. \"10s\")")),
            _ => return Err(err("unknown unit; use ms, s, m or h")),
        };
        let (whole, frac) = match num.split_once('.') {
            Some((w, f)) => (w, f),
            None => (num, ""),
        };
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return Err(err("not a number"));
        }
        // Integer arithmetic in nanoseconds: "0.1s" is exactly 100ms, no float rounding.
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err("number too large"))?
        };
        let frac_digits = frac.len().min(18);
        let frac_value: u128 = if frac_digits == 0 {
            0
        } else {
            frac[..frac_digits]
                .parse()
                .map_err(|_| err("not a number"))?
        };
        let scale = 10u128.pow(frac_digits as u32);
        let nanos = whole
            .checked_mul(unit_nanos)
            .and_then(|w| w.checked_add(frac_value * unit_nanos / scale))
            .ok_or_else(|| err("too large"))?;
        let part = u64::try_from(nanos)
            .map(Duration::from_nanos)
            .map_err(|_| err("too large"))?;
        total = total.checked_add(part).ok_or_else(|| err("too large"))?;
        rest = tail;
    }
    if total > MAX_DURATION {
        return Err(err("longer than 24h"));
    }
    Ok(total)
}

/// Prints a duration the way [`parse`] reads it back: `"10s"`, `"500ms"`, `"1m30s"`.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return if d.is_zero() {
            "0s".to_owned()
        } else {
            format!("{}ms", d.as_secs_f64() * 1000.0)
        };
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_type_and_prints_it_back() {
        for (text, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1.5s", 1_500),
            ("1m30s", 90_000),
            ("0s", 0),
            ("2h", 7_200_000),
        ] {
            assert_eq!(parse(text).unwrap(), Duration::from_millis(ms), "{text}");
        }
        for d in [0, 1, 999, 1_000, 90_000, 3_600_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        for text in ["", "10", "-1s", "1x", "s", "1.2.3s", "25h", "1..s"] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.text, text);
        }
    }
}
