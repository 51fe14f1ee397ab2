//! Shared by the CLI's integration tests: a tiny training job in a fresh temporary folder.

use std::path::PathBuf;

/// A job over the bundled tiny model: a generated 64 px dataset of 4 images, batch size 1,
/// `steps` steps, in a folder of its own (`name` keeps concurrent tests apart). Returns the
/// folder and the job file.
pub fn job_dir(name: &str, steps: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("loractl-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let data = loractl_trainer::demo::write_dataset(&dir, 64, 4)?;
    let model = loractl_trainer::demo::bundled_tiny_model();
    let job = dir.join("job.toml");
    let text = loractl_trainer::demo::job_toml(&model, &data, 64, steps)
        .replace("train_batch_size = 2", "train_batch_size = 1");
    std::fs::write(&job, text)?;
    Ok((dir, job))
}
