#![allow(clippy::unwrap_used)] // a failing test should point at the line

use super::*;

#[test]
fn http_targets() {
    assert_eq!(
        http_target("/healthz:8080").unwrap(),
        HttpTarget {
            path: "/healthz".into(),
            port: 8080
        }
    );
    assert_eq!(http_target("/a:b/c:80").unwrap().path, "/a:b/c");
    for bad in [
        "bad",
        "healthz:80",
        "/healthz",
        "/healthz:",
        "/healthz:0",
        "/healthz:65536",
        "/a b:80",
        ":80",
    ] {
        assert!(http_target(bad).is_err(), "{bad}");
    }
}

#[test]
fn words_split_like_a_shell() {
    let cases: &[(&str, &[&str])] = &[
        ("cat /tmp/ok", &["cat", "/tmp/ok"]),
        ("  a   b  ", &["a", "b"]),
        (
            "sh -c 'test -f /ok || exit 1'",
            &["sh", "-c", "test -f /ok || exit 1"],
        ),
        (r#"echo "a \"b\" \$c \n""#, &["echo", r#"a "b" $c \n"#]),
        (r"a\ b c", &["a b", "c"]),
        ("x '' y", &["x", "", "y"]),
        ("a'b'\"c\"", &["abc"]),
        ("", &[]),
    ];
    for (line, want) in cases {
        assert_eq!(split_words(line).unwrap(), *want, "{line}");
    }
    for bad in ["'open", "\"open", "trailing\\"] {
        assert!(split_words(bad).is_err(), "{bad}");
    }
    assert!(exec_command("   ").is_err());
    assert!(exec_command("'' x").is_err());
    assert_eq!(
        exec_command("cat /ok").unwrap(),
        ExecCommand(vec!["cat".into(), "/ok".into()])
    );
}

#[test]
fn durations_signals_and_quantities() {
    for ok in ["10s", "500ms", "1m30s", "0s"] {
        assert_eq!(duration_flag(ok).unwrap(), ok);
    }
    for bad in ["10", "ten", "-1s", "25h", ""] {
        assert!(duration_flag(bad).is_err(), "{bad}");
    }
    for ok in ["SIGTERM", "TERM", "term", "15", "SIGRTMIN1"] {
        assert_eq!(signal_flag(ok).unwrap(), ok);
    }
    for bad in ["", "SIG", "0", "65", "SIG TERM", "-15", "SIGTERM!"] {
        assert!(signal_flag(bad).is_err(), "{bad}");
    }
    assert!(cpu_flag("0.5").is_ok() && cpu_flag("500m").is_ok());
    assert!(cpu_flag("lots").is_err() && cpu_flag("0").is_err());
    assert!(memory_flag("64MiB").is_ok());
    assert!(memory_flag("4XB").is_err());
}

#[test]
fn health_json_has_only_what_was_given() {
    assert_eq!(HealthArgs::default().to_json(), None);
    let h = HealthArgs {
        health_tcp: Some(80),
        ..HealthArgs::default()
    };
    assert_eq!(h.to_json().unwrap(), json!({ "tcp": { "port": 80 } }));
    let h = HealthArgs {
        health_exec: Some(ExecCommand(vec!["cat".into(), "/ok".into()])),
        health_interval: Some("5s".into()),
        health_timeout: Some("2s".into()),
        health_retries: Some(5),
        health_start_period: Some("30s".into()),
        ..HealthArgs::default()
    };
    assert_eq!(
        h.to_json().unwrap(),
        json!({ "exec": { "command": ["cat", "/ok"] }, "interval": "5s", "timeout": "2s",
                "failure_threshold": 5, "start_period": "30s" })
    );
}
