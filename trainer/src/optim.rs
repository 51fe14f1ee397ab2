//! Optimizers over LoRA variables. AdamW follows `torch.optim.AdamW` (decoupled weight decay,
//! bias-corrected moments, eps added after the square root).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// AdamW hyper-parameters (torch defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW with f32 moments held beside each variable.
pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
    pub cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|p| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            m,
            v,
            steps: 0,
            cfg,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update; a variable without a gradient in `grads` is left unchanged.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let c = &self.cfg;
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for ((p, m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let nm = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let nv = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((nv.sqrt()? / bc2.sqrt())? + c.eps)?;
            let decayed = (p.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            let upd = (nm.div(&denom)? * (c.lr / bc1))?;
            p.set(&(decayed - upd)?)?;
            *m = nm;
            *v = nv;
        }
        Ok(())
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
        Ok(())
    }
}
