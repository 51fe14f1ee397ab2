//! `loractl gpu-check`: is this machine's GPU usable by this binary? Reports the NCCL version,
//! opens the device, runs a one-rank NCCL all-reduce and a matmul compared with the CPU. It is
//! what a device script runs first on a GPU machine; without a device it fails with the reason.

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

    /// Elements of the all-reduce test buffer: more than one NCCL chunk would be needed for a
    /// bandwidth test, this only proves the library and the device talk.
    const ALL_REDUCE_LEN: usize = 1 << 16;

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

        all_reduce_self_test(&stream).context("NCCL all-reduce self-test failed")?;
        println!("nccl all-reduce (1 rank, {ALL_REDUCE_LEN} f32): ok");

        let diff = matmul_vs_cpu(&device).context("matmul on the device failed")?;
        println!("matmul vs cpu: max relative difference {diff:.2e}: ok");
        println!("gpu-check: ok");
        Ok(ExitCode::SUCCESS)
    }

    /// A communicator of one rank over candle's stream: the all-reduce sum is the input itself.
    fn all_reduce_self_test(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> anyhow::Result<()> {
        stream.context().bind_to_thread()?;
        let id = nccl::Id::new().map_err(nccl_error)?;
        let comm = nccl::Comm::from_rank(stream.clone(), 0, 1, id).map_err(nccl_error)?;
        let host: Vec<f32> = (0..ALL_REDUCE_LEN)
            .map(|i| (i % 1000) as f32 * 0.5)
            .collect();
        let src = stream.clone_htod(&host)?;
        let mut dst = stream.alloc_zeros::<f32>(ALL_REDUCE_LEN)?;
        comm.all_reduce(&src, &mut dst, &nccl::ReduceOp::Sum)
            .map_err(nccl_error)?;
        let out = stream.clone_dtoh(&dst)?;
        stream.synchronize()?;
        if let Some(i) = (0..ALL_REDUCE_LEN).find(|&i| out[i] != host[i]) {
            bail!(
                "element {i} is {} after the all-reduce, expected {}",
                out[i],
                host[i]
            );
        }
        Ok(())
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
