//! Scrapes of `/metrics` read with an independent parser (`openmetrics-parser`): the Prometheus text
//! format 0.0.4 or OpenMetrics 1.0, chosen by the answer's `Content-Type` as Prometheus does.

use anyhow::{anyhow, bail};
use openmetrics_parser::{
    openmetrics, prometheus, MetricsExposition, OpenMetricsValue, PrometheusValue,
    RenderableMetricValue,
};
use std::collections::BTreeMap;

/// Each family's series with their labels and `value` of each sample, for either text format.
fn families<T, V>(
    exp: MetricsExposition<T, V>,
    value: impl Fn(&V) -> f64,
) -> BTreeMap<String, Vec<Series>>
where
    T: Clone,
    V: RenderableMetricValue + Clone,
{
    exp.families
        .into_iter()
        .map(|(name, fam)| {
            let series = fam
                .iter_samples()
                .map(|s| Series {
                    labels: s
                        .get_labelset()
                        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default(),
                    value: value(&s.value),
                })
                .collect();
            (name, series)
        })
        .collect()
}

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
        out.families = if out.openmetrics {
            let exp = openmetrics::parse_openmetrics(text)
                .map_err(|e| anyhow!("not valid OpenMetrics text: {e}"))?;
            families(exp, |v| match v {
                OpenMetricsValue::Unknown(n)
                | OpenMetricsValue::Gauge(n)
                | OpenMetricsValue::StateSet(n) => n.as_f64(),
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Histogram(h) | OpenMetricsValue::GaugeHistogram(h) => {
                    h.count.unwrap_or_default() as f64
                }
                OpenMetricsValue::Summary(s) => s.count.unwrap_or_default() as f64,
                OpenMetricsValue::Info => 1.0,
            })
        } else {
            let exp = prometheus::parse_prometheus(text)
                .map_err(|e| anyhow!("not valid Prometheus text 0.0.4: {e}"))?;
            families(exp, |v| match v {
                PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => n.as_f64(),
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Histogram(h) => h.count.unwrap_or_default() as f64,
                PrometheusValue::Summary(s) => s.count.unwrap_or_default() as f64,
            })
        };
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_give_the_same_series() {
        let histogram = "# HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{le=\"1.0\"} 2\n\
                         lat_bucket{le=\"+Inf\"} 5\nlat_sum 4.5\nlat_count 5\n";
        // 0.0.4 names a counter family with its _total; OpenMetrics without.
        let prom = Scrape::parse(
            "text/plain; version=0.0.4",
            &format!(
                "# HELP hits_total Hits.\n# TYPE hits_total counter\nhits_total{{path=\"/a\"}} 3\n{histogram}"
            ),
        )
        .unwrap();
        let om = Scrape::parse(
            "application/openmetrics-text; version=1.0.0",
            &format!(
                "# HELP hits Hits.\n# TYPE hits counter\nhits_total{{path=\"/a\"}} 3\n{histogram}# EOF\n"
            ),
        )
        .unwrap();
        assert!(!prom.openmetrics && om.openmetrics);
        for s in [&prom, &om] {
            assert_eq!(s.value("hits_total", &[("path", "/a")]), Some(3.0));
            assert_eq!(s.value("lat", &[]), Some(5.0));
        }
        assert!(Scrape::parse("text/plain", "garbage {").is_err());
    }
}
