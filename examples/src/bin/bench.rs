//! The measuring binary behind `cargo xtask bench`.
//!
//! ```text
//! bench gemm [--quick] [--rounds N] [--sizes 1024,2048] [--out PATH]
//! bench train [--quick] [--rounds N] [--batches 8192,1024] [--units N] [--out PATH]
//! ```
//!
//! `train` is in `examples::bench_train`: training throughput and memory per policy.
//!
//! `gemm` times square GEMMs (`C = A B`, output in the input dtype, as a layer's forward pass
//! stores it) for float32, bfloat16 and float16 at n = 1024, 2048 and 4096, interleaved: every
//! round runs each dtype and size once (round-robin), so a slow period on a shared machine hits
//! all of them alike. The float32 FMA and `vdpbf16ps` peak loops run in every round too. It prints
//! a markdown table (median, min and max GFLOP/s over the rounds, the fraction of the matching
//! peak, the bfloat16/float32 and float16/float32 ratios) and writes JSON (default
//! `target/bench/gemm.json`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mp_core::{DType, Rng, bf16, f16};
use mp_kernels::cpu_time::process_cpu_secs;
use mp_kernels::gemm::{Gemm, GemmInput, GemmPath, MatMut, MatRef};
use mp_kernels::{Cpu, calibrate, peak, threads};

const USAGE: &str = "usage: bench <subcommand> [options]

subcommands:
  train [--quick] [--rounds N] [--batches N,N] [--units N] [--budget-gib G] [--out PATH]
      training throughput and memory of the guide's model per policy (default batches 8192,1024,
      4096 units, 5 rounds, JSON to target/bench/train.json; --quick: batches 64,16, 128 units)
  cnn [--quick] [--rounds N] [--batch N] [--out PATH]
      the mnist_cnn step per policy (default batch 256) and a Conv2D(64, 3x3) on 28x28x64 alone:
      ms, vs float32, fraction of the GEMM path's peak, activation memory (JSON to
      target/bench/cnn.json; --quick: batch 8, 2 rounds)
  vit [--quick] [--rounds N] [--batch N] [--out PATH]
      the mnist_vit step (AdamW) per policy (default batch 128): ms, vs float32, fraction of
      the GEMM path's peak, activation memory (JSON to target/bench/vit.json; --quick: batch 8,
      2 rounds)
  dp [--quick] [--rounds N] [--steps N] [--batch N] [--units N] [--out PATH]
      data-parallel training of the guide's model: 2 ranks x 1 thread (mpirun) against 1 process
      x 2 threads, per policy; the all-reduce's bytes and time per step (needs the `mpi` feature
      and Open MPI; default batch 8192, 4096 units, 3 rounds of 4 steps; JSON to
      target/bench/dp.json; --quick: batch 64, 128 units)
  step-gemms [--batch N] [--units N] [--reps N]
      every GEMM of one training step of the guide's model, timed alone per dtype (where a
      step's time goes; default batch 8192, 4096 units, median of 3)
  repeat cnn|vit POLICY BATCH STEPS
      one training step of mnist_cnn or mnist_vit under POLICY, repeated STEPS times after a
      warm-up step, printing nothing but the time: for an outside profiler (`perf record`)
  gemm [--quick] [--rounds N] [--sizes N,N,...] [--out PATH]
      square GEMM throughput for float32, bfloat16 and float16 against the measured peaks, and
      each path's microkernel alone on one thread with its operands in cache (the ceiling of
      its GEMMs) (default sizes 1024,2048,4096, 9 rounds, JSON to target/bench/gemm.json;
       --quick: sizes 64,256, 2 rounds)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `bench dp` starts its own mpirun job of `dp --worker`; anything else times one process.
    if !(args.first().is_some_and(|a| a == "dp") && args.iter().any(|a| a == "--worker")) {
        mp_core::dist::single_process(
            "bench (timings of one process)",
            "run `cargo xtask bench dp`, which starts its own 2-rank mpirun job",
        )?;
    }
    match args.first().map(String::as_str) {
        Some("gemm") => gemm_cmd(&args[1..]),
        Some("train") => examples::bench_train::train_cmd(&args[1..]),
        Some("step-gemms") => examples::bench_step_gemms::step_gemms_cmd(&args[1..]),
        Some("cnn") => examples::bench_cnn::cnn_cmd(&args[1..]),
        Some("vit") => examples::bench_vit::vit_cmd(&args[1..]),
        Some("dp") => examples::bench_dp::dp_cmd(&args[1..]),
        Some("repeat") => examples::bench_util::repeat_cmd(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown subcommand `{other}`\n\n{USAGE}"),
        None => bail!("missing subcommand\n\n{USAGE}"),
    }
}

