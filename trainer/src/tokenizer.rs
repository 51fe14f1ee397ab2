//! CLIP's byte-level BPE tokenizer, giving the ids of transformers' slow `CLIPTokenizer` with
//! ftfy installed (what sd-scripts and diffusers use), from a diffusers `tokenizer/` folder or
//! from the vocabulary bundled in `trainer/assets/` (OpenAI's merges as shipped by open_clip).
//!
//! Text goes through the same steps: special tokens are split off first (for SD2 that includes
//! its pad token `!`), then each piece is cleaned as `ftfy.fix_text` does, whitespace-collapsed,
//! lower-cased, cut by CLIP's pattern and byte-pair encoded with `</w>` ending each word.
//! ftfy's cleanup is reproduced in [`ftfy`](fix_text) from tables generated out of ftfy itself.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use tokenizers::utils::SysRegex;

use crate::{Error, Result};

mod ftfy;
pub use ftfy::fix_text;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// transformers reads merges lines `1 .. 49152 - 256 - 2 + 1` (the first line is a header).
const MERGES: usize = 49152 - 256 - 2;
/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer.pat`, IGNORECASE).
const PATTERN: &str = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

static BUNDLED_BPE: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");

/// A special token split off before cleanup (transformers' added tokens).
#[derive(Debug, Clone)]
struct Special {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

/// CLIP tokenizer with transformers' slow-tokenizer semantics.
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pattern: SysRegex,
    specials: Vec<Special>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    model_max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.encoder.len())
            .field("merges", &self.ranks.len())
            .field("pad_id", &self.pad_id)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

/// GPT-2/CLIP's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut out: Vec<(u8, char)> = (0u32..256)
        .filter(|&b| printable(b))
        .map(|b| (b as u8, char::from_u32(b).unwrap_or('?')))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable(b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// A token given either as a string or as `{"content": ...}` in transformers' JSON files.
fn token_content(v: &serde_json::Value) -> Option<(String, bool, bool)> {
    match v {
        serde_json::Value::String(s) => Some((s.clone(), false, false)),
        serde_json::Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            let flag = |k: &str| o.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
            Some((content, flag("lstrip"), flag("rstrip")))
        }
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v = serde_json::from_str(&text)
        .map_err(|e| Error::Tokenizer(format!("{}: not valid JSON: {e}", path.display())))?;
    Ok(Some(v))
}

impl ClipTokenizer {
    /// The SD1 tokenizer (OpenAI CLIP; pads with `<|endoftext|>`) from the bundled vocabulary.
    pub fn bundled_sd1() -> Result<Self> {
        Self::bundled(None)
    }

    /// The SD2 tokenizer (OpenCLIP; pads with `!`, id 0) from the bundled vocabulary.
    pub fn bundled_sd2() -> Result<Self> {
        Self::bundled(Some("!"))
    }

    fn bundled(pad: Option<&str>) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BUNDLED_BPE)
            .read_to_string(&mut text)
            .map_err(|e| Error::Tokenizer(format!("bundled BPE vocabulary is unreadable: {e}")))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(MERGES)
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.to_string()))
            })
            .collect();
        if merges.len() != MERGES {
            return Err(Error::Tokenizer(format!(
                "bundled BPE vocabulary has {} merges, expected {MERGES}",
                merges.len()
            )));
        }
        // CLIP's vocabulary: the 256 byte symbols, the same with `</w>`, one token per merge,
        // then the two specials.
        let symbols: Vec<String> = bytes_to_unicode()
            .into_iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let mut vocab: Vec<String> = symbols.clone();
        vocab.extend(symbols.iter().map(|s| format!("{s}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(BOS.to_string());
        vocab.push(EOS.to_string());
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let pad = pad.map(|p| (p.to_string(), false, false));
        Self::build(encoder, merges, pad, 77, "bundled vocabulary")
    }

    /// Loads a diffusers/transformers `tokenizer/` folder's `vocab.json` and `merges.txt`.
    /// `special_tokens_map.json` and `tokenizer_config.json` next to `vocab.json` are read when
    /// present for the pad token and `model_max_length`; `pad_token` overrides the files.
    pub fn from_files(vocab: &Path, merges: &Path, pad_token: Option<&str>) -> Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?;
        let encoder: HashMap<String, u32> = serde_json::from_str(&vocab_text).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a CLIP vocabulary (expected a JSON object of token -> id): {e}",
                vocab.display()
            ))
        })?;
        let merges_text = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        // As transformers: strip, split lines, skip the header, keep at most MERGES.
        let mut merge_list = Vec::new();
        for (i, line) in merges_text
            .trim()
            .split('\n')
            .skip(1)
            .take(MERGES)
            .enumerate()
        {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() != 2 {
                return Err(Error::Tokenizer(format!(
                    "{}: line {} is not a BPE merge `a b`: {line:?}",
                    merges.display(),
                    i + 2
                )));
            }
            merge_list.push((parts[0].to_string(), parts[1].to_string()));
        }

        let dir = vocab.parent().unwrap_or(Path::new("."));
        Self::with_configs(
            encoder,
            merge_list,
            dir,
            pad_token,
            None,
            &vocab.display().to_string(),
        )
    }

    /// Loads a `tokenizer.json` (the fast tokenizer's file, the only one transformers >= 5
    /// saves): its BPE `model.vocab` and `model.merges` (`"a b"` strings or `["a", "b"]`
    /// pairs) give the same ids as `vocab.json` and `merges.txt`. The JSON files next to it
    /// are read as [`ClipTokenizer::from_files`] does; its own `padding.pad_token` is used
    /// when they name no pad token.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |what: &str| {
            Error::Tokenizer(format!(
                "{}: {what}; is this a CLIP tokenizer.json?",
                path.display()
            ))
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&format!("not valid JSON ({e})")))?;
        let model = &json["model"];
        if model["type"].as_str().is_some_and(|t| t != "BPE") {
            return Err(bad("its model is not BPE"));
        }
        let encoder: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
            .map_err(|e| bad(&format!("`model.vocab` is not a map of token -> id ({e})")))?;
        let items = model["merges"]
            .as_array()
            .ok_or_else(|| bad("`model.merges` is not a list"))?;
        let mut merges = Vec::with_capacity(items.len().min(MERGES));
        for (i, item) in items.iter().take(MERGES).enumerate() {
            let pair = match item {
                serde_json::Value::String(m) => {
                    let parts: Vec<&str> = m.split(' ').collect();
                    match parts.as_slice() {
                        [a, b] => Some((a.to_string(), b.to_string())),
                        _ => None,
                    }
                }
                serde_json::Value::Array(p) => match p.as_slice() {
                    [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                        Some((a.clone(), b.clone()))
                    }
                    _ => None,
                },
                _ => None,
            };
            merges.push(pair.ok_or_else(|| {
                bad(&format!("`model.merges[{i}]` is not a merge `a b`: {item}"))
            })?);
        }
        let pad_in_file = json["padding"]["pad_token"].as_str();
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::with_configs(
            encoder,
            merges,
            dir,
            None,
            pad_in_file,
            &path.display().to_string(),
        )
    }

    /// The pad token and `model_max_length` from `special_tokens_map.json` and
    /// `tokenizer_config.json` in `dir` (`pad_token` overrides them, `fallback_pad` is used when
    /// they name none), then [`ClipTokenizer::build`].
    fn with_configs(
        encoder: HashMap<String, u32>,
        merge_list: Vec<(String, String)>,
        dir: &Path,
        pad_token: Option<&str>,
        fallback_pad: Option<&str>,
        origin: &str,
    ) -> Result<Self> {
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let from_files = [map.as_ref(), config.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|v| v.get("pad_token").and_then(token_content));
        let pad = match pad_token {
            Some(p) => Some((p.to_string(), false, false)),
            None => from_files.or_else(|| fallback_pad.map(|p| (p.to_string(), false, false))),
        };
        let max_len = config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(|v| v.as_u64())
            .filter(|&n| n > 2 && n < 1 << 20)
            .map_or(77, |n| n as usize);
        Self::build(encoder, merge_list, pad, max_len, origin)
    }

    /// Loads a diffusers `tokenizer/` folder: `vocab.json` and `merges.txt` (transformers < 5),
    /// else `tokenizer.json` (transformers >= 5 saves only that).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let json = dir.join("tokenizer.json");
        if !vocab.exists() && json.exists() {
            return Self::from_tokenizer_json(&json);
        }
        Self::from_files(&vocab, &dir.join("merges.txt"), None)
    }

    fn build(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: Option<(String, bool, bool)>,
        model_max_length: usize,
        origin: &str,
    ) -> Result<Self> {
        let id = |t: &str| {
            encoder.get(t).copied().ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{origin}: token {t:?} is not in the vocabulary; is this a CLIP tokenizer?"
                ))
            })
        };
        let bos_id = id(BOS)?;
        let eos_id = id(EOS)?;
        let (pad_text, pad_l, pad_r) = pad.unwrap_or((EOS.to_string(), false, false));
        let pad_id = id(&pad_text)?;
        let mut specials = vec![
            Special {
                content: BOS.into(),
                id: bos_id,
                lstrip: false,
                rstrip: false,
            },
            Special {
                content: EOS.into(),
                id: eos_id,
                lstrip: false,
                rstrip: false,
            },
        ];
        if pad_text != BOS && pad_text != EOS {
            specials.push(Special {
                content: pad_text,
                id: pad_id,
                lstrip: pad_l,
                rstrip: pad_r,
            });
        }
        let mut byte_encoder = ['\0'; 256];
        for (b, c) in bytes_to_unicode() {
            byte_encoder[b as usize] = c;
        }
        // dict(zip(merges, range)): a repeated merge keeps its last rank, as in transformers.
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m, i))
            .collect();
        let regex =
            |p: &str| SysRegex::new(p).map_err(|e| Error::Tokenizer(format!("pattern {p:?}: {e}")));
        Ok(Self {
            encoder,
            ranks,
            byte_encoder,
            pattern: regex(PATTERN)?,
            specials,
            bos_id,
            eos_id,
            pad_id,
            unk_id: eos_id,
            model_max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// `tokenizer(text, padding="max_length", truncation=True, max_length=max_length)`:
    /// BOS, the text's tokens (at most `max_length - 2`), EOS, then pad ids up to `max_length`.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Vec<u32>> {
        if max_length < 2 {
            return Err(Error::Tokenizer(format!(
                "max_length {max_length} leaves no room for BOS and EOS"
            )));
        }
        let mut tokens = self.tokenize(text);
        tokens.truncate(max_length - 2);
        let mut ids = Vec::with_capacity(max_length);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(max_length, self.pad_id);
        Ok(ids)
    }

    /// The ids sd-scripts feeds its long-prompt encoder for `--max_token_length`
    /// (75, 150 or 225): the caption tokenized to `max_token_length + 2` ids.
    pub fn encode_kohya(&self, text: &str, max_token_length: usize) -> Result<Vec<u32>> {
        if ![75, 150, 225].contains(&max_token_length) {
            return Err(Error::Tokenizer(format!(
                "max_token_length must be 75, 150 or 225 (as sd-scripts), got {max_token_length}"
            )));
        }
        self.encode(text, max_token_length + 2)
    }

    /// Token ids of `text` without BOS/EOS.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut pieces: Vec<(String, Option<&Special>)> = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (pos, _) in rest.char_indices() {
                let hit = self
                    .specials
                    .iter()
                    .filter(|s| rest[pos..].starts_with(&s.content))
                    .max_by_key(|s| s.content.len());
                if let Some(s) = hit {
                    if pos > 0 {
                        pieces.push((rest[..pos].to_string(), None));
                    }
                    pieces.push((s.content.clone(), Some(s)));
                    rest = &rest[pos + s.content.len()..];
                    continue 'outer;
                }
            }
            pieces.push((rest.to_string(), None));
            break;
        }
        // Added tokens that eat the whitespace next to them.
        for i in 0..pieces.len() {
            let Some(s) = pieces[i].1 else { continue };
            if s.rstrip && i + 1 < pieces.len() && pieces[i + 1].1.is_none() {
                pieces[i + 1].0 = pieces[i + 1].0.trim_start().to_string();
            }
            if s.lstrip && i > 0 && pieces[i - 1].1.is_none() {
                pieces[i - 1].0 = pieces[i - 1].0.trim_end().to_string();
            }
        }
        let mut ids = Vec::new();
        for (text, special) in pieces {
            match special {
                Some(s) => ids.push(s.id),
                None if text.is_empty() => {}
                None => self.tokenize_plain(&text, &mut ids),
            }
        }
        ids
    }

    /// transformers' `CLIPTokenizer._tokenize` for text without special tokens.
    fn tokenize_plain(&self, text: &str, ids: &mut Vec<u32>) {
        let fixed = ftfy::fix_text(text);
        let clean = fixed.split_whitespace().collect::<Vec<_>>().join(" ");
        // Python's `regex` with IGNORECASE matches U+0345 (it case-folds to a letter but is not
        // one) with no alternative of the pattern, so it separates words; Rust's class folding
        // would make it a letter.
        let lower = clean.to_lowercase().replace('\u{345}', " ");
        for (start, end) in self.pattern.find_iter(&lower) {
            let word = &lower[start..end];
            let mapped: String = word
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            ids.extend(self.bpe_ids(&mapped));
        }
    }

    fn bpe_ids(&self, word: &str) -> Vec<u32> {
        if let Ok(cache) = self.cache.lock() {
            if let Some(v) = cache.get(word) {
                return v.clone();
            }
        }
        let lookup = |t: &str| self.encoder.get(t).copied().unwrap_or(self.unk_id);
        let ids: Vec<u32> = if word == BOS || word == EOS {
            vec![lookup(word)]
        } else {
            self.bpe(word).iter().map(|t| lookup(t)).collect()
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.insert(word.to_string(), ids.clone());
        }
        ids
    }

    /// Merges the lowest-ranked adjacent pair everywhere, until no pair has a rank.
    fn bpe(&self, token: &str) -> Vec<String> {
        let mut word: Vec<String> = token.chars().map(String::from).collect();
        match word.last_mut() {
            Some(last) => last.push_str("</w>"),
            None => return Vec::new(),
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| {
                    self.ranks
                        .get(&(p[0].clone(), p[1].clone()))
                        .map(|&r| (r, p[0].clone(), p[1].clone()))
                })
                .min_by_key(|(r, _, _)| *r);
            let Some((_, first, second)) = best else {
                break;
            };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_tokenizers_encode() -> Result<()> {
        let sd1 = ClipTokenizer::bundled_sd1()?;
        assert_eq!(sd1.vocab_size(), 49408);
        assert_eq!(
            sd1.encode("hi!! there", 8)?,
            vec![49406, 1883, 748, 997, 49407, 49407, 49407, 49407]
        );
        let sd2 = ClipTokenizer::bundled_sd2()?;
        assert_eq!(
            sd2.encode("hi!! there", 9)?,
            vec![49406, 1883, 0, 0, 997, 49407, 0, 0, 0]
        );
        Ok(())
    }
}
