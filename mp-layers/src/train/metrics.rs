//! Metrics: running averages over a pass through the data.

use mp_core::{Device, F32, Tensor};
use mp_kernels::losses::DenseLoss;
use mp_kernels::softmax::Label;

use crate::error::{Error, Result};

/// A metric `fit` and `evaluate` report, by its Keras name (Keras's `metrics=[...]` strings).
/// Which ones apply depends on the loss's targets ([`Loss::supports`](super::Loss::supports)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `accuracy`, of the loss's kind, as Keras resolves the string: the arg-max against the
    /// label (sparse), against the target's arg-max (categorical), or each output thresholded
    /// (binary: probabilities at 0.5, logits at 0).
    Accuracy,
    /// `sparse_categorical_accuracy`: the arg-max against the integer label.
    SparseCategoricalAccuracy,
    /// `categorical_accuracy`: the arg-max against the target's arg-max.
    CategoricalAccuracy,
    /// `binary_accuracy`: each output thresholded (probabilities at 0.5, logits at 0) against
    /// its target rounded.
    BinaryAccuracy,
    /// `mean_squared_error` over the output values.
    MeanSquaredError,
    /// `mean_absolute_error` over the output values.
    MeanAbsoluteError,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 6] = [
        Metric::Accuracy,
        Metric::SparseCategoricalAccuracy,
        Metric::CategoricalAccuracy,
        Metric::BinaryAccuracy,
        Metric::MeanSquaredError,
        Metric::MeanAbsoluteError,
    ];

    /// The Keras name, which is also its key in the logs (`val_` before it for validation).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::SparseCategoricalAccuracy => "sparse_categorical_accuracy",
            Metric::CategoricalAccuracy => "categorical_accuracy",
            Metric::BinaryAccuracy => "binary_accuracy",
            Metric::MeanSquaredError => "mean_squared_error",
            Metric::MeanAbsoluteError => "mean_absolute_error",
        }
    }

    /// The metric of a Keras name (`acc` and `mse`, `mae` as Keras accepts them).
    ///
    /// # Errors
    /// An unknown name, listing the known ones.
    pub fn from_name(name: &str) -> Result<Metric> {
        match name {
            "acc" => return Ok(Metric::Accuracy),
            "mse" => return Ok(Metric::MeanSquaredError),
            "mae" => return Ok(Metric::MeanAbsoluteError),
            _ => {}
        }
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| Error::InvalidArgument {
                what: format!(
                    "unknown metric {name:?}: use one of {:?}",
                    Metric::ALL.map(Metric::name)
                ),
            })
    }
}

/// How many rows of `y_pred` (`[..., classes]`) have their arg-max at their label, among the
/// rows whose label `keep` says to score. Ties go to the first class; a row holding NaN is
/// wrong.
pub(crate) fn sparse_correct<L: Label>(
    y_pred: &Tensor<F32>,
    labels: &[L],
    keep: impl Fn(&L) -> bool,
) -> Result<usize> {
    let arg = mp_kernels::ops::argmax_rows(y_pred)?;
    if arg.len() != labels.len() {
        return Err(Error::ShapeMismatch {
            layer: "sparse_categorical_accuracy".into(),
            expected: format!("(..., classes) with {} rows, one per label", labels.len()),
            got: y_pred.shape().to_vec(),
        });
    }
    Ok(arg
        .iter()
        .zip(labels)
        .filter(|(a, l)| keep(l) && a.is_some_and(|a| l.index() == Some(a as usize)))
        .count())
}

/// A metric's `[total, count]` over a batch of predictions against dense targets (one per
/// value), for the loss `kind` (which says what `accuracy` means and whether outputs are
/// logits).
pub(crate) fn dense_metric(
    metric: Metric,
    kind: DenseLoss,
    y_pred: &Tensor<F32>,
    targets: &[f32],
) -> Result<[f64; 2]> {
    let y = y_pred.to_device(Device::Cpu)?.to_f32_vec()?;
    let cols = y_pred.shape().last().copied().unwrap_or(1).max(1);
    if y.len() != targets.len() {
        return Err(Error::ShapeMismatch {
            layer: metric.name().into(),
            expected: format!("{} predictions, one per target", targets.len()),
            got: y_pred.shape().to_vec(),
        });
    }
    let n = y.len() as f64;
    let metric = match (metric, kind) {
        (Metric::Accuracy, DenseLoss::BinaryCrossentropy { .. }) => Metric::BinaryAccuracy,
        (Metric::Accuracy, _) => Metric::CategoricalAccuracy,
        (m, _) => m,
    };
    Ok(match metric {
        Metric::CategoricalAccuracy => {
            let arg = mp_kernels::ops::argmax_rows(y_pred)?;
            let correct = arg
                .iter()
                .zip(targets.chunks_exact(cols))
                .filter(|(a, t)| a.is_some_and(|a| first_argmax(t) == Some(a as usize)))
                .count();
            [correct as f64, arg.len() as f64]
        }
        Metric::BinaryAccuracy => {
            let threshold = match kind {
                DenseLoss::BinaryCrossentropy { from_logits: true } => 0.0,
                _ => 0.5,
            };
            let correct = y
                .iter()
                .zip(targets)
                .filter(|&(&y, &t)| (y > threshold) == (t > 0.5))
                .count();
            [correct as f64, n]
        }
        Metric::MeanSquaredError => [
            y.iter()
                .zip(targets)
                .map(|(&y, &t)| (f64::from(y) - f64::from(t)).powi(2))
                .sum(),
            n,
        ],
        Metric::MeanAbsoluteError => [
            y.iter()
                .zip(targets)
                .map(|(&y, &t)| (f64::from(y) - f64::from(t)).abs())
                .sum(),
            n,
        ],
        Metric::Accuracy | Metric::SparseCategoricalAccuracy => {
            return Err(Error::InvalidArgument {
                what: format!("metric {:?} needs integer labels", metric.name()),
            });
        }
    })
}

