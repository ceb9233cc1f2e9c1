//! BatchNormalization ([`mp_kernels::norm`]) and dropout ([`mp_kernels::dropout`]) kernels
//! against float64 references, per element type (float32, bfloat16, float16), on random shapes
//! that are multiples of no tile (rows and columns drawn from odd ranges that include 1) and one
//! shape above the parallel threshold (64K elements) that spans several row blocks.
//!
//! Randomised tests print their seed (`MP_TEST_SEED=<seed>` replays one). Outputs are poisoned
//! before each run, so an element a kernel forgets to write fails.
//!
//! Error bounds asserted, per element of a column of `N` rows (u = 2^-24, float32's unit
//! roundoff; `u_T` the output type's: 2^-24 float32, 2^-8 bfloat16, 2^-11 float16; `s_T` half
//! the smallest subnormal of `T`). The references take the same rounded inputs in float64, and
//! the same float32 statistics wherever the kernel is given them, so only the float32
//! arithmetic is measured:
//! - `mean`: `(N + 2) u sum|x| / N` (blocked recursive summation, then one division);
//! - `var`: `(N + 8) u (var + e^2) + e^2`, `e` the kernel's own mean error (the deviations are
//!   taken from the kernel's mean, and their squares sum to `N (var + e^2)` exactly);
//! - `normalize`: `(1 + u_T) 8 u (|t| + |beta|) + u_T |y| + s_T`,
//!   `t = gamma (x - mean) / sqrt(var + epsilon)`, with batch and with moving statistics;
//! - `dbeta` (accumulated into a random start): `(N + 1) u sum|dy| + u |dbeta|`;
//! - `dgamma` (accumulated): `(N + 8) u sum|dy xhat| + u |dgamma|`;
//! - `dx`: `(1 + u_T) (N + 16) u |gamma inv_std| (|dy| + sum|dy| / N + |xhat| sum|dy xhat| / N)
//!   + u_T |dx| + s_T`, against the float64 formula
//!   `gamma inv_std (dy - mean(dy) - xhat mean(dy xhat))`;
//! - `dx` and `dgamma` again against the derivative taken from the definition (the Jacobian
//!   `dy_j/dx_i = gamma s (delta_ij - 1/N) - gamma s^3 (x_j - mu)(x_i - mu) / N` with float64
//!   batch statistics `mu`, `s = 1 / sqrt(var + epsilon)`, summed over `j`): the bounds above
//!   plus the exact first-and-higher-order effect of the kernel's statistics errors (triangle
//!   inequalities on `dx = gamma s (dy - m1 - xhat m2)`, no linearisation);
//! - each column's statistics and gradients are bit-identical to those of that column alone,
//!   and every call repeats bit for bit;
//! - dropout: `rate = 0` is bit-exact identity; kept values are bit-identical to
//!   `T::from_f32(x * (1 / (1 - rate)))` and within `(4 u + u_T) |x / (1 - rate)| + s_T` of the
//!   float64 quotient; dropped values are exactly `+0`; the kept fraction, the fraction of kept
//!   neighbour pairs and of pairs across neighbouring seeds are within 4 sigma of `1 - rate`,
//!   `(1 - rate)^2` and `(1 - rate)^2` over 10^6 elements.

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{Element, Rng};
use mp_kernels::Error;
use mp_kernels::dropout::{dropout, dropout_backward, keep};
use mp_kernels::norm::{ROW_BLOCK, moments, normalize, normalize_backward};

const U: f64 = 1.0 / (1u64 << 24) as f64;
/// Above the parallel threshold (185,111 elements) and three row blocks, odd both ways.
const BIG: (usize, usize) = (2 * ROW_BLOCK + 907, 37);

fn rng(name: &str) -> Rng {
    Rng::new(test_seed(name))
}

fn pick(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below((hi - lo + 1) as u64) as usize
}

fn rand_vec<T: Element>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.uniform(lo, hi))).collect()
}

fn rand_f32(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    rng.uniform_vec(n, lo, hi)
}

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn unit<T: Element>() -> f64 {
    T::DTYPE.unit_roundoff()
}

fn half_subnormal<T: Element>() -> f64 {
    T::DTYPE.info().min_positive_subnormal / 2.0
}

fn sentinel<T: Element>() -> T {
    T::from_f32(-7777.0)
}

/// The raw bits of an element, for bit-exact comparisons (NaN payloads included).
trait Bits: Element {
    fn bits(self) -> u32;
    fn from_bits(b: u32) -> Self;
}

impl Bits for f32 {
    fn bits(self) -> u32 {
        self.to_bits()
    }
    fn from_bits(b: u32) -> Self {
        f32::from_bits(b)
    }
}

impl Bits for f16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn from_bits(b: u32) -> Self {
        f16::from_bits(b as u16)
    }
}

impl Bits for bf16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn from_bits(b: u32) -> Self {
        bf16::from_bits(b as u16)
    }
}

fn bits_of<T: Bits>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.bits()).collect()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_close(what: &str, got: &[f64], reference: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    assert_eq!(got.len(), bound.len(), "{what}: bounds");
    for (i, ((&g, &r), &b)) in got.iter().zip(reference).zip(bound).enumerate() {
        let err = (g - r).abs();
        assert!(
            err <= b + f64::MIN_POSITIVE,
            "{what}[{i}] = {g}, reference {r}, error {err:e} > bound {b:e}"
        );
    }
}

fn assert_len_err(r: Result<(), Error>, name: &str) {
    match r {
        Err(Error::LengthMismatch { what, .. }) => assert_eq!(what, name),
        other => panic!("expected a length mismatch naming {name}, got {other:?}"),
    }
}

fn assert_invalid(r: Result<(), Error>, needles: &[&str]) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{msg} should contain {n}");
            }
        }
        other => panic!("expected an invalid argument naming {needles:?}, got {other:?}"),
    }
}

// =============================================================================================
// Batch normalization
// =============================================================================================

/// Random shapes from odd ranges (1 included), the edges, rows longer than a tile, and [`BIG`].
fn shapes(rng: &mut Rng) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = (0..40)
        .map(|_| (pick(rng, 1, 67), pick(rng, 1, 45)))
        .collect();
    // Rows longer than one float32 tile (1024) too.
    v.extend([(1, 1), (1, 19), (53, 1), (2, 3), (3, 1031), (1, 2053), BIG]);
    v
}

