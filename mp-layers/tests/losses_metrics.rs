//! The trainer over every loss and a list of metrics: dense targets (categorical, binary from
//! logits, mean squared error) learned under every policy, integer labels per token with an
//! ignored class through `fit`, accumulation weighted by the rows a loss keeps, callbacks that
//! set the learning rate and read the loss-scale state, and bad targets named.

use mp_core::{F32, Float32, LossScale, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{
    BestMetric, BinaryCrossentropy, Callback, CategoricalCrossentropy, Dense, EarlyStopping,
    Embedding, EpochLogs, FitOptions, Layer, MeanSquaredError, Metric, MicroBatch, Model,
    PositionEmbedding, Softmax, SparseCategoricalCrossentropy, Trainer, Verbose, model,
};
use mp_optim::{Adam, Optimizer, Sgd};
use ndarray::{Array1, Array2};

#[model]
struct Classifier {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn classifier<P: PolicyKind>(classes: usize) -> Classifier<P> {
    Classifier {
        hidden: Dense::new(16).relu().with_seed(1),
        logits: Dense::new(classes).with_seed(2),
        probs: Softmax::new(),
    }
}

/// A network whose float32 output is its last Dense layer: logits or regression values.
#[model]
struct Regressor {
    hidden_1: Dense,
    hidden_2: Dense,
    #[dtype = "float32"]
    out: Dense,
}

fn regressor<P: PolicyKind>(outputs: usize) -> Regressor<P> {
    Regressor {
        hidden_1: Dense::new(32).relu().with_seed(1),
        hidden_2: Dense::new(32).relu().with_seed(2),
        out: Dense::new(outputs).with_seed(3),
    }
}

fn silent(epochs: usize, batch_size: usize) -> FitOptions {
    FitOptions {
        epochs,
        batch_size,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

fn inputs(rng: &mut Rng, n: usize, d: usize) -> Array2<f32> {
    Array2::from_shape_vec((n, d), rng.uniform_vec(n * d, -1.0, 1.0)).unwrap()
}

fn weights<M: Model, O: Optimizer, Lo>(t: &mut Trainer<M, O, Lo>) -> Vec<f32> {
    t.model_mut()
        .get_weights()
        .unwrap()
        .iter()
        .flat_map(|(_, w)| w.to_f32_vec().unwrap())
        .collect()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], bound: f32) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= bound * scale,
        "{what}: {worst:e} > {bound:e} x {scale:e}"
    );
}

#[test]
fn categorical_targets_one_hot_train_as_integer_labels() {
    let mut rng = Rng::new(mp_core::rng::test_seed("categorical_one_hot"));
    let (n, classes) = (240, 3);
    let x = inputs(&mut rng, n, 4);
    let labels: Array1<u32> = x
        .rows()
        .into_iter()
        .map(|r| {
            if r[0] + r[1] > 0.5 {
                2
            } else {
                u32::from(r[2] > 0.0)
            }
        })
        .collect();
    let one_hot = Array2::from_shape_fn((n, classes), |(i, c)| f32::from(labels[i] == c as u32));
    let mut sparse = Trainer::compile(
        classifier::<Float32>(classes),
        Adam::new(1e-2).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let mut dense = Trainer::compile(
        classifier::<Float32>(classes),
        Adam::new(1e-2).unwrap(),
        CategoricalCrossentropy::new(),
    );
    let a = sparse.fit(x.view(), labels.view(), &silent(3, 16)).unwrap();
    let b = dense.fit(x.view(), one_hot.view(), &silent(3, 16)).unwrap();
    let (la, lb) = (a.get("loss").unwrap(), b.get("loss").unwrap());
    assert_close("losses", &la, &lb, 1e-5);
    assert_eq!(a.get("accuracy"), b.get("accuracy"));
    assert_close("weights", &weights(&mut sparse), &weights(&mut dense), 1e-5);
    // From logits, on a model without the softmax, the same loss values.
    let mut logits = Trainer::compile(
        regressor::<Float32>(classes),
        Adam::new(1e-2).unwrap(),
        CategoricalCrossentropy::from_logits(),
    );
    let h = logits
        .fit(x.view(), one_hot.view(), &silent(20, 16))
        .unwrap();
    let acc = h.get("accuracy").unwrap();
    assert!(acc[acc.len() - 1] > 0.9, "categorical from logits: {acc:?}");
}

/// Three independent yes/no outputs, one of them not linearly separable.
fn multilabel(rng: &mut Rng, n: usize) -> (Array2<f32>, Array2<f32>) {
    let x = inputs(rng, n, 5);
    let t = Array2::from_shape_fn((n, 3), |(i, j)| {
        let r = x.row(i);
        f32::from(match j {
            0 => r[0] > 0.0,
            1 => r[1] + r[2] > 0.0,
            _ => r[3] * r[4] > 0.0,
        })
    });
    (x, t)
}

fn binary_learns<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed("binary_learns"));
    let (x, t) = multilabel(&mut rng, 1200);
    let mut trainer = Trainer::compile(
        regressor::<P>(3),
        Adam::new(1e-2).unwrap(),
        BinaryCrossentropy::from_logits(),
    );
    let history = trainer.fit(x.view(), t.view(), &silent(30, 32)).unwrap();
    let (xt, tt) = multilabel(&mut rng, 400);
    let scores = trainer
        .evaluate(xt.view(), tt.view(), 64, Verbose::Silent)
        .unwrap();
    assert!(
        scores.accuracy() > 0.93,
        "{}: held-out binary accuracy {} (history {:?})",
        P::POLICY,
        scores.accuracy(),
        history.get("accuracy")
    );
    assert_eq!(history.epochs[0].metrics[0].0, "accuracy");
}

