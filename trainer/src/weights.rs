//! Named-tensor stores (memory-mapped safetensors, PyTorch `.ckpt`) and the `VarBuilder` backend
//! that serves a model's diffusers-style names from them, through a key map when the file uses
//! another layout (single-file LDM checkpoints, transformers 5 text encoders).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// A file (or set of files) of named tensors.
pub trait TensorStore: Send + Sync {
    /// What to call this store in messages (usually the file path).
    fn origin(&self) -> String;
    fn names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor in its stored dtype, on `device`.
    fn load(&self, name: &str, device: &Device) -> Result<Tensor>;
    /// The tensor converted to `dtype`, on `device`.
    fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self.load(name, device)?.to_dtype(dtype)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
}

/// `n` zeroed f32s for a weight about to be written once. A buffer of megabytes is asked to
/// be backed by transparent huge pages where the kernel offers them on request
/// (`madvise`): an SD1.5 model is a million 4 KiB page faults otherwise, most of its load
/// time.
fn weight_buffer(n: usize) -> Vec<f32> {
    let v = vec![0f32; n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * std::mem::size_of::<f32>();
        if bytes >= 2 * HUGE {
            let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
            let end = (v.as_ptr() as usize + bytes) / HUGE * HUGE;
            if end > start {
                // SAFETY: advice on whole pages inside `v`'s own allocation; it changes how
                // they are backed, never their contents. A refusal only loses the speed-up.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v
}

/// Little-endian values of `N` bytes each, converted to f32 in parallel chunks.
fn decode<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32 + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = weight_buffer(bytes.len() / N);
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * N))
        .for_each(|(dst, src)| {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(N)) {
                let mut a = [0u8; N];
                a.copy_from_slice(b);
                *d = f(a);
            }
        });
    out
}

/// f16 bytes as f32: where the bytes are 2-aligned (as safetensors lays them out in the usual
/// case) half's vectorized slice conversion, in parallel chunks; otherwise value by value.
fn decode_f16(bytes: &[u8]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    if cfg!(target_endian = "big") || !(bytes.as_ptr() as usize).is_multiple_of(2) {
        return decode(bytes, |b| half::f16::from_le_bytes(b).to_f32());
    }
    // SAFETY: the pointer is 2-aligned, the length is whole f16 values within `bytes`, any bit
    // pattern is a valid f16, and on a little-endian host the stored bytes are its layout.
    let src =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<half::f16>(), bytes.len() / 2) };
    const CHUNK: usize = 1 << 16;
    let mut out = weight_buffer(src.len());
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dst, src)| src.convert_to_f32_slice(dst));
    out
}

/// Memory-mapped `.safetensors` files; a tensor is copied out only when loaded.
pub struct SafetensorsStore {
    paths: Vec<PathBuf>,
    inner: candle_core::safetensors::MmapedSafetensors,
    shapes: HashMap<String, Vec<usize>>,
}

impl SafetensorsStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        for p in paths {
            let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
            if meta.len() < 8 {
                return Err(Error::bad_checkpoint(
                    p,
                    "file is too short to be a safetensors file (truncated download?)",
                ));
            }
        }
        // SAFETY: the files are mapped read-only; a file changed while mapped is the caller's
        // problem as with any mmap-based loader.
        let inner =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(|e| {
                Error::bad_checkpoint(
                    paths.first().cloned().unwrap_or_default(),
                    format!("not a readable safetensors file ({e}); re-download or re-export it"),
                )
            })?;
        let mut shapes = HashMap::new();
        for (name, view) in inner.tensors() {
            shapes.insert(name, view.shape().to_vec());
        }
        Ok(Self {
            paths: paths.to_vec(),
            inner,
            shapes,
        })
    }
}

impl TensorStore for SafetensorsStore {
    fn origin(&self) -> String {
        let v: Vec<String> = self.paths.iter().map(|p| p.display().to_string()).collect();
        v.join(", ")
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shapes.keys().cloned().collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }
    /// Half-precision or f32 tensors read as f32 on the CPU are converted straight from the
    /// mapped bytes, in parallel, without an intermediate copy in the stored dtype.
    fn load_as(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        if dtype != DType::F32 || !device.is_cpu() {
            return Ok(self.load(name, device)?.to_dtype(dtype)?);
        }
        let view = self.inner.get(name)?;
        let bytes = view.data();
        let values = match view.dtype() {
            safetensors::Dtype::F16 => decode_f16(bytes),
            safetensors::Dtype::BF16 => decode(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
            safetensors::Dtype::F32 => decode(bytes, f32::from_le_bytes),
            _ => return Ok(self.load(name, device)?.to_dtype(dtype)?),
        };
        let n: usize = view.shape().iter().product();
        if values.len() != n {
            return Err(Error::bad_checkpoint(
                self.paths.first().cloned().unwrap_or_default(),
                format!(
                    "tensor `{name}` holds {} values for shape {:?}; re-download or re-export the file",
                    values.len(),
                    view.shape()
                ),
            ));
        }
        Ok(Tensor::from_vec(values, view.shape(), device)?)
    }
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        Ok(self.inner.load(name, device)?)
    }
}

