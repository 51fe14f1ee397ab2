//! AdamW8bit as bitsandbytes' `bnb.optim.AdamW8bit` (what sd-scripts builds for `AdamW8bit`),
//! following its CUDA kernel (`kOptimizer2StateBlockwise`, `kOptimizer32bit2State`, 0.44+):
//!
//! - moments of a variable with >= `min_8bit_size` (4096) elements are stored as 8-bit codes in
//!   blocks of [`BLOCKSIZE`] = 256 elements (2048 before bitsandbytes 0.44), each block with an
//!   f32 absmax: the first moment in the signed dynamic map, the second in the unsigned one
//!   ([`dynamic_map`]), ~2 bytes per element instead of 8. Smaller variables keep f32 moments;
//! - each step dequantizes a block, updates m and v in f32, steps the parameter
//!   `p += -lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + eps·√(1-β2ᵗ))`, then `p *= 1 - lr·wd` (the kernel
//!   decays after the update, unlike torch's AdamW), takes the new block absmax and requantizes to
//!   the nearest code (binary search, ties as the kernel) keeping the sign of m;
//! - in 8-bit blocks an element whose gradient is NaN/inf gets zero moments and no update.
//!
//! bitsandbytes' CPU backend (0.50) quantizes through a 65536-bin lookup table that is not the
//! nearest code for small values, so its CPU results differ from its CUDA kernel; we follow the
//! kernel. The arithmetic runs on the host in f32 (LoRA-sized tensors; one copy each way per step).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use serde_json::json;

use super::args::Args;
use super::{
    assign, check_lrs, grad_of, slot_key, steps_from_json, steps_json, value_of, Optimizer,
    OptimizerState, ParamGroup, Scalars, TensorsIn,
};
use crate::Result;

/// Elements per quantization block of the 8-bit moments (bitsandbytes >= 0.44).
pub const BLOCKSIZE: usize = 256;

/// bitsandbytes' `create_dynamic_map(signed)` (max_exponent_bits 7, 8 bits): for exponents
/// 10⁻⁶…10⁰, the midpoints of a linear split of [0.1, 1] (2ⁱ parts signed, 2ⁱ⁺¹ unsigned), both
/// signs when signed, plus 0 and 1; sorted. The values are bitsandbytes' own (0.50.2, written out
/// by scripts/fixtures/make_optim_fixtures.py's environment and checked against its fixture):
/// they go through `torch.linspace`'s float32 rounding, which is not worth re-deriving.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    if signed {
        SIGNED_MAP
    } else {
        UNSIGNED_MAP
    }
}

