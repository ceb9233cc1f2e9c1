//! Losses, always computed in float32.

use mp_core::{F32, Tensor};
use mp_kernels::ops;
use mp_kernels::softmax::Label;

use crate::error::{Error, Result};

/// Keras's `SparseCategoricalCrossentropy`: integer labels against class probabilities (or
/// logits with [`SparseCategoricalCrossentropy::from_logits`]), averaged over the batch, in
/// float32.
///
/// When the model ends in a float32 softmax, training uses the fused gradient with respect to
/// the softmax's input, `(p - onehot) / batch`, instead of going through `1 / p`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseCategoricalCrossentropy {
    from_logits: bool,
}

impl SparseCategoricalCrossentropy {
    /// The loss on probabilities (Keras's default).
    pub fn new() -> Self {
        SparseCategoricalCrossentropy { from_logits: false }
    }

    /// The loss on logits: a softmax is applied inside the loss.
    pub fn from_logits() -> Self {
        SparseCategoricalCrossentropy { from_logits: true }
    }

    /// Whether predictions are logits.
    pub fn is_from_logits(&self) -> bool {
        self.from_logits
    }

    /// The Keras name.
    pub fn name(&self) -> &'static str {
        "sparse_categorical_crossentropy"
    }

    fn dims<L>(y_pred: &Tensor<F32>, labels: &[L]) -> Result<(usize, usize)> {
        match y_pred.shape() {
            [rows, cols] if *rows == labels.len() => Ok((*rows, *cols)),
            shape => Err(Error::ShapeMismatch {
                layer: "sparse_categorical_crossentropy".into(),
                expected: format!("predictions of shape ({}, classes)", labels.len()),
                got: shape.to_vec(),
            }),
        }
    }

    /// The mean loss over the batch.
    pub fn loss<L: Label>(&self, y_pred: &Tensor<F32>, labels: &[L]) -> Result<f32> {
        Self::dims(y_pred, labels)?;
        Ok(ops::softmax_cross_entropy(
            y_pred,
            labels,
            self.from_logits,
        )?)
    }

    /// The gradient of `scale * loss` with respect to the predictions.
    pub fn gradient<L: Label>(
        &self,
        y_pred: &Tensor<F32>,
        labels: &[L],
        scale: f32,
    ) -> Result<Tensor<F32>> {
        Self::dims(y_pred, labels)?;
        if self.from_logits {
            let p = ops::softmax(y_pred)?;
            Ok(ops::softmax_cross_entropy_grad(&p, labels, scale)?)
        } else {
            Ok(ops::crossentropy_grad_probs(y_pred, labels, scale)?)
        }
    }

    /// The fused gradient of `scale * loss` with respect to the input of the float32 softmax
    /// that produced the probabilities `probs`: `scale * (p - onehot) / batch`.
    pub fn softmax_input_gradient<L: Label>(
        &self,
        probs: &Tensor<F32>,
        labels: &[L],
        scale: f32,
    ) -> Result<Tensor<F32>> {
        Self::dims(probs, labels)?;
        Ok(ops::softmax_cross_entropy_grad(probs, labels, scale)?)
    }
}
