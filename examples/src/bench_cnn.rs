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

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mp_core::{Float32, MixedBFloat16, MixedFloat16, Policy, PolicyKind, Rng, Tensor, memory};
use mp_layers::{
    Conv2D, FitOptions, Layer, Padding, SparseCategoricalCrossentropy, Trainer, Verbose,
};
use mp_optim::Adam;
use ndarray::{Array1, Array4};
use serde_json::json;

use crate::bench_train::median;
use crate::{CNN_LEARNING_RATE, MnistCnn};

/// Options of `bench cnn`.
#[derive(Debug, Clone)]
struct Opts {
    rounds: usize,
    batch: usize,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        batch: 256,
        out: PathBuf::from("target/bench/cnn.json"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {
                o.rounds = 2;
                o.batch = 8;
            }
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--batch" => o.batch = value()?.parse().context("--batch")?,
            "--out" => o.out = PathBuf::from(value()?),
            other => bail!("unknown option {other:?} for bench cnn"),
        }
    }
    if o.rounds == 0 || o.batch == 0 {
        bail!("rounds and batch must be positive");
    }
    Ok(o)
}

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

trait Variant {
    fn policy(&self) -> Policy;
    fn step(&mut self) -> Result<()>;
}

struct Step<P: PolicyKind> {
    trainer: Trainer<MnistCnn<P>, Adam>,
    x: Array4<f32>,
    y: Array1<u32>,
}

impl<P: PolicyKind> Step<P> {
    fn new(batch: usize) -> Result<Self> {
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
        Ok(Step { trainer, x, y })
    }
}

impl<P: PolicyKind> Variant for Step<P> {
    fn policy(&self) -> Policy {
        P::POLICY
    }
    fn step(&mut self) -> Result<()> {
        let options = FitOptions {
            batch_size: self.y.len(),
            epochs: 1,
            shuffle: false,
            verbose: Verbose::Silent,
            ..Default::default()
        };
        self.trainer.fit(self.x.view(), self.y.view(), &options)?;
        Ok(())
    }
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

/// The peak of the GEMM path `policy` computes on, measured now.
fn path_peak(policy: Policy) -> Result<f64> {
    let dot =
        mp_kernels::Cpu::global()?.gemm_paths().bf16 == mp_kernels::gemm::GemmPath::Avx512Bf16Dot;
    Ok(match policy {
        Policy::MixedBFloat16 if dot => mp_kernels::peak::dpbf16_peak_gflops()
            .unwrap_or_else(mp_kernels::peak::fma_f32_peak_gflops),
        _ => mp_kernels::peak::fma_f32_peak_gflops(),
    })
}

/// Interleaved rounds over `vs`: per variant the step times (ms) and the paired fractions of
/// the path's peak (each step against the peak measured right before and after it).
fn time(
    vs: &mut [Box<dyn Variant>],
    rounds: usize,
    flop: f64,
) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
    for v in vs.iter_mut() {
        v.step()?; // warm-up
    }
    let mut out = vec![(vec![], vec![]); vs.len()];
    for _ in 0..rounds {
        for (i, v) in vs.iter_mut().enumerate() {
            let before = path_peak(v.policy())?;
            let t = Instant::now();
            v.step()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let peak = (before + path_peak(v.policy())?) / 2.0;
            out[i].0.push(ms);
            out[i].1.push(flop / (ms * 1e-3) / 1e9 / peak);
        }
    }
    Ok(out)
}

