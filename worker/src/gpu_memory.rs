//! A GPU's memory as the machine reports it, so the planner can size a GPU
//! stage by device memory rather than host RAM.
//!
//! CUDA: `nvidia-smi` (installed with every NVIDIA driver, so a worker needs
//! no CUDA library linked to ask) lists each GPU's index, name, total and
//! free memory. Its indices are in PCI bus order; a CUDA ordinal names the
//! same GPU when `CUDA_DEVICE_ORDER=PCI_BUS_ID` (or with one GPU), and
//! through `CUDA_VISIBLE_DEVICES` when that lists indices.
//!
//! Metal: Apple GPUs share the host's RAM, and Metal caps what one process
//! may keep resident (its recommended working set) at about three quarters
//! of RAM on Apple silicon, so a Metal stage is budgeted
//! [`METAL_SHARE_NUM`]/[`METAL_SHARE_DEN`] of `hw.memsize`.

use std::ffi::OsStr;
use std::process::Command;

/// The tool asked for CUDA memory figures, found through `PATH`.
pub const NVIDIA_SMI: &str = "nvidia-smi";

/// The query `nvidia-smi` answers, one CSV line per GPU, memory in MiB.
pub const NVIDIA_SMI_ARGS: [&str; 2] =
    ["--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"];

/// Share of host RAM a Metal stage may fill: numerator.
pub const METAL_SHARE_NUM: u64 = 3;
/// Share of host RAM a Metal stage may fill: denominator.
pub const METAL_SHARE_DEN: u64 = 4;

/// One GPU's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMemory {
    /// The driver's index for it.
    pub index: usize,
    /// Its marketing name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Device memory in bytes.
    pub total_bytes: u64,
    /// Bytes free now.
    pub free_bytes: u64,
}

/// Why a GPU's memory could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuMemoryError {
    /// The tool could not be started (not installed, not on `PATH`).
    #[error("cannot run `{tool}` to read GPU memory ({reason}); is the NVIDIA driver installed and `{tool}` on PATH?")]
    ToolMissing {
        /// The program.
        tool: String,
        /// What the OS said.
        reason: String,
    },
    /// The tool ran and failed.
    #[error("`{tool}` failed ({status}): {stderr}")]
    ToolFailed {
        /// The program.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A line of the tool's output is not what the query asks for.
    #[error("cannot read `{tool}` output line {line:?}: {reason}")]
    BadLine {
        /// The program.
        tool: String,
        /// The line.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The ordinal names a GPU this machine does not have.
    #[error("device `cuda:{ordinal}` does not exist: this machine has {count} NVIDIA GPU(s){visible}")]
    NoSuchGpu {
        /// The CUDA ordinal asked for.
        ordinal: usize,
        /// GPUs visible.
        count: usize,
        /// A note on `CUDA_VISIBLE_DEVICES` when it narrowed the list.
        visible: String,
    },
    /// `CUDA_VISIBLE_DEVICES` names GPUs in a form this lookup cannot map
    /// (UUIDs, MIG instances) to the tool's indices.
    #[error("CUDA_VISIBLE_DEVICES={0:?} does not list GPU indices; cannot tell which GPU's memory to report")]
    UnmappedVisible(String),
    /// `sysctl` did not give the host's RAM (Metal).
    #[error("cannot read the host's RAM for Metal's share: {0}")]
    HostMemory(String),
}

/// Parses `nvidia-smi --query-gpu=index,name,memory.total,memory.free
/// --format=csv,noheader,nounits` output. A name may hold commas, so the
/// index is the first field and the two figures the last two.
pub fn parse_nvidia_smi(text: &str) -> Result<Vec<GpuMemory>, GpuMemoryError> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(parse_line).collect()
}

fn parse_line(line: &str) -> Result<GpuMemory, GpuMemoryError> {
    let bad = |reason: String| GpuMemoryError::BadLine { tool: NVIDIA_SMI.into(), line: line.into(), reason };
    let (index, rest) = line.split_once(',').ok_or_else(|| bad("expected 4 comma-separated fields".into()))?;
    let mut tail = rest.rsplitn(3, ',');
    let (free, total, name) = match (tail.next(), tail.next(), tail.next()) {
        (Some(f), Some(t), Some(n)) => (f.trim(), t.trim(), n.trim()),
        _ => return Err(bad("expected 4 comma-separated fields".into())),
    };
    let index = index.trim().parse().map_err(|_| bad(format!("index `{}` is not a number", index.trim())))?;
    let mib = |what: &str, v: &str| -> Result<u64, GpuMemoryError> {
        let n: u64 = v.parse().map_err(|_| bad(format!("{what} `{v}` is not a number of MiB")))?;
        n.checked_mul(1 << 20).ok_or_else(|| bad(format!("{what} `{v}` MiB overflows")))
    };
    let (total_bytes, free_bytes) = (mib("memory.total", total)?, mib("memory.free", free)?);
    if free_bytes > total_bytes {
        return Err(bad(format!("{free} MiB free of {total}")));
    }
    Ok(GpuMemory { index, name: name.to_string(), total_bytes, free_bytes })
}

