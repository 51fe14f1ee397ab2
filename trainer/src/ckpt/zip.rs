//! Just enough of the zip format (with zip64) to find stored or deflated records.

use std::borrow::Cow;
use std::ops::Range;

use super::cursor::Cursor;

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
        Cow::Owned(inflate(stored, record.size as usize, &record.name)?)
    } else {
        Cow::Borrowed(stored)
    };
    if crc32(&data) != record.crc {
        return Err(format!(
            "record `{}` fails its CRC check: the file is corrupt",
            record.name
        ));
    }
    Ok(data)
}

pub(super) fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// Decompresses a deflated record of known size; memory grows only with real output.
pub(super) fn inflate(
    data: &[u8],
    size: usize,
    record: &str,
) -> std::result::Result<Vec<u8>, String> {
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
