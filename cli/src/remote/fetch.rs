//! `loractl fetch JOB`: downloads a job's LoRA files and sample images (and with
//! `--checkpoints` its training states) into a folder. Every download is resumable and checked
//! against its sha256 before it takes its name; a file already there with the same content is
//! left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use loractl_proto::domain::{ArtifactInfo, ArtifactKind};
use loractl_worker::client;
use serde_json::json;

use super::jobs::{get_job, job_artifacts};
use super::show;
use super::{Remote, Target};

/// The artifact's name when it is a plain file name; otherwise (a name from the network that
/// could point elsewhere) one made of its digest.
fn file_name(a: &ArtifactInfo) -> String {
    let plain = !a.name.is_empty()
        && !a.name.starts_with('.')
        && Path::new(&a.name).file_name().and_then(|n| n.to_str()) == Some(a.name.as_str())
        && !a.name.contains(['/', '\\', '\0']);
    if plain {
        a.name.clone()
    } else {
        format!("{}.bin", a.digest.to_hex())
    }
}

pub async fn fetch(
    target: &Target,
    id: &str,
    out: Option<PathBuf>,
    checkpoints: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let remote = Remote::connect(target).await?;
    let job = get_job(&remote, id).await?;
    let wanted = |k: ArtifactKind| {
        matches!(
            k,
            ArtifactKind::Lora | ArtifactKind::SampleImage | ArtifactKind::TrainingLog
        ) || (checkpoints && k == ArtifactKind::Checkpoint)
    };
    // A retried job writes the same names again: the newest of each name wins.
    let mut by_name: BTreeMap<String, ArtifactInfo> = BTreeMap::new();
    for a in job_artifacts(&remote, id).await? {
        if !wanted(a.kind) {
            continue;
        }
        let name = file_name(&a);
        if by_name
            .get(&name)
            .is_none_or(|old| old.created_at <= a.created_at)
        {
            by_name.insert(name, a);
        }
    }
    if by_name.is_empty() {
        anyhow::bail!(
            "job {id} ({}) has no LoRA files or samples yet{}",
            job.state,
            if job.state.is_terminal() {
                String::new()
            } else {
                format!(": wait for it with `loractl watch {id}`")
            }
        );
    }
    let out = out.unwrap_or_else(|| PathBuf::from(id));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Partial downloads live here until verified.
    let partial = out.join(".loractl-fetch");
    let mut artifacts = remote.artifacts().await?;
    let mut fetched = Vec::new();
    for (name, a) in &by_name {
        let dest = out.join(name);
        let current = if dest.is_file() {
            client::hash_file(&dest).await.ok().map(|(d, _)| d)
        } else {
            None
        };
        let state = if current == Some(a.digest) {
            "up to date"
        } else {
            let path = client::download_to_cache(&mut artifacts, &partial, &a.digest)
                .await
                .map_err(|e| remote.explain(e))
                .with_context(|| format!("downloading {name}"))?;
            std::fs::rename(&path, &dest)
                .with_context(|| format!("moving {} to {}", path.display(), dest.display()))?;
            "downloaded"
        };
        if !json {
            println!(
                "{state:<10}  {:<12}  {:>10}  sha256 {}  {}",
                show::kind_name(a.kind),
                show::bytes(a.size),
                &a.digest.to_hex()[..16],
                dest.display()
            );
        }
        let mut value = show::artifact_json(a);
        value["path"] = json!(dest.display().to_string());
        value["state"] = json!(state);
        fetched.push(value);
    }
    let _ = std::fs::remove_dir_all(&partial);
    if json {
        println!("{}", serde_json::to_string_pretty(&fetched)?);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loractl_proto::domain::Digest;

    #[test]
    fn names_from_the_network_cannot_leave_the_folder() {
        let info = |name: &str| ArtifactInfo {
            digest: Digest([1; 32]),
            size: 1,
            kind: ArtifactKind::Lora,
            job_id: None,
            name: name.to_owned(),
            created_at: 0,
        };
        assert_eq!(file_name(&info("zenny.safetensors")), "zenny.safetensors");
        let hashed = format!("{}.bin", Digest([1; 32]).to_hex());
        for bad in [
            "../x.safetensors",
            "/etc/passwd",
            "a/b",
            "..",
            "",
            ".hidden",
        ] {
            assert_eq!(file_name(&info(bad)), hashed, "{bad}");
        }
    }
}
