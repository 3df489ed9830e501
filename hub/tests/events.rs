//! The event log against a real etcd: writes (in a transaction, at once, queued), paging, expiry, the
//! REST list and NDJSON stream, the gRPC stream, and the backlog-to-live switch under concurrent writes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use berth_hub::api::grpc_events::GrpcEvents;
use berth_hub::events::{self, Cursor, Event, EventKind, Events, EventsConfig};
use berth_proto::v1;
use berth_proto::v1::event_service_server::EventService;
use common::{assert_invalid, wait_for, Hub};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use futures::{Stream, StreamExt};
use serde_json::Value;
use tower::ServiceExt;

fn writer(hub: &Hub) -> Events {
    Events::new(hub.store.clone(), EventsConfig::default())
}

fn ev(n: usize) -> Event {
    Event::instance("ctr-1", format!("ins-{n}"), events::types::STATUS)
        .with_node("n1")
        .with_status("RUNNING")
        .with_reason(format!("e{n}"))
}

/// (revision, nonce) of an event id, for ordering checks.
fn position(id: &str) -> (i64, String) {
    let c = Cursor::parse(id).unwrap();
    (c.revision, c.nonce.unwrap())
}

/// The raw NDJSON body of `GET path`, as it arrives.
async fn open_stream(
    router: &axum::Router,
    path: &str,
) -> (
    StatusCode,
    Option<String>,
    impl Stream<Item = Result<axum::body::Bytes, axum::Error>>,
) {
    let req = Request::get(path).body(Body::empty()).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, ctype, resp.into_body().into_data_stream())
}

/// Reads NDJSON lines until `n` events came; asserts every chunk boundary the test sees is a line end.
async fn read_lines(
    body: &mut (impl Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
    n: usize,
) -> Vec<Value> {
    let mut out = vec![];
    let mut partial = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} events", out.len()))
            .expect("stream ended")
            .unwrap();
        partial.extend_from_slice(&chunk);
        while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
            assert!(v.is_object(), "{v}");
            out.push(v);
        }
    }
    assert!(partial.is_empty(), "half a line left: {partial:?}");
    out
}

#[tokio::test]
async fn put_op_commits_with_the_state_change_only() {
    let hub = Hub::start(false).await;
    let events = writer(&hub);
    let op = events
        .put_op(&Event::container("ctr-x", events::types::CREATED))
        .await
        .unwrap();
    // A guard that fails: neither the change nor its event may exist.
    let txn = Txn::new()
        .when([Compare::version(
            "/berth/containers/ctr-x",
            CompareOp::Greater,
            0,
        )])
        .and_then([TxnOp::put("/berth/containers/ctr-x", "{}", None), op]);
    assert!(!hub.store.txn(txn).await.unwrap().succeeded());
    assert!(events::list(&hub.store, None, 10)
        .await
        .unwrap()
        .events
        .is_empty());

    let ops = [
        TxnOp::put("/berth/containers/ctr-x", "{}", None),
        events
            .put_op(&Event::container("ctr-x", events::types::CREATED).with_reason("first"))
            .await
            .unwrap(),
        events
            .put_op(&Event::container("ctr-x", events::types::SCALED).with_reason("second"))
            .await
            .unwrap(),
    ];
    let resp = hub.store.txn(Txn::new().and_then(ops)).await.unwrap();
    let rev = resp.header().unwrap().revision();
    let page = events::list(&hub.store, None, 10).await.unwrap();
    let got: Vec<_> = page.events.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(
        got,
        ["first", "second"],
        "two events of one txn keep their order"
    );
    for e in &page.events {
        assert_eq!(position(&e.event_id).0, rev);
        assert_eq!(e.kind, EventKind::Container);
        assert_eq!(e.id, "ctr-x");
        time::OffsetDateTime::parse(&e.time, &time::format_description::well_known::Rfc3339)
            .unwrap();
    }
    // Events live outside /berth/: the scheduler's watch and snapshots never see them.
    assert!(hub
        .keys("/berth/")
        .await
        .iter()
        .all(|k| !k.contains("event")));
}

