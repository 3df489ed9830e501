//! `GET /v1/events`: a page of recent events, or with `watch=true` an NDJSON stream (one event per
//! line: the backlog after `since`, then live events).
//!
//! Query: `since` (an event id or a revision), `limit` (1..=1000, default 100; not with `watch`),
//! `watch` (`true`/`false`). Anything else, a repeated parameter or a bad value is a 400 naming it.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::rest::ApiError;
use crate::events::{self, Cursor, EventsError};
use crate::service::{Service, ServiceError};

/// Media type of the watch stream.
pub const NDJSON: &str = "application/x-ndjson";

/// The parsed query of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsQuery {
    /// Start after this position.
    pub since: Option<Cursor>,
    /// Page size (list only).
    pub limit: Option<usize>,
    /// Stream instead of a page.
    pub watch: bool,
}

/// Parses the query pairs strictly.
pub fn parse_query(pairs: &[(String, String)]) -> Result<EventsQuery, ServiceError> {
    let mut q = EventsQuery {
        since: None,
        limit: None,
        watch: false,
    };
    let mut seen: Vec<&str> = vec![];
    for (name, value) in pairs {
        if seen.contains(&name.as_str()) {
            return Err(ServiceError::invalid(name, "given more than once"));
        }
        seen.push(name);
        match name.as_str() {
            "since" => {
                q.since = Some(
                    Cursor::parse(value)
                        .map_err(|e| ServiceError::invalid("since", e.to_string()))?,
                );
            }
            "limit" => {
                let limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=events::MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ServiceError::invalid(
                            "limit",
                            format!(
                                "{value:?} is not a whole number from 1 to {}",
                                events::MAX_LIMIT
                            ),
                        )
                    })?;
                q.limit = Some(limit);
            }
            "watch" => {
                q.watch = match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ServiceError::invalid(
                            "watch",
                            format!("{value:?} is not true or false"),
                        ))
                    }
                };
            }
            other => {
                return Err(ServiceError::invalid(
                    other,
                    "unknown query parameter (expected since, limit, watch)",
                ))
            }
        }
    }
    if q.watch && q.limit.is_some() {
        return Err(ServiceError::invalid(
            "limit",
            "not allowed with watch=true (the stream has no end)",
        ));
    }
    Ok(q)
}

/// `GET /v1/events`
pub async fn get_events(
    State(svc): State<Service>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = query.map_err(|e| ServiceError::invalid("query", e.body_text()))?;
    let q = parse_query(&pairs)?;
    let store = svc.store();
    if !q.watch {
        let page = events::list(
            store,
            q.since.as_ref(),
            q.limit.unwrap_or(events::DEFAULT_LIMIT),
        )
        .await
        .map_err(ServiceError::from)?;
        return Ok(Json(page).into_response());
    }
    // The read and the watch start before the answer, so an unreachable etcd is a 503, not a broken
    // stream.
    let stream = events::watch(store, q.since)
        .await
        .map_err(ServiceError::from)?;
    Ok((
        [
            (header::CONTENT_TYPE, NDJSON),
            // Keep proxies from buffering the stream.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(ndjson(stream)),
    )
        .into_response())
}

/// One JSON object per line; a failure of the stream becomes a last `{"error": ...}` line (the status
/// line has long been sent).
pub fn ndjson(
    stream: events::EventStream,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    stream
        .scan(false, |failed, item| {
            if *failed {
                return futures::future::ready(None);
            }
            let line = match item {
                Ok(e) => serde_json::to_vec(&e).unwrap_or_default(),
                Err(e) => {
                    *failed = true;
                    tracing::warn!(error = %e, "event stream failed");
                    let err = ServiceError::from(e);
                    serde_json::to_vec(&super::error_body(&err)).unwrap_or_default()
                }
            };
            let mut line = line;
            line.push(b'\n');
            futures::future::ready(Some(Ok(Bytes::from(line))))
        })
        .boxed()
}

impl From<EventsError> for ApiError {
    fn from(e: EventsError) -> Self {
        ApiError(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    fn field(e: ServiceError) -> String {
        match e {
            ServiceError::InvalidArgument { field, .. } => field,
            other => panic!("not invalid: {other}"),
        }
    }

    #[test]
    fn parses_good_queries() {
        let q = parse_query(&pairs(&[("since", "12-00ab"), ("limit", "5")])).unwrap();
        assert_eq!(q.limit, Some(5));
        assert_eq!(
            q.since,
            Some(Cursor {
                revision: 12,
                nonce: Some("00ab".into())
            })
        );
        assert!(!q.watch);
        let q = parse_query(&pairs(&[("watch", "true"), ("since", "0")])).unwrap();
        assert!(q.watch);
        assert_eq!(q.since.unwrap().nonce, None);
        assert_eq!(parse_query(&[]).unwrap().since, None);
    }

    #[test]
    fn bad_queries_name_the_parameter() {
        for (p, name) in [
            (&[("since", "x")][..], "since"),
            (&[("since", "-1")], "since"),
            (&[("since", "12-")], "since"),
            (&[("since", "12-zz")], "since"),
            (&[("limit", "0")], "limit"),
            (&[("limit", "1001")], "limit"),
            (&[("limit", "ten")], "limit"),
            (&[("watch", "yes")], "watch"),
            (&[("watch", "true"), ("limit", "3")], "limit"),
            (&[("limit", "3"), ("limit", "4")], "limit"),
            (&[("follow", "true")], "follow"),
        ] {
            assert_eq!(field(parse_query(&pairs(p)).unwrap_err()), name, "{p:?}");
        }
    }
}
