use time::macros::datetime;

use super::*;
use crate::client::{HttpProbe, Instance, LastRollout, Rollout};

fn instance(id: &str, node: &str, ip: &str, status: &str) -> Instance {
    Instance {
        instance_id: id.to_owned(),
        node_id: node.to_owned(),
        ip: ip.to_owned(),
        status: status.to_owned(),
        reason: String::new(),
        restarts: 0,
        revision: 1,
        image_digest: "sha256:0123456789abcdef".to_owned(),
        stopped: false,
    }
}

fn web() -> Container {
    Container {
        container_id: "ctr-7f3a".to_owned(),
        name: "web".to_owned(),
        image: "reg:5000/demo/httpd:1".to_owned(),
        status: "DEPLOYING".to_owned(),
        network_id: "net-1".to_owned(),
        cpu: "0.5".to_owned(),
        memory: "64MB".to_owned(),
        created_at: "2026-11-26T10:00:00Z".to_owned(),
        replicas: 3,
        instances: vec![
            instance("ctr-7f3a-0", "node-a", "10.10.0.2", "RUNNING"),
            instance("ctr-7f3a-1", "node-b", "10.10.0.3", "RUNNING"),
            Instance {
                reason: "no node has 0.5 cpu and 64MB free (2 nodes: 2 lack cpu)".to_owned(),
                ..instance("ctr-7f3a-2", "", "", "PENDING")
            },
        ],
        command: vec!["httpd".to_owned(), "-f".to_owned()],
        env: [("A".to_owned(), "1".to_owned())].into(),
        service_ip: String::new(),
        dns_name: String::new(),
        restart_policy: "always".to_owned(),
        max_restarts: 0,
        health: None,
        stop_signal: String::new(),
        stop_timeout: "10s".to_owned(),
        revision: 1,
        rollout: None,
        last_rollout: None,
    }
}

#[test]
fn ages() {
    let cases = [
        (-5, "0s"),
        (0, "0s"),
        (5, "5s"),
        (59, "59s"),
        (60, "1m"),
        (185, "3m"),
        (3599, "59m"),
        (3600, "1h"),
        (7300, "2h"),
        (86_399, "23h"),
        (86_400, "1d"),
        (4 * 86_400 + 5, "4d"),
        (400 * 86_400, "400d"),
    ];
    for (secs, want) in cases {
        assert_eq!(format_age(secs), want, "{secs}");
    }
}

#[test]
fn age_from_rfc3339() {
    let now = datetime!(2026-11-26 10:05:00 UTC);
    assert_eq!(age_since("2026-11-26T10:00:00Z", now), "5m");
    assert_eq!(age_since("2026-11-26T11:00:00+01:00", now), "5m");
    assert_eq!(age_since("2026-11-26T10:04:59.123456789Z", now), "0s");
    assert_eq!(age_since("2026-11-22T10:00:00Z", now), "4d");
    assert_eq!(age_since("2026-11-26T10:06:00Z", now), "0s");
    assert_eq!(age_since("", now), "-");
    assert_eq!(age_since("yesterday", now), "-");
}

#[test]
fn tables_align_without_trailing_spaces() {
    let rows = vec![
        vec!["a".to_owned(), "long value".to_owned(), "x".to_owned()],
        vec!["bbbb".to_owned(), "v".to_owned(), "yy".to_owned()],
    ];
    let t = table(&["ID", "VALUE", "LAST"], &rows);
    assert_eq!(
        t,
        "ID     VALUE        LAST\n\
         a      long value   x\n\
         bbbb   v            yy\n"
    );
    assert_eq!(table(&["ONLY"], &[]), "ONLY\n");
}

