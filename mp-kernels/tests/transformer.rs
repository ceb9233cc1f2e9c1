//! The transformer kernels against float64 references, per dtype, on shapes that are not
//! multiples of any block: LayerNormalization forward and every gradient (dx, dgamma, dbeta),
//! and GELU (exact and tanh) forward and derivative, with the bounds stated and asserted.

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{Element, Rng};
use mp_kernels::gelu::{Gelu, gelu, gelu_backward};
use mp_kernels::layer_norm::{ROWS_PER_BLOCK, layer_norm, layer_norm_backward};

/// Values as `T`, and the same values (exactly) in float64.
fn values<T: Element>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = rng
        .uniform_vec(n, lo, hi)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let f = t.iter().map(|v| f64::from(v.to_f32())).collect();
    (t, f)
}

fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|v| f64::from(v.to_f32())).collect()
}

/// `max |got - want| <= bound * max |want|`.
fn close_to_max(what: &str, got: &[f64], want: &[f64], bound: f64) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        worst <= bound * scale,
        "{what}: max error {worst:e} > {bound:e} x {scale:e}"
    );
}

struct Reference {
    y: Vec<f64>,
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
    /// Per column, the sum of |dy * xhat| and of |dy|: the size of the sums the parameter
    /// gradients are.
    dgamma_mag: Vec<f64>,
    dbeta_mag: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[f64],
    dy: &[f64],
    rows: usize,
    cols: usize,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> Reference {
    let mut r = Reference {
        y: vec![0.0; rows * cols],
        dx: vec![0.0; rows * cols],
        dgamma: vec![0.0; cols],
        dbeta: vec![0.0; cols],
        dgamma_mag: vec![0.0; cols],
        dbeta_mag: vec![0.0; cols],
    };
    for i in 0..rows {
        let row = &x[i * cols..(i + 1) * cols];
        let d = &dy[i * cols..(i + 1) * cols];
        let mean = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
        let s = 1.0 / (var + eps).sqrt();
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * s).collect();
        let g: Vec<f64> = (0..cols).map(|j| d[j] * gamma[j]).collect();
        let mean_g = g.iter().sum::<f64>() / cols as f64;
        let mean_gx = (0..cols).map(|j| g[j] * xhat[j]).sum::<f64>() / cols as f64;
        for j in 0..cols {
            r.y[i * cols + j] = xhat[j] * gamma[j] + beta[j];
            r.dx[i * cols + j] = s * (g[j] - mean_g - xhat[j] * mean_gx);
            r.dgamma[j] += d[j] * xhat[j];
            r.dbeta[j] += d[j];
            r.dgamma_mag[j] += (d[j] * xhat[j]).abs();
            r.dbeta_mag[j] += d[j].abs();
        }
    }
    r
}

