//! `berth logs <container> [--instance ID] [-f] [--tail N]`: a replica's output, streamed from the
//! hub (which proxies the node's agent). The container's stdout lines go to stdout and its stderr
//! lines to stderr, so redirections work as they would for the process itself.

use std::io::Write;

use anyhow::{bail, Context, Result};
use reqwest::Url;

use crate::client::{error_message, Hub};

/// Flags of `berth logs`.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// Container id or name.
    pub container: String,
    /// Which replica (an instance id from `berth inspect`); may be left out when there is one replica.
    #[arg(long = "instance", value_name = "ID")]
    pub instance: Option<String>,
    /// Keep printing new lines as the container writes them.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines (then, with -f, what comes next).
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<u64>,
}

/// One record of the NDJSON stream.
#[derive(serde::Deserialize)]
struct Record {
    stream: String,
    line: String,
    #[serde(default)]
    partial: bool,
}

/// Runs `berth logs` against the hub at `hub_url` (`hub` resolves a container name).
pub async fn run(hub: &Hub, hub_url: &str, args: LogsArgs) -> Result<()> {
    let id = hub.container_id(&args.container).await?;
    let url = logs_url(
        hub_url,
        &id,
        args.instance.as_deref(),
        args.follow,
        args.tail,
    )?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    stream(url, &mut stdout.lock(), &mut stderr.lock()).await
}

fn logs_url(
    hub_url: &str,
    container_id: &str,
    instance: Option<&str>,
    follow: bool,
    tail: Option<u64>,
) -> Result<Url> {
    let mut url = Url::parse(hub_url).with_context(|| format!("invalid hub url {hub_url:?}"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("invalid hub url {hub_url:?}"))?
        .pop_if_empty()
        .extend(["v1", "containers", container_id, "logs"]);
    {
        let mut q = url.query_pairs_mut();
        if let Some(i) = instance {
            q.append_pair("instance_id", i);
        }
        q.append_pair("follow", if follow { "true" } else { "false" });
        if let Some(n) = tail {
            q.append_pair("tail", &n.to_string());
        }
    }
    Ok(url)
}

/// Prints each line as it arrives; returns when the hub ends the stream.
async fn stream(url: Url, out: &mut impl Write, err: &mut impl Write) -> Result<()> {
    let base = url.origin().ascii_serialization();
    let mut answer = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {base}"))?;
    let status = answer.status();
    if !status.is_success() {
        let text = answer.text().await.unwrap_or_default();
        bail!("{}", error_message(status, &text));
    }
    // The hub relays the agent's NDJSON records; a plain-text answer is printed as it comes.
    let plain = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/plain"));
    let mut buf = Vec::new();
    while let Some(chunk) = answer.chunk().await.context("the log stream broke off")? {
        if plain {
            if !write_raw(&chunk, out)? {
                return Ok(());
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=nl).collect();
            if !print(&raw, out, err)? {
                // Our reader went away (`berth logs | head`): stop quietly.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Writes bytes of a plain-text log; false once the output is closed.
fn write_raw(bytes: &[u8], out: &mut impl Write) -> Result<bool> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing the log"),
    }
}

/// Writes one NDJSON record to `out` or `err`; false once the output is closed.
fn print(raw: &[u8], out: &mut impl Write, err: &mut impl Write) -> Result<bool> {
    let raw = raw.trim_ascii();
    if raw.is_empty() {
        return Ok(true);
    }
    let rec: Record = serde_json::from_slice(raw).with_context(|| {
        format!(
            "unexpected log record from the hub: {}",
            String::from_utf8_lossy(raw)
        )
    })?;
    let target: &mut dyn Write = if rec.stream == "stderr" { err } else { out };
    let written = (|| {
        target.write_all(rec.line.as_bytes())?;
        if !rec.partial {
            target.write_all(b"\n")?;
        }
        target.flush()
    })();
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing the log"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn urls_escape_and_carry_the_flags() {
        let u = logs_url(
            "http://h:7080",
            "ctr-1",
            Some("ins-0123456789ab"),
            true,
            Some(5),
        )
        .unwrap();
        assert_eq!(
            u.as_str(),
            "http://h:7080/v1/containers/ctr-1/logs?instance_id=ins-0123456789ab&follow=true&tail=5"
        );
        let u = logs_url("http://h:7080/", "a/b", None, false, None).unwrap();
        assert_eq!(
            u.as_str(),
            "http://h:7080/v1/containers/a%2Fb/logs?follow=false"
        );
    }

    #[test]
    fn records_go_to_their_stream() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for raw in [
            r#"{"time":"t","stream":"stdout","line":"hello"}"#,
            r#"{"time":"t","stream":"stderr","line":"oops"}"#,
            r#"{"time":"t","stream":"stdout","line":"prompt> ","partial":true}"#,
            "",
        ] {
            assert!(print(raw.as_bytes(), &mut out, &mut err).unwrap());
        }
        assert_eq!(String::from_utf8(out).unwrap(), "hello\nprompt> ");
        assert_eq!(String::from_utf8(err).unwrap(), "oops\n");
        assert!(print(b"not json", &mut Vec::new(), &mut Vec::new()).is_err());
    }

    /// A one-shot fake hub: answers the first request with `answer` and closes.
    async fn fake_hub(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = vec![0; 4096];
            let _ = sock.read(&mut req).await.unwrap();
            sock.write_all(answer.as_bytes()).await.unwrap();
            sock.shutdown().await.unwrap();
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn streams_lines_and_reports_hub_errors() {
        let hub = fake_hub(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n\
             {\"time\":\"t\",\"stream\":\"stdout\",\"line\":\"a\"}\n\
             {\"time\":\"t\",\"stream\":\"stderr\",\"line\":\"b\"}\n",
        )
        .await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let url = logs_url(&hub, "ctr-1", None, true, None).unwrap();
        stream(url, &mut out, &mut err).await.unwrap();
        assert_eq!(out, b"a\n");
        assert_eq!(err, b"b\n");

        let hub = fake_hub(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n\r\n\
             plain 1\nplain 2\n",
        )
        .await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let url = logs_url(&hub, "ctr-1", None, false, Some(2)).unwrap();
        stream(url, &mut out, &mut err).await.unwrap();
        assert_eq!(out, b"plain 1\nplain 2\n");
        assert!(err.is_empty());

        let body = r#"{"error":{"code":"not_found","message":"no instance ins-0123456789ab"}}"#;
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let hub = fake_hub(answer).await;
        let url = logs_url(&hub, "ctr-1", None, false, None).unwrap();
        let e = stream(url, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "no instance ins-0123456789ab");
    }
}
