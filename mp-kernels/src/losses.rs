//! Losses against dense float32 targets (one value per output): categorical cross-entropy on
//! probabilities or logits, binary cross-entropy on probabilities or logits, mean squared
//! error. Each is the mean over rows of a per-row loss, as Keras reduces them
//! (`sum_over_batch_size`), summed in float64.
//!
//! Where the model gives probabilities, they are clipped to `[EPSILON, 1 - EPSILON]` before the
//! logarithm (Keras's `backend.epsilon()`), and the gradient is zero where the clip bites, as
//! the derivative of a clip is. On logits, the binary loss uses the stable form
//! `max(z, 0) - z t + log(1 + exp(-|z|))` (PyTorch's `BCEWithLogitsLoss`).
//!
//! Non-finite predictions propagate as IEEE arithmetic says: a NaN in a row makes the loss NaN.

use crate::error::{Result, check_len};

/// The clip of probabilities before a logarithm (Keras's `backend.epsilon()`).
pub const EPSILON: f32 = 1e-7;

/// A loss against dense targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseLoss {
    /// `-Σ t log p` per row (targets are distributions over the row, one-hot or smoothed).
    CategoricalCrossentropy {
        /// Whether predictions are logits (a softmax is applied inside).
        from_logits: bool,
    },
    /// `-(t log p + (1 - t) log(1 - p))` per value, averaged over the row (independent
    /// yes/no outputs).
    BinaryCrossentropy {
        /// Whether predictions are logits (a sigmoid is applied inside).
        from_logits: bool,
    },
    /// `(y - t)²` per value, averaged over the row.
    MeanSquaredError,
}

impl DenseLoss {
    /// The op name in errors.
    pub fn op(self) -> &'static str {
        match self {
            DenseLoss::CategoricalCrossentropy { .. } => "categorical_crossentropy",
            DenseLoss::BinaryCrossentropy { .. } => "binary_crossentropy",
            DenseLoss::MeanSquaredError => "mean_squared_error",
        }
    }
}

/// `p` clipped to `[EPSILON, 1 - EPSILON]`, and whether it was inside (the clip's derivative).
#[inline]
fn clip_prob(p: f32) -> (f64, bool) {
    let lo = f64::from(EPSILON);
    let hi = 1.0 - lo;
    let p = f64::from(p);
    if p < lo {
        (lo, false)
    } else if p > hi {
        (hi, false)
    } else {
        // NaN lands here and propagates.
        (p, true)
    }
}

/// `log Σ exp(z)` of a row, stable.
fn log_sum_exp(z: &[f32]) -> f64 {
    let m = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if !m.is_finite() {
        // All -inf, an inf, or NaN (`max` skips NaN, the sum below does not).
        let s: f64 = z.iter().map(|&v| f64::from(v)).sum();
        return f64::from(m) + s * 0.0;
    }
    let s: f64 = z.iter().map(|&v| (f64::from(v) - f64::from(m)).exp()).sum();
    f64::from(m) + s.ln()
}

/// The loss of one row.
fn row_loss(kind: DenseLoss, y: &[f32], t: &[f32]) -> f64 {
    let n = y.len() as f64;
    match kind {
        DenseLoss::CategoricalCrossentropy { from_logits: false } => y
            .iter()
            .zip(t)
            .map(|(&p, &t)| -f64::from(t) * clip_prob(p).0.ln())
            .sum(),
        DenseLoss::CategoricalCrossentropy { from_logits: true } => {
            let lse = log_sum_exp(y);
            y.iter()
                .zip(t)
                .map(|(&z, &t)| f64::from(t) * (lse - f64::from(z)))
                .sum()
        }
        DenseLoss::BinaryCrossentropy { from_logits: false } => {
            let s: f64 = y
                .iter()
                .zip(t)
                .map(|(&p, &t)| {
                    let (p, _) = clip_prob(p);
                    let t = f64::from(t);
                    -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
                })
                .sum();
            s / n
        }
        DenseLoss::BinaryCrossentropy { from_logits: true } => {
            let s: f64 = y
                .iter()
                .zip(t)
                .map(|(&z, &t)| {
                    let z = f64::from(z);
                    z.max(0.0) - z * f64::from(t) + (-z.abs()).exp().ln_1p()
                })
                .sum();
            s / n
        }
        DenseLoss::MeanSquaredError => {
            let s: f64 = y
                .iter()
                .zip(t)
                .map(|(&y, &t)| (f64::from(y) - f64::from(t)).powi(2))
                .sum();
            s / n
        }
    }
}

