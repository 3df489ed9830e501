//! `GET /v1/containers/{id}/logs?instance_id=&follow=true&tail=N`: a replica's stdout and stderr,
//! proxied from the agent of the node it runs on (`GET /v1/instances/{instance_id}/logs` on the
//! agent's API). The hub keeps no log: it streams the agent's NDJSON through as it arrives, so
//! `follow` works end to end and a client that goes away closes the agent connection too.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error_body;
use crate::service::ServiceError;

/// How long connecting to an agent may take before the request fails (a follow then has no overall
/// deadline).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The route's query string as sent (strings, so every bad value becomes a 400 naming it).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct LogsQuery {
    /// Which replica; the caller picks one when absent.
    pub instance_id: Option<String>,
    /// `true` keeps the answer open for new lines.
    pub follow: Option<String>,
    /// Only the last N lines (then, with `follow`, what comes next).
    pub tail: Option<String>,
}

/// A validated logs request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsRequest {
    /// A well-formed instance id, if one was asked for.
    pub instance_id: Option<String>,
    /// Keep streaming.
    pub follow: bool,
    /// Last N lines; `None` = everything still on the node.
    pub tail: Option<u64>,
}

impl LogsQuery {
    /// Checks every parameter; the error names the bad one.
    pub fn parse(self) -> Result<LogsRequest, ServiceError> {
        let instance_id = match self.instance_id.filter(|i| !i.is_empty()) {
            Some(id) if !valid_instance_id(&id) => {
                return Err(ServiceError::invalid(
                    "instance_id",
                    format!("{id:?}: expected ins- and 12 hex digits"),
                ))
            }
            other => other,
        };
        let follow = match self.follow.as_deref() {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") | Some("") => true,
            Some(other) => {
                return Err(ServiceError::invalid(
                    "follow",
                    format!("{other:?}: expected true or false"),
                ))
            }
        };
        let tail = match self.tail.as_deref() {
            None | Some("") | Some("all") => None,
            Some(n) => Some(n.parse::<u64>().map_err(|_| {
                ServiceError::invalid("tail", format!("{n:?}: expected a number of lines"))
            })?),
        };
        Ok(LogsRequest {
            instance_id,
            follow,
            tail,
        })
    }
}

/// Whether `id` looks like an instance id (`ins-` + 12 lower-case hex), the only thing put into
/// the agent URL's path.
pub fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("ins-").is_some_and(|hex| {
        hex.len() == 12
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

pub(crate) fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_default()
    })
}

