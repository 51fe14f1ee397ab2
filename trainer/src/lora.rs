//! kohya-style LoRA networks: which layers are targeted, initialisation, the trainable
//! variables, and reading/writing the `.safetensors` file A1111, ComfyUI and diffusers load.
//!
//! Names follow sd-scripts' `networks/lora.py`: `lora_unet_<module path>` / `lora_te_<module
//! path>` with `.` replaced by `_`; tensors `NAME.lora_down.weight`, `NAME.lora_up.weight`,
//! `NAME.alpha`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::nn::{Adapter, AdapterSlot, LoraSite, Scope, SiteKind};
use crate::{Error, Result};

/// Shape of a LoRA network (sd-scripts' `network_dim`, `network_alpha`, `conv_dim`,
/// `conv_alpha`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Rank for 3×3 convs in ResNet / down- / up-sample blocks; `None` leaves them untouched.
    pub conv_rank: Option<usize>,
    pub conv_alpha: Option<f64>,
    pub multiplier: f64,
    pub train_unet: bool,
    pub train_text_encoder: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 1.0,
            conv_rank: None,
            conv_alpha: None,
            multiplier: 1.0,
            train_unet: true,
            train_text_encoder: true,
        }
    }
}

impl LoraConfig {
    /// The (rank, alpha) this config gives a site, or `None` if the site is not targeted.
    pub fn target(&self, site: &LoraSite) -> Option<(usize, f64)> {
        let is_te = site.name.starts_with("lora_te");
        if (is_te && !self.train_text_encoder) || (!is_te && !self.train_unet) {
            return None;
        }
        match site.scope {
            Scope::Transformer | Scope::TextEncoder => Some((self.rank, self.alpha)),
            Scope::ResnetConv => {
                let conv_rank = self.conv_rank.filter(|r| *r > 0)?;
                if site.kind.is_linear_like() {
                    Some((self.rank, self.alpha))
                } else {
                    Some((conv_rank, self.conv_alpha.unwrap_or(1.0)))
                }
            }
        }
    }
}

/// One trainable LoRA module.
#[derive(Debug)]
pub struct LoraModule {
    pub name: String,
    pub kind: SiteKind,
    pub rank: usize,
    pub alpha: f64,
    pub down: Var,
    pub up: Var,
    slot: AdapterSlot,
}

impl LoraModule {
    pub fn down_shape(kind: &SiteKind, rank: usize) -> Vec<usize> {
        match *kind {
            SiteKind::Linear { in_features, .. } => vec![rank, in_features],
            SiteKind::Conv2d {
                in_channels,
                kernel,
                ..
            } => vec![rank, in_channels, kernel, kernel],
        }
    }
    pub fn up_shape(kind: &SiteKind, rank: usize) -> Vec<usize> {
        match *kind {
            SiteKind::Linear { out_features, .. } => vec![out_features, rank],
            SiteKind::Conv2d { out_channels, .. } => vec![out_channels, rank, 1, 1],
        }
    }
    pub fn is_text_encoder(&self) -> bool {
        self.name.starts_with("lora_te")
    }
    pub fn param_count(&self) -> usize {
        self.down.elem_count() + self.up.elem_count()
    }
}

/// A set of LoRA modules attached to a model's sites.
#[derive(Debug)]
pub struct LoraNetwork {
    modules: Vec<LoraModule>,
    multiplier: f64,
}

