//! Batch normalization over the channel axis: the batch statistics ([`moments`]), the
//! normalization itself ([`normalize`]) and its training-mode gradient ([`normalize_backward`]).
//!
//! Every kernel takes a row-major `[rows, cols]` matrix whose last axis is the channel axis, as
//! Keras's `BatchNormalization(axis=-1)` sees it: an NHWC batch of images is `rows = n * h * w`,
//! `cols = channels`; a dense activation is `rows = batch`, `cols = units`. Inputs and outputs
//! are any [`Element`] (float32, bfloat16, float16); the statistics, `gamma`, `beta` and the
//! parameter gradients are float32, and **all arithmetic is float32**, as Keras 3 runs
//! normalization under a mixed-precision policy. A value written in `T` is rounded once, from
//! its float32 result.
//!
//! With `inv_std = 1 / sqrt(var + epsilon)` (float32, once per column) and
//! `xhat = (x - mean) * inv_std`:
//! - forward: `y = gamma * xhat + beta`, computed as `(x - mean) * (gamma * inv_std) + beta`
//!   (Keras writes `x * inv + (beta - mean * inv)`, which loses the digits `x` and `mean`
//!   share when the mean is large against the spread; this form does not);
//! - backward, when `mean` and `var` are the batch's own statistics (training):
//!   `dbeta += sum_r dy`, `dgamma += sum_r dy * xhat`, and
//!   `dx = gamma * inv_std * (dy - mean_r(dy) - xhat * mean_r(dy * xhat))`, which is
//!   `gamma * inv_std / rows * (rows * dy - sum dy - xhat * sum(dy * xhat))` with the sums
//!   divided by `rows` first (smaller intermediates, the same value).
//!
//! Column sums run down each column row after row in fixed blocks of [`ROW_BLOCK`] rows, the
//! block sums then added in block order; the blocks (and chunks of 256 columns) run on
//! [`crate::threads::pool`] when the matrix is large. The order depends on `rows` alone, so the
//! statistics and gradients of a column are bit-identical whatever the thread count, and do not
//! depend on the other columns. NaN and infinities propagate as IEEE arithmetic says; nothing
//! panics on them.
//!
//! The arithmetic is plain float32 Rust over float32 tiles that the compiler vectorizes; the
//! tiles are widened from and rounded back to `T` by the SIMD casts of [`crate::cast`] (which are
//! bit-identical to `half`'s, so results do not depend on the instruction set either).
//!
//! ```
//! use mp_kernels::norm::{moments, normalize};
//!
//! // 3 rows, 2 channels.
//! let x = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0];
//! let (mut mean, mut var) = ([0.0f32; 2], [0.0f32; 2]);
//! moments(&x, 3, 2, &mut mean, &mut var)?;
//! assert_eq!(mean, [2.0, 20.0]);
//! assert_eq!(var, [2.0 / 3.0, 200.0 / 3.0]);
//! let mut y = [0.0f32; 6];
//! normalize(&x, 3, 2, &mean, &var, &[1.0, 1.0], &[0.0, 0.0], 1e-3, &mut y)?;
//! assert!(y[0] < 0.0 && y[2] == 0.0 && y[4] > 0.0);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use std::ops::Range;

use mp_core::Element;

use crate::cast::cast;
use crate::cast::exec::PAR_MIN;
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::reduce::matrix_len;
use crate::threads;

/// Rows summed in one block of a column sum; the blocks' sums are then added in block order.
pub const ROW_BLOCK: usize = 2048;
/// Columns per task of a column sum on the pool (a 1 KiB float32 accumulator per sum).
const COL_BLOCK: usize = 256;
/// Elements of a float32 tile (whole rows when a row fits, else a row's columns in pieces).
const TILE: usize = 1024;

/// `1 / sqrt(var + epsilon)` in float32: the one place every kernel takes it from.
#[inline]
fn inv_std(var: f32, epsilon: f32) -> f32 {
    1.0 / (var + epsilon).sqrt()
}

