//! A small client of the hub's REST API, as a user's script would use it.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::time::Duration;

/// An HTTP answer: status and JSON body (`Value::Null` when the body is empty or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Parsed body.
    pub body: Value,
    /// Raw body, for messages.
    pub text: String,
}

impl Reply {
    /// `body.error.message` (or "" when absent).
    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }

    /// `body.error.code` (or "" when absent).
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Fails unless the status is `want`.
    pub fn expect_status(self, want: u16, what: &str) -> anyhow::Result<Reply> {
        if self.status != want {
            bail!(
                "{what}: expected HTTP {want}, got {}: {}",
                self.status,
                self.text
            );
        }
        Ok(self)
    }
}

/// REST client of one hub.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    /// A client of the hub at `base` (e.g. `http://10.250.0.1:7080`).
    pub fn new(base: &str) -> anyhow::Result<Api> {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The hub's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.get(self.url(path)))
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        self.send(self.http.post(self.url(path)).json(body))
    }

    /// `POST path` with a raw body sent as JSON (for malformed-input tests).
    pub fn post_raw(&self, path: &str, body: &str) -> anyhow::Result<Reply> {
        let req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.delete(self.url(path)))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> anyhow::Result<Reply> {
        let resp = req
            .send()
            .with_context(|| format!("request to {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, body, text })
    }

    /// Creates a network; returns its JSON (`network_id`, `name`, `cidr`, `gateway`).
    pub fn create_network(&self, name: &str, cidr: &str) -> anyhow::Result<Value> {
        let r = self.post("/v1/networks", &json!({"name": name, "cidr": cidr}))?;
        Ok(r.expect_status(201, "creating a network")?.body)
    }

    /// Creates a container from a full request body; returns its `container_id`.
    pub fn create_container(&self, body: &Value) -> anyhow::Result<String> {
        let r = self
            .post("/v1/containers", body)?
            .expect_status(202, "creating a container")?;
        match r.body["container_id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("no container_id in {}", r.text),
        }
    }

    /// The container's JSON, or `None` once it is gone (404).
    pub fn container(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let r = self.get(&format!("/v1/containers/{id}"))?;
        match r.status {
            404 => Ok(None),
            200 => Ok(Some(r.body)),
            s => bail!("GET container {id}: HTTP {s}: {}", r.text),
        }
    }

    /// Asks for `replicas` replicas.
    pub fn scale(&self, id: &str, replicas: i64) -> anyhow::Result<()> {
        self.post(
            &format!("/v1/containers/{id}/scale"),
            &json!({ "replicas": replicas }),
        )?
        .expect_status(202, "scaling")?;
        Ok(())
    }

    /// Deletes a container (202; it disappears once its replicas are gone).
    pub fn delete_container(&self, id: &str) -> anyhow::Result<()> {
        self.delete(&format!("/v1/containers/{id}"))?
            .expect_status(202, "deleting a container")?;
        Ok(())
    }

    /// Waits until the container has exactly `replicas` instances, all RUNNING with an IP, and its
    /// status is RUNNING; returns its JSON.
    pub fn wait_running(
        &self,
        id: &str,
        replicas: usize,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        crate::wait_for(&format!("{id} to run {replicas} replicas"), timeout, || {
            let Some(c) = self.container(id)? else {
                bail!("container {id} is gone");
            };
            if all_running(&c, replicas) {
                Ok(Ok(c))
            } else {
                Ok(Err(c.to_string()))
            }
        })
    }

    /// Waits until `GET /v1/containers/{id}` answers 404.
    pub fn wait_gone(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        crate::wait_for(&format!("{id} to be deleted"), timeout, || {
            Ok(match self.container(id)? {
                None => Ok(()),
                Some(c) => Err(c.to_string()),
            })
        })
    }

    /// `POST /v1/containers/{id}/{action}` (`stop`, `start`, `restart`), for all replicas or the one
    /// named; expects 202 and returns the `status` it answered (e.g. "STOPPING").
    pub fn lifecycle(
        &self,
        id: &str,
        action: &str,
        instance_id: Option<&str>,
    ) -> anyhow::Result<String> {
        let body = match instance_id {
            Some(i) => json!({ "instance_id": i }),
            None => json!({}),
        };
        let r = self
            .post(&format!("/v1/containers/{id}/{action}"), &body)?
            .expect_status(202, &format!("{action} {id}"))?;
        Ok(r.body["status"].as_str().unwrap_or_default().to_owned())
    }

    /// `POST /v1/containers/{id}/update` (202); returns the new revision.
    pub fn update(&self, id: &str, body: &Value) -> anyhow::Result<u64> {
        let r = self
            .post(&format!("/v1/containers/{id}/update"), body)?
            .expect_status(202, &format!("updating {id}"))?;
        if r.body["status"] != "UPDATING" {
            bail!("update of {id} answered {}", r.text);
        }
        r.body["revision"]
            .as_u64()
            .with_context(|| format!("no revision in {}", r.text))
    }

    /// `POST /v1/containers/{id}/rollback` (202), to `revision` or the previous one; returns the
    /// revision it rolls back to.
    pub fn rollback(&self, id: &str, revision: Option<u64>) -> anyhow::Result<u64> {
        let body = match revision {
            Some(r) => json!({ "revision": r }),
            None => json!({}),
        };
        let r = self
            .post(&format!("/v1/containers/{id}/rollback"), &body)?
            .expect_status(202, &format!("rolling back {id}"))?;
        if r.body["status"] != "ROLLING_BACK" {
            bail!("rollback of {id} answered {}", r.text);
        }
        r.body["revision"]
            .as_u64()
            .with_context(|| format!("no revision in {}", r.text))
    }

    /// `GET /v1/containers/{id}/revisions` → the `revisions` array (oldest first).
    pub fn revisions(&self, id: &str) -> anyhow::Result<Vec<Value>> {
        let r = self
            .get(&format!("/v1/containers/{id}/revisions"))?
            .expect_status(200, "listing revisions")?;
        list(&r.body, "revisions")
    }

    /// `GET /v1/containers/{id}/stats`.
    pub fn stats(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .get(&format!("/v1/containers/{id}/stats"))?
            .expect_status(200, "reading stats")?
            .body)
    }

    /// Opens a streaming `GET path` (no overall timeout), e.g. `/v1/events?watch=true`.
    pub fn stream(&self, path: &str) -> anyhow::Result<crate::stream::LineStream> {
        crate::stream::LineStream::open(&self.url(path))
    }

    /// Waits until the container's JSON satisfies `done`; returns it. The timeout error shows the
    /// last JSON seen.
    pub fn wait_container(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        crate::wait_for(&format!("{id}: {what}"), timeout, || {
            let Some(c) = self.container(id)? else {
                bail!("container {id} is gone");
            };
            Ok(if done(&c) { Ok(c) } else { Err(c.to_string()) })
        })
    }

    /// `GET /v1/nodes` → the `nodes` array.
    pub fn nodes(&self) -> anyhow::Result<Vec<Value>> {
        let r = self.get("/v1/nodes")?.expect_status(200, "listing nodes")?;
        list(&r.body, "nodes")
    }

    /// `GET /v1/containers` → the `containers` array.
    pub fn containers(&self) -> anyhow::Result<Vec<Value>> {
        let r = self
            .get("/v1/containers")?
            .expect_status(200, "listing containers")?;
        list(&r.body, "containers")
    }

    /// `GET /v1/networks` → the `networks` array.
    pub fn networks(&self) -> anyhow::Result<Vec<Value>> {
        let r = self
            .get("/v1/networks")?
            .expect_status(200, "listing networks")?;
        list(&r.body, "networks")
    }
}

