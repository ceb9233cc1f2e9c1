//! Losses, always computed on the model's float32 output (Keras computes them in float32
//! under every policy; PyTorch's autocast insists on the from-logits binary form).
//!
//! [`Loss`] is what [`Trainer`](super::Trainer) is generic over: integer labels for
//! [`SparseCategoricalCrossentropy`], dense float32 targets (one per output value) for
//! [`CategoricalCrossentropy`], [`BinaryCrossentropy`] and [`MeanSquaredError`].

use std::fmt;

use mp_core::{F32, Tensor};
use mp_kernels::losses::DenseLoss;
use mp_kernels::ops;
use mp_kernels::softmax::Label;

use super::metrics::{Metric, dense_metric, sparse_correct};
use crate::error::{Error, Result};

/// A loss of [`Trainer`](super::Trainer) against targets of type `T`: the mean over the rows of
/// a batch of a per-row loss, its gradient, and the metrics that make sense with it.
///
/// Predictions are the model's float32 output, `[batch, ..., outputs]`; the targets of a batch
/// are host values in row-major order, `per_sample` of them per sample: one integer label per
/// row of predictions for the sparse loss, one value per prediction for the dense losses.
pub trait Loss<T>: LossInfo {
    /// Checks every target of a data set before the first step: `per_sample` targets per
    /// sample against a model whose output per sample is `output` (`[..., outputs]`). The
    /// error names the problem and where in the data it is.
    fn check_targets(&self, targets: &[T], per_sample: usize, output: &[usize]) -> Result<()>;

    /// How much a batch weighs in a mean over several (micro-)batches: the number of rows (or
    /// values) its mean loss is over. Gradient accumulation and data parallelism weight each
    /// part by it, so that the update is the one of a single batch of them all.
    fn weight(&self, targets: &[T]) -> usize;

    /// The batch's mean loss.
    fn loss(&self, y_pred: &Tensor<F32>, targets: &[T]) -> Result<f32>;

    /// The gradient of `scale * loss` with respect to the predictions.
    fn gradient(&self, y_pred: &Tensor<F32>, targets: &[T], scale: f32) -> Result<Tensor<F32>>;

    /// When the loss is on probabilities and has a fused form through a float32 softmax: the
    /// gradient of `scale * loss` with respect to the input of the softmax whose output is
    /// `probs` (what the trainer uses when the model ends in one). `None`: no fused form.
    fn fused_softmax_gradient(
        &self,
        probs: &Tensor<F32>,
        targets: &[T],
        scale: f32,
    ) -> Option<Result<Tensor<F32>>> {
        let _ = (probs, targets, scale);
        None
    }

    /// A metric's sums over the batch (`[total, count]`; the metric is `total / count`), or an
    /// error naming the metric and the loss when it does not apply to these targets.
    fn metric_sums(&self, metric: Metric, y_pred: &Tensor<F32>, targets: &[T]) -> Result<[f64; 2]>;
}

/// What a loss is, whatever its targets: its name and its metrics.
pub trait LossInfo: fmt::Debug + Send + Sync {
    /// The Keras name (`sparse_categorical_crossentropy`, `binary_crossentropy`, ...).
    fn name(&self) -> &'static str;

    /// The metrics `fit` reports with this loss unless told otherwise
    /// ([`Trainer::with_metrics`](super::Trainer::with_metrics)).
    fn default_metrics(&self) -> Vec<Metric> {
        vec![Metric::Accuracy]
    }

    /// Whether `metric` applies to this loss's targets (checked before `fit` and `evaluate`
    /// run a step).
    fn supports(&self, metric: Metric) -> bool;
}

/// The error for a metric that does not apply to a loss.
fn unsupported(metric: Metric, loss: &str) -> Error {
    Error::InvalidArgument {
        what: format!(
            "metric {:?} does not apply to loss {loss}: {}",
            metric.name(),
            match loss {
                "sparse_categorical_crossentropy" => {
                    "integer labels take accuracy or sparse_categorical_accuracy"
                }
                "mean_squared_error" => {
                    "a regression takes mean_squared_error or mean_absolute_error"
                }
                _ =>
                    "dense targets take accuracy (of their kind), binary_accuracy, \
                      mean_squared_error or mean_absolute_error",
            }
        ),
    }
}

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

impl LossInfo for SparseCategoricalCrossentropy {
    fn name(&self) -> &'static str {
        "sparse_categorical_crossentropy"
    }

    fn supports(&self, metric: Metric) -> bool {
        matches!(metric, Metric::Accuracy | Metric::SparseCategoricalAccuracy)
    }
}

