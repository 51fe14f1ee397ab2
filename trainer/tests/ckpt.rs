//! Reads the checkpoints `fixtures/ckpt/make.py` wrote with torch 2.9.1 and compares every
//! tensor with `fixtures/ckpt/expected.json`; hostile and broken files must fail with a
//! `BadCheckpoint` that says what is wrong, and must never panic.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device};
use loractl_trainer::ckpt::CkptFile;
use loractl_trainer::Error;
use rand::{Rng, SeedableRng};

mod support;
use support::{fixture, Data, PickledTensor};

/// A scratch file unique to this test process and `tag`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str, bytes: &[u8]) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("loractl-ckpt-test-{}-{tag}", std::process::id()));
        std::fs::write(&path, bytes).expect("write scratch file");
        Scratch(path)
    }
}

impl Scratch {
    /// Replaces the contents in place. Truncating to zero and rewriting would make ext4 flush
    /// the file to disk every time (`auto_da_alloc`), which slows the fuzz loop tenfold.
    fn overwrite(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&self.0)?;
        file.write_all(bytes)?;
        let len = file.stream_position()?;
        file.set_len(len)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The candle dtype `CkptFile` promises for a torch dtype name (`None`: not loadable).
fn candle_dtype(torch: &str) -> Option<DType> {
    Some(match torch {
        "float64" => DType::F64,
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" => DType::I64,
        "int32" => DType::I32,
        "int16" | "int8" => DType::I16,
        "uint8" | "bool" => DType::U8,
        "uint16" => DType::U32,
        "float8_e4m3fn" => DType::F8E4M3,
        _ => return None,
    })
}

/// Opens `file` and checks names, shapes, dtypes and values against expected.json.
fn check_against_expected(file: &str) -> anyhow::Result<()> {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("ckpt/expected.json"))?)?;
    let expected = expected[file]
        .as_object()
        .with_context(|| format!("expected.json has no {file}"))?;
    let ckpt = CkptFile::open(&fixture(format!("ckpt/{file}")))?;
    let mut names = ckpt.names();
    names.sort();
    let mut want: Vec<&String> = expected.keys().collect();
    want.sort();
    ensure!(
        names.iter().eq(want.iter().copied()),
        "{file}: names {names:?} != {want:?}"
    );

    for (name, e) in expected {
        let shape: Vec<usize> = serde_json::from_value(e["shape"].clone())?;
        let torch_dtype = e["dtype"].as_str().context("dtype")?;
        ensure!(
            ckpt.shape(name) == Some(shape.clone()),
            "{file} {name}: shape"
        );
        ensure!(
            ckpt.dtype(name) == candle_dtype(torch_dtype),
            "{file} {name}: dtype {:?} for torch {torch_dtype}",
            ckpt.dtype(name)
        );
        let Some(dtype) = candle_dtype(torch_dtype) else {
            let err = ckpt.load(name, &Device::Cpu).expect_err("not loadable");
            ensure!(
                err.to_string().contains(torch_dtype),
                "{file} {name}: error `{err}` should name {torch_dtype}"
            );
            continue;
        };
        let tensor = ckpt.load(name, &Device::Cpu)?;
        ensure!(
            tensor.dtype() == dtype,
            "{file} {name}: loaded as {:?}",
            tensor.dtype()
        );
        ensure!(
            tensor.dims() == shape.as_slice(),
            "{file} {name}: dims {:?}",
            tensor.dims()
        );
        // candle 0.11.1's F8E4M3 -> F64 cast recurses forever (WithDType::to_f64 calls
        // itself), so float8 goes through F32.
        let tensor = if dtype == DType::F8E4M3 {
            tensor.to_dtype(DType::F32)?
        } else {
            tensor
        };
        let got = tensor
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let want: Vec<f64> = serde_json::from_value(e["values"].clone())?;
        ensure!(
            got.len() == want.len(),
            "{file} {name}: {} values",
            got.len()
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            ensure!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{file} {name}[{i}]: {g} != {w}"
            );
        }
    }
    Ok(())
}

/// The message of a `BadCheckpoint` error, or a test failure for anything else.
fn bad_checkpoint(result: loractl_trainer::Result<CkptFile>) -> anyhow::Result<String> {
    match result {
        Ok(_) => bail!("the file opened"),
        Err(Error::BadCheckpoint { msg, .. }) => Ok(msg),
        Err(other) => bail!("expected BadCheckpoint, got {other:?}"),
    }
}

fn assert_refused(file: &Path, needles: &[&str]) -> anyhow::Result<()> {
    let msg = bad_checkpoint(CkptFile::open(file))?;
    for needle in needles {
        ensure!(
            msg.contains(needle),
            "{}: `{msg}` should contain `{needle}`",
            file.display()
        );
    }
    Ok(())
}

