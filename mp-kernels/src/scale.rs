//! Scaling by a scalar, elementwise addition (residual connections), the fused unscale + all-finite check of loss scaling, and the finiteness
//! test.
//!
//! [`Cpu::unscale_and_check`](crate::Cpu::unscale_and_check) is what
//! `LossScaleOptimizer::get_unscaled_gradients` runs on each float32 gradient: one pass that
//! multiplies by `inv_scale` and reports whether every result is finite.
//! The caller computes `inv_scale = (1.0 / scale as f64) as f32`: exact for the power-of-two
//! scales dynamic loss scaling uses, so unscaling a gradient is then exact too (unless the
//! result underflows into float32's subnormal range).
//!
//! ```
//! use mp_kernels::Cpu;
//!
//! let cpu = Cpu::global()?;
//! let scale = 32768.0f32;
//! let inv_scale = (1.0 / scale as f64) as f32;
//! let mut g = [3.0 * 32768.0, -0.5 * 32768.0];
//! assert!(cpu.unscale_and_check(&mut g, inv_scale));
//! assert_eq!(g, [3.0, -0.5]);
//! let mut g = [1.0, f32::INFINITY];
//! assert!(!cpu.unscale_and_check(&mut g, inv_scale));
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::{DType, Element};

use crate::cast::exec::{par_all, par_each, par_each_all, par_zip};
use crate::isa::Isa;

/// See [`crate::Cpu::scale`].
pub(crate) fn scale<T: Element>(isa: Isa, x: &mut [T], s: f32) {
    let isa = isa.or_scalar();
    par_each(x, |x| scale_chunk(isa, x, s));
}

/// See [`crate::Cpu::add_assign`]: `y = y + x`, widened to float32, added, rounded once to `T`,
/// 16 lanes at a time in registers (a 16-bit residual add had gone through float32 tiles in
/// memory and was slower than float32's).
pub(crate) fn add_assign<T: Element>(isa: Isa, x: &[T], y: &mut [T]) {
    let isa = isa.or_scalar();
    par_zip(x, 1, y, 1, |x: &[T], y: &mut [T]| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; two slices of equal length, `y` distinct from `x`.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::add_avx512(x, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::add_avx2(x, y) },
        _ => {
            for (y, x) in y.iter_mut().zip(x) {
                *y = T::from_f32(y.to_f32() + x.to_f32());
            }
        }
    });
}

/// See [`crate::Cpu::clip`].
pub(crate) fn clip(x: &mut [f32], lo: f32, hi: f32) {
    par_each(x, |x| {
        for v in x.iter_mut() {
            // Comparisons, not `max`/`min`: a NaN fails both and stays NaN.
            if *v < lo {
                *v = lo;
            } else if *v > hi {
                *v = hi;
            }
        }
    });
}

/// See [`crate::Cpu::moving_average`].
pub(crate) fn moving_average(value: &mut [f32], batch: &[f32], momentum: f32) {
    for (v, b) in value.iter_mut().zip(batch) {
        *v = *v * momentum + *b * (1.0 - momentum);
    }
}

/// See [`crate::Cpu::unscale_and_check`].
pub(crate) fn unscale_and_check(isa: Isa, grads: &mut [f32], inv_scale: f32) -> bool {
    let isa = isa.or_scalar();
    par_each_all(grads, |g| unscale_chunk(isa, g, inv_scale))
}

/// See [`crate::Cpu::all_finite`].
pub(crate) fn all_finite<T: Element>(isa: Isa, x: &[T]) -> bool {
    let isa = isa.or_scalar();
    par_all(x, |x| finite_chunk(isa, x))
}

fn scale_chunk<T: Element>(isa: Isa, x: &mut [T], s: f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked; one buffer in place.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::scale_avx512(x, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::scale_avx2(x, s) },
        _ => x.iter_mut().for_each(|v| *v = T::from_f32(v.to_f32() * s)),
    }
}

fn unscale_chunk(isa: Isa, g: &mut [f32], s: f32) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::unscale_avx512(g, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx2 => unsafe { x86::unscale_avx2(g, s) },
        _ => {
            let mut ok = true;
            for v in g {
                *v *= s;
                ok &= v.is_finite();
            }
            ok
        }
    }
}

/// The exponent field of each dtype: all ones means infinite or NaN.
const fn exponent_mask(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0x7f80_0000,
        DType::F16 => 0x7c00,
        DType::BF16 => 0x7f80,
    }
}