#[rustfmt::skip]
const SIGNED_MAP: [f32; 256] = [
    -9.9296874e-01, -9.789063e-01, -9.6484375e-01, -9.507812e-01, -9.3671876e-01, -9.2265624e-01,
    -9.085938e-01, -8.9453125e-01, -8.804687e-01, -8.6640626e-01, -8.5234374e-01, -8.382813e-01,
    -8.2421875e-01, -8.101562e-01, -7.9609376e-01, -7.8203124e-01, -7.679688e-01, -7.5390625e-01,
    -7.398437e-01, -7.2578126e-01, -7.117188e-01, -6.976563e-01, -6.8359375e-01, -6.695312e-01,
    -6.5546876e-01, -6.414063e-01, -6.273438e-01, -6.1328125e-01, -5.992187e-01, -5.8515626e-01,
    -5.710938e-01, -5.570313e-01, -5.4296875e-01, -5.289062e-01, -5.148437e-01, -5.0078124e-01,
    -4.867187e-01, -4.7265625e-01, -4.5859373e-01, -4.4453126e-01, -4.3046874e-01, -4.1640624e-01,
    -4.0234375e-01, -3.8828123e-01, -3.7421876e-01, -3.6015624e-01, -3.4609374e-01, -3.3203125e-01,
    -3.1796873e-01, -3.0390626e-01, -2.8984374e-01, -2.7578127e-01, -2.6171875e-01, -2.4765624e-01,
    -2.3359375e-01, -2.1953125e-01, -2.0546874e-01, -1.9140625e-01, -1.7734376e-01, -1.6328125e-01,
    -1.4921875e-01, -1.3515624e-01, -1.2109375e-01, -1.07031256e-01, -9.859375e-02, -9.578126e-02,
    -9.2968754e-02, -9.015625e-02, -8.734375e-02, -8.453125e-02, -8.171876e-02, -7.890625e-02,
    -7.609375e-02, -7.328125e-02, -7.0468746e-02, -6.7656256e-02, -6.484375e-02, -6.203125e-02,
    -5.9218753e-02, -5.640625e-02, -5.359375e-02, -5.078125e-02, -4.796875e-02, -4.515625e-02,
    -4.2343747e-02, -3.953125e-02, -3.6718752e-02, -3.390625e-02, -3.109375e-02, -2.8281251e-02,
    -2.546875e-02, -2.265625e-02, -1.9843752e-02, -1.703125e-02, -1.421875e-02, -1.140625e-02,
    -9.71875e-03, -9.156249e-03, -8.59375e-03, -8.03125e-03, -7.46875e-03, -6.90625e-03,
    -6.34375e-03, -5.78125e-03, -5.2187503e-03, -4.6562497e-03, -4.09375e-03, -3.5312497e-03,
    -2.96875e-03, -2.40625e-03, -1.84375e-03, -1.2812499e-03, -9.437501e-04, -8.3125e-04,
    -7.1875006e-04, -6.062501e-04, -4.9375003e-04, -3.8125002e-04, -2.6875004e-04, -1.5625001e-04,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06,
    -5.5000004e-07, 0.0e+00, 5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05,
    4.375e-05, 6.625e-05, 8.875e-05, 1.5625001e-04, 2.6875004e-04, 3.8125002e-04,
    4.9375003e-04, 6.062501e-04, 7.1875006e-04, 8.3125e-04, 9.437501e-04, 1.2812499e-03,
    1.84375e-03, 2.40625e-03, 2.96875e-03, 3.5312497e-03, 4.09375e-03, 4.6562497e-03,
    5.2187503e-03, 5.78125e-03, 6.34375e-03, 6.90625e-03, 7.46875e-03, 8.03125e-03,
    8.59375e-03, 9.156249e-03, 9.71875e-03, 1.140625e-02, 1.421875e-02, 1.703125e-02,
    1.9843752e-02, 2.265625e-02, 2.546875e-02, 2.8281251e-02, 3.109375e-02, 3.390625e-02,
    3.6718752e-02, 3.953125e-02, 4.2343747e-02, 4.515625e-02, 4.796875e-02, 5.078125e-02,
    5.359375e-02, 5.640625e-02, 5.9218753e-02, 6.203125e-02, 6.484375e-02, 6.7656256e-02,
    7.0468746e-02, 7.328125e-02, 7.609375e-02, 7.890625e-02, 8.171876e-02, 8.453125e-02,
    8.734375e-02, 9.015625e-02, 9.2968754e-02, 9.578126e-02, 9.859375e-02, 1.07031256e-01,
    1.2109375e-01, 1.3515624e-01, 1.4921875e-01, 1.6328125e-01, 1.7734376e-01, 1.9140625e-01,
    2.0546874e-01, 2.1953125e-01, 2.3359375e-01, 2.4765624e-01, 2.6171875e-01, 2.7578127e-01,
    2.8984374e-01, 3.0390626e-01, 3.1796873e-01, 3.3203125e-01, 3.4609374e-01, 3.6015624e-01,
    3.7421876e-01, 3.8828123e-01, 4.0234375e-01, 4.1640624e-01, 4.3046874e-01, 4.4453126e-01,
    4.5859373e-01, 4.7265625e-01, 4.867187e-01, 5.0078124e-01, 5.148437e-01, 5.289062e-01,
    5.4296875e-01, 5.570313e-01, 5.710938e-01, 5.8515626e-01, 5.992187e-01, 6.1328125e-01,
    6.273438e-01, 6.414063e-01, 6.5546876e-01, 6.695312e-01, 6.8359375e-01, 6.976563e-01,
    7.117188e-01, 7.2578126e-01, 7.398437e-01, 7.5390625e-01, 7.679688e-01, 7.8203124e-01,
    7.9609376e-01, 8.101562e-01, 8.2421875e-01, 8.382813e-01, 8.5234374e-01, 8.6640626e-01,
    8.804687e-01, 8.9453125e-01, 9.085938e-01, 9.2265624e-01, 9.3671876e-01, 9.507812e-01,
    9.6484375e-01, 9.789063e-01, 9.9296874e-01, 1.0e+00,
];

