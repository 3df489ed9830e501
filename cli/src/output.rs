//! Turning hub objects into what a terminal shows: aligned tables, ages, ready counts, sizes.
//! Everything here is pure, so it is tested without a hub.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::client::{Container, ContainerStats, Health, InstanceStats, Node, Revision};

/// Shown in a cell that has nothing to show.
const NONE: &str = "-";

/// Renders rows under a header, columns separated by three spaces and padded to the widest cell; the
/// last column is not padded, so lines carry no trailing spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths
                    .get(i)
                    .map_or(0, |w| w.saturating_sub(cell.chars().count()));
                out.push_str(&" ".repeat(pad + 3));
            }
        }
        out.push('\n');
    }
    out
}

/// A duration in whole seconds as its largest unit, rounded down: `"5s"`, `"3m"`, `"2h"`, `"4d"`.
/// Negative durations (a clock ahead of ours) show as `"0s"`.
pub fn format_age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The age at `now` of an RFC 3339 timestamp, or `"-"` when there is none or it does not parse.
pub fn age_since(created_at: &str, now: OffsetDateTime) -> String {
    match OffsetDateTime::parse(created_at, &Rfc3339) {
        Ok(t) => format_age((now - t).whole_seconds()),
        Err(_) => NONE.to_owned(),
    }
}

/// Running instances over desired replicas: `"2/3"`.
pub fn ready(c: &Container) -> String {
    let running = c.instances.iter().filter(|i| i.status == "RUNNING").count();
    format!("{running}/{}", c.replicas)
}

/// The non-empty values, first occurrence only, comma-joined; `"-"` when there are none.
fn joined<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for v in values.filter(|v| !v.is_empty()) {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    if seen.is_empty() {
        NONE.to_owned()
    } else {
        seen.join(",")
    }
}

/// Fills an empty cell with `"-"`.
fn cell(s: &str) -> String {
    if s.is_empty() {
        NONE.to_owned()
    } else {
        s.to_owned()
    }
}

/// Bytes with a binary unit and at most one decimal, for reading not parsing: `"7.5GiB"`, `"64MiB"`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    format!("{}{}", text.trim_end_matches(".0"), UNITS[unit])
}

/// Cores with at most two decimals and no trailing zeros: `"2"`, `"1.5"`, `"0.33"`.
pub fn human_cpu(cores: f64) -> String {
    let text = format!("{cores:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The `berth ps` table.
pub fn containers_table(containers: &[Container], now: OffsetDateTime) -> String {
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|c| {
            vec![
                c.container_id.clone(),
                cell(&c.name),
                c.image.clone(),
                cell(&c.status),
                ready(c),
                cell(&c.service_ip),
                joined(c.instances.iter().map(|i| i.ip.as_str())),
                joined(c.instances.iter().map(|i| i.node_id.as_str())),
                age_since(&c.created_at, now),
            ]
        })
        .collect();
    table(
        &[
            "CONTAINER ID",
            "NAME",
            "IMAGE",
            "STATUS",
            "READY",
            "SERVICE IP",
            "IPS",
            "NODES",
            "AGE",
        ],
        &rows,
    )
}

/// The `berth nodes` table.
pub fn nodes_table(nodes: &[Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.node_id.clone(),
                cell(&n.hostname),
                cell(&n.ip),
                node_status(n),
                format!("{}/{}", human_cpu(n.cpu_available), human_cpu(n.cpu_total)),
                format!(
                    "{}/{}",
                    human_bytes(n.memory_available),
                    human_bytes(n.memory_total)
                ),
                n.instances.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NODE ID",
            "HOSTNAME",
            "IP",
            "STATUS",
            "CPU",
            "MEMORY",
            "INSTANCES",
        ],
        &rows,
    )
}

/// The node's health, with `SchedulingDisabled` when it is cordoned (as kubectl shows it).
fn node_status(n: &Node) -> String {
    if n.unschedulable {
        format!("{},SchedulingDisabled", cell(&n.status))
    } else {
        cell(&n.status)
    }
}

fn restart_cell(c: &Container) -> String {
    match (c.restart_policy.as_str(), c.max_restarts) {
        ("", _) => NONE.to_owned(),
        ("on-failure", n) if n > 0 => format!("on-failure (at most {n} restarts)"),
        (policy, _) => policy.to_owned(),
    }
}

