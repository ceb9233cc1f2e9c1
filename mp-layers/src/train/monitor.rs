//! What a callback watches: one metric of the epoch's logs and whether smaller or larger is
//! better (Keras's `monitor` and `mode`).

use serde::{Deserialize, Serialize};

use super::EpochLogs;
use crate::error::{Error, Result};

/// Whether a smaller or a larger value of a metric is better (saved as `min` or `max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Smaller is better (losses).
    Min,
    /// Larger is better (accuracies).
    Max,
}

impl Mode {
    /// Whether `value` improves on `best` (NaN never does; anything does on no best yet).
    pub fn improves(self, value: f32, best: Option<f32>) -> bool {
        if value.is_nan() {
            return false;
        }
        match (self, best) {
            (_, None) => true,
            (Mode::Min, Some(b)) => value < b,
            (Mode::Max, Some(b)) => value > b,
        }
    }
}

/// A metric of [`EpochLogs`] and which way is better: the one whose best epoch a
/// checkpoint keeps (Keras's `ModelCheckpoint(monitor=..., mode=..., save_best_only=True)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BestMetric {
    /// A key of the logs: `loss`, `val_loss`, or one of the trainer's metrics (`accuracy`,
    /// ...) with or without `val_`.
    pub metric: String,
    /// Whether smaller or larger is better.
    pub mode: Mode,
}

impl BestMetric {
    /// The smallest `metric` is best (a loss).
    pub fn min(metric: &str) -> Self {
        BestMetric {
            metric: metric.to_string(),
            mode: Mode::Min,
        }
    }

    /// The largest `metric` is best (an accuracy).
    pub fn max(metric: &str) -> Self {
        BestMetric {
            metric: metric.to_string(),
            mode: Mode::Max,
        }
    }

    /// The metric's value in `logs` (`None` for a validation metric without validation data).
    pub fn value(&self, logs: &EpochLogs) -> Option<f32> {
        logs.get(&self.metric)
    }

    /// Checks that the metric is one the run logs (`loss` or one of `metrics`, the trainer's
    /// metric names, each also with `val_`) and, for a validation metric, that there is
    /// validation data; `who` (`checkpoint`) names the user in the message.
    pub fn check(&self, who: &str, has_validation: bool, metrics: &[&str]) -> Result<()> {
        let known: Vec<String> = std::iter::once("loss")
            .chain(metrics.iter().copied())
            .flat_map(|m| [m.to_string(), format!("val_{m}")])
            .collect();
        if !known.contains(&self.metric) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "unknown {who} metric {:?}: use one of {known:?}",
                    self.metric
                ),
            });
        }
        if self.metric.starts_with("val_") && !has_validation {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{who} metric {:?} needs validation data: set validation_split",
                    self.metric
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_improve_one_way_and_never_on_nan() {
        assert!(Mode::Min.improves(1.0, None));
        assert!(!Mode::Min.improves(f32::NAN, None));
        assert!(Mode::Min.improves(0.5, Some(1.0)));
        assert!(!Mode::Min.improves(1.0, Some(1.0)));
        assert!(Mode::Max.improves(0.9, Some(0.8)));
    }

    #[test]
    fn metrics_are_checked_by_name_and_need_their_data() {
        assert!(
            BestMetric::min("val_loss")
                .check("checkpoint", true, &["accuracy"])
                .is_ok()
        );
        let e = BestMetric::min("val_los").check("checkpoint", true, &["accuracy"]);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("unknown checkpoint metric")
        );
        let e = BestMetric::max("val_accuracy").check("checkpoint", false, &["accuracy"]);
        assert!(e.unwrap_err().to_string().contains("set validation_split"));
    }
}