/// Options of `bench gemm`.
#[derive(Debug)]
struct GemmOpts {
    rounds: usize,
    sizes: Vec<usize>,
    out: PathBuf,
}

fn parse_gemm_opts(args: &[String]) -> Result<GemmOpts> {
    let mut quick = false;
    let mut rounds = None;
    let mut sizes = None;
    let mut out = PathBuf::from("target/bench/gemm.json");
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--rounds" => {
                let v = value("--rounds")?;
                let n: usize = v
                    .parse()
                    .with_context(|| format!("--rounds: not a number: {v}"))?;
                if n == 0 {
                    bail!("--rounds must be at least 1");
                }
                rounds = Some(n);
            }
            "--sizes" => {
                let v = value("--sizes")?;
                let list = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .with_context(|| format!("--sizes: not a number: {s}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                if list.contains(&0) {
                    bail!("--sizes must be positive");
                }
                sizes = Some(list);
            }
            "--out" => out = PathBuf::from(value("--out")?),
            other => bail!("unknown option `{other}` for `bench gemm`\n\n{USAGE}"),
        }
    }
    let sizes = sizes.unwrap_or_else(|| {
        if quick {
            vec![64, 256]
        } else {
            vec![1024, 2048, 4096]
        }
    });
    // Nine rounds: a GEMM timing is short (~0.25 s), so a burst of other work on a shared machine
    // can spoil one or two rounds; the median of nine stays clear of two.
    let rounds = rounds.unwrap_or(if quick { 2 } else { 9 });
    Ok(GemmOpts { rounds, sizes, out })
}

/// One GEMM configuration with its operands, allocated once.
trait Bench {
    fn dtype(&self) -> DType;
    fn n(&self) -> usize;
    /// Runs `reps` GEMMs, returns the seconds they took.
    fn run(&mut self, reps: usize) -> Result<f64>;
}

struct Square<T> {
    n: usize,
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
}

impl<T: GemmInput + mp_kernels::gemm::GemmOutput> Square<T> {
    fn new(n: usize, rng: &mut Rng) -> Self {
        let mut mat = || {
            (0..n * n)
                .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
                .collect::<Vec<T>>()
        };
        Square {
            n,
            a: mat(),
            b: mat(),
            c: vec![T::ZERO; n * n],
        }
    }
}

impl<T: GemmInput + mp_kernels::gemm::GemmOutput> Bench for Square<T> {
    fn dtype(&self) -> DType {
        T::DTYPE
    }
    fn n(&self) -> usize {
        self.n
    }
    fn run(&mut self, reps: usize) -> Result<f64> {
        let n = self.n;
        let cpu = Cpu::global()?;
        let start = Instant::now();
        for _ in 0..reps {
            cpu.gemm(
                MatRef::new(&self.a, n, n),
                MatRef::new(&self.b, n, n),
                MatMut::new(&mut self.c, n, n),
                Gemm::new(),
            )?;
        }
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(&self.c);
        Ok(secs)
    }
}

/// Median, min and max of a non-empty sample.
fn stats(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    };
    (median, v[0], v[v.len() - 1])
}

/// One timing: GFLOP/s, the share of the kernel threads' cores the process got meanwhile, and the
/// dtype's peak measured right before and right after it (their mean).
#[derive(Clone, Copy, Debug)]
struct Sample {
    gflops: f64,
    cpu_share: Option<f64>,
    peak: f64,
}

/// The peak a dtype's GEMM is measured against, taken now: the float32 FMA peak, and for bfloat16
/// the faster of its two paths' peaks (vdpbf16ps pairs, or float32 FMA after widening).
fn peak_now(d: DType) -> f64 {
    let fma = peak::fma_f32_peak_gflops();
    match d {
        DType::BF16 => peak::dpbf16_peak_gflops().map_or(fma, |dp| dp.max(fma)),
        _ => fma,
    }
}