#[tokio::test]
async fn since_pages_through_everything_once() {
    let hub = Hub::start(false).await;
    let events = writer(&hub);
    // Some single writes, some several per transaction.
    let mut n = 0;
    while n < 37 {
        if n % 5 == 0 {
            let mut ops = vec![];
            for k in 0..3 {
                ops.push(events.put_op(&ev(n + k)).await.unwrap());
            }
            hub.store.txn(Txn::new().and_then(ops)).await.unwrap();
            n += 3;
        } else {
            events.record(&ev(n)).await.unwrap();
            n += 1;
        }
    }
    let all: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();

    // REST paging with `next`, 7 at a time.
    let mut seen = vec![];
    let mut since = "0".to_owned();
    loop {
        let (status, body) = hub.get(&format!("/v1/events?since={since}&limit=7")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let page = body["events"].as_array().unwrap();
        assert!(page.len() <= 7);
        seen.extend(
            page.iter()
                .map(|e| e["reason"].as_str().unwrap().to_owned()),
        );
        since = body["next"].as_str().unwrap().to_owned();
        if !body["more"].as_bool().unwrap() {
            break;
        }
    }
    assert_eq!(seen, all);
    // `next` of the last page is the read revision: nothing new after it.
    let (_, body) = hub.get(&format!("/v1/events?since={since}")).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 0, "{body}");
    events.record(&ev(1000)).await.unwrap();
    let (_, body) = hub.get(&format!("/v1/events?since={since}")).await;
    assert_eq!(body["events"][0]["reason"], "e1000");

    // Ids increase strictly, and `since=<id>` starts right after that event, even mid-transaction.
    let full = events::list(&hub.store, None, 1000).await.unwrap().events;
    for w in full.windows(2) {
        assert!(position(&w[0].event_id) < position(&w[1].event_id));
    }
    let mid = &full[1]; // the second event of the first transaction
    let after = events::list(
        &hub.store,
        Some(&Cursor::parse(&mid.event_id).unwrap()),
        1000,
    )
    .await
    .unwrap();
    assert_eq!(after.events, full[2..].to_vec());

    // Without `since`: the most recent ones, oldest first.
    let (_, body) = hub.get("/v1/events?limit=3").await;
    let reasons: Vec<_> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    let want = [format!("e{}", n - 2), format!("e{}", n - 1), "e1000".into()];
    assert_eq!(reasons, want);
    assert_eq!(body["more"], true);
    // The wire shape.
    let e = &body["events"][2];
    assert_eq!(e["kind"], "instance");
    assert_eq!(e["type"], "status");
    assert_eq!(e["status"], "RUNNING");
    assert_eq!(e["container_id"], "ctr-1");
    assert_eq!(e["node_id"], "n1");
    assert_eq!(e["id"], "ins-1000");
}

#[tokio::test]
async fn bad_query_parameters_are_400s_naming_them() {
    let hub = Hub::start(false).await;
    for (query, field) in [
        ("since=abc", "since"),
        ("since=12-xyz", "since"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("limit=-3", "limit"),
        ("watch=maybe", "watch"),
        ("watch=true&limit=5", "limit"),
        ("since=1&since=2", "since"),
        ("follow=true", "follow"),
    ] {
        let resp = hub.get(&format!("/v1/events?{query}")).await;
        assert_invalid(&resp, field);
    }
    let (status, body) = hub.get("/v1/events").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["events"], serde_json::json!([]));
}

#[tokio::test]
async fn events_expire_after_their_ttl_with_one_lease_per_bucket() {
    let hub = Hub::start(false).await;
    let events = Events::new(
        hub.store.clone(),
        EventsConfig {
            ttl: Duration::from_secs(2),
            ..EventsConfig::default()
        },
    );
    for i in 0..20 {
        events.record(&ev(i)).await.unwrap();
    }
    let (kvs, _) = hub.store.get_prefix(events::PREFIX).await.unwrap();
    assert_eq!(kvs.len(), 20);
    let leases: HashSet<i64> = kvs.iter().map(|kv| kv.lease()).collect();
    assert!(!leases.contains(&0), "every event is bound to a lease");
    // The bucket is 1 s for a 2 s TTL: 20 quick writes span at most two buckets.
    assert!(leases.len() <= 2, "{} leases for 20 events", leases.len());
    let started = std::time::Instant::now();
    wait_for(10, "events to expire", || async {
        let page = events::list(&hub.store, None, 100).await.unwrap();
        page.events.is_empty().then_some(())
    })
    .await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1500),
        "expired after {lived:?}"
    );
    // A later event gets a fresh lease: writing still works after the bucket's lease is gone.
    events.record(&ev(99)).await.unwrap();
    assert_eq!(
        events::list(&hub.store, None, 10)
            .await
            .unwrap()
            .events
            .len(),
        1
    );
}

