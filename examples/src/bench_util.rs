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

/// The least time one round of one variant runs its steps for: training runs steps back to back,
/// and a lone step after another model's step and a peak measurement pays for cold caches (a
/// `mnist_vit` step measured 20% slower alone than in a run of steps, on a Xeon).
const ROUND_MS: f64 = 100.0;

/// Interleaved rounds over `vs`: per variant the step times (ms) and the paired fractions of
/// the path's peak (each round's steps against the peak measured right before and after them).
/// A round runs each variant's steps back to back, as many as last [`ROUND_MS`] (at least one,
/// at most 8, the count fixed from the warm-up step), and records their mean.
pub(crate) fn time(vs: &mut [Box<dyn Variant>], rounds: usize, flop: f64) -> Result<Timed> {
    let mut runs = vec![];
    for v in vs.iter_mut() {
        v.step()?; // warm-up
        let t = Instant::now();
        v.step()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        runs.push(((ROUND_MS / ms.max(1e-3)).ceil() as usize).clamp(1, 8));
    }
    let mut out = vec![(vec![], vec![]); vs.len()];
    for _ in 0..rounds {
        for (i, v) in vs.iter_mut().enumerate() {
            let before = path_peak(v.policy())?;
            let t = Instant::now();
            for _ in 0..runs[i] {
                v.step()?;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / runs[i] as f64;
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

/// What the per-op table measures each op class against, measured once per group: the
/// compute peaks of the GEMM paths and the bandwidth of the L2 and of DRAM.
pub(crate) struct Bounds {
    fma: f64,
    dot: Option<f64>,
    l2_gbs: f64,
    l3_gbs: f64,
    dram_gbs: f64,
    /// Working sets up to this many bytes per op call count as L2-resident (the L2 of every
    /// kernel thread together).
    l2_bytes: usize,
    /// The same for the L3 (shared by the threads).
    l3_bytes: usize,
}

impl Bounds {
    pub(crate) fn measure() -> Result<Bounds> {
        let threads = mp_kernels::threads::num_threads();
        let l2 = mp_kernels::peak::l2_bytes();
        // A VM may report its host's whole L3, shared with other guests: count at most 32 MiB
        // of it as this process's.
        let l3 = mp_kernels::peak::l3_bytes().min(32 << 20);
        let dot = mp_kernels::Cpu::global()?.gemm_paths().bf16
            == mp_kernels::gemm::GemmPath::Avx512Bf16Dot;
        Ok(Bounds {
            fma: mp_kernels::peak::fma_f32_peak_gflops(),
            dot: if dot {
                mp_kernels::peak::dpbf16_peak_gflops()
            } else {
                None
            },
            // Half the L2 per thread, so the two buffers stay in it beside the code's own data.
            l2_gbs: mp_kernels::peak::bandwidth_gbs(l2 / 2),
            l3_gbs: mp_kernels::peak::bandwidth_gbs(l3 / 2 / threads),
            dram_gbs: mp_kernels::peak::bandwidth_gbs(256 << 20),
            l2_bytes: l2 * threads,
            l3_bytes: l3,
        })
    }

    /// One line saying what they are.
    pub(crate) fn describe(&self) -> String {
        format!(
            "float32 FMA peak {:.0} GFLOP/s{}; bandwidth (read + write, all kernel threads) {:.0} \
             GB/s in L2 ({} KiB per core), {:.0} GB/s in L3 ({} MiB), {:.0} GB/s from DRAM",
            self.fma,
            self.dot.map_or(String::new(), |d| format!(
                ", vdpbf16ps peak {d:.0} GFLOP/s"
            )),
            self.l2_gbs,
            (self.l2_bytes / mp_kernels::threads::num_threads().max(1)) >> 10,
            self.l3_gbs,
            self.l3_bytes >> 20,
            self.dram_gbs
        )
    }
}

/// The per-op table of `vs` over `steps` steps each (after one warm-up step): per op class and
/// policy, its milliseconds per step, its share of the step, and its fraction of its bound (the
/// compute peak of its path when it counts FLOP; else the bytes it must move over the bandwidth
/// of the cache level its working set fits in). Rows for thread overhead (see
/// `mp_kernels::profile`: a region's wall time less its busiest thread's), for the threads'
/// idle time inside the regions (as a share of all the threads' time: start-up, hand-over and
/// shares that end early), for the ops that ran on one thread (the others waiting), and for
/// the time outside every op (generated model code, the trainer, allocation).
pub(crate) fn op_table(
    title: &str,
    vs: &mut [Box<dyn Variant>],
    steps: usize,
    bounds: &Bounds,
) -> Result<(String, Vec<Value>)> {
    use mp_kernels::profile::{self, OpClass};
    let mut profiles = vec![];
    for v in vs.iter_mut() {
        v.step()?;
        let _ = profile::take();
        profile::enable(true);
        let t = Instant::now();
        for _ in 0..steps {
            v.step()?;
        }
        let wall = t.elapsed().as_secs_f64();
        profile::enable(false);
        profiles.push((v.policy(), wall / steps as f64, profile::take()));
    }
    let mut md = format!(
        "## {title}\n\nPer step, mean of {steps} steps; \"bound\" is the op class's fraction of \
         its bound ({}).\n\n| op class |",
        bounds.describe()
    );
    let mut sep = String::from("|---|");
    for (policy, _, _) in &profiles {
        md.push_str(&format!(" {policy} ms | % of step | of bound |"));
        sep.push_str("---|---|---|");
    }
    md.push('\n');
    md.push_str(&sep);
    md.push('\n');
    let mut records = vec![];
    let per_step = steps as f64;
    for class in OpClass::ALL {
        if profiles.iter().all(|(_, _, p)| p.class(class).calls == 0) {
            continue;
        }
        md.push_str(&format!("| {} |", class.name()));
        for (policy, step, p) in &profiles {
            let c = p.class(class);
            let secs = c.secs / per_step;
            let bound = if c.flop > 0.0 {
                let peak = match policy {
                    mp_core::Policy::MixedBFloat16 if class != OpClass::Attention => {
                        bounds.dot.unwrap_or(bounds.fma)
                    }
                    _ => bounds.fma,
                };
                Some(c.flop / per_step / (peak * 1e9))
            } else if c.bytes > 0 {
                let per_call = c.bytes / c.calls.max(1);
                let bw = if per_call as usize <= bounds.l2_bytes {
                    bounds.l2_gbs
                } else if per_call as usize <= bounds.l3_bytes {
                    bounds.l3_gbs
                } else {
                    bounds.dram_gbs
                };
                Some(c.bytes as f64 / per_step / (bw * 1e9))
            } else {
                None
            };
            let of_bound = bound.map(|b| b / secs.max(1e-12));
            md.push_str(&format!(
                " {:.2} | {:.1}% | {} |",
                secs * 1e3,
                100.0 * secs / step,
                of_bound.map_or("—".into(), |f| format!("{:.0}%", 100.0 * f))
            ));
            records.push(json!({
                "group": "ops", "table": title, "policy": policy.name(), "op_class": class.name(),
                "ms_per_step": secs * 1e3, "fraction_of_step": secs / step,
                "fraction_of_bound": of_bound, "calls_per_step": c.calls as f64 / per_step,
            }));
        }
        md.push('\n');
    }
    let threads = mp_kernels::threads::num_threads() as f64;
    for (name, of) in [
        ("thread overhead", 0usize),
        ("idle in regions", 3),
        ("ops on one thread", 4),
        ("outside ops", 1),
        ("whole step", 2),
    ] {
        md.push_str(&format!("| {name} |"));
        for (policy, step, p) in &profiles {
            let secs = match of {
                0 => p.thread_secs / per_step,
                1 => (step - p.total_secs() / per_step).max(0.0),
                // The threads' idle time as wall time: its share of all threads' time.
                3 => p.idle_secs() / threads / per_step,
                4 => p.serial_secs() / per_step,
                _ => *step,
            };
            md.push_str(&format!(
                " {:.2} | {:.1}% | |",
                secs * 1e3,
                100.0 * secs / step
            ));
            records.push(json!({
                "group": "ops", "table": title, "policy": policy.name(), "op_class": name,
                "ms_per_step": secs * 1e3, "fraction_of_step": secs / step,
            }));
        }
        md.push('\n');
    }
    Ok((md, records))
}

/// `bench repeat cnn|vit POLICY BATCH STEPS`: one network's step repeated, for a profiler.
pub fn repeat_cmd(args: &[String]) -> Result<()> {
    let [net, policy, batch, steps] = args else {
        bail!("usage: bench repeat cnn|vit POLICY BATCH STEPS");
    };
    let policy: Policy = policy.parse()?;
    let batch: usize = batch.parse().context("BATCH")?;
    let steps: usize = steps.parse().context("STEPS")?;
    let mut v = match net.as_str() {
        "cnn" => crate::bench_cnn::step_for(policy, batch)?,
        "vit" => crate::bench_vit::step_for(policy, batch)?,
        other => bail!("unknown network {other:?}: cnn or vit"),
    };
    v.step()?;
    let t = Instant::now();
    for _ in 0..steps {
        v.step()?;
    }
    println!(
        "{net} {policy} batch {batch}: {:.1} ms/step",
        t.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64
    );
    Ok(())
}
