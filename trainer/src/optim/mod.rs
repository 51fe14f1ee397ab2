//! kohya's optimizer set over LoRA variables (AdamW, AdamW8bit, Lion, SGDNesterov, DAdaptAdam,
//! Prodigy, Adafactor), each matching the Python package sd-scripts builds it from, with parameter
//! groups, exact state save/resume, gradient clipping and a finite check.
//!
//! [`build`] takes the optimizer ([`OptimizerKind`], sd-scripts' `optimizer_type`) and its
//! `optimizer_args`; the learning rate of each group comes from the scheduler ([`crate::lr`])
//! on every [`Optimizer::step`].

mod adafactor;
mod adamw;
mod adamw8bit;
mod args;
mod dadapt;
mod lion;
mod prodigy;
mod sgd;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::{Error, Result};

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use adamw8bit::{dynamic_map, AdamW8bit, AdamW8bitConfig, BLOCKSIZE};
pub use dadapt::{DAdaptAdam, DAdaptAdamConfig};
pub use lion::{Lion, LionConfig};
pub use prodigy::{Prodigy, ProdigyConfig};
pub use sgd::{SgdNesterov, SgdNesterovConfig};

/// Variables that share a learning rate (sd-scripts' `unet` / `textencoder` param groups).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub name: String,
    pub vars: Vec<Var>,
    /// The base learning rate; the scheduler scales it and hands the result to [`Optimizer::step`].
    pub lr: f64,
}

/// One optimizer over parameter groups.
pub trait Optimizer: Send {
    /// One update. `lrs` holds the current learning rate of each group (from the scheduler), in
    /// group order. A variable without a gradient in `grads` is left alone, as torch does for
    /// `p.grad is None`.
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()>;
    /// Everything needed to continue bit-identically after [`Optimizer::load_state`].
    fn state(&self) -> Result<OptimizerState>;
    /// Restores a state taken from an optimizer of the same kind over variables of the same shapes.
    fn load_state(&mut self, s: OptimizerState) -> Result<()>;
    /// `d · lr` per group (what sd-scripts logs as `lr/d*lr/<group>`) for D-Adaptation and
    /// Prodigy, with the lr of the latest step (the group's base lr before the first step).
    fn d_lr(&self) -> Option<Vec<f64>> {
        None
    }
    /// The lr each group actually used when the optimizer ignores the scheduler's (Adafactor with
    /// `relative_step`), as transformers' `AdafactorSchedule` reports it for logging.
    fn own_lrs(&self) -> Option<Vec<f64>> {
        None
    }
    /// sd-scripts' name for the optimizer type.
    fn name(&self) -> &'static str;
}

/// An optimizer's state: named tensors plus JSON scalars. f64 scalars are written as decimal
/// strings (Rust's shortest round-trip form): serde_json numbers do not parse back bit-exactly
/// without its `float_roundtrip` feature, and resumed runs must be bit-identical.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub tensors: BTreeMap<String, Tensor>,
    pub scalars: Value,
}

/// safetensors metadata key holding [`OptimizerState::scalars`].
pub const SCALARS_KEY: &str = "loractl.optimizer_state";

impl OptimizerState {
    /// Writes the state as a safetensors file (scalars as JSON in the metadata), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert(SCALARS_KEY.to_string(), self.scalars.to_string());
        crate::lora::write_safetensors_atomic(path, &self.tensors, meta)
    }

    /// Reads a state written by [`OptimizerState::save`], tensors placed on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::bad_checkpoint(path, format!("not a safetensors optimizer state ({e})"))
        })?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(SCALARS_KEY))
            .ok_or_else(|| {
                Error::bad_checkpoint(
                    path,
                    format!(
                        "no `{SCALARS_KEY}` metadata: not an optimizer state written by loractl"
                    ),
                )
            })?;
        let scalars: Value = serde_json::from_str(json)
            .map_err(|e| Error::bad_checkpoint(path, format!("bad `{SCALARS_KEY}` JSON: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?
            .into_iter()
            .collect();
        Ok(Self { tensors, scalars })
    }
}

/// The optimizer types [`build`] builds: the job spec's [`loractl_spec::OptimizerType`]s that
/// loractl implements (`OptimizerType::implemented`, checked by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    AdamW,
    AdamW8bit,
    Lion,
    SgdNesterov,
    DAdaptAdam,
    Prodigy,
    Adafactor,
}

