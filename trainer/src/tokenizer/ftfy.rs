//! Text cleanup as `ftfy.fix_text` (6.x, default configuration) does it before CLIP tokenizes:
//! HTML entities, mojibake (UTF-8 read as a single-byte codec), C1 controls, Latin ligatures,
//! character width, curly quotes, line breaks, terminal escapes, control characters, NFC.
//! ftfy's character tables and patterns are generated into `assets/ftfy_tables.tsv` by
//! `assets/gen_ftfy_tables.py`, so the heuristics are ftfy's own, not a re-derivation.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokenizers::utils::SysRegex;

static TABLES: &str = include_str!("../../assets/ftfy_tables.tsv");

/// Single-byte codecs ftfy tries, in its order (`chardata.CHARMAP_ENCODINGS`).
const CODECS: [&str; 10] = [
    "latin-1",
    "sloppy-windows-1252",
    "sloppy-windows-1251",
    "sloppy-windows-1250",
    "sloppy-windows-1253",
    "sloppy-windows-1254",
    "sloppy-windows-1257",
    "iso-8859-2",
    "macroman",
    "cp437",
];

/// A single-byte codec: bytes 0x80..=0xFF and 0x1A decode to these characters, the rest of
/// ASCII to itself.
struct Codec {
    name: &'static str,
    high: Vec<char>,
    sub: char,
    encode: HashMap<char, u8>,
}

impl Codec {
    /// ftfy's `possible_encoding`: every character is ASCII other than U+1A, or decodes from
    /// one of the codec's bytes 0x80..=0xFF or 0x1A.
    fn possible(&self, text: &str) -> bool {
        text.chars()
            .all(|c| (c.is_ascii() && c != '\u{1a}') || c == self.sub || self.high.contains(&c))
    }

    fn encode(&self, text: &str) -> Option<Vec<u8>> {
        text.chars()
            .map(|c| {
                self.encode
                    .get(&c)
                    .copied()
                    .or_else(|| (c.is_ascii() && c != '\u{1a}').then_some(c as u8))
            })
            .collect()
    }

    /// Decodes one byte (only used for Windows-1252 here).
    fn decode_byte(&self, b: u8) -> char {
        match b {
            0x80..=0xFF => self.high[(b - 0x80) as usize],
            0x1A => self.sub,
            _ => b as char,
        }
    }
}

struct Ftfy {
    entities: HashMap<String, String>,
    width: HashMap<char, String>,
    /// Numeric references `html.unescape` maps specially (empty = dropped).
    charrefs: HashMap<u32, String>,
    codecs: Vec<Codec>,
    badness: SysRegex,
    utf8_detector: SysRegex,
    altered_utf8: SysRegex,
    lossy_utf8: SysRegex,
    a_grave_word: SysRegex,
    ansi: SysRegex,
}

fn parse_chars(hexes: &str) -> String {
    hexes
        .split_whitespace()
        .filter_map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
        .collect()
}

fn regex(pattern: &str) -> SysRegex {
    match SysRegex::new(pattern) {
        Ok(r) => r,
        // The patterns are compiled into the binary and tested: failing here is a build defect.
        Err(e) => panic!("bundled ftfy pattern {pattern:?} does not compile: {e}"),
    }
}