impl<L: Label> Loss<L> for SparseCategoricalCrossentropy {
    fn check_targets(&self, labels: &[L], per_sample: usize, output: &[usize]) -> Result<()> {
        let (&classes, lead) = output.split_last().ok_or_else(|| Error::InvalidArgument {
            what: "the model's output has no axes".into(),
        })?;
        let rows: usize = lead.iter().product();
        if per_sample != rows {
            return Err(Error::ShapeMismatch {
                layer: "sparse_categorical_crossentropy".into(),
                expected: format!(
                    "{rows} label(s) per sample: one per row of the model's output {output:?}"
                ),
                got: vec![per_sample],
            });
        }
        let bad = |l: &L| l.index().is_none_or(|i| i >= classes) && self.ignore_class != l.value();
        match labels.iter().enumerate().find(|(_, l)| bad(l)) {
            None => Ok(()),
            Some((i, l)) => Err(Error::InvalidArgument {
                what: format!(
                    "label {l} in row {} of the data{} is out of range: the model has \
                     {classes} classes (0 to {}){}",
                    i / per_sample.max(1),
                    if per_sample > 1 {
                        format!(" (position {})", i % per_sample)
                    } else {
                        String::new()
                    },
                    classes.saturating_sub(1),
                    match self.ignore_class {
                        Some(c) => format!(" and ignores class {c}"),
                        None => String::new(),
                    }
                ),
            }),
        }
    }

    fn weight(&self, labels: &[L]) -> usize {
        match self.ignore_class {
            None => labels.len(),
            Some(c) => labels.iter().filter(|l| l.value() != Some(c)).count(),
        }
    }

    /// The mean loss over the rows (those not ignored; 0 when every row is).
    fn loss(&self, y_pred: &Tensor<F32>, labels: &[L]) -> Result<f32> {
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
    fn gradient(&self, y_pred: &Tensor<F32>, labels: &[L], scale: f32) -> Result<Tensor<F32>> {
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

    fn fused_softmax_gradient(
        &self,
        probs: &Tensor<F32>,
        labels: &[L],
        scale: f32,
    ) -> Option<Result<Tensor<F32>>> {
        (!self.from_logits).then(|| self.softmax_input_gradient(probs, labels, scale))
    }

    fn metric_sums(&self, metric: Metric, y_pred: &Tensor<F32>, labels: &[L]) -> Result<[f64; 2]> {
        if !self.supports(metric) {
            return Err(unsupported(metric, self.name()));
        }
        Self::dims(y_pred, labels)?;
        // The rows the loss ignores are not scored (Keras leaves masked positions out).
        let correct = sparse_correct(y_pred, labels, |l| {
            self.ignore_class.is_none() || l.value() != self.ignore_class
        })?;
        Ok([correct as f64, Loss::<L>::weight(self, labels) as f64])
    }
}

/// Keras's `CategoricalCrossentropy`: a distribution over classes per row (one-hot or
/// smoothed) against class probabilities (or logits with
/// [`CategoricalCrossentropy::from_logits`]), `-Σ t log p` per row, averaged over the rows.
/// After a float32 softmax, training uses the fused gradient `(p Σt - t) / rows`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CategoricalCrossentropy {
    from_logits: bool,
}

impl CategoricalCrossentropy {
    /// The loss on probabilities (Keras's default).
    pub fn new() -> Self {
        Self::default()
    }

    /// The loss on logits: a softmax is applied inside the loss.
    pub fn from_logits() -> Self {
        CategoricalCrossentropy { from_logits: true }
    }
}

/// Keras's `BinaryCrossentropy`: independent yes/no outputs, each target in `[0, 1]`, the mean
/// over a row's values of `-(t log p + (1 - t) log(1 - p))`, averaged over the rows.
/// [`BinaryCrossentropy::from_logits`] takes logits and uses the stable form (PyTorch's
/// `BCEWithLogitsLoss`; its autocast refuses the probability form in float16). Its accuracy
/// thresholds probabilities at 0.5, or logits at 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BinaryCrossentropy {
    from_logits: bool,
}

impl BinaryCrossentropy {
    /// The loss on probabilities (after a sigmoid).
    pub fn new() -> Self {
        Self::default()
    }

    /// The loss on logits: a sigmoid is applied inside the loss, stably.
    pub fn from_logits() -> Self {
        BinaryCrossentropy { from_logits: true }
    }
}

/// Keras's `MeanSquaredError`: `(y - t)²` averaged over a row's values, then over the rows.
/// Reports no metric by default (Keras's default); `mean_absolute_error` is the usual one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeanSquaredError;

impl MeanSquaredError {
    /// The loss.
    pub fn new() -> Self {
        MeanSquaredError
    }
}

/// What the dense-target losses share: their kernel, and what `accuracy` means with them.
trait DenseTargets {
    fn kind(&self) -> DenseLoss;
}

