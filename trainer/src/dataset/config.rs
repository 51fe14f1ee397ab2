//! The dataset options of a training job (kohya's dataset arguments), their defaults and the
//! one validation pass that reports every problem with the key that causes it.

use std::path::PathBuf;

use crate::confine::AllowedRoots;
use crate::{Error, Result};

/// SD1.x/SD2.x UNets downsample latents three times, so pixel sizes must be multiples of 64
/// (kohya's `verify_bucket_reso_steps(64)`).
pub const SD_RESO_MULTIPLE: u32 = 64;

/// What to do with an image that cannot be read or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadImagePolicy {
    /// Drop the image with a warning naming the file; the run goes on.
    #[default]
    Skip,
    /// Stop with an error naming the file.
    Fail,
}

/// Dataset options, named as kohya's command-line arguments. The job-spec crate maps TOML onto
/// this struct; [`DatasetConfig::validate`] checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetConfig {
    /// Parent of `N_name` folders (N = repeats).
    pub train_data_dir: PathBuf,
    /// Parent of regularization `N_name` folders.
    pub reg_data_dir: Option<PathBuf>,
    /// Extension of caption files beside each image; a missing leading dot is added.
    pub caption_extension: String,
    pub shuffle_caption: bool,
    pub caption_separator: String,
    /// Number of leading tags kept in place when shuffling.
    pub keep_tokens: usize,
    /// When set and present in a caption, the tags before it stay fixed (and those after a
    /// second occurrence stay fixed at the end) instead of the first `keep_tokens`.
    pub keep_tokens_separator: Option<String>,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub caption_dropout_rate: f64,
    /// Every n-th epoch (1-based) trains with empty captions; 0 = never.
    pub caption_dropout_every_n_epochs: usize,
    pub caption_tag_dropout_rate: f64,
    /// Training resolution (width, height); the bucket area with `enable_bucket`.
    pub resolution: (u32, u32),
    pub enable_bucket: bool,
    pub min_bucket_reso: u32,
    pub max_bucket_reso: u32,
    pub bucket_reso_steps: u32,
    pub bucket_no_upscale: bool,
    pub random_crop: bool,
    pub flip_aug: bool,
    /// Loss weight of regularization images.
    pub prior_loss_weight: f64,
    /// Batch size per device.
    pub train_batch_size: usize,
    /// Cache VAE latents in memory before training.
    pub cache_latents: bool,
    /// Also keep the cached latents on disk (implies `cache_latents`).
    pub cache_latents_to_disk: bool,
    /// Where disk-cached latents live; `train_data_dir/.latent_cache` when unset.
    pub latent_cache_dir: Option<PathBuf>,
    pub bad_image_policy: BadImagePolicy,
    /// Where every data file must lie when it is opened (a cluster rank's allowed folders);
    /// not confined by default.
    pub allowed_roots: AllowedRoots,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            train_data_dir: PathBuf::new(),
            reg_data_dir: None,
            // sd-scripts defaults to ".caption", but the GUI and most users write ".txt".
            caption_extension: ".txt".to_string(),
            shuffle_caption: false,
            caption_separator: ",".to_string(),
            keep_tokens: 0,
            keep_tokens_separator: None,
            caption_prefix: None,
            caption_suffix: None,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            resolution: (512, 512),
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            random_crop: false,
            flip_aug: false,
            prior_loss_weight: 1.0,
            train_batch_size: 1,
            cache_latents: false,
            cache_latents_to_disk: false,
            latent_cache_dir: None,
            bad_image_policy: BadImagePolicy::Skip,
            allowed_roots: AllowedRoots::any(),
        }
    }
}

impl DatasetConfig {
    /// A config with kohya's defaults for the given `train_data_dir`.
    pub fn new(train_data_dir: impl Into<PathBuf>) -> Self {
        Self {
            train_data_dir: train_data_dir.into(),
            ..Self::default()
        }
    }

    /// The caption extension with its leading dot, as kohya normalises it.
    pub fn caption_ext(&self) -> String {
        if self.caption_extension.is_empty() || self.caption_extension.starts_with('.') {
            self.caption_extension.clone()
        } else {
            format!(".{}", self.caption_extension)
        }
    }

