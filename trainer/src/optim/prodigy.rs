//! Prodigy as prodigyopt 1.1.2's `Prodigy`: Adam with a step size `d` estimated from the distance
//! travelled from the initial weights. One `d` for all groups; every group must run at the same
//! lr or at 0, as the package demands.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::args::Args;
use super::dadapt::shared_lr;
use super::{
    assign, check_lrs, f64_json, grad_of, put_slots, slot_key, steps_from_json, steps_json,
    sum_f64, take_slots, value_of, zero_slots, Optimizer, OptimizerState, ParamGroup, Scalars,
    TensorsIn,
};
use crate::Result;

/// prodigyopt's defaults: betas (0.9, 0.999), beta3 = sqrt(beta2), eps 1e-8, weight decay 0
/// (decoupled), no bias correction, no safeguard warmup, d0 1e-6, d_coef 1, unbounded growth,
/// slice_p 1.
#[derive(Debug, Clone, PartialEq)]
pub struct ProdigyConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: Option<f64>,
    pub eps: f64,
    pub weight_decay: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub d0: f64,
    pub d_coef: f64,
    pub growth_rate: f64,
    /// Statistics for `d` from every `slice_p`-th element only (memory saving approximation).
    pub slice_p: usize,
}

impl Default for ProdigyConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
            slice_p: 1,
        }
    }
}

impl ProdigyConfig {
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] = loractl_spec::optimizer_arg_names::PRODIGY;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let (beta1, beta2) = a.pair("betas", (d.beta1, d.beta2))?;
        let c = Self {
            beta1,
            beta2,
            beta3: a.opt_f64("beta3", d.beta3)?,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            decouple: a.bool("decouple", d.decouple)?,
            use_bias_correction: a.bool("use_bias_correction", d.use_bias_correction)?,
            safeguard_warmup: a.bool("safeguard_warmup", d.safeguard_warmup)?,
            d0: a.f64("d0", d.d0)?,
            d_coef: a.f64("d_coef", d.d_coef)?,
            growth_rate: a.f64("growth_rate", d.growth_rate)?,
            slice_p: a.usize("slice_p", d.slice_p)?,
        };
        a.check(c.d0 > 0.0, "d0", "must be > 0")?;
        a.check(c.eps > 0.0, "eps", "must be > 0")?;
        a.check((0.0..1.0).contains(&c.beta1), "betas", "must be in [0, 1)")?;
        a.check((0.0..1.0).contains(&c.beta2), "betas", "must be in [0, 1)")?;
        a.check(c.slice_p >= 1, "slice_p", "must be >= 1")?;
        Ok(c)
    }
}

pub struct Prodigy {
    groups: Vec<ParamGroup>,
    /// Created at a variable's first gradient, like the package's lazy state.
    s: Vec<Vec<Option<Tensor>>>,
    /// Initial weights (every `slice_p`-th); a 0-dim zero when they were all zero.
    p0: Vec<Vec<Option<Tensor>>>,
    m: Vec<Vec<Tensor>>,
    v: Vec<Vec<Tensor>>,
    steps: Vec<Vec<u64>>,
    d: f64,
    d_max: f64,
    d_numerator: f64,
    k: u64,
    last_lrs: Vec<f64>,
    /// Indices of every `slice_p`-th element per variable (None when slice_p is 1).
    slices: Vec<Vec<Option<Tensor>>>,
    cfg: ProdigyConfig,
}

fn sliced(t: &Tensor, idx: &Option<Tensor>) -> Result<Tensor> {
    let flat = t.flatten_all()?;
    Ok(match idx {
        None => flat,
        Some(i) => flat.index_select(i, 0)?,
    })
}

fn slice_index(n: usize, p: usize, dev: &Device) -> Result<Option<Tensor>> {
    if p == 1 {
        return Ok(None);
    }
    let idx: Vec<u32> = (0..n).step_by(p).map(|i| i as u32).collect();
    Ok(Some(Tensor::new(idx.as_slice(), dev)?))
}

