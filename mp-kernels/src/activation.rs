//! Activation functions and their gradients: ReLU, sigmoid, tanh (and the identity), for every
//! element type, with float32 math and one rounding back to the element type.
//!
//! Every backward takes the forward **output** `y` (what a layer keeps): for ReLU `y > 0` exactly
//! when `x > 0`, and `y` is NaN exactly when `x` is, so `y` and `x` give the same gradient and
//! either may be passed.
//!
//! | function | forward | backward |
//! |---|---|---|
//! | [`Activation::Linear`] | `y = x` | `dx = dy` |
//! | [`Activation::Relu`] | `y = x` if `x > 0`, `+0` if `x <= 0`, NaN if `x` is NaN | `dx = dy * s`, `s = 1` if `y > 0`, `0` if `y <= 0`, NaN if `y` is NaN |
//! | [`Activation::Sigmoid`] | `y = 1 / (1 + e^-x)` | `dx = dy * (y * (1 - y))` |
//! | [`Activation::Tanh`] | `y = tanh x` | `dx = dy * (1 - y * y)` |
//!
//! Non-finite data propagates per IEEE. ReLU's gradient is a product, as TensorFlow's `ReluGrad`
//! computes it (so an infinite or NaN `dy` where the unit is off gives NaN, not 0), and a NaN
//! activation gives a NaN gradient rather than a silent zero: a NaN forward value always reaches
//! the gradients, so the loss-scale optimizer sees it and skips the step.
//!
//! Accuracy (float32 results, before rounding to a 16-bit element type): ReLU and identity are
//! exact; sigmoid and tanh are within a few float32 ulps (relative error below 1e-6) on the SIMD
//! paths, which use a Cephes-style `exp` polynomial; the scalar path uses the standard library's
//! `exp` and `tanh`. Backward passes use plain multiplies (no FMA), so every instruction set gives
//! bit-identical gradients.
//!
//! ```
//! use mp_kernels::Cpu;
//! use mp_kernels::activation::Activation;
//!
//! let cpu = Cpu::global()?;
//! let x = [-1.0f32, 0.0, 2.0, f32::NAN];
//! let mut y = [0.0f32; 4];
//! cpu.activation(Activation::Relu, &x, &mut y)?;
//! assert_eq!(&y[..3], &[0.0, 0.0, 2.0]);
//! assert!(y[3].is_nan());
//! let mut dx = [0.0f32; 4];
//! cpu.activation_backward(Activation::Relu, &[5.0; 4], &y, &mut dx)?;
//! assert_eq!(&dx[..3], &[0.0, 0.0, 5.0]);
//! assert!(dx[3].is_nan());
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;

use crate::cast::exec::{check_isa, par_each, par_zip, par_zip2};
use crate::error::{Result, check_len};
use crate::isa::Isa;

/// An elementwise activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// The identity.
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// The logistic function `1 / (1 + e^-x)`.
    Sigmoid,
    /// The hyperbolic tangent.
    Tanh,
}

impl Activation {
    /// The Keras name: `linear`, `relu`, `sigmoid`, `tanh`.
    pub const fn name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
        }
    }
}

/// See [`crate::Cpu::activation`].
pub(crate) fn forward<T: Element>(isa: Isa, act: Activation, x: &[T], y: &mut [T]) -> Result<()> {
    check_len("activation forward", "y", y.len(), x.len())?;
    check_isa("activation forward", isa)?;
    par_zip(x, 1, y, 1, |x, y| {
        // SAFETY: `isa` is supported; `x` and `y` are distinct slices of equal length.
        unsafe { forward_chunk(isa, act, x.len(), x.as_ptr(), y.as_mut_ptr()) }
    });
    Ok(())
}

/// See [`crate::Cpu::activation_inplace`].
pub(crate) fn forward_inplace<T: Element>(isa: Isa, act: Activation, x: &mut [T]) -> Result<()> {
    check_isa("activation forward", isa)?;
    par_each(x, |x| {
        let p = x.as_mut_ptr();
        // SAFETY: `isa` is supported; input and output are the same buffer, which the drivers
        // allow (each vector is read before it is written).
        unsafe { forward_chunk(isa, act, x.len(), p.cast_const(), p) }
    });
    Ok(())
}

/// See [`crate::Cpu::activation_backward`].
pub(crate) fn backward<T: Element>(
    isa: Isa,
    act: Activation,
    dy: &[T],
    y: &[T],
    dx: &mut [T],
) -> Result<()> {
    check_len("activation backward", "y", y.len(), dy.len())?;
    check_len("activation backward", "dx", dx.len(), dy.len())?;
    check_isa("activation backward", isa)?;
    par_zip2((dy, 1), (y, 1), (dx, 1), |dy, y, dx| {
        // SAFETY: `isa` is supported; three slices of equal length, `dx` distinct from both.
        unsafe { backward_chunk(isa, act, dy.len(), dy.as_ptr(), y.as_ptr(), dx.as_mut_ptr()) }
    });
    Ok(())
}

