//! sd-scripts' `optimizer_args`: `key=value` pairs whose values sd-scripts reads with Python's
//! `ast.literal_eval` (numbers, `True`/`False`, `None`, tuples like `0.9,0.99` or `(0.9, 0.99)`).

use std::collections::BTreeMap;

use crate::{Error, Result};

/// One parsed literal.
#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Num(f64),
    Bool(bool),
    None,
    Tuple(Vec<Lit>),
}

fn parse_scalar(s: &str) -> Option<Lit> {
    let s = s.trim();
    match s {
        "True" | "true" => return Some(Lit::Bool(true)),
        "False" | "false" => return Some(Lit::Bool(false)),
        "None" | "none" => return Some(Lit::None),
        // Not a Python literal, but the only way to spell Prodigy's default growth_rate.
        "inf" | "float('inf')" | "float(\"inf\")" => return Some(Lit::Num(f64::INFINITY)),
        _ => {}
    }
    let n = s.replace('_', "");
    n.parse::<f64>().ok().filter(|x| !x.is_nan()).map(Lit::Num)
}

fn parse(s: &str) -> Option<Lit> {
    let t = s.trim();
    let inner = t
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .or_else(|| t.strip_prefix('[').and_then(|x| x.strip_suffix(']')));
    let bracketed = inner.is_some();
    let body = inner.unwrap_or(t);
    if bracketed || body.contains(',') {
        let mut parts: Vec<&str> = body.split(',').collect();
        // Python allows one trailing comma: `(0.9,)`.
        if parts.last().is_some_and(|p| p.trim().is_empty()) {
            parts.pop();
        }
        return parts
            .into_iter()
            .map(parse_scalar)
            .collect::<Option<Vec<_>>>()
            .map(Lit::Tuple);
    }
    parse_scalar(body)
}

/// The `optimizer_args` of one optimizer, checked against the keys it accepts.
pub(crate) struct Args<'a> {
    optimizer: &'static str,
    map: &'a BTreeMap<String, String>,
}

impl<'a> Args<'a> {
    /// Fails on the first key that `accepted` does not list, naming the accepted ones.
    pub fn new(
        optimizer: &'static str,
        map: &'a BTreeMap<String, String>,
        accepted: &[&str],
    ) -> Result<Self> {
        for k in map.keys() {
            if !accepted.contains(&k.as_str()) {
                return Err(Error::Config(format!(
                    "optimizer_args: `{k}` is not an argument of {optimizer}; accepted: {}",
                    if accepted.is_empty() {
                        "none".to_string()
                    } else {
                        accepted.join(", ")
                    }
                )));
            }
        }
        Ok(Self { optimizer, map })
    }

    fn err(&self, key: &str, raw: &str, want: &str) -> Error {
        Error::Config(format!(
            "optimizer_args: {} `{key}={raw}`: expected {want}",
            self.optimizer
        ))
    }

    fn lit(&self, key: &str) -> Result<Option<(Lit, &'a str)>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(raw) => parse(raw).map(|l| Some((l, raw.as_str()))).ok_or_else(|| {
                self.err(
                    key,
                    raw,
                    "a Python literal (number, True/False, None, tuple)",
                )
            }),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.lit(key)? {
            None => Ok(default),
            Some((Lit::Num(x), _)) => Ok(x),
            Some((_, raw)) => Err(self.err(key, raw, "a number")),
        }
    }

    /// A number or `None`.
    pub fn opt_f64(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.lit(key)? {
            None => Ok(default),
            Some((Lit::Num(x), _)) => Ok(Some(x)),
            Some((Lit::None, _)) => Ok(None),
            Some((_, raw)) => Err(self.err(key, raw, "a number or None")),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.lit(key)? {
            None => Ok(default),
            Some((Lit::Bool(b), _)) => Ok(b),
            Some((_, raw)) => Err(self.err(key, raw, "True or False")),
        }
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.lit(key)? {
            None => Ok(default),
            Some((Lit::Num(x), _)) if x >= 0.0 && x.fract() == 0.0 && x < 1e15 => Ok(x as usize),
            Some((_, raw)) => Err(self.err(key, raw, "a non-negative integer")),
        }
    }

    /// A pair of numbers such as `betas=0.9,0.999`.
    pub fn pair(&self, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.lit(key)? {
            None => Ok(default),
            Some((Lit::Tuple(v), raw)) => match v.as_slice() {
                [Lit::Num(a), Lit::Num(b)] => Ok((*a, *b)),
                _ => Err(self.err(key, raw, "two numbers, e.g. 0.9,0.999")),
            },
            Some((_, raw)) => Err(self.err(key, raw, "two numbers, e.g. 0.9,0.999")),
        }
    }

    /// A range check with an error naming the key.
    pub fn check(&self, ok: bool, key: &str, what: &str) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "optimizer_args: {} `{key}` {what}",
                self.optimizer
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse("0.01"), Some(Lit::Num(0.01)));
        assert_eq!(parse(" 1e-3 "), Some(Lit::Num(1e-3)));
        assert_eq!(parse("True"), Some(Lit::Bool(true)));
        assert_eq!(parse("None"), Some(Lit::None));
        let t = Some(Lit::Tuple(vec![Lit::Num(0.9), Lit::Num(0.99)]));
        assert_eq!(parse("0.9,0.99"), t);
        assert_eq!(parse("(0.9, 0.99)"), t);
        assert_eq!(parse("[0.9,0.99]"), t);
        assert_eq!(
            parse("(1e-30,1e-3,)"),
            Some(Lit::Tuple(vec![Lit::Num(1e-30), Lit::Num(1e-3)]))
        );
        assert_eq!(parse("inf"), Some(Lit::Num(f64::INFINITY)));
        assert_eq!(parse("abc"), None);
        assert_eq!(parse("nan"), None);
    }

    #[test]
    fn typed_access_and_errors() {
        let mut m = BTreeMap::new();
        m.insert("betas".to_string(), "0.9,0.99".to_string());
        m.insert("decouple".to_string(), "True".to_string());
        m.insert("eps".to_string(), "x".to_string());
        let a = Args::new("Test", &m, &["betas", "decouple", "eps"]).unwrap();
        assert_eq!(a.pair("betas", (0.0, 0.0)).unwrap(), (0.9, 0.99));
        assert!(a.bool("decouple", false).unwrap());
        assert_eq!(a.f64("weight_decay", 0.5).unwrap(), 0.5);
        let e = a.f64("eps", 1.0).unwrap_err().to_string();
        assert!(e.contains("eps=x"), "{e}");
        let e = a.bool("betas", false).unwrap_err().to_string();
        assert!(e.contains("True or False"), "{e}");
        let e = Args::new("Test", &m, &["betas"]).err().unwrap().to_string();
        assert!(
            e.contains("`decouple`") && e.contains("accepted: betas"),
            "{e}"
        );
    }
}
