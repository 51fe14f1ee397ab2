//! TensorBoard event files, as sd-scripts writes them through accelerate's tracker when
//! `logging_dir` is set: one run folder per run, `<logging_dir>/<YYYYmmddHHMMSS>/network_train/`,
//! holding `events.out.tfevents.<secs>.<host>.<pid>.0` with one scalar summary per tag and step
//! (`loss/current`, `loss/average`, `loss/epoch_average`, `lr/<group>`, `lr/d*lr/<group>`).
//!
//! The file format is TensorFlow's record file: each record is its length (u64), a masked
//! CRC-32C of the length, the bytes, and a masked CRC-32C of the bytes; each record's bytes
//! are a `tensorflow.Event` protocol buffer. The first event carries the file version
//! (`brain.Event:2`); every later one a `Summary` with one `simple_value`. The few protobuf
//! fields needed are encoded here by hand.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// accelerate's project name for sd-scripts' LoRA runs: the folder inside each run folder.
pub const PROJECT: &str = "network_train";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses it.
fn crc32c(bytes: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in bytes {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The CRC TFRecord stores: rotated and offset, so a CRC of CRCs stays useful.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::with_capacity(64);
    e.push(1 << 3 | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        e.push(2 << 3);
        varint(&mut e, step as u64);
    }
    body(&mut e);
    e
}

/// `Summary { value = 1: Value { tag = 1 (string), simple_value = 2 (float) } }`.
fn scalar_summary(tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + 8);
    bytes_field(&mut v, 1, tag.as_bytes());
    v.push(2 << 3 | 5);
    v.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::with_capacity(v.len() + 2);
    bytes_field(&mut summary, 1, &v);
    summary
}

/// `YYYYmmddHHMMSS` of `secs` since the Unix epoch, in UTC (sd-scripts names a run folder by
/// its local start time; UTC needs no time-zone data), as sample files are named.
pub fn timestamp(secs: u64) -> String {
    crate::sample::timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// One event file being written.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// The run folder sd-scripts makes in `logging_dir` for a run started at `secs`, and the
    /// event file in it named as TensorBoard's writer names it.
    pub fn for_run(logging_dir: &Path, secs: u64) -> Result<Self> {
        let dir = logging_dir.join(timestamp(secs)).join(PROJECT);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let name = format!("events.out.tfevents.{secs}.{host}.{}.0", std::process::id());
        Self::create(&dir.join(name), secs as f64)
    }

    /// Creates `path` (and its folders) and writes the file-version event.
    pub fn create(path: &Path, wall_time: f64) -> Result<Self> {
        let io = |e: std::io::Error| {
            Error::Config(format!(
                "logging.logging_dir: cannot write the TensorBoard log {}: {e}",
                path.display()
            ))
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = File::create(path).map_err(io)?;
        let mut writer = Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        let first = event(wall_time, 0, |e| bytes_field(e, 3, b"brain.Event:2"));
        writer.record(&first)?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(&len)?;
            out.write_all(&masked_crc(&len).to_le_bytes())?;
            out.write_all(data)?;
            out.write_all(&masked_crc(data).to_le_bytes())
        };
        write(&mut self.out).map_err(|e| self.io_error(e))
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        Error::Internal(format!(
            "writing the TensorBoard log {}: {e}",
            self.path.display()
        ))
    }

    /// Appends one scalar (not yet flushed: see [`EventWriter::flush`]).
    pub fn scalar(&mut self, tag: &str, value: f32, step: i64, wall_time: f64) -> Result<()> {
        let summary = scalar_summary(tag, value);
        let e = event(wall_time, step, |e| bytes_field(e, 5, &summary));
        self.record(&e)
    }

    /// Makes everything appended visible to a TensorBoard reading the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| self.io_error(e))
    }
}

/// One scalar as a reader of the file sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    pub value: f32,
    pub wall_time: f64,
}

/// What an event file holds: its version line and its scalars, in file order. Every record's
/// CRCs are checked, as TensorBoard's reader checks them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventFile {
    pub file_version: String,
    pub scalars: Vec<Scalar>,
}

