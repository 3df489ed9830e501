//! The agent's small HTTP API (axum): an instance's logs and stats, which the hub proxies.
//!
//! `GET /v1/instances/{instance_id}/logs?follow=true&tail=N` answers NDJSON, one
//! `{"time","stream","line"}` object per line (plus `"partial":true` for output that had no
//! newline yet). Without `tail` every line still on disk is sent; with `follow` the answer stays
//! open and new lines arrive as the container writes them, until the instance is removed, the
//! client goes away or the agent shuts down. Errors are `{"error":{"code","message"}}`, as the
//! hub's: 400 for a malformed id or parameter, 404 for an instance this node has no logs of.
//!
//! `GET /v1/instances/{instance_id}/stats` answers one [`InstanceStats`] object: `{"instance_id",
//! "status", "cpu_percent", "cpu_seconds", "memory_bytes", "memory_limit_bytes", "rx_bytes",
//! "tx_bytes", "rx_packets", "tx_packets", "restarts"}`, `cpu_percent` measured over a short
//! window (250 ms) between two reads of the cgroup's CPU counter, in percent of one core. 404 for
//! an instance the node's board does not know, 503 when the API was started without stats.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use tokio::sync::watch;

use crate::logs::{self, FollowFrom, LogLine};
use crate::metrics::board::DEFAULT_CPU_WINDOW;
use crate::metrics::{BoardSource, InstanceStats};

/// Port of `--listen-api` when only the address is defaulted (the advertise IP).
pub const DEFAULT_PORT: u16 = 9750;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listen address could not be bound.
    #[error("bind agent api on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("agent api: {0}")]
    Serve(#[source] std::io::Error),
}

/// What the API serves: the logs under an instances dir, and optionally the instances' stats.
#[derive(Debug, Clone)]
pub struct AgentApi {
    instances_dir: PathBuf,
    stats: Option<Arc<BoardSource>>,
    cpu_window: Duration,
}

impl AgentApi {
    /// Logs of the instances under `instances_dir` (`<data dir>/instances`); no stats.
    pub fn new(instances_dir: PathBuf) -> Self {
        Self {
            instances_dir,
            stats: None,
            cpu_window: DEFAULT_CPU_WINDOW,
        }
    }

    /// Also serves `GET /v1/instances/{id}/stats` from `source`.
    pub fn with_stats(mut self, source: Arc<BoardSource>) -> Self {
        self.stats = Some(source);
        self
    }

    /// How long a stats request watches the CPU counter (default 250 ms).
    pub fn with_cpu_window(mut self, window: Duration) -> Self {
        self.cpu_window = window;
        self
    }

    /// Serves on a bound listener until `shutdown` completes; open log follows end then.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ApiError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let app = router(self, stop_rx);
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "agent api listening");
        }
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            })
            .await
            .map_err(ApiError::Serve)
    }
}

#[derive(Clone)]
struct AppState {
    instances_dir: PathBuf,
    stats: Option<Arc<BoardSource>>,
    cpu_window: Duration,
    /// Becomes true at shutdown: open follow streams end, so the graceful shutdown can finish.
    shutdown: watch::Receiver<bool>,
}

/// Query parameters of the logs route, as strings so a bad value is a JSON 400 naming it.
#[derive(Debug, Default, serde::Deserialize)]
struct LogsParams {
    follow: Option<String>,
    tail: Option<String>,
}

/// Binds `addr` and serves the API for the instances under `instances_dir`
/// (`<data dir>/instances`) until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    instances_dir: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })?;
    serve_on(listener, instances_dir, shutdown).await
}

/// [`serve`] on an already bound listener (tests bind port 0 and read the address first).
/// Logs only: [`AgentApi::with_stats`] adds the stats.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    instances_dir: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    AgentApi::new(instances_dir).serve(listener, shutdown).await
}

fn router(api: AgentApi, shutdown: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/v1/instances/{instance_id}/logs", get(instance_logs))
        .route("/v1/instances/{instance_id}/stats", get(instance_stats))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(AppState {
            instances_dir: api.instances_dir,
            stats: api.stats,
            cpu_window: api.cpu_window,
            shutdown,
        })
}

/// Whether `id` is an instance id: `ins-` and 12 lower-case hex digits. Nothing else is ever
/// joined to a path.
pub fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("ins-").is_some_and(|hex| {
        hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, Json(body)).into_response()
}

async fn instance_logs(
    State(state): State<AppState>,
    Path(instance_id): Path<String>,
    params: Result<Query<LogsParams>, QueryRejection>,
) -> Response {
    let params = match params {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_argument", e.body_text()),
    };
    if !valid_instance_id(&instance_id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("instance_id {instance_id:?}: expected ins- and 12 hex digits"),
        );
    }
    let follow = match params.follow.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("follow {other:?}: expected true or false"),
            )
        }
    };
    let tail = match params.tail.as_deref() {
        None | Some("all") => None,
        Some(n) => match n.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    format!("tail {n:?}: expected a number of lines"),
                )
            }
        },
    };
    let dir = state.instances_dir.join(&instance_id);
    let from = tail.map_or(FollowFrom::Beginning, FollowFrom::Tail);
    let opened = if follow {
        logs::follow(dir, from).await.map(|s| s.boxed())
    } else {
        logs::lines(dir, from).await.map(|s| s.boxed())
    };
    let lines = match opened {
        Ok(lines) => lines,
        Err(logs::LogError::NotFound { .. }) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no instance {instance_id} on this node"),
            )
        }
        Err(e) => {
            tracing::warn!(instance_id, error = %e, "reading logs failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
        }
    };
    tracing::debug!(instance_id, follow, ?tail, "streaming logs");
    let mut stop = state.shutdown.clone();
    let body = lines
        .take_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .map(|line| Ok::<_, std::convert::Infallible>(ndjson(&line)));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response()
}

async fn instance_stats(
    State(state): State<AppState>,
    Path(instance_id): Path<String>,
) -> Response {
    if !valid_instance_id(&instance_id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("instance_id {instance_id:?}: expected ins- and 12 hex digits"),
        );
    }
    let Some(source) = &state.stats else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this agent serves no stats",
        );
    };
    let stats: Option<InstanceStats> = source.stats(&instance_id, state.cpu_window).await;
    match stats {
        Some(s) => Json(s).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no instance {instance_id} on this node"),
        ),
    }
}

fn ndjson(line: &LogLine) -> Bytes {
    // A LogLine is strings and an enum: serialising it cannot fail.
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
