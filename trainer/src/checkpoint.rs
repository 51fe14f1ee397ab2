//! Gradient checkpointing: a block runs forward without keeping its activations and runs again
//! in backward to produce its gradients (kohya's `gradient_checkpointing`, as
//! `torch.utils.checkpoint` does it).
//!
//! The block becomes one graph node with three inputs: its input `x`, its conditioning `c`
//! (time embedding or text context) and the block's LoRA tensors concatenated into one flat
//! tensor, so the outer backward hands each LoRA tensor its slice of the block's gradient.
//! The recomputation builds the block's graph on fresh copies of `x` and `c`, runs backward
//! from the incoming gradient and returns the gradients of `x`, `c` and the LoRA tensors.

use candle_core::{Tensor, Var};

use crate::nn::attach_grad3;
use crate::Result;

type BlockFn = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// `f(x, c)` with its activations recomputed in backward. `params` are the LoRA tensors `f`
/// uses (any it does not use get zero gradients).
pub fn checkpoint(
    x: &Tensor,
    c: &Tensor,
    params: Vec<Tensor>,
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let tracked = x.track_op() || c.track_op() || params.iter().any(|p| p.track_op());
    if !tracked {
        return Ok(f(x, c)?);
    }
    let f: Box<BlockFn> = Box::new(f);
    let (xd, cd) = (x.detach(), c.detach());
    // Built with a graph (the LoRA tensors are variables) and dropped at once.
    let y = f(&xd, &cd)?.detach();
    let flat = match params.is_empty() {
        true => Tensor::zeros(1, x.dtype(), x.device())?,
        false => {
            let parts = params
                .iter()
                .map(|p| p.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        }
    };
    attach_grad3([x, c, &flat], y, move |g, need| {
        let xv = Var::from_tensor(&xd)?;
        let cv = Var::from_tensor(&cd)?;
        let y = f(xv.as_tensor(), cv.as_tensor())?;
        let grads = (y * g)?.sum_all()?.backward()?;
        let dx = match need[0] {
            true => grads.get(xv.as_tensor()).cloned(),
            false => None,
        };
        let dc = match need[1] {
            true => grads.get(cv.as_tensor()).cloned(),
            false => None,
        };
        let dp = match need[2] && !params.is_empty() {
            true => {
                let parts = params
                    .iter()
                    .map(|p| match grads.get(p) {
                        Some(g) => g.flatten_all(),
                        None => Tensor::zeros(p.elem_count(), p.dtype(), p.device()),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(Tensor::cat(&parts, 0)?)
            }
            false => None,
        };
        Ok([dx, dc, dp])
    })
}

#[cfg(test)]
mod tests {
    use crate::bench::BenchModel;
    use candle_core::Device;

    #[test]
    fn checkpointed_unet_gives_the_same_lora_gradients() -> anyhow::Result<()> {
        let model = BenchModel::build("tiny", 4, 4.0, &Device::Cpu)?;
        let inputs = model.inputs(2)?;
        let plain = model.loss(&inputs, 3)?;
        let plain_grads = plain.backward()?;
        model.set_gradient_checkpointing(true);
        let ckpt = model.loss(&inputs, 3)?;
        assert_eq!(plain.to_scalar::<f32>()?, ckpt.to_scalar::<f32>()?);
        let ckpt_grads = ckpt.backward()?;
        let mut nonzero = 0;
        for v in model.vars() {
            let (a, b) = match (plain_grads.get(v), ckpt_grads.get(v)) {
                (Some(a), Some(b)) => (a, b),
                _ => anyhow::bail!("a LoRA tensor has no gradient"),
            };
            let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale.max(1e-6),
                "gradient differs by {diff} (scale {scale})"
            );
            nonzero += usize::from(scale > 0.0);
        }
        assert_eq!(
            nonzero,
            model.vars().len(),
            "every LoRA tensor has a gradient"
        );
        Ok(())
    }
}
