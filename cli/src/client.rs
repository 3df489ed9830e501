//! The hub's REST API as the CLI sees it: one small client and the objects it reads.
//!
//! Objects are read leniently (missing fields take defaults) so an older CLI keeps working against a
//! newer hub; what the CLI sends is built by the commands as plain JSON.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// Prefix of every network id; anything else given where a network id is expected is a name.
pub const NETWORK_ID_PREFIX: &str = "net-";
/// Prefix of every container id; anything else given where a container id is expected is a name.
pub const CONTAINER_ID_PREFIX: &str = "ctr-";

/// A network, as `GET /v1/networks` lists it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Network {
    pub network_id: String,
    pub name: String,
    pub cidr: String,
    pub gateway: String,
    pub created_at: String,
    pub encrypted: bool,
    pub linked_network_ids: Vec<String>,
}

/// One replica of a container.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub instance_id: String,
    // A pending instance may have no node, ip or reason yet: `null` reads as empty.
    #[serde(deserialize_with = "null_as_default")]
    pub node_id: String,
    #[serde(deserialize_with = "null_as_default")]
    pub ip: String,
    pub status: String,
    #[serde(deserialize_with = "null_as_default")]
    pub reason: String,
    pub restarts: u32,
    /// The spec revision this replica runs.
    pub revision: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub image_digest: String,
    /// Stopped on purpose (`berth stop`), not failed.
    pub stopped: bool,
}

/// A container's health probe (one of `http`, `tcp`, `exec`), with the hub's defaults filled in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Health {
    pub http: Option<HttpProbe>,
    pub tcp: Option<TcpProbe>,
    pub exec: Option<ExecProbe>,
    pub interval: String,
    pub timeout: String,
    pub failure_threshold: u32,
    pub start_period: String,
}

/// `GET http://<instance ip>:<port><path>`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HttpProbe {
    pub path: String,
    pub port: u32,
}

/// A TCP connect to `<instance ip>:<port>`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TcpProbe {
    pub port: u32,
}

/// A command run inside the container.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ExecProbe {
    pub command: Vec<String>,
}

/// The rollout under way (an update, or a rollback).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Rollout {
    /// `UPDATING` or `ROLLING_BACK`.
    pub state: String,
    /// The revision being rolled out.
    pub revision: u64,
    pub from_revision: u64,
    pub max_unavailable: u32,
    #[serde(deserialize_with = "null_as_default")]
    pub reason: String,
    #[serde(deserialize_with = "null_as_default")]
    pub started_at: String,
}

/// How the last rollout ended.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LastRollout {
    pub revision: u64,
    /// `COMPLETE` or `ROLLED_BACK`.
    pub result: String,
    #[serde(deserialize_with = "null_as_default")]
    pub reason: String,
    #[serde(deserialize_with = "null_as_default")]
    pub finished_at: String,
}

/// One revision of a container's spec, as `GET /v1/containers/{id}/revisions` lists it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Revision {
    pub revision: u64,
    pub image: String,
    #[serde(deserialize_with = "null_as_default")]
    pub image_digest: String,
    pub cpu: String,
    pub memory: String,
    #[serde(deserialize_with = "null_as_default")]
    pub command: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub env: BTreeMap<String, String>,
    pub created_at: String,
    #[serde(deserialize_with = "null_as_default")]
    pub cause: String,
    pub current: bool,
}

/// One replica's resource usage, as `GET /v1/containers/{id}/stats` reports it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct InstanceStats {
    pub instance_id: String,
    #[serde(deserialize_with = "null_as_default")]
    pub node_id: String,
    pub status: String,
    pub cpu_percent: f64,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// 0: no limit known.
    pub memory_limit_bytes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub restarts: u32,
    /// Set when the replica's node could not answer; the numbers are then meaningless.
    #[serde(deserialize_with = "null_as_default")]
    pub error: String,
}

