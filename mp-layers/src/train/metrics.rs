//! Metrics: running averages over a pass through the data.

use mp_core::{F32, Tensor};
use mp_kernels::softmax::Label;

use crate::error::{Error, Result};

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

    /// The weighted sum and the weight: what ranks add up.
    pub(crate) fn sums(&self) -> [f64; 2] {
        [self.total, self.count]
    }

    /// Adds sums from [`Mean::sums`] (of other ranks).
    pub(crate) fn merge_sums(&mut self, [total, count]: [f64; 2]) {
        self.total += total;
        self.count += count;
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

    /// Counts a batch of predictions (`[batch, classes]`, float32) against labels. Ties go to
    /// the first class; a row holding NaN counts as wrong.
    pub fn update_state<L: Label>(&mut self, y_pred: &Tensor<F32>, labels: &[L]) -> Result<()> {
        let [rows, _] = *y_pred.shape() else {
            return Err(Error::ShapeMismatch {
                layer: "sparse_categorical_accuracy".into(),
                expected: "(batch, classes)".into(),
                got: y_pred.shape().to_vec(),
            });
        };
        if rows != labels.len() {
            return Err(Error::ShapeMismatch {
                layer: "sparse_categorical_accuracy".into(),
                expected: format!("({}, classes) for {} labels", labels.len(), labels.len()),
                got: y_pred.shape().to_vec(),
            });
        }
        let arg = mp_kernels::ops::argmax_rows(y_pred)?;
        for (a, &l) in arg.iter().zip(labels) {
            if a.is_some_and(|a| l.index() == Some(a as usize)) {
                self.correct += 1;
            }
        }
        self.total += rows as u64;
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

    /// Correct and total counts: what ranks add up.
    pub(crate) fn sums(&self) -> [f64; 2] {
        [self.correct as f64, self.total as f64]
    }

    /// Adds counts from [`SparseCategoricalAccuracy::sums`] (of other ranks).
    pub(crate) fn merge_sums(&mut self, [correct, total]: [f64; 2]) {
        self.correct += correct as u64;
        self.total += total as u64;
    }
}
