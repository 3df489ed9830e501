//! Command-line parsing and request bodies of `berth`, checked without a hub.

use super::*;

fn parse(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn run_sends_only_what_was_given() {
    let Command::Run(args) = parse(&["run", "reg:5000/demo/httpd:1"]).command else {
        panic!("not run");
    };
    let body = run_body(&args, None).expect("body");
    assert_eq!(body, json!({ "image": "reg:5000/demo/httpd:1" }));

    let cli = parse(&[
        "run",
        "img",
        "--cpu",
        "0.5",
        "--memory",
        "64MB",
        "--replicas",
        "3",
        "--name",
        "web",
        "--env",
        "A=1",
        "-e",
        "B=x=y",
        "--env",
        "EMPTY=",
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
    ]);
    let Command::Run(args) = cli.command else {
        panic!("not run");
    };
    let body = run_body(&args, Some("net-1".into())).expect("body");
    assert_eq!(
        body,
        json!({
            "image": "img", "cpu": "0.5", "memory": "64MB", "replicas": 3, "name": "web",
            "network_id": "net-1", "command": ["httpd", "-f", "-p", "80"],
            "env": { "A": "1", "B": "x=y", "EMPTY": "" },
        })
    );
}

#[test]
fn env_is_checked_locally() {
    for bad in [
        "NOEQUALS", "=value", "1A=x", "A B=x", "A-B=x", "A=\0", "É=x",
    ] {
        let err = parse_env(&[bad.to_owned()]).expect_err(bad);
        assert!(err.to_string().contains("invalid --env"), "{err}");
    }
    let twice = parse_env(&["A=1".to_owned(), "A=2".to_owned()]).expect_err("duplicate");
    assert!(twice.to_string().contains("given twice"), "{twice}");
    let ok = parse_env(&["_A1=".to_owned(), "b=2".to_owned()]).expect("valid");
    assert_eq!(ok.len(), 2);
}

#[test]
fn command_line_shapes() {
    let cli = parse(&["--hub", "http://h:1", "inspect", "ctr-1", "-o", "json"]);
    assert_eq!(cli.hub, "http://h:1");
    assert!(matches!(
        cli.command,
        Command::Inspect {
            output: Format::Json,
            ..
        }
    ));
    let cli = parse(&["scale", "web", "5", "--hub", "http://h:2"]);
    assert_eq!(cli.hub, "http://h:2");
    assert!(matches!(cli.command, Command::Scale { replicas: 5, .. }));
    let cli = parse(&["network", "create", "payments", "--cidr", "10.10.0.0/16"]);
    assert!(matches!(
        cli.command,
        Command::Network(NetworkCommand::Create { .. })
    ));
    for bad in [
        &["scale", "web", "-1"][..],
        &["network", "create", "x"],
        &["inspect", "x", "-o", "yaml"],
        &["run"],
    ] {
        let args = std::iter::once("berth").chain(bad.iter().copied());
        assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
    }
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

/// The message clap gives for a refused command line.
fn refused(args: &[&str]) -> String {
    match Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied())) {
        Ok(_) => panic!("{args:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

fn update_args(args: &[&str]) -> lifecycle::UpdateArgs {
    let mut all = vec!["update"];
    all.extend_from_slice(args);
    match parse(&all).command {
        Command::Update(u) => u,
        _ => panic!("not update"),
    }
}

#[test]
fn run_health_and_stop_flags() {
    let Command::Run(args) = parse(&[
        "run",
        "img",
        "--health-http",
        "/healthz:8080",
        "--health-interval",
        "5s",
        "--health-timeout",
        "500ms",
        "--health-retries",
        "2",
        "--health-start-period",
        "1m",
        "--stop-signal",
        "SIGQUIT",
        "--stop-timeout",
        "30s",
    ])
    .command
    else {
        panic!("not run");
    };
    assert_eq!(
        run_body(&args, None).expect("body"),
        json!({
            "image": "img",
            "health": { "http": { "path": "/healthz", "port": 8080 }, "interval": "5s",
                        "timeout": "500ms", "failure_threshold": 2, "start_period": "1m" },
            "stop_signal": "SIGQUIT", "stop_timeout": "30s",
        })
    );
    let Command::Run(args) = parse(&["run", "img", "--health-exec", "sh -c 'test -f /ok'"]).command
    else {
        panic!("not run");
    };
    assert_eq!(
        run_body(&args, None).expect("body")["health"],
        json!({ "exec": { "command": ["sh", "-c", "test -f /ok"] } })
    );
    let Command::Run(args) = parse(&["run", "img", "--health-tcp", "80"]).command else {
        panic!("not run");
    };
    assert_eq!(
        run_body(&args, None).expect("body")["health"],
        json!({ "tcp": { "port": 80 } })
    );
}

#[test]
fn bad_flags_are_refused_before_any_request() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "img", "--health-http", "bad"], "PATH:PORT"),
        (&["run", "img", "--health-http", "/x:99999"], "not a port"),
        (&["run", "img", "--health-tcp", "0"], "not a port"),
        (&["run", "img", "--health-exec", "'open"], "unterminated"),
        (&["run", "img", "--health-exec", ""], "needs a program"),
        (
            &["run", "img", "--health-tcp", "80", "--health-exec", "true"],
            "cannot be used with",
        ),
        (&["run", "img", "--health-interval", "5s"], "--health-"),
        (
            &["run", "img", "--health-tcp", "80", "--health-interval", "5"],
            "missing unit",
        ),
        (
            &["run", "img", "--health-tcp", "80", "--health-retries", "0"],
            "--health-retries",
        ),
        (&["run", "img", "--stop-signal", "SIG TERM"], "not a signal"),
        (
            &["run", "img", "--stop-timeout", "forever"],
            "not a duration",
        ),
        (&["run", "img", "--memory", "4XB"], "--memory"),
        (&["run", "img", "--cpu", "0"], "--cpu"),
        (&["update", "web", "--cpu", "lots"], "--cpu"),
        (
            &["update", "web", "--env", "A=1", "--clear-env"],
            "cannot be used with",
        ),
        (
            &["update", "web", "--image", "x", "--timeout", "5s"],
            "--wait",
        ),
        (
            &["update", "web", "--max-unavailable", "0", "--image", "x"],
            "--max-unavailable",
        ),
        (&["rollback", "web", "--revision", "0"], "--revision"),
        (&["stop"], "CONTAINER"),
        (&["top", "--interval", "2"], "missing unit"),
    ];
    for (args, want) in cases {
        let message = refused(args);
        assert!(message.contains(want), "{args:?}: {message}");
    }
    // Checked by the command before it resolves the container name.
    let e = lifecycle::update_body(&update_args(&["web", "--env", "FOO"])).expect_err("FOO");
    assert!(e.to_string().contains("invalid --env \"FOO\""), "{e}");
    let e = lifecycle::update_body(&update_args(&["web"])).expect_err("empty update");
    assert!(e.to_string().starts_with("nothing to update"), "{e}");
    let e = lifecycle::update_body(&update_args(&["web", "--max-unavailable", "2"]))
        .expect_err("only max-unavailable");
    assert!(e.to_string().starts_with("nothing to update"), "{e}");
}

