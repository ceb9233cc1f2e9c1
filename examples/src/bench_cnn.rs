//! `bench cnn`: the `mnist_cnn` network's training step per policy, and one convolution alone.
//!
//! - The step of [`MnistCnn`] (Adam) on random `28x28x1` images at one batch size (default 256)
//!   under `float32`, `mixed_bfloat16` and `mixed_float16`, interleaved per round as `bench
//!   train` does; the median step, its ratio to float32's in the same round, its GFLOP/s from
//!   the convolutions' and the dense layer's multiply-adds (forward, kernel gradient and, but
//!   for the first layer, input gradient) against the measured peak of the policy's GEMM path,
//!   and the activation memory (peak tensor bytes during a step minus what was held before).
//! - A `Conv2D(64, 3x3, same)` on `28x28x64` inputs alone: `forward_train` plus `backward`
//!   (with the input gradient), the same way.

use anyhow::Result;
use mp_core::{Float32, MixedBFloat16, MixedFloat16, Policy, PolicyKind, Rng, Tensor};
use mp_layers::{Conv2D, Layer, Padding, SparseCategoricalCrossentropy, Trainer};
use mp_optim::Adam;
use ndarray::{Array1, Array4, Ix4};
use serde_json::json;

use crate::bench_util::{
    Bounds, FitStep, Variant, activation_bytes, op_table, parse, step_rows, step_table_header,
    summarize, time, write_report,
};
use crate::{CNN_LEARNING_RATE, MnistCnn};

/// Multiply-adds times 2 of one training step of [`MnistCnn`] at `batch`: per convolution
/// `2 · pixels · (9 · c_in) · c_out` for forward and again for the kernel gradient and the input
/// gradient (none for the first layer), the same for the dense layer.
fn cnn_flop(batch: usize) -> f64 {
    // (input channels, filters, image side) of each convolution, in order.
    let convs = [
        (1, 32, 28),
        (32, 32, 28),
        (32, 32, 28),
        (32, 64, 14),
        (64, 64, 14),
        (64, 64, 14),
    ];
    let mut flop = 0.0;
    for (i, &(c, f, side)) in convs.iter().enumerate() {
        let one = 2.0 * (batch * side * side) as f64 * (9 * c) as f64 * f as f64;
        flop += one * if i == 0 { 2.0 } else { 3.0 };
    }
    flop + 3.0 * 2.0 * (batch * 64 * 10) as f64
}

/// The step of [`MnistCnn`] (Adam) on `batch` random images.
fn cnn_step<P: PolicyKind>(batch: usize) -> Result<Box<dyn Variant>> {
    let mut model = MnistCnn::<P>::issue();
    model.build(&[28, 28, 1])?;
    let trainer = Trainer::compile(
        model,
        Adam::new(CNN_LEARNING_RATE)?,
        SparseCategoricalCrossentropy::new(),
    );
    let mut rng = Rng::new(1);
    let x = Array4::from_shape_vec((batch, 28, 28, 1), rng.uniform_vec(batch * 784, 0.0, 1.0))?;
    let y = Array1::from_shape_fn(batch, |_| rng.below(10) as u32);
    Ok(Box::new(FitStep::<_, _, Ix4>::new(trainer, x, y)))
}

struct Conv<P: PolicyKind> {
    layer: Conv2D<P>,
    x: Tensor<P::Compute>,
    dy: Tensor<P::Compute>,
}

impl<P: PolicyKind> Conv<P> {
    fn new(batch: usize) -> Result<Self> {
        let mut layer = Conv2D::<P>::new(64, [3, 3]).padding(Padding::Same);
        layer.build(&[28, 28, 64])?;
        let mut rng = Rng::new(2);
        let n = batch * 28 * 28 * 64;
        let x = Tensor::from_f32(&[batch, 28, 28, 64], &rng.uniform_vec(n, -1.0, 1.0))?;
        let dy = Tensor::from_f32(&[batch, 28, 28, 64], &rng.uniform_vec(n, -1.0, 1.0))?;
        Ok(Conv { layer, x, dy })
    }
}

