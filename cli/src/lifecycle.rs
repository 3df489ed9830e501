//! `berth stop|start|restart`, `berth update` (a rolling update, optionally waited for), `berth
//! rollback` and `berth revisions`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_proto::duration;
use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::client::{Container, Hub};
use crate::spec::{cpu_flag, duration_flag, memory_flag, parse_env};

/// How often `--wait` looks at the container.
const POLL: Duration = Duration::from_millis(500);
/// Looks after which a rollout that never showed is taken as already over: the hub records it before
/// it answers 202, so only one that ended between the answer and the first look can stay unseen.
const SETTLE_POLLS: u32 = 3;

/// A container, or one of its replicas.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// Container id or name.
    pub container: String,
    /// Only this replica (an instance id from `berth inspect`).
    #[arg(long = "instance", value_name = "ID")]
    pub instance: Option<String>,
}

/// Flags of `berth update`.
#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// Container id or name.
    pub container: String,
    /// New image reference.
    #[arg(long)]
    pub image: Option<String>,
    /// New cpu per replica: cores ("0.5", "2") or millicores ("500m").
    #[arg(long, value_parser = cpu_flag)]
    pub cpu: Option<String>,
    /// New memory per replica, like "64MiB".
    #[arg(long, value_parser = memory_flag)]
    pub memory: Option<String>,
    /// Environment variable KEY=VALUE (repeatable); given, it replaces the whole environment.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Remove every environment variable.
    #[arg(long, conflicts_with = "env")]
    pub clear_env: bool,
    /// Replace the command with the words after `--` (`berth update web --command -- httpd -f`); with
    /// nothing after `--`, return to the image's entrypoint and cmd.
    #[arg(long)]
    pub command: bool,
    /// Most replicas down at once during the rollout (default 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unavailable: Option<u32>,
    /// Wait until the rollout ends; exit status 1 when it was rolled back.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (exit status 1).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag, requires = "wait")]
    pub timeout: Option<String>,
    /// The new command and arguments (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub args: Vec<String>,
}

/// Flags of `berth rollback`.
#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    /// Container id or name.
    pub container: String,
    /// The revision to return to (default: the one before the current one; see `berth revisions`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub revision: Option<u64>,
    /// Wait until the rollback ends; exit status 1 when it did not complete.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (exit status 1).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag, requires = "wait")]
    pub timeout: Option<String>,
}

/// `stop`, `start` or `restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Stop,
    Start,
    Restart,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Restart => "restart",
        }
    }
}

/// Where a rollout stands, as `--wait` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still going (or not visible yet); the text says how far.
    InProgress(String),
    /// Every replica runs the revision.
    Complete,
    /// The rollout failed and the container went back; the text says why.
    RolledBack(String),
}

/// The body of `POST /v1/containers/{id}/stop|start|restart`.
pub fn action_body(instance: Option<&str>) -> Value {
    match instance {
        Some(i) => json!({ "instance_id": i }),
        None => json!({}),
    }
}

/// The body of `POST /v1/containers/{id}/update`: only what was given. Refuses an update that changes
/// nothing.
pub fn update_body(args: &UpdateArgs) -> Result<Value> {
    let mut body = Map::new();
    if let Some(image) = &args.image {
        if image.trim().is_empty() {
            bail!("invalid --image: empty");
        }
        body.insert("image".into(), image.clone().into());
    }
    if let Some(cpu) = &args.cpu {
        body.insert("cpu".into(), cpu.clone().into());
    }
    if let Some(memory) = &args.memory {
        body.insert("memory".into(), memory.clone().into());
    }
    if !args.env.is_empty() {
        body.insert("env".into(), serde_json::to_value(parse_env(&args.env)?)?);
    } else if args.clear_env {
        body.insert("env".into(), json!({}));
    }
    if args.command || !args.args.is_empty() {
        body.insert("command".into(), args.args.clone().into());
    }
    if body.is_empty() {
        bail!("nothing to update: give --image, --cpu, --memory, --env, --clear-env or --command");
    }
    if let Some(n) = args.max_unavailable {
        body.insert("max_unavailable".into(), n.into());
    }
    Ok(Value::Object(body))
}

/// The body of `POST /v1/containers/{id}/rollback`.
pub fn rollback_body(revision: Option<u64>) -> Value {
    match revision {
        Some(r) => json!({ "revision": r }),
        None => json!({}),
    }
}

/// Replicas of `c` that run `revision` and are RUNNING, over the desired count: `"2/3"`.
fn ready_at(c: &Container, revision: u64) -> String {
    let ready = c
        .instances
        .iter()
        .filter(|i| i.revision == revision && i.status == "RUNNING")
        .count();
    format!("{ready}/{}", c.replicas)
}

