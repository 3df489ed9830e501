use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use super::{handle, is_reply_to, server_failure, Outcome, TTL};
use crate::dns::Records;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 5);
const REPLICA: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

fn records() -> Records {
    let mut records = Records::new();
    records
        .add_service("web", "front", VIP)
        .unwrap()
        .add_instance("ins-1", "web", "front", REPLICA)
        .unwrap();
    records
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::new(0x4242, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

fn answer(message: &Message, can_forward: bool) -> Message {
    match handle(&message.to_vec().unwrap(), &records(), can_forward) {
        Outcome::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn addresses(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[test]
fn service_name_answers_the_vip() {
    let q = query("web.front.berth.", RecordType::A);
    let r = answer(&q, true);
    assert_eq!(r.metadata.id, 0x4242);
    assert_eq!(r.metadata.message_type, MessageType::Response);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(r.metadata.recursion_desired);
    assert!(r.metadata.recursion_available);
    assert_eq!(r.queries, q.queries);
    assert_eq!(addresses(&r), [VIP]);
    assert_eq!(r.answers[0].ttl, TTL);
    assert!(r.edns.is_none());
}

#[test]
fn instance_name_answers_the_replica_keeping_the_clients_case() {
    let q = query("INS-1.Web.FRONT.berth.", RecordType::A);
    let r = answer(&q, false);
    assert_eq!(addresses(&r), [REPLICA]);
    assert_eq!(r.queries, q.queries);
    assert!(r.answers[0].name.eq_case(q.queries[0].name()));
    assert!(!r.metadata.recursion_available);
}

#[test]
fn unknown_berth_name_is_nxdomain_with_soa() {
    let r = answer(&query("db.front.berth.", RecordType::A), true);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.metadata.authoritative);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities.len(), 1);
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(r.authorities[0].ttl, TTL);
}

#[test]
fn other_types_of_known_names_are_nodata() {
    for (name, qtype) in [
        ("web.front.berth.", RecordType::AAAA),
        ("ins-1.web.front.berth.", RecordType::MX),
        ("front.berth.", RecordType::A),
        ("berth.", RecordType::A),
    ] {
        let r = answer(&query(name, qtype), true);
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NoError,
            "{name} {qtype}"
        );
        assert!(r.answers.is_empty(), "{name} {qtype}");
        assert_eq!(r.authorities.len(), 1, "{name} {qtype}");
    }
}

#[test]
fn any_gets_the_address_and_the_apex_its_soa() {
    let r = answer(&query("web.front.berth.", RecordType::ANY), true);
    assert_eq!(addresses(&r), [VIP]);
    let r = answer(&query("Berth.", RecordType::SOA), true);
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].record_type(), RecordType::SOA);
}

#[test]
fn other_classes_in_the_zone_are_refused() {
    let mut q = query("web.front.berth.", RecordType::A);
    q.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(
        answer(&q, true).metadata.response_code,
        ResponseCode::Refused
    );
}

#[test]
fn outside_names_are_forwarded_or_do_not_exist() {
    let q = query("example.com.", RecordType::A);
    match handle(&q.to_vec().unwrap(), &records(), true) {
        Outcome::Forward(parsed) => assert_eq!(parsed.queries, q.queries),
        other => panic!("expected forward, got {other:?}"),
    }
    let r = answer(&q, false);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(!r.metadata.authoritative);
    assert_eq!(r.queries, q.queries);
}

#[test]
fn edns_queries_get_an_opt_record() {
    let mut q = query("web.front.berth.", RecordType::A);
    q.set_edns(Edns::new());
    let r = answer(&q, true);
    assert_eq!(r.edns.as_ref().map(Edns::max_payload), Some(1232));
    assert_eq!(addresses(&r), [VIP]);
}

#[test]
fn garbage_is_dropped_or_formerr() {
    let records = records();
    assert!(matches!(handle(&[], &records, true), Outcome::Drop));
    assert!(matches!(handle(&[1, 2, 3], &records, true), Outcome::Drop));
    // A header claiming one question, followed by a label running past the end.
    let packet = [
        0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0x3f, b'a', b'b',
    ];
    match handle(&packet, &records, true) {
        Outcome::Reply(bytes) => {
            let r = Message::from_vec(&bytes).unwrap();
            assert_eq!(r.metadata.id, 0xabcd);
            assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
            assert_eq!(r.metadata.message_type, MessageType::Response);
            assert!(r.metadata.recursion_desired);
        }
        other => panic!("expected formerr, got {other:?}"),
    }
    // Responses are never answered.
    let mut packet = query("web.front.berth.", RecordType::A).to_vec().unwrap();
    packet[2] |= 0x80;
    assert!(matches!(handle(&packet, &records, true), Outcome::Drop));
}

#[test]
fn other_shapes_of_queries_are_refused_politely() {
    let mut two = query("web.front.berth.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("x.berth.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        answer(&two, true).metadata.response_code,
        ResponseCode::FormErr
    );

    let mut none = query("web.front.berth.", RecordType::A);
    none.queries.clear();
    assert_eq!(
        answer(&none, true).metadata.response_code,
        ResponseCode::FormErr
    );

    let mut status = query("web.front.berth.", RecordType::A);
    status.metadata.op_code = OpCode::Status;
    let r = answer(&status, true);
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(r.metadata.id, 0x4242);
}

#[test]
fn servfail_keeps_id_and_question() {
    let q = query("example.com.", RecordType::AAAA);
    let r = Message::from_vec(&server_failure(&q).unwrap()).unwrap();
    assert_eq!(r.metadata.id, 0x4242);
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(r.queries, q.queries);
}

#[test]
fn replies_are_matched_by_id_and_qr_bit() {
    let q = query("example.com.", RecordType::A);
    let bytes = q.to_vec().unwrap();
    assert!(!is_reply_to(&bytes, 0x4242));
    let reply = server_failure(&q).unwrap();
    assert!(is_reply_to(&reply, 0x4242));
    assert!(!is_reply_to(&reply, 0x4243));
    assert!(!is_reply_to(&reply[..5], 0x4242));
}
