//! What `/proc` says about a process: its memory and the CPU time it used.

/// A memory figure of process `pid` from `/proc/PID/status`, in KiB: `VmRSS` (resident now),
/// `VmHWM` (its peak).
pub fn memory_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix(" kB")?.parse().ok())
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    memory_kib(pid, "VmRSS")
}

/// CPU seconds used so far by process `pid` (user + system).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the `)`.
    (ticks(11) + ticks(12)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let rss = rss_kib(pid).unwrap();
        assert!(rss > 0);
        assert!(memory_kib(pid, "VmHWM").unwrap() >= rss);
        assert_eq!(memory_kib(pid, "NoSuchKey"), None);
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