#[test]
fn ps_table() {
    let now = datetime!(2026-11-26 12:00:00 UTC);
    let mut other = web();
    other.container_id = "ctr-2".to_owned();
    other.name = String::new();
    other.replicas = 2;
    other.status = "RUNNING".to_owned();
    other.created_at = "2026-11-26T11:59:30Z".to_owned();
    other.service_ip = "10.96.0.7".to_owned();
    other.instances = vec![
        instance("ctr-2-0", "node-a", "10.10.0.9", "RUNNING"),
        instance("ctr-2-1", "node-a", "10.10.0.8", "RUNNING"),
    ];
    let t = containers_table(&[web(), other], now);
    assert_eq!(
        t,
        "CONTAINER ID   NAME   IMAGE                   STATUS      READY   SERVICE IP   IPS                   NODES           AGE\n\
         ctr-7f3a       web    reg:5000/demo/httpd:1   DEPLOYING   2/3     -            10.10.0.2,10.10.0.3   node-a,node-b   2h\n\
         ctr-2          -      reg:5000/demo/httpd:1   RUNNING     2/2     10.96.0.7    10.10.0.9,10.10.0.8   node-a          30s\n"
    );
}

#[test]
fn ready_counts_running_against_desired() {
    let mut c = web();
    assert_eq!(ready(&c), "2/3");
    c.replicas = 5;
    c.instances.clear();
    assert_eq!(ready(&c), "0/5");
}

#[test]
fn sizes_and_cores() {
    let cases = [
        (0, "0B"),
        (1000, "1000B"),
        (1024, "1KiB"),
        (64 << 20, "64MiB"),
        (64_000_000, "61MiB"),
        (1536 << 20, "1.5GiB"),
        (24 << 30, "24GiB"),
        ((24 << 30) - (192 << 20), "23.8GiB"),
        (3 << 40, "3TiB"),
        (5000 << 40, "5000TiB"),
    ];
    for (bytes, want) in cases {
        assert_eq!(human_bytes(bytes), want, "{bytes}");
    }
    let cases = [
        (2.0, "2"),
        (1.5, "1.5"),
        (0.5, "0.5"),
        (1.0 / 3.0, "0.33"),
        (0.0, "0"),
        (10.0, "10"),
        (0.001, "0"),
    ];
    for (cores, want) in cases {
        assert_eq!(human_cpu(cores), want, "{cores}");
    }
}

#[test]
fn nodes_table_shows_available_over_total() {
    let nodes = [Node {
        node_id: "node-a".to_owned(),
        hostname: "host-a".to_owned(),
        ip: "10.99.0.2".to_owned(),
        status: "HEALTHY".to_owned(),
        cpu_total: 2.0,
        cpu_available: 0.5,
        memory_total: 24 << 30,
        memory_available: (24 << 30) - (192 << 20),
        instances: 3,
        unschedulable: false,
    }];
    assert_eq!(
        nodes_table(&nodes),
        "NODE ID   HOSTNAME   IP          STATUS    CPU     MEMORY          INSTANCES\n\
         node-a    host-a     10.99.0.2   HEALTHY   0.5/2   23.8GiB/24GiB   3\n"
    );
}

#[test]
fn nodes_table_marks_cordoned_nodes() {
    let node = |id: &str, unschedulable: bool| Node {
        node_id: id.to_owned(),
        hostname: id.to_owned(),
        ip: "10.99.0.2".to_owned(),
        status: "HEALTHY".to_owned(),
        cpu_total: 2.0,
        cpu_available: 2.0,
        memory_total: 1 << 30,
        memory_available: 1 << 30,
        instances: 0,
        unschedulable,
    };
    assert_eq!(
        nodes_table(&[node("n1", true), node("n2", false)]),
        "NODE ID   HOSTNAME   IP          STATUS                       CPU   MEMORY      INSTANCES\n\
         n1        n1         10.99.0.2   HEALTHY,SchedulingDisabled   2/2   1GiB/1GiB   0\n\
         n2        n2         10.99.0.2   HEALTHY                      2/2   1GiB/1GiB   0\n"
    );
}

