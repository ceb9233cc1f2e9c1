//! Training: `fit`, `evaluate` and `predict` over host `ndarray` data, as Keras's `Model` methods.

mod callbacks;
mod data;
mod early_stopping;
mod logs;
pub mod losses;
pub mod metrics;
mod monitor;
mod optimizer;
mod parallel;
mod progress;
mod telemetry;

use std::sync::Arc;
use std::time::Instant;

use mp_core::dist::Communicator;
use mp_core::{Device, F32, LossScale, PolicyKind, Rng, Tensor};
use mp_optim::{LearningRateSchedule, LossScaleOptimizer, NonFiniteUpdate, Optimizer, Update};
use ndarray::{ArrayD, ArrayView, ArrayViewD, Dimension};

pub use self::callbacks::Callback;
pub use self::early_stopping::EarlyStopping;
pub use self::logs::{
    EpochLogs, FitOptions, History, Scores, StepReport, StepResult, TrainingProgress, Verbose,
};
pub use self::losses::{
    BinaryCrossentropy, CategoricalCrossentropy, Loss, LossInfo, MeanSquaredError,
    SparseCategoricalCrossentropy,
};
pub use self::metrics::{Mean, Metric, SparseCategoricalAccuracy};
pub use self::monitor::{BestMetric, Mode};
pub use self::optimizer::{ModelVars, TrainOptimizer};
pub use self::parallel::CommStats;
pub use self::telemetry::{COLUMNS as STEP_LOG_COLUMNS, LogFormat, StepLogger};

use self::data::{
    check_data, first_nonfinite_gradient, gather, gradient_norm, nonfinite_origin, targets_of,
};
use self::metrics::MetricSums;
use self::parallel::Replicas;
use self::progress::Reporter;
use crate::error::{Error, Result};
use crate::layer::{Input, Model};

/// A compiled model: the model, its optimizer (with loss scaling under `mixed_float16`, as
/// Keras), its loss and metrics. Keras's `model.compile(...)` followed by `fit`, `evaluate`,
/// `predict`.
///
/// The loss `Lo` is any [`Loss`]: with [`SparseCategoricalCrossentropy`] (the default type)
/// the targets are integer labels, with [`CategoricalCrossentropy`], [`BinaryCrossentropy`]
/// and [`MeanSquaredError`] they are float32 values, one per output.
pub struct Trainer<M: Model, O: Optimizer, Lo = SparseCategoricalCrossentropy> {
    model: M,
    optimizer: TrainOptimizer<O>,
    loss: Lo,
    /// The metrics `fit` and `evaluate` report (the loss's defaults unless set).
    metrics: Vec<Metric>,
    progress: TrainingProgress,
    callbacks: Vec<Box<dyn Callback<M, O, Lo>>>,
    /// The best value so far of a metric, and which metric (kept by callbacks with
    /// [`Trainer::update_best`], saved in checkpoints).
    pub(crate) best: Option<(BestMetric, f32)>,
    /// Where the variables, optimizer slots and activations live.
    device: Device,
    /// Consecutive steps skipped for non-finite gradients, and where the first one's came from.
    nonfinite_run: (u64, Option<String>),
    /// How many consecutive skipped steps stop `fit` (see [`Trainer::with_max_nonfinite_steps`]).
    max_nonfinite_steps: u64,
    /// The other ranks of a data-parallel job (none by default).
    replicas: Replicas,
    /// Whether a callback asked `fit` to stop after this epoch.
    stop: bool,
    /// The learning rate as a function of the applied updates, if any.
    schedule: Option<LearningRateSchedule>,
    /// Whether every step computes the global gradient norm ([`StepResult::gradient_norm`]).
    gradient_norm: bool,
}

/// Why a training step was skipped.
enum Skip {
    /// A gradient was NaN or infinite (the first variable whose was, when known).
    Gradient(Option<String>),
    /// Every gradient was finite, but the update would have written NaN or infinity.
    Update(NonFiniteUpdate),
}

/// One micro-batch of a [`Trainer::train_window`]: the inputs in the model's input dtype and
/// their targets (labels, or values, as the loss takes them).
pub type MicroBatch<'a, M, T> = (&'a Tensor<Input<M>>, &'a [T]);

/// Consecutive steps with non-finite gradients after which `fit` stops, without loss scaling
/// (with it, the loss-scale optimizer's floor rule decides).
pub const MAX_NONFINITE_STEPS: u64 = 20;

impl<M: Model, O: Optimizer, Lo: std::fmt::Debug> std::fmt::Debug for Trainer<M, O, Lo> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model.model_name())
            .field("optimizer", &self.optimizer.inner().name())
            .field("loss", &self.loss)
            .field("loss_scale", &self.optimizer.loss_scale())
            .field("progress", &self.progress)
            .finish()
    }
}

impl<M: Model, O: Optimizer, Lo> Trainer<M, O, Lo> {
    /// Compiles `model` with `optimizer` and `loss`. Under `mixed_float16` the optimizer is
    /// wrapped in a [`LossScaleOptimizer`] with a dynamic scale (Keras's rule); under `float32`
    /// and `mixed_bfloat16` it is not, unless asked with [`Trainer::with_loss_scale`].
    pub fn compile(model: M, optimizer: O, loss: Lo) -> Self
    where
        Lo: LossInfo,
    {
        let policy = <M::Policy as PolicyKind>::POLICY;
        let optimizer = match policy.default_loss_scale() {
            Some(scale) => {
                TrainOptimizer::Scaled(LossScaleOptimizer::with_loss_scale(optimizer, scale))
            }
            None => TrainOptimizer::Plain(optimizer),
        };
        Trainer {
            model,
            optimizer,
            metrics: loss.default_metrics(),
            loss,
            progress: TrainingProgress::default(),
            callbacks: vec![],
            best: None,
            device: Device::Cpu,
            nonfinite_run: (0, None),
            max_nonfinite_steps: MAX_NONFINITE_STEPS,
            replicas: Replicas::default(),
            stop: false,
            schedule: None,
            gradient_norm: false,
        }
    }

