//! The kohya (sd-scripts DreamBooth-style) dataset: `N_name` folders of images and captions,
//! aspect-ratio buckets, per-epoch batch plans, caption augmentation, image loading and the VAE
//! latent cache. Behaviour follows `library/train_util.py`; where it differs, the item says so.
//!
//! - [`config`] — [`DatasetConfig`], kohya's dataset options and their validation.
//! - [`scan`] — folder layout, captions and the errors for layout mistakes.
//! - [`bucket`] — `make_bucket_resolutions` and `BucketManager.select_bucket`.
//! - [`caption`] — per-sample caption processing (dropout, keep/shuffle, tag dropout).
//! - [`pixels`] — header probing, decoding, kohya's resize/crop/flip, tensors in [-1, 1].
//! - [`plan`] — batches per epoch, shuffling, sharding, step arithmetic.
//! - [`cache`] — the latent cache keyed by image bytes, VAE, bucket, flip and crop.
//! - [`summary`] — the `plan` report and kohya's `ss_*` dataset metadata.
//!
//! Deliberate differences from sd-scripts: folders are read in name order (kohya: directory
//! order); image extensions match case-insensitively and `.bmp`/`.gif`/… are reported, not read;
//! a folder without images, a repeat count below 1 or an unreadable caption is an error (kohya
//! skips the first two with a log line); unreadable images are skipped with a warning by default
//! instead of crashing; without `enable_bucket` images are resized to cover `resolution` and
//! center-cropped (what kohya's latent-cache path does; its uncached path demands exact sizes);
//! randomness comes from seeded ChaCha8 streams (same distributions, other draws than Python's
//! `random`). Not supported: wildcards, `secondary_separator`, token warmup, face-crop file
//! names, `color_aug`, alpha masks, validation splits and `dataset_config` TOML subsets.

pub mod bucket;
pub mod cache;
pub mod caption;
pub mod config;
pub mod pixels;
pub mod plan;
pub mod scan;
pub mod summary;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;

pub use bucket::{make_bucket_resolutions, BucketChoice, BucketSelector, Reso};
pub use cache::{CacheStats, LatentCache};
pub use caption::{process_caption, CaptionOptions, TagCounts};
pub use config::{BadImagePolicy, DatasetConfig};
pub use pixels::CropMode;
pub use plan::{shard, Batch};
pub use scan::Subset;
pub use summary::DatasetSummary;

use crate::{Error, Result};

/// One image used in training.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    pub path: PathBuf,
    /// Index into [`Dataset::subsets`].
    pub subset: usize,
    /// The caption before per-sample processing (caption file or folder name).
    pub caption: String,
    pub is_reg: bool,
    /// (width, height) from the file header.
    pub size: (u32, u32),
    /// Times per epoch; for reg images raised by kohya's balancing.
    pub repeats: u32,
    /// Index into [`Dataset::buckets`].
    pub bucket: usize,
    pub choice: BucketChoice,
}

/// One bucket: a training size and the images assigned to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub reso: Reso,
    /// Indices into [`Dataset::images`], each once.
    pub images: Vec<usize>,
    /// Entries per epoch (images × their repeats).
    pub count: usize,
}

/// What a loaded batch feeds the model.
#[derive(Debug, Clone)]
pub enum BatchInput {
    /// `[B, 3, H, W]` f32 in [-1, 1], to be VAE-encoded.
    Pixels(Tensor),
    /// `[B, C, H/8, W/8]` cached latents (unscaled, as the encoder returned them).
    Latents(Tensor),
}

/// A batch ready for a training step.
#[derive(Debug, Clone)]
pub struct SampleBatch {
    pub reso: Reso,
    pub input: BatchInput,
    pub captions: Vec<String>,
    /// 1 for training images, `prior_loss_weight` for regularization images.
    pub loss_weights: Vec<f32>,
    pub flipped: Vec<bool>,
    /// Indices into [`Dataset::images`] of the samples kept.
    pub images: Vec<usize>,
    /// Their positions in the global batch (see [`plan::sample_rng`]).
    pub positions: Vec<usize>,
}

