//! Broken spec files and the exact messages a user sees for them.

use std::path::{Path, PathBuf};

use loractl_spec::{Error, JobSpec, ParseError, SpecErrors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn parse_errors(name: &str) -> Vec<ParseError> {
    match JobSpec::from_file(fixture(name)) {
        Err(Error::Parse(errors)) => errors.0,
        other => panic!("{name}: expected parse errors, got {other:?}"),
    }
}

fn spec_errors(name: &str) -> SpecErrors {
    let spec = JobSpec::from_file(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    spec.validate().expect_err("expected validation errors")
}

/// `line:column path: message; hint` without the origin, for compact assertions.
fn short(e: &ParseError) -> String {
    let full = e.to_string();
    let origin = format!("{}:", e.origin);
    full.strip_prefix(&origin).unwrap_or(&full).to_owned()
}

#[test]
fn wrong_keys_are_all_reported_with_paths_and_suggestions() {
    let errors = parse_errors("wrong_key.toml");
    let lines: Vec<String> = errors.iter().map(short).collect();
    assert_eq!(
        lines,
        [
            "2:1: `xformers`: unknown key; `xformers` is an sd-scripts option that loractl does not have: loractl's attention needs no switch",
            "12:1: `optimizer.lerning_rate`: unknown key; did you mean `learning_rate`?",
            "16:1: `training.text_encoder_lr`: unknown key; `text_encoder_lr` belongs in the [optimizer] table",
            "19:2: `optimizr`: unknown table; did you mean `optimizer`?",
        ]
    );
    assert!(errors[0].origin.ends_with("wrong_key.toml"));
    assert_eq!(errors[1].path.as_deref(), Some("optimizer.lerning_rate"));
    assert_eq!(
        errors[1].hint.as_deref(),
        Some("did you mean `learning_rate`?")
    );
}

#[test]
fn wrong_types_name_key_line_and_expectation() {
    let lines: Vec<String> = parse_errors("wrong_type.toml").iter().map(short).collect();
    assert_eq!(
        lines,
        [
            "5:6: `model.v2`: invalid type: string \"no\", expected a boolean",
            "9:14: `dataset.resolution`: invalid value: string \"512x512\", expected a resolution such as \"512\" or \"512,768\" (width,height)",
            "12:15: `network.network_dim`: invalid value: integer `-4`, expected a non-negative integer",
            "15:17: `optimizer.learning_rate`: invalid type: string \"fast\", expected a number",
        ]
    );
}

#[test]
fn missing_required_keys_are_all_reported() {
    let lines: Vec<String> = parse_errors("missing_required.toml")
        .iter()
        .map(short)
        .collect();
    assert_eq!(
        lines,
        [
            "1:1: `model.pretrained_model_name_or_path`: missing required key; give a .safetensors/.ckpt checkpoint file or a diffusers folder",
            "1:1: `name`: missing required key; add e.g. `name = \"zenny\"` at the top",
            "4:1: `dataset.resolution`: missing required key; add e.g. `resolution = \"512\"` (\"768\" for SD2-768-v bases)",
        ]
    );
}

#[test]
fn unknown_version_is_refused_before_its_keys() {
    let lines: Vec<String> = parse_errors("future_version.toml")
        .iter()
        .map(short)
        .collect();
    assert_eq!(
        lines,
        ["1:11: `version`: unsupported job spec version 2; this loractl reads version 1; write `version = 1` or use a newer loractl"]
    );
}

#[test]
fn every_validation_problem_at_once() {
    let errors = spec_errors("many_problems.toml");
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let expected = [
        "`model.max_token_length`: must be 75, 150 or 225, got 100; use 225 for long captions or remove it for 75",
        "`dataset.caption_extension`: `txt` does not start with a dot, so caption files would never be found; use \".txt\"",
        "`dataset.caption_dropout_rate`: is a probability and must be between 0 and 1, got 1.5; use e.g. 0.1 for 10%",
        "`dataset.resolution`: width 500 is not a multiple of 64 (the UNet halves the 1/8-size latent three times); use 448 or 512",
        "`dataset.bucket_reso_steps`: 100 is not a multiple of 64 (SD1/SD2 latents must halve three times); use 64 (or 128)",
        "`dataset.random_crop`: changes the image every epoch, so it cannot be used with dataset.cache_latents_to_disk: cached latents are computed once; set random_crop = false, or set cache_latents and cache_latents_to_disk to false",
        "`network.network_dim`: must be at least 1, got 0; use e.g. 32, 64 or 128",
        "`network.network_train_text_encoder_only`: cannot be combined with network.network_train_unet_only: nothing would be trained; keep at most one of them",
        "`optimizer.optimizer_type`: unknown value `adamw8bitt`; did you mean `AdamW8bit`?",
        "`optimizer.learning_rate`: must be a finite number >= 0, got -0.0001; use e.g. 1e-4 (AdamW) or 1.0 (DAdaptAdam, Prodigy)",
        "`optimizer.lr_warmup_steps`: 150% is not between 0% and 100%; use e.g. \"5%\"",
        "`training.mixed_precision`: unknown value `fp32`; use one of: no, fp16, bf16",
        "`training.min_timestep`: 800 is not below max_timestep (200): timesteps are drawn from min..max; lower min_timestep or raise max_timestep",
        "`output.save_precision`: unknown value `fp32`; use one of: fp16, bf16, float",
        "`output.save_last_n_epochs`: only prunes files written by save_every_n_epochs, which is not set; set save_every_n_epochs too, or remove save_last_n_epochs",
        "`sample.sample_every_n_steps`: is set but sample.sample_prompts is not, so there is nothing to sample; set sample_prompts to a text file with one prompt per line",
        "`resources.gpus`: `0,1,1`: GPU 1 is listed twice; use \"all\", \"cpu\", or distinct GPU ids such as \"0,2\"",
    ];
    assert_eq!(lines, expected);
    let text = errors.to_string();
    assert!(
        text.starts_with("invalid job spec (17 problems):\n  `model.max_token_length`"),
        "{text}"
    );
    assert_eq!(errors.at("resources.gpus").count(), 1);
}
