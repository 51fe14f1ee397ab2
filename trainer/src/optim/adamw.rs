//! AdamW as `torch.optim.AdamW` (decoupled weight decay applied first, bias-corrected moments,
//! eps added after the square root, optional AMSGrad), f32 moments beside each variable.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde_json::json;

use super::args::Args;
use super::{
    assign, check_lrs, grad_of, put_slots, steps_from_json, steps_json, take_slots, value_of,
    zero_slots, Optimizer, OptimizerState, ParamGroup, Scalars, TensorsIn,
};
use crate::Result;

/// AdamW hyper-parameters (torch defaults; `lr` only for [`AdamW::new`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
        }
    }
}

impl AdamWConfig {
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] = loractl_spec::optimizer_arg_names::ADAMW;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let (beta1, beta2) = a.pair("betas", (d.beta1, d.beta2))?;
        let c = Self {
            lr: d.lr,
            beta1,
            beta2,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            amsgrad: a.bool("amsgrad", d.amsgrad)?,
        };
        a.check((0.0..1.0).contains(&c.beta1), "betas", "must be in [0, 1)")?;
        a.check((0.0..1.0).contains(&c.beta2), "betas", "must be in [0, 1)")?;
        a.check(c.eps >= 0.0, "eps", "must be >= 0")?;
        a.check(c.weight_decay >= 0.0, "weight_decay", "must be >= 0")?;
        Ok(c)
    }
}

/// AdamW over parameter groups.
pub struct AdamW {
    groups: Vec<ParamGroup>,
    m: Vec<Vec<Tensor>>,
    v: Vec<Vec<Tensor>>,
    /// AMSGrad's running maximum of `v` (empty without amsgrad).
    vmax: Vec<Vec<Tensor>>,
    /// torch counts steps per parameter (a parameter without a gradient does not advance).
    steps: Vec<Vec<u64>>,
    pub cfg: AdamWConfig,
}

impl AdamW {
    /// One group of `params` at `cfg.lr`.
    pub fn new(params: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let g = ParamGroup {
            name: "params".into(),
            vars: params,
            lr: cfg.lr,
        };
        Self::with_groups(vec![g], cfg)
    }

    pub fn with_groups(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        let m = zero_slots(&groups)?;
        let v = zero_slots(&groups)?;
        let vmax = if cfg.amsgrad {
            zero_slots(&groups)?
        } else {
            Vec::new()
        };
        let steps = groups.iter().map(|g| vec![0; g.vars.len()]).collect();
        Ok(Self {
            groups,
            m,
            v,
            vmax,
            steps,
            cfg,
        })
    }

    /// Optimizer steps taken (by the first variable).
    pub fn steps(&self) -> u64 {
        self.steps
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or_default()
    }

    /// One update at each group's base lr (kept for callers that schedule nothing).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let lrs: Vec<f64> = self.groups.iter().map(|g| g.lr).collect();
        Optimizer::step(self, grads, &lrs)
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        let c = &self.cfg;
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = lrs[gi];
            for (pi, var) in group.vars.iter().enumerate() {
                let Some(g) = grad_of(grads, var)? else {
                    continue;
                };
                self.steps[gi][pi] += 1;
                let t = self.steps[gi][pi] as i32;
                let mut p = value_of(var)?;
                if c.weight_decay != 0.0 {
                    p = (p * (1.0 - lr * c.weight_decay))?;
                }
                let m = &self.m[gi][pi];
                // torch: exp_avg.lerp_(grad, 1 - beta1)
                let nm = (m + ((&g - m)? * (1.0 - c.beta1))?)?;
                let nv = ((&self.v[gi][pi] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let bc1 = 1.0 - c.beta1.powi(t);
                let bc2 = 1.0 - c.beta2.powi(t);
                let vhat = if c.amsgrad {
                    let mx = self.vmax[gi][pi].maximum(&nv)?;
                    self.vmax[gi][pi] = mx.clone();
                    mx
                } else {
                    nv.clone()
                };
                let denom = ((vhat.sqrt()? / bc2.sqrt())? + c.eps)?;
                let upd = (nm.div(&denom)? * (lr / bc1))?;
                assign(var, &(p - upd)?)?;
                self.m[gi][pi] = nm;
                self.v[gi][pi] = nv;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        put_slots(&mut tensors, &self.groups, "exp_avg", &self.m);
        put_slots(&mut tensors, &self.groups, "exp_avg_sq", &self.v);
        if self.cfg.amsgrad {
            put_slots(&mut tensors, &self.groups, "max_exp_avg_sq", &self.vmax);
        }
        Ok(OptimizerState {
            tensors,
            scalars: json!({
                "optimizer": self.name(),
                "amsgrad": self.cfg.amsgrad,
                "steps": steps_json(&self.groups, &self.steps),
            }),
        })
    }

    fn load_state(&mut self, s: OptimizerState) -> Result<()> {
        let sc = Scalars::new(self.name(), &s.scalars)?;
        let steps = steps_from_json(&sc, "steps", &self.groups)?;
        let mut tin = TensorsIn::new(self.name(), s.tensors);
        let m = take_slots(&mut tin, &self.groups, "exp_avg")?;
        let v = take_slots(&mut tin, &self.groups, "exp_avg_sq")?;
        let vmax = if self.cfg.amsgrad {
            take_slots(&mut tin, &self.groups, "max_exp_avg_sq")?
        } else {
            Vec::new()
        };
        tin.finish()?;
        self.m = m;
        self.v = v;
        self.vmax = vmax;
        self.steps = steps;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "AdamW"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference from torch 2.9.1:
    /// ```python
    /// p = torch.tensor([[0.5,-1.0,2.0],[0.1,0.0,-0.3]], requires_grad=True)
    /// opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9,0.999), eps=1e-8, weight_decay=0.01)
    /// for g in grads: p.grad = g.clone(); opt.step()
    /// ```
    #[test]
    fn adamw_matches_torch() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let p = Var::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.0, -0.3]], &dev)?;
        let mut opt = AdamW::new(
            vec![p.clone()],
            AdamWConfig {
                lr: 0.1,
                ..Default::default()
            },
        )?;
        let grads = [
            [[1f32, -2., 0.5], [0., 3., -1.]],
            [[0.2, 0.2, 0.2], [-1., 1., -1.]],
            [[-3., 0., 1.], [2., -2., 0.01]],
        ];
        for g in grads {
            // d/dp sum(p * g) = g
            let store = (p.as_tensor() * Tensor::new(&g, &dev)?)?
                .sum_all()?
                .backward()?;
            opt.step(&store)?;
        }
        let want = [
            0.359_004_9_f32,
            -0.792_185_5,
            1.715_272_2,
            0.142_611,
            -0.209_541_9,
            -0.022_554_51,
        ];
        let got = p.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.steps(), 3);
        Ok(())
    }

    #[test]
    fn moments_do_not_keep_the_graph_alive() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let p = Var::new(&[1f32, 2., 3.], &dev)?;
        let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default())?;
        // d/dp sum(p^2) = 2p references p, so an undetached moment would hold a graph.
        let grads = p.as_tensor().sqr()?.sum_all()?.backward()?;
        assert!(grads.get(p.as_tensor()).is_some_and(|g| g.track_op()));
        opt.step(&grads)?;
        assert!(opt.m.iter().chain(&opt.v).flatten().all(|t| !t.track_op()));
        Ok(())
    }
}