#[test]
fn inspect_view() {
    let now = datetime!(2026-11-26 10:00:05 UTC);
    let text = container_details(&web(), now);
    let want = "\
Container ID: ctr-7f3a
Name:         web
Image:        reg:5000/demo/httpd:1
Status:       DEPLOYING
Ready:        2/3
Network:      net-1
Service IP:   -
DNS name:     -
Revision:     1
Rollout:      -
Last rollout: -
Restart:      always
Health:       -
Stop:         the image's stop signal (else SIGTERM), then SIGKILL after 10s
CPU:          0.5
Memory:       64MB
Command:      httpd -f
Env:          A=1
Created:      2026-11-26T10:00:00Z (5s ago)
Instances:
  INSTANCE ID   NODE     IP          STATUS    REVISION   RESTARTS   REASON
  ctr-7f3a-0    node-a   10.10.0.2   RUNNING   1          0          -
  ctr-7f3a-1    node-b   10.10.0.3   RUNNING   1          0          -
  ctr-7f3a-2    -        -           PENDING   1          0          no node has 0.5 cpu and 64MB free (2 nodes: 2 lack cpu)
";
    assert_eq!(text, want);
}

#[test]
fn inspect_shows_health_stop_and_rollouts() {
    let now = datetime!(2026-11-26 10:00:05 UTC);
    let mut c = web();
    c.status = "UPDATING".to_owned();
    c.revision = 2;
    c.stop_signal = "SIGQUIT".to_owned();
    c.stop_timeout = "30s".to_owned();
    c.health = Some(Health {
        http: Some(HttpProbe {
            path: "/healthz".to_owned(),
            port: 8080,
        }),
        interval: "10s".to_owned(),
        timeout: "1s".to_owned(),
        failure_threshold: 3,
        start_period: "0s".to_owned(),
        ..Health::default()
    });
    c.rollout = Some(Rollout {
        state: "UPDATING".to_owned(),
        revision: 2,
        from_revision: 1,
        max_unavailable: 1,
        reason: String::new(),
        started_at: "2026-11-26T10:00:01Z".to_owned(),
    });
    c.last_rollout = Some(LastRollout {
        revision: 1,
        result: "COMPLETE".to_owned(),
        reason: String::new(),
        finished_at: "2026-11-26T09:00:00Z".to_owned(),
    });
    c.instances[0].revision = 2;
    c.instances[1].status = "UNHEALTHY".to_owned();
    c.instances[1].restarts = 2;
    let text = container_details(&c, now);
    for line in [
        "Revision:     2\n",
        "Rollout:      UPDATING to revision 2 from 1, at most 1 unavailable, started 2026-11-26T10:00:01Z\n",
        "Last rollout: revision 1 COMPLETE at 2026-11-26T09:00:00Z\n",
        "Health:       http GET /healthz on port 8080, every 10s, timeout 1s, unhealthy after 3 failures, start period 0s\n",
        "Stop:         SIGQUIT, then SIGKILL after 30s\n",
        "  ctr-7f3a-0    node-a   10.10.0.2   RUNNING     2          0          -\n",
        "  ctr-7f3a-1    node-b   10.10.0.3   UNHEALTHY   1          2          -\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    c.last_rollout = Some(LastRollout {
        revision: 3,
        result: "ROLLED_BACK".to_owned(),
        reason: "ins-1 failed its probe".to_owned(),
        finished_at: String::new(),
    });
    assert!(container_details(&c, now)
        .contains("Last rollout: revision 3 ROLLED_BACK: ins-1 failed its probe\n"));
    let tcp = Health {
        tcp: Some(crate::client::TcpProbe { port: 80 }),
        ..Health::default()
    };
    assert!(health_cell(&tcp).starts_with("tcp connect to port 80, "));
    let exec = Health {
        exec: Some(crate::client::ExecProbe {
            command: vec!["cat".to_owned(), "/ok".to_owned()],
        }),
        ..Health::default()
    };
    assert!(health_cell(&exec).starts_with("exec cat /ok, "));
}

