//! Training controls: `EarlyStopping` (Keras's rule: patience, min_delta, restore_best_weights)
//! against logs given by hand and stopping `fit` on real training; learning-rate schedules
//! advanced by applied steps only.

use mp_core::{Float32, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{
    BestMetric, Callback, Dense, EarlyStopping, EpochLogs, FitOptions, Layer, Model, Softmax,
    SparseCategoricalCrossentropy, Trainer, Verbose, model,
};
use mp_optim::{Adam, LearningRateSchedule, Optimizer};
use ndarray::{Array1, Array2};

#[model]
struct Net {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn trainer() -> Trainer<Net<Float32>, Adam> {
    trainer_in::<Float32>()
}

fn trainer_in<P: PolicyKind>() -> Trainer<Net<P>, Adam> {
    let mut t = Trainer::compile(
        Net {
            hidden: Dense::new(16).relu(),
            logits: Dense::new(3),
            probs: Softmax::new(),
        },
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[4]).unwrap();
    t
}

fn logs(epoch: usize, val_loss: f32) -> EpochLogs {
    EpochLogs {
        epoch,
        loss: 1.0,
        metrics: vec![("accuracy", 0.5)],
        val_loss: Some(val_loss),
        val_metrics: vec![("accuracy", 0.5)],
        loss_scale: None,
        skipped_steps: 0,
        steps: 1,
        seconds: 0.0,
    }
}

/// Every weight, flattened.
fn weights(t: &mut Trainer<Net<Float32>, Adam>) -> Vec<f32> {
    let mut v = vec![];
    for (_, w) in t.model_mut().get_weights().unwrap() {
        v.extend(w.to_f32_vec().unwrap());
    }
    v
}

/// Sets every weight to `value`.
fn fill(t: &mut Trainer<Net<Float32>, Adam>, value: f32) {
    let w: Vec<_> = t
        .model_mut()
        .get_weights()
        .unwrap()
        .into_iter()
        .map(|(n, w)| {
            let len = w.len();
            (
                n,
                mp_core::Tensor::from_f32(w.shape(), &vec![value; len]).unwrap(),
            )
        })
        .collect();
    t.model_mut().set_weights(&w).unwrap();
}

#[test]
fn stops_after_patience_epochs_without_improvement_and_restores_the_best_weights() {
    let mut t = trainer();
    let mut cb = EarlyStopping::new(BestMetric::min("val_loss"))
        .patience(2)
        .min_delta(0.01)
        .restore_best_weights(true);
    cb.on_train_begin(&mut t, true).unwrap();
    // val_loss: 1.0, 0.9 (best, weights 2.0), 0.895 (within min_delta: no improvement), 0.97.
    for (epoch, (val, w)) in [(1.0, 1.0), (0.9, 2.0), (0.895, 3.0), (0.97, 4.0)]
        .into_iter()
        .enumerate()
    {
        fill(&mut t, w);
        cb.on_epoch_end(&mut t, &logs(epoch, val)).unwrap();
        assert_eq!(t.stop_requested(), epoch == 3, "after epoch {epoch}");
    }
    assert_eq!(cb.stopped_epoch(), Some(3));
    assert_eq!(cb.best(), Some((1, 0.9)));
    Callback::<Net<Float32>, Adam>::on_train_end(&mut cb, &mut t).unwrap();
    assert!(
        weights(&mut t).iter().all(|&w| w == 2.0),
        "the best epoch's weights"
    );
}

#[test]
fn nan_never_improves_and_accuracy_must_rise() {
    let mut t = trainer();
    let mut cb = EarlyStopping::new(BestMetric::min("val_loss"));
    cb.on_train_begin(&mut t, true).unwrap();
    cb.on_epoch_end(&mut t, &logs(0, f32::NAN)).unwrap();
    assert!(!t.stop_requested(), "never after the first epoch");
    cb.on_epoch_end(&mut t, &logs(1, f32::NAN)).unwrap();
    assert!(t.stop_requested());

    let mut t = trainer();
    let mut cb = EarlyStopping::new(BestMetric::max("val_accuracy")).patience(1);
    cb.on_train_begin(&mut t, true).unwrap();
    for (epoch, acc) in [0.5, 0.6, 0.6].into_iter().enumerate() {
        let mut l = logs(epoch, 1.0);
        l.val_metrics = vec![("accuracy", acc)];
        cb.on_epoch_end(&mut t, &l).unwrap();
    }
    assert!(t.stop_requested(), "an equal accuracy is no improvement");
    assert_eq!(cb.best(), Some((1, 0.6)));
}

#[test]
fn an_unknown_metric_or_a_validation_metric_without_validation_is_refused() {
    let mut t = trainer();
    let e = EarlyStopping::new(BestMetric::min("val_loss"))
        .on_train_begin(&mut t, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("early stopping") && e.contains("validation"),
        "{e}"
    );
    let e = EarlyStopping::new(BestMetric::min("lr"))
        .on_train_begin(&mut t, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown early stopping metric \"lr\""), "{e}");
}

/// Three Gaussian blobs in 4 dimensions.
fn blobs(n: usize, seed: u64) -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let mut x = Array2::zeros((n, 4));
    let mut y = Array1::zeros(n);
    for i in 0..n {
        let c = rng.below(3) as usize;
        y[i] = c as u32;
        for j in 0..4 {
            x[[i, j]] = if j == c { 2.0 } else { 0.0 } + 0.5 * rng.normal();
        }
    }
    (x, y)
}

