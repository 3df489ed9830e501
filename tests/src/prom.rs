//! Scrapes of `/metrics` read with an independent parser (`openmetrics-parser`): the Prometheus text
//! format 0.0.4 or OpenMetrics 1.0, chosen by the answer's `Content-Type` as Prometheus does.

use anyhow::{anyhow, bail};
use openmetrics_parser::{openmetrics, prometheus, OpenMetricsValue, PrometheusValue};
use std::collections::BTreeMap;

/// Media type Prometheus asks for first.
pub const ACCEPT_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

/// One series: its labels and a number (a histogram's `_count`, a counter's total).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Label name → value.
    pub labels: BTreeMap<String, String>,
    /// The value (histograms: the observation count).
    pub value: f64,
}

/// A parsed scrape: family name → its series.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Families by the name in their `# TYPE` line (OpenMetrics counters without `_total`).
    pub families: BTreeMap<String, Vec<Series>>,
    /// Which format it was.
    pub openmetrics: bool,
}

impl Scrape {
    /// Parses `text` as OpenMetrics when `content_type` says so, else as Prometheus text 0.0.4.
    /// Fails with the parser's message when the text does not conform.
    pub fn parse(content_type: &str, text: &str) -> anyhow::Result<Scrape> {
        let mut out = Scrape {
            openmetrics: content_type.contains("application/openmetrics-text"),
            ..Scrape::default()
        };
        if out.openmetrics {
            let exp = openmetrics::parse_openmetrics(text)
                .map_err(|e| anyhow!("not valid OpenMetrics text: {e}"))?;
            for (name, fam) in exp.families {
                let series = fam
                    .iter_samples()
                    .map(|s| Series {
                        labels: s
                            .get_labelset()
                            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default(),
                        value: match &s.value {
                            OpenMetricsValue::Unknown(n)
                            | OpenMetricsValue::Gauge(n)
                            | OpenMetricsValue::StateSet(n) => n.as_f64(),
                            OpenMetricsValue::Counter(c) => c.value.as_f64(),
                            OpenMetricsValue::Histogram(h)
                            | OpenMetricsValue::GaugeHistogram(h) => {
                                h.count.unwrap_or_default() as f64
                            }
                            OpenMetricsValue::Summary(s) => s.count.unwrap_or_default() as f64,
                            OpenMetricsValue::Info => 1.0,
                        },
                    })
                    .collect();
                out.families.insert(name, series);
            }
        } else {
            let exp = prometheus::parse_prometheus(text)
                .map_err(|e| anyhow!("not valid Prometheus text 0.0.4: {e}"))?;
            for (name, fam) in exp.families {
                let series = fam
                    .iter_samples()
                    .map(|s| Series {
                        labels: s
                            .get_labelset()
                            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default(),
                        value: match &s.value {
                            PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => n.as_f64(),
                            PrometheusValue::Counter(c) => c.value.as_f64(),
                            PrometheusValue::Histogram(h) => h.count.unwrap_or_default() as f64,
                            PrometheusValue::Summary(s) => s.count.unwrap_or_default() as f64,
                        },
                    })
                    .collect();
                out.families.insert(name, series);
            }
        }
        Ok(out)
    }

    /// The series of family `name`, also found under its OpenMetrics name (a counter's
    /// `x_total` is family `x` there) or its 0.0.4 name.
    pub fn family(&self, name: &str) -> Option<&[Series]> {
        let bare = name.strip_suffix("_total").unwrap_or(name);
        [name.to_owned(), bare.to_owned(), format!("{bare}_total")]
            .iter()
            .find_map(|n| self.families.get(n))
            .map(Vec::as_slice)
    }

    /// Fails naming every family of `names` that is missing or has no series.
    pub fn require(&self, names: &[&str]) -> anyhow::Result<()> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| self.family(n).is_none_or(<[Series]>::is_empty))
            .collect();
        if !missing.is_empty() {
            bail!(
                "missing series {missing:?}; families present: {:?}",
                self.families.keys().collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    /// The value of the series of `name` whose labels include every pair of `want`.
    pub fn value(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.family(name)?
            .iter()
            .find(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }
}