/// Runs `bench cnn` and writes its JSON (with the report's markdown section in `markdown`).
pub fn cnn_cmd(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let batch = o.batch;
    let paths = mp_kernels::Cpu::global()?.gemm_paths();

    // Memory of one step per policy, from a clean start each.
    let mut steps: Vec<Box<dyn Variant>> = vec![
        Box::new(Step::<Float32>::new(batch)?),
        Box::new(Step::<MixedBFloat16>::new(batch)?),
        Box::new(Step::<MixedFloat16>::new(batch)?),
    ];
    let mut activation = vec![];
    for v in steps.iter_mut() {
        v.step()?;
        let before = memory::live_bytes();
        memory::reset_peak();
        v.step()?;
        activation.push(memory::peak_bytes().saturating_sub(before));
    }
    let flop = cnn_flop(batch);
    let timed = time(&mut steps, o.rounds, flop)?;
    let mut convs: Vec<Box<dyn Variant>> = vec![
        Box::new(Conv::<Float32>::new(batch)?),
        Box::new(Conv::<MixedBFloat16>::new(batch)?),
        Box::new(Conv::<MixedFloat16>::new(batch)?),
    ];
    let conv_flop = 3.0 * 2.0 * (batch * 28 * 28) as f64 * (9 * 64) as f64 * 64.0;
    let conv_timed = time(&mut convs, o.rounds, conv_flop)?;

    let mut md = format!(
        "## The mnist_cnn network (Adam), batch {batch}, median of {} interleaved rounds\n\n\
         | policy | GEMM path | ms/step | vs float32 | GFLOP/s | of peak | activation MiB | vs \
         float32 |\n|---|---|---|---|---|---|---|---|\n",
        o.rounds
    );
    let mut records = vec![];
    let f32_times = timed[0].0.clone();
    for (i, v) in steps.iter().enumerate() {
        let policy = v.policy();
        let ms = median(&mut timed[i].0.clone());
        let speedup = median(
            &mut f32_times
                .iter()
                .zip(&timed[i].0)
                .map(|(a, b)| a / b)
                .collect::<Vec<_>>(),
        );
        let of_peak = median(&mut timed[i].1.clone());
        let gflops = flop / (ms * 1e-3) / 1e9;
        let act = activation[i] as f64 / (1u64 << 20) as f64;
        let act_ratio = activation[i] as f64 / activation[0].max(1) as f64;
        let path = paths.get(policy.compute_dtype()).name();
        md.push_str(&format!(
            "| {policy} | {path} | {ms:.1} | {speedup:.2}x | {gflops:.1} | {:.1}% | {act:.1} | \
             {:.0}% |\n",
            100.0 * of_peak,
            100.0 * act_ratio
        ));
        records.push(json!({
            "group": "step", "policy": policy.name(), "gemm_path": path, "batch": batch,
            "ms_per_step": ms, "speedup_vs_float32": speedup, "gflops": gflops,
            "fraction_of_peak": of_peak, "activation_bytes": activation[i],
            "activation_vs_float32": act_ratio,
        }));
    }
    md.push_str(&format!(
        "\nFLOP per step: {:.2} GFLOP (the convolutions' and the dense layer's multiply-adds × 2, \
         forward, kernel gradient and input gradient but the first layer's); \"of peak\" pairs \
         each step with the peak of its GEMM path measured right before and after it.\n\n\
         ## Conv2D(64, 3x3, same) on 28x28x64 alone, batch {batch}: forward_train + backward\n\n\
         | policy | GEMM path | ms | vs float32 | GFLOP/s | of peak |\n|---|---|---|---|---|---|\n",
        flop / 1e9
    ));
    let f32_conv = conv_timed[0].0.clone();
    for (i, v) in convs.iter().enumerate() {
        let policy = v.policy();
        let ms = median(&mut conv_timed[i].0.clone());
        let speedup = median(
            &mut f32_conv
                .iter()
                .zip(&conv_timed[i].0)
                .map(|(a, b)| a / b)
                .collect::<Vec<_>>(),
        );
        let of_peak = median(&mut conv_timed[i].1.clone());
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
    let report = json!({
        "machine": { "cpu": mp_kernels::peak::describe_cpu() },
        "rounds": o.rounds,
        "batch": batch,
        "records": records,
        "markdown": md,
    });
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", o.out.display()))?;
    println!("{md}");
    eprintln!("wrote {}", o.out.display());
    Ok(())
}
