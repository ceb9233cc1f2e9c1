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
///
/// Predictions may have any rank `[..., classes]`: every leading axis is a row with its own
/// label (`[batch, tokens, vocabulary]` takes one label per token, in row-major order). With
/// [`SparseCategoricalCrossentropy::ignore_class`] (Keras's `ignore_class`), rows whose label
/// is that class are left out: they add no loss and get a zero gradient, and the mean is over
/// the other rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseCategoricalCrossentropy {
    from_logits: bool,
    ignore_class: Option<i64>,
}

impl SparseCategoricalCrossentropy {
    /// The loss on probabilities (Keras's default).
    pub fn new() -> Self {
        SparseCategoricalCrossentropy {
            from_logits: false,
            ignore_class: None,
        }
    }

    /// The loss on logits: a softmax is applied inside the loss.
    pub fn from_logits() -> Self {
        SparseCategoricalCrossentropy {
            from_logits: true,
            ignore_class: None,
        }
    }

    /// Leaves out the rows labelled `class` (`-1` for positions that are not scored, as the
    /// first half of a sequence-to-sequence target).
    pub fn ignore_class(mut self, class: i64) -> Self {
        self.ignore_class = Some(class);
        self
    }

    /// The rows kept and their labels, when some are ignored (`None`: all are kept).
    fn kept<L: Label>(&self, labels: &[L]) -> Option<(Vec<usize>, Vec<L>)> {
        let ignore = self.ignore_class?;
        let rows: Vec<usize> = (0..labels.len())
            .filter(|&i| labels[i].value() != Some(ignore))
            .collect();
        (rows.len() != labels.len()).then(|| {
            let kept = rows.iter().map(|&i| labels[i]).collect();
            (rows, kept)
        })
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
        match y_pred.shape().split_last() {
            Some((&cols, lead))
                if !lead.is_empty() && lead.iter().product::<usize>() == labels.len() =>
            {
                Ok((labels.len(), cols))
            }
            _ => Err(Error::ShapeMismatch {
                layer: "sparse_categorical_crossentropy".into(),
                expected: format!(
                    "predictions of shape (..., classes) with {} rows, one per label",
                    labels.len()
                ),
                got: y_pred.shape().to_vec(),
            }),
        }
    }

    /// Runs `f` on the kept rows (all of them without an ignored class) and puts the gradient
    /// it returns back in place, zeros in the ignored rows.
    fn on_kept<L: Label>(
        &self,
        y_pred: &Tensor<F32>,
        labels: &[L],
        f: impl Fn(&Tensor<F32>, &[L]) -> Result<Tensor<F32>>,
    ) -> Result<Tensor<F32>> {
        Self::dims(y_pred, labels)?;
        match self.kept(labels) {
            None => f(y_pred, labels),
            Some((_, kept)) if kept.is_empty() => {
                Ok(Tensor::<F32>::zeros_on(y_pred.shape(), y_pred.device())?)
            }
            Some((rows, kept)) => {
                let g = f(&ops::select_rows(y_pred, &rows)?, &kept)?;
                Ok(ops::scatter_rows(&g, &rows, y_pred.shape())?)
            }
        }
    }

    /// The mean loss over the rows (those not ignored; 0 when every row is).
    pub fn loss<L: Label>(&self, y_pred: &Tensor<F32>, labels: &[L]) -> Result<f32> {
        Self::dims(y_pred, labels)?;
        match self.kept(labels) {
            None => Ok(ops::softmax_cross_entropy(
                y_pred,
                labels,
                self.from_logits,
            )?),
            Some((_, kept)) if kept.is_empty() => Ok(0.0),
            Some((rows, kept)) => Ok(ops::softmax_cross_entropy(
                &ops::select_rows(y_pred, &rows)?,
                &kept,
                self.from_logits,
            )?),
        }
    }

    /// The gradient of `scale * loss` with respect to the predictions.
    pub fn gradient<L: Label>(
        &self,
        y_pred: &Tensor<F32>,
        labels: &[L],
        scale: f32,
    ) -> Result<Tensor<F32>> {
        let from_logits = self.from_logits;
        self.on_kept(y_pred, labels, |y, l| {
            if from_logits {
                let p = ops::softmax(y)?;
                Ok(ops::softmax_cross_entropy_grad(&p, l, scale)?)
            } else {
                Ok(ops::crossentropy_grad_probs(y, l, scale)?)
            }
        })
    }

    /// The fused gradient of `scale * loss` with respect to the input of the float32 softmax
    /// that produced the probabilities `probs`: `scale * (p - onehot) / rows`.
    pub fn softmax_input_gradient<L: Label>(
        &self,
        probs: &Tensor<F32>,
        labels: &[L],
        scale: f32,
    ) -> Result<Tensor<F32>> {
        self.on_kept(probs, labels, |p, l| {
            Ok(ops::softmax_cross_entropy_grad(p, l, scale)?)
        })
    }
}