/// `(x - mean) * inv_std` in float32: the same expression in the sums and in `dx`.
#[inline]
fn xhat(x: f32, mean: f32, inv_std: f32) -> f32 {
    (x - mean) * inv_std
}

/// Casts `src` into `dst` (equal lengths) with the crate's SIMD casts on `isa`, bit-identical to
/// `half`'s conversions (also used by [`crate::dropout`]). `isa` is [`Isa::detect`]'s and the
/// lengths are equal, so the cast cannot fail.
pub(crate) fn convert<S: Element, D: Element>(isa: Isa, src: &[S], dst: &mut [D]) {
    if S::DTYPE == D::DTYPE {
        // The same type (float32 here): a copy the compiler inlines, exact.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = D::from_f32(s.to_f32());
        }
        return;
    }
    let done = cast(isa, src, dst);
    debug_assert!(done.is_ok(), "a cast of equal lengths on the detected isa");
}

/// `x` as float32 when its elements are float32.
pub(crate) fn as_f32<T: Element>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: `T` is `f32` itself (the only element type whose dtype is float32), so the
    // pointer, length and alignment are those of an `[f32]`.
    (T::DTYPE == mp_core::DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// `x` as float32 when its elements are float32, mutably.
pub(crate) fn as_f32_mut<T: Element>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`, and the borrow is exclusive.
    (T::DTYPE == mp_core::DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}

/// Calls `f` on rows `rows` of the `K` matrices `src` (`[.., cols]`, row-major), columns
/// `c0..c0 + w`, widened to float32: `f([row of src[0], row of src[1], ...])`, row after row.
/// Whole rows are widened a tile at a time when they are contiguous and fit in one.
fn widened_rows<T: Element, const K: usize>(
    isa: Isa,
    src: [&[T]; K],
    cols: usize,
    rows: Range<usize>,
    c0: usize,
    w: usize,
    mut f: impl FnMut([&[f32]; K]),
) {
    debug_assert!(0 < w && w <= TILE && c0 + w <= cols);
    if T::DTYPE == mp_core::DType::F32 {
        // Float32 already: the rows as they are.
        let src = src.map(|s| as_f32(s).expect("float32"));
        for r in rows {
            f(std::array::from_fn(|q| &src[q][r * cols + c0..][..w]));
        }
        return;
    }
    let mut bufs = [[0.0f32; TILE]; K];
    if w == cols {
        let per = TILE / cols;
        let mut r = rows.start;
        while r < rows.end {
            let n = per.min(rows.end - r) * cols;
            for (b, s) in bufs.iter_mut().zip(src) {
                convert(isa, &s[r * cols..r * cols + n], &mut b[..n]);
            }
            for k in 0..n / cols {
                f(std::array::from_fn(|q| &bufs[q][k * cols..(k + 1) * cols]));
            }
            r += n / cols;
        }
    } else {
        for r in rows {
            for (b, s) in bufs.iter_mut().zip(src) {
                convert(isa, &s[r * cols + c0..][..w], &mut b[..w]);
            }
            f(std::array::from_fn(|q| &bufs[q][..w]));
        }
    }
}

/// Writes `out` (`[.., cols]`, row-major, `T`) from float32 rows: `f(c0, ins, out)` gets the
/// `K` inputs' rows (`[.., cols]`, `T`, as long as `out`), columns `c0..c0 + w`, widened to
/// float32, and writes the same columns of the output row, which is then rounded to `T`. Tiles
/// are whole rows when a row fits in one, else pieces of a row. Runs on the kernel threads in
/// fixed chunks of whole rows when the matrix is large (elementwise: the split changes nothing).
fn map_rows<T: Element, const K: usize>(
    isa: Isa,
    src: [&[T]; K],
    cols: usize,
    out: &mut [T],
    f: impl Fn(usize, [&[f32]; K], &mut [f32]) + Sync,
) {
    debug_assert!(cols > 0 && src.iter().all(|s| s.len() == out.len()));
    // Rows `start / cols..` of the output, `out` holding whole rows.
    let run = |start: usize, out: &mut [T]| {
        if let Some(out) = as_f32_mut(out) {
            // Float32 already: the rows as they are, no tiles to widen into and round from.
            let src = src.map(|s| as_f32(s).expect("the same element type as out"));
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                let at = start + r * cols;
                f(0, std::array::from_fn(|q| &src[q][at..at + cols]), o);
            }
            return;
        }
        let mut bufs = [[0.0f32; TILE]; K];
        let mut ob = [0.0f32; TILE];
        if cols <= TILE {
            let tile = (TILE / cols) * cols;
            for (t, o) in out.chunks_mut(tile).enumerate() {
                let (at, n) = (start + t * tile, o.len());
                for (b, s) in bufs.iter_mut().zip(src) {
                    convert(isa, &s[at..at + n], &mut b[..n]);
                }
                for k in 0..n / cols {
                    let row = k * cols..(k + 1) * cols;
                    f(
                        0,
                        std::array::from_fn(|q| &bufs[q][row.clone()]),
                        &mut ob[row.clone()],
                    );
                }
                convert(isa, &ob[..n], o);
            }
        } else {
            for (r, o) in out.chunks_exact_mut(cols).enumerate() {
                for c0 in (0..cols).step_by(TILE) {
                    let (at, w) = (start + r * cols + c0, TILE.min(cols - c0));
                    for (b, s) in bufs.iter_mut().zip(src) {
                        convert(isa, &s[at..at + w], &mut b[..w]);
                    }
                    f(c0, std::array::from_fn(|q| &bufs[q][..w]), &mut ob[..w]);
                    convert(isa, &ob[..w], &mut o[c0..c0 + w]);
                }
            }
        }
    };
    if parallel(out.len()) {
        let chunk = (PAR_MIN / 4).div_ceil(cols) * cols;
        threads::pool().chunks_mut(out, chunk, |j, o| run(j * chunk, o));
    } else {
        run(0, out);
    }
}

/// Whether `len` elements are worth the kernel threads.
fn parallel(len: usize) -> bool {
    len >= PAR_MIN && threads::num_threads() > 1
}

/// Checks that `epsilon` is finite and positive.
fn check_epsilon(op: &'static str, epsilon: f32) -> Result<()> {
    if epsilon.is_finite() && epsilon > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op,
            what: format!("epsilon {epsilon} must be finite and greater than 0"),
        })
    }
}

/// Checks that every per-column buffer has `cols` elements.
fn check_cols(op: &'static str, cols: usize, buffers: &[(&'static str, usize)]) -> Result<()> {
    buffers
        .iter()
        .try_for_each(|&(what, len)| check_len(op, what, len, cols))
}

/// `k` column sums of a `[rows, cols]` matrix into `out` (`[k, cols]`, row-major, overwritten).
///
/// `block(rows, c0, acc)` adds the terms of rows `rows` and columns `c0..c0 + w` into `acc`
/// (`[k, w]`, row-major, zeroed), each column row after row. Row blocks of [`ROW_BLOCK`] and
/// column chunks of [`COL_BLOCK`] are fixed by the shape; the block sums are added in block order,
/// so the result does not depend on the thread count.
fn column_sums<F>(rows: usize, cols: usize, k: usize, out: &mut [f32], block: F)
where
    F: Fn(Range<usize>, usize, &mut [f32]) + Sync,
{
    debug_assert_eq!(out.len(), k * cols);
    if rows == 0 || cols == 0 {
        out.fill(0.0);
        return;
    }
    let blocks = rows.div_ceil(ROW_BLOCK);
    let stride = k * cols;
    let chunk = k * COL_BLOCK;
    let range = |b: usize| b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(rows);
    // Block `b`'s sums at `partial[b * stride..]`, chunk `j` (columns from `j * COL_BLOCK`) at
    // `k * j * COL_BLOCK` within it, laid out `[k, w]`.
    let mut partial = vec![0.0f32; blocks * stride];
    if parallel(rows * cols) {
        // One item a row block when there are enough of them, else one a column chunk (the same
        // sums either way: each (block, chunk) is computed alone).
        let pool = threads::pool();
        if blocks >= threads::num_threads() {
            pool.chunks_mut(&mut partial, stride, |b, p| {
                for (j, acc) in p.chunks_mut(chunk).enumerate() {
                    block(range(b), j * COL_BLOCK, acc);
                }
            });
        } else {
            for (b, p) in partial.chunks_mut(stride).enumerate() {
                pool.chunks_mut(p, chunk, |j, acc| block(range(b), j * COL_BLOCK, acc));
            }
        }
    } else {
        for (b, p) in partial.chunks_mut(stride).enumerate() {
            for (j, acc) in p.chunks_mut(chunk).enumerate() {
                block(range(b), j * COL_BLOCK, acc);
            }
        }
    }
    for c0 in (0..cols).step_by(COL_BLOCK) {
        let w = COL_BLOCK.min(cols - c0);
        for q in 0..k {
            let at = k * c0 + q * w;
            let o = &mut out[q * cols + c0..][..w];
            o.copy_from_slice(&partial[at..at + w]);
            for p in partial[stride..].chunks_exact(stride) {
                for (o, s) in o.iter_mut().zip(&p[at..at + w]) {
                    *o += s;
                }
            }
        }
    }
}

/// The batch statistics of every column of `x` (`[rows, cols]`, row-major, channels last):
/// `mean[c]` and the biased variance `var[c] = mean_r((x[r, c] - mean[c])^2)` (divided by
/// `rows`, as Keras's `BatchNormalization` normalizes with), in float32.
///
/// Two passes for accuracy: the mean first, then the sum of squared deviations from it, each
/// summed as the [module](self) describes (bit-identical whatever the thread count). A column
/// holding NaN gets NaN statistics; the other columns are unaffected.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x`, `mean` or `var`; [`Error::InvalidArgument`] naming
/// `rows` when it is 0 (an empty batch has no statistics), or when `rows * cols` overflows.
/// Nothing is written on error.
pub fn moments<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    mean: &mut [f32],
    var: &mut [f32],
) -> Result<()> {
    const OP: &str = "moments";
    check_len(OP, "x", x.len(), matrix_len(OP, rows, cols)?)?;
    check_cols(OP, cols, &[("mean", mean.len()), ("var", var.len())])?;
    if rows == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("rows is 0: a batch of no rows (and {cols} columns) has no mean"),
        });
    }
    let isa = Isa::detect();
    let n = rows as f32;
    column_sums(rows, cols, 1, mean, |r, c0, acc| {
        widened_rows(isa, [x], cols, r, c0, acc.len(), |[xr]| {
            for (a, v) in acc.iter_mut().zip(xr) {
                *a += v;
            }
        });
    });
    for m in mean.iter_mut() {
        *m /= n;
    }
    let mean: &[f32] = mean;
    column_sums(rows, cols, 1, var, |r, c0, acc| {
        let m = &mean[c0..c0 + acc.len()];
        widened_rows(isa, [x], cols, r, c0, acc.len(), |[xr]| {
            for ((a, v), m) in acc.iter_mut().zip(xr).zip(m) {
                let d = v - m;
                *a += d * d;
            }
        });
    });
    for v in var.iter_mut() {
        *v /= n;
    }
    Ok(())
}

