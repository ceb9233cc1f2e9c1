//! GELU, the Gaussian error linear unit of transformers, exact and in its tanh form, for every
//! element type: float32 math (the exact form) or float64 math (the tanh form) on float32 lanes,
//! then (bfloat16, float16) one rounding to the element type.
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
//! determine its slope) and returns `dy · gelu'(x)`, the float32 product of `dy` and the
//! float32 derivative.
//!
//! # The exact form: float32 with fused multiply-adds
//! Transformers spend their GELU time here, so it runs on 16 float32 lanes per AVX-512 vector.
//! Each piece is a polynomial fitted to the float64 function (Chebyshev nodes, weighted least
//! squares for relative error, coefficients rounded to float32 one at a time from the lowest,
//! each refitting the rest; the constant term kept in two floats), evaluated by Horner's rule
//! with its last step kept exact as a sum of two floats, so that few roundings reach the result:
//!
//! - forward, `|x| < 0.75`: `x/2 + x² A(x²)`, `x²` as an exact sum of two floats;
//! - forward, beyond: `Q(t) = e^(-t²/2) S(t) / t`, so `gelu(x) = -e^(-t²/2) S(t)` for negative
//!   `x` and `x - e^(-t²/2) S(t)` for positive, `S` in two pieces (a polynomial in `t - 1.5` up
//!   to `t = 2.5`, then in `w = t / (t + 4)`);
//! - `e^(-t²/2)`: `t²` as an exact sum of two floats, `-t²/2 = k ln 2 + r + c` with `r` exact
//!   (`ln 2` in a 17-bit and a low part), `e^r = 1 + r + r² P(r)` with the leading `1 + r`
//!   exact, `e^c ≈ 1 + c + c²/2` for the small rest, `2^k` from its bits in two factors (so a
//!   subnormal result is rounded once);
//! - derivative: `1/2 + x C(x²)` on [-0.2, 1]; around its root `x0 ≈ -0.7518` (-1 to -0.2),
//!   where `Φ(x)` and `x φ(x)` cancel to 0, `δ T(δ)` with `δ = x - x0` an exact sum of two floats
//!   (the root in two parts); a polynomial in `x + 1.3` on [-1.6, -1]; beyond, `e^(-t²/2) D(t)`
//!   and `1 - e^(-t²/2) D(t)` with `D(t) = R(t) - t/√(2π)` (`R = S/t`, two pieces) as an exact
//!   sum of two floats.
//!
//! Every branch is computed on every lane and selected, so the code vectorises as written. It
//! runs at about 1.2 ns (forward) and 1.8 ns (derivative and product) per element on one
//! thread of the Xeon this was measured on, 2.5 and 2.3 times faster than the float64 lanes it
//! replaced (3.1 and 4.0 ns), which were themselves 5 to 10 times faster than `libm`'s scalar
//! `erfcf`/`expf`.
//!
//! Every instruction set ([`Isa::Scalar`], where `mul_add` is `libm`'s correctly rounded
//! `fmaf`, and the same code compiled for AVX2 + FMA and AVX-512) and every element's position
//! (vector body or tail, thread chunk) gives the same bits as the per-element functions
//! [`forward_f32`], [`derivative_f32`] and [`backward_f32`]: IEEE fused multiply-adds and
//! divisions round the same everywhere.
//!
//! Accuracy against float64, every float32 of [-10, 10] (all 2.1 billion: the ignored test
//! `every_float32_of_minus_10_to_10` in `tests/gelu.rs`): the forward at most 1.373 ulp (at
//! -2.5072), the derivative at most 1.683 ulp (at -2.9977); beyond [-10, 10], tiny and
//! subnormal inputs included, at most 0.76 and 1.09 ulp on the tests' sample.
//!
//! # The tanh form: float64 lanes
//! Computed in float64 from float32 inputs, with approximations accurate to about `1e-12`
//! relative, so the float32 result is the correctly rounded value in all but rare near-ties:
//! `e^a` by range reduction (`ln 2` in two parts, `k` rounded with the `1.5 · 2^52` trick, `e^r`
//! by its Taylor polynomial of degree 11, `2^k` from its bits); the derivative's root near
//! `x = -0.7525`, where the terms cancel, by the Taylor polynomial of degree 6 around it within
//! `1/64`. No fused multiply-add is used, so every instruction set gives the same bits. At most
//! 0.500 ulp forward and derivative on the tests' sweep.
//!
//! bfloat16 and float16 results (every bit pattern tested, both forms) are the float32 result
//! rounded once, at most one step of the type from the float64 value.
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
use crate::norm::{as_f32, as_f32_mut};

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

