//! Keras's `EarlyStopping`: stop `fit` when a monitored metric has stopped improving.

use mp_core::{F32, Tensor};
use mp_optim::Optimizer;

use super::{BestMetric, Callback, EpochLogs, Mode, Trainer};
use crate::error::Result;
use crate::layer::Model;

/// Stops training when `monitor` has not improved by more than `min_delta` for `patience`
/// epochs, as Keras's `EarlyStopping` (defaults: patience 0, min_delta 0, no restoring).
///
/// After each epoch the callback counts one more epoch without improvement, or resets the count
/// when the metric improved (by more than `min_delta`: a loss must fall below `best -
/// min_delta`, an accuracy rise above `best + min_delta`). When the count reaches `patience`
/// (and this `fit` has run more than one epoch), it asks the trainer to stop ([`Trainer::stop_training`]).
/// With [`EarlyStopping::restore_best_weights`], `fit` ends with the weights of the best epoch
/// (when it was not the last). Data-parallel, every rank sees the same logs and decides alike.
///
/// ```
/// use mp_layers::{BestMetric, EarlyStopping};
/// let stop = EarlyStopping::new(BestMetric::min("val_loss")).patience(3).restore_best_weights(true);
/// ```
#[derive(Debug)]
pub struct EarlyStopping {
    monitor: BestMetric,
    patience: usize,
    min_delta: f32,
    restore_best_weights: bool,
    best: Option<f32>,
    best_epoch: Option<usize>,
    best_weights: Option<Vec<(String, Tensor<F32>)>>,
    wait: usize,
    stopped_epoch: Option<usize>,
    last_epoch: Option<usize>,
    /// Epochs seen in this `fit`.
    seen: usize,
}

impl EarlyStopping {
    /// Watches `monitor` (patience 0, min_delta 0, weights not restored).
    pub fn new(monitor: BestMetric) -> Self {
        EarlyStopping {
            monitor,
            patience: 0,
            min_delta: 0.0,
            restore_best_weights: false,
            best: None,
            best_epoch: None,
            best_weights: None,
            wait: 0,
            stopped_epoch: None,
            last_epoch: None,
            seen: 0,
        }
    }

    /// Epochs without improvement after which training stops.
    pub fn patience(mut self, epochs: usize) -> Self {
        self.patience = epochs;
        self
    }

    /// The smallest change that counts as an improvement (its absolute value; NaN counts as 0).
    pub fn min_delta(mut self, delta: f32) -> Self {
        self.min_delta = if delta.is_nan() { 0.0 } else { delta.abs() };
        self
    }

    /// Whether `fit` ends with the weights of the best epoch.
    pub fn restore_best_weights(mut self, restore: bool) -> Self {
        self.restore_best_weights = restore;
        self
    }

    /// The epoch (0-based, as [`EpochLogs::epoch`]) after which training was stopped, if it was.
    pub fn stopped_epoch(&self) -> Option<usize> {
        self.stopped_epoch
    }

    /// The best epoch so far and its value.
    pub fn best(&self) -> Option<(usize, f32)> {
        self.best_epoch.zip(self.best)
    }

    fn is_improvement(&self, value: f32) -> bool {
        let shifted = match self.monitor.mode {
            Mode::Min => value + self.min_delta,
            Mode::Max => value - self.min_delta,
        };
        self.monitor.mode.improves(shifted, self.best)
    }
}

impl<M: Model, O: Optimizer, Lo> Callback<M, O, Lo> for EarlyStopping {
    fn uses_batch_end(&self) -> bool {
        false
    }

    /// Checks the metric and forgets any earlier run.
    fn on_train_begin(
        &mut self,
        trainer: &mut Trainer<M, O, Lo>,
        has_validation: bool,
    ) -> Result<()> {
        (self.monitor).check("early stopping", has_validation, &trainer.metric_names())?;
        self.best = None;
        self.best_epoch = None;
        self.best_weights = None;
        self.wait = 0;
        self.stopped_epoch = None;
        self.last_epoch = None;
        self.seen = 0;
        Ok(())
    }

    fn on_epoch_end(&mut self, trainer: &mut Trainer<M, O, Lo>, logs: &EpochLogs) -> Result<()> {
        self.last_epoch = Some(logs.epoch);
        self.seen += 1;
        // A missing value (a validation metric without validation data) is refused at begin;
        // NaN never improves.
        let value = self.monitor.value(logs).unwrap_or(f32::NAN);
        self.wait += 1;
        if self.is_improvement(value) {
            self.best = Some(value);
            self.best_epoch = Some(logs.epoch);
            if self.restore_best_weights {
                self.best_weights = Some(trainer.model_mut().get_weights()?);
            }
            self.wait = 0;
            return Ok(());
        }
        if self.wait >= self.patience && self.seen > 1 {
            self.stopped_epoch = Some(logs.epoch);
            trainer.stop_training();
        }
        Ok(())
    }

    /// Restores the best epoch's weights when asked and the best epoch was not the last.
    fn on_train_end(&mut self, trainer: &mut Trainer<M, O, Lo>) -> Result<()> {
        if let (Some(weights), Some(best)) = (&self.best_weights, self.best_epoch)
            && self.last_epoch != Some(best)
        {
            trainer.model_mut().set_weights(weights)?;
        }
        Ok(())
    }
}
