//! `bench step-gemms`: every GEMM of one training step of the guide's model, timed alone.
//!
//! A step of `784 → units → units → 10` at batch `b` runs eight GEMMs: three forward, three
//! weight gradients and two input gradients (see [`step_gemms`]). Timing each one alone, in the step's dtypes and
//! transposes, shows where a step's time goes and which shapes fall short of the peak; the
//! remainder of the step (casts, ReLU backward, bias gradients, softmax, the optimizer) is what
//! `bench train`'s step time adds on top.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use mp_core::{Rng, bf16, f16};
use mp_kernels::Cpu;
use mp_kernels::gemm::{Gemm, GemmInput, GemmOutput, MatMut, MatRef};
use mp_kernels::peak;

use mp_kernels::cpu_time::process_cpu_secs;

/// One GEMM of the step: `C (m x n) = op(A) op(B)`.
#[derive(Clone, Copy, Debug)]
pub struct StepGemm {
    /// What it computes.
    pub name: &'static str,
    /// Whether A is stored transposed.
    pub trans_a: bool,
    /// Whether B is stored transposed.
    pub trans_b: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Depth.
    pub k: usize,
    /// Whether C is the float32 weight gradient (accumulated, `beta = 1`) rather than an
    /// activation in the compute dtype (`beta = 0`).
    pub f32_out: bool,
}

/// The GEMMs of one step of the guide's model (the first layer computes no input gradient).
pub fn step_gemms(batch: usize, units: usize) -> Vec<StepGemm> {
    let g = |name, trans_a, trans_b, m, n, k, f32_out| StepGemm {
        name,
        trans_a,
        trans_b,
        m,
        n,
        k,
        f32_out,
    };
    vec![
        g("fwd dense_1 x·W", false, false, batch, units, 784, false),
        g("fwd dense_2 x·W", false, false, batch, units, units, false),
        g("fwd dense_3 x·W", false, false, batch, 10, units, false),
        g("bwd dense_3 dW=xᵀ·dy", true, false, units, 10, batch, true),
        g("bwd dense_3 dx=dy·Wᵀ", false, true, batch, units, 10, false),
        g(
            "bwd dense_2 dW=xᵀ·dy",
            true,
            false,
            units,
            units,
            batch,
            true,
        ),
        g(
            "bwd dense_2 dx=dy·Wᵀ",
            false,
            true,
            batch,
            units,
            units,
            false,
        ),
        g("bwd dense_1 dW=xᵀ·dy", true, false, 784, units, batch, true),
    ]
}

/// Runs `f`, returning its wall seconds and the seconds it would have taken had its threads had
/// their cores (CPU seconds / threads): on a shared machine the second is the fairer figure.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    let (t, c) = (Instant::now(), process_cpu_secs());
    f()?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = match (c, process_cpu_secs()) {
        (Some(c0), Some(c1)) => (c1 - c0) / mp_kernels::threads::num_threads() as f64,
        _ => wall,
    };
    Ok((wall, if cpu > 0.0 { cpu.min(wall) } else { wall }))
}

fn time_one<T: GemmInput>(g: &StepGemm, reps: usize, rng: &mut Rng) -> Result<(f64, f64)> {
    let a: Vec<T> = (0..g.m * g.k)
        .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
        .collect();
    let b: Vec<T> = (0..g.k * g.n)
        .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
        .collect();
    if g.f32_out {
        // A weight gradient: accumulated into float32.
        time_into::<T, f32>(g, &a, &b, 1.0, reps)
    } else {
        time_into::<T, T>(g, &a, &b, 0.0, reps)
    }
}

/// The median (by CPU time) of `reps` timed runs of `g` into a C of `O`, after a warm-up run.
fn time_into<T: GemmInput, O: GemmOutput>(
    g: &StepGemm,
    a: &[T],
    b: &[T],
    beta: f32,
    reps: usize,
) -> Result<(f64, f64)> {
    // The stored shapes: op(A) is m x k, op(B) k x n.
    let av = if g.trans_a {
        MatRef::new(a, g.k, g.m).t()
    } else {
        MatRef::new(a, g.m, g.k)
    };
    let bv = if g.trans_b {
        MatRef::new(b, g.n, g.k).t()
    } else {
        MatRef::new(b, g.k, g.n)
    };
    let cpu = Cpu::global()?;
    let mut c = vec![O::ZERO; g.m * g.n];
    let mut times = vec![];
    for rep in 0..=reps {
        let t = timed(|| {
            cpu.gemm(
                av,
                bv,
                MatMut::new(&mut c, g.m, g.n),
                Gemm::new().scaled(1.0, beta),
            )?;
            Ok(())
        })?;
        // The first run is a warm-up: it faults in C's pages (a fresh, lazily zeroed
        // allocation), which a training step's reused buffers never pay.
        if rep > 0 {
            times.push(t);
        }
    }
    std::hint::black_box(&c);
    times.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(times[times.len() / 2])
}

