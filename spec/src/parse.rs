//! TOML text to [`JobSpec`] and back. Parsing reports every unknown key (with its full path, a
//! "did you mean" and line/column), not just the first: after each schema error the offending
//! key is taken out of the parsed document, or a missing required key is filled with a
//! placeholder, and deserialization is tried again.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::{Error, ParseError, ParseErrors, Result};
use crate::spec::{
    DatasetConfig, JobSpec, LoggingConfig, ModelConfig, NetworkArgs, NetworkConfig,
    OptimizerConfig, OutputConfig, ResourcesConfig, SampleConfig, TrainingConfig, SPEC_VERSION,
};
use crate::suggest::closest;

/// Bounds the retry loop; a document with more errors than this reports the first ones.
const MAX_ERRORS: usize = 50;
const MAX_ROUNDS: usize = 2 * MAX_ERRORS;

impl JobSpec {
    /// Parses a job spec. `origin` names the text in messages (a file path, `<request>`).
    /// Does not validate: call [`JobSpec::validate`] or [`JobSpec::resolved`] next.
    pub fn from_toml_str(text: &str, origin: &str) -> std::result::Result<Self, ParseErrors> {
        Parser { text, origin }.parse()
    }

    /// Reads and parses a job spec file (see [`JobSpec::from_toml_str`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io {
            path: path.to_owned(),
            error,
        })?;
        Ok(Self::from_toml_str(&text, &path.display().to_string())?)
    }

    /// The spec as TOML, every field written out (defaults included); parses back to an equal
    /// spec.
    pub fn to_toml_string(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

struct Parser<'a> {
    text: &'a str,
    origin: &'a str,
}

impl<'a> Parser<'a> {
    fn parse(&self) -> std::result::Result<JobSpec, ParseErrors> {
        let mut root = DeTable::parse(self.text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            ParseErrors(vec![self.error(e.span(), None, message, None)])
        })?;
        self.check_version(&root)?;

        let mut errors = Vec::new();
        // Keys whose bad value was taken out: their "missing" error is not news.
        let mut removed: HashSet<String> = HashSet::new();
        for _ in 0..MAX_ROUNDS {
            if errors.len() >= MAX_ERRORS {
                break;
            }
            let de = toml::de::Deserializer::from(root.clone());
            let failure = match serde_path_to_error::deserialize::<_, JobSpec>(de) {
                Ok(spec) if errors.is_empty() => return Ok(spec),
                Ok(_) => break,
                Err(e) => e,
            };
            let keys = map_keys(failure.path());
            let path_text = path_string(failure.path());
            let inner = failure.into_inner();
            let message = inner.message().to_owned();
            let span = inner.span();

            if let Some(rest) = message.strip_prefix("unknown field ") {
                let names = backticked(rest);
                let is_table =
                    lookup(root.get_ref(), &keys).is_some_and(|v| v.get_ref().is_table());
                let (message, hint) = unknown_key_message(&keys, &names, is_table);
                errors.push(self.error(span, Some(keys.join(".")), message, hint));
                if !remove(root.get_mut(), &keys) {
                    break;
                }
            } else if let Some(rest) = message.strip_prefix("missing field ") {
                let Some(field) = backticked(rest).into_iter().next() else {
                    errors.push(self.error(span, Some(path_text), message, None));
                    break;
                };
                let mut full = keys.clone();
                full.push(field.to_owned());
                let full_text = full.join(".");
                if !removed.contains(&full_text) {
                    let (message, hint) = missing_key_message(&full_text);
                    errors.push(self.error(span.clone(), Some(full_text), message, hint));
                }
                if !insert_placeholder(root.get_mut(), &keys, field, span.unwrap_or(0..0)) {
                    break;
                }
            } else {
                let message = friendly_type_message(&message);
                errors.push(self.error(span, Some(path_text), message, None));
                // Drop the bad value (so its default applies) and look for more problems.
                if keys.is_empty() || !remove(root.get_mut(), &keys) {
                    break;
                }
                removed.insert(keys.join("."));
            }
        }
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ParseErrors(errors))
    }

    /// A future version's keys would all be "unknown", so the version is checked first.
    fn check_version(&self, root: &Spanned<DeTable<'_>>) -> std::result::Result<(), ParseErrors> {
        let Some(value) = root.get_ref().get("version") else {
            return Ok(());
        };
        let found = match value.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .map(|v| v.to_string())
                .unwrap_or_else(|_| i.as_str().to_owned()),
            // A wrong type is reported by deserialization with the other problems.
            _ => return Ok(()),
        };
        if found == SPEC_VERSION.to_string() {
            return Ok(());
        }
        Err(ParseErrors(vec![self.error(
            Some(value.span()),
            Some("version".to_owned()),
            format!("unsupported job spec version {found}"),
            Some(format!(
                "this loractl reads version {SPEC_VERSION}; write `version = {SPEC_VERSION}` or use a newer loractl"
            )),
        )]))
    }

    fn error(
        &self,
        span: Option<Range<usize>>,
        path: Option<String>,
        message: String,
        hint: Option<String>,
    ) -> ParseError {
        let (line, column) = line_column(self.text, span.map_or(0, |s| s.start));
        ParseError {
            origin: self.origin.to_owned(),
            line,
            column,
            path,
            message,
            hint,
        }
    }
}

