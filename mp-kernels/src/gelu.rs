//! GELU, the Gaussian error linear unit of transformers, exact and in its tanh form, for every
//! element type: float64 math on float32 lanes, one rounding to float32, then (bfloat16, float16)
//! one rounding to the element type.
//!
//! | form | forward | derivative |
//! |---|---|---|
//! | exact (Keras `approximate=False`, PyTorch `approximate='none'`) | `x Φ(x) = x/2 · erfc(-x/√2)` | `Φ(x) + x φ(x)` |
//! | tanh (`approximate=True`, `'tanh'`) | `x/2 (1 + tanh z)`, `z = √(2/π) (x + 0.044715 x³)` | `s + 2 x s (1 - s) z'` |
//!
//! Both are written so that nothing cancels for large negative `x`, where the output is tiny:
//! the exact form through the upper tail `Q(t) = 1 - Φ(t)`, `t = |x|` (not `1 + erf`), the tanh
//! form as `x σ(2z)` with `s = σ(2z)` (`1 + tanh z = 2 σ(2z)`) and `1 - s = σ(-2z)`. The
//! backward takes the forward's **input** `x` (GELU is not monotonic, so its output does not
//! determine its slope) and returns `dy · gelu'(x)` rounded once.
//!
//! # Algorithm
//! The functions are computed in float64 from float32 inputs, with approximations accurate to
//! about `1e-12` relative, so the float32 result is the correctly rounded value in all but rare
//! near-ties:
//!
//! - `e^a` by range reduction, `a = k ln 2 + r` (`ln 2` in two parts, `k` rounded with the
//!   `1.5 · 2^52` trick), `e^r` by its Taylor polynomial of degree 11 (`|r| <= ln 2 / 2`), and
//!   `2^k` built from its bits;
//! - `Q(t) = e^(-t²/2) R(t)` with `R(t) = e^(t²/2) erfc(t/√2) / 2` a polynomial of degree 15 in
//!   `u = 4 / (4 + t)` (relative error 1.5e-12 on `t` in [0, 15], fitted by iterated weighted
//!   least squares); `t²` is exact in float64;
//! - the derivative's root near `x = -0.7518` (exact) and `-0.7525` (tanh), where `Φ(x)` and
//!   `x φ(x)` cancel to 0: within `1/64` of it, the Taylor polynomial of degree 6 around the
//!   root (`x - root` exact, the root in two float64 parts), elsewhere the formulas above.
//!
//! Why float64 lanes (half as many per vector as float32): `x²` is exact, so `e^(-x²/2)` needs
//! no hi/lo split; the error budget of the final rounding is not shared with the approximations;
//! and nothing needs a fused multiply-add, which the portable path would get from a slow
//! software `fma`. On AVX-512 this runs at 2 to 4 ns per element on one thread, 5 to 10 times
//! faster than `libm`'s scalar `erfcf`/`expf` that it replaced.
//!
//! No fused multiply-add is used, so every instruction set ([`Isa::Scalar`], which LLVM
//! vectorises for the baseline target, and the same code compiled for AVX2 and AVX-512) and
//! every element's position (vector body or tail, thread chunk) gives the same bits as the
//! per-element functions [`forward_f32`], [`derivative_f32`] and [`backward_f32`].
//!
//! Measured against float64 references (`tests/gelu.rs`: every 2039th float32 of [-10, 10],
//! 400 000 uniform values, the 100 floats around each root, and inputs beyond, tiny, subnormal
//! and up to `f32::MAX`), every float32 result is within 1 step of the float64 value rounded to
//! float32: at most 0.500 ulp forward (both forms) and for the tanh form's derivative, 0.562 ulp
//! for the exact form's derivative, at the float nearest its root, where the float64 reference
//! `Φ(x) + x φ(x)` is itself 0.14 ulp off (this kernel is 0.42 ulp from a 50-digit value there).
//! bfloat16 and float16 results (every bit pattern tested) are the float32 result rounded once,
//! at most one step of the type from the float64 value.
//!
//! Limits: NaN propagates; `gelu(+inf) = +inf` with slope 1; `gelu(-inf) = -0` (the sign of the
//! tiny negative values it is the limit of) with slope `-0`. Beyond `|x| = 15` (exact) or 12
//! (tanh) the results are those limits (a float32 cannot tell them from the true values).
//!
//! ```
//! use mp_kernels::gelu::{Gelu, gelu};
//!
//! let x = [-1.0f32, 0.0, 1.0, f32::NEG_INFINITY];
//! let mut y = [0.0f32; 4];
//! gelu(Gelu::Exact, &x, &mut y)?;
//! assert!((y[2] - 0.841_344_7).abs() < 1e-6);
//! assert_eq!(y[1], 0.0);
//! assert_eq!(y[3], 0.0);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;

