//! What `fit` takes and gives back: its options, each epoch's logs, the history, where training
//! stands, one step's result.

/// How much `fit` and `evaluate` print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verbose {
    /// Nothing.
    Silent,
    /// A live progress bar on a terminal; one line per epoch otherwise (Keras's `verbose=1`).
    #[default]
    Auto,
    /// One line per epoch, no bar (Keras's `verbose=2`).
    Lines,
}

/// The options of [`Trainer::fit`](super::Trainer::fit), with Keras's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct FitOptions {
    /// Samples per gradient update (Keras: 32).
    pub batch_size: usize,
    /// Passes over the training data.
    pub epochs: usize,
    /// The fraction of the data, taken from the end before shuffling, held out for validation.
    pub validation_split: f64,
    /// Reshuffle the training data every epoch.
    pub shuffle: bool,
    /// The seed of the shuffling.
    pub seed: u64,
    /// What to print.
    pub verbose: Verbose,
    /// Batches whose gradients are summed into one optimizer update (gradient accumulation;
    /// 1: an update per batch). Each window of this many batches, and the shorter one that
    /// may end an epoch, is one [`Trainer::train_window`](super::Trainer::train_window): one
    /// loss scale, one finiteness decision, one update, equal to the update of one batch made
    /// of the window's samples. Keras 3 puts this on the optimizer
    /// (`gradient_accumulation_steps`).
    pub gradient_accumulation_steps: usize,
}

impl FitOptions {
    /// The optimizer updates in one epoch of `n` samples with these options: the samples left
    /// after `validation_split` in batches of `batch_size` (the last may be short), in
    /// windows of `gradient_accumulation_steps` batches (the last may be short). What a
    /// learning-rate schedule's total is made of.
    ///
    /// # Errors
    /// A `validation_split` outside `[0, 1)`, a `batch_size` or `gradient_accumulation_steps`
    /// of 0, named.
    pub fn updates_per_epoch(&self, n: usize) -> crate::Result<usize> {
        self.check()?;
        let (train, _) = mp_core::rng::validation_split(n, self.validation_split)?;
        Ok(train
            .len()
            .div_ceil(self.batch_size)
            .div_ceil(self.gradient_accumulation_steps))
    }

    /// The counts that must be at least 1.
    pub(crate) fn check(&self) -> crate::Result<()> {
        for (what, v) in [
            ("batch_size", self.batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ] {
            if v == 0 {
                return Err(crate::Error::InvalidArgument {
                    what: format!("{what} must be at least 1"),
                });
            }
        }
        Ok(())
    }
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            batch_size: 32,
            epochs: 1,
            validation_split: 0.0,
            shuffle: true,
            seed: 0,
            verbose: Verbose::Auto,
            gradient_accumulation_steps: 1,
        }
    }
}