/// 1-based line and character column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The leading table keys of an error path (stops at the first array index).
fn map_keys(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    let mut keys = Vec::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => keys.push(key.clone()),
            Segment::Seq { .. } | Segment::Enum { .. } | Segment::Unknown => break,
        }
    }
    keys
}

fn path_string(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// The `quoted` names in a serde message, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn lookup<'t, 'i>(table: &'t DeTable<'i>, keys: &[String]) -> Option<&'t Spanned<DeValue<'i>>> {
    let (last, parents) = keys.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get(key.as_str())?.get_ref().as_table()?;
    }
    table.get(last.as_str())
}

fn table_mut<'t, 'i>(table: &'t mut DeTable<'i>, keys: &[String]) -> Option<&'t mut DeTable<'i>> {
    let mut table = table;
    for key in keys {
        match table.get_mut(key.as_str())?.get_mut() {
            DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    Some(table)
}

fn remove(root: &mut DeTable<'_>, keys: &[String]) -> bool {
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    table_mut(root, parents).is_some_and(|t| t.remove(last.as_str()).is_some())
}

/// Fills a missing required key so that the rest of the document can still be checked.
fn insert_placeholder(
    root: &mut DeTable<'_>,
    parents: &[String],
    field: &str,
    span: Range<usize>,
) -> bool {
    let value = match field {
        "model" | "dataset" => DeValue::Table(DeTable::new()),
        "name" | "pretrained_model_name_or_path" | "train_data_dir" => {
            DeValue::String(Cow::Borrowed("placeholder"))
        }
        "resolution" => DeValue::String(Cow::Borrowed("512")),
        _ => return false,
    };
    let Some(table) = table_mut(root, parents) else {
        return false;
    };
    table.insert(
        Spanned::new(span.clone(), Cow::Owned(field.to_owned())),
        Spanned::new(span, value),
    );
    true
}

fn missing_key_message(path: &str) -> (String, Option<String>) {
    let hint = match path {
        "name" => "add e.g. `name = \"zenny\"` at the top",
        "model" => "add a [model] table with pretrained_model_name_or_path",
        "dataset" => "add a [dataset] table with train_data_dir and resolution",
        "model.pretrained_model_name_or_path" => {
            "give a .safetensors/.ckpt checkpoint file or a diffusers folder"
        }
        "dataset.train_data_dir" => "give the parent of folders like `30_zenny` (repeats_name)",
        "dataset.resolution" => "add e.g. `resolution = \"512\"` (\"768\" for SD2-768-v bases)",
        _ => "",
    };
    let what = if matches!(path, "model" | "dataset") {
        format!("missing required table [{path}]")
    } else {
        "missing required key".to_owned()
    };
    (what, (!hint.is_empty()).then(|| hint.to_owned()))
}

/// Message and hint for an unknown key at `keys`; `names[0]` is the key, the rest are the keys
/// serde expected there.
fn unknown_key_message(
    keys: &[String],
    names: &[&str],
    is_table: bool,
) -> (String, Option<String>) {
    let key = names
        .first()
        .copied()
        .or(keys.last().map(String::as_str))
        .unwrap_or_default();
    let section = &keys[..keys.len().saturating_sub(1)];
    let what = if is_table && section.is_empty() {
        "unknown table"
    } else {
        "unknown key"
    };
    let here = &names[names.len().min(1)..];
    let hint = if let Some(reason) = unsupported_kohya_option(key) {
        Some(format!(
            "`{key}` is an sd-scripts option that loractl does not have: {reason}"
        ))
    } else if let Some(best) = closest(key, here.iter().copied()) {
        Some(format!("did you mean `{best}`?"))
    } else if let Some(home) = home_section(key, section) {
        Some(format!("`{key}` belongs in the [{home}] table"))
    } else if let Some(full) = closest_anywhere(key) {
        Some(format!("did you mean `{full}`?"))
    } else if here.is_empty() {
        None
    } else {
        let table = if section.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("in [{}]", section.join("."))
        };
        Some(format!("keys allowed {table}: {}", here.join(", ")))
    };
    (what.to_owned(), hint)
}

/// Fields of a serde-derived struct, read from what it asks of a deserializer.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    match T::deserialize(FieldProbe) {
        Err(ProbeError(fields)) => fields,
        Ok(_) => &[],
    }
}