/// A cursor over protobuf bytes: just what an `Event` needs.
struct Fields<'a> {
    bytes: &'a [u8],
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.bytes.split_first()?;
            self.bytes = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    /// The next `(field number, value)`, `None` at the end; `Err` on malformed bytes.
    fn next_field(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, ()> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint().ok_or(())?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint().ok_or(())?),
            1 => Field::Fixed64(self.take(8).ok_or(())?.try_into().map_err(|_| ())?),
            2 => {
                let n = self.varint().ok_or(())? as usize;
                Field::Bytes(self.take(n).ok_or(())?)
            }
            5 => Field::Fixed32(self.take(4).ok_or(())?.try_into().map_err(|_| ())?),
            _ => return Err(()),
        };
        Ok(Some((key >> 3, field)))
    }
}

fn read_event(data: &[u8], file: &mut EventFile) -> std::result::Result<(), ()> {
    let (mut wall_time, mut step) = (0f64, 0i64);
    let mut values = Vec::new();
    let mut fields = Fields { bytes: data };
    while let Some((number, field)) = fields.next_field()? {
        match (number, field) {
            (1, Field::Fixed64(b)) => wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => step = v as i64,
            (3, Field::Bytes(b)) => file.file_version = String::from_utf8_lossy(b).into_owned(),
            (5, Field::Bytes(summary)) => {
                let mut summary = Fields { bytes: summary };
                while let Some((number, field)) = summary.next_field()? {
                    let (1, Field::Bytes(value)) = (number, field) else {
                        continue;
                    };
                    let (mut tag, mut simple) = (String::new(), None);
                    let mut value = Fields { bytes: value };
                    while let Some((number, field)) = value.next_field()? {
                        match (number, field) {
                            (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                            (2, Field::Fixed32(v)) => simple = Some(f32::from_le_bytes(v)),
                            _ => {}
                        }
                    }
                    if let Some(v) = simple {
                        values.push((tag, v));
                    }
                }
            }
            _ => {}
        }
    }
    file.scalars
        .extend(values.into_iter().map(|(tag, value)| Scalar {
            tag,
            step,
            value,
            wall_time,
        }));
    Ok(())
}

/// Reads an event file written by [`EventWriter`] (or any TensorBoard writer's scalars).
pub fn read(path: &Path) -> Result<EventFile> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
    let bad = |at: usize, what: &str| {
        Error::Config(format!(
            "{} is not a valid TensorBoard event file: {what} at byte {at}",
            path.display()
        ))
    };
    let mut file = EventFile::default();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| bad(at, "a cut record"))?;
        let (len, crc) = header.split_at(8);
        if masked_crc(len).to_le_bytes() != crc {
            return Err(bad(at, "a length CRC mismatch"));
        }
        let n = u64::from_le_bytes(len.try_into().map_err(|_| bad(at, "a short length"))?);
        let start = at + 12;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|&end| end + 4 <= bytes.len())
            .ok_or_else(|| bad(at, "a cut record"))?;
        let data = &bytes[start..end];
        if masked_crc(data).to_le_bytes() != bytes[end..end + 4] {
            return Err(bad(at, "a data CRC mismatch"));
        }
        read_event(data, &mut file).map_err(|()| bad(start, "a malformed event"))?;
        at = end + 4;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C of "123456789" is 0xE3069283 (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn run_folders_are_named_by_their_start_time() {
        assert_eq!(timestamp(0), "19700101000000");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(timestamp(1_709_210_096), "20240229123456");
        assert_eq!(timestamp(4_102_444_799), "20991231235959");
    }

    #[test]
    fn a_scalar_event_is_the_protobuf_tensorflow_reads() {
        let summary = scalar_summary("loss/current", 0.5);
        let e = event(2.0, 3, |e| bytes_field(e, 5, &summary));
        let mut want = vec![0x09];
        want.extend_from_slice(&2.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 3, 0x2a, 21, 0x0a, 19, 0x0a, 12]);
        want.extend_from_slice(b"loss/current");
        want.push(0x15);
        want.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(e, want);
    }
}