/// `√(2/π)`.
const SQRT_2_OVER_PI: f64 = 0.7978845608028654;
const TANH_C: f64 = 0.044_715;

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

/// Whether `x` is within `1/64` of the derivative's root, and there the derivative's Taylor
/// polynomial `δ (b1 + b2 δ + ... + b6 δ^5)`, `δ = x - root` (the caller selects).
#[inline(always)]
fn near_root(x: f64, root: [f64; 2], b: &[f64; 6]) -> (bool, f64) {
    let delta = (x - root[0]) - root[1];
    (delta.abs() <= 1.0 / 64.0, delta * horner(delta, b))
}

const TANH_ROOT: [f64; 2] = [-0.7524614220710163, 3.635560509207687e-17];
const TANH_ROOT_TAYLOR: [f64; 6] = [
    0.4304000910248585,
    0.38751844613578895,
    -0.01578285352184803,
    -0.11394448308095899,
    -0.01661932834305256,
    0.019682309459833118,
];

// ---------------------------------------------------------------------------------------------
// The exact form in float32 lanes, with fused multiply-adds
// ---------------------------------------------------------------------------------------------

/// A polynomial `c[0] + c[1] v + c[2] v² + ...` whose constant term is `c[0] + lo`: two floats,
/// since the constant term's rounding would otherwise be most of the error (the coefficients were
/// fitted with the exact constant term, then rounded to float32 one at a time from the lowest,
/// each refitting the rest).
#[derive(Clone, Copy, Debug)]
struct Poly<const N: usize> {
    c: [f32; N],
    lo: f32,
}

/// The polynomial of the lane's piece (`a` when `first`, else `b`: one Horner chain serves both,
/// each step picking its coefficient) at `v`, as an unevaluated sum `hi + lo`. Horner's rule
/// with fused multiply-adds, its last step `c0 + v · rest` kept exact: the product's error from
/// a fused multiply-add and the sum's from Fast2Sum (`|c0| >= |v · rest|` on every piece here).
/// The value then carries `rest`'s rounding errors only, damped by `|v · rest| / value`.
#[inline(always)]
fn horner2<const N: usize>(v: f32, first: bool, a: &Poly<N>, b: &Poly<N>) -> (f32, f32) {
    let pick = |i: usize| if first { a.c[i] } else { b.c[i] };
    let mut acc = pick(N - 1);
    for i in (1..N - 1).rev() {
        acc = acc.mul_add(v, pick(i));
    }
    let ph = acc * v;
    let pl = acc.mul_add(v, -ph);
    let (hi, lo) = fast_two_sum(pick(0), ph);
    (hi, lo + (pl + if first { a.lo } else { b.lo }))
}

/// [`horner2`] of one polynomial.
#[inline(always)]
fn horner1<const N: usize>(v: f32, p: &Poly<N>) -> (f32, f32) {
    horner2(v, true, p, p)
}

/// `c[0] + c[1] v + c[2] v² + ...` by Horner's rule with fused multiply-adds.
#[inline(always)]
fn horner32<const N: usize>(v: f32, c: &[f32; N]) -> f32 {
    let mut acc = c[N - 1];
    for &k in c[..N - 1].iter().rev() {
        acc = acc.mul_add(v, k);
    }
    acc
}

/// `(hi, lo)` with `hi = a + b` rounded and `hi + lo = a + b` exactly, for `|a| >= |b|`
/// (Fast2Sum).
#[inline(always)]
fn fast_two_sum(a: f32, b: f32) -> (f32, f32) {
    let hi = a + b;
    (hi, b - (hi - a))
}

/// `(hi, lo)` with `hi = a + b` rounded and `hi + lo = a + b` exactly, any magnitudes (2Sum).
#[inline(always)]
fn two_sum(a: f32, b: f32) -> (f32, f32) {
    let hi = a + b;
    let bb = hi - a;
    (hi, (a - (hi - bb)) + (b - bb))
}

