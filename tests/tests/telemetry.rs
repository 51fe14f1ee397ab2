//! Telemetry of a real cluster: the coordinator and a worker export their metrics and the
//! job attempt's trace to a real OTLP receiver (configured only by the standard OTEL_*
//! variables), and serve the same metrics on `/metrics`.

use loractl_telemetry::names;
use loractl_tests::otlp::{Point, Receiver, SpanRecord};
use loractl_tests::{poll, scrape, submitted_id, tiny_job, Cluster, WorkerSetup, DEADLINE};

/// The points of `metric` whose attributes include every pair of `with`, oldest first.
fn series<'a>(points: &'a [Point], metric: &str, with: &[(&str, &str)]) -> Vec<&'a Point> {
    points
        .iter()
        .filter(|p| p.metric == metric)
        .filter(|p| {
            with.iter()
                .all(|(k, v)| p.attributes.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn span<'a>(spans: &'a [SpanRecord], name: &str) -> &'a SpanRecord {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span `{name}` among {:?}", names_of(spans)))
}

fn names_of(spans: &[SpanRecord]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// The OTEL_* variables of a coordinator or worker exporting to `endpoint` quickly.
fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=e2e".to_owned(),
        ),
    ]
}

fn cluster_exporting_to(endpoint: &str, worker: &str) -> Cluster {
    let env = otel_env(endpoint);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut cluster = Cluster::start_with_env(None, &pairs).unwrap();
    let mut setup = WorkerSetup::cpu(worker);
    setup.env = env;
    cluster.add_worker(setup).unwrap();
    cluster
}