#[rustfmt::skip]
const UNSIGNED_MAP: [f32; 256] = [
    0.0e+00, 3.2500003e-07, 7.75e-07, 2.1249998e-06, 4.3749997e-06, 6.625e-06,
    8.874999e-06, 1.5624999e-05, 2.6875001e-05, 3.8125e-05, 4.9374998e-05, 6.0625003e-05,
    7.1875e-05, 8.312499e-05, 9.4375e-05, 1.28125e-04, 1.84375e-04, 2.4062501e-04,
    2.9687502e-04, 3.5312498e-04, 4.0937503e-04, 4.6562502e-04, 5.2187504e-04, 5.78125e-04,
    6.34375e-04, 6.9062505e-04, 7.46875e-04, 8.031251e-04, 8.5937505e-04, 9.15625e-04,
    9.7187504e-04, 1.140625e-03, 1.421875e-03, 1.703125e-03, 1.984375e-03, 2.265625e-03,
    2.5468748e-03, 2.828125e-03, 3.1093748e-03, 3.3906251e-03, 3.671875e-03, 3.953125e-03,
    4.2343745e-03, 4.515625e-03, 4.7968747e-03, 5.078125e-03, 5.359375e-03, 5.6406246e-03,
    5.921875e-03, 6.2031248e-03, 6.484375e-03, 6.7656254e-03, 7.0468746e-03, 7.328125e-03,
    7.6093744e-03, 7.890625e-03, 8.171875e-03, 8.453124e-03, 8.734375e-03, 9.015624e-03,
    9.2968745e-03, 9.578126e-03, 9.859375e-03, 1.0703126e-02, 1.2109376e-02, 1.3515624e-02,
    1.4921876e-02, 1.6328124e-02, 1.7734377e-02, 1.9140625e-02, 2.0546874e-02, 2.1953126e-02,
    2.3359375e-02, 2.4765624e-02, 2.6171876e-02, 2.7578129e-02, 2.8984373e-02, 3.0390626e-02,
    3.1796873e-02, 3.3203125e-02, 3.4609374e-02, 3.6015626e-02, 3.742188e-02, 3.8828123e-02,
    4.0234376e-02, 4.1640624e-02, 4.3046873e-02, 4.4453125e-02, 4.5859374e-02, 4.7265626e-02,
    4.867187e-02, 5.0078124e-02, 5.1484372e-02, 5.2890625e-02, 5.4296877e-02, 5.570313e-02,
    5.7109382e-02, 5.8515627e-02, 5.9921872e-02, 6.1328124e-02, 6.273438e-02, 6.414063e-02,
    6.554688e-02, 6.695312e-02, 6.8359375e-02, 6.976563e-02, 7.117188e-02, 7.2578125e-02,
    7.398438e-02, 7.539063e-02, 7.679688e-02, 7.820313e-02, 7.960938e-02, 8.1015624e-02,
    8.242188e-02, 8.382813e-02, 8.5234374e-02, 8.6640626e-02, 8.804687e-02, 8.945312e-02,
    9.0859376e-02, 9.226563e-02, 9.367188e-02, 9.5078126e-02, 9.648438e-02, 9.789063e-02,
    9.9296875e-02, 1.03515625e-01, 1.1054687e-01, 1.1757813e-01, 1.2460937e-01, 1.3164061e-01,
    1.3867188e-01, 1.4570314e-01, 1.5273437e-01, 1.5976563e-01, 1.6679686e-01, 1.7382812e-01,
    1.8085939e-01, 1.8789062e-01, 1.9492188e-01, 2.0195311e-01, 2.0898438e-01, 2.1601564e-01,
    2.2304687e-01, 2.3007813e-01, 2.3710936e-01, 2.4414062e-01, 2.5117186e-01, 2.5820312e-01,
    2.6523438e-01, 2.722656e-01, 2.7929688e-01, 2.8632814e-01, 2.9335937e-01, 3.003906e-01,
    3.0742186e-01, 3.1445312e-01, 3.214844e-01, 3.2851562e-01, 3.3554685e-01, 3.425781e-01,
    3.4960938e-01, 3.5664064e-01, 3.6367187e-01, 3.707031e-01, 3.7773436e-01, 3.8476562e-01,
    3.917969e-01, 3.9882812e-01, 4.0585935e-01, 4.128906e-01, 4.1992188e-01, 4.2695314e-01,
    4.3398437e-01, 4.410156e-01, 4.4804686e-01, 4.5507812e-01, 4.621094e-01, 4.6914062e-01,
    4.7617185e-01, 4.832031e-01, 4.9023438e-01, 4.972656e-01, 5.042969e-01, 5.113281e-01,
    5.1835936e-01, 5.253906e-01, 5.324218e-01, 5.3945315e-01, 5.4648435e-01, 5.535157e-01,
    5.605469e-01, 5.6757814e-01, 5.746094e-01, 5.816406e-01, 5.886719e-01, 5.957031e-01,
    6.027344e-01, 6.0976565e-01, 6.1679685e-01, 6.238282e-01, 6.308594e-01, 6.3789064e-01,
    6.449219e-01, 6.519531e-01, 6.589844e-01, 6.660156e-01, 6.730469e-01, 6.8007815e-01,
    6.8710935e-01, 6.941407e-01, 7.011719e-01, 7.0820314e-01, 7.152344e-01, 7.222656e-01,
    7.292969e-01, 7.363281e-01, 7.433594e-01, 7.5039065e-01, 7.5742185e-01, 7.644532e-01,
    7.714844e-01, 7.785156e-01, 7.855469e-01, 7.925781e-01, 7.996094e-01, 8.066406e-01,
    8.136718e-01, 8.2070315e-01, 8.2773435e-01, 8.347657e-01, 8.417969e-01, 8.488281e-01,
    8.558594e-01, 8.628906e-01, 8.699219e-01, 8.769531e-01, 8.839843e-01, 8.9101565e-01,
    8.9804685e-01, 9.050782e-01, 9.121094e-01, 9.191406e-01, 9.261719e-01, 9.332031e-01,
    9.402344e-01, 9.472656e-01, 9.542968e-01, 9.6132815e-01, 9.6835935e-01, 9.753907e-01,
    9.824219e-01, 9.894531e-01, 9.964844e-01, 1.0e+00,
];

