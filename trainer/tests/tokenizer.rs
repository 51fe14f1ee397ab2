//! CLIP tokenizer parity with transformers' slow `CLIPTokenizer` (ftfy installed) on
//! `tests/fixtures/tokenizer_cases.json` (made by scripts/fixtures/make_fixtures.py), for SD1
//! (pad `<|endoftext|>`) and SD2 (pad `!`), from the diffusers folders and the bundled vocabulary.

use anyhow::{Context, Result};
use loractl_trainer::tokenizer::ClipTokenizer;
use serde::Deserialize;

mod support;
use support::{fixture, scratch_dir, TempDir};

#[derive(Deserialize)]
struct Case {
    text: String,
    ids_sd1: Vec<u32>,
    ids_sd2: Vec<u32>,
    ids_227_unpadded_sd1: Vec<u32>,
    ids_227_unpadded_sd2: Vec<u32>,
}

fn cases() -> Result<Vec<Case>> {
    let path = fixture("tokenizer_cases.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} (run scripts/fixtures/make_fixtures.py)", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn check(tok: &ClipTokenizer, sd2: bool, what: &str) -> Result<()> {
    let cases = cases()?;
    assert!(cases.len() > 10, "too few tokenizer cases");
    for c in &cases {
        let (want77, want227) = if sd2 {
            (&c.ids_sd2, &c.ids_227_unpadded_sd2)
        } else {
            (&c.ids_sd1, &c.ids_227_unpadded_sd1)
        };
        assert_eq!(&tok.encode(&c.text, 77)?, want77, "{what}: {:?}", c.text);
        // sd-scripts tokenizes long prompts to max_token_length + 2 ids, padded.
        let long = tok.encode_kohya(&c.text, 225)?;
        assert_eq!(long.len(), 227);
        assert_eq!(
            &long[..want227.len()],
            want227.as_slice(),
            "{what} 227: {:?}",
            c.text
        );
        assert!(
            long[want227.len()..].iter().all(|&id| id == tok.pad_id()),
            "{what} 227 padding: {:?}",
            c.text
        );
    }
    Ok(())
}

#[test]
fn sd1_diffusers_tokenizer_matches_transformers() -> Result<()> {
    let tok = ClipTokenizer::from_dir(&fixture("sd1/diffusers/tokenizer"))?;
    assert_eq!((tok.pad_id(), tok.model_max_length()), (49407, 77));
    check(&tok, false, "sd1 folder")
}

#[test]
fn sd2_diffusers_tokenizer_matches_transformers() -> Result<()> {
    let tok = ClipTokenizer::from_dir(&fixture("sd2/diffusers/tokenizer"))?;
    assert_eq!(tok.pad_id(), 0);
    check(&tok, true, "sd2 folder")
}

#[test]
fn bundled_sd1_matches_transformers() -> Result<()> {
    check(&ClipTokenizer::bundled_sd1()?, false, "bundled sd1")
}

#[test]
fn bundled_sd2_matches_transformers() -> Result<()> {
    check(&ClipTokenizer::bundled_sd2()?, true, "bundled sd2")
}

#[test]
fn invalid_vocab_is_a_clear_error() -> Result<()> {
    let dir = scratch_dir("tok")?;
    let merges = fixture("sd1/diffusers/tokenizer/merges.txt");
    let vocab = dir.join("vocab.json");

    std::fs::write(&vocab, "[1, 2, 3]")?;
    let err = ClipTokenizer::from_files(&vocab, &merges, None).unwrap_err();
    assert!(err.to_string().contains("not a CLIP vocabulary"), "{err}");

    std::fs::write(&vocab, r#"{"a": 0, "b": 1}"#)?;
    let err = ClipTokenizer::from_files(&vocab, &merges, None).unwrap_err();
    assert!(
        err.to_string().contains("is not in the vocabulary"),
        "{err}"
    );

    let err = ClipTokenizer::from_files(&dir.join("missing.json"), &merges, None).unwrap_err();
    assert!(err.to_string().contains("missing.json"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn kohya_lengths() -> Result<()> {
    let tok = ClipTokenizer::bundled_sd1()?;
    for n in [75, 150, 225] {
        assert_eq!(tok.encode_kohya("a cat", n)?.len(), n + 2);
    }
    assert!(tok.encode_kohya("a cat", 100).is_err());
    Ok(())
}

/// A `tokenizer/` folder as transformers >= 5 saves it: `tokenizer.json` (written here from
/// the fixture's `vocab.json` and `merges.txt`, merges in the given form) and the config JSONs,
/// without `vocab.json`/`merges.txt`.
fn tokenizer_json_folder(sd: &str, pairs: bool) -> Result<TempDir> {
    let src = fixture(sd).join("diffusers/tokenizer");
    let dir = scratch_dir(&format!("tokjson-{sd}-{pairs}"))?;
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json"))?)?;
    let merges_text = std::fs::read_to_string(src.join("merges.txt"))?;
    let merges: Vec<serde_json::Value> = merges_text
        .trim()
        .split('\n')
        .skip(1)
        .map(|l| {
            if pairs {
                let (a, b) = l.split_once(' ').unwrap_or((l, ""));
                serde_json::json!([a, b])
            } else {
                serde_json::json!(l)
            }
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "model": {"type": "BPE", "vocab": vocab, "merges": merges,
                   "end_of_word_suffix": "</w>", "unk_token": "<|endoftext|>"},
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string())?;
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.join(f))?;
        }
    }
    Ok(dir)
}

#[test]
fn a_transformers_5_tokenizer_json_gives_the_same_ids() -> Result<()> {
    for pairs in [false, true] {
        let tok = ClipTokenizer::from_dir(&tokenizer_json_folder("sd1", pairs)?)?;
        assert_eq!((tok.pad_id(), tok.model_max_length()), (49407, 77));
        check(&tok, false, "sd1 tokenizer.json")?;
        let tok = ClipTokenizer::from_dir(&tokenizer_json_folder("sd2", pairs)?)?;
        assert_eq!(tok.pad_id(), 0);
        check(&tok, true, "sd2 tokenizer.json")?;
    }
    let dir = tokenizer_json_folder("sd1", false)?;
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"model": {"type": "Unigram"}}"#,
    )?;
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("not BPE"), "{err}");
    Ok(())
}