/// Batch normalization of `x` (`[rows, cols]`, row-major, channels last) into `y`:
/// `y = gamma * (x - mean) / sqrt(var + epsilon) + beta` per column, in float32 (computed as
/// `(x - mean) * (gamma * inv_std) + beta`, `inv_std` once per column), rounded once to `T`.
///
/// Training passes the batch's statistics ([`moments`]), inference the moving ones. Keras's
/// `center=False` / `scale=False` are `beta = 0` / `gamma = 1`. NaN or infinities in `x` or the
/// statistics propagate (a negative `var + epsilon` gives NaN).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x`, `mean`, `var`, `gamma`, `beta` or `y`;
/// [`Error::InvalidArgument`] naming `epsilon` when it is not finite and positive, or when
/// `rows * cols` overflows. Nothing is written on error.
#[allow(clippy::too_many_arguments)]
pub fn normalize<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    y: &mut [T],
) -> Result<()> {
    let stats = Stats {
        mean,
        var,
        gamma,
        beta: Some(beta),
        epsilon,
    };
    normalize_impl("normalize", x, rows, cols, stats, false, y)
}

/// [`normalize`] followed by ReLU (`y = x` if `x > 0`, `+0` if `x <= 0`, NaN if NaN, as
/// [`crate::activation`] defines it), in one pass: the same bits as the two ops one after the
/// other (ReLU commutes with the rounding to `T`), without writing and reading the normalized
/// tensor in between. What a `BatchNormalization` followed by a ReLU `Activation` runs.
///
/// # Errors
/// As [`normalize`], naming `normalize_relu`.
#[allow(clippy::too_many_arguments)]
pub fn normalize_relu<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    y: &mut [T],
) -> Result<()> {
    let stats = Stats {
        mean,
        var,
        gamma,
        beta: Some(beta),
        epsilon,
    };
    normalize_impl("normalize_relu", x, rows, cols, stats, true, y)
}

