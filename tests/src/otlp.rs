//! A real OTLP receiver on 127.0.0.1: opentelemetry-proto's collector services (metrics and
//! traces over gRPC) served on a runtime of its own, keeping everything exported to it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tonic::{Request, Response, Status};

/// One exported value of one series.
#[derive(Debug, Clone)]
pub struct Point {
    pub metric: String,
    /// The series' attributes and the exporting process's resource attributes
    /// (`service.name`, ...), the latter prefixed `resource.`.
    pub attributes: BTreeMap<String, String>,
    /// The value; for a histogram, its count.
    pub value: f64,
    pub time_unix_nano: u64,
}

/// One exported span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    metrics: Vec<ExportMetricsServiceRequest>,
    traces: Vec<ExportTraceServiceRequest>,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        if let Ok(mut received) = self.0.lock() {
            received.metrics.push(request.into_inner());
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        if let Ok(mut received) = self.0.lock() {
            received.traces.push(request.into_inner());
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(value: &KeyValue) -> String {
    match value.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// A point's or span's own attributes with its process's resource attributes, the latter
/// prefixed `resource.`.
fn attributes(resource: &Option<Resource>, own: &[KeyValue]) -> BTreeMap<String, String> {
    let resource = resource.iter().flat_map(|r| &r.attributes);
    resource
        .map(|kv| (format!("resource.{}", kv.key), text(kv)))
        .chain(own.iter().map(|kv| (kv.key.clone(), text(kv))))
        .collect()
}

/// An OTLP/gRPC receiver; stops when dropped.
pub struct Receiver {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    sink: Sink,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Receiver {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the OTLP receiver");
        let sink = Sink::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a port for the OTLP receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let server = tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(sink.clone()))
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        runtime.spawn(server);
        Self {
            endpoint: format!("http://{addr}"),
            sink,
            runtime: Some(runtime),
        }
    }

    /// Every number and histogram point received so far, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let Ok(received) = self.sink.0.lock() else {
            return Vec::new();
        };
        let mut points = Vec::new();
        for request in &received.metrics {
            for rm in &request.resource_metrics {
                for metric in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                    let mut push = |attrs: &[KeyValue], value: f64, time: u64| {
                        points.push(Point {
                            metric: metric.name.clone(),
                            attributes: attributes(&rm.resource, attrs),
                            value,
                            time_unix_nano: time,
                        });
                    };
                    let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| {
                        match p.value {
                            Some(number_data_point::Value::AsDouble(v)) => v,
                            Some(number_data_point::Value::AsInt(v)) => v as f64,
                            None => f64::NAN,
                        }
                    };
                    match &metric.data {
                        Some(metric::Data::Gauge(g)) => {
                            for p in &g.data_points {
                                push(&p.attributes, number(p), p.time_unix_nano);
                            }
                        }
                        Some(metric::Data::Sum(s)) => {
                            for p in &s.data_points {
                                push(&p.attributes, number(p), p.time_unix_nano);
                            }
                        }
                        Some(metric::Data::Histogram(h)) => {
                            for p in &h.data_points {
                                push(&p.attributes, p.count as f64, p.time_unix_nano);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        points
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanRecord> {
        let Ok(received) = self.sink.0.lock() else {
            return Vec::new();
        };
        let mut spans = Vec::new();
        for request in &received.traces {
            for rs in &request.resource_spans {
                for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                    spans.push(SpanRecord {
                        name: span.name.clone(),
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        attributes: attributes(&rs.resource, &span.attributes),
                    });
                }
            }
        }
        spans
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
