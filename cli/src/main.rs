//! `berth`: the operator's command line. Each command is one or two calls to the hub's REST API.
//!
//! Exit codes: 0 on success, 1 when the hub refused or could not be reached (`error: <message>` on stderr),
//! 2 for a command line clap could not parse.

mod client;
mod output;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use client::Hub;

#[derive(Parser)]
#[command(name = "berth", version, about = "Run containers on a berth cluster")]
struct Cli {
    /// The hub's REST API.
    #[arg(
        long,
        global = true,
        env = "BERTH_HUB",
        default_value = "http://127.0.0.1:7080"
    )]
    hub: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list and remove networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Run a container: one or more replicas of an image.
    Run(RunArgs),
    /// List containers.
    Ps,
    /// Show a container and each of its replicas.
    Inspect {
        /// Container id or name.
        id: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Human)]
        output: Format,
    },
    /// Change how many replicas a container has.
    Scale {
        /// Container id or name.
        id: String,
        /// Desired replicas.
        replicas: u32,
    },
    /// Remove a container and every replica.
    Rm {
        /// Container id or name.
        id: String,
    },
    /// List nodes with their capacity.
    Nodes,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network.
    Create {
        /// Network name.
        name: String,
        /// IPv4 network, like 10.10.0.0/16.
        #[arg(long)]
        cidr: String,
        /// Encrypt node-to-node traffic of the network (WireGuard).
        #[arg(long)]
        encrypted: bool,
    },
    /// Let the instances of two networks reach each other.
    Link {
        /// Network id or name.
        network: String,
        /// The other network's id or name.
        peer: String,
    },
    /// Isolate two linked networks again.
    Unlink {
        /// Network id or name.
        network: String,
        /// The other network's id or name.
        peer: String,
    },
    /// List networks.
    Ls,
    /// Remove a network (refused while containers use it).
    Rm {
        /// Network id or name.
        id: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image reference, like registry:5000/demo/httpd:1.
    image: String,
    /// Cpu per replica: cores ("0.5", "2") or millicores ("500m").
    #[arg(long)]
    cpu: Option<String>,
    /// Memory per replica, like "64MiB", "512MB", "4GB".
    #[arg(long)]
    memory: Option<String>,
    /// How many replicas.
    #[arg(long)]
    replicas: Option<u32>,
    /// Network id or name.
    #[arg(long)]
    network: Option<String>,
    /// A unique, DNS-safe name.
    #[arg(long)]
    name: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// What to do when a replica's process exits: always (default), on-failure, never.
    #[arg(long = "restart", value_name = "POLICY")]
    restart: Option<String>,
    /// With `--restart on-failure`: restarts allowed per replica (0: no limit).
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Command and arguments, replacing the image's entrypoint and cmd.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Fields and a line per replica.
    Human,
    /// The hub's JSON, pretty-printed.
    Json,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let hub = Hub::new(&cli.hub)?;
    match cli.command {
        Command::Network(NetworkCommand::Create {
            name,
            cidr,
            encrypted,
        }) => {
            let body = json!({ "name": name, "cidr": cidr, "encrypted": encrypted });
            let created = hub
                .call(Method::POST, &["v1", "networks"], Some(&body))
                .await?;
            emit(&format!("{}\n", str_field(&created, "network_id")?))?;
        }
        Command::Network(NetworkCommand::Ls) => {
            let now = OffsetDateTime::now_utc();
            let rows: Vec<Vec<String>> = hub
                .networks()
                .await?
                .into_iter()
                .map(|n| {
                    let age = output::age_since(&n.created_at, now);
                    let encrypted = if n.encrypted { "yes" } else { "no" };
                    let links = if n.linked_network_ids.is_empty() {
                        "-".to_owned()
                    } else {
                        n.linked_network_ids.join(",")
                    };
                    vec![
                        n.network_id,
                        n.name,
                        n.cidr,
                        n.gateway,
                        encrypted.to_owned(),
                        links,
                        age,
                    ]
                })
                .collect();
            let header = [
                "NETWORK ID",
                "NAME",
                "CIDR",
                "GATEWAY",
                "ENCRYPTED",
                "LINKS",
                "AGE",
            ];
            emit(&output::table(&header, &rows))?;
        }
        Command::Network(NetworkCommand::Link { network, peer }) => {
            let id = hub.network_id(&network).await?;
            let body = json!({ "network_id": peer });
            hub.call(Method::POST, &["v1", "networks", &id, "links"], Some(&body))
                .await?;
            emit(&format!("{id}\n"))?;
        }
        Command::Network(NetworkCommand::Unlink { network, peer }) => {
            let id = hub.network_id(&network).await?;
            let body = json!({ "network_id": peer });
            hub.call(
                Method::DELETE,
                &["v1", "networks", &id, "links"],
                Some(&body),
            )
            .await?;
            emit(&format!("{id}\n"))?;
        }
        Command::Network(NetworkCommand::Rm { id }) => {
            let id = hub.network_id(&id).await?;
            hub.call(Method::DELETE, &["v1", "networks", &id], None)
                .await?;
            emit(&format!("{id}\n"))?;
        }
        Command::Run(args) => {
            let network_id = match &args.network {
                Some(n) => Some(hub.network_id(n).await?),
                None => None,
            };
            let body = run_body(&args, network_id)?;
            let accepted = hub
                .call(Method::POST, &["v1", "containers"], Some(&body))
                .await?;
            emit(&format!("{}\n", str_field(&accepted, "container_id")?))?;
        }
        Command::Ps => {
            let containers = hub.containers().await?;
            let now = OffsetDateTime::now_utc();
            emit(&output::containers_table(&containers, now))?;
        }
        Command::Inspect { id, output } => {
            let id = hub.container_id(&id).await?;
            let raw = hub.container(&id).await?;
            match output {
                Format::Json => emit(&format!("{}\n", serde_json::to_string_pretty(&raw)?))?,
                Format::Human => {
                    let container: client::Container = serde_json::from_value(raw)?;
                    let now = OffsetDateTime::now_utc();
                    emit(&output::container_details(&container, now))?;
                }
            }
        }
        Command::Scale { id, replicas } => {
            let id = hub.container_id(&id).await?;
            let body = json!({ "replicas": replicas });
            hub.call(
                Method::POST,
                &["v1", "containers", &id, "scale"],
                Some(&body),
            )
            .await?;
            emit(&format!("{id}\n"))?;
        }
        Command::Rm { id } => {
            let id = hub.container_id(&id).await?;
            hub.call(Method::DELETE, &["v1", "containers", &id], None)
                .await?;
            emit(&format!("{id}\n"))?;
        }
        Command::Nodes => {
            emit(&output::nodes_table(&hub.nodes().await?))?;
        }
    }
    Ok(())
}