#[tokio::test]
async fn emit_writes_in_order_in_the_background_and_drops_when_etcd_is_down() {
    let mut hub = Hub::start(false).await;
    let events = writer(&hub);
    for i in 0..250 {
        events.emit(ev(i));
    }
    let got = wait_for(10, "emitted events", || async {
        let page = events::list(&hub.store, None, 1000).await.unwrap();
        (page.events.len() == 250).then_some(page.events)
    })
    .await;
    let reasons: Vec<String> = got.into_iter().map(|e| e.reason).collect();
    assert_eq!(
        reasons,
        (0..250).map(|i| format!("e{i}")).collect::<Vec<_>>()
    );
    assert_eq!(events.dropped(), 0);

    let small = Events::new(
        hub.store.clone(),
        EventsConfig {
            queue: 2,
            ..EventsConfig::default()
        },
    );
    hub.etcd.kill();
    let started = std::time::Instant::now();
    for i in 0..20 {
        small.emit(ev(i));
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "emit must not wait for etcd"
    );
    // At most one event in the writer's hands and two queued.
    assert!(small.dropped() >= 17, "dropped {}", small.dropped());
}

#[tokio::test]
async fn ndjson_stream_sends_backlog_then_live_events() {
    let hub = Hub::start(false).await;
    let events = writer(&hub);
    let router = berth_hub::api::rest::router(hub.service.clone());
    for i in 0..3 {
        events.record(&ev(i)).await.unwrap();
    }
    let (status, ctype, mut body) = open_stream(&router, "/v1/events?since=0&watch=true").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype.as_deref(), Some("application/x-ndjson"));
    let backlog = read_lines(&mut body, 3).await;
    events.record(&ev(3)).await.unwrap();
    let live = read_lines(&mut body, 1).await;
    let all: Vec<_> = backlog.iter().chain(&live).collect();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["reason"], format!("e{i}"));
        assert!(e["event_id"].as_str().unwrap().contains('-'));
    }
    // A watch without `since` starts from now.
    let (_, _, mut fresh) = open_stream(&router, "/v1/events?watch=true").await;
    events.record(&ev(4)).await.unwrap();
    assert_eq!(read_lines(&mut fresh, 1).await[0]["reason"], "e4");
    // Resuming after the last event seen continues exactly there.
    let last = live[0]["event_id"].as_str().unwrap();
    let (_, _, mut resumed) =
        open_stream(&router, &format!("/v1/events?since={last}&watch=true")).await;
    assert_eq!(read_lines(&mut resumed, 1).await[0]["reason"], "e4");
}

