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
//! large mean does not cancel the spread). Row sums use sixteen float32 lanes. Rows run on
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

use crate::cast::cast_chunk;
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
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

/// Sixteen-lane float32 sum of `f(a[i], b[i])`: lane `l` sums the elements `i ≡ l mod 16`
/// below the last multiple of 16 in order, the lanes are added in a fixed tree, then the tail
/// summed in order (the same bits on every instruction set; written over 16-element chunks so
/// that it vectorises, with a dependency chain of `n / 16` additions).
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let (ac, at) = a.as_chunks::<16>();
    let (bc, bt) = b[..a.len()].as_chunks::<16>();
    let mut acc = [0.0f32; 16];
    for (ac, bc) in ac.iter().zip(bc) {
        acc = std::array::from_fn(|l| acc[l] + f(ac[l], bc[l]));
    }
    let mut tail = 0.0f32;
    for (&x, &y) in at.iter().zip(bt) {
        tail += f(x, y);
    }
    let h: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let q: [f32; 4] = std::array::from_fn(|l| h[l] + h[l + 4]);
    ((q[0] + q[2]) + (q[1] + q[3])) + tail
}

/// `x` as float32: itself when `T` is float32, else widened into the front of `buf` (one cast
/// for a whole block of rows, not one per row).
#[inline(always)]
fn widened<'a, T: Element>(isa: Isa, x: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    match crate::norm::as_f32(x) {
        Some(x) => x,
        None => {
            let buf = &mut buf[..x.len()];
            cast_chunk(isa, x, buf);
            buf
        }
    }
}

/// The forward of one block of rows from `r0` (`yb` holds whole rows); `scratch` holds `2 *
/// yb.len()` float32. Compiled for each instruction set by [`forward_rows`] (no fused
/// multiply-add, so the bits do not depend on it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_block<T: Element>(
    isa: Isa,
    x: &[T],
    (cols, r0): (usize, usize),
    (gamma, beta, epsilon): (&[f32], &[f32], f32),
    yb: &mut [T],
    mb: &mut [f32],
    sb: &mut [f32],
    scratch: &mut [f32],
) {
    let len = yb.len();
    let (xbuf, ybuf) = scratch.split_at_mut(len);
    let xw = widened(isa, &x[r0 * cols..][..len], xbuf);
    let direct = crate::norm::as_f32(yb).is_some();
    {
        let yw: &mut [f32] = match crate::norm::as_f32_mut(yb) {
            Some(y) => y,
            None => &mut ybuf[..len],
        };
        let rows = xw.chunks_exact(cols).zip(yw.chunks_exact_mut(cols));
        for (r, (xf, yr)) in rows.enumerate() {
            let m = lane_sum(xf, xf, |x, _| x) / cols as f32;
            let v = lane_sum(xf, xf, |x, _| (x - m) * (x - m)) / cols as f32;
            let s = 1.0 / (v + epsilon).sqrt();
            normalize_row(xf, m, s, gamma, beta, yr);
            mb[r] = m;
            sb[r] = s;
        }
    }
    if !direct {
        cast_chunk(isa, &ybuf[..len], yb);
    }
}

/// The backward of one block of rows from `r0` (`dxb` holds whole rows): writes `dx` and
/// returns nothing; the block's parameter gradients go to `dgam` and `dbet` (`cols` each,
/// zeroed here). `scratch` holds `3 * dxb.len() + 2 * cols` float32: `x` and `dy` are widened a
/// block at a time (not a row at a time: a cast call per 64-element row cost more than the
/// row's arithmetic) and, for 16-bit `T`, `dx` is rounded a block at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_block<T: Element>(
    isa: Isa,
    (x, dy): (&[T], &[T]),
    (cols, r0): (usize, usize),
    (gamma, mean, inv_std): (&[f32], &[f32], &[f32]),
    dxb: &mut [T],
    (dgam, dbet): (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    dgam.fill(0.0);
    dbet.fill(0.0);
    let len = dxb.len();
    let (xbuf, rest) = scratch.split_at_mut(len);
    let (dbuf, rest) = rest.split_at_mut(len);
    let (obuf, rest) = rest.split_at_mut(len);
    let (xh, g) = rest[..2 * cols].split_at_mut(cols);
    let xw = widened(isa, &x[r0 * cols..][..len], xbuf);
    let dw = widened(isa, &dy[r0 * cols..][..len], dbuf);
    let direct = crate::norm::as_f32(dxb).is_some();
    {
        let out: &mut [f32] = match crate::norm::as_f32_mut(dxb) {
            Some(d) => d,
            None => obuf,
        };
        let rows = xw.chunks_exact(cols).zip(dw.chunks_exact(cols));
        for (r, ((xr, df), or)) in rows.zip(out.chunks_exact_mut(cols)).enumerate() {
            let (m, s) = (mean[r0 + r], inv_std[r0 + r]);
            // Zipped, not indexed: indexing five slices of unknown length kept this loop scalar.
            let terms = xh
                .iter_mut()
                .zip(g.iter_mut())
                .zip(xr.iter().zip(df).zip(gamma));
            let sums = dgam.iter_mut().zip(dbet.iter_mut());
            for (((xh, g), ((&x, &d), &gm)), (dga, dbe)) in terms.zip(sums) {
                *xh = (x - m) * s;
                *g = d * gm;
                *dga += d * *xh;
                *dbe += d;
            }
            let mean_g = lane_sum(g, g, |g, _| g) / cols as f32;
            let mean_gx = lane_sum(g, xh, |g, x| g * x) / cols as f32;
            for ((o, &g), &xh) in or.iter_mut().zip(&*g).zip(&*xh) {
                *o = s * (g - mean_g - xh * mean_gx);
            }
        }
    }
    if !direct {
        cast_chunk(isa, &scratch[2 * len..3 * len], dxb);
    }
}