fn finite_chunk<T: Element>(isa: Isa, x: &[T]) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::finite_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked.
        Isa::Avx2 => unsafe { x86::finite_avx2(x) },
        _ => x.iter().fold(true, |ok, v| ok & v.is_finite()),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use mp_core::{DType, Element};

    use super::exponent_mask;
    use crate::cast::x86::{map_avx2, map_avx512, map2_avx2, map2_avx512, tail_mask16};

    /// `vfpclassps` categories: QNaN, +inf, -inf, SNaN.
    const NON_FINITE: i32 = 0x01 | 0x08 | 0x10 | 0x80;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn scale_avx512<T: Element>(x: &mut [T], s: f32) {
        let sv = _mm512_set1_ps(s);
        let p = x.as_mut_ptr();
        // SAFETY: one buffer of `x.len()` elements, in place.
        unsafe { map_avx512(x.len(), p.cast_const(), p, |v| _mm512_mul_ps(v, sv)) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_avx2<T: Element>(x: &mut [T], s: f32) {
        let sv = _mm256_set1_ps(s);
        let p = x.as_mut_ptr();
        // SAFETY: one buffer of `x.len()` elements, in place.
        unsafe { map_avx2(x.len(), p.cast_const(), p, |v| _mm256_mul_ps(v, sv)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn add_avx512<T: Element>(x: &[T], y: &mut [T]) {
        let n = x.len().min(y.len());
        let p = y.as_mut_ptr();
        // SAFETY: `n` elements of each; `y` is read and written in place, lane for lane.
        unsafe { map2_avx512(n, p.cast_const(), x.as_ptr(), p, |a, b| _mm512_add_ps(a, b)) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn add_avx2<T: Element>(x: &[T], y: &mut [T]) {
        let n = x.len().min(y.len());
        let p = y.as_mut_ptr();
        // SAFETY: as above.
        unsafe { map2_avx2(n, p.cast_const(), x.as_ptr(), p, |a, b| _mm256_add_ps(a, b)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn unscale_avx512(g: &mut [f32], s: f32) -> bool {
        let sv = _mm512_set1_ps(s);
        let n = g.len();
        let p = g.as_mut_ptr();
        let mut bad: __mmask16 = 0;
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 16 <= n {
                let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), sv);
                bad |= _mm512_fpclass_ps_mask::<NON_FINITE>(v);
                _mm512_storeu_ps(p.add(i), v);
                i += 16;
            }
            if i < n {
                let k = tail_mask16(n - i);
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), sv);
                bad |= _mm512_mask_fpclass_ps_mask::<NON_FINITE>(k, v);
                _mm512_mask_storeu_ps(p.add(i), k, v);
            }
        }
        bad == 0
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unscale_avx2(g: &mut [f32], s: f32) -> bool {
        let sv = _mm256_set1_ps(s);
        let exp = _mm256_set1_epi32(0x7f80_0000);
        let n = g.len();
        let p = g.as_mut_ptr();
        let mut bad = _mm256_setzero_si256();
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            while i + 8 <= n {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sv);
                let e = _mm256_and_si256(_mm256_castps_si256(v), exp);
                bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, exp));
                _mm256_storeu_ps(p.add(i), v);
                i += 8;
            }
        }
        let mut ok = _mm256_testz_si256(bad, bad) == 1;
        for v in &mut g[i..] {
            *v *= s;
            ok &= v.is_finite();
        }
        ok
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn finite_avx512<T: Element>(x: &[T]) -> bool {
        let n = x.len();
        let mut i = 0;
        // SAFETY: every access is below `n`.
        unsafe {
            if T::DTYPE == DType::F32 {
                let p = x.as_ptr().cast::<f32>();
                let mut bad: __mmask16 = 0;
                while i + 16 <= n {
                    bad |= _mm512_fpclass_ps_mask::<NON_FINITE>(_mm512_loadu_ps(p.add(i)));
                    i += 16;
                }
                if i < n {
                    let k = tail_mask16(n - i);
                    bad |= _mm512_fpclass_ps_mask::<NON_FINITE>(_mm512_maskz_loadu_ps(k, p.add(i)));
                }
                bad == 0
            } else {
                // 32 raw 16-bit values at a time: non-finite means an all-ones exponent.
                let p = x.as_ptr().cast::<i16>();
                let m = _mm512_set1_epi16(exponent_mask(T::DTYPE) as i16);
                let mut bad: __mmask32 = 0;
                while i + 32 <= n {
                    let v = _mm512_and_si512(_mm512_loadu_si512(p.add(i).cast()), m);
                    bad |= _mm512_cmpeq_epi16_mask(v, m);
                    i += 32;
                }
                if i < n {
                    let k = ((1u64 << (n - i)) - 1) as __mmask32;
                    let v = _mm512_and_si512(_mm512_maskz_loadu_epi16(k, p.add(i)), m);
                    bad |= _mm512_cmpeq_epi16_mask(v, m);
                }
                bad == 0
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn finite_avx2<T: Element>(x: &[T]) -> bool {
        let n = x.len();
        let mut i = 0;
        let mut bad = _mm256_setzero_si256();
        // SAFETY: every access is below `n`.
        unsafe {
            if T::DTYPE == DType::F32 {
                let p = x.as_ptr().cast::<__m256i>().cast::<u8>();
                let m = _mm256_set1_epi32(exponent_mask(DType::F32) as i32);
                while i + 8 <= n {
                    let v = _mm256_and_si256(_mm256_loadu_si256(p.add(4 * i).cast()), m);
                    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(v, m));
                    i += 8;
                }
            } else {
                let p = x.as_ptr().cast::<u8>();
                let m = _mm256_set1_epi16(exponent_mask(T::DTYPE) as i16);
                while i + 16 <= n {
                    let v = _mm256_and_si256(_mm256_loadu_si256(p.add(2 * i).cast()), m);
                    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(v, m));
                    i += 16;
                }
            }
        }
        _mm256_testz_si256(bad, bad) == 1 && x[i..].iter().all(|v| v.is_finite())
    }
}
