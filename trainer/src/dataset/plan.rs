//! Epoch and step arithmetic as sd-scripts does it: every image enters its bucket once per
//! repeat, batches are cut within a bucket, the batch order is reshuffled each epoch from
//! `seed + epoch`, and data-parallel rank r takes batch indices ≡ r (mod world size)
//! ([`shard`], kohya's) or its slice of each global batch ([`split`], what the trainer uses: a
//! global step's samples are the same whatever the number of ranks).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::bucket::Reso;

/// One batch: images of a single bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Position in the epoch's (unsharded) order; seeds the batch's augmentations.
    pub index: usize,
    pub bucket: usize,
    pub reso: Reso,
    /// Indices into `Dataset::images`; an image may appear twice when repeated.
    pub images: Vec<usize>,
    /// Position of `images[0]` in its global batch (the one all ranks of a step share): with
    /// `index` it keys each sample's random draws ([`sample_rng`]).
    pub offset: usize,
}

/// Batches cut from buckets of `counts[i]` entries each.
pub fn batches_per_epoch(
    bucket_counts: impl IntoIterator<Item = usize>,
    batch_size: usize,
) -> usize {
    let bs = batch_size.max(1);
    bucket_counts.into_iter().map(|n| n.div_ceil(bs)).sum()
}

/// Optimizer steps of a run, as `train_network.py` computes them: with `max_train_epochs`,
/// `epochs × ceil(batches / world_size / grad_accum)`; otherwise `max_train_steps`.
pub fn total_steps(
    batches_per_epoch: usize,
    max_train_steps: usize,
    max_train_epochs: Option<usize>,
    world_size: usize,
    grad_accum: usize,
) -> usize {
    match max_train_epochs {
        Some(epochs) => epochs * steps_per_epoch(batches_per_epoch, world_size, grad_accum),
        None => max_train_steps,
    }
}

/// Optimizer steps in one epoch on each rank: `ceil(batches / world_size / grad_accum)`.
pub fn steps_per_epoch(batches_per_epoch: usize, world_size: usize, grad_accum: usize) -> usize {
    batches_per_epoch.div_ceil(world_size.max(1) * grad_accum.max(1))
}

/// Epochs needed for `total_steps`, as kohya's `num_train_epochs`: each rank sees
/// `ceil(batches / world_size)` batches per epoch.
pub fn num_epochs(
    batches_per_epoch: usize,
    total_steps: usize,
    world_size: usize,
    grad_accum: usize,
) -> usize {
    let per_rank = batches_per_epoch.div_ceil(world_size.max(1));
    let updates = per_rank.div_ceil(grad_accum.max(1)).max(1);
    total_steps.div_ceil(updates)
}

/// The RNG that orders epoch `epoch`: seeded from `seed + epoch` like kohya's `shuffle_buckets`.
pub fn epoch_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64))
}

/// The RNG of one batch's augmentations (flip, crop, captions): a separate stream of the epoch's
/// seed, so a batch looks the same whichever rank loads it and after a resume.
pub fn batch_rng(seed: u64, epoch: usize, batch_index: usize) -> ChaCha8Rng {
    let mut rng = epoch_rng(seed, epoch);
    rng.set_stream(batch_index as u64 + 1);
    rng
}

/// The RNG of one sample's augmentations (flip, crop, caption) and training draws: keyed by
/// the sample's place in the epoch, (global batch `batch_index`, `position` in it), so it is
/// the same whichever rank loads it, with whatever per-rank batch size, and after a resume.
pub fn sample_rng(seed: u64, epoch: usize, batch_index: usize, position: usize) -> ChaCha8Rng {
    let mut rng = epoch_rng(seed, epoch);
    // Streams above 2^32 never meet `batch_rng`'s (one per batch).
    rng.set_stream(((batch_index as u64 + 1) << 32) | position as u64);
    rng
}

/// Global batches of an epoch when `world_size` ranks each take `batch_size` samples of a
/// step: buckets are cut into batches of `batch_size × world_size`.
pub fn global_batches_per_epoch(
    bucket_counts: impl IntoIterator<Item = usize>,
    batch_size: usize,
    world_size: usize,
) -> usize {
    batches_per_epoch(bucket_counts, batch_size.max(1) * world_size.max(1))
}

