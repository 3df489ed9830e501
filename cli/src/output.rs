//! Turning hub objects into what a terminal shows: aligned tables, ages, ready counts, sizes.
//! Everything here is pure, so it is tested without a hub.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::client::{Container, Node};

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
                cell(&n.status),
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

fn restart_cell(c: &Container) -> String {
    match (c.restart_policy.as_str(), c.max_restarts) {
        ("", _) => NONE.to_owned(),
        ("on-failure", n) if n > 0 => format!("on-failure (at most {n} restarts)"),
        (policy, _) => policy.to_owned(),
    }
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
        ("Restart", restart_cell(c)),
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
                i.restarts.to_string(),
                cell(&i.reason),
            ]
        })
        .collect();
    let instances = table(
        &["INSTANCE ID", "NODE", "IP", "STATUS", "RESTARTS", "REASON"],
        &rows,
    );
    for line in instances.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
