//! Test harness: a real etcd on random loopback ports (killed and removed on drop), the hub's service,
//! REST router and reconciler in-process, and fake agents driven through the gRPC service functions.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use berth_hub::api::grpc::Grpc;
use berth_hub::service::Service;
use berth_hub::store::Store;
use berth_proto::v1;
use berth_proto::v1::agent_service_server::AgentService;
use futures::StreamExt;
use serde_json::Value;
use tower::ServiceExt;

/// The server stream of `WatchAssignments`.
pub type DesiredStream = berth_hub::api::grpc::DesiredStateStream;

/// A private etcd: its own data dir and ports.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd must be installed (apt-get install etcd-server)");
        Etcd {
            child,
            _dir: dir,
            endpoint,
        }
    }
}

impl Etcd {
    /// Kills etcd now (to test the hub with etcd down).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hub in-process over a private etcd.
pub struct Hub {
    pub service: Service,
    pub grpc: Grpc,
    pub store: Store,
    router: axum::Router,
    reconciler: Option<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    // Last: etcd outlives the tasks using it.
    pub etcd: Etcd,
}

impl Hub {
    /// Starts etcd, connects, and (if `schedule`) runs the reconciler loop.
    pub async fn start(schedule: bool) -> Hub {
        let etcd = Etcd::start();
        let store = Store::connect(
            std::slice::from_ref(&etcd.endpoint),
            Duration::from_secs(15),
        )
        .await
        .unwrap();
        let ca = berth_hub::ca::ClusterCa::load_or_create(&store)
            .await
            .unwrap();
        let service = Service::new(store.clone()).with_ca(std::sync::Arc::new(ca));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let reconciler = schedule.then(|| {
            let store = store.clone();
            tokio::spawn(berth_hub::reconciler::run(
                store,
                "test-hub".into(),
                async move {
                    let mut rx = rx;
                    let _ = rx.wait_for(|v| *v).await;
                },
            ))
        });
        Hub {
            router: berth_hub::api::rest::router(service.clone()),
            grpc: Grpc::new(service.clone()),
            service,
            store,
            reconciler,
            stop,
            etcd,
        }
    }

    /// One REST call; returns the status and the JSON body (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        call_router(&self.router, method, path, body).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }

    /// Every key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let (kvs, _) = self.store.get_prefix(prefix).await.unwrap();
        kvs.iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect()
    }

    /// Every assignment in etcd, by (node, instance).
    pub async fn assignments(
        &self,
    ) -> std::collections::BTreeMap<(String, String), v1::Assignment> {
        use prost::Message;
        let (kvs, _) = self.store.get_prefix("/berth/assign/").await.unwrap();
        kvs.iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let (node, iid) = key
                    .trim_start_matches("/berth/assign/")
                    .split_once('/')
                    .unwrap();
                (
                    (node.to_owned(), iid.to_owned()),
                    v1::Assignment::decode(kv.value()).unwrap(),
                )
            })
            .collect()
    }

    /// Registers a fake agent through the gRPC service.
    pub async fn register(&self, node_id: &str, cpu_millis: u64, memory_bytes: u64) {
        let req = v1::RegisterRequest {
            node_id: node_id.into(),
            hostname: format!("{node_id}.test"),
            advertise_ip: "127.0.0.1".into(),
            cpu_millis,
            memory_bytes,
            wireguard_public_key: String::new(),
            ..Default::default()
        };
        self.grpc.register(tonic::Request::new(req)).await.unwrap();
    }

    /// Registers a fake agent with a migration endpoint (`""`: it takes part in no migration).
    pub async fn register_migratable(
        &self,
        node_id: &str,
        memory_bytes: u64,
        migration_addr: &str,
    ) {
        let req = v1::RegisterRequest {
            node_id: node_id.into(),
            hostname: node_id.into(),
            advertise_ip: "127.0.0.1".into(),
            cpu_millis: 4000,
            memory_bytes,
            migration_addr: migration_addr.into(),
            ..Default::default()
        };
        self.grpc.register(tonic::Request::new(req)).await.unwrap();
    }

    /// Heartbeats for `nodes` until dropped, so their liveness leases (3 s) never lapse.
    pub fn keep_alive(&self, nodes: &[&str]) -> KeepAlive {
        let grpc = self.grpc.clone();
        let nodes: Vec<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        KeepAlive(tokio::spawn(async move {
            loop {
                for n in &nodes {
                    let _ = grpc
                        .heartbeat(tonic::Request::new(v1::HeartbeatRequest {
                            node_id: n.clone(),
                        }))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }))
    }

    /// The first desired state a node's assignment stream sends.
    pub async fn desired(&self, node_id: &str) -> v1::DesiredState {
        let req = v1::WatchAssignmentsRequest {
            node_id: node_id.into(),
        };
        let mut stream = self
            .grpc
            .watch_assignments(tonic::Request::new(req))
            .await
            .unwrap()
            .into_inner();
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    /// A node reports statuses (instance id, status) and removed instances.
    pub async fn report(
        &self,
        node_id: &str,
        reports: &[(&str, v1::InstanceStatus)],
        removed: &[&str],
    ) {
        let req = v1::ReportStatusRequest {
            node_id: node_id.into(),
            reports: reports
                .iter()
                .map(|(id, s)| v1::InstanceReport {
                    instance_id: (*id).into(),
                    status: *s as i32,
                    reason: String::new(),
                    phases_ms: Default::default(),
                    restarts: 0,
                    image_digest: String::new(),
                    migration: None,
                })
                .collect(),
            removed: removed.iter().map(|s| (*s).to_owned()).collect(),
        };
        self.grpc
            .report_status(tonic::Request::new(req))
            .await
            .unwrap();
    }
}

impl Hub {
    /// A node reports one instance with a reason and the image digest it runs.
    pub async fn report_one(
        &self,
        node_id: &str,
        instance_id: &str,
        status: v1::InstanceStatus,
        reason: &str,
        image_digest: &str,
    ) {
        let req = v1::ReportStatusRequest {
            node_id: node_id.into(),
            reports: vec![v1::InstanceReport {
                instance_id: instance_id.into(),
                status: status as i32,
                reason: reason.into(),
                phases_ms: Default::default(),
                restarts: 0,
                image_digest: image_digest.into(),
                migration: None,
            }],
            removed: vec![],
        };
        self.grpc
            .report_status(tonic::Request::new(req))
            .await
            .unwrap();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.reconciler.take() {
            task.abort();
        }
    }
}

/// One REST call on any hub replica's router; returns the status and the JSON body (Null when empty).
pub async fn call_router(
    router: &axum::Router,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(
            body.map(|b| Body::from(b.to_owned()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, value)
}

/// Polls `f` until it returns `Some`, or panics after `secs` with `what`.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts a 400 naming `field` (the message starts with "<field>: ").
#[track_caller]
pub fn assert_invalid(resp: &(StatusCode, Value), field: &str) {
    assert_eq!(resp.0, StatusCode::BAD_REQUEST, "{field}: {:?}", resp.1);
    assert_eq!(resp.1["error"]["code"], "invalid_argument", "{:?}", resp.1);
    let message = resp.1["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("{field}: ")),
        "expected field {field}, got {message:?}"
    );
}

/// Heartbeats of [`Hub::keep_alive`]; they stop when this is dropped.
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl KeepAlive {
    /// Stops the heartbeats now (the nodes' leases then lapse).
    pub fn stop(self) {}
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}
