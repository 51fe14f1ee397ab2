//! How a rank process talks to its worker: plain lines on stdout/stderr are log lines; a
//! stdout line `@loractl {json}` is a message ([`ChildMessage`]): a progress sample, an
//! artifact to upload, or the rank's address for the rendezvous of a multi-worker job. The
//! worker answers on the rank's stdin with `@loractl {json}` lines ([`ParentMessage`]): the
//! addresses of every rank once all joined. The rank program (the seam where training plugs
//! in) prints with [`ChildMessage::to_line`] and reads with [`ParentMessage::parse`].
//!
//! The rank's environment is the other half of the contract: [`env`] names every variable
//! the worker sets and the rank reads, and [`join_paths`] / [`split_paths`] write and read
//! its folder lists, so neither side spells a name or a separator of its own.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use loractl_proto::domain::ArtifactKind;
use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "@loractl ";

/// The variables a rank is started with (see [`crate::rank`] for what the worker puts in
/// them).
pub mod env {
    /// The job spec the rank runs: paths rewritten to this worker's folders and confined.
    pub const SPEC: &str = "LORACTL_SPEC";
    /// Where the rank writes (LoRA files, states, samples).
    pub const OUTPUT_DIR: &str = "LORACTL_OUTPUT_DIR";
    /// The checkpoint to resume from; unset for a fresh start.
    pub const RESUME: &str = "LORACTL_RESUME";
    pub const JOB_ID: &str = "LORACTL_JOB_ID";
    pub const ATTEMPT: &str = "LORACTL_ATTEMPT";
    pub const RANK: &str = "LORACTL_RANK";
    pub const WORLD_SIZE: &str = "LORACTL_WORLD_SIZE";
    /// The rank's index among the job's ranks on this worker, and their number.
    pub const LOCAL_RANK: &str = "LORACTL_LOCAL_RANK";
    pub const LOCAL_WORLD_SIZE: &str = "LORACTL_LOCAL_WORLD_SIZE";
    /// Folder lists ([`super::join_paths`]): where models are, and the only folders data is
    /// read from.
    pub const MODEL_DIRS: &str = "LORACTL_MODEL_DIRS";
    pub const DATA_DIRS: &str = "LORACTL_DATA_DIRS";
    /// The host a data-parallel CPU rank binds and announces for the TCP ring.
    pub const RING_HOST: &str = "LORACTL_RING_HOST";
    /// The memory of the rank's GPU, for the memory check (the trainer reads it too).
    pub const GPU_MEMORY_BYTES: &str = "LORACTL_GPU_MEMORY_BYTES";
    /// Optimizer steps between checkpoints (the worker's `checkpoint_every_n_steps`).
    pub const CHECKPOINT_STEPS: &str = "LORACTL_CHECKPOINT_STEPS";
    /// Seconds a collective waits for a silent peer (the worker's `collective_timeout_secs`).
    pub const COLLECTIVE_TIMEOUT_SECS: &str = "LORACTL_COLLECTIVE_TIMEOUT_SECS";
    /// The coordinator's token: never passed to a rank.
    pub const TOKEN: &str = "LORACTL_TOKEN";
}

/// A folder list as one variable (`:`-separated). A folder whose name holds the separator
/// cannot be passed: the error names it.
pub fn join_paths(paths: &[PathBuf]) -> Result<OsString, String> {
    std::env::join_paths(paths).map_err(|e| {
        let bad = paths
            .iter()
            .find(|p| p.to_string_lossy().contains(':'))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        format!("folder `{bad}` cannot be passed to a rank: {e}")
    })
}

