//! `bench train`: training throughput and memory of the guide's model per policy.
//!
//! The guide's model (784 → units → units → 10, float32 softmax, RMSprop) is trained on random
//! data at each batch size under `float32`, `mixed_bfloat16` and `mixed_float16` (with its
//! default dynamic loss scale), plus `mixed_float16` without loss scaling to show what loss
//! scaling costs. Variants are interleaved: every round times one step of each, so a slow period
//! on a shared machine hits them alike; the median over rounds is reported, after one warm-up
//! step each.
//!
//! Memory is counted by mp-core's tensor allocator: the peak bytes held by tensors during a step,
//! split into what was held before the step (weights, their 16-bit copies, gradients, optimizer
//! state: "the rest") and the growth during the step (activations kept for backward, activation
//! gradients, and the step's temporaries: "activations").

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mp_core::{Float32, LossScale, MixedBFloat16, MixedFloat16, Policy, PolicyKind, Rng, memory};
use mp_layers::{FitOptions, Layer, Model, SparseCategoricalCrossentropy, Trainer, Verbose};
use mp_optim::RmsProp;
use ndarray::{Array1, Array2};
use serde_json::json;

use crate::Digits;

/// Options of `bench train`.
#[derive(Debug, Clone)]
pub struct TrainOpts {
    /// Timed rounds (each times one step of every variant).
    pub rounds: usize,
    /// Batch sizes.
    pub batches: Vec<usize>,
    /// Hidden units.
    pub units: usize,
    /// The memory budget for the largest-batch estimate, in bytes.
    pub budget: u64,
    /// Where the JSON goes.
    pub out: PathBuf,
    /// Only these variants (by name, e.g. `float32`), for profiling one policy; empty = all.
    pub only: Vec<String>,
}

/// Parses `bench train` options.
pub fn parse_opts(args: &[String]) -> Result<TrainOpts> {
    let mut o = TrainOpts {
        rounds: 5,
        batches: vec![8192, 1024],
        units: 4096,
        budget: 16 << 30,
        out: PathBuf::from("target/bench/train.json"),
        only: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {
                o.rounds = 2;
                o.batches = vec![64, 16];
                o.units = 128;
            }
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--units" => o.units = value()?.parse().context("--units")?,
            "--batches" => {
                o.batches = value()?
                    .split(',')
                    .map(|s| s.trim().parse().context("--batches"))
                    .collect::<Result<_>>()?
            }
            "--budget-gib" => {
                o.budget =
                    (value()?.parse::<f64>().context("--budget-gib")? * (1u64 << 30) as f64) as u64
            }
            "--out" => o.out = PathBuf::from(value()?),
            "--only" => o.only = value()?.split(',').map(|s| s.trim().to_string()).collect(),
            other => bail!("unknown option {other:?} for bench train"),
        }
    }
    if o.rounds == 0 || o.batches.is_empty() || o.batches.contains(&0) || o.units == 0 {
        bail!("rounds, batches and units must be positive");
    }
    Ok(o)
}

/// One trainer of the guide's model, type-erased so variants can be interleaved.
trait Variant {
    fn name(&self) -> String;
    fn policy(&self) -> Policy;
    fn loss_scaling(&self) -> bool;
    fn step(&mut self) -> Result<()>;
    /// (bytes held before a step, peak during it, bytes kept by forward for backward, bytes of
    /// freed buffers cached for reuse after the step)
    fn memory(&mut self) -> Result<(usize, usize, usize, usize)>;
}

struct Run<P: PolicyKind> {
    trainer: Trainer<Digits<P>, RmsProp>,
    x: Array2<f32>,
    y: Array1<u32>,
    scaled: bool,
}