/// A normalization's per-column statistics and affine parameters.
#[derive(Clone, Copy)]
struct Stats<'a> {
    mean: &'a [f32],
    var: &'a [f32],
    gamma: &'a [f32],
    /// `None` where nothing reads it (the plain backward).
    beta: Option<&'a [f32]>,
    epsilon: f32,
}

impl Stats<'_> {
    /// Checks the lengths (`cols` each) and epsilon.
    fn check(&self, op: &'static str, cols: usize) -> Result<()> {
        check_cols(
            op,
            cols,
            &[
                ("mean", self.mean.len()),
                ("var", self.var.len()),
                ("gamma", self.gamma.len()),
            ],
        )?;
        if let Some(beta) = self.beta {
            check_cols(op, cols, &[("beta", beta.len())])?;
        }
        check_epsilon(op, self.epsilon)
    }

    /// `gamma * inv_std` per column: what the forward multiplies `x - mean` by.
    fn scale(&self) -> Vec<f32> {
        self.gamma
            .iter()
            .zip(self.var)
            .map(|(g, v)| g * inv_std(*v, self.epsilon))
            .collect()
    }
}

/// [`normalize`], then ReLU when `relu`.
fn normalize_impl<T: Element>(
    op: &'static str,
    x: &[T],
    rows: usize,
    cols: usize,
    p: Stats<'_>,
    relu: bool,
    y: &mut [T],
) -> Result<()> {
    let len = matrix_len(op, rows, cols)?;
    check_len(op, "x", x.len(), len)?;
    p.check(op, cols)?;
    check_len(op, "y", y.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let scale = p.scale();
    let (mean, beta) = (p.mean, p.beta.unwrap_or_default());
    map_rows(Isa::detect(), [x], cols, y, |c0, [xr], yr| {
        let w = yr.len();
        let per_col = mean[c0..c0 + w]
            .iter()
            .zip(&scale[c0..c0 + w])
            .zip(&beta[c0..c0 + w]);
        if relu {
            for ((o, v), ((m, s), b)) in yr.iter_mut().zip(xr).zip(per_col) {
                let t = (v - m) * s + b;
                // Not `t <= 0`: NaN passes through, as the activation's ReLU does.
                *o = if t > 0.0 || t.is_nan() { t } else { 0.0 };
            }
        } else {
            for ((o, v), ((m, s), b)) in yr.iter_mut().zip(xr).zip(per_col) {
                *o = (v - m) * s + b;
            }
        }
    });
    Ok(())
}

/// The largest float32 that rounds to zero (or below) in `T`: a value `v` of [`normalize`]
/// passes its ReLU, once rounded to `T`, exactly when `v > relu_floor::<T>()` (half the
/// smallest subnormal of `T`, a tie that rounds to the even zero; 0 for float32).
fn relu_floor<T: Element>() -> f32 {
    match T::DTYPE {
        mp_core::DType::F16 => (-25f32).exp2(),
        mp_core::DType::BF16 => f32::from_bits(1 << 16), // 2^-134
        _ => 0.0,
    }
}

/// The training-mode gradient of [`normalize`]: `mean` and `var` are the batch statistics of
/// `x` ([`moments`]), so the gradient flows through them too.
///
/// With `xhat = (x - mean) * inv_std`, per column: `dbeta += sum_r dy` and
/// `dgamma += sum_r dy * xhat` (they **accumulate**: float32 gradient buffers), and
/// `dx = gamma * inv_std * (dy - sum_r(dy) / rows - xhat * sum_r(dy * xhat) / rows)`, which is
/// `gamma * inv_std / rows * (rows * dy - sum dy - xhat * sum(dy * xhat))`, rounded once to `T`.
/// The two sums are taken in one pass, in float32, in the fixed order the [module](self)
/// describes. `rows == 0` leaves everything as it is (`dx` is empty, the sums are zero).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x`, `dy`, `mean`, `var`, `gamma`, `dx`, `dgamma` or
/// `dbeta`; [`Error::InvalidArgument`] naming `epsilon` when it is not finite and positive, or
/// when `rows * cols` overflows. Nothing is written on error.
#[allow(clippy::too_many_arguments)]
pub fn normalize_backward<T: Element>(
    x: &[T],
    dy: &[T],
    rows: usize,
    cols: usize,
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    epsilon: f32,
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    // Backward does not read beta; the ReLU variant does.
    let stats = Stats {
        mean,
        var,
        gamma,
        beta: None,
        epsilon,
    };
    backward_impl(
        "normalize_backward",
        x,
        dy,
        rows,
        cols,
        stats,
        false,
        dx,
        dgamma,
        dbeta,
    )
}

/// The training-mode gradient of [`normalize_relu`]: [`normalize_backward`] of ReLU's
/// gradient, `dy` where the forward's output was positive, `dy * 0` where it was not, NaN where
/// it was NaN, with the forward's output recomputed from `x` (no saved output, no pass to form
/// ReLU's gradient): the same bits as the two backward ops one after the other.
///
/// # Errors
/// As [`normalize_backward`] (`beta` checked too), naming `normalize_relu_backward`.
#[allow(clippy::too_many_arguments)]
pub fn normalize_relu_backward<T: Element>(
    x: &[T],
    dy: &[T],
    rows: usize,
    cols: usize,
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let stats = Stats {
        mean,
        var,
        gamma,
        beta: Some(beta),
        epsilon,
    };
    backward_impl(
        "normalize_relu_backward",
        x,
        dy,
        rows,
        cols,
        stats,
        true,
        dx,
        dgamma,
        dbeta,
    )
}

/// [`normalize_backward`], of [`normalize_relu`] when `relu`.
#[allow(clippy::too_many_arguments)]
fn backward_impl<T: Element>(
    op: &'static str,
    x: &[T],
    dy: &[T],
    rows: usize,
    cols: usize,
    p: Stats<'_>,
    relu: bool,
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let len = matrix_len(op, rows, cols)?;
    check_len(op, "x", x.len(), len)?;
    check_len(op, "dy", dy.len(), len)?;
    p.check(op, cols)?;
    check_len(op, "dx", dx.len(), len)?;
    check_cols(
        op,
        cols,
        &[("dgamma", dgamma.len()), ("dbeta", dbeta.len())],
    )?;
    if len == 0 {
        return Ok(());
    }
    // Empty for the plain backward, which never indexes it.
    let (mean, beta) = (p.mean, p.beta.unwrap_or_default());
    let inv: Vec<f32> = p.var.iter().map(|v| inv_std(*v, p.epsilon)).collect();
    // ReLU's gradient from the recomputed forward output: `v = (x - m) * s + b` as the forward
    // computed it, positive once rounded to T exactly when above `floor`.
    let scale = if relu { p.scale() } else { Vec::new() };
    let floor = relu_floor::<T>();
    // sums[..cols]: sum dy; sums[cols..]: sum dy * xhat.
    let mut sums = vec![0.0f32; 2 * cols];
    let isa = Isa::detect();
    column_sums(rows, cols, 2, &mut sums, |r, c0, acc| {
        let w = acc.len() / 2;
        let (sdy, sdyx) = acc.split_at_mut(w);
        let (m, s) = (&mean[c0..c0 + w], &inv[c0..c0 + w]);
        widened_rows(isa, [x, dy], cols, r, c0, w, |[xr, dr]| {
            if relu {
                let cols = ReluCols {
                    mean: m,
                    inv: s,
                    scale: &scale[c0..c0 + w],
                    beta: &beta[c0..c0 + w],
                    floor,
                };
                relu_sums_row(isa, cols, xr, dr, sdy, sdyx);
                return;
            }
            let sums = sdy.iter_mut().zip(sdyx.iter_mut());
            let per_col = m.iter().zip(s);
            for (((a, b), (v, d)), (m, s)) in sums.zip(xr.iter().zip(dr)).zip(per_col) {
                *a += d;
                *b += d * xhat(*v, *m, *s);
            }
        });
    });
    let (sum_dy, sum_dyx) = sums.split_at(cols);
    let n = rows as f32;
    let mean_dy: Vec<f32> = sum_dy.iter().map(|s| s / n).collect();
    let mean_dyx: Vec<f32> = sum_dyx.iter().map(|s| s / n).collect();
    let gs: Vec<f32> = p.gamma.iter().zip(&inv).map(|(g, s)| g * s).collect();
    map_rows(isa, [x, dy], cols, dx, |c0, [xr, dr], or| {
        let w = or.len();
        let stats = mean[c0..c0 + w].iter().zip(&inv[c0..c0 + w]);
        let means = mean_dy[c0..c0 + w].iter().zip(&mean_dyx[c0..c0 + w]);
        let per_col = stats.zip(means).zip(&gs[c0..c0 + w]);
        if relu {
            let cols = ReluCols {
                mean: &mean[c0..c0 + w],
                inv: &inv[c0..c0 + w],
                scale: &scale[c0..c0 + w],
                beta: &beta[c0..c0 + w],
                floor,
            };
            let means = [&mean_dy[c0..c0 + w], &mean_dyx[c0..c0 + w], &gs[c0..c0 + w]];
            relu_dx_row(isa, cols, means, xr, dr, or);
            return;
        }
        for ((o, (v, d)), (((m, s), (m1, m2)), g)) in
            or.iter_mut().zip(xr.iter().zip(dr)).zip(per_col)
        {
            *o = g * ((d - m1) - xhat(*v, *m, *s) * m2);
        }
    });
    for (g, s) in dgamma.iter_mut().zip(sum_dyx) {
        *g += s;
    }
    for (b, s) in dbeta.iter_mut().zip(sum_dy) {
        *b += s;
    }
    Ok(())
}

/// Per-column values of a row piece of [`normalize_relu_backward`]: the batch mean and
/// `inv_std`, the forward's scale and beta, and the ReLU floor of the element type.
#[derive(Clone, Copy)]
struct ReluCols<'a> {
    mean: &'a [f32],
    inv: &'a [f32],
    scale: &'a [f32],
    beta: &'a [f32],
    floor: f32,
}

