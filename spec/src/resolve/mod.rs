//! Validation and the resolved (typed, effective) view of a job spec. Both come out of one pass,
//! [`JobSpec::resolved`], so every rule lives in one place: it reports every problem with its
//! key path and a fix, and otherwise yields [`ResolvedSpec`] with kohya's effective values.
//!
//! - `choices` — the named choices (optimizer, scheduler, precisions, loss, sampler).
//! - `types` — [`ResolvedSpec`] and the values it is made of.
//! - `rules` — the checks, section by section, and the numeric [`limits`].
//!
//! This file runs them and holds the reporting helpers the rules share.

mod choices;
mod rules;
mod types;

pub use choices::{
    optimizer_arg_names, HuberSchedule, LossType, LrScheduler, MixedPrecision, OptimizerType,
    Sampler, SavePrecision,
};
pub use rules::limits;
pub use types::{
    Buckets, ConvLora, Gpus, KohyaArgs, Loss, ResolvedDataset, ResolvedModel, ResolvedOutput,
    ResolvedResources, ResolvedSample, ResolvedSpec, ResolvedTraining, TrainLength, WarmupSpec,
};

use crate::error::{SpecError, SpecErrors, SpecWarning};
use crate::spec::JobSpec;
use crate::suggest::closest;

impl JobSpec {
    /// Checks everything and returns every problem found, each with its key path and a fix.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        self.resolved().map(|_| ())
    }

    /// Validates and works out the effective values (kohya's defaults and implications).
    pub fn resolved(&self) -> Result<ResolvedSpec, SpecErrors> {
        let mut c = Checker::default();
        let resolved = c.check(self);
        match resolved {
            Some(r) if c.errors.is_empty() => Ok(ResolvedSpec {
                warnings: c.warnings,
                ..r
            }),
            _ => Err(SpecErrors(c.errors)),
        }
    }

    /// Non-blocking remarks about the spec (empty if it does not validate).
    pub fn warnings(&self) -> Vec<SpecWarning> {
        self.resolved().map(|r| r.warnings).unwrap_or_default()
    }
}

#[derive(Default)]
struct Checker {
    errors: Vec<SpecError>,
    warnings: Vec<SpecWarning>,
}

impl Checker {
    fn err(&mut self, path: &str, problem: impl Into<String>, fix: impl Into<String>) {
        self.errors.push(SpecError {
            path: path.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(SpecWarning {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// A value among fixed names; reports the closest name or the list.
    fn choice<T: Copy>(
        &mut self,
        path: &str,
        text: &str,
        parse: impl Fn(&str) -> Option<T>,
        names: impl Iterator<Item = &'static str> + Clone,
    ) -> Option<T> {
        let parsed = parse(text);
        if parsed.is_none() {
            let fix = match closest(text, names.clone()) {
                Some(name) => format!("did you mean `{name}`?"),
                None => format!("use one of: {}", names.collect::<Vec<_>>().join(", ")),
            };
            self.err(path, format!("unknown value `{text}`"), fix);
        }
        parsed
    }

    /// A count of steps or epochs between events: 1..=max.
    fn interval(&mut self, path: &str, value: u64, max: u64, fix: &str) {
        self.nonzero(path, value, fix);
        self.at_most_u(path, value, 1, max, fix);
    }

    fn nonzero(&mut self, path: &str, value: u64, fix: &str) {
        if value == 0 {
            self.err(path, "must be at least 1, got 0", fix);
        }
    }

    fn non_negative(&mut self, path: &str, value: f64, fix: &str) -> bool {
        let ok = value.is_finite() && value >= 0.0;
        if !ok {
            self.err(
                path,
                format!("must be a finite number >= 0, got {value}"),
                fix,
            );
        }
        ok
    }

    fn positive(&mut self, path: &str, value: f64, fix: &str) -> bool {
        let ok = value.is_finite() && value > 0.0;
        if !ok {
            self.err(
                path,
                format!("must be a finite number > 0, got {value}"),
                fix,
            );
        }
        ok
    }

    /// An integer option's range, `min..=max`, checked after [`Checker::nonzero`] (so 0 keeps
    /// its own message).
    fn at_most_u(&mut self, path: &str, value: u64, min: u64, max: u64, fix: &str) -> bool {
        let ok = value <= max;
        if !ok {
            self.err(
                path,
                format!("must be between {min} and {max}, got {value}"),
                fix,
            );
        }
        ok
    }

    /// A number's upper bound, checked after [`Checker::non_negative`] or [`Checker::positive`].
    fn at_most(&mut self, path: &str, value: f64, max: f64, fix: &str) -> bool {
        let ok = !value.is_finite() || value <= max;
        if !ok {
            self.err(
                path,
                format!("must be between 0 and {max}, got {value}"),
                fix,
            );
        }
        ok
    }

    fn rate(&mut self, path: &str, value: f64) {
        if !(0.0..=1.0).contains(&value) {
            self.err(
                path,
                format!("is a probability and must be between 0 and 1, got {value}"),
                "use e.g. 0.1 for 10%",
            );
        }
    }

    fn file_stem(&mut self, path: &str, value: &str) {
        if value.trim().is_empty() {
            self.err(path, "is empty", "give a name such as \"zenny\"");
        } else if value.contains(['/', '\\']) || value == "." || value == ".." {
            self.err(
                path,
                format!("`{value}` is used as a file name and must not contain path separators"),
                "put directories in output.output_dir",
            );
        } else if value.chars().any(char::is_control) {
            self.err(
                path,
                format!("{value:?} is used as a file name and must not contain NUL or other control characters"),
                "use letters, digits, `-` and `_`",
            );
        } else if value.len() > limits::NAME_BYTES {
            self.err(
                path,
                format!(
                    "is {} bytes long; file names made from it must fit in 255 bytes",
                    value.len()
                ),
                format!("use at most {} bytes", limits::NAME_BYTES),
            );
        }
    }
}
