//! Shared by the CLI's integration tests: a tiny training job in a fresh temporary folder.

use std::path::{Path, PathBuf};

/// A test's folder, removed when the test ends (passed or failed).
pub struct JobDir(tempfile::TempDir);

impl std::ops::Deref for JobDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for JobDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// A job over the bundled tiny model: a generated 64 px dataset of 4 images, batch size 1,
/// `steps` steps, in a folder of its own (`name` is part of its name, to tell the tests'
/// folders apart). Returns the folder and the job file.
pub fn job_dir(name: &str, steps: usize) -> anyhow::Result<(JobDir, PathBuf)> {
    let dir = JobDir(
        tempfile::Builder::new()
            .prefix(&format!("loractl-cli-{name}-"))
            .tempdir()?,
    );
    let data = loractl_trainer::demo::write_dataset(&dir, 64, 4)?;
    let model = loractl_trainer::demo::bundled_tiny_model();
    let job = dir.join("job.toml");
    let text = loractl_trainer::demo::job_toml(&model, &data, 64, steps)
        .replace("train_batch_size = 2", "train_batch_size = 1");
    std::fs::write(&job, text)?;
    Ok((dir, job))
}
