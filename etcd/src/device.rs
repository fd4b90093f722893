//! A worker's compute device and its memory, as it registers them (in its
//! etcd record and its `Join`). The planner budgets a GPU stage by the GPU's
//! memory, not the host's RAM, so the record says which kind of memory the
//! stage's weights and KV cache will live in.

use serde::{Deserialize, Serialize};

/// Where a stage's weights and KV cache live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Host RAM: the native kernels and candle's CPU device. Records written
    /// before devices were reported mean this.
    #[default]
    Cpu,
    /// An NVIDIA GPU's own memory.
    Cuda,
    /// An Apple GPU (unified memory, but bounded by Metal's working-set limit).
    Metal,
}

impl DeviceKind {
    /// The name on the wire and in `/v1/cluster`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }

    /// Whether the stage's memory is the device's rather than the host's.
    pub fn is_gpu(self) -> bool {
        !matches!(self, Self::Cpu)
    }
}

/// A device kind nobody knows; refused by name rather than guessed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device kind `{0}` (expected cpu, cuda or metal)")]
pub struct UnknownDeviceKind(pub String);

impl std::str::FromStr for DeviceKind {
    type Err = UnknownDeviceKind;

    fn from_str(s: &str) -> Result<Self, UnknownDeviceKind> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            other => Err(UnknownDeviceKind(other.to_string())),
        }
    }
}

/// A worker's device and its memory at registration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Which memory the figures below describe.
    pub kind: DeviceKind,
    /// What an operator would call it (`NVIDIA H100 80GB HBM3`, the CPU model).
    #[serde(default)]
    pub name: String,
    /// The device's memory in bytes (host RAM for a CPU).
    #[serde(default)]
    pub total_bytes: u64,
    /// Bytes free for weights and KV cache when the worker registered.
    #[serde(default)]
    pub free_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_ones_are_named() {
        for kind in [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Metal] {
            assert_eq!(kind.name().parse::<DeviceKind>(), Ok(kind));
        }
        let err = "tpu".parse::<DeviceKind>().expect_err("unknown");
        assert!(err.to_string().contains("`tpu`"), "{err}");
        let json = r#"{"kind":"cuda","name":"H100","total_bytes":8,"free_bytes":6}"#;
        let d: DeviceInfo = serde_json::from_str(json).expect("parses");
        assert_eq!((d.kind, d.total_bytes, d.free_bytes), (DeviceKind::Cuda, 8, 6));
        assert!(serde_json::from_str::<DeviceInfo>(r#"{"kind":"tpu"}"#).is_err());
    }
}