/// Orders one epoch: each bucket's entries (an image once per repeat) shuffled and cut into
/// batches of `batch_size` (the last may be short), then all batches shuffled.
pub fn plan_epoch(
    buckets: &[(Reso, Vec<usize>)],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Batch> {
    let bs = batch_size.max(1);
    let mut rng = epoch_rng(seed, epoch);
    let mut batches = Vec::new();
    for (bucket, (reso, entries)) in buckets.iter().enumerate() {
        let mut entries = entries.clone();
        entries.shuffle(&mut rng);
        for chunk in entries.chunks(bs) {
            batches.push(Batch {
                index: 0,
                bucket,
                reso: *reso,
                images: chunk.to_vec(),
                offset: 0,
            });
        }
    }
    batches.shuffle(&mut rng);
    for (i, b) in batches.iter_mut().enumerate() {
        b.index = i;
    }
    batches
}

/// Rank `rank`'s share of an epoch: batches `rank, rank + world, …`; when the count does not
/// divide evenly, the last round wraps to the first batches so every rank runs
/// `ceil(len / world)` steps (accelerate's `even_batches`).
pub fn shard(batches: &[Batch], rank: usize, world_size: usize) -> Vec<Batch> {
    let world = world_size.max(1);
    if batches.is_empty() {
        return Vec::new();
    }
    let per_rank = batches.len().div_ceil(world);
    (0..per_rank)
        .map(|k| batches[(k * world + rank % world) % batches.len()].clone())
        .collect()
}

/// Rank `rank`'s part of each global batch (planned with `batch_size × world_size` by
/// [`plan_epoch`]): samples `rank·batch_size ..` of it, fewer or none in a bucket's short last
/// batch. Every rank gets one (maybe empty) micro-batch per global batch, so all ranks take the
/// same steps, and one rank with `world_size × batch_size` trains on exactly the samples of
/// `world_size` ranks with `batch_size`.
pub fn split(global: &[Batch], rank: usize, world_size: usize, batch_size: usize) -> Vec<Batch> {
    let (world, bs) = (world_size.max(1), batch_size.max(1));
    global
        .iter()
        .map(|b| {
            let start = (rank % world * bs).min(b.images.len());
            let end = (start + bs).min(b.images.len());
            Batch {
                images: b.images[start..end].to_vec(),
                offset: b.offset + start,
                ..b.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_example() {
        // "10_sks dog", 20 images, bs 4, 10 epochs, no buckets.
        let b = batches_per_epoch([20 * 10], 4);
        assert_eq!(b, 50);
        assert_eq!(total_steps(b, 1600, Some(10), 1, 1), 500);
        assert_eq!(total_steps(b, 1600, Some(10), 2, 1), 250);
        assert_eq!(total_steps(b, 1600, None, 2, 1), 1600);
        assert_eq!(num_epochs(b, 500, 1, 1), 10);
        assert_eq!(num_epochs(b, 250, 2, 1), 10);
    }

    #[test]
    fn shards_wrap() {
        let batches: Vec<Batch> = (0..5)
            .map(|i| Batch {
                index: i,
                bucket: 0,
                reso: (64, 64),
                images: vec![i],
                offset: 0,
            })
            .collect();
        let r0: Vec<usize> = shard(&batches, 0, 2).iter().map(|b| b.index).collect();
        let r1: Vec<usize> = shard(&batches, 1, 2).iter().map(|b| b.index).collect();
        assert_eq!(r0, vec![0, 2, 4]);
        assert_eq!(r1, vec![1, 3, 0]);
    }

    #[test]
    fn splits_give_one_rank_the_concatenation() {
        let buckets = vec![
            ((64, 64), (0..7).collect::<Vec<_>>()),
            ((64, 128), vec![7, 8, 9]),
        ];
        let global = plan_epoch(&buckets, 4, 3, 1);
        assert_eq!(global.len(), global_batches_per_epoch([7, 3], 2, 2));
        let r0 = split(&global, 0, 2, 2);
        let r1 = split(&global, 1, 2, 2);
        let one = split(&global, 0, 1, 4);
        assert_eq!((r0.len(), r1.len(), one.len()), (3, 3, 3));
        for ((a, b), g) in r0.iter().zip(&r1).zip(&one) {
            assert_eq!([a.images.clone(), b.images.clone()].concat(), g.images);
            assert_eq!((a.offset, b.offset), (0, a.images.len().min(2)));
            assert_eq!((a.index, b.index), (g.index, g.index));
        }
        // A short last batch leaves a rank with nothing (7 = 4 + 3; 3 = 2 + 1).
        assert!(r1.iter().any(|b| b.images.len() == 1));
    }
}
