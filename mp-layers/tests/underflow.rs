//! The guide's "Underflow and Overflow" section as a test: float16 gradients that underflow to
//! zero without loss scaling, and train with it.

use mp_core::{F16, F32, LossScale, MixedFloat16, Rng, Tensor};
use mp_layers::{
    Dense, Layer, Loss, ModelVars, SparseCategoricalAccuracy, SparseCategoricalCrossentropy,
    convert,
};
use mp_optim::{LossScaleOptimizer, Sgd};

/// A loss weight small enough that `weight * (p - onehot) / batch` is below float16's smallest
/// subnormal (2^-24 ≈ 6e-8) for every element: the gradient reaching the float16 layer rounds
/// to zero.
const LOSS_WEIGHT: f32 = 1e-6;

fn data(rng: &mut Rng, n: usize) -> (Tensor<F16>, Vec<u32>) {
    // Two Gaussian blobs, linearly separable.
    let mut x = vec![];
    let mut y = vec![];
    for i in 0..n {
        let label = (i % 2) as u32;
        let c = if label == 0 { -1.0 } else { 1.0 };
        x.push(c + 0.3 * rng.normal());
        x.push(-c + 0.3 * rng.normal());
        y.push(label);
    }
    (
        mp_kernels::ops::cast(&Tensor::<F32>::from_vec(&[n, 2], x).unwrap()).unwrap(),
        y,
    )
}

/// Trains `steps` steps; returns (accuracy after, loss after, whether every weight gradient was
/// exactly 0).
fn train(loss_scale: Option<LossScale>, steps: usize, seed: u64) -> (f32, f32, bool) {
    let mut rng = Rng::new(seed);
    let (x, y) = data(&mut rng, 64);
    let mut dense = Dense::<MixedFloat16>::new(2).with_seed(seed);
    dense.build(&[2]).unwrap();
    // Start from zero weights: chance accuracy, loss ln 2, so learning is visible.
    dense
        .visit_variables("", &mut |_, v| Ok(v.value_mut().fill(0.0)?))
        .unwrap();
    let loss = SparseCategoricalCrossentropy::from_logits();
    let mut opt = LossScaleOptimizer::with_loss_scale(
        Sgd::new(0.1 / LOSS_WEIGHT).unwrap(),
        loss_scale.clone().unwrap_or(LossScale::fixed(1.0).unwrap()),
    );
    let mut all_zero = true;
    for _ in 0..steps {
        dense
            .visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
            .unwrap();
        let logits: Tensor<F32> = convert(dense.forward_train(&x).unwrap()).unwrap();
        let dlogits = loss
            .gradient(&logits, &y, LOSS_WEIGHT * opt.loss_scale())
            .unwrap();
        // The gradient enters the float16 layer in float16: this is where it underflows.
        let d16: Tensor<F16> = convert(dlogits).unwrap();
        let _ = dense.backward(&d16, false).unwrap();
        dense
            .visit_variables("", &mut |_, v| {
                all_zero &= v.grad().as_slice()?.iter().all(|&g| g == 0.0);
                Ok(())
            })
            .unwrap();
        let _ = opt
            .get_unscaled_gradients(&mut ModelVars(&mut dense))
            .unwrap();
        let _ = opt.apply_gradients(&mut ModelVars(&mut dense)).unwrap();
    }
    let logits: Tensor<F32> = convert(dense.forward(&x).unwrap()).unwrap();
    let mut acc = SparseCategoricalAccuracy::new();
    acc.update_state(&logits, &y).unwrap();
    (acc.result(), loss.loss(&logits, &y).unwrap(), all_zero)
}

#[test]
fn float16_gradients_underflow_without_loss_scaling_and_train_with_it() {
    let seed = mp_core::rng::test_seed("float16_underflow");
    let (acc0, loss0, _) = train(None, 0, seed);
    let (acc_unscaled, loss_unscaled, zero_unscaled) = train(None, 30, seed);
    assert!(
        zero_unscaled,
        "without loss scaling every float16 gradient should underflow to 0"
    );
    assert_eq!(
        (acc_unscaled, loss_unscaled),
        (acc0, loss0),
        "nothing is learned from zero gradients"
    );
    let (acc_scaled, loss_scaled, zero_scaled) = train(Some(LossScale::dynamic()), 30, seed);
    assert!(!zero_scaled, "with loss scaling the gradients survive");
    assert!(
        loss_scaled < 0.5 * loss0,
        "with loss scaling the loss falls: {loss0} -> {loss_scaled}"
    );
    assert!(
        acc_scaled >= 0.95,
        "with loss scaling the model trains: accuracy {acc_scaled} (from {acc0})"
    );
}
