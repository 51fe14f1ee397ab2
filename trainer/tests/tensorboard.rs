//! loractl's TensorBoard event files against TensorBoard's own reader: a fixed set of scalars
//! written by [`EventWriter`] must give exactly the committed fixture file, and the values
//! TensorBoard read from that file (`scripts/fixtures/read_tensorboard_fixture.py`, committed
//! as JSON) must be the ones written. `LORACTL_REGENERATE_FIXTURES=1` rewrites the file.

use loractl_trainer::tensorboard::{self, EventWriter};

mod support;
use support::{fixture, scratch_dir};

/// `(tag, step, value, wall_time)`: kohya's tags, a d*lr group, an epoch average, a
/// non-ASCII tag, a large step and values that need every bit of an f32.
fn scalars() -> Vec<(&'static str, i64, f32, f64)> {
    let mut out = Vec::new();
    for step in 1..=3i64 {
        let t = 1_700_000_000.0 + step as f64 * 0.25;
        out.push(("loss/current", step, 0.1 + step as f32 / 7.0, t));
        out.push(("loss/average", step, 0.2 - step as f32 / 1e4, t));
        out.push(("lr/unet", step, 1e-4 * step as f32, t));
        out.push(("lr/textencoder", step, 5e-5, t));
        out.push(("lr/d*lr/unet", step, 3.3e-6 / step as f32, t));
    }
    out.push(("loss/epoch_average", 1, 0.123_456_79, 1_700_000_001.0));
    out.push(("lr/ünet", 300, f32::MIN_POSITIVE, 1_700_000_002.5));
    out.push(("loss/current", 1 << 40, 65_504.0, 1_700_000_003.0));
    out
}

fn write(path: &std::path::Path) -> anyhow::Result<()> {
    let mut w = EventWriter::create(path, 1_700_000_000.0)?;
    for (tag, step, value, t) in scalars() {
        w.scalar(tag, value, step, t)?;
    }
    w.flush()?;
    Ok(())
}

#[test]
fn tensorboard_reads_what_loractl_writes() -> anyhow::Result<()> {
    let committed = fixture("tensorboard/events.out.tfevents.fixture");
    if std::env::var_os("LORACTL_REGENERATE_FIXTURES").is_some() {
        write(&committed)?;
    }
    let dir = scratch_dir("tensorboard")?;
    let fresh = dir.join("events.out.tfevents.test");
    write(&fresh)?;
    assert_eq!(
        std::fs::read(&fresh)?,
        std::fs::read(&committed)?,
        "the writer's bytes changed: regenerate the fixture and read it with TensorBoard again"
    );

    let seen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(
        "tensorboard/read_by_tensorboard.json",
    ))?)?;
    assert_eq!(seen["file_version"], "brain.Event:2");
    assert_eq!(seen["records"], scalars().len() + 1);
    let written = scalars();
    let mut count = 0;
    for (tag, points) in seen["scalars"].as_object().expect("scalars by tag") {
        for point in points.as_array().expect("points") {
            let (step, value, t) = (
                point[0].as_i64().expect("step"),
                point[1].as_f64().expect("value"),
                point[2].as_f64().expect("wall time"),
            );
            let expected = written
                .iter()
                .find(|(w, s, ..)| w == tag && *s == step)
                .unwrap_or_else(|| panic!("TensorBoard saw {tag} at step {step}, never written"));
            // TensorBoard widened the f32 to a double; JSON parsing may be off in the last
            // bit of that double, never in the f32's.
            assert_eq!(value as f32, expected.2, "{tag} at {step}");
            assert_eq!(t, expected.3, "{tag} at {step}");
            count += 1;
        }
    }
    assert_eq!(count, written.len(), "TensorBoard saw every scalar");

    // loractl's own reader agrees, and notices damage.
    let ours = tensorboard::read(&committed)?;
    assert_eq!(ours.file_version, "brain.Event:2");
    assert_eq!(ours.scalars.len(), written.len());
    let mut bytes = std::fs::read(&committed)?;
    let last = bytes.len() - 6;
    bytes[last] ^= 1;
    let damaged = dir.join("damaged");
    std::fs::write(&damaged, bytes)?;
    let err = tensorboard::read(&damaged).unwrap_err().to_string();
    assert!(err.contains("CRC"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
