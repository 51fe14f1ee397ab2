//! Opens a Stable Diffusion 1.x/2.x checkpoint in any supported layout — a diffusers folder, or
//! a single-file LDM checkpoint as `.safetensors` or PyTorch `.ckpt` — detects SD1 vs SD2 from
//! the tensors, and builds the UNet, text encoder, VAE, tokenizer and noise schedule.
//! Weights are memory-mapped and copied tensor by tensor, so loading never holds two copies.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::ckpt::CkptFile;
use crate::clip::{self, ClipTextConfig, ClipTextModel};
use crate::nn::{Builder, LoraSite};
use crate::schedule::{DdpmSchedule, Prediction};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{self, UNet2DConditionModel, UNetConfig};
use crate::vae::{self, AutoencoderKL, VaeConfig};
use crate::weights::{prefixed, KeyMap, SafetensorsStore, TensorStore, Weights};
use crate::{Error, Result};

impl TensorStore for CkptFile {
    fn origin(&self) -> String {
        self.path().display().to_string()
    }
    fn names(&self) -> Vec<String> {
        CkptFile::names(self)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        CkptFile::shape(self, name)
    }
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        CkptFile::load(self, name, device)
    }
}

/// How the checkpoint is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers folder (`unet/`, `text_encoder/`, `vae/`, `tokenizer/`, `scheduler/`).
    Diffusers,
    /// One LDM-layout `.safetensors` file.
    SingleSafetensors,
    /// One LDM-layout PyTorch zip checkpoint (`.ckpt`, `.pt`, `.bin`).
    SingleCkpt,
}

/// The model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L/14 text encoder, 1×1-conv transformer projections.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder, linear projections.
    Sd2,
}

impl Family {
    pub fn is_v2(self) -> bool {
        self == Family::Sd2
    }
}

/// What the loader should build and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Explicit configurations for single-file checkpoints whose architecture can't be fully
    /// read from tensor shapes (head counts of non-standard models), like diffusers'
    /// `from_single_file(config=...)`.
    pub unet_config: Option<UNetConfig>,
    pub text_config: Option<ClipTextConfig>,
    pub vae_config: Option<VaeConfig>,
    /// `v_parameterization`: the model predicts velocity (SD2 768-v). For diffusers folders the
    /// scheduler config decides when this is `None`.
    pub v_parameterization: Option<bool>,
    /// A separate VAE file (sd-scripts' `--vae`): LDM-layout or diffusers-layout safetensors.
    pub vae_path: Option<PathBuf>,
    /// Build the model from the weights' shapes only, every weight a broadcast zero that takes
    /// no memory: enough to count LoRA modules and parameters (`loractl plan`), useless for
    /// computing anything.
    pub shapes_only: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            unet_config: None,
            text_config: None,
            vae_config: None,
            v_parameterization: None,
            vae_path: None,
            shapes_only: false,
        }
    }
}

/// A loaded Stable Diffusion pipeline, ready for LoRA training.
pub struct StableDiffusion {
    pub family: Family,
    pub layout: Layout,
    pub unet: UNet2DConditionModel,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub tokenizer: ClipTokenizer,
    pub schedule: DdpmSchedule,
    /// Parameters of the three models, known when loaded with `shapes_only`.
    pub model_params: Option<u64>,
}

impl StableDiffusion {
    /// LoRA sites of the UNet and the text encoder (kohya's target candidates).
    pub fn sites(&self) -> Vec<LoraSite> {
        let mut s = self.unet.sites();
        s.extend(self.text_encoder.sites());
        s
    }
}

const PYTORCH_LEGACY_MAGIC: [u8; 10] = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20];

/// Opens a tensor file by its content (not its extension): safetensors or PyTorch zip.
pub fn open_store(path: &Path) -> Result<(Arc<dyn TensorStore>, Layout)> {
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = read_up_to(&mut f, &mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok((Arc::new(CkptFile::open(path)?), Layout::SingleCkpt));
    }
    if head.starts_with(&PYTORCH_LEGACY_MAGIC) {
        return Err(Error::bad_checkpoint(
            path,
            "legacy (pre-1.6) PyTorch pickle format is not supported: re-save it with a current \
             torch.save or convert it to .safetensors",
        ));
    }
    if n >= 9 && head[8] == b'{' {
        return Ok((
            Arc::new(SafetensorsStore::open(&[path.to_path_buf()])?),
            Layout::SingleSafetensors,
        ));
    }
    Err(Error::bad_checkpoint(
        path,
        "neither a .safetensors file nor a PyTorch zip checkpoint (.ckpt); is the download \
         complete?",
    ))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Loads a base model from a diffusers folder or a single-file checkpoint.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<StableDiffusion> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        load_diffusers(path, opts)
    } else {
        load_single_file(path, opts)
    }
}