support::tests_of!(check_against_expected {
    state_dict_checkpoint_matches_torch => "basic.ckpt",
    deflated_archive_matches_torch => "deflated.ckpt",
    nested_wrappers_join_with_dots => "wrapped.pt",
    /// float8_e4m3fn and uint16 come through _rebuild_tensor_v3; complex64 cannot load.
    untyped_storage_dtypes_match_torch => "newdtypes.pt",
});

#[test]
fn top_level_state_dict_matches_torch() -> anyhow::Result<()> {
    check_against_expected("toplevel.pt")?;
    let ckpt = CkptFile::open(&fixture("ckpt/toplevel.pt"))?;
    assert_eq!(
        ckpt.names(),
        ["0.weight", "0.bias", "1.weight", "1.bias"],
        "names keep the file's order"
    );
    Ok(())
}

#[test]
fn state_dict_names_order_and_lookups() -> anyhow::Result<()> {
    let ckpt = CkptFile::open(&fixture("ckpt/basic.ckpt"))?;
    let names = ckpt.names();
    assert_eq!(names.first().map(String::as_str), Some("model.a"));
    assert_eq!(names.last().map(String::as_str), Some("model.attr"));
    assert!(
        !names.iter().any(|n| n.contains("not_in_state_dict")),
        "top-level tensors beside state_dict are not listed"
    );
    assert_eq!(ckpt.shape("missing"), None);
    assert_eq!(ckpt.dtype("missing"), None);
    match ckpt.load("missing", &Device::Cpu) {
        Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "missing"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    Ok(())
}

#[test]
fn ckpt_file_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CkptFile>();
}

#[test]
fn pickled_os_system_is_refused() -> anyhow::Result<()> {
    assert_refused(
        &fixture("ckpt/evil_system.ckpt"),
        &["refusing to load `posix.system`", "tries to run code"],
    )
}

#[test]
fn pickled_eval_via_stack_global_is_refused() -> anyhow::Result<()> {
    assert_refused(
        &fixture("ckpt/evil_eval.pt"),
        &[
            "refusing to load `builtins.eval`",
            "not a plain PyTorch checkpoint",
        ],
    )
}

#[test]
fn tensor_larger_than_its_storage_is_refused() -> anyhow::Result<()> {
    assert_refused(
        &fixture("ckpt/too_many_elements.ckpt"),
        &["tensor `w`", "shape [5]", "holds only 16 bytes"],
    )
}

#[test]
fn storage_record_shorter_than_declared_is_refused() -> anyhow::Result<()> {
    assert_refused(
        &fixture("ckpt/short_storage.ckpt"),
        &["should hold 16 bytes", "holds 8", "truncated"],
    )
}

#[test]
fn missing_storage_record_is_refused() -> anyhow::Result<()> {
    assert_refused(
        &fixture("ckpt/missing_storage.ckpt"),
        &["tensor `w`", "no record `archive/data/7`"],
    )
}

#[test]
fn zip_without_pickle_is_refused() -> anyhow::Result<()> {
    assert_refused(&fixture("ckpt/no_pickle.zip"), &["no `data.pkl` record"])
}

#[test]
fn deeply_nested_marks_are_refused() -> anyhow::Result<()> {
    assert_refused(&fixture("ckpt/deep_marks.ckpt"), &["MARKs more than"])
}

#[test]
fn legacy_format_is_refused_with_a_hint() -> anyhow::Result<()> {
    assert_refused(&fixture("ckpt/legacy.pt"), &["legacy", "re-save"])
}

#[test]
fn empty_file_is_refused() -> anyhow::Result<()> {
    let file = Scratch::new("empty", b"");
    assert_refused(&file.0, &["empty"])
}

#[test]
fn random_bytes_are_refused() -> anyhow::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let bytes: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let file = Scratch::new("random", &bytes);
    assert_refused(&file.0, &["not a PyTorch .ckpt/.pt checkpoint"])
}

#[test]
fn safetensors_file_is_refused_with_a_hint() -> anyhow::Result<()> {
    let header = br#"{"__metadata__":{}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    let file = Scratch::new("safetensors", &bytes);
    assert_refused(&file.0, &["safetensors"])
}

#[test]
fn truncated_archives_are_refused() -> anyhow::Result<()> {
    let bytes = std::fs::read(fixture("ckpt/basic.ckpt"))?;
    for (tag, len) in [("half", bytes.len() / 2), ("tail", bytes.len() - 10)] {
        let file = Scratch::new(&format!("truncated-{tag}"), &bytes[..len]);
        assert_refused(&file.0, &["truncated"])?;
    }
    Ok(())
}

