//! What the network-step groups (`bench cnn`, `bench vit`) share: their options, one training
//! step of a compiled model on a fixed synthetic batch, timing interleaved rounds against the
//! peak of each policy's GEMM path, the activation memory of a step, the step table and the
//! JSON they write.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mp_core::{Policy, PolicyKind, memory};
use mp_layers::{FitOptions, Model, Trainer, Verbose};
use mp_optim::Optimizer;
use ndarray::{Array, Array1, Dimension};
use serde_json::{Value, json};

use crate::bench_train::median;

/// Options of a network-step group.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) rounds: usize,
    pub(crate) batch: usize,
    pub(crate) out: PathBuf,
}

/// Parses `[--quick] [--rounds N] [--batch N] [--out PATH]` for group `group`: 5 rounds at
/// `batch`, JSON to `target/bench/<group>.json`; `--quick` is 2 rounds at batch 8.
pub(crate) fn parse(args: &[String], group: &str, batch: usize) -> Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        batch,
        out: PathBuf::from(format!("target/bench/{group}.json")),
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
            other => bail!("unknown option {other:?} for bench {group}"),
        }
    }
    if o.rounds == 0 || o.batch == 0 {
        bail!("rounds and batch must be positive");
    }
    Ok(o)
}

/// One timed unit of work under a policy.
pub(crate) trait Variant {
    fn policy(&self) -> Policy;
    fn step(&mut self) -> Result<()>;
}

/// One training step (`fit` for one epoch of one batch) of a compiled model on a fixed batch.
pub(crate) struct FitStep<M: Model, O: Optimizer, D: Dimension> {
    trainer: Trainer<M, O>,
    x: Array<f32, D>,
    y: Array1<u32>,
}

impl<M: Model, O: Optimizer, D: Dimension> FitStep<M, O, D> {
    /// Steps of `trainer` on the inputs `x` and their labels `y` (the whole batch).
    pub(crate) fn new(trainer: Trainer<M, O>, x: Array<f32, D>, y: Array1<u32>) -> Self {
        FitStep { trainer, x, y }
    }
}

impl<M: Model, O: Optimizer, D: Dimension> Variant for FitStep<M, O, D> {
    fn policy(&self) -> Policy {
        <M::Policy as PolicyKind>::POLICY
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

/// The peak of the GEMM path `policy` computes on, measured now.
pub(crate) fn path_peak(policy: Policy) -> Result<f64> {
    let dot =
        mp_kernels::Cpu::global()?.gemm_paths().bf16 == mp_kernels::gemm::GemmPath::Avx512Bf16Dot;
    Ok(match policy {
        Policy::MixedBFloat16 if dot => mp_kernels::peak::dpbf16_peak_gflops()
            .unwrap_or_else(mp_kernels::peak::fma_f32_peak_gflops),
        _ => mp_kernels::peak::fma_f32_peak_gflops(),
    })
}

/// Per variant: the step times (ms) and the paired fractions of the path's peak.
pub(crate) type Timed = Vec<(Vec<f64>, Vec<f64>)>;

/// Interleaved rounds over `vs`: per variant the step times (ms) and the paired fractions of
/// the path's peak (each step against the peak measured right before and after it).
pub(crate) fn time(vs: &mut [Box<dyn Variant>], rounds: usize, flop: f64) -> Result<Timed> {
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

/// Variant `i` of `timed`: its median time (ms), the median over rounds of the first variant's
/// time over its own in the same round, and its median fraction of the path's peak.
pub(crate) fn summarize(timed: &Timed, i: usize) -> (f64, f64, f64) {
    let ms = median(&mut timed[i].0.clone());
    let speedup = median(
        &mut timed[0]
            .0
            .iter()
            .zip(&timed[i].0)
            .map(|(a, b)| a / b)
            .collect::<Vec<_>>(),
    );
    let of_peak = median(&mut timed[i].1.clone());
    (ms, speedup, of_peak)
}

/// The activation memory of one step of each of `vs` (after one step to set everything up):
/// the peak tensor bytes during the step minus the bytes held before it.
pub(crate) fn activation_bytes(vs: &mut [Box<dyn Variant>]) -> Result<Vec<usize>> {
    let mut out = vec![];
    for v in vs.iter_mut() {
        v.step()?;
        let before = memory::live_bytes();
        memory::reset_peak();
        v.step()?;
        out.push(memory::peak_bytes().saturating_sub(before));
    }
    Ok(out)
}

/// The header of a step table, under the `## {title}` heading.
pub(crate) fn step_table_header(title: &str) -> String {
    format!(
        "## {title}\n\n| policy | GEMM path | ms/step | vs float32 | GFLOP/s | of peak | \
         activation MiB | vs float32 |\n|---|---|---|---|---|---|---|---|\n"
    )
}

/// The rows of a step table (the first variant is float32, the reference) and their JSON
/// records (`group: "step"`).
pub(crate) fn step_rows(
    vs: &[Box<dyn Variant>],
    timed: &Timed,
    activation: &[usize],
    flop: f64,
    batch: usize,
) -> Result<(String, Vec<Value>)> {
    let paths = mp_kernels::Cpu::global()?.gemm_paths();
    let mut md = String::new();
    let mut records = vec![];
    for (i, v) in vs.iter().enumerate() {
        let policy = v.policy();
        let (ms, speedup, of_peak) = summarize(timed, i);
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
    Ok((md, records))
}

/// Writes a group's JSON (the report's markdown section in `markdown`) to `o.out` and prints
/// the markdown.
pub(crate) fn write_report(o: &Opts, records: Vec<Value>, md: &str) -> Result<()> {
    let report = json!({
        "machine": { "cpu": mp_kernels::peak::describe_cpu() },
        "rounds": o.rounds,
        "batch": o.batch,
        "records": records,
        "markdown": md,
    });
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", o.out.display()))?;
    println!("{md}");
    eprintln!("wrote {}", o.out.display());
    Ok(())
}