/// The tool index that CUDA ordinal `ordinal` names, given
/// `CUDA_VISIBLE_DEVICES` (`visible`) and the GPUs the tool lists.
pub fn pick_gpu(gpus: &[GpuMemory], ordinal: usize, visible: Option<&str>) -> Result<GpuMemory, GpuMemoryError> {
    let listed: Vec<usize> = match visible.map(str::trim) {
        None => gpus.iter().map(|g| g.index).collect(),
        Some(v) => {
            let mut out = Vec::new();
            // CUDA stops at the first entry it cannot use; so do we.
            for part in v.split(',').map(str::trim) {
                match part.parse::<usize>() {
                    Ok(i) if gpus.iter().any(|g| g.index == i) => out.push(i),
                    Ok(_) => break,
                    Err(_) if out.is_empty() && !part.is_empty() => {
                        return Err(GpuMemoryError::UnmappedVisible(v.to_string()))
                    }
                    Err(_) => break,
                }
            }
            out
        }
    };
    let index = listed.get(ordinal).ok_or_else(|| GpuMemoryError::NoSuchGpu {
        ordinal,
        count: listed.len(),
        visible: visible.map_or_else(String::new, |v| format!(" visible (CUDA_VISIBLE_DEVICES={v:?})")),
    })?;
    gpus.iter().find(|g| g.index == *index).cloned().ok_or_else(|| GpuMemoryError::NoSuchGpu {
        ordinal,
        count: listed.len(),
        visible: String::new(),
    })
}

