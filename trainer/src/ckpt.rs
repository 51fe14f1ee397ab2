//! Reads PyTorch `.ckpt`/`.pt` checkpoints (the zip archives `torch.save` writes since PyTorch
//! 1.6) without running any Python: a small zip reader finds the records, a restricted pickle
//! interpreter that calls nothing and accepts only an allow-list of torch globals rebuilds the
//! tensor index, and tensors are copied out of the memory-mapped file one at a time.
//!
//! Tensor names follow kohya-ss/sd-scripts: when the top-level dict has a `state_dict` dict,
//! only that dict is read and its names carry no `state_dict.` prefix; otherwise the top-level
//! dict is read. Other nested dicts (`model`, `module`, ...) are joined with `.`, so
//! `{"model": {"w": t}}` gives `model.w`. Values that are not tensors or dicts (step counters,
//! lists, numpy scalars, optimizer settings) are skipped, as are entries whose key is neither a
//! string nor an integer.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// Largest `data.pkl` we interpret; real Stable Diffusion pickles are well under 10 MiB.
/// A stored (uncompressed) pickle is read from the memory map, so this bounds work, not memory.
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Largest deflated `data.pkl` we inflate. `torch.save` stores the pickle uncompressed; a
/// compressed one comes from re-zipping, and deflate's 1000:1 ratio would let a 1 MB file ask
/// for a 1 GiB buffer, so the cap is what a real pickle needs with a wide margin.
const MAX_DEFLATED_PICKLE_BYTES: u64 = 64 << 20;
/// Most tensors one checkpoint may name.
const MAX_TENSORS: usize = 1_000_000;
/// Dicts nested deeper than this are refused (real checkpoints nest two or three levels).
const MAX_DICT_DEPTH: usize = 64;
/// Dict entries visited while flattening; bounds work on pickles that share dicts many times.
const MAX_FLATTEN_VISITS: usize = 10_000_000;
/// Longest flattened tensor name, and the most bytes all names may take together.
const MAX_NAME_BYTES: usize = 4096;
const MAX_ALL_NAMES_BYTES: usize = 64 << 20;
/// Largest tensor whose elements overlap in storage (stride 0, as `expand` makes) that `load`
/// materialises; tensors that do not overlap are bounded by their storage.
const MAX_EXPANDED_BYTES: u64 = 256 << 20;

/// A PyTorch zip checkpoint opened for reading tensors by name.
///
/// The file stays memory-mapped; `open` reads only the zip directory and `data.pkl`, and each
/// `load` copies just the bytes of the tensor it returns. The file must not be modified while
/// a `CkptFile` is alive (as with any memory map).
pub struct CkptFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    storages: Vec<StorageRecord>,
    /// Inflated bytes of deflated storages that several tensors share, kept until each of
    /// those tensors has been loaded once, so a shared storage is inflated once and not once
    /// per tensor.
    inflated: Mutex<StorageCache>,
    inflation_count: AtomicUsize,
}

/// Deflated storages held for the tensors still to read them, and those that failed to
/// inflate (so a broken storage shared by many tensors is not inflated again for each).
#[derive(Default)]
struct StorageCache {
    shared: HashMap<usize, SharedStorage>,
    failed: HashMap<usize, String>,
}

/// A storage's bytes: borrowed from the map, or inflated.
enum StorageBytes<'a> {
    Mapped(&'a [u8]),
    Inflated(Arc<Vec<u8>>),
}

impl std::ops::Deref for StorageBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            StorageBytes::Mapped(b) => b,
            StorageBytes::Inflated(v) => v,
        }
    }
}

/// A deflated storage's bytes and how many of its tensors have not been loaded yet.
struct SharedStorage {
    data: Arc<Vec<u8>>,
    pending: HashSet<usize>,
}

