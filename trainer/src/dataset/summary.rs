//! What a `plan` command prints about a dataset, and the dataset's `ss_*` metadata written the
//! way sd-scripts writes it (Python `json.dumps` text and `str()` values, key order included),
//! so LoRA metadata readers see the same strings as for a kohya-trained file.

use std::path::PathBuf;

use loractl_spec::py;
use serde::Serialize;

use super::{Dataset, Reso, SkippedImage};

/// One `N_name` folder in the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FolderSummary {
    pub name: String,
    pub dir: PathBuf,
    pub is_reg: bool,
    /// Repeats from the folder name.
    pub repeats: u32,
    pub img_count: usize,
    /// Samples per epoch from this folder (after reg balancing).
    pub samples_per_epoch: usize,
    pub missing_captions: usize,
}

/// One bucket in the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketSummary {
    pub resolution: Reso,
    pub images: usize,
    /// Entries per epoch (with repeats).
    pub count: usize,
    pub batches: usize,
}

/// The dataset plan: folders, buckets, counts and what went wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSummary {
    pub folders: Vec<FolderSummary>,
    pub buckets: Vec<BucketSummary>,
    pub num_train_images: usize,
    pub num_reg_images: usize,
    pub unused_reg_images: usize,
    pub batch_size: usize,
    pub batches_per_epoch: usize,
    /// Mean |bucket aspect − image aspect| without repeats; `None` without bucketing.
    pub mean_ar_error: Option<f64>,
    pub warnings: Vec<String>,
    pub skipped_images: Vec<(PathBuf, String)>,
}

impl Dataset {
    pub fn summary(&self) -> DatasetSummary {
        let bs = self.cfg.train_batch_size.max(1);
        let folders = self
            .subsets
            .iter()
            .enumerate()
            .map(|(i, s)| FolderSummary {
                name: s.name.clone(),
                dir: s.dir.clone(),
                is_reg: s.is_reg,
                repeats: s.repeats,
                img_count: s.img_count,
                samples_per_epoch: self
                    .images
                    .iter()
                    .filter(|e| e.subset == i)
                    .map(|e| e.repeats as usize)
                    .sum(),
                missing_captions: s.missing_captions,
            })
            .collect();
        let buckets = self
            .buckets
            .iter()
            .map(|b| BucketSummary {
                resolution: b.reso,
                images: b.images.len(),
                count: b.count,
                batches: b.count.div_ceil(bs),
            })
            .collect();
        DatasetSummary {
            folders,
            buckets,
            num_train_images: self.num_train_images,
            num_reg_images: self.num_reg_images,
            unused_reg_images: self.unused_reg_images,
            batch_size: bs,
            batches_per_epoch: self.batches_per_epoch(),
            mean_ar_error: self.cfg.enable_bucket.then_some(self.mean_ar_error),
            warnings: self.warnings.clone(),
            skipped_images: self
                .skipped_images()
                .into_iter()
                .map(|SkippedImage { path, reason }| (path, reason))
                .collect(),
        }
    }

    fn dirs_json(&self, reg: bool) -> String {
        let mut w = PyJson::default();
        w.open('{');
        for s in self.subsets.iter().filter(|s| s.is_reg == reg) {
            w.key(&s.name);
            w.open('{');
            w.key("n_repeats");
            w.raw(&s.repeats.to_string());
            w.key("img_count");
            w.raw(&s.img_count.to_string());
            w.close('}');
        }
        w.close('}');
        w.finish()
    }

    /// `ss_dataset_dirs`: `{"10_sks dog": {"n_repeats": 10, "img_count": 20}}`.
    pub fn ss_dataset_dirs(&self) -> String {
        self.dirs_json(false)
    }

    /// `ss_reg_dataset_dirs`, the same for regularization folders.
    pub fn ss_reg_dataset_dirs(&self) -> String {
        self.dirs_json(true)
    }

    /// `ss_tag_frequency`: `{folder: {tag: count}}` over raw captions (folders with the same
    /// name, e.g. in train and reg dirs, are merged as in kohya).
    pub fn ss_tag_frequency(&self) -> String {
        let mut merged: Vec<(String, super::TagCounts)> = Vec::new();
        for s in &self.subsets {
            match merged.iter_mut().find(|(n, _)| *n == s.name) {
                Some((_, t)) => t.merge(&s.tags),
                None => merged.push((s.name.clone(), s.tags.clone())),
            }
        }
        let mut w = PyJson::default();
        w.open('{');
        for (name, tags) in &merged {
            w.key(name);
            w.open('{');
            for (tag, n) in tags.counts() {
                w.key(tag);
                w.raw(&n.to_string());
            }
            w.close('}');
        }
        w.close('}');
        w.finish()
    }