/// The mean over `rows` rows of `cols` values of the per-row loss of `y` against `targets`.
///
/// # Errors
/// `y` or `targets` not `rows * cols` long; no rows or no columns.
pub fn dense_loss(
    kind: DenseLoss,
    y: &[f32],
    targets: &[f32],
    rows: usize,
    cols: usize,
) -> Result<f32> {
    check(kind, y, targets, rows, cols)?;
    let total: f64 = y
        .chunks_exact(cols)
        .zip(targets.chunks_exact(cols))
        .map(|(y, t)| row_loss(kind, y, t))
        .sum();
    Ok((total / rows as f64) as f32)
}

/// The gradient of `scale * dense_loss(...)` with respect to `y`, into `out`.
///
/// # Errors
/// As [`dense_loss`]; `out` not `rows * cols` long.
pub fn dense_loss_grad(
    kind: DenseLoss,
    y: &[f32],
    targets: &[f32],
    rows: usize,
    cols: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check(kind, y, targets, rows, cols)?;
    check_len(kind.op(), "gradient", out.len(), rows * cols)?;
    let per_row = f64::from(scale) / rows as f64;
    let per_value = per_row / cols as f64;
    for ((y, t), o) in y
        .chunks_exact(cols)
        .zip(targets.chunks_exact(cols))
        .zip(out.chunks_exact_mut(cols))
    {
        match kind {
            DenseLoss::CategoricalCrossentropy { from_logits: false } => {
                for ((&p, &t), o) in y.iter().zip(t).zip(o) {
                    let (p, inside) = clip_prob(p);
                    *o = if inside {
                        (-f64::from(t) / p * per_row) as f32
                    } else {
                        0.0
                    };
                }
            }
            DenseLoss::CategoricalCrossentropy { from_logits: true } => {
                let lse = log_sum_exp(y);
                let mass: f64 = t.iter().map(|&t| f64::from(t)).sum();
                for ((&z, &t), o) in y.iter().zip(t).zip(o) {
                    let p = (f64::from(z) - lse).exp();
                    *o = ((p * mass - f64::from(t)) * per_row) as f32;
                }
            }
            DenseLoss::BinaryCrossentropy { from_logits: false } => {
                for ((&p, &t), o) in y.iter().zip(t).zip(o) {
                    let (p, inside) = clip_prob(p);
                    *o = if inside {
                        ((p - f64::from(t)) / (p * (1.0 - p)) * per_value) as f32
                    } else {
                        0.0
                    };
                }
            }
            DenseLoss::BinaryCrossentropy { from_logits: true } => {
                for ((&z, &t), o) in y.iter().zip(t).zip(o) {
                    let s = 1.0 / (1.0 + (-f64::from(z)).exp());
                    *o = ((s - f64::from(t)) * per_value) as f32;
                }
            }
            DenseLoss::MeanSquaredError => {
                for ((&y, &t), o) in y.iter().zip(t).zip(o) {
                    *o = (2.0 * (f64::from(y) - f64::from(t)) * per_value) as f32;
                }
            }
        }
    }
    Ok(())
}

/// `scale * (p Σt - t) / rows`: the gradient of `scale *` the categorical cross-entropy with
/// respect to the input of the float32 softmax whose output is `probs` (the fused path that
/// avoids dividing by `p`), into `out`.
///
/// # Errors
/// As [`dense_loss`]; `out` not `rows * cols` long.
pub fn categorical_crossentropy_softmax_grad(
    probs: &[f32],
    targets: &[f32],
    rows: usize,
    cols: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let kind = DenseLoss::CategoricalCrossentropy { from_logits: false };
    check(kind, probs, targets, rows, cols)?;
    check_len(kind.op(), "gradient", out.len(), rows * cols)?;
    let per_row = f64::from(scale) / rows as f64;
    for ((p, t), o) in probs
        .chunks_exact(cols)
        .zip(targets.chunks_exact(cols))
        .zip(out.chunks_exact_mut(cols))
    {
        let mass: f64 = t.iter().map(|&t| f64::from(t)).sum();
        for ((&p, &t), o) in p.iter().zip(t).zip(o) {
            *o = ((f64::from(p) * mass - f64::from(t)) * per_row) as f32;
        }
    }
    Ok(())
}

fn check(kind: DenseLoss, y: &[f32], targets: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(crate::error::Error::InvalidArgument {
            op: kind.op(),
            what: format!(
                "{rows} rows of {cols} values: the mean loss of an empty batch is undefined"
            ),
        });
    }
    check_len(kind.op(), "predictions", y.len(), rows * cols)?;
    check_len(kind.op(), "targets", targets.len(), rows * cols)
}
