//! Every metric loractl exports, named once: the code records through these, the Grafana
//! dashboards and Prometheus rules in `deploy/` query only these names (a test checks both).
//!
//! Names are final Prometheus names (no unit or `_total` suffix is added on export): counters
//! end in `_total`, units are in the name.

/// How a metric behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The latest value.
    Gauge,
    /// A running total.
    Counter,
    /// A distribution (`_bucket`, `_sum`, `_count` series in Prometheus).
    Histogram,
}

/// One metric: its name, kind, help text and the labels it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

/// Label names. Values are `snake_case` words (see [`label::value`]) or ids.
pub mod label {
    /// A word of a label value in `snake_case` (`training error` -> `training_error`).
    pub fn value(word: &str) -> String {
        word.replace([' ', '-'], "_")
    }

    pub const JOB: &str = "job_id";
    pub const ATTEMPT: &str = "attempt";
    pub const RANK: &str = "rank";
    pub const WORKER: &str = "worker";
    pub const GPU: &str = "gpu";
    pub const GROUP: &str = "group";
    pub const STATE: &str = "state";
    pub const REASON: &str = "reason";
    pub const KIND: &str = "kind";
}

use label::*;

/// The labels of a training metric (one series per rank of an attempt).
const RANK_LABELS: &[&str] = &[JOB, ATTEMPT, RANK, WORKER, GPU];
const GROUP_LABELS: &[&str] = &[JOB, ATTEMPT, RANK, WORKER, GPU, GROUP];
const GPU_LABELS: &[&str] = &[WORKER, GPU];

const fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        help,
        labels,
    }
}

const fn counter(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        help,
        labels,
    }
}

// Training, per rank, from the progress lines the rank prints (recorded by its worker).
pub const TRAIN_LOSS: Metric = gauge(
    "loractl_train_loss",
    "Loss of the latest optimizer step (kohya's loss/current)",
    RANK_LABELS,
);
pub const TRAIN_LOSS_AVERAGE: Metric = gauge(
    "loractl_train_loss_average",
    "Moving average of the loss over the last epoch's steps (kohya's loss/average)",
    RANK_LABELS,
);
pub const TRAIN_LOSS_EPOCH_AVERAGE: Metric = gauge(
    "loractl_train_loss_epoch_average",
    "Average loss of the last finished epoch (kohya's loss/epoch_average)",
    RANK_LABELS,
);
pub const TRAIN_LR: Metric = gauge(
    "loractl_train_lr",
    "Learning rate of each parameter group (kohya's lr/<group>)",
    GROUP_LABELS,
);
pub const TRAIN_D_LR: Metric = gauge(
    "loractl_train_d_lr",
    "d times the learning rate of D-Adaptation and Prodigy (kohya's lr/d*lr/<group>)",
    GROUP_LABELS,
);
pub const TRAIN_STEP: Metric = gauge(
    "loractl_train_step",
    "Optimizer steps done in this attempt's run",
    RANK_LABELS,
);
pub const TRAIN_TOTAL_STEPS: Metric = gauge(
    "loractl_train_total_steps",
    "Optimizer steps of the whole run",
    RANK_LABELS,
);
pub const TRAIN_EPOCH: Metric = gauge(
    "loractl_train_epoch",
    "Current epoch (1-based)",
    RANK_LABELS,
);
pub const TRAIN_STEP_SECONDS: Metric = gauge(
    "loractl_train_step_seconds",
    "Seconds per optimizer step, averaged since the run started",
    RANK_LABELS,
);
pub const TRAIN_SAMPLES_PER_SECOND: Metric = gauge(
    "loractl_train_samples_per_second",
    "Training samples per second of this rank",
    RANK_LABELS,
);
pub const TRAIN_DATA_SECONDS: Metric = gauge(
    "loractl_train_data_seconds",
    "Seconds of the latest step spent loading and encoding its batch",
    RANK_LABELS,
);
pub const TRAIN_ALLREDUCE_SECONDS: Metric = gauge(
    "loractl_train_allreduce_seconds",
    "Seconds of the latest step spent all-reducing gradients across ranks",
    RANK_LABELS,
);

// GPUs, per pinned GPU of a worker (NVML).
pub const GPU_MEMORY_USED_BYTES: Metric = gauge(
    "loractl_gpu_memory_used_bytes",
    "GPU memory in use",
    GPU_LABELS,
);
pub const GPU_MEMORY_TOTAL_BYTES: Metric = gauge(
    "loractl_gpu_memory_total_bytes",
    "GPU memory in all",
    GPU_LABELS,
);
pub const GPU_UTILIZATION_RATIO: Metric = gauge(
    "loractl_gpu_utilization_ratio",
    "Fraction of the last sample period the GPU was busy (0 to 1)",
    GPU_LABELS,
);
pub const GPU_TEMPERATURE_CELSIUS: Metric = gauge(
    "loractl_gpu_temperature_celsius",
    "GPU temperature",
    GPU_LABELS,
);
pub const GPU_POWER_WATTS: Metric = gauge("loractl_gpu_power_watts", "GPU power draw", GPU_LABELS);
pub const GPU_ASSIGNED: Metric = gauge(
    "loractl_gpu_assigned",
    "1 while a rank of a job runs on the GPU, else 0",
    GPU_LABELS,
);

