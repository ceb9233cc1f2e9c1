//! Every non-GEMM CPU kernel against a float64 (or bit-exact) reference, on every instruction set
//! this CPU supports plus the scalar fallback.
//!
//! Randomised tests print their seed (`MP_TEST_SEED=<seed>` replays one). Outputs are poisoned
//! with a sentinel before each run, so an element a kernel forgets to write fails. Sizes cover
//! 0, 1, vector widths +/- 1, odd sizes and one size above the parallel threshold (64K elements).
//!
//! Error bounds asserted (u32 = 2^-24, u_T = the element type's unit roundoff):
//! - casts: bit-exact against `half` (NaN payloads included), all 65536 patterns of each 16-bit
//!   type and ~2.6M float32 patterns (a sweep, random bits, every rounding tie);
//! - ReLU and identity: exact. Sigmoid and tanh: `(u_T + 1e-6) |ref| + half the smallest
//!   subnormal of T`. Backward: sigmoid `4 u32 |ref|`, tanh `3 u32 |dy| (1 + y^2)`, plus `u_T`
//!   rounding; every instruction set bit-identical;
//! - softmax: 1e-6 absolute and 2e-5 relative; softmax backward: the rigorous dot-product bound
//!   `y ((n + 8) u32 sum|dy y| + 3 u32 |dy - s|)`;
//! - cross-entropy: `4e-6 (1 + loss)`; fused gradients `3 u32 |ref|` (and exactly `scale` times
//!   the unscaled gradient for power-of-two scale and batch);
//! - bias gradient: the recursive-summation bound `(rows + 1) u32 (sum|dy| + |out|)`, bit-identical
//!   across instruction sets; sums `(min(n, 4096) + 16) u32 sum|x| + u32 |sum|`;
//! - scale and unscale: bit-exact against the float32 product;
//! - optimizers: bit-exact against Keras' float32 operation order (test-side scalar code), and
//!   within `1e-5 |ref| + 1e-6 mean|ref|` of a float64 reference over three steps.

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{DType, Element, Rng};
use mp_kernels::activation::Activation;
use mp_kernels::optim::{AdamParams, NonFiniteOutputs, RmspropParams, SgdParams};
use mp_kernels::{Cpu, Error, Isa};

const SIZES: &[usize] = &[0, 1, 7, 15, 16, 17, 31, 33, 257, 1000, 1031, 4099];
/// Above the parallel threshold (and odd).
const BIG: usize = (1 << 20) + 3;
const U32: f64 = 1.0 / (1u64 << 24) as f64;

fn rng(name: &str) -> Rng {
    Rng::new(test_seed(name))
}

fn isas() -> Vec<Isa> {
    let v = Isa::supported();
    assert!(v.contains(&Isa::Scalar));
    v
}

/// The backend forced to `isa` (one of [`isas`]).
fn cpu(isa: Isa) -> Cpu {
    Cpu::with(isa).unwrap_or_else(|e| panic!("{isa:?}: {e}"))
}

/// The machine's default backend.
fn global() -> &'static Cpu {
    Cpu::global().unwrap()
}

fn sizes_and_big() -> impl Iterator<Item = usize> {
    SIZES.iter().copied().chain([BIG])
}

/// The raw bits of an element (little-endian, zero-extended).
fn bits<T: Element>(x: T) -> u32 {
    let mut b = 0u32;
    // SAFETY: copies `size_of::<T>()` <= 4 bytes of a plain value into a u32.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&x as *const T).cast::<u8>(),
            (&mut b as *mut u32).cast::<u8>(),
            std::mem::size_of::<T>(),
        )
    };
    b
}

fn sentinel<T: Element>() -> T {
    T::from_f32(-7777.0)
}

fn random<T: Element>(r: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(r.uniform(lo, hi))).collect()
}

fn unit<T: Element>() -> f64 {
    T::DTYPE.unit_roundoff()
}

fn half_subnormal<T: Element>() -> f64 {
    T::DTYPE.info().min_positive_subnormal / 2.0
}

fn assert_len_err<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(e @ Error::LengthMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(what), "{msg} should name {what}");
        }
        other => panic!("expected a length mismatch naming {what}, got {other:?}"),
    }
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, Error>, needles: &[&str]) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{msg} should contain {n}");
            }
        }
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

macro_rules! for_each_dtype {
    ($f:ident($($arg:expr),*)) => {{
        $f::<f32>($($arg),*);
        $f::<f16>($($arg),*);
        $f::<bf16>($($arg),*);
    }};
}

// =============================================================================================
// Casts
// =============================================================================================

/// What `half` gives (a copy for the same type).
fn ref_cast<S: Element, D: Element>(s: S) -> D {
    if S::DTYPE == D::DTYPE {
        // SAFETY: same dtype means same type (the trait is sealed).
        unsafe { std::mem::transmute_copy::<S, D>(&s) }
    } else {
        D::from_f32(s.to_f32())
    }
}

fn check_cast<S: Element, D: Element>(isa: Isa, src: &[S], want: &[D]) {
    let mut dst = vec![sentinel::<D>(); src.len()];
    cpu(isa).cast(src, &mut dst).unwrap();
    for (i, (&d, &w)) in dst.iter().zip(want).enumerate() {
        assert_eq!(
            bits(d),
            bits(w),
            "{isa:?} {:?}->{:?} at {i}: source bits {:#x}",
            S::DTYPE,
            D::DTYPE,
            bits(src[i])
        );
    }
}

fn cast_all_pairs_from<S: Element>(src: &[S]) {
    let w32: Vec<f32> = src.iter().map(|&s| ref_cast(s)).collect();
    let w16: Vec<f16> = src.iter().map(|&s| ref_cast(s)).collect();
    let wb: Vec<bf16> = src.iter().map(|&s| ref_cast(s)).collect();
    for isa in isas() {
        check_cast(isa, src, &w32);
        check_cast(isa, src, &w16);
        check_cast(isa, src, &wb);
    }
}

#[test]
fn cast_every_16_bit_pattern_matches_half() {
    let f: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let b: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    cast_all_pairs_from(&f);
    cast_all_pairs_from(&b);
}

#[test]
fn cast_float32_patterns_match_half() {
    let mut r = rng("cast_float32_patterns_match_half");
    let mut v: Vec<u32> = (0..=u32::MAX).step_by(4093).collect();
    v.extend((0..500_000).map(|_| r.next_u64() as u32));
    // bfloat16 ties and their neighbours, normal and subnormal.
    for _ in 0..100_000 {
        let hi = (r.next_u64() as u32) & 0xffff_0000;
        v.extend([0x7fff, 0x8000, 0x8001, 0x0000, 0xffff].map(|lo| hi | lo));
    }
    // float16 ties: the float32 halfway between neighbouring float16 values, and +/- 1 ulp.
    for h in 0..0x7c00u16 {
        let lo = f16::from_bits(h).to_f32() as f64;
        let hi = f16::from_bits(h + 1).to_f32() as f64;
        let mid = ((lo + hi) / 2.0) as f32;
        for b in [mid.to_bits() - 1, mid.to_bits(), mid.to_bits() + 1] {
            v.extend([b, b | 0x8000_0000]);
        }
    }
    v.extend([
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0xffbf_ffff,
        0x0000_0001,
    ]);
    v.extend([
        0x8000_0000,
        0x7f7f_ffff,
        0x477f_f000,
        0x477f_efff,
        0x3380_0000,
        0x3380_0001,
    ]);
    let src: Vec<f32> = v.into_iter().map(f32::from_bits).collect();
    cast_all_pairs_from(&src);
}

fn cast_sizes_for<S: Element>(r: &mut Rng) {
    for n in sizes_and_big() {
        // Mostly normal values over a wide range, some subnormals, zeros and specials.
        let src: Vec<S> = (0..n)
            .map(|i| match i % 11 {
                0 => S::from_f32(r.uniform(-1e-6, 1e-6) * 1e-33),
                1 => S::from_f32([f32::NAN, f32::INFINITY, -0.0, f32::NEG_INFINITY][i % 4]),
                _ => S::from_f32(r.normal() * 2f32.powi((r.below(40) as i32) - 20)),
            })
            .collect();
        cast_all_pairs_from(&src);
    }
}

#[test]
fn cast_every_size_and_pair_with_poisoned_outputs() {
    let mut r = rng("cast_every_size_and_pair_with_poisoned_outputs");
    cast_sizes_for::<f32>(&mut r);
    cast_sizes_for::<f16>(&mut r);
    cast_sizes_for::<bf16>(&mut r);
}

