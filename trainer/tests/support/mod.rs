//! Helpers shared by the trainer's integration tests, each test file taking what it needs with
//! `mod support;`:
//!
//! - here: fixture paths, the tiny models' load options, scratch folders and message checks;
//! - `tensors`: reference tensors read from fixtures and compared;
//! - `datasets`: generated kohya `N_name` folders of captioned checkerboards;
//! - `hostile`: hostile model files (crafted checkpoints and safetensors) and memory readings.
#![allow(dead_code)]

mod datasets;
mod hostile;
mod tensors;

use std::path::{Path, PathBuf};

use loractl_trainer::clip::ClipTextConfig;
use loractl_trainer::loader::LoadOptions;
use loractl_trainer::lora::LoraConfig;
use loractl_trainer::train::TrainOptions;
use loractl_trainer::unet::UNetConfig;
use loractl_trainer::vae::VaeConfig;

// Each test file uses a part of these.
#[allow(unused_imports)]
pub use datasets::*;
#[allow(unused_imports)]
pub use hostile::*;
#[allow(unused_imports)]
pub use tensors::*;

/// `p` under the trainer's test fixtures (`trainer/tests/fixtures`).
pub fn fixture(p: impl AsRef<Path>) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// The fixtures of one tiny model (`sd1`, `sd2`), checked to hold the reference outputs.
pub fn model_fixture(config: &str) -> PathBuf {
    let dir = fixture(config);
    assert!(
        dir.join("reference.safetensors").exists(),
        "fixtures for {config} missing at {} (regenerate with scripts/fixtures/make_fixtures.py)",
        dir.display()
    );
    dir
}

/// The tiny SD1 model as a diffusers folder.
pub fn sd1_diffusers() -> PathBuf {
    fixture("sd1/diffusers")
}

/// Load options with the tiny model `config`'s own configurations, as diffusers'
/// `from_single_file(config=...)` takes them: their head counts and VAE group count break the
/// real-model rules the single-file config inference uses.
pub fn tiny_load_options(config: &str) -> anyhow::Result<LoadOptions> {
    let dir = fixture(config).join("diffusers");
    let unet_json = dir.join("unet/config.json");
    Ok(LoadOptions {
        unet_config: Some(UNetConfig::from_json(
            &std::fs::read_to_string(&unet_json)?,
            &unet_json.display().to_string(),
        )?),
        text_config: Some(ClipTextConfig::from_file(
            &dir.join("text_encoder/config.json"),
        )?),
        vae_config: Some(VaeConfig::from_json(&std::fs::read_to_string(
            dir.join("vae/config.json"),
        )?)?),
        ..LoadOptions::default()
    })
}

/// Options for `steps` optimizer steps of a rank-`rank` LoRA (alpha = rank) on the tiny model,
/// at `unet_lr` and `text_encoder_lr`; the rest as sd-scripts' defaults (AdamW without
/// arguments, a constant lr, clipping at 1, clip_skip 1, 75 tokens).
pub fn lora_train_options(
    rank: usize,
    unet_lr: f64,
    text_encoder_lr: f64,
    steps: usize,
) -> TrainOptions {
    TrainOptions {
        lora: LoraConfig {
            rank,
            alpha: rank as f64,
            ..Default::default()
        },
        unet_lr: Some(unet_lr),
        text_encoder_lr: Some(text_encoder_lr),
        max_train_steps: steps,
        ..TrainOptions::default()
    }
}

/// An empty folder under the system temp dir (see [`scratch_dir`]),
/// removed with everything in it when dropped: a test leaves nothing behind. Read it as a
/// `Path`.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        scratch_dir(tag).expect("create a scratch folder")
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// A new [`TempDir`] named `loractl-<name>-` and a unique suffix.
pub fn scratch_dir(name: &str) -> anyhow::Result<TempDir> {
    Ok(TempDir(
        tempfile::Builder::new()
            .prefix(&format!("loractl-{name}-"))
            .tempdir()?,
    ))
}

/// Fails unless `msg` contains every one of `parts`.
pub fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message lacks `{p}`:\n{msg}");
    }
}

/// One `#[test]` per case, each running `check` on its argument: the same check on each tiny
/// model (`"sd1"`, `"sd2"`) or fixture file, reported as separate tests.
#[allow(unused_macros)]
macro_rules! tests_of {
    ($check:path { $($(#[$attr:meta])* $name:ident => $arg:expr),+ $(,)? }) => {
        $(
            $(#[$attr])*
            #[test]
            fn $name() -> anyhow::Result<()> {
                $check($arg)
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use tests_of;