/// The probe in one line: `http GET /healthz on port 8080, every 10s, timeout 1s, unhealthy after 3
/// failures, start period 0s`.
pub fn health_cell(h: &Health) -> String {
    let probe = if let Some(http) = &h.http {
        format!("http GET {} on port {}", http.path, http.port)
    } else if let Some(tcp) = &h.tcp {
        format!("tcp connect to port {}", tcp.port)
    } else if let Some(exec) = &h.exec {
        format!("exec {}", exec.command.join(" "))
    } else {
        "unknown probe".to_owned()
    };
    format!(
        "{probe}, every {}, timeout {}, unhealthy after {} failures, start period {}",
        cell(&h.interval),
        cell(&h.timeout),
        h.failure_threshold,
        cell(&h.start_period)
    )
}

/// How a stop goes: `SIGTERM, then SIGKILL after 10s`.
fn stop_cell(c: &Container) -> String {
    let signal = if c.stop_signal.is_empty() {
        "the image's stop signal (else SIGTERM)"
    } else {
        &c.stop_signal
    };
    let timeout = if c.stop_timeout.is_empty() {
        "10s"
    } else {
        &c.stop_timeout
    };
    format!("{signal}, then SIGKILL after {timeout}")
}

fn rollout_cell(c: &Container) -> String {
    let Some(r) = &c.rollout else {
        return NONE.to_owned();
    };
    let mut text = format!(
        "{} to revision {} from {}, at most {} unavailable",
        r.state, r.revision, r.from_revision, r.max_unavailable
    );
    if !r.started_at.is_empty() {
        text.push_str(&format!(", started {}", r.started_at));
    }
    if !r.reason.is_empty() {
        text.push_str(&format!(": {}", r.reason));
    }
    text
}

fn last_rollout_cell(c: &Container) -> String {
    let Some(l) = &c.last_rollout else {
        return NONE.to_owned();
    };
    let mut text = format!("revision {} {}", l.revision, l.result);
    if !l.finished_at.is_empty() {
        text.push_str(&format!(" at {}", l.finished_at));
    }
    if !l.reason.is_empty() {
        text.push_str(&format!(": {}", l.reason));
    }
    text
}

/// The human view of `berth inspect`: one field per line, then one line per instance.
pub fn container_details(c: &Container, now: OffsetDateTime) -> String {
    let command = if c.command.is_empty() {
        NONE.to_owned()
    } else {
        c.command.join(" ")
    };
    let env = if c.env.is_empty() {
        NONE.to_owned()
    } else {
        c.env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let created = if c.created_at.is_empty() {
        NONE.to_owned()
    } else {
        format!("{} ({} ago)", c.created_at, age_since(&c.created_at, now))
    };
    let fields = [
        ("Container ID", c.container_id.clone()),
        ("Name", cell(&c.name)),
        ("Image", c.image.clone()),
        ("Status", cell(&c.status)),
        ("Ready", ready(c)),
        ("Network", cell(&c.network_id)),
        ("Service IP", cell(&c.service_ip)),
        ("DNS name", cell(&c.dns_name)),
        ("Revision", c.revision.to_string()),
        ("Rollout", rollout_cell(c)),
        ("Last rollout", last_rollout_cell(c)),
        ("Restart", restart_cell(c)),
        (
            "Health",
            c.health.as_ref().map_or(NONE.to_owned(), health_cell),
        ),
        ("Stop", stop_cell(c)),
        ("CPU", cell(&c.cpu)),
        ("Memory", cell(&c.memory)),
        ("Command", command),
        ("Env", env),
        ("Created", created),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&format!("{:<14}{value}\n", format!("{name}:")));
    }
    out.push_str("Instances:\n");
    let rows: Vec<Vec<String>> = c
        .instances
        .iter()
        .map(|i| {
            vec![
                i.instance_id.clone(),
                cell(&i.node_id),
                cell(&i.ip),
                cell(&i.status),
                revision_cell(i.revision),
                i.restarts.to_string(),
                cell(&i.reason),
            ]
        })
        .collect();
    let instances = table(
        &[
            "INSTANCE ID",
            "NODE",
            "IP",
            "STATUS",
            "REVISION",
            "RESTARTS",
            "REASON",
        ],
        &rows,
    );
    for line in instances.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A revision number; 0 (not reported) shows as `"-"`.
fn revision_cell(revision: u64) -> String {
    if revision == 0 {
        NONE.to_owned()
    } else {
        revision.to_string()
    }
}

/// An image digest as people compare them: the first 12 hex digits, without `sha256:`.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    if hex.is_empty() {
        return NONE.to_owned();
    }
    hex.chars().take(12).collect()
}

