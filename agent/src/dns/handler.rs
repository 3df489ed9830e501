//! One DNS message in, one decision out: answer from the records, forward upstream, or drop.
//!
//! Pure functions over bytes, so every path (including malformed input) is unit-tested without
//! sockets.

use std::sync::LazyLock;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::records::{Lookup, Records, ZONE};

/// TTL of every berth answer, and the negative-caching TTL: short, since replicas move.
pub const TTL: u32 = 5;

/// Size of a DNS message header.
const HEADER_LEN: usize = 12;

/// UDP payload size advertised in EDNS answers (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// What to do with one received message.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not a berth name: relay the query upstream. Carries the parsed query, to build the
    /// SERVFAIL if no upstream answers.
    Forward(Box<Message>),
    /// Nothing worth answering (too short to carry an id, or itself a response).
    Drop,
}

/// Decides what to do with the message `packet`. `can_forward` says whether upstreams exist.
pub(crate) fn handle(packet: &[u8], records: &Records, can_forward: bool) -> Outcome {
    if packet.len() < HEADER_LEN {
        return Outcome::Drop;
    }
    // Answering responses would let two servers bounce one message between them forever.
    if packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let query = match Message::from_vec(packet) {
        Ok(query) => query,
        Err(error) => {
            tracing::debug!(%error, "malformed dns query");
            return Outcome::Reply(format_error(packet));
        }
    };
    if query.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if query.metadata.op_code != OpCode::Query {
        return reply(&response(&query, ResponseCode::NotImp, false));
    }
    let [question] = query.queries.as_slice() else {
        return reply(&response(&query, ResponseCode::FormErr, false));
    };
    let lookup = records.lookup_labels(question.name().iter());
    if lookup == Lookup::OutOfZone {
        if can_forward {
            return Outcome::Forward(Box::new(query));
        }
        // A node without an upstream resolver knows only berth's names: to its containers every
        // other name does not exist (NXDOMAIN, not authoritative), so clients fail fast instead of
        // retrying another server as they would on REFUSED.
        return reply(&response(&query, ResponseCode::NXDomain, false));
    }
    reply(&authoritative(&query, question, lookup, can_forward))
}

/// The SERVFAIL sent when no upstream answered a forwarded query.
pub(crate) fn server_failure(query: &Message) -> Option<Vec<u8>> {
    encode(&response(query, ResponseCode::ServFail, true))
}

/// True when `reply` is a response carrying the id of the query it should answer.
pub(crate) fn is_reply_to(reply: &[u8], id: u16) -> bool {
    reply.len() >= HEADER_LEN && reply[..2] == id.to_be_bytes() && reply[2] & 0x80 != 0
}

/// The answer for a name under `berth.`.
fn authoritative(query: &Message, question: &Query, lookup: Lookup, recursion: bool) -> Message {
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        return response(query, ResponseCode::Refused, recursion);
    }
    let code = match lookup {
        Lookup::NotFound => ResponseCode::NXDomain,
        _ => ResponseCode::NoError,
    };
    let mut message = response(query, code, recursion);
    message.metadata.authoritative = true;
    let qtype = question.query_type();
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    match lookup {
        Lookup::Address(ip) if wants(RecordType::A) => {
            // The owner name keeps the client's spelling: some resolvers check it (0x20).
            message.add_answer(Record::from_rdata(
                question.name().clone(),
                TTL,
                RData::A(A(ip)),
            ));
        }
        Lookup::Empty if wants(RecordType::SOA) && is_apex(question.name()) => {
            message.add_answers(soa());
        }
        // NXDOMAIN and NODATA carry the SOA so resolvers cache the miss for TTL only.
        _ => {
            message.add_authorities(soa());
        }
    }
    message
}

fn is_apex(name: &Name) -> bool {
    let mut labels = name.iter();
    matches!((labels.next(), labels.next()), (Some(l), None) if l.eq_ignore_ascii_case(ZONE.as_bytes()))
}

/// The zone's SOA record, or `None` if its constant names ever stopped parsing.
fn soa() -> Option<Record> {
    static SOA_RECORD: LazyLock<Option<Record>> = LazyLock::new(|| {
        let zone = Name::from_ascii(format!("{ZONE}.")).ok()?;
        let mname = Name::from_ascii(format!("ns.{ZONE}.")).ok()?;
        let rname = Name::from_ascii(format!("hostmaster.{ZONE}.")).ok()?;
        let soa = SOA::new(mname, rname, 1, 60, 10, 3600, TTL);
        Some(Record::from_rdata(zone, TTL, RData::SOA(soa)))
    });
    SOA_RECORD.clone()
}

/// A response to `query` with its id, opcode, RD/CD flags and question, and an OPT record
/// when the query had one (RFC 6891 requires it).
fn response(query: &Message, code: ResponseCode, recursion: bool) -> Message {
    let mut message = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    message.metadata = Metadata::response_from_request(&query.metadata);
    message.metadata.response_code = code;
    message.metadata.recursion_available = recursion;
    message.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        message.set_edns(edns);
    }
    message
}

fn reply(message: &Message) -> Outcome {
    match encode(message) {
        Some(bytes) => Outcome::Reply(bytes),
        None => Outcome::Drop,
    }
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            tracing::warn!(%error, id = message.metadata.id, "cannot encode dns response");
            None
        }
    }
}

/// FORMERR for a message that did not parse: only the header is trusted, so the answer is a
/// bare header with the query's id, opcode and RD bit.
fn format_error(packet: &[u8]) -> Vec<u8> {
    let mut header = vec![0u8; HEADER_LEN];
    header[..2].copy_from_slice(&packet[..2]);
    // QR = 1, opcode and RD copied; AA, TC cleared.
    header[2] = 0x80 | (packet[2] & 0x79);
    header[3] = ResponseCode::FormErr.low();
    header
}

#[cfg(test)]
mod tests;
