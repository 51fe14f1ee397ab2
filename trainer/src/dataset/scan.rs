//! Finding images and captions under kohya's folder layout: `train_data_dir/N_name/*.png`
//! where N is the repeat count and `name` the caption of images without a caption file.
//! Layout mistakes are errors that name the path and the fix; doubtful things are warnings.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use super::caption::TagCounts;
use crate::confine::AllowedRoots;
use crate::{Error, Result};

/// Extensions (lowercase) of the images read; matched case-insensitively.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Image formats kohya may read but this build cannot; reported rather than silently skipped.
const UNSUPPORTED_IMAGE_EXTENSIONS: [&str; 8] =
    ["bmp", "gif", "avif", "jxl", "tif", "tiff", "heic", "heif"];

/// Caption extensions users mix up (kohya's default is `.caption`, the GUI's `.txt`).
const KNOWN_CAPTION_EXTENSIONS: [&str; 2] = [".txt", ".caption"];

/// One `N_name` folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    pub dir: PathBuf,
    /// The folder's name, e.g. `10_sks dog` (the key of kohya's `ss_dataset_dirs`).
    pub name: String,
    /// Repeat count from the folder name (reg images may be repeated more; see `ImageEntry`).
    pub repeats: u32,
    /// The name part after `N_`: the caption of images without a caption file.
    pub class_tokens: String,
    pub is_reg: bool,
    /// Readable images in the folder (kohya counts files; the two differ only when an image is
    /// skipped as unreadable).
    pub img_count: usize,
    /// Images that used `class_tokens` because they have no caption file.
    pub missing_captions: usize,
    pub tags: TagCounts,
}

/// One image file and its raw caption, as found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundImage {
    pub path: PathBuf,
    pub subset: usize,
    pub caption: String,
}

/// kohya's `extract_dreambooth_params`: `N_name` -> (N, name); `None` when the part before the
/// first `_` is not an integer.
pub fn parse_folder_name(name: &str) -> Option<(i64, String)> {
    let (num, rest) = name.split_once('_').unwrap_or((name, ""));
    let num = num.trim();
    let digits = num.strip_prefix('+').unwrap_or(num);
    let digits = digits.strip_prefix('-').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, rest.to_string()))
}

fn lower_ext(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

fn is_image(path: &Path) -> bool {
    lower_ext(path).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Reads a caption file as kohya does: UTF-8 (a BOM is tolerated), first line, trimmed; the
/// file must lie inside `roots` when it is opened.
pub fn read_caption(path: &Path, roots: &AllowedRoots) -> Result<String> {
    let bytes = roots.read(path)?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "caption file is not UTF-8 text (invalid byte at offset {}); re-save it as UTF-8",
                    e.valid_up_to()
                ),
            ),
        )
    })?;
    if text.is_empty() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "caption file is empty; write the caption into it, or delete it to caption the image \
                 with its folder's name",
            ),
        ));
    }
    // Python's text mode splits lines on \n, \r\n and \r.
    let first = text.split(['\n', '\r']).next().unwrap_or_default();
    Ok(first.trim().to_string())
}

fn sibling_with_ext(image: &Path, ext: &str) -> PathBuf {
    let mut name: OsString = image.file_stem().unwrap_or_default().to_os_string();
    name.push(ext);
    image.with_file_name(name)
}

/// What scanning one data dir found.
#[derive(Debug, Default)]
pub struct ScanOutput {
    pub subsets: Vec<Subset>,
    pub images: Vec<FoundImage>,
    pub warnings: Vec<String>,
}

impl ScanOutput {
    /// Records and logs a warning.
    pub fn warn(&mut self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings.push(msg);
    }
}