// Workers, as each worker sees itself.
pub const WORKER_RANKS: Metric = gauge(
    "loractl_worker_ranks",
    "Ranks this worker runs now",
    &[WORKER],
);
pub const WORKER_UPLOADED_BYTES_TOTAL: Metric = counter(
    "loractl_worker_uploaded_bytes_total",
    "Bytes of job outputs this worker uploaded",
    &[WORKER, KIND],
);

// The cluster, as the coordinator sees it.
pub const JOBS: Metric = gauge("loractl_jobs", "Jobs by state", &[STATE]);
pub const JOBS_FINISHED_TOTAL: Metric = counter(
    "loractl_jobs_finished_total",
    "Jobs that reached a final state (succeeded, failed, cancelled)",
    &[STATE],
);
pub const JOB_QUEUE_WAIT_SECONDS: Metric = Metric {
    name: "loractl_job_queue_wait_seconds",
    kind: Kind::Histogram,
    help: "Seconds a job attempt waited in the queue before it was placed",
    labels: &[],
};
pub const JOB_RESTARTS_TOTAL: Metric = counter(
    "loractl_job_restarts_total",
    "Attempts that ended and were retried, by failure kind",
    &[REASON],
);
pub const WORKERS: Metric = gauge(
    "loractl_workers",
    "Registered workers by state (ready, draining)",
    &[STATE],
);
pub const WORKERS_LOST_TOTAL: Metric = counter(
    "loractl_workers_lost_total",
    "Workers declared lost after the heartbeat timeout",
    &[],
);
pub const WORKER_HEARTBEAT_AGE_SECONDS: Metric = gauge(
    "loractl_worker_heartbeat_age_seconds",
    "Seconds since the coordinator last heard from each worker",
    &[WORKER],
);
pub const ARTIFACT_STORED_BYTES: Metric = gauge(
    "loractl_artifact_stored_bytes",
    "Bytes held by the coordinator's artifact store",
    &[],
);
pub const ARTIFACT_RECEIVED_BYTES_TOTAL: Metric = counter(
    "loractl_artifact_received_bytes_total",
    "Artifact bytes uploaded to the coordinator, by kind",
    &[KIND],
);
pub const ARTIFACT_SENT_BYTES_TOTAL: Metric = counter(
    "loractl_artifact_sent_bytes_total",
    "Artifact bytes downloaded from the coordinator, by kind",
    &[KIND],
);

/// Every metric, for checks that the dashboards and rules use no other name.
pub const ALL: &[Metric] = &[
    TRAIN_LOSS,
    TRAIN_LOSS_AVERAGE,
    TRAIN_LOSS_EPOCH_AVERAGE,
    TRAIN_LR,
    TRAIN_D_LR,
    TRAIN_STEP,
    TRAIN_TOTAL_STEPS,
    TRAIN_EPOCH,
    TRAIN_STEP_SECONDS,
    TRAIN_SAMPLES_PER_SECOND,
    TRAIN_DATA_SECONDS,
    TRAIN_ALLREDUCE_SECONDS,
    GPU_MEMORY_USED_BYTES,
    GPU_MEMORY_TOTAL_BYTES,
    GPU_UTILIZATION_RATIO,
    GPU_TEMPERATURE_CELSIUS,
    GPU_POWER_WATTS,
    GPU_ASSIGNED,
    WORKER_RANKS,
    WORKER_UPLOADED_BYTES_TOTAL,
    JOBS,
    JOBS_FINISHED_TOTAL,
    JOB_QUEUE_WAIT_SECONDS,
    JOB_RESTARTS_TOTAL,
    WORKERS,
    WORKERS_LOST_TOTAL,
    WORKER_HEARTBEAT_AGE_SECONDS,
    ARTIFACT_STORED_BYTES,
    ARTIFACT_RECEIVED_BYTES_TOTAL,
    ARTIFACT_SENT_BYTES_TOTAL,
];

/// The metric called `name`; Prometheus' `_bucket`/`_sum`/`_count` series of a histogram
/// count as the histogram.
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| {
        m.name == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(m.name)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prometheus_names_with_their_kind_suffix() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("loractl_"), "{}", m.name);
            assert!(
                m.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
        }
        assert_eq!(
            find("loractl_job_queue_wait_seconds_bucket"),
            Some(&JOB_QUEUE_WAIT_SECONDS)
        );
        assert_eq!(find("loractl_train_loss"), Some(&TRAIN_LOSS));
        assert_eq!(find("loractl_train_loss_bucket"), None);
    }
}