use crate::cast::cast_chunk;
use crate::cast::exec::{check_isa, par_zip, par_zip2};
use crate::error::{Result, check_len};
use crate::isa::Isa;

/// Which GELU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Gelu {
    /// `x Φ(x)` with the normal distribution's CDF (Keras's and PyTorch's default).
    #[default]
    Exact,
    /// The tanh approximation of BERT and GPT-2.
    Tanh,
}

// ---------------------------------------------------------------------------------------------
// The math, one element (float64), written branch-free so that LLVM vectorises it
// ---------------------------------------------------------------------------------------------

/// `1 / √(2π)`.
const INV_SQRT_2PI: f64 = 0.3989422804014327;
/// `√(2/π)`.
const SQRT_2_OVER_PI: f64 = 0.7978845608028654;
const TANH_C: f64 = 0.044_715;

/// Beyond this `|x|` the exact form's results are their limits (`Q(15) < 1e-50`).
const EXACT_CUT: f64 = 15.0;
/// Beyond this `|x|` the tanh form's results are their limits (`σ(-2z(12)) < 1e-61`).
const TANH_CUT: f64 = 12.0;

/// `c[0] + c[1] x + c[2] x² + ...` by Horner's rule.
#[inline(always)]
fn horner<const N: usize>(x: f64, c: &[f64; N]) -> f64 {
    let mut acc = c[N - 1];
    for &k in c[..N - 1].iter().rev() {
        acc = acc * x + k;
    }
    acc
}

/// `e^a` for `a` in [-700, 700] (NaN gives NaN), relative error about 1e-14.
#[inline(always)]
fn exp(a: f64) -> f64 {
    const LOG2_E: f64 = std::f64::consts::LOG2_E;
    // `ln 2` in two parts; the first has 21 trailing zero bits, so `k * LN2_HI` is exact.
    const LN2_HI: f64 = 6.931471803691238e-1;
    const LN2_LO: f64 = 1.9082149292705877e-10;
    /// `1.5 · 2^52`: adding it rounds to an integer, which is then the low bits of the sum.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    const TAYLOR: [f64; 12] = [
        1.0,
        1.0,
        0.5,
        0.16666666666666666,
        0.041666666666666664,
        0.008333333333333333,
        0.001388888888888889,
        0.0001984126984126984,
        2.48015873015873e-05,
        2.7557319223985893e-06,
        2.755731922398589e-07,
        2.505210838544172e-08,
    ];
    let sum = a * LOG2_E + ROUND;
    let k = sum - ROUND;
    let r = (a - k * LN2_HI) - k * LN2_LO;
    // `2^k`: `k + 1023` in the exponent field (the sum's low bits hold `k`).
    let scale = f64::from_bits(sum.to_bits().wrapping_add(1023) << 52);
    horner(r, &TAYLOR) * scale
}

/// `R(t) = e^(t²/2) erfc(t/√2) / 2 = Q(t) / e^(-t²/2)` for `t` in [0, 15].
#[inline(always)]
fn erfc_scaled(t: f64) -> f64 {
    const C: [f64; 16] = [
        -1.3780802033494195e-07,
        0.09974011109746239,
        0.09966784890739284,
        0.09410643960355479,
        0.07744350220080828,
        0.07844588309491647,
        -0.0011208682681020932,
        0.11673211783188078,
        -0.12517165516445233,
        0.10155322036405134,
        0.0020929078228978776,
        -0.13410193426281666,
        0.15060651023585014,
        -0.07842562298444818,
        0.020662772542961595,
        -0.002231095213185348,
    ];
    horner(4.0 / (4.0 + t), &C)
}

/// Whether `x` is within `1/64` of the derivative's root, and there the derivative's Taylor
/// polynomial `δ (b1 + b2 δ + ... + b6 δ^5)`, `δ = x - root` (the caller selects).
#[inline(always)]
fn near_root(x: f64, root: [f64; 2], b: &[f64; 6]) -> (bool, f64) {
    let delta = (x - root[0]) - root[1];
    (delta.abs() <= 1.0 / 64.0, delta * horner(delta, b))
}

const EXACT_ROOT: [f64; 2] = [-0.7517915246935645, 1.4956759177009883e-17];
const EXACT_ROOT_TAYLOR: [f64; 6] = [
    0.4314939923140469,
    0.388284982990552,
    -0.018199676398671087,
    -0.1140082332972217,
    -0.014771522148244337,
    0.019421679838189067,
];
const TANH_ROOT: [f64; 2] = [-0.7524614220710163, 3.635560509207687e-17];
const TANH_ROOT_TAYLOR: [f64; 6] = [
    0.4304000910248585,
    0.38751844613578895,
    -0.01578285352184803,
    -0.11394448308095899,
    -0.01661932834305256,
    0.019682309459833118,
];