#[test]
fn revisions_table_marks_the_current_one() {
    let now = datetime!(2026-11-26 12:00:00 UTC);
    let rev = |n: u64, image: &str, cause: &str, current: bool| Revision {
        revision: n,
        image: image.to_owned(),
        image_digest: format!("sha256:{n}{}", "ab".repeat(32)),
        cpu: "0.1".to_owned(),
        memory: "64MiB".to_owned(),
        created_at: "2026-11-26T11:00:00Z".to_owned(),
        cause: cause.to_owned(),
        current,
        ..Revision::default()
    };
    let mut third = rev(3, "reg/app:v1", "rollback to 1", true);
    third.image_digest = String::new();
    third.created_at = "2026-11-26T11:59:50Z".to_owned();
    let t = revisions_table(
        &[
            rev(1, "reg/app:v1", "create", false),
            rev(2, "reg/app:v2", "update", false),
            third,
        ],
        now,
    );
    assert_eq!(
        t,
        "REVISION   IMAGE        DIGEST         CPU   MEMORY   CAUSE           CREATED\n\
         1          reg/app:v1   1abababababa   0.1   64MiB    create          1h ago\n\
         2          reg/app:v2   2abababababa   0.1   64MiB    update          1h ago\n\
         3 *        reg/app:v1   -              0.1   64MiB    rollback to 1   10s ago\n"
    );
    assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
    assert_eq!(short_digest("abc"), "abc");
    assert_eq!(short_digest(""), "-");
}

fn usage(id: &str, node: &str) -> InstanceStats {
    InstanceStats {
        instance_id: id.to_owned(),
        node_id: node.to_owned(),
        status: "RUNNING".to_owned(),
        cpu_percent: 1.5,
        cpu_seconds: 12.3,
        memory_bytes: 12 << 20,
        memory_limit_bytes: 64 << 20,
        rx_bytes: 1536,
        tx_bytes: 2048,
        restarts: 1,
        ..InstanceStats::default()
    }
}

#[test]
fn stats_table_with_an_unreachable_node() {
    let stats = ContainerStats {
        container_id: "ctr-1".to_owned(),
        instances: vec![
            usage("ins-a", "node-a"),
            InstanceStats {
                memory_limit_bytes: 0,
                cpu_percent: 0.0,
                ..usage("ins-b", "node-b")
            },
            InstanceStats {
                error: "node node-c unreachable".to_owned(),
                status: "RUNNING".to_owned(),
                ..InstanceStats {
                    instance_id: "ins-c".to_owned(),
                    node_id: "node-c".to_owned(),
                    ..InstanceStats::default()
                }
            },
        ],
    };
    assert_eq!(
        stats_table(&stats),
        "INSTANCE   NODE     STATUS    CPU%    MEM/LIMIT     NET RX/TX     RESTARTS\n\
         ins-a      node-a   RUNNING   1.50%   12MiB/64MiB   1.5KiB/2KiB   1\n\
         ins-b      node-b   RUNNING   0.00%   12MiB/-       1.5KiB/2KiB   1\n\
         ins-c      node-c   RUNNING   -       -             -             0\n\
         ins-c: no stats: node node-c unreachable\n"
    );
}

#[test]
fn top_frames_name_containers_and_keep_going_past_errors() {
    let entries = vec![
        (
            "web".to_owned(),
            Ok(ContainerStats {
                container_id: "ctr-1".to_owned(),
                instances: vec![usage("ins-a", "node-a"), usage("ins-b", "node-b")],
            }),
        ),
        ("ctr-2".to_owned(), Err("no such container".to_owned())),
        (
            "idle".to_owned(),
            Ok(ContainerStats {
                container_id: "ctr-3".to_owned(),
                instances: vec![],
            }),
        ),
    ];
    assert_eq!(
        top_frame(&entries),
        "CONTAINER   INSTANCE   NODE     STATUS    CPU%    MEM/LIMIT     NET RX/TX     RESTARTS\n\
         web         ins-a      node-a   RUNNING   1.50%   12MiB/64MiB   1.5KiB/2KiB   1\n\
         web         ins-b      node-b   RUNNING   1.50%   12MiB/64MiB   1.5KiB/2KiB   1\n\
         ctr-2: no stats: no such container\n"
    );
}
