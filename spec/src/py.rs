//! Values written as Python writes them, for text that kohya's tools read or compare: the
//! `ss_*` metadata of a LoRA file (`str()` of sd-scripts' arguments, `json.dumps` of its
//! dataset facts) and `optimizer_args` values (read by sd-scripts with `ast.literal_eval`).

use std::fmt::Display;

/// `str(bool)`: `True` or `False`.
pub fn bool_str(b: bool) -> String {
    if b { "True" } else { "False" }.to_string()
}

/// Python's `repr(float)` (and `str(float)`): shortest round-trip digits, ".0" on integral
/// values, exponent form (at least two exponent digits) below 1e-4 or from 1e16. Non-finite
/// values are written as `json.dumps` writes them (`NaN`, `Infinity`, `-Infinity`).
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// `str()` of an optional value: `None`, else the value's own text (a string as itself).
pub fn opt_str<T: Display>(v: Option<T>) -> String {
    v.map_or("None".into(), |x| x.to_string())
}

/// `str()` of an optional float: `None`, else [`float_repr`].
pub fn opt_float_repr(v: Option<f64>) -> String {
    v.map_or("None".into(), float_repr)
}

/// Appends `s` as `json.dumps` writes a string by default: in double quotes, with
/// everything outside printable ASCII escaped as `\uXXXX` (UTF-16 units).
pub fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A TOML value as sd-scripts' `key=value` text, which it reads with `ast.literal_eval`:
/// strings as they are, numbers, `True`/`False`, arrays of numbers or booleans as tuples.
/// `None` for values that have no such form (tables, dates, arrays of strings).
pub fn literal(value: &toml::Value) -> Option<String> {
    Some(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => float_literal(*f),
        toml::Value::Boolean(b) => bool_str(*b),
        toml::Value::Array(items) => {
            let parts = items
                .iter()
                .map(|v| match v {
                    toml::Value::Integer(i) => Some(i.to_string()),
                    toml::Value::Float(f) => Some(float_literal(*f)),
                    toml::Value::Boolean(b) => Some(bool_str(*b)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            // A one-element tuple needs its trailing comma.
            if parts.len() == 1 {
                format!("({},)", parts[0])
            } else {
                format!("({})", parts.join(","))
            }
        }
        toml::Value::Datetime(_) | toml::Value::Table(_) => return None,
    })
}

/// A float as a Python literal that reads back as the same value: `{:?}` keeps a decimal
/// point or an exponent (`1.0`, `1e-8`), so the value stays a float in Python. Unlike
/// [`float_repr`] its exponents have no sign or padding (`1e-8`, not `1e-08`).
fn float_literal(f: f64) -> String {
    format!("{f:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_floats() {
        assert_eq!(float_repr(1.0), "1.0");
        assert_eq!(float_repr(0.05), "0.05");
        assert_eq!(float_repr(1e-5), "1e-05");
        assert_eq!(float_repr(0.0001), "0.0001");
        assert_eq!(float_repr(1e16), "1e+16");
        assert_eq!(float_repr(123456.5), "123456.5");
        assert_eq!(float_repr(0.1 + 0.2), "0.30000000000000004");
    }

    #[test]
    fn python_json_strings() {
        let mut s = String::new();
        json_string(&mut s, "café \"x\"\u{1F600}");
        assert_eq!(s, r#""caf\u00e9 \"x\"\ud83d\ude00""#);
    }

    #[test]
    fn python_values() {
        assert_eq!(bool_str(true), "True");
        assert_eq!(bool_str(false), "False");
        assert_eq!(opt_str(None::<u32>), "None");
        assert_eq!(opt_str(Some(2u32)), "2");
        assert_eq!(opt_str(Some("a comment")), "a comment");
        assert_eq!(opt_float_repr(None), "None");
        assert_eq!(opt_float_repr(Some(1e-5)), "1e-05");
    }
}
