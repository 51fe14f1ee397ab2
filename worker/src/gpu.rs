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
