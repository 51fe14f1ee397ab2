//! Learning-rate schedules as sd-scripts builds them from transformers' `get_scheduler`
//! (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial), counted in
//! optimizer steps, plus sd-scripts' `lr_warmup_steps` syntax ("25", "0.1", "10%").
//!
//! Step `s` (0-based) is the s-th optimizer step: transformers' `LambdaLR` starts at `lambda(0)`
//! and the training loop calls `scheduler.step()` after each `optimizer.step()`, so the first
//! step of a warmup runs at lr 0, as in sd-scripts.

use crate::{Error, Result};

/// The schedules sd-scripts takes as `lr_scheduler`: the job spec's choice, passed through.
pub use loractl_spec::LrScheduler as SchedulerKind;

/// transformers' polynomial schedule ends at this lr.
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// A schedule over parameter groups: `lr(step)[i] = base_lrs[i] · lambda(step)`.
#[derive(Debug, Clone)]
pub struct LrScheduler {
    kind: SchedulerKind,
    base_lrs: Vec<f64>,
    warmup_steps: usize,
    total_steps: usize,
    num_cycles: usize,
    power: f64,
    lr_init: f64,
}

impl LrScheduler {
    /// `kind` as sd-scripts' `lr_scheduler`. `num_cycles` (`lr_scheduler_num_cycles`, default 1)
    /// is used by cosine_with_restarts only — sd-scripts gives plain cosine transformers' default
    /// half wave. `power` (`lr_scheduler_power`, default 1) is polynomial's.
    ///
    /// A warmup with plain `constant` is an error in sd-scripts ("constant does not require
    /// num_warmup_steps"); here it is accepted as `constant_with_warmup`, with a warning.
    pub fn new(
        kind: SchedulerKind,
        base_lrs: Vec<f64>,
        warmup_steps: usize,
        total_steps: usize,
        num_cycles: usize,
        power: f64,
    ) -> Result<Self> {
        let mut kind = kind;
        if kind == SchedulerKind::Constant && warmup_steps > 0 {
            tracing::warn!(
                warmup_steps,
                "lr_scheduler `constant` with a warmup: using constant_with_warmup (sd-scripts \
                 would stop with \"constant does not require num_warmup_steps\")"
            );
            kind = SchedulerKind::ConstantWithWarmup;
        }
        if base_lrs.iter().any(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(Error::Config(format!(
                "learning rates must be finite and >= 0, got {base_lrs:?}"
            )));
        }
        let decays = !matches!(
            kind,
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup
        );
        if decays && warmup_steps > total_steps {
            return Err(Error::Config(format!(
                "lr_warmup_steps ({warmup_steps}) exceeds the {total_steps} training steps"
            )));
        }
        if !power.is_finite() {
            return Err(Error::Config(format!(
                "lr_scheduler_power must be finite, got {power}"
            )));
        }
        let lr_init = base_lrs.iter().copied().fold(0.0, f64::max);
        let s = Self {
            kind,
            base_lrs,
            warmup_steps,
            total_steps,
            num_cycles,
            power,
            lr_init,
        };
        s.check_lr_init()?;
        Ok(s)
    }

    /// polynomial decays `(lr_init - 1e-7)·(1-progress)^power + 1e-7` and scales each group by
    /// `base_lr / lr_init`, where transformers' `lr_init` is the optimizer's default lr
    /// (sd-scripts' `learning_rate`). Defaults to the largest base lr; set it when `unet_lr` /
    /// `text_encoder_lr` differ from `learning_rate`.
    pub fn with_lr_init(mut self, lr_init: f64) -> Result<Self> {
        self.lr_init = lr_init;
        self.check_lr_init()?;
        Ok(self)
    }

