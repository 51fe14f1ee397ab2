//! GPU discovery. NVML (`libnvidia-ml.so`) is loaded at run time, so the worker runs on
//! machines without NVIDIA drivers: it then offers no GPU and says so once. Only the GPUs the
//! config pins (`gpus = "0,2"`) are ever reported to the coordinator or given to ranks.

use loractl_proto::domain::GpuInfo;
use loractl_spec::Gpus;

use crate::error::{Error, Result};

/// What NVML reports, or why there is nothing.
pub fn probe_nvml() -> std::result::Result<Vec<GpuInfo>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        gpus.push(GpuInfo {
            index,
            uuid: device.uuid().map_err(|e| e.to_string())?,
            name: device.name().map_err(|e| e.to_string())?,
            memory_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
        });
    }
    Ok(gpus)
}

/// What NVML says of one GPU now; `None` where it cannot tell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub memory_used_bytes: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    /// 0 to 1.
    pub utilization: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
}

/// Samples the pinned GPUs through one NVML handle, opened once; samples nothing without NVML
/// or with simulated GPUs.
#[derive(Default)]
pub struct Sampler {
    nvml: Option<nvml_wrapper::Nvml>,
}

impl Sampler {
    /// A sampler for `gpus` (none for simulated GPUs or when NVML cannot be loaded).
    pub fn open(gpus: &[GpuInfo]) -> Self {
        let real = !gpus.is_empty() && gpus.iter().all(|g| !g.uuid.starts_with("SIMULATED-"));
        Self {
            nvml: real.then(|| nvml_wrapper::Nvml::init().ok()).flatten(),
        }
    }

    /// The GPU of NVML index `index` now.
    pub fn sample(&self, index: u32) -> Option<Sample> {
        use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
        let device = self.nvml.as_ref()?.device_by_index(index).ok()?;
        let memory = device.memory_info().ok();
        Some(Sample {
            memory_used_bytes: memory.as_ref().map(|m| m.used as f64),
            memory_total_bytes: memory.as_ref().map(|m| m.total as f64),
            utilization: device
                .utilization_rates()
                .ok()
                .map(|u| f64::from(u.gpu) / 100.0),
            temperature_celsius: device
                .temperature(TemperatureSensor::Gpu)
                .ok()
                .map(f64::from),
            power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
        })
    }
}

/// Fake GPUs for placement tests; nothing can run on them.
pub fn simulated(count: u32) -> Vec<GpuInfo> {
    (0..count)
        .map(|index| GpuInfo {
            index,
            uuid: format!("SIMULATED-{index}"),
            name: "simulated GPU".to_owned(),
            memory_bytes: 0,
        })
        .collect()
}

/// The GPUs of `found` that `selection` pins. Asking for a GPU the machine does not have is an
/// error (a typo must not silently leave a GPU unused or run on the wrong one).
pub fn select(found: Vec<GpuInfo>, selection: &Gpus) -> Result<Vec<GpuInfo>> {
    match selection {
        Gpus::Cpu => Ok(Vec::new()),
        Gpus::All => Ok(found),
        Gpus::Ids(ids) => {
            let available = if found.is_empty() {
                "no GPU".to_owned()
            } else {
                let list: Vec<String> = found.iter().map(|g| g.index.to_string()).collect();
                format!("GPUs {}", list.join(","))
            };
            ids.iter()
                .map(|id| {
                    found
                        .iter()
                        .find(|g| g.index == *id)
                        .cloned()
                        .ok_or_else(|| Error::NoSuchGpu {
                            index: *id,
                            available: available.clone(),
                        })
                })
                .collect()
        }
    }
}

/// Discovers and pins GPUs as configured; without NVML the worker offers CPU only.
pub fn discover(selection: &Gpus, simulated_count: u32) -> Result<Vec<GpuInfo>> {
    if matches!(selection, Gpus::Cpu) {
        tracing::info!("gpus = \"cpu\": running as a CPU worker");
        return Ok(Vec::new());
    }
    let found = if simulated_count > 0 {
        tracing::warn!(
            count = simulated_count,
            "offering simulated GPUs (placement tests only)"
        );
        simulated(simulated_count)
    } else {
        match probe_nvml() {
            Ok(found) => found,
            Err(why) => {
                tracing::info!(%why, "no NVIDIA GPU usable (NVML not loadable): running as a CPU worker");
                return match selection {
                    Gpus::Ids(_) => select(Vec::new(), selection),
                    _ => Ok(Vec::new()),
                };
            }
        }
    };
    let pinned = select(found, selection)?;
    for gpu in &pinned {
        tracing::info!(index = gpu.index, name = %gpu.name, uuid = %gpu.uuid, memory = gpu.memory_bytes, "GPU pinned");
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_pins_only_the_listed_gpus() {
        let found = simulated(4);
        assert_eq!(select(found.clone(), &Gpus::All).unwrap().len(), 4);
        assert!(select(found.clone(), &Gpus::Cpu).unwrap().is_empty());
        let pinned = select(found.clone(), &Gpus::Ids(vec![2, 0])).unwrap();
        let indices: Vec<u32> = pinned.iter().map(|g| g.index).collect();
        assert_eq!(indices, [2, 0]);
        let err = select(found, &Gpus::Ids(vec![7])).unwrap_err();
        assert!(
            err.to_string()
                .contains("GPU 7 but this machine has GPUs 0,1,2,3"),
            "{err}"
        );
        let err = select(Vec::new(), &Gpus::Ids(vec![0])).unwrap_err();
        assert!(err.to_string().contains("has no GPU"), "{err}");
    }

    #[test]
    fn a_machine_without_nvml_is_a_cpu_worker() {
        // CI machines have no NVIDIA driver: discovery must not fail or panic there.
        match probe_nvml() {
            Ok(gpus) => assert!(gpus.iter().all(|g| !g.uuid.is_empty())),
            Err(why) => {
                assert!(!why.is_empty());
                assert!(discover(&Gpus::All, 0).unwrap().is_empty());
            }
        }
        assert_eq!(discover(&Gpus::All, 2).unwrap().len(), 2);
    }
}