fn read_json(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// The weight files of one diffusers component folder, safetensors preferred.
fn component_store(dir: &Path) -> Result<Arc<dyn TensorStore>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut st = Vec::new();
    let mut bins = Vec::new();
    for e in entries {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.ends_with(".safetensors") {
            st.push(p);
        } else if name.ends_with(".bin") {
            bins.push(p);
        }
    }
    st.sort();
    // Prefer the full-precision file when both `x.safetensors` and `x.fp16.safetensors` exist.
    let full: Vec<PathBuf> = st
        .iter()
        .filter(|p| !p.to_string_lossy().contains(".fp16."))
        .cloned()
        .collect();
    let chosen = if full.is_empty() { st } else { full };
    if !chosen.is_empty() {
        return Ok(Arc::new(SafetensorsStore::open(&chosen)?));
    }
    if let Some(b) = bins.first() {
        return Ok(Arc::new(CkptFile::open(b)?));
    }
    Err(Error::bad_checkpoint(
        dir,
        "no weights (*.safetensors or *.bin) in this diffusers component folder",
    ))
}

fn load_diffusers(dir: &Path, opts: &LoadOptions) -> Result<StableDiffusion> {
    for sub in ["unet", "text_encoder", "vae", "tokenizer"] {
        if !dir.join(sub).is_dir() {
            return Err(Error::bad_checkpoint(
                dir,
                format!(
                    "not a diffusers Stable Diffusion folder: `{sub}/` is missing (a single-file \
                     checkpoint must be given as the .safetensors/.ckpt file itself)"
                ),
            ));
        }
    }
    if dir.join("text_encoder_2").is_dir() {
        return Err(Error::bad_checkpoint(
            dir,
            "this is an SDXL pipeline (text_encoder_2/); only SD1.x and SD2.x are supported",
        ));
    }
    let origin = |p: &Path| p.display().to_string();
    let unet_cfg = match &opts.unet_config {
        Some(c) => c.clone(),
        None => {
            let p = dir.join("unet/config.json");
            UNetConfig::from_json(&read_json(&p)?, &origin(&p))?
        }
    };
    let text_cfg = match &opts.text_config {
        Some(c) => c.clone(),
        None => ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?,
    };
    let vae_cfg = match &opts.vae_config {
        Some(c) => c.clone(),
        None => VaeConfig::from_json(&read_json(&dir.join("vae/config.json"))?)?,
    };
    let family = if text_cfg.hidden_act == clip::Activation::Gelu || unet_cfg.use_linear_projection
    {
        Family::Sd2
    } else {
        Family::Sd1
    };
    let unet_store = component_store(&dir.join("unet"))?;
    let te_store = component_store(&dir.join("text_encoder"))?;
    let te_map = clip::detect_layout(te_store.as_ref());
    let vae_weights = match &opts.vae_path {
        Some(p) => external_vae(p, &vae_cfg)?,
        None => Weights::new(component_store(&dir.join("vae"))?, prefixed("")),
    };
    let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
    let sched_path = dir.join("scheduler/scheduler_config.json");
    let mut schedule = if sched_path.is_file() {
        DdpmSchedule::from_scheduler_config(&read_json(&sched_path)?)?
    } else {
        DdpmSchedule::sd()?
    };
    if let Some(v) = opts.v_parameterization {
        schedule = schedule.with_prediction(prediction(v));
    }
    build(
        family,
        Layout::Diffusers,
        Parts {
            unet: (unet_cfg, Weights::new(unet_store, prefixed(""))),
            text: (text_cfg, Weights::new(te_store, te_map)),
            vae: (vae_cfg, vae_weights),
        },
        tokenizer,
        schedule,
        opts,
    )
}

fn prediction(v: bool) -> Prediction {
    if v {
        Prediction::V
    } else {
        Prediction::Epsilon
    }
}

/// Refuses files that are clearly not an SD1/SD2 base checkpoint, with the reason.
fn check_single_file(store: &dyn TensorStore) -> Result<()> {
    let names = store.names();
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    let bad = |msg: &str| Err(Error::bad_checkpoint(store.origin(), msg.to_string()));
    if any("lora_unet_") || any("lora_te_") {
        return bad(
            "this is a LoRA file, not a base model: use it as `network_weights` and give the \
             checkpoint it was trained on as the model",
        );
    }
    if any("conditioner.embedders.") {
        return bad("this is an SDXL checkpoint; only SD1.x and SD2.x are supported");
    }
    if any("model.diffusion_model.joint_blocks.") || any("double_blocks.") {
        return bad("this is an SD3/Flux checkpoint; only SD1.x and SD2.x are supported");
    }
    if !any("model.diffusion_model.") {
        if vae::ldm_vae_prefix(store).is_some() {
            return bad("this file holds only a VAE: pass it as `vae`, not as the base model");
        }
        return bad(
            "no Stable Diffusion UNet in this file (expected `model.diffusion_model.*` tensors)",
        );
    }
    if !any("cond_stage_model.") {
        return bad("no text encoder in this file (expected `cond_stage_model.*` tensors)");
    }
    if vae::ldm_vae_prefix(store).is_none() {
        return bad(
            "no VAE in this file (expected `first_stage_model.*` tensors); pass a separate `vae`",
        );
    }
    Ok(())
}

fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<StableDiffusion> {
    let (store, layout) = open_store(path)?;
    check_single_file(store.as_ref())?;
    let (inferred_text, is_sd2) = clip::infer_ldm_config(store.as_ref())?;
    let family = if is_sd2 { Family::Sd2 } else { Family::Sd1 };
    let unet_cfg = match &opts.unet_config {
        Some(c) => c.clone(),
        None => unet::infer_ldm_config(store.as_ref())?,
    };
    let text_cfg = opts.text_config.clone().unwrap_or(inferred_text);
    let vae_cfg = match &opts.vae_config {
        Some(c) => c.clone(),
        None => vae::infer_ldm_config(store.as_ref())?,
    };
    let te_map: KeyMap = clip::detect_layout(store.as_ref());
    let vae_weights = match &opts.vae_path {
        Some(p) => external_vae(p, &vae_cfg)?,
        None => Weights::new(store.clone(), vae::ldm_key_map(&vae_cfg)),
    };
    let tokenizer = if is_sd2 {
        ClipTokenizer::bundled_sd2()?
    } else {
        ClipTokenizer::bundled_sd1()?
    };
    let schedule =
        DdpmSchedule::sd()?.with_prediction(prediction(opts.v_parameterization.unwrap_or(false)));
    build(
        family,
        layout,
        Parts {
            unet: (
                unet_cfg.clone(),
                Weights::new(store.clone(), unet::ldm_key_map(&unet_cfg)),
            ),
            text: (text_cfg, Weights::new(store, te_map)),
            vae: (vae_cfg, vae_weights),
        },
        tokenizer,
        schedule,
        opts,
    )
}

/// A standalone VAE file in either the LDM layout (with or without `first_stage_model.`) or
/// the diffusers layout.
fn external_vae(path: &Path, cfg: &VaeConfig) -> Result<Weights> {
    let (store, _) = open_store(path)?;
    if store.contains("encoder.conv_in.weight") && store.contains("decoder.conv_in.weight") {
        if let Some(prefix) = vae::ldm_vae_prefix(store.as_ref()) {
            return Ok(Weights::new(
                store.clone(),
                vae::ldm_key_map_with_prefix(cfg, prefix),
            ));
        }
        return Ok(Weights::new(store, prefixed("")));
    }
    match vae::ldm_vae_prefix(store.as_ref()) {
        Some(prefix) => Ok(Weights::new(
            store.clone(),
            vae::ldm_key_map_with_prefix(cfg, prefix),
        )),
        None => Err(Error::bad_checkpoint(
            path,
            "not a VAE: no `encoder.conv_in.weight` (diffusers) or `encoder.down.0.*` (LDM) tensors",
        )),
    }
}

struct Parts {
    unet: (UNetConfig, Weights),
    text: (ClipTextConfig, Weights),
    vae: (VaeConfig, Weights),
}

fn build(
    family: Family,
    layout: Layout,
    parts: Parts,
    tokenizer: ClipTokenizer,
    schedule: DdpmSchedule,
    opts: &LoadOptions,
) -> Result<StableDiffusion> {
    let (dtype, dev) = (opts.dtype, &opts.device);
    let (unet_cfg, mut unet_w) = parts.unet;
    let (text_cfg, mut text_w) = parts.text;
    let (vae_cfg, mut vae_w) = parts.vae;
    if opts.shapes_only {
        unet_w = unet_w.shapes_only();
        text_w = text_w.shapes_only();
        vae_w = vae_w.shapes_only();
    }
    if unet_cfg.cross_attention_dim != text_cfg.hidden_size {
        return Err(Error::Config(format!(
            "the UNet attends to {}-dim text features but the text encoder makes {}-dim ones: \
             the components come from different models",
            unet_cfg.cross_attention_dim, text_cfg.hidden_size
        )));
    }
    let unet = UNet2DConditionModel::new(
        &unet_cfg,
        &Builder::new(unet_w.var_builder(dtype, dev), "lora_unet"),
    )?;
    let text_encoder = ClipTextModel::new(
        &text_cfg,
        &Builder::new(text_w.var_builder(dtype, dev), "lora_te"),
    )?;
    let vae = AutoencoderKL::new(
        &vae_cfg,
        &Builder::new(vae_w.var_builder(dtype, dev), "vae"),
    )?;
    let model_params = [&unet_w, &text_w, &vae_w]
        .iter()
        .map(|w| w.served_elements())
        .sum::<Option<u64>>();
    Ok(StableDiffusion {
        family,
        layout,
        unet,
        text_encoder,
        vae,
        tokenizer,
        schedule,
        model_params,
    })
}
