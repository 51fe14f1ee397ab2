//! Bounded, seeded fuzz tests of the model file readers: the `.ckpt` reader, the safetensors
//! store, the LoRA file reader and single-file model loading, each fed mutations of valid files
//! (bits flipped, bytes inserted, files cut, length fields made huge, chunks repeated). Every
//! input must give a value or an error, never a panic, and the process's peak memory must stay
//! under a bound. Each test prints how many inputs it tried and the peak RSS seen.

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::Device;
use loractl_trainer::ckpt::CkptFile;
use loractl_trainer::loader::{self, LoadOptions};
use loractl_trainer::lora;
use loractl_trainer::weights::{SafetensorsStore, TensorStore};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod support;
use support::{fixture, Data, PickledTensor, TempDir};

/// Peak resident memory allowed for the whole test process (the tests of this file share it).
const MAX_RSS: u64 = 512 << 20;

/// One mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        let len = bytes.len().max(1);
        match rng.random_range(0..6) {
            0 => {
                for _ in 0..rng.random_range(1..=4) {
                    let at = rng.random_range(0..len);
                    if let Some(b) = bytes.get_mut(at) {
                        *b ^= 1 << rng.random_range(0..8);
                    }
                }
            }
            // A length, offset or size field enlarged (or zeroed): little-endian 2, 4 or 8
            // bytes set to an extreme.
            1 | 2 => {
                let width = [2, 4, 8][rng.random_range(0..3)];
                let at = rng.random_range(0..len);
                let value: u64 = match rng.random_range(0..5) {
                    0 => u64::MAX,
                    1 => u64::from(u32::MAX),
                    2 => 1 << rng.random_range(16..40),
                    3 => 0,
                    _ => rng.random::<u64>(),
                };
                for (i, b) in value.to_le_bytes().iter().take(width).enumerate() {
                    if let Some(slot) = bytes.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            3 => {
                let at = rng.random_range(0..=bytes.len());
                let insert: Vec<u8> = (0..rng.random_range(1..=16))
                    .map(|_| rng.random())
                    .collect();
                bytes.splice(at..at, insert);
            }
            4 => bytes.truncate(rng.random_range(0..len)),
            // A chunk repeated in place.
            _ => {
                let start = rng.random_range(0..len).min(bytes.len());
                let end = (start + rng.random_range(1..=64)).min(bytes.len());
                let chunk = bytes[start..end].to_vec();
                bytes.splice(start..start, chunk);
            }
        }
    }
    bytes
}

/// A checkpoint with a deflated pickle and deflated storages, one shared by two tensors.
fn deflated_seed() -> Vec<u8> {
    let values: Vec<u8> = (0..256u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let tensors = [
        PickledTensor {
            name: "a",
            key: "0",
            storage_numel: 256,
            offset: 0,
            shape: &[16, 8],
        },
        PickledTensor {
            name: "b",
            key: "0",
            storage_numel: 256,
            offset: 128,
            shape: &[128],
        },
        PickledTensor {
            name: "c",
            key: "1",
            storage_numel: 4,
            offset: 0,
            shape: &[2, 2],
        },
    ];
    support::checkpoint(
        Data::deflate(&support::state_dict_pickle(&tensors)),
        vec![
            ("0".into(), Data::deflate(&values)),
            ("1".into(), Data::Stored(values[..16].to_vec())),
        ],
    )
}

fn report(what: &str, inputs: usize, accepted: usize, detail: &str) {
    let peak = support::peak_rss();
    eprintln!(
        "{what} fuzz: {inputs} inputs, {accepted} accepted{detail}; peak RSS {} MiB",
        peak >> 20
    );
    assert!(peak < MAX_RSS, "{what}: peak RSS {peak} bytes");
}

#[test]
fn ckpt_reader_survives_mutated_checkpoints() {
    const INPUTS: usize = 6000;
    let t = TempDir::new("fuzz-ckpt");
    let seeds = [
        std::fs::read(fixture("ckpt/basic.ckpt")).expect("fixture"),
        std::fs::read(fixture("ckpt/deflated.ckpt")).expect("fixture"),
        deflated_seed(),
    ];
    let file = t.join("x.ckpt");
    let mut rng = ChaCha8Rng::seed_from_u64(0xc4e7);
    let (mut opened, mut loaded) = (0, 0);
    for i in 0..INPUTS {
        let bytes = mutate(&seeds[i % seeds.len()], &mut rng);
        support::overwrite(&file, &bytes);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let Ok(ckpt) = CkptFile::open(&file) else {
                return (0, 0);
            };
            let mut n = 0;
            for name in ckpt.names() {
                let _ = (ckpt.shape(&name), ckpt.dtype(&name));
                n += usize::from(ckpt.load(&name, &Device::Cpu).is_ok());
            }
            (1, n)
        }));
        match outcome {
            Ok((o, l)) => {
                opened += o;
                loaded += l;
            }
            Err(_) => panic!("mutant {i} panicked (seed {})", i % seeds.len()),
        }
    }
    report(
        "ckpt",
        INPUTS,
        opened,
        &format!(" (opened), {loaded} tensors loaded"),
    );
    assert!(opened > 0 && loaded > 0);
}

