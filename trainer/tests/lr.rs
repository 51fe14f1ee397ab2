//! lr schedules against transformers 4.57.1's schedulers as sd-scripts' `get_scheduler_fix`
//! calls them (fixtures lr.json / lr.safetensors from scripts/fixtures/make_optim_fixtures.py):
//!
//! ```python
//! opt = torch.optim.SGD([{"params": [p0], "lr": 1e-3}, {"params": [p1], "lr": 5e-4}], lr=1e-3)
//! sch = get_cosine_with_hard_restarts_schedule_with_warmup(opt, num_warmup_steps=w,
//!                                                          num_training_steps=n, num_cycles=c)
//! for s in range(n + 5):
//!     rows.append([g["lr"] for g in opt.param_groups]); opt.step(); sch.step()
//! ```
//! (likewise `get_constant_schedule`, `..._with_warmup`, linear, cosine and polynomial with
//! `power`; polynomial's lr_init is the optimizer's default lr, 1e-3.)

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use loractl_trainer::lr::{parse_warmup, LrScheduler, SchedulerKind};
use serde_json::Value;

#[test]
fn schedules_match_transformers() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim");
    let path = dir.join("lr.safetensors");
    ensure!(path.exists(), "fixture {} missing", path.display());
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("lr.json"))?)?;
    let base: Vec<f64> = cfg["base_lrs"]
        .as_array()
        .context("base_lrs")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let mut worst = 0f64;
    let mut kinds = Vec::new();
    for c in cfg["cases"].as_array().context("cases")? {
        let name = c["name"].as_str().context("name")?;
        let kind = c["kind"].as_str().context("kind")?;
        let s = LrScheduler::new(
            kind.parse().map_err(anyhow::Error::msg)?,
            base.clone(),
            c["warmup"].as_u64().context("warmup")? as usize,
            c["total"].as_u64().context("total")? as usize,
            c["num_cycles"].as_u64().context("cycles")? as usize,
            c["power"].as_f64().context("power")?,
        )?
        .with_lr_init(base[0])?;
        let want = t
            .get(name)
            .with_context(|| name.to_string())?
            .to_vec2::<f64>()?;
        for (step, row) in want.iter().enumerate() {
            let got = s.lr(step);
            for (a, b) in got.iter().zip(row) {
                let err = (a - b).abs() / b.abs().max(1e-12);
                ensure!(
                    err < 1e-12,
                    "{name} ({kind}) step {step}: {got:?} vs {row:?}"
                );
                worst = worst.max(err);
            }
        }
        kinds.push(s.kind());
    }
    for k in SchedulerKind::ALL {
        ensure!(kinds.contains(k), "no fixture for {k}");
    }
    println!("schedules: max relative error {worst:.3e}");
    Ok(())
}

/// sd-scripts' `int_or_float` + `int(frac * num_training_steps)`.
#[test]
fn warmup_values_as_sd_scripts_reads_them() -> Result<()> {
    assert_eq!(parse_warmup("100", 1600)?, 100);
    assert_eq!(parse_warmup("0.05", 1600)?, 80);
    assert_eq!(parse_warmup("5%", 1600)?, 80);
    assert_eq!(parse_warmup("100%", 10)?, 10);
    assert!(parse_warmup("2.5", 1600).is_err());
    Ok(())
}

/// sd-scripts stops on a warmup with plain `constant`; we run it as constant_with_warmup.
#[test]
fn constant_with_a_warmup_warms_up() -> Result<()> {
    let s = LrScheduler::new(SchedulerKind::Constant, vec![1e-4], 10, 100, 1, 1.0)?;
    assert_eq!(s.kind(), SchedulerKind::ConstantWithWarmup);
    assert_eq!(s.lr(0), vec![0.0]);
    assert!((s.lr(5)[0] - 5e-5).abs() < 1e-18);
    assert_eq!(s.lr(10), vec![1e-4]);
    assert_eq!(s.lr(1000), vec![1e-4]);
    Ok(())
}
