//! Alert webhooks: delivery against a local HTTP receiver (retries, give-up, a full queue that never
//! blocks the caller), and the scheduling leader posting real alerts from a real etcd while feeding
//! `/metrics`.

#![allow(clippy::unwrap_used)] // tests may unwrap: a failure points at the line
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use berth_hub::alerts::{
    self, Alert, AlertRules, AlertStatus, DeliveryPolicy, Notifier, WebhookMessage,
};
use berth_hub::metrics::{self, Format};
use berth_hub::reconciler::{self, Alerting};
use berth_hub::service::NetConfig;
use berth_proto::v1;
use berth_proto::v1::agent_service_server::AgentService;
use common::{wait_for, Hub};
use serde_json::Value;

/// A webhook receiver on 127.0.0.1: answers the i-th request with `script[i]` (200 past the end),
/// or hangs when the status is 0; records every body it answered 2xx to.
struct Receiver {
    url: reqwest::Url,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ReceiverState {
    script: Arc<Vec<u16>>,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Value>>>,
}

async fn receive(State(s): State<ReceiverState>, body: Bytes) -> StatusCode {
    let n = s.requests.fetch_add(1, Ordering::SeqCst);
    let code = s.script.get(n).copied().unwrap_or(200);
    if code == 0 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let status = StatusCode::from_u16(code).unwrap();
    if status.is_success() {
        s.bodies
            .lock()
            .unwrap()
            .push(serde_json::from_slice(&body).unwrap());
    }
    status
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let state = ReceiverState {
            script: Arc::new(script.to_vec()),
            requests: Arc::default(),
            bodies: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            url: alerts::parse_webhook_url(&format!("http://{addr}/hook?token=secret")).unwrap(),
            requests: state.requests,
            bodies: state.bodies,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// The alerts received so far as (alertname, status), in order.
    fn received(&self) -> Vec<(String, String)> {
        self.bodies()
            .iter()
            .flat_map(|b| b["alerts"].as_array().unwrap().clone())
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_owned(),
                    a["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn alert(node: &str) -> Alert {
    Alert {
        status: AlertStatus::Firing,
        labels: [
            ("alertname", "NodeDown"),
            ("severity", "critical"),
            ("node_id", node),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        annotations: [("summary".to_owned(), format!("node {node} is down"))].into(),
        starts_at: "2026-11-20T10:00:00Z".into(),
        ends_at: "0001-01-01T00:00:00Z".into(),
        generator_url: String::new(),
        fingerprint: "0123456789abcdef".into(),
    }
}

fn fast(attempts: u32, queue: usize) -> DeliveryPolicy {
    DeliveryPolicy {
        queue,
        attempts,
        initial_backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
    }
}

/// `berth_alert_deliveries_total{result}` in the global registry (shared by this binary's tests).
fn deliveries(result: &str) -> f64 {
    let text = metrics::global().render(Format::Prometheus).unwrap();
    let prefix = format!("berth_alert_deliveries_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn delivery_retries_until_the_webhook_accepts() {
    let rx = Receiver::start(&[500, 503]).await;
    let delivered = deliveries("delivered");
    let notifier = Notifier::new(std::slice::from_ref(&rx.url), fast(5, 8)).unwrap();
    let started = Instant::now();
    notifier.notify(&[alert("n1"), alert("n2")]);
    wait_for(10, "the third try to be accepted", || async {
        (!rx.bodies().is_empty()).then_some(())
    })
    .await;
    assert_eq!(rx.requests(), 3, "two failures, then accepted");
    // Backoff 20 ms then 40 ms.
    assert!(started.elapsed() >= Duration::from_millis(60));
    let body = &rx.bodies()[0];
    let message: WebhookMessage = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(message.version, "4");
    assert_eq!(message.status, AlertStatus::Firing);
    assert_eq!(message.group_key, "{}:{alertname=\"NodeDown\"}");
    assert_eq!(message.alerts.len(), 2, "one message for both: {body}");
    assert_eq!(body["alerts"][0]["labels"]["node_id"], "n1");
    assert_eq!(body["alerts"][1]["labels"]["node_id"], "n2");
    assert_eq!(body["commonLabels"]["severity"], "critical");
    assert_eq!(body["alerts"][0]["startsAt"], "2026-11-20T10:00:00Z");
    wait_for(5, "the delivery to be counted", || async {
        (deliveries("delivered") > delivered).then_some(())
    })
    .await;

    // Order is kept: a resolution sent after the firing arrives after it.
    let resolved = Alert {
        status: AlertStatus::Resolved,
        ends_at: "2026-11-20T10:05:00Z".into(),
        ..alert("n1")
    };
    notifier.notify(&[resolved]);
    wait_for(5, "the resolution", || async {
        (rx.bodies().len() == 2).then_some(())
    })
    .await;
    assert_eq!(rx.bodies()[1]["status"], "resolved");
    assert_eq!(
        rx.bodies()[1]["alerts"][0]["endsAt"],
        "2026-11-20T10:05:00Z"
    );
}

#[tokio::test]
async fn delivery_gives_up_after_its_attempts_and_on_refusal() {
    let failed = deliveries("failed");
    let rx = Receiver::start(&[500, 500, 500, 400]).await;
    let notifier = Notifier::new(std::slice::from_ref(&rx.url), fast(3, 8)).unwrap();
    notifier.notify(&[alert("n1")]);
    wait_for(10, "three tries", || async {
        (rx.requests() == 3).then_some(())
    })
    .await;
    wait_for(5, "the give-up to be counted", || async {
        (deliveries("failed") >= failed + 1.0).then_some(())
    })
    .await;
    // A 4xx is the receiver refusing the message: no retry.
    notifier.notify(&[alert("n2")]);
    wait_for(5, "the refused try", || async {
        (rx.requests() == 4).then_some(())
    })
    .await;
    wait_for(5, "the refusal to be counted", || async {
        (deliveries("failed") >= failed + 2.0).then_some(())
    })
    .await;
    // The next message goes through: nothing is stuck.
    notifier.notify(&[alert("n3")]);
    wait_for(5, "the next message", || async {
        (rx.bodies().len() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.requests(), 5);
}

#[tokio::test]
async fn a_full_queue_drops_without_blocking() {
    // The first request hangs: one message in flight, one queued, the rest dropped.
    let rx = Receiver::start(&[0]).await;
    let dropped = deliveries("dropped");
    let notifier = Notifier::new(std::slice::from_ref(&rx.url), fast(5, 1)).unwrap();
    notifier.notify(&[alert("n1")]);
    wait_for(5, "the first request", || async {
        (rx.requests() == 1).then_some(())
    })
    .await;
    let started = Instant::now();
    for i in 0..10 {
        notifier.notify(&[alert(&format!("n{i}"))]);
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "notify must never wait for the webhook"
    );
    assert!(deliveries("dropped") >= dropped + 9.0);
}

#[test]
fn bad_webhook_urls_are_refused_with_a_clear_message() {
    let e = alerts::parse_webhook_url("smtp://mail.example.com")
        .unwrap_err()
        .to_string();
    assert!(e.contains("must use http or https"), "{e}");
    let e = alerts::parse_webhook_url("not a url")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("alert webhook \"not a url\" is not a URL"),
        "{e}"
    );
}

/// The instance of a one-replica container, once placed: (instance id, node id).
async fn placed_instance(hub: &Hub, container: &str) -> (String, String) {
    wait_for(15, "the replica to be placed", || async {
        let (_, c) = hub.get(&format!("/v1/containers/{container}")).await;
        let i = &c["instances"][0];
        let node = i["node_id"].as_str().unwrap_or_default();
        (!node.is_empty()).then(|| {
            (
                i["instance_id"].as_str().unwrap().to_owned(),
                node.to_owned(),
            )
        })
    })
    .await
}

async fn report(hub: &Hub, node: &str, instance: &str, status: v1::InstanceStatus, restarts: u32) {
    let req = v1::ReportStatusRequest {
        node_id: node.into(),
        reports: vec![v1::InstanceReport {
            instance_id: instance.into(),
            status: status as i32,
            reason: "probe: connection refused".into(),
            restarts,
            ..Default::default()
        }],
        removed: vec![],
    };
    hub.grpc
        .report_status(tonic::Request::new(req))
        .await
        .unwrap();
}

async fn scrape(hub: &Hub) -> String {
    use tower::ServiceExt;
    let router = berth_hub::api::rest::router(hub.service.clone());
    let req = axum::http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn the_leader_posts_alerts_and_feeds_the_cluster_metrics() {
    let rx = Receiver::start(&[]).await;
    let hub = Hub::start(false).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let alerting = Alerting {
        rules: AlertRules {
            unhealthy_after: Duration::from_secs(1),
            ..AlertRules::default()
        },
        notifier: Notifier::new(std::slice::from_ref(&rx.url), fast(5, 16)).unwrap(),
        events: None,
    };
    let scheduler = tokio::spawn(reconciler::run_with_alerting(
        hub.store.clone(),
        "alerts-test".into(),
        NetConfig::default(),
        alerting,
        async move {
            let _ = stopped.await;
        },
    ));

    // n1 heartbeats; n2 never does (and is too small for the replica): it goes DOWN.
    hub.register("n1", 4000, 8 << 30).await;
    hub.register("n2", 100, 1 << 30).await;
    let service = hub.service.clone();
    let heartbeats = tokio::spawn(async move {
        loop {
            let _ = service.heartbeat("n1").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let (status, net) = hub
        .post("/v1/networks", r#"{"name":"alerts","cidr":"10.42.0.0/16"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{net}");
    let (status, c) = hub
        .post(
            "/v1/containers",
            r#"{"image":"demo:1","cpu":"0.5","memory":"64MB","replicas":1,"network_id":"alerts"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{c}");
    let container = c["container_id"].as_str().unwrap().to_owned();
    let (instance, node) = placed_instance(&hub, &container).await;
    assert_eq!(node, "n1");

    use v1::InstanceStatus as S;
    report(&hub, "n1", &instance, S::Running, 0).await;
    // Let the leader see the count before the restarts (a pass within RESYNC_INTERVAL, then an
    // observation within OBSERVE_MIN_INTERVAL): the first count it sees is the baseline.
    tokio::time::sleep(Duration::from_secs(4)).await;
    report(&hub, "n1", &instance, S::Running, 3).await;
    let has = |name: &'static str, status: &'static str| {
        let rx = &rx;
        move || async move {
            rx.received()
                .contains(&(name.to_owned(), status.to_owned()))
                .then_some(())
        }
    };
    wait_for(
        10,
        "InstanceCrashLooping",
        has("InstanceCrashLooping", "firing"),
    )
    .await;
    report(&hub, "n1", &instance, S::Unhealthy, 3).await;
    wait_for(10, "ProbeFailing", has("ProbeFailing", "firing")).await;
    wait_for(20, "NodeDown for n2", has("NodeDown", "firing")).await;
    report(&hub, "n1", &instance, S::Running, 3).await;
    wait_for(10, "ProbeFailing resolved", has("ProbeFailing", "resolved")).await;

    let alerts: Vec<Value> = rx
        .bodies()
        .iter()
        .flat_map(|b| b["alerts"].as_array().unwrap().clone())
        .collect();
    let down = alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == "NodeDown")
        .unwrap();
    assert_eq!(down["labels"]["node_id"], "n2");
    assert_eq!(down["labels"]["severity"], "critical");
    let crash = alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == "InstanceCrashLooping")
        .unwrap();
    assert_eq!(crash["labels"]["instance_id"], instance.as_str());
    assert_eq!(crash["labels"]["container_id"], container.as_str());
    assert_eq!(crash["labels"]["node_id"], "n1");
    // Each change posted once.
    let count = |name: &str| {
        rx.received()
            .iter()
            .filter(|(n, s)| n == name && s == "firing")
            .count()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count("NodeDown"), 1, "{:?}", rx.received());
    assert_eq!(count("InstanceCrashLooping"), 1, "{:?}", rx.received());
    assert_eq!(count("ProbeFailing"), 1, "{:?}", rx.received());

    let text = scrape(&hub).await;
    openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    for want in [
        "berth_hub_leader 1\n",
        "berth_hub_node_status{node_id=\"n2\",status=\"DOWN\"} 1\n",
        "berth_hub_node_status{node_id=\"n1\",status=\"HEALTHY\"} 1\n",
        "berth_hub_node_cpu_allocated_cores{node_id=\"n1\"} 0.5\n",
        "berth_hub_node_cpu_capacity_cores{node_id=\"n1\"} 4.0\n",
        "berth_hub_instances{status=\"RUNNING\"} 1\n",
        "berth_hub_instances{status=\"FAILED\"} 0\n",
        "berth_alerts_firing{alertname=\"NodeDown\"} 1\n",
        "berth_alerts_firing{alertname=\"ProbeFailing\"} 0\n",
        "berth_hub_scheduling_latency_seconds_count 1\n",
        "berth_hub_etcd_request_duration_seconds_count{op=\"snapshot\"}",
        "berth_hub_etcd_request_duration_seconds_count{op=\"txn\"}",
        "berth_hub_etcd_request_duration_seconds_count{op=\"watch\"}",
        "berth_hub_etcd_request_duration_seconds_count{op=\"lease_grant\"}",
        "berth_alert_deliveries_total{result=\"delivered\"}",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }

    // Shutdown ends the term: this replica is no longer the leader.
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), scheduler)
        .await
        .unwrap()
        .unwrap();
    heartbeats.abort();
    let text = scrape(&hub).await;
    assert!(text.contains("berth_hub_leader 0\n"), "{text}");
    assert!(!text.contains("node_id=\"n1\""), "{text}");
}
