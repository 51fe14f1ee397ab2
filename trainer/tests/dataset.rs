//! The kohya dataset pipeline on datasets generated into temporary folders: layout rules and
//! their error messages, captions, buckets (against values computed by sd-scripts, see
//! scripts/fixtures/make_dataset_fixtures.py), resizing (against Pillow and OpenCV), epoch and
//! step arithmetic, loading, the bad-image policy and the latent cache.

use std::cell::Cell;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use loractl_trainer::dataset::bucket::{make_bucket_resolutions, BucketSelector};
use loractl_trainer::dataset::caption::{process_caption, CaptionOptions};
use loractl_trainer::dataset::pixels::{area_resize, lanczos_resize};
use loractl_trainer::dataset::plan::{batch_rng, shard};
use loractl_trainer::dataset::{BadImagePolicy, BatchInput, Dataset, DatasetConfig, LatentCache};
use loractl_trainer::Result;
use serde_json::Value;

mod support;
use support::{assert_mentions, TempDir};

// ---------------------------------------------------------------------------------------------
// helpers

/// Writes a w×h image whose pixels depend on `seed`; the format follows the extension.
fn write_image(path: &Path, w: u32, h: u32, seed: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            ((x + y + seed) % 256) as u8,
        ])
    });
    img.save(path).unwrap();
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// `n` png images (64×64) named 000.png… in `dir`, captioned "<caption> i" when `caption` is set.
fn folder(dir: &Path, n: usize, caption: Option<&str>) {
    for i in 0..n {
        write_image(&dir.join(format!("{i:03}.png")), 64, 64, i as u32);
        if let Some(c) = caption {
            write(&dir.join(format!("{i:03}.txt")), format!("{c}, tag{i}"));
        }
    }
}

fn cfg(root: &Path) -> DatasetConfig {
    DatasetConfig {
        resolution: (64, 64),
        ..DatasetConfig::new(root)
    }
}

