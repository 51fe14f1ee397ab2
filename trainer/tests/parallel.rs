//! Data-parallel equivalence on the tiny SD1 fixture: two ranks with batch `b` (each a thread
//! with its own model, dataset and `Trainer`, joined by a TCP ring on loopback) end with the
//! LoRA of one rank with batch `2b`, same seed — plain, with gradient accumulation, and with a
//! resume in the middle. The dataset has two aspect-ratio buckets with short last batches, so
//! a rank sometimes gets fewer samples than its batch, or none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use loractl_collective::{Collective, RingConfig, TcpRing};
use loractl_trainer::dataset::{Dataset, DatasetConfig};
use loractl_trainer::loader::{self, LoadOptions};
use loractl_trainer::lr::SchedulerKind;
use loractl_trainer::step::StepOptions;
use loractl_trainer::train::{Flow, Hooks, Outcome, StepEvent, TrainOptions, Trainer};

mod support;
use support::{checkerboards, lora_train_options, scratch_dir, TempDir};

/// `3_square` (4 images 64×64) and `2_tall` (3 images 64×128), captioned checkerboards:
/// 12 + 6 samples per epoch, so batches of 4 leave short last batches in both buckets.
fn make_dataset(name: &str) -> anyhow::Result<TempDir> {
    let root = scratch_dir(&format!("dp-{name}"))?;
    for (folder, size, n) in [("3_square", (64, 64), 4), ("2_tall", (64, 128), 3)] {
        checkerboards(&root.join(folder), size, n, |_, colour| {
            Some(format!("{colour}, checkers, pattern"))
        })?;
    }
    Ok(root)
}

fn dataset(root: &Path, batch_size: usize) -> anyhow::Result<Dataset> {
    Ok(Dataset::open(DatasetConfig {
        train_data_dir: root.to_path_buf(),
        resolution: (64, 64),
        enable_bucket: true,
        min_bucket_reso: 64,
        max_bucket_reso: 128,
        train_batch_size: batch_size,
        shuffle_caption: true,
        flip_aug: true,
        caption_tag_dropout_rate: 0.2,
        ..Default::default()
    })?)
}

fn options(steps: usize, accum: usize) -> TrainOptions {
    TrainOptions {
        lr_scheduler: SchedulerKind::CosineWithRestarts,
        lr_warmup_steps: 1,
        gradient_accumulation_steps: accum,
        seed: 4321,
        step: StepOptions {
            noise_offset: 0.05,
            ..Default::default()
        },
        ..lora_train_options(4, 2e-3, 1e-3, steps)
    }
}

/// Stops at `at` (if set) and records every step's loss.
struct Record {
    stop_at: Option<usize>,
    losses: Vec<f32>,
}

