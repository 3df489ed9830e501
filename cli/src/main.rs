//! `berth`: the operator's command line. Each command is one or two calls to the hub's REST API.
//!
//! Exit codes: 0 on success, 1 when the hub refused or could not be reached (`error: <message>` on stderr),
//! when a local check refused a flag value, or when `update --wait` saw the rollout rolled back; 2 for a
//! command line clap could not parse.

mod client;
mod events;
mod lifecycle;
mod logs;
mod migrate;
mod node;
mod output;
mod spec;
mod stats;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use client::Hub;
use lifecycle::Action;
use spec::{cpu_flag, memory_flag, parse_env, HealthArgs, StopArgs};

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
    Run(Box<RunArgs>),
    /// List containers.
    Ps {
        /// Redraw the list whenever something changes (until interrupted).
        #[arg(short, long)]
        watch: bool,
    },
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
    /// Drain a node (cordon it and move its instances away) or uncordon it.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Stop every replica (or one): the stop signal, then SIGKILL after the stop timeout.
    Stop(lifecycle::TargetArgs),
    /// Start the stopped replicas (or one) again.
    Start(lifecycle::TargetArgs),
    /// Stop and start every replica (or one).
    Restart(lifecycle::TargetArgs),
    /// Change a container's image, resources, env or command with a rolling update.
    Update(lifecycle::UpdateArgs),
    /// Return to an earlier revision (by default the one before the current one).
    Rollback(lifecycle::RollbackArgs),
    /// List a container's revisions, oldest first (the current one is marked *).
    Revisions {
        /// Container id or name.
        id: String,
    },
    /// Show each replica's cpu, memory and network use once.
    Stats {
        /// Container id or name.
        id: String,
    },
    /// Show each replica's cpu, memory and network use, refreshed (all containers by default).
    Top(stats::TopArgs),
    /// Print a replica's output.
    Logs(logs::LogsArgs),
    /// Move a running replica to another node without restarting it (live migration).
    Migrate(migrate::MigrateArgs),
    /// List migrations (newest first), or show one.
    Migrations {
        /// A migration id: show that job in full.
        id: Option<String>,
        /// Only this container's migrations (id or name).
        #[arg(long, conflicts_with = "id")]
        container: Option<String>,
    },
    /// Print cluster events: recent ones, or with --watch every new one as it happens.
    Events {
        /// Only events after this event id (`0`: every event the hub keeps).
        #[arg(long, value_name = "ID")]
        since: Option<String>,
        /// Keep printing events as they happen (until interrupted).
        #[arg(short, long)]
        watch: bool,
    },
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
    #[arg(long, value_parser = cpu_flag)]
    cpu: Option<String>,
    /// Memory per replica, like "64MiB", "512MB", "4GB".
    #[arg(long, value_parser = memory_flag)]
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
    #[command(flatten)]
    health: HealthArgs,
    #[command(flatten)]
    stop: StopArgs,
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; `Ok(false)` when it ran but the outcome was a failure (a rolled-back update).
async fn run(cli: Cli) -> Result<bool> {
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
        Command::Ps { watch: true } => events::ps_watch(&hub, &cli.hub).await?,
        Command::Ps { watch: false } => {
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
        Command::Node(command) => emit(&node::run(&hub, &command).await?)?,
        Command::Stop(args) => emit(&lifecycle::action(&hub, Action::Stop, &args).await?)?,
        Command::Start(args) => emit(&lifecycle::action(&hub, Action::Start, &args).await?)?,
        Command::Restart(args) => emit(&lifecycle::action(&hub, Action::Restart, &args).await?)?,
        Command::Update(args) => return lifecycle::update(&hub, &args).await,
        Command::Migrate(args) => return migrate::migrate(&hub, &args).await,
        Command::Migrations { id, container } => {
            return migrate::migrations(&hub, id.as_deref(), container.as_deref()).await
        }
        Command::Rollback(args) => return lifecycle::rollback(&hub, &args).await,
        Command::Revisions { id } => {
            let id = hub.container_id(&id).await?;
            let revisions = hub.revisions(&id).await?;
            emit(&output::revisions_table(
                &revisions,
                OffsetDateTime::now_utc(),
            ))?;
        }
        Command::Stats { id } => emit(&stats::stats(&hub, &id).await?)?,
        Command::Top(args) => stats::top(&hub, &args).await?,
        Command::Logs(args) => logs::run(&hub, &cli.hub, args).await?,
        Command::Events { since, watch: true } => events::events(&cli.hub, since).await?,
        Command::Events {
            since,
            watch: false,
        } => events::list(&hub, since).await?,
    }
    Ok(true)
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
        ("health", args.health.to_json()),
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
    args.stop.add_to(&mut body);
    Ok(Value::Object(body))
}

#[cfg(test)]
mod tests;