impl Prodigy {
    pub fn new(groups: Vec<ParamGroup>, cfg: ProdigyConfig) -> Result<Self> {
        let base: Vec<f64> = groups.iter().map(|g| g.lr).collect();
        shared_lr("Prodigy", &groups, &base)?;
        let slices = groups
            .iter()
            .map(|g| {
                g.vars
                    .iter()
                    .map(|v| slice_index(v.elem_count(), cfg.slice_p, v.device()))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            s: groups.iter().map(|g| vec![None; g.vars.len()]).collect(),
            p0: groups.iter().map(|g| vec![None; g.vars.len()]).collect(),
            m: zero_slots(&groups)?,
            v: zero_slots(&groups)?,
            steps: groups.iter().map(|g| vec![0; g.vars.len()]).collect(),
            d: cfg.d0,
            d_max: cfg.d0,
            d_numerator: 0.0,
            k: 0,
            last_lrs: base,
            slices,
            groups,
            cfg,
        })
    }

    /// The current D estimate.
    pub fn d(&self) -> f64 {
        self.d
    }

    fn sliced_len(&self, gi: usize, pi: usize) -> usize {
        self.groups[gi].vars[pi]
            .elem_count()
            .div_ceil(self.cfg.slice_p)
    }
}

impl Optimizer for Prodigy {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        let lr = shared_lr(self.name(), &self.groups, lrs)?;
        self.last_lrs = lrs.to_vec();
        let c = self.cfg.clone();
        let (beta1, beta2) = (c.beta1, c.beta2);
        let beta3 = c.beta3.unwrap_or(beta2.sqrt());
        let k = self.k as i32;
        let bias_correction = if c.use_bias_correction {
            (1.0 - beta2.powi(k + 1)).sqrt() / (1.0 - beta1.powi(k + 1))
        } else {
            1.0
        };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let d_numerator = self.d_numerator * beta3;
        let mut delta_numerator = 0f64;
        let mut d_denom = 0f64;

