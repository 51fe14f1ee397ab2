//! Recording the metrics of [`crate::names`]. Gauges are observed from a table this side
//! keeps, so the series of an ended job or a departed worker can be forgotten (an
//! OpenTelemetry gauge otherwise reports its last value for as long as the process lives);
//! counters and histograms are plain instruments.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::KeyValue;

use crate::names::{self, Kind, Metric};

/// Label values of one series, in the metric's label order.
type Series = Vec<(&'static str, String)>;

/// Buckets of the queue wait (seconds): a minute to a day.
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

type GaugeTable = Arc<Mutex<BTreeMap<&'static str, HashMap<Series, f64>>>>;

/// Records metrics; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    gauges: GaugeTable,
    counters: Arc<HashMap<&'static str, Counter<u64>>>,
    histograms: Arc<HashMap<&'static str, Histogram<f64>>>,
    _observed: Arc<Vec<ObservableGauge<f64>>>,
}

fn attributes(series: &[(&'static str, String)]) -> Vec<KeyValue> {
    series
        .iter()
        .map(|(k, v)| KeyValue::new(*k, v.clone()))
        .collect()
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Default for Recorder {
    /// A recorder nothing reads (no meter provider behind it): for embedded services and tests
    /// that do not export metrics.
    fn default() -> Self {
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
        Self::new(&opentelemetry::metrics::MeterProvider::meter(
            &provider, "loractl",
        ))
    }
}

impl Recorder {
    /// Every instrument of [`names::ALL`] on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let gauges: GaugeTable = Arc::default();
        let mut counters = HashMap::new();
        let mut histograms = HashMap::new();
        let mut observed = Vec::new();
        for m in names::ALL {
            match m.kind {
                Kind::Gauge => {
                    let table = gauges.clone();
                    let name = m.name;
                    observed.push(
                        meter
                            .f64_observable_gauge(name)
                            .with_description(m.help)
                            .with_callback(move |observer| {
                                let Ok(table) = table.lock() else { return };
                                for (series, value) in table.get(name).into_iter().flatten() {
                                    observer.observe(*value, &attributes(series));
                                }
                            })
                            .build(),
                    );
                }
                Kind::Counter => {
                    counters.insert(
                        m.name,
                        meter.u64_counter(m.name).with_description(m.help).build(),
                    );
                }
                Kind::Histogram => {
                    histograms.insert(
                        m.name,
                        meter
                            .f64_histogram(m.name)
                            .with_description(m.help)
                            .with_boundaries(QUEUE_WAIT_BUCKETS.to_vec())
                            .build(),
                    );
                }
            }
        }
        Self {
            gauges,
            counters: Arc::new(counters),
            histograms: Arc::new(histograms),
            _observed: Arc::new(observed),
        }
    }

    fn check(m: &Metric, kind: Kind, labels: &[(&'static str, String)]) {
        debug_assert_eq!(m.kind, kind, "{} is a {:?}", m.name, m.kind);
        debug_assert!(
            labels.iter().map(|(k, _)| *k).eq(m.labels.iter().copied()),
            "{} takes the labels {:?}",
            m.name,
            m.labels
        );
    }

    /// Sets gauge `m` of the series `labels` (given in `m.labels` order).
    pub fn set(&self, m: &Metric, value: f64, labels: &[(&'static str, String)]) {
        Self::check(m, Kind::Gauge, labels);
        if let Ok(mut table) = self.gauges.lock() {
            table
                .entry(m.name)
                .or_default()
                .insert(labels.to_vec(), value);
        }
    }

    /// Adds `n` to counter `m`.
    pub fn add(&self, m: &Metric, n: u64, labels: &[(&'static str, String)]) {
        Self::check(m, Kind::Counter, labels);
        if let Some(counter) = self.counters.get(m.name) {
            counter.add(n, &attributes(labels));
        }
    }

    /// Records `value` into histogram `m`.
    pub fn record(&self, m: &Metric, value: f64, labels: &[(&'static str, String)]) {
        Self::check(m, Kind::Histogram, labels);
        if let Some(histogram) = self.histograms.get(m.name) {
            histogram.record(value, &attributes(labels));
        }
    }

    /// Forgets every gauge series that has all the label values `matching` (the ranks of a job
    /// attempt that ended, a worker that left).
    pub fn forget(&self, matching: &[(&str, &str)]) {
        let matches = |labels: &Series| {
            matching
                .iter()
                .all(|(key, value)| labels.iter().any(|(k, v)| k == key && v == value))
        };
        if let Ok(mut table) = self.gauges.lock() {
            for series in table.values_mut() {
                series.retain(|labels, _| !matches(labels));
            }
        }
    }

    /// Forgets every series of gauge `m`, before setting the current ones again.
    pub fn clear(&self, m: &Metric) {
        if let Ok(mut table) = self.gauges.lock() {
            table.remove(m.name);
        }
    }

    /// The current value of gauge `m` for `labels`, as the next export will report it.
    pub fn gauge(&self, m: &Metric, labels: &[(&'static str, String)]) -> Option<f64> {
        let table = self.gauges.lock().ok()?;
        table.get(m.name)?.get(labels).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::label::{JOB, STATE};

    #[test]
    fn forgotten_series_are_gone_and_others_stay() {
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder().build();
        let recorder = Recorder::new(&opentelemetry::metrics::MeterProvider::meter(
            &provider, "t",
        ));
        let series = |job: &str| {
            vec![
                (JOB, job.to_owned()),
                (names::label::ATTEMPT, "0".to_owned()),
                (names::label::RANK, "0".to_owned()),
                (names::label::WORKER, "w".to_owned()),
                (names::label::GPU, "cpu".to_owned()),
            ]
        };
        recorder.set(&names::TRAIN_LOSS, 0.5, &series("j1"));
        recorder.set(&names::TRAIN_LOSS, 0.25, &series("j2"));
        recorder.set(&names::JOBS, 1.0, &[(STATE, "running".to_owned())]);
        recorder.forget(&[(JOB, "j1"), (names::label::ATTEMPT, "0")]);
        assert_eq!(recorder.gauge(&names::TRAIN_LOSS, &series("j1")), None);
        assert_eq!(
            recorder.gauge(&names::TRAIN_LOSS, &series("j2")),
            Some(0.25)
        );
        recorder.clear(&names::JOBS);
        assert_eq!(
            recorder.gauge(&names::JOBS, &[(STATE, "running".to_owned())]),
            None
        );
    }
}