/// Streams instance `instance_id`'s logs from the agent whose API listens on `agent_api`
/// (`HOST:PORT` or `http://HOST:PORT`, as the agent registered it). The agent's answer is passed
/// through: NDJSON lines on success, its JSON error (400, 404) otherwise; an unreachable agent is
/// a 503.
pub async fn proxy_logs(agent_api: &str, instance_id: &str, req: &LogsRequest) -> Response {
    if !valid_instance_id(instance_id) {
        return service_error(ServiceError::invalid(
            "instance_id",
            format!("{instance_id:?}: expected ins- and 12 hex digits"),
        ));
    }
    let base = if agent_api.contains("://") {
        agent_api.trim_end_matches('/').to_owned()
    } else {
        format!("http://{agent_api}")
    };
    let mut url = format!(
        "{base}/v1/instances/{instance_id}/logs?follow={}",
        req.follow
    );
    if let Some(n) = req.tail {
        url.push_str(&format!("&tail={n}"));
    }
    let answer = match client().get(&url).send().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(agent_api, instance_id, error = %e, "agent unreachable for logs");
            return service_error(ServiceError::Unavailable(format!(
                "the agent at {agent_api} holding instance {instance_id} is unreachable: {e}"
            )));
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if !status.is_success() {
        let body = answer.bytes().await.unwrap_or_default();
        return (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(body),
        )
            .into_response();
    }
    let chunks = futures::stream::unfold(Some(answer), |answer| async move {
        let mut answer = answer?;
        match answer.chunk().await {
            Ok(Some(bytes)) => Some((Ok::<Bytes, std::io::Error>(bytes), Some(answer))),
            Ok(None) => None,
            // Ends the response abruptly, so the client sees a broken stream, not a clean end.
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(chunks),
    )
        .into_response()
}

fn service_error(e: ServiceError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(error_body(&e))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path, RawQuery};
    use axum::routing::get;
    use axum::Router;
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};
    use tokio::sync::Notify;

    const ID: &str = "ins-0123456789ab";

    /// A fake agent on loopback: `ID` streams one line, waits for `more`, sends a second and ends;
    /// other ids are 404. Records each query string it got.
    async fn fake_agent(more: Arc<Notify>, seen: Arc<Mutex<Vec<String>>>) -> String {
        let app = Router::new().route(
            "/v1/instances/{id}/logs",
            get(move |Path(id): Path<String>, RawQuery(q): RawQuery| {
                let more = more.clone();
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(q.unwrap_or_default());
                    if id != ID {
                        let body = serde_json::json!({"error": {"code": "not_found", "message": format!("no instance {id} on this node")}});
                        return (StatusCode::NOT_FOUND, Json(body)).into_response();
                    }
                    let lines = futures::stream::unfold(0, move |n| {
                        let more = more.clone();
                        async move {
                            match n {
                                0 => Some((Ok::<_, std::io::Error>(Bytes::from("{\"time\":\"t1\",\"stream\":\"stdout\",\"line\":\"one\"}\n")), 1)),
                                1 => {
                                    more.notified().await;
                                    Some((Ok(Bytes::from("{\"time\":\"t2\",\"stream\":\"stderr\",\"line\":\"two\"}\n")), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    Body::from_stream(lines).into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr.to_string()
    }

    fn request(follow: bool, tail: Option<u64>) -> LogsRequest {
        LogsRequest {
            instance_id: Some(ID.into()),
            follow,
            tail,
        }
    }

    #[tokio::test]
    async fn streams_the_agents_lines_as_they_come() {
        let more = Arc::new(Notify::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let agent = fake_agent(more.clone(), seen.clone()).await;
        let resp = proxy_logs(&agent, ID, &request(true, Some(5))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        let mut body = resp.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&first).unwrap().contains("\"one\""));
        // The second line exists only after we ask for it: the proxy did not wait for the end.
        more.notify_one();
        let mut rest = Vec::new();
        while let Some(chunk) = body.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert!(String::from_utf8(rest).unwrap().contains("\"two\""));
        assert_eq!(seen.lock().unwrap().as_slice(), ["follow=true&tail=5"]);

        // With an http:// base and no tail.
        let more2 = Arc::new(Notify::new());
        more2.notify_one();
        let agent2 = fake_agent(more2, seen.clone()).await;
        let resp = proxy_logs(&format!("http://{agent2}/"), ID, &request(false, None)).await;
        let all = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(all.iter().filter(|&&b| b == b'\n').count(), 2);
        assert_eq!(seen.lock().unwrap().last().unwrap(), "follow=false");
    }

    #[tokio::test]
    async fn agent_errors_pass_through_and_unreachable_is_503() {
        let agent = fake_agent(Arc::new(Notify::new()), Default::default()).await;
        let resp = proxy_logs(&agent, "ins-ffffffffffff", &request(false, None)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found");

        // A port nothing listens on any more.
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap().to_string();
        drop(gone);
        let resp = proxy_logs(&addr, ID, &request(false, None)).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);

        // Never a path outside the instance route.
        let resp = proxy_logs(&agent, "../../x", &request(false, None)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn query_parameters_are_validated() {
        let q = |i: Option<&str>, f: Option<&str>, t: Option<&str>| LogsQuery {
            instance_id: i.map(Into::into),
            follow: f.map(Into::into),
            tail: t.map(Into::into),
        };
        assert_eq!(
            q(Some(ID), Some("true"), Some("10")).parse().unwrap(),
            LogsRequest {
                instance_id: Some(ID.into()),
                follow: true,
                tail: Some(10)
            }
        );
        assert_eq!(
            q(Some(""), None, None).parse().unwrap(),
            LogsRequest {
                instance_id: None,
                follow: false,
                tail: None
            }
        );
        for (bad, field) in [
            (q(Some("ins-XYZ"), None, None), "instance_id"),
            (q(None, Some("yes"), None), "follow"),
            (q(None, None, Some("-3")), "tail"),
        ] {
            match bad.parse() {
                Err(ServiceError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
