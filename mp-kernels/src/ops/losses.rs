//! Losses against dense float32 targets ([`crate::losses`]): categorical and binary
//! cross-entropy (on probabilities or logits) and mean squared error. The predictions are a
//! float32 tensor viewed as `[rows, cols]`; the targets are host values, one per prediction,
//! as integer labels are. CPU kernels only so far: on a CUDA device each is an error naming
//! the op.

use crate::profile::{self, OpClass};
use mp_core::{F32, Tensor};

use super::{for_overwrite, on_cpu, rows_cols};
use crate::error::Result;
use crate::losses::{self, DenseLoss};

/// The mean over rows of `kind`'s per-row loss of `y` against `targets` (`y.len()` values, in
/// `y`'s row-major order), computed in float64.
///
/// # Errors
/// Targets that are not one per prediction, an empty `y`; on CUDA, no kernel yet.
pub fn dense_loss(kind: DenseLoss, y: &Tensor<F32>, targets: &[f32]) -> Result<f32> {
    let _span = profile::span(OpClass::Loss);
    on_cpu(kind.op(), y.device())?;
    let (rows, cols) = rows_cols(y.shape());
    losses::dense_loss(kind, y.as_slice()?, targets, rows, cols)
}

/// The gradient of `scale * dense_loss(kind, y, targets)` with respect to `y`.
///
/// # Errors
/// As [`dense_loss`].
pub fn dense_loss_grad(
    kind: DenseLoss,
    y: &Tensor<F32>,
    targets: &[f32],
    scale: f32,
) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Loss);
    on_cpu(kind.op(), y.device())?;
    let (rows, cols) = rows_cols(y.shape());
    let mut d = for_overwrite(y.shape(), y.device())?;
    losses::dense_loss_grad(
        kind,
        y.as_slice()?,
        targets,
        rows,
        cols,
        scale,
        d.as_mut_slice()?,
    )?;
    Ok(d)
}

/// `scale * (p Σt - t) / rows`: the gradient of `scale *` the categorical cross-entropy with
/// respect to the input of the float32 softmax whose output is `probs`.
///
/// # Errors
/// As [`dense_loss`].
pub fn categorical_crossentropy_softmax_grad(
    probs: &Tensor<F32>,
    targets: &[f32],
    scale: f32,
) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Loss);
    on_cpu("categorical_crossentropy", probs.device())?;
    let (rows, cols) = rows_cols(probs.shape());
    let mut d = for_overwrite(probs.shape(), probs.device())?;
    losses::categorical_crossentropy_softmax_grad(
        probs.as_slice()?,
        targets,
        rows,
        cols,
        scale,
        d.as_mut_slice()?,
    )?;
    Ok(d)
}
