//! Layer normalization over the last axis: each row (a token's features, a sample's units) is
//! normalised by its own mean and variance, then scaled and shifted per column, as Keras's
//! `LayerNormalization(axis=-1)`.
//!
//! Inputs and outputs are any [`Element`] (float32, bfloat16, float16); the per-row statistics,
//! `gamma`, `beta` and their gradients are float32, and **all arithmetic is float32**, as
//! Keras 3 runs normalization under a mixed-precision policy (float16 statistics overflow:
//! tensorflow/models#10426). A value written in `T` is rounded once, from its float32 result.
//!
//! With `mean` and `var` (biased) of a row, `inv_std = 1 / sqrt(var + epsilon)` and
//! `xhat = (x - mean) * inv_std`:
//! - forward: `y = xhat * gamma + beta`;
//! - backward: `g = dy * gamma`, `dx = inv_std * (g - mean(g) - xhat * mean(g * xhat))`,
//!   `dgamma += sum_rows dy * xhat`, `dbeta += sum_rows dy`.
//!
//! The mean is taken first and the variance as the mean of `(x - mean)^2` (two passes, so a
//! large mean does not cancel the spread). Row sums use eight float32 lanes. Rows run on
//! [`crate::threads::pool`] in fixed blocks of [`ROWS_PER_BLOCK`]; the column sums of the
//! parameter gradients are summed per block and the blocks added in order, so every result is
//! bit-identical whatever the thread count. NaN and infinities propagate as IEEE says.
//!
//! ```
//! use mp_kernels::layer_norm::layer_norm;
//!
//! // 2 rows of 3 features.
//! let x = [1.0f32, 2.0, 3.0, 10.0, 10.0, 10.0];
//! let (mut y, mut mean, mut inv_std) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
//! layer_norm(&x, 2, 3, &[1.0; 3], &[0.0; 3], 1e-3, &mut y, &mut mean, &mut inv_std)?;
//! assert_eq!(mean, [2.0, 10.0]);
//! assert!(y[0] < 0.0 && y[1] == 0.0 && y[2] > 0.0);
//! assert_eq!(&y[3..], &[0.0, 0.0, 0.0]); // a constant row normalises to beta
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;
use rayon::prelude::*;

use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::norm::convert;
use crate::reduce::matrix_len;
use crate::threads;

/// Rows per task, and per partial sum of the parameter gradients.
pub const ROWS_PER_BLOCK: usize = 64;

fn check_epsilon(op: &'static str, epsilon: f32) -> Result<()> {
    if epsilon.is_finite() && epsilon > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op,
            what: format!("epsilon must be finite and positive, got {epsilon}"),
        })
    }
}

/// Eight-lane float32 sum of `f(i)` for `i < n`.
#[inline]
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += 8;
    }
    let mut tail = 0.0f32;
    for j in full..n {
        tail += f(j);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Runs `f(first_row, rows_of_block)` over fixed blocks of rows, on the pool when large.
fn for_blocks<R: Send>(rows: usize, cols: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    let run = |b: usize| {
        let r0 = b * ROWS_PER_BLOCK;
        f(r0, ROWS_PER_BLOCK.min(rows - r0))
    };
    if rows * cols >= crate::cast::exec::PAR_MIN && threads::num_threads() > 1 {
        threads::pool().install(|| (0..blocks).into_par_iter().map(run).collect())
    } else {
        (0..blocks).map(run).collect()
    }
}

/// Layer normalization of the `[rows, cols]` row-major `x` into `y`, with float32 `gamma` and
/// `beta` (`cols` long); writes each row's `mean` and `inv_std` (`rows` long), what
/// [`layer_norm_backward`] takes.
///
/// # Errors
/// [`Error::LengthMismatch`] naming a buffer of the wrong length; [`Error::InvalidArgument`]
/// for an epsilon that is not finite and positive. Nothing is written on error.
#[allow(
    clippy::too_many_arguments,
    reason = "the kernel's buffers, each named"
)]
pub fn layer_norm<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    y: &mut [T],
    mean: &mut [f32],
    inv_std: &mut [f32],
) -> Result<()> {
    const OP: &str = "layer_norm";
    let len = matrix_len(OP, rows, cols)?;
    check_len(OP, "x", x.len(), len)?;
    check_len(OP, "y", y.len(), len)?;
    check_len(OP, "gamma", gamma.len(), cols)?;
    check_len(OP, "beta", beta.len(), cols)?;
    check_len(OP, "mean", mean.len(), rows)?;
    check_len(OP, "inv_std", inv_std.len(), rows)?;
    check_epsilon(OP, epsilon)?;
    if len == 0 {
        mean.fill(f32::NAN);
        inv_std.fill(f32::NAN);
        return Ok(());
    }
    let isa = Isa::detect();
    let out = for_blocks(rows, cols, |r0, n| {
        let mut xf = vec![0.0f32; cols];
        let mut yb = vec![T::from_f32(0.0); n * cols];
        let mut stats = Vec::with_capacity(n);
        let mut yf = vec![0.0f32; cols];
        for r in 0..n {
            convert(isa, &x[(r0 + r) * cols..][..cols], &mut xf);
            let m = lane_sum(cols, |i| xf[i]) / cols as f32;
            let v = lane_sum(cols, |i| (xf[i] - m) * (xf[i] - m)) / cols as f32;
            let s = 1.0 / (v + epsilon).sqrt();
            for i in 0..cols {
                yf[i] = (xf[i] - m) * s * gamma[i] + beta[i];
            }
            convert(isa, &yf, &mut yb[r * cols..][..cols]);
            stats.push((m, s));
        }
        (yb, stats)
    });
    for (b, (yb, stats)) in out.into_iter().enumerate() {
        let r0 = b * ROWS_PER_BLOCK;
        y[r0 * cols..][..yb.len()].copy_from_slice(&yb);
        for (k, (m, s)) in stats.into_iter().enumerate() {
            mean[r0 + k] = m;
            inv_std[r0 + k] = s;
        }
    }
    Ok(())
}

