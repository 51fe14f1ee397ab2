//! SGD with Nesterov momentum as `torch.optim.SGD(nesterov=True)`, which sd-scripts builds for
//! `SGDNesterov` with momentum 0.9 unless given. The momentum buffer starts as the first gradient.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use serde_json::json;

use super::args::Args;
use super::{
    assign, check_lrs, grad_of, slot_key, value_of, Optimizer, OptimizerState, ParamGroup, Scalars,
    TensorsIn,
};
use crate::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct SgdNesterovConfig {
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Default for SgdNesterovConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }
}

impl SgdNesterovConfig {
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] =
        loractl_spec::optimizer_arg_names::SGD_NESTEROV;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let c = Self {
            momentum: a.f64("momentum", d.momentum)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
        };
        // torch: "Nesterov momentum requires a momentum and zero dampening".
        a.check(
            a.f64("dampening", 0.0)? == 0.0,
            "dampening",
            "must be 0 with Nesterov momentum (torch rejects anything else)",
        )?;
        a.check(
            c.momentum > 0.0,
            "momentum",
            "must be > 0 with Nesterov momentum",
        )?;
        a.check(c.weight_decay >= 0.0, "weight_decay", "must be >= 0")?;
        Ok(c)
    }
}

pub struct SgdNesterov {
    groups: Vec<ParamGroup>,
    /// torch creates the buffer at a parameter's first gradient.
    buf: Vec<Vec<Option<Tensor>>>,
    cfg: SgdNesterovConfig,
}

impl SgdNesterov {
    pub fn new(groups: Vec<ParamGroup>, cfg: SgdNesterovConfig) -> Result<Self> {
        let buf = groups.iter().map(|g| vec![None; g.vars.len()]).collect();
        Ok(Self { groups, buf, cfg })
    }
}

impl Optimizer for SgdNesterov {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        let c = &self.cfg;
        for (gi, group) in self.groups.iter().enumerate() {
            let lr = lrs[gi];
            for (pi, var) in group.vars.iter().enumerate() {
                let Some(mut d) = grad_of(grads, var)? else {
                    continue;
                };
                let p = value_of(var)?;
                if c.weight_decay != 0.0 {
                    d = (d + (&p * c.weight_decay)?)?;
                }
                let b = match &self.buf[gi][pi] {
                    None => d.copy()?,
                    Some(b) => ((b * c.momentum)? + &d)?,
                };
                let step = (&d + (&b * c.momentum)?)?;
                assign(var, &(p - (step * lr)?)?)?;
                self.buf[gi][pi] = Some(b);
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        for (g, bufs) in self.groups.iter().zip(&self.buf) {
            for (i, b) in bufs.iter().enumerate() {
                if let Some(b) = b {
                    tensors.insert(slot_key(&g.name, i, "momentum_buffer"), b.clone());
                }
            }
        }
        Ok(OptimizerState {
            tensors,
            scalars: json!({ "optimizer": self.name() }),
        })
    }

    fn load_state(&mut self, s: OptimizerState) -> Result<()> {
        Scalars::new(self.name(), &s.scalars)?;
        let mut tin = TensorsIn::new(self.name(), s.tensors);
        let mut buf = Vec::new();
        for g in &self.groups {
            let mut row = Vec::new();
            for (i, v) in g.vars.iter().enumerate() {
                let key = slot_key(&g.name, i, "momentum_buffer");
                row.push(tin.take_opt(&key, v.dims(), DType::F32, v.device())?);
            }
            buf.push(row);
        }
        tin.finish()?;
        self.buf = buf;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "SGDNesterov"
    }
}
