//! `loractl gpu-check`: is this machine's GPU usable by this binary? Reports the NCCL version,
//! opens the device, runs a one-rank all-reduce, broadcast and barrier through the ranks' own
//! NCCL backend (`loractl_collective::Nccl`) and times an all-reduce of gradient size through
//! it, then a matmul compared with the CPU. It is what a device script runs first on a GPU
//! machine; without a device it fails with the reason.

/// A build without the `cuda` feature cannot use a GPU at all: say so and how to get one.
#[cfg(not(feature = "cuda"))]
pub fn gpu_check(_ordinal: usize) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("{}", NO_CUDA)
}

#[cfg(not(feature = "cuda"))]
pub const NO_CUDA: &str = "this loractl was built without CUDA (the `cuda` feature): build one \
                           with `scripts/cuda/build.sh` to use NVIDIA GPUs";

#[cfg(feature = "cuda")]
pub use cuda::gpu_check;

/// `CUDA_COMPUTE_CAP` when this binary was built: candle's kernels are compiled for it alone.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const BUILT_FOR: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

/// nvcc's target for a compute capability as candle's build (cudaforge) names it: 9.0 to 12.0
/// get the architecture-specific `sm_NNa`, which runs on that architecture only; newer ones the
/// family target `sm_NNf`; older ones plain PTX, which the driver compiles for that GPU or any
/// newer one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn arch_name(cap: u32) -> String {
    match cap {
        c if c > 120 => format!("sm_{c}f"),
        c if c >= 90 => format!("sm_{c}a"),
        c => format!("sm_{c}"),
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernels_run_on(built: u32, device: u32) -> bool {
    match built {
        b if b > 120 => device / 10 == b / 10 && device >= b,
        b if b >= 90 => device == b,
        b => device >= b,
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::process::ExitCode;

    use anyhow::{anyhow, bail, Context};
    use candle_core::{Device, Tensor};
    use cudarc::nccl;
    use loractl_collective::{Collective, Nccl, NcclConfig, NcclId};

    /// Elements of the self-test buffer: enough to span several NCCL chunks.
    const SELF_TEST_LEN: usize = 1 << 16;
    /// Elements of the timed all-reduce: 3.4 M f32 (13.6 MB), a LoRA's gradients.
    const TIMED_LEN: usize = 3_400_000;
    const TIMED_RUNS: usize = 10;

    pub fn gpu_check(ordinal: usize) -> anyhow::Result<ExitCode> {
        // NCCL first: it needs no device, so a machine without one still shows the library works.
        let version = nccl::result::get_nccl_version().map_err(nccl_error)?;
        println!("nccl: {}", nccl_version(version));

        let device = Device::new_cuda(ordinal).with_context(|| {
            format!(
                "cannot open CUDA device {ordinal}: no usable NVIDIA GPU (check `nvidia-smi` and \
                 CUDA_VISIBLE_DEVICES)"
            )
        })?;
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        let ctx = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        println!(
            "device {ordinal}: {} (compute capability {major}.{minor})",
            ctx.name()?
        );
        let device_cap = (major * 10 + minor) as u32;
        match super::BUILT_FOR.and_then(|c| c.parse::<u32>().ok()) {
            Some(built) if !super::kernels_run_on(built, device_cap) => bail!(
                "device {ordinal} has compute capability {major}.{minor}, but this binary's \
                 kernels are built for {}: rebuild with CUDA_COMPUTE_CAP={device_cap} \
                 scripts/cuda/build.sh",
                super::arch_name(built)
            ),
            Some(built) => println!("kernels: {}", super::arch_name(built)),
            None => {}
        }

        let id = NcclId::generate()?;
        let config = NcclConfig::new(0, 1).with_timeout(std::time::Duration::from_secs(60));
        let mut nccl = Nccl::init(ctx, &id, config).context("NCCL setup (1 rank) failed")?;
        self_test(&mut nccl).context("NCCL self-test failed")?;
        println!(
            "nccl backend (1 rank): all-reduce of {SELF_TEST_LEN} f32, broadcast, barrier: ok"
        );
        let ms = time_all_reduce(&mut nccl).context("timed NCCL all-reduce failed")?;
        let mb = (TIMED_LEN * 4) as f64 / 1e6;
        println!(
            "nccl backend (1 rank): all-reduce of {TIMED_LEN} f32 ({mb:.1} MB, host buffer \
             staged through the GPU): median {ms:.2} ms of {TIMED_RUNS}, {:.1} GB/s each way",
            mb / ms
        );
        drop(nccl);

        let diff = matmul_vs_cpu(&device).context("matmul on the device failed")?;
        println!("matmul vs cpu: max relative difference {diff:.2e}: ok");
        println!("gpu-check: ok");
        Ok(ExitCode::SUCCESS)
    }

    /// One rank's mean is its own buffer, bit for bit; a broadcast from itself keeps its bytes.
    fn self_test(nccl: &mut Nccl) -> anyhow::Result<()> {
        let host: Vec<f32> = (0..SELF_TEST_LEN)
            .map(|i| (i % 1000) as f32 * 0.5 - 100.0)
            .collect();
        let mut buf = host.clone();
        nccl.all_reduce_mean(&mut buf)?;
        if let Some(i) = (0..SELF_TEST_LEN).find(|&i| buf[i].to_bits() != host[i].to_bits()) {
            bail!(
                "element {i} is {} after the all-reduce, expected {}",
                buf[i],
                host[i]
            );
        }
        let bytes: Vec<u8> = (0..4099u32).map(|i| (i * 7) as u8).collect();
        let mut got = bytes.clone();
        nccl.broadcast(&mut got, 0)?;
        if got != bytes {
            bail!("the broadcast changed the root's bytes");
        }
        nccl.barrier()?;
        Ok(())
    }

    /// Median milliseconds of an all-reduce of `TIMED_LEN` floats, after two warm-up calls (the
    /// first allocates the device buffer).
    fn time_all_reduce(nccl: &mut Nccl) -> anyhow::Result<f64> {
        let mut buf: Vec<f32> = (0..TIMED_LEN).map(|i| (i % 4096) as f32).collect();
        for _ in 0..2 {
            nccl.all_reduce_mean(&mut buf)?;
        }
        let mut times = Vec::with_capacity(TIMED_RUNS);
        for _ in 0..TIMED_RUNS {
            let start = std::time::Instant::now();
            nccl.all_reduce_mean(&mut buf)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        if buf[4095] != 4095.0 {
            bail!(
                "the timed all-reduce changed the values (element 4095 is {})",
                buf[4095]
            );
        }
        Ok(times[TIMED_RUNS / 2])
    }

    /// A matmul (cuBLAS) followed by an element-wise op (candle's own kernels, compiled for
    /// `CUDA_COMPUTE_CAP`: a GPU of another architecture fails here) against the CPU result.
    fn matmul_vs_cpu(device: &Device) -> anyhow::Result<f32> {
        let (m, k, n) = (64, 96, 48);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 31) as f32 - 15.0) / 16.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 29) as f32 - 14.0) / 16.0)
            .collect();
        let run = |dev: &Device| -> candle_core::Result<Vec<f32>> {
            let a = Tensor::from_slice(&a, (m, k), dev)?;
            let b = Tensor::from_slice(&b, (k, n), dev)?;
            a.matmul(&b)?
                .affine(0.1, 0.25)?
                .tanh()?
                .flatten_all()?
                .to_vec1()
        };
        let want = run(&Device::Cpu)?;
        let got = run(device)?;
        let scale = want.iter().fold(1e-6f32, |m, w| m.max(w.abs()));
        let diff = want
            .iter()
            .zip(&got)
            .map(|(w, g)| (w - g).abs() / scale)
            .fold(0f32, f32::max);
        // candle keeps cuBLAS in full f32 (no TF32) unless asked: the results agree to summation
        // order, about 1e-6; a broken kernel is off by far more.
        if diff.is_nan() || diff > 1e-4 {
            bail!("the device's result differs from the CPU's by {diff:e} (relative)");
        }
        Ok(diff)
    }

    /// NCCL encodes its version as major*10000 + minor*100 + patch since 2.9.
    fn nccl_version(v: i32) -> String {
        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
    }

    fn nccl_error(e: nccl::result::NcclError) -> anyhow::Error {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { std::ffi::CStr::from_ptr(nccl::sys::ncclGetErrorString(e.0)) };
        anyhow!("NCCL error {:?}: {}", e.0, text.to_string_lossy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_for_sm_90a_run_on_hopper_only() {
        assert!(kernels_run_on(90, 90));
        assert!(!kernels_run_on(90, 80));
        assert!(!kernels_run_on(90, 100));
        assert!(kernels_run_on(80, 89));
        assert!(!kernels_run_on(86, 80));
        assert_eq!(arch_name(90), "sm_90a");
        assert_eq!(arch_name(89), "sm_89");
        assert!(kernels_run_on(121, 121) && !kernels_run_on(121, 130));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_check_says_the_build_has_no_cuda() {
        let err = gpu_check(0).unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
        assert!(err.contains("scripts/cuda/build.sh"), "{err}");
    }
}
