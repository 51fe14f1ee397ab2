//! A bounded, seeded fuzz test of the job spec parser and validation: the example specs
//! mutated (bytes flipped, inserted, cut; numbers made huge, negative or fractional; lines
//! duplicated or dropped) must each parse and validate to a value or an error, never a panic,
//! and memory must stay bounded. Prints how many inputs it tried and the peak RSS seen.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use loractl_spec::JobSpec;

/// Inputs tried; about ten seconds in the dev profile.
const INPUTS: usize = 100_000;
/// Peak resident memory allowed for the whole test process.
const MAX_RSS: u64 = 512 << 20;

/// splitmix64: a seeded generator with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const NUMBERS: [&str; 12] = [
    "0",
    "-1",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "nan",
    "inf",
    "0.5",
    "\"\"",
];

fn mutate(seed: &str, rng: &mut Rng) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for _ in 0..=rng.below(3) {
        let len = bytes.len().max(1);
        match rng.below(7) {
            0 => {
                let at = rng.below(len).min(bytes.len().saturating_sub(1));
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let at = rng.below(len + 1).min(bytes.len());
                let insert: Vec<u8> = (0..=rng.below(8)).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, insert);
            }
            2 => bytes.truncate(rng.below(len)),
            // A number replaced by an extreme one: the upper and lower bounds of every option.
            3 | 4 => {
                let digits: Vec<usize> = bytes
                    .iter()
                    .enumerate()
                    .filter(|(i, b)| {
                        b.is_ascii_digit() && (*i == 0 || !bytes[i - 1].is_ascii_digit())
                    })
                    .map(|(i, _)| i)
                    .collect();
                if let Some(&start) = digits.get(rng.below(digits.len())) {
                    let end = (start..bytes.len())
                        .find(|&i| !(bytes[i].is_ascii_digit() || bytes[i] == b'.'))
                        .unwrap_or(bytes.len());
                    let with = NUMBERS[rng.below(NUMBERS.len())].as_bytes().to_vec();
                    bytes.splice(start..end, with);
                }
            }
            // A line duplicated or dropped (duplicate keys, missing required keys).
            _ => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let mut lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let at = rng.below(lines.len());
                    if rng.below(2) == 0 {
                        lines.insert(at, lines[at]);
                    } else {
                        lines.remove(at);
                    }
                }
                bytes = lines.join("\n").into_bytes();
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[test]
fn mutated_specs_parse_and_validate_without_panic_or_blowup() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seeds: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| std::fs::read_to_string(e.path()).expect("example"))
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty());
    let mut rng = Rng(0x5eed_5bec);
    let (mut parsed, mut valid) = (0usize, 0usize);
    for i in 0..INPUTS {
        let text = mutate(&seeds[i % seeds.len()], &mut rng);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let spec = JobSpec::from_toml_str(&text, "fuzz.toml").ok()?;
            let ok = spec.resolved().is_ok();
            // What validates must also survive the round trip the worker makes.
            if ok {
                let again = spec.to_toml_string().ok()?;
                JobSpec::from_toml_str(&again, "round trip").ok()?;
            }
            Some(ok)
        }));
        match outcome {
            Ok(Some(ok)) => {
                parsed += 1;
                valid += usize::from(ok);
            }
            Ok(None) => {}
            Err(_) => panic!("input {i} panicked:\n{text}"),
        }
    }
    let peak = peak_rss();
    eprintln!(
        "spec fuzz: {INPUTS} inputs, {parsed} parsed, {valid} validated; peak RSS {} MiB",
        peak >> 20
    );
    assert!(parsed > 0 && parsed < INPUTS, "mutations did something");
    assert!(peak < MAX_RSS, "peak RSS {peak} bytes");
}

/// Two panics the fuzz test found: sizes near `u32::MAX` overflowed the arithmetic of the
/// resolution and bucket messages instead of being reported.
#[test]
fn sizes_near_u32_max_are_reported_not_overflowed() {
    for dataset in [
        "resolution = \"4294967295\"",
        "resolution = \"512\"\nenable_bucket = true\nmax_bucket_reso = 4294967295",
    ] {
        let text = format!(
            "name = \"x\"\n[model]\npretrained_model_name_or_path = \"m.safetensors\"\n\
             [dataset]\ntrain_data_dir = \"train\"\n{dataset}\n[training]\nmax_train_epochs = 1\n"
        );
        let spec = JobSpec::from_toml_str(&text, "job.toml").expect("parses");
        let result = catch_unwind(AssertUnwindSafe(|| spec.resolved().map(|_| ())));
        assert!(result.is_ok(), "validating `{dataset}` panicked");
    }
}