#[test]
fn binary_crossentropy_from_logits_learns_multilabel_under_every_policy() {
    binary_learns::<Float32>();
    binary_learns::<MixedBFloat16>();
    binary_learns::<MixedFloat16>();
}

fn regression_learns<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed("regression_learns"));
    let target = |x: &Array2<f32>| {
        Array2::from_shape_fn((x.nrows(), 2), |(i, j)| match j {
            0 => (2.0 * x[[i, 0]]).sin() + 0.5 * x[[i, 1]],
            _ => x[[i, 0]] * x[[i, 1]],
        })
    };
    let x = inputs(&mut rng, 1000, 2);
    let y = target(&x);
    let mut trainer = Trainer::compile(
        regressor::<P>(2),
        Adam::new(1e-2).unwrap(),
        MeanSquaredError::new(),
    )
    .with_metrics(&[Metric::MeanAbsoluteError, Metric::MeanSquaredError])
    .unwrap();
    let history = trainer.fit(x.view(), y.view(), &silent(40, 32)).unwrap();
    let last = history.epochs.last().unwrap();
    // The mean_squared_error metric is the loss, accumulated the same way.
    let mse = last.get("mean_squared_error").unwrap();
    assert!(
        (mse - last.loss).abs() <= 1e-3 * last.loss.max(1e-3),
        "{last:?}"
    );
    assert!(last.get("accuracy").is_none(), "{last:?}");
    let xt = inputs(&mut rng, 300, 2);
    let scores = trainer
        .evaluate(xt.view(), target(&xt).view(), 64, Verbose::Silent)
        .unwrap();
    let variance = 0.25; // of the targets, roughly: the loss must fall far below it
    assert!(
        scores.loss < 0.02 * variance * 4.0 && scores.get("mean_absolute_error").unwrap() < 0.1,
        "{}: held-out {scores:?}",
        P::POLICY
    );
    assert!(scores.accuracy().is_nan());
}

#[test]
fn mean_squared_error_fits_a_regression_under_every_policy() {
    regression_learns::<Float32>();
    regression_learns::<MixedBFloat16>();
    regression_learns::<MixedFloat16>();
}