/// Runs `bench step-gemms [--batch N] [--units N] [--reps N]`.
pub fn step_gemms_cmd(args: &[String]) -> Result<()> {
    let (mut batch, mut units, mut reps) = (8192usize, 4096usize, 3usize);
    let mut only: Option<usize> = None;
    let mut custom: Option<StepGemm> = None;
    let mut dtypes = vec!["f32".to_string(), "bf16".into(), "f16".into()];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || -> Result<usize> {
            it.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a}: not a number"))
        };
        match a.as_str() {
            "--batch" => batch = value()?,
            "--units" => units = value()?,
            "--reps" => reps = value()?,
            "--only" => only = Some(value()?),
            "--shape" => {
                // m,n,k,trans_a,trans_b,f32_out (0/1 flags)
                let v: Vec<usize> = it
                    .next()
                    .context("--shape needs m,n,k,ta,tb,f32out")?
                    .split(',')
                    .map(|x| x.trim().parse().context("--shape"))
                    .collect::<Result<_>>()?;
                if v.len() != 6 {
                    bail!("--shape needs m,n,k,ta,tb,f32out");
                }
                custom = Some(StepGemm {
                    name: "custom",
                    m: v[0],
                    n: v[1],
                    k: v[2],
                    trans_a: v[3] == 1,
                    trans_b: v[4] == 1,
                    f32_out: v[5] == 1,
                });
            }
            "--dtypes" => {
                dtypes = it
                    .next()
                    .context("--dtypes needs a value")?
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            other => bail!("unknown option {other:?} for bench step-gemms"),
        }
    }
    if batch == 0 || units == 0 || reps == 0 {
        bail!("batch, units and reps must be positive");
    }
    // The peaks, scaled like the GEMMs to the time the threads actually ran.
    let mut fma = 0.0;
    let (w, c) = timed(|| {
        fma = peak::fma_f32_peak_gflops();
        Ok(())
    })?;
    fma *= w / c;
    let mut dp = None;
    let (w, c) = timed(|| {
        dp = peak::dpbf16_peak_gflops();
        Ok(())
    })?;
    let dp = dp.map(|p| p * w / c);
    let mut rng = Rng::new(7);
    println!(
        "peaks: f32 FMA {fma:.1} GFLOP/s, vdpbf16ps {:.1} GFLOP/s; batch {batch}, units {units}; \
         times are CPU seconds per thread",
        dp.unwrap_or(f64::NAN)
    );
    println!("| GEMM | m | n | k | f32 ms | of peak | bf16 ms | of peak | f16 ms | of peak |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut totals = [0.0f64; 3];
    let gemms = match custom {
        Some(g) => vec![g],
        None => step_gemms(batch, units),
    };
    for (i, g) in gemms.into_iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let flop = 2.0 * (g.m * g.n * g.k) as f64;
        // Per dtype: the median by CPU time, as seconds had the threads had their cores.
        let mut run = |d: &str, f: fn(&StepGemm, usize, &mut Rng) -> Result<(f64, f64)>| {
            if dtypes.iter().any(|x| x == d) {
                Ok::<f64, anyhow::Error>(f(&g, reps, &mut rng)?.1)
            } else {
                Ok(f64::NAN)
            }
        };
        let t32 = run("f32", time_one::<f32>)?;
        let tb = run("bf16", time_one::<bf16>)?;
        let th = run("f16", time_one::<f16>)?;
        totals[0] += t32;
        totals[1] += tb;
        totals[2] += th;
        let pct = |t: f64, p: f64| 100.0 * flop / t / 1e9 / p;
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1}% | {:.1} | {:.1}% | {:.1} | {:.1}% |",
            g.name,
            g.m,
            g.n,
            g.k,
            t32 * 1e3,
            pct(t32, fma),
            tb * 1e3,
            pct(tb, dp.unwrap_or(fma)),
            th * 1e3,
            pct(th, fma),
        );
    }
    println!(
        "| total | | | | {:.1} | | {:.1} | | {:.1} | |",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
    Ok(())
}
