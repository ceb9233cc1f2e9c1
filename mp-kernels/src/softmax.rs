//! Row softmax, its gradient, and sparse categorical cross-entropy with its fused gradients, all
//! in float32 math whatever the input dtype (the mixed precision guide's float32 softmax). The
//! kernels are methods of [`Cpu`](crate::Cpu):
//!
//! - [`Cpu::softmax`](crate::Cpu::softmax): `y = e^(x - max) / sum e^(x - max)` per row of a
//!   `[rows, cols]` matrix;
//! - [`Cpu::softmax_backward`](crate::Cpu::softmax_backward): `dx = (dy - sum(dy * y)) * y` per
//!   row;
//! - [`Cpu::softmax_cross_entropy`](crate::Cpu::softmax_cross_entropy): the mean sparse
//!   categorical cross-entropy, from logits (exact log-softmax) or from probabilities (Keras'
//!   rule: each row divided by its sum, clipped to `[1e-7, 1 - 1e-7]`, then `-ln`), with
//!   [`Cpu::softmax_cross_entropy_rows`](crate::Cpu::softmax_cross_entropy_rows) for per-row
//!   losses;
//! - [`Cpu::softmax_cross_entropy_grad`](crate::Cpu::softmax_cross_entropy_grad): the fused
//!   gradient with respect to the logits of a model ending in a float32 softmax,
//!   `scale * (p - onehot(label)) / rows`, with the loss scale folded in (`scale = 1` for the
//!   plain gradient);
//! - [`Cpu::crossentropy_grad_probs`](crate::Cpu::crossentropy_grad_probs): the gradient of the
//!   from-probabilities loss with respect to the probabilities.
//!
//! Non-finite data propagates: a NaN in a row makes that row's softmax all NaN, and so does
//! `+inf` (`inf - inf` is NaN), as in TensorFlow. A row of `-inf` is NaN too. Labels are checked
//! before anything is written: a label outside `0..cols` (or negative) is
//! [`Error::InvalidArgument`] naming the row and the label.
//!
//! Accuracy: the SIMD `exp` is within about 2 ulps; softmax outputs are within 1e-6 (absolute)
//! of the float64 value, losses within a few float32 ulps of it (relative).

use std::fmt;

use mp_core::Element;

use crate::cast::exec::{check_isa, ordered_sum, par_zip, par_zip2};
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::reduce::matrix_len;

/// Keras' `epsilon()`: probabilities are clipped to `[EPSILON, 1 - EPSILON]` before the log.
pub const EPSILON: f32 = 1e-7;

/// An integer class label (`u8`, `u16`, `u32`, `u64`, `usize`, `i32`, `i64`).
pub trait Label: Copy + Send + Sync + fmt::Debug + fmt::Display + 'static {
    /// The class index, or `None` when negative or too large for `usize`.
    fn index(self) -> Option<usize>;

    /// The label as a signed integer (to compare with an ignored class such as -1), `None`
    /// when it does not fit `i64`.
    fn value(self) -> Option<i64>;
}

macro_rules! impl_label {
    ($($t:ty),*) => {$(
        impl Label for $t {
            #[inline]
            fn index(self) -> Option<usize> {
                usize::try_from(self).ok()
            }

            #[inline]
            fn value(self) -> Option<i64> {
                i64::try_from(self).ok()
            }
        }
    )*};
}
impl_label!(u8, u16, u32, u64, usize, i32, i64);

/// Checks `labels` (one per row, each in `0..cols`) before anything is computed or written.
pub(crate) fn check_labels<L: Label>(
    op: &'static str,
    labels: &[L],
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_len(op, "labels", labels.len(), rows)?;
    for (row, &l) in labels.iter().enumerate() {
        if l.index().is_none_or(|i| i >= cols) {
            return Err(Error::InvalidArgument {
                op,
                what: format!("labels[{row}] = {l} is out of range for {cols} classes"),
            });
        }
    }
    Ok(())
}

/// See [`crate::Cpu::softmax`].
pub(crate) fn softmax<T: Element>(
    isa: Isa,
    x: &[T],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "softmax";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    check_isa(OP, isa)?;
    if n == 0 {
        return Ok(());
    }
    par_zip(x, cols, out, cols, |x, out| {
        for (x, y) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
            softmax_row(isa, x, y);
        }
    });
    Ok(())
}

/// See [`crate::Cpu::softmax_backward`].
pub(crate) fn softmax_backward(
    isa: Isa,
    y: &[f32],
    dy: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
) -> Result<()> {
    const OP: &str = "softmax_backward";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "y", y.len(), n)?;
    check_len(OP, "dy", dy.len(), n)?;
    check_len(OP, "dx", dx.len(), n)?;
    check_isa(OP, isa)?;
    if n == 0 {
        return Ok(());
    }
    par_zip2((y, cols), (dy, cols), (dx, cols), |y, dy, dx| {
        for ((y, dy), dx) in y
            .chunks_exact(cols)
            .zip(dy.chunks_exact(cols))
            .zip(dx.chunks_exact_mut(cols))
        {
            let s = dot(isa, dy, y);
            axpy_row(isa, dy, s, y, dx);
        }
    });
    Ok(())
}