impl<P: PolicyKind> Run<P> {
    fn new(units: usize, batch: usize, scaled: Option<bool>, seed: u64) -> Result<Self> {
        let mut model = Digits::<P>::guide(units);
        model.build(&[784])?;
        let mut trainer = Trainer::compile(
            model,
            RmsProp::default(),
            SparseCategoricalCrossentropy::new(),
        );
        if let Some(false) = scaled {
            trainer = trainer.with_loss_scale(None);
        } else if let Some(true) = scaled {
            trainer = trainer.with_loss_scale(Some(LossScale::dynamic()));
        }
        let scaled = trainer.optimizer().loss_scale() != 1.0;
        let mut rng = Rng::new(seed);
        let x = Array2::from_shape_vec((batch, 784), rng.uniform_vec(batch * 784, 0.0, 1.0))?;
        let y = Array1::from_shape_fn(batch, |_| rng.below(10) as u32);
        Ok(Run {
            trainer,
            x,
            y,
            scaled,
        })
    }
}

impl<P: PolicyKind> Variant for Run<P> {
    fn name(&self) -> String {
        format!(
            "{}{}",
            P::POLICY,
            if self.scaled || P::POLICY != Policy::MixedFloat16 {
                ""
            } else {
                " (no loss scaling)"
            }
        )
    }
    fn policy(&self) -> Policy {
        P::POLICY
    }
    fn loss_scaling(&self) -> bool {
        self.scaled
    }
    fn step(&mut self) -> Result<()> {
        let options = FitOptions {
            batch_size: self.x.nrows(),
            epochs: 1,
            shuffle: false,
            verbose: Verbose::Silent,
            ..Default::default()
        };
        self.trainer.fit(self.x.view(), self.y.view(), &options)?;
        Ok(())
    }
    fn memory(&mut self) -> Result<(usize, usize, usize, usize)> {
        // A whole step from a clean start: what is held before, and the peak during it.
        let before = memory::live_bytes();
        memory::reset_peak();
        self.step()?;
        let peak = memory::peak_bytes();
        let cached = memory::cached_bytes();
        // What forward keeps for backward (then a step releases it again).
        let xc = mp_layers::convert(mp_core::Tensor::<mp_core::F32>::from_ndarray(&self.x)?)?;
        let _ = self.trainer.model_mut().forward_train_f32(&xc)?;
        let kept = self.trainer.model().saved_bytes();
        drop(xc);
        self.step()?;
        Ok((before, peak, kept, cached))
    }
}

fn variants(units: usize, batch: usize) -> Result<Vec<Box<dyn Variant>>> {
    Ok(vec![
        Box::new(Run::<Float32>::new(units, batch, None, 1)?),
        Box::new(Run::<MixedBFloat16>::new(units, batch, None, 1)?),
        Box::new(Run::<MixedFloat16>::new(units, batch, None, 1)?),
        Box::new(Run::<MixedFloat16>::new(units, batch, Some(false), 1)?),
    ])
}

