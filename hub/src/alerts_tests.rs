//! The alert rules on hand-built snapshots, with time driven by the test.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use super::*;
use crate::store::records::{InstanceRecord, NodeRecord, StatusRecord};
use crate::store::{StoredInstance, Versioned};

fn versioned<T>(value: T) -> Versioned<T> {
    Versioned {
        value,
        mod_revision: 1,
        create_revision: 1,
    }
}

fn t0() -> OffsetDateTime {
    OffsetDateTime::parse("2026-11-20T10:00:00Z", &Rfc3339).unwrap()
}

fn at(secs: u64) -> OffsetDateTime {
    t0() + Duration::from_secs(secs)
}

/// A snapshot with node `n1` and instance `ins-1` of `ctr-1` on it.
struct Cluster {
    snap: Snapshot,
}

impl Cluster {
    fn new() -> Self {
        let mut snap = Snapshot::default();
        let node: NodeRecord = serde_json::from_value(json!({
            "node_id": "n1", "hostname": "host1", "ip": "10.0.0.1", "cpu_millis": 1000,
            "memory_bytes": 1u64 << 30, "lease_id": 1, "registered_at": "2026-11-20T09:00:00Z",
        }))
        .unwrap();
        snap.nodes.insert("n1".into(), versioned(node));
        snap.alive.insert("n1".into());
        Cluster { snap }
    }

    /// Sets `ins-1`'s reported status (adds the instance if missing).
    fn report(&mut self, status: &str, restarts: u32, updated_at: OffsetDateTime) -> &mut Self {
        self.report_on("ins-1", status, restarts, updated_at)
    }

    fn report_on(
        &mut self,
        instance_id: &str,
        status: &str,
        restarts: u32,
        updated_at: OffsetDateTime,
    ) -> &mut Self {
        let record: InstanceRecord = serde_json::from_value(json!({
            "instance_id": instance_id, "container_id": "ctr-1", "network_id": "net-1",
            "ordinal": 0, "node_id": "n1", "ip": "10.1.0.2", "created_at": "2026-11-20T09:00:00Z",
        }))
        .unwrap();
        let status: StatusRecord = serde_json::from_value(json!({
            "status": status, "reason": "exit code 1", "node_id": "n1",
            "updated_at": rfc3339(updated_at), "restarts": restarts,
        }))
        .unwrap();
        let stopping = self
            .instance(instance_id)
            .is_some_and(|i| i.record.value.stopping);
        self.snap
            .instances
            .entry("ctr-1".into())
            .or_default()
            .insert(
                instance_id.into(),
                StoredInstance {
                    record: versioned(InstanceRecord { stopping, ..record }),
                    status: Some(status),
                },
            );
        self
    }

    fn instance(&self, id: &str) -> Option<&StoredInstance> {
        self.snap.instances.get("ctr-1").and_then(|m| m.get(id))
    }

    fn set_stopping(&mut self, id: &str) {
        let inst = self
            .snap
            .instances
            .get_mut("ctr-1")
            .and_then(|m| m.get_mut(id))
            .unwrap();
        inst.record.value.stopping = true;
    }
}

fn names(changes: &[Alert]) -> Vec<(String, AlertStatus)> {
    changes
        .iter()
        .map(|a| (a.labels["alertname"].clone(), a.status))
        .collect()
}

#[test]
fn node_down_fires_once_and_resolves_once() {
    let mut c = Cluster::new();
    let mut state = AlertState::new(AlertRules::default());
    assert!(evaluate(&c.snap, at(0), &mut state).is_empty());

    c.snap.alive.remove("n1");
    c.snap.down.insert("n1".into());
    let changes = evaluate(&c.snap, at(5), &mut state);
    assert_eq!(changes.len(), 1);
    let a = &changes[0];
    assert_eq!(a.status, AlertStatus::Firing);
    assert_eq!(
        a.labels,
        BTreeMap::from([
            ("alertname".into(), "NodeDown".into()),
            ("node_id".into(), "n1".into()),
            ("severity".into(), "critical".into()),
        ])
    );
    assert_eq!(a.annotations["summary"], "node n1 is down");
    assert!(
        a.annotations["description"].contains("host1, 10.0.0.1"),
        "{a:?}"
    );
    assert_eq!(a.starts_at, "2026-11-20T10:00:05Z");
    assert_eq!(a.ends_at, ZERO_TIME);
    assert_eq!(a.fingerprint.len(), 16);
    assert_eq!(state.firing_counts()[NODE_DOWN], 1);

    // Still down: nothing new to post.
    assert!(evaluate(&c.snap, at(10), &mut state).is_empty());

    c.snap.down.clear();
    c.snap.alive.insert("n1".into());
    let changes = evaluate(&c.snap, at(20), &mut state);
    assert_eq!(
        names(&changes),
        [("NodeDown".into(), AlertStatus::Resolved)]
    );
    assert_eq!(changes[0].starts_at, "2026-11-20T10:00:05Z");
    assert_eq!(changes[0].ends_at, "2026-11-20T10:00:20Z");
    assert_eq!(changes[0].fingerprint, a.fingerprint);
    assert!(evaluate(&c.snap, at(30), &mut state).is_empty());
    assert_eq!(state.firing().count(), 0);
}

