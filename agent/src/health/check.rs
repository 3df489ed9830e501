//! One probe attempt of each kind, behind the [`Check`] trait so the prober's timing logic is
//! tested on fakes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::runtime::exec::{Exec, ExecStatus};

use super::spec::format_duration;

/// The future of one probe: `Ok(detail)` when healthy, `Err(reason)` when not.
pub type BoxCheckFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// One kind of probe. The prober calls [`Check::run`] at most once at a time per instance and
/// abandons (drops) the future after `timeout + grace()`.
pub trait Check: Send + Sync + 'static {
    /// Starts one probe that should finish within `timeout`.
    fn run(&self, timeout: Duration) -> BoxCheckFuture;

    /// Extra time past `timeout` before the prober drops the future: for checks that enforce the
    /// timeout themselves and need time to clean up (exec kills and reaps its process).
    fn grace(&self) -> Duration {
        Duration::ZERO
    }

    /// What the probe does, for reasons and logs (`http GET 10.0.0.5:8080/healthz`).
    fn describe(&self) -> String;
}

/// The longest HTTP response head read for the status line.
const STATUS_LINE_LIMIT: usize = 1024;

/// `GET path` over HTTP/1.0 to `addr`; healthy for a status in 200..=399.
#[derive(Debug, Clone)]
pub struct HttpCheck {
    addr: SocketAddr,
    path: String,
}

impl HttpCheck {
    /// A check of `http://addr{path}`; `path` must be validated (`ProbeSpec::validate`).
    pub fn new(addr: SocketAddr, path: String) -> Self {
        Self { addr, path }
    }
}

impl Check for HttpCheck {
    fn run(&self, _timeout: Duration) -> BoxCheckFuture {
        let (addr, path) = (self.addr, self.path.clone());
        Box::pin(async move {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            // HTTP/1.0 with `Connection: close`: one request, no chunking, no keep-alive to manage.
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: berth-probe\r\n\
                 Accept: */*\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send request: {e}"))?;
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 512];
            let line_end = loop {
                if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
                    break end;
                }
                if head.len() >= STATUS_LINE_LIMIT {
                    return Err("no status line in the first 1024 bytes".to_owned());
                }
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("read response: {e}"))?;
                if n == 0 {
                    if head.is_empty() {
                        return Err("connection closed without a response".to_owned());
                    }
                    break head.len();
                }
                head.extend_from_slice(&buf[..n]);
            };
            let line = String::from_utf8_lossy(&head[..line_end]);
            let status = parse_status_line(&line)
                .ok_or_else(|| format!("not an HTTP status line: {:?}", truncate(&line, 80)))?;
            if (200..=399).contains(&status) {
                Ok(format!("status {status}"))
            } else {
                Err(format!("status {status}"))
            }
        })
    }

    fn describe(&self) -> String {
        format!("http GET {}{}", self.addr, self.path)
    }
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// A TCP connect to `addr`; healthy when it is accepted.
#[derive(Debug, Clone)]
pub struct TcpCheck {
    addr: SocketAddr,
}

impl TcpCheck {
    /// A check of `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

impl Check for TcpCheck {
    fn run(&self, _timeout: Duration) -> BoxCheckFuture {
        let addr = self.addr;
        Box::pin(async move {
            TcpStream::connect(addr)
                .await
                .map(|_| "connected".to_owned())
                .map_err(|e| format!("connect: {e}"))
        })
    }

    fn describe(&self) -> String {
        format!("tcp {}", self.addr)
    }
}

/// A command run inside the container by the runtime's exec helper; healthy when it exits 0.
#[derive(Debug, Clone)]
pub struct ExecCheck {
    exec: Exec,
    state_dir: PathBuf,
    command: Vec<String>,
}

impl ExecCheck {
    /// A check running `command` in the container whose youki state is `state_dir`
    /// (`Runtime::state_dir(id)`).
    pub fn new(exec: Exec, state_dir: PathBuf, command: Vec<String>) -> Self {
        Self {
            exec,
            state_dir,
            command,
        }
    }
}

impl Check for ExecCheck {
    fn run(&self, timeout: Duration) -> BoxCheckFuture {
        let this = self.clone();
        Box::pin(async move {
            let out = this
                .exec
                .run(&this.state_dir, &this.command, timeout)
                .await
                .map_err(|e| e.to_string())?;
            let said = match out.output.trim() {
                "" => String::new(),
                text => format!(": {}", truncate(text, 200)),
            };
            match out.status {
                ExecStatus::Exited(0) => Ok(format!("exit code 0{said}")),
                ExecStatus::Exited(code) => Err(format!("exit code {code}{said}")),
                ExecStatus::Signaled(sig) => Err(format!("killed by signal {sig}{said}")),
                ExecStatus::TimedOut => Err(format!(
                    "timed out after {} (killed){said}",
                    format_duration(timeout)
                )),
            }
        })
    }

    fn grace(&self) -> Duration {
        // `Exec::run` enforces the timeout itself (the helper kills and reaps the command) and has
        // its own backstop; dropping it earlier would only cut that cleanup short.
        Duration::from_secs(10)
    }

    fn describe(&self) -> String {
        format!("exec {:?}", self.command)
    }
}

/// At most `max` characters of `text`, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line("HTTP/1.1 200"), Some(200));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line("HTTP/1.1 2000 OK"), None);
        assert_eq!(parse_status_line(""), None);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hi", 2), "hi");
    }
}
