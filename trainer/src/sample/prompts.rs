//! sd-scripts' `--sample_prompts` files: `.txt` (one prompt per line with `--n`, `--w`, `--h`,
//! `--d`, `--s`, `--l`, `--ss` options), `.json` (a list of lines or objects) and `.toml`
//! (`[prompt]` defaults plus `[[prompt.subset]]` entries).

use std::path::Path;

use serde_json::{Map, Value};

use super::scheduler::SamplerKind;
use crate::{Error, Result};

/// One preview image to generate. Unset fields fall back to the run's
/// [`SampleConfig`](super::SampleConfig) (sd-scripts: 512×512, 30 steps, scale 7.5,
/// `--sample_sampler`, a random seed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplePrompt {
    /// Position in the prompt file; names the image file (`…_{index:02}_…`).
    pub index: usize,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; guidance is off at 1 or below.
    pub scale: Option<f64>,
    pub sampler: Option<SamplerKind>,
}

impl SamplePrompt {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            ..Self::default()
        }
    }
}

/// sd-scripts clamps `--s` to this range.
const MAX_STEPS: u64 = 1000;

/// Options sd-scripts parses for other model families; SD 1.x/2.x sampling ignores them.
const IGNORED_OPTIONS: &[&str] = &["g", "ctr", "rcfg", "fs"];

fn whole<T: std::str::FromStr>(opt: &str, value: &str) -> std::result::Result<T, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "option `--{opt}` needs a whole number, got `{value}`"
        ));
    }
    value
        .parse()
        .map_err(|_| format!("option `--{opt}`: `{value}` is too large"))
}

/// Parses one prompt line (`a cat --n blurry --w 768 --h 512 --d 42 --s 28 --l 7 --ss euler_a`).
/// As in sd-scripts the line is cut at every ` --`; option names are case-insensitive and a
/// repeated option's last value wins. The error names the offending option.
pub fn parse_prompt_line(line: &str) -> std::result::Result<SamplePrompt, String> {
    let mut parts = line.split(" --");
    let mut p = SamplePrompt::new(parts.next().unwrap_or_default());
    for part in parts {
        let (name, value) = match part.split_once(char::is_whitespace) {
            Some((n, v)) => (n, v.trim()),
            None => (part, ""),
        };
        let key = name.to_ascii_lowercase();
        match key.as_str() {
            "w" => p.width = Some(whole("w", value)?),
            "h" => p.height = Some(whole("h", value)?),
            "d" => p.seed = Some(whole("d", value)?),
            "s" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("option `--s` needs a whole number, got `{value}`"));
                }
                // sd-scripts clamps the step count to 1..=1000 (overflow included).
                let s = value.parse::<u64>().unwrap_or(MAX_STEPS);
                p.steps = Some(s.clamp(1, MAX_STEPS) as usize);
            }
            "l" => {
                let ok =
                    !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit() || b == b'.');
                let scale = value.parse::<f64>().ok().filter(|v| ok && v.is_finite());
                p.scale = Some(scale.ok_or_else(|| {
                    format!("option `--l` needs a non-negative number, got `{value}`")
                })?);
            }
            "n" => {
                if value.is_empty() {
                    return Err("option `--n` needs the negative prompt text".to_string());
                }
                p.negative_prompt = Some(value.to_string());
            }
            "ss" => {
                let s: SamplerKind = value
                    .parse()
                    .map_err(|e: Error| format!("option `--ss`: {}", strip_config(e)))?;
                p.sampler = Some(s);
            }
            k if IGNORED_OPTIONS.contains(&k) => {
                tracing::warn!(option = name, "sample prompt option ignored for SD 1.x/2.x");
            }
            "cn" => return Err("option `--cn` (ControlNet image) is not supported".to_string()),
            "" => return Err("empty option ` --` (write `--w 512`, …)".to_string()),
            _ => {
                return Err(format!(
                    "unknown option `--{name}` (known: --n --w --h --d --s --l --ss)"
                ))
            }
        }
    }
    Ok(p)
}

fn strip_config(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

fn file_error(origin: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("sample prompts `{origin}`: {msg}"))
}

/// The prompts of a `.txt` file: blank lines and lines starting with `#` are skipped (as in
/// sd-scripts, `#` must be the line's first character); `origin` names the file in errors.
pub fn parse_prompt_text(text: &str, origin: &str) -> Result<Vec<SamplePrompt>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut p = parse_prompt_line(trimmed)
            .map_err(|e| file_error(origin, format!("line {}: {e}", n + 1)))?;
        p.index = out.len();
        out.push(p);
    }
    Ok(out)
}

/// Keys of a prompt object (sd-scripts' prompt dict) that SD sampling ignores.
const IGNORED_KEYS: &[&str] = &[
    "guidance_scale",
    "cfg_trunc_ratio",
    "renorm_cfg",
    "flow_shift",
    "enum",
    "subset",
];