/// The switch from backlog to live under fire: writers never stop while watches open, and every watch
/// must deliver each event exactly once, in the order of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_switch_has_no_gap_and_no_duplicate_under_concurrent_writes() {
    const PER_WRITER: usize = 150;
    const WRITERS: usize = 3;
    let hub = Hub::start(false).await;
    let router = berth_hub::api::rest::router(hub.service.clone());
    let events = writer(&hub);
    let mut tasks = vec![];
    for w in 0..WRITERS {
        let events = events.clone();
        let store = hub.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while i < PER_WRITER {
                let e = |i: usize| {
                    Event::node(format!("n{w}"), events::types::HEALTHY)
                        .with_reason(format!("w{w}-{i}"))
                };
                if w == 0 && i % 4 == 0 && i + 2 <= PER_WRITER {
                    // Two events in one transaction.
                    let ops = vec![
                        events.put_op(&e(i)).await.unwrap(),
                        events.put_op(&e(i + 1)).await.unwrap(),
                    ];
                    store.txn(Txn::new().and_then(ops)).await.unwrap();
                    i += 2;
                } else {
                    events.record(&e(i)).await.unwrap();
                    i += 1;
                }
            }
        }));
    }
    let total = PER_WRITER * WRITERS;
    // Open watches at staggered moments while the writers run.
    let mut streams = vec![];
    let mut opened_mid_write = 0;
    for k in 0..6 {
        tokio::time::sleep(Duration::from_millis(15 * k)).await;
        let (status, _, body) = open_stream(&router, "/v1/events?since=0&watch=true").await;
        assert_eq!(status, StatusCode::OK);
        streams.push(Box::pin(body));
        let (kvs, _) = hub.store.get_prefix(events::PREFIX).await.unwrap();
        if (1..total).contains(&kvs.len()) {
            opened_mid_write += 1;
        }
    }
    assert!(
        opened_mid_write > 0,
        "no watch opened while the writers ran: the switch was not exercised"
    );
    // And one gRPC watch.
    let grpc = GrpcEvents::new(hub.store.clone());
    let mut grpc_stream = grpc
        .watch(tonic::Request::new(v1::WatchEventsRequest {
            since: "0".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    for t in tasks {
        t.await.unwrap();
    }
    let log = events::list(&hub.store, Some(&Cursor::parse("0").unwrap()), 1000)
        .await
        .unwrap();
    assert_eq!(log.events.len(), total);
    let expected: Vec<String> = log.events.iter().map(|e| e.event_id.clone()).collect();
    for w in 0..WRITERS {
        let mine: Vec<_> = log
            .events
            .iter()
            .filter(|e| e.id == format!("n{w}"))
            .map(|e| e.reason.clone())
            .collect();
        let want: Vec<_> = (0..PER_WRITER).map(|i| format!("w{w}-{i}")).collect();
        assert_eq!(mine, want, "writer {w} order");
    }
    for (k, body) in streams.iter_mut().enumerate() {
        let got: Vec<String> = read_lines(body, total)
            .await
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, expected, "stream {k}");
    }
    let mut got = vec![];
    while got.len() < total {
        let e = tokio::time::timeout(Duration::from_secs(10), grpc_stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(e.event_id);
    }
    assert_eq!(got, expected, "grpc stream");
}

#[tokio::test]
async fn grpc_watch_streams_and_checks_since() {
    let hub = Hub::start(false).await;
    let events = writer(&hub);
    let grpc = GrpcEvents::new(hub.store.clone());
    events
        .record(&Event::node("n1", events::types::REGISTERED))
        .await
        .unwrap();
    let err = grpc
        .watch(tonic::Request::new(v1::WatchEventsRequest {
            since: "nope".into(),
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("since: "), "{}", err.message());

    let mut stream = grpc
        .watch(tonic::Request::new(v1::WatchEventsRequest {
            since: "0".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        (
            first.kind.as_str(),
            first.id.as_str(),
            first.r#type.as_str()
        ),
        ("node", "n1", "registered")
    );
    assert_eq!(first.node_id, "n1");
    events
        .record(
            &Event::instance("ctr-1", "ins-1", events::types::PLACED)
                .with_node("n1")
                .with_reason("fits"),
        )
        .await
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.container_id, "ctr-1");
    assert_eq!(second.r#type, "placed");
    assert_eq!(second.status, "");
    assert!(position(&second.event_id) > position(&first.event_id));
}

#[tokio::test]
async fn stream_ignores_expiry_deletes_and_foreign_keys() {
    let hub = Hub::start(false).await;
    let events = Events::new(
        hub.store.clone(),
        EventsConfig {
            ttl: Duration::from_secs(2),
            ..EventsConfig::default()
        },
    );
    let router = berth_hub::api::rest::router(hub.service.clone());
    events.record(&ev(0)).await.unwrap();
    let (_, _, mut body) = open_stream(&router, "/v1/events?watch=true").await;
    // A stray value under the prefix is skipped, not fatal.
    let mut kv = hub.store.client().kv_client();
    kv.put(format!("{}zz", events::PREFIX), "not json", None)
        .await
        .unwrap();
    // Wait for e0 to expire (a delete the stream must not show), then write another.
    wait_for(10, "expiry", || async {
        let resp = hub
            .store
            .client()
            .kv_client()
            .get(
                events::PREFIX,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        // Only the stray key is left.
        (resp.count() == 1).then_some(())
    })
    .await;
    events.record(&ev(1)).await.unwrap();
    let got = read_lines(&mut body, 1).await;
    assert_eq!(got[0]["reason"], "e1");
}
