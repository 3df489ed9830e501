//! `berth migrate` (start a live migration, optionally follow it to its end) and `berth migrations`
//! (list jobs, or show one).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use reqwest::Method;
use serde_json::{json, Map, Value};

use crate::client::Hub;
use crate::spec::duration_flag;

/// How often `--watch` looks at the job.
const POLL: Duration = Duration::from_millis(250);

/// Flags of `berth migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Container id or name.
    pub container: String,
    /// The node to move to (default: the scheduler picks one that fits).
    #[arg(long = "to", value_name = "NODE")]
    pub to: Option<String>,
    /// The replica to move (needed when the container has several; see `berth inspect`).
    #[arg(long = "instance", value_name = "ID")]
    pub instance: Option<String>,
    /// How memory moves: auto (default, pre-copy), precopy, postcopy (the container runs on the
    /// target once its non-memory state moved; its pages follow), or stopcopy (one dump of the
    /// frozen container, the baseline).
    #[arg(long, value_parser = ["auto", "precopy", "postcopy", "stopcopy"])]
    pub mode: Option<String>,
    /// Follow the job to its end (phase, rounds, bytes, then the downtime); exit status 1 when it
    /// failed.
    #[arg(short, long)]
    pub watch: bool,
    /// With --watch: give up after this long (exit status 1; the job goes on).
    #[arg(long, value_name = "DURATION", value_parser = duration_flag, requires = "watch")]
    pub timeout: Option<String>,
}

/// The body of `POST /v1/containers/{id}/migrate`.
pub fn migrate_body(args: &MigrateArgs) -> Value {
    let mut body = Map::new();
    if let Some(n) = &args.to {
        body.insert("target_node".into(), json!(n));
    }
    if let Some(i) = &args.instance {
        body.insert("instance_id".into(), json!(i));
    }
    if let Some(m) = &args.mode {
        body.insert("mode".into(), json!(m));
    }
    Value::Object(body)
}

/// One line about a job: where it stands and its figures so far.
pub fn progress_line(job: &Value) -> String {
    let s = |k: &str| job[k].as_str().unwrap_or_default().to_owned();
    let n = |k: &str| job[k].as_u64().unwrap_or(0);
    // What the source runs it as, and for `auto` the write rate that chose it.
    let how = match (s("chosen_mode"), job["write_rate_mib_s"].as_f64()) {
        (m, _) if m.is_empty() => String::new(),
        (m, Some(rate)) => format!(" ({m}, writes {rate:.1} MiB/s)"),
        (m, None) => format!(" ({m})"),
    };
    let mut line = format!(
        "{} {} → {}: {} {}{how}, round {}, {} pages, {}",
        s("migration_id"),
        s("source_node"),
        s("target_node"),
        s("status"),
        s("phase"),
        n("rounds"),
        n("pages_sent"),
        human_bytes(n("bytes_sent")),
    );
    if n("downtime_ms") > 0 {
        line.push_str(&format!(", downtime {} ms", n("downtime_ms")));
    }
    if !s("error").is_empty() {
        line.push_str(&format!(": {}", s("error")));
    }
    line
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `berth migrate`: starts the job; with --watch, prints each change until it ends.
pub async fn migrate(hub: &Hub, args: &MigrateArgs) -> Result<bool> {
    let job = hub
        .call(
            Method::POST,
            &["v1", "containers", &args.container, "migrate"],
            Some(&migrate_body(args)),
        )
        .await?;
    println!("{}", progress_line(&job));
    if !args.watch {
        return Ok(true);
    }
    let Some(id) = job["migration_id"].as_str().map(str::to_owned) else {
        bail!("the hub answered without a migration id: {job}");
    };
    let deadline = match &args.timeout {
        Some(t) => Some(Instant::now() + berth_proto::duration::parse(t)?),
        None => None,
    };
    let mut last = progress_line(&job);
    loop {
        tokio::time::sleep(POLL).await;
        let job = hub
            .call(Method::GET, &["v1", "migrations", &id], None)
            .await?;
        let line = progress_line(&job);
        if line != last {
            println!("{line}");
            last = line;
        }
        match job["status"].as_str() {
            Some("COMPLETED") => return Ok(true),
            Some("FAILED") => return Ok(false),
            _ => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("berth: still in progress; `berth migrations {id}` follows it");
            return Ok(false);
        }
    }
}

/// `berth migrations [ID | --container C]`: one job in full, or a line per job, newest first.
pub async fn migrations(hub: &Hub, id: Option<&str>, container: Option<&str>) -> Result<bool> {
    if let Some(id) = id {
        let job = hub
            .call(Method::GET, &["v1", "migrations", id], None)
            .await?;
        println!("{}", serde_json::to_string_pretty(&job)?);
        return Ok(true);
    }
    let query: Vec<(&str, &str)> = container.map(|c| ("container", c)).into_iter().collect();
    let list = hub.get_query(&["v1", "migrations"], &query).await?;
    let jobs = list["migrations"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        println!("no migrations");
    }
    for job in &jobs {
        println!("{}", progress_line(job));
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_body_carries_only_what_was_given() {
        let args = MigrateArgs {
            container: "web".into(),
            to: Some("n2".into()),
            instance: None,
            mode: Some("precopy".into()),
            watch: false,
            timeout: None,
        };
        assert_eq!(
            migrate_body(&args),
            json!({"target_node": "n2", "mode": "precopy"})
        );
    }

    #[test]
    fn progress_lines_show_the_figures_and_the_end() {
        let job = json!({
            "migration_id": "mig-1", "source_node": "n1", "target_node": "n2",
            "status": "COMPLETED", "phase": "DONE", "rounds": 3, "pages_sent": 1280,
            "bytes_sent": 5 * 1024 * 1024, "downtime_ms": 42, "error": ""
        });
        assert_eq!(
            progress_line(&job),
            "mig-1 n1 → n2: COMPLETED DONE, round 3, 1280 pages, 5.0 MiB, downtime 42 ms"
        );
        let auto = json!({
            "migration_id": "mig-3", "source_node": "n1", "target_node": "n2",
            "status": "IN_PROGRESS", "phase": "TRANSFER", "chosen_mode": "postcopy",
            "write_rate_mib_s": 3.06, "rounds": 1, "pages_sent": 0, "bytes_sent": 0
        });
        assert_eq!(
            progress_line(&auto),
            "mig-3 n1 → n2: IN_PROGRESS TRANSFER (postcopy, writes 3.1 MiB/s), round 1, 0 pages, 0 B"
        );
        let failed = json!({"migration_id": "mig-2", "status": "FAILED", "phase": "RESTORE",
            "error": "node n2: criu restore: exited 1"});
        assert!(progress_line(&failed).ends_with(": node n2: criu restore: exited 1"));
        assert_eq!(human_bytes(512), "512 B");
    }
}
