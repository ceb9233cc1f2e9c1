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
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

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

/// The kernel threads: the calling thread and `n - 1` workers, or none when the kernels run on
/// the calling thread alone (one thread asked for, or the threads could not be started).
///
/// A parallel region publishes one job; the caller and every worker take its items, each from
/// its own share first and then from the others' ([`Job`]), until none is left, and the caller
/// returns when every worker has finished with it.
/// Between regions a worker spins on `pause` for [`SPIN`] (a training step's next op usually
/// comes sooner, and a spinning worker starts it at once), then sleeps on a condition variable
/// until the next region: it never spins in `sched_yield`. Which thread runs which item never
/// changes a result: the kernels partition their work by item, not by thread.
#[derive(Clone, Copy, Debug)]
pub struct Pool(Option<&'static Workers>);

/// How long an idle worker waits on `pause` before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// Threads up to which a region hands each thread its own share of the items first
/// ([`Job::shares`]); beyond, every thread takes items from one counter.
const MAX_SHARES: usize = 16;

/// A counter on a cache line of its own (the threads bump theirs without sharing a line).
#[repr(align(64))]
struct Counter(AtomicUsize);

/// One parallel region's work: items `0..n`. With up to [`MAX_SHARES`] threads, thread `t`'s
/// share is the `t`-th of `threads` contiguous ranges of the items: it takes its own share's
/// items in order, then, when its share is done, the items left in the others' shares, so a late
/// thread's items are not waited for. Thread `t` runs the same part of every region when none
/// is late, so the rows an op writes on one core are the rows the next op reads there, still in
/// that core's cache (the GEMMs split rows and the row-wise ops split blocks of rows the same
/// way). More threads than that take items from one counter.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    /// One item per thread, the thread's index (a broadcast), instead of items from the shares.
    per_thread: bool,
    /// The threads in the region.
    threads: usize,
    /// The next item of each thread's share (only the first `threads` when they are at most
    /// [`MAX_SHARES`]; else `shares[0]` counts over all the items).
    shares: [Counter; MAX_SHARES],
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// The longest time one thread spent on items, nanoseconds (profiled regions only).
    busiest: AtomicU64,
    /// The time all threads spent on items, nanoseconds (profiled regions only).
    busy: AtomicU64,
    timed: bool,
}