/// Tensors held in memory (tests, converted weights).
pub struct MemoryStore {
    pub origin: String,
    pub tensors: HashMap<String, Tensor>,
}

impl TensorStore for MemoryStore {
    fn origin(&self) -> String {
        self.origin.clone()
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => Ok(t.to_device(device)?),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
                stored_as: None,
                origin: self.origin.clone(),
            }),
        }
    }
}

/// How one model tensor is obtained from a store tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// The store tensor of this name, as is.
    Name(String),
    /// The store tensor with trailing size-1 dims dropped (LDM 1×1 conv -> Linear).
    Squeeze(String),
    /// Rows `start..start+len` of dim 0 (OpenCLIP fused q/k/v `in_proj`).
    Rows {
        name: String,
        start: usize,
        len: usize,
    },
    /// The transpose of a 2-D store tensor (OpenCLIP `text_projection`).
    Transpose(String),
}

impl Fetch {
    pub fn source(&self) -> &str {
        match self {
            Fetch::Name(n) | Fetch::Squeeze(n) | Fetch::Transpose(n) => n,
            Fetch::Rows { name, .. } => name,
        }
    }
}

/// Maps a model (diffusers) tensor name to how the store provides it; `None` = not provided.
pub type KeyMap = Arc<dyn Fn(&str) -> Option<Fetch> + Send + Sync>;

/// Identity key map with a prefix: model name `n` is store name `prefix + n`.
pub fn prefixed(prefix: &str) -> KeyMap {
    let prefix = prefix.to_string();
    Arc::new(move |n: &str| Some(Fetch::Name(format!("{prefix}{n}"))))
}

/// Serves one model's tensors from a store.
#[derive(Clone)]
pub struct Weights {
    store: Arc<dyn TensorStore>,
    map: KeyMap,
    /// Elements served so far, counted by [`Weights::shapes_only`] stores.
    served: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Weights {
    pub fn new(store: Arc<dyn TensorStore>, map: KeyMap) -> Self {
        Self {
            store,
            map,
            served: None,
        }
    }

    /// The same names and shapes, every tensor an f32 broadcast zero (see
    /// [`crate::loader::LoadOptions::shapes_only`]).
    pub fn shapes_only(self) -> Self {
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Self {
            store: Arc::new(ShapeOnly(self.store, served.clone())),
            map: self.map,
            served: Some(served),
        }
    }

    /// Elements of the tensors a shapes-only store has served (the model's parameter count
    /// once it is built); `None` for real weights.
    pub fn served_elements(&self) -> Option<u64> {
        self.served
            .as_ref()
            .map(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn store(&self) -> &Arc<dyn TensorStore> {
        &self.store
    }

    /// The model tensor `name`, converted to `dtype` on `device`.
    pub fn fetch(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            stored_as: None,
            origin: self.store.origin(),
        };
        let fetch = (self.map)(name).ok_or_else(missing)?;
        let src = fetch.source();
        if !self.store.contains(src) {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                stored_as: Some(src.into()),
                origin: self.store.origin(),
            });
        }
        // Converted first: every rearrangement below moves values without changing them.
        let t = self.store.load_as(src, dtype, device)?;
        let t = match &fetch {
            Fetch::Name(_) => t,
            Fetch::Squeeze(_) => {
                let mut dims = t.dims().to_vec();
                while dims.len() > 2 && dims.last() == Some(&1) {
                    dims.pop();
                }
                t.reshape(dims)?
            }
            Fetch::Rows { start, len, .. } => {
                let rows = t.dim(0)?;
                if start + len > rows {
                    return Err(Error::ShapeMismatch {
                        name: name.to_string(),
                        stored_as: Some(src.into()),
                        got: t.dims().to_vec(),
                        expected: vec![start + len],
                        origin: self.store.origin(),
                    });
                }
                t.narrow(0, *start, *len)?.contiguous()?
            }
            Fetch::Transpose(_) => t.t()?.contiguous()?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    pub fn contains(&self, name: &str) -> bool {
        (self.map)(name).is_some_and(|f| self.store.contains(f.source()))
    }

    /// Checks, from the store's index alone, that model tensor `name` will have shape
    /// `expected`; so a tensor of the wrong shape (or rank) is refused before a byte of it is
    /// read, with both shapes and the file named.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let Some(fetch) = (self.map)(name) else {
            return Ok(());
        };
        let src = fetch.source();
        let Some(stored) = self.store.shape(src) else {
            return Ok(());
        };
        let served = match &fetch {
            Fetch::Name(_) => Some(stored.clone()),
            Fetch::Squeeze(_) => {
                let mut dims = stored.clone();
                while dims.len() > 2 && dims.last() == Some(&1) {
                    dims.pop();
                }
                Some(dims)
            }
            Fetch::Rows { start, len, .. } => match stored.split_first() {
                Some((&rows, rest)) if start.checked_add(*len).is_some_and(|e| e <= rows) => {
                    Some([&[*len], rest].concat())
                }
                _ => None,
            },
            Fetch::Transpose(_) => match stored.as_slice() {
                [a, b] => Some(vec![*b, *a]),
                _ => None,
            },
        };
        if served.as_deref() == Some(expected) {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            name: name.to_string(),
            stored_as: Some(src.into()),
            got: stored,
            expected: expected.to_vec(),
            origin: format!(
                "{}; the file is damaged or made for a different model configuration",
                self.store.origin()
            ),
        })
    }

    /// A `VarBuilder` over these weights; model code reads them by their diffusers names.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }
}

