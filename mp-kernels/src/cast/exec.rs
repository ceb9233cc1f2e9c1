//! How the elementwise kernels run: the instruction-set check and the split over the thread pool.
//!
//! Arrays below [`PAR_MIN`] elements run on the calling thread. Larger ones are cut into
//! contiguous chunks run on [`crate::threads::pool`]. Elementwise results do not depend on the
//! cut; reductions cut at fixed sizes that do not depend on the thread count and combine the
//! partial results in order, so they are bit-identical from run to run, whatever the thread count.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::isa::Isa;
use crate::threads;

/// Arrays with fewer elements than this run on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 16;

/// Checks that this CPU can run `isa` (running code for a missing instruction set is undefined
/// behaviour, so the kernels that take an instruction set check before anything else).
pub(crate) fn check_isa(op: &'static str, isa: Isa) -> Result<()> {
    if isa.is_supported() {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op,
            what: format!("isa {isa:?} is not supported by this cpu"),
        })
    }
}

/// Whether `n` elements are worth splitting over the pool.
fn parallel(n: usize) -> bool {
    n >= PAR_MIN && threads::num_threads() > 1
}

/// The chunk length for an elementwise split of `n` elements made of units of `unit` elements
/// (a multiple of `unit`, and of 64 elements when `unit` is 1): about four chunks per thread.
fn chunk_len(n: usize, unit: usize) -> usize {
    let unit = unit.max(1);
    let units = n / unit;
    let per = units
        .div_ceil(4 * threads::num_threads())
        .max((PAR_MIN / 4).div_ceil(unit));
    let per = if unit == 1 {
        per.next_multiple_of(64)
    } else {
        per
    };
    per.max(1) * unit
}

/// Runs `f` on matching chunks of `x` and `y` (equal lengths in units of `ux` and `uy` elements).
pub(crate) fn par_zip<A: Sync, D: Send>(
    x: &[A],
    ux: usize,
    y: &mut [D],
    uy: usize,
    f: impl Fn(&[A], &mut [D]) + Sync,
) {
    let units = y.len() / uy.max(1);
    if !parallel(x.len().max(y.len())) || units == 0 {
        return f(x, y);
    }
    let per = chunk_len(y.len(), uy) / uy.max(1);
    let (cx, cy) = ((per * ux).max(1), (per * uy).max(1));
    let n = x.len().div_ceil(cx);
    threads::pool().chunks_mut(y, cy, |i, b| {
        if i < n {
            f(&x[i * cx..((i + 1) * cx).min(x.len())], b);
        }
    });
}

/// Runs `f` on matching chunks of `a`, `b` and `y` (units of `ua`, `ub` and `uy` elements).
pub(crate) fn par_zip2<A: Sync, B: Sync, D: Send>(
    a: (&[A], usize),
    b: (&[B], usize),
    y: (&mut [D], usize),
    f: impl Fn(&[A], &[B], &mut [D]) + Sync,
) {
    let ((a, ua), (b, ub), (y, uy)) = (a, b, y);
    let units = y.len() / uy.max(1);
    if !parallel(a.len().max(y.len())) || units == 0 {
        return f(a, b, y);
    }
    let per = chunk_len(y.len(), uy) / uy.max(1);
    let (ca, cb, cy) = ((per * ua).max(1), (per * ub).max(1), (per * uy).max(1));
    let n = a.len().div_ceil(ca).min(b.len().div_ceil(cb));
    threads::pool().chunks_mut(y, cy, |i, y| {
        if i < n {
            let a = &a[i * ca..((i + 1) * ca).min(a.len())];
            f(a, &b[i * cb..((i + 1) * cb).min(b.len())], y);
        }
    });
}

/// Runs `f` on chunks of `y` in place.
pub(crate) fn par_each<D: Send>(y: &mut [D], f: impl Fn(&mut [D]) + Sync) {
    if !parallel(y.len()) {
        return f(y);
    }
    let ch = chunk_len(y.len(), 1);
    threads::pool().chunks_mut(y, ch, |_, y| f(y));
}

/// Runs `f` on every chunk of `y` in place (all of them, never stopping early) and returns
/// whether it returned `true` for every chunk.
pub(crate) fn par_each_all<D: Send>(y: &mut [D], f: impl Fn(&mut [D]) -> bool + Sync) -> bool {
    if !parallel(y.len()) {
        return f(y);
    }
    let ch = chunk_len(y.len(), 1);
    let all = std::sync::atomic::AtomicBool::new(true);
    threads::pool().chunks_mut(y, ch, |_, y| {
        if !f(y) {
            all.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    });
    all.into_inner()
}

/// Whether `f` holds for every chunk of `x` (chunks may run in any order and stop early).
pub(crate) fn par_all<A: Sync>(x: &[A], f: impl Fn(&[A]) -> bool + Sync) -> bool {
    if !parallel(x.len()) {
        return f(x);
    }
    let ch = chunk_len(x.len(), 1);
    let all = std::sync::atomic::AtomicBool::new(true);
    threads::pool().for_each_index(x.len().div_ceil(ch), |i| {
        if all.load(std::sync::atomic::Ordering::Relaxed)
            && !f(&x[i * ch..((i + 1) * ch).min(x.len())])
        {
            all.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    });
    all.into_inner()
}

/// The sum of `f` over the fixed ranges `0..block, block..2*block, ...` covering `0..n`, added in
/// order (in float64). The ranges depend only on `n` and `block`, so the result is bit-identical
/// whatever the thread count.
pub(crate) fn ordered_sum(
    n: usize,
    block: usize,
    work: usize,
    f: impl Fn(Range<usize>) -> f64 + Sync,
) -> f64 {
    let block = block.max(1);
    let ranges = (0..n.div_ceil(block)).map(|b| b * block..((b + 1) * block).min(n));
    if !parallel(work) {
        return ranges.map(&f).fold(0.0, |a, b| a + b);
    }
    let ranges: Vec<Range<usize>> = ranges.collect();
    let parts: Vec<f64> = threads::pool().map(ranges.len(), |i| f(ranges[i].clone()));
    parts.into_iter().fold(0.0, |a, b| a + b)
}