/// ReLU's gradient factor of an element `v` of a column: 1 where the forward's output
/// (`(v - mean) * scale + beta`, rounded to the element type) is positive, NaN where it is NaN,
/// else 0. Two selects, no branch, so the loops around it vectorize.
#[inline(always)]
fn relu_factor(v: f32, m: f32, s: f32, b: f32, floor: f32) -> f32 {
    let t = (v - m) * s + b;
    let k = if t > floor { 1.0 } else { 0.0 };
    if t.is_nan() { t } else { k }
}

/// One row piece of the sums of [`normalize_relu_backward`]: `sdy += g`, `sdyx += g * xhat`
/// with `g = dy * relu_factor`.
#[inline(always)]
fn relu_sums_body(p: ReluCols<'_>, xr: &[f32], dr: &[f32], sdy: &mut [f32], sdyx: &mut [f32]) {
    let sums = sdy.iter_mut().zip(sdyx.iter_mut());
    let fwd = p.scale.iter().zip(p.beta);
    let per_col = p.mean.iter().zip(p.inv).zip(fwd);
    for (((a, b), (v, d)), ((m, s), (sf, bf))) in sums.zip(xr.iter().zip(dr)).zip(per_col) {
        let d = d * relu_factor(*v, *m, *sf, *bf, p.floor);
        *a += d;
        *b += d * xhat(*v, *m, *s);
    }
}

