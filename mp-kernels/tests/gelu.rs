//! GELU (exact and tanh), forward and derivative, against float64 references, with the bounds
//! stated and asserted:
//!
//! - float32: at most 2 ulp (distance in float32 steps from the float64 value rounded to float32)
//!   on a dense sweep of [-10, 10] and beyond it (to `f32::MAX`, tiny and subnormal inputs);
//! - bfloat16 and float16, every bit pattern: the float32 result rounded once to the type, and at
//!   most 1 step of the type from the float64 value rounded to the type. (A float32 result within
//!   2 float32 ulp is within `0.5 + 2^-12` steps of the type after one rounding, so within 1.5
//!   steps of the rounded reference, hence at most 1 step: both lie on the type's grid.)
//! - IEEE limits for every dtype: `gelu(-inf) = 0`, `gelu(+inf) = +inf`, slopes 0 and 1 there,
//!   NaN in gives NaN out;
//! - every instruction set this CPU has, every length (vector tails) and every thread count give
//!   the same bits as the per-element functions `forward_f32` and `backward_f32`.

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{Element, Rng};
use mp_kernels::gelu::{self, Gelu, gelu, gelu_backward};
use mp_kernels::{Cpu, Isa, threads};

const FORMS: [Gelu; 2] = [Gelu::Exact, Gelu::Tanh];

/// The value and the derivative in float64.
fn gelu_f64(form: Gelu, x: f64) -> (f64, f64) {
    match form {
        Gelu::Exact => {
            let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (x * cdf, cdf + x * pdf)
        }
        Gelu::Tanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let z = k * (x + 0.044715 * x.powi(3));
            // (1 + tanh z) / 2 = sigmoid(2z), without the cancellation of 1 + tanh z -> 0.
            let s = 1.0 / (1.0 + (-2.0 * z).exp());
            let dz = k * (1.0 + 3.0 * 0.044715 * x * x);
            (x * s, s + 2.0 * x * s * (1.0 - s) * dz)
        }
    }
}

/// float32 bits on a line where adjacent floats are adjacent integers (`-0` and `+0` both 0).
fn ordered(v: f32) -> i64 {
    let b = i64::from(v.to_bits() as i32);
    if b < 0 { -(b & 0x7fff_ffff) } else { b }
}

/// Distance in float32 steps between `got` and `want` rounded to float32.
fn steps(got: f32, want: f64) -> i64 {
    (ordered(got) - ordered(want as f32)).abs()
}

/// `|got - want|` in units of the float32 spacing at `want` (what the module docs report).
fn ulps(got: f32, want: f64) -> f64 {
    let e = ((want.abs().to_bits() >> 52) as i64 - 1023).max(-126);
    (f64::from(got) - want).abs() / 2f64.powi(e as i32 - 23)
}

/// The inputs of the float32 sweep: every 2039th float32 of [-10, 10] (about 1.07 million, dense
/// near 0), 400 000 uniform ones, and the 100 floats around each root of the derivative.
fn sweep() -> Vec<f32> {
    let top = 10.0f32.to_bits();
    let mut x: Vec<f32> = (0..=top)
        .step_by(2039)
        .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
        .collect();
    let mut rng = Rng::new(test_seed("gelu sweep"));
    x.extend(rng.uniform_vec(400_000, -10.0, 10.0));
    for root in [-0.751_791_5f32, -0.752_461_4] {
        let b = root.to_bits();
        x.extend((b - 50..b + 50).map(f32::from_bits));
    }
    x
}

/// Outside [-10, 10]: log-uniform magnitudes up to 1e4, the extremes, and tiny and subnormal
/// inputs of both signs.
fn beyond() -> Vec<f32> {
    let mut rng = Rng::new(test_seed("gelu beyond"));
    let mut x: Vec<f32> = (0..100_000)
        .map(|i| {
            let m = 10f32.powf(rng.uniform(1.0, 4.0));
            if i % 2 == 0 { m } else { -m }
        })
        .collect();
    x.extend((0..20_000).map(|i| {
        let m = 10f32.powf(rng.uniform(-44.0, -5.0));
        if i % 2 == 0 { m } else { -m }
    }));
    for v in [
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x007f_ffff),
        1e-30,
        0.0,
        13.0,
        14.0,
        14.5,
        15.0,
        15.5,
        1e30,
    ] {
        x.extend([v, -v]);
    }
    x
}

