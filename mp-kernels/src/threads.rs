//! The thread pool every CPU kernel runs on.
//!
//! The thread count defaults to all cores and is set by one knob, the `MP_NUM_THREADS`
//! environment variable, read once. Kernels split work statically (a fixed partition for a given
//! thread count, a fixed reduction order within each part), so results are bit-identical from run
//! to run for a fixed thread count.
//!
//! With one thread (`MP_NUM_THREADS=1`, or a single core) no thread is started: every kernel runs
//! on the thread that calls it. When the threads cannot be started (a process thread limit,
//! `ulimit -u`), [`try_pool`] says so, naming the knob, and so do [`crate::Cpu::with`],
//! [`crate::Cpu::global`] and [`crate::calibrate::calibration`]; nothing panics, and a kernel
//! reached anyway runs on the calling thread ([`num_threads`] is then 1).

use std::cell::Cell;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// The knob that sets the thread count.
pub const KNOB: &str = "MP_NUM_THREADS";

/// The most threads the pool takes: four per core (more only adds contention, and a huge value
/// would spawn thousands of threads).
fn cap() -> usize {
    4 * cores()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
/// the number of available cores; 1 inside [`serial`], and 1 when the threads could not be
/// started ([`try_pool`] says why).
pub fn num_threads() -> usize {
    if SERIAL.with(Cell::get) {
        1
    } else {
        try_pool().map_or(1, Pool::current_num_threads)
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

/// The kernel threads: a rayon pool, or none when the kernels run on the calling thread (one
/// thread asked for, or the threads could not be started).
#[derive(Clone, Copy, Debug)]
pub struct Pool(Option<&'static rayon::ThreadPool>);

impl Pool {
    /// Runs `op` on the kernel threads (rayon's `ThreadPool::install`), or on the calling thread
    /// when there are none. Kernels split their work only when [`num_threads`] is above 1, which
    /// it is only with a pool, so nothing `op` runs reaches rayon's global pool.
    pub fn install<R: Send>(self, op: impl FnOnce() -> R + Send) -> R {
        match self.0 {
            Some(pool) if crate::profile::enabled() && pool.current_thread_index().is_none() => {
                let start = std::time::Instant::now();
                let (r, ran) = pool.install(|| {
                    let t = std::time::Instant::now();
                    let r = op();
                    (r, t.elapsed())
                });
                let wall = start.elapsed();
                crate::profile::record_region(wall.saturating_sub(ran).as_nanos() as u64);
                r
            }
            Some(pool) => pool.install(op),
            None => op(),
        }
    }

    /// Runs `op` once on every kernel thread at the same time (rayon's `broadcast`), or once on
    /// the calling thread; the results in thread order.
    pub fn broadcast<R: Send>(self, op: impl Fn() -> R + Sync) -> Vec<R> {
        match self.0 {
            Some(pool) => pool.broadcast(|_| op()),
            None => vec![op()],
        }
    }

    /// The number of kernel threads (1 without a pool).
    pub fn current_num_threads(self) -> usize {
        self.0.map_or(1, rayon::ThreadPool::current_num_threads)
    }

    /// Runs `f` on every part, the first on the calling thread and the others on the kernel
    /// threads, and returns when all are done; in order on the calling thread without a pool.
    pub fn for_each_part<T: Sync>(self, parts: &[T], f: impl Fn(&T) + Sync) {
        match (self.0, parts.split_first()) {
            (Some(pool), Some((first, rest)))
                if !rest.is_empty()
                    && crate::profile::enabled()
                    && pool.current_thread_index().is_none() =>
            {
                // The longest part's time, in nanoseconds.
                let longest = std::sync::atomic::AtomicU64::new(0);
                let timed = |part: &T| {
                    let t = std::time::Instant::now();
                    f(part);
                    let ns = t.elapsed().as_nanos() as u64;
                    longest.fetch_max(ns, std::sync::atomic::Ordering::Relaxed);
                };
                let start = std::time::Instant::now();
                pool.scope(|s| {
                    let timed = &timed;
                    for part in rest {
                        s.spawn(move |_| timed(part));
                    }
                    timed(first);
                });
                let wall = start.elapsed().as_nanos() as u64;
                crate::profile::record_region(wall.saturating_sub(longest.into_inner()));
            }
            (Some(pool), Some((first, rest))) if !rest.is_empty() => pool.scope(|s| {
                let f = &f;
                for part in rest {
                    s.spawn(move |_| f(part));
                }
                f(first);
            }),
            _ => parts.iter().for_each(f),
        }
    }
}

/// How a kernel thread is started: rayon's spawn handler (see [`set_spawn_handler`]).
type Spawn = Box<dyn FnMut(rayon::ThreadBuilder) -> std::io::Result<()> + Send>;

/// The spawn handler set by [`set_spawn_handler`], until the pool is built.
enum SpawnState {
    /// `std::thread::Builder`, rayon's default.
    Default,
    /// Set by [`set_spawn_handler`].
    Custom(Spawn),
    /// The pool was built (or its build was tried): too late to set one.
    Used,
}

static SPAWN: Mutex<SpawnState> = Mutex::new(SpawnState::Default);
static POOL: OnceLock<std::result::Result<Option<rayon::ThreadPool>, String>> = OnceLock::new();

/// Sets how the kernel threads are started, before the pool is first used: `spawn` gets each
/// thread's [`rayon::ThreadBuilder`] and must run [`rayon::ThreadBuilder::run`] on a new thread
/// (rayon's `ThreadPoolBuilder::spawn_handler`: to set a stack size or pin threads, say). A
/// spawn that fails makes [`try_pool`] fail, naming the error, as a process thread limit
/// does (what tests inject).
///
/// # Errors
/// [`Error::InvalidArgument`] when the pool was already built (a kernel, [`num_threads`] or
/// [`crate::Cpu`] used it).
pub fn set_spawn_handler(
    spawn: impl FnMut(rayon::ThreadBuilder) -> std::io::Result<()> + Send + 'static,
) -> Result<()> {
    let mut state = SPAWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if matches!(*state, SpawnState::Used) {
        return Err(Error::InvalidArgument {
            op: "threads::set_spawn_handler",
            what: "the kernel threads were already started: set the spawn handler before the \
                   first kernel runs"
                .into(),
        });
    }
    *state = SpawnState::Custom(Box::new(spawn));
    Ok(())
}

/// The kernel threads, started on first use.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `MP_NUM_THREADS` when its value is not a positive whole
/// number, or when the threads cannot be started (a process thread limit, say); the same error
/// at every call.
pub fn try_pool() -> Result<Pool> {
    let built = POOL.get_or_init(|| {
        let spawn = {
            let mut state = SPAWN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match std::mem::replace(&mut *state, SpawnState::Used) {
                SpawnState::Custom(f) => Some(f),
                SpawnState::Default | SpawnState::Used => None,
            }
        };
        let asked = requested(std::env::var(KNOB).ok().as_deref(), cap())?;
        start(asked.unwrap_or_else(cores), asked.is_some(), spawn)
    });
    match built {
        Ok(pool) => Ok(Pool(pool.as_ref())),
        Err(what) => Err(Error::InvalidArgument {
            op: KNOB,
            what: what.clone(),
        }),
    }
}

/// Starts `n` kernel threads (none for one: the kernels run on the calling thread) with `spawn`
/// (`None`: rayon's default); `asked` says whether `MP_NUM_THREADS` set `n`.
fn start(
    n: usize,
    asked: bool,
    spawn: Option<Spawn>,
) -> std::result::Result<Option<rayon::ThreadPool>, String> {
    if n <= 1 {
        return Ok(None);
    }
    let builder = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("mp-kernels-{i}"));
    let built = match spawn {
        Some(f) => builder.spawn_handler(f).build(),
        None => builder.build(),
    };
    built.map(Some).map_err(|e| {
        let why = if asked {
            format!("{KNOB}={n}")
        } else {
            format!("one per core; {KNOB} is unset")
        };
        format!(
            "cannot start {n} kernel threads ({why}): {e}; the process may be at its thread \
             limit (ulimit -u): set {KNOB}=1 to run every kernel on the calling thread, or \
             raise the limit"
        )
    })
}

/// The kernel threads (see [`Pool`]). Every [`crate::Cpu`] checks [`try_pool`] when it is made,
/// so kernels reach this only after the pool was built; should it have failed anyway, they run
/// on the calling thread.
pub fn pool() -> Pool {
    try_pool().unwrap_or(Pool(None))
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    /// A spawn handler that starts `ok` threads and then fails as `fork` does at a process
    /// thread limit; counts its calls.
    fn limited(ok: usize, calls: &Arc<AtomicUsize>) -> Spawn {
        let calls = Arc::clone(calls);
        Box::new(move |t: rayon::ThreadBuilder| {
            if calls.fetch_add(1, Ordering::SeqCst) < ok {
                std::thread::Builder::new().spawn(move || t.run())?;
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "Resource temporarily unavailable (injected)",
                ))
            }
        })
    }

    #[test]
    fn a_failed_spawn_is_an_error_naming_the_knob_and_the_limit() {
        for (asked, says) in [
            (true, "(MP_NUM_THREADS=3)"),
            (false, "MP_NUM_THREADS is unset"),
        ] {
            // The third thread fails: rayon stops the two it started.
            let calls = Arc::new(AtomicUsize::new(0));
            let e = start(3, asked, Some(limited(2, &calls))).unwrap_err();
            for part in [
                "cannot start 3 kernel threads",
                says,
                "Resource temporarily unavailable (injected)",
                "ulimit -u",
                "set MP_NUM_THREADS=1",
            ] {
                assert!(e.contains(part), "{part:?} missing from {e:?}");
            }
            assert_eq!(calls.load(Ordering::SeqCst), 3);
        }
    }

    #[test]
    fn the_spawn_handler_starts_each_thread_and_one_thread_needs_none() {
        let calls = Arc::new(AtomicUsize::new(0));
        let pool = start(2, true, Some(limited(2, &calls))).unwrap().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Kept for the process, as the shared pool is (its two threads stay idle).
        let pool = Pool(Some(Box::leak(Box::new(pool))));
        assert_eq!(pool.current_num_threads(), 2);
        assert_eq!(pool.broadcast(|| 1).len(), 2);
        let sums: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
        pool.for_each_part(&[0, 1, 2, 3, 4], |&i| {
            sums[i].fetch_add(i + 1, Ordering::SeqCst);
        });
        assert_eq!(
            sums.iter().map(|s| s.load(Ordering::SeqCst)).sum::<usize>(),
            15
        );
        // One thread: nothing is spawned (a handler that always fails is never called), and
        // the work runs on the calling thread.
        let calls = Arc::new(AtomicUsize::new(0));
        assert!(start(1, true, Some(limited(0, &calls))).unwrap().is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let none = Pool(None);
        let me = std::thread::current().id();
        assert_eq!(none.install(|| std::thread::current().id()), me);
        assert_eq!(none.broadcast(|| std::thread::current().id()), vec![me]);
        assert_eq!(none.current_num_threads(), 1);
        let order = Mutex::new(vec![]);
        none.for_each_part(&[3, 1, 2], |&i| order.lock().unwrap().push(i));
        assert_eq!(order.into_inner().unwrap(), [3, 1, 2]);
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