thread_local! {
    /// The typed error behind the last refusal of a [`Weights`] backend on this thread.
    static REFUSAL: std::cell::RefCell<Option<Error>> = const { std::cell::RefCell::new(None) };
}

/// `e` as the candle error a `VarBuilder` backend must return, the typed error kept for
/// [`take_refusal`]: a missing tensor or a wrong shape is the job's input to fix (a bad
/// config, not retried), which candle's string errors would lose.
fn refuse(e: Error) -> candle_core::Error {
    let msg = candle_core::Error::Msg(e.to_string());
    REFUSAL.with(|r| *r.borrow_mut() = Some(e));
    msg
}

/// The typed error of the last refusal of a [`Weights`] backend on this thread, if any (see
/// [`crate::nn::Builder::get`]).
pub(crate) fn take_refusal() -> Option<Error> {
    REFUSAL.with(|r| r.borrow_mut().take())
}

impl candle_nn::var_builder::SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.check_shape(name, s.dims()).map_err(refuse)?;
        let t = self.fetch(name, dtype, dev).map_err(refuse)?;
        if t.shape() != &s {
            return Err(refuse(Error::ShapeMismatch {
                name: name.to_string(),
                stored_as: None,
                got: t.dims().to_vec(),
                expected: s.dims().to_vec(),
                origin: format!(
                    "{}; the file is for a different model configuration",
                    self.store.origin()
                ),
            }));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, dev).map_err(refuse)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// A store that knows its inner store's names and shapes but serves every tensor as a
/// broadcast f32 zero: building a model from it allocates (almost) nothing.
struct ShapeOnly(Arc<dyn TensorStore>, Arc<std::sync::atomic::AtomicU64>);

impl TensorStore for ShapeOnly {
    fn origin(&self) -> String {
        self.0.origin()
    }
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.shape(name)
    }
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let shape = self.0.shape(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            stored_as: None,
            origin: self.0.origin(),
        })?;
        let n: usize = shape.iter().product();
        self.1
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Tensor::zeros((), DType::F32, device)?.broadcast_as(shape)?)
    }
}

/// Opens a single `.safetensors` file as a store.
pub fn open_safetensors(path: &Path) -> Result<Arc<dyn TensorStore>> {
    Ok(Arc::new(SafetensorsStore::open(&[path.to_path_buf()])?))
}

/// Serves every requested tensor as random values of the requested shape: norm weights are
/// ones, biases zeros, other weights N(0, 1/fan_in). For benchmarks and shape-only tests.
pub struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_norm = name.contains("norm") || name.contains("ln_");
        let t = if name.ends_with("bias") {
            Tensor::zeros(&s, DType::F32, dev)?
        } else if is_norm && s.rank() == 1 {
            Tensor::ones(&s, DType::F32, dev)?
        } else {
            let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
            let std = if s.rank() == 1 {
                0.02
            } else {
                1.0 / (fan_in as f64).sqrt()
            };
            Tensor::randn(0f32, std as f32, &s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading f16, bf16 and f32 safetensors as f32 straight from the mapped bytes gives the
    /// values candle's own load-then-convert gives, aligned or not.
    #[test]
    fn direct_conversion_matches_candle() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 3., (3, 70_001), &dev)?;
        let mut tensors = HashMap::new();
        // An odd-sized u8 tensor first shifts the following data off 2-byte alignment.
        tensors.insert("a_pad".to_string(), Tensor::zeros(3, DType::U8, &dev)?);
        for (name, dt) in [
            ("f16", DType::F16),
            ("bf16", DType::BF16),
            ("f32", DType::F32),
        ] {
            tensors.insert(name.to_string(), base.to_dtype(dt)?);
        }
        let path = dir.path().join("w.safetensors");
        candle_core::safetensors::save(&tensors, &path)?;
        let store = SafetensorsStore::open(std::slice::from_ref(&path))?;
        for name in ["f16", "bf16", "f32"] {
            let want = store.load(name, &dev)?.to_dtype(DType::F32)?;
            let got = store.load_as(name, DType::F32, &dev)?;
            assert_eq!(got.dims(), want.dims());
            let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{name}");
        }
        // Both alignments of the f16 path.
        let bytes: Vec<u8> = (0..2001u16).flat_map(|v| (v * 7).to_le_bytes()).collect();
        let want: Vec<f32> = (0..2001u16)
            .map(|v| half::f16::from_bits(v * 7).to_f32())
            .collect();
        let mut shifted = vec![0u8];
        shifted.extend(&bytes);
        for b in [&bytes[..], &shifted[1..]] {
            let got = decode_f16(b);
            assert_eq!(got.len(), want.len());
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
        }
        Ok(())
    }
}
