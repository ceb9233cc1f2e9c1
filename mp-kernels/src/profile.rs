//! Where a step's time goes: wall time per op class of the op surface ([`crate::ops`]), and
//! the time the kernel threads spend handing work over, for `cargo xtask bench`'s per-op table.
//!
//! Off by default, and then one relaxed atomic load per op. [`enable`] turns it on for the
//! whole process; [`take`] reads and clears the sums. Each op of [`crate::ops`] opens a
//! [`span`] for its class, with the multiply-adds (`flop`) and the bytes it must move; a span
//! opened inside another on the same thread (a convolution's GEMM) adds nothing, so each
//! nanosecond is counted once, under the outermost op.
//!
//! Thread overhead is what the pool costs beyond the work: for each parallel region, its wall
//! time less the longest time one thread spent on its items (see [`crate::threads::Pool`]):
//! waking the workers, the hand-over and the wait for the slowest. It is part of the ops' times
//! too (the regions run inside them). Two more sums say how much of the threads' time an op
//! leaves unused: per class, the threads' idle time inside its regions (the region's wall time
//! times its threads, less their time on items: a share that ends before the others counts
//! here), and its time outside any region (on the calling thread alone).
//!
//! ```
//! use mp_kernels::profile::{self, OpClass};
//!
//! profile::enable(true);
//! {
//!     let _span = profile::span(OpClass::Cast).bytes(1024);
//! }
//! let p = profile::take();
//! assert_eq!(p.class(OpClass::Cast).calls, 1);
//! assert_eq!(p.class(OpClass::Cast).bytes, 1024);
//! profile::enable(false);
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A class of ops in the per-op table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// Dense layers' GEMMs (a convolution's are under [`OpClass::Convolution`]).
    Gemm,
    /// Convolutions, forward and both gradients, with their patch copies.
    Convolution,
    /// BatchNormalization: statistics, normalisation, its backward, moving averages.
    BatchNorm,
    /// Max and average pooling, forward and backward.
    Pooling,
    /// ReLU, sigmoid, tanh and their gradients; bias gradients.
    Activation,
    /// GELU and its gradient.
    Gelu,
    /// Scaled dot-product attention, forward and backward.
    Attention,
    /// LayerNormalization, forward and backward.
    LayerNorm,
    /// Dtype casts (the compute-dtype copies of inputs and weights).
    Cast,
    /// Residual additions.
    Add,
    /// Softmax and the losses.
    Loss,
    /// Dropout masks.
    Dropout,
    /// Optimizer updates, loss-scale unscaling and finiteness checks, clipping.
    Optimizer,
    /// Every other op (embeddings, sequence pooling, reductions).
    Other,
}

