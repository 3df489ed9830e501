use super::*;

fn err_field<T: DeserializeOwned + std::fmt::Debug>(body: &str) -> (String, String) {
    match parse_body::<T>(body.as_bytes()).unwrap_err() {
        ServiceError::InvalidArgument { field, message } => (field, message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn wrong_type_names_the_field() {
    let (field, message) = err_field::<CreateContainerBody>(r#"{"image":"a","replicas":"three"}"#);
    assert_eq!(field, "replicas");
    assert!(message.contains("invalid type"), "{message}");
    assert!(!message.contains("line"), "{message}");
    let (field, _) = err_field::<CreateContainerBody>(r#"{"image":"a","command":["a",1]}"#);
    assert_eq!(field, "command[1]");
    let (field, _) = err_field::<CreateContainerBody>(r#"{"image":"a","env":{"A":1}}"#);
    assert_eq!(field, "env.A");
}

#[test]
fn unknown_and_missing_fields_are_named() {
    let (field, message) = err_field::<CreateContainerBody>(r#"{"image":"a","cpus":"1"}"#);
    assert_eq!(field, "cpus");
    assert!(message.contains("unknown field"), "{message}");
    let (field, message) = err_field::<CreateContainerBody>(r#"{"cpu":"1"}"#);
    assert_eq!(field, "image");
    assert!(message.contains("missing field"), "{message}");
    let (field, _) = err_field::<ScaleBody>("{}");
    assert_eq!(field, "replicas");
}

#[test]
fn garbage_bodies_are_body_errors() {
    assert_eq!(err_field::<ScaleBody>("").0, "body");
    assert_eq!(err_field::<ScaleBody>("not json").0, "body");
    assert_eq!(err_field::<ScaleBody>(r#"{"replicas":1} x"#).0, "body");
    assert_eq!(err_field::<ScaleBody>("[1]").0, "body");
}

#[test]
fn good_body_converts() {
    let b: CreateContainerBody = parse_body(
        br#"{"image":"reg/demo:1","cpu":"0.5","memory":"64MB","replicas":3,"network_id":"payments",
            "name":"web","command":["httpd","-f"],"env":{"A":"1"}}"#,
    )
    .unwrap();
    let c: CreateContainer = b.into();
    assert_eq!(c.replicas, Some(3));
    assert_eq!(c.network_id, "payments");
    assert_eq!(c.command, vec!["httpd", "-f"]);
    let b: CreateContainerBody = parse_body(br#"{"image":"x","replicas":null}"#).unwrap();
    assert_eq!(CreateContainer::from(b).replicas, None);
}

#[test]
fn error_body_shape() {
    let v = error_body(&ServiceError::invalid("cidr", "bad"));
    assert_eq!(
        v,
        serde_json::json!({"error": {"code": "invalid_argument", "message": "cidr: bad"}})
    );
    let v = error_body(&ServiceError::NotFound("container ctr-1 not found".into()));
    assert_eq!(v["error"]["code"], "not_found");
}