/// Where the rollout of `revision` stands in `c`. `seen` says whether an earlier look saw it under
/// way: a rollout that ended between two looks is still told apart from one not started yet. For a
/// `rollback`, being back at `revision` is the success, whatever the hub calls the result.
pub fn rollout_outcome(c: &Container, revision: u64, seen: bool, rollback: bool) -> Outcome {
    if let Some(r) = &c.rollout {
        let mut text = format!(
            "{} to revision {}: {} replicas ready",
            r.state,
            r.revision,
            ready_at(c, r.revision)
        );
        if !r.reason.is_empty() {
            text.push_str(&format!(" ({})", r.reason));
        }
        return Outcome::InProgress(text);
    }
    let ended = |result: &str, reason: &str| {
        if result == "COMPLETE" || (rollback && c.revision == revision) {
            Outcome::Complete
        } else if reason.is_empty() {
            Outcome::RolledBack(format!("the rollout ended {result}"))
        } else {
            Outcome::RolledBack(reason.to_owned())
        }
    };
    match &c.last_rollout {
        Some(l) if l.revision == revision => ended(&l.result, &l.reason),
        // The rollout of `revision` ended, but the record names another revision (the one a
        // rollback returned to, or a newer update): judge by what runs now.
        Some(l) if seen => {
            if c.revision == revision && (l.result == "COMPLETE" || rollback) {
                Outcome::Complete
            } else {
                let why = if l.reason.is_empty() {
                    format!("the container is at revision {}", c.revision)
                } else {
                    l.reason.clone()
                };
                Outcome::RolledBack(why)
            }
        }
        None if seen => {
            if c.revision == revision {
                Outcome::Complete
            } else {
                Outcome::RolledBack(format!("the container is at revision {}", c.revision))
            }
        }
        _ => Outcome::InProgress(format!(
            "waiting for the rollout of revision {revision} to start"
        )),
    }
}

/// The line `--wait` ends with.
pub fn outcome_line(revision: u64, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Complete => format!("COMPLETE revision {revision}\n"),
        Outcome::RolledBack(why) => format!("ROLLED_BACK revision {revision}: {why}\n"),
        Outcome::InProgress(text) => format!("IN_PROGRESS revision {revision}: {text}\n"),
    }
}

/// `berth stop|start|restart`: prints `<id> <status>`.
pub async fn action(hub: &Hub, action: Action, args: &TargetArgs) -> Result<String> {
    let id = hub.container_id(&args.container).await?;
    let body = action_body(args.instance.as_deref());
    let answer = hub
        .call(
            Method::POST,
            &["v1", "containers", &id, action.path()],
            Some(&body),
        )
        .await?;
    let status = answer
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("accepted");
    Ok(match &args.instance {
        Some(i) => format!("{id} {i} {status}\n"),
        None => format!("{id} {status}\n"),
    })
}

/// The revision a 202 answer names.
fn answered_revision(answer: &Value) -> Result<u64> {
    answer
        .get("revision")
        .and_then(Value::as_u64)
        .with_context(|| format!("unexpected answer from the hub: no \"revision\" in {answer}"))
}

/// `berth update`: starts the rollout, prints `<id> UPDATING revision N`, and with `--wait` follows
/// it. Returns false when the rollout did not complete.
pub async fn update(hub: &Hub, args: &UpdateArgs) -> Result<bool> {
    let body = update_body(args)?;
    let timeout = parse_timeout(args.timeout.as_deref())?;
    let id = hub.container_id(&args.container).await?;
    let answer = hub
        .call(
            Method::POST,
            &["v1", "containers", &id, "update"],
            Some(&body),
        )
        .await?;
    started(hub, &id, &answer, false, args.wait, timeout).await
}

/// `berth rollback`: like `update`, towards an earlier revision.
pub async fn rollback(hub: &Hub, args: &RollbackArgs) -> Result<bool> {
    let timeout = parse_timeout(args.timeout.as_deref())?;
    let id = hub.container_id(&args.container).await?;
    let body = rollback_body(args.revision);
    let answer = hub
        .call(
            Method::POST,
            &["v1", "containers", &id, "rollback"],
            Some(&body),
        )
        .await?;
    started(hub, &id, &answer, true, args.wait, timeout).await
}

fn parse_timeout(text: Option<&str>) -> Result<Option<Duration>> {
    text.map(|t| duration::parse(t).context("invalid --timeout"))
        .transpose()
}

/// Reports an accepted rollout and, when asked, waits for its end.
async fn started(
    hub: &Hub,
    id: &str,
    answer: &Value,
    rollback: bool,
    wait: bool,
    timeout: Option<Duration>,
) -> Result<bool> {
    let revision = answered_revision(answer)?;
    let status = answer
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("accepted");
    crate::emit(&format!("{id} {status} revision {revision}\n"))?;
    if !wait {
        return Ok(true);
    }
    let outcome = wait_rollout(hub, id, revision, rollback, timeout).await?;
    crate::emit(&outcome_line(revision, &outcome))?;
    Ok(outcome == Outcome::Complete)
}

/// Polls the container until the rollout of `revision` ends (or `timeout` passes); progress goes to
/// stderr whenever it changes.
pub async fn wait_rollout(
    hub: &Hub,
    id: &str,
    revision: u64,
    rollback: bool,
    timeout: Option<Duration>,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut seen = false;
    let mut polls = 0;
    let mut last_progress = String::new();
    loop {
        let c = hub.container_view(id).await?;
        polls += 1;
        seen |= polls >= SETTLE_POLLS;
        seen |= c
            .rollout
            .as_ref()
            .is_some_and(|r| r.revision == revision || r.from_revision == revision);
        match rollout_outcome(&c, revision, seen, rollback) {
            Outcome::InProgress(text) => {
                if text != last_progress {
                    eprintln!("{text}");
                    last_progress = text;
                }
            }
            done => return Ok(done),
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            return Ok(Outcome::InProgress(format!(
                "still in progress after {}: {last_progress}",
                duration::format(start.elapsed())
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests;
