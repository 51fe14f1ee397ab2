//! DDPM schedule parity with diffusers' `DDPMScheduler` (`sched.*` in the fixtures'
//! reference.safetensors, from scripts/fixtures/make_fixtures.py) and min-SNR weights against
//! the formula sd-scripts applies.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use loractl_trainer::schedule::{Arithmetic, DdpmSchedule, Prediction};

mod support;
use support::{load_tensors, max_abs_diff_as, model_fixture};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs_diff_as(a, b, DType::F64)
}

fn max_rel_diff(got: &Tensor, want: &Tensor) -> Result<f64> {
    let want = want.to_dtype(DType::F64)?;
    let rel = ((got.to_dtype(DType::F64)? - &want)? / want)?;
    Ok(rel.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn max_abs_f64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn sd_schedule_matches_diffusers_fixtures() -> Result<()> {
    let torch = DdpmSchedule::sd()?;
    assert_eq!(torch.arithmetic(), Arithmetic::TorchF32);
    let exact = DdpmSchedule::sd()?.with_arithmetic(Arithmetic::F64)?;
    let all_t = Tensor::arange(0i64, 1000, &Device::Cpu)?;
    let mut checked = 0;
    for (config, prediction) in [("sd1", Prediction::Epsilon), ("sd2", Prediction::V)] {
        let dir = model_fixture(config);
        let r = load_tensors(&dir.join("reference.safetensors"))?;
        let get = |k: &str| support::get(&r, k).with_context(|| format!("{config} fixture"));
        let vec64 =
            |k: &str| -> Result<Vec<f64>> { Ok(get(k)?.to_dtype(DType::F64)?.to_vec1::<f64>()?) };

        // diffusers' own float32 ᾱ and the f64 computation of the same formula.
        let err_ac = max_abs_f64(torch.alphas_cumprod(), &vec64("sched.alphas_cumprod")?);
        let err_ac64 = max_abs_f64(exact.alphas_cumprod(), &vec64("sched.alphas_cumprod_f64")?);
        let (x0, noise, t) = (
            get("sched.x0")?,
            get("sched.noise")?,
            get("sched.timesteps")?,
        );
        let err_noisy = max_abs_diff(&torch.add_noise(x0, noise, t)?, get("sched.noisy")?)?;
        let err_v = max_abs_diff(&torch.velocity(x0, noise, t)?, get("sched.velocity")?)?;
        let err_snr = max_rel_diff(&torch.snr(&all_t)?, get("sched.snr")?)?;
        let err_snr64 = max_rel_diff(&exact.snr(&all_t)?, get("sched.snr_f64")?)?;
        eprintln!(
            "{config}: alphas_cumprod {err_ac:.3e} (f64 {err_ac64:.3e}), add_noise {err_noisy:.3e}, \
             velocity {err_v:.3e}, snr rel {err_snr:.3e} (f64 {err_snr64:.3e})"
        );
        anyhow::ensure!(err_ac <= 1e-12, "alphas_cumprod max abs err {err_ac}");
        anyhow::ensure!(
            err_ac64 <= 1e-12,
            "alphas_cumprod_f64 max abs err {err_ac64}"
        );
        anyhow::ensure!(err_noisy <= 1e-6, "add_noise max abs err {err_noisy}");
        anyhow::ensure!(err_v <= 1e-6, "velocity max abs err {err_v}");
        // snr() rounds to f32 at the end: relative error of a few f32 ulps.
        anyhow::ensure!(err_snr <= 1e-6, "snr max rel err {err_snr}");
        anyhow::ensure!(err_snr64 <= 1e-6, "snr_f64 max rel err {err_snr64}");

        let json = std::fs::read_to_string(dir.join("diffusers/scheduler/scheduler_config.json"))?;
        let from_config = DdpmSchedule::from_scheduler_config(&json)?;
        assert_eq!(from_config.prediction(), prediction);
        assert_eq!(from_config.alphas_cumprod(), torch.alphas_cumprod());
        checked += 1;
    }
    assert_eq!(checked, 2);
    Ok(())
}

#[test]
fn min_snr_weights_follow_the_formula() -> Result<()> {
    let schedule = DdpmSchedule::sd()?;
    let ac = schedule.alphas_cumprod();
    let ts: Vec<i64> = vec![0, 1, 50, 200, 499, 500, 800, 999];
    let t = Tensor::new(ts.as_slice(), &Device::Cpu)?;
    for gamma in [1.0, 5.0, 20.0] {
        for v in [false, true] {
            let got = schedule.min_snr_weight(&t, gamma, v)?.to_vec1::<f32>()?;
            for (&ti, &w) in ts.iter().zip(&got) {
                let snr = ac[ti as usize] / (1.0 - ac[ti as usize]);
                let want = snr.min(gamma) / if v { snr + 1.0 } else { snr };
                let err = (f64::from(w) - want).abs();
                assert!(
                    err <= 1e-6 * want.max(1.0),
                    "t={ti} γ={gamma} v={v}: {w} vs {want}"
                );
            }
        }
    }
    // ε-prediction weights are 1 where SNR is below γ (late timesteps), γ/SNR above it.
    let w = schedule.min_snr_weight(&t, 5.0, false)?.to_vec1::<f32>()?;
    assert!((w[7] - 1.0).abs() < 1e-6 && w[0] < 0.01);
    assert!(schedule.min_snr_weight(&t, 0.0, false).is_err());
    Ok(())
}

#[test]
fn noising_is_per_sample_and_differentiable() -> Result<()> {
    let schedule = DdpmSchedule::sd()?.with_prediction(Prediction::V);
    let dev = Device::Cpu;
    let x0 = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4, 2, 2), &dev)?)?;
    let noise = Tensor::randn(0f32, 1., (3, 4, 2, 2), &dev)?;
    let t = Tensor::new(&[10u32, 500, 990], &dev)?;
    let noisy = schedule.add_noise(x0.as_tensor(), &noise, &t)?;
    let ac = schedule.alphas_cumprod();
    for (i, &ti) in [10usize, 500, 990].iter().enumerate() {
        let want =
            ((x0.as_tensor().get(i)? * ac[ti].sqrt())? + (noise.get(i)? * (1.0 - ac[ti]).sqrt())?)?;
        assert!(max_abs_diff(&noisy.get(i)?, &want)? < 1e-6);
    }
    // d(sum noisy)/d x0 = sqrt(ᾱ_t) for each sample.
    let grads = noisy.sum_all()?.backward()?;
    let g = grads.get(x0.as_tensor()).context("no gradient for x0")?;
    for (i, &ti) in [10usize, 500, 990].iter().enumerate() {
        let gi = g.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(gi
            .iter()
            .all(|&v| (f64::from(v) - ac[ti].sqrt()).abs() < 1e-6));
    }
    let target = schedule.target(x0.as_tensor(), &noise, &t)?;
    let v = schedule.velocity(x0.as_tensor(), &noise, &t)?;
    assert_eq!(max_abs_diff(&target, &v)?, 0.0);
    Ok(())
}
