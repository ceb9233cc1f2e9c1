//! `fit`, `evaluate` and `predict` end to end on small synthetic data.

use mp_core::{Float32, LossScale, MixedBFloat16, MixedFloat16, PolicyKind, Rng};
use mp_layers::{
    Dense, FitOptions, Layer, Model, Softmax, SparseCategoricalCrossentropy, Trainer, Verbose,
    model,
};
use mp_optim::{Adam, RmsProp};
use ndarray::{Array1, Array2};

#[model]
struct Classifier {
    hidden_1: Dense,
    hidden_2: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn classifier<P: PolicyKind>(units: usize, classes: usize) -> Classifier<P> {
    Classifier {
        hidden_1: Dense::new(units).relu(),
        hidden_2: Dense::new(units).relu(),
        logits: Dense::new(classes),
        probs: Softmax::new(),
    }
}

/// Two interleaved spirals: not linearly separable.
fn spirals(n_per_class: usize, seed: u64) -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let mut x = Array2::zeros((2 * n_per_class, 2));
    let mut y = Array1::zeros(2 * n_per_class);
    for i in 0..n_per_class {
        let t = 0.25 + 3.0 * std::f32::consts::PI * i as f32 / n_per_class as f32;
        for class in 0..2 {
            let r = t / (3.0 * std::f32::consts::PI);
            let angle = t + class as f32 * std::f32::consts::PI;
            let row = 2 * i + class;
            x[[row, 0]] = r * angle.cos() + 0.01 * rng.normal();
            x[[row, 1]] = r * angle.sin() + 0.01 * rng.normal();
            y[row] = class as u32;
        }
    }
    (x, y)
}

