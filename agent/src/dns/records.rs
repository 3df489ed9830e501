//! The table of names the node answers for, and how a query name is looked up in it.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

/// The zone every berth name lives in (without the trailing dot).
pub const ZONE: &str = "berth";

/// A name that cannot become a DNS label.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A container, network or instance name is not a single DNS label.
    #[error("{field} {value:?} is not a dns label (1 to 63 letters, digits, '-' or '_')")]
    InvalidLabel {
        /// Which part of the name: `container`, `network` or `instance`.
        field: &'static str,
        /// The offending value.
        value: String,
    },
}

/// What [`Records::lookup`] knows about a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The name has an A record.
    Address(Ipv4Addr),
    /// The name exists but has no address: the zone apex `berth.` or a name with berth names
    /// below it (`<network>.berth.`). Queries for it get NOERROR without answers, not NXDOMAIN,
    /// since NXDOMAIN would tell resolvers that nothing below it exists either (RFC 8020).
    Empty,
    /// The name is under `berth.` and unknown.
    NotFound,
    /// The name is not under `berth.`: not ours to answer.
    OutOfZone,
}

/// The names under `berth.` that a node answers for, built from the agent's view of the
/// cluster and swapped into a running [`super::DnsServer`] as a whole.
///
/// Names are case-insensitive (stored in lower case). `<container>.<network>.berth` is the
/// service name and maps to the container's service VIP; `<instance>.<container>.<network>.berth`
/// maps to one replica's address. Adding a name twice keeps the last address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    addresses: HashMap<String, Ipv4Addr>,
    /// Proper ancestors of the names above, down to (excluding) the zone apex.
    interior: HashSet<String>,
}

impl Records {
    /// An empty table: every berth name is NXDOMAIN.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `<container>.<network>.berth` to the container's service VIP.
    pub fn add_service(
        &mut self,
        container: &str,
        network: &str,
        vip: Ipv4Addr,
    ) -> Result<&mut Self, RecordError> {
        let name = service_name(container, network)?;
        self.insert(name, vip);
        Ok(self)
    }

    /// Maps `<instance>.<container>.<network>.berth` to that replica's address.
    pub fn add_instance(
        &mut self,
        instance: &str,
        container: &str,
        network: &str,
        ip: Ipv4Addr,
    ) -> Result<&mut Self, RecordError> {
        let name = instance_name(instance, container, network)?;
        self.insert(name, ip);
        Ok(self)
    }

    /// Number of names with an address.
    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    /// True when no name has an address.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }

    /// Looks a name up, in any case, with or without the trailing dot.
    pub fn lookup(&self, name: &str) -> Lookup {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.lookup_labels(name.split('.').map(str::as_bytes))
    }

    /// Looks up a name given as its labels, most specific first (as DNS carries them).
    pub(crate) fn lookup_labels<'a>(&self, labels: impl Iterator<Item = &'a [u8]>) -> Lookup {
        let mut key = String::new();
        let mut last: &[u8] = &[];
        let mut valid = true;
        for label in labels {
            if !key.is_empty() {
                key.push('.');
            }
            // A label we could never have stored still has to be judged in or out of the zone.
            match std::str::from_utf8(label) {
                Ok(text) if !text.contains('.') => key.push_str(&text.to_ascii_lowercase()),
                _ => valid = false,
            }
            last = label;
        }
        if !last.eq_ignore_ascii_case(ZONE.as_bytes()) {
            return Lookup::OutOfZone;
        }
        if !valid {
            return Lookup::NotFound;
        }
        if let Some(ip) = self.addresses.get(&key) {
            Lookup::Address(*ip)
        } else if key == ZONE || self.interior.contains(&key) {
            Lookup::Empty
        } else {
            Lookup::NotFound
        }
    }

    fn insert(&mut self, name: String, ip: Ipv4Addr) {
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if parent == ZONE {
                break;
            }
            self.interior.insert(parent.to_owned());
            rest = parent;
        }
        self.addresses.insert(name, ip);
    }
}

