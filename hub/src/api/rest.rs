//! The REST API (axum). Bodies are parsed by hand ([`parse_body`]) so every input error is a 400 that
//! names the field; each handler is one call into [`Service`].

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::Instrument;

use super::rest_types::{
    ContainerJson, CreateContainerBody, CreateNetworkBody, LinkBody, NetworkJson, NodeJson,
    ScaleBody,
};
use super::{error_body, parse_body};
use crate::service::{Service, ServiceError, STATUS_DELETING, STATUS_DEPLOYING, STATUS_SCALING};

/// The REST router over `service`.
pub fn router(service: Service) -> Router {
    Router::new()
        .route("/v1/networks", post(create_network).get(list_networks))
        .route("/v1/networks/{id}", get(get_network).delete(delete_network))
        .route(
            "/v1/networks/{id}/links",
            post(link_networks).delete(unlink_networks_body),
        )
        .route("/v1/networks/{id}/links/{peer}", delete(unlink_networks))
        .route(
            "/v1/containers",
            post(create_container).get(list_containers),
        )
        .route(
            "/v1/containers/{id}",
            get(get_container).delete(delete_container),
        )
        .route("/v1/containers/{id}/scale", post(scale_container))
        .route("/v1/containers/{id}/stop", post(super::lifecycle::stop))
        .route("/v1/containers/{id}/start", post(super::lifecycle::start))
        .route(
            "/v1/containers/{id}/restart",
            post(super::lifecycle::restart),
        )
        .route("/v1/containers/{id}/update", post(super::lifecycle::update))
        .route(
            "/v1/containers/{id}/rollback",
            post(super::lifecycle::rollback),
        )
        .route(
            "/v1/containers/{id}/revisions",
            get(super::lifecycle::revisions),
        )
        .route("/v1/containers/{id}/logs", get(super::lifecycle::logs))
        .route("/v1/containers/{id}/stats", get(super::lifecycle::stats))
        .route(
            "/v1/containers/{id}/migrate",
            post(super::migrations::migrate),
        )
        .route("/v1/migrations", get(super::migrations::list))
        .route("/v1/migrations/{id}", get(super::migrations::get))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node))
        .route("/v1/nodes/{id}/drain", post(super::nodes::drain))
        .route("/v1/nodes/{id}/uncordon", post(super::nodes::uncordon))
        .route("/v1/events", get(super::events::get_events))
        .route("/metrics", get(crate::metrics::scrape))
        .fallback(not_found)
        // Request counts and latency by route template, never the raw path (`crate::metrics`).
        .layer(middleware::from_fn(crate::metrics::track_request))
        // One span per request, so every log line of a request carries its method and path.
        .layer(middleware::from_fn(trace_request))
        .with_state(service)
}

/// A service error as a REST response.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        (status, Json(error_body(&self.0))).into_response()
    }
}

/// What a REST handler returns.
pub type ApiResult = Result<Response, ApiError>;

async fn trace_request(req: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        container_id = tracing::field::Empty
    );
    async move {
        let started = std::time::Instant::now();
        let resp = next.run(req).await;
        tracing::info!(
            status = resp.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        resp
    }
    .instrument(span)
    .await
}

async fn not_found() -> ApiError {
    ApiError(ServiceError::NotFound("no such route".into()))
}

async fn create_network(State(svc): State<Service>, body: Bytes) -> ApiResult {
    let b: CreateNetworkBody = parse_body(&body)?;
    let net = svc.create_network(&b.name, &b.cidr, b.encrypted).await?;
    Ok((StatusCode::CREATED, Json(NetworkJson::from(net))).into_response())
}

async fn list_networks(State(svc): State<Service>) -> ApiResult {
    let nets: Vec<NetworkJson> = svc
        .list_networks()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(json!({ "networks": nets })).into_response())
}

async fn get_network(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(NetworkJson::from(svc.get_network(&id).await?)).into_response())
}

async fn delete_network(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    svc.delete_network(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn link_networks(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let b: LinkBody = parse_body(&body)?;
    let net = svc.link_networks(&id, &b.network_id).await?;
    Ok(Json(NetworkJson::from(net)).into_response())
}

/// `DELETE /v1/networks/{id}/links` with `{"network_id"}`, the mirror of the POST.
async fn unlink_networks_body(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let b: LinkBody = parse_body(&body)?;
    let net = svc.unlink_networks(&id, &b.network_id).await?;
    Ok(Json(NetworkJson::from(net)).into_response())
}

async fn unlink_networks(
    State(svc): State<Service>,
    Path((id, peer)): Path<(String, String)>,
) -> ApiResult {
    let net = svc.unlink_networks(&id, &peer).await?;
    Ok(Json(NetworkJson::from(net)).into_response())
}

async fn create_container(State(svc): State<Service>, body: Bytes) -> ApiResult {
    let b: CreateContainerBody = parse_body(&body)?;
    let id = svc.create_container(b.into()).await?;
    tracing::Span::current().record("container_id", id.as_str());
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "container_id": id, "status": STATUS_DEPLOYING })),
    )
        .into_response())
}

async fn list_containers(State(svc): State<Service>) -> ApiResult {
    let cs: Vec<ContainerJson> = svc
        .list_containers()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(json!({ "containers": cs })).into_response())
}

async fn get_container(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(ContainerJson::from(svc.get_container(&id).await?)).into_response())
}

async fn scale_container(
    State(svc): State<Service>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let b: ScaleBody = parse_body(&body)?;
    svc.scale_container(&id, b.replicas).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "status": STATUS_SCALING })),
    )
        .into_response())
}

async fn delete_container(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    svc.delete_container(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "status": STATUS_DELETING })),
    )
        .into_response())
}

async fn list_nodes(State(svc): State<Service>) -> ApiResult {
    let nodes: Vec<NodeJson> = svc
        .list_nodes()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(json!({ "nodes": nodes })).into_response())
}

async fn get_node(State(svc): State<Service>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(NodeJson::from(svc.get_node(&id).await?)).into_response())
}