fn fit_spirals<P: PolicyKind>() -> f32 {
    let seed = mp_core::rng::test_seed("fit_spirals");
    let (x, y) = spirals(200, seed);
    let mut trainer = Trainer::compile(
        classifier::<P>(64, 2),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let options = FitOptions {
        batch_size: 32,
        epochs: 150,
        seed,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    let history = trainer.fit(x.view(), y.view(), &options).unwrap();
    let scores = trainer
        .evaluate(x.view(), y.view(), 64, Verbose::Silent)
        .unwrap();
    let last = history.epochs.last().unwrap();
    assert_eq!(history.epochs.len(), 150);
    assert!(last.loss.is_finite());
    eprintln!(
        "{:?}: train accuracy {} (last epoch {}), loss {}",
        P::POLICY,
        scores.accuracy(),
        last.get("accuracy").unwrap(),
        scores.loss
    );
    scores.accuracy()
}

#[test]
fn fit_learns_spirals_under_float32() {
    let acc = fit_spirals::<Float32>();
    assert!(acc >= 0.98, "accuracy {acc}");
}

#[test]
fn fit_learns_spirals_under_mixed_bfloat16() {
    let acc = fit_spirals::<MixedBFloat16>();
    assert!(acc >= 0.98, "accuracy {acc}");
}

#[test]
fn fit_learns_spirals_under_mixed_float16() {
    let acc = fit_spirals::<MixedFloat16>();
    assert!(acc >= 0.98, "accuracy {acc}");
}

#[test]
fn loss_scaling_follows_keras_rule() {
    let t = Trainer::compile(
        classifier::<MixedFloat16>(4, 2),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    assert_eq!(
        t.optimizer().loss_scale(),
        32768.0,
        "mixed_float16 scales by default"
    );
    let t = Trainer::compile(
        classifier::<MixedBFloat16>(4, 2),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    assert_eq!(t.optimizer().loss_scale(), 1.0, "mixed_bfloat16 does not");
    let t = Trainer::compile(
        classifier::<Float32>(4, 2),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_loss_scale(Some(LossScale::fixed(8.0).unwrap()));
    assert_eq!(t.optimizer().loss_scale(), 8.0, "unless asked");
}

#[test]
fn validation_split_history_and_predict() {
    let (x, y) = spirals(50, 7);
    let mut trainer = Trainer::compile(
        classifier::<MixedFloat16>(16, 2),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    let options = FitOptions {
        batch_size: 16,
        epochs: 3,
        validation_split: 0.2,
        verbose: Verbose::Lines,
        ..Default::default()
    };
    let h = trainer.fit(x.view(), y.view(), &options).unwrap();
    assert_eq!(h.get("val_accuracy").unwrap().len(), 3);
    assert_eq!(h.epochs[0].steps, 5, "80 training samples in batches of 16");
    assert!(h.get("loss_scale").unwrap().iter().all(|s| *s >= 1.0));
    assert!(h.get("nope").is_none());
    assert_eq!(trainer.progress().epoch, 3);
    assert_eq!(trainer.progress().step, 15);
    let p = trainer.predict(x.view(), 7).unwrap();
    assert_eq!(p.shape(), &[100, 2]);
    for row in p.rows() {
        assert!((row.sum() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn fit_is_deterministic_for_a_seed() {
    let (x, y) = spirals(40, 3);
    let run = || {
        let mut t = Trainer::compile(
            classifier::<MixedBFloat16>(8, 2),
            Adam::default(),
            SparseCategoricalCrossentropy::new(),
        );
        let o = FitOptions {
            batch_size: 8,
            epochs: 2,
            seed: 11,
            verbose: Verbose::Silent,
            ..Default::default()
        };
        t.fit(x.view(), y.view(), &o).unwrap();
        t.model_mut().get_weights().unwrap()
    };
    let (a, b) = (run(), run());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let bits = |t: &mp_core::Tensor<mp_core::F32>| {
            t.as_slice()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(ta), bits(tb), "{na} differs between two runs");
    }
}

/// No silent death: a model whose forward pass produces NaN stops with a clear error.
#[test]
fn collapse_guard_stops_a_nan_forward_pass() {
    let (mut x, y) = spirals(32, 5);
    x.fill(f32::NAN);
    let mut trainer = Trainer::compile(
        classifier::<MixedFloat16>(8, 2),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    let options = FitOptions {
        batch_size: 1,
        epochs: 2,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    let err = trainer
        .fit(x.view(), y.view(), &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("training stopped") && err.contains("forward pass"),
        "{err}"
    );
    // The weights were never touched.
    let weights = trainer.model_mut().get_weights().unwrap();
    assert!(
        weights
            .iter()
            .all(|(_, t)| t.as_slice().unwrap().iter().all(|v| v.is_finite()))
    );
}

#[test]
fn bad_data_is_an_error() {
    let (x, y) = spirals(10, 1);
    let mut t = Trainer::compile(
        classifier::<Float32>(4, 2),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    let o = FitOptions {
        verbose: Verbose::Silent,
        ..Default::default()
    };
    let short = y.slice(ndarray::s![..5]);
    assert!(
        t.fit(x.view(), short, &o)
            .unwrap_err()
            .to_string()
            .contains("one label per sample")
    );
    let bad_labels = Array1::from_elem(20, 7u32);
    assert!(
        t.fit(x.view(), bad_labels.view(), &o)
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
    let o2 = FitOptions {
        validation_split: 1.5,
        ..o.clone()
    };
    assert!(t.fit(x.view(), y.view(), &o2).is_err());
    let o3 = FitOptions { batch_size: 0, ..o };
    assert!(t.fit(x.view(), y.view(), &o3).is_err());
    let wide = Array2::<f32>::zeros((20, 3));
    let e = t
        .fit(
            wide.view(),
            y.view(),
            &FitOptions {
                verbose: Verbose::Silent,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_1"), "{e}");
    assert_eq!(t.model().output_shape(), Some(&[2usize][..]));
}

/// Callbacks run in the order they were added, see the whole trainer (a struct callback reads
/// its optimizer and can stop `fit` with an error), and stay with the trainer after an error.
#[test]
fn callbacks_run_in_order_see_the_trainer_and_can_stop_fit() {
    use std::sync::{Arc, Mutex};

    use mp_layers::{Callback, EpochLogs, TrainingProgress};
    use mp_optim::Optimizer;

    /// Records each epoch's optimizer iterations; stops training after `stop_after` epochs.
    struct StopAfter {
        seen: Arc<Mutex<Vec<String>>>,
        stop_after: usize,
    }
    impl<M: Model, O: Optimizer> Callback<M, O> for StopAfter {
        fn on_train_begin(
            &mut self,
            _: &mut Trainer<M, O>,
            has_validation: bool,
        ) -> mp_layers::Result<()> {
            self.seen
                .lock()
                .unwrap()
                .push(format!("begin {has_validation}"));
            Ok(())
        }
        fn on_epoch_end(
            &mut self,
            t: &mut Trainer<M, O>,
            logs: &EpochLogs,
        ) -> mp_layers::Result<()> {
            let iterations = t.optimizer().inner().iterations();
            self.seen
                .lock()
                .unwrap()
                .push(format!("struct {} {iterations}", logs.epoch));
            if t.progress().epoch >= self.stop_after {
                return Err(mp_layers::Error::InvalidArgument {
                    what: "stopped by a callback".into(),
                });
            }
            Ok(())
        }
    }

    let (x, y) = spirals(16, 3);
    let seen = Arc::new(Mutex::new(vec![]));
    let log = seen.clone();
    let mut t = Trainer::compile(
        classifier::<MixedBFloat16>(8, 2),
        Adam::default(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_callback(move |logs: &EpochLogs, p: &TrainingProgress| {
        log.lock()
            .unwrap()
            .push(format!("closure {} {}", logs.epoch, p.epoch));
        Ok(())
    })
    .with_callback(StopAfter {
        seen: seen.clone(),
        stop_after: 2,
    });
    let options = FitOptions {
        batch_size: 8,
        epochs: 5,
        validation_split: 0.25,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    let e = t.fit(x.view(), y.view(), &options).unwrap_err();
    assert!(e.to_string().contains("stopped by a callback"), "{e}");
    // 24 training samples in batches of 8: 3 steps an epoch.
    let expected = [
        "begin true",
        "closure 0 1",
        "struct 0 3",
        "closure 1 2",
        "struct 1 6",
    ];
    assert_eq!(*seen.lock().unwrap(), expected);
    assert_eq!(t.progress().epoch, 2, "the epoch that ended counts");

    // The callbacks are still there: the next fit runs them again (and stops at once).
    seen.lock().unwrap().clear();
    assert!(t.fit(x.view(), y.view(), &options).is_err());
    assert_eq!(
        *seen.lock().unwrap(),
        ["begin true", "closure 2 3", "struct 2 9"]
    );
}
