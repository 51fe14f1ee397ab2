//! How a rank process talks to its worker: plain lines on stdout/stderr are log lines; a
//! stdout line `@loractl {json}` is a message ([`ChildMessage`]): a progress sample, an
//! artifact to upload, or the rank's address for the rendezvous of a multi-worker job. The
//! worker answers on the rank's stdin with `@loractl {json}` lines ([`ParentMessage`]): the
//! addresses of every rank once all joined. The rank program (the seam where training plugs
//! in) prints with [`ChildMessage::to_line`] and reads with [`ParentMessage::parse`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const PREFIX: &str = "@loractl ";

/// What the artifact is, as the rank announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKindName {
    Lora,
    SampleImage,
    Checkpoint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ChildMessage {
    Progress {
        step: u64,
        total_steps: u64,
        #[serde(default)]
        epoch: u32,
        loss: f64,
        lr: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        d_lr: Option<f64>,
        #[serde(default)]
        steps_per_second: f64,
        #[serde(default)]
        samples_per_second: f64,
        #[serde(default)]
        gpu_memory_bytes: u64,
    },
    /// A finished file to upload to the coordinator (the rank must not change it afterwards).
    Artifact {
        path: PathBuf,
        kind: ArtifactKindName,
        /// Name shown to people; the file name when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// What this rank's collective backend announces (`host:port` of a TCP ring listener, or
    /// `nccl[:<id>]`: see `loractl_collective::rendezvous`); the rank then waits for
    /// [`ParentMessage::Peers`] on stdin.
    Rendezvous { address: String },
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
    fn messages_round_trip_and_text_stays_text() {
        let progress = ChildMessage::Progress {
            step: 3,
            total_steps: 10,
            epoch: 0,
            loss: 0.25,
            lr: 1e-4,
            d_lr: None,
            steps_per_second: 1.5,
            samples_per_second: 3.0,
            gpu_memory_bytes: 0,
        };
        assert_eq!(parse_line(&progress.to_line()), Line::Message(progress));
        let artifact = ChildMessage::Artifact {
            path: "out/a.safetensors".into(),
            kind: ArtifactKindName::Lora,
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
}
