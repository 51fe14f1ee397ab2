//! Caption processing per sample, in kohya's order (`BaseDataset.process_caption`): prefix and
//! suffix, whole-caption dropout, first line, split on the separator, keep the first
//! `keep_tokens` tags, shuffle the rest, tag dropout, join with ", ". All randomness comes from
//! the RNG passed in, so one seed gives the same captions.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::Rng;

use super::config::DatasetConfig;

/// The caption options of [`DatasetConfig`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CaptionOptions {
    pub shuffle: bool,
    pub separator: String,
    pub keep_tokens: usize,
    pub keep_tokens_separator: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub dropout_rate: f64,
    pub dropout_every_n_epochs: usize,
    pub tag_dropout_rate: f64,
}

impl From<&DatasetConfig> for CaptionOptions {
    fn from(c: &DatasetConfig) -> Self {
        Self {
            shuffle: c.shuffle_caption,
            separator: c.caption_separator.clone(),
            keep_tokens: c.keep_tokens,
            keep_tokens_separator: c.keep_tokens_separator.clone(),
            prefix: c.caption_prefix.clone(),
            suffix: c.caption_suffix.clone(),
            dropout_rate: c.caption_dropout_rate,
            dropout_every_n_epochs: c.caption_dropout_every_n_epochs,
            tag_dropout_rate: c.caption_tag_dropout_rate,
        }
    }
}

/// The caption one sample trains with in `epoch` (1-based, as kohya counts).
pub fn process_caption<R: Rng + ?Sized>(
    caption: &str,
    opts: &CaptionOptions,
    epoch: usize,
    rng: &mut R,
) -> String {
    let mut caption = caption.to_string();
    if let Some(prefix) = opts.prefix.as_deref().filter(|s| !s.is_empty()) {
        caption = format!("{prefix} {caption}");
    }
    if let Some(suffix) = opts.suffix.as_deref().filter(|s| !s.is_empty()) {
        caption = format!("{caption} {suffix}");
    }

    // kohya draws only when the rate is positive; keeping that keeps the RNG stream aligned
    // with the other options whatever the dropout settings are.
    let dropped = (opts.dropout_rate > 0.0 && rng.random::<f64>() < opts.dropout_rate)
        || (opts.dropout_every_n_epochs > 0 && epoch.is_multiple_of(opts.dropout_every_n_epochs));
    if dropped {
        return String::new();
    }

    let caption = caption.split('\n').next().unwrap_or_default();
    if !opts.shuffle && opts.tag_dropout_rate <= 0.0 {
        return caption.to_string();
    }

    let sep = opts.separator.as_str();
    let split_nonempty = |s: &str| -> Vec<String> {
        s.split(sep)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (fixed, mut flex, fixed_suffix) = match opts
        .keep_tokens_separator
        .as_deref()
        .filter(|k| !k.is_empty() && caption.contains(*k))
    {
        Some(keep_sep) => {
            let (fixed_part, rest) = caption.split_once(keep_sep).unwrap_or((caption, ""));
            let (flex_part, suffix_part) = rest.split_once(keep_sep).unwrap_or((rest, ""));
            (
                split_nonempty(fixed_part),
                split_nonempty(flex_part),
                split_nonempty(suffix_part),
            )
        }
        None => {
            // kohya keeps empty tags here (only the keep-separator path filters them).
            let tokens: Vec<String> = caption
                .trim()
                .split(sep)
                .map(|t| t.trim().to_string())
                .collect();
            let keep = opts.keep_tokens.min(tokens.len());
            (tokens[..keep].to_vec(), tokens[keep..].to_vec(), Vec::new())
        }
    };

    if opts.shuffle {
        flex.shuffle(rng);
    }
    if opts.tag_dropout_rate > 0.0 {
        flex.retain(|_| rng.random::<f64>() >= opts.tag_dropout_rate);
    }

    let mut out = fixed;
    out.extend(flex);
    out.extend(fixed_suffix);
    out.join(", ")
}

/// Tag counts of one folder, as kohya's `set_tag_frequency` makes them: captions split on ",",
/// tags trimmed and lowercased, empty ones skipped; first-seen order kept for the metadata JSON.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TagCounts {
    counts: Vec<(String, usize)>,
    index: HashMap<String, usize>,
}

impl TagCounts {
    pub fn add(&mut self, caption: &str) {
        for tag in caption.split(',') {
            let tag = tag.trim();
            if tag.is_empty() {
                continue;
            }
            let tag = tag.to_lowercase();
            match self.index.get(&tag) {
                Some(&i) => self.counts[i].1 += 1,
                None => {
                    self.index.insert(tag.clone(), self.counts.len());
                    self.counts.push((tag, 1));
                }
            }
        }
    }

    /// Adds another folder's counts (kohya merges folders that share a name).
    pub fn merge(&mut self, other: &TagCounts) {
        for (tag, n) in &other.counts {
            match self.index.get(tag) {
                Some(&i) => self.counts[i].1 += n,
                None => {
                    self.index.insert(tag.clone(), self.counts.len());
                    self.counts.push((tag.clone(), *n));
                }
            }
        }
    }

    /// (tag, count) in first-seen order.
    pub fn counts(&self) -> &[(String, usize)] {
        &self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn untouched_without_shuffle_or_dropout() {
        let opts = CaptionOptions {
            separator: ",".into(),
            keep_tokens: 1,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            process_caption("a,b ,c\nsecond", &opts, 1, &mut rng),
            "a,b ,c"
        );
    }

    #[test]
    fn keep_tokens_separator_fixes_both_ends() {
        let opts = CaptionOptions {
            shuffle: true,
            separator: ",".into(),
            keep_tokens_separator: Some("|||".into()),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let out = process_caption(
            "sks, dog ||| a, b, c, d ||| masterpiece",
            &opts,
            1,
            &mut rng,
        );
        assert!(out.starts_with("sks, dog, "), "{out}");
        assert!(out.ends_with(", masterpiece"), "{out}");
    }
}