/// See [`crate::Cpu::activation_backward_inplace`].
pub(crate) fn backward_inplace<T: Element>(
    isa: Isa,
    act: Activation,
    g: &mut [T],
    y: &[T],
) -> Result<()> {
    check_len("activation backward", "y", y.len(), g.len())?;
    check_isa("activation backward", isa)?;
    par_zip(y, 1, g, 1, |y, g| {
        let p = g.as_mut_ptr();
        // SAFETY: `isa` is supported; `dy` and `dx` are the same buffer, which the drivers allow.
        unsafe { backward_chunk(isa, act, g.len(), p.cast_const(), y.as_ptr(), p) }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scalar definitions (the portable path, and the reference the SIMD paths follow).
// ---------------------------------------------------------------------------------------------

#[inline]
fn relu(x: f32) -> f32 {
    if x > 0.0 || x.is_nan() { x } else { 0.0 }
}

#[inline]
fn relu_grad(dy: f32, y: f32) -> f32 {
    let s = if y > 0.0 {
        1.0
    } else if y.is_nan() {
        y
    } else {
        0.0
    };
    dy * s
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    // e^-|x| never overflows, so neither branch loses the tail.
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[inline]
fn sigmoid_grad(dy: f32, y: f32) -> f32 {
    dy * (y * (1.0 - y))
}

#[inline]
fn tanh_grad(dy: f32, y: f32) -> f32 {
    dy * (1.0 - y * y)
}

/// # Safety
/// `isa` supported; `x..x+n` readable and `y..y+n` writable, identical or disjoint.
unsafe fn forward_chunk<T: Element>(isa: Isa, act: Activation, n: usize, x: *const T, y: *mut T) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::forward_avx512(act, n, x, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller.
        Isa::Avx2 => unsafe { x86::forward_avx2(act, n, x, y) },
        _ => {
            let f: fn(f32) -> f32 = match act {
                Activation::Linear => |x| x,
                Activation::Relu => relu,
                Activation::Sigmoid => sigmoid,
                Activation::Tanh => f32::tanh,
            };
            for i in 0..n {
                // SAFETY: `i < n`; element `i` is read before it is written.
                unsafe { *y.add(i) = T::from_f32(f((*x.add(i)).to_f32())) };
            }
        }
    }
}

/// # Safety
/// `isa` supported; `dy`, `y` readable and `dx` writable for `n` elements; `dx` identical to or
/// disjoint from each input.
unsafe fn backward_chunk<T: Element>(
    isa: Isa,
    act: Activation,
    n: usize,
    dy: *const T,
    y: *const T,
    dx: *mut T,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::backward_avx512(act, n, dy, y, dx) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller.
        Isa::Avx2 => unsafe { x86::backward_avx2(act, n, dy, y, dx) },
        _ => {
            let f: fn(f32, f32) -> f32 = match act {
                Activation::Linear => |dy, _| dy,
                Activation::Relu => relu_grad,
                Activation::Sigmoid => sigmoid_grad,
                Activation::Tanh => tanh_grad,
            };
            for i in 0..n {
                // SAFETY: `i < n`; element `i` is read before it is written.
                unsafe {
                    *dx.add(i) = T::from_f32(f((*dy.add(i)).to_f32(), (*y.add(i)).to_f32()));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use mp_core::Element;

    use super::Activation;
    use crate::cast::x86::{exp256, exp512, map_avx2, map_avx512, map2_avx2, map2_avx512};

    /// Cephes `tanhf`: `x + x^3 P(x^2)` for `|x| < 0.625`.
    const TANH_P: [f32; 5] = [
        -5.704_988_7e-3,
        2.063_909e-2,
        -5.373_971_6e-2,
        1.333_144_2e-1,
        -3.333_328e-1,
    ];

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    fn relu512(v: __m512) -> __m512 {
        // Not-less-or-equal, unordered: true for x > 0 and for NaN, which both pass through.
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLE_UQ>(v, _mm512_setzero_ps()), v)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    fn relu_grad512(dy: __m512, y: __m512) -> __m512 {
        let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, _mm512_setzero_ps());
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y);
        let s = _mm512_maskz_mov_ps(pos, _mm512_set1_ps(1.0));
        _mm512_mul_ps(dy, _mm512_mask_mov_ps(s, nan, y))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    fn sigmoid512(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        _mm512_div_ps(_mm512_mask_mov_ps(one, neg, e), _mm512_add_ps(one, e))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    fn tanh512(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let a = _mm512_abs_ps(x);
        // |x| >= 0.625 (and NaN): 1 - 2 / (e^2|x| + 1), with the sign of x.
        let e = exp512(_mm512_add_ps(a, a));
        let t = _mm512_sub_ps(
            one,
            _mm512_div_ps(_mm512_set1_ps(2.0), _mm512_add_ps(e, one)),
        );
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        let big = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
        // |x| < 0.625: the odd polynomial.
        let s = _mm512_mul_ps(x, x);
        let mut p = _mm512_set1_ps(TANH_P[0]);
        for c in &TANH_P[1..] {
            p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(*c));
        }
        let small = _mm512_fmadd_ps(_mm512_mul_ps(p, s), x, x);
        let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(0.625));
        _mm512_mask_mov_ps(big, is_small, small)
    }

    /// # Safety
    /// As [`super::forward_chunk`], with AVX-512 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn forward_avx512<T: Element>(
        act: Activation,
        n: usize,
        x: *const T,
        y: *mut T,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match act {
                Activation::Linear => map_avx512(n, x, y, |v| v),
                Activation::Relu => map_avx512(n, x, y, |v| relu512(v)),
                Activation::Sigmoid => map_avx512(n, x, y, |v| sigmoid512(v)),
                Activation::Tanh => map_avx512(n, x, y, |v| tanh512(v)),
            }
        }
    }

    /// # Safety
    /// As [`super::backward_chunk`], with AVX-512 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn backward_avx512<T: Element>(
        act: Activation,
        n: usize,
        dy: *const T,
        y: *const T,
        dx: *mut T,
    ) {
        let one = _mm512_set1_ps(1.0);
        // SAFETY: forwarded from the caller.
        unsafe {
            match act {
                Activation::Linear => map2_avx512(n, dy, y, dx, |g, _| g),
                Activation::Relu => map2_avx512(n, dy, y, dx, |g, y| relu_grad512(g, y)),
                Activation::Sigmoid => map2_avx512(n, dy, y, dx, |g, y| {
                    _mm512_mul_ps(g, _mm512_mul_ps(y, _mm512_sub_ps(one, y)))
                }),
                Activation::Tanh => map2_avx512(n, dy, y, dx, |g, y| {
                    _mm512_mul_ps(g, _mm512_sub_ps(one, _mm512_mul_ps(y, y)))
                }),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn relu256(v: __m256) -> __m256 {
        _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_NLE_UQ>(v, _mm256_setzero_ps()))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn relu_grad256(dy: __m256, y: __m256) -> __m256 {
        let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(y, _mm256_setzero_ps());
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(y, y);
        let s = _mm256_and_ps(pos, _mm256_set1_ps(1.0));
        _mm256_mul_ps(dy, _mm256_blendv_ps(s, y, nan))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn abs256(x: __m256) -> __m256 {
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), x)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sigmoid256(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), abs256(x)));
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
        _mm256_div_ps(_mm256_blendv_ps(one, e, neg), _mm256_add_ps(one, e))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tanh256(x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        let a = abs256(x);
        let e = exp256(_mm256_add_ps(a, a));
        let t = _mm256_sub_ps(
            one,
            _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)),
        );
        let big = _mm256_or_ps(t, _mm256_and_ps(x, _mm256_set1_ps(-0.0)));
        let s = _mm256_mul_ps(x, x);
        let mut p = _mm256_set1_ps(TANH_P[0]);
        for c in &TANH_P[1..] {
            p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(*c));
        }
        let small = _mm256_fmadd_ps(_mm256_mul_ps(p, s), x, x);
        let is_small = _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(0.625));
        _mm256_blendv_ps(big, small, is_small)
    }

    /// # Safety
    /// As [`super::forward_chunk`], with AVX2 + FMA + F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn forward_avx2<T: Element>(
        act: Activation,
        n: usize,
        x: *const T,
        y: *mut T,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match act {
                Activation::Linear => map_avx2(n, x, y, |v| v),
                Activation::Relu => map_avx2(n, x, y, |v| relu256(v)),
                Activation::Sigmoid => map_avx2(n, x, y, |v| sigmoid256(v)),
                Activation::Tanh => map_avx2(n, x, y, |v| tanh256(v)),
            }
        }
    }

    /// # Safety
    /// As [`super::backward_chunk`], with AVX2 + FMA + F16C available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn backward_avx2<T: Element>(
        act: Activation,
        n: usize,
        dy: *const T,
        y: *const T,
        dx: *mut T,
    ) {
        let one = _mm256_set1_ps(1.0);
        // SAFETY: forwarded from the caller.
        unsafe {
            match act {
                Activation::Linear => map2_avx2(n, dy, y, dx, |g, _| g),
                Activation::Relu => map2_avx2(n, dy, y, dx, |g, y| relu_grad256(g, y)),
                Activation::Sigmoid => map2_avx2(n, dy, y, dx, |g, y| {
                    _mm256_mul_ps(g, _mm256_mul_ps(y, _mm256_sub_ps(one, y)))
                }),
                Activation::Tanh => map2_avx2(n, dy, y, dx, |g, y| {
                    _mm256_mul_ps(g, _mm256_sub_ps(one, _mm256_mul_ps(y, y)))
                }),
            }
        }
    }
}