#[test]
fn update_sends_only_what_was_given() {
    let body = |args: &[&str]| lifecycle::update_body(&update_args(args)).expect("body");
    assert_eq!(
        body(&["web", "--image", "reg/app:v2"]),
        json!({ "image": "reg/app:v2" })
    );
    assert_eq!(
        body(&[
            "web",
            "--cpu",
            "0.2",
            "--memory",
            "128MiB",
            "-e",
            "A=1",
            "--env",
            "B=2",
            "--max-unavailable",
            "2"
        ]),
        json!({ "cpu": "0.2", "memory": "128MiB", "env": { "A": "1", "B": "2" }, "max_unavailable": 2 })
    );
    assert_eq!(body(&["web", "--clear-env"]), json!({ "env": {} }));
    assert_eq!(
        body(&["web", "--command", "--", "httpd", "-f", "-p", "80"]),
        json!({ "command": ["httpd", "-f", "-p", "80"] })
    );
    assert_eq!(
        body(&["web", "--", "httpd", "-f"]),
        json!({ "command": ["httpd", "-f"] })
    );
    assert_eq!(body(&["web", "--command"]), json!({ "command": [] }));
    let u = update_args(&["web", "--image", "x", "--wait", "--timeout", "2m"]);
    assert!(u.wait);
    assert_eq!(u.timeout.as_deref(), Some("2m"));
}

#[test]
fn lifecycle_and_observation_commands_parse() {
    match parse(&["stop", "web", "--instance", "ins-1"]).command {
        Command::Stop(t) => {
            assert_eq!(t.container, "web");
            assert_eq!(t.instance.as_deref(), Some("ins-1"));
        }
        _ => panic!("not stop"),
    }
    assert!(
        matches!(parse(&["start", "ctr-1"]).command, Command::Start(t) if t.instance.is_none())
    );
    assert!(matches!(
        parse(&["restart", "web"]).command,
        Command::Restart(_)
    ));
    assert!(matches!(
        parse(&["rollback", "web", "--revision", "2", "--wait"]).command,
        Command::Rollback(r) if r.revision == Some(2) && r.wait
    ));
    assert!(matches!(
        parse(&["revisions", "web"]).command,
        Command::Revisions { .. }
    ));
    assert!(matches!(
        parse(&["stats", "web"]).command,
        Command::Stats { .. }
    ));
    assert!(matches!(
        parse(&["top"]).command,
        Command::Top(t) if t.container.is_none() && !t.once && t.interval == "2s"
    ));
    assert!(matches!(
        parse(&["top", "web", "--once"]).command,
        Command::Top(t) if t.container.as_deref() == Some("web") && t.once
    ));
    match parse(&["logs", "-f", "--tail", "20", "web", "--instance", "ins-2"]).command {
        Command::Logs(l) => {
            assert!(l.follow);
            assert_eq!(l.tail, Some(20));
            assert_eq!(l.container, "web");
            assert_eq!(l.instance.as_deref(), Some("ins-2"));
        }
        _ => panic!("not logs"),
    }
    assert!(
        matches!(parse(&["logs", "web", "-n", "5"]).command, Command::Logs(l) if l.tail == Some(5) && !l.follow)
    );
    assert!(matches!(
        parse(&["events", "--since", "12-00ab", "--watch"]).command,
        Command::Events { since: Some(s), watch: true } if s == "12-00ab"
    ));
    assert!(matches!(
        parse(&["events"]).command,
        Command::Events {
            since: None,
            watch: false
        }
    ));
    assert!(matches!(
        parse(&["ps", "--watch"]).command,
        Command::Ps { watch: true }
    ));
    assert!(matches!(
        parse(&["ps"]).command,
        Command::Ps { watch: false }
    ));
}
