//! A small generated dataset and job spec to try loractl with no downloads: captioned images of
//! coloured shapes in kohya's `N_name` folders, and a job for the tiny SD1 model shipped with
//! the tests (or any SD1.x/SD2.x checkpoint).

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// The tiny SD1-style model kept with the tests (random weights, real architecture).
pub fn bundled_tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1/diffusers")
}

const COLOURS: [([u8; 3], &str); 4] = [
    ([220, 40, 40], "red"),
    ([40, 180, 60], "green"),
    ([50, 60, 220], "blue"),
    ([230, 200, 40], "yellow"),
];

/// Writes `train/5_shapes/` under `dir`: `count` images of `size`×`size` pixels (a coloured
/// square or disc on a light background) with `.txt` captions such as `red square, shapes`.
pub fn write_dataset(dir: &Path, size: u32, count: usize) -> Result<PathBuf> {
    let folder = dir.join("train").join("5_shapes");
    std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
    for i in 0..count {
        let (rgb, colour) = COLOURS[i % COLOURS.len()];
        let disc = (i / COLOURS.len()) % 2 == 1;
        let (c, r) = (size as f32 / 2.0, size as f32 / 3.0);
        let img = RgbImage::from_fn(size, size, |x, y| {
            let (dx, dy) = (x as f32 + 0.5 - c, y as f32 + 0.5 - c);
            let inside = if disc {
                dx * dx + dy * dy <= r * r
            } else {
                dx.abs() <= r && dy.abs() <= r
            };
            if inside {
                Rgb(rgb)
            } else {
                Rgb([245, 245, 240])
            }
        });
        let path = folder.join(format!("{i:03}.png"));
        img.save(&path)
            .map_err(|e| Error::Config(format!("writing {}: {e}", path.display())))?;
        let caption = format!("{colour} {}, shapes", if disc { "disc" } else { "square" });
        let txt = folder.join(format!("{i:03}.txt"));
        std::fs::write(&txt, caption).map_err(|e| Error::io(&txt, e))?;
    }
    Ok(dir.join("train"))
}

/// A job spec (TOML) training a LoRA on `model` with the data under `train_data_dir`.
pub fn job_toml(model: &Path, train_data_dir: &Path, resolution: u32, steps: usize) -> String {
    let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    format!(
        r#"# Written by `loractl quickstart`. Every key is an sd-scripts option; see
# `loractl plan` for what it will do.
name = "quickstart"

[model]
pretrained_model_name_or_path = {model}

[dataset]
train_data_dir = {data}
resolution = "{resolution}"
cache_latents = true
shuffle_caption = false

[network]
network_dim = 8
network_alpha = 4

[optimizer]
optimizer_type = "AdamW"
learning_rate = 1e-3
text_encoder_lr = 2e-4
lr_scheduler = "cosine"
lr_warmup_steps = "10%"

[training]
train_batch_size = 2
max_train_steps = {steps}
seed = 1234

[output]
output_dir = "output"
save_precision = "fp16"
save_state = true
"#,
        model = quote(model),
        data = quote(train_data_dir),
    )
}