fn open_err(c: DatasetConfig) -> String {
    match Dataset::open(c) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn fixture(name: &str) -> Value {
    let p = support::fixture("dataset").join(name);
    let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

// ---------------------------------------------------------------------------------------------
// step arithmetic and epoch plans

#[test]
fn kohya_step_example_10_sks_dog() {
    let t = TempDir::new("steps");
    folder(&t.join("10_sks dog"), 20, None);
    let ds = Dataset::open(DatasetConfig {
        train_batch_size: 4,
        ..cfg(t.path())
    })
    .unwrap();
    assert_eq!(ds.num_train_images(), 200);
    assert_eq!(ds.batches_per_epoch(), 50);
    assert_eq!(ds.total_steps(1600, Some(10), 1, 1), 500);
    assert_eq!(ds.total_steps(1600, Some(10), 2, 1), 250);
    assert_eq!(ds.total_steps(1600, Some(10), 1, 4), 130); // 10 * ceil(50 / 4)
    assert_eq!(ds.total_steps(1600, None, 2, 1), 1600);
    assert_eq!(ds.num_epochs(500, 1, 1), 10);

    // Each image enters 10 times per epoch; batches are full.
    let batches = ds.epoch_batches(1, 42);
    assert_eq!(batches.len(), 50);
    let mut seen = vec![0usize; 20];
    for b in &batches {
        assert_eq!(b.images.len(), 4);
        assert_eq!(b.reso, (64, 64));
        b.images.iter().for_each(|&i| seen[i] += 1);
    }
    assert!(seen.iter().all(|&n| n == 10), "{seen:?}");

    // Same seed and epoch -> same plan; another epoch -> another order.
    assert_eq!(batches, ds.epoch_batches(1, 42));
    assert_ne!(batches, ds.epoch_batches(2, 42));

    // Two ranks take indices 0,2,4… and 1,3,5…: disjoint, together the whole epoch.
    let r0 = shard(&batches, 0, 2);
    let r1 = shard(&batches, 1, 2);
    assert_eq!((r0.len(), r1.len()), (25, 25));
    assert!(r0.iter().all(|b| b.index % 2 == 0) && r1.iter().all(|b| b.index % 2 == 1));
}

#[test]
fn buckets_cut_batches_separately() {
    // 3 square + 2 wide images, 3 repeats, bs 2: square 9 -> 5 batches, wide 6 -> 3 batches.
    let t = TempDir::new("bucketbatches");
    let d = t.join("3_x");
    for i in 0..3 {
        write_image(&d.join(format!("s{i}.png")), 512, 512, i);
    }
    for i in 0..2 {
        write_image(&d.join(format!("w{i}.png")), 1024, 512, i);
    }
    let ds = Dataset::open(DatasetConfig {
        resolution: (512, 512),
        enable_bucket: true,
        train_batch_size: 2,
        ..DatasetConfig::new(t.path())
    })
    .unwrap();
    let resos: Vec<_> = ds.buckets().iter().map(|b| (b.reso, b.count)).collect();
    assert_eq!(resos, vec![((512, 512), 9), ((704, 320), 6)]);
    assert_eq!(ds.batches_per_epoch(), 8);
    let batches = ds.epoch_batches(1, 0);
    assert_eq!(batches.len(), 8);
    for b in &batches {
        let reso = ds.buckets()[b.bucket].reso;
        assert_eq!(b.reso, reso);
        assert!(b.images.iter().all(|&i| ds.images()[i].bucket == b.bucket));
    }
    assert_eq!(
        ds.ss_bucket_info(),
        format!(
            r#"{{"buckets": {{"0": {{"resolution": [512, 512], "count": 9}}, "1": {{"resolution": [704, 320], "count": 6}}}}, "mean_img_ar_error": {}}}"#,
            // (704/320 - 2) for the two wide images, 0 for the three squares, over 5 images.
            loractl_spec::py::float_repr((704.0 / 320.0 - 2.0) * 2.0 / 5.0)
        )
    );
}

// ---------------------------------------------------------------------------------------------
// buckets vs sd-scripts

#[test]
fn bucket_resolutions_match_kohya() {
    let f = fixture("buckets.json");
    let resolutions = f["resolutions"].as_array().unwrap();
    assert!(resolutions.len() >= 2);
    for r in resolutions {
        let max_reso = pair(&r["max_reso"]);
        let got = make_bucket_resolutions(
            max_reso,
            r["min_size"].as_u64().unwrap() as u32,
            r["max_size"].as_u64().unwrap() as u32,
            r["divisible"].as_u64().unwrap() as u32,
        );
        let want: Vec<(u32, u32)> = r["buckets"].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(got, want, "max_reso {max_reso:?}");
    }
    // The two resolutions users train SD1/SD2 at.
    let n = |res: u32| {
        resolutions
            .iter()
            .find(|r| pair(&r["max_reso"]) == (res, res) && r["divisible"] == 64)
            .map(|r| r["buckets"].as_array().unwrap().len())
    };
    assert_eq!(n(512), Some(17));
    assert_eq!(n(768), Some(19));
}

#[test]
fn bucket_selection_matches_kohya() {
    let f = fixture("buckets.json");
    let cases = f["select"].as_array().unwrap();
    assert!(cases.len() > 200);
    for c in cases {
        let max_reso = pair(&c["max_reso"]);
        let selector = if c["single"].as_bool() == Some(true) {
            BucketSelector::predefined(vec![max_reso])
        } else if c["no_upscale"].as_bool().unwrap() {
            BucketSelector::no_upscale(max_reso, c["steps"].as_u64().unwrap() as u32)
        } else {
            BucketSelector::predefined(make_bucket_resolutions(
                max_reso,
                c["min_size"].as_u64().unwrap() as u32,
                c["max_size"].as_u64().unwrap() as u32,
                c["steps"].as_u64().unwrap() as u32,
            ))
        };
        let (w, h) = pair(&c["image"]);
        let got = selector.select(w, h);
        if c["reso"].is_null() {
            assert!(got.is_none(), "{c}: expected no bucket, got {got:?}");
            continue;
        }
        let got = got.unwrap_or_else(|| panic!("{c}: no bucket"));
        assert_eq!(got.reso, pair(&c["reso"]), "{c}");
        assert_eq!(got.resized, pair(&c["resized"]), "{c}");
        let want_err = c["ar_error"].as_f64().unwrap();
        assert!(
            (got.ar_error - want_err).abs() < 1e-12,
            "{c}: {}",
            got.ar_error
        );
    }
}

// ---------------------------------------------------------------------------------------------
// resizing vs Pillow / OpenCV

#[test]
fn resize_matches_pillow_lanczos_and_cv2_area() {
    let f = fixture("resize.json");
    let source = |name: &str| {
        let s = &f["sources"][name];
        let shape = s["shape"].as_array().unwrap();
        let (h, w) = (
            shape[0].as_u64().unwrap() as u32,
            shape[1].as_u64().unwrap() as u32,
        );
        let data: Vec<u8> = s["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        RgbImage::from_raw(w, h, data).unwrap()
    };
    let (mut lanczos_cases, mut area_cases, mut area_max_diff, mut area_off) = (0, 0, 0i32, 0usize);
    for c in f["cases"].as_array().unwrap() {
        let img = source(c["src"].as_str().unwrap());
        let (w, h) = pair(&c["size"]);
        let want: Vec<u8> = c["out"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        match c["filter"].as_str().unwrap() {
            "pil_lanczos" => {
                let got = lanczos_resize(&img, w, h);
                assert_eq!(got.as_raw(), &want, "lanczos {}x{} of {}", w, h, c["src"]);
                lanczos_cases += 1;
            }
            "cv2_area" => {
                let got = area_resize(&img, w, h);
                let integer = img.width() % w == 0 && img.height() % h == 0;
                if integer {
                    assert_eq!(
                        got.as_raw(),
                        &want,
                        "INTER_AREA {}x{} of {}",
                        w,
                        h,
                        c["src"]
                    );
                }
                for (a, b) in got.as_raw().iter().zip(&want) {
                    let d = (*a as i32 - *b as i32).abs();
                    area_max_diff = area_max_diff.max(d);
                    area_off += (d > 0) as usize;
                }
                area_cases += 1;
            }
            other => panic!("unknown filter {other}"),
        }
    }
    assert_eq!(lanczos_cases, 10);
    assert_eq!(
        area_cases, 15,
        "cv2 cases missing: regenerate with opencv installed"
    );
    // Exact on every fixture case: integer ratios (2x2 rounds halves up) and fractional ones.
    assert_eq!(
        area_off, 0,
        "INTER_AREA: {area_off} values differ, max {area_max_diff}"
    );
}

// ---------------------------------------------------------------------------------------------
// scanning and captions

#[test]
fn captions_from_files_folder_names_and_bom() {
    let t = TempDir::new("captions");
    let d = t.join("5_zenny girl");
    write_image(&d.join("a.png"), 64, 64, 0);
    write(
        &d.join("a.txt"),
        "\u{FEFF}Zenny, red hair ,smile\nsecond line ignored",
    );
    write_image(&d.join("b.JPG"), 64, 64, 1);
    write_image(&d.join("c.Jpeg"), 64, 64, 2);
    write_image(&d.join("d.webp"), 64, 64, 3);
    write(&d.join("d.txt"), "zenny, blue sky\r\n");
    write(&t.join("notes/readme.md"), "not a dataset folder");
    write_image(&t.join(".hidden/x.png"), 64, 64, 0);

    let ds = Dataset::open(cfg(t.path())).unwrap();
    let caps: Vec<(&str, &str)> = ds
        .images()
        .iter()
        .map(|e| {
            (
                e.path.file_name().unwrap().to_str().unwrap(),
                e.caption.as_str(),
            )
        })
        .collect();
    assert_eq!(
        caps,
        vec![
            ("a.png", "Zenny, red hair ,smile"),
            ("b.JPG", "zenny girl"),
            ("c.Jpeg", "zenny girl"),
            ("d.webp", "zenny, blue sky"),
        ]
    );
    let s = &ds.subsets()[0];
    assert_eq!((s.repeats, s.img_count, s.missing_captions), (5, 4, 2));
    assert_eq!(s.class_tokens, "zenny girl");
    // The non-numeric folder is ignored with a warning; the hidden one silently.
    assert_eq!(ds.warnings().len(), 1, "{:?}", ds.warnings());
    assert_mentions(&ds.warnings()[0], &["notes", "repeat count", "30_zenny"]);

    assert_eq!(
        ds.ss_dataset_dirs(),
        r#"{"5_zenny girl": {"n_repeats": 5, "img_count": 4}}"#
    );
    assert_eq!(
        ds.ss_tag_frequency(),
        r#"{"5_zenny girl": {"zenny": 2, "red hair": 1, "smile": 1, "zenny girl": 2, "blue sky": 1}}"#
    );
}

#[test]
fn caption_extension_mismatch_warns() {
    let t = TempDir::new("captionext");
    let d = t.join("10_sks");
    folder(&d, 2, None);
    write(&d.join("000.caption"), "sks, dog");
    write(&d.join("001.caption"), "sks, cat");
    write(&d.join("002.bmp"), "bmp");
    let ds = Dataset::open(cfg(t.path())).unwrap();
    assert!(ds.images().iter().all(|e| e.caption == "sks"));
    let w = ds.warnings().join("\n");
    assert_mentions(
        &w,
        &[
            "2 images",
            "`.caption` caption file",
            "caption_extension is `.txt`",
            "NOT used",
            "caption_extension = \".caption\"",
        ],
    );
    assert_mentions(&w, &[".bmp", "not read", "convert"]);

    // caption_extension without its dot, as kohya accepts it.
    let ds = Dataset::open(DatasetConfig {
        caption_extension: "caption".into(),
        ..cfg(t.path())
    })
    .unwrap();
    assert_eq!(ds.images()[0].caption, "sks, dog");
}

#[test]
fn layout_errors_name_the_path_and_the_fix() {
    let t = TempDir::new("layout");

    // train_data_dir missing.
    let missing = t.join("nope");
    let msg = open_err(cfg(&missing));
    assert_mentions(
        &msg,
        &[
            "train_data_dir",
            "nope",
            "does not exist",
            "parent of folders like `30_zenny`",
        ],
    );

    // train_data_dir is itself a `30_x` folder.
    let inner = t.join("train/30_zenny");
    folder(&inner, 2, None);
    let msg = open_err(cfg(&inner));
    assert_mentions(
        &msg,
        &[
            "30_zenny",
            "is itself a `N_name` folder",
            "must be the parent of folders like `30_zenny`",
            "train`)",
        ],
    );

    // Images directly inside train_data_dir.
    let flat = t.join("flat");
    folder(&flat, 2, None);
    let msg = open_err(cfg(&flat));
    assert_mentions(
        &msg,
        &[
            "flat",
            "2 images directly inside",
            "must be the parent of folders like `30_zenny`",
            "10_name",
        ],
    );

    // No `N_name` folders.
    let empty = t.join("empty");
    fs::create_dir_all(empty.join("photos")).unwrap();
    let msg = open_err(cfg(&empty));
    assert_mentions(&msg, &["empty", "no `N_name` folders", "30_zenny"]);

    // A folder with no images.
    let noimg = t.join("noimg");
    write(&noimg.join("10_dog/readme.txt"), "x");
    let msg = open_err(cfg(&noimg));
    assert_mentions(
        &msg,
        &["10_dog", "has no images", ".png", "remove the folder"],
    );

    // Repeats 0.
    let zero = t.join("zero");
    folder(&zero.join("0_dog"), 1, None);
    let msg = open_err(cfg(&zero));
    assert_mentions(&msg, &["0_dog", "repeat count 0", "at least 1", "10_dog"]);

    // Caption file not UTF-8.
    let latin = t.join("latin");
    folder(&latin.join("3_cafe"), 1, None);
    write(&latin.join("3_cafe/000.txt"), b"caf\xe9, latte");
    let msg = open_err(cfg(&latin));
    assert_mentions(&msg, &["000.txt", "not UTF-8", "re-save it as UTF-8"]);

    // Empty caption file (kohya asserts).
    let emptycap = t.join("emptycap");
    folder(&emptycap.join("3_x"), 1, None);
    write(&emptycap.join("3_x/000.txt"), "");
    let msg = open_err(cfg(&emptycap));
    assert_mentions(&msg, &["000.txt", "caption file is empty", "delete it"]);

    // reg_data_dir errors name their key.
    let ok = t.join("ok");
    folder(&ok.join("1_a"), 1, None);
    let msg = open_err(DatasetConfig {
        reg_data_dir: Some(t.join("noreg")),
        ..cfg(&ok)
    });
    assert_mentions(&msg, &["reg_data_dir", "noreg", "does not exist"]);
}

#[test]
fn config_errors_name_the_key() {
    let base = DatasetConfig {
        resolution: (512, 512),
        enable_bucket: true,
        ..DatasetConfig::new("/data")
    };
    let msg = DatasetConfig {
        bucket_reso_steps: 32,
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert_mentions(
        &msg,
        &["bucket_reso_steps", "32", "multiple of 64", "use 64"],
    );

    let msg = DatasetConfig {
        random_crop: true,
        cache_latents_to_disk: true,
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert_mentions(&msg, &["cache_latents_to_disk", "random_crop"]);

    let msg = DatasetConfig {
        min_bucket_reso: 640,
        max_bucket_reso: 448,
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert_mentions(&msg, &["min_bucket_reso: 640", "max_bucket_reso: 448"]);

    let msg = DatasetConfig {
        enable_bucket: false,
        resolution: (500, 512),
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert_mentions(
        &msg,
        &["resolution", "500x512", "multiples of 64", "448x512"],
    );

    // Steps that are not multiples move min/max as kohya does.
    let c = DatasetConfig {
        min_bucket_reso: 300,
        max_bucket_reso: 1000,
        ..base
    };
    assert!(c.validate().is_ok());
    assert_eq!(c.adjusted_bucket_range(), (256, 1024));
}

// ---------------------------------------------------------------------------------------------
// regularization images

#[test]
fn reg_images_are_balanced_and_weighted() {
    let t = TempDir::new("reg");
    folder(&t.join("train/2_sks dog"), 5, Some("sks dog"));
    folder(&t.join("reg/1_dog"), 3, None);
    let ds = Dataset::open(DatasetConfig {
        reg_data_dir: Some(t.join("reg")),
        prior_loss_weight: 0.5,
        train_batch_size: 4,
        ..cfg(&t.join("train"))
    })
    .unwrap();
    assert_eq!((ds.num_train_images(), ds.num_reg_images()), (10, 3));
    let reg: Vec<u32> = ds
        .images()
        .iter()
        .filter(|e| e.is_reg)
        .map(|e| e.repeats)
        .collect();
    assert_eq!(reg, vec![4, 3, 3]);
    // 10 train + 10 reg samples in one bucket, bs 4.
    assert_eq!(ds.batches_per_epoch(), 5);
    assert_eq!(
        ds.ss_reg_dataset_dirs(),
        r#"{"1_dog": {"n_repeats": 1, "img_count": 3}}"#
    );

    let mut reg_weights = 0;
    for b in ds.epoch_batches(1, 7) {
        let s = ds
            .load_batch(&b, 1, 7, None, &Device::Cpu)
            .unwrap()
            .unwrap();
        for (&i, &w) in s.images.iter().zip(&s.loss_weights) {
            let want = if ds.images()[i].is_reg { 0.5 } else { 1.0 };
            assert_eq!(w, want);
            reg_weights += ds.images()[i].is_reg as usize;
        }
    }
    assert_eq!(reg_weights, 10);

    // More reg samples than training samples: the rest is left out with a warning.
    let t2 = TempDir::new("reg2");
    folder(&t2.join("train/1_a"), 2, None);
    folder(&t2.join("reg/2_b"), 4, None);
    let ds = Dataset::open(DatasetConfig {
        reg_data_dir: Some(t2.join("reg")),
        ..cfg(&t2.join("train"))
    })
    .unwrap();
    assert_eq!(ds.unused_reg_images(), 3);
    assert_eq!(ds.images().iter().filter(|e| e.is_reg).count(), 1);
    assert_mentions(&ds.warnings().join("\n"), &["reg images are not used"]);
}

// ---------------------------------------------------------------------------------------------
// caption processing

#[test]
fn caption_processing_is_deterministic_and_ordered() {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    let caption = "sks, dog, red collar, grass, sunny, park, running, tongue out, blur, photo";
    let opts = CaptionOptions {
        shuffle: true,
        separator: ",".into(),
        keep_tokens: 2,
        ..Default::default()
    };
    let run = |seed: u64, opts: &CaptionOptions, epoch: usize| -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..5)
            .map(|_| process_caption(caption, opts, epoch, &mut rng))
            .collect()
    };
    let a = run(1, &opts, 1);
    assert_eq!(a, run(1, &opts, 1));
    assert_ne!(a, run(2, &opts, 1));
    for c in &a {
        assert!(c.starts_with("sks, dog, "), "{c}");
        let mut tags: Vec<&str> = c.split(", ").collect();
        tags.sort();
        let mut want: Vec<&str> = caption.split(", ").collect();
        want.sort();
        assert_eq!(tags, want);
    }

    // Whole-caption dropout: rate 1 always, every 2nd epoch.
    let drop_all = CaptionOptions {
        dropout_rate: 1.0,
        ..opts.clone()
    };
    assert!(run(3, &drop_all, 1).iter().all(|c| c.is_empty()));
    let every2 = CaptionOptions {
        dropout_every_n_epochs: 2,
        ..opts.clone()
    };
    assert!(run(3, &every2, 2).iter().all(|c| c.is_empty()));
    assert!(run(3, &every2, 3).iter().all(|c| !c.is_empty()));

    // Tag dropout 1 leaves the kept tokens only; prefix/suffix join with a space first.
    let tags_off = CaptionOptions {
        shuffle: false,
        tag_dropout_rate: 1.0,
        prefix: Some("photo of".into()),
        suffix: Some("masterpiece".into()),
        ..opts.clone()
    };
    assert_eq!(run(4, &tags_off, 1)[0], "photo of sks, dog");

    // The dataset's per-batch RNG makes loading repeatable.
    let mut r1 = batch_rng(9, 3, 5);
    let mut r2 = batch_rng(9, 3, 5);
    assert_eq!(
        process_caption(caption, &opts, 3, &mut r1),
        process_caption(caption, &opts, 3, &mut r2)
    );
}

// ---------------------------------------------------------------------------------------------
// loading

/// Left half black, right half white.
fn halves(path: &Path, w: u32, h: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    })
    .save(path)
    .unwrap();
}

fn row(t: &Tensor, c: usize, y: usize) -> Vec<f32> {
    t.get(c).unwrap().get(y).unwrap().to_vec1().unwrap()
}

#[test]
fn loading_resizes_crops_and_flips() {
    let t = TempDir::new("load");
    // 128x64 into a 64x64 bucket: cover size 128x64, center crop columns 32..96.
    halves(&t.join("1_x/a.png"), 128, 64);
    let ds = Dataset::open(cfg(t.path())).unwrap();
    let e = &ds.images()[0];
    assert_eq!(
        (e.size, e.choice.reso, e.choice.resized),
        ((128, 64), (64, 64), (128, 64))
    );
    let mut rng = batch_rng(0, 1, 0);
    let px = ds.load_pixels(0, false, &mut rng, &Device::Cpu).unwrap();
    assert_eq!(px.dims(), &[3, 64, 64]);
    let r = row(&px, 0, 10);
    assert!(r[..32].iter().all(|&v| v == -1.0) && r[32..].iter().all(|&v| v == 1.0));
    let flipped = ds.load_pixels(0, true, &mut rng, &Device::Cpu).unwrap();
    let r = row(&flipped, 2, 10);
    assert!(r[..32].iter().all(|&v| v == 1.0) && r[32..].iter().all(|&v| v == -1.0));

    // A small image is upscaled to cover the bucket (no bucket_no_upscale).
    let t2 = TempDir::new("load2");
    write_image(&t2.join("1_x/small.png"), 32, 48, 1);
    let ds = Dataset::open(cfg(t2.path())).unwrap();
    assert_eq!(ds.images()[0].choice.resized, (64, 96));
    let px = ds.load_pixels(0, false, &mut rng, &Device::Cpu).unwrap();
    assert_eq!(px.dims(), &[3, 64, 64]);
    let (lo, hi) = (
        px.min_all().unwrap().to_scalar::<f32>().unwrap(),
        px.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!((-1.0..=1.0).contains(&lo) && (-1.0..=1.0).contains(&hi));
}

#[test]
fn batches_load_with_seeded_flips() {
    let t = TempDir::new("flips");
    folder(&t.join("4_x"), 6, Some("x"));
    let ds = Dataset::open(DatasetConfig {
        flip_aug: true,
        shuffle_caption: true,
        train_batch_size: 3,
        ..cfg(t.path())
    })
    .unwrap();
    let load_all = |seed: u64| {
        ds.epoch_batches(1, seed)
            .iter()
            .map(|b| {
                let s = ds
                    .load_batch(b, 1, seed, None, &Device::Cpu)
                    .unwrap()
                    .unwrap();
                match &s.input {
                    BatchInput::Pixels(p) => assert_eq!(p.dims(), &[3, 3, 64, 64]),
                    BatchInput::Latents(_) => panic!("no cache given"),
                }
                (s.flipped, s.captions)
            })
            .collect::<Vec<_>>()
    };
    let a = load_all(5);
    assert_eq!(a, load_all(5));
    let flips: Vec<bool> = a.iter().flat_map(|(f, _)| f.clone()).collect();
    assert_eq!(flips.len(), 24);
    assert!(
        flips.iter().any(|&f| f) && flips.iter().any(|&f| !f),
        "{flips:?}"
    );
}

#[test]
fn bad_images_are_skipped_with_a_warning_or_fail() {
    let t = TempDir::new("bad");
    let d = t.join("2_x");
    folder(&d, 3, None);
    // Not an image at all: caught when the header is probed.
    write(&d.join("garbage.png"), b"this is not a png");
    // A valid header with the pixel data cut off: caught when decoded.
    let mut good = Vec::new();
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, 7]))
        .write_to(
            &mut std::io::Cursor::new(&mut good),
            image::ImageFormat::Png,
        )
        .unwrap();
    write(&d.join("truncated.png"), &good[..good.len() / 2]);

    let msg = open_err(DatasetConfig {
        bad_image_policy: BadImagePolicy::Fail,
        ..cfg(t.path())
    });
    assert_mentions(&msg, &["garbage.png", "re-export it or remove it"]);

    let ds = Dataset::open(cfg(t.path())).unwrap();
    assert_eq!(ds.images().len(), 4);
    assert_eq!(ds.subsets()[0].img_count, 4);
    assert_mentions(
        &ds.warnings().join("\n"),
        &["skipping image", "garbage.png"],
    );
    let mut dropped = 0;
    let mut loaded = 0;
    for b in ds.epoch_batches(1, 0) {
        match ds.load_batch(&b, 1, 0, None, &Device::Cpu).unwrap() {
            Some(s) => {
                loaded += s.images.len();
                dropped += b.images.len() - s.images.len();
            }
            None => dropped += b.images.len(),
        }
    }
    assert_eq!((loaded, dropped), (6, 2));
    let skipped = ds.skipped_images();
    assert_eq!(skipped.len(), 2);
    assert!(skipped.iter().any(|s| s.path.ends_with("truncated.png")));

    let ds = Dataset::open(DatasetConfig {
        bad_image_policy: BadImagePolicy::Fail,
        ..cfg(t.path())
    });
    assert!(ds.is_err()); // garbage.png
    fs::remove_file(d.join("garbage.png")).unwrap();
    let ds = Dataset::open(DatasetConfig {
        bad_image_policy: BadImagePolicy::Fail,
        ..cfg(t.path())
    })
    .unwrap();
    let idx = ds
        .images()
        .iter()
        .position(|e| e.path.ends_with("truncated.png"))
        .unwrap();
    let mut rng = batch_rng(0, 1, 0);
    let msg = ds
        .load_pixels(idx, false, &mut rng, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["truncated.png", "cannot decode"]);
}

#[test]
fn bucket_no_upscale_buckets_follow_images() {
    let t = TempDir::new("noupscale");
    let d = t.join("1_x");
    write_image(&d.join("big.png"), 1024, 768, 0);
    write_image(&d.join("small.png"), 300, 200, 1);
    write_image(&d.join("tiny.png"), 40, 300, 2);
    let ds = Dataset::open(DatasetConfig {
        resolution: (512, 512),
        enable_bucket: true,
        bucket_no_upscale: true,
        ..DatasetConfig::new(t.path())
    })
    .unwrap();
    let got: Vec<_> = ds
        .images()
        .iter()
        .map(|e| (e.size, e.choice.reso, e.choice.resized))
        .collect();
    // tiny.png (40 wide) cannot make a 64-step bucket without upscaling: skipped with a warning.
    assert_eq!(
        got,
        vec![
            ((1024, 768), (512, 384), (512, 384)),
            ((300, 200), (256, 192), (300, 200))
        ]
    );
    assert_mentions(
        &ds.warnings().join("\n"),
        &["tiny.png", "bucket_no_upscale"],
    );
    let mut rng = batch_rng(0, 1, 0);
    for i in 0..2 {
        let (w, h) = ds.images()[i].choice.reso;
        let px = ds.load_pixels(i, false, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(px.dims(), &[3, h as usize, w as usize]);
    }
}

// ---------------------------------------------------------------------------------------------
// latent cache

/// A stand-in VAE: 8×8 average pooling to 4 channels; counts its calls.
fn fake_encoder(calls: &Cell<usize>) -> impl FnMut(&Tensor) -> Result<Tensor> + '_ {
    move |x: &Tensor| {
        calls.set(calls.get() + 1);
        assert_eq!(x.dims()[0..2], [1, 3]);
        let pooled = x.avg_pool2d(8)?;
        Ok(Tensor::cat(&[&pooled, &pooled.narrow(1, 0, 1)?], 1)?)
    }
}

#[test]
fn latent_cache_in_memory_and_on_disk() {
    let t = TempDir::new("cache");
    folder(&t.join("train/2_x"), 3, None);
    let c = DatasetConfig {
        flip_aug: true,
        train_batch_size: 2,
        ..cfg(&t.join("train"))
    };
    let ds = Dataset::open(c.clone()).unwrap();
    let calls = Cell::new(0);

    // In memory: image and its mirror per image; a second pass reuses everything.
    let mem = LatentCache::in_memory("vae-a");
    let s = ds.cache_latents(&mem, fake_encoder(&calls)).unwrap();
    assert_eq!((s.encoded, s.reused, calls.get()), (6, 0, 6));
    let s = ds.cache_latents(&mem, fake_encoder(&calls)).unwrap();
    assert_eq!((s.encoded, s.reused, calls.get()), (0, 6, 6));
    assert_eq!(mem.len_in_memory(), 6);

    // Batches then come from the cache; the flipped entry is the mirror's latent.
    for b in ds.epoch_batches(1, 3) {
        let sb = ds
            .load_batch(&b, 1, 3, Some(&mem), &Device::Cpu)
            .unwrap()
            .unwrap();
        let BatchInput::Latents(l) = &sb.input else {
            panic!("expected latents")
        };
        assert_eq!(l.dims(), &[sb.images.len(), 4, 8, 8]);
        for (k, (&i, &flip)) in sb.images.iter().zip(&sb.flipped).enumerate() {
            let mut rng = batch_rng(0, 0, 0);
            let px = ds
                .load_pixels(i, flip, &mut rng, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want = px.avg_pool2d(8).unwrap().squeeze(0).unwrap();
            let got = l.get(k).unwrap().narrow(0, 0, 3).unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "latent of image {i} flip {flip}: {diff}");
        }
    }

    // On disk: a fresh cache over the same folder reuses the files.
    let dir = t.join("latents");
    let disk = LatentCache::on_disk("vae-a", &dir).unwrap();
    let s = ds.cache_latents(&disk, fake_encoder(&calls)).unwrap();
    assert_eq!(s.encoded, 6);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 6);
    let disk = LatentCache::on_disk("vae-a", &dir).unwrap();
    let s = ds.cache_latents(&disk, fake_encoder(&calls)).unwrap();
    assert_eq!((s.encoded, s.reused), (0, 6));

    // Editing one image invalidates its two entries (the key hashes the file's bytes).
    write_image(&t.join("train/2_x/001.png"), 64, 64, 99);
    let ds2 = Dataset::open(c.clone()).unwrap();
    let s = ds2.cache_latents(&disk, fake_encoder(&calls)).unwrap();
    assert_eq!((s.encoded, s.reused), (2, 4));

    // Another VAE misses everything.
    let other = LatentCache::on_disk("vae-b", &dir).unwrap();
    let s = ds2.cache_latents(&other, fake_encoder(&calls)).unwrap();
    assert_eq!((s.encoded, s.reused), (6, 0));

    // Another resolution (another bucket) misses everything too.
    let ds3 = Dataset::open(DatasetConfig {
        resolution: (128, 128),
        ..c.clone()
    })
    .unwrap();
    let s = ds3.cache_latents(&disk, fake_encoder(&calls)).unwrap();
    assert_eq!((s.encoded, s.reused), (6, 0));

    // A corrupt entry is recomputed, not trusted.
    let victim = fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    write(&victim, b"garbage");
    let s = ds3.cache_latents(&disk, fake_encoder(&calls)).unwrap();
    assert_eq!(s.encoded + s.reused, 6);

    // Random crops cannot be cached.
    let rc = Dataset::open(DatasetConfig {
        random_crop: true,
        ..c
    })
    .unwrap();
    let msg = rc
        .cache_latents(&mem, fake_encoder(&calls))
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["cache_latents", "random_crop"]);

    // NaN latents name the image.
    let msg = ds
        .cache_latents(&LatentCache::in_memory("nan"), |x: &Tensor| {
            Ok((x.avg_pool2d(8)? * f64::NAN)?)
        })
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["000.png", "NaN"]);
    let _ = DType::F32;
}

