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
//!
//! The module is split by job: `zip` finds the records of the archive, `pickle` runs
//! `data.pkl`, `index` turns the unpickled tree into named tensor views checked against their
//! storages (`dtype` and `cursor` serve them), and this file serves the tensors
//! ([`CkptFile`]).
//!
//! `candle_core::pickle` reads the same files, but it is not used because it trusts the file
//! more than a checkpoint downloaded from a model site deserves, and reads less of it:
//!
//! - It accepts every global the pickle names and keeps unknown callables as opaque values,
//!   so a pickle that would run code under `torch.load` is read without a word. Here globals
//!   resolve only against an allow-list of torch/numpy/collections names, and anything else
//!   is refused with a sentence saying the file tries to run code.
//! - Sizes and counts read from the file are used unchecked: a 5-byte BINUNICODE header
//!   allocates its claimed length (up to 4 GiB) before reading, memo GETs clone whole object
//!   trees, and the stack, memo and nesting are unbounded. Here every length is checked
//!   against the bytes that remain, objects live in one arena shared by id, and objects,
//!   container items, stack, MARKs, dict depth, tensor count and name lengths have bounds,
//!   as does the size of `data.pkl`; deflated records grow their buffer only with real
//!   output, and a view larger than its storage is materialised only up to a bound.
//! - It rebuilds only `_rebuild_tensor_v2` over six storage types and contiguous (or
//!   Fortran-contiguous) views, reads one level of dict with an optional key, and reopens the
//!   zip for each tensor. Here `_rebuild_tensor{,_v2,_v3}`, parameters and untyped storages
//!   are read, every torch dtype is recognised (one candle lacks is refused by name), any
//!   strided view is checked against its storage and gathered, nested dicts are named as
//!   sd-scripts names them, and tensors are copied out of one memory map with the zip CRCs
//!   checked.

mod cursor;
mod dtype;
mod index;
mod pickle;
mod zip;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};
use dtype::TorchDType;
use index::{Index, StorageRecord, TensorEntry};
use zip::{crc32, inflate};

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
                stored_as: None,
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
}
