//! Lion as lion-pytorch 0.2.5's `Lion` (what sd-scripts builds for `Lion`): sign of the
//! interpolated momentum, weight decay `p *= 1 - lr·wd` first, momentum updated after the step.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use serde_json::json;

use super::args::Args;
use super::{
    assign, check_lrs, grad_of, put_slots, take_slots, value_of, zero_slots, Optimizer,
    OptimizerState, ParamGroup, Scalars, TensorsIn,
};
use crate::Result;

/// lion-pytorch defaults: betas (0.9, 0.99), weight_decay 0.
#[derive(Debug, Clone, PartialEq)]
pub struct LionConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    /// lion-pytorch's `decoupled_weight_decay`: weight decay divided by the initial lr (taken
    /// here as the first group's base lr; sd-scripts passes `learning_rate`).
    pub decoupled_weight_decay: bool,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
        }
    }
}

impl LionConfig {
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] = loractl_spec::optimizer_arg_names::LION;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let (beta1, beta2) = a.pair("betas", (d.beta1, d.beta2))?;
        let c = Self {
            beta1,
            beta2,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            decoupled_weight_decay: a.bool("decoupled_weight_decay", d.decoupled_weight_decay)?,
        };
        a.check((0.0..=1.0).contains(&c.beta1), "betas", "must be in [0, 1]")?;
        a.check((0.0..=1.0).contains(&c.beta2), "betas", "must be in [0, 1]")?;
        Ok(c)
    }
}

pub struct Lion {
    groups: Vec<ParamGroup>,
    m: Vec<Vec<candle_core::Tensor>>,
    init_lr: f64,
    cfg: LionConfig,
}

impl Lion {
    pub fn new(groups: Vec<ParamGroup>, cfg: LionConfig) -> Result<Self> {
        let m = zero_slots(&groups)?;
        let init_lr = groups.first().map_or(0.0, |g| g.lr);
        if cfg.decoupled_weight_decay && init_lr <= 0.0 {
            return Err(crate::Error::Config(
                "Lion decoupled_weight_decay divides by the initial lr, which is 0".into(),
            ));
        }
        Ok(Self {
            groups,
            m,
            init_lr,
            cfg,
        })
    }
}

impl Optimizer for Lion {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        let c = &self.cfg;
        let wd = if c.decoupled_weight_decay {
            c.weight_decay / self.init_lr
        } else {
            c.weight_decay
        };
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = lrs[gi];
            for (pi, var) in group.vars.iter().enumerate() {
                let Some(g) = grad_of(grads, var)? else {
                    continue;
                };
                let mut p = value_of(var)?;
                if wd != 0.0 {
                    p = (p * (1.0 - lr * wd))?;
                }
                let m = &self.m[gi][pi];
                let dir = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.sign()?;
                assign(var, &(p - (dir * lr)?)?)?;
                self.m[gi][pi] = ((m * c.beta2)? + (&g * (1.0 - c.beta2))?)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        put_slots(&mut tensors, &self.groups, "exp_avg", &self.m);
        Ok(OptimizerState {
            tensors,
            scalars: json!({ "optimizer": self.name() }),
        })
    }

    fn load_state(&mut self, s: OptimizerState) -> Result<()> {
        Scalars::new(self.name(), &s.scalars)?;
        let mut tin = TensorsIn::new(self.name(), s.tensors);
        let m = take_slots(&mut tin, &self.groups, "exp_avg")?;
        tin.finish()?;
        self.m = m;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "Lion"
    }
}
