//! Seeded random numbers drawn on the host (ChaCha8), so a run gives the same noise on any
//! device and its generator state can be saved and restored for bit-identical resumes.

use candle_core::{Device, Shape, Tensor};
use rand::Rng;

use crate::Result;

/// `n` independent N(0, 1) values (Box–Muller).
pub fn standard_normal<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// An f32 tensor of N(0, 1) values drawn from `rng`.
pub fn randn<R: Rng + ?Sized>(
    rng: &mut R,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let v = standard_normal(rng, shape.elem_count());
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn standard_normal_moments() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let v = standard_normal(&mut rng, 100_001);
        assert_eq!(v.len(), 100_001);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
