//! Webhook alerting: a few rules the scheduling leader evaluates over its snapshots, posted to the
//! configured webhooks (`--alert-webhook URL`, repeatable) in the Alertmanager webhook format
//! (version 4), so receivers written for Alertmanager accept them unchanged.
//!
//! Rules ([`evaluate`]):
//! - `NodeDown` (critical, label `node_id`): the leader declared the node DOWN
//!   (`/berth/down/{node_id}`) and moved its instances.
//! - `InstanceCrashLooping` (warning, labels `container_id`, `instance_id`, `node_id`): the instance's
//!   restart count grew by [`AlertRules::crash_loop_restarts`] or more within
//!   [`AlertRules::crash_loop_window`], or it is FAILED after at least that many restarts.
//! - `ProbeFailing` (warning, same labels): UNHEALTHY continuously for longer than
//!   [`AlertRules::unhealthy_after`] (`--alert-unhealthy-after`).
//!
//! State lives in the leader's memory ([`AlertState`]): each alert is posted once when it starts
//! firing and once when it resolves. A new leader (fail-over, hub restart) starts empty, so it posts
//! again what is still firing (with its own `startsAt`) and counts restarts from what it first sees;
//! an alert that resolved during the hand-over is never posted resolved. Receivers that de-duplicate
//! should key on `fingerprint`, a stable hash of the labels.
//!
//! Delivery ([`Notifier`]): one task per webhook with a bounded queue. The leader only enqueues and
//! never waits; each message is retried with exponential backoff ([`DeliveryPolicy`]); a message is
//! dropped (logged, and counted in `berth_alert_deliveries_total{result}`) when the queue is full or
//! its retries are exhausted.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::metrics;
use crate::store::Snapshot;

/// Alert name: a node declared DOWN.
pub const NODE_DOWN: &str = "NodeDown";
/// Alert name: an instance restarting over and over.
pub const INSTANCE_CRASH_LOOPING: &str = "InstanceCrashLooping";
/// Alert name: an instance failing its health probe for a while.
pub const PROBE_FAILING: &str = "ProbeFailing";
/// Every alert name [`evaluate`] produces.
pub const ALERT_NAMES: [&str; 3] = [NODE_DOWN, INSTANCE_CRASH_LOOPING, PROBE_FAILING];

/// Default of `--alert-unhealthy-after`.
pub const DEFAULT_UNHEALTHY_AFTER: Duration = Duration::from_secs(120);
/// The leader evaluates the rules at least this often (and after each reconcile pass).
pub const EVALUATE_EVERY: Duration = Duration::from_secs(5);

/// `endsAt` of an alert that is still firing (Go's zero time, as Alertmanager sends it).
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
/// `receiver` of every message.
const RECEIVER: &str = "berth";

/// Whether an alert is firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The condition holds.
    Firing,
    /// The condition no longer holds.
    Resolved,
}

/// One alert, as in the `alerts` array of an Alertmanager webhook message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Firing or resolved.
    pub status: AlertStatus,
    /// `alertname`, `severity` and the rule's identifying labels.
    pub labels: BTreeMap<String, String>,
    /// `summary` and `description`.
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339: when this leader saw it start firing.
    pub starts_at: String,
    /// RFC 3339: when it resolved; Go's zero time while it fires.
    pub ends_at: String,
    /// Empty: berth has no page per rule.
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    /// 16 hex digits, a stable hash of the labels.
    pub fingerprint: String,
}

/// An Alertmanager webhook message (version 4): the alerts of one `alertname` that changed in one
/// evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookMessage {
    /// Always "4".
    pub version: String,
    /// `{}:{alertname="…"}`: identifies the group.
    pub group_key: String,
    /// Always 0: berth sends every alert.
    pub truncated_alerts: u32,
    /// Firing when any alert of the message fires.
    pub status: AlertStatus,
    /// Always "berth".
    pub receiver: String,
    /// `alertname`.
    pub group_labels: BTreeMap<String, String>,
    /// Labels every alert of the message has.
    pub common_labels: BTreeMap<String, String>,
    /// Annotations every alert of the message has.
    pub common_annotations: BTreeMap<String, String>,
    /// Empty: the hub does not know the address users reach it at.
    #[serde(rename = "externalURL")]
    pub external_url: String,
    /// The alerts.
    pub alerts: Vec<Alert>,
}