fn ftfy() -> &'static Ftfy {
    static FTFY: OnceLock<Ftfy> = OnceLock::new();
    FTFY.get_or_init(|| {
        let mut entities = HashMap::new();
        let mut width = HashMap::new();
        let mut charrefs = HashMap::new();
        let mut codec_rows = HashMap::new();
        let mut patterns = HashMap::new();
        for line in TABLES.lines().filter(|l| !l.starts_with('#')) {
            let mut cols = line.splitn(3, '\t');
            let (Some(kind), Some(key), Some(value)) = (cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            let code = u32::from_str_radix(key, 16).ok();
            match kind {
                "entity" => {
                    entities.insert(key.to_string(), parse_chars(value));
                }
                "width" => {
                    if let Some(c) = code.and_then(char::from_u32) {
                        width.insert(c, parse_chars(value));
                    }
                }
                // Python checks its special decodings before its dropped code points.
                "charref" => {
                    if let Some(c) = code {
                        charrefs.entry(c).or_insert_with(|| parse_chars(value));
                    }
                }
                "codec" => {
                    codec_rows.insert(key.to_string(), parse_chars(value));
                }
                "regex" => {
                    patterns.insert(key.to_string(), value.to_string());
                }
                _ => {}
            }
        }
        let codecs = CODECS
            .iter()
            .map(|&name| {
                let chars: Vec<char> = codec_rows
                    .get(name)
                    .map(|s| s.chars().collect())
                    .unwrap_or_default();
                if chars.len() != 129 {
                    panic!("bundled ftfy table lacks codec {name}");
                }
                let high = chars[..128].to_vec();
                let encode = high
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (c, 0x80 + i as u8))
                    .chain(std::iter::once((chars[128], 0x1A)))
                    .collect();
                Codec {
                    name,
                    high,
                    sub: chars[128],
                    encode,
                }
            })
            .collect();
        let pattern = |name: &str| regex(patterns.get(name).map_or("", |s| s.as_str()));
        Ftfy {
            entities,
            width,
            charrefs,
            codecs,
            badness: pattern("badness"),
            utf8_detector: pattern("utf8_detector"),
            altered_utf8: pattern("altered_utf8"),
            lossy_utf8: pattern("lossy_utf8"),
            a_grave_word: pattern("a_grave_word"),
            ansi: regex(r"\x1b\[(?:\d|;)*[a-zA-Z]"),
        }
    })
}

/// `ftfy.fix_text(text)`: line by line, each line fixed until nothing changes. HTML entities
/// are decoded unless a `<` was seen (then the text is taken to be HTML, for that line and the
/// rest).
pub fn fix_text(text: &str) -> String {
    let f = ftfy();
    let mut unescape = true;
    let mut out = String::with_capacity(text.len());
    for segment in text.split_inclusive('\n') {
        if unescape && segment.contains('<') {
            unescape = false;
        }
        let mut s = segment.to_string();
        loop {
            let orig = s.clone();
            if unescape {
                s = f.unescape_html(&s);
            }
            s = f.fix_encoding(&s);
            s = f.fix_c1_controls(&s);
            s = fix_latin_ligatures(&s);
            s = f.fix_character_width(&s);
            s = uncurl_quotes(&s);
            s = fix_line_breaks(&s);
            s = replace_all(&f.ansi, &s, |_| String::new());
            s = remove_control_chars(&s);
            s = nfc(&s);
            if s == orig {
                break;
            }
        }
        out.push_str(&s);
    }
    out
}

/// `regex.sub(f, text)`.
fn replace_all(re: &SysRegex, text: &str, mut f: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (a, b) in re.find_iter(text) {
        out.push_str(&text[last..a]);
        out.push_str(&f(&text[a..b]));
        last = b;
    }
    out.push_str(&text[last..]);
    out
}

/// Bytes as the characters U+0000..U+00FF, so ftfy's byte patterns run as text patterns.
fn bytes_as_text(b: &[u8]) -> String {
    b.iter().map(|&x| x as char).collect()
}

fn text_as_bytes(s: &str) -> Vec<u8> {
    s.chars().map(|c| c as u32 as u8).collect()
}

impl Ftfy {
    fn is_bad(&self, text: &str) -> bool {
        self.badness.find_iter(text).next().is_some()
    }

    /// ftfy's `unescape_html`: `&name;` from the HTML5 table (and upper-cased Latin names), and
    /// `&#...;` / `&#x...;` decoded only when the whole reference up to `;` is a number.
    fn unescape_html(&self, s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = String::with_capacity(s.len());
        let (mut i, mut copied) = (0, 0);
        while i < bytes.len() {
            if bytes[i] != b'&' {
                i += 1;
                continue;
            }
            // `&#?[0-9A-Za-z]{1,24};`
            let mut j = i + 1;
            let hash = j < bytes.len() && bytes[j] == b'#';
            if hash {
                j += 1;
            }
            let start = j;
            while j < bytes.len() && bytes[j].is_ascii_alphanumeric() && j - start < 25 {
                j += 1;
            }
            let n = j - start;
            if n == 0 || n > 24 || j >= bytes.len() || bytes[j] != b';' {
                i += 1;
                continue;
            }
            let replacement = match self.entities.get(&s[i..=j]) {
                Some(v) => Some(v.clone()),
                // html.unescape's result is kept only if it consumed the `;`.
                None if hash => self
                    .decode_charref(&s[start..j])
                    .filter(|v| !v.contains(';')),
                None => None,
            };
            if let Some(r) = replacement {
                out.push_str(&s[copied..i]);
                out.push_str(&r);
                copied = j + 1;
            }
            i = j + 1;
        }
        out.push_str(&s[copied..]);
        out
    }

