//! Stop signals as users and images name them (`"SIGTERM"`, `"TERM"`, `"15"`).

use nix::sys::signal::Signal;

/// Parses a signal name with or without the `SIG` prefix (any case) or its number. `None` for
/// anything else, signal 0 and real-time signals (which `nix` cannot name).
pub fn parse_signal(text: &str) -> Option<Signal> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<i32>()
            .ok()
            .and_then(|n| Signal::try_from(n).ok());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse().ok()
}

/// Whether process `pid` has a handler installed for `signal` (`SigCgt` in /proc/PID/status).
/// SIGKILL and SIGSTOP cannot be caught; for the rest, unknown counts as yes, so a container is
/// never denied its grace period by mistake.
pub(crate) fn catches(pid: i32, signal: Signal) -> bool {
    if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    caught_in(&status, signal)
}

/// Whether the `SigCgt` mask of a /proc/PID/status text has `signal`'s bit (true when unreadable).
fn caught_in(status: &str, signal: Signal) -> bool {
    let bit = (signal as i32) - 1;
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_none_or(|mask| (0..64).contains(&bit) && mask & (1 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_short_forms_parse() {
        for (text, want) in [
            ("SIGTERM", Signal::SIGTERM),
            ("TERM", Signal::SIGTERM),
            ("15", Signal::SIGTERM),
            ("sigquit", Signal::SIGQUIT),
            ("int", Signal::SIGINT),
            ("9", Signal::SIGKILL),
            (" SIGUSR1 ", Signal::SIGUSR1),
        ] {
            assert_eq!(parse_signal(text), Some(want), "{text:?}");
        }
        for bad in [
            "",
            "0",
            "SIGNOPE",
            "99",
            "-15",
            "SIGRTMIN+3",
            "TERM1",
            "1.5",
        ] {
            assert_eq!(parse_signal(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_caught_mask_is_read_per_signal() {
        // SIGTERM (15) and SIGQUIT (3) caught: bits 14 and 2.
        let status = "Name:\tsh\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000004004\n";
        assert!(caught_in(status, Signal::SIGTERM));
        assert!(caught_in(status, Signal::SIGQUIT));
        assert!(!caught_in(status, Signal::SIGINT));
        assert!(
            caught_in("Name:\tsh\n", Signal::SIGINT),
            "unknown counts as yes"
        );
        assert!(!catches(std::process::id() as i32, Signal::SIGKILL));
    }
}
