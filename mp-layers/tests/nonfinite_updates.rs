//! Updates that would write NaN or infinity although every gradient is finite (Adam's `v`
//! overflowing on gradients near 1e30): the optimizer skips them with everything bit-identical,
//! `fit` counts them toward its stop and names them as their own cause, and under loss scaling
//! they leave the scale alone.

use mp_core::{DynamicLossScale, F32, Float32, LossScale, Rng, Tensor};
use mp_layers::{
    Dense, Error, FitOptions, Layer, Model, Softmax, SparseCategoricalCrossentropy, Trainer,
    Verbose, model,
};
use mp_optim::{Adam, Optimizer};
use ndarray::{Array1, Array2};

#[model]
struct Net {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn trainer() -> Trainer<Net<Float32>, Adam> {
    let net = Net {
        hidden: Dense::new(4).relu(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    let mut t = Trainer::compile(net, Adam::default(), SparseCategoricalCrossentropy::new());
    t.model_mut().build(&[5]).unwrap();
    t
}

/// `rows` samples of 5 features of magnitude up to `scale`: with `scale` 1e30 every activation
/// and gradient is finite (about 1e30 to 1e31), but the gradients' squares overflow float32.
fn data(rows: usize, scale: f32, seed: u64) -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let x = Array2::from_shape_fn((rows, 5), |_| rng.uniform(-1.0, 1.0) * scale);
    let y = Array1::from_shape_fn(rows, |i| (i % 3) as u32);
    (x, y)
}

fn silent(epochs: usize) -> FitOptions {
    FitOptions {
        batch_size: 8,
        epochs,
        validation_split: 0.0,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

/// Every weight, every optimizer slot and the optimizer's step count, as bits.
fn state_bits<M: Model>(t: &mut Trainer<M, Adam>) -> (Vec<Vec<u32>>, Vec<Vec<u32>>, u64) {
    let bits = |t: &Tensor<F32>| {
        t.to_f32_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let weights = t
        .model_mut()
        .get_weights()
        .unwrap()
        .iter()
        .map(|(_, w)| bits(w))
        .collect();
    let opt = t.optimizer().inner();
    let slots = opt.state().iter().map(|(_, _, s)| bits(s)).collect();
    (weights, slots, opt.iterations())
}

const CAUSE: &str = "the update of hidden/kernel (every gradient was finite, but it would make \
                     Adam's v non-finite)";

fn expect_update_stop(err: Error, steps: u64) {
    let text = err.to_string();
    match err {
        Error::NonFiniteSteps { steps: s, origin } => {
            assert_eq!(s, steps, "{text}");
            assert_eq!(origin, CAUSE, "{text}");
        }
        other => panic!("expected NonFiniteSteps, got {other}"),
    }
    assert!(
        text.starts_with(&format!(
            "training stopped: {steps} consecutive steps were skipped as non-finite"
        )),
        "{text}"
    );
}

/// Without loss scaling: each such step is skipped (weights, slots and `iterations` unchanged)
/// and the run stops `fit` after `max_nonfinite_steps`, naming the update, not a gradient.
#[test]
fn fit_stops_after_a_run_of_non_finite_updates_naming_the_update() {
    let mut t = trainer().with_max_nonfinite_steps(4);
    // Some real steps first, so the slots hold state.
    let (x, y) = data(32, 1.0, 1);
    t.fit(x.view(), y.view(), &silent(1)).unwrap();
    let before = state_bits(&mut t);
    assert_eq!(before.2, 4);
    let (x, y) = data(64, 1e30, 2);
    let err = t.fit(x.view(), y.view(), &silent(1)).unwrap_err();
    expect_update_stop(err, 4);
    assert_eq!(
        state_bits(&mut t),
        before,
        "a skipped update wrote something"
    );
}

/// With loss scaling: the same skips leave the loss scale exactly as it was (not halved, its
/// good-step count kept), are not counted as the loss-scale optimizer's skipped steps, and stop
/// `fit` by the trainer's own count rather than by a collapsed scale.
#[test]
fn non_finite_updates_under_loss_scaling_leave_the_scale_alone_and_stop_fit() {
    let scale = LossScale::Dynamic(DynamicLossScale::new(32768.0, 1000, 2.0).unwrap());
    let mut t = trainer()
        .with_loss_scale(Some(scale))
        .with_max_nonfinite_steps(3);
    let (x, y) = data(32, 1.0, 3);
    t.fit(x.view(), y.view(), &silent(1)).unwrap();
    let scaling = |t: &Trainer<Net<Float32>, Adam>| match t.optimizer() {
        mp_layers::TrainOptimizer::Scaled(s) => s.scaling_state(),
        mp_layers::TrainOptimizer::Plain(_) => panic!("not scaled"),
    };
    let before = (state_bits(&mut t), scaling(&t));
    assert_eq!(before.1.applied, 4);
    let (x, y) = data(64, 1e30, 4);
    let err = t.fit(x.view(), y.view(), &silent(1)).unwrap_err();
    expect_update_stop(err, 3);
    assert_eq!((state_bits(&mut t), scaling(&t)), before);
}

/// The run is of consecutive skips: an applied step in between starts it again, and each step's
/// result says whether it was applied.
#[test]
fn an_applied_step_ends_a_run_of_non_finite_updates() {
    let mut t = trainer().with_max_nonfinite_steps(3);
    let batch = |scale: f32, seed: u64| {
        let (x, y) = data(8, scale, seed);
        (
            Tensor::<F32>::from_f32(&[8, 5], x.as_slice().unwrap()).unwrap(),
            y.to_vec(),
        )
    };
    let (good, good_y) = batch(1.0, 5);
    let (huge, huge_y) = batch(1e30, 6);
    for (x, y, applied) in [
        (&good, &good_y, true),
        (&huge, &huge_y, false),
        (&huge, &huge_y, false),
        (&good, &good_y, true),
        (&huge, &huge_y, false),
        (&huge, &huge_y, false),
    ] {
        let (result, _) = t.train_step(x, y).unwrap();
        assert_eq!(result.applied, applied);
    }
    expect_update_stop(t.train_step(&huge, &huge_y).unwrap_err(), 3);
    assert_eq!(t.optimizer().inner().iterations(), 2);
}