#[test]
fn cast_rounds_ties_to_even_and_keeps_subnormals() {
    for isa in isas() {
        let src = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            f32::from_bits(1),
            1e-40,
        ];
        let mut b = [bf16::ZERO; 4];
        cpu(isa).cast(&src, &mut b).unwrap();
        assert_eq!(b[0].to_f32(), 1.0, "{isa:?}");
        assert_eq!(b[1].to_f32(), 1.0 + 2f32.powi(-6), "{isa:?}");
        assert_eq!(
            b[2].to_bits(),
            0,
            "{isa:?}: 2^-149 rounds to +0 in bfloat16"
        );
        assert_eq!(b[3].to_bits(), bf16::from_f32(1e-40).to_bits(), "{isa:?}");
        assert_ne!(b[3].to_bits(), 0, "{isa:?}: subnormal kept");
        let mut h = [f16::ZERO; 4];
        cpu(isa)
            .cast(&[2f32.powi(-24), 65520.0, 65519.0, f32::NAN], &mut h)
            .unwrap();
        assert_eq!(h[0].to_bits(), 1, "{isa:?}: smallest float16 subnormal");
        assert!(h[1].is_infinite(), "{isa:?}: 65520 rounds to inf");
        assert_eq!(h[2].to_f32(), 65504.0, "{isa:?}");
        assert!(h[3].is_nan(), "{isa:?}");
    }
}

#[test]
fn cast_rejects_bad_lengths_without_writing() {
    for isa in isas() {
        let mut dst = [sentinel::<bf16>(); 3];
        assert_len_err(cpu(isa).cast(&[1.0f32; 4], &mut dst), "dst");
        assert!(dst.iter().all(|&d| bits(d) == bits(sentinel::<bf16>())));
    }
    assert_len_err(global().cast(&[1.0f32; 2], &mut [0.0f32; 3]), "dst");
}

/// Forcing an instruction set this CPU lacks fails when the backend is made (naming the set and
/// the operation), never inside a kernel; every supported one is accepted and kept.
#[test]
fn unsupported_isas_are_rejected() {
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_supported()) {
        assert_invalid(
            Cpu::with(isa),
            &["Cpu::with", "not supported", &format!("{isa:?}")],
        );
    }
    for isa in isas() {
        assert_eq!(cpu(isa).isa(), isa);
    }
    assert_eq!(global().isa(), Isa::detect());
}

// =============================================================================================
// Activations
// =============================================================================================

fn act_ref(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Linear => x,
        Activation::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
    }
}

const ACTS: [Activation; 4] = [
    Activation::Linear,
    Activation::Relu,
    Activation::Sigmoid,
    Activation::Tanh,
];

fn activation_forward_for<T: Element>(r: &mut Rng) {
    for n in sizes_and_big() {
        let x: Vec<T> = (0..n)
            .map(|i| match i % 7 {
                0 => T::from_f32(r.uniform(-120.0, 120.0)),
                1 => T::from_f32(r.uniform(-1e-3, 1e-3)),
                _ => T::from_f32(r.uniform(-12.0, 12.0)),
            })
            .collect();
        for act in ACTS {
            let want: Vec<f64> = x.iter().map(|v| act_ref(act, v.to_f64())).collect();
            let exact = matches!(act, Activation::Linear | Activation::Relu);
            let mut first: Option<Vec<T>> = None;
            for isa in isas() {
                let mut y = vec![sentinel::<T>(); n];
                cpu(isa).activation(act, &x, &mut y).unwrap();
                for i in 0..n {
                    let (got, w) = (y[i].to_f64(), want[i]);
                    let tol = if exact {
                        0.0
                    } else {
                        (unit::<T>() + 1e-6) * w.abs() + half_subnormal::<T>()
                    };
                    assert!(
                        (got - w).abs() <= tol,
                        "{isa:?} {act:?} {:?} n={n} i={i}: x={} got {got} want {w}",
                        T::DTYPE,
                        x[i]
                    );
                }
                let mut inplace = x.clone();
                cpu(isa).activation_inplace(act, &mut inplace).unwrap();
                assert!(
                    inplace.iter().zip(&y).all(|(a, b)| bits(*a) == bits(*b)),
                    "{isa:?} in place"
                );
                if exact {
                    if let Some(f) = &first {
                        assert!(f.iter().zip(&y).all(|(a, b)| bits(*a) == bits(*b)));
                    }
                    first.get_or_insert(y);
                }
            }
        }
    }
}

#[test]
fn activation_forward_matches_float64() {
    let mut r = rng("activation_forward_matches_float64");
    for_each_dtype!(activation_forward_for(&mut r));
}

fn activation_backward_for<T: Element>(r: &mut Rng) {
    for n in sizes_and_big() {
        let dy: Vec<T> = random(r, n, -2.0, 2.0);
        for act in ACTS {
            let y: Vec<T> = match act {
                Activation::Sigmoid => random(r, n, 0.0, 1.0),
                Activation::Relu => (0..n)
                    .map(|i| {
                        if i % 5 == 0 {
                            T::ZERO
                        } else {
                            T::from_f32(r.uniform(-1.0, 1.0))
                        }
                    })
                    .collect(),
                _ => random(r, n, -1.0, 1.0),
            };
            let mut first: Option<Vec<T>> = None;
            for isa in isas() {
                let mut dx = vec![sentinel::<T>(); n];
                cpu(isa).activation_backward(act, &dy, &y, &mut dx).unwrap();
                for i in 0..n {
                    let (g, yy) = (dy[i].to_f64(), y[i].to_f64());
                    let (want, tol) = match act {
                        Activation::Linear => (g, 0.0),
                        Activation::Relu => (if yy > 0.0 { g } else { 0.0 }, 0.0),
                        Activation::Sigmoid => {
                            let w = g * yy * (1.0 - yy);
                            (w, 4.0 * U32 * w.abs())
                        }
                        Activation::Tanh => {
                            let w = g * (1.0 - yy * yy);
                            (w, 3.0 * U32 * g.abs() * (1.0 + yy * yy))
                        }
                    };
                    let tol = tol * 1.01
                        + unit::<T>() * want.abs()
                        + half_subnormal::<T>() * f64::from(u8::from(tol > 0.0));
                    let got = dx[i].to_f64();
                    assert!(
                        (got - want).abs() <= tol,
                        "{isa:?} {act:?} {:?} n={n} i={i}: dy={g} y={yy} got {got} want {want}",
                        T::DTYPE
                    );
                }
                let mut g = dy.clone();
                cpu(isa)
                    .activation_backward_inplace(act, &mut g, &y)
                    .unwrap();
                assert!(
                    g.iter().zip(&dx).all(|(a, b)| bits(*a) == bits(*b)),
                    "{isa:?} in place"
                );
                // No FMA in the backward formulas: every instruction set gives the same bits.
                if let Some(f) = &first {
                    assert!(
                        f.iter().zip(&dx).all(|(a, b)| bits(*a) == bits(*b)),
                        "{isa:?} {act:?}"
                    );
                }
                first.get_or_insert(dx);
            }
        }
    }
}

#[test]
fn activation_backward_matches_float64() {
    let mut r = rng("activation_backward_matches_float64");
    for_each_dtype!(activation_backward_for(&mut r));
}

