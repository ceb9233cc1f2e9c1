//! x86-64 lane helpers shared by the elementwise kernels.
//!
//! Loads turn 16 (AVX-512) or 8 (AVX2) elements of any mp element type into float32 lanes;
//! stores round float32 lanes back to the element type with round-to-nearest-even, bit-identical
//! to `half` (subnormals kept, NaN kept and quieted as `half` does). The `map*` drivers run a
//! lane function over whole slices, full vectors first and then one masked (AVX-512) or buffered
//! (AVX2) tail, so every kernel handles every length the same way.
//!
//! The lane functions are closures written inside `#[target_feature]` functions: closures inherit
//! their parent's target features, so the drivers (generic over the closure) inline them.

use core::arch::x86_64::*;

use mp_core::{DType, Element};

// ---------------------------------------------------------------------------------------------
// AVX-512 (F/BW/VL/DQ + AVX2 + FMA + F16C)
// ---------------------------------------------------------------------------------------------

/// The mask of the low `n` lanes (`n < 16`).
#[inline]
pub(crate) fn tail_mask16(n: usize) -> __mmask16 {
    debug_assert!(n < 16);
    ((1u32 << n) - 1) as __mmask16
}

/// float32 lanes to bfloat16 bits, round to nearest even, subnormals kept, NaN as `half` does
/// (`(bits >> 16) | 0x40`). `vcvtneps2bf16` is not used: it flushes subnormals to zero.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) fn f32x16_to_bf16(v: __m512) -> __m256i {
    let x = _mm512_castps_si512(v);
    let hi = _mm512_srli_epi32::<16>(x);
    let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
    let rounded = _mm512_srli_epi32::<16>(rounded);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
}

/// bfloat16 bits to float32 lanes (exact: a shift).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) fn bf16x16_to_f32(b: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)))
}

/// float16 bits to float32 lanes (exact).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) fn f16x16_to_f32(b: __m256i) -> __m512 {
    _mm512_cvtph_ps(b)
}

/// float32 lanes to float16 bits, round to nearest even (what `half` does, F16C or not).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) fn f32x16_to_f16(v: __m512) -> __m256i {
    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
}

/// Widens 16 raw 16-bit elements of type `T` to float32 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn widen16<T: Element>(b: __m256i) -> __m512 {
    match T::DTYPE {
        DType::F16 => f16x16_to_f32(b),
        _ => bf16x16_to_f32(b),
    }
}

/// Narrows float32 lanes to 16 raw 16-bit elements of type `T`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn narrow16<T: Element>(v: __m512) -> __m256i {
    match T::DTYPE {
        DType::F16 => f32x16_to_f16(v),
        _ => f32x16_to_bf16(v),
    }
}

/// Loads 16 elements as float32 lanes.
///
/// # Safety
/// `p..p+16` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn load16<T: Element>(p: *const T) -> __m512 {
    // SAFETY: the caller guarantees 16 readable elements.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_loadu_ps(p.cast()),
            _ => widen16::<T>(_mm256_loadu_si256(p.cast())),
        }
    }
}

/// Loads the elements of `p` selected by `k` as float32 lanes; the other lanes are zero.
///
/// # Safety
/// The selected elements must be readable (the others are not touched).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn load16_mask<T: Element>(p: *const T, k: __mmask16) -> __m512 {
    // SAFETY: masked loads do not touch unselected elements.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_maskz_loadu_ps(k, p.cast()),
            _ => widen16::<T>(_mm256_maskz_loadu_epi16(k, p.cast())),
        }
    }
}

/// Stores float32 lanes as 16 elements (rounding to nearest even).
///
/// # Safety
/// `p..p+16` must be writable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn store16<T: Element>(p: *mut T, v: __m512) {
    // SAFETY: the caller guarantees 16 writable elements.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_storeu_ps(p.cast(), v),
            _ => _mm256_storeu_si256(p.cast(), narrow16::<T>(v)),
        }
    }
}

/// Stores the lanes selected by `k` (rounding to nearest even).
///
/// # Safety
/// The selected elements must be writable (the others are not touched).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn store16_mask<T: Element>(p: *mut T, k: __mmask16, v: __m512) {
    // SAFETY: masked stores do not touch unselected elements.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm512_mask_storeu_ps(p.cast(), k, v),
            _ => _mm256_mask_storeu_epi16(p.cast(), k, narrow16::<T>(v)),
        }
    }
}

/// `y[i] = f(x[i])` for `i < n`, 16 lanes at a time. `x` and `y` may be the same buffer (each
/// vector is read before it is written).
///
/// # Safety
/// `x..x+n` readable, `y..y+n` writable, and the two either identical or disjoint.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn map_avx512<S: Element, D: Element>(
    n: usize,
    x: *const S,
    y: *mut D,
    f: impl Fn(__m512) -> __m512,
) {
    let mut i = 0;
    // SAFETY: every access is below `n`, as the caller guarantees valid.
    unsafe {
        while i + 32 <= n {
            let a = load16(x.add(i));
            let b = load16(x.add(i + 16));
            store16(y.add(i), f(a));
            store16(y.add(i + 16), f(b));
            i += 32;
        }
        if i + 16 <= n {
            store16(y.add(i), f(load16(x.add(i))));
            i += 16;
        }
        if i < n {
            let k = tail_mask16(n - i);
            store16_mask(y.add(i), k, f(load16_mask(x.add(i), k)));
        }
    }
}

