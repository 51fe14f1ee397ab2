//! A LoRA written by `loractl train` means the same to us as to diffusers: the tiny SD1 model
//! with `tests/fixtures/lora_diffusers/loractl_tiny.safetensors` applied gives the text-encoder
//! and UNet outputs that diffusers computed after `pipe.load_lora_weights` on the same file.
//! References come from scripts/fixtures/check_diffusers_lora.py (`reference.safetensors` beside
//! the LoRA, and the `diffusers_load_lora_weights` entry of `checks.json`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use loractl_trainer::loader::{self, LoadOptions, StableDiffusion};
use loractl_trainer::lora::LoraNetwork;
use sha2::{Digest, Sha256};

mod support;
use support::{fixture, get, load_tensors, max_abs_diff, norm, sd1_diffusers};

/// Our outputs against diffusers', element-wise.
const OUTPUT_TOL: f32 = 1e-5;
/// ‖ours − theirs‖ / ‖theirs‖ for the LoRA's effect (output with LoRA minus output without).
const DELTA_REL_TOL: f64 = 1e-3;

const LORA_UNET_MODULES: usize = 48;
const LORA_TE_MODULES: usize = 18;

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    load_tensors(path).context("regenerate with scripts/fixtures/check_diffusers_lora.py")
}

fn f64s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?)
}

/// ‖(ours_lora − ours_base) − (theirs_lora − theirs_base)‖ / ‖theirs_lora − theirs_base‖, and
/// ‖theirs_lora − theirs_base‖; computed in f64.
fn delta_rel_err(ours: (&Tensor, &Tensor), theirs: (&Tensor, &Tensor)) -> Result<(f64, f64)> {
    let d_ours = (f64s(ours.0)? - f64s(ours.1)?)?;
    let d_theirs = (f64s(theirs.0)? - f64s(theirs.1)?)?;
    let theirs_norm = norm(&d_theirs)?;
    ensure!(theirs_norm > 0.0, "the reference LoRA changes nothing");
    Ok((norm(&(d_ours - &d_theirs)?)? / theirs_norm, theirs_norm))
}

/// The three outputs of one pass: text encoder, UNet on that text encoder's output, and UNet on
/// a given context (diffusers' base text-encoder output, which isolates the UNet's LoRA).
struct Pass {
    te: Tensor,
    unet: Tensor,
    unet_fixed_context: Tensor,
}

fn pass(sd: &StableDiffusion, r: &HashMap<String, Tensor>) -> Result<Pass> {
    let ids = get(r, "input_ids")?;
    let latents = get(r, "latents")?;
    let t = get(r, "timestep")?;
    let te = sd.text_encoder.forward(ids, 1)?;
    let unet = sd.unet.forward(latents, t, &te)?;
    let unet_fixed_context = sd.unet.forward(latents, t, get(r, "te_base")?)?;
    Ok(Pass {
        te,
        unet,
        unet_fixed_context,
    })
}

/// A LoRA file the Python check loaded into diffusers, and the prefix of its outputs in the
/// reference.
struct Case {
    file: &'static str,
    prefix: &'static str,
}

const CASES: [Case; 2] = [
    // Written by `loractl train`.
    Case {
        file: "loractl_tiny",
        prefix: "",
    },
    // The same with seeded text-encoder lora_up (loractl_tiny's are all zero).
    Case {
        file: "loractl_tiny_te_filled",
        prefix: "te_filled.",
    },
];

fn lora_file(name: &str) -> PathBuf {
    fixture(format!("lora_diffusers/{name}.safetensors"))
}

fn model() -> Result<StableDiffusion> {
    Ok(loader::load(&sd1_diffusers(), &LoadOptions::default())?)
}

fn reference() -> Result<HashMap<String, Tensor>> {
    load(&fixture("lora_diffusers/reference.safetensors"))
}

/// Whether every `lora_up` of one part (text encoder or UNet) is zero: that part changes nothing.
fn ups_all_zero(lora: &LoraNetwork, text_encoder: bool) -> Result<bool> {
    for m in lora.modules() {
        if m.is_text_encoder() == text_encoder && norm(m.up.as_tensor())? > 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every module of each file becomes an adapter of ours; checks.json says diffusers accepted the
/// file in silence, applied the same modules with the file's numbers, and was given this very
/// file.
#[test]
fn loads_every_module_diffusers_applied() -> Result<()> {
    let sd = model()?;
    let checks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("checks.json"))?)?;
    let c = &checks["diffusers_load_lora_weights"];
    ensure!(
        c.is_object(),
        "checks.json lacks `diffusers_load_lora_weights` (run check_diffusers_lora.py)"
    );
    assert_eq!(c["ok"], true, "the Python check failed");
    for case in CASES {
        let path = lora_file(case.file);
        let lora = LoraNetwork::load_file(&sd.sites(), &path, 1.0, &Device::Cpu)?;
        let te = lora
            .modules()
            .iter()
            .filter(|m| m.is_text_encoder())
            .count();
        let unet = lora.modules().len() - te;
        assert_eq!(
            unet, LORA_UNET_MODULES,
            "{}: UNet modules loaded",
            case.file
        );
        assert_eq!(
            te, LORA_TE_MODULES,
            "{}: text-encoder modules loaded",
            case.file
        );

        let names: BTreeSet<&str> = lora.modules().iter().map(|m| m.name.as_str()).collect();
        let in_file: BTreeSet<String> = load(&path)?
            .keys()
            .filter_map(|k| k.split_once('.').map(|(m, _)| m.to_string()))
            .collect();
        let in_file: BTreeSet<&str> = in_file.iter().map(String::as_str).collect();
        assert_eq!(
            names, in_file,
            "{}: modules loaded vs in the file",
            case.file
        );

        let f = &c["files"][case.file];
        assert_eq!(
            f["accepted"], true,
            "{}: diffusers refused: {}",
            case.file, f["error"]
        );
        assert_eq!(
            f["messages"],
            serde_json::json!([]),
            "{}: diffusers warned",
            case.file
        );
        let applied = &f["modules_applied"];
        assert_eq!(applied["all_applied"], true, "{}", case.file);
        assert_eq!(applied["unet_peft_layers"], LORA_UNET_MODULES);
        assert_eq!(applied["te_peft_layers"], LORA_TE_MODULES);
        assert_eq!(f["weights_match_file"]["ok"], true, "{}", case.file);
        assert_eq!(
            f["file"]["te_lora_up_all_zero"],
            ups_all_zero(&lora, true)?,
            "{}",
            case.file
        );

        let sha: String = Sha256::digest(std::fs::read(&path)?)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            f["lora_sha256"], sha,
            "{} changed since the reference was made: rerun check_diffusers_lora.py",
            case.file
        );
    }
    Ok(())
}

