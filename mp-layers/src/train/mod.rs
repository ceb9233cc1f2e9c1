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

use std::sync::Arc;
use std::time::Instant;

use mp_core::dist::Communicator;
use mp_core::{Device, F32, LossScale, PolicyKind, Rng, Tensor};
use mp_kernels::softmax::Label;
use mp_optim::{LearningRateSchedule, LossScaleOptimizer, Optimizer};
use ndarray::{Array2, ArrayView, ArrayView1, ArrayViewD, Dimension};

pub use self::callbacks::Callback;
pub use self::early_stopping::EarlyStopping;
pub use self::logs::{
    EpochLogs, FitOptions, History, Scores, StepResult, TrainingProgress, Verbose,
};
pub use self::losses::SparseCategoricalCrossentropy;
pub use self::metrics::{Mean, SparseCategoricalAccuracy};
pub use self::monitor::{BestMetric, METRICS, Mode};
pub use self::optimizer::{ModelVars, TrainOptimizer};
pub use self::parallel::CommStats;

use self::data::{check_data, check_labels, first_nonfinite_gradient, gather, nonfinite_origin};
use self::parallel::Replicas;
use self::progress::Reporter;
use crate::error::{Error, Result};
use crate::layer::{Input, Model};

/// A compiled model: the model, its optimizer (with loss scaling under `mixed_float16`, as
/// Keras) and its loss. Keras's `model.compile(...)` followed by `fit`, `evaluate`, `predict`.
pub struct Trainer<M: Model, O: Optimizer> {
    model: M,
    optimizer: TrainOptimizer<O>,
    loss: SparseCategoricalCrossentropy,
    progress: TrainingProgress,
    callbacks: Vec<Box<dyn Callback<M, O>>>,
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
}

/// One micro-batch of a [`Trainer::train_window`]: the inputs in the model's compute dtype and
/// their labels.
pub type MicroBatch<'a, M, L> = (&'a Tensor<Input<M>>, &'a [L]);

/// Consecutive steps with non-finite gradients after which `fit` stops, without loss scaling
/// (with it, the loss-scale optimizer's floor rule decides).
pub const MAX_NONFINITE_STEPS: u64 = 20;

impl<M: Model, O: Optimizer> std::fmt::Debug for Trainer<M, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model.model_name())
            .field("optimizer", &self.optimizer.inner().name())
            .field("loss_scale", &self.optimizer.loss_scale())
            .field("progress", &self.progress)
            .finish()
    }
}