/// The exact form: `(gelu(x), gelu'(x))`.
#[inline(always)]
fn exact(x: f64) -> (f64, f64) {
    let t = x.abs();
    // NaN stays NaN; beyond the cut the limits are selected below.
    let tc = if t > EXACT_CUT { 0.0 } else { t };
    let e = exp(-0.5 * tc * tc);
    let r = erfc_scaled(tc);
    // Q(t) = 1 - Φ(t), and Q(t) - t φ(t), both positive-size terms times e^(-t²/2).
    let q = e * r;
    let tail = e * (r - INV_SQRT_2PI * tc);
    let (y, d) = if x < 0.0 {
        (x * q, tail)
    } else {
        (x * (1.0 - q), 1.0 - tail)
    };
    let (near, taylor) = near_root(x, EXACT_ROOT, &EXACT_ROOT_TAYLOR);
    let d = if near { taylor } else { d };
    limits(x, t > EXACT_CUT, y, d)
}

/// The tanh form: `(gelu(x), gelu'(x))`.
#[inline(always)]
fn tanh(x: f64) -> (f64, f64) {
    let out = x.abs() > TANH_CUT;
    let xc = if out { 0.0 } else { x };
    let x2 = xc * xc;
    let two_z = 2.0 * SQRT_2_OVER_PI * (xc + TANH_C * x2 * xc);
    let e = exp(-two_z.abs());
    let big = 1.0 / (1.0 + e);
    let small = e * big;
    // s = σ(2z) and 1 - s = σ(-2z), each computed without cancellation.
    let (s, s1) = if two_z < 0.0 {
        (small, big)
    } else {
        (big, small)
    };
    let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_C * x2);
    let y = x * s;
    let d = s * (1.0 + 2.0 * xc * s1 * dz);
    let (near, taylor) = near_root(x, TANH_ROOT, &TANH_ROOT_TAYLOR);
    let d = if near { taylor } else { d };
    limits(x, out, y, d)
}

/// `(y, d)`, or past the cut (infinities included) the limits: `(x, 1)` above, `(-0, -0)` below.
#[inline(always)]
fn limits(x: f64, out: bool, y: f64, d: f64) -> (f64, f64) {
    let (ly, ld) = if x > 0.0 { (x, 1.0) } else { (-0.0, -0.0) };
    if out { (ly, ld) } else { (y, d) }
}

#[inline(always)]
fn both(form: Gelu, x: f32) -> (f64, f64) {
    match form {
        Gelu::Exact => exact(f64::from(x)),
        Gelu::Tanh => tanh(f64::from(x)),
    }
}

/// The forward of one element: what [`gelu`] computes.
#[inline]
pub fn forward_f32(form: Gelu, x: f32) -> f32 {
    both(form, x).0 as f32
}

/// The derivative at one element, rounded to float32 (what [`gelu_backward`] gives for `dy = 1`).
#[inline]
pub fn derivative_f32(form: Gelu, x: f32) -> f32 {
    both(form, x).1 as f32
}

/// `dy · gelu'(x)` for one element, rounded once: what [`gelu_backward`] computes.
#[inline]
pub fn backward_f32(form: Gelu, dy: f32, x: f32) -> f32 {
    (f64::from(dy) * both(form, x).1) as f32
}

// ---------------------------------------------------------------------------------------------
// The drivers: blocks widened to float32 on the stack, 16 lanes at a time
// ---------------------------------------------------------------------------------------------

/// Elements per block widened to float32 on the stack.
const BLOCK: usize = 256;
/// Elements computed together (the tail of a block is computed as a whole group; the extra
/// lanes hold stale values whose results are dropped).
const LANES: usize = 16;

#[inline(always)]
fn forward_blocks<T: Element>(isa: Isa, form: Gelu, x: &[T], y: &mut [T]) {
    #[inline(always)]
    fn run<T: Element>(isa: Isa, x: &[T], y: &mut [T], f: impl Fn(f64) -> (f64, f64)) {
        let mut buf = [0.0f32; BLOCK];
        for (x, y) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
            let n = x.len();
            cast_chunk(isa, x, &mut buf[..n]);
            let (groups, _) = buf[..n.next_multiple_of(LANES)].as_chunks_mut::<LANES>();
            for g in groups {
                for v in g {
                    *v = f(f64::from(*v)).0 as f32;
                }
            }
            cast_chunk(isa, &buf[..n], y);
        }
    }
    match form {
        Gelu::Exact => run(isa, x, y, exact),
        Gelu::Tanh => run(isa, x, y, tanh),
    }
}

