//! The tensor index of a checkpoint: the unpickled object tree flattened into named tensors
//! (see the naming rule in the module docs of [`crate::ckpt`]), each view checked against the
//! zip record of its storage.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::OnceLock;

use super::dtype::TorchDType;
use super::{pickle, zip};

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

/// One named tensor: a strided view of a storage record.
pub(super) struct TensorEntry {
    pub(super) name: String,
    pub(super) storage: usize,
    pub(super) dtype: TorchDType,
    /// In elements of `dtype`.
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

/// The zip record `<archive>/data/<key>` holding one storage's bytes.
pub(super) struct StorageRecord {
    pub(super) record: String,
    /// Bytes of the record as stored in the file (compressed when `deflated`).
    pub(super) data: Range<usize>,
    pub(super) deflated: bool,
    /// Uncompressed length.
    pub(super) size: usize,
    pub(super) crc: u32,
    /// Whether the CRC of a stored record matched, checked on first use.
    pub(super) crc_ok: OnceLock<bool>,
    /// Tensors viewing this storage (indices into `CkptFile::tensors`).
    pub(super) users: Vec<usize>,
}

/// What `open` learns from the archive.
pub(super) struct Index {
    pub(super) tensors: Vec<TensorEntry>,
    pub(super) storages: Vec<StorageRecord>,
}

impl Index {
    pub(super) fn read(file: &[u8]) -> std::result::Result<Index, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ckpt::zip::crc32;

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