impl WebhookMessage {
    /// Groups `alerts` by `alertname`, one message per group, in name order.
    pub fn group(alerts: &[Alert]) -> Vec<WebhookMessage> {
        let mut groups: BTreeMap<&str, Vec<Alert>> = BTreeMap::new();
        for a in alerts {
            let name = a.labels.get("alertname").map_or("", String::as_str);
            groups.entry(name).or_default().push(a.clone());
        }
        groups
            .into_iter()
            .map(|(name, alerts)| {
                let status = if alerts.iter().any(|a| a.status == AlertStatus::Firing) {
                    AlertStatus::Firing
                } else {
                    AlertStatus::Resolved
                };
                WebhookMessage {
                    version: "4".to_owned(),
                    group_key: format!("{{}}:{{alertname={name:?}}}"),
                    truncated_alerts: 0,
                    status,
                    receiver: RECEIVER.to_owned(),
                    group_labels: BTreeMap::from([("alertname".to_owned(), name.to_owned())]),
                    common_labels: common(alerts.iter().map(|a| &a.labels)),
                    common_annotations: common(alerts.iter().map(|a| &a.annotations)),
                    external_url: String::new(),
                    alerts,
                }
            })
            .collect()
    }
}

/// The entries every map has.
fn common<'a>(
    mut maps: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let Some(first) = maps.next() else {
        return BTreeMap::new();
    };
    let mut out = first.clone();
    for m in maps {
        out.retain(|k, v| m.get(k) == Some(v));
    }
    out
}

/// Thresholds of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertRules {
    /// ProbeFailing fires after an instance was UNHEALTHY this long.
    pub unhealthy_after: Duration,
    /// InstanceCrashLooping fires after this many restarts within the window (or when FAILED after
    /// this many).
    pub crash_loop_restarts: u32,
    /// The crash-loop window.
    pub crash_loop_window: Duration,
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            unhealthy_after: DEFAULT_UNHEALTHY_AFTER,
            crash_loop_restarts: 3,
            crash_loop_window: Duration::from_secs(600),
        }
    }
}

/// What the leader remembers between evaluations. Start a fresh one per leadership term.
#[derive(Debug, Default)]
pub struct AlertState {
    rules: AlertRules,
    /// By fingerprint.
    firing: BTreeMap<String, Alert>,
    /// By instance id: (time seen, restart count) each time the count changed, oldest first; the
    /// first entry is the count at (or before) the window's start.
    restarts: HashMap<String, VecDeque<(OffsetDateTime, u32)>>,
    /// By instance id: when it was first known UNHEALTHY.
    unhealthy_since: HashMap<String, OffsetDateTime>,
}

impl AlertState {
    /// Empty state (nothing firing) with these thresholds.
    pub fn new(rules: AlertRules) -> Self {
        AlertState {
            rules,
            ..AlertState::default()
        }
    }

    /// The thresholds.
    pub fn rules(&self) -> AlertRules {
        self.rules
    }

    /// The alerts firing now, by fingerprint order.
    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.firing.values()
    }

    /// How many alerts of each name fire (every name of [`ALERT_NAMES`], zeros included).
    pub fn firing_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> = ALERT_NAMES.iter().map(|n| (*n, 0)).collect();
        for a in self.firing.values() {
            if let Some(name) = a.labels.get("alertname") {
                if let Some(n) = ALERT_NAMES.iter().find(|n| **n == name.as_str()) {
                    *counts.entry(n).or_default() += 1;
                }
            }
        }
        counts
    }

    /// Restarts of `instance_id` within the window ending `now`, recording `count` as seen now.
    fn restarts_in_window(&mut self, instance_id: &str, count: u32, now: OffsetDateTime) -> u32 {
        let window = self.rules.crash_loop_window;
        let seen = self.restarts.entry(instance_id.to_owned()).or_default();
        match seen.back() {
            // First sight, or the counter went back (the agent lost it): a new baseline.
            None => seen.push_back((now, count)),
            Some((_, last)) if count < *last => {
                seen.clear();
                seen.push_back((now, count));
            }
            Some((_, last)) if count > *last => seen.push_back((now, count)),
            Some(_) => {}
        }
        // Keep one entry at or before the window's start: the count the window starts from.
        while seen.len() >= 2 && seen[1].0 <= now - window {
            seen.pop_front();
        }
        let baseline = seen.front().map_or(count, |(_, c)| *c);
        count.saturating_sub(baseline)
    }
}

