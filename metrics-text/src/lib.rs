//! The text formats of a `/metrics` scrape, shared by the hub and the agent: OpenMetrics 1.0 when
//! the scraper names it in `Accept` (Prometheus does), else the Prometheus text format 0.0.4 (what
//! `curl` and older scrapers get).

use prometheus_client::registry::Registry;

/// `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `Content-Type` of the Prometheus text format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text format of a scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (what Prometheus asks for first).
    OpenMetrics,
    /// Prometheus text 0.0.4 (what `curl` gets).
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it is named at all, else 0.0.4.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// Encodes `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn accept_picks_the_format_and_each_encodes_its_own_way() {
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;version=1.0.0,*/*;q=0.1")),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        let mut registry = Registry::default();
        let hits: Counter = Counter::default();
        hits.inc();
        registry.register("hits", "Hits", hits);
        let om = encode(&registry, Format::OpenMetrics).unwrap();
        assert!(
            om.contains("# TYPE hits counter") && om.ends_with("# EOF\n"),
            "{om}"
        );
        let prom = encode(&registry, Format::Prometheus).unwrap();
        assert!(
            prom.contains("hits_total 1") && !prom.contains("# EOF"),
            "{prom}"
        );
    }
}
