//! Adafactor as `transformers.optimization.Adafactor` (4.57.1) with sd-scripts' defaults:
//! factored second moments for tensors of rank >= 2, update clipping, and — with `relative_step`
//! (sd-scripts' default) — its own lr schedule `min(1e-2, 1/sqrt(step))` (warmup_init:
//! `min(1e-6·step, 1/sqrt(step))`) times `max(1e-3, RMS(p))` when `scale_parameter`. The lrs
//! passed to [`Optimizer::step`] are then ignored, as sd-scripts drops the group lrs and swaps the
//! scheduler for transformers' `AdafactorSchedule`; [`Optimizer::own_lrs`] reports the lr used.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, D};
use serde_json::json;

use super::args::Args;
use super::{
    assign, check_lrs, f64_json, grad_of, slot_key, steps_from_json, steps_json, sum_f64, value_of,
    Optimizer, OptimizerState, ParamGroup, Scalars, TensorsIn,
};
use crate::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorConfig {
    /// (regulariser added to g², floor of the parameter scale).
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorConfig {
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] = loractl_spec::optimizer_arg_names::ADAFACTOR;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let warmup_init = a.bool("warmup_init", d.warmup_init)?;
        let mut relative_step = a.bool("relative_step", d.relative_step)?;
        if warmup_init && !relative_step {
            // sd-scripts turns relative_step back on rather than failing like transformers.
            tracing::info!(
                "Adafactor: warmup_init=True needs relative_step; setting relative_step=True"
            );
            relative_step = true;
        }
        let c = Self {
            eps: a.pair("eps", d.eps)?,
            clip_threshold: a.f64("clip_threshold", d.clip_threshold)?,
            decay_rate: a.f64("decay_rate", d.decay_rate)?,
            beta1: a.opt_f64("beta1", d.beta1)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            scale_parameter: a.bool("scale_parameter", d.scale_parameter)?,
            relative_step,
            warmup_init,
        };
        a.check(c.clip_threshold > 0.0, "clip_threshold", "must be > 0")?;
        a.check(
            c.beta1.is_none_or(|b| (0.0..1.0).contains(&b)),
            "beta1",
            "must be None or in [0, 1)",
        )?;
        Ok(c)
    }
}

/// Second-moment state of one variable.
enum Second {
    Factored { row: Tensor, col: Tensor },
    Full(Tensor),
}

pub struct Adafactor {
    groups: Vec<ParamGroup>,
    second: Vec<Vec<Second>>,
    m: Vec<Vec<Option<Tensor>>>,
    steps: Vec<Vec<u64>>,
    /// The lr of each group's first variable at its latest step (AdafactorSchedule's report).
    last_lrs: Vec<Option<f64>>,
    cfg: AdafactorConfig,
}

fn rms(t: &Tensor) -> Result<f64> {
    Ok((sum_f64(&t.sqr()?)? / t.elem_count() as f64).sqrt())
}

impl Adafactor {
    pub fn new(groups: Vec<ParamGroup>, cfg: AdafactorConfig) -> Result<Self> {
        let mut second = Vec::new();
        let mut m = Vec::new();
        for g in &groups {
            let mut srow = Vec::new();
            let mut mrow = Vec::new();
            for v in &g.vars {
                srow.push(Self::zero_second(v.dims(), v.device())?);
                mrow.push(match cfg.beta1 {
                    Some(_) => Some(Tensor::zeros(v.shape(), DType::F32, v.device())?),
                    None => None,
                });
            }
            second.push(srow);
            m.push(mrow);
        }
        if cfg.relative_step && groups.iter().any(|g| g.lr != 0.0) {
            tracing::info!(
                "Adafactor relative_step: the group learning rates are ignored; the optimizer \
                 schedules its own lr"
            );
        }
        Ok(Self {
            steps: groups.iter().map(|g| vec![0; g.vars.len()]).collect(),
            last_lrs: vec![None; groups.len()],
            groups,
            second,
            m,
            cfg,
        })
    }

    fn factored_shapes(dims: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let r = dims.len();
        let row = dims[..r - 1].to_vec();
        let mut col = dims[..r - 2].to_vec();
        col.push(dims[r - 1]);
        (row, col)
    }

    fn zero_second(dims: &[usize], dev: &candle_core::Device) -> Result<Second> {
        Ok(if dims.len() >= 2 {
            let (r, c) = Self::factored_shapes(dims);
            Second::Factored {
                row: Tensor::zeros(r, DType::F32, dev)?,
                col: Tensor::zeros(c, DType::F32, dev)?,
            }
        } else {
            Second::Full(Tensor::zeros(dims, DType::F32, dev)?)
        })
    }

    /// transformers' `_get_lr`.
    fn lr_for(&self, group_lr: f64, step: u64, param_rms: f64) -> f64 {
        let c = &self.cfg;
        let mut rel = group_lr;
        if c.relative_step {
            let min_step = if c.warmup_init {
                1e-6 * step as f64
            } else {
                1e-2
            };
            rel = min_step.min(1.0 / (step as f64).sqrt());
        }
        let scale = if c.scale_parameter {
            c.eps.1.max(param_rms)
        } else {
            1.0
        };
        scale * rel
    }
}