impl LoraNetwork {
    /// A fresh network: `down` kaiming-uniform (a = √5), `up` zero, as sd-scripts.
    pub fn new(sites: &[LoraSite], cfg: &LoraConfig, device: &Device, seed: u64) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut modules = Vec::new();
        for site in sites {
            let Some((rank, alpha)) = cfg.target(site) else {
                continue;
            };
            let ds = LoraModule::down_shape(&site.kind, rank);
            let fan_in: usize = ds[1..].iter().product();
            // kaiming_uniform(a=√5): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in).
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = ds.iter().product();
            let vals: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let down = Tensor::from_vec(vals, ds, device)?;
            let up = Tensor::zeros(LoraModule::up_shape(&site.kind, rank), DType::F32, device)?;
            modules.push(LoraModule {
                name: site.name.clone(),
                kind: site.kind,
                rank,
                alpha,
                down: Var::from_tensor(&down)?,
                up: Var::from_tensor(&up)?,
                slot: site.slot.clone(),
            });
        }
        if modules.is_empty() {
            return Err(Error::Lora(
                "the configuration targets no module: enable the UNet or the text encoder".into(),
            ));
        }
        Ok(Self {
            modules,
            multiplier: cfg.multiplier,
        })
    }

    /// A network from kohya-format tensors (a LoRA file). Every module in the file must match a
    /// site of the model; a missing `.alpha` means alpha = rank, as sd-scripts reads it.
    pub fn from_tensors(
        sites: &[LoraSite],
        tensors: &HashMap<String, Tensor>,
        multiplier: f64,
        device: &Device,
        origin: &str,
    ) -> Result<Self> {
        let by_name: HashMap<&str, &LoraSite> =
            sites.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut names: BTreeMap<String, ()> = BTreeMap::new();
        for key in tensors.keys() {
            let Some((module, _)) = key.split_once('.') else {
                return Err(Error::Lora(format!("{origin}: unexpected tensor `{key}`")));
            };
            names.insert(module.to_string(), ());
        }
        let mut unknown = Vec::new();
        let mut modules = Vec::new();
        for name in names.keys() {
            let Some(site) = by_name.get(name.as_str()) else {
                unknown.push(name.clone());
                continue;
            };
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                tensors
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| Error::Lora(format!("{origin}: `{key}` is missing")))
            };
            let down = get("lora_down.weight")?.to_dtype(DType::F32)?;
            let up = get("lora_up.weight")?.to_dtype(DType::F32)?;
            let rank = down.dim(0)?;
            let check = |t: &Tensor, want: Vec<usize>, what: &str| -> Result<()> {
                if t.dims() != want.as_slice() {
                    return Err(Error::Lora(format!(
                        "{origin}: `{name}.{what}` has shape {:?}, the model needs {want:?} \
                         (a LoRA for a different base model?)",
                        t.dims()
                    )));
                }
                Ok(())
            };
            // 1×1 convs and Linears hold the same numbers: files made for SD1 (conv proj_in)
            // and SD2 (linear proj_in) differ only in the trailing 1×1 dims.
            let fit = |t: Tensor, want: Vec<usize>| -> Result<Tensor> {
                if t.dims() != want.as_slice()
                    && linear_form(t.dims()).is_some()
                    && linear_form(t.dims()) == linear_form(&want)
                {
                    Ok(t.reshape(want)?)
                } else {
                    Ok(t)
                }
            };
            let down = fit(down, LoraModule::down_shape(&site.kind, rank))?;
            let up = fit(up, LoraModule::up_shape(&site.kind, rank))?;
            check(
                &down,
                LoraModule::down_shape(&site.kind, rank),
                "lora_down.weight",
            )?;
            check(
                &up,
                LoraModule::up_shape(&site.kind, rank),
                "lora_up.weight",
            )?;
            let alpha = match tensors.get(&format!("{name}.alpha")) {
                Some(a) => a
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .ok_or_else(|| Error::Lora(format!("{origin}: `{name}.alpha` is empty")))?,
                None => rank as f64,
            };
            modules.push(LoraModule {
                name: name.clone(),
                kind: site.kind,
                rank,
                alpha,
                down: Var::from_tensor(&down.to_device(device)?)?,
                up: Var::from_tensor(&up.to_device(device)?)?,
                slot: site.slot.clone(),
            });
        }
        if !unknown.is_empty() {
            let shown: Vec<&String> = unknown.iter().take(5).collect();
            return Err(Error::Lora(format!(
                "{origin}: {} module(s) do not exist in this model, e.g. {shown:?}; the LoRA was \
                 made for another base model (SD1 vs SD2?)",
                unknown.len()
            )));
        }
        Ok(Self {
            modules,
            multiplier,
        })
    }

    /// Loads a kohya LoRA `.safetensors` file for the model whose sites are given.
    pub fn load_file(
        sites: &[LoraSite],
        path: &Path,
        multiplier: f64,
        device: &Device,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::bad_checkpoint(path, format!("not a readable LoRA safetensors file: {e}"))
        })?;
        Self::from_tensors(
            sites,
            &tensors,
            multiplier,
            device,
            &path.display().to_string(),
        )
    }

    /// Sets every module's weights from kohya-format `tensors` (sd-scripts' `network_weights`,
    /// or a saved training state): every module of this network must be there with the same
    /// shapes, and no other; a `.alpha` present in the file replaces the configured one (call
    /// before [`LoraNetwork::apply`]).
    pub fn load_values(&mut self, tensors: &HashMap<String, Tensor>, origin: &str) -> Result<()> {
        let mut unused: BTreeMap<&str, ()> = tensors.keys().map(|k| (k.as_str(), ())).collect();
        let mut missing = Vec::new();
        for m in &mut self.modules {
            for (suffix, var) in [("lora_down.weight", &m.down), ("lora_up.weight", &m.up)] {
                let key = format!("{}.{suffix}", m.name);
                let Some(t) = tensors.get(&key) else {
                    missing.push(key);
                    continue;
                };
                unused.remove(key.as_str());
                let want = var.as_tensor().dims().to_vec();
                let t = t.to_dtype(DType::F32)?;
                let t = if t.dims() != want.as_slice()
                    && linear_form(t.dims()).is_some()
                    && linear_form(t.dims()) == linear_form(&want)
                {
                    t.reshape(want.as_slice())?
                } else {
                    t
                };
                if t.dims() != want.as_slice() {
                    return Err(Error::Lora(format!(
                        "{origin}: `{key}` has shape {:?}, this network needs {want:?} \
                         (another network_dim, conv_dim or base model?)",
                        t.dims()
                    )));
                }
                var.set(&t.to_device(var.as_tensor().device())?)?;
            }
            let alpha_key = format!("{}.alpha", m.name);
            if let Some(a) = tensors.get(&alpha_key) {
                unused.remove(alpha_key.as_str());
                if let Some(v) = a
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                {
                    m.alpha = *v;
                }
            }
        }
        if !missing.is_empty() {
            let shown: Vec<&String> = missing.iter().take(3).collect();
            return Err(Error::Lora(format!(
                "{origin}: {} tensor(s) of this network are missing, e.g. {shown:?} (a LoRA for \
                 other targets: conv_dim, text encoder or UNet only?)",
                missing.len()
            )));
        }
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.keys().take(3).copied().collect();
            return Err(Error::Lora(format!(
                "{origin}: {} tensor(s) match no module of this network, e.g. {shown:?}",
                unused.len()
            )));
        }
        Ok(())
    }

    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// Installs the adapters into the model's layers (replacing what was there).
    pub fn apply(&self) {
        for m in &self.modules {
            let adapter = Adapter {
                down: m.down.as_tensor().clone(),
                up: m.up.as_tensor().clone(),
                scale: m.alpha / m.rank as f64 * self.multiplier,
            };
            let mut g = match m.slot.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            g.clear();
            g.push(adapter);
        }
    }

    /// Removes every adapter from the layers this network targets.
    pub fn remove(&self) {
        for m in &self.modules {
            match m.slot.write() {
                Ok(mut g) => g.clear(),
                Err(p) => p.into_inner().clear(),
            }
        }
    }

    /// All trainable variables (down then up, module by module).
    pub fn vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| [m.down.clone(), m.up.clone()])
            .collect()
    }

    pub fn param_count(&self) -> usize {
        self.modules.iter().map(|m| m.param_count()).sum()
    }

    /// kohya-format tensors in `dtype`.
    pub fn to_tensors(&self, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for m in &self.modules {
            let n = &m.name;
            out.insert(
                format!("{n}.lora_down.weight"),
                m.down
                    .as_tensor()
                    .to_device(&Device::Cpu)?
                    .to_dtype(dtype)?,
            );
            out.insert(
                format!("{n}.lora_up.weight"),
                m.up.as_tensor().to_device(&Device::Cpu)?.to_dtype(dtype)?,
            );
            out.insert(
                format!("{n}.alpha"),
                Tensor::new(m.alpha as f32, &Device::Cpu)?.to_dtype(dtype)?,
            );
        }
        Ok(out)
    }

    /// Writes the network as a kohya LoRA file, atomically (temporary file, then rename).
    /// Refuses to write non-finite weights.
    pub fn save(&self, path: &Path, dtype: DType, metadata: HashMap<String, String>) -> Result<()> {
        let tensors = self.to_tensors(dtype)?;
        for (k, t) in &tensors {
            let finite = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            if !finite {
                let why = if dtype == DType::F16 {
                    " (or values beyond fp16's ±65504: the run has likely diverged; lower the \
                     learning rate, or save with save_precision = \"bf16\" or \"float\")"
                } else {
                    ""
                };
                return Err(Error::Lora(format!(
                    "refusing to write {}: `{k}` holds NaN or infinite values{why}",
                    path.display()
                )));
            }
        }
        write_safetensors_atomic(path, &tensors, metadata)
    }
}