#[test]
fn fit_stops_early_and_ends_with_the_best_weights() {
    let (x, y) = blobs(600, 3);
    let mut t = trainer().with_callback(
        // No improvement can be this large: fit stops after its second epoch.
        EarlyStopping::new(BestMetric::min("loss")).min_delta(100.0),
    );
    let options = FitOptions {
        batch_size: 50,
        epochs: 40,
        validation_split: 0.2,
        shuffle: true,
        seed: 1,
        verbose: Verbose::Silent,
        gradient_accumulation_steps: 1,
    };
    let history = t.fit(x.view(), y.view(), &options).unwrap();
    assert_eq!(history.epochs.len(), 2, "stopped after the second epoch");
    assert_eq!(t.progress().epoch, 2);

    // Patience 3 on val_loss, restoring: the run ends with the weights of the best epoch.
    let mut t = trainer().with_callback(
        EarlyStopping::new(BestMetric::min("val_loss"))
            .patience(3)
            .restore_best_weights(true),
    );
    let history = t.fit(x.view(), y.view(), &options).unwrap();
    let val: Vec<f32> = history.epochs.iter().map(|e| e.val_loss.unwrap()).collect();
    let best = val.iter().copied().fold(f32::INFINITY, f32::min);
    let scores = t
        .evaluate(
            x.slice(ndarray::s![480.., ..]),
            y.slice(ndarray::s![480..]),
            50,
            Verbose::Silent,
        )
        .unwrap();
    assert!(
        (scores.loss - best).abs() <= 1e-6 * best.max(1.0),
        "evaluate after fit gives the best val_loss {best}, got {} (history {val:?})",
        scores.loss
    );
}

#[test]
fn a_schedule_advances_with_applied_steps_only() {
    let schedule = LearningRateSchedule::warmup_linear(1e-2, 4, 10).unwrap();
    let mut t = trainer_in::<MixedFloat16>()
        .with_learning_rate_schedule(schedule)
        .unwrap();
    let (x, y) = blobs(8, 5);
    let labels: Vec<u32> = y.to_vec();
    let good = Tensor::<mp_core::F16>::from_f32(&[8, 4], x.as_slice().unwrap()).unwrap();
    let mut poisoned = x.clone();
    poisoned[[3, 1]] = f32::NAN;
    let bad = Tensor::<mp_core::F16>::from_f32(&[8, 4], poisoned.as_slice().unwrap()).unwrap();
    let mut seen = vec![];
    for batch in [&good, &good, &bad, &good, &bad, &good] {
        let (result, _) = t.train_step(batch, &labels).unwrap();
        seen.push((result.applied, t.optimizer().inner().learning_rate()));
    }
    // The rate of each step is the schedule at the updates applied before it: a skipped step
    // neither counts nor moves the next step's rate.
    let expected = [
        (true, schedule.at(0)),
        (true, schedule.at(1)),
        (false, schedule.at(2)),
        (true, schedule.at(2)),
        (false, schedule.at(3)),
        (true, schedule.at(3)),
    ];
    assert_eq!(seen, expected);
    assert_eq!(t.optimizer().inner().iterations(), 4);
    let e = trainer()
        .with_learning_rate_schedule(LearningRateSchedule::Constant(f32::INFINITY))
        .unwrap_err()
        .to_string();
    assert!(e.contains("learning rate must be finite"), "{e}");
}

#[test]
fn validation_data_is_evaluated_after_every_epoch_instead_of_a_split() {
    let (x, y) = blobs(400, 11);
    let (xv, yv) = blobs(120, 12);
    let mut t = trainer();
    let options = FitOptions {
        batch_size: 40,
        epochs: 3,
        validation_split: 0.0,
        shuffle: true,
        seed: 2,
        verbose: Verbose::Silent,
        gradient_accumulation_steps: 1,
    };
    let history = t
        .fit_with_validation(x.view(), y.view(), (xv.view(), yv.view()), &options)
        .unwrap();
    assert_eq!(history.epochs.len(), 3);
    // Every sample of x trained (no split): 10 steps of 40.
    assert!(history.epochs.iter().all(|e| e.steps == 10));
    let last = history.epochs.last().unwrap();
    let scores = t
        .evaluate(xv.view(), yv.view(), 40, Verbose::Silent)
        .unwrap();
    assert_eq!(last.val_loss, Some(scores.loss));
    assert_eq!(last.get("val_accuracy"), Some(scores.accuracy()));

    let split = FitOptions {
        validation_split: 0.2,
        ..options.clone()
    };
    let e = t
        .fit_with_validation(x.view(), y.view(), (xv.view(), yv.view()), &split)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("validation data and validation_split 0.2 both given"),
        "{e}"
    );
    let narrow = xv.slice(ndarray::s![.., ..3]);
    let e = t
        .fit_with_validation(x.view(), y.view(), (narrow, yv.view()), &options)
        .unwrap_err()
        .to_string();
    assert!(e.contains("validation samples of shape [3]"), "{e}");
    let bad_labels = Array1::from_elem(120, 7u32);
    let e = t
        .fit_with_validation(x.view(), y.view(), (xv.view(), bad_labels.view()), &options)
        .unwrap_err()
        .to_string();
    assert!(e.contains('7'), "{e}");
}