/// One row piece of `dx` of [`normalize_relu_backward`]; `means` holds `mean(dy)`,
/// `mean(dy xhat)` and `gamma inv_std` per column.
#[inline(always)]
fn relu_dx_body(p: ReluCols<'_>, means: [&[f32]; 3], xr: &[f32], dr: &[f32], or: &mut [f32]) {
    let [m1, m2, gs] = means;
    let stats = p.mean.iter().zip(p.inv);
    let per_col = stats.zip(m1.iter().zip(m2)).zip(gs);
    let fwd = p.scale.iter().zip(p.beta);
    for ((o, (v, d)), ((((m, s), (m1, m2)), g), (sf, bf))) in
        or.iter_mut().zip(xr.iter().zip(dr)).zip(per_col.zip(fwd))
    {
        let d = d * relu_factor(*v, *m, *sf, *bf, p.floor);
        *o = g * ((d - m1) - xhat(*v, *m, *s) * m2);
    }
}

/// The AVX-512 build of [`relu_sums_body`] (the same operations in the same order, the same
/// bits; the portable build is SSE2-wide and bound by its arithmetic here).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn relu_sums_avx512(
    p: ReluCols<'_>,
    xr: &[f32],
    dr: &[f32],
    sdy: &mut [f32],
    sdyx: &mut [f32],
) {
    relu_sums_body(p, xr, dr, sdy, sdyx)
}