    /// Sets the metrics `fit` and `evaluate` report (Keras's `compile(metrics=[...])`), in
    /// this order, instead of the loss's defaults (`accuracy` for the classification losses,
    /// none for [`MeanSquaredError`]).
    ///
    /// # Errors
    /// A metric that does not apply to the loss's targets, naming both.
    pub fn with_metrics(mut self, metrics: &[Metric]) -> Result<Self>
    where
        Lo: LossInfo,
    {
        if let Some(m) = metrics.iter().find(|m| !self.loss.supports(**m)) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "metric {:?} does not apply to loss {}",
                    m.name(),
                    self.loss.name()
                ),
            });
        }
        self.metrics = metrics.to_vec();
        Ok(self)
    }

    /// The metrics `fit` and `evaluate` report, in order.
    pub fn metrics(&self) -> &[Metric] {
        &self.metrics
    }

    /// The names of [`Trainer::metrics`], as the logs key them.
    pub fn metric_names(&self) -> Vec<&'static str> {
        self.metrics().iter().map(|m| m.name()).collect()
    }

    /// The loss.
    pub fn loss(&self) -> &Lo {
        &self.loss
    }

    /// Sets the learning rate before every step from `schedule`, read at the optimizer's count
    /// of applied updates: a step the loss-scale optimizer skips does not advance it, and a
    /// resumed run (the count is in the checkpoint) continues it.
    ///
    /// # Errors
    /// A schedule whose rates are not finite and non-negative, whose total is 0, or whose
    /// warmup exceeds its total ([`mp_optim::Error::InvalidHyperparameter`]).
    pub fn with_learning_rate_schedule(mut self, schedule: LearningRateSchedule) -> Result<Self> {
        schedule.validate()?;
        self.schedule = Some(schedule);
        Ok(self)
    }

    /// Asks `fit` to stop after the epoch that is ending (Keras's `model.stop_training =
    /// True`): what a callback's `on_epoch_end` calls. `fit` clears the request when it starts.
    pub fn stop_training(&mut self) {
        self.stop = true;
    }

    /// Whether a callback asked `fit` to stop ([`Trainer::stop_training`]).
    pub fn stop_requested(&self) -> bool {
        self.stop
    }

    /// Trains data-parallel over `comm`'s ranks (see [`mp_core::dist`]; [`mp_core::dist::from_env`]
    /// gives the one `mpirun` launched this process with). Every rank runs the same program:
    /// `fit` starts every replica from rank 0's weights, gives each rank its shard of every
    /// global batch (`batch_size` is the global batch, split in rank order), sums the
    /// gradients so that the update is the one a single process would make over the global
    /// batch, and makes every rank skip or apply each step together; loss, metrics and
    /// validation are over the global batch on every rank. Progress is printed and
    /// [`ModelCheckpoint`](crate::checkpoint::ModelCheckpoint) writes on rank 0 only.
    /// `evaluate` splits its data between the ranks and sums their scores; `predict` runs on
    /// each rank's whole input.
    ///
    /// With a single rank (the default, [`mp_core::dist::Local`]) nothing changes.
    pub fn with_communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.replicas = Replicas::new(comm);
        self
    }

    /// The communicator of the data-parallel job ([`mp_core::dist::Local`] by default).
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        self.replicas.comm()
    }

    /// This process's rank in the data-parallel job (0 alone).
    pub fn rank(&self) -> usize {
        self.replicas.rank()
    }

    /// What the last training step's collectives moved and took (zero alone).
    pub fn comm_stats(&self) -> CommStats {
        self.replicas.last
    }

    /// Computes the global L2 norm of the gradients at every step, reported in
    /// [`StepResult::gradient_norm`] (one more read of the gradients per step; `fit` turns it
    /// on while a callback's [`Callback::wants_gradient_norm`] says so).
    pub fn with_gradient_norm(mut self, on: bool) -> Self {
        self.gradient_norm = on;
        self
    }

    /// How many consecutive skipped steps stop training with [`Error::NonFiniteSteps`] (default
    /// [`MAX_NONFINITE_STEPS`]; at least 1). A step is skipped under every policy when a
    /// gradient is non-finite, and when the gradients are finite but the optimizer's update
    /// would write NaN or infinity into a variable or a slot, so the weights never see a
    /// non-finite value. Without loss scaling every skip counts. With loss scaling
    /// (`mixed_float16`) a gradient skip halves the scale instead, and the loss-scale
    /// optimizer's own rule (the scale stuck at its floor) stops training; an update skip
    /// leaves the scale alone and counts here. The error names the first skipped step's cause.
    pub fn with_max_nonfinite_steps(mut self, steps: u64) -> Self {
        self.max_nonfinite_steps = steps.max(1);
        self
    }

    /// Places training on `device`: the variables (now, or when the model is built), the
    /// optimizer slots (created beside the variables at the first step), every activation and
    /// gradient stay there, and the finiteness check runs there into one device flag per step;
    /// `fit` copies each batch there and reads back the loss, the predictions for the accuracy
    /// metric and that flag once per batch.
    ///
    /// # Errors
    /// Without the `cuda` feature, any CUDA device ([`mp_core::Error::CudaNotCompiled`]); with
    /// it, a device that cannot be used.
    pub fn to_device(mut self, device: Device) -> Result<Self> {
        if let Device::Cuda(n) = device {
            Device::cuda(n)?;
        }
        self.device = device;
        if self.model.output_shape().is_some() {
            self.place_variables()?;
        }
        Ok(self)
    }

    /// The device training runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    fn place_variables(&mut self) -> Result<()> {
        let device = self.device;
        self.model
            .visit_variables("", &mut |_, v| Ok(v.to_device(device)?))
    }

    /// Chooses the loss scaling explicitly: `Some(scale)` wraps the optimizer, `None` unwraps it.
    pub fn with_loss_scale(mut self, scale: Option<LossScale>) -> Self {
        let inner = match self.optimizer {
            TrainOptimizer::Plain(o) => o,
            TrainOptimizer::Scaled(s) => s.into_inner(),
        };
        self.optimizer = match scale {
            Some(s) => TrainOptimizer::Scaled(LossScaleOptimizer::with_loss_scale(inner, s)),
            None => TrainOptimizer::Plain(inner),
        };
        self
    }

    /// Wraps the optimizer in a given [`LossScaleOptimizer`] configuration.
    pub fn with_loss_scale_optimizer(mut self, lso: LossScaleOptimizer<O>) -> Self {
        self.optimizer = TrainOptimizer::Scaled(lso);
        self
    }

    /// Adds a callback of `fit` (see [`Callback`]), run after those added before: for example
    /// `checkpoint::ModelCheckpoint`, which writes a checkpoint at the end of every
    /// epoch.
    pub fn with_callback(mut self, callback: impl Callback<M, O, Lo> + 'static) -> Self {
        self.add_callback(callback);
        self
    }

    /// [`Trainer::with_callback`] on a trainer in place.
    pub fn add_callback(&mut self, callback: impl Callback<M, O, Lo> + 'static) {
        self.callbacks.push(Box::new(callback));
    }

    /// The best value so far of the monitored metric (restored on resume).
    pub fn best_metric(&self) -> Option<(&BestMetric, f32)> {
        self.best.as_ref().map(|(m, v)| (m, *v))
    }

    /// Records `value` of `metric` if it improves on the best so far of that metric (any value
    /// but NaN does when the best was of another metric, or there is none); returns whether it
    /// did. The best value is saved in checkpoints and restored on resume.
    pub fn update_best(&mut self, metric: &BestMetric, value: f32) -> bool {
        let previous = self
            .best
            .as_ref()
            .filter(|(m, _)| m == metric)
            .map(|(_, v)| *v);
        let improved = metric.mode.improves(value, previous);
        if improved {
            self.best = Some((metric.clone(), value));
        }
        improved
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The model, mutably.
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// Gives the model back.
    pub fn into_model(self) -> M {
        self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &TrainOptimizer<O> {
        &self.optimizer
    }

    /// The optimizer, mutably.
    pub fn optimizer_mut(&mut self) -> &mut TrainOptimizer<O> {
        &mut self.optimizer
    }

    /// Where training stands.
    pub fn progress(&self) -> TrainingProgress {
        self.progress
    }

    /// Sets where training stands (to resume).
    pub fn set_progress(&mut self, progress: TrainingProgress) {
        self.progress = progress;
    }

    /// Builds the model for `features` inputs per sample on first use; afterwards checks that
    /// `features` is what it was built for (building again with the same shape keeps the
    /// variables; another shape is an error naming both).
    fn ensure_built(&mut self, sample: &[usize]) -> Result<()> {
        if sample.is_empty() {
            return Err(Error::InvalidArgument {
                what: "each sample needs at least one axis: give x as [samples, features] or \
                       [samples, height, width, channels]"
                    .into(),
            });
        }
        if sample.contains(&0) {
            return Err(Error::InvalidArgument {
                what: format!("the data has 0 features per sample (samples of shape {sample:?})"),
            });
        }
        let fresh = self.model.output_shape().is_none();
        self.model.build(sample)?;
        if fresh && !self.device.is_cpu() {
            self.place_variables()?;
        }
        Ok(())
    }

    /// The shape of the built model's output per sample.
    fn output_shape(&self) -> Result<Vec<usize>> {
        self.model
            .output_shape()
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::NotBuilt {
                layer: self.model.model_name().to_string(),
            })
    }

    /// Builds the model for `x`'s samples and checks every input (as the model's first layer
    /// takes them: token ids, say) and every target against its output: the targets flat, and
    /// how many there are per sample.
    fn prepare<T: Copy>(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        y: &ArrayViewD<'_, T>,
    ) -> Result<(Vec<T>, usize)>
    where
        Lo: Loss<T>,
    {
        check_data(x, y)?;
        self.ensure_built(sample_shape(x))?;
        self.model.check_input(x)?;
        let (targets, per_sample) = targets_of(y);
        self.loss
            .check_targets(&targets, per_sample, &self.output_shape()?)?;
        Ok((targets, per_sample))
    }

    /// On a GPU under a 16-bit policy, warns once when hidden Dense widths, Conv2D filters or the
    /// batch size are not multiples of 8 (tensor cores need them).
    fn warn_tensor_core_shapes(&self, batch_size: usize) {
        if self.device.is_cpu() {
            return;
        }
        let mut rows = vec![];
        self.model.summary_rows("", &mut rows);
        let dense: Vec<(&str, usize)> = rows
            .iter()
            .filter(|r| r.type_name == "Dense" || r.type_name == "Conv2D")
            .filter_map(|r| Some((r.name.as_str(), *r.output_shape.as_ref()?.last()?)))
            .collect();
        mp_core::compat::warn_tensor_core_shapes_once(
            <M::Policy as PolicyKind>::POLICY,
            &dense,
            batch_size,
        );
    }

    /// One training step on a batch already in the model's compute dtype: forward, loss,
    /// backward (scaled when loss scaling), unscale, check and apply. Returns the batch loss and
    /// the float32 predictions.
    ///
    /// Data-parallel ([`Trainer::with_communicator`]), `x` and `labels` are this rank's shard
    /// (it may be empty), every rank calls `train_step` for every step, and the returned loss is
    /// the global batch's.
    ///
    /// # Errors
    /// In a single process, an empty batch (0 samples), before anything changes (no variable,
    /// optimizer slot, step count or loss scale); what the forward and backward passes, the loss
    /// or the optimizer return.
    pub fn train_step<T: Copy>(
        &mut self,
        x: &Tensor<Input<M>>,
        targets: &[T],
    ) -> Result<(StepResult, Tensor<F32>)>
    where
        Lo: Loss<T>,
    {
        let (result, mut probs) = self.train_window(&[(x, targets)])?;
        let probs = probs.pop().ok_or_else(|| Error::InvalidArgument {
            what: "a training step returned no predictions".into(),
        })?;
        Ok((result, probs))
    }

    /// One optimizer update from several micro-batches (gradient accumulation): forward and
    /// backward on each in turn, their gradients summed, each weighted by its share of the
    /// window's [weight](Loss::weight) (its samples; the rows its loss is over when the loss
    /// ignores some), so that the update is that of one batch made of them all. Then one
    /// unscale, one finiteness decision and one update for the window: under loss scaling
    /// every micro-batch uses the same scale, a non-finite gradient in any of them skips the
    /// whole window, and the scale changes once, after it. Layer state (moving statistics)
    /// is committed for every micro-batch, in order, only when the window is applied.
    ///
    /// Returns the window's mean loss and each micro-batch's float32 predictions.
    /// [`Trainer::train_step`] is a window of one. Data-parallel, each `(x, labels)` is this
    /// rank's shard of a micro-batch, and the windows are summed over the ranks once.
    ///
    /// # Errors
    /// An empty window, or one without samples in a single process; as [`Trainer::train_step`].
    pub fn train_window<T: Copy>(
        &mut self,
        micro: &[MicroBatch<'_, M, T>],
    ) -> Result<(StepResult, Vec<Tensor<F32>>)>
    where
        Lo: Loss<T>,
    {
        if micro.is_empty() {
            return Err(Error::InvalidArgument {
                what: "a training window needs at least one micro-batch".into(),
            });
        }
        // Alone, a step needs samples: an empty batch would still move every variable under
        // Adam (stale moments) and count a step. Refused before anything changes. (A rank's
        // shard of a data-parallel batch may be empty.)
        let samples: usize = micro
            .iter()
            .map(|(x, _)| x.shape().first().map_or(1, |&n| n))
            .sum();
        if !self.replicas.is_parallel() && samples == 0 {
            return Err(Error::InvalidArgument {
                what: if micro.len() == 1 {
                    "train_step: the batch is empty (0 samples); a training step needs at least \
                     one sample"
                        .into()
                } else {
                    format!(
                        "train_window: its {} micro-batches are all empty (0 samples); a \
                         training step needs at least one sample",
                        micro.len()
                    )
                },
            });
        }
        if let Some(schedule) = &self.schedule {
            let lr = schedule.at(self.optimizer.inner().iterations());
            self.optimizer.inner_mut().set_learning_rate(lr)?;
        }
        let scale = self.optimizer.loss_scale();
        let weight: usize = micro.iter().map(|(_, t)| self.loss.weight(t)).sum();
        let local = self.forward_backward(micro, weight, scale);
        if local.is_err() {
            // What the window's forward passes left pending is not committed later.
            let _ = self.model.end_step(false);
        }
        let (loss, probs) = if self.replicas.is_parallel() {
            // Every rank takes part in the agreement, a failed one too, so that none is left
            // waiting in the gradient sum.
            let loss_sum = local.as_ref().map_or(0.0, |(l, _)| *l);
            let sums = [samples as f64, weight as f64, loss_sum];
            let agreed = self.replicas.agree(&local, sums);
            if agreed.is_err() {
                let _ = self.model.end_step(false);
            }
            let (_, probs) = local?;
            let agreed = agreed?;
            let total = agreed.samples.max(1) as f64;
            let share = (weight as f64 / total) as f32;
            self.replicas.all_reduce_gradients(&mut self.model, share)?;
            ((agreed.loss_sum / total) as f32, probs)
        } else {
            let (loss_sum, probs) = local?;
            ((loss_sum / weight.max(1) as f64) as f32, probs)
        };
        // Every rank checks the same summed gradients, and the ranks still sum their
        // non-finite flags before deciding: one decision for all.
        // An update that would write NaN or infinity with finite gradients is skipped by the
        // optimizer itself (its own check): the replicas hold the same weights, slots and summed
        // gradients, so they decide it alike.
        let elsewhere = || Some("the gradients of another rank".to_string());
        let mut norm = None;
        let (applied, skip) = match &mut self.optimizer {
            TrainOptimizer::Plain(o) => {
                // The same finite check as loss scaling, without the scale: a non-finite
                // gradient never reaches the weights under float32 or mixed_bfloat16 either.
                let found = first_nonfinite_gradient(&mut self.model)?;
                if self.gradient_norm {
                    norm = Some(gradient_norm(&mut self.model)?);
                }
                if self.replicas.any(found.is_some())? {
                    (false, Some(Skip::Gradient(found.or_else(elsewhere))))
                } else {
                    match o.apply_gradients(&mut ModelVars(&mut self.model))? {
                        Update::Applied => (true, None),
                        Update::Skipped(u) => (false, Some(Skip::Update(u))),
                    }
                }
            }
            TrainOptimizer::Scaled(s) => {
                let mut check = s.get_unscaled_gradients(&mut ModelVars(&mut self.model))?;
                if self.replicas.any(!check.all_finite)? && check.all_finite {
                    check.all_finite = false;
                    check.first_nonfinite = elsewhere();
                }
                let nonfinite = check.first_nonfinite.clone();
                if self.gradient_norm {
                    norm = Some(gradient_norm(&mut self.model)?);
                }
                let outcome = s.apply_checked(&mut ModelVars(&mut self.model), check)?;
                let skip = match outcome.nonfinite_update {
                    Some(u) => Some(Skip::Update(u)),
                    None if !outcome.applied => Some(Skip::Gradient(nonfinite)),
                    None => None,
                };
                (outcome.applied, skip)
            }
        };
        let skipped = skip.as_ref().map(|skip| match skip {
            Skip::Gradient(Some(v)) => format!("non-finite gradient: {v}"),
            Skip::Gradient(None) => "non-finite gradient".to_string(),
            Skip::Update(u) => format!("non-finite update of {} ({})", u.variable, u.what()),
        });
        // Layer state of the step (moving statistics) is committed only when it was applied.
        self.model.end_step(applied)?;
        self.replicas.average_state(&mut self.model)?;
        self.progress.step += micro.len() as u64;
        let scaled = matches!(self.optimizer, TrainOptimizer::Scaled(_));
        let counted = match &skip {
            None => None,
            // Under loss scaling a step skipped for its gradients also lowers the scale; the
            // loss-scale optimizer's own rule (a scale stuck at its floor) decides when to stop.
            Some(Skip::Gradient(_)) if scaled => None,
            // A non-finite update leaves the scale alone: only this count stops it.
            Some(skip) => Some(skip),
        };
        if let Some(skip) = counted {
            let (run, origin) = &mut self.nonfinite_run;
            *run += 1;
            if origin.is_none() {
                *origin = Some(match skip {
                    Skip::Gradient(g) => {
                        let inputs: Vec<&Tensor<Input<M>>> =
                            micro.iter().map(|(x, _)| *x).collect();
                        nonfinite_origin(&inputs, loss, g.clone())?
                    }
                    Skip::Update(u) => format!(
                        "the update of {} (every gradient was finite, but it would make {} \
                         non-finite)",
                        u.variable,
                        u.what()
                    ),
                });
            }
            if *run >= self.max_nonfinite_steps {
                let steps = *run;
                let origin = origin.take().unwrap_or_default();
                self.nonfinite_run = (0, None);
                return Err(Error::NonFiniteSteps { steps, origin });
            }
        } else {
            self.nonfinite_run = (0, None);
        }
        Ok((
            StepResult {
                loss,
                applied,
                loss_scale: scale,
                skipped,
                gradient_norm: norm,
            },
            probs,
        ))
    }

    /// This rank's forward and backward over a window of total [weight](Loss::weight)
    /// `weight`: the sum of the micro-batches' losses times their weights, and their float32
    /// predictions; the gradients (the window's mean, times `scale`) left in the variables. An
    /// empty shard of a data-parallel step computes nothing and adds no gradient.
    fn forward_backward<T: Copy>(
        &mut self,
        micro: &[MicroBatch<'_, M, T>],
        weight: usize,
        scale: f32,
    ) -> Result<(f64, Vec<Tensor<F32>>)>
    where
        Lo: Loss<T>,
    {
        self.model.zero_grad()?;
        // Dropout masks differ between ranks and micro-batches (and are the single process's
        // own alone).
        let (rank, size) = (self.replicas.rank() as u64, self.replicas.size() as u64);
        let mut loss_sum = 0.0f64;
        let mut all_probs = Vec::with_capacity(micro.len());
        for (j, (x, targets)) in micro.iter().enumerate() {
            self.model
                .begin_step((self.progress.step + j as u64) * size + rank);
            if targets.is_empty() && (self.replicas.is_parallel() || micro.len() > 1) {
                let mut shape = self.output_shape()?;
                shape.insert(0, 0);
                all_probs.push(Tensor::<F32>::from_f32(&shape, &[])?);
                continue;
            }
            // This micro-batch's share of the window's mean; exactly `scale` for one.
            let w = self.loss.weight(targets);
            let factor = if w == weight {
                scale
            } else {
                (f64::from(scale) * w as f64 / weight.max(1) as f64) as f32
            };
            let probs = self.model.forward_train_f32(x)?;
            let loss = if w == 0 {
                0.0
            } else {
                self.loss.loss(&probs, targets)?
            };
            let fused = if self.model.ends_in_softmax() {
                self.loss.fused_softmax_gradient(&probs, targets, factor)
            } else {
                None
            };
            match fused {
                Some(dz) => self.model.backward_from_softmax_input_f32(&dz?)?,
                None => {
                    let dy = self.loss.gradient(&probs, targets, factor)?;
                    self.model.backward_f32(&dy)?;
                }
            }
            loss_sum += f64::from(loss) * w as f64;
            all_probs.push(probs);
        }
        Ok((loss_sum, all_probs))
    }

    /// Trains for `options.epochs` epochs on `x` (float32, `[samples, ...]` of any rank:
    /// `[samples, features]`, `[samples, height, width, channels]` images, `[samples, tokens]`
    /// token ids) and targets `y` (`[samples, ...]`: integer labels, one per sample or one per
    /// token, or float32 values, as the loss takes them), as Keras's `fit`: the last
    /// `validation_split` of the samples (before shuffling) is held out and evaluated after
    /// each epoch; the rest is reshuffled every epoch.
    ///
    /// Training continues from [`Trainer::progress`]: after [`Checkpointing::resume`](crate::Checkpointing::resume) it runs
    /// `options.epochs` more epochs from the restored one, with the restored shuffling state, so
    /// the result is bit-for-bit that of an uninterrupted run. The [callbacks](Callback) run
    /// when training starts, after every optimizer update ([`Callback::on_batch_end`], with the
    /// step's [`StepReport`], for callbacks that [use it](Callback::uses_batch_end)), at the end
    /// of every epoch and when training ends, in the order they were added.
    ///
    /// # Errors
    /// Data and targets that do not fit each other, the model or the loss (named, before the
    /// first step); a metric that does not apply to the loss; what a step or a callback
    /// returns.
    pub fn fit<T: Copy, Dx: Dimension, Dy: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        y: ArrayView<'_, T, Dy>,
        options: &FitOptions,
    ) -> Result<History>
    where
        Lo: Loss<T>,
    {
        self.fit_with(x.into_dyn(), y.into_dyn(), None, options)
    }

    /// [`Trainer::fit`] evaluating `validation` (`x` and targets, shaped as `fit`'s) after
    /// every epoch instead of holding out part of `x` (Keras's `validation_data`);
    /// `options.validation_split` must then be 0.
    ///
    /// # Errors
    /// As [`Trainer::fit`]; a validation split given too; validation data that does not fit
    /// the model (its sample shape or its targets).
    pub fn fit_with_validation<
        T: Copy,
        Dx: Dimension,
        Dy: Dimension,
        Dv: Dimension,
        Dw: Dimension,
    >(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        y: ArrayView<'_, T, Dy>,
        validation: (ArrayView<'_, f32, Dv>, ArrayView<'_, T, Dw>),
        options: &FitOptions,
    ) -> Result<History>
    where
        Lo: Loss<T>,
    {
        let validation = (validation.0.into_dyn(), validation.1.into_dyn());
        self.fit_with(x.into_dyn(), y.into_dyn(), Some(validation), options)
    }

    fn fit_with<T: Copy>(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayViewD<'_, T>,
        validation: Option<(ArrayViewD<'_, f32>, ArrayViewD<'_, T>)>,
        options: &FitOptions,
    ) -> Result<History>
    where
        Lo: Loss<T>,
    {
        // The callbacks get the whole trainer, so they are held apart while `fit` runs.
        let mut callbacks = std::mem::take(&mut self.callbacks);
        let history = self.fit_epochs(x, y, validation, options, &mut callbacks);
        callbacks.append(&mut self.callbacks);
        self.callbacks = callbacks;
        history
    }

    fn fit_epochs<T: Copy>(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayViewD<'_, T>,
        validation: Option<(ArrayViewD<'_, f32>, ArrayViewD<'_, T>)>,
        options: &FitOptions,
        callbacks: &mut [Box<dyn Callback<M, O, Lo>>],
    ) -> Result<History>
    where
        Lo: Loss<T>,
    {
        // Every rank checks its data and options, and the ranks agree on the outcome before
        // any of them waits on a collective: one rank's error stops them all, named.
        let plan = self.fit_plan(&x, &y, validation.as_ref(), options);
        let FitPlan {
            y,
            per,
            train,
            val,
            yv,
        } = self.replicas.agree_outcome(plan)?;
        let (xv, yv) = match &validation {
            Some((xv, _)) => (xv.view(), yv),
            None => (x.clone(), y.clone()),
        };
        if self.replicas.is_parallel() {
            let mut h = self.handshake(sample_shape(&x), per, options.batch_size)?;
            h.push("training samples", train.len());
            h.push("validation samples", val.len());
            h.push("epochs", options.epochs);
            h.push(
                "steps per epoch",
                mp_core::rng::num_batches(train.len(), options.batch_size),
            );
            h.push(
                "gradient accumulation steps",
                options.gradient_accumulation_steps,
            );
            h.push("validation split", options.validation_split);
            h.push("shuffle", options.shuffle);
            h.push("seed", options.seed);
            h.push(
                "progress",
                format!(
                    "epoch {}, step {}, shuffling state {:?}",
                    self.progress.epoch, self.progress.step, self.progress.rng_state
                ),
            );
            h.push("learning-rate schedule", format!("{:?}", self.schedule));
            h.push("max non-finite steps", self.max_nonfinite_steps);
            self.replicas.handshake(&h)?;
        }
        // Replicas start equal: rank 0's weights everywhere.
        self.replicas.broadcast_variables(&mut self.model)?;
        self.stop = false;
        let mut begun = Ok(());
        for cb in callbacks.iter_mut() {
            begun = cb.on_train_begin(self, !val.is_empty());
            if begun.is_err() {
                break;
            }
        }
        self.replicas.agree_outcome(begun)?;
        let tracked = self.gradient_norm;
        self.gradient_norm |= callbacks.iter().any(|cb| cb.wants_gradient_norm());
        let history = self.fit_loop(x, y, (xv, yv), (per, train, val), options, callbacks);
        self.gradient_norm = tracked;
        history
    }

    /// The epochs of [`Trainer::fit_epochs`], after its checks and `on_train_begin`.
    #[allow(clippy::type_complexity)]
    fn fit_loop<T: Copy>(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: Vec<T>,
        (xv, yv): (ArrayViewD<'_, f32>, Vec<T>),
        (per, train, val): (usize, std::ops::Range<usize>, std::ops::Range<usize>),
        options: &FitOptions,
        callbacks: &mut [Box<dyn Callback<M, O, Lo>>],
    ) -> Result<History>
    where
        Lo: Loss<T>,
    {
        let metrics = self.metrics.clone();
        self.warn_tensor_core_shapes(options.batch_size);
        // The per-step report, and its agreement across ranks, only for callbacks that use it.
        let per_step = callbacks.iter().any(|cb| cb.uses_batch_end());
        let mut history = History::default();
        let first_epoch = self.progress.epoch;
        if self.progress.epoch == 0 && self.progress.step == 0 {
            self.progress.rng_state = Rng::new(options.seed).state();
        }
        let steps = mp_core::rng::num_batches(train.len(), options.batch_size);
        for epoch in first_epoch..first_epoch + options.epochs {
            let started = Instant::now();
            let mut rng = Rng::from_state(self.progress.rng_state);
            let mut order: Vec<usize> = train.clone().collect();
            if options.shuffle {
                rng.shuffle(&mut order);
            }
            // Progress from rank 0 only; every rank sees the same (global) figures.
            let verbose = if self.replicas.rank() == 0 {
                options.verbose
            } else {
                Verbose::Silent
            };
            let mut reporter = Reporter::new(verbose, epoch, first_epoch + options.epochs, steps);
            let mut loss_mean = Mean::new();
            let mut scores = MetricSums::new(&metrics);
            let mut skipped = 0;
            let ranges: Vec<_> =
                mp_core::rng::batch_ranges(order.len(), options.batch_size).collect();
            let mut done = 0;
            for window in ranges.chunks(options.gradient_accumulation_steps) {
                // This rank's shard of each batch of the window, gathered and converted.
                let mut inputs = Vec::with_capacity(window.len());
                let mut targets = Vec::with_capacity(window.len());
                let mut window_samples = 0;
                for range in window {
                    let global = &order[range.clone()];
                    window_samples += global.len();
                    let idx = self.replicas.shard(global);
                    inputs.push(gather::<Input<M>>(&x, idx, self.device)?);
                    targets.push(pick(&y, per, idx));
                }
                let micro: Vec<MicroBatch<'_, M, T>> = inputs
                    .iter()
                    .zip(&targets)
                    .map(|(x, t)| (x, &t[..]))
                    .collect();
                let step_started = Instant::now();
                let (result, probs) = self.train_window(&micro)?;
                loss_mean.update_state(result.loss, window_samples as f64);
                let mut step = MetricSums::new(&metrics);
                for (p, t) in probs.iter().zip(&targets) {
                    if !t.is_empty() {
                        step.update(&self.loss, p, t)?;
                    }
                }
                let mut sums = step.flat();
                self.replicas.sum(&mut sums)?;
                scores.merge_flat(&sums);
                skipped += u64::from(!result.applied);
                done += window.len();
                reporter.step(done, loss_mean.result(), &scores.results(), started);
                if per_step {
                    let report = StepReport {
                        step: self.progress.step,
                        epoch,
                        batch: done,
                        loss: result.loss,
                        loss_scale: match &self.optimizer {
                            TrainOptimizer::Scaled(_) => Some(result.loss_scale),
                            TrainOptimizer::Plain(_) => None,
                        },
                        applied: result.applied,
                        skipped: result.skipped,
                        gradient_norm: result.gradient_norm,
                        learning_rate: self.optimizer.inner().learning_rate(),
                        micro_batches: window.len(),
                        samples: window_samples,
                        seconds: step_started.elapsed().as_secs_f64(),
                    };
                    let mut ended = Ok(());
                    for cb in callbacks.iter_mut() {
                        ended = cb.on_batch_end(self, &report);
                        if ended.is_err() {
                            break;
                        }
                    }
                    // A logger failing on rank 0 stops every rank, at the same step.
                    self.replicas.agree_outcome(ended)?;
                }
            }
            self.progress.rng_state = rng.state();
            let (val_loss, val_metrics) = if val.is_empty() {
                (None, vec![])
            } else {
                let s = self.evaluate_range(&xv, &yv, per, val.clone(), options.batch_size)?;
                (Some(s.loss), s.metrics)
            };
            let logs = EpochLogs {
                epoch,
                loss: loss_mean.result(),
                metrics: scores.results(),
                val_loss,
                val_metrics,
                loss_scale: match &self.optimizer {
                    TrainOptimizer::Scaled(s) => Some(s.loss_scale()),
                    TrainOptimizer::Plain(_) => None,
                },
                skipped_steps: skipped,
                steps,
                seconds: started.elapsed().as_secs_f64(),
            };
            reporter.finish(&logs);
            self.progress.epoch = epoch + 1;
            let mut ended = Ok(());
            for cb in callbacks.iter_mut() {
                ended = cb.on_epoch_end(self, &logs);
                if ended.is_err() {
                    break;
                }
            }
            // A callback that failed on one rank (rank 0 writing a checkpoint) stops them all.
            self.replicas.agree_outcome(ended)?;
            history.epochs.push(logs);
            if self.stop {
                break;
            }
        }
        let mut ended = Ok(());
        for cb in callbacks.iter_mut() {
            ended = cb.on_train_end(self);
            if ended.is_err() {
                break;
            }
        }
        self.replicas.agree_outcome(ended)?;
        Ok(history)
    }

    /// `fit`'s checks before training, on this rank: the options, the data and targets
    /// against the model and the loss (building the model), the validation data, and that
    /// samples are left to train on.
    fn fit_plan<T: Copy>(
        &mut self,
        x: &ArrayViewD<'_, f32>,
        y: &ArrayViewD<'_, T>,
        validation: Option<&(ArrayViewD<'_, f32>, ArrayViewD<'_, T>)>,
        options: &FitOptions,
    ) -> Result<FitPlan<T>>
    where
        Lo: Loss<T>,
    {
        options.check()?;
        if validation.is_some() && options.validation_split != 0.0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "validation data and validation_split {} both given: use one",
                    options.validation_split
                ),
            });
        }
        let (y, per) = self.prepare(x, y)?;
        let samples = y.len() / per.max(1);
        let (train, split) = mp_core::rng::validation_split(samples, options.validation_split)?;
        // What is evaluated after each epoch: the held-out tail of `x`, or the data given.
        let (yv, val) = match validation {
            Some((xv, yv)) => {
                check_data(xv, yv)?;
                if sample_shape(xv) != sample_shape(x) {
                    return Err(Error::InvalidArgument {
                        what: format!(
                            "validation samples of shape {:?}, training samples of shape {:?}",
                            sample_shape(xv),
                            sample_shape(x)
                        ),
                    });
                }
                let (yv, per_v) = self.prepare(xv, yv)?;
                if per_v != per {
                    return Err(Error::InvalidArgument {
                        what: format!(
                            "validation targets have {per_v} values per sample, training \
                             targets {per}"
                        ),
                    });
                }
                let n = yv.len() / per.max(1);
                (Some(yv), 0..n)
            }
            None => (None, split),
        };
        if train.is_empty() {
            return Err(Error::InvalidArgument {
                what: format!(
                    "no training samples left: {samples} samples with validation_split {}",
                    options.validation_split
                ),
            });
        }
        Ok(FitPlan {
            y,
            per,
            train,
            val,
            yv: yv.unwrap_or_default(),
        })
    }

    /// What every rank must share before `fit` or `evaluate` under a communicator: the
    /// policy, the model and every variable's shape, the optimizer, the loss and metrics, the
    /// sample shape and targets per sample, the batch size. Callers add their own items.
    fn handshake(
        &mut self,
        sample: &[usize],
        per: usize,
        batch_size: usize,
    ) -> Result<parallel::Handshake>
    where
        Lo: LossInfo,
    {
        let mut h = parallel::Handshake::default();
        h.push("policy", <M::Policy as PolicyKind>::POLICY);
        h.push("model", self.model.model_name());
        self.model.visit_variables("", &mut |name, v| {
            let kind = match (v.trainable(), v.frozen()) {
                (true, false) => "",
                (true, true) => " (frozen)",
                (false, false) => " (not trainable)",
                (false, true) => " (not trainable, frozen)",
            };
            h.push(
                format!("variable {name}"),
                format!("shape {:?}{kind}", v.value().shape()),
            );
            Ok(())
        })?;
        h.push("optimizer", self.optimizer.inner().name());
        h.push(
            "loss scaling",
            match &self.optimizer {
                TrainOptimizer::Scaled(s) => format!("{:?}", s.loss_scale_state()),
                TrainOptimizer::Plain(_) => "none".into(),
            },
        );
        h.push("loss", self.loss.name());
        h.push("metrics", self.metric_names().join(", "));
        h.push("sample shape", format!("{sample:?}"));
        h.push("targets per sample", per);
        h.push("global batch", batch_size);
        Ok(h)
    }

    /// The loss and metrics over the samples `range` of `x` and the flat targets `y` (`per`
    /// per sample).
    fn evaluate_range<T: Copy>(
        &self,
        x: &ArrayViewD<'_, f32>,
        y: &[T],
        per: usize,
        range: std::ops::Range<usize>,
        batch_size: usize,
    ) -> Result<Scores>
    where
        Lo: Loss<T>,
    {
        let metrics = self.metrics.clone();
        let mut loss_sum = 0.0f64;
        let mut weight = 0usize;
        let mut scores = MetricSums::new(&metrics);
        let all: Vec<usize> = range.collect();
        // Data-parallel, each rank evaluates its shard and the sums are added up.
        let idx = self.replicas.shard(&all);
        for r in mp_core::rng::batch_ranges(idx.len(), batch_size) {
            let batch = &idx[r];
            let xb = gather::<Input<M>>(x, batch, self.device)?;
            let targets = pick(y, per, batch);
            let probs = self.model.forward_f32(&xb)?;
            // Each batch weighs what its loss is a mean over, as in a training window.
            let w = self.loss.weight(&targets);
            if w > 0 {
                loss_sum += f64::from(self.loss.loss(&probs, &targets)?) * w as f64;
                weight += w;
            }
            scores.update(&self.loss, &probs, &targets)?;
        }
        let mut sums = vec![loss_sum, weight as f64];
        sums.extend(scores.flat());
        self.replicas.sum(&mut sums)?;
        let mut total = MetricSums::new(&metrics);
        total.merge_flat(&sums[2..]);
        Ok(Scores {
            loss: if sums[1] == 0.0 {
                0.0
            } else {
                (sums[0] / sums[1]) as f32
            },
            metrics: total.results(),
        })
    }

    /// The loss and metrics on `x`, `y` (shaped as `fit`'s), as Keras's `evaluate`; prints
    /// `313/313 - 1s - loss: ... - accuracy: ...` unless silent.
    ///
    /// # Errors
    /// As [`Trainer::fit`]'s checks of the data; a `batch_size` of 0.
    pub fn evaluate<T: Copy, Dx: Dimension, Dy: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        y: ArrayView<'_, T, Dy>,
        batch_size: usize,
        verbose: Verbose,
    ) -> Result<Scores>
    where
        Lo: Loss<T>,
    {
        let x = x.into_dyn();
        let checked = if batch_size == 0 {
            Err(Error::InvalidArgument {
                what: "batch_size must be at least 1".into(),
            })
        } else {
            self.prepare(&x, &y.into_dyn())
        };
        // One rank's bad data stops every rank before any collective, named.
        let (y, per) = self.replicas.agree_outcome(checked)?;
        if self.replicas.is_parallel() {
            let mut h = self.handshake(sample_shape(&x), per, batch_size)?;
            h.push("samples", y.len() / per.max(1));
            self.replicas.handshake(&h)?;
        }
        let started = Instant::now();
        let samples = y.len() / per.max(1);
        let scores = self.evaluate_range(&x, &y, per, 0..samples, batch_size)?;
        if verbose != Verbose::Silent {
            let steps = mp_core::rng::num_batches(samples, batch_size);
            println!(
                "{steps}/{steps} - {:.0}s - {}",
                started.elapsed().as_secs_f64(),
                progress::format_metrics(scores.loss, &scores.metrics, "")
            );
        }
        Ok(scores)
    }

    /// The model's float32 output for every sample of `x` (`[samples, ...output]`), as
    /// Keras's `predict`.
    pub fn predict<Dx: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        batch_size: usize,
    ) -> Result<ArrayD<f32>> {
        let x = x.into_dyn();
        let samples = x.shape().first().copied().unwrap_or(0);
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                what: "batch_size must be at least 1".into(),
            });
        }
        self.ensure_built(sample_shape(&x))?;
        self.model.check_input(&x)?;
        let mut shape = self.output_shape()?;
        shape.insert(0, samples);
        let mut rows: Vec<f32> = Vec::with_capacity(shape.iter().product());
        let idx: Vec<usize> = (0..samples).collect();
        for r in mp_core::rng::batch_ranges(idx.len(), batch_size) {
            let xb = gather::<Input<M>>(&x, &idx[r], self.device)?;
            let probs = self.model.forward_f32(&xb)?;
            rows.extend(probs.to_device(mp_core::Device::Cpu)?.to_f32_vec()?);
        }
        ArrayD::from_shape_vec(shape, rows).map_err(|e| Error::InvalidArgument {
            what: format!("predict: {e}"),
        })
    }
}

/// What `fit` checked before training: the flat targets and how many per sample, the training
/// samples, the validation samples and their targets (empty when validating on the held-out
/// tail of the training data).
struct FitPlan<T> {
    y: Vec<T>,
    per: usize,
    train: std::ops::Range<usize>,
    val: std::ops::Range<usize>,
    yv: Vec<T>,
}

/// The targets of the samples `idx`, from the flat targets `y` with `per` per sample.
fn pick<T: Copy>(y: &[T], per: usize, idx: &[usize]) -> Vec<T> {
    idx.iter()
        .flat_map(|&i| &y[i * per..(i + 1) * per])
        .copied()
        .collect()
}

/// The shape of one sample of `x` (`[samples, ...]`): every axis after the first.
fn sample_shape<'a>(x: &'a ArrayViewD<'_, f32>) -> &'a [usize] {
    x.shape().get(1..).unwrap_or(&[])
}