/// See [`crate::Cpu::softmax_cross_entropy`].
pub(crate) fn softmax_cross_entropy<L: Label>(
    isa: Isa,
    input: &[f32],
    labels: &[L],
    rows: usize,
    cols: usize,
    from_logits: bool,
) -> Result<f32> {
    const OP: &str = "softmax_cross_entropy";
    check_len(OP, "input", input.len(), matrix_len(OP, rows, cols)?)?;
    check_labels(OP, labels, rows, cols)?;
    check_isa(OP, isa)?;
    if rows == 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            what: "rows is 0: the mean loss of an empty batch is undefined".into(),
        });
    }
    // Fixed blocks of rows, added in order: the same sum whatever the thread count.
    let block = (1 << 14) / cols.max(1) + 1;
    let total = ordered_sum(rows, block, input.len(), |r| {
        r.map(|i| {
            let row = &input[i * cols..(i + 1) * cols];
            let label = labels[i].index().unwrap_or(0);
            f64::from(row_loss(isa, row, label, from_logits))
        })
        .sum()
    });
    Ok((total / rows as f64) as f32)
}

/// See [`crate::Cpu::softmax_cross_entropy_rows`].
pub(crate) fn softmax_cross_entropy_rows<L: Label>(
    isa: Isa,
    input: &[f32],
    labels: &[L],
    rows: usize,
    cols: usize,
    from_logits: bool,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy_rows";
    check_len(OP, "input", input.len(), matrix_len(OP, rows, cols)?)?;
    check_labels(OP, labels, rows, cols)?;
    check_len(OP, "out", out.len(), rows)?;
    check_isa(OP, isa)?;
    if rows == 0 {
        return Ok(());
    }
    par_zip2((input, cols), (labels, 1), (out, 1), |x, l, out| {
        for ((row, l), o) in x.chunks_exact(cols).zip(l).zip(out) {
            *o = row_loss(isa, row, l.index().unwrap_or(0), from_logits);
        }
    });
    Ok(())
}

/// See [`crate::Cpu::softmax_cross_entropy_grad`].
pub(crate) fn softmax_cross_entropy_grad<L: Label>(
    isa: Isa,
    probs: &[f32],
    labels: &[L],
    rows: usize,
    cols: usize,
    scale: f32,
    dlogits: &mut [f32],
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy_grad";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "probs", probs.len(), n)?;
    check_labels(OP, labels, rows, cols)?;
    check_len(OP, "dlogits", dlogits.len(), n)?;
    check_isa(OP, isa)?;
    if n == 0 {
        return Ok(());
    }
    let factor = (f64::from(scale) / rows as f64) as f32;
    par_zip2((probs, cols), (labels, 1), (dlogits, cols), |p, l, d| {
        for ((p, l), d) in p.chunks_exact(cols).zip(l).zip(d.chunks_exact_mut(cols)) {
            let label = l.index().unwrap_or(0);
            // (p - onehot) * factor: the scaled probabilities, then the label entry redone.
            scale_row(isa, p, factor, d);
            d[label] = (p[label] - 1.0) * factor;
        }
    });
    Ok(())
}