impl OpClass {
    /// Every class, in table order.
    pub const ALL: [OpClass; 14] = [
        OpClass::Gemm,
        OpClass::Convolution,
        OpClass::BatchNorm,
        OpClass::Pooling,
        OpClass::Activation,
        OpClass::Gelu,
        OpClass::Attention,
        OpClass::LayerNorm,
        OpClass::Cast,
        OpClass::Add,
        OpClass::Loss,
        OpClass::Dropout,
        OpClass::Optimizer,
        OpClass::Other,
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Gemm => "dense GEMM",
            OpClass::Convolution => "convolution",
            OpClass::BatchNorm => "batch norm",
            OpClass::Pooling => "pooling",
            OpClass::Activation => "activation",
            OpClass::Gelu => "GELU",
            OpClass::Attention => "attention",
            OpClass::LayerNorm => "layer norm",
            OpClass::Cast => "casts",
            OpClass::Add => "residual add",
            OpClass::Loss => "softmax + loss",
            OpClass::Dropout => "dropout",
            OpClass::Optimizer => "optimizer",
            OpClass::Other => "other ops",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

const N: usize = OpClass::ALL.len();

struct Sums {
    nanos: AtomicU64,
    calls: AtomicU64,
    flop: AtomicU64,
    bytes: AtomicU64,
    /// Wall time of the parallel regions run inside this class's ops.
    region: AtomicU64,
    /// Thread time idle inside those regions: wall x threads less the threads' busy time.
    idle: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Sums = Sums {
    nanos: AtomicU64::new(0),
    calls: AtomicU64::new(0),
    flop: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
    region: AtomicU64::new(0),
    idle: AtomicU64::new(0),
};

static ENABLED: AtomicBool = AtomicBool::new(false);
static SUMS: [Sums; N] = [ZERO; N];
static THREAD_NANOS: AtomicU64 = AtomicU64::new(0);
static REGIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The class of the outermost open span on this thread.
    static CLASS: Cell<Option<OpClass>> = const { Cell::new(None) };
}

/// Turns timing on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether timing is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An open op: adds its wall time to its class when dropped (when timing is on and no other
/// span is open on this thread).
#[derive(Debug)]
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    /// Whether this span raised the thread's depth.
    counted: bool,
    open: Option<(OpClass, Instant)>,
    flop: f64,
    bytes: u64,
}

/// Opens a span of `class`.
pub fn span(class: OpClass) -> Span {
    if !enabled() {
        return Span {
            counted: false,
            open: None,
            flop: 0.0,
            bytes: 0,
        };
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    if outer {
        CLASS.with(|c| c.set(Some(class)));
    }
    Span {
        counted: true,
        open: outer.then(|| (class, Instant::now())),
        flop: 0.0,
        bytes: 0,
    }
}

impl Span {
    /// The floating-point operations the op does (multiply-adds count 2).
    pub fn flop(mut self, flop: f64) -> Self {
        self.flop = flop;
        self
    }

    /// The bytes the op must read and write at least once.
    pub fn bytes(mut self, bytes: usize) -> Self {
        self.bytes = bytes as u64;
        self
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((class, start)) = self.open {
            CLASS.with(|c| c.set(None));
            let s = &SUMS[class.slot()];
            s.nanos
                .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            s.calls.fetch_add(1, Ordering::Relaxed);
            s.flop.fetch_add(self.flop as u64, Ordering::Relaxed);
            s.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        }
        if self.counted {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
}

/// Adds one parallel region's overhead ([`crate::threads`] calls it).
pub(crate) fn record_region(overhead_nanos: u64, wall_nanos: u64, idle_nanos: u64) {
    THREAD_NANOS.fetch_add(overhead_nanos, Ordering::Relaxed);
    REGIONS.fetch_add(1, Ordering::Relaxed);
    if let Some(class) = CLASS.with(Cell::get) {
        let s = &SUMS[class.slot()];
        s.region.fetch_add(wall_nanos, Ordering::Relaxed);
        s.idle.fetch_add(idle_nanos, Ordering::Relaxed);
    }
}

/// One class's sums.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClassSums {
    /// Wall time, seconds.
    pub secs: f64,
    /// Ops run.
    pub calls: u64,
    /// Floating-point operations.
    pub flop: f64,
    /// Bytes moved at least.
    pub bytes: u64,
    /// Wall time of the parallel regions inside the class's ops, seconds (the rest of `secs`
    /// ran on the calling thread alone).
    pub region_secs: f64,
    /// Kernel-thread time idle inside those regions, seconds: each region's wall time times
    /// its threads, less the time the threads spent on its items (start-up, hand-over, and
    /// threads that finished their share before the others).
    pub idle_secs: f64,
}

/// The sums since the last [`take`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    classes: [ClassSums; N],
    /// Thread overhead, seconds (see the module docs).
    pub thread_secs: f64,
    /// Parallel regions started from outside the pool.
    pub regions: u64,
}

impl Profile {
    /// The sums of `class`.
    pub fn class(&self, class: OpClass) -> ClassSums {
        self.classes[class.slot()]
    }

    /// Seconds in all ops.
    pub fn total_secs(&self) -> f64 {
        self.classes.iter().map(|c| c.secs).sum()
    }

    /// Kernel-thread seconds idle inside the parallel regions of all ops
    /// ([`ClassSums::idle_secs`]).
    pub fn idle_secs(&self) -> f64 {
        self.classes.iter().map(|c| c.idle_secs).sum()
    }

    /// Seconds the ops ran on the calling thread alone, outside any parallel region (the other
    /// kernel threads waited meanwhile).
    pub fn serial_secs(&self) -> f64 {
        self.classes
            .iter()
            .map(|c| (c.secs - c.region_secs).max(0.0))
            .sum()
    }
}

/// Reads the sums and sets them to zero.
pub fn take() -> Profile {
    let mut p = Profile::default();
    for class in OpClass::ALL {
        let s = &SUMS[class.slot()];
        p.classes[class.slot()] = ClassSums {
            secs: s.nanos.swap(0, Ordering::Relaxed) as f64 * 1e-9,
            calls: s.calls.swap(0, Ordering::Relaxed),
            flop: s.flop.swap(0, Ordering::Relaxed) as f64,
            bytes: s.bytes.swap(0, Ordering::Relaxed),
            region_secs: s.region.swap(0, Ordering::Relaxed) as f64 * 1e-9,
            idle_secs: s.idle.swap(0, Ordering::Relaxed) as f64 * 1e-9,
        };
    }
    p.thread_secs = THREAD_NANOS.swap(0, Ordering::Relaxed) as f64 * 1e-9;
    p.regions = REGIONS.swap(0, Ordering::Relaxed);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test, since the sums are process-wide.
    #[test]
    fn spans_count_once_under_the_outermost_op_and_only_when_on() {
        enable(false);
        let _ = take();
        {
            let _off = span(OpClass::Gemm).flop(10.0);
        }
        assert_eq!(take().class(OpClass::Gemm).calls, 0);

        enable(true);
        {
            let _outer = span(OpClass::Convolution).flop(100.0).bytes(64);
            let _inner = span(OpClass::Gemm).flop(100.0);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        {
            let _alone = span(OpClass::Gemm).flop(7.0);
        }
        enable(false);
        let p = take();
        let conv = p.class(OpClass::Convolution);
        assert_eq!((conv.calls, conv.flop, conv.bytes), (1, 100.0, 64));
        assert!(conv.secs >= 0.002, "{conv:?}");
        let gemm = p.class(OpClass::Gemm);
        assert_eq!(
            (gemm.calls, gemm.flop),
            (1, 7.0),
            "the nested GEMM adds nothing"
        );
        assert!(p.total_secs() >= conv.secs);

        // A region whose second item ends 20 ms before its first: with two threads, the one
        // that ran it idles (its idle time is counted); run on one thread (a single thread, or
        // another test's region holding the pool), the whole span is serial.
        enable(true);
        let _ = take();
        {
            let _span = span(OpClass::Dropout);
            crate::threads::pool().for_each_index(2, |i| {
                if i == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            });
        }
        enable(false);
        let d = take().class(OpClass::Dropout);
        assert!(d.region_secs <= d.secs, "{d:?}");
        if d.region_secs > 0.0 {
            assert!(d.idle_secs >= 0.015 && d.region_secs >= 0.02, "{d:?}");
        } else {
            assert!(d.secs >= 0.02 && d.idle_secs == 0.0, "{d:?}");
        }
        // (Only the class sums: another test's pool region may still report its overhead.)
        let again = take();
        for class in OpClass::ALL {
            assert_eq!(
                again.class(class),
                ClassSums::default(),
                "take clears {class:?}"
            );
        }
    }
}