#[test]
fn corrupted_tensor_bytes_fail_their_crc_on_load() -> anyhow::Result<()> {
    let mut bytes = std::fs::read(fixture("ckpt/basic.ckpt"))?;
    // model.a's storage begins with the float16 values 0.0, 0.25, 0.5, 0.75.
    let pattern = [0x00, 0x00, 0x00, 0x34, 0x00, 0x38, 0x00, 0x3a];
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern)
        .context("model.a's bytes")?;
    bytes[at + 3] ^= 0x01;
    let file = Scratch::new("crc", &bytes);
    let ckpt = CkptFile::open(&file.0)?;
    let err = ckpt.load("model.a", &Device::Cpu).expect_err("corrupt");
    ensure!(err.to_string().contains("CRC"), "{err}");
    ensure!(
        ckpt.load("model.f64", &Device::Cpu).is_ok(),
        "other storages still load"
    );
    Ok(())
}

/// Mutates a valid checkpoint at thousands of positions: every outcome must be a value or an
/// error, never a panic or an unbounded allocation.
#[test]
fn mutated_checkpoints_never_panic() -> anyhow::Result<()> {
    let original = std::fs::read(fixture("ckpt/basic.ckpt"))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
    let file = Scratch::new("fuzz", &original);
    let (mut opened, mut loaded) = (0, 0);
    for i in 0..3000 {
        let mut bytes = original.clone();
        match i % 4 {
            // Flip bits somewhere.
            0 | 1 => {
                for _ in 0..rng.random_range(1..=4) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            // Overwrite with extreme values: lengths and offsets become huge or zero.
            2 => {
                let at = rng.random_range(0..bytes.len());
                let value = [0x00, 0xff, 0x7f, 0x80][rng.random_range(0..4)];
                let end = (at + rng.random_range(1..=8)).min(bytes.len());
                bytes[at..end].fill(value);
            }
            // Cut it short.
            _ => bytes.truncate(rng.random_range(0..bytes.len())),
        }
        file.overwrite(&bytes)?;
        let Ok(ckpt) = CkptFile::open(&file.0) else {
            continue;
        };
        opened += 1;
        for name in ckpt.names() {
            let _ = (ckpt.shape(&name), ckpt.dtype(&name));
            if ckpt.load(&name, &Device::Cpu).is_ok() {
                loaded += 1;
            }
        }
    }
    eprintln!("fuzz: {opened} of 3000 mutants opened, {loaded} tensors loaded");
    // Flips inside tensor data or zip metadata torch ignores still open.
    ensure!(opened > 0 && loaded > 0, "opened {opened}, loaded {loaded}");
    Ok(())
}

/// A 1 MB file whose deflated `data.pkl` inflates to 100 MiB is refused from the zip
/// directory's sizes, before anything is inflated.
#[test]
fn deflated_pickle_larger_than_a_real_one_is_refused_before_inflating() -> anyhow::Result<()> {
    // BINUNICODE of 100 MiB of 0xff: invalid UTF-8 that lossy decoding would triple.
    let len: u64 = 100 << 20;
    let mut prefix = vec![0x80, 2, b'X'];
    prefix.extend_from_slice(&(len as u32).to_le_bytes());
    let pickle = Data::deflate_repeated(&prefix, 0xff, len);
    let bytes = support::checkpoint(pickle, vec![]);
    ensure!(bytes.len() < 1 << 20, "the file is small: {}", bytes.len());
    let file = Scratch::new("big-pickle", &bytes);
    let before = support::current_rss();
    let msg = bad_checkpoint(CkptFile::open(&file.0))?;
    let grew = support::peak_rss().saturating_sub(before);
    ensure!(
        msg.contains("archive/data.pkl") && msg.contains("more than"),
        "{msg}"
    );
    // Nothing near the pickle's size was allocated (other tests share the process, so the
    // bound is loose).
    ensure!(grew < 64 << 20, "peak RSS grew by {grew} bytes");
    Ok(())
}

/// A pickle string that is not UTF-8 is refused instead of replaced: replacement characters
/// would take three bytes for each byte of the file.
#[test]
fn pickle_string_that_is_not_utf8_is_refused() -> anyhow::Result<()> {
    let len: u64 = 4 << 20;
    let mut prefix = vec![0x80, 2, b'X'];
    prefix.extend_from_slice(&(len as u32).to_le_bytes());
    let pickle = Data::deflate_repeated(&prefix, 0xff, len);
    let file = Scratch::new("lossy", &support::checkpoint(pickle, vec![]));
    let msg = bad_checkpoint(CkptFile::open(&file.0))?;
    ensure!(msg.contains("not UTF-8"), "{msg}");
    Ok(())
}

/// 400 tensors viewing one deflated storage: the storage is inflated once, not once per
/// tensor, and every tensor still reads its own slice.
#[test]
fn shared_deflated_storage_is_inflated_once() -> anyhow::Result<()> {
    const TENSORS: u64 = 400;
    const NUMEL: u64 = 1 << 20; // 4 MiB of float32
    let names: Vec<String> = (0..TENSORS).map(|i| format!("t{i:03}")).collect();
    let tensors: Vec<PickledTensor> = names
        .iter()
        .enumerate()
        .map(|(i, name)| PickledTensor {
            name,
            key: "0",
            storage_numel: NUMEL,
            offset: i as u64 * 16,
            shape: &[4, 4],
        })
        .collect();
    let values: Vec<u8> = (0..NUMEL as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let bytes = support::checkpoint(
        Data::Stored(support::state_dict_pickle(&tensors)),
        vec![("0".into(), Data::deflate(&values))],
    );
    let file = Scratch::new("shared", &bytes);
    let ckpt = CkptFile::open(&file.0)?;
    ensure!(ckpt.names().len() == TENSORS as usize);
    for (i, name) in names.iter().enumerate() {
        let t = ckpt.load(name, &Device::Cpu)?;
        let first = t.flatten_all()?.to_vec1::<f32>()?[0];
        ensure!(first == (i * 16) as f32, "{name} starts with {first}");
    }
    ensure!(
        ckpt.inflations() == 1,
        "the shared storage was inflated {} times",
        ckpt.inflations()
    );
    // Once every tensor was read the cache lets go; loading again inflates again.
    ckpt.load("t000", &Device::Cpu)?;
    ensure!(ckpt.inflations() == 2, "{}", ckpt.inflations());

    // A shared storage that fails its CRC is inflated once too, not once per tensor.
    let Data::Deflated {
        compressed, size, ..
    } = Data::deflate(&values)
    else {
        bail!("deflate gives deflated data");
    };
    let bytes = support::checkpoint(
        Data::Stored(support::state_dict_pickle(&tensors)),
        vec![(
            "0".into(),
            Data::Deflated {
                compressed,
                size,
                crc: 0xdead_beef,
            },
        )],
    );
    let file = Scratch::new("shared-crc", &bytes);
    let ckpt = CkptFile::open(&file.0)?;
    for name in &names {
        let err = ckpt.load(name, &Device::Cpu).expect_err("corrupt");
        ensure!(err.to_string().contains("CRC"), "{err}");
    }
    ensure!(ckpt.inflations() == 1, "{}", ckpt.inflations());
    Ok(())
}

/// Compares a real checkpoint with a safetensors file of the same weights, e.g.
/// `LORACTL_CKPT=model.ckpt LORACTL_CKPT_TWIN=model.safetensors cargo test -p loractl-trainer
/// --test ckpt -- --ignored`.
#[test]
#[ignore = "needs LORACTL_CKPT and LORACTL_CKPT_TWIN"]
fn real_checkpoint_matches_its_safetensors_twin() -> anyhow::Result<()> {
    let ckpt_path = PathBuf::from(std::env::var("LORACTL_CKPT")?);
    let twin_path = PathBuf::from(std::env::var("LORACTL_CKPT_TWIN")?);
    let started = std::time::Instant::now();
    let ckpt = CkptFile::open(&ckpt_path)?;
    let opened = started.elapsed();
    let twin = candle_core::safetensors::load(&twin_path, &Device::Cpu)?;
    // The checkpoint may hold more (EMA weights, say); every tensor of the twin must match.
    let mut names: Vec<&String> = twin.keys().collect();
    names.sort();
    let extra = ckpt.names().len().saturating_sub(names.len());
    let mut elements = 0;
    for name in &names {
        let got = ckpt.load(name, &Device::Cpu)?;
        let want = &twin[name.as_str()];
        ensure!(got.dims() == want.dims(), "{name}: dims");
        // Twins are sometimes saved in half precision; compare in the twin's dtype.
        let got = got.to_dtype(want.dtype())?;
        elements += got.elem_count();
        if got.elem_count() > 0 {
            let (got, want) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            ensure!(diff == 0.0, "{name}: differs by {diff}");
        }
    }
    eprintln!(
        "{} tensors ({elements} elements) match, {extra} more in the checkpoint; open took \
         {opened:?}, all loads {:?}",
        names.len(),
        started.elapsed()
    );
    Ok(())
}