/// What one epoch measured.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochLogs {
    /// The epoch, from 0.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f32,
    /// The training metrics, by name, in the trainer's order
    /// ([`Trainer::with_metrics`](super::Trainer::with_metrics); `accuracy` by default).
    pub metrics: Vec<(&'static str, f32)>,
    /// Validation loss, when there is validation data.
    pub val_loss: Option<f32>,
    /// The same metrics on the validation data (empty without it).
    pub val_metrics: Vec<(&'static str, f32)>,
    /// The loss scale at the end of the epoch (with loss scaling).
    pub loss_scale: Option<f32>,
    /// Optimizer updates skipped in this epoch because of non-finite gradients or updates
    /// that would have been non-finite (each a whole window under gradient accumulation).
    pub skipped_steps: u64,
    /// Batches run.
    pub steps: usize,
    /// Wall time of the epoch (training and validation), in seconds.
    pub seconds: f64,
}

impl EpochLogs {
    /// A value of the logs by its Keras key: `loss`, `val_loss`, `loss_scale`, a metric's name
    /// (`accuracy`, ...) or `val_` and a metric's name; `None` for a key these logs lack.
    pub fn get(&self, key: &str) -> Option<f32> {
        match key {
            "loss" => Some(self.loss),
            "val_loss" => self.val_loss,
            "loss_scale" => self.loss_scale,
            _ => match key.strip_prefix("val_") {
                Some(name) => find(&self.val_metrics, name),
                None => find(&self.metrics, key),
            },
        }
    }
}

fn find(metrics: &[(&'static str, f32)], name: &str) -> Option<f32> {
    metrics.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Per-epoch metrics, as Keras's `History`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct History {
    /// One entry per epoch.
    pub epochs: Vec<EpochLogs>,
}

impl History {
    /// The values of one key of the logs per epoch ([`EpochLogs::get`]: `loss`, `accuracy`,
    /// `val_loss`, `val_accuracy`, `loss_scale`, ...), `None` for a key the logs lack.
    pub fn get(&self, key: &str) -> Option<Vec<f32>> {
        self.epochs.iter().map(|e| e.get(key)).collect()
    }
}

/// Where training stands: what a checkpoint saves to resume exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainingProgress {
    /// Epochs completed.
    pub epoch: usize,
    /// Training steps run in total.
    pub step: u64,
    /// The state of the shuffling generator at the start of the next epoch.
    pub rng_state: u64,
}

/// The loss and metrics from [`Trainer::evaluate`](super::Trainer::evaluate).
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// Mean loss.
    pub loss: f32,
    /// The metrics, by name, in the trainer's order.
    pub metrics: Vec<(&'static str, f32)>,
}

impl Scores {
    /// A metric by name (`loss` too); `None` for one that was not computed.
    pub fn get(&self, name: &str) -> Option<f32> {
        match name {
            "loss" => Some(self.loss),
            _ => find(&self.metrics, name),
        }
    }

    /// The `accuracy` metric, NaN when it was not computed (a regression).
    pub fn accuracy(&self) -> f32 {
        self.get("accuracy").unwrap_or(f32::NAN)
    }
}

/// What one training step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    /// The (unscaled) mean loss of the batch.
    pub loss: f32,
    /// Whether the update was applied (false: skipped, for non-finite gradients or because the
    /// update would have written NaN or infinity).
    pub applied: bool,
    /// The loss scale the step used (1 without loss scaling).
    pub loss_scale: f32,
    /// Why the update was skipped (`None` when it was applied): the first non-finite gradient,
    /// or the update that would have written NaN or infinity.
    pub skipped: Option<String>,
    /// The global L2 norm of the gradients the optimizer was given (unscaled, before any
    /// clipping; NaN or infinite when a gradient was), when the trainer tracks it
    /// ([`Trainer::with_gradient_norm`](super::Trainer::with_gradient_norm), or a callback
    /// asks for it in `fit`).
    pub gradient_norm: Option<f64>,
}

/// One optimizer update of `fit`, as [`Callback::on_batch_end`](super::Callback::on_batch_end)
/// sees it: what a step logger writes (Keras's per-batch logs, plus what mixed precision adds:
/// the loss scale, and whether and why the step was skipped).
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Batches trained in total after this update ([`TrainingProgress::step`]): the key a
    /// resumed run is truncated to.
    pub step: u64,
    /// The epoch (0-based).
    pub epoch: usize,
    /// The batches of this epoch done after this update (1-based).
    pub batch: usize,
    /// The update's (unscaled) mean loss.
    pub loss: f32,
    /// The loss scale the update used; `None` without loss scaling.
    pub loss_scale: Option<f32>,
    /// Whether the update was applied.
    pub applied: bool,
    /// Why it was skipped (see [`StepResult::skipped`]).
    pub skipped: Option<String>,
    /// The global gradient norm, when tracked (see [`StepResult::gradient_norm`]).
    pub gradient_norm: Option<f64>,
    /// The learning rate the update used.
    pub learning_rate: f32,
    /// Micro-batches in the update (more than 1 with gradient accumulation).
    pub micro_batches: usize,
    /// Samples in the update, over every rank.
    pub samples: usize,
    /// Wall-clock seconds of the update, from its first gather to its metrics.
    pub seconds: f64,
}