/// `GET /v1/containers/{id}/stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ContainerStats {
    pub container_id: String,
    pub instances: Vec<InstanceStats>,
}

/// A container, as `GET /v1/containers[/{id}]` returns it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Container {
    pub container_id: String,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    pub image: String,
    pub status: String,
    pub network_id: String,
    pub cpu: String,
    pub memory: String,
    pub created_at: String,
    pub replicas: u32,
    pub instances: Vec<Instance>,
    #[serde(deserialize_with = "null_as_default")]
    pub command: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub env: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    pub service_ip: String,
    #[serde(deserialize_with = "null_as_default")]
    pub dns_name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub restart_policy: String,
    pub max_restarts: u32,
    pub health: Option<Health>,
    #[serde(deserialize_with = "null_as_default")]
    pub stop_signal: String,
    #[serde(deserialize_with = "null_as_default")]
    pub stop_timeout: String,
    /// The current spec revision (1 at creation).
    pub revision: u64,
    pub rollout: Option<Rollout>,
    pub last_rollout: Option<LastRollout>,
}

/// A node, as `GET /v1/nodes` lists it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Node {
    pub node_id: String,
    pub hostname: String,
    pub ip: String,
    pub status: String,
    pub cpu_total: f64,
    pub cpu_available: f64,
    pub memory_total: u64,
    pub memory_available: u64,
    pub instances: u32,
    /// Cordoned (drained): nothing new is placed there.
    pub unschedulable: bool,
}

#[derive(Deserialize)]
struct Networks {
    networks: Vec<Network>,
}

#[derive(Deserialize)]
struct Containers {
    containers: Vec<Container>,
}

#[derive(Deserialize)]
struct Revisions {
    revisions: Vec<Revision>,
}

#[derive(Deserialize)]
struct Nodes {
    nodes: Vec<Node>,
}

/// `null` reads as the empty value, like a missing field.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A connection to one hub's REST API.
#[derive(Clone)]
pub struct Hub {
    base: Url,
    http: reqwest::Client,
}