impl DenseTargets for CategoricalCrossentropy {
    fn kind(&self) -> DenseLoss {
        DenseLoss::CategoricalCrossentropy {
            from_logits: self.from_logits,
        }
    }
}

impl DenseTargets for BinaryCrossentropy {
    fn kind(&self) -> DenseLoss {
        DenseLoss::BinaryCrossentropy {
            from_logits: self.from_logits,
        }
    }
}

impl DenseTargets for MeanSquaredError {
    fn kind(&self) -> DenseLoss {
        DenseLoss::MeanSquaredError
    }
}

/// Checks dense targets: one per output value, each finite, in `[0, 1]` for the binary loss and
/// non-negative for the categorical one (a negative weight on `-log p` makes the loss negative
/// and pushes the right class down; that a row sums to 1 is not required: smoothed or partial
/// targets are the user's choice, as in Keras).
fn check_dense(
    kind: DenseLoss,
    targets: &[f32],
    per_sample: usize,
    output: &[usize],
) -> Result<()> {
    let values: usize = output.iter().product();
    if per_sample != values {
        return Err(Error::ShapeMismatch {
            layer: kind.op().into(),
            expected: format!(
                "{values} target value(s) per sample: one per value of the model's output \
                 {output:?}"
            ),
            got: vec![per_sample],
        });
    }
    let binary = matches!(kind, DenseLoss::BinaryCrossentropy { .. });
    let categorical = matches!(kind, DenseLoss::CategoricalCrossentropy { .. });
    let problem = |t: f32| {
        if !t.is_finite() {
            Some("not finite")
        } else if binary && !(0.0..=1.0).contains(&t) {
            Some("outside [0, 1], which binary_crossentropy needs")
        } else if categorical && t < 0.0 {
            Some(
                "negative, which categorical_crossentropy cannot take (targets are weights of \
                 the classes, one-hot or smoothed, each at least 0)",
            )
        } else {
            None
        }
    };
    match targets
        .iter()
        .enumerate()
        .find_map(|(i, &t)| Some((i, problem(t)?)))
    {
        None => Ok(()),
        Some((i, what)) => Err(Error::InvalidArgument {
            what: format!(
                "target {} at position {} of row {} of the data is {what}",
                targets[i],
                i % per_sample.max(1),
                i / per_sample.max(1),
            ),
        }),
    }
}

macro_rules! dense_loss {
    ($($t:ty),*) => {$(
        impl LossInfo for $t {
            fn name(&self) -> &'static str {
                self.kind().op()
            }

            fn default_metrics(&self) -> Vec<Metric> {
                match self.kind() {
                    DenseLoss::MeanSquaredError => vec![],
                    _ => vec![Metric::Accuracy],
                }
            }

            fn supports(&self, metric: Metric) -> bool {
                match metric {
                    Metric::SparseCategoricalAccuracy => false,
                    Metric::Accuracy => self.kind() != DenseLoss::MeanSquaredError,
                    _ => true,
                }
            }
        }

        impl Loss<f32> for $t {
            fn check_targets(
                &self,
                targets: &[f32],
                per_sample: usize,
                output: &[usize],
            ) -> Result<()> {
                check_dense(self.kind(), targets, per_sample, output)
            }

            fn weight(&self, targets: &[f32]) -> usize {
                targets.len()
            }

            fn loss(&self, y_pred: &Tensor<F32>, targets: &[f32]) -> Result<f32> {
                Ok(ops::dense_loss(self.kind(), y_pred, targets)?)
            }

            fn gradient(
                &self,
                y_pred: &Tensor<F32>,
                targets: &[f32],
                scale: f32,
            ) -> Result<Tensor<F32>> {
                Ok(ops::dense_loss_grad(self.kind(), y_pred, targets, scale)?)
            }

            fn fused_softmax_gradient(
                &self,
                probs: &Tensor<F32>,
                targets: &[f32],
                scale: f32,
            ) -> Option<Result<Tensor<F32>>> {
                (self.kind() == DenseLoss::CategoricalCrossentropy { from_logits: false }).then(
                    || Ok(ops::categorical_crossentropy_softmax_grad(probs, targets, scale)?),
                )
            }

            fn metric_sums(
                &self,
                metric: Metric,
                y_pred: &Tensor<F32>,
                targets: &[f32],
            ) -> Result<[f64; 2]> {
                if !self.supports(metric) {
                    return Err(unsupported(metric, self.name()));
                }
                dense_metric(metric, self.kind(), y_pred, targets)
            }
        }
    )*};
}
dense_loss!(
    CategoricalCrossentropy,
    BinaryCrossentropy,
    MeanSquaredError
);
