//! The dashboards and alert rules of `deploy/` against real data: a real Prometheus scrapes a
//! real cluster's coordinator and worker while a job trains, then every query of every panel
//! of every Grafana dashboard, and every selector of every alert rule, is evaluated through
//! Prometheus' HTTP API and must return data. A misspelt metric or label name leaves a panel
//! empty and fails here. The GPU panels are the exception on a machine without an NVIDIA GPU
//! (NVML samples nothing there): their queries must still evaluate.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use loractl_telemetry::names;
use loractl_tests::prometheus::Prometheus;
use loractl_tests::{poll, submitted_id, tiny_job, Cluster, WorkerSetup, DEADLINE};
use serde_json::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `loractl_*` name in `text`.
fn metric_names(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("loractl_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        found.push(&tail[..end]);
        rest = &tail[end..];
    }
    found
}

/// `(dashboard, panel title, expr)` of every panel target, and `(dashboard, variable, query)`
/// of every query variable.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    let dir = deploy().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "dashboards in {}", dir.display());
    for file in files {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let title = dashboard["title"].as_str().unwrap_or("?").to_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                queries.push((
                    title.clone(),
                    panel["title"].as_str().unwrap_or("?").to_owned(),
                    target["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(query) = variable["query"]["query"].as_str() {
                queries.push((
                    title.clone(),
                    format!("variable {}", variable["name"]),
                    query.to_owned(),
                ));
            }
        }
    }
    queries
}

/// `(alert, expr)` of every rule in `deploy/prometheus/rules.yml`.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy().join("prometheus/rules.yml")).unwrap();
    let mut rules = Vec::new();
    let mut alert = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            alert = Some(name.trim().to_owned());
        } else if let (Some(expr), Some(name)) = (line.strip_prefix("expr:"), alert.take()) {
            rules.push((name, expr.trim().to_owned()));
        }
    }
    assert!(rules.len() >= 5, "{rules:?}");
    rules
}

#[test]
fn dashboards_and_rules_name_only_metrics_loractl_exports() {
    let queries = dashboard_queries();
    let rules = alert_rules();
    let texts = queries
        .iter()
        .map(|(d, p, q)| (format!("{d} / {p}"), q))
        .chain(rules.iter().map(|(a, q)| (format!("alert {a}"), q)));
    let mut used = std::collections::BTreeSet::new();
    for (place, query) in texts {
        let found = metric_names(query);
        assert!(!found.is_empty(), "{place}: no loractl metric in `{query}`");
        for name in found {
            let metric = names::find(name)
                .unwrap_or_else(|| panic!("{place}: `{name}` is not a loractl metric"));
            used.insert(metric.name);
        }
    }
    // Every metric has a place to be seen.
    let unused: Vec<&str> = names::ALL
        .iter()
        .map(|m| m.name)
        .filter(|n| !used.contains(n))
        .collect();
    assert!(unused.is_empty(), "no panel or rule shows {unused:?}");
}

/// A panel query with Grafana's variables set as for "All".
fn concrete(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$job", ".*")
        .replace("$worker", ".*")
}

/// Grafana's `label_values(metric, label)` as the PromQL Prometheus can evaluate.
fn variable_query(query: &str) -> String {
    query
        .strip_prefix("label_values(")
        .and_then(|q| q.split(',').next())
        .unwrap_or(query)
        .trim()
        .to_owned()
}

/// Only NVML fills these.
fn gpu_only(query: &str) -> bool {
    metric_names(query)
        .iter()
        .all(|n| n.starts_with("loractl_gpu_"))
}

#[test]
fn every_panel_and_alert_rule_has_data_from_a_real_cluster() {
    let mut cluster = Cluster::start(None).unwrap();
    cluster.add_worker(WorkerSetup::cpu("prom")).unwrap();
    let targets = [
        ("loractl-coordinator", cluster.coordinator_metrics[0]),
        ("loractl-worker", cluster.worker_metrics["prom"]),
    ];
    let Some(prometheus) = Prometheus::start(
        &cluster.path("prometheus"),
        &targets,
        &deploy().join("prometheus/rules.yml"),
    ) else {
        return;
    };
    let started = Instant::now();
    // Prodigy, so that d*lr has values; 60 steps, three epochs.
    let job = tiny_job(&cluster.path("job"), "prom", 60, "").unwrap();
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("optimizer_type = \"AdamW\"", "optimizer_type = \"Prodigy\"")
        .replace("learning_rate = 1e-3", "learning_rate = 1.0")
        .replace("text_encoder_lr = 2e-4", "text_encoder_lr = 1.0");
    std::fs::write(&job, text).unwrap();
    let out = cluster.run(&["submit", job.to_str().unwrap()]);
    let id = submitted_id(&out);
    // The training gauges are scraped while the rank runs (they go when it ends).
    poll("the loss in Prometheus", DEADLINE, || {
        prometheus
            .query(&format!("loractl_train_loss{{job_id=\"{id}\"}}"))
            .ok()
            .filter(|r| !r.is_empty())
    });
    let done = cluster.wait_job(&id, "the job to end", |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(done["state"], "succeeded", "{done}\n{}", cluster.logs());
    poll("the finished job in Prometheus", DEADLINE, || {
        prometheus
            .query("loractl_jobs_finished_total{state=\"succeeded\"} == 1")
            .ok()
            .filter(|r| !r.is_empty())
    });
    let window = started.elapsed() + Duration::from_secs(5);

    let mut empty = Vec::new();
    let mut gpu_panels = Vec::new();
    for (dashboard, panel, query) in dashboard_queries() {
        let query = if panel.starts_with("variable ") {
            variable_query(&query)
        } else {
            concrete(&query)
        };
        let result = prometheus
            .query_range(&query, window)
            .unwrap_or_else(|e| panic!("{dashboard} / {panel}: `{query}` fails: {e}"));
        if gpu_only(&query) {
            gpu_panels.push(format!("{dashboard} / {panel}"));
        } else if result.is_empty() {
            empty.push(format!("{dashboard} / {panel}: `{query}`"));
        }
    }
    for (alert, expr) in alert_rules() {
        prometheus
            .query_range(&expr, window)
            .unwrap_or_else(|e| panic!("alert {alert}: `{expr}` fails: {e}"));
        // Each selector of the rule has data (the rule itself fires only when something is
        // wrong, which it is not here).
        for name in metric_names(&expr) {
            let selector = expr[expr.find(name).unwrap_or(0)..]
                .split_once([')', ' ', '['])
                .map_or(expr.as_str(), |(s, _)| s)
                .to_owned();
            if gpu_only(&selector) {
                continue;
            }
            let result = prometheus
                .query_range(&selector, window)
                .unwrap_or_else(|e| panic!("alert {alert}: `{selector}` fails: {e}"));
            if result.is_empty() {
                empty.push(format!("alert {alert}: `{selector}`"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}\n{}",
        empty.join("\n"),
        prometheus.log_tail()
    );
    eprintln!(
        "GPU panels (no NVIDIA GPU here, evaluated only): {}",
        gpu_panels.join(", ")
    );
    // Prometheus loaded every rule and evaluates it without error.
    let rules = prometheus.rules();
    assert_eq!(rules.len(), alert_rules().len(), "{rules:?}");
    assert!(rules.iter().all(|(_, health)| health == "ok"), "{rules:?}");
}