/// The largest error of forward and derivative over `x`, in steps and in ulps, after checking
/// that the kernel and the per-element functions agree bit for bit.
fn worst(form: Gelu, x: &[f32]) -> ([i64; 2], [f64; 2]) {
    let mut y = vec![0.0f32; x.len()];
    gelu(form, x, &mut y).unwrap();
    let mut d = vec![0.0f32; x.len()];
    gelu_backward(form, &vec![1.0f32; x.len()], x, &mut d).unwrap();
    let (mut s, mut u) = ([0i64; 2], [0.0f64; 2]);
    for ((&x, &y), &d) in x.iter().zip(&y).zip(&d) {
        assert_eq!(
            y.to_bits(),
            gelu::forward_f32(form, x).to_bits(),
            "{form:?} y({x:e})"
        );
        assert_eq!(
            d.to_bits(),
            gelu::derivative_f32(form, x).to_bits(),
            "{form:?} d({x:e})"
        );
        let (want_y, want_d) = gelu_f64(form, f64::from(x));
        for (k, (got, want)) in [(y, want_y), (d, want_d)].into_iter().enumerate() {
            let e = steps(got, want);
            assert!(
                e <= 2,
                "{form:?} {}({x:e}) = {got:e}, want {want:e}",
                ["y", "d"][k]
            );
            s[k] = s[k].max(e);
            u[k] = u[k].max(ulps(got, want));
        }
    }
    (s, u)
}

#[test]
fn float32_within_2_ulp_of_float64_on_a_dense_sweep_of_minus_10_to_10() {
    let x = sweep();
    for form in FORMS {
        let (s, u) = worst(form, &x);
        println!(
            "{form:?} on [-10, 10]: forward {} steps ({:.3} ulp), derivative {} steps ({:.3} ulp)",
            s[0], u[0], s[1], u[1]
        );
    }
}

#[test]
fn float32_within_2_ulp_of_float64_beyond_minus_10_to_10() {
    let x = beyond();
    for form in FORMS {
        let (s, u) = worst(form, &x);
        println!(
            "{form:?} beyond: forward {} steps ({:.3} ulp), derivative {} steps ({:.3} ulp)",
            s[0], u[0], s[1], u[1]
        );
    }
}

