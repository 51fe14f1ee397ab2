//! Prompt conditioning for preview images as sd-scripts' long-prompt-weighting pipeline does it:
//! `(word:1.3)` / `(word)` / `[word]` emphasis, prompts up to 3 × 75 tokens encoded chunk by
//! chunk, per-token weights with the embedding mean restored afterwards.

use candle_core::{DType, Tensor};

use crate::clip::ClipTextModel;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// Text conditioning for one image: the prompt's hidden states and, under classifier-free
/// guidance, the negative prompt's, both `[1, L, C]` and detached.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
}

/// Turns a prompt (and the negative prompt, given when guidance is on) into UNet conditioning.
/// Closures `Fn(&str, Option<&str>) -> Result<Conditioning>` implement it too.
pub trait PromptEncoder {
    fn encode(&self, prompt: &str, negative: Option<&str>) -> Result<Conditioning>;
}

impl<F> PromptEncoder for F
where
    F: Fn(&str, Option<&str>) -> Result<Conditioning>,
{
    fn encode(&self, prompt: &str, negative: Option<&str>) -> Result<Conditioning> {
        self(prompt, negative)
    }
}

const ROUND: f64 = 1.1;
const CHUNK: usize = 75;

/// A lexical piece of an emphasis prompt (the alternatives of sd-scripts' `re_attention`, tried
/// in the same order).
enum Piece<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` (the escaped char) or a lone `\` (nothing).
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.3)` with the number's text.
    Weight(&'a str),
    Close,
    CloseSquare,
    Text,
}

fn next_piece(s: &str) -> (Piece<'_>, usize) {
    let b = s.as_bytes();
    match b[0] {
        b'\\' => match b.get(1) {
            Some(b'(' | b')' | b'[' | b']' | b'\\') => (Piece::Escaped(&s[1..2]), 2),
            _ => (Piece::Escaped(""), 1),
        },
        b'(' => (Piece::Open, 1),
        b'[' => (Piece::OpenSquare, 1),
        b':' => {
            // `:([+-]?[.\d]+)\)`; otherwise a lone `:` is text.
            let mut j = 1;
            if matches!(b.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            let start = j;
            while matches!(b.get(j), Some(c) if c.is_ascii_digit() || *c == b'.') {
                j += 1;
            }
            if j > start && b.get(j) == Some(&b')') {
                (Piece::Weight(&s[1..j]), j + 1)
            } else {
                (Piece::Text, 1)
            }
        }
        b')' => (Piece::Close, 1),
        b']' => (Piece::CloseSquare, 1),
        _ => {
            let end = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (Piece::Text, end)
        }
    }
}

/// sd-scripts' `parse_prompt_attention`: the prompt as (text, weight) runs. `(x)` multiplies
/// by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; unbalanced brackets apply to the rest.
/// Errors only on a weight that is not a number (`(x:1.2.3)`), where sd-scripts crashes.
pub fn parse_prompt_attention(text: &str) -> Result<Vec<(String, f64)>> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for r in &mut res[from..] {
            r.1 *= m;
        }
    };
    let mut rest = text;
    while !rest.is_empty() {
        let (piece, len) = next_piece(rest);
        let raw = &rest[..len];
        rest = &rest[len..];
        match piece {
            Piece::Escaped(c) => res.push((c.to_string(), 1.0)),
            Piece::Open => round.push(res.len()),
            Piece::OpenSquare => square.push(res.len()),
            Piece::Weight(w) if !round.is_empty() => {
                let m: f64 = w.parse().map_err(|_| {
                    Error::Config(format!(
                        "prompt `{text}`: emphasis weight `{w}` is not a number"
                    ))
                })?;
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, m);
            }
            Piece::Close if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut res, from, ROUND);
            }
            Piece::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or_default();
                multiply(&mut res, from, 1.0 / ROUND);
            }
            // Unmatched brackets and everything else are literal text.
            _ => res.push((raw.to_string(), 1.0)),
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / ROUND);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(res.len());
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    Ok(merged)
}

/// sd-scripts' sampling text encoder (`get_weighted_text_embeddings` of its
/// `lpw_stable_diffusion`): emphasis parsing, up to `max_chunks` × 75 tokens, each 77-token
/// chunk encoded alone and concatenated whole, weights applied with the mean kept.
pub struct LpwPromptEncoder<'a> {
    text_encoder: &'a ClipTextModel,
    tokenizer: &'a ClipTokenizer,
    clip_skip: usize,
    max_chunks: usize,
}

impl<'a> LpwPromptEncoder<'a> {
    /// `clip_skip` as the trainer's (1 = last layer). Prompts are cut at 3 × 75 tokens as in
    /// sd-scripts' sampler, whatever `max_token_length` training uses.
    pub fn new(
        text_encoder: &'a ClipTextModel,
        tokenizer: &'a ClipTokenizer,
        clip_skip: usize,
    ) -> Self {
        Self {
            text_encoder,
            tokenizer,
            clip_skip,
            max_chunks: 3,
        }
    }

    pub fn with_max_chunks(mut self, max_chunks: usize) -> Self {
        self.max_chunks = max_chunks.max(1);
        self
    }

    /// Token ids and per-token weights of `text` (no BOS/EOS), cut at `limit` tokens.
    fn tokens_with_weights(&self, text: &str, limit: usize) -> Result<(Vec<u32>, Vec<f64>)> {
        let mut tokens = Vec::new();
        let mut weights = Vec::new();
        for (piece, w) in parse_prompt_attention(text)? {
            let ids = self.tokenizer.tokenize(&piece);
            weights.extend(std::iter::repeat_n(w, ids.len()));
            tokens.extend(ids);
            if tokens.len() > limit {
                tracing::warn!(prompt = text, limit, "sample prompt truncated");
                break;
            }
        }
        tokens.truncate(limit);
        weights.truncate(limit);
        Ok((tokens, weights))
    }

