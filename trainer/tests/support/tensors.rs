//! Reference tensors read from fixtures, and how far ours are from them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The tensors of a safetensors file, on the CPU.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))
}

/// The tensor `name` of a fixture.
pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    tensors
        .get(name)
        .with_context(|| format!("fixture lacks `{name}`"))
}

/// Fails unless `a` and `b` have the same shape.
pub fn ensure_same_shape(a: &Tensor, b: &Tensor) -> Result<()> {
    ensure!(
        a.dims() == b.dims(),
        "shape {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok(())
}

/// max |a − b| over all elements, both taken to `dtype` first.
pub fn max_abs_diff_as(a: &Tensor, b: &Tensor, dtype: DType) -> Result<f64> {
    ensure_same_shape(a, b)?;
    Ok((a.to_dtype(dtype)? - b.to_dtype(dtype)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// max |a − b| over all elements, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    // Exact: the f32 maximum round-trips through f64.
    Ok(max_abs_diff_as(a, b, DType::F32)? as f32)
}

/// The L2 norm of all elements, in f64.
pub fn norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?)
}