/// The median (sorts `xs`).
pub(crate) fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Runs `bench train` and writes its JSON.
pub fn train_cmd(args: &[String]) -> Result<()> {
    let o = parse_opts(args)?;
    let weights = (784 * o.units + o.units) + (o.units * o.units + o.units) + (o.units * 10 + 10);
    // The peaks are measured in every round, between the variants, and their medians used: a
    // peak taken once can land in a busy moment and make every fraction meaningless.
    let mut fma_samples = vec![mp_kernels::peak::fma_f32_peak_gflops()];
    let mut bf16_samples: Vec<f64> = mp_kernels::peak::dpbf16_peak_gflops().into_iter().collect();
    let mut records = vec![];
    let mut pending = vec![];
    for &batch in &o.batches {
        eprintln!("batch {batch}: building {} variants", 4);
        let mut vs = variants(o.units, batch)?;
        if !o.only.is_empty() {
            vs.retain(|v| o.only.contains(&v.name()));
            if vs.is_empty() {
                bail!("--only {:?} matches no variant", o.only);
            }
        }
        // Memory first, from a clean start per variant (one step each also warms up).
        let mut mem = vec![];
        for v in vs.iter_mut() {
            v.step()?;
            mem.push(v.memory()?);
        }
        let mut times: Vec<Vec<f64>> = vec![vec![]; vs.len()];
        // The peak of the variant's GEMM path measured right before and right after each of its
        // steps: on a shared machine whose speed drifts, a step is set against the machine as
        // it was during that step (see `paired_fraction`).
        let mut step_peaks: Vec<Vec<f64>> = vec![vec![]; vs.len()];
        let dot = mp_kernels::Cpu::global()?.gemm_paths().bf16
            == mp_kernels::gemm::GemmPath::Avx512Bf16Dot;
        for round in 0..o.rounds {
            for (i, v) in vs.iter_mut().enumerate() {
                let policy = v.policy();
                let path_peak = || match policy {
                    Policy::MixedBFloat16 if dot => mp_kernels::peak::dpbf16_peak_gflops()
                        .unwrap_or_else(mp_kernels::peak::fma_f32_peak_gflops),
                    _ => mp_kernels::peak::fma_f32_peak_gflops(),
                };
                let before = path_peak();
                let t = Instant::now();
                v.step()?;
                times[i].push(t.elapsed().as_secs_f64() * 1e3);
                step_peaks[i].push((before + path_peak()) / 2.0);
            }
            fma_samples.push(mp_kernels::peak::fma_f32_peak_gflops());
            bf16_samples.extend(mp_kernels::peak::dpbf16_peak_gflops());
            eprintln!("batch {batch}: round {}/{} done", round + 1, o.rounds);
        }
        pending.push((
            batch,
            times,
            mem,
            vs.iter()
                .map(|v| (v.name(), v.policy(), v.loss_scaling()))
                .collect::<Vec<_>>(),
            step_peaks,
        ));
    }
    let fma_peak = median(&mut fma_samples);
    let paths = mp_kernels::Cpu::global()?.gemm_paths();
    let bf16_dot = paths.bf16 == mp_kernels::gemm::GemmPath::Avx512Bf16Dot;
    let bf16_peak = if bf16_samples.is_empty() {
        None
    } else {
        Some(median(&mut bf16_samples))
    };
    for (batch, times, mem, names, step_peaks) in pending {
        // With `--only`, float32 may not have run: then there is no speedup to report.
        let f32_index = names.iter().position(|n| n.1 == Policy::Float32);
        let f32_ms = f32_index.map_or(f64::NAN, |i| median(&mut times[i].clone()));
        let flop = 6.0 * batch as f64 * weights as f64;
        for (i, (name, policy, scaling)) in names.iter().enumerate() {
            let mut t = times[i].clone();
            let ms = median(&mut t);
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            let max = t.iter().copied().fold(0.0, f64::max);
            let gflops = flop / (ms * 1e-3) / 1e9;
            let paired = paired_fraction(flop, &times[i], &step_peaks[i]);
            // float32's step and this one ran a few seconds apart in each round: the median of
            // the per-round ratios.
            let paired_speedup = f32_index.map_or(f64::NAN, |f| {
                let mut r: Vec<f64> = times[f].iter().zip(&times[i]).map(|(a, b)| a / b).collect();
                median(&mut r)
            });
            // The chosen path's peak: vdpbf16ps for bfloat16 on the dot-product path, else FMA.
            let peak = match *policy {
                Policy::MixedBFloat16 if bf16_dot => bf16_peak.unwrap_or(fma_peak),
                _ => fma_peak,
            };
            let (held, peak_bytes, kept, cached) = mem[i];
            let activation = peak_bytes.saturating_sub(held);
            let per_sample = activation as f64 / batch as f64;
            let max_batch = if per_sample > 0.0 {
                ((o.budget as f64 - held as f64).max(0.0) / per_sample).floor() as u64
            } else {
                0
            };
            records.push(json!({
                "policy": policy.name(),
                "variant": name,
                "loss_scaling": scaling,
                "batch": batch,
                "units": o.units,
                "ms_per_step": ms,
                "min_ms_per_step": min,
                "max_ms_per_step": max,
                "samples_per_s": batch as f64 / (ms * 1e-3),
                "speedup_vs_float32": paired_speedup,
                "speedup_of_medians": f32_ms / ms,
                "gflops": gflops,
                "peak_gflops": peak,
                "fraction_of_peak": paired,
                "fraction_of_median_peak": gflops / peak,
                "peak_tensor_bytes": peak_bytes,
                "activation_bytes": activation,
                "other_bytes": held,
                "saved_for_backward_bytes": kept,
                "cached_buffer_bytes": cached,
                "max_batch_in_budget": max_batch,
                "compat_ok": mp_kernels::calibrate::check(*policy)?.ok,
                "compat_reason": mp_kernels::calibrate::check(*policy)?.reason,
                "gemm_path": paths.get(policy.compute_dtype()).name(),
            }));
        }
    }
    let report = json!({
        "calibration": crate::calibration_json(mp_kernels::calibrate::calibration()?),
        "recommended_policy": mp_kernels::calibrate::recommended_policy()?.name(),
        "machine": {
            "cpu": mp_kernels::peak::describe_cpu(),
            "threads": mp_kernels::threads::num_threads(),
            "fma_f32_peak_gflops": fma_peak,
            "dpbf16_peak_gflops": bf16_peak,
            "memory_bandwidth_gbps": memory_bandwidth_gbps(),
        },
        "model": { "units": o.units, "weights": weights, "optimizer": "RMSprop" },
        "rounds": o.rounds,
        "budget_bytes": o.budget,
        "records": records,
    });
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", o.out.display()))?;
    println!("{}", train_table(&report));
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

/// The median over steps of each step's GFLOP/s against the peak of its GEMM path measured
/// right before and after it (`peaks`, their means): the figure a drifting machine moves least,
/// since both sides of each ratio were measured within seconds.
fn paired_fraction(flop: f64, ms: &[f64], peaks: &[f64]) -> f64 {
    let mut f: Vec<f64> = ms
        .iter()
        .zip(peaks)
        .map(|(ms, peak)| flop / (ms * 1e-3) / 1e9 / peak)
        .collect();
    median(&mut f)
}

/// Memory bandwidth in GB/s: the median of a few copies of a 256 MiB buffer (read + write).
pub fn memory_bandwidth_gbps() -> f64 {
    let n = 32 << 20; // f64 elements: 256 MiB
    let src = vec![1.0f64; n];
    let mut dst = vec![0.0f64; n];
    let mut times = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        times.push(t.elapsed().as_secs_f64());
    }
    let s = median(&mut times);
    (2 * n * 8) as f64 / s / 1e9
}

/// The markdown table of a train report.
pub fn train_table(report: &serde_json::Value) -> String {
    let mut s = String::from(
        "| variant | batch | ms/step (median) | min | max | samples/s | vs float32 | GFLOP/s | of peak | peak tensor MiB | activation MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let empty = vec![];
    for r in report["records"].as_array().unwrap_or(&empty) {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2}x | {:.1} | {:.1}% | {:.1} | {:.1} |\n",
            r["variant"].as_str().unwrap_or("?"),
            r["batch"],
            r["ms_per_step"].as_f64().unwrap_or(0.0),
            r["min_ms_per_step"].as_f64().unwrap_or(0.0),
            r["max_ms_per_step"].as_f64().unwrap_or(0.0),
            r["samples_per_s"].as_f64().unwrap_or(0.0),
            r["speedup_vs_float32"].as_f64().unwrap_or(0.0),
            r["gflops"].as_f64().unwrap_or(0.0),
            100.0 * r["fraction_of_peak"].as_f64().unwrap_or(0.0),
            r["peak_tensor_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            r["activation_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        ));
    }
    s
}
