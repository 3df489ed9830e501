use time::macros::datetime;

use super::*;
use crate::client::Instance;

fn instance(id: &str, node: &str, ip: &str, status: &str) -> Instance {
    Instance {
        instance_id: id.to_owned(),
        node_id: node.to_owned(),
        ip: ip.to_owned(),
        status: status.to_owned(),
        reason: String::new(),
        restarts: 0,
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
    }];
    assert_eq!(
        nodes_table(&nodes),
        "NODE ID   HOSTNAME   IP          STATUS    CPU     MEMORY          INSTANCES\n\
         node-a    host-a     10.99.0.2   HEALTHY   0.5/2   23.8GiB/24GiB   3\n"
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
Restart:      always
CPU:          0.5
Memory:       64MB
Command:      httpd -f
Env:          A=1
Created:      2026-11-26T10:00:00Z (5s ago)
Instances:
  INSTANCE ID   NODE     IP          STATUS    RESTARTS   REASON
  ctr-7f3a-0    node-a   10.10.0.2   RUNNING   0          -
  ctr-7f3a-1    node-b   10.10.0.3   RUNNING   0          -
  ctr-7f3a-2    -        -           PENDING   0          no node has 0.5 cpu and 64MB free (2 nodes: 2 lack cpu)
";
    assert_eq!(text, want);
}
