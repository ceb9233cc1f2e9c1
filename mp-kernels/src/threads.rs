//! The thread pool every CPU kernel runs on.
//!
//! The thread count defaults to all cores and is set by one knob, the `MP_NUM_THREADS`
//! environment variable, read once. Kernels split work statically (a fixed partition for a given
//! thread count, a fixed reduction order within each part), so results are bit-identical from run
//! to run for a fixed thread count.

use std::sync::OnceLock;

/// The number of threads CPU kernels use: `MP_NUM_THREADS` if set to a positive integer, else the
/// number of available cores.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// The shared pool (built on first use).
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("MP_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("mp-kernels-{i}"))
            .build()
            .expect("building a thread pool with a positive thread count")
    })
}

/// Splits `0..n` into `parts` contiguous ranges whose starts are multiples of `align` (except
/// when `n` is smaller), the same for the same arguments on every run.
pub fn static_ranges(n: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let align = align.max(1);
    let blocks = n.div_ceil(align);
    let per = blocks / parts;
    let extra = blocks % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start_block = 0;
    for p in 0..parts {
        let nb = per + usize::from(p < extra);
        let start = (start_block * align).min(n);
        let end = ((start_block + nb) * align).min(n);
        if end > start {
            out.push(start..end);
        }
        start_block += nb;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ranges_cover_exactly_once() {
        for n in [0, 1, 7, 33, 257, 4096] {
            for parts in 1..5 {
                for align in [1, 16, 48] {
                    let r = static_ranges(n, parts, align);
                    let mut next = 0;
                    for range in &r {
                        assert_eq!(range.start, next);
                        assert!(range.start % align == 0);
                        next = range.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
    }
}