/// One named tensor: a strided view of a storage record.
struct TensorEntry {
    name: String,
    storage: usize,
    dtype: TorchDType,
    /// In elements of `dtype`.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The zip record `<archive>/data/<key>` holding one storage's bytes.
struct StorageRecord {
    record: String,
    /// Bytes of the record as stored in the file (compressed when `deflated`).
    data: Range<usize>,
    deflated: bool,
    /// Uncompressed length.
    size: usize,
    crc: u32,
    /// Whether the CRC of a stored record matched, checked on first use.
    crc_ok: OnceLock<bool>,
    /// Tensors viewing this storage (indices into `CkptFile::tensors`).
    users: Vec<usize>,
}

impl fmt::Debug for CkptFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CkptFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl CkptFile {
    /// Maps the file and reads its tensor index; no tensor data is copied.
    pub fn open(path: &Path) -> Result<CkptFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::bad_checkpoint(
                path,
                "the file is empty: it is not a PyTorch checkpoint",
            ));
        }
        // SAFETY: the map is read-only and private to this struct. As with every memory map,
        // another process truncating the file while it is mapped would make reads fault; model
        // files are not rewritten while they are being read.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let index = Index::read(&mmap).map_err(|msg| Error::bad_checkpoint(path, msg))?;
        tracing::debug!(
            path = %path.display(),
            tensors = index.tensors.len(),
            storages = index.storages.len(),
            "opened pytorch checkpoint"
        );
        let by_name = index
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(CkptFile {
            path: path.to_path_buf(),
            mmap,
            tensors: index.tensors,
            by_name,
            storages: index.storages,
            inflated: Mutex::new(StorageCache::default()),
            inflation_count: AtomicUsize::new(0),
        })
    }

    /// The file this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order the checkpoint stores them (see the module docs for the rule).
    pub fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The tensor's shape, or `None` if the checkpoint has no tensor of that name.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entry(name).map(|t| t.shape.clone())
    }

    /// The dtype `load` returns: the stored one, except that bool loads as `U8`, int8 as `I16`
    /// and uint16 as `U32`. `None` if there is no such tensor or candle has no dtype for it
    /// (complex, float8_e5m2, uint64, ...; `load` then says which).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entry(name).and_then(|t| t.dtype.candle())
    }

    /// Copies one tensor out of the file onto `device`, in the dtype `dtype` reports.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let index = self
            .by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                origin: self.path.display().to_string(),
            })?;
        let entry = &self.tensors[index];
        let bad = |msg: String| Error::bad_checkpoint(&self.path, msg);
        let dtype = entry.dtype.candle().ok_or_else(|| {
            bad(format!(
                "tensor `{name}` has dtype {}, which candle cannot hold",
                entry.dtype.name()
            ))
        })?;
        let elem = entry.dtype.size();
        let numel: usize = entry.shape.iter().product();
        let bytes = numel
            .checked_mul(elem)
            .ok_or_else(|| bad(format!("tensor `{name}` is too large")))?;
        let storage = &self.storages[entry.storage];
        let data;
        let raw: Cow<'_, [u8]> = if bytes == 0 {
            Cow::Borrowed(&[])
        } else {
            if bytes > storage.size && bytes as u64 > MAX_EXPANDED_BYTES {
                return Err(bad(format!(
                    "tensor `{name}` repeats the {} bytes of its storage into {bytes} bytes; \
                     expanded tensors above {MAX_EXPANDED_BYTES} bytes are not materialised",
                    storage.size
                )));
            }
            data = self.storage_bytes(entry.storage, index).map_err(bad)?;
            copy_strided(
                &data,
                elem,
                entry.offset,
                &entry.shape,
                &entry.stride,
                bytes,
            )
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` lies outside its storage record `{}`",
                    storage.record
                ))
            })?
        };
        let raw = match entry.dtype {
            TorchDType::I8 => Cow::Owned(widen(&raw, |b: [u8; 1]| {
                i16::from(b[0] as i8).to_le_bytes()
            })),
            TorchDType::U16 => Cow::Owned(widen(&raw, |b: [u8; 2]| {
                u32::from(u16::from_le_bytes(b)).to_le_bytes()
            })),
            _ => raw,
        };
        // candle copies `raw` once more into its own storage; contiguous tensors are borrowed
        // straight from the map, so that is the only copy.
        Ok(Tensor::from_raw_buffer(&raw, dtype, &entry.shape, device)?)
    }

    fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The uncompressed bytes of storage `index` for loading tensor `tensor`, checked against
    /// the zip CRC.
    fn storage_bytes(
        &self,
        index: usize,
        tensor: usize,
    ) -> std::result::Result<StorageBytes<'_>, String> {
        let storage = &self.storages[index];
        let stored = self
            .mmap
            .get(storage.data.clone())
            .ok_or_else(|| format!("record `{}` lies outside the file", storage.record))?;
        let crc_mismatch = || {
            format!(
                "record `{}` fails its CRC check: the file is corrupt",
                storage.record
            )
        };
        if !storage.deflated {
            if !*storage.crc_ok.get_or_init(|| crc32(stored) == storage.crc) {
                return Err(crc_mismatch());
            }
            return Ok(StorageBytes::Mapped(stored));
        }
        let shared = storage.users.len() > 1;
        // The lock is held while inflating, so two threads never inflate one storage twice.
        let mut cache = self
            .inflated
            .lock()
            .map_err(|_| "the storage cache was poisoned by a panic".to_string())?;
        if let Some(err) = cache.failed.get(&index) {
            return Err(err.clone());
        }
        let data = match cache.shared.get_mut(&index) {
            Some(hit) => hit.data.clone(),
            None => {
                self.inflation_count.fetch_add(1, Ordering::Relaxed);
                let data = inflate(stored, storage.size, &storage.record).and_then(|data| {
                    if crc32(&data) == storage.crc {
                        Ok(data)
                    } else {
                        Err(crc_mismatch())
                    }
                });
                let data = match data {
                    Ok(data) => Arc::new(data),
                    Err(e) => {
                        cache.failed.insert(index, e.clone());
                        return Err(e);
                    }
                };
                if shared {
                    cache.shared.insert(
                        index,
                        SharedStorage {
                            data: data.clone(),
                            pending: storage.users.iter().copied().collect(),
                        },
                    );
                }
                data
            }
        };
        if let Some(hit) = cache.shared.get_mut(&index) {
            hit.pending.remove(&tensor);
            if hit.pending.is_empty() {
                cache.shared.remove(&index);
            }
        }
        Ok(StorageBytes::Inflated(data))
    }

    /// Deflated storages inflated since the file was opened (a storage shared by several
    /// tensors counts once while they are loaded). For tests of the bound.
    pub fn inflations(&self) -> usize {
        self.inflation_count.load(Ordering::Relaxed)
    }
}

/// The `bytes` bytes of a strided view in row-major order, borrowed when the view is
/// contiguous and gathered otherwise; `None` if it leaves `data`.
fn copy_strided<'a>(
    data: &'a [u8],
    elem: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    bytes: usize,
) -> Option<Cow<'a, [u8]>> {
    let element = |i: usize| -> Option<&[u8]> {
        let start = i.checked_mul(elem)?;
        data.get(start..start.checked_add(elem)?)
    };
    if is_contiguous(shape, stride) {
        let start = offset.checked_mul(elem)?;
        return data
            .get(start..start.checked_add(bytes)?)
            .map(Cow::Borrowed);
    }
    let mut out = Vec::with_capacity(bytes);
    let Some((&inner_len, outer)) = shape.split_last() else {
        return element(offset).map(Cow::Borrowed);
    };
    let inner_stride = *stride.last()?;
    let mut index = vec![0usize; outer.len()];
    let mut base = offset;
    loop {
        if inner_stride == 1 {
            let start = base.checked_mul(elem)?;
            let len = inner_len.checked_mul(elem)?;
            out.extend_from_slice(data.get(start..start.checked_add(len)?)?);
        } else {
            for j in 0..inner_len {
                let at = base.checked_add(j.checked_mul(inner_stride)?)?;
                out.extend_from_slice(element(at)?);
            }
        }
        // Advance the outer index like an odometer, keeping `base` at its element.
        let mut dim = outer.len();
        loop {
            if dim == 0 {
                return Some(Cow::Owned(out));
            }
            dim -= 1;
            index[dim] += 1;
            base = base.checked_add(stride[dim])?;
            if index[dim] < outer[dim] {
                break;
            }
            base = base.checked_sub(stride[dim].checked_mul(outer[dim])?)?;
            index[dim] = 0;
        }
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&dim, &step) in shape.iter().zip(stride).rev() {
        if dim != 1 && step != expected {
            return false;
        }
        expected = expected.saturating_mul(dim);
    }
    true
}

/// Converts fixed-size little-endian elements to a wider type candle supports.
fn widen<const N: usize, const M: usize>(raw: &[u8], f: impl Fn([u8; N]) -> [u8; M]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / N * M);
    for chunk in raw.chunks_exact(N) {
        let mut b = [0u8; N];
        b.copy_from_slice(chunk);
        out.extend_from_slice(&f(b));
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// Decompresses a deflated record of known size; memory grows only with real output.
fn inflate(data: &[u8], size: usize, record: &str) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    // Deflate expands at most ~1032:1, so a lying size field cannot make us reserve more.
    let reserve = size.min(data.len().saturating_mul(1032).saturating_add(1024));
    let mut out = Vec::with_capacity(reserve);
    flate2::read::DeflateDecoder::new(data)
        .take(size as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("record `{record}` does not inflate: {e}"))?;
    if out.len() != size {
        return Err(format!(
            "record `{record}` inflates to {} bytes but the zip directory says {size}",
            out.len()
        ));
    }
    Ok(out)
}

/// Element types torch writes, with what candle calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TorchDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    U16,
    U32,
    /// A dtype candle has no equivalent for; its torch name and element size.
    Other(&'static str, usize),
}

impl TorchDType {
    fn size(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 | TorchDType::U32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 | TorchDType::U16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool | TorchDType::F8E4M3 => 1,
            TorchDType::Other(_, size) => size,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TorchDType::F64 => "float64",
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
            TorchDType::F8E4M3 => "float8_e4m3fn",
            TorchDType::U16 => "uint16",
            TorchDType::U32 => "uint32",
            TorchDType::Other(name, _) => name,
        }
    }

    /// The dtype `load` produces.
    fn candle(self) -> Option<DType> {
        Some(match self {
            TorchDType::F64 => DType::F64,
            TorchDType::F32 => DType::F32,
            TorchDType::F16 => DType::F16,
            TorchDType::BF16 => DType::BF16,
            TorchDType::I64 => DType::I64,
            TorchDType::I32 => DType::I32,
            TorchDType::I16 | TorchDType::I8 => DType::I16,
            TorchDType::U8 | TorchDType::Bool => DType::U8,
            TorchDType::F8E4M3 => DType::F8E4M3,
            TorchDType::U16 | TorchDType::U32 => DType::U32,
            TorchDType::Other(..) => return None,
        })
    }

    /// A `torch.<name>` dtype global.
    fn from_torch_name(name: &str) -> Option<TorchDType> {
        Some(match name {
            "float64" | "double" => TorchDType::F64,
            "float32" | "float" => TorchDType::F32,
            "float16" | "half" => TorchDType::F16,
            "bfloat16" => TorchDType::BF16,
            "int64" | "long" => TorchDType::I64,
            "int32" | "int" => TorchDType::I32,
            "int16" | "short" => TorchDType::I16,
            "int8" => TorchDType::I8,
            "uint8" => TorchDType::U8,
            "bool" => TorchDType::Bool,
            "float8_e4m3fn" => TorchDType::F8E4M3,
            "uint16" => TorchDType::U16,
            "uint32" => TorchDType::U32,
            "uint64" => TorchDType::Other("uint64", 8),
            "float8_e5m2" => TorchDType::Other("float8_e5m2", 1),
            "float8_e4m3fnuz" => TorchDType::Other("float8_e4m3fnuz", 1),
            "float8_e5m2fnuz" => TorchDType::Other("float8_e5m2fnuz", 1),
            "float8_e8m0fnu" => TorchDType::Other("float8_e8m0fnu", 1),
            "float4_e2m1fn_x2" => TorchDType::Other("float4_e2m1fn_x2", 1),
            "complex32" | "chalf" => TorchDType::Other("complex32", 4),
            "complex64" | "cfloat" => TorchDType::Other("complex64", 8),
            "complex128" | "cdouble" => TorchDType::Other("complex128", 16),
            "bits8" => TorchDType::Other("bits8", 1),
            "bits16" => TorchDType::Other("bits16", 2),
            "bits1x8" => TorchDType::Other("bits1x8", 1),
            "bits2x4" => TorchDType::Other("bits2x4", 1),
            "bits4x2" => TorchDType::Other("bits4x2", 1),
            _ => return None,
        })
    }

    /// A legacy `torch.<Name>Storage` class, the storage type of `_rebuild_tensor_v2`.
    fn from_storage_name(name: &str) -> Option<TorchDType> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            "ComplexFloatStorage" => TorchDType::Other("complex64", 8),
            "ComplexDoubleStorage" => TorchDType::Other("complex128", 16),
            "QInt8Storage" => TorchDType::Other("qint8", 1),
            "QUInt8Storage" => TorchDType::Other("quint8", 1),
            "QInt32Storage" => TorchDType::Other("qint32", 4),
            "QUInt4x2Storage" => TorchDType::Other("quint4x2", 1),
            "QUInt2x4Storage" => TorchDType::Other("quint2x4", 1),
            _ => return None,
        })
    }
}

/// What `open` learns from the archive.
struct Index {
    tensors: Vec<TensorEntry>,
    storages: Vec<StorageRecord>,
}

impl Index {
    fn read(file: &[u8]) -> std::result::Result<Index, String> {
        let records = zip::central_directory(file).map_err(|e| match sniff(file) {
            Some(hint) => hint.to_string(),
            None => e,
        })?;
        let mut by_name: HashMap<&str, &zip::Record> = HashMap::with_capacity(records.len());
        for record in &records {
            if by_name.insert(&record.name, record).is_some() {
                return Err(format!(
                    "the zip archive holds two records named `{}`",
                    record.name
                ));
            }
        }
        let pickles: Vec<&zip::Record> = records
            .iter()
            .filter(|r| r.name == "data.pkl" || r.name.ends_with("/data.pkl"))
            .filter(|r| r.name.matches('/').count() <= 1)
            .collect();
        let pickle_record = match pickles.as_slice() {
            [one] => *one,
            [] => {
                return Err(
                    "the zip archive has no `data.pkl` record: it is not a PyTorch \
                            checkpoint (torch.save writes `<name>/data.pkl`)"
                        .to_string(),
                )
            }
            several => {
                let names: Vec<&str> = several.iter().map(|r| r.name.as_str()).collect();
                return Err(format!(
                    "the zip archive has several pickles ({}); a PyTorch checkpoint has one",
                    names.join(", ")
                ));
            }
        };
        let prefix = &pickle_record.name[..pickle_record.name.len() - "data.pkl".len()];

        if let Some(order) = by_name.get(format!("{prefix}byteorder").as_str()) {
            let bytes = zip::read_small(file, order, 64)?;
            if bytes.as_ref() != b"little" {
                return Err(format!(
                    "the checkpoint was written on a {} machine; only little-endian \
                     checkpoints are supported",
                    String::from_utf8_lossy(&bytes).escape_debug()
                ));
            }
        }

        let limit = if pickle_record.deflated {
            MAX_DEFLATED_PICKLE_BYTES
        } else {
            MAX_PICKLE_BYTES
        };
        let pickle = zip::read_small(file, pickle_record, limit)?;
        let parsed =
            pickle::parse(&pickle).map_err(|e| format!("`{}`: {e}", pickle_record.name))?;
        let named = flatten(&parsed)?;

        let mut storages: Vec<StorageRecord> = Vec::new();
        let mut storage_by_key: HashMap<&str, usize> = HashMap::new();
        let mut tensors = Vec::with_capacity(named.len());
        for (name, meta) in named {
            let storage = match storage_by_key.get(meta.storage_key.as_str()) {
                Some(&i) => i,
                None => {
                    let record_name = format!("{prefix}data/{}", meta.storage_key);
                    let record = by_name.get(record_name.as_str()).ok_or_else(|| {
                        format!(
                            "tensor `{name}` uses storage `{}`, but the archive has no \
                             record `{record_name}`: the file is incomplete",
                            meta.storage_key.escape_debug()
                        )
                    })?;
                    storages.push(storage_record(file, record)?);
                    storage_by_key.insert(&meta.storage_key, storages.len() - 1);
                    storages.len() - 1
                }
            };
            storages[storage].users.push(tensors.len());
            tensors.push(tensor_entry(name, meta, storage, &storages[storage])?);
        }
        Ok(Index { tensors, storages })
    }
}

/// A hint for files that are not zips but that we recognise.
fn sniff(file: &[u8]) -> Option<&'static str> {
    // torch.save(..., _use_new_zipfile_serialization=False) starts with a pickled magic number.
    const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
    if file.starts_with(LEGACY_MAGIC) {
        return Some(
            "this is a legacy (PyTorch < 1.6) torch.save file, which is not supported: \
             re-save it with a current PyTorch or convert it to safetensors",
        );
    }
    let header_len = file
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)?;
    if file.get(8) == Some(&b'{') && header_len.checked_add(8)? <= file.len() as u64 {
        return Some(
            "this is a safetensors file, not a PyTorch checkpoint: load it as safetensors",
        );
    }
    None
}

fn storage_record(file: &[u8], record: &zip::Record) -> std::result::Result<StorageRecord, String> {
    let data = zip::data_range(file, record)?;
    let size = usize::try_from(record.size)
        .map_err(|_| format!("record `{}` is too large for this machine", record.name))?;
    Ok(StorageRecord {
        record: record.name.clone(),
        data,
        deflated: record.deflated,
        size,
        crc: record.crc,
        crc_ok: OnceLock::new(),
        users: Vec::new(),
    })
}

/// Checks a tensor's view against its storage, so `load` can index without surprises.
fn tensor_entry(
    name: String,
    meta: &pickle::TensorMeta,
    storage_index: usize,
    storage: &StorageRecord,
) -> std::result::Result<TensorEntry, String> {
    let elem = meta.dtype.size() as u64;
    let overflow = || format!("tensor `{name}` has a shape too large to address");
    let storage_bytes = meta
        .storage_numel
        .checked_mul(meta.storage_dtype.size() as u64)
        .ok_or_else(overflow)?;
    if storage_bytes > storage.size as u64 {
        return Err(format!(
            "storage `{}` should hold {storage_bytes} bytes but its record `{}` holds {}: \
             the file is truncated or corrupt",
            meta.storage_key.escape_debug(),
            storage.record,
            storage.size
        ));
    }
    let mut numel: u64 = 1;
    let mut last: u64 = 0;
    for (&dim, &step) in meta.shape.iter().zip(&meta.stride) {
        numel = numel.checked_mul(dim).ok_or_else(overflow)?;
        if dim > 0 {
            last = (dim - 1)
                .checked_mul(step)
                .and_then(|d| last.checked_add(d))
                .ok_or_else(overflow)?;
        }
    }
    if numel > 0 {
        // One past the last element the view touches, in bytes.
        let end = meta
            .offset
            .checked_add(last)
            .and_then(|e| e.checked_add(1))
            .and_then(|e| e.checked_mul(elem))
            .ok_or_else(overflow)?;
        if end > storage_bytes {
            return Err(format!(
                "tensor `{name}` ({}, offset {}, shape {:?}, stride {:?}) needs {end} bytes of \
                 storage `{}`, which holds only {storage_bytes} bytes ({} {} elements): the \
                 file is corrupt",
                meta.dtype.name(),
                meta.offset,
                meta.shape,
                meta.stride,
                meta.storage_key.escape_debug(),
                meta.storage_numel,
                meta.storage_dtype.name(),
            ));
        }
    }
    let to_usize = |v: &u64| usize::try_from(*v).map_err(|_| overflow());
    Ok(TensorEntry {
        storage: storage_index,
        dtype: meta.dtype,
        offset: to_usize(&meta.offset)?,
        shape: meta
            .shape
            .iter()
            .map(to_usize)
            .collect::<std::result::Result<_, _>>()?,
        stride: meta
            .stride
            .iter()
            .map(to_usize)
            .collect::<std::result::Result<_, _>>()?,
        name,
    })
}

/// Applies the naming rule of the module docs to the unpickled object tree.
fn flatten(
    parsed: &pickle::Parsed,
) -> std::result::Result<Vec<(String, &pickle::TensorMeta)>, String> {
    use pickle::Obj;
    let Obj::Dict(root) = parsed.get(parsed.root) else {
        return Err(format!(
            "the pickle holds a {}, not a dict of tensors",
            parsed.get(parsed.root).kind()
        ));
    };
    let mut top = root.as_slice();
    for (key, value) in dict_entries(parsed, root) {
        if let (Key::Str(k), Obj::Dict(inner)) = (&key, parsed.get(value)) {
            if *k == "state_dict" {
                top = inner.as_slice();
            }
        }
    }
    let mut flat = Flattener {
        parsed,
        out: Vec::new(),
        seen: HashSet::new(),
        visits: 0,
        name_bytes: 0,
    };
    flat.dict(top, "", 0)?;
    Ok(flat.out)
}

enum Key<'a> {
    Str(&'a str),
    Int(i64),
}

/// A dict's entries with string or integer keys, in insertion order, later duplicates
/// replacing earlier values as Python's dict does.
fn dict_entries<'a>(
    parsed: &'a pickle::Parsed,
    pairs: &[(pickle::Id, pickle::Id)],
) -> Vec<(Key<'a>, pickle::Id)> {
    use pickle::Obj;
    let mut out: Vec<(Key<'a>, pickle::Id)> = Vec::with_capacity(pairs.len());
    let mut position: HashMap<(Option<&str>, i64), usize> = HashMap::new();
    for &(k, v) in pairs {
        let (key, slot) = match parsed.get(k) {
            Obj::Str(s) => (Key::Str(s.as_str()), (Some(s.as_str()), 0)),
            Obj::Int(i) => (Key::Int(*i), (None, *i)),
            Obj::Bool(b) => (Key::Int(i64::from(*b)), (None, i64::from(*b))),
            _ => continue,
        };
        match position.get(&slot) {
            Some(&at) => out[at].1 = v,
            None => {
                position.insert(slot, out.len());
                out.push((key, v));
            }
        }
    }
    out
}

struct Flattener<'a> {
    parsed: &'a pickle::Parsed,
    out: Vec<(String, &'a pickle::TensorMeta)>,
    seen: HashSet<String>,
    visits: usize,
    name_bytes: usize,
}

impl<'a> Flattener<'a> {
    fn dict(
        &mut self,
        pairs: &'a [(pickle::Id, pickle::Id)],
        prefix: &str,
        depth: usize,
    ) -> std::result::Result<(), String> {
        use pickle::Obj;
        if depth >= MAX_DICT_DEPTH {
            return Err(format!(
                "dicts are nested more than {MAX_DICT_DEPTH} levels deep (at `{prefix}`)"
            ));
        }
        // Counted per dict visit, so a dict shared many times cannot multiply the work.
        self.visits = self.visits.saturating_add(pairs.len().max(1));
        if self.visits > MAX_FLATTEN_VISITS {
            return Err(format!(
                "the pickle's dicts have more than {MAX_FLATTEN_VISITS} entries"
            ));
        }
        for (key, value) in dict_entries(self.parsed, pairs) {
            let name = match key {
                Key::Str(s) => format!("{prefix}{s}"),
                Key::Int(i) => format!("{prefix}{i}"),
            };
            if name.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "a tensor name is longer than {MAX_NAME_BYTES} bytes (it starts `{}`)",
                    name.chars().take(80).collect::<String>().escape_debug()
                ));
            }
            match self.parsed.get(value) {
                Obj::Tensor(meta) => {
                    if !self.seen.insert(name.clone()) {
                        return Err(format!(
                            "two tensors are named `{}` once nested dicts are joined with `.`",
                            name.escape_debug()
                        ));
                    }
                    self.name_bytes = self.name_bytes.saturating_add(name.len());
                    if self.out.len() >= MAX_TENSORS || self.name_bytes > MAX_ALL_NAMES_BYTES {
                        return Err(format!(
                            "the checkpoint has more than {MAX_TENSORS} tensors or more than \
                             {MAX_ALL_NAMES_BYTES} bytes of tensor names"
                        ));
                    }
                    self.out.push((name, meta.as_ref()));
                }
                Obj::Dict(inner) => self.dict(inner, &format!("{name}."), depth + 1)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Just enough of the zip format (with zip64) to find stored or deflated records.
mod zip {
    use super::Cursor;
    use std::borrow::Cow;
    use std::ops::Range;

    const EOCD_SIG: u32 = 0x0605_4b50;
    const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
    const EOCD64_SIG: u32 = 0x0606_4b50;
    const CENTRAL_SIG: u32 = 0x0201_4b50;
    const LOCAL_SIG: u32 = 0x0403_4b50;
    const EOCD_LEN: usize = 22;
    const CENTRAL_LEN: usize = 46;
    const LOCAL_LEN: usize = 30;

    /// One entry of the central directory.
    #[derive(Debug)]
    pub(super) struct Record {
        pub name: String,
        pub deflated: bool,
        pub crc: u32,
        pub compressed_size: u64,
        pub size: u64,
        pub header_offset: u64,
    }

    const TRUNCATED: &str = "no zip end-of-central-directory record: the file is truncated or \
                             is not a PyTorch .ckpt/.pt checkpoint (a zip archive)";

    /// Reads every entry of the central directory.
    pub(super) fn central_directory(file: &[u8]) -> Result<Vec<Record>, String> {
        let eocd = find_eocd(file).ok_or(TRUNCATED)?;
        let mut c = Cursor::at(file, eocd + 4);
        let disk = c.u16().ok_or(TRUNCATED)?;
        let _cd_disk = c.u16().ok_or(TRUNCATED)?;
        let _entries_here = c.u16().ok_or(TRUNCATED)?;
        let mut entries = u64::from(c.u16().ok_or(TRUNCATED)?);
        let mut cd_size = u64::from(c.u32().ok_or(TRUNCATED)?);
        let mut cd_offset = u64::from(c.u32().ok_or(TRUNCATED)?);
        if disk != 0 && disk != 0xffff {
            return Err("the zip archive spans several disks, which is not supported".into());
        }
        let locator = eocd
            .checked_sub(20)
            .filter(|&at| Cursor::at(file, at).u32() == Some(EOCD64_LOCATOR_SIG));
        if let Some(at) = locator {
            let bad = "the zip64 end-of-central-directory record is damaged";
            let mut c = Cursor::at(file, at + 8);
            let eocd64 = usize::try_from(c.u64().ok_or(bad)?).map_err(|_| bad)?;
            let mut c = Cursor::at(file, eocd64);
            if c.u32() != Some(EOCD64_SIG) {
                return Err(bad.into());
            }
            c.skip(8 + 2 + 2 + 4 + 4 + 8).ok_or(bad)?;
            entries = c.u64().ok_or(bad)?;
            cd_size = c.u64().ok_or(bad)?;
            cd_offset = c.u64().ok_or(bad)?;
        }
        let cd = usize::try_from(cd_offset)
            .ok()
            .zip(usize::try_from(cd_size).ok())
            .and_then(|(start, len)| file.get(start..start.checked_add(len)?))
            .ok_or("the zip central directory lies outside the file: the file is truncated")?;
        let mut records = Vec::with_capacity((entries as usize).min(cd.len() / CENTRAL_LEN));
        let mut c = Cursor::at(cd, 0);
        for i in 0..entries {
            records.push(central_entry(&mut c).ok_or_else(|| {
                format!("zip central directory entry {i} is damaged: the file is corrupt")
            })??);
        }
        Ok(records)
    }

    /// The end-of-central-directory record, searched backwards over any archive comment.
    fn find_eocd(file: &[u8]) -> Option<usize> {
        let last = file.len().checked_sub(EOCD_LEN)?;
        let first = last.saturating_sub(u16::MAX as usize);
        (first..=last).rev().find(|&at| {
            let mut c = Cursor::at(file, at);
            c.u32() == Some(EOCD_SIG)
                && c.skip(16).is_some()
                && c.u16()
                    .is_some_and(|comment| at + EOCD_LEN + comment as usize <= file.len())
        })
    }

    /// `None` when the entry runs off the directory; `Some(Err)` for unsupported features.
    fn central_entry(c: &mut Cursor<'_>) -> Option<Result<Record, String>> {
        if c.u32()? != CENTRAL_SIG {
            return None;
        }
        c.skip(4)?;
        let flags = c.u16()?;
        let method = c.u16()?;
        c.skip(4)?;
        let crc = c.u32()?;
        let mut compressed_size = u64::from(c.u32()?);
        let mut size = u64::from(c.u32()?);
        let name_len = c.u16()? as usize;
        let extra_len = c.u16()? as usize;
        let comment_len = c.u16()? as usize;
        c.skip(8)?;
        let mut header_offset = u64::from(c.u32()?);
        let name = String::from_utf8_lossy(c.take(name_len)?).into_owned();
        let mut extra = Cursor::at(c.take(extra_len)?, 0);
        c.skip(comment_len)?;
        // Sizes and offsets that overflow 32 bits live in the zip64 extra field, in this order.
        while let (Some(id), Some(len)) = (extra.u16(), extra.u16()) {
            let Some(body) = extra.take(len as usize) else {
                break;
            };
            let mut field = Cursor::at(body, 0);
            if id == 0x0001 {
                if size == 0xffff_ffff {
                    size = field.u64()?;
                }
                if compressed_size == 0xffff_ffff {
                    compressed_size = field.u64()?;
                }
                if header_offset == 0xffff_ffff {
                    header_offset = field.u64()?;
                }
            }
        }
        if flags & 1 != 0 {
            return Some(Err(format!(
                "record `{name}` is encrypted, which a PyTorch checkpoint never is"
            )));
        }
        let deflated = match method {
            0 => false,
            8 => true,
            other => {
                return Some(Err(format!(
                    "record `{name}` is compressed with zip method {other}; only stored and \
                     deflated records are supported"
                )))
            }
        };
        if !deflated && compressed_size != size {
            return Some(Err(format!(
                "record `{name}` is stored uncompressed but its sizes differ: the file is corrupt"
            )));
        }
        Some(Ok(Record {
            name,
            deflated,
            crc,
            compressed_size,
            size,
            header_offset,
        }))
    }

    /// The file range of a record's (possibly compressed) bytes, found via its local header.
    pub(super) fn data_range(file: &[u8], record: &Record) -> Result<Range<usize>, String> {
        let damaged = || {
            format!(
                "the zip header of record `{}` is damaged or outside the file: the file is \
                 truncated or corrupt",
                record.name
            )
        };
        let start = usize::try_from(record.header_offset).map_err(|_| damaged())?;
        let mut c = Cursor::at(file, start);
        if c.u32() != Some(LOCAL_SIG) {
            return Err(damaged());
        }
        c.skip(LOCAL_LEN - 4 - 4).ok_or_else(damaged)?;
        let name_len = c.u16().ok_or_else(damaged)? as usize;
        let extra_len = c.u16().ok_or_else(damaged)? as usize;
        let data_start = start
            .checked_add(LOCAL_LEN + name_len + extra_len)
            .ok_or_else(damaged)?;
        let data_end = usize::try_from(record.compressed_size)
            .ok()
            .and_then(|len| data_start.checked_add(len))
            .filter(|&end| end <= file.len())
            .ok_or_else(|| {
                format!(
                    "record `{}` runs past the end of the file: the file is truncated",
                    record.name
                )
            })?;
        Ok(data_start..data_end)
    }

    /// A whole small record, inflated if needed and checked against its CRC.
    pub(super) fn read_small<'a>(
        file: &'a [u8],
        record: &Record,
        limit: u64,
    ) -> Result<Cow<'a, [u8]>, String> {
        if record.size > limit {
            return Err(format!(
                "record `{}` is {} bytes, more than the {limit} this reader accepts",
                record.name, record.size
            ));
        }
        let range = data_range(file, record)?;
        let stored = file.get(range).ok_or("a record lies outside the file")?;
        let data = if record.deflated {
            Cow::Owned(super::inflate(stored, record.size as usize, &record.name)?)
        } else {
            Cow::Borrowed(stored)
        };
        if super::crc32(&data) != record.crc {
            return Err(format!(
                "record `{}` fails its CRC check: the file is corrupt",
                record.name
            ));
        }
        Ok(data)
    }
}

/// Little-endian reads that return `None` instead of running off the end.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn at(data: &'a [u8], pos: usize) -> Self {
        Cursor { data, pos }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
}

/// A pickle interpreter that builds data and never calls code.
///
/// Objects live in one arena (`Parsed::objs`) and refer to each other by index, so memo
/// sharing and cycles cost nothing and everything is freed at once. Globals resolve only
/// against an allow-list; "calling" one of them (REDUCE, NEWOBJ) builds a value this module
/// defines — a tensor description, an empty dict, or an opaque placeholder.
mod pickle {
    use super::{Cursor, TorchDType};
    use std::collections::HashMap;

    pub(super) type Id = u32;

    /// Most objects one pickle may create (a Stable Diffusion pickle makes ~100k).
    const MAX_OBJECTS: usize = 8_000_000;
    /// Most ids held by the stack and all containers together.
    const MAX_ITEMS: usize = 32_000_000;
    const MAX_STACK: usize = 1_000_000;
    /// torch.save nests MARKs about four deep.
    const MAX_MARKS: usize = 1_000;
    const MAX_LINE: usize = 512;
    const MAX_KEY: usize = 256;
    /// No allow-listed callable takes more arguments than this.
    const MAX_ARGS: usize = 16;
    const MAX_NDIM: usize = 64;

    /// An unpickled value.
    #[derive(Debug)]
    pub(super) enum Obj {
        None,
        Bool(bool),
        Int(i64),
        /// An integer wider than 64 bits; kept only as a placeholder.
        BigInt,
        Float,
        Str(String),
        Bytes,
        Tuple(Vec<Id>),
        List(Vec<Id>),
        Dict(Vec<(Id, Id)>),
        Set,
        Global(Global),
        Storage(Box<StorageRef>),
        Tensor(Box<TensorMeta>),
        /// A harmless object we do not model (numpy scalar, torch.device, ...).
        Opaque(&'static str),
    }

    impl Obj {
        pub(super) fn kind(&self) -> &'static str {
            match self {
                Obj::None => "None",
                Obj::Bool(_) => "bool",
                Obj::Int(_) | Obj::BigInt => "int",
                Obj::Float => "float",
                Obj::Str(_) => "str",
                Obj::Bytes => "bytes",
                Obj::Tuple(_) => "tuple",
                Obj::List(_) => "list",
                Obj::Dict(_) => "dict",
                Obj::Set => "set",
                Obj::Global(_) => "global",
                Obj::Storage(_) => "storage",
                Obj::Tensor(_) => "tensor",
                Obj::Opaque(name) => name,
            }
        }
    }

    /// An allow-listed global.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub(super) enum Global {
        OrderedDict,
        /// `torch._utils._rebuild_tensor{,_v2,_v3}`.
        RebuildTensor(u8),
        /// `_rebuild_parameter{,_with_state}`: returns its first argument.
        RebuildParameter,
        /// `torch._tensor._rebuild_from_type_v2(func, type, args, state)`.
        RebuildFromType,
        /// `torch.Tensor` or `torch.nn.Parameter` as a type.
        TensorClass,
        TorchSize,
        StorageType(TorchDType),
        UntypedStorage,
        DType(TorchDType),
        CodecsEncode,
        SetType,
        /// Something harmless whose result we keep as a placeholder.
        Opaque(&'static str),
    }

    /// The `persistent_load` result: a storage record and its element type.
    #[derive(Debug)]
    pub(super) struct StorageRef {
        key: String,
        dtype: TorchDType,
        numel: u64,
    }

    /// A tensor as `_rebuild_tensor_v2/v3` describes it; not yet checked against the archive.
    #[derive(Debug)]
    pub(super) struct TensorMeta {
        pub storage_key: String,
        /// Elements of the storage's own type (bytes for an untyped storage).
        pub storage_numel: u64,
        pub storage_dtype: TorchDType,
        pub dtype: TorchDType,
        /// In elements of `dtype`.
        pub offset: u64,
        pub shape: Vec<u64>,
        pub stride: Vec<u64>,
    }

    /// The object arena and the object STOP returned.
    pub(super) struct Parsed {
        objs: Vec<Obj>,
        pub root: Id,
    }

    impl Parsed {
        pub(super) fn get(&self, id: Id) -> &Obj {
            // Ids only come from `Machine::alloc`, so they are always in range.
            &self.objs[id as usize]
        }
    }

    /// Resolves `module.name` against the allow-list.
    fn resolve(module: &str, name: &str) -> Result<Global, String> {
        // Old torch saved CUDA tensors with `torch.cuda.<Name>Storage`.
        if let ("torch" | "torch.cuda", Some(dtype)) = (module, TorchDType::from_storage_name(name))
        {
            return Ok(Global::StorageType(dtype));
        }
        if let ("torch", Some(dtype)) = (module, TorchDType::from_torch_name(name)) {
            return Ok(Global::DType(dtype));
        }
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor(1),
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor(2),
            ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensor(3),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Global::RebuildParameter
            }
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromType,
            ("torch" | "torch._tensor", "Tensor")
            | ("torch.nn.parameter" | "torch.nn", "Parameter" | "Buffer") => Global::TensorClass,
            ("torch", "Size") => Global::TorchSize,
            ("torch", "device") => Global::Opaque("torch.device"),
            ("torch" | "torch.storage", "UntypedStorage") => Global::UntypedStorage,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("builtins" | "__builtin__", "set" | "frozenset") => Global::SetType,
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => {
                Global::Opaque("numpy scalar")
            }
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct")
            | ("numpy", "ndarray") => Global::Opaque("numpy array"),
            ("numpy", "dtype") => Global::Opaque("numpy dtype"),
            // Full Stable Diffusion 1.x training checkpoints keep this class as a dict key.
            ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") => {
                Global::Opaque("ModelCheckpoint")
            }
            (
                "torch._utils",
                "_rebuild_qtensor"
                | "_rebuild_sparse_tensor"
                | "_rebuild_nested_tensor"
                | "_rebuild_meta_tensor_no_storage"
                | "_rebuild_wrapper_subclass"
                | "_rebuild_device_tensor_from_numpy"
                | "_rebuild_xla_tensor"
                | "_rebuild_mps_tensor",
            ) => {
                return Err(format!(
                    "`torch._utils.{name}` rebuilds a quantized, sparse, nested, meta or \
                     device-specific tensor, which this reader does not support; save dense \
                     CPU tensors instead"
                ))
            }
            _ => {
                return Err(format!(
                    "refusing to load `{}.{}`: the file tries to run code; it is not a plain \
                     PyTorch checkpoint",
                    shorten(module),
                    shorten(name)
                ))
            }
        })
    }

    fn shorten(s: &str) -> String {
        let short: String = s.chars().take(120).collect();
        short.escape_debug().to_string()
    }

    /// Runs the pickle in `data` to its STOP opcode.
    pub(super) fn parse(data: &[u8]) -> Result<Parsed, String> {
        let mut m = Machine {
            input: Cursor::at(data, 0),
            objs: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            items: 0,
        };
        // Shared constants, so NONE/NEWTRUE/NEWFALSE allocate nothing.
        for constant in [Obj::None, Obj::Bool(false), Obj::Bool(true)] {
            m.objs.push(constant);
        }
        loop {
            let at = m.input.pos;
            let op = m
                .input
                .u8()
                .ok_or("the pickle ends without a STOP opcode: the file is truncated")?;
            match m.step(op) {
                Ok(Some(root)) => {
                    return Ok(Parsed { objs: m.objs, root });
                }
                Ok(None) => {}
                Err(e) => return Err(format!("{e} (pickle byte {at})")),
            }
        }
    }

    const NONE: Id = 0;
    const FALSE: Id = 1;
    const TRUE: Id = 2;

    struct Machine<'a> {
        input: Cursor<'a>,
        objs: Vec<Obj>,
        stack: Vec<Id>,
        /// Stack lengths at each open MARK.
        marks: Vec<usize>,
        memo: HashMap<u32, Id>,
        /// Ids held by containers, for `MAX_ITEMS`.
        items: usize,
    }

    impl Machine<'_> {
        /// Executes one opcode; `Some(root)` at STOP.
        fn step(&mut self, op: u8) -> Result<Option<Id>, String> {
            match op {
                0x80 => {
                    // PROTO
                    let version = self.byte()?;
                    if version > 5 {
                        return Err(format!("unknown pickle protocol {version}"));
                    }
                }
                0x95 => {
                    // FRAME: only a read-ahead hint.
                    self.bytes(8)?;
                }
                b'.' => return self.pop().map(Some),
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(format!(
                            "the pickle nests MARKs more than {MAX_MARKS} deep, which no \
                             checkpoint does"
                        ));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    // POP: with nothing above the mark, Python pops the mark itself.
                    if self.stack.len() > self.base() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.push(top)?;
                }
                b'N' => self.push(NONE)?,
                0x88 => self.push(TRUE)?,
                0x89 => self.push(FALSE)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.new_obj(Obj::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.byte()?;
                    self.new_obj(Obj::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.new_obj(Obj::Int(v.into()))?;
                }
                0x8a => {
                    let len = self.byte()? as usize;
                    let value = long(self.bytes(len)?);
                    self.new_obj(value)?;
                }
                0x8b => {
                    let len = self.len32()?;
                    let value = long(self.bytes(len)?);
                    self.new_obj(value)?;
                }
                b'G' => {
                    self.array::<8>()?;
                    self.new_obj(Obj::Float)?;
                }
                b'X' => {
                    let len = self.len32()?;
                    self.string(len)?;
                }
                0x8c => {
                    let len = self.byte()? as usize;
                    self.string(len)?;
                }
                0x8d => {
                    let len = self.len64()?;
                    self.string(len)?;
                }
                // Python 2 `str`: bytes that Python 3 decodes as ASCII by default.
                b'T' => {
                    let len = self.len32()?;
                    self.py2_string(len)?;
                }
                b'U' => {
                    let len = self.byte()? as usize;
                    self.py2_string(len)?;
                }
                b'B' => {
                    let len = self.len32()?;
                    self.bytes(len)?;
                    self.new_obj(Obj::Bytes)?;
                }
                b'C' => {
                    let len = self.byte()? as usize;
                    self.bytes(len)?;
                    self.new_obj(Obj::Bytes)?;
                }
                0x8e | 0x96 => {
                    let len = self.len64()?;
                    self.bytes(len)?;
                    self.new_obj(Obj::Bytes)?;
                }
                b')' => self.new_obj(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.new_container(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let items = self.pop_n(n)?;
                    self.new_container(Obj::Tuple(items))?;
                }
                b']' => self.new_obj(Obj::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.new_container(Obj::List(items))?;
                }
                b'a' => {
                    let value = self.pop()?;
                    self.extend_list(vec![value])?;
                }
                b'e' => {
                    let values = self.pop_mark()?;
                    self.extend_list(values)?;
                }
                b'}' => self.new_obj(Obj::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.new_obj(Obj::Dict(Vec::new()))?;
                    self.extend_dict(pairs)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![(key, value)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.extend_dict(pairs)?;
                }
                0x8f => self.new_obj(Obj::Set)?,
                0x90 => {
                    self.pop_mark()?;
                    let target = self.top()?;
                    if !matches!(self.obj(target), Obj::Set) {
                        return Err(format!("ADDITEMS on a {}", self.obj(target).kind()));
                    }
                }
                0x91 => {
                    self.pop_mark()?;
                    self.new_obj(Obj::Set)?;
                }
                b'q' => {
                    let index = self.byte()?.into();
                    self.memo_put(index)?;
                }
                b'r' => {
                    let index = u32::from_le_bytes(self.array()?);
                    self.memo_put(index)?;
                }
                0x94 => {
                    let index = u32::try_from(self.memo.len()).map_err(|_| "memo is full")?;
                    self.memo_put(index)?;
                }
                b'h' => {
                    let index = self.byte()?.into();
                    self.memo_get(index)?;
                }
                b'j' => {
                    let index = u32::from_le_bytes(self.array()?);
                    self.memo_get(index)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = resolve(&module, &name)?;
                    self.new_obj(Obj::Global(global))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) = (self.obj(module), self.obj(name))
                    else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    let global = resolve(module, name)?;
                    self.new_obj(Obj::Global(global))?;
                }
                b'i' => {
                    // INST: module and name inline, arguments since the mark.
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = resolve(&module, &name)?;
                    let args = self.pop_mark()?;
                    let result = self.call(global, &args)?;
                    self.push(result)?;
                }
                b'o' => {
                    // OBJ: class and arguments since the mark.
                    let mut items = self.pop_mark()?.into_iter();
                    let class = items.next().ok_or("OBJ without a class")?;
                    let args: Vec<Id> = items.collect();
                    let global = self.global(class)?;
                    let result = self.call(global, &args)?;
                    self.push(result)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let global = self.global(callable)?;
                    let args = self.call_args(args)?;
                    let result = self.call(global, &args)?;
                    self.push(result)?;
                }
                0x81 | 0x92 => {
                    // NEWOBJ / NEWOBJ_EX: `cls.__new__(cls, *args)`; keyword arguments ignored.
                    if op == 0x92 {
                        self.pop()?;
                    }
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let global = self.global(class)?;
                    let args = self.call_args(args)?;
                    let result = match global {
                        Global::OrderedDict => self.alloc(Obj::Dict(Vec::new()))?,
                        Global::SetType => self.alloc(Obj::Set)?,
                        _ => self.call(global, &args)?,
                    };
                    self.push(result)?;
                }
                b'b' => {
                    // BUILD sets an object's attributes; the state of what we keep is irrelevant.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    match self.obj(target) {
                        Obj::Dict(_)
                        | Obj::Opaque(_)
                        | Obj::Tensor(_)
                        | Obj::Set
                        | Obj::List(_) => {}
                        other => return Err(format!("BUILD on a {}", other.kind())),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.new_obj(Obj::Storage(Box::new(storage)))?;
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode {} (0x{other:02x}); torch.save does not \
                         write it",
                        opcode_name(other)
                    ))
                }
            }
            Ok(None)
        }

        fn obj(&self, id: Id) -> &Obj {
            &self.objs[id as usize]
        }

        fn alloc(&mut self, obj: Obj) -> Result<Id, String> {
            if self.objs.len() >= MAX_OBJECTS {
                return Err(format!(
                    "the pickle creates more than {MAX_OBJECTS} objects"
                ));
            }
            let id = self.objs.len() as Id;
            self.objs.push(obj);
            Ok(id)
        }

        fn new_obj(&mut self, obj: Obj) -> Result<(), String> {
            let id = self.alloc(obj)?;
            self.push(id)
        }

        fn new_container(&mut self, obj: Obj) -> Result<(), String> {
            let len = match &obj {
                Obj::Tuple(v) | Obj::List(v) => v.len(),
                _ => 0,
            };
            self.count_items(len)?;
            self.new_obj(obj)
        }

        fn count_items(&mut self, n: usize) -> Result<(), String> {
            self.items = self.items.saturating_add(n);
            if self.items > MAX_ITEMS {
                return Err(format!(
                    "the pickle's containers hold more than {MAX_ITEMS} items"
                ));
            }
            Ok(())
        }

        fn push(&mut self, id: Id) -> Result<(), String> {
            if self.stack.len() >= MAX_STACK {
                return Err(format!("the pickle stack grows past {MAX_STACK} entries"));
            }
            self.stack.push(id);
            Ok(())
        }

        /// Stack length at the innermost open MARK; nothing below it can be popped.
        fn base(&self) -> usize {
            self.marks.last().copied().unwrap_or(0)
        }

        fn pop(&mut self) -> Result<Id, String> {
            if self.stack.len() <= self.base() {
                return Err("the pickle pops an empty stack".into());
            }
            self.stack
                .pop()
                .ok_or_else(|| "the pickle pops an empty stack".into())
        }

        fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, String> {
            let len = self.stack.len();
            if len < self.base() + n {
                return Err("the pickle pops an empty stack".into());
            }
            Ok(self.stack.split_off(len - n))
        }

        fn top(&self) -> Result<Id, String> {
            if self.stack.len() <= self.base() {
                return Err("the pickle reads an empty stack".into());
            }
            self.stack
                .last()
                .copied()
                .ok_or_else(|| "the pickle reads an empty stack".into())
        }

        fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
            let mark = self
                .marks
                .pop()
                .ok_or("the pickle closes a MARK it never opened")?;
            Ok(self.stack.split_off(mark.min(self.stack.len())))
        }

        fn byte(&mut self) -> Result<u8, String> {
            self.input.u8().ok_or_else(truncated)
        }

        fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
            self.input.array().ok_or_else(truncated)
        }

        fn bytes(&mut self, len: usize) -> Result<&[u8], String> {
            if len > self.input.remaining() {
                return Err(format!(
                    "the pickle declares a {len}-byte value but only {} bytes remain: the file \
                     is truncated or corrupt",
                    self.input.remaining()
                ));
            }
            self.input.take(len).ok_or_else(truncated)
        }

        fn len32(&mut self) -> Result<usize, String> {
            let len = i32::from_le_bytes(self.array()?);
            usize::try_from(len).map_err(|_| format!("negative length {len}"))
        }

        fn len64(&mut self) -> Result<usize, String> {
            let len = u64::from_le_bytes(self.array()?);
            usize::try_from(len).map_err(|_| format!("length {len} is too large"))
        }

        /// A unicode string. Invalid UTF-8 is refused as Python refuses it: replacing bytes
        /// would let a string take three times the bytes the file spent on it.
        fn string(&mut self, len: usize) -> Result<(), String> {
            let bytes = self.bytes(len)?;
            let s = std::str::from_utf8(bytes)
                .map_err(|e| {
                    format!(
                        "the pickle holds a {len}-byte string that is not UTF-8 (at byte {}): \
                         the file is corrupt",
                        e.valid_up_to()
                    )
                })?
                .to_owned();
            self.new_obj(Obj::Str(s))
        }

        /// A Python 2 string: kept as a string when it is UTF-8 (ASCII names), else as bytes.
        fn py2_string(&mut self, len: usize) -> Result<(), String> {
            let obj = match std::str::from_utf8(self.bytes(len)?) {
                Ok(s) => Obj::Str(s.to_owned()),
                Err(_) => Obj::Bytes,
            };
            self.new_obj(obj)
        }

        /// A newline-terminated GLOBAL/INST argument.
        fn line(&mut self) -> Result<String, String> {
            let rest = &self.input.data[self.input.pos.min(self.input.data.len())..];
            let end = rest
                .iter()
                .take(MAX_LINE)
                .position(|&b| b == b'\n')
                .ok_or("a GLOBAL name is unterminated or too long")?;
            let line = String::from_utf8_lossy(&rest[..end]).into_owned();
            self.input.skip(end + 1).ok_or_else(truncated)?;
            Ok(line)
        }

        fn memo_put(&mut self, index: u32) -> Result<(), String> {
            let top = self.top()?;
            if self.memo.len() >= MAX_OBJECTS && !self.memo.contains_key(&index) {
                return Err(format!(
                    "the pickle memoizes more than {MAX_OBJECTS} objects"
                ));
            }
            self.memo.insert(index, top);
            Ok(())
        }

        fn memo_get(&mut self, index: u32) -> Result<(), String> {
            let id = *self
                .memo
                .get(&index)
                .ok_or_else(|| format!("the pickle reads memo slot {index}, which it never set"))?;
            self.push(id)
        }

        fn global(&self, id: Id) -> Result<Global, String> {
            match self.obj(id) {
                Obj::Global(g) => Ok(*g),
                other => Err(format!(
                    "the pickle calls a {}, which is not callable",
                    other.kind()
                )),
            }
        }

        /// The arguments of a REDUCE/NEWOBJ, refusing long tuples before copying them.
        fn call_args(&self, id: Id) -> Result<Vec<Id>, String> {
            let args = self.tuple(id, "call arguments")?;
            if args.len() > MAX_ARGS {
                return Err(format!("a call passes {} arguments", args.len()));
            }
            Ok(args.to_vec())
        }

        fn tuple(&self, id: Id, what: &str) -> Result<&[Id], String> {
            match self.obj(id) {
                Obj::Tuple(items) => Ok(items),
                other => Err(format!("{what} are a {}, not a tuple", other.kind())),
            }
        }

        fn extend_list(&mut self, values: Vec<Id>) -> Result<(), String> {
            self.count_items(values.len())?;
            let target = self.top()?;
            match &mut self.objs[target as usize] {
                Obj::List(items) => {
                    items.extend(values);
                    Ok(())
                }
                // `set.__setstate__`-style appends onto placeholders are harmless.
                Obj::Set | Obj::Opaque(_) => Ok(()),
                other => Err(format!("APPEND to a {}", other.kind())),
            }
        }

        fn extend_dict(&mut self, pairs: Vec<(Id, Id)>) -> Result<(), String> {
            self.count_items(pairs.len().saturating_mul(2))?;
            let target = self.top()?;
            match &mut self.objs[target as usize] {
                Obj::Dict(items) => {
                    items.extend(pairs);
                    Ok(())
                }
                Obj::Opaque(_) => Ok(()),
                other => Err(format!("SETITEM on a {}", other.kind())),
            }
        }

        fn int(&self, id: Id, what: &str) -> Result<u64, String> {
            match self.obj(id) {
                Obj::Int(v) => u64::try_from(*v).map_err(|_| format!("{what} is negative ({v})")),
                Obj::Bool(b) => Ok(u64::from(*b)),
                other => Err(format!("{what} is a {}, not an int", other.kind())),
            }
        }

        fn ints(&self, id: Id, what: &str) -> Result<Vec<u64>, String> {
            let items = match self.obj(id) {
                Obj::Tuple(items) | Obj::List(items) => items,
                other => return Err(format!("{what} is a {}, not a tuple", other.kind())),
            };
            if items.len() > MAX_NDIM {
                return Err(format!("{what} has {} dimensions", items.len()));
            }
            items.iter().map(|&i| self.int(i, what)).collect()
        }

        /// `persistent_load(('storage', storage_type, key, location, numel))`.
        fn persistent_load(&self, pid: Id) -> Result<StorageRef, String> {
            let bad = || {
                "a persistent id is not ('storage', type, key, location, numel): this is not \
                 a torch.save file"
                    .to_string()
            };
            let [tag, kind, key, _location, numel] = self.tuple(pid, "persistent id")? else {
                return Err(bad());
            };
            if !matches!(self.obj(*tag), Obj::Str(s) if s == "storage") {
                return Err(bad());
            }
            let dtype = match self.obj(*kind) {
                Obj::Global(Global::StorageType(d)) => *d,
                Obj::Global(Global::UntypedStorage) => TorchDType::U8,
                _ => return Err(bad()),
            };
            let Obj::Str(key) = self.obj(*key) else {
                return Err(bad());
            };
            // torch names storages 0, 1, 2...; a long key would be copied into every tensor.
            if key.len() > MAX_KEY {
                return Err(format!("a storage key is longer than {MAX_KEY} bytes"));
            }
            Ok(StorageRef {
                key: key.clone(),
                dtype,
                numel: self.int(*numel, "a storage size")?,
            })
        }

        /// What "calling" an allow-listed global builds. Nothing is executed.
        fn call(&mut self, global: Global, args: &[Id]) -> Result<Id, String> {
            match global {
                Global::OrderedDict => {
                    let pairs = match args {
                        [] => Vec::new(),
                        [items] => match self.obj(*items) {
                            Obj::List(v) | Obj::Tuple(v) => {
                                let mut out = Vec::with_capacity(v.len());
                                for &pair in v {
                                    match self.obj(pair) {
                                        Obj::Tuple(kv) | Obj::List(kv) if kv.len() == 2 => {
                                            out.push((kv[0], kv[1]));
                                        }
                                        _ => return Err("OrderedDict items are not pairs".into()),
                                    }
                                }
                                out
                            }
                            other => {
                                return Err(format!("OrderedDict from a {}", other.kind()));
                            }
                        },
                        _ => return Err("OrderedDict takes at most one argument".into()),
                    };
                    self.count_items(pairs.len().saturating_mul(2))?;
                    self.alloc(Obj::Dict(pairs))
                }
                Global::RebuildTensor(version) => {
                    let meta = self.rebuild_tensor(version, args)?;
                    self.alloc(Obj::Tensor(Box::new(meta)))
                }
                Global::RebuildParameter | Global::TensorClass => match args.first() {
                    Some(&data) if matches!(self.obj(data), Obj::Tensor(_)) => Ok(data),
                    _ => Err("a Parameter is rebuilt from something other than a tensor".into()),
                },
                Global::RebuildFromType => {
                    let [func, class, func_args, _state] = args else {
                        return Err("_rebuild_from_type_v2 takes four arguments".into());
                    };
                    let func = self.global(*func)?;
                    if !matches!(func, Global::RebuildTensor(_))
                        || self.global(*class)? != Global::TensorClass
                    {
                        return Err("_rebuild_from_type_v2 rebuilds something that is not a \
                                    plain tensor or Parameter"
                            .into());
                    }
                    let func_args = self.call_args(*func_args)?;
                    self.call(func, &func_args)
                }
                Global::TorchSize => match args {
                    [] => self.alloc(Obj::Tuple(Vec::new())),
                    [dims] => Ok(*dims),
                    _ => Err("torch.Size takes one argument".into()),
                },
                Global::CodecsEncode => self.alloc(Obj::Bytes),
                Global::SetType => self.alloc(Obj::Set),
                Global::Opaque(name) => self.alloc(Obj::Opaque(name)),
                Global::StorageType(_) | Global::UntypedStorage | Global::DType(_) => Err(
                    "the pickle calls a storage type or dtype, which torch.save never does".into(),
                ),
            }
        }

        /// `_rebuild_tensor(storage, offset, size, stride)`, `_v2(..., requires_grad,
        /// hooks[, metadata])`, `_v3(..., requires_grad, hooks, dtype[, metadata])`.
        fn rebuild_tensor(&self, version: u8, args: &[Id]) -> Result<TensorMeta, String> {
            let arity = match version {
                1 => 4..=4,
                2 => 6..=7,
                _ => 7..=8,
            };
            if !arity.contains(&args.len()) {
                return Err(format!(
                    "a tensor is rebuilt with {} arguments instead of {}",
                    args.len(),
                    arity.start()
                ));
            }
            let Obj::Storage(storage) = self.obj(args[0]) else {
                return Err(format!(
                    "a tensor is rebuilt from a {}, not a storage",
                    self.obj(args[0]).kind()
                ));
            };
            let dtype = if version == 3 {
                match self.obj(args[6]) {
                    Obj::Global(Global::DType(d)) => *d,
                    other => return Err(format!("a tensor's dtype is a {}", other.kind())),
                }
            } else {
                storage.dtype
            };
            let shape = self.ints(args[2], "a tensor shape")?;
            let stride = self.ints(args[3], "a tensor stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "a tensor has {} sizes but {} strides",
                    shape.len(),
                    stride.len()
                ));
            }
            Ok(TensorMeta {
                storage_key: storage.key.clone(),
                storage_numel: storage.numel,
                storage_dtype: storage.dtype,
                dtype,
                offset: self.int(args[1], "a storage offset")?,
                shape,
                stride,
            })
        }
    }

    fn truncated() -> String {
        "the pickle ends in the middle of an opcode: the file is truncated".into()
    }

    /// A little-endian two's complement integer of any width.
    fn long(bytes: &[u8]) -> Obj {
        if bytes.len() > 8 {
            return Obj::BigInt;
        }
        let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
            [0xff; 8]
        } else {
            [0; 8]
        };
        buf[..bytes.len()].copy_from_slice(bytes);
        Obj::Int(i64::from_le_bytes(buf))
    }

    fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>, String> {
        let chunks = items.chunks_exact(2);
        if !chunks.remainder().is_empty() {
            return Err("a dict is given an odd number of keys and values".into());
        }
        Ok(chunks.map(|kv| (kv[0], kv[1])).collect())
    }

    fn opcode_name(op: u8) -> &'static str {
        match op {
            b'I' => "INT",
            b'L' => "LONG",
            b'F' => "FLOAT",
            b'S' => "STRING",
            b'V' => "UNICODE",
            b'P' => "PERSID",
            b'p' => "PUT",
            b'g' => "GET",
            0x82..=0x84 => "EXT",
            0x97 => "NEXT_BUFFER",
            0x98 => "READONLY_BUFFER",
            _ => "unknown",
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn run(bytes: &[u8]) -> Result<Parsed, String> {
            parse(bytes)
        }

        #[test]
        fn protocol_2_dict_with_memo_sharing() {
            // {'a': [1, 'x'], 'b': <same list>}
            let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01X\x01\x00\x00\x00xeX\x01\x00\x00\x00bh\x01u.";
            let parsed = run(p).expect("parses");
            let Obj::Dict(pairs) = parsed.get(parsed.root) else {
                panic!("root is not a dict");
            };
            assert_eq!(pairs.len(), 2);
            assert_eq!(pairs[0].1, pairs[1].1, "memo shares the list");
            let Obj::List(items) = parsed.get(pairs[0].1) else {
                panic!("value is not a list");
            };
            assert_eq!(items.len(), 2);
        }

        #[test]
        fn long1_sign_extends() {
            assert!(matches!(long(&[0xff]), Obj::Int(-1)));
            assert!(matches!(long(&[0x00, 0x01]), Obj::Int(256)));
            assert!(matches!(long(&[]), Obj::Int(0)));
            assert!(matches!(long(&[1; 9]), Obj::BigInt));
        }

        #[test]
        fn refuses_globals_outside_the_allow_list() {
            for (module, name) in [
                ("os", "system"),
                ("builtins", "eval"),
                ("subprocess", "Popen"),
            ] {
                let mut p = b"\x80\x02c".to_vec();
                p.extend_from_slice(format!("{module}\n{name}\n.").as_bytes());
                let err = run(&p).err().expect("refused");
                assert!(
                    err.contains(&format!("refusing to load `{module}.{name}`")),
                    "{err}"
                );
            }
        }

        #[test]
        fn stack_global_is_checked_too() {
            let p = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93.";
            let err = run(p).err().expect("refused");
            assert!(err.contains("`os.system`"), "{err}");
        }

        #[test]
        fn deep_marks_are_refused() {
            let mut p = b"\x80\x02".to_vec();
            p.extend(std::iter::repeat_n(b'(', 100_000));
            p.push(b'.');
            let err = run(&p).err().expect("refused");
            assert!(err.contains("MARKs"), "{err}");
        }

        #[test]
        fn lengths_are_checked_against_the_input() {
            let err = run(b"\x80\x02X\xff\xff\xff\x7fabc").err().expect("refused");
            assert!(err.contains("only 3 bytes remain"), "{err}");
            let err = run(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc")
                .err()
                .expect("refused");
            assert!(
                err.contains("bytes remain") || err.contains("too large"),
                "{err}"
            );
        }

        #[test]
        fn stack_and_memo_misuse_is_an_error() {
            for p in [
                &b"\x80\x02."[..],
                b"\x80\x02h\x05.",
                b"\x80\x02(0R.",
                b"\x80\x02K\x01(s.",
                b"\x80\x021.",
                b"\x80\x02K\x01K\x02R.",
                b"\x80\x02}K\x01a.",
                b"\x80\x02",
            ] {
                assert!(run(p).is_err(), "{p:?}");
            }
        }

        #[test]
        fn self_referencing_dict_parses() {
            // d = {}; d['d'] = d
            let p = b"\x80\x02}q\x00X\x01\x00\x00\x00dh\x00s.";
            let parsed = run(p).expect("parses");
            assert!(matches!(parsed.get(parsed.root), Obj::Dict(v) if v.len() == 1));
        }

        #[test]
        fn random_mutations_never_panic() {
            let base: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\nq\x01((X\x07\x00\x00\x00storageq\x02ctorch\nHalfStorage\nq\x03X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x0ctq\x04QK\x00K\x03K\x04\x86K\x04K\x01\x86\x89ccollections\nOrderedDict\n)Rtq\x05RX\x01\x00\x00\x00bh\x01(h\x04QK\x04K\x02\x85K\x01\x85\x89h\x05tRu.";
            assert!(run(base).is_ok());
            let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for _ in 0..20_000 {
                let mut p = base.to_vec();
                for _ in 0..1 + next() % 3 {
                    let at = (next() % p.len() as u64) as usize;
                    p[at] = next() as u8;
                }
                let _ = run(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[77, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(!is_contiguous(&[2, 3], &[0, 1]));
    }

    #[test]
    fn strided_copy_transposes_and_expands() {
        let data: Vec<u8> = (0u8..6).collect();
        // A 2x3 row-major matrix read as its 3x2 transpose.
        let out = copy_strided(&data, 1, 0, &[3, 2], &[1, 3], 6).expect("in bounds");
        assert_eq!(*out, [0, 3, 1, 4, 2, 5]);
        let out = copy_strided(&data, 2, 1, &[2, 2], &[0, 1], 8).expect("in bounds");
        assert_eq!(*out, [2, 3, 4, 5, 2, 3, 4, 5]);
        let out = copy_strided(&data, 1, 5, &[], &[], 1).expect("in bounds");
        assert_eq!(*out, [5]);
        let out = copy_strided(&data, 2, 1, &[2], &[1], 4).expect("in bounds");
        assert!(
            matches!(out, Cow::Borrowed([2, 3, 4, 5])),
            "contiguous views are borrowed"
        );
        assert!(copy_strided(&data, 1, 4, &[3], &[2], 3).is_none());
    }

    /// A minimal stored zip writer, to build archives Python's zipfile will not.
    fn zip_of(records: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in records {
            let offset = out.len() as u32;
            let crc = crc32(data);
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&crc.to_le_bytes());
            let (size32, offset32) = if zip64 {
                (u32::MAX, u32::MAX)
            } else {
                (data.len() as u32, offset)
            };
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(if zip64 { 28u16 } else { 0 }).to_le_bytes());
            // Comment length, disk, internal and external attributes.
            central.extend_from_slice(&[0; 10]);
            central.extend_from_slice(&offset32.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            if zip64 {
                central.extend_from_slice(&1u16.to_le_bytes());
                central.extend_from_slice(&24u16.to_le_bytes());
                central.extend_from_slice(&(data.len() as u64).to_le_bytes());
                central.extend_from_slice(&(data.len() as u64).to_le_bytes());
                central.extend_from_slice(&u64::from(offset).to_le_bytes());
            }
        }
        let cd_offset = out.len() as u64;
        out.extend_from_slice(&central);
        let n = records.len() as u64;
        if zip64 {
            let eocd64 = out.len() as u64;
            out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&(central.len() as u64).to_le_bytes());
            out.extend_from_slice(&cd_offset.to_le_bytes());
            out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&eocd64.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let (n16, size32, off32) = if zip64 {
            (u16::MAX, u32::MAX, u32::MAX)
        } else {
            (n as u16, central.len() as u32, cd_offset as u32)
        };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&off32.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    /// Pushes `_rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 2), 0, (2,), (1,), ...)`.
    const TENSOR: &[u8] = b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR";

    fn key(k: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out
    }

    fn pickle_of(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = b"\x80\x02".to_vec();
        for part in parts {
            out.extend_from_slice(part);
        }
        out.push(b'.');
        out
    }

    fn names_of(pickle: &[u8]) -> std::result::Result<Vec<String>, String> {
        let parsed = pickle::parse(pickle)?;
        Ok(flatten(&parsed)?.into_iter().map(|(n, _)| n).collect())
    }

    #[test]
    fn reads_zip64_directories() {
        let blob: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let pkl = pickle_of(&[b"}", &key("w"), TENSOR, b"s"]);
        for zip64 in [false, true] {
            let file = zip_of(
                &[("archive/data.pkl", &pkl), ("archive/data/0", &blob)],
                zip64,
            );
            let index = Index::read(&file).expect("readable");
            assert_eq!(index.tensors.len(), 1);
            assert_eq!(index.tensors[0].name, "w");
            assert_eq!(index.tensors[0].shape, [2]);
            let s = &index.storages[0];
            assert_eq!(&file[s.data.clone()], &blob[..]);
        }
    }

    /// Mutates torch's own `data.pkl` and re-zips it with a valid CRC, so the mutants reach
    /// the pickle interpreter and the index checks instead of failing the CRC.
    #[test]
    fn mutated_torch_pickles_never_panic() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ckpt/basic.ckpt"
        );
        let file = std::fs::read(path).expect("fixture");
        let records: Vec<(String, Vec<u8>)> = zip::central_directory(&file)
            .expect("zip")
            .iter()
            .map(|r| {
                let data = zip::read_small(&file, r, 1 << 20).expect("record");
                (r.name.clone(), data.into_owned())
            })
            .collect();
        let pickle_at = records
            .iter()
            .position(|(n, _)| n.ends_with("data.pkl"))
            .expect("data.pkl");
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut readable = 0;
        for _ in 0..5000 {
            let mut records = records.clone();
            let pickle = &mut records[pickle_at].1;
            for _ in 0..1 + next() % 3 {
                let at = (next() % pickle.len() as u64) as usize;
                pickle[at] = next() as u8;
            }
            let refs: Vec<(&str, &[u8])> = records
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice()))
                .collect();
            if Index::read(&zip_of(&refs, false)).is_ok() {
                readable += 1;
            }
        }
        assert!(readable > 0, "some mutants (in strings, say) stay readable");
    }

    #[test]
    fn state_dict_is_unwrapped_and_other_dicts_are_joined() {
        let (sd, a, b) = (key("state_dict"), key("a"), key("b"));
        let names = names_of(&pickle_of(&[
            b"}(", &sd, b"}", &a, TENSOR, b"s", &b, TENSOR, b"u",
        ]));
        assert_eq!(names.expect("parses"), ["a"]);

        let (model, enc, w, step) = (key("model"), key("enc"), key("w"), key("step"));
        let nested = [
            b"}(",
            &model[..],
            b"}",
            &enc,
            b"}",
            &w,
            TENSOR,
            b"ss",
            &step,
            b"K\x03u",
        ];
        assert_eq!(
            names_of(&pickle_of(&nested)).expect("parses"),
            ["model.enc.w"]
        );

        // Top-level tensors, an integer key, a tuple key (skipped) and a replaced value.
        let top = [
            b"}(",
            &a[..],
            b"K\x01",
            &b,
            TENSOR,
            b"K\x07",
            TENSOR,
            b")",
            TENSOR,
            &a,
            TENSOR,
            b"u",
        ];
        assert_eq!(names_of(&pickle_of(&top)).expect("parses"), ["a", "b", "7"]);
    }

    #[test]
    fn flattening_refuses_collisions_and_cycles() {
        let (ab, a, b) = (key("a.b"), key("a"), key("b"));
        let collide = [b"}(", &ab[..], TENSOR, &a, b"}", &b, TENSOR, b"su"];
        let err = names_of(&pickle_of(&collide)).expect_err("collision");
        assert!(err.contains("two tensors are named `a.b`"), "{err}");

        // d = {}; d['a'] = d
        let cycle = [b"}q\x00", &a[..], b"h\x00s"];
        let err = names_of(&pickle_of(&cycle)).expect_err("cycle");
        assert!(err.contains("nested more than"), "{err}");

        let err = names_of(&pickle_of(&[TENSOR])).expect_err("not a dict");
        assert!(err.contains("not a dict"), "{err}");
    }
}
