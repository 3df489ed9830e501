//! Long-lived HTTP answers read line by line: `GET /v1/events?watch=true` (NDJSON) and
//! `GET /v1/containers/{id}/logs?follow=true` (text), as `curl -N` would show them.
//!
//! A thread reads the body and hands each line over a channel, so a test can wait for a line with a
//! deadline. The thread ends when the server closes the stream (at the latest when the cluster's hub
//! stops) or when the test dropped the [`LineStream`] and the next line arrives.

use anyhow::{bail, Context};
use std::io::{BufRead, BufReader};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// An open streaming answer.
#[derive(Debug)]
pub struct LineStream {
    /// What was asked, for messages.
    what: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// `Content-Type` of the answer ("" when absent).
    pub content_type: String,
    lines: Receiver<std::io::Result<String>>,
    ended: bool,
}

impl LineStream {
    /// Sends `GET url` with no overall timeout and starts reading its body in the background.
    ///
    /// Returns once the status line and headers arrived: for the hub's event watch, that is after
    /// the watch started, so every later event is in the stream.
    pub fn open(url: &str) -> anyhow::Result<LineStream> {
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(None)
            .no_proxy()
            .build()?;
        let resp = http.get(url).send().with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("berth-tests-stream".into())
            .spawn(move || {
                for line in BufReader::new(resp).lines() {
                    let failed = line.is_err();
                    if tx.send(line).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(LineStream {
            what: format!("GET {url}"),
            status,
            content_type,
            lines: rx,
            ended: false,
        })
    }

    /// Fails unless the answer's status is `want` (then the body, read for up to 2 s, is the message).
    pub fn expect_status(mut self, want: u16) -> anyhow::Result<LineStream> {
        if self.status != want {
            let mut body = Vec::new();
            let until = Instant::now() + Duration::from_secs(2);
            while let Ok(Some(l)) = self.next_line(until.saturating_duration_since(Instant::now()))
            {
                body.push(l);
            }
            bail!(
                "{}: expected HTTP {want}, got {}: {}",
                self.what,
                self.status,
                body.join("\n")
            );
        }
        Ok(self)
    }

    /// The next line, waiting up to `timeout`: `Ok(None)` when none came in time or the stream ended
    /// ([`LineStream::ended`] tells which).
    pub fn next_line(&mut self, timeout: Duration) -> anyhow::Result<Option<String>> {
        if self.ended {
            return Ok(None);
        }
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(line)) => Ok(Some(line)),
            Ok(Err(e)) => {
                self.ended = true;
                Err(e).with_context(|| format!("reading {}", self.what))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                Ok(None)
            }
        }
    }

    /// Whether the server closed the stream.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Reads lines until `done(all lines so far)` says yes; returns them. Fails after `timeout`,
    /// showing the lines seen.
    pub fn read_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[String]) -> bool,
    ) -> anyhow::Result<Vec<String>> {
        let start = Instant::now();
        let mut seen: Vec<String> = Vec::new();
        loop {
            if done(&seen) {
                return Ok(seen);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() || self.ended {
                bail!(
                    "{what}: not seen within {timeout:?} on {} ({}; {} lines: {})",
                    self.what,
                    if self.ended { "stream ended" } else { "open" },
                    seen.len(),
                    seen.join("\n")
                );
            }
            if let Some(l) = self.next_line(left.min(Duration::from_millis(500)))? {
                seen.push(l);
            }
        }
    }
}