/// `1/√(2π)` in two float32 parts.
const INV_SQRT_2PI_32: [f32; 2] = [0.398_942_3, -1.133_517e-8];

/// `(Φ(x) - 1/2) / x` as a polynomial in `x²`, on `x²` in [0, 0.5625] (relative error 1.6e-10).
const PHI_SMALL: Poly<6> = Poly {
    c: [
        0.3989423,
        -0.06649038,
        0.009973575,
        -0.0011873415,
        0.00011516984,
        -8.6543505e-06,
    ],
    lo: -1.1344801e-08,
};

/// `(Φ(x) + x φ(x) - 1/2) / x`, the derivative's odd part, as a polynomial in `x²`, on `x²` in
/// [0, 1] (relative error 1.3e-10).
const SLOPE_SMALL: Poly<10> = Poly {
    c: [
        0.7978846,
        -0.26596153,
        0.05984153,
        -0.009500338,
        0.0011623253,
        -0.00013455033,
        4.289855e-05,
        -3.1957257e-05,
        1.5906644e-05,
        -3.376051e-06,
    ],
    lo: -2.2670342e-08,
};

/// The tails' polynomials, of `S(t) = t R(t)` and `R(t) = e^(t²/2) Q(t)`, switch at `t =
/// TAIL_SPLIT` from the variable `t - c` (exact, Sterbenz) to `w - W_CENTER`, `w = t / (t + 4)`
/// (which maps [2.5, ∞) into [0.38, 1)). `w`, not `4 / (4 + t)`: rounding `4 + t` loses the low
/// bits of a small `t`.
const TAIL_SPLIT: f32 = 2.5;
const W_CENTER: f32 = 0.58704454;
const S_NEAR_CENTER: f32 = 1.5;
const R_NEAR_CENTER: f32 = 1.75;

/// `S(t)` in `t - 1.5`, on `t` in [0.75, 2.5] (relative error 6.9e-09).
const S_NEAR: Poly<10> = Poly {
    c: [
        0.308671,
        0.07037373,
        -0.03749091,
        0.016441796,
        -0.006332158,
        0.0022085651,
        -0.0007103947,
        0.00022029944,
        -6.780631e-05,
        1.4212378e-05,
    ],
    lo: 2.0008544e-09,
};

/// `S(t)` in `w - W_CENTER`, on `t` in [2.5, 15] (relative error 2.2e-10).
const S_FAR: Poly<10> = Poly {
    c: [
        0.38760203,
        0.08633519,
        -0.27257422,
        0.51039845,
        -0.68286496,
        0.6507652,
        -0.3793094,
        0.022161525,
        0.16500658,
        -0.08604892,
    ],
    lo: 1.481933e-09,
};

/// `R(t)` in `t - 1.75`, on `t` in [1, 2.5] (relative error 7.5e-09).
const R_NEAR: Poly<9> = Poly {
    c: [
        0.18523167,
        -0.07478686,
        0.027177338,
        -0.009075809,
        0.00282371,
        -0.0008247827,
        0.00022945566,
        -6.558409e-05,
        1.614767e-05,
    ],
    lo: -6.3043117e-09,
};

/// `R(t)` in `w - W_CENTER`, on `t` in [2.5, 15] (relative error 2.3e-09).
const R_FAR: Poly<9> = Poly {
    c: [
        0.0681645,
        -0.2659966,
        0.36840907,
        -0.4217275,
        0.38094774,
        -0.24365437,
        0.07091128,
        0.044409227,
        -0.050307706,
    ],
    lo: -2.9375926e-09,
};

/// The derivative's root, `-0.75179152469356445746`, in two float32 parts.
const ROOT_32: [f32; 2] = [-0.751_791_54, 1.211_445e-8];

/// `gelu'(x) / δ`, `δ = x - root`, as a polynomial in `δ`, on `x` in [-1, -0.2] (relative error 1.1e-09).
const ROOT_POLY: Poly<9> = Poly {
    c: [
        0.431494,
        0.38828498,
        -0.018199673,
        -0.1140085,
        -0.014771462,
        0.019433575,
        0.0045185327,
        -0.0023462574,
        -0.00042324577,
    ],
    lo: -5.2837663e-09,
};