/// See [`crate::Cpu::crossentropy_grad_probs`].
pub(crate) fn crossentropy_grad_probs<L: Label>(
    isa: Isa,
    probs: &[f32],
    labels: &[L],
    rows: usize,
    cols: usize,
    scale: f32,
    dprobs: &mut [f32],
) -> Result<()> {
    const OP: &str = "crossentropy_grad_probs";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "probs", probs.len(), n)?;
    check_labels(OP, labels, rows, cols)?;
    check_len(OP, "dprobs", dprobs.len(), n)?;
    check_isa(OP, isa)?;
    if n == 0 {
        return Ok(());
    }
    let factor = (f64::from(scale) / rows as f64) as f32;
    par_zip2((probs, cols), (labels, 1), (dprobs, cols), |p, l, d| {
        for ((p, l), d) in p.chunks_exact(cols).zip(l).zip(d.chunks_exact_mut(cols)) {
            let label = l.index().unwrap_or(0);
            let s = row_sum(isa, p);
            let q = p[label] / s;
            // A NaN `q` (a NaN probability, or S = 0) is handled below.
            let clipped = !(EPSILON..=ONE_MINUS_EPSILON).contains(&q);
            let inv_s = 1.0 / s;
            let g = if clipped { 0.0 } else { inv_s * factor };
            d.iter_mut().for_each(|d| *d = g);
            d[label] = if clipped {
                0.0
            } else {
                (inv_s - 1.0 / p[label]) * factor
            };
            if q.is_nan() {
                d.iter_mut().for_each(|d| *d = q);
            }
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Row kernels.
// ---------------------------------------------------------------------------------------------

/// Keras' upper clip `1 - epsilon()`, computed in float64 and rounded to float32 (0.99999988).
const ONE_MINUS_EPSILON: f32 = (1.0f64 - 1e-7) as f32;

/// One row's loss (the label already checked).
fn row_loss(isa: Isa, row: &[f32], label: usize, from_logits: bool) -> f32 {
    if from_logits {
        let m = row_max(isa, row);
        let s = exp_sum(isa, row, m, None);
        s.ln() - (row[label] - m)
    } else {
        let s = row_sum(isa, row);
        let q = (row[label] / s).clamp(EPSILON, ONE_MINUS_EPSILON);
        -q.ln()
    }
}

fn softmax_row<T: Element>(isa: Isa, x: &[T], y: &mut [f32]) {
    let m = row_max(isa, x);
    let s = exp_sum(isa, x, m, Some(y));
    div_row(isa, y, s);
}

/// The largest element (NaN may or may not win: a NaN row gives NaN outputs either way, since
/// `e^(NaN - m)` is NaN).
fn row_max<T: Element>(isa: Isa, x: &[T]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked by the public entry point.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::max_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::max_avx2(x) },
        _ => x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f32())),
    }
}

/// `sum e^(x - m)`, also storing each term into `out` when given.
fn exp_sum<T: Element>(isa: Isa, x: &[T], m: f32, out: Option<&mut [f32]>) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; `out`, when given, has `x.len()` elements.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::exp_sum_avx512(x, m, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::exp_sum_avx2(x, m, out) },
        _ => match out {
            Some(out) => {
                let mut s = 0.0f32;
                for (o, v) in out.iter_mut().zip(x) {
                    *o = (v.to_f32() - m).exp();
                    s += *o;
                }
                s
            }
            None => x.iter().map(|v| (v.to_f32() - m).exp()).sum(),
        },
    }
}

fn div_row(isa: Isa, y: &mut [f32], s: f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::div_avx512(y, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::div_avx2(y, s) },
        _ => y.iter_mut().for_each(|v| *v /= s),
    }
}

fn row_sum(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::dot_avx512(x, None) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_avx2(x, None) },
        _ => x.iter().sum(),
    }
}

fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; equal lengths.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::dot_avx512(a, Some(b)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_avx2(a, Some(b)) },
        _ => a.iter().zip(b).map(|(a, b)| a * b).sum(),
    }
}

/// `dx = (dy - s) * y`.
fn axpy_row(isa: Isa, dy: &[f32], s: f32, y: &[f32], dx: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; equal lengths.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::axpy_avx512(dy, s, y, dx) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::axpy_avx2(dy, s, y, dx) },
        _ => {
            for ((d, g), y) in dx.iter_mut().zip(dy).zip(y) {
                *d = (g - s) * y;
            }
        }
    }
}