impl FromIterator<(String, Ipv4Addr)> for Records {
    /// Builds a table from complete names (`web.net1.berth`, any case, trailing dot optional).
    /// Names outside `berth.` are skipped: the server could never be asked for them.
    fn from_iter<T: IntoIterator<Item = (String, Ipv4Addr)>>(entries: T) -> Self {
        let mut records = Records::new();
        for (name, ip) in entries {
            let name = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
            if name == ZONE || !name.ends_with(&format!(".{ZONE}")) {
                tracing::warn!(%name, "dns record outside the berth zone skipped");
                continue;
            }
            records.insert(name, ip);
        }
        records
    }
}

/// The service name of a container on a network: `<container>.<network>.berth` (lower case,
/// no trailing dot). This is the `dns_name` users see.
pub fn service_name(container: &str, network: &str) -> Result<String, RecordError> {
    check_label("container", container)?;
    check_label("network", network)?;
    // Three labels of at most 63 bytes and the zone stay under DNS's 253-byte limit.
    Ok(format!("{container}.{network}.{ZONE}").to_ascii_lowercase())
}

/// The name of one replica: `<instance>.<container>.<network>.berth` (lower case, no trailing
/// dot).
pub fn instance_name(
    instance: &str,
    container: &str,
    network: &str,
) -> Result<String, RecordError> {
    check_label("instance", instance)?;
    let service = service_name(container, network)?;
    Ok(format!("{}.{service}", instance.to_ascii_lowercase()))
}