#[model]
struct Tagger {
    embed: Embedding,
    positions: PositionEmbedding,
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

/// Integer labels per token through `fit`: tag each odd position with the previous token
/// (what the positions and the embedding must carry), the even positions ignored.
fn tagging<P: PolicyKind>() {
    let (n, seq, vocab) = (800usize, 6usize, 5usize);
    let mut rng = Rng::new(mp_core::rng::test_seed("tagging"));
    let ids: Vec<f32> = (0..n * seq)
        .map(|_| rng.below(vocab as u64) as f32)
        .collect();
    let x = Array2::from_shape_vec((n, seq), ids).unwrap();
    let y = Array2::from_shape_fn(
        (n, seq),
        |(i, t)| {
            if t % 2 == 1 { x[[i, t]] as i64 } else { -1 }
        },
    );
    let model = Tagger::<P>::new(
        Embedding::new(vocab, 16).with_seed(1),
        PositionEmbedding::new(seq).with_seed(2),
        Dense::new(32).relu().with_seed(3),
        Dense::new(vocab).with_seed(4),
        Softmax::new(),
    );
    let mut trainer = Trainer::compile(
        model,
        Adam::new(1e-2).unwrap(),
        SparseCategoricalCrossentropy::new().ignore_class(-1),
    );
    let mut options = silent(6, 32);
    options.validation_split = 0.2;
    let history = trainer.fit(x.view(), y.view(), &options).unwrap();
    // Accuracy over the scored tokens only: counting the ignored half would cap it at 0.5.
    let acc = history.get("val_accuracy").unwrap();
    assert!(acc[acc.len() - 1] > 0.97, "{}: {acc:?}", P::POLICY);
    let probs = trainer.predict(x.view(), 64).unwrap();
    assert_eq!(probs.shape(), &[n, seq, vocab]);

    // A label out of range is named with its sample and position; -1 without ignore_class is
    // out of range; one label per sample for a model that tags every token is a shape error.
    let mut bad = y.clone();
    bad[[7, 3]] = vocab as i64;
    let err = trainer
        .fit(x.view(), bad.view(), &silent(1, 32))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label 5 in row 7") && err.contains("position 3"),
        "{err}"
    );
    let mut plain = Trainer::compile(
        Tagger::<P>::new(
            Embedding::new(vocab, 16),
            PositionEmbedding::new(seq),
            Dense::new(32),
            Dense::new(vocab),
            Softmax::new(),
        ),
        Adam::new(1e-2).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let err = plain
        .fit(x.view(), y.view(), &silent(1, 32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("label -1 in row 0"), "{err}");
    let per_sample = Array1::<i64>::zeros(n);
    let err = plain
        .fit(x.view(), per_sample.view(), &silent(1, 32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("6 label(s) per sample"), "{err}");
}

#[test]
fn fit_takes_a_label_per_token_and_ignores_a_class_under_every_policy() {
    tagging::<Float32>();
    tagging::<MixedBFloat16>();
    tagging::<MixedFloat16>();
}

#[test]
fn accumulation_weights_micro_batches_by_the_rows_their_loss_keeps() {
    let mut rng = Rng::new(mp_core::rng::test_seed("accumulation_ignored_rows"));
    let compile = || {
        let mut t = Trainer::compile(
            classifier::<Float32>(3),
            Sgd::new(0.5).unwrap(),
            SparseCategoricalCrossentropy::new().ignore_class(-1),
        );
        t.model_mut().build(&[4]).unwrap();
        t
    };
    let x: Vec<f32> = rng.uniform_vec(16 * 4, -1.0, 1.0);
    // The first micro-batch keeps 2 of its 8 labels, the second all 8.
    let labels: Vec<i64> = (0..16)
        .map(|i| if i < 6 { -1 } else { rng.below(3) as i64 })
        .collect();
    let a = Tensor::<F32>::from_vec(&[8, 4], x[..32].to_vec()).unwrap();
    let b = Tensor::<F32>::from_vec(&[8, 4], x[32..].to_vec()).unwrap();
    let all = Tensor::<F32>::from_vec(&[16, 4], x.clone()).unwrap();

    let mut window = compile();
    let micro: [MicroBatch<'_, Classifier<Float32>, i64>; 2] =
        [(&a, &labels[..8]), (&b, &labels[8..])];
    let (w, _) = window.train_window(&micro).unwrap();
    let mut single = compile();
    let (s, _) = single.train_step(&all, &labels).unwrap();
    assert!((w.loss - s.loss).abs() <= 1e-6 * s.loss, "{w:?} {s:?}");
    assert_close(
        "weights",
        &weights(&mut window),
        &weights(&mut single),
        1e-6,
    );
}

/// What the callback saw at the end of an epoch: the learning rate, the loss-scale state, the
/// loss scale in the logs.
type Seen = (f32, Option<LossScale>, Option<f32>);

/// Records what a callback can see and halves the learning rate after every epoch.
struct Steer {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl<M: Model, O: Optimizer, Lo> Callback<M, O, Lo> for Steer {
    fn on_epoch_end(
        &mut self,
        t: &mut Trainer<M, O, Lo>,
        logs: &EpochLogs,
    ) -> mp_layers::Result<()> {
        let lr = t.optimizer().inner().learning_rate();
        let state = t.optimizer().loss_scale_state().cloned();
        self.seen.lock().unwrap().push((lr, state, logs.loss_scale));
        t.optimizer_mut().inner_mut().set_learning_rate(lr / 2.0)?;
        Ok(())
    }
}

fn steer<P: PolicyKind>() -> Vec<Seen> {
    let mut rng = Rng::new(3);
    let x = inputs(&mut rng, 128, 4);
    let y: Array1<u8> = x.rows().into_iter().map(|r| u8::from(r[0] > 0.0)).collect();
    let seen = std::sync::Arc::default();
    let mut trainer = Trainer::compile(
        classifier::<P>(2),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_callback(Steer {
        seen: std::sync::Arc::clone(&seen),
    });
    trainer.fit(x.view(), y.view(), &silent(3, 32)).unwrap();
    assert_eq!(trainer.optimizer().inner().learning_rate(), 0.01 / 8.0);
    seen.lock().unwrap().clone()
}

#[test]
fn a_callback_sets_the_learning_rate_and_reads_the_loss_scale_state() {
    // Each epoch ran at the rate the callback set after the one before.
    let f32_seen = steer::<Float32>();
    let lrs: Vec<f32> = f32_seen.iter().map(|s| s.0).collect();
    assert_eq!(lrs, [0.01, 0.005, 0.0025]);
    assert!(f32_seen.iter().all(|s| s.1.is_none() && s.2.is_none()));
    // Under mixed_float16 the callback sees the dynamic scale the logs report.
    for (lr, state, logged) in steer::<MixedFloat16>() {
        let state = state.expect("mixed_float16 scales the loss");
        assert!(state.is_dynamic(), "{state:?}");
        assert_eq!(Some(state.scale()), logged, "at lr {lr}");
    }
}

#[test]
fn metrics_are_listed_checked_and_monitored_by_name() {
    let mut rng = Rng::new(5);
    let x = inputs(&mut rng, 64, 4);
    let y: Array1<u8> = x.rows().into_iter().map(|r| u8::from(r[1] > 0.0)).collect();
    let mut trainer = Trainer::compile(
        classifier::<Float32>(2),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_metrics(&[Metric::Accuracy, Metric::SparseCategoricalAccuracy])
    .unwrap();
    let h = trainer.fit(x.view(), y.view(), &silent(2, 16)).unwrap();
    assert_eq!(h.get("accuracy"), h.get("sparse_categorical_accuracy"));
    assert_eq!(
        trainer.metric_names(),
        ["accuracy", "sparse_categorical_accuracy"]
    );

    let err = Trainer::compile(
        regressor::<Float32>(2),
        Adam::new(0.01).unwrap(),
        MeanSquaredError::new(),
    )
    .with_metrics(&[Metric::Accuracy])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"accuracy\"") && err.contains("mean_squared_error"),
        "{err}"
    );
    let err = Metric::from_name("accuracyy").unwrap_err().to_string();
    assert!(err.contains("binary_accuracy"), "{err}");
    assert_eq!(Metric::from_name("mae").unwrap(), Metric::MeanAbsoluteError);

    // A monitor must name a metric the run logs.
    let mut trainer = trainer.with_callback(EarlyStopping::new(BestMetric::min(
        "val_mean_absolute_error",
    )));
    let mut options = silent(1, 16);
    options.validation_split = 0.25;
    let err = trainer
        .fit(x.view(), y.view(), &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("val_mean_absolute_error") && err.contains("val_sparse_categorical_accuracy"),
        "{err}"
    );
}

#[test]
fn bad_dense_targets_are_named_before_the_first_step() {
    let mut rng = Rng::new(9);
    let x = inputs(&mut rng, 32, 5);
    let fresh = || {
        Trainer::compile(
            regressor::<Float32>(3),
            Adam::new(0.01).unwrap(),
            BinaryCrossentropy::from_logits(),
        )
    };
    let mut t = fresh();
    let before = weights(&mut {
        let mut t = fresh();
        t.model_mut().build(&[5]).unwrap();
        t
    });
    let wrong = Array2::<f32>::zeros((32, 2));
    let err = t
        .fit(x.view(), wrong.view(), &silent(1, 8))
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 target value(s) per sample"), "{err}");
    let mut outside = Array2::<f32>::zeros((32, 3));
    outside[[4, 1]] = 2.0;
    let err = t
        .fit(x.view(), outside.view(), &silent(1, 8))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target 2 at position 1 of row 4") && err.contains("[0, 1]"),
        "{err}"
    );
    let mut nan = Array2::<f32>::zeros((32, 3));
    nan[[9, 0]] = f32::NAN;
    let err = t
        .fit(x.view(), nan.view(), &silent(1, 8))
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 9") && err.contains("not finite"), "{err}");
    let short = Array2::<f32>::zeros((31, 3));
    let err = t
        .fit(x.view(), short.view(), &silent(1, 8))
        .unwrap_err()
        .to_string();
    assert!(err.contains("32 samples"), "{err}");
    // Nothing was trained by the refused calls.
    assert_eq!(weights(&mut t), before);
}
