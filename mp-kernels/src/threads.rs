//! The thread pool every CPU kernel runs on.
//!
//! The thread count defaults to all cores and is set by one knob, the `MP_NUM_THREADS`
//! environment variable, read once. Kernels split work statically (a fixed partition for a given
//! thread count, a fixed reduction order within each part), so results are bit-identical from run
//! to run for a fixed thread count.

use std::cell::Cell;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The knob that sets the thread count.
pub const KNOB: &str = "MP_NUM_THREADS";

/// The most threads the pool takes: four per core (more only adds contention, and a huge value
/// would spawn thousands of threads).
fn cap() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The thread count `MP_NUM_THREADS` asks for (`None`: unset, use every core), capped at four per
/// core with a message on stderr.
///
/// # Errors
/// A value that is not a positive whole number, naming the knob and the value.
fn requested(value: Option<&str>, cap: usize) -> std::result::Result<Option<usize>, String> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!(
            "{KNOB}={v:?} is not a positive whole number of threads"
        )),
        Ok(n) if n > cap => {
            eprintln!("mp: {KNOB}={n} is more than 4 threads per core; using {cap}");
            Ok(Some(cap))
        }
        Ok(n) => Ok(Some(n)),
    }
}

/// The number of threads CPU kernels use: `MP_NUM_THREADS` if set (at most four per core), else
/// the number of available cores; 1 inside [`serial`].
pub fn num_threads() -> usize {
    if SERIAL.with(Cell::get) {
        1
    } else {
        pool().current_num_threads()
    }
}

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every kernel it calls on this thread alone ([`num_threads`] is 1 inside): what
/// a kernel that splits its work over the pool itself runs each part with.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// The shared pool, built on first use.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `MP_NUM_THREADS` when its value is not a positive whole
/// number, or when the threads cannot be started (a process thread limit, say).
pub fn try_pool() -> Result<&'static rayon::ThreadPool> {
    static POOL: OnceLock<std::result::Result<rayon::ThreadPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = requested(std::env::var(KNOB).ok().as_deref(), cap())?
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("mp-kernels-{i}"))
            .build()
            .map_err(|e| format!("starting {n} kernel threads ({KNOB}) failed: {e}"))
    })
    .as_ref()
    .map_err(|what| Error::InvalidArgument {
        op: KNOB,
        what: what.clone(),
    })
}

/// The shared pool. Every [`crate::Cpu`] checks [`try_pool`] when it is made, so kernels reach
/// this only after the pool was built; should it have failed anyway, they run on a one-thread
/// pool.
pub fn pool() -> &'static rayon::ThreadPool {
    static FALLBACK: OnceLock<rayon::ThreadPool> = OnceLock::new();
    try_pool().unwrap_or_else(|_| {
        FALLBACK.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap_or_else(|e| panic!("mp-kernels: no thread can be started: {e}"))
        })
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
    fn the_thread_knob_is_validated_and_capped() {
        assert_eq!(requested(None, 8), Ok(None));
        assert_eq!(requested(Some(" "), 8), Ok(None));
        assert_eq!(requested(Some("3"), 8), Ok(Some(3)));
        // MP_NUM_THREADS=100000 used to start 100000 threads and hang.
        assert_eq!(requested(Some("100000"), 8), Ok(Some(8)));
        for bad in ["abc", "-1", "0", "1.5", "1e3"] {
            let e = requested(Some(bad), 8).unwrap_err();
            assert!(e.contains("MP_NUM_THREADS") && e.contains(bad), "{e}");
        }
    }

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