    /// `[BOS, tokens, EOS…]` of `2 + 75·k` ids and the matching weights, laid out per chunk as
    /// `pad_tokens_and_weights(no_boseos_middle=False)` does.
    fn pad(&self, tokens: &[u32], weights: &[f64], k: usize) -> (Vec<u32>, Vec<f64>) {
        let len = CHUNK * k + 2;
        let mut ids = Vec::with_capacity(len);
        ids.push(self.tokenizer.bos_id());
        ids.extend_from_slice(tokens);
        ids.resize(len, self.tokenizer.eos_id());
        let per = CHUNK + 2;
        let mut w = Vec::with_capacity(per * k);
        if weights.is_empty() {
            w.resize(per * k, 1.0);
        } else {
            for j in 0..k {
                w.push(1.0);
                let lo = (j * CHUNK).min(weights.len());
                let hi = ((j + 1) * CHUNK).min(weights.len());
                w.extend_from_slice(&weights[lo..hi]);
                w.push(1.0);
            }
            w.resize(per * k, 1.0);
        }
        (ids, w)
    }

    /// Hidden states `[1, 77·k, C]` of padded ids (`get_unweighted_text_embeddings`).
    fn embed(&self, ids: &[u32], k: usize) -> Result<Tensor> {
        // The encoder moves ids to its own device.
        let dev = candle_core::Device::Cpu;
        if k == 1 {
            let t = Tensor::from_slice(ids, (1, ids.len()), &dev)?;
            return self.text_encoder.forward(&t, self.clip_skip);
        }
        let (bos, eos, pad) = (
            self.tokenizer.bos_id(),
            self.tokenizer.eos_id(),
            self.tokenizer.pad_id(),
        );
        let per = CHUNK + 2;
        let mut chunks = Vec::with_capacity(k * per);
        for i in 0..k {
            let mut c = ids[i * CHUNK..i * CHUNK + per].to_vec();
            c[0] = bos;
            if pad == eos {
                c[per - 1] = ids[ids.len() - 1];
            } else {
                // SD2's tokenizer pads with `!`: sd-scripts' v2 rewrapping rules.
                if c[per - 1] != eos && c[per - 1] != pad {
                    c[per - 1] = eos;
                }
                if c[1] == pad {
                    c[1] = eos;
                }
            }
            chunks.extend(c);
        }
        let t = Tensor::from_vec(chunks, (k, per), &dev)?;
        let h = self.text_encoder.forward(&t, self.clip_skip)?;
        let c = h.dim(2)?;
        Ok(h.reshape((1, k * per, c))?)
    }

    /// Multiplies each position by its weight, then rescales so the mean over tokens and
    /// channels is what it was.
    fn weight(h: &Tensor, weights: &[f64]) -> Result<Tensor> {
        let dtype = h.dtype();
        let h = h.to_dtype(DType::F32)?;
        let previous = h.mean_all()?;
        let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let w = Tensor::from_vec(w, (1, weights.len(), 1), h.device())?;
        let h = h.broadcast_mul(&w)?;
        let current = h.mean_all()?;
        let ratio = (previous / current)?;
        Ok(h.broadcast_mul(&ratio)?.to_dtype(dtype)?)
    }
}

impl PromptEncoder for LpwPromptEncoder<'_> {
    fn encode(&self, prompt: &str, negative: Option<&str>) -> Result<Conditioning> {
        let limit = CHUNK * self.max_chunks;
        let (pt, pw) = self.tokens_with_weights(prompt, limit)?;
        let neg = negative
            .map(|n| self.tokens_with_weights(n, limit))
            .transpose()?;
        let longest = pt.len().max(neg.as_ref().map_or(0, |(t, _)| t.len()));
        // Both prompts share the chunk count the longer one needs.
        let k = (longest.saturating_sub(1) / CHUNK + 1).clamp(1, self.max_chunks);
        let run = |tokens: &[u32], weights: &[f64]| -> Result<Tensor> {
            let (ids, w) = self.pad(tokens, weights, k);
            let h = self.embed(&ids, k)?.detach();
            Ok(Self::weight(&h, &w)?.detach())
        };
        let cond = run(&pt, &pw)?;
        let uncond = neg.map(|(t, w)| run(&t, &w)).transpose()?;
        Ok(Conditioning { cond, uncond })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(s).unwrap()
    }

    #[test]
    fn emphasis_docstring_examples() {
        assert_eq!(parsed("normal text"), vec![("normal text".into(), 1.0)]);
        assert_eq!(
            parsed("an (important) word"),
            vec![
                ("an ".into(), 1.0),
                ("important".into(), 1.1),
                (" word".into(), 1.0)
            ]
        );
        assert_eq!(parsed("(unbalanced"), vec![("unbalanced".into(), 1.1)]);
        assert_eq!(parsed(r"\(literal\]"), vec![("(literal]".into(), 1.0)]);
        assert_eq!(parsed(""), vec![("".into(), 1.0)]);
        let p = parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let w: Vec<f64> = p.iter().map(|x| x.1).collect();
        assert_eq!(p[1].0, "house");
        assert!((w[1] - 1.573).abs() < 1e-12 && (w[5] - 0.55).abs() < 1e-12);
        assert!(parse_prompt_attention("(x:1.2.3)").is_err());
        // Without an open bracket a weight is just text.
        assert_eq!(parsed("x:1.2.3)"), vec![("x:1.2.3)".into(), 1.0)]);
    }
}