#[test]
fn a_job_exports_its_metrics_and_its_trace() {
    let receiver = Receiver::start();
    let cluster = cluster_exporting_to(&receiver.endpoint, "otel");
    // 4 images x 5 repeats at batch 1: 20 steps an epoch, three epochs.
    let job = tiny_job(&cluster.path("job"), "otel", 60, "").unwrap();
    let out = cluster.run(&["submit", job.to_str().unwrap()]);
    let id = submitted_id(&out);

    // While it trains: its trace id in `loractl status`, its loss on the worker's /metrics.
    let trace_id = cluster.poll("the attempt's trace id", || {
        let job = cluster.job(&id).ok()?;
        job["trace_id"].as_str().map(str::to_owned)
    });
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    let worker_port = cluster.worker_metrics["otel"];
    let page = cluster.poll("the loss on the worker's /metrics", || {
        let page = scrape(worker_port);
        page.contains("loractl_train_loss{").then_some(page)
    });
    for label in [
        format!("job_id=\"{id}\""),
        "rank=\"0\"".into(),
        "worker=\"otel\"".into(),
        "gpu=\"cpu\"".into(),
    ] {
        assert!(page.contains(&label), "{label} missing:\n{page}");
    }
    let done = cluster.wait_job(&id, "the job to succeed", |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(done["state"], "succeeded", "{done}\n{}", cluster.logs());
    let coordinator_page = scrape(cluster.coordinator_metrics[0]);
    assert!(
        coordinator_page.contains("loractl_jobs_finished_total{state=\"succeeded\"} 1"),
        "{coordinator_page}"
    );

    // Every metric arrived over OTLP with its attributes and plausible values.
    let rank = [
        ("job_id", id.as_str()),
        ("attempt", "0"),
        ("rank", "0"),
        ("worker", "otel"),
        ("gpu", "cpu"),
        ("resource.service.name", "loractl-worker"),
        ("resource.deployment.environment", "e2e"),
    ];
    let points = poll("the last training metrics over OTLP", DEADLINE, || {
        let points = receiver.points();
        let last_step = series(&points, names::TRAIN_STEP.name, &rank)
            .last()
            .map(|p| p.value);
        (last_step == Some(60.0)).then_some(points)
    });
    for metric in [
        &names::TRAIN_LOSS,
        &names::TRAIN_LOSS_AVERAGE,
        &names::TRAIN_LOSS_EPOCH_AVERAGE,
        &names::TRAIN_STEP,
        &names::TRAIN_TOTAL_STEPS,
        &names::TRAIN_EPOCH,
        &names::TRAIN_STEP_SECONDS,
        &names::TRAIN_SAMPLES_PER_SECOND,
    ] {
        let found = series(&points, metric.name, &rank);
        assert!(!found.is_empty(), "no {} over OTLP", metric.name);
        assert!(
            found.iter().all(|p| p.value.is_finite() && p.value >= 0.0),
            "{}: {found:?}",
            metric.name
        );
    }
    let loss = series(&points, names::TRAIN_LOSS.name, &rank);
    assert!(
        loss.iter().all(|p| p.value > 0.0 && p.value < 10.0),
        "{loss:?}"
    );
    for group in ["unet", "textencoder"] {
        let lr = series(&points, names::TRAIN_LR.name, &[("group", group)]);
        assert!(lr.iter().any(|p| p.value > 0.0), "lr of {group}: {lr:?}");
    }
    // The epoch averages of a seeded run, as each epoch ends: the last below the first.
    let mut averages: Vec<f64> = Vec::new();
    for p in series(&points, names::TRAIN_LOSS_EPOCH_AVERAGE.name, &rank) {
        if averages.last() != Some(&p.value) {
            averages.push(p.value);
        }
    }
    assert_eq!(averages.len(), 3, "one average per epoch: {averages:?}");
    assert!(
        averages[2] < averages[0],
        "the loss did not fall: {averages:?}"
    );
    let coordinator = [("resource.service.name", "loractl-coordinator")];
    for (metric, with, at_least) in [
        (
            &names::JOBS_FINISHED_TOTAL,
            vec![("state", "succeeded")],
            1.0,
        ),
        (&names::JOB_QUEUE_WAIT_SECONDS, vec![], 1.0),
        (&names::WORKERS, vec![("state", "ready")], 1.0),
        (
            &names::WORKER_HEARTBEAT_AGE_SECONDS,
            vec![("worker", "otel")],
            0.0,
        ),
        (
            &names::ARTIFACT_RECEIVED_BYTES_TOTAL,
            vec![("kind", "lora")],
            1.0,
        ),
        (&names::ARTIFACT_STORED_BYTES, vec![], 1.0),
        (&names::JOBS, vec![("state", "queued")], 0.0),
    ] {
        let with: Vec<(&str, &str)> = coordinator.iter().copied().chain(with).collect();
        let last = poll(metric.name, DEADLINE, || {
            series(&receiver.points(), metric.name, &with)
                .last()
                .map(|p| p.value)
                .filter(|v| *v >= at_least)
        });
        assert!(last.is_finite(), "{}: {last}", metric.name);
    }
    let worker = [
        ("resource.service.name", "loractl-worker"),
        ("worker", "otel"),
    ];
    assert!(!series(&points, names::WORKER_RANKS.name, &worker).is_empty());
    poll("the worker's uploaded bytes", DEADLINE, || {
        let uploaded = receiver.points();
        let with: Vec<(&str, &str)> = worker.iter().copied().chain([("kind", "lora")]).collect();
        series(&uploaded, names::WORKER_UPLOADED_BYTES_TOTAL.name, &with)
            .last()
            .filter(|p| p.value > 0.0)
            .map(|_| ())
    });

    // One trace: the attempt and its phases from the coordinator, the rank's spans from the
    // worker as children of the attempt.
    let root_name = format!("job {id} attempt 0");
    let spans = poll("the attempt's spans", DEADLINE, || {
        let spans = receiver.spans();
        let have = |name: &str| spans.iter().any(|s| s.name == name);
        (have(&root_name) && have("upload lora") && have("epoch 3")).then_some(spans)
    });
    let root = span(&spans, &root_name);
    assert_eq!(root.trace_id, trace_id);
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    assert_eq!(
        root.attributes.get("outcome").map(String::as_str),
        Some("succeeded")
    );
    assert_eq!(
        root.attributes
            .get("resource.service.name")
            .map(String::as_str),
        Some("loractl-coordinator")
    );
    let child_of = |child: &SpanRecord, parent: &SpanRecord| {
        assert_eq!(
            child.trace_id, parent.trace_id,
            "{} in another trace",
            child.name
        );
        assert_eq!(
            child.parent_span_id, parent.span_id,
            "{} is not a child of {}",
            child.name, parent.name
        );
    };
    for phase in ["queued", "starting", "training"] {
        child_of(span(&spans, phase), root);
    }
    let training = span(&spans, "training");
    for epoch in 1..=3 {
        child_of(span(&spans, &format!("epoch {epoch}")), training);
    }
    let rank_span = span(&spans, "rank 0 on otel");
    child_of(rank_span, root);
    assert_eq!(
        rank_span
            .attributes
            .get("resource.service.name")
            .map(String::as_str),
        Some("loractl-worker")
    );
    child_of(span(&spans, "prepare inputs"), rank_span);
    child_of(span(&spans, "load model"), rank_span);
    child_of(span(&spans, "cache latents"), rank_span);
    child_of(span(&spans, "upload lora"), rank_span);
}

/// A collector that cannot be reached changes nothing: the job trains, and the processes shut
/// down without waiting on it beyond their bounded flush.
#[test]
fn an_unreachable_collector_changes_nothing() {
    let closed = format!("http://127.0.0.1:{}", loractl_tests::free_port());
    let mut cluster = cluster_exporting_to(&closed, "alone");
    let job = tiny_job(&cluster.path("job"), "alone", 4, "").unwrap();
    let out = cluster.run(&["submit", job.to_str().unwrap(), "--watch"]);
    assert!(out.ok(), "{}\n{}", out.stderr, cluster.logs());
    for proc in cluster.workers.iter().chain(&cluster.coordinators) {
        proc.terminate();
    }
    for proc in cluster
        .workers
        .iter_mut()
        .chain(cluster.coordinators.iter_mut())
    {
        let status = poll("a graceful exit", DEADLINE, || proc.exited());
        assert!(
            status.success(),
            "{} exited {status}:\n{}",
            proc.name,
            proc.log_tail()
        );
    }
}