/// Evaluates the rules over `snap` at `now` and returns what changed since the last call: alerts
/// that started firing and alerts that resolved (each once). Pure apart from `state`.
pub fn evaluate(snap: &Snapshot, now: OffsetDateTime, state: &mut AlertState) -> Vec<Alert> {
    let rules = state.rules;
    let mut active: BTreeMap<String, Candidate> = BTreeMap::new();
    let mut add = |c: Candidate| {
        active.insert(fingerprint(&c.labels), c);
    };

    for node_id in &snap.down {
        let whereabouts = snap
            .nodes
            .get(node_id)
            .map(|n| format!(" ({}, {})", n.value.hostname, n.value.ip))
            .unwrap_or_default();
        add(Candidate::new(
            NODE_DOWN,
            "critical",
            [("node_id", node_id.clone())],
            format!("node {node_id} is down"),
            format!(
                "node {node_id}{whereabouts} stopped heartbeating and was declared DOWN; its \
                 instances are being moved to other nodes"
            ),
        ));
    }

    let mut present: HashSet<&str> = HashSet::new();
    for inst in snap.all_instances() {
        let r = &inst.record.value;
        // A replica being stopped (scaled away, moved off a DOWN node) no longer matters.
        let Some(status) = inst.status.as_ref().filter(|_| !r.stopping) else {
            continue;
        };
        present.insert(r.instance_id.as_str());
        let container = snap
            .containers
            .get(&r.container_id)
            .map(|c| c.value.name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(r.container_id.as_str());
        let node_id = if r.node_id.is_empty() {
            status.node_id.clone()
        } else {
            r.node_id.clone()
        };
        let labels = || {
            [
                ("container_id", r.container_id.clone()),
                ("instance_id", r.instance_id.clone()),
                ("node_id", node_id.clone()),
            ]
        };
        let reason = if status.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", status.reason)
        };

        let recent = state.restarts_in_window(&r.instance_id, status.restarts, now);
        let failed = status.status == "FAILED" && status.restarts >= rules.crash_loop_restarts;
        if recent >= rules.crash_loop_restarts || failed {
            let description = if failed {
                format!(
                    "instance {} of {container} on node {node_id} is FAILED after {} restarts{reason}",
                    r.instance_id, status.restarts
                )
            } else {
                format!(
                    "instance {} of {container} on node {node_id} restarted {recent} times within \
                     {} ({} in all); now {}{reason}",
                    r.instance_id,
                    human(rules.crash_loop_window),
                    status.restarts,
                    status.status
                )
            };
            add(Candidate::new(
                INSTANCE_CRASH_LOOPING,
                "warning",
                labels(),
                format!("instance {} of {container} is crash-looping", r.instance_id),
                description,
            ));
        }

        if status.status == "UNHEALTHY" {
            // The status record is written when the node reports: its time bounds the start from
            // below for a leader that just took over.
            let reported = OffsetDateTime::parse(&status.updated_at, &Rfc3339).unwrap_or(now);
            let since = state
                .unhealthy_since
                .entry(r.instance_id.clone())
                .or_insert(now);
            *since = (*since).min(reported);
            let since = *since;
            if now - since > rules.unhealthy_after {
                add(Candidate::new(
                    PROBE_FAILING,
                    "warning",
                    labels(),
                    format!(
                        "instance {} of {container} fails its health probe",
                        r.instance_id
                    ),
                    format!(
                        "instance {} of {container} on node {node_id} is UNHEALTHY since {} \
                         (longer than {}){reason}",
                        r.instance_id,
                        rfc3339(since),
                        human(rules.unhealthy_after)
                    ),
                ));
            }
        } else {
            state.unhealthy_since.remove(&r.instance_id);
        }
    }
    state.restarts.retain(|id, _| present.contains(id.as_str()));
    state
        .unhealthy_since
        .retain(|id, _| present.contains(id.as_str()));

    let mut changes = Vec::new();
    let stamp = rfc3339(now);
    for (fp, c) in active.iter() {
        if !state.firing.contains_key(fp) {
            let alert = c.to_alert(fp, &stamp);
            changes.push(alert.clone());
            state.firing.insert(fp.clone(), alert);
        }
    }
    state.firing.retain(|fp, alert| {
        if active.contains_key(fp) {
            return true;
        }
        changes.push(Alert {
            status: AlertStatus::Resolved,
            ends_at: stamp.clone(),
            ..alert.clone()
        });
        false
    });
    changes
}