impl Hooks for Record {
    fn step_end(&mut self, _t: &Trainer<'_>, e: &StepEvent) -> loractl_trainer::Result<Flow> {
        self.losses.push(e.loss);
        Ok(if Some(e.step) == self.stop_at {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

/// What one rank's run gives: LoRA tensors (f32) and its step losses.
type RankResult = (HashMap<String, Tensor>, Vec<f32>);

/// Trains one rank from scratch (or `resume`) to `opts.max_train_steps`, or to `stop_at`
/// with its state saved to `save` by rank 0.
fn train_rank(
    root: &Path,
    batch_size: usize,
    opts: TrainOptions,
    ring: Option<TcpRing>,
    resume: Option<&Path>,
    stop_at: Option<usize>,
    save: Option<&Path>,
) -> anyhow::Result<RankResult> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1/diffusers");
    let sd = loader::load(&dir, &LoadOptions::default())?;
    let ds = dataset(root, batch_size)?;
    let mut trainer = Trainer::new(&sd, &ds, opts, &Device::Cpu, None)?;
    if let Some(ring) = ring {
        trainer = trainer.with_collective(Box::new(ring));
    }
    if let Some(state) = resume {
        trainer.load_state(state)?;
    }
    let mut hooks = Record {
        stop_at,
        losses: Vec::new(),
    };
    let outcome = trainer.run(&mut hooks)?;
    if let Some(dir) = save {
        anyhow::ensure!(
            outcome == Outcome::Stopped,
            "expected a stop at {stop_at:?}"
        );
        if trainer.rank() == 0 {
            trainer.save_state(dir)?;
        }
    }
    let tensors = trainer.network().to_tensors(DType::F32)?;
    Ok((tensors.into_iter().collect(), hooks.losses))
}

fn rings(world: usize) -> Vec<TcpRing> {
    let configs = (0..world)
        .map(|r| RingConfig::new(r, world, "dp-test").with_timeout(Duration::from_secs(120)))
        .collect();
    TcpRing::loopback(configs).unwrap()
}

/// Runs `world` ranks of `batch_size`, each in its own thread; results by rank.
fn train_parallel(
    root: &Path,
    world: usize,
    batch_size: usize,
    opts: &TrainOptions,
    resume: Option<&Path>,
    stop_at: Option<usize>,
    save: Option<&Path>,
) -> Vec<RankResult> {
    let handles: Vec<_> = rings(world)
        .into_iter()
        .map(|ring| {
            let (root, opts) = (root.to_path_buf(), opts.clone());
            let resume = resume.map(Path::to_path_buf);
            let save = save.map(Path::to_path_buf);
            std::thread::spawn(move || {
                let rank = ring.rank();
                train_rank(
                    &root,
                    batch_size,
                    opts,
                    Some(ring),
                    resume.as_deref(),
                    stop_at,
                    save.as_deref(),
                )
                .unwrap_or_else(|e| panic!("rank {rank}: {e:#}"))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Largest |a - b| over the largest |b| of any tensor: relative difference of two LoRAs.
fn relative_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut scale) = (0f32, 0f32);
    for (k, tb) in b {
        let ta = &a[k];
        let va: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in va.iter().zip(&vb) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    diff / scale.max(1e-12)
}

fn assert_same_lora(parallel: &[RankResult], single: &RankResult, what: &str) {
    // Every rank holds the same LoRA, bit for bit.
    for (rank, (lora, _)) in parallel.iter().enumerate().skip(1) {
        assert_eq!(
            relative_difference(lora, &parallel[0].0),
            0.0,
            "{what}: rank {rank} differs from rank 0"
        );
    }
    // The up weights start at zero: a LoRA that did not train would compare equal trivially.
    let trained = single.0.iter().any(|(k, t)| {
        k.ends_with("lora_up.weight")
            && t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
    });
    assert!(trained, "{what}: the LoRA did not train");
    let rel = relative_difference(&parallel[0].0, &single.0);
    eprintln!("{what}: relative difference {rel:e}");
    assert!(rel <= 1e-5, "{what}: 2 ranks vs 1 rank differ by {rel:e}");
    let (pl, sl) = (&parallel[0].1, &single.1);
    assert_eq!(pl.len(), sl.len(), "{what}: step counts");
    for (a, b) in pl.iter().zip(sl) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
            "{what}: losses {pl:?} vs {sl:?}"
        );
    }
}

#[test]
fn two_ranks_of_batch_b_equal_one_rank_of_batch_2b() -> anyhow::Result<()> {
    let root = make_dataset("plain")?;
    // 18 samples, global batches of 4: the square bucket (12) gives 3 full ones, the tall
    // bucket (6) one full and one of 2, which rank 1 gets none of.
    let opts = options(6, 1);
    let single = train_rank(&root, 4, opts.clone(), None, None, None, None)?;
    let parallel = train_parallel(&root, 2, 2, &opts, None, None, None);
    assert_same_lora(&parallel, &single, "batch 2 x 2 ranks");
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn equivalence_holds_with_gradient_accumulation() -> anyhow::Result<()> {
    let root = make_dataset("accum")?;
    // 5 global batches per epoch, accumulation 2: steps of 2, 2 and a short 1 per epoch.
    let opts = options(5, 2);
    let single = train_rank(&root, 4, opts.clone(), None, None, None, None)?;
    let parallel = train_parallel(&root, 2, 2, &opts, None, None, None);
    assert_same_lora(&parallel, &single, "accumulation 2");
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn equivalence_holds_across_a_resume() -> anyhow::Result<()> {
    let root = make_dataset("resume")?;
    let opts = options(6, 1);
    let single = train_rank(&root, 4, opts.clone(), None, None, None, None)?;
    // Two ranks stop at step 2 (inside the first epoch); rank 0 saves; two new ranks resume.
    let state = root.join("state-step2");
    let first = train_parallel(&root, 2, 2, &opts, None, Some(2), Some(&state));
    let second = train_parallel(&root, 2, 2, &opts, Some(&state), None, None);
    let mut resumed = second;
    for (r, (_, losses)) in resumed.iter_mut().enumerate() {
        let mut all = first[r].1.clone();
        all.append(losses);
        *losses = all;
    }
    assert_same_lora(&resumed, &single, "resumed at step 2");
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn a_rank_failing_stops_the_other_with_an_error() -> anyhow::Result<()> {
    // A rank whose ring dies mid-run: the other rank's step ends in an error naming it,
    // within the collective timeout, instead of hanging.
    let root = make_dataset("fail")?;
    let mut rs = rings(2);
    rs[1].crash_after_frames(3);
    let opts = options(6, 1);
    let handles: Vec<_> = rs
        .into_iter()
        .map(|ring| {
            let (root, opts) = (root.to_path_buf(), opts.clone());
            std::thread::spawn(move || {
                train_rank(&root, 2, opts, Some(ring), None, None, None).map(|_| ())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let err = results[0]
        .as_ref()
        .expect_err("rank 0 must fail")
        .to_string();
    assert!(err.contains("rank 1"), "{err}");
    assert!(results[1].is_err());
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