/// The `berth revisions` table, oldest first; the current revision is marked `*`.
pub fn revisions_table(revisions: &[Revision], now: OffsetDateTime) -> String {
    let rows: Vec<Vec<String>> = revisions
        .iter()
        .map(|r| {
            let mark = if r.current { " *" } else { "" };
            let created = match age_since(&r.created_at, now).as_str() {
                NONE => NONE.to_owned(),
                age => format!("{age} ago"),
            };
            vec![
                format!("{}{mark}", r.revision),
                cell(&r.image),
                short_digest(&r.image_digest),
                cell(&r.cpu),
                cell(&r.memory),
                cell(&r.cause),
                created,
            ]
        })
        .collect();
    table(
        &[
            "REVISION", "IMAGE", "DIGEST", "CPU", "MEMORY", "CAUSE", "CREATED",
        ],
        &rows,
    )
}

/// The measured cells of one replica: CPU%, MEM/LIMIT, NET RX/TX; `"-"` when its node did not answer.
fn usage_cells(s: &InstanceStats) -> [String; 3] {
    if !s.error.is_empty() {
        return [NONE.to_owned(), NONE.to_owned(), NONE.to_owned()];
    }
    let limit = if s.memory_limit_bytes == 0 {
        NONE.to_owned()
    } else {
        human_bytes(s.memory_limit_bytes)
    };
    [
        format!("{:.2}%", s.cpu_percent),
        format!("{}/{limit}", human_bytes(s.memory_bytes)),
        format!("{}/{}", human_bytes(s.rx_bytes), human_bytes(s.tx_bytes)),
    ]
}

const STATS_HEADER: [&str; 7] = [
    "INSTANCE",
    "NODE",
    "STATUS",
    "CPU%",
    "MEM/LIMIT",
    "NET RX/TX",
    "RESTARTS",
];

fn stats_row(s: &InstanceStats) -> Vec<String> {
    let [cpu, mem, net] = usage_cells(s);
    vec![
        s.instance_id.clone(),
        cell(&s.node_id),
        cell(&s.status),
        cpu,
        mem,
        net,
        s.restarts.to_string(),
    ]
}

/// The replicas whose node did not answer, one line each.
fn stats_errors<'a>(stats: impl Iterator<Item = &'a InstanceStats>) -> String {
    stats
        .filter(|s| !s.error.is_empty())
        .map(|s| format!("{}: no stats: {}\n", s.instance_id, s.error))
        .collect()
}

/// The `berth stats` table: one row per replica, then why some had no numbers.
pub fn stats_table(stats: &ContainerStats) -> String {
    let rows: Vec<Vec<String>> = stats.instances.iter().map(stats_row).collect();
    let mut out = table(&STATS_HEADER, &rows);
    out.push_str(&stats_errors(stats.instances.iter()));
    out
}

/// One frame of `berth top`: a row per replica of each container (named by its name, else its id),
/// then the containers and replicas that had no numbers, and why.
pub fn top_frame(entries: &[(String, Result<ContainerStats, String>)]) -> String {
    let mut header = vec!["CONTAINER"];
    header.extend(STATS_HEADER);
    let mut rows = Vec::new();
    let mut notes = String::new();
    for (name, stats) in entries {
        match stats {
            Ok(stats) => {
                for s in &stats.instances {
                    let mut row = vec![name.clone()];
                    row.extend(stats_row(s));
                    rows.push(row);
                }
                notes.push_str(&stats_errors(stats.instances.iter()));
            }
            Err(e) => notes.push_str(&format!("{name}: no stats: {e}\n")),
        }
    }
    let mut out = table(&header, &rows);
    out.push_str(&notes);
    out
}

#[cfg(test)]
mod tests;