#[inline(always)]
fn backward_blocks<T: Element>(isa: Isa, form: Gelu, dy: &[T], x: &[T], dx: &mut [T]) {
    #[inline(always)]
    fn run<T: Element>(isa: Isa, dy: &[T], x: &[T], dx: &mut [T], f: impl Fn(f64) -> (f64, f64)) {
        let mut gbuf = [0.0f32; BLOCK];
        let mut xbuf = [0.0f32; BLOCK];
        let blocks = dy
            .chunks(BLOCK)
            .zip(x.chunks(BLOCK))
            .zip(dx.chunks_mut(BLOCK));
        for ((dy, x), dx) in blocks {
            let n = x.len();
            cast_chunk(isa, dy, &mut gbuf[..n]);
            cast_chunk(isa, x, &mut xbuf[..n]);
            let m = n.next_multiple_of(LANES);
            let (gs, _) = gbuf[..m].as_chunks_mut::<LANES>();
            let (xs, _) = xbuf[..m].as_chunks::<LANES>();
            for (g, x) in gs.iter_mut().zip(xs) {
                for (g, &x) in g.iter_mut().zip(x) {
                    *g = (f64::from(*g) * f(f64::from(x)).1) as f32;
                }
            }
            cast_chunk(isa, &gbuf[..n], dx);
        }
    }
    match form {
        Gelu::Exact => run(isa, dy, x, dx, exact),
        Gelu::Tanh => run(isa, dy, x, dx, tanh),
    }
}

/// The same code compiled for AVX-512 and AVX2 (`fma` is enabled for the casts; the GELU math
/// uses no fused multiply-add, and LLVM does not contract `a * b + c`, so the bits match).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn forward_avx512<T: Element>(isa: Isa, form: Gelu, x: &[T], y: &mut [T]) {
        forward_blocks(isa, form, x, y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn forward_avx2<T: Element>(isa: Isa, form: Gelu, x: &[T], y: &mut [T]) {
        forward_blocks(isa, form, x, y)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn backward_avx512<T: Element>(
        isa: Isa,
        form: Gelu,
        dy: &[T],
        x: &[T],
        dx: &mut [T],
    ) {
        backward_blocks(isa, form, dy, x, dx)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn backward_avx2<T: Element>(
        isa: Isa,
        form: Gelu,
        dy: &[T],
        x: &[T],
        dx: &mut [T],
    ) {
        backward_blocks(isa, form, dy, x, dx)
    }
}

/// One chunk on the calling thread (`isa` checked, lengths equal).
fn forward_chunk<T: Element>(isa: Isa, form: Gelu, x: &[T], y: &mut [T]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU supports `isa`.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::forward_avx512(isa, form, x, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::forward_avx2(isa, form, x, y) },
        _ => forward_blocks(isa, form, x, y),
    }
}

/// One chunk on the calling thread (`isa` checked, lengths equal).
fn backward_chunk<T: Element>(isa: Isa, form: Gelu, dy: &[T], x: &[T], dx: &mut [T]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked that the CPU supports `isa`.
        Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::backward_avx512(isa, form, dy, x, dx) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::backward_avx2(isa, form, dy, x, dx) },
        _ => backward_blocks(isa, form, dy, x, dx),
    }
}

/// See [`crate::Cpu::gelu`].
pub(crate) fn forward<T: Element>(isa: Isa, form: Gelu, x: &[T], y: &mut [T]) -> Result<()> {
    check_len("gelu", "y", y.len(), x.len())?;
    check_isa("gelu", isa)?;
    par_zip(x, 1, y, 1, |x: &[T], y: &mut [T]| {
        forward_chunk(isa, form, x, y)
    });
    Ok(())
}

/// See [`crate::Cpu::gelu_backward`].
pub(crate) fn backward<T: Element>(
    isa: Isa,
    form: Gelu,
    dy: &[T],
    x: &[T],
    dx: &mut [T],
) -> Result<()> {
    check_len("gelu_backward", "x", x.len(), dy.len())?;
    check_len("gelu_backward", "dx", dx.len(), dy.len())?;
    check_isa("gelu_backward", isa)?;
    par_zip2(
        (dy, 1),
        (x, 1),
        (dx, 1),
        |dy: &[T], x: &[T], dx: &mut [T]| backward_chunk(isa, form, dy, x, dx),
    );
    Ok(())
}

/// `y = gelu(x)` elementwise, on the best instruction set of this CPU.
///
/// # Errors
/// [`crate::Error::LengthMismatch`] when `y` is not as long as `x`.
pub fn gelu<T: Element>(form: Gelu, x: &[T], y: &mut [T]) -> Result<()> {
    forward(Isa::detect(), form, x, y)
}

/// `dx = dy * gelu'(x)` elementwise, `x` the forward's input, on the best instruction set of
/// this CPU.
///
/// # Errors
/// [`crate::Error::LengthMismatch`] naming `x` or `dx`.
pub fn gelu_backward<T: Element>(form: Gelu, dy: &[T], x: &[T], dx: &mut [T]) -> Result<()> {
    backward(Isa::detect(), form, dy, x, dx)
}