/// The derivative on [-1.6, -1], where it is near its minimum (-0.1260), in `x - MID_CENTER`.
const MID_CENTER: f32 = -1.3;
/// The derivative in `x - MID_CENTER`, on `x` in [-1.6, -1] (relative error 7.9e-09).
const MID_POLY: Poly<8> = Poly {
    c: [
        -0.12597868,
        0.053124286,
        0.25731027,
        0.1420618,
        -0.021051563,
        -0.03901339,
        -0.004769414,
        0.005222042,
    ],
    lo: -4.946766e-09,
};

/// `(e^r - 1 - r) / r²` on `|r| <= 0.35` (so `e^r = 1 + r + r² P(r)`, relative error 5e-10).
const EXPM1_TAIL: [f32; 6] = [
    0.5,
    0.16666666,
    0.04166647,
    0.008333563,
    0.0013934567,
    0.0001974809,
];

/// Beyond this `|x|` the exact form's results are their limits (`Q(15) < 1e-50`, below the
/// smallest float32).
const EXACT_CUT_32: f32 = 15.0;
/// Below this `|x|` the forward is `x/2 + x² (Φ(x) - 1/2) / x`; beyond it, through `Q`.
const FORWARD_SMALL: f32 = 0.75;

/// `e^(-t²/2) = 2^k (1 + r + q)` for `t` in [0, 15]: returns `r` (exact, `|r| <= 0.35`), `q`
/// (`|q| < 0.07`) and `2^(k + 64)` (a normal float; the caller multiplies by `2^-64` last, so a
/// subnormal result is rounded once).
///
/// `t² = hi + lo` exactly (`lo` from a fused multiply-add); `k = round(-hi/2 · log2 e)`;
/// `r = -hi/2 - k ln2_hi` is exact (`ln2_hi` has 17 significant bits and `|k| <= 163` has 8,
/// and the difference lies on `-hi/2`'s grid, below 0.35); the rest, `c = -k ln2_lo - lo/2`
/// (`|c| < 3e-4`), enters as `e^c = 1 + c + c²/2`. `e^r = 1 + r + r² P(r)`, so the leading `1 +
/// r` is exact and the rounding errors are all in `q`, whose weight against 1 is below 0.1.
#[inline(always)]
fn exp_half_square(t: f32) -> (f32, f32, f32) {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // 0x3f317200
    const LN2_LO: f32 = 1.428_606_8e-6;
    /// `1.5 · 2^23`: adding it rounds to an integer, which is then the low bits of the sum.
    const ROUND: f32 = 12_582_912.0;
    let hi = t * t;
    let lo = t.mul_add(t, -hi);
    let a = -0.5 * hi;
    let sum = a.mul_add(LOG2_E, ROUND);
    let k = sum - ROUND;
    let r = k.mul_add(-LN2_HI, a);
    let c = k.mul_add(-LN2_LO, -0.5 * lo);
    let c = c.mul_add(0.5 * c, c);
    let q = r * (r * horner32(r, &EXPM1_TAIL));
    // (1 + r + q)(1 + c) = 1 + r + (q + c (1 + r + q)).
    let q = c.mul_add(1.0 + r + q, q);
    // 2^(k + 64): `k + 64 + 127` in the exponent field (the sum's low bits hold `k`).
    let bits = sum.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits((bits.wrapping_add(64 + 127) as u32) << 23);
    (r, q, scale)
}

/// `2^-64`.
const TWO_M64: f32 = 5.421_011e-20;

/// A tail polynomial's variable for `t` (`tc`, at most the cut): whether the lane is on the near
/// piece, and `t - near_center` there or `w - W_CENTER` beyond.
#[inline(always)]
fn tail_var(tc: f32, near_center: f32) -> (bool, f32) {
    let near = tc < TAIL_SPLIT;
    let far = tc / (tc + 4.0) - W_CENTER;
    (near, if near { tc - near_center } else { far })
}