/// A safetensors file as bytes, laid out deterministically: tensors in name order, metadata
/// keys sorted, so the same tensors and metadata always give the same bytes (the safetensors
/// crate writes metadata in hash-map order, which differs from one process to the next).
pub fn serialize_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
        let meta: serde_json::Map<String, serde_json::Value> = sorted
            .into_iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut data = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let start = data.len();
        let dtype = match t.dtype() {
            DType::F32 => {
                data.extend(t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()));
                "F32"
            }
            DType::F16 => {
                data.extend(
                    t.to_vec1::<half::f16>()?
                        .iter()
                        .flat_map(|v| v.to_le_bytes()),
                );
                "F16"
            }
            DType::BF16 => {
                data.extend(
                    t.to_vec1::<half::bf16>()?
                        .iter()
                        .flat_map(|v| v.to_le_bytes()),
                );
                "BF16"
            }
            DType::F64 => {
                data.extend(t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()));
                "F64"
            }
            DType::U8 => {
                data.extend(t.to_vec1::<u8>()?);
                "U8"
            }
            DType::U32 => {
                data.extend(t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()));
                "U32"
            }
            DType::I64 => {
                data.extend(t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()));
                "I64"
            }
            other => {
                return Err(Error::Lora(format!(
                    "tensor `{name}` has dtype {other:?}, which loractl does not write"
                )))
            }
        };
        let shape: Vec<serde_json::Value> = tensors[name]
            .dims()
            .iter()
            .map(|&d| serde_json::Value::from(d as u64))
            .collect();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [start as u64, data.len() as u64],
            }),
        );
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend((head.len() as u64).to_le_bytes());
    out.extend(head);
    out.extend(data);
    Ok(out)
}