// ---------------------------------------------------------------------------------------------
// summary

#[test]
fn summary_and_metadata() {
    let t = TempDir::new("summary");
    folder(&t.join("10_sks dog"), 20, Some("sks dog"));
    let ds = Dataset::open(DatasetConfig {
        train_batch_size: 4,
        ..cfg(t.path())
    })
    .unwrap();
    let s = ds.summary();
    assert_eq!(s.folders.len(), 1);
    let f = &s.folders[0];
    assert_eq!(
        (f.name.as_str(), f.repeats, f.img_count, f.samples_per_epoch),
        ("10_sks dog", 10, 20, 200)
    );
    assert_eq!(s.buckets.len(), 1);
    assert_eq!(
        (
            s.buckets[0].resolution,
            s.buckets[0].count,
            s.buckets[0].batches
        ),
        ((64, 64), 200, 50)
    );
    assert_eq!(s.batches_per_epoch, 50);
    assert_eq!(s.mean_ar_error, None);
    // The summary serializes for a `plan --json` output.
    let v: Value = serde_json::to_value(&s).unwrap();
    assert_eq!(v["batches_per_epoch"], 50);

    let md: std::collections::HashMap<String, String> = ds.metadata().into_iter().collect();
    assert_eq!(
        md["ss_dataset_dirs"],
        r#"{"10_sks dog": {"n_repeats": 10, "img_count": 20}}"#
    );
    assert_eq!(md["ss_num_train_images"], "200");
    assert_eq!(md["ss_num_batches_per_epoch"], "50");
    assert_eq!(md["ss_bucket_info"], "null");
    assert_eq!(md["ss_resolution"], "(64, 64)");
    assert_eq!(md["ss_min_bucket_reso"], "None");
    assert_eq!(md["ss_prior_loss_weight"], "1.0");
    assert_eq!(md["ss_enable_bucket"], "False");
    let tags: Value = serde_json::from_str(&md["ss_tag_frequency"]).unwrap();
    assert_eq!(tags["10_sks dog"]["sks dog"], 20);
    assert_eq!(tags["10_sks dog"]["tag7"], 1);
}

