//! What this machine offers, as reported when joining, in the etcd record
//! and in `Info`: the compute device and the memory a stage may fill.

pub use potluck_etcd::{DeviceInfo, DeviceKind};

use potluck_engine::Device;

use crate::gpu_memory::{cuda_memory, metal_memory, GpuMemoryError, NVIDIA_SMI};

/// Why a GPU's figures cannot be reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceInfoError {
    /// [`gpu_device`] was handed the host's kind.
    #[error("`{name}` is reported as a GPU but its kind is cpu")]
    NotAGpu {
        /// The device's name.
        name: String,
    },
    /// More memory free than there is.
    #[error("`{name}` reports {free_bytes} bytes free of {total_bytes}")]
    FreeExceedsTotal {
        /// The device's name.
        name: String,
        /// Its total memory.
        total_bytes: u64,
        /// Its free memory.
        free_bytes: u64,
    },
    /// The device's memory could not be read (or the GPU does not exist).
    #[error(transparent)]
    Memory(#[from] GpuMemoryError),
}

/// Where a worker finds what it asks the machine about its GPU: the
/// memory tool's path and `CUDA_VISIBLE_DEVICES`, so a test can hand it a
/// fake tool and a chosen environment.
#[derive(Debug, Clone)]
pub struct GpuProbeEnv {
    /// The `nvidia-smi` to run (a bare name is looked up on `PATH`).
    pub nvidia_smi: std::ffi::OsString,
    /// `CUDA_VISIBLE_DEVICES`, if set.
    pub cuda_visible_devices: Option<String>,
}

impl GpuProbeEnv {
    /// The process's own environment.
    pub fn from_process() -> Self {
        Self { nvidia_smi: NVIDIA_SMI.into(), cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok() }
    }
}

/// The device a worker registers with: the host for CPU devices (native or
/// candle's); a GPU with its own memory (CUDA, read with `nvidia-smi`) or
/// Metal's share of unified memory (`gpu_memory`). A GPU whose memory
/// cannot be read, or that does not exist (`cuda:7` on a one-GPU machine),
/// is an error: the planner could never place layers on it, so the worker
/// refuses to start and says why.
pub fn device_info(device: Device, env: &GpuProbeEnv) -> Result<DeviceInfo, DeviceInfoError> {
    let (kind, memory) = match device {
        Device::Cpu | Device::CandleCpu => return Ok(host_device()),
        Device::Cuda(n) => (DeviceKind::Cuda, cuda_memory(&env.nvidia_smi, n, env.cuda_visible_devices.as_deref())?),
        Device::Metal => (DeviceKind::Metal, metal_memory()?),
    };
    gpu_device(kind, memory.name, memory.total_bytes, memory.free_bytes)
}

/// A GPU's figures as its backend measured them, checked for sense.
pub fn gpu_device(
    kind: DeviceKind,
    name: impl Into<String>,
    total_bytes: u64,
    free_bytes: u64,
) -> Result<DeviceInfo, DeviceInfoError> {
    let name = name.into();
    if !kind.is_gpu() {
        return Err(DeviceInfoError::NotAGpu { name });
    }
    if free_bytes > total_bytes {
        return Err(DeviceInfoError::FreeExceedsTotal { name, total_bytes, free_bytes });
    }
    Ok(DeviceInfo { kind, name, total_bytes, free_bytes })
}

/// The host as a device: its CPU model and its RAM (zeros where
/// `/proc/meminfo` does not exist, e.g. macOS).
pub fn host_device() -> DeviceInfo {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    DeviceInfo {
        kind: DeviceKind::Cpu,
        name: cpu_model(&cpuinfo).unwrap_or("cpu").to_string(),
        total_bytes: meminfo_bytes(&meminfo, "MemTotal:").unwrap_or(0),
        free_bytes: meminfo_bytes(&meminfo, "MemAvailable:").unwrap_or(0),
    }
}

/// Bytes of memory available for new allocations, from `/proc/meminfo`'s
/// `MemAvailable` (0 where that file does not exist, e.g. macOS).
pub fn free_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(mem_available).unwrap_or(0)
}

/// `MemAvailable` in bytes, parsed from the text of `/proc/meminfo`.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo_bytes(meminfo, "MemAvailable:")
}

/// One `/proc/meminfo` line's value in bytes.
fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix(key))?;
    let mut parts = line.split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// The first `model name` of `/proc/cpuinfo` (x86-64; Arm kernels may not say).
fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.trim_start().strip_prefix(':'))
        .map(str::trim)
        .filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_available() {
        let text = "MemTotal:       16318412 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(mem_available(text), Some(12_000_000 * 1024));
        assert_eq!(meminfo_bytes(text, "MemTotal:"), Some(16_318_412 * 1024));
        assert_eq!(mem_available("MemFree: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: x kB\n"), None);
    }

    #[test]
    fn parses_the_cpu_model() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\nflags\t: avx\n";
        assert_eq!(cpu_model(text), Some("AMD EPYC 9654 96-Core Processor"));
        assert_eq!(cpu_model("processor\t: 0\n"), None);
        assert_eq!(cpu_model("model name\t:   \n"), None);
    }

    #[test]
    fn a_cpu_device_reports_host_memory() {
        let d = device_info(Device::Cpu, &GpuProbeEnv::from_process()).expect("host");
        assert_eq!(d.kind, DeviceKind::Cpu);
        assert!(d.free_bytes <= d.total_bytes, "{d:?}");
    }

    #[test]
    fn gpu_figures_are_checked() {
        let d = gpu_device(DeviceKind::Cuda, "H100", 80 << 30, 79 << 30).expect("sane");
        assert_eq!((d.kind, d.name.as_str(), d.free_bytes), (DeviceKind::Cuda, "H100", 79 << 30));
        assert!(matches!(gpu_device(DeviceKind::Cpu, "x", 1, 1), Err(DeviceInfoError::NotAGpu { .. })));
        assert!(matches!(
            gpu_device(DeviceKind::Metal, "M2", 1, 2),
            Err(DeviceInfoError::FreeExceedsTotal { total_bytes: 1, free_bytes: 2, .. })
        ));
    }
}