/// The AVX-512 build of [`relu_dx_body`].
///
/// # Safety
/// As for [`relu_sums_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn relu_dx_avx512(
    p: ReluCols<'_>,
    means: [&[f32]; 3],
    xr: &[f32],
    dr: &[f32],
    or: &mut [f32],
) {
    relu_dx_body(p, means, xr, dr, or)
}

/// [`relu_sums_body`] on the widest build `isa` runs.
fn relu_sums_row(
    isa: Isa,
    p: ReluCols<'_>,
    xr: &[f32],
    dr: &[f32],
    sdy: &mut [f32],
    sdyx: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Bf16) {
        // SAFETY: `isa` is the detected one, so the CPU supports AVX-512.
        return unsafe { relu_sums_avx512(p, xr, dr, sdy, sdyx) };
    }
    let _ = isa;
    relu_sums_body(p, xr, dr, sdy, sdyx)
}

/// [`relu_dx_body`] on the widest build `isa` runs.
fn relu_dx_row(
    isa: Isa,
    p: ReluCols<'_>,
    means: [&[f32]; 3],
    xr: &[f32],
    dr: &[f32],
    or: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Bf16) {
        // SAFETY: as in `relu_sums_row`.
        return unsafe { relu_dx_avx512(p, means, xr, dr, or) };
    }
    let _ = isa;
    relu_dx_body(p, means, xr, dr, or)
}
