//! `berth events` (follow the hub's event stream, one line per event) and `berth ps --watch` (the `ps`
//! table again whenever something changes). Both read `GET /v1/events?watch=true` (NDJSON) and, when
//! the connection drops, resume after the last event they saw, so nothing is missed or shown twice.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::client::{error_message, Hub};
use crate::output;

/// One event as the hub sends it (read leniently, like the other objects).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Event {
    pub event_id: String,
    pub time: String,
    pub kind: String,
    pub id: String,
    pub container_id: Option<String>,
    pub node_id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub status: Option<String>,
    pub reason: String,
}

/// One line of `berth events`: `TIME KIND ID TYPE [STATUS] [container=..] [node=..] [reason]`.
pub fn event_line(e: &Event) -> String {
    let mut line = format!("{} {:<9} {} {}", e.time, e.kind, e.id, e.event_type);
    if let Some(s) = e.status.as_deref().filter(|s| !s.is_empty()) {
        line.push(' ');
        line.push_str(s);
    }
    if let Some(c) = e.container_id.as_deref().filter(|c| !c.is_empty()) {
        if c != e.id {
            line.push_str(&format!(" container={c}"));
        }
    }
    if let Some(n) = e.node_id.as_deref().filter(|n| !n.is_empty()) {
        if n != e.id {
            line.push_str(&format!(" node={n}"));
        }
    }
    if !e.reason.is_empty() {
        line.push_str(&format!(" reason={:?}", e.reason));
    }
    line.push('\n');
    line
}

/// Splits a byte stream into lines, whatever the chunk boundaries.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Adds a chunk; returns the lines it completed (without the newline, empty lines skipped).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = vec![];
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                if !line.iter().all(u8::is_ascii_whitespace) {
                    lines.push(line);
                }
            } else {
                self.partial.push(b);
            }
        }
        lines
    }
}

/// A line of the stream: an event, or the hub's last word when the stream failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Event(Box<Event>),
    Error(String),
}

/// Decodes one NDJSON line.
pub fn decode_line(line: &[u8]) -> Result<Line> {
    let v: Value = serde_json::from_slice(line).with_context(|| {
        format!(
            "the hub sent an invalid event line: {}",
            String::from_utf8_lossy(line)
        )
    })?;
    if let Some(m) = v.pointer("/error/message").and_then(Value::as_str) {
        return Ok(Line::Error(m.to_owned()));
    }
    Ok(Line::Event(Box::new(serde_json::from_value(v)?)))
}