/// An alert whose condition holds in this evaluation.
struct Candidate {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl Candidate {
    fn new<const N: usize>(
        name: &str,
        severity: &str,
        labels: [(&str, String); N],
        summary: String,
        description: String,
    ) -> Self {
        let mut all: BTreeMap<String, String> =
            labels.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        all.insert("alertname".to_owned(), name.to_owned());
        all.insert("severity".to_owned(), severity.to_owned());
        Candidate {
            labels: all,
            annotations: BTreeMap::from([
                ("summary".to_owned(), summary),
                ("description".to_owned(), description),
            ]),
        }
    }

    fn to_alert(&self, fingerprint: &str, now: &str) -> Alert {
        Alert {
            status: AlertStatus::Firing,
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            starts_at: now.to_owned(),
            ends_at: ZERO_TIME.to_owned(),
            generator_url: String::new(),
            fingerprint: fingerprint.to_owned(),
        }
    }
}

/// FNV-1a over the sorted labels: stable across hub replicas and versions (unlike `DefaultHasher`).
fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// "10m", "2m30s", "45s", "500ms": how thresholds read in descriptions.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

/// Why a webhook cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// Not a URL at all.
    #[error("alert webhook {url:?} is not a URL: {message}")]
    BadUrl {
        /// What was given.
        url: String,
        /// What the parser said.
        message: String,
    },
    /// A URL of another scheme (only http and https are posted to).
    #[error("alert webhook {url:?} must use http or https, not {scheme:?}")]
    Scheme {
        /// What was given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the alert webhook http client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Parses and checks one `--alert-webhook` value: an absolute http(s) URL with a host.
pub fn parse_webhook_url(s: &str) -> Result<Url, AlertError> {
    let url = Url::parse(s.trim()).map_err(|e| AlertError::BadUrl {
        url: s.to_owned(),
        message: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(AlertError::Scheme {
            url: s.to_owned(),
            scheme: url.scheme().to_owned(),
        });
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(AlertError::BadUrl {
            url: s.to_owned(),
            message: "no host".to_owned(),
        });
    }
    Ok(url)
}

/// How messages are delivered to each webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// Messages waiting per webhook; more are dropped.
    pub queue: usize,
    /// Tries per message (the first included).
    pub attempts: u32,
    /// Wait before the second try; doubled for each next one.
    pub initial_backoff: Duration,
    /// Limit of one try (connect to end of the response).
    pub timeout: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            queue: 256,
            attempts: 5,
            initial_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why one try failed.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("webhook answered {0}")]
    Status(StatusCode),
    #[error("request failed: {0}")]
    Request(#[source] reqwest::Error),
}

impl DeliveryError {
    /// Whether another try may succeed: network errors, timeouts, 5xx, 408 and 429. Other 4xx mean
    /// the receiver refuses the message itself.
    fn retryable(&self) -> bool {
        match self {
            DeliveryError::Request(_) => true,
            DeliveryError::Status(s) => {
                s.is_server_error()
                    || *s == StatusCode::TOO_MANY_REQUESTS
                    || *s == StatusCode::REQUEST_TIMEOUT
            }
        }
    }
}

/// Result labels of `berth_alert_deliveries_total`.
pub mod result {
    /// The webhook accepted the message.
    pub const DELIVERED: &str = "delivered";
    /// Every try failed (or the webhook refused it): dropped.
    pub const FAILED: &str = "failed";
    /// The webhook's queue was full: dropped without a try.
    pub const DROPPED: &str = "dropped";
}

/// Posts alert changes to the webhooks, each through its own background task. Cheap to clone; the
/// tasks end once every clone is dropped and their queues are drained.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    hooks: Arc<[Hook]>,
}

#[derive(Debug)]
struct Hook {
    /// scheme://host:port only: paths and query strings of webhooks often carry tokens.
    target: String,
    tx: mpsc::Sender<Arc<[u8]>>,
}

impl Notifier {
    /// Starts one delivery task per webhook. Must be called within a tokio runtime.
    pub fn new(webhooks: &[Url], policy: DeliveryPolicy) -> Result<Notifier, AlertError> {
        let client = reqwest::Client::builder()
            .connect_timeout(policy.timeout)
            .user_agent(concat!("berth-hub/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(AlertError::Client)?;
        let hooks: Vec<Hook> = webhooks
            .iter()
            .map(|url| {
                let (tx, rx) = mpsc::channel(policy.queue.max(1));
                let target = url.origin().ascii_serialization();
                tokio::spawn(deliver_all(
                    client.clone(),
                    url.clone(),
                    target.clone(),
                    policy,
                    rx,
                ));
                Hook { target, tx }
            })
            .collect();
        Ok(Notifier {
            hooks: hooks.into(),
        })
    }

    /// Whether no webhook is configured.
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Queues `changes` (from [`evaluate`]) for every webhook, one message per alert name. Never
    /// waits: a full queue drops the message.
    pub fn notify(&self, changes: &[Alert]) {
        if changes.is_empty() || self.hooks.is_empty() {
            return;
        }
        for message in WebhookMessage::group(changes) {
            let body: Arc<[u8]> = match serde_json::to_vec(&message) {
                Ok(b) => b.into(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode an alert message");
                    continue;
                }
            };
            for hook in self.hooks.iter() {
                if let Err(e) = hook.tx.try_send(body.clone()) {
                    let why = match e {
                        mpsc::error::TrySendError::Full(_) => "queue full",
                        mpsc::error::TrySendError::Closed(_) => "delivery task ended",
                    };
                    tracing::warn!(webhook = %hook.target, group = %message.group_key,
                        alerts = message.alerts.len(), why, "alert message dropped");
                    metrics::global().observe_alert_delivery(result::DROPPED);
                }
            }
        }
    }
}

/// One webhook's delivery task: posts its messages in order until every sender is gone.
async fn deliver_all(
    client: reqwest::Client,
    url: Url,
    target: String,
    policy: DeliveryPolicy,
    mut rx: mpsc::Receiver<Arc<[u8]>>,
) {
    while let Some(body) = rx.recv().await {
        match deliver(&client, &url, &body, policy).await {
            Ok(tries) => {
                tracing::debug!(webhook = %target, tries, "alert message delivered");
                metrics::global().observe_alert_delivery(result::DELIVERED);
            }
            Err((tries, e)) => {
                tracing::warn!(webhook = %target, tries, error = %e, "alert message dropped");
                metrics::global().observe_alert_delivery(result::FAILED);
            }
        }
    }
}

/// Posts one message, retrying with exponential backoff; returns the tries it took.
async fn deliver(
    client: &reqwest::Client,
    url: &Url,
    body: &[u8],
    policy: DeliveryPolicy,
) -> Result<u32, (u32, DeliveryError)> {
    let mut backoff = policy.initial_backoff;
    let mut tries = 0;
    loop {
        tries += 1;
        let sent = client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .timeout(policy.timeout)
            .body(body.to_vec())
            .send()
            .await;
        let error = match sent {
            Ok(resp) if resp.status().is_success() => return Ok(tries),
            Ok(resp) => DeliveryError::Status(resp.status()),
            Err(e) => DeliveryError::Request(e.without_url()),
        };
        if tries >= policy.attempts || !error.retryable() {
            return Err((tries, error));
        }
        tracing::debug!(webhook = %url.origin().ascii_serialization(), tries, error = %error,
            "alert delivery failed, retrying");
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2);
    }
}

#[cfg(test)]
#[path = "alerts_tests.rs"]
mod tests;