/// The kernel's `quantize_2D`: binary search over the sorted map, then the nearer neighbour by
/// comparing with the midpoint (so equal distances go as the kernel sends them).
fn quantize(map: &[f32; 256], signed: bool, x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = map[pivot];
        i >>= 1;
    }
    let idx = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    idx as u8
}

/// bitsandbytes' AdamW8bit defaults (weight_decay 1e-2 as in bnb's AdamW classes).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW8bitConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Variables with fewer elements keep f32 moments.
    pub min_8bit_size: usize,
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            min_8bit_size: 4096,
        }
    }
}

impl AdamW8bitConfig {
    /// The accepted `optimizer_args`, owned by the job spec's validation.
    pub(crate) const ARGS: &'static [&'static str] = loractl_spec::optimizer_arg_names::ADAMW8BIT;

    pub(crate) fn from_args(a: &Args) -> Result<Self> {
        let d = Self::default();
        let (beta1, beta2) = a.pair("betas", (d.beta1, d.beta2))?;
        let c = Self {
            beta1,
            beta2,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            min_8bit_size: a.usize("min_8bit_size", d.min_8bit_size)?,
        };
        a.check((0.0..1.0).contains(&c.beta1), "betas", "must be in [0, 1)")?;
        a.check((0.0..1.0).contains(&c.beta2), "betas", "must be in [0, 1)")?;
        a.check(c.eps >= 0.0, "eps", "must be >= 0")?;
        a.check(c.weight_decay >= 0.0, "weight_decay", "must be >= 0")?;
        Ok(c)
    }
}