/// The same code compiled for AVX-512 and AVX2 (wider vectors for the same arithmetic).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// # Safety
    /// AVX-512 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn forward_avx512<T: Element>(
        isa: Isa,
        x: &[T],
        shape: (usize, usize),
        params: (&[f32], &[f32], f32),
        yb: &mut [T],
        mb: &mut [f32],
        sb: &mut [f32],
        scratch: &mut [f32],
    ) {
        forward_block(isa, x, shape, params, yb, mb, sb, scratch)
    }

    /// # Safety
    /// AVX2 + FMA + F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn forward_avx2<T: Element>(
        isa: Isa,
        x: &[T],
        shape: (usize, usize),
        params: (&[f32], &[f32], f32),
        yb: &mut [T],
        mb: &mut [f32],
        sb: &mut [f32],
        scratch: &mut [f32],
    ) {
        forward_block(isa, x, shape, params, yb, mb, sb, scratch)
    }

    /// # Safety
    /// AVX-512 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn backward_avx512<T: Element>(
        isa: Isa,
        xs: (&[T], &[T]),
        shape: (usize, usize),
        params: (&[f32], &[f32], &[f32]),
        dxb: &mut [T],
        grads: (&mut [f32], &mut [f32]),
        scratch: &mut [f32],
    ) {
        backward_block(isa, xs, shape, params, dxb, grads, scratch)
    }

    /// # Safety
    /// AVX2 + FMA + F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn backward_avx2<T: Element>(
        isa: Isa,
        xs: (&[T], &[T]),
        shape: (usize, usize),
        params: (&[f32], &[f32], &[f32]),
        dxb: &mut [T],
        grads: (&mut [f32], &mut [f32]),
        scratch: &mut [f32],
    ) {
        backward_block(isa, xs, shape, params, dxb, grads, scratch)
    }
}

/// [`forward_block`] on the best build for `isa` (one this CPU supports).
#[allow(clippy::too_many_arguments)]
fn forward_rows<T: Element>(
    isa: Isa,
    x: &[T],
    shape: (usize, usize),
    params: (&[f32], &[f32], f32),
    yb: &mut [T],
    mb: &mut [f32],
    sb: &mut [f32],
    scratch: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported by this CPU (it came from `Isa::detect`).
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            x86::forward_avx512(isa, x, shape, params, yb, mb, sb, scratch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::forward_avx2(isa, x, shape, params, yb, mb, sb, scratch) },
        _ => forward_block(isa, x, shape, params, yb, mb, sb, scratch),
    }
}

/// [`backward_block`] on the best build for `isa` (one this CPU supports).
fn backward_rows<T: Element>(
    isa: Isa,
    xs: (&[T], &[T]),
    shape: (usize, usize),
    params: (&[f32], &[f32], &[f32]),
    dxb: &mut [T],
    grads: (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported by this CPU (it came from `Isa::detect`).
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            x86::backward_avx512(isa, xs, shape, params, dxb, grads, scratch)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::backward_avx2(isa, xs, shape, params, dxb, grads, scratch) },
        _ => backward_block(isa, xs, shape, params, dxb, grads, scratch),
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
    // Each block of rows writes its own rows of y and its statistics in place.
    let run = |b: usize, yb: &mut [T], mb: &mut [f32], sb: &mut [f32]| {
        threads::with_scratch(2 * yb.len(), |scratch| {
            let shape = (cols, b * ROWS_PER_BLOCK);
            let params = (gamma, beta, epsilon);
            forward_rows(isa, x, shape, params, yb, mb, sb, scratch)
        })
    };
    let block = ROWS_PER_BLOCK * cols;
    if len >= crate::cast::exec::PAR_MIN && threads::num_threads() > 1 {
        threads::pool().chunks_mut3(
            (y, block),
            (mean, ROWS_PER_BLOCK),
            (inv_std, ROWS_PER_BLOCK),
            run,
        );
    } else {
        for (b, ((yb, mb), sb)) in y
            .chunks_mut(block)
            .zip(mean.chunks_mut(ROWS_PER_BLOCK))
            .zip(inv_std.chunks_mut(ROWS_PER_BLOCK))
            .enumerate()
        {
            run(b, yb, mb, sb);
        }
    }
    Ok(())
}