impl OptimizerKind {
    pub const ALL: [OptimizerKind; 7] = [
        OptimizerKind::AdamW,
        OptimizerKind::AdamW8bit,
        OptimizerKind::Lion,
        OptimizerKind::SgdNesterov,
        OptimizerKind::DAdaptAdam,
        OptimizerKind::Prodigy,
        OptimizerKind::Adafactor,
    ];

    /// sd-scripts' name (the optimizer's [`Optimizer::name`], and what a saved state records).
    pub fn as_str(self) -> &'static str {
        self.spec_type().as_str()
    }

    /// The job spec's name for this optimizer.
    pub fn spec_type(self) -> loractl_spec::OptimizerType {
        use loractl_spec::OptimizerType as T;
        match self {
            OptimizerKind::AdamW => T::AdamW,
            OptimizerKind::AdamW8bit => T::AdamW8bit,
            OptimizerKind::Lion => T::Lion,
            OptimizerKind::SgdNesterov => T::SgdNesterov,
            OptimizerKind::DAdaptAdam => T::DAdaptAdam,
            OptimizerKind::Prodigy => T::Prodigy,
            OptimizerKind::Adafactor => T::Adafactor,
        }
    }

    fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validation refuses what the trainer does not implement; an optimizer that gets here anyway
/// (a `ResolvedSpec` built by hand) gets a sentence rather than a panic.
impl TryFrom<loractl_spec::OptimizerType> for OptimizerKind {
    type Error = Error;

    fn try_from(t: loractl_spec::OptimizerType) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.spec_type() == t)
            .ok_or_else(|| {
                Error::Config(format!(
                    "optimizer.optimizer_type `{t}` is not implemented yet"
                ))
            })
    }
}

/// sd-scripts' `optimizer_type`, case-insensitive.
impl FromStr for OptimizerKind {
    type Err = Error;

    fn from_str(optimizer_type: &str) -> Result<Self> {
        let t = optimizer_type.trim();
        let t = if t.is_empty() { "adamw" } else { t };
        if t.eq_ignore_ascii_case("dadaptation") || t.eq_ignore_ascii_case("dadaptadampreprint") {
            return Err(Error::Config(format!(
                "optimizer_type `{optimizer_type}` (dadaptation's experimental DAdaptAdamPreprint) \
                 is not supported; use DAdaptAdam (or Prodigy) instead. Supported: {}",
                Self::names()
            )));
        }
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown optimizer_type `{optimizer_type}`; supported (case-insensitive): {}",
                    Self::names()
                ))
            })
    }
}

/// Builds the optimizer `kind` with its `optimizer_args` (sd-scripts' `k=v` already split;
/// values in Python literal syntax as sd-scripts' `ast.literal_eval` reads them: `0.01`,
/// `True`, `0.9,0.99`, `(0.9, 0.99)`, `None`). Defaults are those of the package sd-scripts uses.
pub fn build(
    kind: OptimizerKind,
    optimizer_args: &BTreeMap<String, String>,
    groups: Vec<ParamGroup>,
) -> Result<Box<dyn Optimizer>> {
    check_groups(&groups)?;
    let a = |accepted| args::Args::new(kind.as_str(), optimizer_args, accepted);
    Ok(match kind {
        OptimizerKind::AdamW => Box::new(AdamW::with_groups(
            groups,
            AdamWConfig::from_args(&a(AdamWConfig::ARGS)?)?,
        )?),
        OptimizerKind::AdamW8bit => Box::new(AdamW8bit::new(
            groups,
            AdamW8bitConfig::from_args(&a(AdamW8bitConfig::ARGS)?)?,
        )?),
        OptimizerKind::Lion => Box::new(Lion::new(
            groups,
            LionConfig::from_args(&a(LionConfig::ARGS)?)?,
        )?),
        OptimizerKind::SgdNesterov => Box::new(SgdNesterov::new(
            groups,
            SgdNesterovConfig::from_args(&a(SgdNesterovConfig::ARGS)?)?,
        )?),
        OptimizerKind::DAdaptAdam => Box::new(DAdaptAdam::new(
            groups,
            DAdaptAdamConfig::from_args(&a(DAdaptAdamConfig::ARGS)?)?,
        )?),
        OptimizerKind::Prodigy => Box::new(Prodigy::new(
            groups,
            ProdigyConfig::from_args(&a(ProdigyConfig::ARGS)?)?,
        )?),
        OptimizerKind::Adafactor => Box::new(Adafactor::new(
            groups,
            AdafactorConfig::from_args(&a(AdafactorConfig::ARGS)?)?,
        )?),
    })
}