/// Writes `bytes` to `path` via a synced temporary file in the same directory and a rename, so
/// a crash leaves either the old file or the new one, never half of one.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "lora.safetensors".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Writes tensors with metadata to `path` atomically (see [`write_file_atomic`]), laid out as
/// [`serialize_safetensors`] does.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_file_atomic(path, &serialize_safetensors(tensors, &metadata)?)
}

/// Tensor name prefixes of base models (LDM single files, SDXL, diffusers components).
const BASE_MODEL_PREFIXES: [&str; 8] = [
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.",
    "conv_in.",
    "down_blocks.",
    "encoder.down.",
    "text_model.",
];

/// Whether `name` is a kohya LoRA tensor: `lora_…` module, then `lora_down.weight`,
/// `lora_up.weight` or `alpha`.
fn is_lora_tensor(name: &str) -> bool {
    name.split_once('.').is_some_and(|(module, what)| {
        module.starts_with("lora_")
            && matches!(what, "lora_down.weight" | "lora_up.weight" | "alpha")
    })
}

/// Opens sd-scripts' `network_weights` by its content (a `.safetensors` file, or a `.ckpt`/
/// `.pt` as kohya's `torch.load` reads) and checks from its index alone that it is a kohya
/// LoRA: a base model, a diffusers folder or another kind of adapter is refused with what it
/// is and what to do, before any tensor is read.
pub fn open_network_weights(
    path: &Path,
) -> Result<std::sync::Arc<dyn crate::weights::TensorStore>> {
    let what = |msg: String| {
        Error::Config(format!(
            "network.network_weights `{}` {msg}",
            path.display()
        ))
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(what(
            "is a folder (a diffusers model?); network_weights takes a LoRA file made by \
             kohya's sd-scripts or loractl, and a base model goes in \
             model.pretrained_model_name_or_path"
                .into(),
        ));
    }
    let (store, _) = crate::loader::open_store(path).map_err(|e| match e {
        Error::BadCheckpoint { msg, .. } => what(format!("is not a readable LoRA file: {msg}")),
        other => other,
    })?;
    let names = store.names();
    if names.is_empty() {
        return Err(what("holds no tensors: it is not a LoRA file".into()));
    }
    if let Some(other) = names.iter().find(|n| !is_lora_tensor(n)) {
        let base = names
            .iter()
            .find(|n| BASE_MODEL_PREFIXES.iter().any(|p| n.starts_with(p)));
        return Err(match base {
            Some(b) => what(format!(
                "is a base model checkpoint (it holds `{b}`), not a LoRA: set it as \
                 model.pretrained_model_name_or_path, and give network_weights a LoRA file"
            )),
            None => what(format!(
                "is not a kohya LoRA: tensor `{other}` is not a `lora_unet_*`/`lora_te_*` \
                 module's `lora_down.weight`, `lora_up.weight` or `alpha` (LyCORIS and \
                 diffusers-format adapters are not supported)"
            )),
        });
    }
    Ok(store)
}

/// `[a, b]` of a Linear weight or of a 1×1 conv `[a, b, 1, 1]`, which hold the same numbers.
fn linear_form(shape: &[usize]) -> Option<(usize, usize)> {
    match *shape {
        [a, b] | [a, b, 1, 1] => Some((a, b)),
        _ => None,
    }
}