/// Every float32 of [-10, 10] (2.1 billion), forward and derivative of both forms against the
/// float64 references, on every kernel thread; prints the largest errors in ulps and asserts
/// the 2-ulp bound (about 10 to 20 minutes per form on 2 cores):
/// `cargo test --release -p mp-kernels --test gelu -- --ignored --nocapture every_float32`.
#[test]
#[ignore = "exhaustive, run by hand"]
fn every_float32_of_minus_10_to_10() {
    let top = 10.0f32.to_bits();
    let parts = threads::num_threads().max(1) as u32;
    for form in FORMS {
        let worst = std::thread::scope(|s| {
            let handles: Vec<_> = (0..parts)
                .map(|p| {
                    s.spawn(move || {
                        let mut w = [(0.0f64, 0.0f32); 2];
                        let mut b = p;
                        while b <= top {
                            for x in [f32::from_bits(b), -f32::from_bits(b)] {
                                let (y, d) = gelu_f64(form, f64::from(x));
                                let got =
                                    [gelu::forward_f32(form, x), gelu::derivative_f32(form, x)];
                                for (k, (g, want)) in got.into_iter().zip([y, d]).enumerate() {
                                    let e = ulps(g, want);
                                    if e > w[k].0 {
                                        w[k] = (e, x);
                                    }
                                }
                            }
                            b += parts;
                        }
                        w
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold([(0.0f64, 0.0f32); 2], |a, w| {
                    std::array::from_fn(|k| if w[k].0 > a[k].0 { w[k] } else { a[k] })
                })
        });
        println!(
            "{form:?}, every float32 of [-10, 10]: forward at most {:.3} ulp (at {:e}), derivative {:.3} ulp (at {:e})",
            worst[0].0, worst[0].1, worst[1].0, worst[1].1
        );
        assert!(
            worst[0].0 <= 2.0 && worst[1].0 <= 2.0,
            "{form:?}: {worst:?}"
        );
    }
}

#[test]
fn the_gradient_is_dy_times_the_float32_slope() {
    let mut rng = Rng::new(test_seed("gelu dy"));
    let x = rng.uniform_vec(100_003, -12.0, 12.0);
    let dy = rng.uniform_vec(x.len(), -3.0, 3.0);
    for form in FORMS {
        let mut dx = vec![0.0f32; x.len()];
        gelu_backward(form, &dy, &x, &mut dx).unwrap();
        for i in 0..x.len() {
            assert_eq!(
                dx[i].to_bits(),
                gelu::backward_f32(form, dy[i], x[i]).to_bits()
            );
            let want = f64::from(dy[i]) * gelu_f64(form, f64::from(x[i])).1;
            assert!(
                steps(dx[i], want) <= 2,
                "{form:?} dx({}) = {}, want {want:e}",
                x[i],
                dx[i]
            );
        }
    }
}

fn limits<T: Element>() {
    let t = T::from_f32;
    let x = [t(f32::NEG_INFINITY), t(f32::INFINITY), t(f32::NAN)];
    for form in FORMS {
        let mut y = [t(0.0); 3];
        gelu(form, &x, &mut y).unwrap();
        let y = y.map(|v| v.to_f32());
        assert_eq!(y[0], 0.0, "{:?} {form:?} gelu(-inf)", T::DTYPE);
        assert_eq!(y[1], f32::INFINITY, "{:?} {form:?} gelu(+inf)", T::DTYPE);
        assert!(y[2].is_nan(), "{:?} {form:?} gelu(NaN)", T::DTYPE);

        let mut dx = [t(0.0); 3];
        gelu_backward(form, &[t(1.0); 3], &x, &mut dx).unwrap();
        let dx = dx.map(|v| v.to_f32());
        assert_eq!(dx[0], 0.0, "{:?} {form:?} gelu'(-inf)", T::DTYPE);
        assert_eq!(dx[1], 1.0, "{:?} {form:?} gelu'(+inf)", T::DTYPE);
        assert!(dx[2].is_nan(), "{:?} {form:?} gelu'(NaN)", T::DTYPE);

        // A NaN gradient stays NaN wherever the unit is.
        let mut dx = [t(0.0); 3];
        gelu_backward(form, &[t(f32::NAN); 3], &[t(-1.0), t(0.0), t(1.0)], &mut dx).unwrap();
        assert!(
            dx.iter().all(|v| v.to_f32().is_nan()),
            "{:?} {form:?}",
            T::DTYPE
        );
    }
}

#[test]
fn ieee_limits_for_every_dtype() {
    limits::<f32>();
    limits::<bf16>();
    limits::<f16>();
}

/// Every bit pattern of `T`: the float32 result rounded once, and at most one step of `T` from
/// the float64 value.
fn every_16_bit_value<T: Element>(
    from_bits: fn(u16) -> T,
    from_f64: fn(f64) -> T,
    bits: fn(T) -> u16,
) {
    let x: Vec<T> = (0..=u16::MAX).map(from_bits).collect();
    // The 16-bit line: adjacent values adjacent integers.
    let ord = |v: T| {
        let b = i32::from(bits(v));
        if b & 0x8000 != 0 { -(b & 0x7fff) } else { b }
    };
    let ones = vec![T::from_f32(1.0); x.len()];
    for form in FORMS {
        let mut y = vec![T::from_f32(0.0); x.len()];
        gelu(form, &x, &mut y).unwrap();
        let mut d = vec![T::from_f32(0.0); x.len()];
        gelu_backward(form, &ones, &x, &mut d).unwrap();
        for i in 0..x.len() {
            let xf = x[i].to_f32();
            let (want_y, want_d) = gelu_f64(form, f64::from(xf));
            for (got, f32_result, want) in [
                (y[i], gelu::forward_f32(form, xf), want_y),
                (d[i], gelu::derivative_f32(form, xf), want_d),
            ] {
                let once = T::from_f32(f32_result);
                assert!(
                    bits(got) == bits(once) || (got.to_f32().is_nan() && once.to_f32().is_nan()),
                    "{:?} {form:?} at {xf:e}: {got:?} is not {f32_result:e} rounded once",
                    T::DTYPE
                );
                if !want.is_nan() {
                    let e = (ord(got) - ord(from_f64(want))).abs();
                    assert!(
                        e <= 1,
                        "{:?} {form:?} at {xf:e}: {got:?}, want {want:e}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn bfloat16_and_float16_are_the_float32_result_rounded_once() {
    every_16_bit_value::<bf16>(bf16::from_bits, bf16::from_f64, bf16::to_bits);
    every_16_bit_value::<f16>(f16::from_bits, f16::from_f64, f16::to_bits);
}

/// Every length (full vectors, tails, more than one block, more than one thread's chunk) on
/// every instruction set, and the whole array on one thread or on the pool: the same bits as
/// the per-element functions.
fn lengths<T: Element>() {
    let mut rng = Rng::new(test_seed(&format!("gelu lengths {:?}", T::DTYPE)));
    for n in [
        0,
        1,
        2,
        15,
        16,
        17,
        31,
        33,
        255,
        256,
        257,
        1000,
        1 << 16,
        1_000_003,
    ] {
        let x: Vec<T> = rng
            .uniform_vec(n, -12.0, 12.0)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let dy: Vec<T> = rng
            .uniform_vec(n, -2.0, 2.0)
            .into_iter()
            .map(T::from_f32)
            .collect();
        for form in FORMS {
            let want_y: Vec<T> = x
                .iter()
                .map(|v| T::from_f32(gelu::forward_f32(form, v.to_f32())))
                .collect();
            let want_dx: Vec<T> = dy
                .iter()
                .zip(&x)
                .map(|(g, v)| T::from_f32(gelu::backward_f32(form, g.to_f32(), v.to_f32())))
                .collect();
            let bits = |v: &[T]| v.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
            let mut runs = Vec::new();
            let mut y = vec![T::from_f32(0.0); n];
            let mut dx = vec![T::from_f32(0.0); n];
            gelu(form, &x, &mut y).unwrap();
            gelu_backward(form, &dy, &x, &mut dx).unwrap();
            runs.push(("pool".to_string(), bits(&y), bits(&dx)));
            threads::serial(|| {
                gelu(form, &x, &mut y).unwrap();
                gelu_backward(form, &dy, &x, &mut dx).unwrap();
            });
            runs.push(("one thread".to_string(), bits(&y), bits(&dx)));
            for isa in Isa::supported() {
                let cpu = Cpu::with(isa).unwrap();
                cpu.gelu(form, &x, &mut y).unwrap();
                cpu.gelu_backward(form, &dy, &x, &mut dx).unwrap();
                runs.push((format!("{isa:?}"), bits(&y), bits(&dx)));
            }
            for (what, y, dx) in runs {
                assert!(
                    y == bits(&want_y),
                    "{:?} {form:?} n={n} {what}: y",
                    T::DTYPE
                );
                assert!(
                    dx == bits(&want_dx),
                    "{:?} {form:?} n={n} {what}: dx",
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn every_length_isa_and_thread_count_gives_the_per_element_bits() {
    lengths::<f32>();
    lengths::<bf16>();
    lengths::<f16>();
}

#[test]
fn lengths_are_checked() {
    for form in FORMS {
        let e = gelu(form, &[0.0f32; 3], &mut [0.0f32; 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gelu") && e.contains('y'), "{e}");
        let e = gelu_backward(form, &[0.0f32; 3], &[0.0f32; 2], &mut [0.0f32; 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gelu_backward") && e.contains('x'), "{e}");
        let e = Cpu::with(Isa::Scalar)
            .unwrap()
            .gelu_backward(form, &[0.0f32; 3], &[0.0f32; 3], &mut [0.0f32; 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gelu_backward") && e.contains("dx"), "{e}");
    }
}

/// Nanoseconds per element on one thread, float32 and bfloat16, forward and backward, 2^20
/// elements, best of 5: `cargo test -p mp-kernels --test gelu -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run by hand"]
fn timing() {
    fn time<T: Element>(form: Gelu) {
        let mut rng = Rng::new(test_seed("gelu timing"));
        let n = 1 << 20;
        let x: Vec<T> = rng
            .uniform_vec(n, -6.0, 6.0)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let dy = x.clone();
        let mut y = vec![T::from_f32(0.0); n];
        let best = |f: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e9 / n as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        threads::serial(|| {
            for isa in [Isa::detect(), Isa::Scalar] {
                let cpu = Cpu::with(isa).unwrap();
                let fwd = best(&mut || cpu.gelu(form, &x, &mut y).unwrap());
                let bwd = best(&mut || cpu.gelu_backward(form, &dy, &x, &mut y).unwrap());
                println!(
                    "{:?} {form:?} {isa:?}: forward {fwd:.2} ns/element, backward {bwd:.2} ns/element",
                    T::DTYPE
                );
            }
        });
    }
    for form in FORMS {
        time::<f32>(form);
        time::<bf16>(form);
    }
}