fn check_groups(groups: &[ParamGroup]) -> Result<()> {
    if groups.is_empty() {
        return Err(Error::Config(
            "the optimizer got no parameter groups: nothing to train".into(),
        ));
    }
    for (i, g) in groups.iter().enumerate() {
        if groups[..i].iter().any(|o| o.name == g.name) {
            return Err(Error::Config(format!(
                "two parameter groups are named `{}`; group names must be unique",
                g.name
            )));
        }
        if !(g.lr.is_finite() && g.lr >= 0.0) {
            return Err(Error::Config(format!(
                "parameter group `{}` has learning rate {}; it must be finite and >= 0",
                g.name, g.lr
            )));
        }
    }
    Ok(())
}

/// torch.nn.utils.clip_grad_norm_: the 2-norm over all gradients of `vars` taken together; when
/// it exceeds `max_norm` every gradient is scaled by `max_norm / (norm + 1e-6)`. Returns the norm
/// before clipping. A non-finite norm leaves the gradients untouched (torch would turn them into
/// NaN); check [`all_finite`] and skip the step instead. The norm is accumulated in f64 (torch:
/// per-tensor f32 norms), a difference in the last f32 bits only.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += g
                .detach()
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum_sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g.detach() * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Whether every value of `vars` is finite: `x - x` is 0 for finite x and NaN otherwise, so
/// the sum is 0 exactly when all are.
pub fn params_finite(vars: &[Var]) -> Result<bool> {
    for v in vars {
        let t = v.as_tensor();
        let s = t
            .sub(t)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if s != 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether every gradient of `vars` present in `grads` is finite (no NaN or ±inf).
/// Multiplies every gradient of `vars` by `factor` (unscaling fp16 loss-scaled gradients).
pub fn scale_grads(grads: &mut GradStore, vars: &[Var], factor: f64) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * factor)?);
        }
    }
    Ok(())
}

pub fn all_finite(grads: &GradStore, vars: &[Var]) -> Result<bool> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            // x·0 is 0 for finite x and NaN for NaN/±inf, so one reduction answers.
            let g = g.detach().to_dtype(DType::F32)?;
            let s = (g * 0.0)?.sum_all()?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Shared helpers for the optimizers.

/// The gradient of `v` as a detached f32 tensor. Gradients of variables still reference the
/// forward graph; keeping them (in the moments) would keep every step's activations alive.
pub(crate) fn grad_of(grads: &GradStore, v: &Var) -> Result<Option<Tensor>> {
    match grads.get(v.as_tensor()) {
        None => Ok(None),
        Some(g) => Ok(Some(g.detach().to_dtype(DType::F32)?)),
    }
}

/// The value of `v` as a detached f32 tensor.
pub(crate) fn value_of(v: &Var) -> Result<Tensor> {
    Ok(v.as_tensor().detach().to_dtype(DType::F32)?)
}

/// Writes `new` (f32) into `v` in `v`'s dtype.
pub(crate) fn assign(v: &Var, new: &Tensor) -> Result<()> {
    // Always the result of an op on a detached copy, so never the variable's own storage (which
    // `Var::set` refuses).
    v.set(&new.to_dtype(v.dtype())?)?;
    Ok(())
}

pub(crate) fn zeros_f32(v: &Var) -> Result<Tensor> {
    Ok(Tensor::zeros(v.shape(), DType::F32, v.device())?)
}