/// Without a LoRA, and with each file, our text encoder and UNet give diffusers' outputs; the
/// LoRA's effect (with − without) agrees to DELTA_REL_TOL in relative norm and is not negligible,
/// except for a part whose every lora_up is zero, which must change nothing on either side.
#[test]
fn outputs_and_lora_deltas_match_diffusers() -> Result<()> {
    let sd = model()?;
    let r = reference()?;
    let base = pass(&sd, &r)?;
    for (name, ours) in [("te_base", &base.te), ("unet_base", &base.unet)] {
        check_output(name, ours, get(&r, name)?)?;
    }
    // The UNet on diffusers' text-encoder output, as the LoRA'd passes below use it.
    check_output(
        "unet_base (diffusers' context)",
        &base.unet_fixed_context,
        get(&r, "unet_base")?,
    )?;

    let mut te_compared = false;
    for case in CASES {
        let lora = LoraNetwork::load_file(&sd.sites(), &lora_file(case.file), 1.0, &Device::Cpu)?;
        lora.apply();
        let with = pass(&sd, &r)?;
        lora.remove();
        let again = pass(&sd, &r)?;
        // remove() restores the base model bit for bit.
        assert_eq!(max_abs_diff(&again.te, &base.te)?, 0.0, "{}: te", case.file);
        assert_eq!(
            max_abs_diff(&again.unet, &base.unet)?,
            0.0,
            "{}: unet",
            case.file
        );

        let key = |k: &str| format!("{}{k}", case.prefix);
        for (name, ours) in [
            ("te_lora", &with.te),
            ("unet_lora", &with.unet),
            ("unet_lora_base_context", &with.unet_fixed_context),
        ] {
            check_output(
                &format!("{}: {name}", case.file),
                ours,
                get(&r, &key(name))?,
            )?;
        }

        let te_zero = ups_all_zero(&lora, true)?;
        let unet_zero = ups_all_zero(&lora, false)?;
        te_compared |= !te_zero;
        let deltas = [
            ("te", &with.te, &base.te, "te_lora", "te_base", te_zero),
            (
                "unet",
                &with.unet,
                &base.unet,
                "unet_lora",
                "unet_base",
                te_zero && unet_zero,
            ),
            (
                "unet (base context)",
                &with.unet_fixed_context,
                &base.unet_fixed_context,
                "unet_lora_base_context",
                "unet_base",
                unet_zero,
            ),
        ];
        for (name, ours_lora, ours_base, lora_key, base_key, zero) in deltas {
            let theirs_lora = get(&r, &key(lora_key))?;
            let theirs_base = get(&r, base_key)?;
            let what = format!("{}: {name} delta", case.file);
            if zero {
                // Every lora_up of this part is zero: nothing may change, on either side.
                assert_eq!(max_abs_diff(ours_lora, ours_base)?, 0.0, "{what} (ours)");
                assert_eq!(
                    max_abs_diff(theirs_lora, theirs_base)?,
                    0.0,
                    "{what} (diffusers)"
                );
                println!("{what}: zero on both sides (every lora_up of this part is zero)");
                continue;
            }
            let (rel, size) = delta_rel_err((ours_lora, ours_base), (theirs_lora, theirs_base))?;
            let base_size = norm(theirs_base)?;
            let max_delta = max_abs_diff(theirs_lora, theirs_base)?;
            println!(
                "{what}: relative error {rel:.3e}; ‖delta‖ {size:.4} = {:.1}% of ‖base‖ {base_size:.3}, \
                 max |delta| {max_delta:.4}",
                100.0 * size / base_size
            );
            assert!(rel < DELTA_REL_TOL, "{what}: relative error {rel}");
            assert!(
                size > 1e-2 * base_size,
                "{what}: the LoRA barely changes the output ({size} vs {base_size})"
            );
        }
    }
    assert!(
        te_compared,
        "no case has a text-encoder LoRA that does anything"
    );
    Ok(())
}

fn check_output(name: &str, ours: &Tensor, theirs: &Tensor) -> Result<()> {
    let err = max_abs_diff(ours, theirs)?;
    println!(
        "{name}: max abs diff {err:.3e} (|diffusers| max {:.3})",
        theirs.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?
    );
    ensure!(
        err <= OUTPUT_TOL,
        "{name}: max abs diff {err} > {OUTPUT_TOL}"
    );
    Ok(())
}