/// The sections of the spec with their keys, for cross-section hints.
fn sections() -> [(&'static str, &'static [&'static str]); 10] {
    [
        ("model", fields_of::<ModelConfig>()),
        ("dataset", fields_of::<DatasetConfig>()),
        ("network", fields_of::<NetworkConfig>()),
        ("network.network_args", fields_of::<NetworkArgs>()),
        ("optimizer", fields_of::<OptimizerConfig>()),
        ("training", fields_of::<TrainingConfig>()),
        ("output", fields_of::<OutputConfig>()),
        ("sample", fields_of::<SampleConfig>()),
        ("logging", fields_of::<LoggingConfig>()),
        ("resources", fields_of::<ResourcesConfig>()),
    ]
}

/// The section that has exactly this key, other than the one it was found in.
fn home_section(key: &str, found_in: &[String]) -> Option<&'static str> {
    let found_in = found_in.join(".");
    sections()
        .into_iter()
        .find(|(name, fields)| *name != found_in && fields.contains(&key))
        .map(|(name, _)| name)
}

fn closest_anywhere(key: &str) -> Option<String> {
    let all = sections();
    let best = closest(
        key,
        all.iter().flat_map(|(_, fields)| fields.iter().copied()),
    )?;
    all.iter()
        .find(|(_, fields)| fields.contains(&best))
        .map(|(name, _)| format!("{name}.{best}"))
}

/// sd-scripts options a kohya user may paste that have no place in a loractl job spec.
fn unsupported_kohya_option(key: &str) -> Option<&'static str> {
    Some(match key {
        "xformers" | "sdpa" | "mem_eff_attn" => "loractl's attention needs no switch",
        "max_data_loader_n_workers" | "persistent_data_loader_workers" => {
            "loractl manages data loading itself"
        }
        "lowram" | "highvram" => "memory placement is automatic",
        "log_with" | "log_prefix" | "log_tracker_name" => {
            "loractl logs to [logging].logging_dir and to OpenTelemetry when configured"
        }
        "caption_extention" => {
            "use dataset.caption_extension (the old misspelling is not accepted)"
        }
        "use_8bit_adam" => "write optimizer_type = \"AdamW8bit\" in [optimizer]",
        "use_lion_optimizer" => "write optimizer_type = \"Lion\" in [optimizer]",
        "config_file" | "output_config" => "the job spec is the configuration file",
        _ => return None,
    })
}

/// serde's Rust type names in messages, said the way a TOML user thinks.
fn friendly_type_message(message: &str) -> String {
    let mut out = message.to_owned();
    for (rust, plain) in [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected a borrowed string", "expected a string"),
        ("expected path string", "expected a path string"),
    ] {
        if out.ends_with(rust) {
            out.truncate(out.len() - rust.len());
            out.push_str(plain);
        }
    }
    out
}

/// A deserializer that fails on purpose, carrying the field list a struct asks for.
struct FieldProbe;

#[derive(Debug)]
struct ProbeError(&'static [&'static str]);

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for ProbeError {}

impl serde::de::Error for ProbeError {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        ProbeError(&[])
    }
}

impl<'de> serde::Deserializer<'de> for FieldProbe {
    type Error = ProbeError;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        _: V,
    ) -> std::result::Result<V::Value, ProbeError> {
        Err(ProbeError(&[]))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> std::result::Result<V::Value, ProbeError> {
        Err(ProbeError(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_columns() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 10), (2, 4));
    }

    #[test]
    fn probes_fields() {
        let fields = fields_of::<NetworkArgs>();
        assert_eq!(fields, NetworkArgs::KEYS);
        assert!(fields_of::<OptimizerConfig>().contains(&"learning_rate"));
        assert!(fields_of::<JobSpec>().contains(&"resources"));
    }

    #[test]
    fn every_section_is_probed() {
        let names: Vec<&str> = sections().iter().map(|(n, _)| *n).collect();
        for field in fields_of::<JobSpec>() {
            if !matches!(*field, "version" | "name") {
                assert!(
                    names.contains(field),
                    "section {field} missing from sections()"
                );
            }
        }
        assert!(sections().iter().all(|(_, f)| !f.is_empty()));
    }
}
