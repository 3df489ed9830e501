//! Bad requests get a 4xx naming the field, and leave nothing behind.

use berth_tests::{Api, Cluster, Reply};
use serde_json::{json, Value};

/// One bad request and what must come back.
struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    body: String,
    status: u16,
    /// Text the error message must contain (the field's name), if any.
    names: Option<&'static str>,
}

fn case(what: &'static str, method: &'static str, path: &str, body: &str, status: u16) -> Case {
    Case {
        what,
        method,
        path: path.to_string(),
        body: body.to_string(),
        status,
        names: None,
    }
}

impl Case {
    fn naming(mut self, field: &'static str) -> Case {
        self.names = Some(field);
        self
    }

    /// Sends it; returns what was wrong with the answer, if anything.
    fn check(&self, api: &Api) -> Option<String> {
        let reply: Reply = match self.method {
            "POST" => api.post_raw(&self.path, &self.body),
            "GET" => api.get(&self.path),
            "DELETE" => api.delete(&self.path),
            m => panic!("no method {m}"),
        }
        .unwrap_or_else(|e| panic!("{}: {e:#}", self.what));
        let mut wrong = Vec::new();
        if reply.status != self.status {
            wrong.push(format!("status {} (want {})", reply.status, self.status));
        }
        if reply.error_code().is_empty() || reply.error_message().is_empty() {
            wrong.push("no {\"error\":{\"code\",\"message\"}} body".to_string());
        }
        if let Some(field) = self.names {
            if !reply.error_message().contains(field) {
                wrong.push(format!("message does not name {field:?}"));
            }
        }
        (!wrong.is_empty()).then(|| {
            format!(
                "{} ({} {} {}): {} — got: {}",
                self.what,
                self.method,
                self.path,
                self.body,
                wrong.join(", "),
                reply.text
            )
        })
    }
}

/// Everything the hub lists, to compare before and after.
fn snapshot(api: &Api) -> (Vec<Value>, Vec<Value>) {
    let sorted = |mut v: Vec<Value>, key: &str| {
        v.sort_by_key(|x| x[key].to_string());
        v
    };
    (
        sorted(api.networks().expect("list networks"), "network_id"),
        sorted(api.containers().expect("list containers"), "container_id"),
    )
}

