//! The `loractl` binary on the tiny model: `plan` output, spec errors with their key paths, and
//! a `train` interrupted by SIGINT that saves a state and resumes to the end.

use std::io::{BufRead, BufReader};
mod common;
use common::job_dir;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn loractl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loractl"))
}

#[test]
fn plan_prints_kohya_arithmetic_and_json() -> anyhow::Result<()> {
    let (_dir, job) = job_dir("plan", 30)?;
    let out = loractl().arg("plan").arg(&job).output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(out.status.success(), "{text}");
    // 4 images × 5 repeats = 20 samples = 20 batches of 1 per epoch; 30 steps → 2 epochs.
    for want in [
        "5_shapes: 4 images × 5 repeats = 20 samples per epoch",
        "batches per epoch: 20",
        "epochs: 2",
        "total optimization steps: 30",
        "warmup steps: 3",
        "LoRA modules: 48 UNet + 18 text encoder",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    let out = loractl().args(["plan", "--json"]).arg(&job).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["total_steps"], 30);
    assert_eq!(v["dataset"]["batches_per_epoch"], 20);
    assert!(v["lora_params"].as_u64().is_some_and(|p| p > 0));
    Ok(())
}

#[test]
fn a_bad_spec_names_every_key_at_fault() -> anyhow::Result<()> {
    let (dir, job) = job_dir("bad", 10)?;
    let text = std::fs::read_to_string(&job)?
        .replace("network_dim = 8", "network_dim = 0")
        .replace(
            "train_batch_size = 1",
            "train_batch_size = 1\nmax_train_epoch = 3",
        );
    std::fs::write(&job, text)?;
    let out = loractl().arg("train").arg(&job).output()?;
    let err = String::from_utf8(out.stderr)?;
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("training.max_train_epoch"), "{err}");
    assert!(err.contains("max_train_epochs"), "no suggestion: {err}");
    assert!(!dir.join("output").exists(), "a rejected job wrote output");
    // Unknown keys stop parsing; the value errors show once they are fixed.
    let text = std::fs::read_to_string(&job)?.replace("max_train_epoch = 3\n", "");
    std::fs::write(&job, text)?;
    let out = loractl().arg("plan").arg(&job).output()?;
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("network.network_dim"), "{err}");
    Ok(())
}

fn wait_for_step(stdout: impl std::io::Read) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let is_step = v["kind"] == "step";
        seen.push(v);
        if is_step {
            return Ok(seen);
        }
    }
    anyhow::bail!("the run ended before its first step: {seen:?}")
}

fn send_sigint(pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -INT failed");
    Ok(())
}

fn events_of(out: &[u8]) -> anyhow::Result<Vec<serde_json::Value>> {
    String::from_utf8(out.to_vec())?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[test]
fn ctrl_c_saves_a_state_that_resumes_to_the_end() -> anyhow::Result<()> {
    let (dir, job) = job_dir("sigint", 6)?;
    let mut child = loractl()
        .args(["train", "--json"])
        .arg(&job)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let before = wait_for_step(&mut reader)?;
    send_sigint(child.id())?;
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut rest)?;
    let status = child.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("saving a resumable state"), "{stderr}");
    let after = events_of(&rest)?;
    let stopped = after
        .iter()
        .find(|e| e["kind"] == "stopped")
        .ok_or_else(|| anyhow::anyhow!("no stopped event in {after:?} (before: {before:?})"))?;
    let step = stopped["step"].as_u64().unwrap_or(0);
    assert!((1..6).contains(&step), "stopped at step {step}");
    let state = PathBuf::from(stopped["state"].as_str().unwrap_or_default());
    assert_eq!(state, dir.join("output/quickstart-state"));
    assert!(!dir.join("output/quickstart.safetensors").exists());

    let out = loractl()
        .args(["train", "--json", "--resume"])
        .arg(&state)
        .arg(&job)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = events_of(&out.stdout)?;
    let started = events
        .iter()
        .find(|e| e["kind"] == "started")
        .ok_or_else(|| anyhow::anyhow!("no started event"))?;
    assert_eq!(started["resumed_at"].as_u64(), Some(step));
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "step")
        .filter_map(|e| e["step"].as_u64())
        .collect();
    assert_eq!(steps, ((step + 1)..=6).collect::<Vec<_>>());
    assert!(file_has_lora(&dir.join("output/quickstart.safetensors"))?);
    Ok(())
}

fn file_has_lora(path: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    Ok(st.names().iter().any(|n| n.ends_with(".lora_up.weight")))
}

/// `loractl plan job.toml | head -0`: the reader is gone before anything is printed. The
/// command ends quietly with 141 (what a shell reports for SIGPIPE) instead of panicking with
/// exit 101.
#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly() -> anyhow::Result<()> {
    let (_dir, job) = job_dir("pipe", 10)?;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = loractl()
        .args(["plan", "--no-model"])
        .arg(&job)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    Ok(())
}