fn activation_specials_for<T: Element>() {
    const N: usize = 37;
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0];
    for pos in [0, 17, 35, 36] {
        for &s in &specials {
            let mut x = vec![T::from_f32(0.5); N];
            x[pos] = T::from_f32(s);
            for isa in isas() {
                let run = |act| {
                    let mut y = vec![sentinel::<T>(); N];
                    cpu(isa).activation(act, &x, &mut y).unwrap();
                    y[pos].to_f32()
                };
                let (relu, sig, tanh) = (
                    run(Activation::Relu),
                    run(Activation::Sigmoid),
                    run(Activation::Tanh),
                );
                let ctx = format!("{isa:?} {:?} x={s} at {pos}", T::DTYPE);
                if s.is_nan() {
                    assert!(relu.is_nan() && sig.is_nan() && tanh.is_nan(), "{ctx}");
                } else if s == f32::INFINITY {
                    assert_eq!((relu, sig, tanh), (f32::INFINITY, 1.0, 1.0), "{ctx}");
                } else if s == f32::NEG_INFINITY {
                    assert_eq!((relu, sig, tanh), (0.0, 0.0, -1.0), "{ctx}");
                } else {
                    assert_eq!(relu.to_bits(), 0, "{ctx}: relu(-0) is +0");
                    assert_eq!((sig, tanh), (0.5, 0.0), "{ctx}");
                }
            }
        }
    }
    // ReLU backward: NaN activation gives NaN; an infinite or NaN dy where the unit is off gives
    // NaN (inf * 0); where it is on, dy passes unchanged.
    for isa in isas() {
        let y: Vec<T> = (0..N)
            .map(|i| T::from_f32(if i % 2 == 0 { 1.0 } else { -1.0 }))
            .collect();
        let mut y_nan = y.clone();
        y_nan[33] = T::from_f32(f32::NAN);
        let mut dy = vec![T::from_f32(3.0); N];
        dy[34] = T::from_f32(f32::INFINITY); // unit on
        dy[35] = T::from_f32(f32::INFINITY); // unit off
        dy[36] = T::from_f32(f32::NAN); // unit on
        let mut dx = vec![sentinel::<T>(); N];
        cpu(isa)
            .activation_backward(Activation::Relu, &dy, &y_nan, &mut dx)
            .unwrap();
        let ctx = format!("{isa:?} {:?}", T::DTYPE);
        assert!(dx[33].to_f32().is_nan(), "{ctx}");
        assert_eq!(dx[34].to_f32(), f32::INFINITY, "{ctx}");
        assert!(dx[35].to_f32().is_nan(), "{ctx}");
        assert!(dx[36].to_f32().is_nan(), "{ctx}");
        assert_eq!(dx[0].to_f32(), 3.0, "{ctx}");
        assert_eq!(dx[1].to_f32(), 0.0, "{ctx}");
    }
}

#[test]
fn activations_propagate_non_finite_values() {
    for_each_dtype!(activation_specials_for());
}

#[test]
fn activation_rejects_bad_lengths_without_writing() {
    let mut y = [sentinel::<f16>(); 4];
    assert_len_err(
        global().activation(Activation::Relu, &[f16::ONE; 5], &mut y),
        "y",
    );
    assert_len_err(
        global().activation_backward(Activation::Relu, &[f16::ONE; 4], &[f16::ONE; 3], &mut y),
        "y",
    );
    assert_len_err(
        global().activation_backward(Activation::Sigmoid, &[f16::ONE; 5], &[f16::ONE; 5], &mut y),
        "dx",
    );
    assert_len_err(
        global().activation_backward_inplace(Activation::Tanh, &mut y, &[f16::ONE; 3]),
        "y",
    );
    assert!(y.iter().all(|&v| bits(v) == bits(sentinel::<f16>())));
}

// =============================================================================================
// Softmax and cross-entropy
// =============================================================================================

const SHAPES: &[(usize, usize)] = &[
    (0, 5),
    (5, 0),
    (1, 1),
    (1, 7),
    (3, 15),
    (4, 16),
    (2, 33),
    (5, 257),
    (3, 1000),
    (2, 1031),
    (64, 10),
    (128, 10),
    (1025, 1024),
];