#[test]
fn bad_requests_get_4xx_naming_the_field_and_change_nothing() {
    // No agents needed: placement never matters to a rejected request, and an accepted one stays
    // PENDING, which is all the "network in use" case needs.
    let cluster = Cluster::builder()
        .nodes(0)
        .demo_image(false)
        .start()
        .expect("starting hub, etcd, registry");
    let api = cluster.api();
    let net = api
        .create_network("base", "10.20.0.0/16")
        .expect("create base network");
    let net_id = net["network_id"].as_str().expect("network_id").to_string();
    let image = format!("{}/demo/httpd:1", cluster.registry());
    let in_use = api
        .create_container(&json!({
            "image": image, "cpu": "0.5", "memory": "64MB", "network_id": net_id, "replicas": 1,
        }))
        .expect("create a container on the base network");

    // A valid container request with one field replaced by raw JSON text.
    let container = |field: &str, raw: &str| -> String {
        let mut body = json!({
            "image": image, "cpu": "0.5", "memory": "64MB", "network_id": net_id, "replicas": 1,
        });
        body[field] = serde_json::from_str(raw).expect("raw JSON of a case");
        body.to_string()
    };
    let without = |field: &str| -> String {
        let mut body = json!({
            "image": image, "cpu": "0.5", "memory": "64MB", "network_id": net_id, "replicas": 1,
        });
        body.as_object_mut().expect("object").remove(field);
        body.to_string()
    };
    let nets = "/v1/networks";
    let ctrs = "/v1/containers";
    let scale = format!("/v1/containers/{in_use}/scale");
    let cases = vec![
        case(
            "memory 4XB",
            "POST",
            ctrs,
            &container("memory", r#""4XB""#),
            400,
        )
        .naming("memory"),
        case(
            "memory negative",
            "POST",
            ctrs,
            &container("memory", r#""-5MB""#),
            400,
        )
        .naming("memory"),
        case("cpu abc", "POST", ctrs, &container("cpu", r#""abc""#), 400).naming("cpu"),
        case(
            "replicas -1",
            "POST",
            ctrs,
            &container("replicas", "-1"),
            400,
        )
        .naming("replicas"),
        case(
            "replicas 100000",
            "POST",
            ctrs,
            &container("replicas", "100000"),
            400,
        )
        .naming("replicas"),
        case(
            "replicas as string",
            "POST",
            ctrs,
            &container("replicas", r#""3""#),
            400,
        )
        .naming("replicas"),
        case(
            "image as number",
            "POST",
            ctrs,
            &container("image", "42"),
            400,
        )
        .naming("image"),
        case("image missing", "POST", ctrs, &without("image"), 400).naming("image"),
        case(
            "command as string",
            "POST",
            ctrs,
            &container("command", r#""httpd""#),
            400,
        )
        .naming("command"),
        case(
            "env as array",
            "POST",
            ctrs,
            &container("env", r#"["A=1"]"#),
            400,
        )
        .naming("env"),
        case(
            "unknown network_id",
            "POST",
            ctrs,
            &container("network_id", r#""net-doesnotexist""#),
            400,
        )
        .naming("network"),
        case("body not JSON", "POST", ctrs, "{not json", 400),
        case("body not an object", "POST", ctrs, "[1,2]", 400),
        case(
            "cidr not a network address",
            "POST",
            nets,
            r#"{"name":"x","cidr":"10.10.0.1/16"}"#,
            400,
        )
        .naming("cidr"),
        case(
            "cidr garbage",
            "POST",
            nets,
            r#"{"name":"x","cidr":"ten/8"}"#,
            400,
        )
        .naming("cidr"),
        case(
            "cidr inside an existing network",
            "POST",
            nets,
            r#"{"name":"x","cidr":"10.20.128.0/17"}"#,
            400,
        )
        .naming("cidr"),
        case(
            "cidr around an existing network",
            "POST",
            nets,
            r#"{"name":"x","cidr":"10.0.0.0/8"}"#,
            400,
        )
        .naming("cidr"),
        case(
            "cidr as number",
            "POST",
            nets,
            r#"{"name":"x","cidr":10}"#,
            400,
        )
        .naming("cidr"),
        case("scale to -1", "POST", &scale, r#"{"replicas":-1}"#, 400).naming("replicas"),
        case(
            "scale to 100000",
            "POST",
            &scale,
            r#"{"replicas":100000}"#,
            400,
        )
        .naming("replicas"),
        case(
            "get unknown container",
            "GET",
            "/v1/containers/ctr-nope",
            "",
            404,
        ),
        case(
            "delete unknown container",
            "DELETE",
            "/v1/containers/ctr-nope",
            "",
            404,
        ),
        case(
            "scale unknown container",
            "POST",
            "/v1/containers/ctr-nope/scale",
            r#"{"replicas":2}"#,
            404,
        ),
        case(
            "get unknown network",
            "GET",
            "/v1/networks/net-nope",
            "",
            404,
        ),
        case(
            "delete unknown network",
            "DELETE",
            "/v1/networks/net-nope",
            "",
            404,
        ),
        case(
            "delete network in use",
            "DELETE",
            &format!("{nets}/{net_id}"),
            "",
            409,
        ),
    ];

    let before = snapshot(api);
    let failures: Vec<String> = cases.iter().filter_map(|c| c.check(api)).collect();
    let after = snapshot(api);

    assert!(
        failures.is_empty(),
        "{} of {} bad requests were not rejected as they should:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(before.0, after.0, "networks changed by rejected requests");
    let ids =
        |v: &[Value]| -> Vec<String> { v.iter().map(|c| c["container_id"].to_string()).collect() };
    assert_eq!(
        ids(&before.1),
        ids(&after.1),
        "containers changed by rejected requests"
    );
    let c = api
        .container(&in_use)
        .expect("get container")
        .expect("container exists");
    assert_eq!(c["replicas"], 1, "a rejected scale changed replicas: {c}");
}