impl<M: Model, O: Optimizer> Trainer<M, O> {
    /// Compiles `model` with `optimizer` and `loss`. Under `mixed_float16` the optimizer is
    /// wrapped in a [`LossScaleOptimizer`] with a dynamic scale (Keras's rule); under `float32`
    /// and `mixed_bfloat16` it is not, unless asked with [`Trainer::with_loss_scale`].
    pub fn compile(model: M, optimizer: O, loss: SparseCategoricalCrossentropy) -> Self {
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
        }
    }

    /// Sets the learning rate before every step from `schedule`, read at the optimizer's count
    /// of applied updates: a step the loss-scale optimizer skips does not advance it, and a
    /// resumed run (the count is in the checkpoint) continues it.
    ///
    /// # Errors
    /// A schedule whose rates are not finite and non-negative, or whose warmup exceeds its
    /// total ([`mp_optim::Error::InvalidHyperparameter`]).
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

    /// How many consecutive steps with non-finite gradients stop training with
    /// [`Error::NonFiniteSteps`] without loss scaling (default [`MAX_NONFINITE_STEPS`]; at least
    /// 1). Each such step is skipped under every policy, so the weights never see a non-finite
    /// value; with loss scaling (`mixed_float16`) a skip also halves the scale, and the
    /// loss-scale optimizer's own rule (the scale stuck at its floor) stops training instead.
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
    pub fn with_callback(mut self, callback: impl Callback<M, O> + 'static) -> Self {
        self.add_callback(callback);
        self
    }

    /// [`Trainer::with_callback`] on a trainer in place.
    pub fn add_callback(&mut self, callback: impl Callback<M, O> + 'static) {
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

    /// The number of classes the built model outputs.
    fn classes(&self) -> Result<usize> {
        self.model
            .output_shape()
            .and_then(|s| s.last().copied())
            .ok_or_else(|| Error::NotBuilt {
                layer: self.model.model_name().to_string(),
            })
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
    pub fn train_step<L: Label>(
        &mut self,
        x: &Tensor<Input<M>>,
        labels: &[L],
    ) -> Result<(StepResult, Tensor<F32>)> {
        let (result, mut probs) = self.train_window(&[(x, labels)])?;
        let probs = probs.pop().ok_or_else(|| Error::InvalidArgument {
            what: "a training step returned no predictions".into(),
        })?;
        Ok((result, probs))
    }

    /// One optimizer update from several micro-batches (gradient accumulation): forward and
    /// backward on each in turn, their gradients summed, each weighted by its share of the
    /// window's samples, so that the update is that of one batch made of them all. Then one
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
    /// An empty window; as [`Trainer::train_step`].
    pub fn train_window<L: Label>(
        &mut self,
        micro: &[MicroBatch<'_, M, L>],
    ) -> Result<(StepResult, Vec<Tensor<F32>>)> {
        if micro.is_empty() {
            return Err(Error::InvalidArgument {
                what: "a training window needs at least one micro-batch".into(),
            });
        }
        if let Some(schedule) = &self.schedule {
            let lr = schedule.at(self.optimizer.inner().iterations());
            self.optimizer.inner_mut().set_learning_rate(lr)?;
        }
        let scale = self.optimizer.loss_scale();
        let samples: usize = micro.iter().map(|(_, l)| l.len()).sum();
        let local = self.forward_backward(micro, samples, scale);
        if local.is_err() {
            // What the window's forward passes left pending is not committed later.
            let _ = self.model.end_step(false);
        }
        let (loss, probs) = if self.replicas.is_parallel() {
            // Every rank takes part in the agreement, a failed one too, so that none is left
            // waiting in the gradient sum.
            let agreed = (self.replicas).agree(local.as_ref().ok().map(|(l, _)| (samples, *l)));
            let (_, probs) = local?;
            let agreed = agreed?;
            let total = agreed.samples.max(1) as f64;
            let share = (samples as f64 / total) as f32;
            self.replicas.all_reduce_gradients(&mut self.model, share)?;
            ((agreed.loss_sum / total) as f32, probs)
        } else {
            let (loss_sum, probs) = local?;
            ((loss_sum / samples.max(1) as f64) as f32, probs)
        };
        // Every rank checks the same summed gradients, and the ranks still sum their
        // non-finite flags before deciding: one decision for all.
        let elsewhere = || Some("the gradients of another rank".to_string());
        let (applied, nonfinite) = match &mut self.optimizer {
            TrainOptimizer::Plain(o) => {
                // The same finite check as loss scaling, without the scale: a non-finite
                // gradient never reaches the weights under float32 or mixed_bfloat16 either.
                let found = first_nonfinite_gradient(&mut self.model)?;
                if self.replicas.any(found.is_some())? {
                    (false, found.or_else(elsewhere))
                } else {
                    o.apply_gradients(&mut ModelVars(&mut self.model))?;
                    (true, None)
                }
            }
            TrainOptimizer::Scaled(s) => {
                let mut check = s.get_unscaled_gradients(&mut ModelVars(&mut self.model))?;
                if self.replicas.any(!check.all_finite)? && check.all_finite {
                    check.all_finite = false;
                    check.first_nonfinite = elsewhere();
                }
                let nonfinite = check.first_nonfinite.clone();
                let outcome = s.apply_checked(&mut ModelVars(&mut self.model), check)?;
                (outcome.applied, nonfinite)
            }
        };
        // Layer state of the step (moving statistics) is committed only when it was applied.
        self.model.end_step(applied)?;
        self.replicas.average_state(&mut self.model)?;
        self.progress.step += micro.len() as u64;
        let scaled = matches!(self.optimizer, TrainOptimizer::Scaled(_));
        if applied || scaled {
            // Under loss scaling a skipped step also lowers the scale; the loss-scale
            // optimizer's own rule (a scale stuck at its floor) decides when to stop.
            self.nonfinite_run = (0, None);
        } else {
            let (run, origin) = &mut self.nonfinite_run;
            *run += 1;
            if origin.is_none() {
                let inputs: Vec<&Tensor<Input<M>>> = micro.iter().map(|(x, _)| *x).collect();
                *origin = Some(nonfinite_origin(&inputs, loss, nonfinite)?);
            }
            if *run >= self.max_nonfinite_steps {
                let steps = *run;
                let origin = origin.take().unwrap_or_default();
                self.nonfinite_run = (0, None);
                return Err(Error::NonFiniteSteps { steps, origin });
            }
        }
        Ok((
            StepResult {
                loss,
                applied,
                loss_scale: scale,
            },
            probs,
        ))
    }

    /// This rank's forward and backward over a window of `samples` samples: the sum of the
    /// micro-batches' losses weighted by their sizes, and their float32 predictions; the
    /// gradients (the window's mean, times `scale`) left in the variables. An empty shard of a
    /// data-parallel step computes nothing and adds no gradient.
    fn forward_backward<L: Label>(
        &mut self,
        micro: &[MicroBatch<'_, M, L>],
        samples: usize,
        scale: f32,
    ) -> Result<(f64, Vec<Tensor<F32>>)> {
        self.model.zero_grad()?;
        // Dropout masks differ between ranks and micro-batches (and are the single process's
        // own alone).
        let (rank, size) = (self.replicas.rank() as u64, self.replicas.size() as u64);
        let mut loss_sum = 0.0f64;
        let mut all_probs = Vec::with_capacity(micro.len());
        for (j, (x, labels)) in micro.iter().enumerate() {
            self.model
                .begin_step((self.progress.step + j as u64) * size + rank);
            if labels.is_empty() && (self.replicas.is_parallel() || micro.len() > 1) {
                let classes = self.classes()?;
                all_probs.push(Tensor::<F32>::from_f32(&[0, classes], &[])?);
                continue;
            }
            // This micro-batch's share of the window's mean; exactly `scale` for one.
            let factor = if labels.len() == samples {
                scale
            } else {
                (f64::from(scale) * labels.len() as f64 / samples as f64) as f32
            };
            let probs = self.model.forward_train_f32(x)?;
            let loss = self.loss.loss(&probs, labels)?;
            if !self.loss.is_from_logits() && self.model.ends_in_softmax() {
                let dz = self.loss.softmax_input_gradient(&probs, labels, factor)?;
                self.model.backward_from_softmax_input_f32(&dz)?;
            } else {
                let dy = self.loss.gradient(&probs, labels, factor)?;
                self.model.backward_f32(&dy)?;
            }
            loss_sum += f64::from(loss) * labels.len() as f64;
            all_probs.push(probs);
        }
        Ok((loss_sum, all_probs))
    }

    /// Trains for `options.epochs` epochs on `x` (float32, `[samples, ...]` of any rank:
    /// `[samples, features]`, or `[samples, height, width, channels]` images) and integer
    /// labels `y`, as Keras's `fit`: the last `validation_split` of the samples (before
    /// shuffling) is held out and evaluated after each epoch; the rest is reshuffled every epoch.
    ///
    /// Training continues from [`Trainer::progress`]: after [`Checkpointing::resume`](crate::Checkpointing::resume) it runs
    /// `options.epochs` more epochs from the restored one, with the restored shuffling state, so
    /// the result is bit-for-bit that of an uninterrupted run. The [callbacks](Callback) run
    /// when training starts and at the end of every epoch, in the order they were added.
    pub fn fit<L: Label, Dx: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        y: ArrayView1<'_, L>,
        options: &FitOptions,
    ) -> Result<History> {
        // The callbacks get the whole trainer, so they are held apart while `fit` runs.
        let mut callbacks = std::mem::take(&mut self.callbacks);
        let history = self.fit_with(x.into_dyn(), y, None, options, &mut callbacks);
        callbacks.append(&mut self.callbacks);
        self.callbacks = callbacks;
        history
    }

    /// [`Trainer::fit`] evaluating `validation` (`x` and labels, the samples shaped as in `x`)
    /// after every epoch instead of holding out part of `x` (Keras's `validation_data`);
    /// `options.validation_split` must then be 0.
    ///
    /// # Errors
    /// As [`Trainer::fit`]; a validation split given too; validation data that does not fit
    /// the model (its sample shape or its labels).
    pub fn fit_with_validation<L: Label, Dx: Dimension, Dv: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        y: ArrayView1<'_, L>,
        validation: (ArrayView<'_, f32, Dv>, ArrayView1<'_, L>),
        options: &FitOptions,
    ) -> Result<History> {
        if options.validation_split != 0.0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "validation data and validation_split {} both given: use one",
                    options.validation_split
                ),
            });
        }
        let (xv, yv) = (validation.0.into_dyn(), validation.1);
        check_data(&xv, &yv)?;
        if sample_shape(&xv) != sample_shape(&x.view().into_dyn()) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "validation samples of shape {:?}, training samples of shape {:?}",
                    sample_shape(&xv),
                    &x.shape()[1..]
                ),
            });
        }
        let mut callbacks = std::mem::take(&mut self.callbacks);
        let history = self.fit_with(x.into_dyn(), y, Some((xv, yv)), options, &mut callbacks);
        callbacks.append(&mut self.callbacks);
        self.callbacks = callbacks;
        history
    }

    fn fit_with<L: Label>(
        &mut self,
        x: ArrayViewD<'_, f32>,
        y: ArrayView1<'_, L>,
        validation: Option<(ArrayViewD<'_, f32>, ArrayView1<'_, L>)>,
        options: &FitOptions,
        callbacks: &mut [Box<dyn Callback<M, O>>],
    ) -> Result<History> {
        check_data(&x, &y)?;
        options.check()?;
        let (train, split) = mp_core::rng::validation_split(y.len(), options.validation_split)?;
        // What is evaluated after each epoch: the held-out tail of `x`, or the data given.
        let (xv, yv, val) = match &validation {
            Some((xv, yv)) => (xv.view(), yv.view(), 0..yv.len()),
            None => (x.view(), y.view(), split),
        };
        if train.is_empty() {
            return Err(Error::InvalidArgument {
                what: format!(
                    "no training samples left: {} samples with validation_split {}",
                    y.len(),
                    options.validation_split
                ),
            });
        }
        self.ensure_built(sample_shape(&x))?;
        check_labels(&y, self.classes()?)?;
        check_labels(&yv, self.classes()?)?;
        // Replicas start equal: rank 0's weights everywhere.
        self.replicas.broadcast_variables(&mut self.model)?;
        self.stop = false;
        for cb in callbacks.iter_mut() {
            cb.on_train_begin(self, !val.is_empty())?;
        }
        self.warn_tensor_core_shapes(options.batch_size);
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
            let mut accuracy = SparseCategoricalAccuracy::new();
            let mut skipped = 0;
            let ranges: Vec<_> =
                mp_core::rng::batch_ranges(order.len(), options.batch_size).collect();
            let mut done = 0;
            for window in ranges.chunks(options.gradient_accumulation_steps) {
                // This rank's shard of each batch of the window, gathered and converted.
                let mut inputs = Vec::with_capacity(window.len());
                let mut labels = Vec::with_capacity(window.len());
                let mut window_samples = 0;
                for range in window {
                    let global = &order[range.clone()];
                    window_samples += global.len();
                    let idx = self.replicas.shard(global);
                    inputs.push(gather::<Input<M>>(&x, idx, self.device)?);
                    labels.push(idx.iter().map(|&i| y[i]).collect::<Vec<L>>());
                }
                let micro: Vec<MicroBatch<'_, M, L>> = inputs
                    .iter()
                    .zip(&labels)
                    .map(|(x, l)| (x, &l[..]))
                    .collect();
                let (result, probs) = self.train_window(&micro)?;
                loss_mean.update_state(result.loss, window_samples as f64);
                if self.replicas.is_parallel() {
                    let mut step = SparseCategoricalAccuracy::new();
                    for (p, l) in probs.iter().zip(&labels) {
                        step.update_state(p, l)?;
                    }
                    let mut sums = step.sums();
                    self.replicas.sum(&mut sums)?;
                    accuracy.merge_sums(sums);
                } else {
                    for (p, l) in probs.iter().zip(&labels) {
                        accuracy.update_state(p, l)?;
                    }
                }
                skipped += u64::from(!result.applied);
                done += window.len();
                reporter.step(done, loss_mean.result(), accuracy.result(), started);
            }
            self.progress.rng_state = rng.state();
            let (val_loss, val_accuracy) = if val.is_empty() {
                (None, None)
            } else {
                let s = self.evaluate_range(&xv, &yv, val.clone(), options.batch_size)?;
                (Some(s.loss), Some(s.accuracy))
            };
            let logs = EpochLogs {
                epoch,
                loss: loss_mean.result(),
                accuracy: accuracy.result(),
                val_loss,
                val_accuracy,
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
            self.replicas.all_succeeded(ended.is_ok(), &mut [])?;
            ended?;
            history.epochs.push(logs);
            if self.stop {
                break;
            }
        }
        for cb in callbacks.iter_mut() {
            cb.on_train_end(self)?;
        }
        Ok(history)
    }

    fn evaluate_range<L: Label>(
        &self,
        x: &ArrayViewD<'_, f32>,
        y: &ArrayView1<'_, L>,
        range: std::ops::Range<usize>,
        batch_size: usize,
    ) -> Result<Scores> {
        let mut loss_mean = Mean::new();
        let mut accuracy = SparseCategoricalAccuracy::new();
        let all: Vec<usize> = range.collect();
        // Data-parallel, each rank evaluates its shard and the sums are added up.
        let idx = self.replicas.shard(&all);
        let mut labels = vec![];
        for r in mp_core::rng::batch_ranges(idx.len(), batch_size) {
            let batch = &idx[r];
            let xb = gather::<Input<M>>(x, batch, self.device)?;
            labels.clear();
            labels.extend(batch.iter().map(|&i| y[i]));
            let probs = self.model.forward_f32(&xb)?;
            loss_mean.update_state(self.loss.loss(&probs, &labels)?, batch.len() as f64);
            accuracy.update_state(&probs, &labels)?;
        }
        if self.replicas.is_parallel() {
            let [a, b] = loss_mean.sums();
            let [c, d] = accuracy.sums();
            let mut sums = [a, b, c, d];
            self.replicas.sum(&mut sums)?;
            loss_mean = Mean::new();
            loss_mean.merge_sums([sums[0], sums[1]]);
            accuracy = SparseCategoricalAccuracy::new();
            accuracy.merge_sums([sums[2], sums[3]]);
        }
        Ok(Scores {
            loss: loss_mean.result(),
            accuracy: accuracy.result(),
        })
    }

    /// Loss and accuracy on `x`, `y`, as Keras's `evaluate`; prints
    /// `313/313 - 1s - loss: ... - accuracy: ...` unless silent.
    pub fn evaluate<L: Label, Dx: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        y: ArrayView1<'_, L>,
        batch_size: usize,
        verbose: Verbose,
    ) -> Result<Scores> {
        let x = x.into_dyn();
        check_data(&x, &y)?;
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                what: "batch_size must be at least 1".into(),
            });
        }
        self.ensure_built(sample_shape(&x))?;
        check_labels(&y, self.classes()?)?;
        let started = Instant::now();
        let scores = self.evaluate_range(&x, &y, 0..y.len(), batch_size)?;
        if verbose != Verbose::Silent {
            let steps = mp_core::rng::num_batches(y.len(), batch_size);
            println!(
                "{steps}/{steps} - {:.0}s - loss: {:.4} - accuracy: {:.4}",
                started.elapsed().as_secs_f64(),
                scores.loss,
                scores.accuracy
            );
        }
        Ok(scores)
    }

    /// The model's float32 output for every row of `x`, as Keras's `predict`.
    pub fn predict<Dx: Dimension>(
        &mut self,
        x: ArrayView<'_, f32, Dx>,
        batch_size: usize,
    ) -> Result<Array2<f32>> {
        let x = x.into_dyn();
        let samples = x.shape().first().copied().unwrap_or(0);
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                what: "batch_size must be at least 1".into(),
            });
        }
        self.ensure_built(sample_shape(&x))?;
        let classes = self.classes()?;
        let mut rows: Vec<f32> = Vec::with_capacity(samples * classes);
        let idx: Vec<usize> = (0..samples).collect();
        for r in mp_core::rng::batch_ranges(idx.len(), batch_size) {
            let xb = gather::<Input<M>>(&x, &idx[r], self.device)?;
            let probs = self.model.forward_f32(&xb)?;
            rows.extend(probs.to_device(mp_core::Device::Cpu)?.to_f32_vec()?);
        }
        Array2::from_shape_vec((samples, classes), rows).map_err(|e| Error::InvalidArgument {
            what: format!("predict: {e}"),
        })
    }
}

/// The shape of one sample of `x` (`[samples, ...]`): every axis after the first.
fn sample_shape<'a>(x: &'a ArrayViewD<'_, f32>) -> &'a [usize] {
    x.shape().get(1..).unwrap_or(&[])
}