/// `d = p * f`.
fn scale_row(isa: Isa, p: &[f32], f: f32, d: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; equal lengths.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::scale_avx512(p, f, d) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::scale_avx2(p, f, d) },
        _ => d.iter_mut().zip(p).for_each(|(d, p)| *d = p * f),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use mp_core::Element;

    use crate::cast::x86::{
        exp256, exp512, hmax256, hsum256, load8, load8_partial, load16_mask, map_avx2, map_avx512,
        map2_avx2, map2_avx512, tail_mask16,
    };

    /// The mask of the lanes of the vector at `i` that lie below `n`.
    #[inline]
    fn mask_at(i: usize, n: usize) -> __mmask16 {
        if i + 16 <= n {
            0xffff
        } else {
            tail_mask16(n - i)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn max_avx512<T: Element>(x: &[T]) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut m = neg_inf;
        let mut i = 0;
        while i < n {
            let k = mask_at(i, n);
            // SAFETY: the mask keeps the load below `n`.
            let v = unsafe { load16_mask(p.add(i), k) };
            m = _mm512_max_ps(m, _mm512_mask_mov_ps(neg_inf, k, v));
            i += 16;
        }
        _mm512_reduce_max_ps(m)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn exp_sum_avx512<T: Element>(
        x: &[T],
        m: f32,
        mut out: Option<&mut [f32]>,
    ) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let mv = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = mask_at(i, n);
            // SAFETY: the mask keeps the loads and stores below `n` (`out` has `n` elements).
            unsafe {
                let e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(load16_mask(p.add(i), k), mv)));
                if let Some(o) = out.as_deref_mut() {
                    _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), k, e);
                }
                acc = _mm512_add_ps(acc, e);
            }
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn div_avx512(y: &mut [f32], s: f32) {
        let sv = _mm512_set1_ps(s);
        let p = y.as_mut_ptr();
        // SAFETY: one buffer in place.
        unsafe { map_avx512(y.len(), p.cast_const(), p, |v| _mm512_div_ps(v, sv)) }
    }

    /// `sum a * b`, or `sum a` without `b`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: Option<&[f32]>) -> f32 {
        let n = a.len();
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = mask_at(i, n);
            // SAFETY: the mask keeps the loads below `n`; `b` has `n` elements.
            unsafe {
                let v = _mm512_maskz_loadu_ps(k, a.as_ptr().add(i));
                acc = match b {
                    Some(b) => _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k, b.as_ptr().add(i)), acc),
                    None => _mm512_add_ps(acc, v),
                };
            }
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn axpy_avx512(dy: &[f32], s: f32, y: &[f32], dx: &mut [f32]) {
        let sv = _mm512_set1_ps(s);
        // SAFETY: three slices of equal length, `dx` distinct.
        unsafe {
            map2_avx512(
                dy.len(),
                dy.as_ptr(),
                y.as_ptr(),
                dx.as_mut_ptr(),
                |g, y| _mm512_mul_ps(_mm512_sub_ps(g, sv), y),
            )
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn scale_avx512(p: &[f32], f: f32, d: &mut [f32]) {
        let fv = _mm512_set1_ps(f);
        // SAFETY: equal lengths, distinct buffers.
        unsafe {
            map_avx512(p.len(), p.as_ptr(), d.as_mut_ptr(), |v| {
                _mm512_mul_ps(v, fv)
            })
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn max_avx2<T: Element>(x: &[T]) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: below `n`.
            m = _mm256_max_ps(m, unsafe { load8(p.add(i)) });
            i += 8;
        }
        x[i..].iter().fold(hmax256(m), |m, v| m.max(v.to_f32()))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_sum_avx2<T: Element>(
        x: &[T],
        m: f32,
        mut out: Option<&mut [f32]>,
    ) -> f32 {
        let (n, p) = (x.len(), x.as_ptr());
        let mv = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let c = (n - i).min(8);
            // SAFETY: full or partial loads and stores of `c` elements below `n`.
            unsafe {
                let v = if c == 8 {
                    load8(p.add(i))
                } else {
                    load8_partial(p.add(i), c)
                };
                let mut e = exp256(_mm256_sub_ps(v, mv));
                if c < 8 {
                    // Zero the lanes past the end so they add nothing.
                    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                    let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(c as i32), lanes);
                    e = _mm256_and_ps(e, _mm256_castsi256_ps(keep));
                }
                if let Some(o) = out.as_deref_mut() {
                    let mut buf = [0.0f32; 8];
                    _mm256_storeu_ps(buf.as_mut_ptr(), e);
                    o[i..i + c].copy_from_slice(&buf[..c]);
                }
                acc = _mm256_add_ps(acc, e);
            }
            i += c;
        }
        hsum256(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn div_avx2(y: &mut [f32], s: f32) {
        let sv = _mm256_set1_ps(s);
        let p = y.as_mut_ptr();
        // SAFETY: one buffer in place.
        unsafe { map_avx2(y.len(), p.cast_const(), p, |v| _mm256_div_ps(v, sv)) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: Option<&[f32]>) -> f32 {
        let n = a.len();
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let c = (n - i).min(8);
            // SAFETY: loads of `c` elements below `n`; `b` has `n` elements. Partial loads fill
            // the missing lanes with zeros, which add nothing.
            unsafe {
                let load = |s: &[f32]| {
                    if c == 8 {
                        load8(s.as_ptr().add(i))
                    } else {
                        load8_partial(s.as_ptr().add(i), c)
                    }
                };
                let v = load(a);
                acc = match b {
                    Some(b) => _mm256_fmadd_ps(v, load(b), acc),
                    None => _mm256_add_ps(acc, v),
                };
            }
            i += c;
        }
        hsum256(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_avx2(dy: &[f32], s: f32, y: &[f32], dx: &mut [f32]) {
        let sv = _mm256_set1_ps(s);
        // SAFETY: three slices of equal length, `dx` distinct.
        unsafe {
            map2_avx2(
                dy.len(),
                dy.as_ptr(),
                y.as_ptr(),
                dx.as_mut_ptr(),
                |g, y| _mm256_mul_ps(_mm256_sub_ps(g, sv), y),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_avx2(p: &[f32], f: f32, d: &mut [f32]) {
        let fv = _mm256_set1_ps(f);
        // SAFETY: equal lengths, distinct buffers.
        unsafe {
            map_avx2(p.len(), p.as_ptr(), d.as_mut_ptr(), |v| {
                _mm256_mul_ps(v, fv)
            })
        }
    }
}