/// `x` for a `[rows, cols]` batch: per column a shift and a spread, so means sit off zero (what
/// the two-pass variance is for) and columns differ in scale.
fn batch<T: Element>(rng: &mut Rng, rows: usize, cols: usize) -> Vec<T> {
    let shift = rand_f32(rng, cols, -3.0, 3.0);
    let spread: Vec<f32> = (0..cols)
        .map(|_| [1.0, 0.1, 2.5][rng.below(3) as usize])
        .collect();
    (0..rows * cols)
        .map(|i| {
            let c = i % cols;
            T::from_f32(shift[c] + spread[c] * rng.uniform(-1.0, 1.0))
        })
        .collect()
}

/// The float64 column statistics of `x`: mean, biased variance, and `sum|x|`.
fn ref_moments(x: &[f64], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = rows as f64;
    let mut mean = vec![0.0; cols];
    let mut abs = vec![0.0; cols];
    for r in 0..rows {
        for c in 0..cols {
            mean[c] += x[r * cols + c];
            abs[c] += x[r * cols + c].abs();
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0; cols];
    for r in 0..rows {
        for c in 0..cols {
            let d = x[r * cols + c] - mean[c];
            var[c] += d * d;
        }
    }
    var.iter_mut().for_each(|v| *v /= n);
    (mean, var, abs)
}

/// Statistics, normalization (batch and moving statistics) and every gradient of one
/// `[rows, cols]` batch in `T`.
fn batch_norm_case<T: Bits>(rng: &mut Rng, rows: usize, cols: usize) {
    let what = format!("{:?} [{rows}, {cols}]", T::DTYPE);
    let (n, ut, st) = (rows as f64, unit::<T>(), half_subnormal::<T>());
    let len = rows * cols;
    let x: Vec<T> = batch(rng, rows, cols);
    let xd = f64s(&x);

    // Moments.
    let mut mean = vec![f32::NAN; cols];
    let mut var = vec![f32::NAN; cols];
    moments(&x, rows, cols, &mut mean, &mut var).unwrap();
    let (mean_ref, var_ref, abs) = ref_moments(&xd, rows, cols);
    let mean_bound: Vec<f64> = abs.iter().map(|a| (n + 2.0) * U * a / n).collect();
    assert_close(
        &format!("{what} mean"),
        &f64s(&mean),
        &mean_ref,
        &mean_bound,
    );
    let var_bound: Vec<f64> = (0..cols)
        .map(|c| {
            let e = (f64::from(mean[c]) - mean_ref[c]).abs();
            (n + 8.0) * U * (var_ref[c] + e * e) + e * e
        })
        .collect();
    assert_close(&format!("{what} var"), &f64s(&var), &var_ref, &var_bound);

    // Normalization, with the batch's statistics (training) and with moving ones (inference).
    let gamma = rand_f32(rng, cols, -2.0, 2.0);
    let beta = rand_f32(rng, cols, -1.0, 1.0);
    let epsilon = [1e-3f32, 1e-5, 0.1][rng.below(3) as usize];
    let moving_mean = rand_f32(rng, cols, -3.0, 3.0);
    let moving_var = rand_f32(rng, cols, 0.0, 4.0);
    for (label, m, v) in [
        ("batch", &mean, &var),
        ("moving", &moving_mean, &moving_var),
    ] {
        let mut y = vec![sentinel::<T>(); len];
        normalize(&x, rows, cols, m, v, &gamma, &beta, epsilon, &mut y).unwrap();
        let mut want = vec![0.0; len];
        let mut bound = vec![0.0; len];
        for i in 0..len {
            let c = i % cols;
            let inv = 1.0 / (f64::from(v[c]) + f64::from(epsilon)).sqrt();
            let t = f64::from(gamma[c]) * (xd[i] - f64::from(m[c])) * inv;
            let b = f64::from(beta[c]);
            want[i] = t + b;
            bound[i] = (1.0 + ut) * 8.0 * U * (t.abs() + b.abs()) + ut * want[i].abs() + st;
        }
        assert_close(&format!("{what} y ({label})"), &f64s(&y), &want, &bound);
    }

    // The training-mode gradient, accumulating into random parameter gradients.
    let dy: Vec<T> = rand_vec(rng, len, -1.0, 1.0);
    let dyd = f64s(&dy);
    let dgamma0 = rand_f32(rng, cols, -1.0, 1.0);
    let dbeta0 = rand_f32(rng, cols, -1.0, 1.0);
    let (mut dgamma, mut dbeta) = (dgamma0.clone(), dbeta0.clone());
    let mut dx = vec![sentinel::<T>(); len];
    normalize_backward(
        &x,
        &dy,
        rows,
        cols,
        &mean,
        &var,
        &gamma,
        epsilon,
        &mut dx,
        &mut dgamma,
        &mut dbeta,
    )
    .unwrap();
    let dxd = f64s(&dx);

    // (a) The kernel's formula in float64, from the same float32 statistics.
    let eps = f64::from(epsilon);
    let inv: Vec<f64> = var
        .iter()
        .map(|v| 1.0 / (f64::from(*v) + eps).sqrt())
        .collect();
    let xhat: Vec<f64> = (0..len)
        .map(|i| (xd[i] - f64::from(mean[i % cols])) * inv[i % cols])
        .collect();
    let (mut s1, mut s2) = (vec![0.0; cols], vec![0.0; cols]);
    let (mut a1, mut a2) = (vec![0.0; cols], vec![0.0; cols]);
    for i in 0..len {
        let c = i % cols;
        s1[c] += dyd[i];
        s2[c] += dyd[i] * xhat[i];
        a1[c] += dyd[i].abs();
        a2[c] += (dyd[i] * xhat[i]).abs();
    }
    let dbeta_ref: Vec<f64> = (0..cols).map(|c| f64::from(dbeta0[c]) + s1[c]).collect();
    let dbeta_bound: Vec<f64> = (0..cols)
        .map(|c| (n + 1.0) * U * a1[c] + U * dbeta_ref[c].abs())
        .collect();
    assert_close(
        &format!("{what} dbeta"),
        &f64s(&dbeta),
        &dbeta_ref,
        &dbeta_bound,
    );
    let dgamma_ref: Vec<f64> = (0..cols).map(|c| f64::from(dgamma0[c]) + s2[c]).collect();
    let dgamma_bound: Vec<f64> = (0..cols)
        .map(|c| (n + 8.0) * U * a2[c] + U * dgamma_ref[c].abs())
        .collect();
    assert_close(
        &format!("{what} dgamma"),
        &f64s(&dgamma),
        &dgamma_ref,
        &dgamma_bound,
    );
    let mut dx_ref = vec![0.0; len];
    let mut dx_f32 = vec![0.0; len]; // the float32 part of the bound
    for i in 0..len {
        let c = i % cols;
        let gs = f64::from(gamma[c]) * inv[c];
        dx_ref[i] = gs * (dyd[i] - s1[c] / n - xhat[i] * s2[c] / n);
        dx_f32[i] =
            (n + 16.0) * U * gs.abs() * (dyd[i].abs() + a1[c] / n + xhat[i].abs() * a2[c] / n);
    }
    let dx_bound: Vec<f64> = (0..len)
        .map(|i| (1.0 + ut) * dx_f32[i] + ut * dx_ref[i].abs() + st)
        .collect();
    assert_close(&format!("{what} dx (formula)"), &dxd, &dx_ref, &dx_bound);

    // (b) The derivative from the definition, with float64 batch statistics: the Jacobian of
    // `y_j = gamma (x_j - mu) s + beta` (through `mu` and `s`), column by column.
    if rows > 128 {
        return;
    }
    for c in 0..cols {
        let (mu, v) = (mean_ref[c], var_ref[c]);
        let g = f64::from(gamma[c]);
        let s = 1.0 / (v + eps).sqrt();
        let col = |a: &[f64], r: usize| a[r * cols + c];
        // The kernel's statistics errors and what they do to xhat (exact triangle bounds).
        let dmu = (f64::from(mean[c]) - mu).abs();
        let rho = (f64::from(var[c]) - v).abs() / (v + eps);
        assert!(rho <= 0.5, "{what}: var error too large to bound");
        let xh: Vec<f64> = (0..rows).map(|r| (col(&xd, r) - mu) * s).collect();
        let e: Vec<f64> = xh
            .iter()
            .map(|h| h.abs() * rho + dmu * s * (1.0 + rho))
            .collect();
        let m1 = (0..rows).map(|r| col(&dyd, r)).sum::<f64>() / n;
        let m2 = (0..rows).map(|r| col(&dyd, r) * xh[r]).sum::<f64>() / n;
        let dm2 = (0..rows).map(|r| col(&dyd, r).abs() * e[r]).sum::<f64>() / n;
        let mut dgamma_def = f64::from(dgamma0[c]);
        let (mut got, mut want, mut bound) = (vec![], vec![], vec![]);
        for i in 0..rows {
            let mut w = 0.0;
            for j in 0..rows {
                let delta = if i == j { 1.0 } else { 0.0 };
                let jac = g * s * (delta - 1.0 / n)
                    - g * s.powi(3) * (col(&xd, j) - mu) * (col(&xd, i) - mu) / n;
                w += col(&dyd, j) * jac;
            }
            dgamma_def += col(&dyd, i) * xh[i];
            let k = i * cols + c;
            let d = e[i] * (m2.abs() + dm2) + xh[i].abs() * dm2;
            let rest = (col(&dyd, i) - m1 - xh[i] * m2).abs();
            let stats = g.abs() * s * rho * (rest + d) + g.abs() * s * d;
            got.push(dxd[k]);
            want.push(w);
            bound.push((1.0 + ut) * (dx_f32[k] + stats) + ut * w.abs() + st);
        }
        assert_close(
            &format!("{what} dx (definition) column {c}"),
            &got,
            &want,
            &bound,
        );
        let stats = (0..rows).map(|r| col(&dyd, r).abs() * e[r]).sum::<f64>();
        assert_close(
            &format!("{what} dgamma (definition) column {c}"),
            &[f64::from(dgamma[c])],
            &[dgamma_def],
            &[dgamma_bound[c] + stats],
        );
    }
}

fn batch_norm_sweep<T: Bits>(name: &str) {
    let mut rng = rng(name);
    for (rows, cols) in shapes(&mut rng) {
        batch_norm_case::<T>(&mut rng, rows, cols);
    }
}

#[test]
fn batch_norm_f32_forward_and_gradients_match_float64() {
    batch_norm_sweep::<f32>("batch_norm_f32");
}

#[test]
fn batch_norm_bf16_forward_and_gradients_match_float64() {
    batch_norm_sweep::<bf16>("batch_norm_bf16");
}

#[test]
fn batch_norm_f16_forward_and_gradients_match_float64() {
    batch_norm_sweep::<f16>("batch_norm_f16");
}

/// Each column's statistics and gradients are bit-identical to that column's alone (so neither
/// the column chunking nor the thread split reaches them), and every call repeats bit for bit.
fn columns_alone<T: Bits>(rng: &mut Rng, rows: usize, cols: usize) {
    let what = format!("{:?} [{rows}, {cols}]", T::DTYPE);
    let len = rows * cols;
    let x: Vec<T> = batch(rng, rows, cols);
    let dy: Vec<T> = rand_vec(rng, len, -1.0, 1.0);
    let gamma = rand_f32(rng, cols, -2.0, 2.0);
    let beta = rand_f32(rng, cols, -1.0, 1.0);
    let epsilon = 1e-3;
    let run = || {
        let (mut mean, mut var) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        moments(&x, rows, cols, &mut mean, &mut var).unwrap();
        let mut y = vec![sentinel::<T>(); len];
        normalize(&x, rows, cols, &mean, &var, &gamma, &beta, epsilon, &mut y).unwrap();
        let mut dx = vec![sentinel::<T>(); len];
        let (mut dg, mut db) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        normalize_backward(
            &x, &dy, rows, cols, &mean, &var, &gamma, epsilon, &mut dx, &mut dg, &mut db,
        )
        .unwrap();
        (mean, var, y, dx, dg, db)
    };
    let (mean, var, y, dx, dg, db) = run();
    let again = run();
    assert_eq!(f32_bits(&mean), f32_bits(&again.0), "{what}: mean repeats");
    assert_eq!(f32_bits(&var), f32_bits(&again.1), "{what}: var repeats");
    assert_eq!(bits_of(&y), bits_of(&again.2), "{what}: y repeats");
    assert_eq!(bits_of(&dx), bits_of(&again.3), "{what}: dx repeats");
    assert_eq!(f32_bits(&dg), f32_bits(&again.4), "{what}: dgamma repeats");
    assert_eq!(f32_bits(&db), f32_bits(&again.5), "{what}: dbeta repeats");
    for c in 0..cols {
        let xc: Vec<T> = (0..rows).map(|r| x[r * cols + c]).collect();
        let dyc: Vec<T> = (0..rows).map(|r| dy[r * cols + c]).collect();
        let (mut m, mut v) = ([0.0f32], [0.0f32]);
        moments(&xc, rows, 1, &mut m, &mut v).unwrap();
        assert_eq!(m[0].to_bits(), mean[c].to_bits(), "{what}: mean[{c}] alone");
        assert_eq!(v[0].to_bits(), var[c].to_bits(), "{what}: var[{c}] alone");
        let mut dxc = vec![sentinel::<T>(); rows];
        let (mut g, mut b) = ([0.0f32], [0.0f32]);
        normalize_backward(
            &xc,
            &dyc,
            rows,
            1,
            &m,
            &v,
            &gamma[c..=c],
            epsilon,
            &mut dxc,
            &mut g,
            &mut b,
        )
        .unwrap();
        assert_eq!(g[0].to_bits(), dg[c].to_bits(), "{what}: dgamma[{c}] alone");
        assert_eq!(b[0].to_bits(), db[c].to_bits(), "{what}: dbeta[{c}] alone");
        for (r, d) in dxc.iter().enumerate() {
            assert_eq!(
                d.bits(),
                dx[r * cols + c].bits(),
                "{what}: dx[{r}, {c}] alone"
            );
        }
    }
}

#[test]
fn batch_norm_columns_are_independent_and_calls_repeat_bit_for_bit() {
    let mut rng = rng("batch_norm_columns_are_independent");
    for (rows, cols) in [BIG, (ROW_BLOCK + 1, 300), (33, 513), (7, 5)] {
        columns_alone::<f32>(&mut rng, rows, cols);
        columns_alone::<bf16>(&mut rng, rows, cols);
        columns_alone::<f16>(&mut rng, rows, cols);
    }
}

/// One row: zero variance, `y = beta` exactly (rounded to `T`), and no gradient through `x`.
fn single_row<T: Bits>() {
    let x = [T::from_f32(1.5), T::from_f32(-3.0), T::from_f32(0.25)];
    let (mut mean, mut var) = ([0.0f32; 3], [7.0f32; 3]);
    moments(&x, 1, 3, &mut mean, &mut var).unwrap();
    assert_eq!(mean, [1.5, -3.0, 0.25]);
    assert_eq!(f32_bits(&var), [0; 3], "{:?}: +0 variance", T::DTYPE);
    let beta = [0.5, -0.125, 2.0];
    let mut y = [sentinel::<T>(); 3];
    normalize(&x, 1, 3, &mean, &var, &[3.0; 3], &beta, 1e-3, &mut y).unwrap();
    assert_eq!(y.map(|v| v.to_f32()), beta);
    let mut dx = [sentinel::<T>(); 3];
    let (mut dg, mut db) = ([0.0f32; 3], [1.0f32; 3]);
    let dy = [T::from_f32(0.5), T::from_f32(-1.0), T::from_f32(2.0)];
    normalize_backward(
        &x, &dy, 1, 3, &mean, &var, &[3.0; 3], 1e-3, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    assert_eq!(dx.map(|v| v.to_f32()), [0.0; 3]);
    assert_eq!(dg, [0.0; 3]);
    assert_eq!(db, [1.5, 0.0, 3.0]);
}

#[test]
fn batch_norm_of_one_row_has_zero_variance_and_no_input_gradient() {
    single_row::<f32>();
    single_row::<bf16>();
    single_row::<f16>();
}

/// NaN and infinities propagate per column, as IEEE arithmetic says, and never panic.
fn non_finite<T: Bits>() {
    let (rows, cols) = (9, 4);
    let mut rng = Rng::new(7);
    let mut x: Vec<T> = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
    x[2 * cols + 1] = T::from_f32(f32::NAN);
    x[5 * cols + 2] = T::from_f32(f32::INFINITY);
    let name = format!("{:?}", T::DTYPE);
    let (mut mean, mut var) = (vec![0.0f32; cols], vec![0.0f32; cols]);
    moments(&x, rows, cols, &mut mean, &mut var).unwrap();
    assert!(mean[1].is_nan() && var[1].is_nan(), "{name}: NaN column");
    assert!(
        mean[2] == f32::INFINITY && var[2].is_nan(),
        "{name}: inf column"
    );
    for c in [0, 3] {
        assert!(
            mean[c].is_finite() && var[c].is_finite(),
            "{name}: column {c}"
        );
    }
    let gamma = [1.0, -2.0, 0.5, 1.0];
    let beta = [0.0; 4];
    // Moving statistics: only the non-finite elements are.
    let mut y = vec![sentinel::<T>(); rows * cols];
    normalize(
        &x, rows, cols, &[0.0; 4], &[1.0; 4], &gamma, &beta, 1e-3, &mut y,
    )
    .unwrap();
    for (i, v) in y.iter().enumerate() {
        let v = v.to_f32();
        match i {
            i if i == 2 * cols + 1 => assert!(v.is_nan(), "{name}: y[{i}] = {v}"),
            i if i == 5 * cols + 2 => assert_eq!(v, f32::INFINITY, "{name}: y[{i}]"),
            _ => assert!(v.is_finite(), "{name}: y[{i}] = {v}"),
        }
    }
    // Batch statistics: the whole columns; a negative variance gives NaN as well.
    let mut var_neg = var.clone();
    var_neg[3] = -1.0;
    normalize(&x, rows, cols, &mean, &var_neg, &gamma, &beta, 1e-3, &mut y).unwrap();
    for (i, v) in y.iter().enumerate() {
        let v = v.to_f32();
        assert_eq!(v.is_nan(), i % cols != 0, "{name}: y[{i}] = {v}");
    }
    // A NaN gradient poisons its column's dx, dgamma and dbeta, and nothing else.
    x[2 * cols + 1] = T::from_f32(0.5);
    x[5 * cols + 2] = T::from_f32(-0.5);
    moments(&x, rows, cols, &mut mean, &mut var).unwrap();
    let mut dy: Vec<T> = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
    dy[4 * cols + 3] = T::from_f32(f32::NAN);
    let mut dx = vec![sentinel::<T>(); rows * cols];
    let (mut dg, mut db) = (vec![0.0f32; cols], vec![0.0f32; cols]);
    normalize_backward(
        &x, &dy, rows, cols, &mean, &var, &gamma, 1e-3, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    for c in 0..cols {
        assert_eq!(dg[c].is_nan(), c == 3, "{name}: dgamma[{c}]");
        assert_eq!(db[c].is_nan(), c == 3, "{name}: dbeta[{c}]");
    }
    for (i, v) in dx.iter().enumerate() {
        let v = v.to_f32();
        assert_eq!(v.is_nan(), i % cols == 3, "{name}: dx[{i}] = {v}");
    }
}

#[test]
fn batch_norm_nan_and_inf_propagate_per_column() {
    non_finite::<f32>();
    non_finite::<bf16>();
    non_finite::<f16>();
}

#[test]
fn moments_bad_arguments_are_errors_that_write_nothing() {
    let (rows, cols) = (5, 3);
    for name in ["x", "mean", "var"] {
        for longer in [true, false] {
            let mut x = vec![bf16::ONE; rows * cols];
            let mut mean = vec![-7.0f32; cols];
            let mut var = vec![-7.0f32; cols];
            match (name, longer) {
                ("x", true) => x.push(bf16::ONE),
                ("x", false) => x.truncate(rows * cols - 1),
                ("mean", true) => mean.push(-7.0),
                ("mean", false) => mean.truncate(cols - 1),
                (_, true) => var.push(-7.0),
                (_, false) => var.truncate(cols - 1),
            }
            assert_len_err(moments(&x, rows, cols, &mut mean, &mut var), name);
            assert!(
                mean.iter().chain(&var).all(|v| *v == -7.0),
                "{name} written"
            );
        }
    }
    let (mut mean, mut var) = ([-7.0f32; 3], [-7.0f32; 3]);
    assert_invalid(
        moments::<f32>(&[], 0, 3, &mut mean, &mut var),
        &["moments", "rows"],
    );
    assert_invalid(
        moments::<f32>(&[], usize::MAX, 3, &mut mean, &mut var),
        &["moments", "shape"],
    );
    assert_eq!((mean, var), ([-7.0; 3], [-7.0; 3]));
    // No columns is not an error: nothing to compute.
    moments::<f32>(&[], 4, 0, &mut [], &mut []).unwrap();
}

const BAD_EPSILONS: [f32; 5] = [0.0, -0.0, -1e-3, f32::NAN, f32::INFINITY];

#[test]
fn normalize_bad_arguments_are_errors_that_write_nothing() {
    let (rows, cols) = (5, 3);
    let ok = |n| vec![0.5f32; n];
    for name in ["x", "mean", "var", "gamma", "beta", "y"] {
        for longer in [true, false] {
            let mut bufs = [ok(rows * cols), ok(cols), ok(cols), ok(cols), ok(cols)];
            let mut y = vec![f16::from_f32(-7.0); rows * cols];
            let i = ["x", "mean", "var", "gamma", "beta"]
                .iter()
                .position(|n| *n == name);
            match (i, longer) {
                (Some(i), true) => bufs[i].push(0.5),
                (Some(i), false) => {
                    bufs[i].pop();
                }
                (None, true) => y.push(f16::from_f32(-7.0)),
                (None, false) => {
                    y.pop();
                }
            }
            let x: Vec<f16> = bufs[0].iter().map(|v| f16::from_f32(*v)).collect();
            let [_, mean, var, gamma, beta] = &bufs;
            assert_len_err(
                normalize(&x, rows, cols, mean, var, gamma, beta, 1e-3, &mut y),
                name,
            );
            assert!(y.iter().all(|v| v.to_f32() == -7.0), "{name}: y written");
        }
    }
    let x = vec![1.0f32; rows * cols];
    let p = ok(cols);
    for eps in BAD_EPSILONS {
        let mut y = vec![-7.0f32; rows * cols];
        assert_invalid(
            normalize(&x, rows, cols, &p, &p, &p, &p, eps, &mut y),
            &["normalize", "epsilon", &format!("{eps}")],
        );
        assert!(y.iter().all(|v| *v == -7.0), "epsilon {eps}: y written");
    }
    // An empty batch normalizes to nothing.
    normalize::<f32>(&[], 0, 3, &p, &p, &p, &p, 1e-3, &mut []).unwrap();
}

#[test]
fn normalize_backward_bad_arguments_are_errors_that_write_nothing() {
    let (rows, cols) = (5, 3);
    let names = ["x", "dy", "mean", "var", "gamma", "dx", "dgamma", "dbeta"];
    let lens = [
        rows * cols,
        rows * cols,
        cols,
        cols,
        cols,
        rows * cols,
        cols,
        cols,
    ];
    for (k, name) in names.iter().enumerate() {
        for longer in [true, false] {
            let mut bufs: Vec<Vec<f32>> = lens.iter().map(|&n| vec![-7.0f32; n]).collect();
            if longer {
                bufs[k].push(-7.0);
            } else {
                bufs[k].pop();
            }
            let [x, dy, mean, var, gamma, dx, dgamma, dbeta] = &mut bufs[..] else {
                unreachable!()
            };
            assert_len_err(
                normalize_backward(x, dy, rows, cols, mean, var, gamma, 1e-3, dx, dgamma, dbeta),
                name,
            );
            assert!(bufs.iter().flatten().all(|v| *v == -7.0), "{name}: written");
        }
    }
    let x = vec![1.0f32; rows * cols];
    let p = vec![1.0f32; cols];
    for eps in BAD_EPSILONS {
        let mut dx = vec![-7.0f32; rows * cols];
        let (mut dg, mut db) = (vec![-7.0f32; cols], vec![-7.0f32; cols]);
        assert_invalid(
            normalize_backward(
                &x, &x, rows, cols, &p, &p, &p, eps, &mut dx, &mut dg, &mut db,
            ),
            &["normalize_backward", "epsilon", &format!("{eps}")],
        );
        assert!(
            dx.iter().chain(&dg).chain(&db).all(|v| *v == -7.0),
            "epsilon {eps}: written"
        );
    }
    // No rows: nothing to do, the parameter gradients are left as they are.
    let (mut dg, mut db) = (vec![-7.0f32; cols], vec![-7.0f32; cols]);
    normalize_backward::<f32>(
        &[],
        &[],
        0,
        cols,
        &p,
        &p,
        &p,
        1e-3,
        &mut [],
        &mut dg,
        &mut db,
    )
    .unwrap();
    assert!(dg.iter().chain(&db).all(|v| *v == -7.0));
}

// =============================================================================================
// Dropout
// =============================================================================================

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function, written out here as the documentation of [`keep`] says.
fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The documented rule: `r = mix64(mix64(seed + φ) ^ index·φ) >> 32`, kept iff
/// `r >= rate · 2^32` (a real comparison, done exactly in float64).
fn documented_keep(seed: u64, index: u64, rate: f32) -> bool {
    let key = mix64(seed.wrapping_add(GOLDEN_GAMMA));
    let r = mix64(key ^ index.wrapping_mul(GOLDEN_GAMMA)) >> 32;
    r as f64 >= f64::from(rate) * 4_294_967_296.0
}

#[test]
fn dropout_mask_is_the_documented_splitmix64_rule() {
    let mut rng = rng("dropout_mask_is_the_documented_rule");
    for _ in 0..200_000 {
        let seed = rng.next_u64();
        let index = match rng.below(3) {
            0 => rng.below(1 << 20),
            1 => u64::MAX - rng.below(1 << 10),
            _ => rng.next_u64(),
        };
        let rate = [0.0, 0.1, 0.5, 0.9, 1e-9, 0.999_999_9][rng.below(6) as usize];
        assert_eq!(
            keep(seed, index, rate),
            documented_keep(seed, index, rate),
            "seed {seed} index {index} rate {rate}"
        );
    }
    // The key is SplitMix64's first output for the seed (mp_core's Rng).
    let seed = rng.next_u64();
    assert_eq!(
        Rng::new(seed).next_u64(),
        mix64(seed.wrapping_add(GOLDEN_GAMMA))
    );
    // At the threshold: a draw `r` with 24 significant bits is a float32 rate exactly; it is
    // kept at `rate = r / 2^32` and dropped at the next float32 above.
    let key = mix64(seed.wrapping_add(GOLDEN_GAMMA));
    let mut edges = 0;
    for index in 0..200_000u64 {
        let r = mix64(key ^ index.wrapping_mul(GOLDEN_GAMMA)) >> 32;
        if !r.is_multiple_of(256) || r == 0 {
            continue;
        }
        let rate = (r as f64 / 4_294_967_296.0) as f32;
        assert_eq!(f64::from(rate) * 4_294_967_296.0, r as f64);
        assert!(
            keep(seed, index, rate),
            "index {index}: r = rate 2^32 is kept"
        );
        let above = f32::from_bits(rate.to_bits() + 1);
        assert!(
            !keep(seed, index, above),
            "index {index}: r < rate 2^32 is dropped"
        );
        edges += 1;
    }
    assert!(edges > 500, "only {edges} draws at a threshold");
    // Unchecked rates: 0 or NaN keep everything, 1 nothing.
    for i in 0..1000 {
        assert!(keep(seed, i, 0.0) && keep(seed, i, f32::NAN));
        assert!(!keep(seed, i, 1.0));
    }
}

/// `rate = 0` copies every bit pattern, NaN payloads included.
fn identity<T: Bits>(rng: &mut Rng, n: usize) {
    let x: Vec<T> = (0..n)
        .map(|_| T::from_bits(rng.next_u64() as u32))
        .collect();
    let mut y = vec![sentinel::<T>(); n];
    dropout(&x, 0.0, rng.next_u64(), rng.next_u64(), &mut y).unwrap();
    assert_eq!(bits_of(&y), bits_of(&x), "{:?} forward", T::DTYPE);
    let mut dx = vec![sentinel::<T>(); n];
    dropout_backward(&x, -0.0, rng.next_u64(), 0, &mut dx).unwrap();
    assert_eq!(bits_of(&dx), bits_of(&x), "{:?} backward", T::DTYPE);
}

#[test]
fn dropout_rate_zero_is_the_identity() {
    let mut rng = rng("dropout_rate_zero_is_the_identity");
    for n in [0, 1, 17, 1000, 200_003] {
        identity::<f32>(&mut rng, n);
        identity::<bf16>(&mut rng, n);
        identity::<f16>(&mut rng, n);
    }
}

/// Whether `count` is a plausible draw of a count with this `mean` and `sigma`: within 4 sigma
/// (two-sided 6.3e-5) where the count is large enough for the normal approximation, else with
/// both Poisson tails at `count` above 3e-5 (at a mean of 1 the normal bound fails one run in
/// 1,700: 6 or more has probability 6e-4).
fn plausible(count: f64, mean: f64, sigma: f64) -> bool {
    if mean >= 50.0 {
        return (count - mean).abs() <= 4.0 * sigma;
    }
    let k = count as u64;
    let (mut pmf, mut below) = ((-mean).exp(), 0.0);
    for i in 0..k {
        below += pmf;
        pmf *= mean / (i + 1) as f64;
    }
    // below = P(X < k), pmf = P(X = k).
    (below + pmf).min(1.0 - below) >= 3e-5
}

#[test]
fn dropout_keeps_one_minus_rate_within_four_sigma() {
    let mut rng = rng("dropout_keeps_one_minus_rate");
    let n = 1_000_000usize;
    let ones = vec![1.0f32; n];
    for rate in [0.1f32, 0.25, 0.5, 0.7, 0.9, 0.999] {
        let seed = rng.next_u64();
        let offset = rng.below(1 << 40);
        let (mut a, mut b) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        dropout(&ones, rate, seed, offset, &mut a).unwrap();
        dropout(&ones, rate, seed.wrapping_add(1), offset, &mut b).unwrap();
        let p = 1.0 - f64::from(rate);
        let nf = n as f64;
        let kept = a.iter().filter(|v| **v != 0.0).count() as f64;
        let sigma = (nf * p * (1.0 - p)).sqrt();
        assert!(
            plausible(kept, nf * p, sigma),
            "rate {rate}: kept {kept} of {n}, expected {} +/- {}",
            nf * p,
            4.0 * sigma
        );
        // Neighbours: overlapping pairs, so neighbouring indicators are correlated
        // (covariance p^3 - p^4).
        let pairs = a.windows(2).filter(|w| w[0] != 0.0 && w[1] != 0.0).count() as f64;
        let m = nf - 1.0;
        let q = p * p;
        let sigma = (m * (q * (1.0 - q) + 2.0 * (p.powi(3) - q * q))).sqrt();
        assert!(
            plausible(pairs, m * q, sigma),
            "rate {rate}: {pairs} kept neighbour pairs, expected {} +/- {}",
            m * q,
            4.0 * sigma
        );
        // Neighbouring seeds at the same index: independent pairs.
        let both = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| **x != 0.0 && **y != 0.0)
            .count() as f64;
        let sigma = (nf * q * (1.0 - q)).sqrt();
        assert!(
            plausible(both, nf * q, sigma),
            "rate {rate}: {both} kept under seeds s and s+1, expected {} +/- {}",
            nf * q,
            4.0 * sigma
        );
    }
}

/// Kept values are `x * (1 / (1 - rate))` in float32 rounded once to `T`; dropped ones are
/// `+0`, whatever `x` held.
fn kept_values<T: Bits>(rng: &mut Rng, n: usize) {
    let (ut, st) = (unit::<T>(), half_subnormal::<T>());
    let mut x: Vec<T> = (0..n)
        .map(|_| T::from_f32(rng.normal() * 2f32.powi(rng.below(12) as i32 - 6)))
        .collect();
    for (i, v) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0]
        .into_iter()
        .enumerate()
    {
        if i < n {
            x[i] = T::from_f32(v);
        }
    }
    for rate in [0.1f32, 0.3, 0.5, 0.77, 0.999] {
        let (seed, offset) = (rng.next_u64(), rng.next_u64());
        let scale = 1.0f32 / (1.0 - rate);
        for backward in [false, true] {
            let mut y = vec![sentinel::<T>(); n];
            if backward {
                dropout_backward(&x, rate, seed, offset, &mut y).unwrap();
            } else {
                dropout(&x, rate, seed, offset, &mut y).unwrap();
            }
            let what = format!("{:?} rate {rate} backward {backward}", T::DTYPE);
            for (i, (&v, &o)) in x.iter().zip(&y).enumerate() {
                if keep(seed, offset.wrapping_add(i as u64), rate) {
                    let want = T::from_f32(v.to_f32() * scale);
                    assert!(
                        o.bits() == want.bits() || (o.to_f32().is_nan() && v.to_f32().is_nan()),
                        "{what}: y[{i}] = {o}, expected {want}"
                    );
                    let q = v.to_f64() / (1.0 - f64::from(rate));
                    if o.to_f64().is_finite() {
                        let err = (o.to_f64() - q).abs();
                        let bound = (4.0 * U + ut) * q.abs() + st;
                        assert!(err <= bound, "{what}: y[{i}] = {o}, x/(1-rate) = {q}");
                    }
                } else {
                    assert_eq!(o.bits(), 0, "{what}: dropped y[{i}] = {o} is not +0");
                }
            }
        }
    }
}

#[test]
fn dropout_kept_values_are_scaled_and_rounded_once_and_dropped_ones_are_plus_zero() {
    let mut rng = rng("dropout_kept_values");
    for n in [1, 5, 1000, 200_003] {
        kept_values::<f32>(&mut rng, n);
        kept_values::<bf16>(&mut rng, n);
        kept_values::<f16>(&mut rng, n);
    }
}

#[test]
fn dropout_backward_uses_the_forward_mask() {
    let mut rng = rng("dropout_backward_uses_the_forward_mask");
    for n in [1, 33, 4097, 300_007] {
        let rate = rng.uniform(0.05, 0.95);
        let (seed, offset) = (rng.next_u64(), rng.next_u64());
        let ones = vec![bf16::ONE; n];
        let (mut y, mut dx) = (vec![sentinel(); n], vec![sentinel(); n]);
        dropout(&ones, rate, seed, offset, &mut y).unwrap();
        dropout_backward(&ones, rate, seed, offset, &mut dx).unwrap();
        assert_eq!(bits_of(&y), bits_of(&dx), "n {n} rate {rate}");
        for (i, v) in y.iter().enumerate() {
            let kept = keep(seed, offset.wrapping_add(i as u64), rate);
            assert_eq!(*v != bf16::ZERO, kept, "n {n} rate {rate} at {i}");
        }
    }
}

#[test]
fn dropout_of_a_slice_is_the_slice_of_the_whole() {
    let mut rng = rng("dropout_of_a_slice_is_the_slice_of_the_whole");
    let n = 250_001;
    let x: Vec<f16> = rand_vec(&mut rng, n, -4.0, 4.0);
    for base in [0, rng.next_u64(), u64::MAX - 1000] {
        let (rate, seed) = (0.35, rng.next_u64());
        let mut whole = vec![sentinel::<f16>(); n];
        dropout(&x, rate, seed, base, &mut whole).unwrap();
        let mut again = vec![sentinel::<f16>(); n];
        dropout(&x, rate, seed, base, &mut again).unwrap();
        assert_eq!(bits_of(&whole), bits_of(&again), "repeat, base {base}");
        for _ in 0..20 {
            let a = pick(&mut rng, 0, n);
            let b = pick(&mut rng, a, n);
            let offset = base.wrapping_add(a as u64);
            let mut part = vec![sentinel::<f16>(); b - a];
            dropout(&x[a..b], rate, seed, offset, &mut part).unwrap();
            assert_eq!(
                bits_of(&part),
                bits_of(&whole[a..b]),
                "[{a}, {b}) base {base}"
            );
            dropout_backward(&x[a..b], rate, seed, offset, &mut part).unwrap();
            assert_eq!(bits_of(&part), bits_of(&whole[a..b]), "backward [{a}, {b})");
        }
        let mut other = vec![sentinel::<f16>(); n];
        dropout(&x, rate, seed ^ 1, base, &mut other).unwrap();
        assert_ne!(
            bits_of(&other),
            bits_of(&whole),
            "another seed, another mask"
        );
    }
}

#[test]
fn dropout_bad_rate_is_an_error_naming_it_that_writes_nothing() {
    let x = [1.0f32; 9];
    for rate in [f32::NAN, 1.0, -0.1, 1.5, f32::INFINITY, f32::NEG_INFINITY] {
        let mut y = [-7.0f32; 9];
        let value = format!("{rate}");
        assert_invalid(
            dropout(&x, rate, 1, 0, &mut y),
            &["dropout", "rate", &value],
        );
        assert_eq!(y, [-7.0; 9], "rate {rate}: y written");
        assert_invalid(
            dropout_backward(&x, rate, 1, 0, &mut y),
            &["dropout_backward", "rate", &value],
        );
        assert_eq!(y, [-7.0; 9], "rate {rate}: dx written");
    }
}

#[test]
fn dropout_bad_lengths_are_errors_that_write_nothing() {
    let x = [bf16::ONE; 9];
    for n in [8, 10] {
        let mut y = vec![bf16::from_f32(-7.0); n];
        assert_len_err(dropout(&x, 0.5, 1, 0, &mut y), "y");
        assert_len_err(dropout(&x, 0.0, 1, 0, &mut y), "y");
        assert_len_err(dropout_backward(&x, 0.5, 1, 0, &mut y), "dx");
        assert!(y.iter().all(|v| v.to_f32() == -7.0), "written");
    }
}

/// `normalize_relu` and its backward against `normalize` then ReLU and ReLU's backward then
/// `normalize_backward`, bit for bit (NaN payloads aside): the fused pair recomputes ReLU's
/// mask from `x`, so every value the two-op sequence could round differently is here: outputs
/// at and near zero (in float16, below half its smallest subnormal), NaN and infinities in `x`
/// and `dy`, and a column whose beta puts every output at about 2^-25.
fn fused_relu_case<T: Bits>(rng: &mut Rng, rows: usize, cols: usize) {
    let cpu = mp_kernels::Cpu::global().unwrap();
    let mut x: Vec<T> = batch(rng, rows, cols);
    let mut dy: Vec<T> = rand_vec(rng, rows * cols, -1.0, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        match rng.below(40) {
            0 => *v = T::from_f32(f32::NAN),
            1 => *v = T::from_f32(f32::INFINITY),
            2 => *v = T::from_f32(f32::NEG_INFINITY),
            3 => dy[i] = T::from_f32([f32::NAN, f32::INFINITY][rng.below(2) as usize]),
            _ => {}
        }
    }
    let mean = rand_f32(rng, cols, -3.0, 3.0);
    let var = rand_f32(rng, cols, 0.0, 4.0);
    let mut gamma = rand_f32(rng, cols, -2.0, 2.0);
    let mut beta = rand_f32(rng, cols, -1.0, 1.0);
    // Column 0: outputs all within a few float16 subnormals of zero.
    gamma[0] = 1e-9;
    beta[0] = (-25f32).exp2() * [1.0, 0.5, 1.5, -1.0][rng.below(4) as usize];
    let eps = 1e-3;
    let n = rows * cols;
    let same = |a: &[T], b: &[T], what: &str| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            let nan = |v: &T| v.to_f32().is_nan();
            assert!(
                p.bits() == q.bits() || (nan(p) && nan(q)),
                "{:?} {rows}x{cols} {what}[{i}]: {} vs {}",
                T::DTYPE,
                p.to_f32(),
                q.to_f32()
            );
        }
    };
    // Forward.
    let mut fused = vec![sentinel::<T>(); n];
    cpu.normalize_relu(&x, rows, cols, &mean, &var, &gamma, &beta, eps, &mut fused)
        .unwrap();
    let mut z = vec![sentinel::<T>(); n];
    cpu.normalize(&x, rows, cols, &mean, &var, &gamma, &beta, eps, &mut z)
        .unwrap();
    let mut y = vec![sentinel::<T>(); n];
    cpu.activation(mp_kernels::activation::Activation::Relu, &z, &mut y)
        .unwrap();
    same(&fused, &y, "y");
    // Backward.
    let mut dz = vec![sentinel::<T>(); n];
    cpu.activation_backward(mp_kernels::activation::Activation::Relu, &dy, &y, &mut dz)
        .unwrap();
    let start = rand_f32(rng, 2 * cols, -1.0, 1.0);
    let (mut dg, mut db) = (start[..cols].to_vec(), start[cols..].to_vec());
    let mut dx = vec![sentinel::<T>(); n];
    cpu.normalize_backward(
        &x, &dz, rows, cols, &mean, &var, &gamma, eps, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    let (mut fg, mut fb) = (start[..cols].to_vec(), start[cols..].to_vec());
    let mut fdx = vec![sentinel::<T>(); n];
    cpu.normalize_relu_backward(
        &x, &dy, rows, cols, &mean, &var, &gamma, &beta, eps, &mut fdx, &mut fg, &mut fb,
    )
    .unwrap();
    same(&fdx, &dx, "dx");
    let f = |v: &[f32]| v.iter().map(|x| T::from_f32(*x)).collect::<Vec<T>>();
    // The float32 sums compared exactly: through f32 -> T only when T is float32.
    if T::DTYPE == mp_core::DType::F32 {
        same(&f(&fg), &f(&dg), "dgamma");
        same(&f(&fb), &f(&db), "dbeta");
    } else {
        for (what, a, b) in [("dgamma", &fg, &dg), ("dbeta", &fb, &db)] {
            for (i, (p, q)) in a.iter().zip(b.iter()).enumerate() {
                assert!(
                    p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                    "{:?} {rows}x{cols} {what}[{i}]: {p} vs {q}",
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn normalize_relu_is_normalize_then_relu_bit_for_bit() {
    for (name, seed_shapes) in [("fused f32", 0), ("fused bf16", 1), ("fused f16", 2)] {
        let mut rng = rng(name);
        let mut cases = shapes(&mut rng);
        cases.truncate(12);
        cases.extend([(3, 1031), BIG]);
        for (rows, cols) in cases {
            match seed_shapes {
                0 => fused_relu_case::<f32>(&mut rng, rows, cols),
                1 => fused_relu_case::<bf16>(&mut rng, rows, cols),
                _ => fused_relu_case::<f16>(&mut rng, rows, cols),
            }
        }
    }
}