/// Moments of one variable.
#[derive(Debug, Clone)]
enum Moments {
    Blockwise {
        q1: Vec<u8>,
        absmax1: Vec<f32>,
        q2: Vec<u8>,
        absmax2: Vec<f32>,
    },
    F32 {
        m: Vec<f32>,
        v: Vec<f32>,
    },
}

impl Moments {
    fn zeros(n: usize, min_8bit: usize) -> Self {
        if n >= min_8bit {
            let blocks = n.div_ceil(BLOCKSIZE);
            Moments::Blockwise {
                q1: vec![0; n],
                absmax1: vec![0.0; blocks],
                q2: vec![0; n],
                absmax2: vec![0.0; blocks],
            }
        } else {
            Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Moments::Blockwise {
                q1,
                absmax1,
                q2,
                absmax2,
            } => q1.len() + q2.len() + 4 * (absmax1.len() + absmax2.len()),
            Moments::F32 { m, v } => 4 * (m.len() + v.len()),
        }
    }
}

pub struct AdamW8bit {
    groups: Vec<ParamGroup>,
    moments: Vec<Vec<Moments>>,
    steps: Vec<Vec<u64>>,
    map1: [f32; 256],
    map2: [f32; 256],
    cfg: AdamW8bitConfig,
}

/// Per-step constants in the kernel's f32.
struct Consts {
    beta1: f32,
    beta2: f32,
    eps: f32,
    lr: f32,
    wd: f32,
    c2: f32,
    step_size: f32,
}