/// An image dropped under [`BadImagePolicy::Skip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

/// A scanned, bucketed dataset.
#[derive(Debug)]
pub struct Dataset {
    cfg: DatasetConfig,
    caption_opts: CaptionOptions,
    subsets: Vec<Subset>,
    images: Vec<ImageEntry>,
    buckets: Vec<Bucket>,
    warnings: Vec<String>,
    num_train_images: usize,
    num_reg_images: usize,
    unused_reg_images: usize,
    mean_ar_error: f64,
    skipped_at_open: Vec<SkippedImage>,
    /// Images that failed to decode during the run (index -> reason).
    failed: Mutex<BTreeMap<usize, String>>,
    hashes: Vec<OnceLock<[u8; 32]>>,
}

/// An image found on disk with its header size and bucket, before reg balancing.
struct Candidate {
    found: scan::FoundImage,
    size: (u32, u32),
    choice: BucketChoice,
}

impl Dataset {
    /// Scans the folders, reads image headers (not pixels) and assigns buckets.
    pub fn open(cfg: DatasetConfig) -> Result<Self> {
        cfg.validate()?;
        let caption_ext = cfg.caption_ext();
        let mut out = scan::ScanOutput::default();

        if cfg.enable_bucket {
            let (min, max) = cfg.adjusted_bucket_range();
            if min != cfg.min_bucket_reso {
                out.warn(format!(
                    "min_bucket_reso: {} is not a multiple of bucket_reso_steps {}; using {min}",
                    cfg.min_bucket_reso, cfg.bucket_reso_steps
                ));
            }
            if max != cfg.max_bucket_reso {
                out.warn(format!(
                    "max_bucket_reso: {} is not a multiple of bucket_reso_steps {}; using {max}",
                    cfg.max_bucket_reso, cfg.bucket_reso_steps
                ));
            }
            if cfg.bucket_no_upscale {
                tracing::info!("bucket_no_upscale: bucket sizes follow each image, so min/max_bucket_reso are not used");
            }
        }

        scan::scan_data_dir(
            &cfg.train_data_dir,
            "train_data_dir",
            false,
            &caption_ext,
            &cfg.allowed_roots,
            &mut out,
        )?;
        if let Some(reg) = &cfg.reg_data_dir {
            scan::scan_data_dir(
                reg,
                "reg_data_dir",
                true,
                &caption_ext,
                &cfg.allowed_roots,
                &mut out,
            )?;
        }
        let scan::ScanOutput {
            mut subsets,
            images: found,
            mut warnings,
        } = out;

        let selector = if !cfg.enable_bucket {
            BucketSelector::predefined(vec![cfg.resolution])
        } else if cfg.bucket_no_upscale {
            BucketSelector::no_upscale(cfg.resolution, cfg.bucket_reso_steps)
        } else {
            let (min, max) = cfg.adjusted_bucket_range();
            BucketSelector::predefined(make_bucket_resolutions(
                cfg.resolution,
                min,
                max,
                cfg.bucket_reso_steps,
            ))
        };

        let mut skipped_at_open = Vec::new();
        let mut candidates = Vec::with_capacity(found.len());
        for f in found {
            let probed = pixels::probe_size(&f.path, &cfg.allowed_roots).and_then(|(w, h)| {
                selector.select(w, h).map(|c| ((w, h), c)).ok_or_else(|| {
                    Error::io(
                        &f.path,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "image is {w}x{h}, too small for a {}-pixel bucket step with \
                                 bucket_no_upscale; enlarge or remove it, or turn off bucket_no_upscale",
                                cfg.bucket_reso_steps
                            ),
                        ),
                    )
                })
            });
            match probed {
                Ok((size, choice)) => candidates.push(Candidate {
                    found: f,
                    size,
                    choice,
                }),
                // A file outside the allowed folders is a bad job, never a skippable image.
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => match cfg.bad_image_policy {
                    BadImagePolicy::Fail => return Err(e),
                    BadImagePolicy::Skip => {
                        let msg = format!("skipping image: {e}");
                        tracing::warn!("{msg}");
                        warnings.push(msg);
                        skipped_at_open.push(SkippedImage {
                            path: f.path.clone(),
                            reason: e.to_string(),
                        });
                    }
                },
            }
        }

        // Per-folder counts of usable images.
        let mut usable = vec![0usize; subsets.len()];
        for c in &candidates {
            usable[c.found.subset] += 1;
        }
        for (s, &n) in subsets.iter_mut().zip(&usable) {
            if n == 0 {
                return Err(Error::Config(format!(
                    "folder `{}` has no readable images (all {} failed to open); fix or replace them",
                    s.dir.display(),
                    s.img_count
                )));
            }
            s.img_count = n;
        }

        let num_train_images: usize = subsets
            .iter()
            .filter(|s| !s.is_reg)
            .map(|s| s.repeats as usize * s.img_count)
            .sum();
        let num_reg_images: usize = subsets
            .iter()
            .filter(|s| s.is_reg)
            .map(|s| s.repeats as usize * s.img_count)
            .sum();

        // kohya registers training images first, then reg images (see below).
        let mut entries: Vec<(Candidate, u32)> = Vec::new();
        let mut reg: Vec<(Candidate, u32)> = Vec::new();
        for c in candidates {
            let repeats = subsets[c.found.subset].repeats;
            if subsets[c.found.subset].is_reg {
                reg.push((c, repeats));
            } else {
                entries.push((c, repeats));
            }
        }
        let unused_reg_images = balance_reg(&mut reg, num_train_images);
        if num_reg_images > 0 && num_train_images < num_reg_images {
            let msg = format!(
                "reg_data_dir: {num_reg_images} regularization samples (with repeats) for \
                 {num_train_images} training samples; {unused_reg_images} reg images are not used"
            );
            tracing::warn!("{msg}");
            warnings.push(msg);
        }
        entries.extend(reg.into_iter().filter(|(_, r)| *r > 0));

        // Buckets in size order, as kohya's BucketManager.sort().
        let mut resos: Vec<Reso> = entries.iter().map(|(c, _)| c.choice.reso).collect();
        resos.sort();
        resos.dedup();
        let mut buckets: Vec<Bucket> = resos
            .iter()
            .map(|&reso| Bucket {
                reso,
                images: Vec::new(),
                count: 0,
            })
            .collect();
        let mut images = Vec::with_capacity(entries.len());
        let mut ar_error_sum = 0.0;
        for (c, repeats) in entries {
            let bucket = resos.binary_search(&c.choice.reso).unwrap_or(0);
            buckets[bucket].images.push(images.len());
            buckets[bucket].count += repeats as usize;
            ar_error_sum += c.choice.ar_error.abs();
            images.push(ImageEntry {
                is_reg: subsets[c.found.subset].is_reg,
                path: c.found.path,
                subset: c.found.subset,
                caption: c.found.caption,
                size: c.size,
                repeats,
                bucket,
                choice: c.choice,
            });
        }
        let mean_ar_error = if images.is_empty() {
            0.0
        } else {
            ar_error_sum / images.len() as f64
        };
        let hashes = (0..images.len()).map(|_| OnceLock::new()).collect();

        Ok(Self {
            caption_opts: CaptionOptions::from(&cfg),
            cfg,
            subsets,
            images,
            buckets,
            warnings,
            num_train_images,
            num_reg_images,
            unused_reg_images,
            mean_ar_error,
            skipped_at_open,
            failed: Mutex::new(BTreeMap::new()),
            hashes,
        })
    }

    pub fn config(&self) -> &DatasetConfig {
        &self.cfg
    }

    pub fn subsets(&self) -> &[Subset] {
        &self.subsets
    }

    /// Images in training, training images first then the reg images kohya's balancing kept.
    pub fn images(&self) -> &[ImageEntry] {
        &self.images
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Warnings raised while opening (also logged).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Training samples per epoch (images × repeats), kohya's `num_train_images`.
    pub fn num_train_images(&self) -> usize {
        self.num_train_images
    }

    /// Regularization samples per epoch before balancing, kohya's `num_reg_images`.
    pub fn num_reg_images(&self) -> usize {
        self.num_reg_images
    }

    /// Reg images that balancing left out (there were more reg than training samples).
    pub fn unused_reg_images(&self) -> usize {
        self.unused_reg_images
    }

    pub fn crop_mode(&self) -> CropMode {
        if self.cfg.random_crop {
            CropMode::Random
        } else {
            CropMode::Center
        }
    }

    /// The latent cache the options ask for: on disk under `latent_cache_dir` with
    /// `cache_latents_to_disk`, in memory with `cache_latents`, none otherwise. `vae_id` must
    /// change whenever the VAE's weights do (e.g. the VAE file's hash).
    pub fn latent_cache(&self, vae_id: &str) -> Result<Option<LatentCache>> {
        if self.cfg.cache_latents_to_disk {
            LatentCache::on_disk_within(
                vae_id,
                self.cfg.latent_cache_dir(),
                self.cfg.allowed_roots.clone(),
            )
            .map(Some)
        } else if self.cfg.cache_latents {
            Ok(Some(LatentCache::in_memory(vae_id)))
        } else {
            Ok(None)
        }
    }

    /// Images dropped so far under [`BadImagePolicy::Skip`], at open and while loading.
    pub fn skipped_images(&self) -> Vec<SkippedImage> {
        let mut out = self.skipped_at_open.clone();
        if let Ok(failed) = self.failed.lock() {
            out.extend(failed.iter().map(|(&i, reason)| SkippedImage {
                path: self.images[i].path.clone(),
                reason: reason.clone(),
            }));
        }
        out
    }

    /// Batches per epoch (all ranks together), kohya's `len(train_dataloader)`.
    pub fn batches_per_epoch(&self) -> usize {
        plan::batches_per_epoch(
            self.buckets.iter().map(|b| b.count),
            self.cfg.train_batch_size,
        )
    }

    /// Global batches per epoch with `world_size` ranks of `train_batch_size` each: buckets
    /// cut into batches of `train_batch_size × world_size` (the trainer's plan, see
    /// [`plan::split`]); [`Dataset::batches_per_epoch`] with one rank.
    pub fn global_batches_per_epoch(&self, world_size: usize) -> usize {
        plan::global_batches_per_epoch(
            self.buckets.iter().map(|b| b.count),
            self.cfg.train_batch_size,
            world_size,
        )
    }

    /// Optimizer steps of the run (see [`plan::total_steps`]), counted on the global batches
    /// the ranks share (kohya's figure when the buckets divide evenly).
    pub fn total_steps(
        &self,
        max_train_steps: usize,
        max_train_epochs: Option<usize>,
        world_size: usize,
        grad_accum: usize,
    ) -> usize {
        plan::total_steps(
            self.global_batches_per_epoch(world_size),
            max_train_steps,
            max_train_epochs,
            1,
            grad_accum,
        )
    }

    /// Epochs needed for `total_steps` optimizer steps.
    pub fn num_epochs(&self, total_steps: usize, world_size: usize, grad_accum: usize) -> usize {
        plan::num_epochs(
            self.global_batches_per_epoch(world_size),
            total_steps,
            1,
            grad_accum,
        )
    }

    /// The batches of `epoch` (1-based) in training order, before sharding.
    pub fn epoch_batches(&self, epoch: usize, seed: u64) -> Vec<Batch> {
        self.global_batches(epoch, seed, 1)
    }

    /// The global batches of `epoch` for `world_size` ranks (`train_batch_size` samples per
    /// rank), to be split with [`plan::split`].
    pub fn global_batches(&self, epoch: usize, seed: u64, world_size: usize) -> Vec<Batch> {
        let lists: Vec<(Reso, Vec<usize>)> = self
            .buckets
            .iter()
            .map(|b| {
                let entries = b
                    .images
                    .iter()
                    .flat_map(|&i| std::iter::repeat_n(i, self.images[i].repeats as usize))
                    .collect();
                (b.reso, entries)
            })
            .collect();
        let global = self.cfg.train_batch_size.max(1) * world_size.max(1);
        plan::plan_epoch(&lists, global, seed, epoch)
    }

    /// Processes image `index`'s caption for one sample.
    pub fn caption_for<R: Rng + ?Sized>(&self, index: usize, epoch: usize, rng: &mut R) -> String {
        process_caption(&self.images[index].caption, &self.caption_opts, epoch, rng)
    }

    /// Decodes image `index` and fits it to its bucket: `[3, H, W]` f32 in [-1, 1].
    pub fn load_pixels<R: Rng + ?Sized>(
        &self,
        index: usize,
        flip: bool,
        rng: &mut R,
        device: &Device,
    ) -> Result<Tensor> {
        pixels::to_tensor(&self.load_fitted(index, flip, rng)?, device)
    }

    /// Decodes image `index` to 8-bit RGB resized and cropped to its bucket.
    pub fn load_fitted<R: Rng + ?Sized>(
        &self,
        index: usize,
        flip: bool,
        rng: &mut R,
    ) -> Result<RgbImage> {
        let e = &self.images[index];
        let img = pixels::decode_rgb(&e.path, &self.cfg.allowed_roots)?;
        let (w, h) = (img.width(), img.height());
        if (w, h) != e.size {
            // A header that disagrees with the pixels (kohya has a TODO for this case).
            return Err(Error::io(
                &e.path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "decoded size {w}x{h} differs from the {}x{} read at start; the file changed \
                         during the run",
                        e.size.0, e.size.1
                    ),
                ),
            ));
        }
        pixels::fit_to_bucket(&e.path, &img, &e.choice, self.crop_mode(), flip, rng)
    }

    fn is_failed(&self, index: usize) -> bool {
        self.failed
            .lock()
            .map(|f| f.contains_key(&index))
            .unwrap_or(false)
    }

    /// Applies the bad-image policy: `Ok(())` means the image is skipped.
    fn on_bad_image(&self, index: usize, err: Error) -> Result<()> {
        if matches!(err, Error::Config(_)) {
            // A file outside the allowed folders (swapped in during the run) ends the run.
            return Err(err);
        }
        match self.cfg.bad_image_policy {
            BadImagePolicy::Fail => Err(err),
            BadImagePolicy::Skip => {
                let mut failed = self
                    .failed
                    .lock()
                    .map_err(|_| Error::Config("dataset lock poisoned by a panic".into()))?;
                if failed.insert(index, err.to_string()).is_none() {
                    tracing::warn!(path = %self.images[index].path.display(), "skipping image for the rest of the run: {err}");
                }
                Ok(())
            }
        }
    }

    fn file_hash(&self, index: usize) -> Result<[u8; 32]> {
        if let Some(h) = self.hashes[index].get() {
            return Ok(*h);
        }
        let h = cache::file_sha256(&self.images[index].path, &self.cfg.allowed_roots)?;
        Ok(*self.hashes[index].get_or_init(|| h))
    }

    /// The cache key of image `index` with or without flip.
    pub fn latent_key(&self, cache: &LatentCache, index: usize, flip: bool) -> Result<String> {
        let h = self.file_hash(index)?;
        Ok(cache.key(&h, self.images[index].choice.reso, flip, self.crop_mode()))
    }

    /// Encodes every image (and its mirror with `flip_aug`) into `cache`, reusing entries that
    /// are already there. `encode` gets `[1, 3, H, W]` f32 pixels on the CPU in [-1, 1] and
    /// returns `[1, C, H/8, W/8]` latents. Images that cannot be read follow the bad-image
    /// policy; a latent with NaN is an error naming the image.
    pub fn cache_latents<F>(&self, cache: &LatentCache, encode: F) -> Result<CacheStats>
    where
        F: FnMut(&Tensor) -> Result<Tensor>,
    {
        self.cache_latents_shard(cache, 0, 1, encode)
    }

    /// [`Dataset::cache_latents`] for the images with index ≡ `rank` (mod `world_size`): with a
    /// disk cache, each data-parallel rank encodes its share and, after a barrier, every rank
    /// reads all entries (kohya splits disk caching the same way).
    pub fn cache_latents_shard<F>(
        &self,
        cache: &LatentCache,
        rank: usize,
        world_size: usize,
        mut encode: F,
    ) -> Result<CacheStats>
    where
        F: FnMut(&Tensor) -> Result<Tensor>,
    {
        if self.cfg.random_crop {
            return Err(Error::Config(
                "cache_latents cannot be used with random_crop: a cached latent fixes one crop for the \
                 whole run; turn off random_crop or latent caching"
                    .into(),
            ));
        }
        let flips: &[bool] = if self.cfg.flip_aug {
            &[false, true]
        } else {
            &[false]
        };
        let mut stats = CacheStats::default();
        // Center crops draw nothing from the RNG; one is needed only to satisfy the signature.
        let mut rng = plan::epoch_rng(0, 0);
        let world = world_size.max(1);
        for index in (0..self.images.len()).filter(|i| i % world == rank % world) {
            if self.is_failed(index) {
                continue;
            }
            let mut keys = Vec::new();
            for &flip in flips {
                match self.latent_key(cache, index, flip) {
                    Ok(k) => keys.push((flip, k)),
                    Err(e) => {
                        self.on_bad_image(index, e)?;
                        break;
                    }
                }
            }
            if keys.len() != flips.len() {
                stats.skipped_images += 1;
                continue;
            }
            let mut todo = Vec::new();
            for (flip, key) in keys {
                if cache.contains(&key)? {
                    stats.reused += 1;
                } else {
                    todo.push((flip, key));
                }
            }
            if todo.is_empty() {
                continue;
            }
            let fitted = match self.load_fitted(index, false, &mut rng) {
                Ok(img) => img,
                Err(e) => {
                    self.on_bad_image(index, e)?;
                    stats.skipped_images += 1;
                    continue;
                }
            };
            for (flip, key) in todo {
                let input = if flip {
                    pixels::to_tensor(&image::imageops::flip_horizontal(&fitted), &Device::Cpu)?
                } else {
                    pixels::to_tensor(&fitted, &Device::Cpu)?
                }
                .unsqueeze(0)?;
                let latent = encode(&input)?;
                let latent = match latent.dims() {
                    [1, _, _, _] => latent.squeeze(0)?,
                    [_, _, _] => latent,
                    dims => {
                        return Err(Error::Config(format!(
                            "latent encoder returned shape {dims:?}; expected [1, C, H/8, W/8]"
                        )))
                    }
                };
                if has_nan(&latent)? {
                    return Err(Error::io(
                        &self.images[index].path,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the VAE produced NaN latents for this image (try no_half_vae / an fp32 VAE)",
                        ),
                    ));
                }
                cache.insert(&key, &latent)?;
                stats.encoded += 1;
            }
        }
        Ok(stats)
    }

    /// Loads one batch of `epoch` (1-based): each sample's flip, crop and caption drawn from its
    /// own RNG stream (see [`plan::sample_rng`]). With `cache`, latents come from it (run
    /// [`Dataset::cache_latents`] first); otherwise pixels are decoded. Unreadable images are
    /// dropped under [`BadImagePolicy::Skip`]; `None` when none is left.
    pub fn load_batch(
        &self,
        batch: &Batch,
        epoch: usize,
        seed: u64,
        cache: Option<&LatentCache>,
        device: &Device,
    ) -> Result<Option<SampleBatch>> {
        let mut tensors = Vec::with_capacity(batch.images.len());
        let (mut captions, mut loss_weights, mut flipped, mut images, mut positions) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (j, &index) in batch.images.iter().enumerate() {
            let position = batch.offset + j;
            let mut rng = plan::sample_rng(seed, epoch, batch.index, position);
            // Draw in kohya's order (flip, crop, caption); each sample has its own stream, so a
            // bad image does not change the augmentations of the others.
            let flip = self.cfg.flip_aug && rng.random::<f64>() < 0.5;
            let loaded = if self.is_failed(index) {
                None
            } else if let Some(c) = cache {
                // A missing latent is the caller's mistake, not a bad image: no policy applies.
                Some(self.cached_latent(c, index, flip)?)
            } else {
                match self.load_pixels(index, flip, &mut rng, &Device::Cpu) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.on_bad_image(index, e)?;
                        None
                    }
                }
            };
            let caption = self.caption_for(index, epoch, &mut rng);
            let Some(t) = loaded else { continue };
            let e = &self.images[index];
            tensors.push(t);
            captions.push(caption);
            loss_weights.push(if e.is_reg {
                self.cfg.prior_loss_weight as f32
            } else {
                1.0
            });
            flipped.push(flip);
            images.push(index);
            positions.push(position);
        }
        if tensors.is_empty() {
            return Ok(None);
        }
        let stacked = Tensor::stack(&tensors, 0)?.to_device(device)?;
        let input = if cache.is_some() {
            BatchInput::Latents(stacked)
        } else {
            BatchInput::Pixels(stacked)
        };
        Ok(Some(SampleBatch {
            reso: batch.reso,
            input,
            captions,
            loss_weights,
            flipped,
            images,
            positions,
        }))
    }

    fn cached_latent(&self, cache: &LatentCache, index: usize, flip: bool) -> Result<Tensor> {
        let key = self.latent_key(cache, index, flip)?;
        cache.get(&key)?.ok_or_else(|| {
            Error::Config(format!(
                "no cached latent for `{}` (flip {flip}); run cache_latents with this VAE and these \
                 dataset options before training",
                self.images[index].path.display()
            ))
        })
    }
}

