//! Reductions: the bias gradient (column sums), the row argmax, and sums.
//!
//! All of them accumulate in float32 (sums of blocks are added in float64) in an order fixed by
//! the shape alone, never by the thread count or the timing, so results are bit-identical from
//! run to run; [`Cpu::bias_grad`](crate::Cpu::bias_grad) is also bit-identical across
//! instruction sets (each column is summed row after row, whatever the vector width).
//!
//! ```
//! use mp_kernels::Cpu;
//!
//! let cpu = Cpu::global()?;
//! let dy = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 rows, 3 columns
//! let mut db = [0.0f32; 3];
//! cpu.bias_grad(&dy, 2, 3, &mut db, false)?;
//! assert_eq!(db, [5.0, 7.0, 9.0]);
//! let mut idx = [0u32; 2];
//! cpu.argmax_rows(&[0.1f32, 0.7, 0.7, 0.2, f32::NAN, 9.0], 2, 3, &mut idx)?;
//! assert_eq!(idx, [1, 1]); // ties give the first, NaN wins
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;

use crate::cast::exec::{PAR_MIN, check_isa, ordered_sum, par_zip};
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::threads;

/// The most rows summed in one block of [`bias_grad`] (more rows: equal blocks of at most this
/// many, then added in order).
const ROW_BLOCK: usize = 2048;
/// Columns per task of [`bias_grad`] when it runs on the pool.
const COL_BLOCK: usize = 256;
/// Elements per block of [`sum`] (summed in float32 lanes, then added in float64).
const SUM_BLOCK: usize = 4096;

/// `rows * cols`, or an error naming the shape when it overflows.
pub(crate) fn matrix_len(op: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .ok_or_else(|| Error::InvalidArgument {
            op,
            what: format!("shape [{rows}, {cols}] has more elements than fit in memory"),
        })
}

/// See [`crate::Cpu::bias_grad`].
pub(crate) fn bias_grad<T: Element>(
    isa: Isa,
    dy: &[T],
    rows: usize,
    cols: usize,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "bias_grad";
    check_len(OP, "dy", dy.len(), matrix_len(OP, rows, cols)?)?;
    check_len(OP, "out", out.len(), cols)?;
    check_isa(OP, isa)?;
    let par = dy.len() >= PAR_MIN && threads::num_threads() > 1;
    if rows <= ROW_BLOCK {
        if par {
            threads::pool().chunks_mut(out, COL_BLOCK, |j, o| {
                col_sums(isa, dy, rows, cols, j * COL_BLOCK, o, accumulate);
            });
        } else {
            col_sums(isa, dy, rows, cols, 0, out, accumulate);
        }
        return Ok(());
    }
    // Several row blocks of equal size (a block of 2048 and one of 128 rows left one thread
    // with 94% of the work): block sums first, then added in block order. The blocks depend on
    // `rows` only, so the sums do not depend on the thread count.
    let blocks = rows.div_ceil(ROW_BLOCK);
    let per = rows.div_ceil(blocks);
    let mut partial = vec![0.0f32; blocks * cols];
    let block = |(b, p): (usize, &mut [f32])| {
        let r0 = b * per;
        let nr = per.min(rows - r0);
        col_sums(isa, &dy[r0 * cols..(r0 + nr) * cols], nr, cols, 0, p, false);
    };
    if par {
        threads::pool().chunks_mut(&mut partial, cols, |b, p| block((b, p)));
    } else {
        partial.chunks_mut(cols).enumerate().for_each(block);
    }
    let (first, rest) = partial.split_at(cols);
    for (c, o) in out.iter_mut().enumerate() {
        let mut s = first[c];
        for p in rest.chunks_exact(cols) {
            s += p[c];
        }
        *o = if accumulate { *o + s } else { s };
    }
    Ok(())
}

/// Sums the rows of `dy` (`rows` x `cols`, row-major) for columns `c0..c0 + out.len()`.
fn col_sums<T: Element>(
    isa: Isa,
    dy: &[T],
    rows: usize,
    cols: usize,
    c0: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    debug_assert!(dy.len() >= rows * cols && c0 + out.len() <= cols);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; the bounds are asserted above.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
            x86::col_sums_avx512(dy, rows, cols, c0, out, accumulate)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::col_sums_avx2(dy, rows, cols, c0, out, accumulate) },
        _ => {
            // 64 columns at a time into a stack accumulator: each column summed row after row,
            // then added to `out`, the same order as the vector paths.
            for (j, o) in out.chunks_mut(64).enumerate() {
                let c = c0 + 64 * j;
                let mut acc = [0.0f32; 64];
                for r in 0..rows {
                    let row = &dy[r * cols + c..r * cols + c + o.len()];
                    for (a, v) in acc.iter_mut().zip(row) {
                        *a += v.to_f32();
                    }
                }
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = if accumulate { *o + a } else { a };
                }
            }
        }
    }
}

