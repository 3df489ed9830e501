//! REST handlers of a container's life after its creation: stop/start/restart, rolling updates and
//! rollbacks, the revision history, and the per-replica views served by the nodes (logs, stats)
//! that the hub proxies.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::logs::{client, proxy_logs, valid_instance_id, LogsQuery};
use super::parse_body;
use super::rest::{ApiError, ApiResult};
use super::rest_types::{LifecycleBody, RevisionJson, RollbackBody, UpdateBody};
use crate::service::actions::Action;
use crate::service::endpoints::InstanceEndpoint;
use crate::service::Service;

/// How long the hub waits for one node's stats.
const STATS_TIMEOUT: Duration = Duration::from_secs(3);

/// An optional JSON body: empty means "all defaults".
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    Ok(parse_body(body)?)
}

fn accepted(body: serde_json::Value) -> ApiResult {
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `POST /v1/containers/{id}/stop`
pub async fn stop(svc: State<Service>, id: Path<String>, body: Bytes) -> ApiResult {
    act(svc, id, body, Action::Stop).await
}

/// `POST /v1/containers/{id}/start`
pub async fn start(svc: State<Service>, id: Path<String>, body: Bytes) -> ApiResult {
    act(svc, id, body, Action::Start).await
}

/// `POST /v1/containers/{id}/restart`
pub async fn restart(svc: State<Service>, id: Path<String>, body: Bytes) -> ApiResult {
    act(svc, id, body, Action::Restart).await
}

/// The three above: every replica, or the one the optional body names.
async fn act(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
    action: Action,
) -> ApiResult {
    let b: LifecycleBody = optional_body(&body)?;
    let status = svc.act(&id, b.instance_id.as_deref(), action).await?;
    accepted(json!({ "status": status }))
}

/// `POST /v1/containers/{id}/update`
pub async fn update(State(svc): State<Service>, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let b: UpdateBody = parse_body(&body)?;
    let (status, revision) = svc.update_container(&id, b.into()).await?;
    accepted(json!({ "status": status, "revision": revision }))
}

/// `POST /v1/containers/{id}/rollback`
pub async fn rollback(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let b: RollbackBody = optional_body(&body)?;
    let (status, revision) = svc.rollback_container(&id, b.revision).await?;
    accepted(json!({ "status": status, "revision": revision }))
}

/// `GET /v1/containers/{id}/revisions`
pub async fn revisions(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    let revisions: Vec<RevisionJson> = svc
        .list_revisions(&id)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(json!({ "revisions": revisions })).into_response())
}

/// `GET /v1/containers/{id}/logs?instance_id=&follow=&tail=`: streamed from the replica's node.
pub async fn logs(
    State(svc): State<Service>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult {
    let req = q.parse()?;
    let target = svc
        .instance_endpoint(&id, req.instance_id.as_deref())
        .await?;
    Ok(proxy_logs(&target.api_addr, &target.instance_id, &req).await)
}

/// What a node answers for one replica (`GET /v1/instances/{id}/stats` on its agent API).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceStats {
    /// The replica.
    #[serde(default)]
    pub instance_id: String,
    /// Its node (filled by the hub).
    #[serde(default)]
    pub node_id: String,
    /// Its status.
    #[serde(default)]
    pub status: String,
    /// CPU use over the last moment, in percent of one core.
    #[serde(default)]
    pub cpu_percent: f64,
    /// CPU time used since it started.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// Memory in use.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Memory limit (0: none).
    #[serde(default)]
    pub memory_limit_bytes: u64,
    /// Bytes received.
    #[serde(default)]
    pub rx_bytes: u64,
    /// Bytes sent.
    #[serde(default)]
    pub tx_bytes: u64,
    /// Packets received.
    #[serde(default)]
    pub rx_packets: u64,
    /// Packets sent.
    #[serde(default)]
    pub tx_packets: u64,
    /// Times its node restarted it.
    #[serde(default)]
    pub restarts: u32,
    /// Why there are no figures (node unreachable, not placed, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/containers/{id}/stats`: every replica's figures, asked of their nodes in parallel. A
/// node that does not answer gives an entry with `error`, never a failed request.
pub async fn stats(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    let (container_id, endpoints) = svc.instance_endpoints(&id).await?;
    let asks = endpoints.into_iter().map(instance_stats);
    let instances: Vec<InstanceStats> = futures::future::join_all(asks).await;
    Ok(Json(json!({ "container_id": container_id, "instances": instances })).into_response())
}

async fn instance_stats(e: InstanceEndpoint) -> InstanceStats {
    let failed = |why: String| InstanceStats {
        instance_id: e.instance_id.clone(),
        node_id: e.node_id.clone(),
        status: e.status.clone(),
        error: Some(why),
        ..InstanceStats::default()
    };
    if e.node_id.is_empty() {
        return failed("not placed on a node yet".to_owned());
    }
    if e.api_addr.is_empty() {
        return failed(format!("node {} serves no agent API", e.node_id));
    }
    if !valid_instance_id(&e.instance_id) {
        return failed("malformed instance id".to_owned());
    }
    let url = format!("http://{}/v1/instances/{}/stats", e.api_addr, e.instance_id);
    let answer = match client().get(&url).timeout(STATS_TIMEOUT).send().await {
        Ok(a) => a,
        Err(err) => return failed(format!("node {} unreachable: {err}", e.node_id)),
    };
    if !answer.status().is_success() {
        return failed(format!("node {} answered {}", e.node_id, answer.status()));
    }
    match answer.json::<InstanceStats>().await {
        Ok(mut s) => {
            s.instance_id = e.instance_id;
            s.node_id = e.node_id;
            if s.status.is_empty() {
                s.status = e.status;
            }
            s
        }
        Err(err) => failed(format!("node {} sent unreadable stats: {err}", e.node_id)),
    }
}