fn has_nan(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
    let v: Vec<f32> = t.to_vec1()?;
    Ok(v.iter().any(|x| x.is_nan()))
}

/// kohya's reg balancing: reg images are registered in order with their folder's repeats until
/// they reach `num_train` samples; if they fall short, each registered image gets one more
/// repeat in turn until they do. Returns how many reg images were left out (repeats set to 0).
fn balance_reg<T>(reg: &mut [(T, u32)], num_train: usize) -> usize {
    if reg.is_empty() {
        return 0;
    }
    if num_train == 0 {
        reg.iter_mut().for_each(|(_, r)| *r = 0);
        return reg.len();
    }
    let original: Vec<u32> = reg.iter().map(|(_, r)| *r).collect();
    reg.iter_mut().for_each(|(_, r)| *r = 0);
    let mut n = 0usize;
    let mut registered = 0usize;
    // First pass: register with the folder's repeats.
    for (i, (_, r)) in reg.iter_mut().enumerate() {
        *r = original[i];
        n += original[i] as usize;
        registered += 1;
        if n >= num_train {
            break;
        }
    }
    // Later passes: one more repeat per registered image, round robin.
    while n < num_train {
        for (_, r) in reg.iter_mut().take(registered) {
            *r += 1;
            n += 1;
            if n >= num_train {
                break;
            }
        }
    }
    reg.len() - registered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reps(reg: &[((), u32)]) -> Vec<u32> {
        reg.iter().map(|(_, r)| *r).collect()
    }

    #[test]
    fn reg_balancing_like_kohya() {
        // 3 reg images x1 for 10 train samples: 3, then +1 each round until 10.
        let mut reg = vec![((), 1); 3];
        assert_eq!(balance_reg(&mut reg, 10), 0);
        assert_eq!(reps(&reg), vec![4, 3, 3]);
        // More reg than train: stop registering once reached.
        let mut reg = vec![((), 2); 5];
        assert_eq!(balance_reg(&mut reg, 5), 2);
        assert_eq!(reps(&reg), vec![2, 2, 2, 0, 0]);
    }
}
