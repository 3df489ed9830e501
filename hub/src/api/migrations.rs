//! REST handlers of live migrations: start one, follow it, list them.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::parse_body;
use super::rest::ApiResult;
use crate::service::migrations::MigrateSpec;
use crate::service::Service;

/// `POST /v1/containers/{id}/migrate` (the body is optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    /// Absent: the scheduler picks a node that fits.
    #[serde(default)]
    target_node: Option<String>,
    /// Needed only when the container has several replicas.
    #[serde(default)]
    instance_id: Option<String>,
    /// "auto" (default), "precopy" or "postcopy".
    #[serde(default)]
    mode: Option<String>,
}

/// `GET /v1/migrations?container=`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    container: Option<String>,
}

/// `POST /v1/containers/{id}/migrate` → 202 with the job (`IN_PROGRESS`).
pub async fn migrate(State(svc): State<Service>, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let b: MigrateBody = if body.iter().all(u8::is_ascii_whitespace) {
        MigrateBody::default()
    } else {
        parse_body(&body)?
    };
    let job = svc
        .migrate(MigrateSpec {
            container: id,
            instance_id: b.instance_id.unwrap_or_default(),
            target_node: b.target_node.unwrap_or_default(),
            mode: b.mode.unwrap_or_default(),
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// `GET /v1/migrations/{id}`
pub async fn get(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(svc.get_migration(&id).await?).into_response())
}

/// `GET /v1/migrations[?container=ID|NAME]`, newest first.
pub async fn list(State(svc): State<Service>, Query(q): Query<ListQuery>) -> ApiResult {
    let jobs = svc
        .list_migrations(q.container.as_deref().unwrap_or_default())
        .await?;
    Ok(Json(serde_json::json!({ "migrations": jobs })).into_response())
}