impl Job<'_> {
    /// The first item of thread `t`'s share (`t == threads`: `n`).
    fn share_start(&self, t: usize) -> usize {
        self.n * t / self.threads
    }

    /// Runs items until none is left (or, for a broadcast, item `me`); a panic is kept for the
    /// caller and stops the other threads taking more.
    fn work(&self, me: usize) {
        let start = self.timed.then(std::time::Instant::now);
        let run = |i: usize| {
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(i))) {
                for c in &self.shares {
                    c.0.store(usize::MAX / 2, Ordering::SeqCst);
                }
                self.panic
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(p);
            }
        };
        if self.per_thread {
            if me < self.n {
                run(me);
            }
        } else if self.threads > MAX_SHARES {
            loop {
                let i = self.shares[0].0.fetch_add(1, Ordering::Relaxed);
                if i >= self.n {
                    break;
                }
                run(i);
            }
        } else {
            for o in 0..self.threads {
                let t = (me + o) % self.threads;
                let end = self.share_start(t + 1);
                loop {
                    let i = self.shares[t].0.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    run(i);
                }
            }
        }
        if let Some(t) = start {
            let nanos = t.elapsed().as_nanos() as u64;
            self.busiest.fetch_max(nanos, Ordering::Relaxed);
            self.busy.fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

/// The workers' shared state.
pub struct Workers {
    /// Threads in a region, the caller included.
    threads: usize,
    /// Bumped once per region (and at shutdown); a worker runs the job of each new value.
    epoch: AtomicUsize,
    /// The current region's job (valid while `active > 0`).
    job: AtomicPtr<Job<'static>>,
    /// Workers that have not finished the current region.
    active: AtomicUsize,
    /// Workers asleep on `wake`.
    sleepers: AtomicUsize,
    /// Whether the caller sleeps on `done`.
    caller_waiting: AtomicBool,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    done: Condvar,
    /// Held by the thread running a region: a second caller runs its items alone meanwhile.
    busy: Mutex<()>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Workers {
    fn new(threads: usize) -> Workers {
        Workers {
            threads,
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            caller_waiting: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            done: Condvar::new(),
            busy: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the next epoch and wakes the workers that sleep.
    fn publish(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // A worker counts itself a sleeper, under the lock, before it checks the epoch one last
        // time; so either it sees the new epoch or this sees it asleep (both SeqCst).
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.lock();
            self.wake.notify_all();
        }
    }

    /// A worker's life: run the job of every new epoch, as worker `me` (1-based).
    fn worker(&self, me: usize) {
        SERIAL.with(|s| s.set(true));
        // Epoch 0 is the one the workers were made in: a region published before this thread
        // got here is still ahead of it.
        let mut seen = 0;
        loop {
            let start = std::time::Instant::now();
            let mut spins = 0u32;
            loop {
                let e = self.epoch.load(Ordering::SeqCst);
                if e != seen {
                    seen = e;
                    break;
                }
                spins += 1;
                if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                let mut g = self.lock();
                self.sleepers.fetch_add(1, Ordering::SeqCst);
                while self.epoch.load(Ordering::SeqCst) == seen {
                    g = self
                        .wake
                        .wait(g)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
            if self.shutdown.load(Ordering::SeqCst) {
                return;
            }
            // SAFETY: the caller keeps the job alive until `active` reaches zero, which this
            // worker's decrement below is part of.
            let job = unsafe { &*self.job.load(Ordering::SeqCst) };
            job.work(me);
            if self.active.fetch_sub(1, Ordering::SeqCst) == 1
                && self.caller_waiting.load(Ordering::SeqCst)
            {
                let _g = self.lock();
                self.done.notify_one();
            }
        }
    }

    /// Runs `f` on items `0..n` over the caller and the workers (see [`Pool`]).
    fn region(&self, n: usize, per_thread: bool, f: &(dyn Fn(usize) + Sync)) {
        let busy = match self.busy.try_lock() {
            Ok(g) => g,
            // A panic re-raised by an earlier region poisons nothing here: the guard is dropped
            // before it is re-raised. Taken anyway, should that ever change.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread's region is running: this one's items run here, in order.
            Err(std::sync::TryLockError::WouldBlock) => return serial(|| (0..n).for_each(f)),
        };
        let timed = crate::profile::enabled();
        let start = timed.then(std::time::Instant::now);
        let mut job = Job {
            f,
            n,
            per_thread,
            threads: self.threads,
            shares: std::array::from_fn(|_| Counter(AtomicUsize::new(0))),
            panic: Mutex::new(None),
            busiest: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            timed,
        };
        if self.threads <= MAX_SHARES {
            for t in 0..self.threads {
                job.shares[t] = Counter(AtomicUsize::new(job.share_start(t)));
            }
        }
        // The workers see the job only while `active > 0`, and this returns only after.
        let erased: *const Job<'_> = &job;
        self.job.store(erased.cast_mut().cast(), Ordering::SeqCst);
        self.active.store(self.threads - 1, Ordering::SeqCst);
        self.publish();
        serial(|| job.work(0));
        let wait = std::time::Instant::now();
        let mut spins = 0u32;
        while self.active.load(Ordering::SeqCst) != 0 {
            spins += 1;
            // The clock is read once every 256 spins (it cost 2% of a ViT step read every one).
            if !spins.is_multiple_of(256) || wait.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // A worker that finishes last reads `caller_waiting` after its decrement.
            self.caller_waiting.store(true, Ordering::SeqCst);
            let mut g = self.lock();
            while self.active.load(Ordering::SeqCst) != 0 {
                g = self
                    .done
                    .wait(g)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            self.caller_waiting.store(false, Ordering::SeqCst);
        }
        if let Some(t) = start {
            let wall = t.elapsed().as_nanos() as u64;
            let threads = self.threads as u64;
            crate::profile::record_region(
                wall.saturating_sub(job.busiest.into_inner()),
                wall,
                (wall * threads).saturating_sub(job.busy.into_inner()),
            );
        }
        let panic = job
            .panic
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(busy);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
    }

    /// Stops the workers (their threads return).
    fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.publish();
    }
}

/// A slice handed out in disjoint chunks to the threads of a region.
struct Chunks<T> {
    ptr: *mut T,
    len: usize,
    chunk: usize,
}

// SAFETY: each chunk is given to one thread only (see `get`), and `T: Send`.
unsafe impl<T: Send> Sync for Chunks<T> {}

impl<T> Chunks<T> {
    fn new(s: &mut [T], chunk: usize) -> Chunks<T> {
        Chunks {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            chunk: chunk.max(1),
        }
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// Chunk `i`.
    ///
    /// # Safety
    /// `i < count()`, and no other reference to chunk `i` may be live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &mut [T] {
        let start = i * self.chunk;
        let len = self.chunk.min(self.len - start);
        // SAFETY: inside the slice (the caller's promise), and exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

impl Pool {
    /// The number of kernel threads, the calling thread included (1 without workers).
    pub fn current_num_threads(self) -> usize {
        self.0.map_or(1, |w| w.threads)
    }

    /// Runs `f(i)` for every `i` in `0..n` over the caller and the workers and returns when all
    /// are done; in order on the calling thread without workers, inside another region (on a
    /// worker, or in [`serial`]) or when another thread's region is running. A panic in `f` is
    /// raised again here once every thread has stopped.
    pub fn for_each_index(self, n: usize, f: impl Fn(usize) + Sync) {
        match self.0 {
            Some(w) if n > 1 && !SERIAL.with(Cell::get) => w.region(n, false, &f),
            _ => (0..n).for_each(f),
        }
    }

    /// Runs `f` on every part (see [`Pool::for_each_index`]).
    pub fn for_each_part<T: Sync>(self, parts: &[T], f: impl Fn(&T) + Sync) {
        self.for_each_index(parts.len(), |i| f(&parts[i]));
    }

    /// `f(i)` for every `i` in `0..n`, in index order (see [`Pool::for_each_index`]).
    pub fn map<R: Send>(self, n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
        let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
        self.chunks_mut(&mut out, 1, |i, slot| slot[0] = Some(f(i)));
        out.into_iter().flatten().collect()
    }

    /// Runs `f(i, chunk)` on every chunk of `y` (`chunk` elements, the last one shorter).
    pub fn chunks_mut<T: Send>(
        self,
        y: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let y = Chunks::new(y, chunk);
        // SAFETY: item i gets chunk i alone.
        self.for_each_index(y.count(), |i| f(i, unsafe { y.get(i) }));
    }

    /// `f(i, chunk)` for every chunk of `y` (as [`Pool::chunks_mut`]), in chunk order.
    pub fn map_chunks_mut<T: Send, R: Send>(
        self,
        y: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T]) -> R + Sync,
    ) -> Vec<R> {
        let mut out: Vec<Option<R>> = (0..y.len().div_ceil(chunk.max(1))).map(|_| None).collect();
        self.chunks_mut2((&mut out, 1), (y, chunk), |i, slot, c| {
            slot[0] = Some(f(i, c))
        });
        out.into_iter().flatten().collect()
    }

    /// Runs `f(i, a_i, b_i)` on matching chunks of `a` and `b` (`ca` and `cb` elements), as many
    /// as the shorter has.
    pub fn chunks_mut2<A: Send, B: Send>(
        self,
        (a, ca): (&mut [A], usize),
        (b, cb): (&mut [B], usize),
        f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
    ) {
        let (a, b) = (Chunks::new(a, ca), Chunks::new(b, cb));
        let n = a.count().min(b.count());
        // SAFETY: item i gets chunk i of each alone.
        self.for_each_index(n, |i| f(i, unsafe { a.get(i) }, unsafe { b.get(i) }));
    }

    /// [`Pool::chunks_mut2`] over three slices.
    #[allow(clippy::type_complexity)]
    pub fn chunks_mut3<A: Send, B: Send, C: Send>(
        self,
        (a, ca): (&mut [A], usize),
        (b, cb): (&mut [B], usize),
        (c, cc): (&mut [C], usize),
        f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync,
    ) {
        let (a, b, c) = (Chunks::new(a, ca), Chunks::new(b, cb), Chunks::new(c, cc));
        let n = a.count().min(b.count()).min(c.count());
        self.for_each_index(n, |i| {
            // SAFETY: item i gets chunk i of each alone.
            let (a, b, c) = unsafe { (a.get(i), b.get(i), c.get(i)) };
            f(i, a, b, c)
        });
    }

    /// Runs `op` once on every kernel thread at the same time, or once on the calling thread;
    /// the results in thread order (the caller's first).
    pub fn broadcast<R: Send>(self, op: impl Fn() -> R + Sync) -> Vec<R> {
        match self.0 {
            Some(w) if !SERIAL.with(Cell::get) => {
                let mut out: Vec<Option<R>> = (0..w.threads).map(|_| None).collect();
                let slots = Chunks::new(&mut out, 1);
                w.region(w.threads, true, &|i| {
                    // SAFETY: thread i fills slot i alone.
                    let slot = unsafe { slots.get(i) };
                    slot[0] = Some(op());
                });
                out.into_iter().flatten().collect()
            }
            _ => vec![op()],
        }
    }
}

/// How a kernel thread is started (see [`set_spawn_handler`]).
type Spawn = Box<dyn FnMut(ThreadBuilder) -> std::io::Result<()> + Send>;

/// A kernel thread to start: [`ThreadBuilder::run`] is its body.
pub struct ThreadBuilder {
    index: usize,
    body: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for ThreadBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadBuilder")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ThreadBuilder {
    /// The worker's index (1-based: the calling thread is 0).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The name the default handler gives the thread.
    pub fn name(&self) -> String {
        format!("mp-kernels-{}", self.index)
    }

    /// Runs the worker until the process ends.
    pub fn run(self) {
        (self.body)()
    }
}

/// The spawn handler set by [`set_spawn_handler`], until the pool is built.
enum SpawnState {
    /// `std::thread::Builder` with the thread's name.
    Default,
    /// Set by [`set_spawn_handler`].
    Custom(Spawn),
    /// The pool was built (or its build was tried): too late to set one.
    Used,
}

static SPAWN: Mutex<SpawnState> = Mutex::new(SpawnState::Default);
static POOL: OnceLock<std::result::Result<Option<&'static Workers>, String>> = OnceLock::new();

/// Sets how the kernel threads are started, before the pool is first used: `spawn` gets each
/// worker's [`ThreadBuilder`] and must run [`ThreadBuilder::run`] on a new thread (to set a stack
/// size or pin threads, say). A spawn that fails makes [`try_pool`] fail, naming the error, as a
/// process thread limit does (what tests inject).
///
/// # Errors
/// [`Error::InvalidArgument`] when the pool was already built (a kernel, [`num_threads`] or
/// [`crate::Cpu`] used it).
pub fn set_spawn_handler(
    spawn: impl FnMut(ThreadBuilder) -> std::io::Result<()> + Send + 'static,
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
        Ok(pool) => Ok(Pool(*pool)),
        Err(what) => Err(Error::InvalidArgument {
            op: KNOB,
            what: what.clone(),
        }),
    }
}

/// Starts the `n - 1` workers of `n` kernel threads (none for one: the kernels run on the calling
/// thread) with `spawn` (`None`: a named `std::thread`); `asked` says whether `MP_NUM_THREADS`
/// set `n`. When a spawn fails, the workers already started are stopped.
fn start(
    n: usize,
    asked: bool,
    spawn: Option<Spawn>,
) -> std::result::Result<Option<&'static Workers>, String> {
    if n <= 1 {
        return Ok(None);
    }
    // Kept for the process: the workers borrow it for as long as they run.
    let workers: &'static Workers = Box::leak(Box::new(Workers::new(n)));
    let mut spawn = spawn.unwrap_or_else(|| {
        Box::new(|t: ThreadBuilder| {
            std::thread::Builder::new()
                .name(t.name())
                .spawn(move || t.run())
                .map(drop)
        })
    });
    for index in 1..n {
        let body = Box::new(move || workers.worker(index));
        if let Err(e) = spawn(ThreadBuilder { index, body }) {
            workers.stop();
            let why = if asked {
                format!("{KNOB}={n}")
            } else {
                format!("one per core; {KNOB} is unset")
            };
            return Err(format!(
                "cannot start {n} kernel threads ({why}): {e}; the process may be at its thread \
                 limit (ulimit -u): set {KNOB}=1 to run every kernel on the calling thread, or \
                 raise the limit"
            ));
        }
    }
    Ok(Some(workers))
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

/// Float32 elements of scratch a thread keeps between calls (16 MiB); a call that needs more
/// allocates it instead.
const KEEP_SCRATCH: usize = 1 << 22;

thread_local! {
    /// The reused scratch of [`with_scratch`].
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` float32 of this thread's scratch (contents unspecified), so that a kernel's
/// per-task buffers are not allocated every step. A nested call (the scratch already lent on
/// this thread) or one past [`KEEP_SCRATCH`] allocates.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) if len <= KEEP_SCRATCH => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        _ => f(&mut vec![0.0; len]),
    })
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
        Box::new(move |t: ThreadBuilder| {
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
            // The second worker fails: the first is stopped.
            let calls = Arc::new(AtomicUsize::new(0));
            let e = start(3, asked, Some(limited(1, &calls))).unwrap_err();
            for part in [
                "cannot start 3 kernel threads",
                says,
                "Resource temporarily unavailable (injected)",
                "ulimit -u",
                "set MP_NUM_THREADS=1",
            ] {
                assert!(e.contains(part), "{part:?} missing from {e:?}");
            }
            assert_eq!(calls.load(Ordering::SeqCst), 2);
        }
    }

    #[test]
    fn the_spawn_handler_starts_each_worker_and_one_thread_needs_none() {
        let calls = Arc::new(AtomicUsize::new(0));
        let pool = Pool(start(3, true, Some(limited(2, &calls))).unwrap());
        // Three threads: the caller and two workers.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(pool.current_num_threads(), 3);
        let ids = pool.broadcast(|| std::thread::current().id());
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[0], std::thread::current().id());
        assert!(ids[1] != ids[0] && ids[2] != ids[0] && ids[1] != ids[2]);
        let sums: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
        pool.for_each_part(&[0, 1, 2, 3, 4], |&i| {
            sums[i].fetch_add(i + 1, Ordering::SeqCst);
        });
        let sums: Vec<usize> = sums.iter().map(|s| s.load(Ordering::SeqCst)).collect();
        assert_eq!(sums, [1, 2, 3, 4, 5]);
        // One thread: nothing is spawned (a handler that always fails is never called), and
        // the work runs on the calling thread.
        let calls = Arc::new(AtomicUsize::new(0));
        assert!(start(1, true, Some(limited(0, &calls))).unwrap().is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let none = Pool(None);
        let me = std::thread::current().id();
        assert_eq!(none.broadcast(|| std::thread::current().id()), vec![me]);
        assert_eq!(none.current_num_threads(), 1);
        let order = Mutex::new(vec![]);
        none.for_each_part(&[3, 1, 2], |&i| order.lock().unwrap().push(i));
        assert_eq!(order.into_inner().unwrap(), [3, 1, 2]);
    }

    #[test]
    fn regions_run_every_item_once_chunk_by_chunk_and_in_order_when_nested() {
        let calls = Arc::new(AtomicUsize::new(0));
        let pool = Pool(start(2, true, Some(limited(1, &calls))).unwrap());
        for n in [0, 1, 2, 7, 100] {
            // Many regions in a row: the worker spins between them, or sleeps and is woken.
            for round in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each_index(n, |i| {
                    hits[i].fetch_add(1, Ordering::SeqCst);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::SeqCst) == 1),
                    "{n} {round}"
                );
                if round == 25 {
                    // Long enough for the worker to fall asleep.
                    std::thread::sleep(SPIN * 5);
                }
            }
            assert_eq!(
                pool.map(n, |i| i * i),
                (0..n).map(|i| i * i).collect::<Vec<_>>()
            );
        }
        let mut y: Vec<usize> = vec![0; 103];
        let mut z: Vec<usize> = vec![0; 11];
        let mut w: Vec<u8> = vec![0; 40];
        pool.chunks_mut3((&mut y, 10), (&mut z, 1), (&mut w, 4), |i, y, z, w| {
            y.iter_mut().for_each(|v| *v = i);
            z[0] = y.len();
            w.fill(i as u8);
        });
        // Ten matching chunks (w has ten); y's eleventh chunk is left alone.
        assert_eq!(&z[..10], [10; 10]);
        assert_eq!(z[10], 0);
        assert!(y[..100].iter().enumerate().all(|(k, &v)| v == k / 10));
        assert_eq!(&y[100..], [0, 0, 0]);
        assert!(w.iter().enumerate().all(|(k, &v)| v as usize == k / 4));
        // Nested regions run on the thread that reaches them, in order.
        let order = Mutex::new(vec![]);
        pool.for_each_index(2, |i| {
            if i == 0 {
                pool.for_each_index(4, |j| order.lock().unwrap().push(j));
            }
        });
        assert_eq!(order.into_inner().unwrap(), [0, 1, 2, 3]);
    }

    /// Shares of 3 and 5 threads, and one counter past [`MAX_SHARES`]: every item once, also
    /// when a thread is held up and the others take the rest of its share.
    #[test]
    fn shares_run_every_item_once_whatever_the_thread_count() {
        for threads in [3, 5, MAX_SHARES + 1] {
            let calls = Arc::new(AtomicUsize::new(0));
            let pool = Pool(start(threads, true, Some(limited(threads - 1, &calls))).unwrap());
            for n in [0, 1, 2, 5, 7, 100] {
                for slow in [false, true] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    pool.for_each_index(n, |i| {
                        if slow && i == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                        hits[i].fetch_add(1, Ordering::SeqCst);
                    });
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::SeqCst) == 1),
                        "{threads} threads, {n} items, slow {slow}"
                    );
                }
            }
            let total = AtomicUsize::new(0);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.for_each_index(64, |i| {
                    assert_ne!(i, 40, "item 40 failed");
                    total.fetch_add(1, Ordering::SeqCst);
                })
            }));
            assert!(r.is_err(), "{threads} threads");
            assert_eq!(pool.map(9, |i| i + 1), (1..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_panic_in_a_region_reaches_the_caller_after_every_thread_stops() {
        let calls = Arc::new(AtomicUsize::new(0));
        let pool = Pool(start(2, true, Some(limited(1, &calls))).unwrap());
        let done = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.for_each_index(64, |i| {
                if i == 3 {
                    panic!("item 3 failed");
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        }));
        let msg = r.unwrap_err();
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"item 3 failed"));
        // The pool still works afterwards, on both threads (not one, as a poisoned lock would
        // leave it).
        let total = AtomicUsize::new(0);
        pool.for_each_index(10, |i| {
            total.fetch_add(i, Ordering::SeqCst);
        });
        assert_eq!(total.load(Ordering::SeqCst), 45);
        let ids = pool.broadcast(|| std::thread::current().id());
        assert_ne!(ids[0], ids[1]);
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