impl Optimizer for Adafactor {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        let c = self.cfg.clone();
        for (gi, &group_lr) in lrs.iter().enumerate() {
            for pi in 0..self.groups[gi].vars.len() {
                let var = self.groups[gi].vars[pi].clone();
                let Some(g) = grad_of(grads, &var)? else {
                    continue;
                };
                self.steps[gi][pi] += 1;
                let step = self.steps[gi][pi];
                let mut p = value_of(&var)?;
                let lr = self.lr_for(group_lr, step, rms(&p)?);
                if pi == 0 {
                    self.last_lrs[gi] = Some(lr);
                }
                let beta2t = 1.0 - (step as f64).powf(c.decay_rate);
                let sq = (g.sqr()? + c.eps.0)?;
                let mut update = match &mut self.second[gi][pi] {
                    Second::Factored { row, col } => {
                        let r = g.rank();
                        let nrow = ((&*row * beta2t)? + (sq.mean(D::Minus1)? * (1.0 - beta2t))?)?;
                        let ncol = ((&*col * beta2t)? + (sq.mean(r - 2)? * (1.0 - beta2t))?)?;
                        let r_factor = nrow
                            .broadcast_div(&nrow.mean_keepdim(D::Minus1)?)?
                            .sqrt()?
                            .recip()?
                            .unsqueeze(D::Minus1)?;
                        let c_factor = ncol.unsqueeze(r - 2)?.sqrt()?.recip()?;
                        *row = nrow;
                        *col = ncol;
                        r_factor.broadcast_mul(&c_factor)?.mul(&g)?
                    }
                    Second::Full(v) => {
                        let nv = ((&*v * beta2t)? + (sq * (1.0 - beta2t))?)?;
                        let u = nv.sqrt()?.recip()?.mul(&g)?;
                        *v = nv;
                        u
                    }
                };
                let clip = (rms(&update)? / c.clip_threshold).max(1.0);
                update = ((update / clip)? * lr)?;
                if let (Some(b1), Some(m)) = (c.beta1, self.m[gi][pi].as_mut()) {
                    let nm = ((&*m * b1)? + (update * (1.0 - b1))?)?;
                    *m = nm.clone();
                    update = nm;
                }
                if c.weight_decay != 0.0 {
                    p = (&p + (&p * (-c.weight_decay * lr))?)?;
                }
                assign(&var, &(p - update)?)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for i in 0..g.vars.len() {
                match &self.second[gi][i] {
                    Second::Factored { row, col } => {
                        tensors.insert(slot_key(&g.name, i, "exp_avg_sq_row"), row.clone());
                        tensors.insert(slot_key(&g.name, i, "exp_avg_sq_col"), col.clone());
                    }
                    Second::Full(v) => {
                        tensors.insert(slot_key(&g.name, i, "exp_avg_sq"), v.clone());
                    }
                }
                if let Some(m) = &self.m[gi][i] {
                    tensors.insert(slot_key(&g.name, i, "exp_avg"), m.clone());
                }
            }
        }
        let last: Vec<serde_json::Value> = self
            .last_lrs
            .iter()
            .map(|l| l.map_or(serde_json::Value::Null, f64_json))
            .collect();
        Ok(OptimizerState {
            tensors,
            scalars: json!({
                "optimizer": self.name(),
                "steps": steps_json(&self.groups, &self.steps),
                "last_lrs": last,
            }),
        })
    }

    fn load_state(&mut self, st: OptimizerState) -> Result<()> {
        let sc = Scalars::new(self.name(), &st.scalars)?;
        let steps = steps_from_json(&sc, "steps", &self.groups)?;
        let last_lrs: Vec<Option<f64>> = match st.scalars.get("last_lrs").and_then(|v| v.as_array())
        {
            Some(a) if a.len() == self.groups.len() => a
                .iter()
                .map(|v| v.as_str().and_then(|s| s.parse::<f64>().ok()))
                .collect(),
            _ => vec![None; self.groups.len()],
        };
        let mut tin = TensorsIn::new(self.name(), st.tensors);
        let mut second = Vec::new();
        let mut m = Vec::new();
        for g in &self.groups {
            let (mut srow, mut mrow) = (Vec::new(), Vec::new());
            for (i, v) in g.vars.iter().enumerate() {
                let dev = v.device();
                srow.push(if v.rank() >= 2 {
                    let (r, c) = Self::factored_shapes(v.dims());
                    Second::Factored {
                        row: tin.take(
                            &slot_key(&g.name, i, "exp_avg_sq_row"),
                            &r,
                            DType::F32,
                            dev,
                        )?,
                        col: tin.take(
                            &slot_key(&g.name, i, "exp_avg_sq_col"),
                            &c,
                            DType::F32,
                            dev,
                        )?,
                    }
                } else {
                    Second::Full(tin.take(
                        &slot_key(&g.name, i, "exp_avg_sq"),
                        v.dims(),
                        DType::F32,
                        dev,
                    )?)
                });
                mrow.push(match self.cfg.beta1 {
                    Some(_) => Some(tin.take(
                        &slot_key(&g.name, i, "exp_avg"),
                        v.dims(),
                        DType::F32,
                        dev,
                    )?),
                    None => None,
                });
            }
            second.push(srow);
            m.push(mrow);
        }
        tin.finish()?;
        (self.second, self.m, self.steps, self.last_lrs) = (second, m, steps, last_lrs);
        Ok(())
    }

    fn own_lrs(&self) -> Option<Vec<f64>> {
        if !self.cfg.relative_step {
            return None;
        }
        // Before the first step AdafactorSchedule reports its initial lr; we report the first
        // step's lr as the schedule defines it (step 1, RMS of the current weights).
        let mut out = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            out.push(match self.last_lrs[gi] {
                Some(l) => l,
                None => {
                    let r = match g.vars.first() {
                        Some(v) => value_of(v).and_then(|p| rms(&p)).unwrap_or(0.0),
                        None => 0.0,
                    };
                    self.lr_for(0.0, 1, r)
                }
            });
        }
        Some(out)
    }

    fn name(&self) -> &'static str {
        "Adafactor"
    }
}