impl Hub {
    /// A client for the hub at `base` (e.g. `http://127.0.0.1:7080`).
    pub fn new(base: &str) -> Result<Self> {
        let base = Url::parse(base).with_context(|| format!("invalid hub url {base:?}"))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            bail!(
                "invalid hub url {:?}: expected http://HOST:PORT",
                base.as_str()
            );
        }
        Ok(Hub {
            base,
            http: reqwest::Client::new(),
        })
    }

    /// The URL of an API path; each segment is escaped, so an id cannot change the path.
    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("invalid hub url {:?}", self.base.as_str()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// Sends a request and returns the JSON answer (`null` when the body is empty). An error answer
    /// becomes an error carrying the hub's message.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Value> {
        self.call_url(method, self.url(segments)?, body).await
    }

    /// `GET` with query parameters.
    pub async fn get_query(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Value> {
        let mut url = self.url(segments)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        self.call_url(Method::GET, url, None).await
    }

    async fn call_url(&self, method: Method, url: Url, body: Option<&Value>) -> Result<Value> {
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the hub's answer ({status})"))?;
        if !status.is_success() {
            bail!("{}", error_message(status, &text));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the hub answered {status} with invalid JSON"))
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T> {
        let value = self.call(Method::GET, segments, None).await?;
        serde_json::from_value(value).context("unexpected answer from the hub")
    }

    /// Every network.
    pub async fn networks(&self) -> Result<Vec<Network>> {
        Ok(self.get::<Networks>(&["v1", "networks"]).await?.networks)
    }

    /// Every container.
    pub async fn containers(&self) -> Result<Vec<Container>> {
        Ok(self
            .get::<Containers>(&["v1", "containers"])
            .await?
            .containers)
    }

    /// One container, as the raw JSON the hub sent.
    pub async fn container(&self, id: &str) -> Result<Value> {
        self.call(Method::GET, &["v1", "containers", id], None)
            .await
    }

    /// A container's parsed view.
    pub async fn container_view(&self, id: &str) -> Result<Container> {
        self.get(&["v1", "containers", id]).await
    }

    /// A container's spec revisions, oldest first.
    pub async fn revisions(&self, id: &str) -> Result<Vec<Revision>> {
        Ok(self
            .get::<Revisions>(&["v1", "containers", id, "revisions"])
            .await?
            .revisions)
    }

    /// The resource usage of each replica of a container.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats> {
        self.get(&["v1", "containers", id, "stats"]).await
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        Ok(self.get::<Nodes>(&["v1", "nodes"]).await?.nodes)
    }

    /// The id of a network given by id or by name.
    pub async fn network_id(&self, id_or_name: &str) -> Result<String> {
        if id_or_name.starts_with(NETWORK_ID_PREFIX) {
            return Ok(id_or_name.to_owned());
        }
        let networks = self.networks().await?;
        match networks.into_iter().find(|n| n.name == id_or_name) {
            Some(n) => Ok(n.network_id),
            None => bail!("no network named {id_or_name:?} (see `berth network ls`)"),
        }
    }

    /// The id of a container given by id or by name.
    pub async fn container_id(&self, id_or_name: &str) -> Result<String> {
        if id_or_name.starts_with(CONTAINER_ID_PREFIX) {
            return Ok(id_or_name.to_owned());
        }
        let containers = self.containers().await?;
        match containers.into_iter().find(|c| c.name == id_or_name) {
            Some(c) => Ok(c.container_id),
            None => bail!("no container named {id_or_name:?} (see `berth ps`)"),
        }
    }
}

/// The message of an error answer: the hub's `{"error":{"message"}}` (or `{"error":"..."}`) when
/// there is one, else the status and whatever body came back.
pub fn error_message(status: StatusCode, body: &str) -> String {
    let message = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    match message {
        Some(m) => m,
        None if body.trim().is_empty() => format!("the hub answered {status}"),
        None => format!("the hub answered {status}: {}", body.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        let body = r#"{"error":{"code":"invalid_argument","message":"invalid memory \"4XB\": unknown unit"}}"#;
        assert_eq!(
            error_message(StatusCode::BAD_REQUEST, body),
            r#"invalid memory "4XB": unknown unit"#
        );
        assert_eq!(
            error_message(StatusCode::CONFLICT, r#"{"error":"ctr-1 is stopped"}"#),
            "ctr-1 is stopped"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, "upstream down\n"),
            "the hub answered 502 Bad Gateway: upstream down"
        );
        assert_eq!(
            error_message(StatusCode::NOT_FOUND, ""),
            "the hub answered 404 Not Found"
        );
    }

    #[test]
    fn urls_escape_ids() {
        let hub = Hub::new("http://127.0.0.1:7080/").expect("valid url");
        let url = hub.url(&["v1", "containers", "../nodes?x"]).expect("url");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:7080/v1/containers/..%2Fnodes%3Fx"
        );
        let hub = Hub::new("http://hub.example:80/prefix").expect("valid url");
        let url = hub.url(&["v1", "nodes"]).expect("url");
        assert_eq!(url.as_str(), "http://hub.example/prefix/v1/nodes");
        assert!(Hub::new("127.0.0.1:7080").is_err());
        assert!(Hub::new("ftp://x").is_err());
    }

    #[test]
    fn objects_read_leniently() {
        let c: Container = serde_json::from_str(
            r#"{"container_id":"ctr-1","replicas":2,"command":null,"env":null,"unknown":1,
                "instances":[{"instance_id":"i-1","status":"RUNNING","reason":null}]}"#,
        )
        .unwrap_or_else(|e| panic!("parse: {e}"));
        assert_eq!(c.container_id, "ctr-1");
        assert!(c.command.is_empty() && c.env.is_empty());
        assert_eq!(c.instances.len(), 1);
    }
}