/// The gradient of [`layer_norm`]: `dx` in `T` from `dy`, the forward's `x`, `gamma`, and the
/// `mean` and `inv_std` it wrote; adds the float32 gradients of gamma and beta into `dgamma`
/// and `dbeta`.
///
/// # Errors
/// [`Error::LengthMismatch`] naming a buffer of the wrong length. Nothing is written on error.
#[allow(
    clippy::too_many_arguments,
    reason = "the kernel's buffers, each named"
)]
pub fn layer_norm_backward<T: Element>(
    x: &[T],
    dy: &[T],
    rows: usize,
    cols: usize,
    gamma: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    dx: &mut [T],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    const OP: &str = "layer_norm_backward";
    let len = matrix_len(OP, rows, cols)?;
    for (what, l, want) in [
        ("x", x.len(), len),
        ("dy", dy.len(), len),
        ("dx", dx.len(), len),
        ("gamma", gamma.len(), cols),
        ("dgamma", dgamma.len(), cols),
        ("dbeta", dbeta.len(), cols),
        ("mean", mean.len(), rows),
        ("inv_std", inv_std.len(), rows),
    ] {
        check_len(OP, what, l, want)?;
    }
    if len == 0 {
        return Ok(());
    }
    let isa = Isa::detect();
    let out = for_blocks(rows, cols, |r0, n| {
        let (mut xf, mut df, mut g, mut dxf) = (
            vec![0.0f32; cols],
            vec![0.0f32; cols],
            vec![0.0f32; cols],
            vec![0.0f32; cols],
        );
        let mut dxb = vec![T::from_f32(0.0); n * cols];
        let (mut dgam, mut dbet) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        for r in 0..n {
            let row = r0 + r;
            convert(isa, &x[row * cols..][..cols], &mut xf);
            convert(isa, &dy[row * cols..][..cols], &mut df);
            let (m, s) = (mean[row], inv_std[row]);
            for i in 0..cols {
                // xf becomes xhat.
                xf[i] = (xf[i] - m) * s;
                g[i] = df[i] * gamma[i];
                dgam[i] += df[i] * xf[i];
                dbet[i] += df[i];
            }
            let mean_g = lane_sum(cols, |i| g[i]) / cols as f32;
            let mean_gx = lane_sum(cols, |i| g[i] * xf[i]) / cols as f32;
            for i in 0..cols {
                dxf[i] = s * (g[i] - mean_g - xf[i] * mean_gx);
            }
            convert(isa, &dxf, &mut dxb[r * cols..][..cols]);
        }
        (dxb, dgam, dbet)
    });
    let mut sum_gamma = vec![0.0f32; cols];
    let mut sum_beta = vec![0.0f32; cols];
    for (b, (dxb, dgam, dbet)) in out.into_iter().enumerate() {
        let r0 = b * ROWS_PER_BLOCK;
        dx[r0 * cols..][..dxb.len()].copy_from_slice(&dxb);
        for i in 0..cols {
            sum_gamma[i] += dgam[i];
            sum_beta[i] += dbet[i];
        }
    }
    for i in 0..cols {
        dgamma[i] += sum_gamma[i];
        dbeta[i] += sum_beta[i];
    }
    Ok(())
}