/// A prompt object of a `.json` / `.toml` file; `what` says where it is for errors.
fn prompt_from_object(
    obj: &Map<String, Value>,
    what: &str,
) -> std::result::Result<SamplePrompt, String> {
    let mut p = SamplePrompt::default();
    let mut has_prompt = false;
    let uint = |k: &str, v: &Value| {
        v.as_u64()
            .ok_or_else(|| format!("{what}: `{k}` must be a whole number, got {v}"))
    };
    let string = |k: &str, v: &Value| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{what}: `{k}` must be a string, got {v}"))
    };
    for (k, v) in obj {
        match k.as_str() {
            _ if v.is_null() => {}
            "prompt" => {
                p.prompt = string(k, v)?;
                has_prompt = true;
            }
            "negative_prompt" => p.negative_prompt = Some(string(k, v)?),
            "width" => {
                p.width = Some(
                    u32::try_from(uint(k, v)?).map_err(|_| format!("{what}: `width` too large"))?,
                )
            }
            "height" => {
                p.height = Some(
                    u32::try_from(uint(k, v)?)
                        .map_err(|_| format!("{what}: `height` too large"))?,
                )
            }
            "seed" => p.seed = Some(uint(k, v)?),
            "sample_steps" => p.steps = Some(uint(k, v)?.min(usize::MAX as u64) as usize),
            "scale" => {
                let s = v
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| {
                        format!("{what}: `scale` must be a non-negative number, got {v}")
                    })?;
                p.scale = Some(s);
            }
            "sample_sampler" => {
                let s = string(k, v)?;
                p.sampler = Some(
                    s.parse()
                        .map_err(|e: Error| format!("{what}: {}", strip_config(e)))?,
                );
            }
            "controlnet_image" => {
                return Err(format!("{what}: `controlnet_image` is not supported"))
            }
            k if IGNORED_KEYS.contains(&k) => {}
            other => {
                return Err(format!(
                    "{what}: unknown key `{other}` (known: prompt, negative_prompt, width, \
                     height, seed, sample_steps, scale, sample_sampler)"
                ))
            }
        }
    }
    if !has_prompt {
        // sd-scripts would render an empty prompt; a missing key is almost always a typo.
        return Err(format!("{what}: no `prompt`"));
    }
    Ok(p)
}

/// The prompts of a `.json` file: a list whose items are prompt lines (parsed like `.txt`
/// lines) or objects with sd-scripts' keys (`prompt`, `negative_prompt`, `width`, `height`,
/// `seed`, `sample_steps`, `scale`, `sample_sampler`).
pub fn parse_prompt_json(text: &str, origin: &str) -> Result<Vec<SamplePrompt>> {
    let v: Value = serde_json::from_str(text).map_err(|e| file_error(origin, e))?;
    let Value::Array(items) = v else {
        return Err(file_error(origin, "expected a list of prompts"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let what = format!("prompt {}", i + 1);
            let mut p = match item {
                Value::String(line) => parse_prompt_line(line.trim()),
                Value::Object(obj) => prompt_from_object(obj, &what),
                other => Err(format!("expected a string or an object, got {other}")),
            }
            .map_err(|e| {
                if e.starts_with(&what) {
                    file_error(origin, e)
                } else {
                    file_error(origin, format!("{what}: {e}"))
                }
            })?;
            p.index = i;
            Ok(p)
        })
        .collect()
}

/// The prompts of a `.toml` file: `[prompt]` holds keys shared by every entry of
/// `[[prompt.subset]]`; an entry's own keys win (sd-scripts rejects such duplicates).
pub fn parse_prompt_toml(text: &str, origin: &str) -> Result<Vec<SamplePrompt>> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| file_error(origin, e))?;
    let as_json = |v: &toml::Value| serde_json::to_value(v).map_err(|e| file_error(origin, e));
    let Some(Value::Object(base)) = doc.get("prompt").map(as_json).transpose()? else {
        return Err(file_error(origin, "no `[prompt]` table"));
    };
    let Some(Value::Array(subsets)) = base.get("subset") else {
        return Err(file_error(origin, "no `[[prompt.subset]]` entries"));
    };
    subsets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let what = format!("prompt.subset {}", i + 1);
            let Value::Object(own) = s else {
                return Err(file_error(origin, format!("{what}: expected a table")));
            };
            let mut merged = base.clone();
            merged.remove("subset");
            merged.extend(own.clone());
            let mut p = prompt_from_object(&merged, &what).map_err(|e| file_error(origin, e))?;
            p.index = i;
            Ok(p)
        })
        .collect()
}

/// Reads a `--sample_prompts` file, choosing the format by extension (`.txt`, `.json`, `.toml`).
pub fn load_prompts(path: &Path) -> Result<Vec<SamplePrompt>> {
    load_prompts_within(path, &crate::confine::AllowedRoots::any())
}

/// [`load_prompts`] for a file that must lie inside `roots` when it is opened.
pub fn load_prompts_within(
    path: &Path,
    roots: &crate::confine::AllowedRoots,
) -> Result<Vec<SamplePrompt>> {
    let text = String::from_utf8(roots.read(path)?).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })?;
    let origin = path.display().to_string();
    match path.extension().and_then(|e| e.to_str()) {
        Some("txt") => parse_prompt_text(&text, &origin),
        Some("json") => parse_prompt_json(&text, &origin),
        Some("toml") => parse_prompt_toml(&text, &origin),
        _ => Err(file_error(
            &origin,
            "unknown format: the file name must end in .txt, .json or .toml",
        )),
    }
}