/// Sum of all elements accumulated in f64 (torch's f32 reductions are pairwise and accurate;
/// a sequential f32 sum over a large tensor is not).
pub(crate) fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

pub(crate) fn check_lrs(name: &str, groups: usize, lrs: &[f64]) -> Result<()> {
    if lrs.len() != groups {
        return Err(Error::Internal(format!(
            "{name}: step got {} learning rates for {groups} parameter groups",
            lrs.len()
        )));
    }
    if let Some(lr) = lrs.iter().find(|lr| !(lr.is_finite() && **lr >= 0.0)) {
        return Err(Error::Config(format!(
            "{name}: learning rate {lr} is not a finite value >= 0"
        )));
    }
    Ok(())
}

/// f64 as an exact JSON value (see [`OptimizerState`]).
pub(crate) fn f64_json(x: f64) -> Value {
    Value::String(format!("{x:?}"))
}

/// Typed access to a state's scalars with errors that name the optimizer and the key.
pub(crate) struct Scalars<'a> {
    pub optimizer: &'static str,
    pub v: &'a Value,
}

impl<'a> Scalars<'a> {
    /// Checks that the state was written by the same optimizer.
    pub fn new(optimizer: &'static str, v: &'a Value) -> Result<Self> {
        let s = Self { optimizer, v };
        let got = v.get("optimizer").and_then(Value::as_str).unwrap_or("?");
        if got != optimizer {
            return Err(Error::Config(format!(
                "optimizer state was written by `{got}`, not `{optimizer}`: resume with the same \
                 optimizer_type or start without the state"
            )));
        }
        Ok(s)
    }

    fn get(&self, key: &str) -> Result<&'a Value> {
        self.v.get(key).ok_or_else(|| self.bad(key, "is missing"))
    }

    fn bad(&self, key: &str, what: &str) -> Error {
        Error::Config(format!(
            "{} optimizer state: scalar `{key}` {what}",
            self.optimizer
        ))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        match v {
            Value::String(s) => s
                .parse::<f64>()
                .map_err(|_| self.bad(key, &format!("is not a number: `{s}`"))),
            Value::Number(n) => n.as_f64().ok_or_else(|| self.bad(key, "is not a number")),
            _ => Err(self.bad(key, "is not a number")),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| self.bad(key, "is not a non-negative integer"))
    }

    pub fn u64_list(&self, key: &str, len: usize) -> Result<Vec<u64>> {
        let arr = self
            .get(key)?
            .as_array()
            .ok_or_else(|| self.bad(key, "is not a list"))?;
        if arr.len() != len {
            return Err(self.bad(
                key,
                &format!("has {} entries but the optimizer has {len}", arr.len()),
            ));
        }
        arr.iter()
            .map(|x| {
                x.as_u64()
                    .ok_or_else(|| self.bad(key, "holds a non-integer"))
            })
            .collect()
    }
}

/// Takes the named tensors of a state out one by one, checking shapes and that none is left over.
pub(crate) struct TensorsIn {
    optimizer: &'static str,
    tensors: BTreeMap<String, Tensor>,
}

impl TensorsIn {
    pub fn new(optimizer: &'static str, tensors: BTreeMap<String, Tensor>) -> Self {
        Self { optimizer, tensors }
    }

    /// The tensor `key`, which must have `shape` and `dtype`, moved to `device`.
    pub fn take(
        &mut self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.take_opt(key, shape, dtype, device)?.ok_or_else(|| {
            Error::Config(format!(
                "{} optimizer state lacks tensor `{key}`",
                self.optimizer
            ))
        })
    }

    /// Like [`TensorsIn::take`] for state that exists only after a variable's first gradient.
    pub fn take_opt(
        &mut self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.remove(key) else {
            return Ok(None);
        };
        if t.dims() != shape || t.dtype() != dtype {
            return Err(Error::Config(format!(
                "{} optimizer state: `{key}` is {:?} {:?} but the optimizer needs {dtype:?} \
                 {shape:?} (state from another network?)",
                self.optimizer,
                t.dtype(),
                t.dims()
            )));
        }
        Ok(Some(owned(t.to_device(device)?)?))
    }