/// The folders of a list written by [`join_paths`], empty entries left out.
pub fn split_paths(value: &OsStr) -> Vec<PathBuf> {
    std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// An artifact's kind in a rank's announcement: its `snake_case` name (`lora`,
/// `sample_image`, `checkpoint`, `training_log`); a job's inputs are refused by name.
mod output_kind {
    use loractl_proto::domain::ArtifactKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &ArtifactKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ArtifactKind, D::Error> {
        let name = String::deserialize(d)?;
        let outputs = || {
            ArtifactKind::ALL
                .into_iter()
                .filter(|k| k.is_job_output())
                .map(ArtifactKind::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match ArtifactKind::from_name(&name) {
            Some(kind) if kind.is_job_output() => Ok(kind),
            _ => Err(serde::de::Error::custom(format!(
                "`{name}` is not an artifact kind a rank publishes (one of: {})",
                outputs()
            ))),
        }
    }
}

/// A rank's progress after an optimizer step. Only `step`, `total_steps`, `loss` and `lr` are
/// required; the rest is what the rank knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankProgress {
    pub step: u64,
    pub total_steps: u64,
    #[serde(default)]
    pub epoch: u32,
    /// The step's loss (kohya's `loss/current`).
    pub loss: f64,
    /// The first parameter group's learning rate.
    pub lr: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_lr: Option<f64>,
    #[serde(default)]
    pub steps_per_second: f64,
    #[serde(default)]
    pub samples_per_second: f64,
    #[serde(default)]
    pub gpu_memory_bytes: u64,
    /// Moving average of the loss (`loss/average`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_average: Option<f64>,
    /// Average loss of the last finished epoch (`loss/epoch_average`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_epoch_average: Option<f64>,
    /// Learning rate of every parameter group (`lr/<group>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lrs: Vec<(String, f64)>,
    /// d·lr of every group for D-Adaptation and Prodigy (`lr/d*lr/<group>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub d_lrs: Vec<(String, f64)>,
    /// Seconds of the step spent loading and encoding its batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_seconds: Option<f64>,
    /// Seconds of the step spent all-reducing gradients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ChildMessage {
    Progress(RankProgress),
    /// A finished file to upload to the coordinator (the rank must not change it afterwards).
    Artifact {
        path: PathBuf,
        #[serde(with = "output_kind")]
        kind: ArtifactKind,
        /// Name shown to people; the file name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A phase of the rank before training (`load model`, `cache latents`) started, or
    /// ended (`done`): a span of the job's trace.
    Phase {
        name: String,
        #[serde(default)]
        done: bool,
    },
    /// What this rank's collective backend announces (`host:port` of a TCP ring listener, or
    /// `nccl[:<id>]`: see `loractl_collective::rendezvous`); the rank then waits for
    /// [`ParentMessage::Peers`] on stdin.
    Rendezvous {
        address: String,
    },
}

/// What the worker writes to a rank's stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ParentMessage {
    /// Every rank's address, by rank.
    Peers { addresses: Vec<String> },
}

impl ParentMessage {
    pub fn to_line(&self) -> String {
        format!(
            "{PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// `None` for a line that is not a parent message.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim_end().strip_prefix(PREFIX)?).ok()
    }
}

impl ChildMessage {
    pub fn to_line(&self) -> String {
        // Serialising these plain structs cannot fail.
        format!(
            "{PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }
}

/// One line of rank output, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Message(ChildMessage),
    Text(String),
    /// Looked like a message but did not parse; logged with the reason.
    Malformed {
        text: String,
        problem: String,
    },
}

pub fn parse_line(line: &str) -> Line {
    match line.strip_prefix(PREFIX) {
        None => Line::Text(line.to_owned()),
        Some(json) => match serde_json::from_str(json) {
            Ok(message) => Line::Message(message),
            Err(e) => Line::Malformed {
                text: line.to_owned(),
                problem: e.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_lists_round_trip_and_a_separator_in_a_name_is_refused() {
        let dirs = vec![PathBuf::from("/models"), PathBuf::from("/more models")];
        let joined = join_paths(&dirs).unwrap();
        assert_eq!(joined, "/models:/more models");
        assert_eq!(split_paths(&joined), dirs);
        assert_eq!(split_paths(OsStr::new("")), Vec::<PathBuf>::new());
        assert_eq!(split_paths(OsStr::new("/a::/b")).len(), 2);
        let err = join_paths(&[PathBuf::from("/a:b")]).unwrap_err();
        assert!(err.contains("/a:b"), "{err}");
    }

    #[test]
    fn messages_round_trip_and_text_stays_text() {
        let progress = ChildMessage::Progress(RankProgress {
            step: 3,
            total_steps: 10,
            loss: 0.25,
            lr: 1e-4,
            steps_per_second: 1.5,
            samples_per_second: 3.0,
            ..RankProgress::default()
        });
        assert_eq!(parse_line(&progress.to_line()), Line::Message(progress));
        let full = ChildMessage::Progress(RankProgress {
            step: 4,
            total_steps: 10,
            epoch: 2,
            loss: 0.25,
            lr: 1e-4,
            d_lr: Some(0.5),
            loss_average: Some(0.3),
            loss_epoch_average: Some(0.35),
            lrs: vec![("unet".into(), 1e-4), ("textencoder".into(), 5e-5)],
            d_lrs: vec![("unet".into(), 0.5)],
            data_seconds: Some(0.01),
            allreduce_seconds: Some(0.002),
            ..RankProgress::default()
        });
        assert_eq!(parse_line(&full.to_line()), Line::Message(full));
        // The short form scripts print still parses.
        assert!(matches!(
            parse_line(
                r#"@loractl {"progress":{"step":1,"total_steps":2,"loss":0.5,"lr":0.0001}}"#
            ),
            Line::Message(ChildMessage::Progress(_))
        ));
        let artifact = ChildMessage::Artifact {
            path: "out/a.safetensors".into(),
            kind: ArtifactKind::Lora,
            name: None,
        };
        assert_eq!(
            artifact.to_line(),
            r#"@loractl {"artifact":{"path":"out/a.safetensors","kind":"lora"}}"#
        );
        assert_eq!(parse_line("epoch 1/2"), Line::Text("epoch 1/2".into()));
        let peers = ParentMessage::Peers {
            addresses: vec!["a:1".into(), "b:2".into()],
        };
        assert_eq!(
            peers.to_line(),
            r#"@loractl {"peers":{"addresses":["a:1","b:2"]}}"#
        );
        assert_eq!(
            ParentMessage::parse(&format!("{}\n", peers.to_line())),
            Some(peers)
        );
        assert_eq!(ParentMessage::parse("hello"), None);
        assert!(matches!(
            parse_line(r#"@loractl {"progress":{"step":1}}"#),
            Line::Malformed { .. }
        ));
    }

    #[test]
    fn a_rank_publishes_outputs_only() {
        for kind in ArtifactKind::ALL.into_iter().filter(|k| k.is_job_output()) {
            let line = format!(
                r#"@loractl {{"artifact":{{"path":"x","kind":"{}"}}}}"#,
                kind.as_str()
            );
            let Line::Message(ChildMessage::Artifact { kind: parsed, .. }) = parse_line(&line)
            else {
                panic!("{line} does not parse");
            };
            assert_eq!(parsed, kind);
        }
        for name in ["dataset", "base_model", "weights"] {
            let line = format!(r#"@loractl {{"artifact":{{"path":"x","kind":"{name}"}}}}"#);
            let Line::Malformed { problem, .. } = parse_line(&line) else {
                panic!("{line} was accepted");
            };
            assert!(
                problem.contains(&format!(
                    "`{name}` is not an artifact kind a rank publishes"
                )) && problem.contains("lora, sample_image, checkpoint, training_log"),
                "{problem}"
            );
        }
    }
}