fn softmax_ref(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn softmax_for<T: Element>(r: &mut Rng) {
    for &(rows, cols) in SHAPES {
        let x: Vec<T> = random(r, rows * cols, -10.0, 10.0);
        let mut want = Vec::with_capacity(x.len());
        for row in x.chunks(cols.max(1)) {
            want.extend(softmax_ref(
                &row.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
            ));
        }
        for isa in isas() {
            let mut y = vec![f32::NAN; rows * cols];
            cpu(isa).softmax(&x, rows, cols, &mut y).unwrap();
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                let err = (f64::from(g) - w).abs();
                assert!(
                    err <= 1e-6 && err <= 2e-5 * w,
                    "{isa:?} {:?} [{rows}, {cols}] at {i}: got {g} want {w}",
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn softmax_matches_float64() {
    let mut r = rng("softmax_matches_float64");
    for_each_dtype!(softmax_for(&mut r));
}

#[test]
fn softmax_propagates_non_finite_values_per_row() {
    let cols = 37;
    for isa in isas() {
        let mut x = vec![0.0f32; 5 * cols];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i % 7) as f32 - 3.0;
        }
        x[cols + 35] = f32::NAN; // row 1: NaN in the SIMD tail
        x[2 * cols + 3] = f32::INFINITY; // row 2: +inf
        x[3 * cols + 5] = f32::NEG_INFINITY; // row 3: one -inf (a masked logit)
        for j in 0..cols {
            x[4 * cols + j] = x[j] + 1e4; // row 4: row 0 shifted to large logits (exact)
        }
        let mut y = vec![-1.0f32; 5 * cols];
        cpu(isa).softmax(&x, 5, cols, &mut y).unwrap();
        let row = |r: usize| &y[r * cols..(r + 1) * cols];
        assert!(row(0).iter().all(|v| v.is_finite()), "{isa:?}");
        assert!(row(1).iter().all(|v| v.is_nan()), "{isa:?}: NaN row");
        assert!(row(2).iter().all(|v| v.is_nan()), "{isa:?}: +inf row");
        assert_eq!(row(3)[5], 0.0, "{isa:?}: -inf gives 0");
        assert!(row(3).iter().all(|v| v.is_finite()), "{isa:?}");
        assert!((row(3).iter().sum::<f32>() - 1.0).abs() < 1e-5, "{isa:?}");
        assert!(
            (row(4).iter().sum::<f32>() - 1.0).abs() < 1e-5,
            "{isa:?}: no overflow"
        );
        for j in 0..cols {
            assert!(
                (row(0)[j] - row(4)[j]).abs() < 1e-6,
                "{isa:?}: shift invariance"
            );
        }
    }
}

#[test]
fn softmax_backward_matches_float64() {
    let mut r = rng("softmax_backward_matches_float64");
    for &(rows, cols) in SHAPES {
        let mut y = Vec::with_capacity(rows * cols);
        for _ in 0..rows {
            let z: Vec<f64> = (0..cols).map(|_| f64::from(r.uniform(-5.0, 5.0))).collect();
            y.extend(softmax_ref(&z).into_iter().map(|v| v as f32));
        }
        let dy: Vec<f32> = r.uniform_vec(rows * cols, -1.0, 1.0);
        for isa in isas() {
            let mut dx = vec![f32::NAN; rows * cols];
            cpu(isa)
                .softmax_backward(&y, &dy, rows, cols, &mut dx)
                .unwrap();
            for row in 0..rows {
                let span = row * cols..(row + 1) * cols;
                let (y, dy, dx) = (&y[span.clone()], &dy[span.clone()], &dx[span]);
                let s: f64 = y
                    .iter()
                    .zip(dy)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let s_abs: f64 = y
                    .iter()
                    .zip(dy)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                for j in 0..cols {
                    let (yj, gj) = (f64::from(y[j]), f64::from(dy[j]));
                    let want = (gj - s) * yj;
                    let tol = yj * ((cols as f64 + 8.0) * U32 * s_abs + 3.0 * U32 * (gj - s).abs())
                        + 1e-30;
                    assert!(
                        (f64::from(dx[j]) - want).abs() <= tol * 1.01,
                        "{isa:?} [{rows}, {cols}] row {row} col {j}: got {} want {want}",
                        dx[j]
                    );
                }
            }
        }
    }
}

fn ce_ref_logits(z: &[f32], label: usize) -> f64 {
    let z: Vec<f64> = z.iter().map(|&v| f64::from(v)).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
    s.ln() + m - z[label]
}

fn ce_ref_probs(p: &[f32], label: usize) -> f64 {
    let s: f64 = p.iter().map(|&v| f64::from(v)).sum();
    let q = f64::from(p[label]) / s;
    let hi = f64::from((1.0f64 - 1e-7) as f32);
    -q.clamp(f64::from(1e-7f32), hi).ln()
}

fn random_probs(r: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut p = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let z: Vec<f64> = (0..cols).map(|_| f64::from(r.uniform(-6.0, 6.0))).collect();
        p.extend(softmax_ref(&z).into_iter().map(|v| v as f32));
    }
    p
}

#[test]
fn cross_entropy_matches_float64() {
    let mut r = rng("cross_entropy_matches_float64");
    for &(rows, cols) in SHAPES.iter().filter(|s| s.0 > 0 && s.1 > 0) {
        let labels: Vec<u32> = (0..rows).map(|_| r.below(cols as u64) as u32).collect();
        let logits: Vec<f32> = r.uniform_vec(rows * cols, -10.0, 10.0);
        let mut probs = random_probs(&mut r, rows, cols);
        // Clipped rows: the label's probability 0 (loss -ln 1e-7), or one-hot (loss ~1.2e-7).
        if rows > 2 {
            probs[labels[0] as usize] = 0.0;
            let row1 = &mut probs[cols..2 * cols];
            row1.iter_mut().for_each(|v| *v = 0.0);
            row1[labels[1] as usize] = 1.0;
        }
        for (input, from_logits) in [(&logits, true), (&probs, false)] {
            let per_row: Vec<f64> = (0..rows)
                .map(|i| {
                    let row = &input[i * cols..(i + 1) * cols];
                    if from_logits {
                        ce_ref_logits(row, labels[i] as usize)
                    } else {
                        ce_ref_probs(row, labels[i] as usize)
                    }
                })
                .collect();
            let want = per_row.iter().sum::<f64>() / rows as f64;
            for isa in isas() {
                let got = cpu(isa)
                    .softmax_cross_entropy(input, &labels, rows, cols, from_logits)
                    .unwrap();
                assert!(
                    (f64::from(got) - want).abs() <= 4e-6 * (1.0 + want),
                    "{isa:?} [{rows}, {cols}] from_logits={from_logits}: got {got} want {want}"
                );
                let mut rows_out = vec![f32::NAN; rows];
                cpu(isa)
                    .softmax_cross_entropy_rows(
                        input,
                        &labels,
                        rows,
                        cols,
                        from_logits,
                        &mut rows_out,
                    )
                    .unwrap();
                for (i, (&g, &w)) in rows_out.iter().zip(&per_row).enumerate() {
                    assert!(
                        (f64::from(g) - w).abs() <= 4e-6 * (1.0 + w),
                        "{isa:?} row {i}: got {g} want {w}"
                    );
                }
            }
        }
    }
    // Keras' clip values.
    let loss = global()
        .softmax_cross_entropy(&[0.0f32, 1.0], &[0u8], 1, 2, false)
        .unwrap();
    assert!((loss - 16.118_095).abs() < 1e-5, "{loss}");
    let loss = global()
        .softmax_cross_entropy(&[0.0f32, 1.0], &[1u8], 1, 2, false)
        .unwrap();
    assert!(loss > 1e-7 && loss < 1.3e-7, "{loss}");
}

#[test]
fn cross_entropy_grads_match_float64() {
    let mut r = rng("cross_entropy_grads_match_float64");
    for &(rows, cols) in SHAPES.iter().filter(|s| s.0 > 0 && s.1 > 0) {
        let labels: Vec<i64> = (0..rows).map(|_| r.below(cols as u64) as i64).collect();
        let probs = random_probs(&mut r, rows, cols);
        for scale in [1.0f32, 32768.0] {
            let factor = f64::from(scale) / rows as f64;
            for isa in isas() {
                let mut d = vec![f32::NAN; rows * cols];
                cpu(isa)
                    .softmax_cross_entropy_grad(&probs, &labels, rows, cols, scale, &mut d)
                    .unwrap();
                let mut dp = vec![f32::NAN; rows * cols];
                cpu(isa)
                    .crossentropy_grad_probs(&probs, &labels, rows, cols, scale, &mut dp)
                    .unwrap();
                for i in 0..rows {
                    let l = labels[i] as usize;
                    let p = &probs[i * cols..(i + 1) * cols];
                    let s: f64 = p.iter().map(|&v| f64::from(v)).sum();
                    let q = f64::from(p[l]) / s;
                    let near_clip = (q - 1e-7).abs() < 1e-5 || (q - (1.0 - 1e-7)).abs() < 1e-5;
                    let clipped = q < f64::from(1e-7f32) || q > f64::from((1.0f64 - 1e-7) as f32);
                    for j in 0..cols {
                        let onehot = if j == l { 1.0 } else { 0.0 };
                        let want = (f64::from(p[j]) - onehot) * factor;
                        let got = f64::from(d[i * cols + j]);
                        assert!(
                            (got - want).abs() <= 3.0 * U32 * want.abs() + 1e-40,
                            "{isa:?} [{rows}, {cols}] scale {scale} ({i}, {j}): got {got} want {want}"
                        );
                        if near_clip {
                            continue;
                        }
                        let (want, tol) = if clipped {
                            (0.0, 0.0)
                        } else {
                            let w = (1.0 / s - onehot / f64::from(p[l])) * factor;
                            let t = factor
                                * ((cols as f64 + 8.0) * U32 / s
                                    + 2.0 * U32 * onehot / f64::from(p[l]));
                            (w, t + 3.0 * U32 * w.abs())
                        };
                        let got = f64::from(dp[i * cols + j]);
                        assert!(
                            (got - want).abs() <= tol,
                            "{isa:?} probs grad [{rows}, {cols}] ({i}, {j}): got {got} want {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fused_gradient_folds_a_power_of_two_scale_exactly() {
    let mut r = rng("fused_gradient_folds_a_power_of_two_scale_exactly");
    let (rows, cols) = (128, 10);
    let probs = random_probs(&mut r, rows, cols);
    let labels: Vec<u32> = (0..rows).map(|_| r.below(cols as u64) as u32).collect();
    for isa in isas() {
        let mut plain = vec![0.0f32; rows * cols];
        let mut scaled = vec![0.0f32; rows * cols];
        cpu(isa)
            .softmax_cross_entropy_grad(&probs, &labels, rows, cols, 1.0, &mut plain)
            .unwrap();
        cpu(isa)
            .softmax_cross_entropy_grad(&probs, &labels, rows, cols, 32768.0, &mut scaled)
            .unwrap();
        for (a, b) in plain.iter().zip(&scaled) {
            assert_eq!((a * 32768.0).to_bits(), b.to_bits(), "{isa:?}");
        }
    }
}

#[test]
fn cross_entropy_rejects_bad_labels_without_writing() {
    let probs = vec![0.25f32; 5 * 4];
    let mut labels = vec![0u32, 1, 2, 3, 0];
    labels[3] = 4;
    let mut d = vec![-7.0f32; 20];
    assert_invalid(
        global().softmax_cross_entropy_grad(&probs, &labels, 5, 4, 1.0, &mut d),
        &["labels[3]", "4", "4 classes"],
    );
    assert_invalid(
        global().crossentropy_grad_probs(&probs, &labels, 5, 4, 1.0, &mut d),
        &["labels[3]"],
    );
    assert_invalid(
        global().softmax_cross_entropy(&probs, &labels, 5, 4, true),
        &["labels[3]"],
    );
    assert!(d.iter().all(|&v| v == -7.0));
    let neg = [0i32, -1, 0, 0, 0];
    assert_invalid(
        global().softmax_cross_entropy(&probs, &neg, 5, 4, false),
        &["labels[1]", "-1"],
    );
    assert_len_err(
        global().softmax_cross_entropy(&probs, &[0u8; 4], 5, 4, false),
        "labels",
    );
    assert_len_err(
        global().softmax_cross_entropy(&probs[1..], &[0u8; 5], 5, 4, false),
        "input",
    );
    assert_len_err(
        global().softmax_cross_entropy_grad(&probs, &[0u8; 5], 5, 4, 1.0, &mut d[1..]),
        "dlogits",
    );
    assert_invalid(
        global().softmax_cross_entropy(&[] as &[f32], &[] as &[u32], 0, 4, true),
        &["rows is 0"],
    );
    let mut out = vec![-7.0f32; 20];
    assert_len_err(global().softmax(&probs, 5, 3, &mut out), "x");
    assert_len_err(global().softmax(&probs, 5, 4, &mut out[2..]), "out");
    assert_len_err(
        global().softmax_backward(&probs, &probs[1..], 5, 4, &mut out),
        "dy",
    );
    assert!(out.iter().all(|&v| v == -7.0));
}

// =============================================================================================
// Reductions
// =============================================================================================

const BIAS_SHAPES: &[(usize, usize)] = &[
    (0, 5),
    (5, 0),
    (1, 1),
    (7, 3),
    (33, 17),
    (257, 65),
    (1000, 10),
    (1031, 33),
    (3000, 7),
    (300, 300),
    (4100, 20),
    (2176, 64),
    (1024, 1025),
];

fn bias_grad_for<T: Element>(r: &mut Rng) {
    for &(rows, cols) in BIAS_SHAPES {
        let dy: Vec<T> = random(r, rows * cols, -1.0, 1.0);
        for accumulate in [false, true] {
            let init: Vec<f32> = if accumulate {
                r.uniform_vec(cols, -5.0, 5.0)
            } else {
                vec![f32::NAN; cols]
            };
            let mut first: Option<Vec<f32>> = None;
            for isa in isas() {
                let mut out = init.clone();
                cpu(isa)
                    .bias_grad(&dy, rows, cols, &mut out, accumulate)
                    .unwrap();
                for c in 0..cols {
                    let col = (0..rows).map(|r| dy[r * cols + c].to_f64());
                    let (s, s_abs) = col.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                    let base = if accumulate { f64::from(init[c]) } else { 0.0 };
                    let want = base + s;
                    let tol = (rows as f64 + 1.0) * U32 * (s_abs + base.abs());
                    assert!(
                        (f64::from(out[c]) - want).abs() <= tol,
                        "{isa:?} {:?} [{rows}, {cols}] acc={accumulate} col {c}: got {} want {want}",
                        T::DTYPE,
                        out[c]
                    );
                }
                // Each column summed row after row on every path: identical bits.
                if let Some(f) = &first {
                    assert!(
                        f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?}"
                    );
                }
                first.get_or_insert(out);
            }
        }
    }
}

#[test]
fn bias_grad_matches_float64_and_is_identical_across_isas() {
    let mut r = rng("bias_grad_matches_float64_and_is_identical_across_isas");
    for_each_dtype!(bias_grad_for(&mut r));
}

fn argmax_want<T: Element>(row: &[T]) -> u32 {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in row.iter().enumerate() {
        let v = v.to_f64();
        if v.is_nan() {
            return i as u32;
        }
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

fn argmax_for<T: Element>(r: &mut Rng) {
    let shapes = [
        (0, 3),
        (1, 1),
        (9, 7),
        (5, 16),
        (4, 31),
        (4, 32),
        (6, 33),
        (3, 100),
        (3, 1000),
        (2, 1031),
        (1024, 1025),
    ];
    for (rows, cols) in shapes {
        // Few distinct values, so ties are common; some rows hold NaN (also in SIMD tails), and
        // some are all -inf.
        let mut x: Vec<T> = (0..rows * cols)
            .map(|_| T::from_f32(r.below(7) as f32 - 3.0))
            .collect();
        for row in 0..rows {
            match r.below(6) {
                0 => {
                    let j = r.below(cols as u64) as usize;
                    x[row * cols + j] = T::from_f32(f32::NAN);
                }
                1 => x[row * cols + cols - 1] = T::from_f32(f32::NAN),
                2 => x[row * cols..(row + 1) * cols]
                    .iter_mut()
                    .for_each(|v| *v = T::from_f32(f32::NEG_INFINITY)),
                _ => {}
            }
        }
        for isa in isas() {
            let mut out = vec![u32::MAX; rows];
            cpu(isa).argmax_rows(&x, rows, cols, &mut out).unwrap();
            for (row, &o) in out.iter().enumerate() {
                assert_eq!(
                    o,
                    argmax_want(&x[row * cols..(row + 1) * cols]),
                    "{isa:?} {:?} [{rows}, {cols}] row {row}",
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn argmax_takes_the_first_maximum_and_the_first_nan() {
    let mut r = rng("argmax_takes_the_first_maximum_and_the_first_nan");
    for_each_dtype!(argmax_for(&mut r));
    for isa in isas() {
        let mut out = [9u32; 2];
        cpu(isa)
            .argmax_rows(&[0.0f32, -0.0, 0.0, -1.0, -0.0, 0.0], 2, 3, &mut out)
            .unwrap();
        assert_eq!(out, [0, 1], "{isa:?}: -0 == +0, first wins");
    }
}

#[test]
fn argmax_rejects_bad_shapes() {
    assert_invalid(
        global().argmax_rows(&[] as &[f32], 2, 0, &mut [0u32; 2]),
        &["cols is 0"],
    );
    assert_len_err(
        global().argmax_rows(&[0.0f32; 6], 2, 3, &mut [0u32; 3]),
        "out",
    );
    assert_len_err(
        global().argmax_rows(&[0.0f32; 5], 2, 3, &mut [0u32; 2]),
        "x",
    );
    let mut out = [f32::NAN; 3];
    assert_len_err(
        global().bias_grad(&[0.0f32; 5], 2, 3, &mut out, false),
        "dy",
    );
    assert_len_err(
        global().bias_grad(&[0.0f32; 6], 2, 3, &mut out[1..], false),
        "out",
    );
    assert!(out.iter().all(|v| v.is_nan()));
    assert_invalid(
        global().bias_grad(&[0.0f32; 6], usize::MAX, 3, &mut out, false),
        &["shape"],
    );
}

fn sum_for<T: Element>(r: &mut Rng) {
    for n in sizes_and_big() {
        let x: Vec<T> = random(r, n, -1.0, 1.0);
        let (want, abs) = x.iter().fold((0.0, 0.0), |(s, a), v| {
            (s + v.to_f64(), a + v.to_f64().abs())
        });
        for isa in isas() {
            let got = f64::from(cpu(isa).sum(&x));
            let tol = (n.min(4096) as f64 + 16.0) * U32 * abs + U32 * want.abs();
            assert!(
                (got - want).abs() <= tol,
                "{isa:?} {:?} n={n}: got {got} want {want}",
                T::DTYPE
            );
        }
        if n > 0 {
            let m = f64::from(global().mean(&x));
            let w = want / n as f64;
            assert!(
                (m - w).abs() <= (n.min(4096) as f64 + 16.0) * U32 * abs / n as f64 + U32 * w.abs()
            );
        }
    }
    assert!(global().mean::<T>(&[]).is_nan());
    assert_eq!(global().sum::<T>(&[]), 0.0);
    assert!(global().sum(&[T::ONE, T::from_f32(f32::NAN)]).is_nan());
}

#[test]
fn sum_and_mean_match_float64() {
    let mut r = rng("sum_and_mean_match_float64");
    for_each_dtype!(sum_for(&mut r));
}

#[test]
fn reductions_are_deterministic() {
    let mut r = rng("reductions_are_deterministic");
    let (rows, cols) = (1025, 1024);
    let x: Vec<f32> = r.uniform_vec(rows * cols, -10.0, 10.0);
    let labels: Vec<u32> = (0..rows).map(|_| r.below(cols as u64) as u32).collect();
    let run = || {
        let mut p = vec![0.0f32; rows * cols];
        global().softmax(&x, rows, cols, &mut p).unwrap();
        let loss = global()
            .softmax_cross_entropy(&x, &labels, rows, cols, true)
            .unwrap();
        let mut db = vec![0.0f32; cols];
        global().bias_grad(&x, rows, cols, &mut db, false).unwrap();
        let mut db2 = vec![0.0f32; 20];
        global()
            .bias_grad(&x[..20 * 5000], 5000, 20, &mut db2, false)
            .unwrap();
        (p, loss, db, db2, global().sum(&x))
    };
    let (a, b) = (run(), run());
    assert!(
        a.0.iter()
            .zip(&b.0)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert_eq!(a.1.to_bits(), b.1.to_bits());
    assert!(
        a.2.iter()
            .zip(&b.2)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert!(
        a.3.iter()
            .zip(&b.3)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert_eq!(a.4.to_bits(), b.4.to_bits());
}

// =============================================================================================
// Scaling, unscaling and finiteness
// =============================================================================================

fn scale_for<T: Element>(r: &mut Rng) {
    for n in sizes_and_big() {
        let x: Vec<T> = random(r, n, -100.0, 100.0);
        for s in [0.5f32, 3.0, 1.0 / 3.0, 1e30, f32::NAN] {
            let want: Vec<T> = x.iter().map(|v| T::from_f32(v.to_f32() * s)).collect();
            for isa in isas() {
                let mut y = x.clone();
                cpu(isa).scale(&mut y, s);
                for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                    assert_eq!(
                        bits(g),
                        bits(w),
                        "{isa:?} {:?} n={n} s={s} at {i}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn scale_is_the_rounded_float32_product() {
    let mut r = rng("scale_is_the_rounded_float32_product");
    for_each_dtype!(scale_for(&mut r));
}

/// Positions to poison: first, middle, last, and inside the last partial vector.
fn positions(n: usize) -> Vec<usize> {
    let mut p = vec![0, n / 2, n - 1];
    if n % 16 > 1 {
        p.push(n - n % 16 + 1);
    }
    if n % 8 > 1 {
        p.push(n - n % 8 + 1);
    }
    p
}

#[test]
fn unscale_and_check_unscales_exactly_and_catches_every_non_finite() {
    let mut r = rng("unscale_and_check_unscales_exactly_and_catches_every_non_finite");
    let s = 32768.0f32;
    let inv = (1.0 / s as f64) as f32;
    for n in sizes_and_big() {
        let g: Vec<f32> = r
            .uniform_vec(n, -10.0, 10.0)
            .into_iter()
            .map(|v| v * s)
            .collect();
        for isa in isas() {
            let mut u = g.clone();
            assert!(cpu(isa).unscale_and_check(&mut u, inv), "{isa:?} n={n}");
            assert!(
                u.iter()
                    .zip(&g)
                    .all(|(a, b)| a.to_bits() == (b * inv).to_bits()),
                "{isa:?} n={n}"
            );
            if n == 0 {
                continue;
            }
            for pos in positions(n) {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut u = g.clone();
                    u[pos] = bad;
                    let ok = cpu(isa).unscale_and_check(&mut u, inv);
                    assert!(!ok, "{isa:?} n={n}: {bad} at {pos} missed");
                    // The whole slice is still processed.
                    let other = if pos == 0 { n - 1 } else { 0 };
                    if other != pos {
                        assert_eq!(
                            u[other].to_bits(),
                            (g[other] * inv).to_bits(),
                            "{isa:?} n={n}"
                        );
                    }
                }
            }
        }
    }
    for isa in isas() {
        // A finite value that overflows, and a non-finite factor.
        assert!(!cpu(isa).unscale_and_check(&mut [1.0; 9].map(|v: f32| v * 1e38), 8.0));
        assert!(!cpu(isa).unscale_and_check(&mut [1.0f32; 17], f32::NAN));
        assert!(!cpu(isa).unscale_and_check(&mut [f32::INFINITY; 3], 0.0));
    }
    assert!(global().unscale_and_check(&mut [], inv));
}

fn all_finite_for<T: Element>(r: &mut Rng) {
    for n in sizes_and_big() {
        let x: Vec<T> = random(r, n, -1000.0, 1000.0);
        for isa in isas() {
            assert!(cpu(isa).all_finite(&x), "{isa:?} {:?} n={n}", T::DTYPE);
            if n == 0 {
                continue;
            }
            for pos in positions(n) {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut y = x.clone();
                    y[pos] = T::from_f32(bad);
                    assert!(
                        !cpu(isa).all_finite(&y),
                        "{isa:?} {:?} n={n}: {bad} at {pos}",
                        T::DTYPE
                    );
                }
            }
        }
    }
    let max = T::from_f64(T::DTYPE.info().max);
    assert!(global().all_finite(&[max, T::ZERO, T::from_f32(-0.0)]));
}

#[test]
fn all_finite_catches_every_non_finite() {
    let mut r = rng("all_finite_catches_every_non_finite");
    for_each_dtype!(all_finite_for(&mut r));
    assert!(
        !global().all_finite(&[f16::from_f32(1e5)]),
        "float16 overflow is inf"
    );
    assert!(global().all_finite(&[bf16::from_f32(1e38)]));
}

// =============================================================================================
// Optimizers
// =============================================================================================

/// Keras' float32 operation order, written out independently of the kernels.
mod keras {
    use super::*;

    pub fn sgd(var: &mut [f32], g: &[f32], m: &mut [f32], p: SgdParams) {
        for i in 0..var.len() {
            if p.momentum == 0.0 {
                var[i] -= g[i] * p.lr;
            } else {
                m[i] = -g[i] * p.lr + m[i] * p.momentum;
                if p.nesterov {
                    var[i] += -g[i] * p.lr + m[i] * p.momentum;
                } else {
                    var[i] += m[i];
                }
            }
        }
    }

    pub fn rmsprop(var: &mut [f32], g: &[f32], v: &mut [f32], mom: &mut [f32], p: RmspropParams) {
        for i in 0..var.len() {
            v[i] = p.rho * v[i] + p.one_minus_rho * (g[i] * g[i]);
            let inc = p.lr * g[i] / (v[i] + p.epsilon).sqrt();
            if p.momentum > 0.0 {
                mom[i] = p.momentum * mom[i] + inc;
                var[i] -= mom[i];
            } else {
                var[i] -= inc;
            }
        }
    }

    pub fn adam(var: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], p: AdamParams) {
        for i in 0..var.len() {
            if p.weight_decay != 0.0 {
                // Keras 3's `_apply_weight_decay`: variable - variable * wd * lr.
                var[i] -= var[i] * p.weight_decay * p.lr;
            }
            m[i] += (g[i] - m[i]) * p.one_minus_beta1;
            v[i] += (g[i] * g[i] - v[i]) * p.one_minus_beta2;
            var[i] -= m[i] * p.alpha / (v[i].sqrt() + p.epsilon);
        }
    }
}

fn close_arrays(what: &str, got: &[f32], want: &[f64]) {
    let mean = want.iter().map(|v| v.abs()).sum::<f64>() / want.len().max(1) as f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= 1e-5 * w.abs() + 1e-6 * mean,
            "{what} at {i}: got {g} want {w}"
        );
    }
}

#[test]
fn optimizers_match_hand_computed_steps() {
    let close = |got: f32, want: f64| {
        assert!(
            (f64::from(got) - want).abs() < 1e-6,
            "got {got} want {want}"
        )
    };
    let mut var = [1.0f32, 2.0, -3.0];
    global()
        .sgd_update(
            &mut var,
            &[1.0, -2.0, 0.5],
            None,
            SgdParams {
                lr: 0.1,
                momentum: 0.0,
                nesterov: false,
            },
        )
        .unwrap();
    close(var[0], 0.9);
    close(var[1], 2.2);
    close(var[2], -3.05);
    for (nesterov, want) in [(false, [0.9, 0.71]), (true, [0.81, 0.539])] {
        let (mut var, mut m) = ([1.0f32], [0.0f32]);
        let p = SgdParams {
            lr: 0.1,
            momentum: 0.9,
            nesterov,
        };
        for w in want {
            global()
                .sgd_update(&mut var, &[1.0], Some(&mut m), p)
                .unwrap();
            close(var[0], w);
        }
    }
    for (momentum, want) in [
        (0.0, [0.968_377_239_209_692_7, 0.953_633_050_004_718_5]),
        (0.5, [0.968_377_239_209_692_7, 0.937_821_669_609_564_9]),
    ] {
        let (mut var, mut v, mut mom) = ([1.0f32], [0.0f32], [0.0f32]);
        let p = RmspropParams::new(0.01, 0.9, momentum, 1e-7);
        for (g, w) in [1.0f32, 0.5].into_iter().zip(want) {
            global()
                .rmsprop_update(&mut var, &[g], &mut v, Some(&mut mom), p)
                .unwrap();
            close(var[0], w);
        }
    }
    let (mut var, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
    for (t, g, w) in [
        (1, 0.5f32, 0.999_000_006_324_515_4),
        (2, -1.0, 0.999_366_108_815_953_4),
    ] {
        global()
            .adam_update(
                &mut var,
                &[g],
                &mut m,
                &mut v,
                AdamParams::new(0.001, 0.9, 0.999, 1e-7, t),
            )
            .unwrap();
        close(var[0], w);
    }
    close(m[0], -0.055);
    close(v[0], 0.001_249_75);
}

#[test]
fn optimizers_follow_keras_bit_for_bit_and_match_float64() {
    let mut r = rng("optimizers_follow_keras_bit_for_bit_and_match_float64");
    for n in sizes_and_big() {
        let var0: Vec<f32> = r.uniform_vec(n, -1.0, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| r.uniform_vec(n, -1.0, 1.0)).collect();
        for isa in isas() {
            // SGD, plain / momentum / Nesterov.
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
                let p = SgdParams {
                    lr: 0.05,
                    momentum,
                    nesterov,
                };
                let (mut var, mut m) = (var0.clone(), vec![0.0f32; n]);
                let (mut kv, mut km) = (var0.clone(), vec![0.0f32; n]);
                let (mut rv, mut rm): (Vec<f64>, Vec<f64>) =
                    (var0.iter().map(|&v| f64::from(v)).collect(), vec![0.0; n]);
                for g in &grads {
                    let buf = if momentum != 0.0 {
                        Some(&mut m[..])
                    } else {
                        None
                    };
                    cpu(isa).sgd_update(&mut var, g, buf, p).unwrap();
                    keras::sgd(&mut kv, g, &mut km, p);
                    let (lr, mo) = (f64::from(p.lr), f64::from(p.momentum));
                    for i in 0..n {
                        let g = f64::from(g[i]);
                        if momentum == 0.0 {
                            rv[i] -= lr * g;
                        } else {
                            rm[i] = mo * rm[i] - lr * g;
                            rv[i] += if nesterov { mo * rm[i] - lr * g } else { rm[i] };
                        }
                    }
                }
                let ctx = format!("{isa:?} sgd momentum={momentum} nesterov={nesterov} n={n}");
                assert!(
                    var.iter().zip(&kv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                assert!(
                    m.iter().zip(&km).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                close_arrays(&ctx, &var, &rv);
            }
            // RMSprop, with and without momentum.
            for momentum in [0.0f32, 0.5] {
                let p = RmspropParams::new(0.01, 0.9, momentum, 1e-7);
                let (mut var, mut v, mut mom) = (var0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
                let (mut kv, mut kvv, mut kmom) = (var0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
                let mut rv: Vec<f64> = var0.iter().map(|&v| f64::from(v)).collect();
                let (mut rvv, mut rmom) = (vec![0.0f64; n], vec![0.0f64; n]);
                for g in &grads {
                    let buf = if momentum > 0.0 {
                        Some(&mut mom[..])
                    } else {
                        None
                    };
                    cpu(isa)
                        .rmsprop_update(&mut var, g, &mut v, buf, p)
                        .unwrap();
                    keras::rmsprop(&mut kv, g, &mut kvv, &mut kmom, p);
                    for i in 0..n {
                        let g = f64::from(g[i]);
                        rvv[i] = 0.9 * rvv[i] + 0.1 * g * g;
                        let inc = 0.01 * g / (rvv[i] + 1e-7).sqrt();
                        rmom[i] = f64::from(momentum) * rmom[i] + inc;
                        rv[i] -= if momentum > 0.0 { rmom[i] } else { inc };
                    }
                }
                let ctx = format!("{isa:?} rmsprop momentum={momentum} n={n}");
                assert!(
                    var.iter().zip(&kv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                assert!(
                    v.iter().zip(&kvv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                close_arrays(&ctx, &var, &rv);
                close_arrays(&ctx, &v, &rvv);
            }
            // Adam, and AdamW (decoupled weight decay).
            for wd in [0.0f32, 0.05] {
                let (mut var, mut m, mut v) = (var0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
                let (mut kv, mut km, mut kvv) = (var0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
                let mut rv: Vec<f64> = var0.iter().map(|&v| f64::from(v)).collect();
                let (mut rm, mut rvv) = (vec![0.0f64; n], vec![0.0f64; n]);
                for (t, g) in grads.iter().enumerate() {
                    let t = t as u64 + 1;
                    let p = AdamParams::new(0.001, 0.9, 0.999, 1e-7, t).with_weight_decay(wd);
                    cpu(isa)
                        .adam_update(&mut var, g, &mut m, &mut v, p)
                        .unwrap();
                    keras::adam(&mut kv, g, &mut km, &mut kvv, p);
                    let alpha = 0.001 * (1.0 - 0.999f64.powi(t as i32)).sqrt()
                        / (1.0 - 0.9f64.powi(t as i32));
                    for i in 0..n {
                        let g = f64::from(g[i]);
                        rv[i] -= rv[i] * f64::from(wd) * 0.001;
                        rm[i] += (g - rm[i]) * 0.1;
                        rvv[i] += (g * g - rvv[i]) * 0.001;
                        rv[i] -= alpha * rm[i] / (rvv[i].sqrt() + 1e-7);
                    }
                }
                let ctx = format!("{isa:?} adam weight_decay={wd} n={n}");
                assert!(
                    var.iter().zip(&kv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                assert!(
                    m.iter().zip(&km).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                assert!(
                    v.iter().zip(&kvv).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}"
                );
                close_arrays(&ctx, &var, &rv);
                close_arrays(&ctx, &m, &rm);
                close_arrays(&ctx, &v, &rvv);
            }
        }
    }
}

/// One optimizer configuration, for the tests of the checking twins.
#[derive(Clone, Copy, Debug)]
enum Rule {
    Sgd(SgdParams),
    Rmsprop(RmspropParams),
    Adam(AdamParams),
}

impl Rule {
    fn states(self) -> usize {
        match self {
            Rule::Sgd(p) => usize::from(p.momentum != 0.0),
            Rule::Rmsprop(p) => 1 + usize::from(p.momentum > 0.0),
            Rule::Adam(_) => 2,
        }
    }

    fn write(self, cpu: &Cpu, var: &mut [f32], g: &[f32], s: &mut [Vec<f32>]) {
        match (self, s) {
            (Rule::Sgd(p), []) => cpu.sgd_update(var, g, None, p),
            (Rule::Sgd(p), [m]) => cpu.sgd_update(var, g, Some(m), p),
            (Rule::Rmsprop(p), [v]) => cpu.rmsprop_update(var, g, v, None, p),
            (Rule::Rmsprop(p), [v, m]) => cpu.rmsprop_update(var, g, v, Some(m), p),
            (Rule::Adam(p), [m, v]) => cpu.adam_update(var, g, m, v, p),
            (r, s) => panic!("{r:?} with {} state buffers", s.len()),
        }
        .unwrap()
    }

    fn check(self, cpu: &Cpu, var: &[f32], g: &[f32], s: &[Vec<f32>]) -> NonFiniteOutputs {
        match (self, s) {
            (Rule::Sgd(p), []) => cpu.sgd_update_check(var, g, None, p),
            (Rule::Sgd(p), [m]) => cpu.sgd_update_check(var, g, Some(m), p),
            (Rule::Rmsprop(p), [v]) => cpu.rmsprop_update_check(var, g, v, None, p),
            (Rule::Rmsprop(p), [v, m]) => cpu.rmsprop_update_check(var, g, v, Some(m), p),
            (Rule::Adam(p), [m, v]) => cpu.adam_update_check(var, g, m, v, p),
            (r, s) => panic!("{r:?} with {} state buffers", s.len()),
        }
        .unwrap()
    }
}

/// The checking twin of each update reports exactly which outputs the update writes as NaN or
/// infinity (it is the same arithmetic), on every instruction set and size, and writes nothing:
/// finite gradients that overflow (1e30 squared in Adam's and RMSprop's `v`, `-MAX - lr * MAX`
/// in SGD), NaN in the state, NaN gradients, and nothing at all.
#[test]
fn optimizer_checks_report_exactly_what_the_update_would_make_non_finite() {
    let mut r = rng("optimizer_checks_report_exactly_what_the_update_would_make_non_finite");
    let rules = [
        Rule::Sgd(SgdParams {
            lr: 0.05,
            momentum: 0.0,
            nesterov: false,
        }),
        Rule::Sgd(SgdParams {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
        }),
        Rule::Rmsprop(RmspropParams::new(0.01, 0.9, 0.0, 1e-7)),
        Rule::Rmsprop(RmspropParams::new(0.01, 0.9, 0.5, 1e-7)),
        Rule::Adam(AdamParams::new(0.001, 0.9, 0.999, 1e-7, 3)),
        Rule::Adam(AdamParams::new(0.001, 0.9, 0.999, 1e-7, 3).with_weight_decay(0.05)),
    ];
    for n in sizes_and_big() {
        for rule in rules {
            for poison in 0..6 {
                let mut var = r.uniform_vec(n, -1.0, 1.0);
                let mut g = r.uniform_vec(n, -1.0, 1.0);
                let mut s: Vec<Vec<f32>> = (0..rule.states())
                    .map(|_| r.uniform_vec(n, 0.0, 1.0))
                    .collect();
                if n > 0 {
                    let i = r.below(n as u64) as usize;
                    match poison {
                        1 => g[i] = 1e30,
                        2 => (var[i], g[i]) = (-f32::MAX, f32::MAX),
                        3 if !s.is_empty() => s[0][i] = f32::NAN,
                        4 => g[i] = f32::NAN,
                        5 => g[i] = -1e30,
                        _ => {}
                    }
                }
                for isa in isas() {
                    let cpu = cpu(isa);
                    let before = (var.clone(), s.clone());
                    let got = rule.check(&cpu, &var, &g, &s);
                    let same = |a: &[f32], b: &[f32]| {
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                    };
                    assert!(same(&var, &before.0), "{isa:?} {rule:?}: check wrote");
                    assert!(s.iter().zip(&before.1).all(|(a, b)| same(a, b)));
                    let (mut w, mut st) = (var.clone(), s.clone());
                    rule.write(&cpu, &mut w, &g, &mut st);
                    let bad = |x: &[f32]| x.iter().any(|v| !v.is_finite());
                    let want = NonFiniteOutputs::from_flags(bad(&w), st.iter().map(|x| bad(x)));
                    assert_eq!(
                        got, want,
                        "{isa:?} {rule:?} n={n} poison={poison}: check {got:?}, update {want:?}"
                    );
                    if poison == 0 {
                        assert!(got.all_finite(), "{isa:?} {rule:?} n={n}");
                    }
                }
            }
        }
    }
    // The cases the optimizers rely on, by name: Adam on a finite 1e30 gradient overflows `v`
    // only (the step itself is `m / inf`, 0); plain SGD cannot overflow a slot it has none of.
    let adam = Rule::Adam(AdamParams::new(0.001, 0.9, 0.999, 1e-7, 1));
    let (var, g, s) = (vec![0.5f32; 3], vec![0.1, 1e30, 0.1], vec![vec![0.0; 3]; 2]);
    let out = adam.check(global(), &var, &g, &s);
    assert!(!out.all_finite() && !out.variable() && !out.state(0) && out.state(1));
    assert!(!out.state(40));
}

#[test]
fn optimizers_reject_bad_lengths_without_writing() {
    let mut var = [1.0f32; 4];
    let mut s = [0.0f32; 4];
    let sgd = SgdParams {
        lr: 0.1,
        momentum: 0.9,
        nesterov: false,
    };
    assert_len_err(
        global().sgd_update(&mut var, &[1.0; 3], Some(&mut s), sgd),
        "grad",
    );
    assert_len_err(
        global().sgd_update(&mut var, &[1.0; 4], Some(&mut s[..3]), sgd),
        "momentum",
    );
    assert_invalid(
        global().sgd_update(&mut var, &[1.0; 4], None, sgd),
        &["momentum"],
    );
    let rms = RmspropParams::new(0.1, 0.9, 0.5, 1e-7);
    let mut v = [0.0f32; 3];
    assert_len_err(
        global().rmsprop_update(&mut var, &[1.0; 4], &mut v, Some(&mut s), rms),
        "velocity",
    );
    let mut v4 = [0.0f32; 4];
    assert_invalid(
        global().rmsprop_update(&mut var, &[1.0; 4], &mut v4, None, rms),
        &["momentum"],
    );
    let adam = AdamParams::new(0.001, 0.9, 0.999, 1e-7, 1);
    let mut m = [0.0f32; 4];
    assert_len_err(
        global().adam_update(&mut var, &[1.0; 4], &mut m, &mut v, adam),
        "v",
    );
    assert_len_err(
        global().adam_update(&mut var, &[1.0; 4], &mut v, &mut m, adam),
        "m",
    );
    assert_eq!(var, [1.0; 4]);
    assert_eq!(s, [0.0; 4]);
    assert_eq!(v4, [0.0; 4]);
    // The checking twins check the same way.
    assert_len_err(
        global().sgd_update_check(&var, &[1.0; 3], Some(&s), sgd),
        "grad",
    );
    assert_invalid(
        global().sgd_update_check(&var, &[1.0; 4], None, sgd),
        &["sgd_update_check", "momentum"],
    );
    assert_len_err(
        global().rmsprop_update_check(&var, &[1.0; 4], &v, Some(&s), rms),
        "velocity",
    );
    assert_len_err(
        global().adam_update_check(&var, &[1.0; 4], &m, &v, adam),
        "v",
    );
    // Without momentum the buffer is optional and untouched.
    let plain = SgdParams {
        lr: 0.5,
        momentum: 0.0,
        nesterov: false,
    };
    global()
        .sgd_update(&mut var, &[1.0; 4], Some(&mut s), plain)
        .unwrap();
    assert_eq!((var, s), ([0.5; 4], [0.0; 4]));
}

#[test]
fn optimizers_propagate_non_finite_gradients() {
    for isa in isas() {
        let mut var = [1.0f32; 19];
        let mut g = [0.5f32; 19];
        g[18] = f32::NAN;
        g[3] = f32::INFINITY;
        let (mut m, mut v) = ([0.0f32; 19], [0.0f32; 19]);
        cpu(isa)
            .adam_update(
                &mut var,
                &g,
                &mut m,
                &mut v,
                AdamParams::new(0.001, 0.9, 0.999, 1e-7, 1),
            )
            .unwrap();
        assert!(
            var[18].is_nan() && var[3].is_nan(),
            "{isa:?}: inf / inf is NaN"
        );
        assert!(var[0].is_finite(), "{isa:?}");
        let mut var = [1.0f32; 19];
        cpu(isa)
            .sgd_update(
                &mut var,
                &g,
                None,
                SgdParams {
                    lr: 0.1,
                    momentum: 0.0,
                    nesterov: false,
                },
            )
            .unwrap();
        assert!(var[18].is_nan() && var[3] == f32::NEG_INFINITY, "{isa:?}");
    }
}

#[test]
fn dtype_facts_used_by_the_bounds() {
    assert_eq!(unit::<f32>(), U32);
    assert_eq!(DType::BF16.unit_roundoff(), 2f64.powi(-8));
}

#[test]
fn sum_squares_and_clip_match_float64() {
    let mut rng = Rng::new(test_seed("sum_squares_and_clip"));
    for n in [0usize, 1, 7, 4095, 4097, 70_001] {
        let x: Vec<f32> = rng.uniform_vec(n, -3.0, 3.0);
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let got = global().sum_squares(&x);
        assert!(
            (got - want).abs() <= 1e-12 * want.max(1e-300),
            "n={n}: {got} vs {want}"
        );
        // The same bits with one thread or two (blocks are summed in a fixed order).
        let one = mp_kernels::threads::serial(|| global().sum_squares(&x));
        assert_eq!(one.to_bits(), got.to_bits(), "n={n}");
        let mut c = x.clone();
        global().clip(&mut c, -1.25, 0.5).unwrap();
        for (c, x) in c.iter().zip(&x) {
            assert_eq!(*c, x.clamp(-1.25, 0.5));
        }
    }
    let mut x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.25];
    assert!(global().sum_squares(&x).is_nan());
    assert_eq!(global().sum_squares(&x[1..]), f64::INFINITY);
    global().clip(&mut x, -1.0, 1.0).unwrap();
    assert!(x[0].is_nan(), "NaN stays NaN");
    assert_eq!(&x[1..], &[1.0, -1.0, 0.25]);
    for (lo, hi) in [(1.0, -1.0), (f32::NAN, 1.0), (0.0, f32::NAN)] {
        let mut y = [2.0f32];
        let e = global().clip(&mut y, lo, hi).unwrap_err().to_string();
        assert!(e.contains("clip") && e.contains("not ordered"), "{e}");
        assert_eq!(y, [2.0]);
    }
}

/// The residual addition `y += x`: added in float32 and rounded once, so bit-identical to the
/// per-element expression (16-bit inputs now go through the vector casts a tile at a time),
/// and within `(u_T + u32) |ref|` of the float64 sum (two roundings for 16-bit types); NaN and infinities as IEEE says.
fn add_assign_matches<T: Element>() {
    let mut r = rng(&format!("add_assign {:?}", T::DTYPE));
    for n in sizes_and_big() {
        let mut x = random::<T>(&mut r, n, -3.0, 3.0);
        let mut y = random::<T>(&mut r, n, -3.0, 3.0);
        if n > 3 {
            x[1] = T::from_f32(f32::NAN);
            x[2] = T::from_f32(f32::INFINITY);
            y[3] = T::from_f32(f32::NEG_INFINITY);
        }
        let want: Vec<T> = x
            .iter()
            .zip(&y)
            .map(|(a, b)| T::from_f32(b.to_f32() + a.to_f32()))
            .collect();
        for isa in isas() {
            let mut other = y.clone();
            cpu(isa).add_assign(&x, &mut other).unwrap();
            let same = other.iter().zip(&want).all(|(g, w)| bits(*g) == bits(*w));
            assert!(same, "{:?} n {n} on {isa:?}", T::DTYPE);
        }
        let mut got = y.clone();
        global().add_assign(&x, &mut got).unwrap();
        for (i, ((g, w), (a, b))) in got.iter().zip(&want).zip(x.iter().zip(&y)).enumerate() {
            assert_eq!(bits(*g), bits(*w), "{:?} n {n} at {i}", T::DTYPE);
            let exact = a.to_f32() as f64 + b.to_f32() as f64;
            if exact.is_finite() {
                let err = (g.to_f32() as f64 - exact).abs();
                assert!(
                    err <= (unit::<T>() + U32) * exact.abs(),
                    "{:?} at {i}",
                    T::DTYPE
                );
            }
        }
        if n > 3 {
            assert!(got[1].to_f32().is_nan() && got[2].to_f32() == f32::INFINITY);
            assert!(got[3].to_f32() == f32::NEG_INFINITY);
        }
    }
}

#[test]
fn add_assign_is_one_rounding_of_the_float32_sum_per_dtype() {
    add_assign_matches::<f32>();
    add_assign_matches::<bf16>();
    add_assign_matches::<f16>();
}