/// Checks `network_weights` (opened by [`open_network_weights`]) against the network `cfg`
/// makes on `sites`, from names and shapes alone: every module there with its shapes (a 1×1
/// conv and a Linear of the same numbers are interchangeable), nothing else, alphas scalar.
pub fn check_network_weights(
    store: &dyn crate::weights::TensorStore,
    sites: &[LoraSite],
    cfg: &LoraConfig,
) -> Result<()> {
    let origin = store.origin();
    let bad = |msg: String| Error::Config(format!("network.network_weights `{origin}`: {msg}"));
    let mut unused: BTreeMap<String, ()> = store.names().into_iter().map(|n| (n, ())).collect();
    let mut missing = Vec::new();
    for site in sites {
        let Some((rank, _)) = cfg.target(site) else {
            continue;
        };
        for (suffix, want) in [
            ("lora_down.weight", LoraModule::down_shape(&site.kind, rank)),
            ("lora_up.weight", LoraModule::up_shape(&site.kind, rank)),
        ] {
            let key = format!("{}.{suffix}", site.name);
            let Some(got) = store.shape(&key) else {
                missing.push(key);
                continue;
            };
            unused.remove(&key);
            if got != want
                && (linear_form(&got).is_none() || linear_form(&got) != linear_form(&want))
            {
                return Err(bad(format!(
                    "`{key}` has shape {got:?}, this network needs {want:?}: set \
                     network.network_dim (and conv_dim) to the file's rank, or use a LoRA made \
                     for this base model"
                )));
            }
        }
        let alpha = format!("{}.alpha", site.name);
        if let Some(shape) = store.shape(&alpha) {
            unused.remove(&alpha);
            if shape.iter().product::<usize>() != 1 {
                return Err(bad(format!(
                    "`{alpha}` has shape {shape:?}; an alpha is one number"
                )));
            }
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&String> = missing.iter().take(3).collect();
        return Err(bad(format!(
            "{} tensor(s) of this network are missing, e.g. {shown:?}: the LoRA was made for \
             other targets (conv_dim, text encoder or UNet only?) or another base model",
            missing.len()
        )));
    }
    if !unused.is_empty() {
        let shown: Vec<&String> = unused.keys().take(3).collect();
        return Err(bad(format!(
            "{} tensor(s) match no module of this network, e.g. {shown:?}: the LoRA was made \
             for another base model (SD1 vs SD2?) or other targets",
            unused.len()
        )));
    }
    Ok(())
}

/// Every tensor of `network_weights` (opened by [`open_network_weights`]) on `device`.
pub fn read_network_weights(
    store: &dyn crate::weights::TensorStore,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    store
        .names()
        .into_iter()
        .map(|n| {
            let t = store.load(&n, device)?;
            Ok((n, t))
        })
        .collect()
}

#[cfg(test)]
mod serialize_tests {
    use super::*;

    #[test]
    fn safetensors_layout_is_deterministic_and_readable() -> Result<()> {
        let dev = Device::Cpu;
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "b.f16".to_string(),
            Tensor::new(&[1.5f32, -2.0], &dev)?.to_dtype(DType::F16)?,
        );
        tensors.insert("a.u8".to_string(), Tensor::new(&[7u8, 9, 11], &dev)?);
        tensors.insert("c.f32".to_string(), Tensor::new(3.25f32, &dev)?);
        let mut meta = HashMap::new();
        for i in 0..20 {
            meta.insert(format!("k{i}"), format!("v{i}"));
        }
        let one = serialize_safetensors(&tensors, &meta)?;
        // A map with the same entries inserted in another order gives the same bytes.
        let mut pairs: Vec<(String, String)> = meta.clone().into_iter().collect();
        pairs.sort();
        pairs.reverse();
        let reversed: HashMap<String, String> = pairs.into_iter().collect();
        assert_eq!(one, serialize_safetensors(&tensors, &reversed)?);
        let st =
            safetensors::SafeTensors::deserialize(&one).map_err(|e| Error::Lora(e.to_string()))?;
        assert_eq!(
            st.tensor("a.u8")
                .map_err(|e| Error::Lora(e.to_string()))?
                .data(),
            &[7, 9, 11]
        );
        let back = candle_core::safetensors::load_buffer(&one, &dev)?;
        assert_eq!(
            back["b.f16"].to_dtype(DType::F32)?.to_vec1::<f32>()?,
            [1.5, -2.0]
        );
        assert_eq!(back["c.f32"].to_scalar::<f32>()?, 3.25);
        let (_, header) = safetensors::SafeTensors::read_metadata(&one)
            .map_err(|e| Error::Lora(e.to_string()))?;
        assert_eq!(header.metadata().as_ref().map(|m| m.len()), Some(20));
        Ok(())
    }
}