fn list(body: &Value, key: &str) -> anyhow::Result<Vec<Value>> {
    match body[key].as_array() {
        Some(a) => Ok(a.clone()),
        None => bail!("no {key:?} array in {body}"),
    }
}

/// Whether `c` (a container's JSON) has `replicas` instances, all RUNNING with an IP, and is RUNNING.
pub fn all_running(c: &Value, replicas: usize) -> bool {
    let Some(instances) = c["instances"].as_array() else {
        return false;
    };
    c["status"] == "RUNNING"
        && instances.len() == replicas
        && instances
            .iter()
            .all(|i| i["status"] == "RUNNING" && i["ip"].as_str().is_some_and(|ip| !ip.is_empty()))
}

/// The instances of a container's JSON (empty when absent).
pub fn instances(c: &Value) -> Vec<Value> {
    c["instances"].as_array().cloned().unwrap_or_default()
}

/// `(instance_id, node_id, ip)` of each instance of a container's JSON, sorted.
pub fn placements(c: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = instances(c)
        .iter()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or_default().to_string();
            (s("instance_id"), s("node_id"), s("ip"))
        })
        .collect();
    v.sort();
    v
}

/// The instance `instance_id` of a container's JSON.
pub fn instance(c: &Value, instance_id: &str) -> Option<Value> {
    instances(c)
        .into_iter()
        .find(|i| i["instance_id"] == instance_id)
}

/// Instances of a container's JSON that count as available: RUNNING (not stopped).
pub fn available(c: &Value) -> usize {
    instances(c)
        .iter()
        .filter(|i| i["status"] == "RUNNING" && i["stopped"] != true)
        .count()
}
