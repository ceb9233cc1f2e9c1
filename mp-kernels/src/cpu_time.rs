//! CPU time of this process, for benchmarks and the calibration on a shared machine.

/// CPU time of all this process's threads, in seconds (Linux: `/proc/self/task/*/schedstat`);
/// `None` elsewhere. Compared with wall time it shows whether the threads got their cores.
pub fn process_cpu_secs() -> Option<f64> {
    let mut total_ns = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(entry.ok()?.path().join("schedstat")).ok()?;
        total_ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total_ns as f64 * 1e-9)
}
