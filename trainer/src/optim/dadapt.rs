//! DAdaptAdam as dadaptation 3.2's `dadaptation.DAdaptAdam`: Adam whose step size `d` is
//! estimated from the gradients (lr stays a multiplier, ~1.0). One `d` for all groups; every group
//! must run at the same lr or at 0, as the package demands.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::json;

use super::args::Args;
use super::{
    assign, check_lrs, f64_json, grad_of, put_slots, steps_from_json, steps_json, sum_f64,
    take_slots, value_of, zero_slots, Optimizer, OptimizerState, ParamGroup, Scalars, TensorsIn,
};
use crate::{Error, Result};

/// dadaptation's defaults: betas (0.9, 0.999), eps 1e-8, coupled weight decay 0, no bias
/// correction, d0 1e-6, unbounded growth.
#[derive(Debug, Clone, PartialEq)]
pub struct DAdaptAdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub d0: f64,
    pub growth_rate: f64,
}

impl Default for DAdaptAdamConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: false,
            use_bias_correction: false,
            d0: 1e-6,
            growth_rate: f64::INFINITY,
        }
    }
}

impl DAdaptAdamConfig {
    /// `log_every` is accepted and ignored (it only prints).
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] = loractl_spec::optimizer_arg_names::DADAPT_ADAM;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let (beta1, beta2) = a.pair("betas", (d.beta1, d.beta2))?;
        let c = Self {
            beta1,
            beta2,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            decouple: a.bool("decouple", d.decouple)?,
            use_bias_correction: a.bool("use_bias_correction", d.use_bias_correction)?,
            d0: a.f64("d0", d.d0)?,
            growth_rate: a.f64("growth_rate", d.growth_rate)?,
        };
        a.usize("log_every", 0)?;
        a.check(c.d0 > 0.0, "d0", "must be > 0")?;
        a.check(c.eps > 0.0, "eps", "must be > 0")?;
        a.check((0.0..1.0).contains(&c.beta1), "betas", "must be in [0, 1)")?;
        a.check((0.0..1.0).contains(&c.beta2), "betas", "must be in [0, 1)")?;
        Ok(c)
    }
}

/// The lr D-Adaptation/Prodigy run at: the largest group lr; every other group must use it or 0.
pub(crate) fn shared_lr(name: &str, groups: &[ParamGroup], lrs: &[f64]) -> Result<f64> {
    let lr = lrs.iter().copied().fold(0.0, f64::max);
    for (g, l) in groups.iter().zip(lrs) {
        if *l != lr && *l != 0.0 {
            return Err(Error::Config(format!(
                "{name} runs every parameter group at one lr (or 0 to freeze a group), but group \
                 `{}` has lr {l} and another {lr}: give unet_lr and text_encoder_lr the same value \
                 (D-Adaptation/Prodigy find the step size themselves; ~1.0 is usual)",
                g.name
            )));
        }
    }
    Ok(lr)
}

pub struct DAdaptAdam {
    groups: Vec<ParamGroup>,
    s: Vec<Vec<Tensor>>,
    m: Vec<Vec<Tensor>>,
    v: Vec<Vec<Tensor>>,
    steps: Vec<Vec<u64>>,
    d: f64,
    numerator_weighted: f64,
    k: u64,
    last_lrs: Vec<f64>,
    cfg: DAdaptAdamConfig,
}

impl DAdaptAdam {
    pub fn new(groups: Vec<ParamGroup>, cfg: DAdaptAdamConfig) -> Result<Self> {
        let base: Vec<f64> = groups.iter().map(|g| g.lr).collect();
        shared_lr("DAdaptAdam", &groups, &base)?;
        Ok(Self {
            s: zero_slots(&groups)?,
            m: zero_slots(&groups)?,
            v: zero_slots(&groups)?,
            steps: groups.iter().map(|g| vec![0; g.vars.len()]).collect(),
            d: cfg.d0,
            numerator_weighted: 0.0,
            k: 0,
            last_lrs: base,
            groups,
            cfg,
        })
    }

    /// The current D estimate.
    pub fn d(&self) -> f64 {
        self.d
    }
}

impl Optimizer for DAdaptAdam {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        let lr = shared_lr(self.name(), &self.groups, lrs)?;
        self.last_lrs = lrs.to_vec();
        let c = &self.cfg;
        let (beta1, beta2) = (c.beta1, c.beta2);
        let k = self.k as i32;
        let bias_correction = if c.use_bias_correction {
            (1.0 - beta2.powi(k + 1)).sqrt() / (1.0 - beta1.powi(k + 1))
        } else {
            1.0
        };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let sqrt_beta2 = beta2.sqrt();

