//! The dense-target losses against float64 references: the loss, its gradient (against central
//! differences of the float64 reference loss) and the fused softmax-input gradient, on random
//! shapes, with the bounds stated and asserted. The kernels take and give float32 and sum in
//! float64, so the bound is float32 rounding: 1e-5 of the largest value.

use mp_core::Rng;
use mp_core::rng::test_seed;
use mp_kernels::losses::{
    DenseLoss, EPSILON, categorical_crossentropy_softmax_grad, dense_loss, dense_loss_grad,
};

const BOUND: f64 = 1e-5;

/// The float64 reference: the mean over rows of the per-row loss, written out directly (a
/// softmax and a sigmoid computed in float64, no stable rewrite).
fn reference(kind: DenseLoss, y: &[f64], t: &[f64], rows: usize, cols: usize) -> f64 {
    let eps = f64::from(EPSILON);
    let clip = |p: f64| p.clamp(eps, 1.0 - eps);
    let mut total = 0.0;
    for r in 0..rows {
        let (y, t) = (&y[r * cols..(r + 1) * cols], &t[r * cols..(r + 1) * cols]);
        total += match kind {
            DenseLoss::CategoricalCrossentropy { from_logits } => {
                let p: Vec<f64> = if from_logits {
                    let m = y.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = y.iter().map(|z| (z - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.iter().map(|e| e / s).collect()
                } else {
                    y.iter().map(|&p| clip(p)).collect()
                };
                -t.iter().zip(&p).map(|(t, p)| t * p.ln()).sum::<f64>()
            }
            DenseLoss::BinaryCrossentropy { from_logits } => {
                y.iter()
                    .zip(t)
                    .map(|(&y, &t)| {
                        let p = if from_logits {
                            1.0 / (1.0 + (-y).exp())
                        } else {
                            clip(y)
                        };
                        -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
                    })
                    .sum::<f64>()
                    / cols as f64
            }
            DenseLoss::MeanSquaredError => {
                y.iter().zip(t).map(|(y, t)| (y - t).powi(2)).sum::<f64>() / cols as f64
            }
        };
    }
    total / rows as f64
}

/// Predictions and targets as each loss expects them: probabilities (softmax rows, or
/// independent values in (0.02, 0.98)), logits in [-4, 4], regression values; targets
/// one-hot, smoothed distributions, 0/1 or soft binary values, or real values.
fn inputs(kind: DenseLoss, rng: &mut Rng, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let n = rows * cols;
    match kind {
        DenseLoss::CategoricalCrossentropy { from_logits } => {
            let z = rng.uniform_vec(n, -4.0, 4.0);
            let y = if from_logits {
                z
            } else {
                z.chunks(cols)
                    .flat_map(|r| {
                        let e: Vec<f32> = r.iter().map(|v| v.exp()).collect();
                        let s: f32 = e.iter().sum();
                        e.into_iter().map(move |e| e / s)
                    })
                    .collect()
            };
            // Half the rows one-hot, half smoothed (0.1 spread over the row).
            let mut t = vec![0.0f32; n];
            for r in 0..rows {
                let c = rng.below(cols as u64) as usize;
                let smooth = if r % 2 == 0 { 0.0 } else { 0.1 };
                for j in 0..cols {
                    t[r * cols + j] = smooth / cols as f32;
                }
                t[r * cols + c] += 1.0 - smooth;
            }
            (y, t)
        }
        DenseLoss::BinaryCrossentropy { from_logits } => {
            let y = if from_logits {
                rng.uniform_vec(n, -4.0, 4.0)
            } else {
                rng.uniform_vec(n, 0.02, 0.98)
            };
            let t = rng
                .uniform_vec(n, 0.0, 1.0)
                .into_iter()
                .enumerate()
                .map(|(i, u)| if i % 3 == 0 { u } else { u.round() })
                .collect();
            (y, t)
        }
        DenseLoss::MeanSquaredError => {
            (rng.uniform_vec(n, -3.0, 3.0), rng.uniform_vec(n, -3.0, 3.0))
        }
    }
}

const KINDS: [DenseLoss; 5] = [
    DenseLoss::CategoricalCrossentropy { from_logits: false },
    DenseLoss::CategoricalCrossentropy { from_logits: true },
    DenseLoss::BinaryCrossentropy { from_logits: false },
    DenseLoss::BinaryCrossentropy { from_logits: true },
    DenseLoss::MeanSquaredError,
];

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

#[test]
fn dense_losses_and_gradients_match_float64() {
    let mut rng = Rng::new(test_seed("dense_losses_and_gradients_match_float64"));
    for kind in KINDS {
        for _ in 0..4 {
            let rows = 1 + rng.below(37) as usize;
            // A softmax over one column is exactly 1, at the clip, where the loss has a kink.
            let min_cols = match kind {
                DenseLoss::CategoricalCrossentropy { from_logits: false } => 2,
                _ => 1,
            };
            let cols = min_cols + rng.below(23) as usize;
            let (y, t) = inputs(kind, &mut rng, rows, cols);
            let yd: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
            let td: Vec<f64> = t.iter().map(|&v| f64::from(v)).collect();
            let what = format!("{kind:?} {rows}x{cols}");

            let want = reference(kind, &yd, &td, rows, cols);
            let got = f64::from(dense_loss(kind, &y, &t, rows, cols).unwrap());
            close_to_max(&format!("{what} loss"), &[got], &[want], BOUND);

            // The gradient of 3 * loss against central differences of the reference, on the
            // float64 copies of the inputs (steps inside the clip for probabilities).
            let scale = 3.0f32;
            let mut g = vec![0.0f32; rows * cols];
            dense_loss_grad(kind, &y, &t, rows, cols, scale, &mut g).unwrap();
            let mut fd = vec![0.0f64; rows * cols];
            for (i, fd) in fd.iter_mut().enumerate() {
                let h = 1e-6 * yd[i].abs().max(1e-2);
                let mut up = yd.clone();
                up[i] += h;
                let mut down = yd.clone();
                down[i] -= h;
                *fd = f64::from(scale)
                    * (reference(kind, &up, &td, rows, cols)
                        - reference(kind, &down, &td, rows, cols))
                    / (2.0 * h);
            }
            let gd: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
            close_to_max(&format!("{what} gradient"), &gd, &fd, 1e-4);
        }
    }
}

#[test]
fn fused_softmax_gradient_is_the_chain_rule_through_the_softmax() {
    // The gradient with respect to the logits of a softmax followed by the loss on
    // probabilities equals the from-logits gradient.
    let mut rng = Rng::new(test_seed("fused_softmax_gradient"));
    let kind = DenseLoss::CategoricalCrossentropy { from_logits: true };
    for _ in 0..6 {
        let rows = 1 + rng.below(29) as usize;
        let cols = 2 + rng.below(17) as usize;
        let (z, t) = inputs(kind, &mut rng, rows, cols);
        let p: Vec<f32> = z
            .chunks(cols)
            .flat_map(|r| {
                let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = r.iter().map(|v| f64::from(v - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |e| (e / s) as f32)
            })
            .collect();
        let mut fused = vec![0.0f32; rows * cols];
        categorical_crossentropy_softmax_grad(&p, &t, rows, cols, 2.0, &mut fused).unwrap();
        let mut logits = vec![0.0f32; rows * cols];
        dense_loss_grad(kind, &z, &t, rows, cols, 2.0, &mut logits).unwrap();
        let a: Vec<f64> = fused.iter().map(|&v| f64::from(v)).collect();
        let b: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
        close_to_max(&format!("{rows}x{cols}"), &a, &b, BOUND);
    }
}

#[test]
fn clipped_probabilities_give_a_finite_loss_and_a_zero_gradient() {
    let kind = DenseLoss::BinaryCrossentropy { from_logits: false };
    let (y, t) = ([0.0f32, 1.0, 0.5], [1.0f32, 0.0, 1.0]);
    let l = dense_loss(kind, &y, &t, 1, 3).unwrap();
    assert!(l.is_finite() && l > 10.0, "{l}");
    let mut g = [9.0f32; 3];
    dense_loss_grad(kind, &y, &t, 1, 3, 1.0, &mut g).unwrap();
    assert_eq!(&g[..2], &[0.0, 0.0]);
    assert!(g[2] < 0.0);
    // Large logits stay finite in the stable form.
    let kind = DenseLoss::BinaryCrossentropy { from_logits: true };
    let l = dense_loss(kind, &[200.0, -200.0], &[0.0, 1.0], 1, 2).unwrap();
    assert!((l - 200.0).abs() < 1e-3, "{l}");
}

#[test]
fn nan_predictions_propagate_and_bad_lengths_are_named() {
    for kind in KINDS {
        let l = dense_loss(kind, &[f32::NAN, 0.5], &[1.0, 0.0], 1, 2).unwrap();
        assert!(l.is_nan(), "{kind:?}: {l}");
        let e = dense_loss(kind, &[0.5, 0.5], &[1.0], 1, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains(kind.op()) && e.contains("targets"), "{e}");
        let e = dense_loss(kind, &[], &[], 0, 2).unwrap_err().to_string();
        assert!(e.contains("empty batch"), "{e}");
    }
}