/// `y = (x - m) * s * gamma + beta`, one row, in float32.
#[inline]
fn normalize_row(x: &[f32], m: f32, s: f32, gamma: &[f32], beta: &[f32], y: &mut [f32]) {
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = (x - m) * s * g + b;
    }
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
    // Each block of rows writes its own rows of dx and returns its partial parameter gradients,
    // added in block order below.
    let run = |b: usize, dxb: &mut [T]| {
        let (mut dgam, mut dbet) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        threads::with_scratch(3 * dxb.len() + 2 * cols, |scratch| {
            let shape = (cols, b * ROWS_PER_BLOCK);
            let params = (gamma, mean, inv_std);
            let grads = (&mut dgam[..], &mut dbet[..]);
            backward_rows(isa, (x, dy), shape, params, dxb, grads, scratch)
        });
        (dgam, dbet)
    };
    let block = ROWS_PER_BLOCK * cols;
    let out: Vec<(Vec<f32>, Vec<f32>)> =
        if len >= crate::cast::exec::PAR_MIN && threads::num_threads() > 1 {
            threads::pool().map_chunks_mut(dx, block, run)
        } else {
            dx.chunks_mut(block)
                .enumerate()
                .map(|(b, d)| run(b, d))
                .collect()
        };
    let mut sum_gamma = vec![0.0f32; cols];
    let mut sum_beta = vec![0.0f32; cols];
    for (dgam, dbet) in out {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction set this CPU runs gives the scalar build's bits, forward and backward,
    /// for rows of any width (chunks of 16 and a tail) and blocks of any height.
    fn isas_agree<T: Element>() {
        let mut rng = mp_core::Rng::new(0x1a2b_3c4d);
        for (rows, cols) in [(1, 1), (5, 17), (64, 64), (70, 100), (3, 48)] {
            let len = rows * cols;
            let x: Vec<T> = (0..len)
                .map(|_| T::from_f32(rng.uniform(-3.0, 3.0)))
                .collect();
            let dy: Vec<T> = (0..len)
                .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
                .collect();
            let gamma: Vec<f32> = (0..cols).map(|_| rng.uniform(0.5, 1.5)).collect();
            let beta: Vec<f32> = (0..cols).map(|_| rng.uniform(-0.5, 0.5)).collect();
            let run = |isa: Isa| {
                let block = len.min(ROWS_PER_BLOCK * cols);
                let (mut y, mut m, mut s) =
                    (vec![T::ZERO; block], vec![0.0; rows], vec![0.0; rows]);
                let mut scratch = vec![0.0f32; 3 * block + 2 * cols];
                let (mb, sb) = (&mut m[..block / cols], &mut s[..block / cols]);
                forward_rows(
                    isa,
                    &x,
                    (cols, 0),
                    (&gamma, &beta, 1e-3),
                    &mut y,
                    mb,
                    sb,
                    &mut scratch,
                );
                let mut dx = vec![T::ZERO; block];
                let (mut dg, mut db) = (vec![0.0f32; cols], vec![0.0f32; cols]);
                let params = (&gamma[..], &m[..], &s[..]);
                backward_rows(
                    isa,
                    (&x, &dy),
                    (cols, 0),
                    params,
                    &mut dx,
                    (&mut dg, &mut db),
                    &mut scratch,
                );
                let bits = |v: &[T]| v.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
                let fbits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                (
                    bits(&y),
                    fbits(&m),
                    fbits(&s),
                    bits(&dx),
                    fbits(&dg),
                    fbits(&db),
                )
            };
            let reference = run(Isa::Scalar);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                assert!(
                    run(isa) == reference,
                    "{isa:?} {:?} {rows}x{cols}",
                    T::DTYPE
                );
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_scalar_bits() {
        isas_agree::<f32>();
        isas_agree::<half::bf16>();
        isas_agree::<half::f16>();
    }
}