/// Writes to stdout. A closed pipe (`berth ps | head -1`) ends the output quietly instead of panicking
/// like `print!` does.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A string field of a hub answer.
fn str_field<'a>(v: &'a Value, field: &str) -> Result<&'a str> {
    match v.get(field).and_then(Value::as_str) {
        Some(s) => Ok(s),
        None => bail!("unexpected answer from the hub: no {field:?} in {v}"),
    }
}

/// The `POST /v1/containers` body: only what was given, so the hub's defaults apply to the rest.
fn run_body(args: &RunArgs, network_id: Option<String>) -> Result<Value> {
    let mut body = Map::new();
    body.insert("image".into(), args.image.clone().into());
    let optional = [
        ("cpu", args.cpu.clone().map(Value::from)),
        ("memory", args.memory.clone().map(Value::from)),
        ("replicas", args.replicas.map(Value::from)),
        ("network_id", network_id.map(Value::from)),
        ("name", args.name.clone().map(Value::from)),
        ("restart_policy", args.restart.clone().map(Value::from)),
        ("max_restarts", args.max_restarts.map(Value::from)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            body.insert(key.into(), value);
        }
    }
    if !args.command.is_empty() {
        body.insert("command".into(), args.command.clone().into());
    }
    if !args.env.is_empty() {
        let env = parse_env(&args.env)?;
        body.insert("env".into(), serde_json::to_value(env)?);
    }
    Ok(Value::Object(body))
}

/// Parses `KEY=VALUE` pairs; the value may contain `=` and be empty, the key may not.
fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>> {
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
mod tests {
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
}
