//! Casts between the element types `f32`, `half::f16` and `half::bf16` (all nine pairs).
//!
//! Every cast is bit-identical to `half`: float32 to bfloat16 and float32 to float16 round to
//! nearest, ties to even, keep subnormals, turn overflow into infinity and keep NaN (quieted as
//! `half` does); widening is exact; float16 and bfloat16 convert to each other through float32
//! (exact, then one rounding). A cast to the same type is a copy (NaN payloads included).
//!
//! The SIMD paths: float32 to bfloat16 uses the integer round-to-nearest-even trick
//! (`bits + 0x7fff + ((bits >> 16) & 1)`, then `>> 16`, NaN blended in), not `vcvtneps2bf16`,
//! which flushes subnormals to zero; float16 uses F16C (`vcvtps2ph` with round-to-nearest-even,
//! `vcvtph2ps`). [`Isa::Avx512Bf16`] runs the AVX-512 path. Arrays of 64K elements or more are
//! split over the thread pool.
//!
//! ```
//! use half::bf16;
//! use mp_kernels::Cpu;
//!
//! let x = [1.0f32, 1.0 + 1.0 / 256.0, f32::NAN];
//! let mut y = [bf16::ZERO; 3];
//! Cpu::global()?.cast(&x, &mut y)?;
//! assert_eq!(y[1], bf16::from_f32(1.0)); // a tie rounds to even
//! assert!(y[2].is_nan());
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::{DType, Element};

use crate::error::{Result, check_len};
use crate::isa::Isa;

pub(crate) mod exec;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use exec::{check_isa, par_zip};

/// See [`crate::Cpu::cast`].
pub(crate) fn cast<S: Element, D: Element>(isa: Isa, src: &[S], dst: &mut [D]) -> Result<()> {
    check_len("cast", "dst", dst.len(), src.len())?;
    check_isa("cast", isa)?;
    par_zip(src, 1, dst, 1, |s, d| cast_chunk(isa, s, d));
    Ok(())
}

/// Casts one chunk on the calling thread (`isa` already checked, lengths equal).
pub(crate) fn cast_chunk<S: Element, D: Element>(isa: Isa, src: &[S], dst: &mut [D]) {
    debug_assert_eq!(src.len(), dst.len());
    if S::DTYPE == D::DTYPE {
        // SAFETY: `Element` is sealed and each dtype belongs to exactly one type, so `S` and `D`
        // are the same type; the lengths are equal and `&`/`&mut` borrows cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr().cast::<D>(), dst.as_mut_ptr(), src.len())
        };
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU supports `isa`; the slices have equal lengths.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { avx512(src, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { avx2(src, dst) },
        _ => scalar(src, dst),
    }
}

/// The portable path: `half`'s own conversions, one element at a time.
fn scalar<S: Element, D: Element>(src: &[S], dst: &mut [D]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = D::from_f32(s.to_f32());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn avx512<S: Element, D: Element>(src: &[S], dst: &mut [D]) {
    use core::arch::x86_64::*;
    let n = src.len().min(dst.len());
    if S::DTYPE == DType::BF16 && D::DTYPE == DType::F32 {
        // `half` quiets a signalling NaN when widening bfloat16; so does this path.
        let quiet = _mm512_set1_epi32(0x0040_0000);
        // SAFETY: both slices hold `n` elements.
        unsafe {
            x86::map_avx512(n, src.as_ptr(), dst.as_mut_ptr(), |v| {
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let bits = _mm512_castps_si512(v);
                _mm512_castsi512_ps(_mm512_mask_or_epi32(bits, nan, bits, quiet))
            })
        }
    } else {
        // SAFETY: both slices hold `n` elements.
        unsafe { x86::map_avx512(n, src.as_ptr(), dst.as_mut_ptr(), |v| v) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<S: Element, D: Element>(src: &[S], dst: &mut [D]) {
    use core::arch::x86_64::*;
    let n = src.len().min(dst.len());
    if S::DTYPE == DType::BF16 && D::DTYPE == DType::F32 {
        let quiet = _mm256_castsi256_ps(_mm256_set1_epi32(0x0040_0000));
        // SAFETY: both slices hold `n` elements.
        unsafe {
            x86::map_avx2(n, src.as_ptr(), dst.as_mut_ptr(), |v| {
                let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v);
                _mm256_or_ps(v, _mm256_and_ps(nan, quiet))
            })
        }
    } else {
        // SAFETY: both slices hold `n` elements.
        unsafe { x86::map_avx2(n, src.as_ptr(), dst.as_mut_ptr(), |v| v) }
    }
}