    /// The shape of tensor `key`, if present.
    pub fn dims(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.dims().to_vec())
    }

    /// Fails when the state holds tensors the optimizer does not know.
    pub fn finish(self) -> Result<()> {
        if let Some(k) = self.tensors.keys().next() {
            return Err(Error::Config(format!(
                "{} optimizer state holds unexpected tensor `{k}` (state from another network or \
                 optimizer configuration?)",
                self.optimizer
            )));
        }
        Ok(())
    }
}

/// State key of one per-variable slot: `<group>.<index>.<slot>`.
pub(crate) fn slot_key(group: &str, index: usize, slot: &str) -> String {
    format!("{group}.{index}.{slot}")
}

/// Per-variable f32 slots `slot` of every group, taken from a state.
pub(crate) fn take_slots(
    tin: &mut TensorsIn,
    groups: &[ParamGroup],
    slot: &str,
) -> Result<Vec<Vec<Tensor>>> {
    groups
        .iter()
        .map(|g| {
            g.vars
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    tin.take(
                        &slot_key(&g.name, i, slot),
                        v.dims(),
                        DType::F32,
                        v.device(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Puts per-variable slots into a state's tensors.
pub(crate) fn put_slots(
    out: &mut BTreeMap<String, Tensor>,
    groups: &[ParamGroup],
    slot: &str,
    slots: &[Vec<Tensor>],
) {
    for (g, ts) in groups.iter().zip(slots) {
        for (i, t) in ts.iter().enumerate() {
            out.insert(slot_key(&g.name, i, slot), t.clone());
        }
    }
}

/// Zero f32 slots shaped like every variable.
pub(crate) fn zero_slots(groups: &[ParamGroup]) -> Result<Vec<Vec<Tensor>>> {
    groups
        .iter()
        .map(|g| g.vars.iter().map(zeros_f32).collect())
        .collect()
}

/// Per-variable step counters as JSON (`{"unet": [3, 3], ...}`).
pub(crate) fn steps_json(groups: &[ParamGroup], steps: &[Vec<u64>]) -> Value {
    let m: serde_json::Map<String, Value> = groups
        .iter()
        .zip(steps)
        .map(|(g, s)| (g.name.clone(), Value::from(s.clone())))
        .collect();
    Value::Object(m)
}

/// Reads what [`steps_json`] wrote.
pub(crate) fn steps_from_json(
    sc: &Scalars,
    key: &str,
    groups: &[ParamGroup],
) -> Result<Vec<Vec<u64>>> {
    let obj = sc.get(key)?;
    groups
        .iter()
        .map(|g| {
            let inner = Scalars {
                optimizer: sc.optimizer,
                v: obj,
            };
            inner.u64_list(&g.name, g.vars.len())
        })
        .collect()
}

/// Makes a loaded tensor an independent copy (so later in-place `Var::set`s never alias it).
pub(crate) fn owned(t: Tensor) -> Result<Tensor> {
    Ok(t.copy()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(vars: &[(&Var, &Tensor)]) -> Result<GradStore> {
        let mut g = GradStore::default();
        for (v, t) in vars {
            g.insert(v.as_tensor(), (*t).clone());
        }
        Ok(g)
    }

    /// torch 2.9.1:
    /// ```python
    /// a = torch.tensor([3.0, 4.0]); b = torch.tensor([[12.0]])
    /// a.grad, b.grad = a.clone(), b.clone()   # norm 13
    /// torch.nn.utils.clip_grad_norm_([a, b], 1.0)  # -> 13.0; grads * 1/(13+1e-6)
    /// ```
    #[test]
    fn clip_matches_torch() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[0f32, 0.], &dev)?;
        let b = Var::new(&[[0f32]], &dev)?;
        let ga = Tensor::new(&[3f32, 4.], &dev)?;
        let gb = Tensor::new(&[[12f32]], &dev)?;
        let mut g = store(&[(&a, &ga), (&b, &gb)])?;
        let vars = [a.clone(), b.clone()];
        let n = clip_grad_norm(&mut g, &vars, 1.0)?;
        assert!((n - 13.0).abs() < 1e-12);
        let c = 1.0 / (13.0 + 1e-6);
        let got = g.get(a.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert!((got[0] as f64 - 3.0 * c).abs() < 1e-7 && (got[1] as f64 - 4.0 * c).abs() < 1e-7);
        // Under the limit: untouched.
        let n2 = clip_grad_norm(&mut g, &vars, 5.0)?;
        assert!((n2 - 13.0 * c).abs() < 1e-6);
        assert_eq!(g.get(a.as_tensor()).unwrap().to_vec1::<f32>()?, got);
        Ok(())
    }

    #[test]
    fn finite_check() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[0f32, 0.], &dev)?;
        let b = Var::new(&[0f32], &dev)?;
        let vars = [a.clone(), b.clone()];
        let ok = store(&[(&a, &Tensor::new(&[1f32, -2.], &dev)?)])?;
        assert!(all_finite(&ok, &vars)?);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let g = store(&[
                (&a, &Tensor::new(&[1f32, 2.], &dev)?),
                (&b, &Tensor::new(&[bad], &dev)?),
            ])?;
            assert!(!all_finite(&g, &vars)?);
            let mut g = g;
            let n = clip_grad_norm(&mut g, &vars, 1.0)?;
            assert!(!n.is_finite());
            // Left as they were.
            assert_eq!(
                g.get(a.as_tensor()).unwrap().to_vec1::<f32>()?,
                vec![1f32, 2.]
            );
        }
        Ok(())
    }

    /// The spec accepts exactly the optimizers this module builds, with the same arguments.
    #[test]
    fn the_spec_and_the_builder_agree_on_optimizers() {
        let spec: Vec<loractl_spec::OptimizerType> =
            loractl_spec::OptimizerType::implemented().collect();
        assert_eq!(spec, OptimizerKind::ALL.map(OptimizerKind::spec_type));
        for o in loractl_spec::OptimizerType::ALL {
            assert_eq!(
                OptimizerKind::try_from(*o).is_ok(),
                o.is_implemented(),
                "{o}"
            );
        }
        let err = OptimizerKind::try_from(loractl_spec::OptimizerType::Lion8bit)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`Lion8bit` is not implemented yet"), "{err}");
        let dev = Device::Cpu;
        for o in OptimizerKind::ALL {
            let names = o.spec_type().arg_names().unwrap_or_default();
            let args: BTreeMap<String, String> = names
                .iter()
                .map(|n| (n.to_string(), "x".to_string()))
                .collect();
            let groups = vec![ParamGroup {
                name: "unet".into(),
                vars: vec![Var::new(&[1f32], &dev).unwrap()],
                lr: 1e-3,
            }];
            // Every listed name is known to the builder: it fails on the value, not the name.
            let err = build(o, &args, groups).err().unwrap().to_string();
            assert!(!err.contains("is not an argument"), "{o}: {err}");
        }
    }

    #[test]
    fn build_rejects_unknown_names_and_args() {
        let dev = Device::Cpu;
        let groups = || {
            vec![ParamGroup {
                name: "unet".into(),
                vars: vec![Var::new(&[1f32], &dev).unwrap()],
                lr: 1e-3,
            }]
        };
        let none = BTreeMap::new();
        let err = "Adam9000"
            .parse::<OptimizerKind>()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("Adam9000") && err.contains("Prodigy"), "{err}");
        let err = "DAdaptation"
            .parse::<OptimizerKind>()
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("DAdaptAdam") && err.contains("not supported"),
            "{err}"
        );
        let mut bad = BTreeMap::new();
        bad.insert("weight_dacay".to_string(), "0.1".to_string());
        let kind = "adamw".parse().unwrap();
        let err = build(kind, &bad, groups()).err().unwrap().to_string();
        assert!(
            err.contains("weight_dacay") && err.contains("weight_decay") && err.contains("betas"),
            "{err}"
        );
        let mut bad = BTreeMap::new();
        bad.insert("betas".to_string(), "0.9".to_string());
        let err = build(OptimizerKind::Lion, &bad, groups())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("betas"), "{err}");
        for kind in OptimizerKind::ALL {
            let name = kind.as_str();
            let o = build(name.to_uppercase().parse().unwrap(), &none, groups()).unwrap();
            assert_eq!(o.name(), name);
        }
    }
}
