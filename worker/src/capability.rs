//! What this machine offers, as reported when joining and in `Info`.

/// Bytes of memory available for new allocations, from `/proc/meminfo`'s
/// `MemAvailable` (0 where that file does not exist, e.g. macOS).
pub fn free_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(mem_available).unwrap_or(0)
}

/// `MemAvailable` in bytes, parsed from the text of `/proc/meminfo`.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut parts = line.split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_available() {
        let text = "MemTotal:       16318412 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(mem_available(text), Some(12_000_000 * 1024));
        assert_eq!(mem_available("MemFree: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: x kB\n"), None);
    }
}