/// See [`crate::Cpu::argmax_rows`].
pub(crate) fn argmax_rows<T: Element>(
    isa: Isa,
    x: &[T],
    rows: usize,
    cols: usize,
    out: &mut [u32],
) -> Result<()> {
    const OP: &str = "argmax_rows";
    check_len(OP, "x", x.len(), matrix_len(OP, rows, cols)?)?;
    check_len(OP, "out", out.len(), rows)?;
    if cols == 0 && rows > 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            what: "cols is 0: a row with no elements has no argmax".into(),
        });
    }
    if u32::try_from(cols).is_err() {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("cols {cols} does not fit in u32"),
        });
    }
    check_isa(OP, isa)?;
    if rows == 0 {
        return Ok(());
    }
    par_zip(x, cols, out, 1, |x, out| {
        for (row, o) in x.chunks_exact(cols).zip(out) {
            *o = argmax_row(isa, row) as u32;
        }
    });
    Ok(())
}

/// The scalar rule: first NaN, else first maximum.
fn argmax_scalar<T: Element>(row: &[T]) -> usize {
    let mut best = f32::NEG_INFINITY;
    let mut idx = 0;
    for (i, v) in row.iter().enumerate() {
        let v = v.to_f32();
        if v.is_nan() {
            return i;
        }
        if v > best {
            best = v;
            idx = i;
        }
    }
    idx
}

fn argmax_row<T: Element>(isa: Isa, row: &[T]) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx512 | Isa::Avx512Bf16 if row.len() >= 32 => unsafe { x86::argmax_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx2 if row.len() >= 16 => unsafe { x86::argmax_avx2(row) },
        _ => argmax_scalar(row),
    }
}

/// See [`crate::Cpu::sum`].
pub(crate) fn sum<T: Element>(isa: Isa, x: &[T]) -> f32 {
    sum_f64(isa.or_scalar(), x) as f32
}

/// See [`crate::Cpu::sum_squares`].
pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    ordered_sum(x.len(), SUM_BLOCK, x.len(), |r| {
        // Eight float64 accumulators, lanewise, so the loop vectorises and is not one serial
        // chain of adds.
        let mut acc = [0.0f64; 8];
        let mut chunks = x[r].chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let v = f64::from(v);
                *a += v * v;
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum();
        acc.iter().sum::<f64>() + tail
    })
}

/// See [`crate::Cpu::mean`].
pub(crate) fn mean<T: Element>(isa: Isa, x: &[T]) -> f32 {
    (sum_f64(isa.or_scalar(), x) / x.len() as f64) as f32
}

fn sum_f64<T: Element>(isa: Isa, x: &[T]) -> f64 {
    ordered_sum(x.len(), SUM_BLOCK, x.len(), |r| {
        f64::from(block_sum(isa, &x[r]))
    })
}