/// Bounds: the output and `dx` are rounded once to `T` from float32 (unit roundoff 2^-24,
/// 2^-8, 2^-11), with float32 arithmetic before; stated per dtype against the
/// largest value. The parameter gradients are float32 sums: within `sum_bound` of the sum of
/// the magnitudes of their terms.
fn layer_norm_matches<T: Element>(out_bound: f64, sum_bound: f64) {
    let mut rng = Rng::new(test_seed(&format!("layer_norm {:?}", T::DTYPE)));
    let eps = 1e-3f32;
    for &(rows, cols) in &[
        (1usize, 1usize),
        (3, 7),
        (ROWS_PER_BLOCK + 5, 49),
        (130, 64),
        (17, 130),
        (2 * ROWS_PER_BLOCK * 40 + 3, 13),
    ] {
        // A mean far from zero in some rows: the two-pass variance must not cancel.
        let (mut x, _) = values::<T>(&mut rng, rows * cols, -2.0, 2.0);
        for v in x.iter_mut().step_by(3 * cols.max(1)) {
            *v = T::from_f32(v.to_f32() + 20.0);
        }
        let xf = widen(&x);
        let (dy, dyf) = values::<T>(&mut rng, rows * cols, -1.0, 1.0);
        let gamma: Vec<f32> = rng.uniform_vec(cols, 0.5, 1.5);
        let beta: Vec<f32> = rng.uniform_vec(cols, -0.5, 0.5);
        let (gf, bf) = (
            gamma.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            beta.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
        );
        let r = reference(&xf, &dyf, rows, cols, &gf, &bf, f64::from(eps));
        let mut y = vec![T::from_f32(0.0); rows * cols];
        let (mut mean, mut inv_std) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        layer_norm(
            &x,
            rows,
            cols,
            &gamma,
            &beta,
            eps,
            &mut y,
            &mut mean,
            &mut inv_std,
        )
        .unwrap();
        let ctx = format!("{:?} rows {rows} cols {cols}", T::DTYPE);
        close_to_max(&format!("{ctx} y"), &widen(&y), &r.y, out_bound);
        let mut dx = vec![T::from_f32(0.0); rows * cols];
        // The parameter gradients are added to what is there.
        let (mut dgamma, mut dbeta) = (vec![1.0f32; cols], vec![-1.0f32; cols]);
        layer_norm_backward(
            &x,
            &dy,
            rows,
            cols,
            &gamma,
            &mean,
            &inv_std,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        )
        .unwrap();
        close_to_max(&format!("{ctx} dx"), &widen(&dx), &r.dx, out_bound);
        for j in 0..cols {
            let (g, b) = (f64::from(dgamma[j]) - 1.0, f64::from(dbeta[j]) + 1.0);
            assert!(
                (g - r.dgamma[j]).abs() <= sum_bound * (r.dgamma_mag[j] + 1.0),
                "{ctx} dgamma[{j}]: {g} vs {}",
                r.dgamma[j]
            );
            assert!(
                (b - r.dbeta[j]).abs() <= sum_bound * (r.dbeta_mag[j] + 1.0),
                "{ctx} dbeta[{j}]: {b} vs {}",
                r.dbeta[j]
            );
        }
        // The same bits on one thread.
        let mut y1 = vec![T::from_f32(0.0); rows * cols];
        let (mut m1, mut s1) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        mp_kernels::threads::serial(|| {
            layer_norm(
                &x, rows, cols, &gamma, &beta, eps, &mut y1, &mut m1, &mut s1,
            )
        })
        .unwrap();
        assert!(
            y1.iter()
                .zip(&y)
                .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
            "{ctx}: thread count changed the result"
        );
    }
}

#[test]
fn layer_norm_matches_float64_per_dtype() {
    layer_norm_matches::<f32>(1e-5, 1e-5);
    layer_norm_matches::<bf16>(8e-3, 1e-5);
    layer_norm_matches::<f16>(1e-3, 1e-5);
}

#[test]
fn layer_norm_propagates_non_finite_values_and_refuses_bad_arguments() {
    let x = [1.0f32, f32::NAN, 3.0, 4.0, 5.0, 6.0];
    let mut y = [0.0f32; 6];
    let (mut m, mut s) = ([0.0f32; 2], [0.0f32; 2]);
    layer_norm(&x, 2, 3, &[1.0; 3], &[0.0; 3], 1e-3, &mut y, &mut m, &mut s).unwrap();
    assert!(y[..3].iter().all(|v| v.is_nan()), "the NaN row is NaN");
    assert!(y[3..].iter().all(|v| v.is_finite()), "the other row is not");
    let e = layer_norm(&x, 2, 3, &[1.0; 2], &[0.0; 3], 1e-3, &mut y, &mut m, &mut s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gamma"), "{e}");
    let e = layer_norm(&x, 2, 3, &[1.0; 3], &[0.0; 3], 0.0, &mut y, &mut m, &mut s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("epsilon"), "{e}");
}

/// The value, the derivative, and the size of the derivative's two terms (the derivative is a
/// sum that cancels to 0 near x = -0.75: its error is relative to the terms, not the sum).
fn gelu_f64(form: Gelu, x: f64) -> (f64, f64, f64) {
    match form {
        Gelu::Exact => {
            let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (x * cdf, cdf + x * pdf, cdf.abs() + (x * pdf).abs())
        }
        Gelu::Tanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let z = k * (x + 0.044715 * x.powi(3));
            // (1 + tanh z) / 2 = sigmoid(2z), without the cancellation of 1 + tanh z -> 0.
            let a = 1.0 / (1.0 + (-2.0 * z).exp());
            let dz = k * (1.0 + 3.0 * 0.044715 * x * x);
            let b = 2.0 * x * a * (1.0 - a) * dz;
            (x * a, a + b, a.abs() + b.abs())
        }
    }
}