    /// Whether latents are cached (in memory, and maybe on disk).
    pub fn caches_latents(&self) -> bool {
        self.cache_latents || self.cache_latents_to_disk
    }

    /// The directory of disk-cached latents.
    pub fn latent_cache_dir(&self) -> PathBuf {
        self.latent_cache_dir
            .clone()
            .unwrap_or_else(|| self.train_data_dir.join(".latent_cache"))
    }

    /// Every problem of the options, each naming its key and the fix. Folder contents are
    /// checked when the dataset is opened.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let (w, h) = self.resolution;
        if self.train_data_dir.as_os_str().is_empty() {
            p.push("train_data_dir: not set; give the parent of folders like `30_zenny`".into());
        }
        if w == 0 || h == 0 {
            p.push(format!("resolution: {w}x{h} has a zero side"));
        }
        if self.train_batch_size == 0 {
            p.push("train_batch_size: must be at least 1".into());
        }
        if self.caption_separator.is_empty() {
            p.push("caption_separator: must not be empty (kohya's default is \",\")".into());
        }
        for (key, v) in [
            ("caption_dropout_rate", self.caption_dropout_rate),
            ("caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                p.push(format!("{key}: {v} is not a probability in [0, 1]"));
            }
        }
        if !self.prior_loss_weight.is_finite() || self.prior_loss_weight < 0.0 {
            p.push(format!(
                "prior_loss_weight: {} must be a finite number >= 0",
                self.prior_loss_weight
            ));
        }
        if self.enable_bucket {
            let steps = self.bucket_reso_steps;
            if steps == 0 || !steps.is_multiple_of(SD_RESO_MULTIPLE) {
                p.push(format!(
                    "bucket_reso_steps: {steps} must be a multiple of {SD_RESO_MULTIPLE} for SD1.x/SD2.x \
                     (the UNet halves the latent three times); use 64"
                ));
            } else {
                let (min_reso, max_reso) = self.adjusted_bucket_range();
                if min_reso == 0 {
                    p.push(format!(
                        "min_bucket_reso: {} rounds down to 0 with bucket_reso_steps {steps}; use at least {steps}",
                        self.min_bucket_reso
                    ));
                }
                if w.min(h) < min_reso {
                    p.push(format!(
                        "min_bucket_reso: {min_reso} is larger than the smaller side of resolution {w}x{h}; \
                         lower min_bucket_reso or raise resolution"
                    ));
                }
                if w.max(h) > max_reso {
                    p.push(format!(
                        "max_bucket_reso: {max_reso} is smaller than the larger side of resolution {w}x{h}; \
                         raise max_bucket_reso or lower resolution"
                    ));
                }
            }
        } else if !w.is_multiple_of(SD_RESO_MULTIPLE) || !h.is_multiple_of(SD_RESO_MULTIPLE) {
            p.push(format!(
                "resolution: {w}x{h} must have sides that are multiples of {SD_RESO_MULTIPLE} for SD1.x/SD2.x \
                 without enable_bucket (e.g. {}x{})",
                round_down_nonzero(w, SD_RESO_MULTIPLE),
                round_down_nonzero(h, SD_RESO_MULTIPLE)
            ));
        }
        if self.random_crop && self.caches_latents() {
            let key = if self.cache_latents_to_disk {
                "cache_latents_to_disk"
            } else {
                "cache_latents"
            };
            p.push(format!(
                "{key} cannot be used with random_crop: a cached latent fixes one crop for the whole run; \
                 turn off random_crop or {key}"
            ));
        }
        p
    }

    /// Checks the options; the error lists every problem.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(problems.join("; ")))
        }
    }

    /// min/max bucket sizes moved onto the step grid, as kohya's
    /// `adjust_min_max_bucket_reso_by_steps` does (min rounded down, max rounded up).
    pub fn adjusted_bucket_range(&self) -> (u32, u32) {
        let steps = self.bucket_reso_steps.max(1);
        let min = self.min_bucket_reso - self.min_bucket_reso % steps;
        let max = if self.max_bucket_reso.is_multiple_of(steps) {
            self.max_bucket_reso
        } else {
            self.max_bucket_reso + steps - self.max_bucket_reso % steps
        };
        (min, max)
    }
}

fn round_down_nonzero(v: u32, m: u32) -> u32 {
    (v - v % m).max(m)
}
