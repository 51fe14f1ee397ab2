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
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
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
            origin: self.store.origin(),
        };
        let fetch = (self.map)(name).ok_or_else(missing)?;
        let src = fetch.source();
        if !self.store.contains(src) {
            return Err(Error::MissingTensor {
                name: if src == name {
                    name.to_string()
                } else {
                    format!("{src}` (for `{name}`)")
                },
                origin: self.store.origin(),
            });
        }
        let t = self.store.load(src, device)?;
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
                        name: src.to_string(),
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
            name: if src == name {
                name.to_string()
            } else {
                format!("{src}` (for `{name}`)")
            },
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

impl candle_nn::var_builder::SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.check_shape(name, s.dims())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t = self
            .fetch(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if t.shape() != &s {
            let e = Error::ShapeMismatch {
                name: name.to_string(),
                got: t.dims().to_vec(),
                expected: s.dims().to_vec(),
                origin: format!(
                    "{}; the file is for a different model configuration",
                    self.store.origin()
                ),
            };
            return Err(candle_core::Error::Msg(e.to_string()));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
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