/// Per element: `|got - want| <= rel * |want| + abs` for the output; for the gradient, `rel`
/// of `|dy|` times the derivative's terms.
fn gelu_matches<T: Element>(rel: f64, abs: f64) {
    let mut rng = Rng::new(test_seed(&format!("gelu {:?}", T::DTYPE)));
    for form in [Gelu::Exact, Gelu::Tanh] {
        let (mut x, _) = values::<T>(&mut rng, 10_007, -8.0, 8.0);
        // Around zero, the minimum near -0.75, and the far negative tail.
        for (i, v) in [0.0f32, -0.0, 1e-4, -1e-4, -0.7518, -3.0, -5.5, 7.9]
            .into_iter()
            .enumerate()
        {
            x[i] = T::from_f32(v);
        }
        let (dy, dyf) = values::<T>(&mut rng, x.len(), -2.0, 2.0);
        let mut y = vec![T::from_f32(0.0); x.len()];
        gelu(form, &x, &mut y).unwrap();
        let mut dx = vec![T::from_f32(0.0); x.len()];
        gelu_backward(form, &dy, &x, &mut dx).unwrap();
        for i in 0..x.len() {
            let xi = f64::from(x[i].to_f32());
            let (want_y, slope, terms) = gelu_f64(form, xi);
            let want_dx = dyf[i] * slope;
            let (gy, gdx) = (f64::from(y[i].to_f32()), f64::from(dx[i].to_f32()));
            assert!(
                (gy - want_y).abs() <= rel * want_y.abs() + abs,
                "{:?} {form:?} y({xi}) = {gy}, want {want_y}",
                T::DTYPE
            );
            assert!(
                (gdx - want_dx).abs() <= rel * (dyf[i] * terms).abs() + abs,
                "{:?} {form:?} dx({xi}) = {gdx}, want {want_dx}",
                T::DTYPE
            );
        }
    }
}

#[test]
fn gelu_matches_float64_per_dtype() {
    // float32: in the far negative tail the output is e^-v with v up to ~50, and the float32
    // rounding of v's computation (an ulp of 50 is 4e-6) becomes that relative error of the
    // output: 2e-5 covers it. 16-bit types: one rounding (unit roundoff 2^-8, 2^-11) on top,
    // and float16's subnormal spacing (6e-8) as the absolute floor.
    gelu_matches::<f32>(2e-5, 1e-30);
    gelu_matches::<bf16>(4.5e-3, 1e-30);
    gelu_matches::<f16>(6e-4, 1e-7);
}

#[test]
fn gelu_special_values() {
    let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for form in [Gelu::Exact, Gelu::Tanh] {
        let mut y = [0.0f32; 3];
        gelu(form, &x, &mut y).unwrap();
        assert!(y[0].is_nan());
        assert_eq!(y[1], f32::INFINITY);
        assert_eq!(y[2], 0.0, "gelu(-inf) is 0, not -inf * 0");
        let e = gelu(form, &x, &mut [0.0f32; 2]).unwrap_err().to_string();
        assert!(e.contains("gelu") && e.contains('y'), "{e}");
    }
}
