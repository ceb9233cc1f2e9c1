//! The Keras mixed precision guide, second half: a custom training loop with a
//! `LossScaleOptimizer`, written out step by step.
//!
//! ```sh
//! cargo run --release -p examples --bin mnist_custom_loop -- [--policy mixed_float16]
//!     [--units 4096] [--batch-size 8192] [--epochs 5] [--seed 0]
//! ```
//!
//! Each step: forward, loss, `get_scaled_loss` (here: the loss gradient that starts backward is
//! multiplied by the scale), backward, `get_unscaled_gradients`, `apply_gradients`.

use examples::{Args, Digits};
use mp_core::{F32, Policy, PolicyKind, PolicyVisitor, Tensor};
use mp_data::Dataset;
use mp_layers::{
    Compute, Layer, Loss, Mean, Model, ModelVars, SparseCategoricalAccuracy,
    SparseCategoricalCrossentropy, convert,
};
use mp_optim::{LossScaleOptimizer, RmsProp};
use ndarray::{ArrayView1, ArrayView2};

const OPTIONS: &[&str] = &["policy", "units", "batch-size", "epochs", "seed"];

struct Run {
    units: usize,
    batch_size: usize,
    epochs: usize,
    seed: u64,
}

/// A host batch as the model's input: float32, converted to the compute dtype.
fn to_input<P: PolicyKind>(x: ArrayView2<'_, f32>) -> anyhow::Result<Tensor<Compute<Digits<P>>>> {
    let x = Tensor::<F32>::from_ndarray(&x)?;
    Ok(convert(x)?)
}

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
        let train =
            Dataset::from_views(mp_data::mnist::to_features(&x_train).view(), y_train.view())?;
        let test = Dataset::from_views(mp_data::mnist::to_features(&x_test).view(), y_test.view())?;

        let mut model = Digits::<P>::guide(self.units);
        model.build(&[784])?;
        let initial_weights = model.get_weights()?;
        let loss_object = SparseCategoricalCrossentropy::new();
        let mut optimizer = LossScaleOptimizer::new(RmsProp::default());

        // The guide retrains from the initial weights.
        model.set_weights(&initial_weights)?;

        for epoch in 0..self.epochs {
            let mut epoch_loss_avg = Mean::new();
            let mut test_accuracy = SparseCategoricalAccuracy::new();
            let mut skipped = 0;
            for (x, y) in
                train.shuffled_batches(self.batch_size, self.seed.wrapping_add(epoch as u64))
            {
                let (loss, applied) =
                    train_step(&mut model, &mut optimizer, &loss_object, x.view(), y.view())?;
                epoch_loss_avg.update_state(loss, 1.0);
                skipped += usize::from(!applied);
            }
            for (x, y) in test.batches(self.batch_size) {
                let predictions = model.forward_f32(&to_input::<P>(x)?)?;
                test_accuracy
                    .update_state(&predictions, y.as_slice().expect("contiguous labels"))?;
            }
            println!(
                "Epoch {epoch}: loss={}, test accuracy={} (loss scale {}, {skipped} skipped steps)",
                epoch_loss_avg.result(),
                test_accuracy.result(),
                optimizer.loss_scale()
            );
        }
        Ok(())
    }
}

/// One step of the guide's `train_step`; returns the (unscaled) loss and whether it was applied.
fn train_step<P: PolicyKind>(
    model: &mut Digits<P>,
    optimizer: &mut LossScaleOptimizer<RmsProp>,
    loss_object: &SparseCategoricalCrossentropy,
    x: ArrayView2<'_, f32>,
    y: ArrayView1<'_, u32>,
) -> anyhow::Result<(f32, bool)> {
    let y = y.as_slice().expect("contiguous labels");
    model.zero_grad()?;
    let predictions = model.forward_train_f32(&to_input::<P>(x)?)?;
    let loss = loss_object.loss(&predictions, y)?;
    // get_scaled_loss: d(scaled_loss)/d(logits) = scale * (p - onehot) / batch, the fused
    // gradient of the float32 softmax and the cross-entropy.
    let _scaled_loss = optimizer.get_scaled_loss(loss);
    let scaled_grad =
        loss_object.softmax_input_gradient(&predictions, y, optimizer.loss_scale())?;
    model.backward_from_softmax_input_f32(&scaled_grad)?;
    let _ = optimizer.get_unscaled_gradients(&mut ModelVars(model))?;
    let outcome = optimizer.apply_gradients(&mut ModelVars(model))?;
    // Layers with state of their own (BatchNormalization) commit it only for an applied step.
    model.end_step(outcome.applied)?;
    Ok((loss, outcome.applied))
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(&[])?;
    args.check_known(OPTIONS)?;
    mp_core::dist::single_process(
        "mnist_custom_loop (the guide's custom training loop, with no gradient all-reduce)",
        "run mnist_fit, which trains the same model data-parallel under mpirun",
    )?;
    let policy: Policy = args.raw("policy").unwrap_or("mixed_float16").parse()?;
    println!("Policy: {policy:#}");
    println!("{}", mp_kernels::calibrate::check(policy)?);
    let batch_size: usize = args.get("batch-size", 8192)?;
    if batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    policy.dispatch(Run {
        units: args.get("units", 4096)?,
        batch_size,
        epochs: args.get("epochs", 5)?,
        seed: args.get("seed", 0)?,
    })
}