/// Scans `root` (the value of config key `key`) for `N_name` folders, appending to `out`.
/// With confined `roots`, every folder, image and caption found must lie inside them (links
/// followed): one that leads out is an error naming it.
pub fn scan_data_dir(
    root: &Path,
    key: &str,
    is_reg: bool,
    caption_ext: &str,
    roots: &AllowedRoots,
    out: &mut ScanOutput,
) -> Result<()> {
    let meta = fs::metadata(root).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Config(format!(
                "{key} `{}` does not exist; set {key} to the parent of folders like `30_zenny`",
                root.display()
            ))
        } else {
            Error::io(root, e)
        }
    })?;
    if !meta.is_dir() {
        return Err(Error::Config(format!(
            "{key} `{}` is a file, not a folder; set {key} to the parent of folders like `30_zenny`",
            root.display()
        )));
    }
    roots.check(root)?;

    let mut folders: Vec<(String, PathBuf, i64, String)> = Vec::new();
    let mut loose_images = 0usize;
    let mut ignored = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_hidden(&name) {
            continue;
        }
        // fs::metadata follows symlinks, so linked folders count.
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        if is_dir {
            match parse_folder_name(&name) {
                Some((n, class)) => folders.push((name, path, n, class)),
                None => ignored.push(name),
            }
        } else if is_image(&path) {
            loose_images += 1;
        }
    }
    // kohya walks folders in directory order; sorting makes runs reproducible across machines.
    folders.sort_by(|a, b| a.0.cmp(&b.0));
    ignored.sort();
    for name in &ignored {
        out.warn(format!(
            "{key}: ignoring folder `{name}`: its name does not start with a repeat count like `30_zenny`"
        ));
    }

    let root_name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if folders.is_empty() {
        let parent_hint = root
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| format!(" (probably `{}`)", p.display()))
            .unwrap_or_default();
        if parse_folder_name(&root_name).is_some() {
            return Err(Error::Config(format!(
                "{key} `{}` is itself a `N_name` folder: {key} must be the parent of folders like \
                 `30_zenny`; set {key} to its parent folder{parent_hint}",
                root.display()
            )));
        }
        if loose_images > 0 {
            return Err(Error::Config(format!(
                "{key} `{}` has {loose_images} images directly inside: {key} must be the parent of \
                 folders like `30_zenny`; move the images into a folder such as `{}`",
                root.display(),
                root.join("10_name").display()
            )));
        }
        return Err(Error::Config(format!(
            "{key} `{}` has no `N_name` folders: it must be the parent of folders like `30_zenny` \
             (N = how many times each image is repeated per epoch)",
            root.display()
        )));
    }
    if loose_images > 0 {
        out.warn(format!(
            "{key}: {loose_images} images directly in `{}` are ignored; only images inside `N_name` \
             folders are used",
            root.display()
        ));
    }

    for (name, dir, repeats, class_tokens) in folders {
        if repeats < 1 {
            return Err(Error::Config(format!(
                "{key}: folder `{}` has repeat count {repeats}, so its images would never be used; \
                 rename it with a count of at least 1, e.g. `10_{class_tokens}`",
                dir.display()
            )));
        }
        let repeats = u32::try_from(repeats).map_err(|_| {
            Error::Config(format!(
                "{key}: folder `{}` has a repeat count too large to use",
                dir.display()
            ))
        })?;
        roots.check(&dir)?;
        scan_subset(
            key,
            name,
            dir,
            repeats,
            class_tokens,
            is_reg,
            caption_ext,
            roots,
            out,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn scan_subset(
    key: &str,
    name: String,
    dir: PathBuf,
    repeats: u32,
    class_tokens: String,
    is_reg: bool,
    caption_ext: &str,
    roots: &AllowedRoots,
    out: &mut ScanOutput,
) -> Result<()> {
    let mut paths = Vec::new();
    let mut unsupported: Vec<String> = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let path = entry.path();
        if is_hidden(&entry.file_name().to_string_lossy()) {
            continue;
        }
        if !fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
            continue;
        }
        if is_image(&path) {
            roots.check(&path)?;
            paths.push(path);
        } else if let Some(ext) = lower_ext(&path) {
            if UNSUPPORTED_IMAGE_EXTENSIONS.contains(&ext.as_str()) && !unsupported.contains(&ext) {
                unsupported.push(ext);
            }
        }
    }
    // kohya sorts the globbed paths; one folder, so sorting file names is the same order.
    paths.sort();
    if !unsupported.is_empty() {
        unsupported.sort();
        out.warn(format!(
            "{key}: `{}` has .{} files, which are not read; convert them to png, jpg or webp",
            dir.display(),
            unsupported.join(", .")
        ));
    }
    if paths.is_empty() {
        return Err(Error::Config(format!(
            "{key}: folder `{}` has no images (.png, .jpg, .jpeg, .webp); add images or remove the \
             folder (or its `N_` prefix)",
            dir.display()
        )));
    }

    let subset_index = out.subsets.len();
    let mut tags = TagCounts::default();
    let mut missing = 0usize;
    let mut other_ext_found: Vec<(String, usize)> = Vec::new();
    for path in &paths {
        let cap_path = sibling_with_ext(path, caption_ext);
        let caption = if fs::metadata(&cap_path)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            roots.check(&cap_path)?;
            read_caption(&cap_path, roots)?
        } else {
            missing += 1;
            for other in KNOWN_CAPTION_EXTENSIONS {
                if other != caption_ext && sibling_with_ext(path, other).is_file() {
                    match other_ext_found.iter_mut().find(|(e, _)| e == other) {
                        Some((_, n)) => *n += 1,
                        None => other_ext_found.push((other.to_string(), 1)),
                    }
                }
            }
            class_tokens.clone()
        };
        tags.add(&caption);
        out.images.push(FoundImage {
            path: path.clone(),
            subset: subset_index,
            caption,
        });
    }
    if missing > 0 {
        tracing::info!(
            folder = %dir.display(),
            count = missing,
            "{missing} of {} images have no `{caption_ext}` caption file; they are captioned with the folder's name `{class_tokens}`",
            paths.len()
        );
    }
    for (ext, n) in other_ext_found {
        out.warn(format!(
            "{key}: {n} images in `{}` have a `{ext}` caption file but caption_extension is \
             `{caption_ext}`, so those captions are NOT used; set caption_extension = \"{ext}\" if \
             they are the captions",
            dir.display()
        ));
    }

    out.subsets.push(Subset {
        dir,
        name,
        repeats,
        class_tokens,
        is_reg,
        img_count: paths.len(),
        missing_captions: missing,
        tags,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names() {
        assert_eq!(parse_folder_name("30_zenny"), Some((30, "zenny".into())));
        assert_eq!(
            parse_folder_name("10_sks dog"),
            Some((10, "sks dog".into()))
        );
        assert_eq!(parse_folder_name("5_a_b"), Some((5, "a_b".into())));
        assert_eq!(parse_folder_name("7"), Some((7, String::new())));
        assert_eq!(parse_folder_name("0_x"), Some((0, "x".into())));
        assert_eq!(parse_folder_name("-2_x"), Some((-2, "x".into())));
        assert_eq!(parse_folder_name("zenny"), None);
        assert_eq!(parse_folder_name("x_10"), None);
        assert_eq!(parse_folder_name("_x"), None);
    }
}