/// One block's float32 sum.
fn block_sum<T: Element>(isa: Isa, x: &[T]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked by the caller.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::sum_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::sum_avx2(x) },
        _ => {
            // Eight accumulators, like a vector, so the scalar path is not a long serial chain.
            let mut acc = [0.0f32; 8];
            let mut chunks = x.chunks_exact(8);
            for c in &mut chunks {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a += v.to_f32();
                }
            }
            for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
                *a += v.to_f32();
            }
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use mp_core::Element;

    use super::argmax_scalar;
    use crate::cast::x86::{
        hmax256, hsum256, load8, load8_partial, load16, load16_mask, tail_mask16,
    };

    /// Column sums over 64, 16, then a masked tail of columns at a time.
    ///
    /// # Safety
    /// AVX-512 available; `dy` holds `rows * cols` elements; `c0 + out.len() <= cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn col_sums_avx512<T: Element>(
        dy: &[T],
        rows: usize,
        cols: usize,
        c0: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let w = out.len();
        let p = dy.as_ptr();
        let o = out.as_mut_ptr();
        let mut c = 0;
        // SAFETY: every row access is `r * cols + c0 + c + k` with `c + k < w`, inside `dy`; the
        // output accesses are below `w`.
        unsafe {
            let finish = |o: *mut f32, acc: __m512, k: __mmask16| {
                let acc = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(k, o), acc)
                } else {
                    acc
                };
                _mm512_mask_storeu_ps(o, k, acc);
            };
            while c + 64 <= w {
                let mut a = [_mm512_setzero_ps(); 4];
                for r in 0..rows {
                    let q = p.add(r * cols + c0 + c);
                    for (j, a) in a.iter_mut().enumerate() {
                        *a = _mm512_add_ps(*a, load16(q.add(16 * j)));
                    }
                }
                for (j, a) in a.iter().enumerate() {
                    finish(o.add(c + 16 * j), *a, 0xffff);
                }
                c += 64;
            }
            while c < w {
                let k = if c + 16 <= w {
                    0xffff
                } else {
                    tail_mask16(w - c)
                };
                let mut a = _mm512_setzero_ps();
                for r in 0..rows {
                    a = _mm512_add_ps(a, load16_mask(p.add(r * cols + c0 + c), k));
                }
                finish(o.add(c), a, k);
                c += 16;
            }
        }
    }

    /// Column sums over 32, 8, then a buffered tail of columns at a time.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C available; bounds as [`col_sums_avx512`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn col_sums_avx2<T: Element>(
        dy: &[T],
        rows: usize,
        cols: usize,
        c0: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        let w = out.len();
        let p = dy.as_ptr();
        let mut c = 0;
        // SAFETY: as in `col_sums_avx512`; partial loads read only `w - c` elements.
        unsafe {
            while c + 32 <= w {
                let mut a = [_mm256_setzero_ps(); 4];
                for r in 0..rows {
                    let q = p.add(r * cols + c0 + c);
                    for (j, a) in a.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, load8(q.add(8 * j)));
                    }
                }
                for (j, a) in a.iter().enumerate() {
                    let mut s = [0.0f32; 8];
                    _mm256_storeu_ps(s.as_mut_ptr(), *a);
                    finish(&mut out[c + 8 * j..c + 8 * j + 8], &s, accumulate);
                }
                c += 32;
            }
            while c < w {
                let m = (w - c).min(8);
                let mut a = _mm256_setzero_ps();
                for r in 0..rows {
                    let q = p.add(r * cols + c0 + c);
                    a = _mm256_add_ps(
                        a,
                        if m == 8 {
                            load8(q)
                        } else {
                            load8_partial(q, m)
                        },
                    );
                }
                let mut s = [0.0f32; 8];
                _mm256_storeu_ps(s.as_mut_ptr(), a);
                finish(&mut out[c..c + m], &s[..m], accumulate);
                c += m;
            }
        }
    }

    fn finish(out: &mut [f32], s: &[f32], accumulate: bool) {
        for (o, s) in out.iter_mut().zip(s) {
            *o = if accumulate { *o + s } else { *s };
        }
    }

    /// # Safety
    /// AVX-512 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn sum_avx512<T: Element>(x: &[T]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut a = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 64 <= n {
                for (j, a) in a.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, load16(p.add(i + 16 * j)));
                }
                i += 64;
            }
            while i < n {
                let k = if i + 16 <= n {
                    0xffff
                } else {
                    tail_mask16(n - i)
                };
                a[0] = _mm512_add_ps(a[0], load16_mask(p.add(i), k));
                i += 16;
            }
        }
        let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// AVX2 + FMA + F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn sum_avx2<T: Element>(x: &[T]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 32 <= n {
                for (j, a) in a.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, load8(p.add(i + 8 * j)));
                }
                i += 32;
            }
            while i < n {
                let m = (n - i).min(8);
                let v = if m == 8 {
                    load8(p.add(i))
                } else {
                    load8_partial(p.add(i), m)
                };
                a[0] = _mm256_add_ps(a[0], v);
                i += m;
            }
        }
        hsum256(_mm256_add_ps(
            _mm256_add_ps(a[0], a[1]),
            _mm256_add_ps(a[2], a[3]),
        ))
    }

    /// First NaN, else first maximum: a vector pass for NaN and the maximum, then a vector search
    /// for the first lane equal to it.
    ///
    /// # Safety
    /// AVX-512 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn argmax_avx512<T: Element>(row: &[T]) -> usize {
        let n = row.len();
        let p = row.as_ptr();
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut nan: __mmask16 = 0;
        let mut i = 0;
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        // SAFETY: every access is below `n`.
        unsafe {
            while i < n {
                let k = if i + 16 <= n {
                    0xffff
                } else {
                    tail_mask16(n - i)
                };
                let v = _mm512_mask_mov_ps(neg_inf, k, load16_mask(p.add(i), k));
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                mx = _mm512_max_ps(mx, v);
                i += 16;
            }
            if nan != 0 {
                return argmax_scalar(row);
            }
            let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            let mut i = 0;
            while i < n {
                let k = if i + 16 <= n {
                    0xffff
                } else {
                    tail_mask16(n - i)
                };
                let eq = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(k, load16_mask(p.add(i), k), m);
                if eq != 0 {
                    return i + eq.trailing_zeros() as usize;
                }
                i += 16;
            }
        }
        0
    }

    /// As [`argmax_avx512`], 8 lanes at a time.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn argmax_avx2<T: Element>(row: &[T]) -> usize {
        let n = row.len();
        let p = row.as_ptr();
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut nan = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 8 <= n {
                let v = load8(p.add(i));
                nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                mx = _mm256_max_ps(mx, v);
                i += 8;
            }
        }
        if _mm256_movemask_ps(nan) != 0 || row[i..].iter().any(|v| v.to_f32().is_nan()) {
            return argmax_scalar(row);
        }
        let m = row[i..].iter().fold(hmax256(mx), |m, v| m.max(v.to_f32()));
        let mv = _mm256_set1_ps(m);
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 8 <= n {
                let eq = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(load8(p.add(i)), mv));
                if eq != 0 {
                    return i + eq.trailing_zeros() as usize;
                }
                i += 8;
            }
        }
        i + row[i..].iter().position(|v| v.to_f32() == m).unwrap_or(0)
    }
}
