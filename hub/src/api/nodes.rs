//! REST handlers that change a node: drain (cordon and send its instances away) and uncordon.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::parse_body;
use super::rest::ApiResult;
use super::rest_types::NodeJson;
use crate::service::Service;
use berth_proto::v1;

/// `POST /v1/nodes/{id}/drain` (the body is optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    /// Live-migrate the running instances (default: stop them there and place them elsewhere).
    #[serde(default)]
    live: bool,
}

/// An instance a drain sent away.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DrainedJson {
    /// The replica.
    pub instance_id: String,
    /// Its container.
    pub container_id: String,
    /// The job moving it (live drain).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub migration_id: String,
}

/// An instance a drain left where it is.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SkippedJson {
    /// The replica.
    pub instance_id: String,
    /// Why it stays (not running, already migrating, no node fits...).
    pub reason: String,
}

/// The answer to a drain.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DrainJson {
    /// The node.
    pub node_id: String,
    /// Always true: the node is cordoned.
    pub unschedulable: bool,
    /// Live drain: one job per running instance.
    pub migrations: Vec<DrainedJson>,
    /// Instances left where they are, with the reason.
    pub skipped: Vec<SkippedJson>,
    /// Non-live drain: instances stopped on the node, their replacements placed elsewhere.
    pub replaced: Vec<DrainedJson>,
}

impl From<v1::DrainNodeResponse> for DrainJson {
    fn from(r: v1::DrainNodeResponse) -> Self {
        let drained = |d: v1::DrainStarted| DrainedJson {
            instance_id: d.instance_id,
            container_id: d.container_id,
            migration_id: d.migration_id,
        };
        DrainJson {
            node_id: r.node_id,
            unschedulable: r.unschedulable,
            migrations: r.migrations.into_iter().map(drained).collect(),
            skipped: r
                .skipped
                .into_iter()
                .map(|s| SkippedJson {
                    instance_id: s.instance_id,
                    reason: s.reason,
                })
                .collect(),
            replaced: r.replaced.into_iter().map(drained).collect(),
        }
    }
}

/// `POST /v1/nodes/{id}/drain {"live"?}` → 202 with what was started and what was skipped.
pub async fn drain(State(svc): State<Service>, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let b: DrainBody = if body.iter().all(u8::is_ascii_whitespace) {
        DrainBody::default()
    } else {
        parse_body(&body)?
    };
    let answer = svc.drain_node(&id, b.live).await?;
    Ok((StatusCode::ACCEPTED, Json(DrainJson::from(answer))).into_response())
}

/// `POST /v1/nodes/{id}/uncordon` → 200 with the node.
pub async fn uncordon(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(NodeJson::from(svc.uncordon_node(&id).await?)).into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_answer_has_the_documented_shape() {
        let answer = v1::DrainNodeResponse {
            node_id: "n1".into(),
            unschedulable: true,
            migrations: vec![v1::DrainStarted {
                instance_id: "ins-1".into(),
                container_id: "ctr-1".into(),
                migration_id: "mig-1".into(),
            }],
            skipped: vec![v1::DrainSkipped {
                instance_id: "ins-2".into(),
                reason: "instance ins-2 is PENDING".into(),
            }],
            replaced: vec![],
        };
        assert_eq!(
            serde_json::to_value(DrainJson::from(answer)).unwrap(),
            json!({
                "node_id": "n1", "unschedulable": true,
                "migrations": [{"instance_id": "ins-1", "container_id": "ctr-1",
                                "migration_id": "mig-1"}],
                "skipped": [{"instance_id": "ins-2", "reason": "instance ins-2 is PENDING"}],
                "replaced": []
            })
        );
    }

    #[test]
    fn the_body_is_checked_field_by_field() {
        assert!(parse_body::<DrainBody>(br#"{"live":true}"#).unwrap().live);
        assert!(!parse_body::<DrainBody>(b"{}").unwrap().live);
        let e = parse_body::<DrainBody>(br#"{"live":"yes"}"#).unwrap_err();
        assert!(e.to_string().starts_with("live: "), "{e}");
        let e = parse_body::<DrainBody>(br#"{"lvie":true}"#).unwrap_err();
        assert!(e.to_string().starts_with("lvie: "), "{e}");
    }
}