/// The safetensors store and the LoRA reader on mutated LoRA and text-encoder files.
#[test]
fn safetensors_and_lora_readers_survive_mutated_files() {
    const INPUTS: usize = 4000;
    let t = TempDir::new("fuzz-st");
    let seeds = [
        std::fs::read(fixture("sd1/lora_unet.safetensors")).expect("fixture"),
        std::fs::read(fixture("sd1/lora_te.safetensors")).expect("fixture"),
        std::fs::read(fixture("sd1/diffusers/text_encoder/model.safetensors")).expect("fixture"),
    ];
    let sites = loader::load(
        &fixture("sd1/diffusers"),
        &LoadOptions {
            shapes_only: true,
            ..LoadOptions::default()
        },
    )
    .expect("tiny model")
    .sites();
    let file = t.join("x.safetensors");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5afe);
    let (mut opened, mut loras) = (0, 0);
    for i in 0..INPUTS {
        let bytes = mutate(&seeds[i % seeds.len()], &mut rng);
        support::overwrite(&file, &bytes);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut result = (0, 0);
            if let Ok(store) = SafetensorsStore::open(std::slice::from_ref(&file)) {
                result.0 = 1;
                for name in store.names() {
                    let _ = store.load(&name, &Device::Cpu);
                }
            }
            if let Ok(store) = lora::open_network_weights(&file) {
                let cfg = lora::LoraConfig {
                    rank: 4,
                    ..lora::LoraConfig::default()
                };
                let _ = lora::check_network_weights(store.as_ref(), &sites, &cfg);
                let _ = lora::read_network_weights(store.as_ref(), &Device::Cpu);
            }
            if lora::LoraNetwork::load_file(&sites, &file, 1.0, &Device::Cpu).is_ok() {
                result.1 = 1;
            }
            result
        }));
        match outcome {
            Ok((o, l)) => {
                opened += o;
                loras += l;
            }
            Err(_) => panic!("mutant {i} panicked (seed {})", i % seeds.len()),
        }
    }
    report(
        "safetensors",
        INPUTS,
        opened,
        &format!(" (opened), {loras} loaded as a LoRA"),
    );
    assert!(opened > 0);
}

/// Whole single-file models (config inferred from the shapes, model built from the weights'
/// shapes) from mutated `.safetensors` and `.ckpt` files.
#[test]
fn model_loading_survives_mutated_single_files() {
    const INPUTS: usize = 300;
    let t = TempDir::new("fuzz-model");
    let seeds: [(&str, Vec<u8>); 2] = [
        (
            "safetensors",
            std::fs::read(fixture("sd1/model.safetensors")).expect("fixture"),
        ),
        (
            "ckpt",
            std::fs::read(fixture("sd1/model.ckpt")).expect("fixture"),
        ),
    ];
    let opts = LoadOptions {
        shapes_only: true,
        ..LoadOptions::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0x30de1);
    let mut loaded = 0;
    for i in 0..INPUTS {
        let (ext, seed) = &seeds[i % seeds.len()];
        let file = t.join(format!("model.{ext}"));
        support::overwrite(&file, &mutate(seed, &mut rng));
        match catch_unwind(AssertUnwindSafe(|| loader::load(&file, &opts))) {
            Ok(r) => loaded += usize::from(r.is_ok()),
            Err(_) => panic!("mutant {i} ({ext}) panicked"),
        }
    }
    report("model", INPUTS, loaded, " (loaded)");
}