fn gemm_cmd(args: &[String]) -> Result<()> {
    let opts = parse_gemm_opts(args)?;
    let machine = peak::describe_cpu();
    let cal = calibrate::calibration()?;
    let paths = Cpu::global()?.gemm_paths();
    let nthreads = threads::num_threads();
    eprintln!("machine: {machine}");
    eprintln!("rounds: {}, sizes: {:?}", opts.rounds, opts.sizes);

    let mut rng = Rng::new(0x5eed_9e33);
    let mut benches: Vec<Box<dyn Bench>> = Vec::new();
    for &n in &opts.sizes {
        benches.push(Box::new(Square::<f32>::new(n, &mut rng)));
        benches.push(Box::new(Square::<bf16>::new(n, &mut rng)));
        benches.push(Box::new(Square::<f16>::new(n, &mut rng)));
    }
    // Warm-up (pack buffers, clocks), then the repetitions that make one timing last ~0.25 s.
    let mut reps = Vec::new();
    for b in &mut benches {
        b.run(1)?;
        let t = b.run(1)?;
        reps.push(((0.25 / t.max(1e-9)).ceil() as usize).clamp(1, 10_000));
    }

    let mut fma = Vec::new();
    let mut dp = Vec::new();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); benches.len()];
    for round in 0..opts.rounds {
        fma.push(peak::fma_f32_peak_gflops());
        if let Some(x) = peak::dpbf16_peak_gflops() {
            dp.push(x);
        }
        for (i, b) in benches.iter_mut().enumerate() {
            let n = b.n() as f64;
            // The peak right before and right after the timing: on a shared machine whose speed
            // drifts, each timing is set against the machine as it was meanwhile.
            let before = peak_now(b.dtype());
            let cpu0 = process_cpu_secs();
            let secs = b.run(reps[i])?;
            let cpu_share = cpu0
                .zip(process_cpu_secs())
                .map(|(c0, c1)| (c1 - c0) / (secs * nthreads as f64));
            let after = peak_now(b.dtype());
            samples[i].push(Sample {
                gflops: 2.0 * n * n * n * reps[i] as f64 / secs / 1e9,
                cpu_share,
                peak: (before + after) / 2.0,
            });
        }
        eprintln!("round {}/{} done", round + 1, opts.rounds);
    }

    let (fma_med, fma_min, fma_max) = stats(&fma);
    let dp_stats = (!dp.is_empty()).then(|| stats(&dp));
    // bfloat16 is measured against the faster of its two paths' peaks (vdpbf16ps pairs, or
    // float32 FMA after widening), whichever path was chosen.
    let peak_for = |d: DType| match (d, dp_stats) {
        (DType::BF16, Some((m, _, _))) => m.max(fma_med),
        _ => fma_med,
    };
    let gflops = |s: &[Sample]| s.iter().map(|x| x.gflops).collect::<Vec<_>>();
    let samples_of = |d: DType, n: usize| {
        benches
            .iter()
            .zip(&samples)
            .find(|(b, _)| b.dtype() == d && b.n() == n)
            .map(|(_, s)| s)
    };
    let median_of = |d: DType, n: usize| samples_of(d, n).map(|s| stats(&gflops(s)).0);
    // The median over rounds of the ratio to float32 within each round (taken seconds apart).
    let paired_ratio = |d: DType, n: usize| {
        samples_of(d, n)
            .zip(samples_of(DType::F32, n))
            .map(|(s, f)| {
                let r: Vec<f64> = s.iter().zip(f).map(|(x, f)| x.gflops / f.gflops).collect();
                stats(&r).0
            })
    };

    println!();
    println!(
        "GEMM C = A B, square n x n, output in the input dtype, {nthreads} threads, {} rounds interleaved",
        opts.rounds
    );
    println!("{machine}");
    println!("GEMM paths: {paths} (calibration: {:?})", cal.origin);
    println!(
        "calibration rates (GFLOP/s, * = chosen): {}",
        cal.describe()
    );
    println!(
        "peaks (GFLOP/s, median [min, max]): float32 FMA {fma_med:.1} [{fma_min:.1}, {fma_max:.1}]{}",
        dp_stats.map_or(
            String::from(", vdpbf16ps: not available"),
            |(m, lo, hi)| format!(", vdpbf16ps {m:.1} [{lo:.1}, {hi:.1}]")
        )
    );
    println!();
    println!(
        "| dtype | n | median GFLOP/s | min | max | peak GFLOP/s | of peak | of median peak | vs float32 | vs float32, of medians | cpu share |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut records = Vec::new();
    for ((b, s), &reps) in benches.iter().zip(&samples).zip(&reps) {
        let g = gflops(s);
        let (med, lo, hi) = stats(&g);
        let pk = peak_for(b.dtype());
        let fractions: Vec<f64> = s.iter().map(|x| x.gflops / x.peak).collect();
        let paired = stats(&fractions).0;
        let ratio = paired_ratio(b.dtype(), b.n());
        let ratio_of_medians = median_of(DType::F32, b.n()).map(|f| med / f);
        let shares: Vec<f64> = s.iter().filter_map(|x| x.cpu_share).collect();
        let share = (!shares.is_empty()).then(|| stats(&shares).0);
        let times = |r: Option<f64>| r.map_or(String::from("-"), |r| format!("{r:.2}x"));
        println!(
            "| {} | {} | {med:.1} | {lo:.1} | {hi:.1} | {pk:.1} | {:.1}% | {:.1}% | {} | {} | {} |",
            b.dtype(),
            b.n(),
            100.0 * paired,
            100.0 * med / pk,
            times(ratio),
            times(ratio_of_medians),
            share.map_or(String::from("-"), |x| format!("{:.0}%", 100.0 * x)),
        );
        records.push(serde_json::json!({
            "path": paths.get(b.dtype()).name(),
            "dtype": b.dtype().name(),
            "out_dtype": b.dtype().name(),
            "n": b.n(),
            "gflops": med,
            "min_gflops": lo,
            "max_gflops": hi,
            "peak_gflops": pk,
            "fraction_of_peak": paired,
            "fraction_of_median_peak": med / pk,
            "ratio_to_float32": ratio,
            "ratio_of_medians_to_float32": ratio_of_medians,
            "samples_peak_gflops": s.iter().map(|x| x.peak).collect::<Vec<_>>(),
            "cpu_share": share,
            "rounds": g.len(),
            "reps_per_round": reps,
            "samples_gflops": g,
        }));
    }
    // Each path's microkernel alone on one thread, its operands in cache: the ceiling of every
    // GEMM on the path, against one thread's share of the peak measured on all of them at once.
    println!();
    println!(
        "Microkernel alone, one thread, operands packed once and in cache (depth 128: a 64-wide \
         B panel of 32 KiB, in L1; depth 768: in L2); median of 3 timings of 0.1 s; peak: one \
         thread's share of the median peak"
    );
    println!();
    println!("| path | dtype | depth | GFLOP/s | peak per thread | of peak |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut micro = Vec::new();
    for path in GemmPath::ALL {
        let (dtype, pk) = if path == GemmPath::Avx512Bf16Dot {
            match dp_stats {
                Some((m, _, _)) => (DType::BF16, m),
                None => continue,
            }
        } else {
            (DType::F32, fma_med)
        };
        if !path.runs_here(dtype) || path == GemmPath::Scalar {
            continue;
        }
        let pk = pk / nthreads as f64;
        for depth in [128, 768] {
            let rates = (0..3)
                .map(|_| mp_kernels::gemm::microkernel_gflops(path, depth, 0.1))
                .collect::<mp_kernels::Result<Vec<f64>>>()?;
            let (rate, lo, hi) = stats(&rates);
            println!(
                "| {} | {dtype} | {depth} | {rate:.1} | {pk:.1} | {:.1}% |",
                path.name(),
                100.0 * rate / pk
            );
            micro.push(serde_json::json!({
                "path": path.name(),
                "dtype": dtype.name(),
                "depth": depth,
                "gflops": rate,
                "min_gflops": lo,
                "max_gflops": hi,
                "peak_per_thread_gflops": pk,
                "fraction_of_peak": rate / pk,
            }));
        }
    }

    let ratios: Vec<_> = opts
        .sizes
        .iter()
        .map(|&n| {
            let r = |d| paired_ratio(d, n);
            serde_json::json!({ "n": n, "bf16_over_f32": r(DType::BF16), "f16_over_f32": r(DType::F16) })
        })
        .collect();
    println!();
    println!(
        "of peak: the median over rounds of each timing's GFLOP/s against the peak measured right \
         before and right after it; vs float32: the median over rounds of the ratio within the \
         round. The columns after each are the plain ratios of the medians."
    );
    println!(
        "cpu share: CPU time of the process over wall time x {nthreads} threads; under ~95% the \
         cores were shared with other work during the timing (this machine may be shared), so \
         compare min/max before trusting a median."
    );

    let json = serde_json::json!({
        "benchmark": "gemm",
        "machine": {
            "description": machine,
            "threads": nthreads,
            "isa": format!("{:?}", Cpu::global()?.isa()),
        },
        "calibration": examples::calibration_json(cal),
        "peaks": {
            "fma_f32_gflops": fma_med,
            "fma_f32_samples": fma,
            "dpbf16_gflops": dp_stats.map(|s| s.0),
            "dpbf16_samples": dp,
        },
        "rounds": opts.rounds,
        "results": records,
        "microkernel": micro,
        "ratios": ratios,
    });
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", opts.out.display()))?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}