/// `(hi + lo) e^(-t²/2)` from [`exp_half_square`]'s parts: one rounding of consequence (the last
/// addition; the terms before it are below `0.42 |hi|`).
#[inline(always)]
fn times_exp(hi: f32, lo: f32, (r, q, scale): (f32, f32, f32)) -> f32 {
    (hi + hi.mul_add(r, hi.mul_add(q, lo))) * scale * TWO_M64
}

/// The exact form's value in float32.
///
/// `|x| < 0.75`: `x/2 + (z + z_lo)(a + a_lo)` with `z + z_lo = x²` exactly and `a + a_lo` the
/// polynomial for `(Φ(x) - 1/2)/x`; the cancellation against `x/2` happens inside one fused
/// multiply-add. Beyond, through the upper tail `Q(t) = e^(-t²/2) S(t) / t`, `t = |x|`:
/// `-e^(-t²/2) S(t)` for negative `x` (no cancellation however small the value) and `x -
/// e^(-t²/2) S(t)` for positive.
#[inline(always)]
fn exact_value(x: f32) -> f32 {
    let t = x.abs();
    let tc = t.min(EXACT_CUT_32);
    let z = x * x;
    let z_lo = x.mul_add(x, -z);
    let (a, a_lo) = horner1(z, &PHI_SMALL);
    let small = z.mul_add(a, 0.5 * x) + z.mul_add(a_lo, z_lo * a);
    let (near, v) = tail_var(tc, S_NEAR_CENTER);
    let (s, s_lo) = horner2(v, near, &S_NEAR, &S_FAR);
    let es = times_exp(s, s_lo, exp_half_square(tc));
    let tail = if x < 0.0 { -es } else { x - es };
    let y = if t < FORWARD_SMALL { small } else { tail };
    limits32(x, t > EXACT_CUT_32, y, 1.0).0
}

/// The exact form's derivative `Φ(x) + x φ(x)` in float32, in five pieces:
///
/// - `x` in [-0.2, 1]: `1/2 + x C(x²)`;
/// - (-1, -0.2), around the root `x0 ≈ -0.7518` where the two terms cancel: `δ T(δ)`, `δ = x -
///   x0` with `x0` in two parts and `δ` as an exact sum of two floats (2Sum);
/// - [-1.6, -1]: a polynomial in `x + 1.3` (the derivative is near its minimum there);
/// - beyond, with `D(t) = R(t) - t/√(2π) = (Q(t) - t φ(t)) e^(t²/2)` (negative): `e^(-t²/2)
///   D(t)` for negative `x` and `1 - e^(-t²/2) D(t)` for positive, `D` as an unevaluated sum
///   (`t/√(2π)` is the larger term: Fast2Sum).
#[inline(always)]
fn exact_slope(x: f32) -> f32 {
    let t = x.abs();
    let tc = t.min(EXACT_CUT_32);
    let (c, c_lo) = horner1(x * x, &SLOPE_SMALL);
    let small = x.mul_add(c, 0.5) + x * c_lo;
    let (dh, dl) = two_sum(x, -ROOT_32[0]);
    let dl = dl - ROOT_32[1];
    let (tr, tr_lo) = horner1(dh + dl, &ROOT_POLY);
    let root = dh.mul_add(tr, dh.mul_add(tr_lo, dl * tr));
    let (m, m_lo) = horner1(x - MID_CENTER, &MID_POLY);
    let mid = m + m_lo;
    let (near, v) = tail_var(tc, R_NEAR_CENTER);
    let (r, r_lo) = horner2(v, near, &R_NEAR, &R_FAR);
    let ch = tc * INV_SQRT_2PI_32[0];
    let cl = tc.mul_add(INV_SQRT_2PI_32[0], -ch);
    let cl = tc.mul_add(INV_SQRT_2PI_32[1], cl);
    let (d, d_lo) = fast_two_sum(-ch, r);
    let ed = times_exp(d, d_lo + (r_lo - cl), exp_half_square(tc));
    let tail = if x < 0.0 { ed } else { 1.0 - ed };
    let slope = if x <= -1.6 {
        tail
    } else if x <= -1.0 {
        mid
    } else if x < -0.2 {
        root
    } else if x <= 1.0 {
        small
    } else {
        tail
    };
    limits32(x, t > EXACT_CUT_32, 0.0, slope).1
}