#[test]
fn latent_cache_from_config_sharded_and_missing() {
    let t = TempDir::new("cache2");
    folder(&t.join("2_x"), 3, None);
    let c = DatasetConfig {
        flip_aug: true,
        ..cfg(t.path())
    };
    assert!(Dataset::open(c.clone())
        .unwrap()
        .latent_cache("v")
        .unwrap()
        .is_none());
    let ds = Dataset::open(DatasetConfig {
        cache_latents_to_disk: true,
        ..c.clone()
    })
    .unwrap();
    let cache = ds.latent_cache("v").unwrap().unwrap();
    assert_eq!(cache.dir(), Some(t.join(".latent_cache").as_path()));

    // Two ranks split the encoding; afterwards everything is there for both.
    let calls = Cell::new(0);
    let s0 = ds
        .cache_latents_shard(&cache, 0, 2, fake_encoder(&calls))
        .unwrap();
    let s1 = ds
        .cache_latents_shard(&cache, 1, 2, fake_encoder(&calls))
        .unwrap();
    assert_eq!((s0.encoded, s1.encoded), (4, 2));
    let all = ds.cache_latents(&cache, fake_encoder(&calls)).unwrap();
    assert_eq!((all.encoded, all.reused), (0, 6));

    // The cache folder inside train_data_dir is not mistaken for a dataset folder.
    let again = Dataset::open(c.clone()).unwrap();
    assert!(again.warnings().is_empty(), "{:?}", again.warnings());

    // Loading from a cache that lacks an entry is an error whatever the bad-image policy.
    let empty = LatentCache::in_memory("v");
    let b = &ds.epoch_batches(1, 0)[0];
    let msg = ds
        .load_batch(b, 1, 0, Some(&empty), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["no cached latent", "cache_latents"]);
}