/// The index of the first largest value (`None` for NaN anywhere or an empty row).
fn first_argmax(t: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in t.iter().enumerate() {
        if v.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// The running sums of a list of metrics over a pass through the data.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MetricSums {
    metrics: Vec<Metric>,
    sums: Vec<[f64; 2]>,
}

impl MetricSums {
    pub(crate) fn new(metrics: &[Metric]) -> Self {
        MetricSums {
            metrics: metrics.to_vec(),
            sums: vec![[0.0; 2]; metrics.len()],
        }
    }

    /// Adds a batch.
    pub(crate) fn update<T, Lo: super::Loss<T> + ?Sized>(
        &mut self,
        loss: &Lo,
        y_pred: &Tensor<F32>,
        targets: &[T],
    ) -> Result<()> {
        for (m, s) in self.metrics.iter().zip(&mut self.sums) {
            let [a, b] = loss.metric_sums(*m, y_pred, targets)?;
            s[0] += a;
            s[1] += b;
        }
        Ok(())
    }

    /// The sums, flat (what ranks add up).
    pub(crate) fn flat(&self) -> Vec<f64> {
        self.sums.iter().flatten().copied().collect()
    }

    /// Adds flat sums from [`MetricSums::flat`].
    pub(crate) fn merge_flat(&mut self, flat: &[f64]) {
        for (s, f) in self.sums.iter_mut().zip(flat.chunks_exact(2)) {
            s[0] += f[0];
            s[1] += f[1];
        }
    }

    /// Each metric's name and value so far (0 for a metric that saw nothing, as Keras).
    pub(crate) fn results(&self) -> Vec<(&'static str, f32)> {
        self.metrics
            .iter()
            .zip(&self.sums)
            .map(|(m, [t, c])| (m.name(), if *c == 0.0 { 0.0 } else { (t / c) as f32 }))
            .collect()
    }
}

/// Keras's `Mean`: a weighted running mean (accumulated in float64).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mean {
    total: f64,
    count: f64,
}

impl Mean {
    /// An empty mean.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` with weight `weight` (e.g. a batch's mean loss weighted by its size).
    pub fn update_state(&mut self, value: f32, weight: f64) {
        self.total += value as f64 * weight;
        self.count += weight;
    }

    /// The mean so far (0 when empty, as Keras).
    pub fn result(&self) -> f32 {
        if self.count == 0.0 {
            0.0
        } else {
            (self.total / self.count) as f32
        }
    }

    /// Forgets everything.
    pub fn reset_state(&mut self) {
        *self = Self::default();
    }
}

/// Keras's `SparseCategoricalAccuracy`: how often the arg-max class equals the label.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseCategoricalAccuracy {
    correct: u64,
    total: u64,
}

impl SparseCategoricalAccuracy {
    /// An empty accuracy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a batch of predictions (`[..., classes]`, float32: a row per label) against
    /// labels. Ties go to the first class; a row holding NaN counts as wrong.
    pub fn update_state<L: Label>(&mut self, y_pred: &Tensor<F32>, labels: &[L]) -> Result<()> {
        self.correct += sparse_correct(y_pred, labels, |_| true)? as u64;
        self.total += labels.len() as u64;
        Ok(())
    }

    /// The accuracy so far (0 when empty).
    pub fn result(&self) -> f32 {
        if self.total == 0 {
            0.0
        } else {
            (self.correct as f64 / self.total as f64) as f32
        }
    }

    /// Forgets everything.
    pub fn reset_state(&mut self) {
        *self = Self::default();
    }
}
