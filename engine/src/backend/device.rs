//! Where a stage runs: the project's own CPU kernels, or candle on a CPU,
//! CUDA or Metal device.
//!
//! Parsing checks what the build and platform can know up front (a GPU the
//! build lacks, Metal off macOS), so a misconfigured node fails at start;
//! opening the device checks what only the machine knows (does `cuda:7`
//! exist).

use std::fmt;

/// A compute device a stage can run on, with the backend that drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU with the native kernels (the default).
    Cpu,
    /// The host CPU through candle: the GPU code path, runnable anywhere,
    /// which is how tests without a GPU exercise it.
    CandleCpu,
    /// An NVIDIA GPU, by ordinal, through candle's CUDA kernels.
    Cuda(usize),
    /// The Apple GPU through candle's Metal kernels.
    Metal,
}

/// Why a device name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not a device this program knows.
    #[error("unknown device `{0}` (use cpu, candle-cpu, cuda, cuda:N or metal)")]
    Unknown(String),
    /// The device needs a cargo feature this binary was built without.
    #[error("device `{device}` needs a build with the `{feature}` feature ({hint})")]
    NotBuilt {
        /// The device asked for.
        device: String,
        /// The cargo feature that enables it.
        feature: &'static str,
        /// How to get such a build.
        hint: &'static str,
    },
    /// Metal asked for on a platform that has none.
    #[error("device `metal` needs macOS (Apple GPUs only); this is {os}")]
    MetalNeedsMacos {
        /// The platform this binary runs on.
        os: &'static str,
    },
    /// The device is well named and built in, but this machine cannot open
    /// it (no such GPU ordinal, no driver).
    #[error("device `{device}` is not available on this machine: {reason}")]
    Unavailable {
        /// The device asked for.
        device: String,
        /// What the driver said.
        reason: String,
    },
    /// A list of devices names none.
    #[error("the device list is empty")]
    EmptyList,
    /// A list of devices, one per stage, of the wrong length.
    #[error("{devices} devices for {stages} stages: name one device per stage")]
    PerStage {
        /// Devices named.
        devices: usize,
        /// Stages to place.
        stages: usize,
    },
}

/// Why candle cannot compute on this CPU, if it cannot. candle-core's aarch64
/// quantized kernels issue the Armv8.2 dot-product instruction (`sdot`)
/// without asking the CPU first, so on an older core (a Cortex-A53, a
/// Raspberry Pi 3) a stage would die of SIGILL at its first quantized matmul:
/// refusing the device when it is opened turns that into a clear error.
fn candle_cpu_support() -> Result<(), &'static str> {
    #[cfg(target_arch = "aarch64")]
    if !std::arch::is_aarch64_feature_detected!("dotprod") {
        return Err("candle's quantized CPU kernels need the Armv8.2 dot-product instructions (dotprod), \
                    which this CPU lacks; use `cpu` (the native kernels run on it)");
    }
    Ok(())
}

impl Device {
    /// Whether this device runs the candle backend.
    pub fn is_candle(self) -> bool {
        !matches!(self, Self::Cpu)
    }

    /// Whether stages on this device promise batch-invariant, bit-exact
    /// numerics (the native kernels do; candle's are measured instead).
    pub fn is_bit_exact(self) -> bool {
        matches!(self, Self::Cpu)
    }

    /// Opens candle's handle on this device. `None` for the native CPU,
    /// which needs none.
    pub fn open_candle(self) -> Result<Option<candle_core::Device>, DeviceError> {
        let unavailable =
            |e: candle_core::Error| DeviceError::Unavailable { device: self.to_string(), reason: e.to_string() };
        match self {
            Self::Cpu => Ok(None),
            Self::CandleCpu => match candle_cpu_support() {
                Ok(()) => Ok(Some(candle_core::Device::Cpu)),
                Err(reason) => Err(DeviceError::Unavailable { device: self.to_string(), reason: reason.to_string() }),
            },
            Self::Cuda(n) => candle_core::Device::new_cuda(n).map(Some).map_err(unavailable),
            Self::Metal => candle_core::Device::new_metal(0).map(Some).map_err(unavailable),
        }
    }

