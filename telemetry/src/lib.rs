//! loractl's metrics and traces.
//!
//! - [`names`]: every metric, named once;
//! - [`Telemetry::init`]: the process's `tracing` subscriber (logs by `RUST_LOG`), its
//!   OpenTelemetry meter provider (always read by a Prometheus registry, and exported over OTLP
//!   when configured) and tracer provider (spans of target [`TRACE_TARGET`], exported over
//!   OTLP when configured). Configuration is OpenTelemetry's own: `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` / `..._TRACES_ENDPOINT`), `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_SDK_DISABLED`. With none
//!   of them set nothing is exported and nothing connects anywhere;
//! - [`Recorder`]: records the metrics of [`names`] (gauges forgotten when their job ends);
//! - [`serve_metrics`]: the Prometheus text endpoint `/metrics`;
//! - [`context`]: W3C trace context (`traceparent`) for spans that continue in another
//!   process.

pub mod context;
pub mod names;
mod recorder;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use recorder::Recorder;

/// The target of the `tracing` spans that become OpenTelemetry spans (job attempts and their
/// phases); other spans stay local.
pub const TRACE_TARGET: &str = "loractl::trace";

/// How long a shutdown waits for the last export.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OpenTelemetry {what}: {message} (check OTEL_EXPORTER_OTLP_ENDPOINT and the other OTEL_* variables)")]
    Setup { what: &'static str, message: String },
    #[error("cannot serve /metrics on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

fn setup_error<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Setup {
        what,
        message: e.to_string(),
    }
}

/// Where OTLP goes, from the standard variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpConfig {
    pub metrics: bool,
    pub traces: bool,
}

impl OtlpConfig {
    /// Reads `OTEL_SDK_DISABLED`, `OTEL_EXPORTER_OTLP_ENDPOINT` and the per-signal endpoints
    /// from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Self::default();
        }
        let all = set("OTEL_EXPORTER_OTLP_ENDPOINT");
        Self {
            metrics: all || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            traces: all || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        }
    }

    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// The process's telemetry; [`Telemetry::shutdown`] flushes what is left.
pub struct Telemetry {
    meters: SdkMeterProvider,
    tracers: SdkTracerProvider,
    registry: prometheus::Registry,
    recorder: Recorder,
    pub otlp: OtlpConfig,
}

impl Telemetry {
    /// Installs the global subscriber and providers for `service` (the default service name
    /// when `OTEL_SERVICE_NAME` is unset). Must run inside a Tokio runtime (the OTLP client is
    /// tonic's).
    pub fn init(service: &str) -> Result<Self, Error> {
        let telemetry = Self::build(service, OtlpConfig::from_env())?;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let spans = tracing_opentelemetry::layer()
            .with_tracer(telemetry.tracers.tracer("loractl"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target() == TRACE_TARGET
            }));
        // A second init (tests starting several services in one process) keeps the first.
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_filter(filter))
            .with(spans)
            .try_init();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(telemetry)
    }

    /// The providers without touching any global state (tests, embedded services).
    pub fn build(service: &str, otlp: OtlpConfig) -> Result<Self, Error> {
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service.to_owned());
        }
        let resource = resource.build();
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_units()
            .without_counter_suffixes()
            .scope_info_enabled(false)
            .build()
            .map_err(setup_error("Prometheus exporter"))?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prometheus);
        if otlp.metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(setup_error("OTLP metric exporter"))?;
            meters = meters.with_reader(PeriodicReader::builder(exporter).build());
        }
        let meters = meters.build();
        let mut tracers = SdkTracerProvider::builder().with_resource(resource);
        if otlp.traces {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(setup_error("OTLP span exporter"))?;
            tracers = tracers.with_batch_exporter(exporter);
        }
        let tracers = tracers.build();
        let recorder = Recorder::new(&opentelemetry::metrics::MeterProvider::meter(
            &meters, "loractl",
        ));
        Ok(Self {
            meters,
            tracers,
            registry,
            recorder,
            otlp,
        })
    }

    /// Records into this process's metrics.
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// The tracer provider, for a `tracing-opentelemetry` layer of one's own.
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracers
    }

    /// Every metric in Prometheus' text format.
    pub fn prometheus_text(&self) -> String {
        prometheus_text(&self.registry)
    }

    /// The registry `/metrics` serves.
    pub fn registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    /// Exports what is buffered (OTLP), waiting at most a few seconds.
    pub fn shutdown(self) {
        let _ = self.meters.shutdown_with_timeout(SHUTDOWN_WAIT);
        let _ = self.tracers.shutdown_with_timeout(SHUTDOWN_WAIT);
    }
}

fn prometheus_text(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Binds `address` for [`serve_metrics`].
pub async fn bind_metrics(address: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address)
        .await
        .map_err(|source| Error::Listen {
            address: address.to_owned(),
            source,
        })
}

/// Answers `GET /metrics` on `listener` with `registry` in Prometheus' text format (anything
/// else: 404), until the task is dropped. Plain HTTP/1.1, one request per connection.
pub async fn serve_metrics(listener: TcpListener, registry: prometheus::Registry) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            // The request line and headers; a client that sends more is cut off.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
            let path = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
            let path = path.split(|&b| b == b'?').next().unwrap_or_default();
            let (status, body) = if line.starts_with(b"GET ") && path == b"/metrics" {
                ("200 OK", prometheus_text(&registry))
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_owned(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_is_on_only_when_an_endpoint_is_set() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(OtlpConfig::from_vars(vars(&[])), OtlpConfig::default());
        assert_eq!(
            OtlpConfig::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])),
            OtlpConfig {
                metrics: true,
                traces: true
            }
        );
        assert_eq!(
            OtlpConfig::from_vars(vars(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4317"
            )])),
            OtlpConfig {
                metrics: false,
                traces: true
            }
        );
        assert_eq!(
            OtlpConfig::from_vars(vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "true")
            ])),
            OtlpConfig::default()
        );
        assert_eq!(
            OtlpConfig::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            OtlpConfig::default()
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_recorded_metrics_in_prometheus_text() {
        let telemetry = Telemetry::build("test", OtlpConfig::default()).unwrap();
        let recorder = telemetry.recorder();
        recorder.set(
            &names::JOBS,
            3.0,
            &[(names::label::STATE, "queued".to_owned())],
        );
        recorder.add(
            &names::ARTIFACT_SENT_BYTES_TOTAL,
            10,
            &[(names::label::KIND, "lora".to_owned())],
        );
        let listener = bind_metrics("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(listener, telemetry.registry()));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            stream.read_to_string(&mut out).await.unwrap();
            out
        };
        let page = get("/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        assert!(page.contains("loractl_jobs{"), "{page}");
        assert!(page.contains("state=\"queued\""), "{page}");
        assert!(page.contains("} 3"), "{page}");
        assert!(
            page.contains("loractl_artifact_sent_bytes_total{"),
            "{page}"
        );
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