#[test]
fn restarts_within_the_window_make_a_crash_loop_until_they_stop() {
    let mut c = Cluster::new();
    let mut state = AlertState::new(AlertRules::default());
    c.report("RUNNING", 1, at(0));
    assert!(evaluate(&c.snap, at(0), &mut state).is_empty());
    c.report("RUNNING", 3, at(60));
    assert!(
        evaluate(&c.snap, at(60), &mut state).is_empty(),
        "2 restarts"
    );
    c.report("CREATING", 4, at(120));
    let changes = evaluate(&c.snap, at(120), &mut state);
    assert_eq!(
        names(&changes),
        [("InstanceCrashLooping".into(), AlertStatus::Firing)]
    );
    let labels = &changes[0].labels;
    assert_eq!(labels["container_id"], "ctr-1");
    assert_eq!(labels["instance_id"], "ins-1");
    assert_eq!(labels["node_id"], "n1");
    assert_eq!(labels["severity"], "warning");
    assert!(
        changes[0].annotations["description"].contains("restarted 3 times within 10m"),
        "{changes:?}"
    );

    // The restarts stop: once the window no longer holds 3 of them, it resolves.
    c.report("RUNNING", 4, at(300));
    assert!(evaluate(&c.snap, at(300), &mut state).is_empty());
    assert!(evaluate(&c.snap, at(600), &mut state).is_empty());
    let changes = evaluate(&c.snap, at(661), &mut state);
    assert_eq!(
        names(&changes),
        [("InstanceCrashLooping".into(), AlertStatus::Resolved)]
    );
}

#[test]
fn slow_restarts_and_a_high_first_count_are_no_crash_loop() {
    let mut c = Cluster::new();
    let mut state = AlertState::new(AlertRules::default());
    // A new leader first sees 10 restarts: the baseline, not a burst.
    c.report("RUNNING", 10, at(0));
    assert!(evaluate(&c.snap, at(0), &mut state).is_empty());
    // One restart every 6 minutes: never 3 within 10 minutes.
    for (i, t) in [360, 720, 1080, 1440].into_iter().enumerate() {
        c.report("RUNNING", 11 + i as u32, at(t));
        assert!(evaluate(&c.snap, at(t), &mut state).is_empty(), "at {t}");
    }
    // The counter going back (agent state lost) starts a new baseline.
    c.report("RUNNING", 0, at(1500));
    assert!(evaluate(&c.snap, at(1500), &mut state).is_empty());
    c.report("RUNNING", 2, at(1510));
    assert!(evaluate(&c.snap, at(1510), &mut state).is_empty());
}

#[test]
fn failed_after_three_restarts_is_a_crash_loop_at_once() {
    let mut c = Cluster::new();
    let mut state = AlertState::new(AlertRules::default());
    c.report("FAILED", 3, at(0));
    let changes = evaluate(&c.snap, at(0), &mut state);
    assert_eq!(
        names(&changes),
        [("InstanceCrashLooping".into(), AlertStatus::Firing)]
    );
    assert!(
        changes[0].annotations["description"].contains("FAILED after 3 restarts: exit code 1"),
        "{changes:?}"
    );
    // FAILED with fewer restarts (restart policy "never") is not a loop.
    c.report_on("ins-2", "FAILED", 0, at(0));
    assert!(evaluate(&c.snap, at(1), &mut state).is_empty());
}

#[test]
fn probe_failing_fires_after_the_threshold_and_resolves_when_healthy() {
    let mut c = Cluster::new();
    let rules = AlertRules {
        unhealthy_after: Duration::from_secs(120),
        ..AlertRules::default()
    };
    let mut state = AlertState::new(rules);
    // Reports refresh updated_at: the first time this leader saw it UNHEALTHY counts.
    c.report("UNHEALTHY", 0, at(0));
    assert!(evaluate(&c.snap, at(0), &mut state).is_empty());
    c.report("UNHEALTHY", 0, at(100));
    assert!(evaluate(&c.snap, at(100), &mut state).is_empty());
    c.report("UNHEALTHY", 0, at(120));
    assert!(
        evaluate(&c.snap, at(120), &mut state).is_empty(),
        "not longer yet"
    );
    c.report("UNHEALTHY", 0, at(121));
    let changes = evaluate(&c.snap, at(121), &mut state);
    assert_eq!(
        names(&changes),
        [("ProbeFailing".into(), AlertStatus::Firing)]
    );
    assert!(
        changes[0].annotations["description"]
            .contains("UNHEALTHY since 2026-11-20T10:00:00Z (longer than 2m)"),
        "{changes:?}"
    );

    c.report("RUNNING", 0, at(130));
    let changes = evaluate(&c.snap, at(130), &mut state);
    assert_eq!(
        names(&changes),
        [("ProbeFailing".into(), AlertStatus::Resolved)]
    );
    // UNHEALTHY again: the clock starts over.
    c.report("UNHEALTHY", 0, at(140));
    assert!(evaluate(&c.snap, at(200), &mut state).is_empty());
}