fn check_label(field: &'static str, value: &str) -> Result<(), RecordError> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RecordError::InvalidLabel {
            field,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Records {
        let mut records = Records::new();
        records
            .add_service("web", "front", Ipv4Addr::new(10, 96, 0, 5))
            .unwrap()
            .add_instance("ins-1a2b", "web", "front", Ipv4Addr::new(10, 1, 0, 2))
            .unwrap()
            .add_instance("ins-3c4d", "web", "front", Ipv4Addr::new(10, 1, 0, 3))
            .unwrap();
        records
    }

    #[test]
    fn service_and_instance_names_resolve() {
        let records = sample();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records.lookup("web.front.berth"),
            Lookup::Address(Ipv4Addr::new(10, 96, 0, 5))
        );
        assert_eq!(
            records.lookup("ins-3c4d.web.front.berth."),
            Lookup::Address(Ipv4Addr::new(10, 1, 0, 3))
        );
    }

    #[test]
    fn lookup_ignores_case_and_trailing_dot() {
        let records = sample();
        let vip = Lookup::Address(Ipv4Addr::new(10, 96, 0, 5));
        assert_eq!(records.lookup("WEB.Front.BERTH."), vip);
        assert_eq!(records.lookup("web.front.berth"), vip);
        assert_eq!(
            records.lookup("INS-1A2B.web.front.berth"),
            Lookup::Address(Ipv4Addr::new(10, 1, 0, 2))
        );
    }

    #[test]
    fn names_added_in_upper_case_are_found_in_lower_case() {
        let mut records = Records::new();
        records
            .add_service("Web", "FRONT", Ipv4Addr::new(10, 96, 0, 9))
            .unwrap();
        assert_eq!(
            records.lookup("web.front.berth"),
            Lookup::Address(Ipv4Addr::new(10, 96, 0, 9))
        );
    }

    #[test]
    fn unknown_berth_names_are_not_found() {
        let records = sample();
        assert_eq!(records.lookup("db.front.berth"), Lookup::NotFound);
        assert_eq!(records.lookup("ins-9999.web.front.berth"), Lookup::NotFound);
        assert_eq!(
            records.lookup("x.ins-1a2b.web.front.berth"),
            Lookup::NotFound
        );
        assert_eq!(records.lookup("web.back.berth"), Lookup::NotFound);
        assert_eq!(Records::new().lookup("web.front.berth"), Lookup::NotFound);
    }

    #[test]
    fn apex_and_network_names_exist_without_address() {
        let records = sample();
        assert_eq!(records.lookup("berth."), Lookup::Empty);
        assert_eq!(records.lookup("BERTH"), Lookup::Empty);
        assert_eq!(records.lookup("front.berth"), Lookup::Empty);
        assert_eq!(Records::new().lookup("front.berth"), Lookup::NotFound);
    }

    #[test]
    fn other_names_are_out_of_zone() {
        let records = sample();
        assert_eq!(records.lookup("example.com."), Lookup::OutOfZone);
        assert_eq!(
            records.lookup("web.front.berth.example.com"),
            Lookup::OutOfZone
        );
        assert_eq!(records.lookup("notberth"), Lookup::OutOfZone);
        assert_eq!(records.lookup("."), Lookup::OutOfZone);
        assert_eq!(records.lookup(""), Lookup::OutOfZone);
    }

    #[test]
    fn binary_labels_in_the_zone_are_not_found() {
        let records = sample();
        let labels: [&[u8]; 3] = [b"w\xffb", b"front", b"berth"];
        assert_eq!(records.lookup_labels(labels.into_iter()), Lookup::NotFound);
        let dotted: [&[u8]; 2] = [b"web.front", b"berth"];
        assert_eq!(records.lookup_labels(dotted.into_iter()), Lookup::NotFound);
    }

    #[test]
    fn the_last_address_added_wins() {
        let mut records = sample();
        records
            .add_service("web", "front", Ipv4Addr::new(10, 96, 0, 6))
            .unwrap();
        assert_eq!(
            records.lookup("web.front.berth"),
            Lookup::Address(Ipv4Addr::new(10, 96, 0, 6))
        );
        assert_eq!(records.len(), 3);
    }

    #[test]
    fn invalid_labels_are_refused() {
        let mut records = Records::new();
        let ip = Ipv4Addr::new(10, 96, 0, 1);
        assert!(matches!(
            records.add_service("a.b", "net", ip),
            Err(RecordError::InvalidLabel {
                field: "container",
                ..
            })
        ));
        assert!(matches!(
            records.add_service("web", "", ip),
            Err(RecordError::InvalidLabel {
                field: "network",
                ..
            })
        ));
        assert!(matches!(
            records.add_instance(&"i".repeat(64), "web", "net", ip),
            Err(RecordError::InvalidLabel {
                field: "instance",
                ..
            })
        ));
        assert!(records.is_empty());
    }

    #[test]
    fn names_are_built_in_lower_case() {
        let long = "A".repeat(63);
        assert_eq!(instance_name(&long, &long, &long).unwrap().len(), 197);
        assert_eq!(service_name("Web", "front").unwrap(), "web.front.berth");
        assert_eq!(service_name("web", "front").unwrap(), "web.front.berth");
        assert_eq!(
            instance_name("ins-1", "web", "front").unwrap(),
            "ins-1.web.front.berth"
        );
    }

    #[test]
    fn records_collect_from_full_names() {
        let records: Records = [
            ("Web.Front.berth.".to_owned(), Ipv4Addr::new(10, 96, 0, 5)),
            (
                "ins-1.web.front.berth".to_owned(),
                Ipv4Addr::new(10, 1, 0, 2),
            ),
            ("example.com".to_owned(), Ipv4Addr::new(1, 2, 3, 4)),
            ("berth".to_owned(), Ipv4Addr::new(1, 2, 3, 4)),
        ]
        .into_iter()
        .collect();
        assert_eq!(records, sample_without_second_instance());
        assert_eq!(records.lookup("front.berth"), Lookup::Empty);
    }

    fn sample_without_second_instance() -> Records {
        let mut records = Records::new();
        records
            .add_service("web", "front", Ipv4Addr::new(10, 96, 0, 5))
            .unwrap()
            .add_instance("ins-1", "web", "front", Ipv4Addr::new(10, 1, 0, 2))
            .unwrap();
        records
    }
}