    /// `html.unescape` of `&#body;` when `body` is all decimal digits or `x` + hex digits.
    fn decode_charref(&self, body: &str) -> Option<String> {
        let (digits, radix) = match body.strip_prefix(['x', 'X']) {
            Some(h) => (h, 16),
            None => (body, 10),
        };
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        // Beyond u32 is past U+10FFFF, which Python replaces with U+FFFD.
        let num = u32::from_str_radix(digits, radix).unwrap_or(u32::MAX);
        if let Some(v) = self.charrefs.get(&num) {
            return Some(v.clone());
        }
        if (0xD800..=0xDFFF).contains(&num) || num > 0x10FFFF {
            return Some('\u{FFFD}'.to_string());
        }
        char::from_u32(num).map(String::from)
    }

    /// C1 controls read as (sloppy) Windows-1252, as browsers do.
    fn fix_c1_controls(&self, s: &str) -> String {
        let cp1252 = &self.codecs[1];
        s.chars()
            .map(|c| match c as u32 {
                0x80..=0x9F => cp1252.decode_byte(c as u32 as u8),
                _ => c,
            })
            .collect()
    }

    fn fix_character_width(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            match self.width.get(&c) {
                Some(w) => out.push_str(w),
                None => out.push(c),
            }
        }
        out
    }

    /// `ftfy.fix_encoding`: repeated single steps until the text stops changing.
    fn fix_encoding(&self, text: &str) -> String {
        let mut text = text.to_string();
        loop {
            let next = self.fix_encoding_step(&text);
            if next == text {
                return text;
            }
            text = next;
        }
    }

    /// ftfy's `_fix_encoding_one_step_and_explain`, without the explanation.
    fn fix_encoding_step(&self, text: &str) -> String {
        if text.is_empty() || text.is_ascii() || !self.is_bad(text) {
            return text.to_string();
        }
        let mut possible = Vec::new();
        for codec in &self.codecs {
            if !codec.possible(text) {
                continue;
            }
            possible.push(codec.name);
            let Some(mut bytes) = codec.encode(text) else {
                continue;
            };
            if codec.name != "macroman"
                && self
                    .altered_utf8
                    .find_iter(&bytes_as_text(&bytes))
                    .next()
                    .is_some()
            {
                bytes = self.restore_byte_a0(&bytes);
            }
            if codec.name.starts_with("sloppy") {
                let t = replace_all(&self.lossy_utf8, &bytes_as_text(&bytes), |_| {
                    "\u{ef}\u{bf}\u{bd}".to_string()
                });
                bytes = text_as_bytes(&t);
            }
            if let Some(fixed) = decode_utf8_variants(&bytes) {
                return fixed;
            }
        }
        if self.utf8_detector.find_iter(text).next().is_some() {
            let fixed = self.decode_inconsistent_utf8(text);
            if fixed != text {
                return fixed;
            }
        }
        // ftfy's test for "windows-1252" among the possible codecs never holds (it lists
        // "sloppy-windows-1252"), so Latin-1 text is always re-read as strict Windows-1252.
        if possible.contains(&"latin-1") {
            let cp1252 = &self.codecs[1];
            let undefined = |c: char| matches!(c as u32, 0x81 | 0x8D | 0x8F | 0x90 | 0x9D);
            if !text.chars().any(undefined) {
                let fixed: String = text
                    .chars()
                    .map(|c| match c as u32 {
                        0x80..=0xFF => cp1252.decode_byte(c as u32 as u8),
                        _ => c,
                    })
                    .collect();
                if fixed != text {
                    return fixed;
                }
            }
        }
        if text.chars().any(|c| matches!(c as u32, 0x80..=0x9F)) {
            return self.fix_c1_controls(text);
        }
        text.to_string()
    }

    /// ftfy's `restore_byte_a0`: spaces that were probably U+A0 inside UTF-8 sequences.
    fn restore_byte_a0(&self, bytes: &[u8]) -> Vec<u8> {
        let t = replace_all(&self.a_grave_word, &bytes_as_text(bytes), |_| {
            "\u{c3}\u{a0} ".to_string()
        });
        let t = replace_all(&self.altered_utf8, &t, |m| m.replace(' ', "\u{a0}"));
        text_as_bytes(&t)
    }

    /// ftfy's `decode_inconsistent_utf8`: fixes UTF-8 mojibake embedded in other text.
    fn decode_inconsistent_utf8(&self, text: &str) -> String {
        let len = text.chars().count();
        replace_all(&self.utf8_detector, text, |m| {
            if m.chars().count() < len && self.is_bad(m) {
                self.fix_encoding(m)
            } else {
                m.to_string()
            }
        })
    }
}