    /// `ss_bucket_info`: `{"buckets": {"0": {"resolution": [w, h], "count": n}, …},
    /// "mean_img_ar_error": x}`, or `null` without bucketing.
    pub fn ss_bucket_info(&self) -> String {
        if !self.cfg.enable_bucket {
            return "null".into();
        }
        let mut w = PyJson::default();
        w.open('{');
        w.key("buckets");
        w.open('{');
        for (i, b) in self.buckets.iter().enumerate().filter(|(_, b)| b.count > 0) {
            w.key(&i.to_string());
            w.open('{');
            w.key("resolution");
            w.raw(&format!("[{}, {}]", b.reso.0, b.reso.1));
            w.key("count");
            w.raw(&b.count.to_string());
            w.close('}');
        }
        w.close('}');
        w.key("mean_img_ar_error");
        w.raw(&py::float_repr(self.mean_ar_error));
        w.close('}');
        w.finish()
    }

    /// The dataset's entries of kohya's LoRA metadata, values as Python's `str()` writes them.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let c = &self.cfg;
        let bucket_reso = |v: u32| {
            if c.enable_bucket {
                v.to_string()
            } else {
                "None".to_string()
            }
        };
        let (min_reso, max_reso) = c.adjusted_bucket_range();
        vec![
            ("ss_num_train_images", self.num_train_images.to_string()),
            ("ss_num_reg_images", self.num_reg_images.to_string()),
            (
                "ss_num_batches_per_epoch",
                self.batches_per_epoch().to_string(),
            ),
            ("ss_batch_size_per_device", c.train_batch_size.to_string()),
            (
                "ss_resolution",
                format!("({}, {})", c.resolution.0, c.resolution.1),
            ),
            ("ss_cache_latents", py::bool_str(c.caches_latents())),
            ("ss_color_aug", py::bool_str(false)),
            ("ss_flip_aug", py::bool_str(c.flip_aug)),
            ("ss_random_crop", py::bool_str(c.random_crop)),
            ("ss_shuffle_caption", py::bool_str(c.shuffle_caption)),
            ("ss_enable_bucket", py::bool_str(c.enable_bucket)),
            (
                "ss_bucket_no_upscale",
                py::bool_str(c.enable_bucket && c.bucket_no_upscale),
            ),
            ("ss_min_bucket_reso", bucket_reso(min_reso)),
            ("ss_max_bucket_reso", bucket_reso(max_reso)),
            ("ss_keep_tokens", c.keep_tokens.to_string()),
            (
                "ss_caption_dropout_rate",
                py::float_repr(c.caption_dropout_rate),
            ),
            (
                "ss_caption_dropout_every_n_epochs",
                c.caption_dropout_every_n_epochs.to_string(),
            ),
            (
                "ss_caption_tag_dropout_rate",
                py::float_repr(c.caption_tag_dropout_rate),
            ),
            ("ss_prior_loss_weight", py::float_repr(c.prior_loss_weight)),
            ("ss_dataset_dirs", self.ss_dataset_dirs()),
            ("ss_reg_dataset_dirs", self.ss_reg_dataset_dirs()),
            ("ss_tag_frequency", self.ss_tag_frequency()),
            ("ss_bucket_info", self.ss_bucket_info()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A JSON writer that reproduces Python's `json.dumps` defaults: `", "` and `": "` separators,
/// insertion order, non-ASCII escaped as `\uXXXX`.
#[derive(Default)]
struct PyJson {
    out: String,
    // Whether the current container already has an element.
    first: Vec<bool>,
    after_key: bool,
}

impl PyJson {
    fn element(&mut self) {
        if self.after_key {
            self.after_key = false;
            return;
        }
        if let Some(first) = self.first.last_mut() {
            if !*first {
                self.out.push_str(", ");
            }
            *first = false;
        }
    }

    fn open(&mut self, c: char) {
        self.element();
        self.out.push(c);
        self.first.push(true);
    }

    fn close(&mut self, c: char) {
        self.first.pop();
        self.out.push(c);
    }

    fn key(&mut self, k: &str) {
        self.element();
        py::json_string(&mut self.out, k);
        self.out.push_str(": ");
        self.after_key = true;
    }

    fn raw(&mut self, v: &str) {
        self.element();
        self.out.push_str(v);
    }

    fn finish(self) -> String {
        self.out
    }
}
