//! Builders for hostile model files: minimal PyTorch zip checkpoints (a protocol-2 pickle of
//! `_rebuild_tensor_v2` calls and stored or deflated records), safetensors files with one
//! tensor changed, and the peak resident memory of the test process.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A record's bytes as they go into the zip.
pub enum Data {
    Stored(Vec<u8>),
    /// Already deflated: the compressed bytes, the inflated size and its CRC.
    Deflated {
        compressed: Vec<u8>,
        size: u64,
        crc: u32,
    },
}

impl Data {
    /// `bytes` deflated.
    pub fn deflate(bytes: &[u8]) -> Data {
        let mut crc = flate2::Crc::new();
        crc.update(bytes);
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(bytes).expect("deflate into memory");
        Data::Deflated {
            compressed: enc.finish().expect("deflate into memory"),
            size: bytes.len() as u64,
            crc: crc.sum(),
        }
    }

    /// `len` copies of `byte`, deflated without ever holding them all in memory.
    pub fn deflate_repeated(prefix: &[u8], byte: u8, len: u64) -> Data {
        let mut crc = flate2::Crc::new();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        crc.update(prefix);
        enc.write_all(prefix).expect("deflate into memory");
        let chunk = vec![byte; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            crc.update(&chunk[..n]);
            enc.write_all(&chunk[..n]).expect("deflate into memory");
            left -= n as u64;
        }
        Data::Deflated {
            compressed: enc.finish().expect("deflate into memory"),
            size: prefix.len() as u64 + len,
            crc: crc.sum(),
        }
    }
}

/// A zip archive of `records` as `torch.save` lays them out (no zip64).
pub fn zip(records: Vec<(String, Data)>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let count = records.len() as u16;
    for (name, data) in records {
        let (method, crc, body, size) = match data {
            Data::Stored(bytes) => {
                let mut crc = flate2::Crc::new();
                crc.update(&bytes);
                let size = bytes.len() as u64;
                (0u16, crc.sum(), bytes, size)
            }
            Data::Deflated {
                compressed,
                size,
                crc,
            } => (8u16, crc, compressed, size),
        };
        let offset = out.len() as u32;
        let fields = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&method.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes()); // time, date
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(&(size as u32).to_le_bytes());
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        fields(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&body);

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        fields(&mut central);
        central.extend_from_slice(&0u16.to_le_bytes()); // comment
        central.extend_from_slice(&0u16.to_le_bytes()); // disk
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// One float32 tensor of a pickled state dict: a view of storage `key` (of `storage_numel`
/// elements) at element `offset` with a contiguous `shape`.
pub struct PickledTensor<'a> {
    pub name: &'a str,
    pub key: &'a str,
    pub storage_numel: u64,
    pub offset: u64,
    pub shape: &'a [u64],
}

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: u64) {
    out.push(b'J');
    out.extend_from_slice(&(v as i32).to_le_bytes());
}

fn int_tuple(out: &mut Vec<u8>, values: &[u64]) {
    out.push(b'(');
    for &v in values {
        int(out, v);
    }
    out.push(b't');
}

/// A protocol-2 pickle of `{name: tensor}` as `torch.save(state_dict)` writes it.
pub fn state_dict_pickle(tensors: &[PickledTensor<'_>]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    for t in tensors {
        unicode(&mut p, t.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // The persistent id ('storage', torch.FloatStorage, key, 'cpu', numel).
        p.push(b'(');
        unicode(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut p, t.key);
        unicode(&mut p, "cpu");
        int(&mut p, t.storage_numel);
        p.extend_from_slice(b"tQ");
        int(&mut p, t.offset);
        int_tuple(&mut p, t.shape);
        let mut stride = vec![1u64; t.shape.len()];
        for i in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * t.shape[i + 1];
        }
        int_tuple(&mut p, &stride);
        p.push(0x89); // False
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
        p.extend_from_slice(b"tR");
    }
    p.extend_from_slice(b"u.");
    p
}

/// A checkpoint archive `archive/` with `pickle` and the storages `data/<key>`.
pub fn checkpoint(pickle: Data, storages: Vec<(String, Data)>) -> Vec<u8> {
    let mut records = vec![
        ("archive/data.pkl".to_string(), pickle),
        (
            "archive/byteorder".to_string(),
            Data::Stored(b"little".to_vec()),
        ),
    ];
    for (key, data) in storages {
        records.push((format!("archive/data/{key}"), data));
    }
    zip(records)
}

/// A checkpoint whose state dict holds `tensors` (name, shape, float32 bytes), each in a
/// storage of its own.
pub fn float32_checkpoint(tensors: &[(String, Vec<u64>, Vec<u8>)]) -> Vec<u8> {
    let keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
    let pickled: Vec<PickledTensor> = tensors
        .iter()
        .zip(&keys)
        .map(|((name, shape, bytes), key)| PickledTensor {
            name,
            key,
            storage_numel: bytes.len() as u64 / 4,
            offset: 0,
            shape,
        })
        .collect();
    checkpoint(
        Data::Stored(state_dict_pickle(&pickled)),
        tensors
            .iter()
            .zip(&keys)
            .map(|((_, _, b), k)| (k.clone(), Data::Stored(b.clone())))
            .collect(),
    )
}

/// A safetensors file of `tensors` given as (name, dtype name, shape, bytes), in name order.
pub fn safetensors(tensors: &[(String, String, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut sorted: Vec<&(String, String, Vec<usize>, Vec<u8>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &sorted {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for (_, _, _, bytes) in sorted {
        out.extend_from_slice(bytes);
    }
    out
}

/// The tensors of a safetensors file as (name, dtype name, shape, bytes).
pub fn read_safetensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture parses");
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `path`'s tensors with `name` replaced by a float32 tensor of `shape` (zeros).
pub fn with_tensor_reshaped(path: &Path, name: &str, shape: &[usize]) -> Vec<u8> {
    let mut tensors = read_safetensors(path);
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("fixture has no tensor `{name}`"));
    t.1 = "F32".into();
    t.2 = shape.to_vec();
    t.3 = vec![0u8; shape.iter().product::<usize>() * 4];
    safetensors(&tensors)
}

/// Replaces a file's contents in place (created if missing). Truncating to zero and
/// rewriting would make ext4 flush the file every time (`auto_da_alloc`), slowing fuzz loops.
pub fn overwrite(path: &Path, bytes: &[u8]) {
    use std::io::{Seek, Write};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open scratch file");
    file.write_all(bytes).expect("write scratch file");
    let len = file.stream_position().expect("position");
    file.set_len(len).expect("truncate scratch file");
}

/// The process's peak resident set (`VmHWM`) in bytes; 0 where `/proc` is absent.
pub fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// The process's current resident set (`VmRSS`) in bytes; 0 where `/proc` is absent.
pub fn current_rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Tensor names to shapes, for messages.
pub fn shapes(tensors: &[(String, String, Vec<usize>, Vec<u8>)]) -> HashMap<String, Vec<usize>> {
    tensors
        .iter()
        .map(|(n, _, s, _)| (n.clone(), s.clone()))
        .collect()
}
