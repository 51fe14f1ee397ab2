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

/// Our outputs against diffusers', element-wise.
const OUTPUT_TOL: f32 = 1e-5;
/// ‖ours − theirs‖ / ‖theirs‖ for the LoRA's effect (output with LoRA minus output without).
const DELTA_REL_TOL: f64 = 1e-3;

const LORA_UNET_MODULES: usize = 48;
const LORA_TE_MODULES: usize = 18;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn lora_path() -> PathBuf {
    fixtures().join("lora_diffusers/loractl_tiny.safetensors")
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
        format!(
            "loading {} (regenerate with scripts/fixtures/check_diffusers_lora.py)",
            path.display()
        )
    })
}

fn get<'a>(t: &'a HashMap<String, Tensor>, k: &str) -> Result<&'a Tensor> {
    t.get(k).with_context(|| format!("reference lacks `{k}`"))
}

fn f64s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn norm(t: &Tensor) -> Result<f64> {
    Ok(f64s(t)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?)
}

/// ‖(ours_lora − ours_base) − (theirs_lora − theirs_base)‖ / ‖theirs_lora − theirs_base‖, and
/// ‖theirs_lora − theirs_base‖; computed in f64.
fn delta_rel_err(
    ours: (&Tensor, &Tensor),
    theirs: (&Tensor, &Tensor),
) -> Result<(f64, f64)> {
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

struct Setup {
    sd: StableDiffusion,
    lora: LoraNetwork,
    r: HashMap<String, Tensor>,
}

fn setup() -> Result<Setup> {
    let sd = loader::load(&fixtures().join("sd1/diffusers"), &LoadOptions::default())?;
    let lora = LoraNetwork::load_file(&sd.sites(), &lora_path(), 1.0, &Device::Cpu)?;
    let r = load(&fixtures().join("lora_diffusers/reference.safetensors"))?;
    Ok(Setup { sd, lora, r })
}

/// Every module of the file becomes an adapter of ours; the file holds the modules diffusers
/// reported applying (checks.json), and the reference was computed from this very file.
#[test]
fn loads_every_module_diffusers_applied() -> Result<()> {
    let Setup { lora, .. } = setup()?;
    let te = lora.modules().iter().filter(|m| m.is_text_encoder()).count();
    let unet = lora.modules().len() - te;
    assert_eq!(unet, LORA_UNET_MODULES, "UNet modules loaded");
    assert_eq!(te, LORA_TE_MODULES, "text-encoder modules loaded");

    let checks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("checks.json"))?)?;
    let c = &checks["diffusers_load_lora_weights"];
    ensure!(
        c.is_object(),
        "checks.json lacks `diffusers_load_lora_weights` (run check_diffusers_lora.py)"
    );
    assert_eq!(c["accepted"], true, "diffusers refused the file: {}", c["error"]);
    assert_eq!(c["ok"], true, "the Python check failed");
    assert_eq!(c["modules_applied"]["all_applied"], true);
    assert_eq!(c["modules_applied"]["unet_peft_layers"], LORA_UNET_MODULES);
    assert_eq!(c["modules_applied"]["te_peft_layers"], LORA_TE_MODULES);

    let bytes = std::fs::read(lora_path())?;
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        c["lora_sha256"], sha,
        "the LoRA file changed since the reference was made: rerun check_diffusers_lora.py"
    );

    let names: BTreeSet<&str> = lora.modules().iter().map(|m| m.name.as_str()).collect();
    let in_file: BTreeSet<String> = load(&lora_path())?
        .keys()
        .filter_map(|k| k.split_once('.').map(|(m, _)| m.to_string()))
        .collect();
    let in_file: BTreeSet<&str> = in_file.iter().map(String::as_str).collect();
    assert_eq!(names, in_file, "modules loaded vs modules in the file");
    Ok(())
}

/// Without the LoRA, and with it, our text encoder and UNet give diffusers' outputs; the LoRA's
/// effect (with − without) agrees to DELTA_REL_TOL in relative norm, and is not negligible.
#[test]
fn outputs_and_lora_deltas_match_diffusers() -> Result<()> {
    let Setup { sd, lora, r } = setup()?;

    let base = pass(&sd, &r)?;
    lora.apply();
    let with = pass(&sd, &r)?;
    lora.remove();
    let again = pass(&sd, &r)?;

    let pairs = [
        ("te_base", &base.te),
        ("unet_base", &base.unet),
        ("te_lora", &with.te),
        ("unet_lora", &with.unet),
        ("unet_lora_base_context", &with.unet_fixed_context),
    ];
    for (name, ours) in pairs {
        let want = get(&r, name)?;
        let err = max_abs_diff(ours, want)?;
        println!(
            "{name}: max abs diff {err:.3e} (|ref| max {:.3})",
            want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?
        );
        assert!(err <= OUTPUT_TOL, "{name}: max abs diff {err} > {OUTPUT_TOL}");
    }
    // UNet without LoRA on diffusers' context equals the base pass's input to it up to TE error;
    // check it against the reference too.
    let err = max_abs_diff(&base.unet_fixed_context, get(&r, "unet_base")?)?;
    assert!(err <= OUTPUT_TOL, "unet_base on diffusers' context: {err}");

    let deltas = [
        ("te", (&with.te, &base.te), ("te_lora", "te_base")),
        ("unet", (&with.unet, &base.unet), ("unet_lora", "unet_base")),
        (
            "unet (LoRA'd UNet, base context)",
            (&with.unet_fixed_context, &base.unet_fixed_context),
            ("unet_lora_base_context", "unet_base"),
        ),
    ];
    for (name, ours, (lora_key, base_key)) in deltas {
        let theirs = (get(&r, lora_key)?, get(&r, base_key)?);
        let (rel, size) = delta_rel_err(ours, theirs)?;
        let base_size = norm(theirs.1)?;
        println!(
            "{name} delta: relative error {rel:.3e}, ‖delta‖ {size:.4e} ({:.2}% of ‖base‖ {base_size:.3})",
            100.0 * size / base_size
        );
        assert!(rel < DELTA_REL_TOL, "{name}: delta relative error {rel}");
        assert!(
            size > 1e-3 * base_size,
            "{name}: the LoRA barely changes the output ({size} vs {base_size}), nothing is tested"
        );
    }

    // remove() restores the base model bit for bit.
    for (name, a, b) in [
        ("te", &again.te, &base.te),
        ("unet", &again.unet, &base.unet),
    ] {
        assert_eq!(max_abs_diff(a, b)?, 0.0, "{name} after remove()");
    }
    Ok(())
}