impl AdamW8bit {
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamW8bitConfig) -> Result<Self> {
        let moments = groups
            .iter()
            .map(|g| {
                g.vars
                    .iter()
                    .map(|v| Moments::zeros(v.elem_count(), cfg.min_8bit_size))
                    .collect()
            })
            .collect();
        Ok(Self {
            steps: groups.iter().map(|g| vec![0; g.vars.len()]).collect(),
            groups,
            moments,
            map1: dynamic_map(true),
            map2: dynamic_map(false),
            cfg,
        })
    }

    /// Bytes held by the moments (codes + block absmax, or f32 moments for small variables).
    pub fn state_bytes(&self) -> usize {
        self.moments.iter().flatten().map(Moments::bytes).sum()
    }

    fn update(&self, mo: &mut Moments, p: &mut [f32], g: &[f32], k: &Consts) {
        match mo {
            Moments::F32 { m, v } => {
                for j in 0..p.len() {
                    let gj = g[j];
                    m[j] = m[j] * k.beta1 + (1.0 - k.beta1) * gj;
                    v[j] = v[j] * k.beta2 + (1.0 - k.beta2) * (gj * gj);
                    p[j] += k.step_size * (m[j] / (v[j].sqrt() + k.eps * k.c2));
                    if k.wd > 0.0 {
                        p[j] *= 1.0 - k.lr * k.wd;
                    }
                }
            }
            Moments::Blockwise {
                q1,
                absmax1,
                q2,
                absmax2,
            } => {
                let mut s1 = [0f32; BLOCKSIZE];
                let mut s2 = [0f32; BLOCKSIZE];
                for (b, start) in (0..p.len()).step_by(BLOCKSIZE).enumerate() {
                    let end = (start + BLOCKSIZE).min(p.len());
                    let mut max1 = -f32::MAX;
                    let mut max2 = -f32::MAX;
                    for j in start..end {
                        let (a, c) = (&mut s1[j - start], &mut s2[j - start]);
                        let gj = g[j];
                        if gj.is_finite() {
                            *c = self.map2[q2[j] as usize] * absmax2[b];
                            *c = *c * k.beta2 + (1.0 - k.beta2) * gj * gj;
                            *a = self.map1[q1[j] as usize] * absmax1[b];
                            *a = *a * k.beta1 + (1.0 - k.beta1) * gj;
                        } else {
                            *a = 0.0;
                            *c = 0.0;
                        }
                        max1 = max1.max(a.abs());
                        max2 = max2.max(c.abs());
                    }
                    absmax1[b] = max1;
                    absmax2[b] = max2;
                    for j in start..end {
                        let (a, c) = (s1[j - start], s2[j - start]);
                        if g[j].is_finite() {
                            p[j] += k.step_size * (a / (c.sqrt() + k.c2 * k.eps));
                            if k.wd > 0.0 {
                                p[j] *= 1.0 - k.lr * k.wd;
                            }
                        }
                        let mut c1 = quantize(&self.map1, true, a / max1);
                        // Keep m's sign through quantization (the kernel's fix-up).
                        if self.map1[c1 as usize].is_sign_negative() != a.is_sign_negative() {
                            c1 = if a > 0.0 {
                                c1.wrapping_add(1)
                            } else {
                                c1.wrapping_sub(1)
                            };
                        }
                        q1[j] = c1;
                        q2[j] = quantize(&self.map2, false, c / max2);
                    }
                }
            }
        }
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, grads: &GradStore, lrs: &[f64]) -> Result<()> {
        check_lrs(self.name(), self.groups.len(), lrs)?;
        for (gi, &group_lr) in lrs.iter().enumerate() {
            for pi in 0..self.groups[gi].vars.len() {
                let var = self.groups[gi].vars[pi].clone();
                let Some(g) = grad_of(grads, &var)? else {
                    continue;
                };
                self.steps[gi][pi] += 1;
                let step = self.steps[gi][pi] as f32;
                let (beta1, beta2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
                let lr = group_lr as f32;
                // The kernel's powf(beta, step) in f32; taken through f64 here so that the result
                // does not depend on the libm's powf rounding.
                let pow = |b: f32| (b as f64).powf(step as f64) as f32;
                let c1 = 1.0 - pow(beta1);
                let c2 = (1.0 - pow(beta2)).sqrt();
                let k = Consts {
                    beta1,
                    beta2,
                    eps: self.cfg.eps as f32,
                    lr,
                    wd: self.cfg.weight_decay as f32,
                    c2,
                    step_size: -lr * c2 / c1,
                };
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                let mut p = value_of(&var)?.flatten_all()?.to_vec1::<f32>()?;
                let mut mo = std::mem::replace(
                    &mut self.moments[gi][pi],
                    Moments::F32 {
                        m: Vec::new(),
                        v: Vec::new(),
                    },
                );
                self.update(&mut mo, &mut p, &g, &k);
                self.moments[gi][pi] = mo;
                let new = Tensor::from_vec(p, var.shape(), var.device())?;
                assign(&var, &new)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = BTreeMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (i, var) in g.vars.iter().enumerate() {
                let dev = var.device();
                let key = |s: &str| slot_key(&g.name, i, s);
                match &self.moments[gi][i] {
                    Moments::Blockwise {
                        q1,
                        absmax1,
                        q2,
                        absmax2,
                    } => {
                        let nb = absmax1.len();
                        tensors.insert(key("state1"), Tensor::from_slice(q1, var.shape(), dev)?);
                        tensors.insert(key("state2"), Tensor::from_slice(q2, var.shape(), dev)?);
                        tensors.insert(key("absmax1"), Tensor::from_slice(absmax1, nb, dev)?);
                        tensors.insert(key("absmax2"), Tensor::from_slice(absmax2, nb, dev)?);
                    }
                    Moments::F32 { m, v } => {
                        tensors.insert(key("state1"), Tensor::from_slice(m, var.shape(), dev)?);
                        tensors.insert(key("state2"), Tensor::from_slice(v, var.shape(), dev)?);
                    }
                }
            }
        }
        Ok(OptimizerState {
            tensors,
            scalars: json!({
                "optimizer": self.name(),
                "blocksize": BLOCKSIZE,
                "min_8bit_size": self.cfg.min_8bit_size,
                "steps": steps_json(&self.groups, &self.steps),
            }),
        })
    }

    fn load_state(&mut self, st: OptimizerState) -> Result<()> {
        let sc = Scalars::new(self.name(), &st.scalars)?;
        let bs = sc.u64("blocksize")?;
        if bs != BLOCKSIZE as u64 {
            return Err(crate::Error::Config(format!(
                "AdamW8bit state uses blocks of {bs} elements; this build uses {BLOCKSIZE}"
            )));
        }
        let steps = steps_from_json(&sc, "steps", &self.groups)?;
        let mut tin = TensorsIn::new(self.name(), st.tensors);
        let mut moments = Vec::new();
        for g in &self.groups {
            let mut row = Vec::new();
            for (i, var) in g.vars.iter().enumerate() {
                let dev = var.device();
                let key = |s: &str| slot_key(&g.name, i, s);
                let n = var.elem_count();
                let flat_u8 = |t: Tensor| -> Result<Vec<u8>> { Ok(t.flatten_all()?.to_vec1()?) };
                let flat_f32 = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
                row.push(if n >= self.cfg.min_8bit_size {
                    let nb = n.div_ceil(BLOCKSIZE);
                    Moments::Blockwise {
                        q1: flat_u8(tin.take(&key("state1"), var.dims(), DType::U8, dev)?)?,
                        q2: flat_u8(tin.take(&key("state2"), var.dims(), DType::U8, dev)?)?,
                        absmax1: flat_f32(tin.take(&key("absmax1"), &[nb], DType::F32, dev)?)?,
                        absmax2: flat_f32(tin.take(&key("absmax2"), &[nb], DType::F32, dev)?)?,
                    }
                } else {
                    Moments::F32 {
                        m: flat_f32(tin.take(&key("state1"), var.dims(), DType::F32, dev)?)?,
                        v: flat_f32(tin.take(&key("state2"), var.dims(), DType::F32, dev)?)?,
                    }
                });
            }
            moments.push(row);
        }
        tin.finish()?;
        self.moments = moments;
        self.steps = steps;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "AdamW8bit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_and_span_the_range() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert!(s.windows(2).all(|w| w[0] <= w[1]) && u.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((s[0] < -0.99, s[255], u[0], u[255]), (true, 1.0, 0.0, 1.0));
        // Codes round-trip to themselves.
        for (i, &x) in s.iter().enumerate() {
            assert_eq!(s[quantize(&s, true, x) as usize], x, "signed code {i}");
        }
        for (i, &x) in u.iter().enumerate() {
            assert_eq!(u[quantize(&u, false, x) as usize], x, "unsigned code {i}");
        }
    }

    #[test]
    fn quantize_picks_the_nearest_code() {
        let s = dynamic_map(true);
        let mut x = -1.0f32;
        while x <= 1.0 {
            let q = quantize(&s, true, x) as usize;
            let best = s
                .iter()
                .map(|c| (c - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((s[q] - x).abs() <= best * (1.0 + 1e-6), "{x}");
            x += 0.000_37;
        }
    }
}