/// ftfy's `utf-8-variants` codec: UTF-8 that may also hold CESU-8 surrogate pairs and Java's
/// two-byte NUL; `None` where Python's strict decoder would raise.
fn decode_utf8_variants(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0xC0 && b.get(i + 1) == Some(&0x80) {
            out.push('\0');
            i += 2;
            continue;
        }
        if b[i] == 0xED && i + 5 < b.len() {
            let s = &b[i..i + 6];
            if (0xA0..=0xAF).contains(&s[1])
                && (0x80..=0xBF).contains(&s[2])
                && s[3] == 0xED
                && (0xB0..=0xBF).contains(&s[4])
                && (0x80..=0xBF).contains(&s[5])
            {
                let cp = (((s[1] & 0x0F) as u32) << 16)
                    + (((s[2] & 0x3F) as u32) << 10)
                    + (((s[4] & 0x0F) as u32) << 6)
                    + (s[5] & 0x3F) as u32
                    + 0x10000;
                out.push(char::from_u32(cp)?);
                i += 6;
                continue;
            }
        }
        let len = match b[i] {
            0x00..=0x7F => 1,
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return None,
        };
        let ch = std::str::from_utf8(b.get(i..i + len)?).ok()?;
        out.push_str(ch);
        i += len;
    }
    Some(out)
}

fn nfc(s: &str) -> String {
    let mut n = tokenizers::NormalizedString::from(s);
    n.nfc();
    n.get().to_string()
}

fn fix_latin_ligatures(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let r = match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "ʼn",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(r);
    }
    out
}

fn uncurl_quotes(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{201C}'..='\u{201F}' => '"',
            '\u{02BC}' | '\u{2018}'..='\u{201B}' => '\'',
            c => c,
        })
        .collect()
}

fn fix_line_breaks(s: &str) -> String {
    s.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{0085}'], "\n")
}

/// ftfy's `remove_control_chars`: C0 controls other than tab/newline/form feed/CR, DEL,
/// deprecated Arabic format controls, the BOM and interlinear annotation characters.
fn remove_control_chars(s: &str) -> String {
    s.chars()
        .filter(|&c| {
            !matches!(c as u32,
                0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_entities_decode_until_stable() {
        assert_eq!(fix_text("&amp;lt; x"), "< x");
        assert_eq!(fix_text("P&EACUTE;REZ"), "PÉREZ");
        assert_eq!(fix_text("a &#59; b &#x41; &#65a;"), "a &#59; b A &#65a;");
        assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
    }

    #[test]
    fn width_quotes_and_ligatures() {
        assert_eq!(fix_text("ＬＯＵＤ\u{3000}ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_text("it\u{2019}s \u{201C}ﬁne\u{201D}"), "it's \"fine\"");
        assert_eq!(fix_text("\x1b[36mblue\x1b[0m\u{feff}"), "blue");
    }

    #[test]
    fn mojibake_is_repaired() {
        // Examples from ftfy's documentation.
        assert_eq!(fix_text("sÃ³"), "só");
        assert_eq!(fix_text("voilÃ le travail"), "voilà le travail");
        assert_eq!(fix_text("âœ” No problems"), "✔ No problems");
        assert_eq!(fix_text("&macr;\\_(ã\u{83}\u{84})_/&macr;"), "¯\\_(ツ)_/¯");
        assert_eq!(fix_text("caf\u{e9} na\u{ef}ve"), "caf\u{e9} na\u{ef}ve");
    }
}