        let mut numerator_acum = 0f64;
        let mut sk_l1 = 0f64;
        // Gradients after the coupled weight decay, for the variables that have one.
        let mut gs: Vec<Vec<Option<Tensor>>> = Vec::with_capacity(self.groups.len());
        for (gi, group) in self.groups.iter().enumerate() {
            let mut row = Vec::with_capacity(group.vars.len());
            for (pi, var) in group.vars.iter().enumerate() {
                let Some(mut g) = grad_of(grads, var)? else {
                    row.push(None);
                    continue;
                };
                if c.weight_decay != 0.0 && !c.decouple {
                    g = (g + (value_of(var)? * c.weight_decay)?)?;
                }
                if lrs[gi] > 0.0 {
                    let s = &self.s[gi][pi];
                    let denom = (self.v[gi][pi].sqrt()? + c.eps)?;
                    numerator_acum += dlr * sum_f64(&(&g * s.div(&denom)?)?)?;
                    self.m[gi][pi] = ((&self.m[gi][pi] * beta1)? + (&g * (dlr * (1.0 - beta1)))?)?;
                    self.v[gi][pi] = ((&self.v[gi][pi] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let ns = ((s * sqrt_beta2)? + (&g * (dlr * (1.0 - sqrt_beta2)))?)?;
                    sk_l1 += sum_f64(&ns.abs()?)?;
                    self.s[gi][pi] = ns;
                }
                row.push(Some(g));
            }
            gs.push(row);
        }
        let numerator_weighted =
            sqrt_beta2 * self.numerator_weighted + (1.0 - sqrt_beta2) * numerator_acum;
        // No gradient anywhere: the package returns before the parameter step, keeping d, k and
        // the weighted numerator (its moment updates above stay).
        if sk_l1 == 0.0 {
            return Ok(());
        }
        let mut new_d = d;
        if lr > 0.0 {
            let d_hat = numerator_weighted / ((1.0 - sqrt_beta2) * sk_l1);
            new_d = d.max(d_hat.min(d * c.growth_rate));
        }
        self.numerator_weighted = numerator_weighted;
        self.d = new_d;
        for (gi, group) in self.groups.iter().enumerate() {
            for (pi, var) in group.vars.iter().enumerate() {
                if gs[gi][pi].is_none() {
                    continue;
                }
                self.steps[gi][pi] += 1;
                let denom = (self.v[gi][pi].sqrt()? + c.eps)?;
                let mut p = value_of(var)?;
                if c.weight_decay != 0.0 && c.decouple {
                    p = (&p + (&p * (-c.weight_decay * dlr))?)?;
                }
                assign(var, &(p - self.m[gi][pi].div(&denom)?)?)?;
            }
        }
        self.k += 1;
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        put_slots(&mut tensors, &self.groups, "s", &self.s);
        put_slots(&mut tensors, &self.groups, "exp_avg", &self.m);
        put_slots(&mut tensors, &self.groups, "exp_avg_sq", &self.v);
        Ok(OptimizerState {
            tensors,
            scalars: json!({
                "optimizer": self.name(),
                "d": f64_json(self.d),
                "numerator_weighted": f64_json(self.numerator_weighted),
                "k": self.k,
                "steps": steps_json(&self.groups, &self.steps),
            }),
        })
    }

    fn load_state(&mut self, st: OptimizerState) -> Result<()> {
        let sc = Scalars::new(self.name(), &st.scalars)?;
        let d = sc.f64("d")?;
        let numerator_weighted = sc.f64("numerator_weighted")?;
        let k = sc.u64("k")?;
        let steps = steps_from_json(&sc, "steps", &self.groups)?;
        let mut tin = TensorsIn::new(self.name(), st.tensors);
        let s = take_slots(&mut tin, &self.groups, "s")?;
        let m = take_slots(&mut tin, &self.groups, "exp_avg")?;
        let v = take_slots(&mut tin, &self.groups, "exp_avg_sq")?;
        tin.finish()?;
        (self.s, self.m, self.v, self.steps) = (s, m, v, steps);
        (self.d, self.numerator_weighted, self.k) = (d, numerator_weighted, k);
        Ok(())
    }

    fn d_lr(&self) -> Option<Vec<f64>> {
        Some(self.last_lrs.iter().map(|lr| self.d * lr).collect())
    }

    fn name(&self) -> &'static str {
        "DAdaptAdam"
    }
}