/// `y[i] = f(a[i], b[i])` for `i < n`, 16 lanes at a time; `y` may alias `a` or `b` exactly.
///
/// # Safety
/// As [`map_avx512`], for both inputs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn map2_avx512<A: Element, B: Element, D: Element>(
    n: usize,
    a: *const A,
    b: *const B,
    y: *mut D,
    f: impl Fn(__m512, __m512) -> __m512,
) {
    let mut i = 0;
    // SAFETY: every access is below `n`, as the caller guarantees valid.
    unsafe {
        while i + 16 <= n {
            store16(y.add(i), f(load16(a.add(i)), load16(b.add(i))));
            i += 16;
        }
        if i < n {
            let k = tail_mask16(n - i);
            store16_mask(
                y.add(i),
                k,
                f(load16_mask(a.add(i), k), load16_mask(b.add(i), k)),
            );
        }
    }
}

/// `e^x` on float32 lanes: Cephes' `expf` polynomial (about 1 ulp), `vscalefps` for the power of
/// two, so results that overflow are `+inf`, results that underflow are subnormal or zero, and
/// NaN stays NaN.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) fn exp512(x: __m512) -> __m512 {
    // NaN-preserving clamp: min/max return the second operand when either is NaN.
    let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_2e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let r2 = _mm512_mul_ps(r, r);
    let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(p, n)
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C
// ---------------------------------------------------------------------------------------------

/// float32 lanes to bfloat16 bits (see [`f32x16_to_bf16`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f32x8_to_bf16(v: __m256) -> __m128i {
    let x = _mm256_castps_si256(v);
    let hi = _mm256_srli_epi32::<16>(x);
    let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
    let rounded = _mm256_srli_epi32::<16>(rounded);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    let r = _mm256_blendv_epi8(rounded, quiet, nan);
    // Every lane is below 0x10000, so the saturating pack is exact.
    _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
}

/// bfloat16 bits to float32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn bf16x8_to_f32(b: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(b)))
}

/// Loads 8 elements as float32 lanes.
///
/// # Safety
/// `p..p+8` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load8<T: Element>(p: *const T) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm256_loadu_ps(p.cast()),
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            DType::BF16 => bf16x8_to_f32(_mm_loadu_si128(p.cast())),
        }
    }
}

/// Stores float32 lanes as 8 elements (rounding to nearest even).
///
/// # Safety
/// `p..p+8` must be writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn store8<T: Element>(p: *mut T, v: __m256) {
    // SAFETY: the caller guarantees 8 writable elements.
    unsafe {
        match T::DTYPE {
            DType::F32 => _mm256_storeu_ps(p.cast(), v),
            DType::F16 => {
                _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
            }
            DType::BF16 => _mm_storeu_si128(p.cast(), f32x8_to_bf16(v)),
        }
    }
}

/// Loads `n < 8` elements into the low lanes (the others are zero).
///
/// # Safety
/// `p..p+n` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load8_partial<T: Element>(p: *const T, n: usize) -> __m256 {
    debug_assert!(n < 8);
    let mut buf = [T::ZERO; 8];
    // SAFETY: `n` readable elements, copied into a local buffer of 8.
    unsafe {
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        load8(buf.as_ptr())
    }
}

/// Stores the low `n < 8` lanes.
///
/// # Safety
/// `p..p+n` must be writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn store8_partial<T: Element>(p: *mut T, n: usize, v: __m256) {
    debug_assert!(n < 8);
    let mut buf = [T::ZERO; 8];
    // SAFETY: a local buffer of 8, then `n` writable elements.
    unsafe {
        store8(buf.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
}

/// `y[i] = f(x[i])` for `i < n`, 8 lanes at a time (see [`map_avx512`]).
///
/// # Safety
/// As [`map_avx512`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn map_avx2<S: Element, D: Element>(
    n: usize,
    x: *const S,
    y: *mut D,
    f: impl Fn(__m256) -> __m256,
) {
    let mut i = 0;
    // SAFETY: every access is below `n`, as the caller guarantees valid.
    unsafe {
        while i + 16 <= n {
            let a = load8(x.add(i));
            let b = load8(x.add(i + 8));
            store8(y.add(i), f(a));
            store8(y.add(i + 8), f(b));
            i += 16;
        }
        if i + 8 <= n {
            store8(y.add(i), f(load8(x.add(i))));
            i += 8;
        }
        if i < n {
            store8_partial(y.add(i), n - i, f(load8_partial(x.add(i), n - i)));
        }
    }
}

/// `y[i] = f(a[i], b[i])` for `i < n`, 8 lanes at a time (see [`map2_avx512`]).
///
/// # Safety
/// As [`map2_avx512`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn map2_avx2<A: Element, B: Element, D: Element>(
    n: usize,
    a: *const A,
    b: *const B,
    y: *mut D,
    f: impl Fn(__m256, __m256) -> __m256,
) {
    let mut i = 0;
    // SAFETY: every access is below `n`, as the caller guarantees valid.
    unsafe {
        while i + 8 <= n {
            store8(y.add(i), f(load8(a.add(i)), load8(b.add(i))));
            i += 8;
        }
        if i < n {
            let m = n - i;
            store8_partial(
                y.add(i),
                m,
                f(load8_partial(a.add(i), m), load8_partial(b.add(i), m)),
            );
        }
    }
}

/// `e^x` on float32 lanes (see [`exp512`]); the power of two is applied in two halves so
/// subnormal results come out right without `vscalefps`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_set1_ps(89.0), x);
    let x = _mm256_max_ps(_mm256_set1_ps(-104.0), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_2e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // n is in [-150, 128]: split it so each power of two is a normal float32. A NaN x gives a
    // garbage n, but p is NaN and NaN times anything is NaN.
    let ni = _mm256_cvtps_epi32(n);
    let n1 = _mm256_srai_epi32::<1>(ni);
    let n2 = _mm256_sub_epi32(ni, n1);
    let pow2 = |k: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(n2))
}

/// Horizontal sum of 8 lanes in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Horizontal max of 8 lanes (NaN lanes may or may not win; callers do not rely on either).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hmax256(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
