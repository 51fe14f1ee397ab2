//! The named choices of a job spec (optimizer, scheduler, precision, loss, sampler), each
//! with the name sd-scripts gives it.

use std::fmt;

macro_rules! choices {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as written in a job spec (and in sd-scripts).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub(crate) fn names() -> impl Iterator<Item = &'static str> + Clone {
                Self::ALL.iter().map(|v| v.as_str())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// The name as validation reads it; the error lists the names.
        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, String> {
                Self::parse(text).ok_or_else(|| {
                    format!(
                        "unknown value `{text}`: use one of: {}",
                        Self::names().collect::<Vec<_>>().join(", ")
                    )
                })
            }
        }
    };
}

choices! {
    /// sd-scripts' optimizer names (Python class paths aside). Validation refuses the ones the
    /// trainer does not implement yet ([`OptimizerType::is_implemented`]) with a sentence saying
    /// so, so a job that validates is a job the trainer runs.
    OptimizerType {
        AdamW = "AdamW",
        AdamW8bit = "AdamW8bit",
        PagedAdamW = "PagedAdamW",
        PagedAdamW8bit = "PagedAdamW8bit",
        PagedAdamW32bit = "PagedAdamW32bit",
        Lion = "Lion",
        Lion8bit = "Lion8bit",
        PagedLion8bit = "PagedLion8bit",
        SgdNesterov = "SGDNesterov",
        SgdNesterov8bit = "SGDNesterov8bit",
        /// DAdaptAdamPreprint; `DAdaptAdamPreprint` is accepted as an alias.
        DAdaptation = "DAdaptation",
        DAdaptAdaGrad = "DAdaptAdaGrad",
        DAdaptAdam = "DAdaptAdam",
        DAdaptAdan = "DAdaptAdan",
        DAdaptAdanIp = "DAdaptAdanIP",
        DAdaptLion = "DAdaptLion",
        DAdaptSgd = "DAdaptSGD",
        Prodigy = "Prodigy",
        Adafactor = "Adafactor",
        AdamWScheduleFree = "AdamWScheduleFree",
        RAdamScheduleFree = "RAdamScheduleFree",
        SgdScheduleFree = "SGDScheduleFree",
    }
}

impl OptimizerType {
    /// sd-scripts matches optimizer names case-insensitively.
    pub fn parse(text: &str) -> Option<Self> {
        if text.eq_ignore_ascii_case("DAdaptAdamPreprint") {
            return Some(Self::DAdaptation);
        }
        Self::ALL
            .iter()
            .copied()
            .find(|o| o.as_str().eq_ignore_ascii_case(text))
    }

    /// D-Adaptation and Prodigy estimate the step size; `learning_rate` is a multiplier (~1).
    pub fn is_adaptive(self) -> bool {
        use OptimizerType::*;
        matches!(
            self,
            DAdaptation
                | DAdaptAdaGrad
                | DAdaptAdam
                | DAdaptAdan
                | DAdaptAdanIp
                | DAdaptLion
                | DAdaptSgd
                | Prodigy
        )
    }

    /// The `optimizer_args` names this optimizer takes, or `None` when loractl does not
    /// implement it yet. The lists are those of the Python packages sd-scripts builds each
    /// optimizer from; the trainer reads them from here.
    pub fn arg_names(self) -> Option<&'static [&'static str]> {
        use optimizer_arg_names as a;
        use OptimizerType::*;
        Some(match self {
            AdamW => a::ADAMW,
            AdamW8bit => a::ADAMW8BIT,
            Lion => a::LION,
            SgdNesterov => a::SGD_NESTEROV,
            DAdaptAdam => a::DADAPT_ADAM,
            Prodigy => a::PRODIGY,
            Adafactor => a::ADAFACTOR,
            _ => return None,
        })
    }

    /// Whether the trainer implements this optimizer.
    pub fn is_implemented(self) -> bool {
        self.arg_names().is_some()
    }

    /// The optimizers the trainer implements, as sd-scripts spells them.
    pub fn implemented() -> impl Iterator<Item = OptimizerType> + Clone {
        Self::ALL.iter().copied().filter(|o| o.is_implemented())
    }

    /// Schedule-free optimizers run without an LR scheduler.
    pub fn is_schedule_free(self) -> bool {
        use OptimizerType::*;
        matches!(
            self,
            AdamWScheduleFree | RAdamScheduleFree | SgdScheduleFree
        )
    }
}

/// The `optimizer_args` each implemented optimizer accepts (the keyword arguments of the class
/// sd-scripts builds: torch's AdamW and SGD, bitsandbytes' AdamW8bit, lion-pytorch, dadaptation's
/// DAdaptAdam, prodigyopt, transformers' Adafactor), less the learning rate, which comes from
/// the spec. One list per optimizer, read by validation and by the trainer's optimizer builder.
pub mod optimizer_arg_names {
    pub const ADAMW: &[&str] = &["betas", "eps", "weight_decay", "amsgrad"];
    pub const ADAMW8BIT: &[&str] = &["betas", "eps", "weight_decay", "min_8bit_size"];
    pub const LION: &[&str] = &["betas", "weight_decay", "decoupled_weight_decay"];
    pub const SGD_NESTEROV: &[&str] = &["momentum", "weight_decay", "dampening"];
    pub const DADAPT_ADAM: &[&str] = &[
        "betas",
        "eps",
        "weight_decay",
        "decouple",
        "use_bias_correction",
        "d0",
        "growth_rate",
        "log_every",
    ];
    pub const PRODIGY: &[&str] = &[
        "betas",
        "beta3",
        "eps",
        "weight_decay",
        "decouple",
        "use_bias_correction",
        "safeguard_warmup",
        "d0",
        "d_coef",
        "growth_rate",
        "slice_p",
    ];
    pub const ADAFACTOR: &[&str] = &[
        "eps",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "scale_parameter",
        "relative_step",
        "warmup_init",
    ];
}

choices! {
    /// Learning-rate schedules (diffusers' `get_scheduler` names).
    LrScheduler {
        Linear = "linear",
        Cosine = "cosine",
        CosineWithRestarts = "cosine_with_restarts",
        Polynomial = "polynomial",
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
    }
}

choices! {
    MixedPrecision {
        No = "no",
        Fp16 = "fp16",
        Bf16 = "bf16",
    }
}

choices! {
    /// dtype of the saved LoRA file.
    SavePrecision {
        Fp16 = "fp16",
        Bf16 = "bf16",
        Float = "float",
    }
}

choices! {
    LossType {
        L2 = "l2",
        L1 = "l1",
        Huber = "huber",
        SmoothL1 = "smooth_l1",
    }
}

choices! {
    /// How the Huber parameter varies with the timestep (sd-scripts' `huber_schedule`).
    HuberSchedule {
        Constant = "constant",
        Exponential = "exponential",
        Snr = "snr",
    }
}

choices! {
    /// Preview-image samplers.
    Sampler {
        Ddim = "ddim",
        Euler = "euler",
        EulerA = "euler_a",
    }
}

impl Sampler {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        // sd-scripts treats the k_ names as the same samplers.
        let text = text.strip_prefix("k_").unwrap_or(text);
        Self::ALL.iter().copied().find(|s| s.as_str() == text)
    }
}

macro_rules! exact_parse {
    ($($name:ident),+) => {$(
        impl $name {
            pub(crate) fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == text)
            }
        }
    )+};
}
exact_parse!(
    LrScheduler,
    MixedPrecision,
    SavePrecision,
    LossType,
    HuberSchedule
);