    fn check_lr_init(&self) -> Result<()> {
        if self.kind == SchedulerKind::Polynomial
            && (self.lr_init.is_nan() || self.lr_init <= POLYNOMIAL_LR_END)
        {
            return Err(Error::Config(format!(
                "polynomial lr_scheduler: the learning rate ({}) must be larger than its end lr \
                 {POLYNOMIAL_LR_END}",
                self.lr_init
            )));
        }
        Ok(())
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    pub fn base_lrs(&self) -> &[f64] {
        &self.base_lrs
    }

    /// The multiplier of the base lrs at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        let (w, n) = (self.warmup_steps, self.total_steps);
        let warm = |s: usize| s as f64 / w.max(1) as f64;
        let progress = |s: usize| (s - w) as f64 / n.saturating_sub(w).max(1) as f64;
        match self.kind {
            SchedulerKind::Constant => 1.0,
            _ if step < w => warm(step),
            SchedulerKind::ConstantWithWarmup => 1.0,
            SchedulerKind::Linear => {
                (0f64).max((n as f64 - step as f64) / n.saturating_sub(w).max(1) as f64)
            }
            SchedulerKind::Cosine => {
                let p = progress(step);
                (0f64).max(0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * p).cos()))
            }
            SchedulerKind::CosineWithRestarts => {
                let p = progress(step);
                if p >= 1.0 {
                    return 0.0;
                }
                let c = self.num_cycles as f64;
                (0f64).max(0.5 * (1.0 + (std::f64::consts::PI * ((c * p) % 1.0)).cos()))
            }
            SchedulerKind::Polynomial => {
                let (lr_init, lr_end) = (self.lr_init, POLYNOMIAL_LR_END);
                if step > n || n == w {
                    return lr_end / lr_init;
                }
                let pct_remaining = 1.0 - (step - w) as f64 / (n - w) as f64;
                let decay = (lr_init - lr_end) * pct_remaining.powf(self.power) + lr_end;
                decay / lr_init
            }
        }
    }

    /// The lr of each group at optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> Vec<f64> {
        let f = self.factor(step);
        self.base_lrs.iter().map(|b| b * f).collect()
    }
}

/// sd-scripts' `lr_warmup_steps`: an integer number of steps ("25"), a fraction of the training
/// steps when below 1 ("0.1"), or a percentage ("10%"); fractions are truncated like Python's
/// `int(frac * total)`.
pub fn parse_warmup(value: &str, total_steps: usize) -> Result<usize> {
    let v = value.trim();
    let bad = |why: &str| {
        Error::Config(format!(
            "lr_warmup_steps `{value}`: {why}; give a step count (25), a fraction of the \
             training steps below 1 (0.1) or a percentage (10%)"
        ))
    };
    let frac = if let Some(p) = v.strip_suffix('%') {
        let x: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
        x / 100.0
    } else {
        let x: f64 = v.parse().map_err(|_| bad("not a number"))?;
        if x >= 1.0 {
            // Python's int("2.5") fails: only whole step counts are accepted from 1 up.
            return v
                .parse::<usize>()
                .map_err(|_| bad("a step count must be a whole number"));
        }
        x
    };
    if !(frac.is_finite() && frac >= 0.0) {
        return Err(bad("must not be negative"));
    }
    Ok((frac * total_steps as f64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_syntax() {
        assert_eq!(parse_warmup("25", 1000).unwrap(), 25);
        assert_eq!(parse_warmup("0.1", 1000).unwrap(), 100);
        assert_eq!(parse_warmup("0.1", 25).unwrap(), 2);
        assert_eq!(parse_warmup("10%", 1000).unwrap(), 100);
        assert_eq!(parse_warmup("2.5%", 100).unwrap(), 2);
        assert_eq!(parse_warmup("0", 1000).unwrap(), 0);
        assert_eq!(parse_warmup("1", 1000).unwrap(), 1);
        for bad in ["1.5", "-3", "abc", "x%", "-1%"] {
            let e = parse_warmup(bad, 100).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn constant_with_warmup_is_accepted() {
        let s = LrScheduler::new(SchedulerKind::Constant, vec![1.0, 0.5], 4, 10, 1, 1.0).unwrap();
        assert_eq!(s.kind(), SchedulerKind::ConstantWithWarmup);
        assert_eq!(s.lr(0), vec![0.0, 0.0]);
        assert_eq!(s.lr(2), vec![0.5, 0.25]);
        assert_eq!(s.lr(4), vec![1.0, 0.5]);
        let s = LrScheduler::new(SchedulerKind::Constant, vec![1.0], 0, 10, 1, 1.0).unwrap();
        assert_eq!(s.kind(), SchedulerKind::Constant);
    }

    #[test]
    fn bad_inputs() {
        let e = "cosine_annealing".parse::<SchedulerKind>().unwrap_err();
        assert!(e.contains("cosine_with_restarts"), "{e}");
        assert!(LrScheduler::new(SchedulerKind::Linear, vec![1.0], 11, 10, 1, 1.0).is_err());
        assert!(LrScheduler::new(SchedulerKind::Polynomial, vec![1e-8], 0, 10, 1, 1.0).is_err());
    }
}