/// The URL of the watch stream after `since`.
fn watch_url(base: &str, since: Option<&str>) -> Result<Url> {
    let mut url = Url::parse(base).with_context(|| format!("invalid hub url {base:?}"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("invalid hub url {base:?}"))?
        .pop_if_empty()
        .extend(["v1", "events"]);
    url.query_pairs_mut().append_pair("watch", "true");
    if let Some(s) = since {
        url.query_pairs_mut().append_pair("since", s);
    }
    Ok(url)
}

/// Follows the event stream and calls `on_event` for each event, in order, until `on_event` returns
/// `false`. `on_connected` runs each time the stream is (re)established, before any event of it. A
/// refused or unreachable first connection is an error; later losses are retried, resuming after the
/// last event seen.
pub async fn follow(
    base: &str,
    since: Option<String>,
    mut on_connected: impl FnMut() -> Result<()>,
    mut on_event: impl FnMut(&Event) -> Result<bool>,
) -> Result<()> {
    let http = reqwest::Client::new();
    let mut since = since;
    let mut connected_once = false;
    let mut delay = Duration::from_millis(200);
    loop {
        let url = watch_url(base, since.as_deref())?;
        let lost = match http.get(url).send().await {
            Err(e) if !connected_once => {
                return Err(e).with_context(|| format!("cannot reach the hub at {base}"))
            }
            Err(e) => e.to_string(),
            Ok(resp) if !resp.status().is_success() => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                bail!("{}", error_message(status, &body));
            }
            Ok(mut resp) => {
                connected_once = true;
                delay = Duration::from_millis(200);
                on_connected()?;
                let mut lines = LineSplitter::default();
                loop {
                    match resp.chunk().await {
                        Ok(Some(chunk)) => {
                            for line in lines.push(&chunk) {
                                match decode_line(&line)? {
                                    Line::Event(e) => {
                                        if !e.event_id.is_empty() {
                                            since = Some(e.event_id.clone());
                                        }
                                        if !on_event(&e)? {
                                            return Ok(());
                                        }
                                    }
                                    Line::Error(m) => eprintln!("warning: event stream: {m}"),
                                }
                            }
                        }
                        Ok(None) => break "the hub closed the stream".to_owned(),
                        Err(e) => break e.to_string(),
                    }
                }
            }
        };
        eprintln!(
            "warning: event stream lost ({lost}), reconnecting in {} ms",
            delay.as_millis()
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Writes to stdout; `Ok(false)` when stdout is a closed pipe (`berth events | head`).
pub fn write_out(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `berth events --watch [--since ID]`: one line per event until interrupted. Without `--since`, only
/// events from now on; `--since 0` starts with every event the hub still keeps.
pub async fn events(base: &str, since: Option<String>) -> Result<()> {
    follow(base, since, || Ok(()), |e| write_out(&event_line(e))).await
}

/// One page of `GET /v1/events`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Page {
    /// Oldest first.
    pub events: Vec<Event>,
    /// More events follow this page (when read with `since`).
    pub more: bool,
    /// The `since` that continues right after this page.
    pub next: String,
}

/// `berth events [--since ID]` without `--watch`: the most recent events (the hub's default page), or
/// every event after `since`, page by page; then exits.
pub async fn list(hub: &Hub, since: Option<String>) -> Result<()> {
    let mut since = since;
    loop {
        let mut query = vec![];
        if let Some(s) = &since {
            query.push(("since", s.as_str()));
        }
        let raw = hub.get_query(&["v1", "events"], &query).await?;
        let page: Page = serde_json::from_value(raw).context("unexpected answer from the hub")?;
        let text: String = page.events.iter().map(event_line).collect();
        if !write_out(&text)? {
            return Ok(());
        }
        // Without `since` the hub pages backwards (the most recent N): one page is what was asked.
        if !page.more || since.is_none() || page.next.is_empty() || since == Some(page.next.clone())
        {
            return Ok(());
        }
        since = Some(page.next);
    }
}

/// `berth ps --watch`: the `ps` table now and again after every event (a burst of events redraws once
/// it has been read). On a terminal the screen is cleared before each table.
pub async fn ps_watch(hub: &Hub, base: &str) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    // The table is redrawn from a task, so a burst of events costs one `GET /v1/containers`: each
    // event only marks the table stale.
    let (stale_tx, mut stale_rx) = tokio::sync::watch::channel(());
    let redraw = async {
        loop {
            if stale_rx.changed().await.is_err() {
                return Ok::<(), anyhow::Error>(());
            }
            let containers = hub.containers().await?;
            let mut text = String::new();
            if tty {
                text.push_str("\x1b[H\x1b[2J");
            } else {
                text.push('\n');
            }
            text.push_str(&output::containers_table(
                &containers,
                OffsetDateTime::now_utc(),
            ));
            if !write_out(&text)? {
                return Ok(());
            }
        }
    };
    // (Re)connecting redraws too: what changed while disconnected shows.
    let follow = follow(
        base,
        None,
        || {
            stale_tx.send_replace(());
            Ok(())
        },
        |_| {
            stale_tx.send_replace(());
            Ok(true)
        },
    );
    tokio::select! {
        r = redraw => r,
        r = follow => r,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should point at the line
mod tests {
    use super::*;

    #[test]
    fn lines_survive_any_chunking() {
        let stream = b"{\"a\":1}\n{\"b\":2}\n\n{\"c\":3}\n";
        for split in 0..stream.len() {
            let mut s = LineSplitter::default();
            let mut got = s.push(&stream[..split]);
            got.extend(s.push(&stream[split..]));
            assert_eq!(
                got,
                vec![
                    b"{\"a\":1}".to_vec(),
                    b"{\"b\":2}".to_vec(),
                    b"{\"c\":3}".to_vec()
                ],
                "split at {split}"
            );
        }
        let mut s = LineSplitter::default();
        assert!(s.push(b"{\"partial\":").is_empty());
    }

    #[test]
    fn decodes_events_and_errors() {
        let line = br#"{"event_id":"7-00ab","time":"2026-11-26T10:00:00Z","kind":"instance","id":"ins-1","container_id":"ctr-1","node_id":"n1","type":"status","status":"RUNNING","reason":""}"#;
        let Line::Event(e) = decode_line(line).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(e.event_id, "7-00ab");
        assert_eq!(
            event_line(&e),
            "2026-11-26T10:00:00Z instance  ins-1 status RUNNING container=ctr-1 node=n1\n"
        );
        let err =
            decode_line(br#"{"error":{"code":"unavailable","message":"etcd down"}}"#).unwrap();
        assert_eq!(err, Line::Error("etcd down".into()));
        assert!(decode_line(b"not json").is_err());
    }

    #[test]
    fn node_lines_do_not_repeat_the_id() {
        let e = Event {
            time: "T".into(),
            kind: "node".into(),
            id: "n1".into(),
            node_id: Some("n1".into()),
            event_type: "down".into(),
            reason: "no heartbeat for 5s".into(),
            ..Event::default()
        };
        assert_eq!(
            event_line(&e),
            "T node      n1 down reason=\"no heartbeat for 5s\"\n"
        );
    }

    #[test]
    fn watch_urls() {
        assert_eq!(
            watch_url("http://h:1", None).unwrap().as_str(),
            "http://h:1/v1/events?watch=true"
        );
        assert_eq!(
            watch_url("http://h:1/", Some("12-00ab")).unwrap().as_str(),
            "http://h:1/v1/events?watch=true&since=12-00ab"
        );
    }
}