#[test]
fn a_new_leader_reposts_what_fires_and_trusts_the_report_time() {
    let mut c = Cluster::new();
    c.report("UNHEALTHY", 0, at(0));
    c.snap.down.insert("n2".into());
    // A fresh state is what a new leader starts with: an instance UNHEALTHY since a report
    // 5 minutes old fires on the first evaluation, and so does the DOWN node.
    let mut state = AlertState::new(AlertRules::default());
    let changes = evaluate(&c.snap, at(300), &mut state);
    let mut got = names(&changes);
    got.sort();
    assert_eq!(
        got,
        [
            ("NodeDown".into(), AlertStatus::Firing),
            ("ProbeFailing".into(), AlertStatus::Firing)
        ]
    );
}

#[test]
fn stopping_and_vanished_instances_resolve() {
    let mut c = Cluster::new();
    let mut state = AlertState::new(AlertRules::default());
    c.report("FAILED", 5, at(0));
    c.report_on("ins-2", "FAILED", 5, at(0));
    assert_eq!(evaluate(&c.snap, at(0), &mut state).len(), 2);
    c.set_stopping("ins-1");
    c.snap.instances.get_mut("ctr-1").unwrap().remove("ins-2");
    let changes = evaluate(&c.snap, at(1), &mut state);
    assert_eq!(changes.len(), 2);
    assert!(changes.iter().all(|a| a.status == AlertStatus::Resolved));
    assert!(state.restarts.is_empty() && state.unhealthy_since.is_empty());
}

#[test]
fn webhook_messages_group_by_alert_name_in_the_alertmanager_format() {
    let mut c = Cluster::new();
    let mut state = AlertState::new(AlertRules::default());
    c.snap.down.insert("n1".into());
    c.snap.down.insert("n2".into());
    c.report("FAILED", 4, at(0));
    let changes = evaluate(&c.snap, at(0), &mut state);
    let messages = WebhookMessage::group(&changes);
    assert_eq!(messages.len(), 2);
    let v = serde_json::to_value(&messages[1]).unwrap();
    assert_eq!(v["version"], "4");
    assert_eq!(v["status"], "firing");
    assert_eq!(v["receiver"], "berth");
    assert_eq!(v["groupKey"], "{}:{alertname=\"NodeDown\"}");
    assert_eq!(v["groupLabels"], json!({"alertname": "NodeDown"}));
    assert_eq!(
        v["commonLabels"],
        json!({"alertname": "NodeDown", "severity": "critical"})
    );
    assert_eq!(v["truncatedAlerts"], 0);
    assert_eq!(v["externalURL"], "");
    let alerts = v["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2);
    for key in [
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    ] {
        assert!(alerts[0].get(key).is_some(), "{key} missing in {v}");
    }
    assert_eq!(alerts[0]["endsAt"], ZERO_TIME);

    c.snap.down.clear();
    let resolved = WebhookMessage::group(&evaluate(&c.snap, at(9), &mut state));
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].status, AlertStatus::Resolved);
    assert_eq!(resolved[0].alerts.len(), 2);
}

#[test]
fn fingerprints_are_stable_and_tell_labels_apart() {
    let l = |v: &str| {
        BTreeMap::from([
            ("alertname".to_owned(), "NodeDown".to_owned()),
            ("node_id".to_owned(), v.to_owned()),
        ])
    };
    assert_eq!(fingerprint(&l("n1")), fingerprint(&l("n1")));
    assert_ne!(fingerprint(&l("n1")), fingerprint(&l("n2")));
    // Pinned: receivers may store it, so it must not change between releases.
    assert_eq!(fingerprint(&l("n1")), "a7070f19e7c8f8b7");
    assert_eq!(fingerprint(&BTreeMap::new()), "cbf29ce484222325");
}

#[test]
fn webhook_urls_must_be_http_with_a_host() {
    assert_eq!(
        parse_webhook_url("http://127.0.0.1:9093/hook")
            .unwrap()
            .as_str(),
        "http://127.0.0.1:9093/hook"
    );
    assert!(parse_webhook_url("https://alerts.example.com/x?token=1").is_ok());
    let e = parse_webhook_url("ftp://example.com/")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "alert webhook \"ftp://example.com/\" must use http or https, not \"ftp\""
    );
    let e = parse_webhook_url("example.com/hook")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("alert webhook \"example.com/hook\" is not a URL"),
        "{e}"
    );
    assert!(parse_webhook_url("http://").is_err());
    assert!(parse_webhook_url("unix:/run/x.sock").is_err());
}

#[test]
fn durations_read_naturally() {
    assert_eq!(human(Duration::from_secs(600)), "10m");
    assert_eq!(human(Duration::from_secs(150)), "2m30s");
    assert_eq!(human(Duration::from_secs(3600)), "1h");
    assert_eq!(human(Duration::from_millis(500)), "500ms");
}