impl<P: PolicyKind> Variant for Conv<P> {
    fn policy(&self) -> Policy {
        P::POLICY
    }
    fn step(&mut self) -> Result<()> {
        self.layer.forward_train(&self.x)?;
        self.layer.backward(&self.dy, true)?;
        Ok(())
    }
}

/// One step of the network under `policy` at `batch` (for `bench repeat`).
pub(crate) fn step_for(policy: Policy, batch: usize) -> Result<Box<dyn Variant>> {
    match policy {
        Policy::Float32 => cnn_step::<Float32>(batch),
        Policy::MixedBFloat16 => cnn_step::<MixedBFloat16>(batch),
        Policy::MixedFloat16 => cnn_step::<MixedFloat16>(batch),
    }
}

/// Runs `bench cnn` and writes its JSON (with the report's markdown section in `markdown`).
pub fn cnn_cmd(args: &[String]) -> Result<()> {
    let o = parse(args, "cnn", 256)?;
    let batch = o.batch;
    let paths = mp_kernels::Cpu::global()?.gemm_paths();

    // Memory of one step per policy, from a clean start each.
    let mut steps = vec![
        cnn_step::<Float32>(batch)?,
        cnn_step::<MixedBFloat16>(batch)?,
        cnn_step::<MixedFloat16>(batch)?,
    ];
    let activation = activation_bytes(&mut steps)?;
    let flop = cnn_flop(batch);
    let timed = time(&mut steps, o.rounds, flop)?;
    let mut convs: Vec<Box<dyn Variant>> = vec![
        Box::new(Conv::<Float32>::new(batch)?),
        Box::new(Conv::<MixedBFloat16>::new(batch)?),
        Box::new(Conv::<MixedFloat16>::new(batch)?),
    ];
    let conv_flop = 3.0 * 2.0 * (batch * 28 * 28) as f64 * (9 * 64) as f64 * 64.0;
    let conv_timed = time(&mut convs, o.rounds, conv_flop)?;

    let mut md = step_table_header(&format!(
        "The mnist_cnn network (Adam), batch {batch}, median of {} interleaved rounds (each a run of 1 to 8 steps, about 100 ms)",
        o.rounds
    ));
    let (rows, mut records) = step_rows(&steps, &timed, &activation, flop, batch)?;
    md.push_str(&rows);
    md.push_str(&format!(
        "\nFLOP per step: {:.2} GFLOP (the convolutions' and the dense layer's multiply-adds × 2, \
         forward, kernel gradient and input gradient but the first layer's); \"of peak\" pairs \
         each step with the peak of its GEMM path measured right before and after it.\n\n\
         ## Conv2D(64, 3x3, same) on 28x28x64 alone, batch {batch}: forward_train + backward\n\n\
         | policy | GEMM path | ms | vs float32 | GFLOP/s | of peak |\n|---|---|---|---|---|---|\n",
        flop / 1e9
    ));
    for (i, v) in convs.iter().enumerate() {
        let policy = v.policy();
        let (ms, speedup, of_peak) = summarize(&conv_timed, i);
        let gflops = conv_flop / (ms * 1e-3) / 1e9;
        let path = paths.get(policy.compute_dtype()).name();
        md.push_str(&format!(
            "| {policy} | {path} | {ms:.1} | {speedup:.2}x | {gflops:.1} | {:.1}% |\n",
            100.0 * of_peak
        ));
        records.push(json!({
            "group": "conv", "policy": policy.name(), "gemm_path": path, "batch": batch,
            "ms": ms, "speedup_vs_float32": speedup, "gflops": gflops,
            "fraction_of_peak": of_peak,
        }));
    }
    let bounds = Bounds::measure()?;
    let small = 32.min(batch);
    let mut small_steps = vec![
        cnn_step::<Float32>(small)?,
        cnn_step::<MixedBFloat16>(small)?,
        cnn_step::<MixedFloat16>(small)?,
    ];
    for (b, vs) in [(batch, &mut steps), (small, &mut small_steps)] {
        let (ops, op_records) = op_table(
            &format!("Where the mnist_cnn step's time goes, batch {b}"),
            vs,
            o.rounds.max(3),
            &bounds,
        )?;
        md.push('\n');
        md.push_str(&ops);
        records.extend(op_records);
    }
    write_report(&o, records, &md)
}