/// `loractl rank` reads data only inside `LORACTL_DATA_DIRS` (or, without it, the spec's own
/// dataset folders): a caption linked out of the dataset makes the job a bad configuration
/// (exit 78) naming the file, and the linked file's words reach no output.
#[cfg(unix)]
#[test]
fn a_rank_refuses_a_caption_linked_out_of_its_data_dirs() -> anyhow::Result<()> {
    const SECRET: &str = "hunter2-rank-secret";
    let (dir, job) = job_dir("rank-link", 2)?;
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, SECRET)?;
    let caption = dir.join("train/5_shapes/000.txt");
    std::fs::remove_file(&caption)?;
    std::os::unix::fs::symlink(&secret, &caption)?;
    let out_dir = dir.join("rank-output");
    std::fs::create_dir_all(&out_dir)?;
    for data_dirs in [Some(dir.join("train")), None] {
        let mut cmd = loractl();
        cmd.arg("rank")
            .env("LORACTL_SPEC", &job)
            .env("LORACTL_OUTPUT_DIR", &out_dir)
            .env("LORACTL_WORLD_SIZE", "1")
            .env("CUDA_VISIBLE_DEVICES", "")
            .env_remove("LORACTL_RESUME")
            .env_remove("LORACTL_DATA_DIRS");
        if let Some(d) = &data_dirs {
            cmd.env("LORACTL_DATA_DIRS", d);
        }
        let out = cmd.output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(78), "{stdout}\n{stderr}");
        assert!(stderr.contains("000.txt"), "{stderr}");
        assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
    }
    for entry in std::fs::read_dir(&out_dir)? {
        let bytes = std::fs::read(entry?.path()).unwrap_or_default();
        assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()));
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A rank the worker gave a GPU never trains on the CPU instead: a build without CUDA is a
/// bad configuration (exit 78, not retried) that says which build the worker needs.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_rank_given_a_gpu_by_a_build_without_cuda_is_a_bad_config() -> anyhow::Result<()> {
    let (dir, job) = job_dir("rank-nocuda", 2)?;
    let out_dir = dir.join("rank-output");
    std::fs::create_dir_all(&out_dir)?;
    for world in ["1", "2"] {
        let out = loractl()
            .arg("rank")
            .env("LORACTL_SPEC", &job)
            .env("LORACTL_OUTPUT_DIR", &out_dir)
            .env("LORACTL_WORLD_SIZE", world)
            .env("LORACTL_RANK", "0")
            .env("LORACTL_JOB_ID", "j1")
            .env("LORACTL_ATTEMPT", "1")
            .env("CUDA_VISIBLE_DEVICES", "0")
            .env_remove("LORACTL_RESUME")
            .env_remove("LORACTL_DATA_DIRS")
            .stdin(Stdio::null())
            .output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(78), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("GPU 0")
                && stderr.contains("built without CUDA")
                && stderr.contains("rank_command")
                && stderr.contains("scripts/cuda/build.sh"),
            "{stderr}"
        );
        // It failed before joining any collective or training.
        assert!(!stdout.contains("rendezvous"), "{stdout}");
        assert!(!stdout.contains("\"step\""), "{stdout}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The ranks of one job must share a backend: a CPU rank (TCP ring) told at the rendezvous
/// that rank 1 uses NCCL fails at once, naming that rank, instead of dialling `nccl`.
#[test]
fn a_cpu_rank_refuses_a_gpu_peer_at_the_rendezvous() -> anyhow::Result<()> {
    use loractl_worker::protocol::{parse_line, ChildMessage, Line, ParentMessage};
    use std::io::Write;
    let (dir, job) = job_dir("rank-mixed", 2)?;
    let out_dir = dir.join("rank-output");
    std::fs::create_dir_all(&out_dir)?;
    let mut child = loractl()
        .arg("rank")
        .env("LORACTL_SPEC", &job)
        .env("LORACTL_OUTPUT_DIR", &out_dir)
        .env("LORACTL_WORLD_SIZE", "2")
        .env("LORACTL_RANK", "0")
        .env("LORACTL_JOB_ID", "j1")
        .env("LORACTL_ATTEMPT", "1")
        .env("LORACTL_RING_HOST", "127.0.0.1")
        .env("LORACTL_COLLECTIVE_TIMEOUT_SECS", "20")
        .env("CUDA_VISIBLE_DEVICES", "")
        .env_remove("LORACTL_RESUME")
        .env_remove("LORACTL_DATA_DIRS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("the rank ended before its rendezvous"))??;
        if let Line::Message(ChildMessage::Rendezvous { address }) = parse_line(&line) {
            break address;
        }
    };
    let peers = ParentMessage::Peers {
        addresses: vec![address, "nccl".into()],
    };
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    writeln!(stdin, "{}", peers.to_line())?;
    drop(stdin);
    for line in lines {
        line?;
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    let status = child.wait()?;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rank 1 uses NCCL") && stderr.contains("this rank joins a TCP ring"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