    /// Parses a comma-separated list (`cpu,candle-cpu`), one device per stage or worker.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, DeviceError> {
        let list: Vec<Self> =
            s.split(',').filter(|p| !p.trim().is_empty()).map(str::parse).collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err(DeviceError::EmptyList);
        }
        Ok(list)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::CandleCpu => f.write_str("candle-cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

/// How to get a CUDA build, named in the error a CPU-only build gives.
const CUDA_HINT: &str = "build one with scripts/build-cuda";

impl std::str::FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let s = s.trim();
        let device = match s {
            "cpu" => Self::Cpu,
            "candle-cpu" => Self::CandleCpu,
            "cuda" => Self::Cuda(0),
            "metal" => Self::Metal,
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    Self::Cuda(n.parse().map_err(|_| DeviceError::Unknown(s.to_string()))?)
                }
                _ => return Err(DeviceError::Unknown(s.to_string())),
            },
        };
        match device {
            Self::Cuda(_) if !cfg!(feature = "cuda") => {
                Err(DeviceError::NotBuilt { device: s.to_string(), feature: "cuda", hint: CUDA_HINT })
            }
            Self::Metal if !cfg!(target_os = "macos") => Err(DeviceError::MetalNeedsMacos { os: std::env::consts::OS }),
            _ => Ok(device),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn names_parse_to_devices_and_print_back() {
        for (name, device) in [("cpu", Device::Cpu), ("candle-cpu", Device::CandleCpu), (" cpu ", Device::Cpu)] {
            let parsed: Device = name.parse().expect(name);
            assert_eq!(parsed, device);
            assert_eq!(parsed.to_string(), name.trim());
        }
        assert_eq!(Device::parse_list("cpu, candle-cpu"), Ok(vec![Device::Cpu, Device::CandleCpu]));
        assert_eq!(Device::parse_list(" , "), Err(DeviceError::EmptyList));
    }

    #[test]
    fn bad_names_are_refused_by_name() {
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", "cuda:99999999999999999999999", "CPU", ""] {
            assert_eq!(bad.parse::<Device>(), Err(DeviceError::Unknown(bad.trim().to_string())), "{bad}");
        }
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_without_the_feature_names_the_feature_and_the_build_script() {
        for name in ["cuda", "cuda:0", "cuda:7"] {
            let err = name.parse::<Device>().expect_err(name).to_string();
            assert!(err.contains("`cuda` feature") && err.contains("scripts/build-cuda"), "{err}");
        }
    }

    #[test]
    #[cfg(not(target_os = "macos"))]
    fn metal_off_macos_says_it_needs_macos() {
        let err = "metal".parse::<Device>().expect_err("metal").to_string();
        assert!(err.contains("needs macOS"), "{err}");
    }

    #[test]
    fn the_cpu_devices_open() {
        assert!(Device::Cpu.open_candle().expect("cpu").is_none());
        if candle_cpu_opens() {
            assert!(matches!(Device::CandleCpu.open_candle(), Ok(Some(candle_core::Device::Cpu))));
        }
    }

    /// Whether `candle-cpu` opens on this CPU. Where it must not (an aarch64
    /// core without dotprod: `scripts/test-neon` runs the tests on one and
    /// sets `POTLUCK_EXPECT_DOTPROD=0`), the refusal is checked instead, so
    /// the candle tests that call this test the refusal there, never skip.
    pub(crate) fn candle_cpu_opens() -> bool {
        let opened = Device::CandleCpu.open_candle();
        let expected = std::env::var("POTLUCK_EXPECT_DOTPROD").ok().map(|v| v == "1");
        match (&opened, cfg!(target_arch = "aarch64")) {
            (Ok(_), aarch64) => assert!(!aarch64 || expected != Some(false), "candle-cpu opened without dotprod"),
            (Err(e), true) => {
                assert!(e.to_string().contains("dotprod"), "{e}");
                assert_ne!(expected, Some(true), "candle-cpu refused on a CPU with dotprod: {e}");
            }
            (Err(e), false) => panic!("candle-cpu does not open: {e}"),
        }
        opened.is_ok()
    }
}
