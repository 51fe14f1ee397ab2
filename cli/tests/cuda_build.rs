//! The CUDA build of `loractl` on a machine without a GPU. `scripts/cuda/build.sh` builds it and
//! `.ci/run` names it in `LORACTL_CUDA_BIN`, with `LORACTL_CUDA_LD_PATH` holding the link stub
//! for libcuda (every call answers CUDA_ERROR_NO_DEVICE) and the CUDA/NCCL wheel libraries.
//! Every CUDA and NCCL entry point must then fail with a clear error, never a panic.

mod common;
use common::job_dir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The CUDA binary and its loader path, or `None` (the test is skipped, saying why) when this
/// run was not given one.
fn cuda_binary(test: &str) -> Option<(PathBuf, String)> {
    let Some(bin) = std::env::var_os("LORACTL_CUDA_BIN").filter(|v| !v.is_empty()) else {
        eprintln!(
            "{test}: skipped: LORACTL_CUDA_BIN is not set (build the CUDA binary with \
             scripts/cuda/build.sh and set LORACTL_CUDA_BIN and LORACTL_CUDA_LD_PATH from \
             the loractl-cuda.env it writes; .ci/run does)"
        );
        return None;
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "LORACTL_CUDA_BIN={} does not exist: run scripts/cuda/build.sh",
        bin.display()
    );
    let ld = std::env::var("LORACTL_CUDA_LD_PATH").expect(
        "LORACTL_CUDA_LD_PATH must name the stub and wheel library folders with LORACTL_CUDA_BIN",
    );
    Some((bin, ld))
}

fn run(bin: &Path, ld: &str, args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin);
    cmd.args(args).env("LD_LIBRARY_PATH", ld);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

/// Fails unless the process ended by itself with a clear CUDA error (no panic, no signal).
fn assert_clean_failure(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}{stderr}");
    // 127 is the dynamic loader's "library not found": the build's libraries are not on the
    // loader path, which says nothing about our error handling.
    assert_ne!(
        out.status.code(),
        Some(127),
        "{what}: the binary did not load:\n{all}"
    );
    assert!(!all.contains("panicked"), "{what} panicked:\n{all}");
    assert!(
        out.status.code().is_some(),
        "{what} was killed by a signal:\n{all}"
    );
    all
}

#[test]
fn cuda_gpu_check_without_a_gpu_reports_nccl_then_no_device() -> anyhow::Result<()> {
    let Some((bin, ld)) = cuda_binary("cuda_gpu_check_without_a_gpu_reports_nccl_then_no_device")
    else {
        return Ok(());
    };
    let out = run(&bin, &ld, &["gpu-check"], &[])?;
    let all = assert_clean_failure(&out, "gpu-check");
    assert_eq!(out.status.code(), Some(1), "{all}");
    // NCCL answers without a device: the wheel's library is the one the build links.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("nccl: 2."), "no NCCL version in:\n{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot open CUDA device 0") && stderr.contains("CUDA_ERROR_NO_DEVICE"),
        "unclear error:\n{all}"
    );
    Ok(())
}

#[test]
fn cuda_train_on_cuda0_without_a_gpu_fails_cleanly() -> anyhow::Result<()> {
    let Some((bin, ld)) = cuda_binary("cuda_train_on_cuda0_without_a_gpu_fails_cleanly") else {
        return Ok(());
    };
    let (dir, job) = job_dir("cuda-train", 2)?;
    let job = job.to_string_lossy().to_string();
    let out = run(&bin, &ld, &["train", "--device", "cuda:0", &job], &[])?;
    let all = assert_clean_failure(&out, "train --device cuda:0");
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cuda:0") && stderr.contains("CUDA_ERROR_NO_DEVICE"),
        "unclear error:\n{all}"
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// A rank given a GPU (`CUDA_VISIBLE_DEVICES`) that CUDA cannot open fails (exit 1: retried,
/// perhaps elsewhere) and says why, rather than training on the CPU. As one rank of a 2-rank
/// job it fails before the rendezvous, so its peers' attempt fails at once too.
#[test]
fn cuda_rank_with_an_unusable_gpu_fails_and_says_why() -> anyhow::Result<()> {
    let Some((bin, ld)) = cuda_binary("cuda_rank_with_an_unusable_gpu_fails_and_says_why") else {
        return Ok(());
    };
    let (dir, job) = job_dir("cuda-rank", 1)?;
    let output = dir.join("out");
    std::fs::create_dir_all(&output)?;
    for (world, rank) in [("1", "0"), ("2", "0"), ("2", "1")] {
        let what = format!("rank {rank} of {world} on an unusable GPU");
        let out = Command::new(&bin)
            .arg("rank")
            .env("LD_LIBRARY_PATH", &ld)
            .env("CUDA_VISIBLE_DEVICES", "0")
            .env("LORACTL_SPEC", &job)
            .env("LORACTL_OUTPUT_DIR", &output)
            .env("LORACTL_RANK", rank)
            .env("LORACTL_WORLD_SIZE", world)
            .env("LORACTL_JOB_ID", "j1")
            .env("LORACTL_ATTEMPT", "1")
            .env_remove("LORACTL_RESUME")
            .env_remove("LORACTL_DATA_DIRS")
            .stdin(Stdio::null())
            .output()?;
        let all = assert_clean_failure(&out, &what);
        assert_eq!(out.status.code(), Some(1), "{what}:\n{all}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("GPU 0")
                && stderr.contains("CUDA_ERROR_NO_DEVICE")
                && stderr.contains("nvidia-smi"),
            "{what}: the rank does not say why its GPU is unusable:\n{all}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !stdout.contains("rendezvous") && !stdout.contains("training on the CPU"),
            "{what}: the rank went on without its GPU:\n{all}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// The default build has no CUDA: `gpu-check` and `--device cuda:0` say so and how to get one.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_build_without_cuda_says_so() -> anyhow::Result<()> {
    let (dir, job) = job_dir("cuda-nocuda", 2)?;
    for args in [
        vec!["gpu-check".to_string()],
        vec![
            "train".into(),
            "--device".into(),
            "cuda:0".into(),
            job.to_string_lossy().to_string(),
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_loractl"))
            .args(&args)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("built without CUDA") && stderr.contains("scripts/cuda/build.sh"),
            "{args:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