/// `(y, d)`, or past the cut (infinities included) the limits: `(x, 1)` above, `(-0, -0)`
/// below; NaN gives NaN.
#[inline(always)]
fn limits32(x: f32, out: bool, y: f32, d: f32) -> (f32, f32) {
    let (ly, ld) = if x > 0.0 { (x, 1.0) } else { (-0.0, -0.0) };
    let (y, d) = if out { (ly, ld) } else { (y, d) };
    if x.is_nan() { (x, x) } else { (y, d) }
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

/// The tanh form's value, one float32 element.
#[inline(always)]
fn tanh_value(x: f32) -> f32 {
    tanh(f64::from(x)).0 as f32
}

/// The tanh form's derivative, one float32 element.
#[inline(always)]
fn tanh_slope(x: f32) -> f32 {
    tanh(f64::from(x)).1 as f32
}

/// The forward of one element: what [`gelu`] computes.
#[inline]
pub fn forward_f32(form: Gelu, x: f32) -> f32 {
    match form {
        Gelu::Exact => exact_value(x),
        Gelu::Tanh => tanh_value(x),
    }
}

/// The derivative at one element, in float32 (what [`gelu_backward`] gives for `dy = 1`).
#[inline]
pub fn derivative_f32(form: Gelu, x: f32) -> f32 {
    match form {
        Gelu::Exact => exact_slope(x),
        Gelu::Tanh => tanh_slope(x),
    }
}

/// `dy · gelu'(x)` for one element: what [`gelu_backward`] computes (the float32 product of
/// `dy` and [`derivative_f32`]).
#[inline]
pub fn backward_f32(form: Gelu, dy: f32, x: f32) -> f32 {
    dy * derivative_f32(form, x)
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
    fn run<T: Element>(isa: Isa, form: Gelu, x: &[T], y: &mut [T]) {
        if let (Some(x), Some(y)) = (as_f32(x), as_f32_mut(y)) {
            // float32: straight from x to y, no copy through the block buffer.
            for (x, y) in x.iter().zip(y) {
                *y = match form {
                    Gelu::Exact => exact_value(*x),
                    Gelu::Tanh => tanh_value(*x),
                };
            }
            return;
        }
        let mut buf = [0.0f32; BLOCK];
        for (x, y) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
            let n = x.len();
            cast_chunk(isa, x, &mut buf[..n]);
            let (groups, _) = buf[..n.next_multiple_of(LANES)].as_chunks_mut::<LANES>();
            // Direct calls in plain loops: a function value's `Fn::call` shim is not always
            // inlined, and a closure does not get the target features, so `mul_add` outside
            // the target-feature function would be a libm call.
            for g in groups {
                for v in g {
                    *v = match form {
                        Gelu::Exact => exact_value(*v),
                        Gelu::Tanh => tanh_value(*v),
                    };
                }
            }
            cast_chunk(isa, &buf[..n], y);
        }
    }
    run(isa, form, x, y)
}

#[inline(always)]
fn backward_blocks<T: Element>(isa: Isa, form: Gelu, dy: &[T], x: &[T], dx: &mut [T]) {
    #[inline(always)]
    fn run<T: Element>(isa: Isa, form: Gelu, dy: &[T], x: &[T], dx: &mut [T]) {
        if let (Some(dy), Some(x), Some(dx)) = (as_f32(dy), as_f32(x), as_f32_mut(dx)) {
            for ((dy, x), dx) in dy.iter().zip(x).zip(dx) {
                *dx = *dy
                    * match form {
                        Gelu::Exact => exact_slope(*x),
                        Gelu::Tanh => tanh_slope(*x),
                    };
            }
            return;
        }
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
                    *g *= match form {
                        Gelu::Exact => exact_slope(x),
                        Gelu::Tanh => tanh_slope(x),
                    };
                }
            }
            cast_chunk(isa, &gbuf[..n], dx);
        }
    }
    run(isa, form, dy, x, dx)
}

/// The same code compiled for AVX-512 and AVX2 + FMA (the exact form's `mul_add` become
/// `vfmadd`; the tanh form uses none, and LLVM does not contract `a * b + c`, so the bits match
/// the portable path's).
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
