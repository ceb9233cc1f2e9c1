//! Callbacks of `fit` (Keras's `keras.callbacks`): code that runs at fixed points of training
//! with the whole [`Trainer`] in hand, so that it can save it (`checkpoint::ModelCheckpoint`),
//! read it, stop training ([`Trainer::stop_training`], as `EarlyStopping` does), or stop it
//! with an error.

use super::{EpochLogs, SparseCategoricalCrossentropy, StepReport, Trainer, TrainingProgress};
use crate::error::Result;
use crate::layer::Model;
use mp_optim::Optimizer;

/// A callback of [`Trainer::fit`], added with [`Trainer::with_callback`], for a trainer of
/// model `M`, optimizer `O` and loss `Lo`. Callbacks run in the
/// order they were added. An error from one stops `fit` with that error (the epoch's weights
/// stay as trained).
///
/// A closure `FnMut(&EpochLogs, &TrainingProgress) -> Result<()>` is a callback that runs at
/// the end of every epoch.
pub trait Callback<M: Model, O: Optimizer, Lo = SparseCategoricalCrossentropy>: Send {
    /// Runs once when `fit` starts, before the first step: a place to check the configuration
    /// against the run (`has_validation`: whether `fit` holds out validation data).
    fn on_train_begin(
        &mut self,
        trainer: &mut Trainer<M, O, Lo>,
        has_validation: bool,
    ) -> Result<()> {
        let _ = (trainer, has_validation);
        Ok(())
    }

    /// Runs after every optimizer update of `fit` (applied or skipped), with its report
    /// (Keras's `on_train_batch_end`); the trainer's [`Trainer::progress`] already counts it.
    /// Under data parallelism it runs on every rank with the same report; an error on any rank
    /// stops every rank at this step.
    fn on_batch_end(&mut self, trainer: &mut Trainer<M, O, Lo>, report: &StepReport) -> Result<()> {
        let _ = (trainer, report);
        Ok(())
    }

    /// Whether [`Callback::on_batch_end`] does anything (the default: yes). `fit` builds the
    /// step report, calls `on_batch_end` and, under data parallelism, agrees on its outcome
    /// across the ranks (one collective per step) only when some callback says yes: a callback
    /// that keeps the default no-op `on_batch_end` says no, and costs nothing per step.
    fn uses_batch_end(&self) -> bool {
        true
    }

    /// Whether this callback wants [`StepReport::gradient_norm`]: `fit` then computes the
    /// global gradient norm at every step (one more read of the gradients).
    fn wants_gradient_norm(&self) -> bool {
        false
    }

    /// Runs at the end of every epoch, after validation, with the epoch's logs; the trainer's
    /// [`Trainer::progress`] already counts the epoch.
    fn on_epoch_end(&mut self, trainer: &mut Trainer<M, O, Lo>, logs: &EpochLogs) -> Result<()>;

    /// Runs once when `fit` has run its epochs (or was stopped by
    /// [`Trainer::stop_training`]), before it returns the history; not after an error.
    fn on_train_end(&mut self, trainer: &mut Trainer<M, O, Lo>) -> Result<()> {
        let _ = trainer;
        Ok(())
    }
}

impl<M, O, Lo, F> Callback<M, O, Lo> for F
where
    M: Model,
    O: Optimizer,
    F: FnMut(&EpochLogs, &TrainingProgress) -> Result<()> + Send,
{
    fn uses_batch_end(&self) -> bool {
        false
    }

    fn on_epoch_end(&mut self, trainer: &mut Trainer<M, O, Lo>, logs: &EpochLogs) -> Result<()> {
        self(logs, &trainer.progress())
    }
}