        let mut gs: Vec<Vec<Option<Tensor>>> = Vec::with_capacity(self.groups.len());
        for (gi, &group_lr) in lrs.iter().enumerate() {
            let mut row = Vec::new();
            for pi in 0..self.groups[gi].vars.len() {
                let var = &self.groups[gi].vars[pi];
                let Some(mut g) = grad_of(grads, var)? else {
                    row.push(None);
                    continue;
                };
                let p = value_of(var)?;
                if c.weight_decay != 0.0 && !c.decouple {
                    g = (g + (&p * c.weight_decay)?)?;
                }
                if self.s[gi][pi].is_none() {
                    let idx = &self.slices[gi][pi];
                    self.s[gi][pi] = Some(Tensor::zeros(
                        self.sliced_len(gi, pi),
                        DType::F32,
                        var.device(),
                    )?);
                    let any = sum_f64(&p.ne(0f32)?.to_dtype(DType::F32)?)? > 0.0;
                    self.p0[gi][pi] = Some(if any {
                        sliced(&p, idx)?.copy()?
                    } else {
                        // The package keeps a 0-dim zero to save memory; the math is the same.
                        Tensor::zeros((), DType::F32, var.device())?
                    });
                }
                if group_lr > 0.0 {
                    let idx = &self.slices[gi][pi];
                    let sg = sliced(&g, idx)?;
                    let p0 = self.p0[gi][pi].as_ref().ok_or_else(|| {
                        crate::Error::Config("Prodigy: p0 missing after initialisation".into())
                    })?;
                    let diff = p0.broadcast_sub(&sliced(&p, idx)?)?;
                    delta_numerator += (d / c.d0) * dlr * sum_f64(&(&sg * diff)?)?;
                    if beta1 > 0.0 {
                        self.m[gi][pi] =
                            ((&self.m[gi][pi] * beta1)? + (&g * (d * (1.0 - beta1)))?)?;
                    }
                    self.v[gi][pi] =
                        ((&self.v[gi][pi] * beta2)? + (g.sqr()? * (d * d * (1.0 - beta2)))?)?;
                    let alpha = if c.safeguard_warmup {
                        (d / c.d0) * d
                    } else {
                        (d / c.d0) * dlr
                    };
                    let s = self.s[gi][pi].as_ref().ok_or_else(|| {
                        crate::Error::Config("Prodigy: s missing after initialisation".into())
                    })?;
                    let ns = ((s * beta3)? + (sg * alpha)?)?;
                    d_denom += sum_f64(&ns.abs()?)?;
                    self.s[gi][pi] = Some(ns);
                }
                row.push(Some(g));
            }
            gs.push(row);
        }
        if d_denom == 0.0 {
            return Ok(());
        }
        let mut new_d = d;
        let mut d_max = self.d_max;
        let global_d_numerator = d_numerator + delta_numerator;
        if lr > 0.0 {
            let d_hat = c.d_coef * global_d_numerator / d_denom;
            if d == c.d0 {
                new_d = d.max(d_hat);
            }
            d_max = d_max.max(d_hat);
            new_d = d_max.min(new_d * c.growth_rate);
        }
        self.d_numerator = global_d_numerator;
        self.d = new_d;
        self.d_max = d_max;
        for (gi, group) in self.groups.iter().enumerate() {
            for (pi, var) in group.vars.iter().enumerate() {
                let Some(g) = &gs[gi][pi] else {
                    continue;
                };
                self.steps[gi][pi] += 1;
                // The denominator uses the new d, the step the d this step started with.
                let denom = (self.v[gi][pi].sqrt()? + new_d * c.eps)?;
                let mut p = value_of(var)?;
                if c.weight_decay != 0.0 && c.decouple {
                    p = (&p + (&p * (-c.weight_decay * dlr))?)?;
                }
                let upd = if beta1 > 0.0 {
                    (self.m[gi][pi].div(&denom)? * dlr)?
                } else {
                    (g.div(&denom)? * (dlr * new_d))?
                };
                assign(var, &(p - upd)?)?;
            }
        }
        self.k += 1;
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        if self.cfg.beta1 > 0.0 {
            put_slots(&mut tensors, &self.groups, "exp_avg", &self.m);
        }
        put_slots(&mut tensors, &self.groups, "exp_avg_sq", &self.v);
        for (gi, g) in self.groups.iter().enumerate() {
            for i in 0..g.vars.len() {
                if let Some(s) = &self.s[gi][i] {
                    tensors.insert(slot_key(&g.name, i, "s"), s.clone());
                }
                if let Some(p0) = &self.p0[gi][i] {
                    tensors.insert(slot_key(&g.name, i, "p0"), p0.clone());
                }
            }
        }
        Ok(OptimizerState {
            tensors,
            scalars: json!({
                "optimizer": self.name(),
                "d": f64_json(self.d),
                "d_max": f64_json(self.d_max),
                "d_numerator": f64_json(self.d_numerator),
                "k": self.k,
                "steps": steps_json(&self.groups, &self.steps),
            }),
        })
    }

    fn load_state(&mut self, st: OptimizerState) -> Result<()> {
        let sc = Scalars::new(self.name(), &st.scalars)?;
        let (d, d_max, d_numerator) = (sc.f64("d")?, sc.f64("d_max")?, sc.f64("d_numerator")?);
        let k = sc.u64("k")?;
        let steps = steps_from_json(&sc, "steps", &self.groups)?;
        let mut tin = TensorsIn::new(self.name(), st.tensors);
        let m = if self.cfg.beta1 > 0.0 {
            take_slots(&mut tin, &self.groups, "exp_avg")?
        } else {
            zero_slots(&self.groups)?
        };
        let v = take_slots(&mut tin, &self.groups, "exp_avg_sq")?;
        let (mut s, mut p0) = (Vec::new(), Vec::new());
        for (gi, g) in self.groups.iter().enumerate() {
            let (mut srow, mut prow) = (Vec::new(), Vec::new());
            for (i, var) in g.vars.iter().enumerate() {
                let n = self.sliced_len(gi, i);
                srow.push(tin.take_opt(
                    &slot_key(&g.name, i, "s"),
                    &[n],
                    DType::F32,
                    var.device(),
                )?);
                let key = slot_key(&g.name, i, "p0");
                // Either the sliced initial weights or the package's 0-dim zero.
                let shape: &[usize] = if tin.dims(&key).is_some_and(|d| d.is_empty()) {
                    &[]
                } else {
                    &[n]
                };
                prow.push(tin.take_opt(&key, shape, DType::F32, var.device())?);
            }
            s.push(srow);
            p0.push(prow);
        }
        tin.finish()?;
        (self.m, self.v, self.s, self.p0, self.steps) = (m, v, s, p0, steps);
        (self.d, self.d_max, self.d_numerator, self.k) = (d, d_max, d_numerator, k);
        Ok(())
    }

    fn d_lr(&self) -> Option<Vec<f64>> {
        Some(self.last_lrs.iter().map(|lr| self.d * lr).collect())
    }

    fn name(&self) -> &'static str {
        "Prodigy"
    }
}