/// Runs `tool` (normally [`NVIDIA_SMI`]) and returns the memory of the GPU
/// that CUDA ordinal `ordinal` names, `visible` being `CUDA_VISIBLE_DEVICES`.
pub fn cuda_memory(tool: &OsStr, ordinal: usize, visible: Option<&str>) -> Result<GpuMemory, GpuMemoryError> {
    let name = tool.to_string_lossy().into_owned();
    let out = Command::new(tool)
        .args(NVIDIA_SMI_ARGS)
        .output()
        .map_err(|e| GpuMemoryError::ToolMissing { tool: name.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // nvidia-smi prints its errors ("couldn't communicate with the driver") on stdout.
        let said = if stderr.is_empty() { stdout } else { stderr };
        return Err(GpuMemoryError::ToolFailed { tool: name, status: out.status.to_string(), stderr: said });
    }
    let text = String::from_utf8(out.stdout).map_err(|_| GpuMemoryError::BadLine {
        tool: name,
        line: String::new(),
        reason: "the output is not UTF-8".into(),
    })?;
    pick_gpu(&parse_nvidia_smi(&text)?, ordinal, visible)
}

/// Metal's share of the host's RAM, from `sysctl -n hw.memsize` output.
pub fn metal_share(memsize: &str) -> Result<u64, GpuMemoryError> {
    let bytes: u64 = memsize
        .trim()
        .parse()
        .map_err(|_| GpuMemoryError::HostMemory(format!("`sysctl -n hw.memsize` said {:?}", memsize.trim())))?;
    Ok(bytes / METAL_SHARE_DEN * METAL_SHARE_NUM)
}

/// The memory a Metal stage may fill on this Mac.
pub fn metal_memory() -> Result<GpuMemory, GpuMemoryError> {
    let out = Command::new("sysctl")
        .args(["-n", "hw.memsize"])
        .output()
        .map_err(|e| GpuMemoryError::HostMemory(format!("cannot run `sysctl`: {e}")))?;
    let total = metal_share(&String::from_utf8_lossy(&out.stdout))?;
    Ok(GpuMemory { index: 0, name: "Apple GPU (unified memory)".into(), total_bytes: total, free_bytes: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_GPUS: &str = "0, NVIDIA H100 80GB HBM3, 81559, 80992\n1, NVIDIA GeForce RTX 4090, 24564, 1000\n";

    fn gpu(index: usize, name: &str, total_mib: u64, free_mib: u64) -> GpuMemory {
        GpuMemory { index, name: name.into(), total_bytes: total_mib << 20, free_bytes: free_mib << 20 }
    }

    #[test]
    fn parses_what_nvidia_smi_prints() {
        let gpus = parse_nvidia_smi(TWO_GPUS).expect("parses");
        assert_eq!(
            gpus,
            vec![gpu(0, "NVIDIA H100 80GB HBM3", 81559, 80992), gpu(1, "NVIDIA GeForce RTX 4090", 24564, 1000)]
        );
        let commas = parse_nvidia_smi("3, Odd, Name, Inc, 10, 5\r\n\n").expect("a name with commas");
        assert_eq!(commas, vec![gpu(3, "Odd, Name, Inc", 10, 5)]);
        assert_eq!(parse_nvidia_smi(""), Ok(vec![]));
    }

    #[test]
    fn bad_output_is_a_clear_error() {
        for (text, says) in [
            ("0, H100, [N/A], 5", "memory.total `[N/A]`"),
            ("0, H100, 10, [Not Supported]", "memory.free `[Not Supported]`"),
            ("x, H100, 10, 5", "index `x`"),
            ("0, H100, 10", "4 comma-separated"),
            ("no commas at all", "4 comma-separated"),
            ("0, H100, 10, 11", "11 MiB free of 10"),
            ("0, H100, 99999999999999999999, 1", "not a number"),
            ("0, H100, 18446744073709551615, 1", "overflows"),
        ] {
            let err = parse_nvidia_smi(text).expect_err(text).to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn an_ordinal_picks_its_gpu_through_cuda_visible_devices() {
        let gpus = parse_nvidia_smi(TWO_GPUS).expect("parses");
        assert_eq!(pick_gpu(&gpus, 1, None).map(|g| g.index), Ok(1));
        assert_eq!(pick_gpu(&gpus, 0, Some("1")).map(|g| g.index), Ok(1));
        assert_eq!(pick_gpu(&gpus, 1, Some("1,0")).map(|g| g.index), Ok(0));
        let err = pick_gpu(&gpus, 7, None).expect_err("cuda:7");
        assert!(matches!(err, GpuMemoryError::NoSuchGpu { ordinal: 7, count: 2, .. }), "{err}");
        assert!(err.to_string().contains("`cuda:7` does not exist: this machine has 2"), "{err}");
        // CUDA ignores everything from the first index it cannot use.
        let err = pick_gpu(&gpus, 1, Some("0,5,1")).expect_err("stops at 5");
        assert!(err.to_string().contains("CUDA_VISIBLE_DEVICES"), "{err}");
        assert!(matches!(pick_gpu(&gpus, 0, Some("GPU-8a5c")), Err(GpuMemoryError::UnmappedVisible(_))));
        assert!(matches!(pick_gpu(&gpus, 0, Some("")), Err(GpuMemoryError::NoSuchGpu { count: 0, .. })));
    }

    #[test]
    fn metal_gets_three_quarters_of_ram() {
        assert_eq!(metal_share("17179869184\n"), Ok(12 << 30));
        assert!(matches!(metal_share("hw.memsize: lots"), Err(GpuMemoryError::HostMemory(_))));
    }

    #[cfg(unix)]
    #[test]
    fn asks_the_tool_and_reports_when_it_is_missing_or_fails() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let script = |name: &str, body: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            path
        };
        let good = script(
            "good",
            &format!(
                "[ \"$1 $2\" = '{}' ] || exit 9\nprintf '{}'",
                NVIDIA_SMI_ARGS.join(" "),
                TWO_GPUS.replace('\n', "\\n")
            ),
        );
        assert_eq!(cuda_memory(good.as_os_str(), 1, None), Ok(gpu(1, "NVIDIA GeForce RTX 4090", 24564, 1000)));
        let err = cuda_memory(good.as_os_str(), 7, None).expect_err("cuda:7");
        assert!(matches!(err, GpuMemoryError::NoSuchGpu { ordinal: 7, count: 2, .. }), "{err}");

        let failing = script(
            "failing",
            "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\"; exit 9",
        );
        let err = cuda_memory(failing.as_os_str(), 0, None).expect_err("fails").to_string();
        assert!(err.contains("couldn't communicate") && err.contains("9"), "{err}");

        let garbage = script("garbage", "echo 'Segmentation fault'");
        assert!(matches!(cuda_memory(garbage.as_os_str(), 0, None), Err(GpuMemoryError::BadLine { .. })));

        let missing = dir.path().join("not-there");
        let err = cuda_memory(missing.as_os_str(), 0, None).expect_err("missing").to_string();
        assert!(err.contains("cannot run") && err.contains("NVIDIA driver"), "{err}");
    }
}
