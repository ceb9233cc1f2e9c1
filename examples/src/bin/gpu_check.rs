//! The prepared GPU check (built with `--features cuda`; `cargo xtask gpu-check --build` puts it
//! in `.gpu/`, `scripts/gpu-check.sh` runs it on a GPU machine without a Rust toolchain).
//!
//! 1. Every CUDA kernel and GEMM against the CPU kernels of `mp_kernels` on fresh random data
//!    (the seed is printed; `--seed N` replays it), with per-dtype bounds: bit-identical where
//!    the CPU and GPU run the same float32 operations (casts, ReLU, scaling, the loss gradient,
//!    the optimizer updates), normwise relative error bounds for sums, softmax and GEMMs. One
//!    PASS/FAIL line per kernel.
//! 2. The guide's model, `examples::Digits` (784 -> 4096 -> 4096 -> 10, float32 softmax),
//!    compiled as the guide does (RMSprop, sparse categorical cross-entropy, the dynamic loss
//!    scale under mixed_float16) and trained through `Trainer::fit` with the trainer placed on
//!    `Device::Cuda(0)`, so variables, optimizer slots and activations stay on the GPU and each
//!    batch is copied there. Synthetic data: features uniform in [0, 1), labels in 0..10.
//!    - Correctness (PASS/FAIL lines): the same model (same initial weights, same data) fit for
//!      3 steps of batch 512 on the CPU and on the GPU under float32 and mixed_bfloat16; the
//!      per-epoch losses (normwise) and the final weights (`Model::get_weights`, relative
//!      2-norm over the whole model) must agree within 1e-4 under float32, 2e-3 (losses) and
//!      2e-2 (weights) under mixed_bfloat16: `CompareFit` says why.
//!    - Speed (the table): per policy (float32, mixed_bfloat16, mixed_float16), one warm-up fit
//!      of 2 batches, then 3 fits of one epoch of `--steps` batches of 8192 each; ms/step is a
//!      fit's wall time (waited for to the end) over its steps: the median and the minimum of
//!      the fits, and the speedup of the median over float32.
//! 3. bfloat16 GEMM TFLOP/s at 8192^3 against the best measured over larger and smaller squares.
//!
//! It prints one markdown table and exits non-zero when any check fails.
//!
//! ```text
//! gpu_check [--seed N] [--steps N] [--quick]
//! ```
//!
//! `--steps N`: batches per timed fit (default 7, at least 5); `--quick`: fewer GEMM shapes and
//! sizes in sections 1 and 3.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use examples::Digits;
use mp_core::{
    DType, DTypeKind, Device, Element, Policy, PolicyKind, PolicyVisitor, Rng, bf16, compat, f16,
};
use mp_kernels::Cpu;
use mp_kernels::activation::Activation;
use mp_kernels::cuda::{self, CudaEpilogue, DeviceLabels, FiniteFlag, Gpu};
use mp_kernels::gemm::{Epilogue, Gemm, GemmInput, GemmOutput, MatMut, MatRef};
use mp_kernels::optim::{AdamParams, RmspropParams, SgdParams};
use mp_layers::{FitOptions, Layer, Model, SparseCategoricalCrossentropy, Trainer, Verbose};
use mp_optim::RmsProp;
use ndarray::{Array1, Array2, s};

/// One check's outcome.
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Default)]
struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let c = Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        };
        println!(
            "{} {:<44} {}",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
        self.checks.push(c);
    }

    /// Records a result, turning an error into a FAIL line.
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<(bool, String)>) {
        match f() {
            Ok((ok, detail)) => self.add(name, ok, detail),
            Err(e) => self.add(name, false, format!("error: {e:#}")),
        }
    }
}

/// Bit equality, NaN equal to NaN (payloads may differ only where documented).
fn same_bits(got: &[f32], want: &[f32]) -> (bool, String) {
    let bad = got
        .iter()
        .zip(want)
        .position(|(g, w)| !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())));
    match bad {
        None if got.len() == want.len() => (true, format!("bit-identical, {} values", got.len())),
        None => (false, format!("length {} vs {}", got.len(), want.len())),
        Some(i) => (false, format!("[{i}]: gpu {:e}, cpu {:e}", got[i], want[i])),
    }
}

/// Normwise relative error `max|g - w| / max|w|` against `bound`; NaNs must match.
fn normwise(got: &[f32], want: &[f32], bound: f64) -> (bool, String) {
    if got.len() != want.len() {
        return (false, format!("length {} vs {}", got.len(), want.len()));
    }
    let mut err = 0.0f64;
    let mut scale = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || w.is_nan() {
            if g.is_nan() != w.is_nan() {
                return (false, format!("[{i}]: gpu {g}, cpu {w} (NaN mismatch)"));
            }
            continue;
        }
        err = err.max((f64::from(g) - f64::from(w)).abs());
        scale = scale.max(f64::from(w).abs());
    }
    let rel = err / scale.max(f64::MIN_POSITIVE);
    (
        rel <= bound,
        format!("normwise rel err {rel:.2e} (bound {bound:.0e})"),
    )
}

fn to_f32<E: Element>(v: &[E]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn random<E: Element>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<E> {
    (0..n).map(|_| E::from_f32(rng.uniform(lo, hi))).collect()
}

fn main() -> Result<()> {
    mp_core::dist::single_process("gpu_check (checks of one GPU)", "run it once per GPU")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut steps = 7usize;
    let mut quick = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => seed = it.next().context("--seed needs a value")?.parse()?,
            "--steps" => steps = it.next().context("--steps needs a value")?.parse()?,
            "--quick" => quick = true,
            other => {
                bail!("unknown option {other:?}; usage: gpu_check [--seed N] [--steps N] [--quick]")
            }
        }
    }
    let steps = steps.max(5);
    if !Gpu::available() {
        bail!(
            "no CUDA driver or device: {}",
            Device::cuda(0).map_or_else(|e| e.to_string(), |_| "?".into())
        );
    }
    let gpu = Gpu::new(0)?;
    println!(
        "# mp GPU check\n\ndevice: {gpu:?}, {} SMs, seed {seed}\n",
        gpu.sm_count()
    );
    for p in Policy::ALL {
        println!("{}\n", compat::check_gpu(p, gpu.name(), gpu.capability()));
    }
    let mut report = Report::default();
    let mut rng = Rng::new(seed);
    kernel_checks(&gpu, &mut rng, &mut report);
    gemm_checks(&gpu, &mut rng, &mut report, quick);
    // The guide's model through `fit`: the CPU and the GPU agree, then the GPU's speed.
    let device = Device::cuda(gpu.ordinal())?;
    let (cx, cy) = synthetic(CHECK_BATCH, seed ^ 0xc0de)?;
    for (policy, loss_bound, weight_bound) in FIT_BOUNDS {
        let name = format!(
            "fit cpu vs gpu {} ({CHECK_STEPS} x {CHECK_BATCH})",
            policy.name()
        );
        let compare = CompareFit {
            device,
            x: &cx,
            y: &cy,
            loss_bound,
            weight_bound,
        };
        match policy.dispatch(compare) {
            Ok([losses, weights]) => {
                report.add(format!("{name}: losses"), losses.0, losses.1);
                report.add(format!("{name}: weights"), weights.0, weights.1);
            }
            Err(e) => report.add(name, false, format!("error: {e:#}")),
        }
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    println!("\n{} checks, {failed} failed\n", report.checks.len());

    let (tx, ty) = synthetic(steps * TIME_BATCH, seed ^ 0x5eed)?;
    let mut rows = vec![];
    let mut base = None;
    for policy in [Policy::Float32, Policy::MixedBFloat16, Policy::MixedFloat16] {
        let timing = TimeFit {
            gpu: &gpu,
            device,
            x: &tx,
            y: &ty,
            steps,
        };
        match policy.dispatch(timing) {
            Ok(t) => {
                if policy == Policy::Float32 {
                    base = Some(t.median_ms);
                }
                rows.push(format!(
                    "| fit, {} (batch {TIME_BATCH}) | {:.2} ms/step (min {:.2}; {TIMED_FITS} fits x {steps} steps) | {} | loss {:.4}; {} |",
                    policy.name(),
                    t.median_ms,
                    t.min_ms,
                    base.map_or_else(|| "n/a".into(), |b| format!("{:.2}x", b / t.median_ms)),
                    t.loss,
                    t.note
                ));
            }
            Err(e) => {
                report.add(format!("fit {}", policy.name()), false, format!("{e:#}"));
                rows.push(format!("| fit, {} | error | | {e:#} |", policy.name()));
            }
        }
    }
    match gemm_tflops(&gpu, quick) {
        Ok((at_8192, peak, peak_n)) => rows.push(format!(
            "| bf16 GEMM 8192^3 (bf16 out, f32 accumulate) | {at_8192:.1} TFLOP/s | {:.0}% of measured peak | measured peak {peak:.1} TFLOP/s at {peak_n}^3 |",
            100.0 * at_8192 / peak
        )),
        Err(e) => {
            report.add("bf16 GEMM TFLOP/s", false, format!("{e:#}"));
        }
    }
    println!("| what | time / rate | vs float32 / peak | notes |\n|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    }
    println!("\nall {} checks passed", report.checks.len());
    Ok(())
}

fn kernel_checks(gpu: &Gpu, rng: &mut Rng, report: &mut Report) {
    let n = 1_000_003;
    // Casts: every pair, with NaN, infinities, subnormals and ties planted.
    let mut x: Vec<f32> = (0..n)
        .map(|_| rng.uniform(-70000.0, 70000.0) * rng.uniform(0.0, 1.0).powi(8))
        .collect();
    for (i, v) in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        f32::from_bits(5),
        -0.0,
        65520.0,
    ]
    .into_iter()
    .enumerate()
    {
        x[i * 7919] = v;
    }
    report.run("cast f32 -> bf16 -> f32", || cast_chain::<bf16>(gpu, &x));
    report.run("cast f32 -> f16 -> f32", || cast_chain::<f16>(gpu, &x));
    report.run("cast bf16 -> f16", || cast_pair::<bf16, f16>(gpu, &x));
    report.run("cast f16 -> bf16", || cast_pair::<f16, bf16>(gpu, &x));

    // ReLU forward/backward and scaling, per dtype.
    report.run("relu fwd/bwd f32", || relu_check::<f32>(gpu, rng));
    report.run("relu fwd/bwd f16", || relu_check::<f16>(gpu, rng));
    report.run("relu fwd/bwd bf16", || relu_check::<bf16>(gpu, rng));
    report.run("scale + all_finite f32", || scale_check::<f32>(gpu, rng));
    report.run("scale + all_finite f16", || scale_check::<f16>(gpu, rng));
    report.run("scale + all_finite bf16", || scale_check::<bf16>(gpu, rng));
    report.run("unscale_and_check (+ planted inf)", || {
        unscale_check(gpu, rng)
    });

    // Reductions and the loss.
    report.run("bias_grad f32 (8192 x 4096)", || {
        bias_grad_check::<f32>(gpu, rng, 8192, 4096, 1e-5)
    });
    report.run("bias_grad f16 (8192 x 4096)", || {
        bias_grad_check::<f16>(gpu, rng, 8192, 4096, 1e-5)
    });
    report.run("bias_grad bf16 (8192 x 10, accumulate)", || {
        bias_grad_check::<bf16>(gpu, rng, 8192, 10, 1e-5)
    });
    report.run("bias_grad bf16 (3 x 1000)", || {
        bias_grad_check::<bf16>(gpu, rng, 3, 1000, 1e-6)
    });
    report.run("softmax f32 (8192 x 10)", || {
        softmax_check::<f32>(gpu, rng, 8192, 10)
    });
    report.run("softmax bf16 (1000 x 1000)", || {
        softmax_check::<bf16>(gpu, rng, 1000, 1000)
    });
    report.run("softmax f16 (517 x 77)", || {
        softmax_check::<f16>(gpu, rng, 517, 77)
    });
    report.run("cross-entropy rows, grad, fused (8192 x 10)", || {
        xent_check(gpu, rng, 8192, 10)
    });
    report.run("cross-entropy rows, grad, fused (33 x 300)", || {
        xent_check(gpu, rng, 33, 300)
    });

    // Optimizers: bit-identical to the CPU.
    report.run("sgd (plain, momentum, nesterov)", || sgd_check(gpu, rng));
    report.run("rmsprop (plain, momentum)", || rmsprop_check(gpu, rng));
    report.run("adam", || adam_check(gpu, rng));
}

fn cast_chain<E: Element>(gpu: &Gpu, x: &[f32]) -> Result<(bool, String)> {
    let mut want = vec![E::ZERO; x.len()];
    Cpu::global()?.cast(x, &mut want)?;
    let dx = gpu.upload(x)?;
    let mut d = gpu.zeros::<E>(x.len())?;
    cuda::cast(gpu, &dx, &mut d)?;
    let mut back = gpu.zeros::<f32>(x.len())?;
    cuda::cast(gpu, &d, &mut back)?;
    let got16 = d.to_host()?;
    // The 16-bit results, bit for bit (NaN payload included).
    let bits = |v: &[E]| -> Vec<u16> {
        v.iter()
            .map(|e| {
                let f = e.to_f32();
                if E::DTYPE == DType::F16 {
                    f16::from_f32(f).to_bits()
                } else {
                    bf16::from_f32(f).to_bits()
                }
            })
            .collect()
    };
    if bits(&got16) != bits(&want) {
        let i = bits(&got16)
            .iter()
            .zip(bits(&want))
            .position(|(a, b)| *a != b)
            .unwrap_or(0);
        return Ok((
            false,
            format!(
                "[{i}] x={:e}: gpu {:e}, cpu {:e}",
                x[i],
                got16[i].to_f32(),
                want[i].to_f32()
            ),
        ));
    }
    Ok(same_bits(&back.to_host()?, &to_f32(&want)))
}

fn cast_pair<S: Element, D: Element>(gpu: &Gpu, x: &[f32]) -> Result<(bool, String)> {
    let s: Vec<S> = x.iter().map(|&v| S::from_f32(v)).collect();
    let mut want = vec![D::ZERO; x.len()];
    Cpu::global()?.cast(&s, &mut want)?;
    let ds = gpu.upload(&s)?;
    let mut dd = gpu.zeros::<D>(x.len())?;
    cuda::cast(gpu, &ds, &mut dd)?;
    Ok(same_bits(&to_f32(&dd.to_host()?), &to_f32(&want)))
}

fn relu_check<T: Element>(gpu: &Gpu, rng: &mut Rng) -> Result<(bool, String)> {
    let n = 300_001;
    let mut x: Vec<T> = random(rng, n, -3.0, 3.0);
    x[17] = T::from_f32(f32::NAN);
    x[18] = T::from_f32(-0.0);
    let mut dy: Vec<T> = random(rng, n, -1.0, 1.0);
    dy[19] = T::from_f32(f32::INFINITY);
    let cpu = Cpu::global()?;
    let mut y = vec![T::ZERO; n];
    cpu.activation(Activation::Relu, &x, &mut y)?;
    let mut dx = vec![T::ZERO; n];
    cpu.activation_backward(Activation::Relu, &dy, &y, &mut dx)?;
    let (dxs, ddy) = (gpu.upload(&x)?, gpu.upload(&dy)?);
    let mut dys = gpu.zeros::<T>(n)?;
    cuda::relu_forward(gpu, &dxs, &mut dys)?;
    let mut ddx = gpu.zeros::<T>(n)?;
    cuda::relu_backward(gpu, &ddy, &dys, &mut ddx)?;
    let mut inplace = gpu.upload(&dy)?;
    cuda::relu_backward_inplace(gpu, &mut inplace, &dys)?;
    let mut fwd_inplace = gpu.upload(&x)?;
    cuda::relu_forward_inplace(gpu, &mut fwd_inplace)?;
    for (got, want) in [
        (dys.to_host()?, &y),
        (fwd_inplace.to_host()?, &y),
        (ddx.to_host()?, &dx),
        (inplace.to_host()?, &dx),
    ] {
        let r = same_bits(&to_f32(&got), &to_f32(want));
        if !r.0 {
            return Ok(r);
        }
    }
    Ok((
        true,
        format!("bit-identical, {n} values, forward/backward, in place too"),
    ))
}

fn scale_check<T: Element>(gpu: &Gpu, rng: &mut Rng) -> Result<(bool, String)> {
    let n = 200_003;
    let x: Vec<T> = random(rng, n, -100.0, 100.0);
    let mut want = x.clone();
    Cpu::global()?.scale(&mut want, 0.37);
    let mut d = gpu.upload(&x)?;
    cuda::scale(gpu, &mut d, 0.37)?;
    let r = same_bits(&to_f32(&d.to_host()?), &to_f32(&want));
    if !r.0 {
        return Ok(r);
    }
    let mut flag = FiniteFlag::new(gpu)?;
    cuda::all_finite(gpu, &d, &mut flag)?;
    let clean = flag.all_finite()?;
    let mut bad = x.clone();
    bad[n - 1] = T::from_f32(f32::NAN);
    cuda::all_finite(gpu, &gpu.upload(&bad)?, &mut flag)?;
    let caught = !flag.all_finite()?;
    Ok((
        clean && caught,
        format!("scale bit-identical; all_finite clean={clean}, NaN caught={caught}"),
    ))
}

fn unscale_check(gpu: &Gpu, rng: &mut Rng) -> Result<(bool, String)> {
    let n = 4_000_037;
    let inv = (1.0 / 32768.0f64) as f32;
    let g: Vec<f32> = random(rng, n, -3e4, 3e4);
    let mut want = g.clone();
    let cpu_ok = Cpu::global()?.unscale_and_check(&mut want, inv);
    let mut d = gpu.upload(&g)?;
    let mut flag = FiniteFlag::new(gpu)?;
    cuda::unscale_and_check(gpu, &mut d, inv, &mut flag)?;
    let gpu_ok = flag.all_finite()?;
    let r = same_bits(&d.to_host()?, &want);
    let mut bad = g.clone();
    bad[n / 3] = f32::INFINITY;
    flag.reset(gpu)?;
    let mut db = gpu.upload(&bad)?;
    cuda::unscale_and_check(gpu, &mut db, inv, &mut flag)?;
    let caught = !flag.all_finite()?;
    Ok((
        r.0 && cpu_ok && gpu_ok && caught,
        format!(
            "{}; clean flag ok={gpu_ok}, planted inf caught={caught}",
            r.1
        ),
    ))
}

fn bias_grad_check<T: Element>(
    gpu: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    bound: f64,
) -> Result<(bool, String)> {
    let dy: Vec<T> = random(rng, rows * cols, -1.0, 1.0);
    let init: Vec<f32> = random(rng, cols, -1.0, 1.0);
    let accumulate = cols == 10;
    let mut want = init.clone();
    Cpu::global()?.bias_grad(&dy, rows, cols, &mut want, accumulate)?;
    let mut d = gpu.upload(&init)?;
    cuda::bias_grad(gpu, &gpu.upload(&dy)?, rows, cols, &mut d, accumulate)?;
    // Sums of `rows` terms in another order: bound the error by the sum of magnitudes.
    let got = d.to_host()?;
    let mut worst = 0.0f64;
    for c in 0..cols {
        let mag: f64 = (0..rows)
            .map(|r| f64::from(dy[r * cols + c].to_f32()).abs())
            .sum::<f64>()
            + f64::from(init[c]).abs();
        worst = worst.max((f64::from(got[c]) - f64::from(want[c])).abs() / mag.max(1e-30));
    }
    Ok((
        worst <= bound,
        format!("max |gpu - cpu| / sum|dy| = {worst:.2e} (bound {bound:.0e})"),
    ))
}

fn softmax_check<T: Element>(
    gpu: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
) -> Result<(bool, String)> {
    let mut x: Vec<T> = random(rng, rows * cols, -20.0, 20.0);
    x[cols + 1] = T::from_f32(f32::NAN);
    let mut want = vec![0.0f32; rows * cols];
    Cpu::global()?.softmax(&x, rows, cols, &mut want)?;
    let mut d = gpu.zeros::<f32>(rows * cols)?;
    cuda::softmax(gpu, &gpu.upload(&x)?, rows, cols, &mut d)?;
    let got = d.to_host()?;
    let err = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| !(g.is_nan() && w.is_nan()))
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    let nan_row = got[cols..2 * cols].iter().all(|v| v.is_nan());
    Ok((
        err <= 1e-6 && nan_row,
        format!("max abs err {err:.2e} (bound 1e-6), NaN row all NaN: {nan_row}"),
    ))
}

fn xent_check(gpu: &Gpu, rng: &mut Rng, rows: usize, cols: usize) -> Result<(bool, String)> {
    let logits: Vec<f32> = random(rng, rows * cols, -8.0, 8.0);
    let labels: Vec<u32> = (0..rows)
        .map(|_| (rng.next_u64() % cols as u64) as u32)
        .collect();
    let scale = 32768.0;
    let cpu = Cpu::global()?;
    let mut probs = vec![0.0f32; rows * cols];
    cpu.softmax(&logits, rows, cols, &mut probs)?;
    let mut rows_logits = vec![0.0f32; rows];
    cpu.softmax_cross_entropy_rows(&logits, &labels, rows, cols, true, &mut rows_logits)?;
    let mut rows_probs = vec![0.0f32; rows];
    cpu.softmax_cross_entropy_rows(&probs, &labels, rows, cols, false, &mut rows_probs)?;
    let mut grad = vec![0.0f32; rows * cols];
    cpu.softmax_cross_entropy_grad(&probs, &labels, rows, cols, scale, &mut grad)?;

    let dl = DeviceLabels::new(gpu, &labels, cols)?;
    let dlogits = gpu.upload(&logits)?;
    let dprobs = gpu.upload(&probs)?;
    let mut out = gpu.zeros::<f32>(rows)?;
    cuda::softmax_cross_entropy_rows(gpu, &dlogits, &dl, rows, cols, true, &mut out)?;
    let a = normwise(&out.to_host()?, &rows_logits, 1e-5);
    cuda::softmax_cross_entropy_rows(gpu, &dprobs, &dl, rows, cols, false, &mut out)?;
    let b = normwise(&out.to_host()?, &rows_probs, 1e-5);
    let mut dg = gpu.zeros::<f32>(rows * cols)?;
    cuda::softmax_cross_entropy_grad(gpu, &dprobs, &dl, rows, cols, scale, &mut dg)?;
    let c = same_bits(&dg.to_host()?, &grad);
    let (mut fp, mut fl, mut fg) = (
        gpu.zeros::<f32>(rows * cols)?,
        gpu.zeros::<f32>(rows)?,
        gpu.zeros::<f32>(rows * cols)?,
    );
    cuda::softmax_cross_entropy_fused(
        gpu, &dlogits, &dl, rows, cols, scale, &mut fp, &mut fl, &mut fg,
    )?;
    let fp = fp.to_host()?;
    let d = normwise(&fp, &probs, 1e-6);
    let e = normwise(&fl.to_host()?, &rows_probs, 1e-5);
    let f = normwise(&fg.to_host()?, &grad, 1e-5);
    // A label out of range is refused before upload.
    let refused = DeviceLabels::new(gpu, &[cols as u32], cols).is_err();
    let ok = a.0 && b.0 && c.0 && d.0 && e.0 && f.0 && refused;
    Ok((
        ok,
        format!(
            "loss(logits) {}; loss(probs) {}; grad {}; fused probs {}, loss {}, grad {}; bad label refused {refused}",
            a.1, b.1, c.1, d.1, e.1, f.1
        ),
    ))
}

fn sgd_check(gpu: &Gpu, rng: &mut Rng) -> Result<(bool, String)> {
    let n = 1_000_033;
    let var: Vec<f32> = random(rng, n, -1.0, 1.0);
    let g: Vec<f32> = random(rng, n, -0.1, 0.1);
    let m0: Vec<f32> = random(rng, n, -0.01, 0.01);
    for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
        let p = SgdParams {
            lr: 0.01,
            momentum,
            nesterov,
        };
        let (mut cv, mut cm) = (var.clone(), m0.clone());
        Cpu::global()?.sgd_update(&mut cv, &g, Some(&mut cm), p)?;
        let (mut dv, mut dm) = (gpu.upload(&var)?, gpu.upload(&m0)?);
        cuda::sgd_update(gpu, &mut dv, &gpu.upload(&g)?, Some(&mut dm), p, None)?;
        for r in [
            same_bits(&dv.to_host()?, &cv),
            same_bits(&dm.to_host()?, &cm),
        ] {
            if !r.0 {
                return Ok((
                    false,
                    format!("momentum {momentum} nesterov {nesterov}: {}", r.1),
                ));
            }
        }
    }
    Ok((true, format!("bit-identical, {n} values x 3 variants")))
}

fn rmsprop_check(gpu: &Gpu, rng: &mut Rng) -> Result<(bool, String)> {
    let n = 1_000_033;
    let var: Vec<f32> = random(rng, n, -1.0, 1.0);
    let g: Vec<f32> = random(rng, n, -0.1, 0.1);
    let v0: Vec<f32> = random(rng, n, 0.0, 0.01);
    for momentum in [0.0, 0.5] {
        let p = RmspropParams::new(1e-3, 0.9, momentum, 1e-7);
        let (mut cv, mut cvel, mut cm) = (var.clone(), v0.clone(), v0.clone());
        Cpu::global()?.rmsprop_update(&mut cv, &g, &mut cvel, Some(&mut cm), p)?;
        let (mut dv, mut dvel, mut dm) = (gpu.upload(&var)?, gpu.upload(&v0)?, gpu.upload(&v0)?);
        cuda::rmsprop_update(
            gpu,
            &mut dv,
            &gpu.upload(&g)?,
            &mut dvel,
            Some(&mut dm),
            p,
            None,
        )?;
        for r in [
            same_bits(&dv.to_host()?, &cv),
            same_bits(&dvel.to_host()?, &cvel),
            same_bits(&dm.to_host()?, &cm),
        ] {
            if !r.0 {
                return Ok((false, format!("momentum {momentum}: {}", r.1)));
            }
        }
    }
    Ok((true, format!("bit-identical, {n} values x 2 variants")))
}

fn adam_check(gpu: &Gpu, rng: &mut Rng) -> Result<(bool, String)> {
    let n = 1_000_033;
    let var: Vec<f32> = random(rng, n, -1.0, 1.0);
    let g: Vec<f32> = random(rng, n, -0.1, 0.1);
    let m0: Vec<f32> = random(rng, n, -0.01, 0.01);
    let v0: Vec<f32> = random(rng, n, 0.0, 0.01);
    let p = AdamParams::new(1e-3, 0.9, 0.999, 1e-7, 5);
    let (mut cv, mut cm, mut cs) = (var.clone(), m0.clone(), v0.clone());
    Cpu::global()?.adam_update(&mut cv, &g, &mut cm, &mut cs, p)?;
    let (mut dv, mut dm, mut ds) = (gpu.upload(&var)?, gpu.upload(&m0)?, gpu.upload(&v0)?);
    cuda::adam_update(gpu, &mut dv, &gpu.upload(&g)?, &mut dm, &mut ds, p, None)?;
    for r in [
        same_bits(&dv.to_host()?, &cv),
        same_bits(&dm.to_host()?, &cm),
        same_bits(&ds.to_host()?, &cs),
    ] {
        if !r.0 {
            return Ok(r);
        }
    }
    Ok((true, format!("bit-identical, {n} values")))
}

/// The normwise bound of a GEMM against the CPU: float32 accumulation in another order, plus one
/// rounding of the output.
fn gemm_bound(output: DType, k: usize) -> f64 {
    let accumulate = 4.0 * (k as f64).sqrt() * f64::from(f32::EPSILON);
    accumulate + 2.0 * output.unit_roundoff()
}

fn gemm_checks(gpu: &Gpu, rng: &mut Rng, report: &mut Report, quick: bool) {
    let shapes: &[(usize, usize, usize)] = if quick {
        &[(257, 33, 129), (64, 0, 8), (7, 5, 0)]
    } else {
        &[
            (257, 33, 129),
            (1, 1, 1),
            (128, 4096, 784),
            (1000, 10, 4096),
            (64, 0, 8),
            (7, 5, 0),
        ]
    };
    for &(m, n, k) in shapes {
        gemm_family::<f32, f32>(gpu, rng, report, m, n, k);
        gemm_family::<bf16, f32>(gpu, rng, report, m, n, k);
        gemm_family::<bf16, bf16>(gpu, rng, report, m, n, k);
        gemm_family::<f16, f32>(gpu, rng, report, m, n, k);
        gemm_family::<f16, f16>(gpu, rng, report, m, n, k);
    }
    // Mixed output dtypes go through float32 and the epilogue kernel.
    gemm_family::<bf16, f16>(gpu, rng, report, 257, 33, 129);
    gemm_family::<f32, bf16>(gpu, rng, report, 257, 33, 129);
    // Leading dimensions wider than the rows.
    report.run("gemm f32 with padded leading dimensions", || {
        gemm_one::<f32, f32>(gpu, rng, false, true, 100, 50, 70, 3, Some(true))
    });
    // TF32 only on request: with it, float32 GEMMs lose precision measurably.
    report.run("gemm f32 is real float32 (TF32 off)", || {
        let strict = gemm_one::<f32, f32>(gpu, rng, false, false, 512, 512, 2048, 0, None)?;
        gpu.set_allow_tf32(true);
        let tf32 = gemm_one::<f32, f32>(gpu, rng, false, false, 512, 512, 2048, 0, None);
        gpu.set_allow_tf32(false);
        Ok((
            strict.0,
            format!(
                "strict: {}; with TF32 allowed: {}",
                strict.1,
                tf32.map_or_else(|e| e.to_string(), |r| r.1)
            ),
        ))
    });
    // Whether cuBLASLt's fused ReLU keeps NaN (the CPU's does); informational.
    let probe = (|| -> Result<String> {
        let a = gpu.upload(&[f32::NAN, 1.0, 1.0, 1.0])?;
        let b = gpu.upload(&[1.0f32, 1.0, 1.0, 1.0])?;
        let mut c = gpu.zeros::<f32>(4)?;
        cuda::gemm(
            gpu,
            false,
            false,
            2,
            2,
            2,
            1.0,
            &a,
            2,
            &b,
            2,
            0.0,
            &mut c,
            2,
            CudaEpilogue::Relu,
        )?;
        Ok(format!("{:?}", c.to_host()?))
    })();
    println!(
        "INFO cuBLASLt fused ReLU on a NaN row (CPU keeps NaN): {}",
        probe.unwrap_or_else(|e| e.to_string())
    );
}

fn gemm_family<T: GemmInput, O: GemmOutput>(
    gpu: &Gpu,
    rng: &mut Rng,
    report: &mut Report,
    m: usize,
    n: usize,
    k: usize,
) {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for epi in [None, Some(false), Some(true)] {
            let name = format!(
                "gemm {}->{} {m}x{n}x{k} {}{} {}",
                T::DTYPE,
                O::DTYPE,
                if ta { "T" } else { "N" },
                if tb { "T" } else { "N" },
                match epi {
                    None => "plain",
                    Some(false) => "+bias",
                    Some(true) => "+bias+relu",
                }
            );
            report.run(&name, || {
                gemm_one::<T, O>(gpu, rng, ta, tb, m, n, k, 0, epi)
            });
        }
    }
}

/// One GEMM against the CPU: `C = epi(1.25 A B + beta C)` with `beta = 0.5` (or 0 with an
/// epilogue-free plain call, which must not read C). `pad` widens every leading dimension.
#[allow(clippy::too_many_arguments)]
fn gemm_one<T: GemmInput, O: GemmOutput>(
    gpu: &Gpu,
    rng: &mut Rng,
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    pad: usize,
    epi: Option<bool>,
) -> Result<(bool, String)> {
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    let (lda, ldb, ldc) = (ac + pad, bc + pad, n + pad);
    let a: Vec<T> = random(rng, ar * lda, -1.0, 1.0);
    let b: Vec<T> = random(rng, br * ldb, -1.0, 1.0);
    let mut c0: Vec<O> = random(rng, m * ldc, -1.0, 1.0);
    let beta = if epi.is_none() { 0.0 } else { 0.5 };
    if beta == 0.0 && !c0.is_empty() {
        c0[0] = O::from_f32(f32::NAN); // must not propagate
    }
    let bias: Vec<f32> = random(rng, n, -0.5, 0.5);
    let cpu_epi = match epi {
        None => Epilogue::None,
        Some(false) => Epilogue::Bias(bias.as_slice()),
        Some(true) => Epilogue::BiasRelu(bias.as_slice()),
    };
    let mut want = c0.clone();
    // The stored operands: A is `ar x ac` (op(A) = A^T when `ta`), B `br x bc`.
    let (va, vb) = (
        MatRef::new(&a, ar, ac).with_ld(lda),
        MatRef::new(&b, br, bc).with_ld(ldb),
    );
    Cpu::global()?.gemm(
        if ta { va.t() } else { va },
        if tb { vb.t() } else { vb },
        MatMut::new(&mut want, m, n).with_ld(ldc),
        Gemm {
            alpha: 1.25,
            beta,
            epilogue: cpu_epi,
        },
    )?;
    let (da, db, dbias) = (gpu.upload(&a)?, gpu.upload(&b)?, gpu.upload(&bias)?);
    let mut dc = gpu.upload(&c0)?;
    let gpu_epi = match epi {
        None => CudaEpilogue::None,
        Some(false) => CudaEpilogue::Bias(&dbias),
        Some(true) => CudaEpilogue::BiasRelu(&dbias),
    };
    cuda::gemm(
        gpu, ta, tb, m, n, k, 1.25, &da, lda, &db, ldb, beta, &mut dc, ldc, gpu_epi,
    )?;
    let got = dc.to_host()?;
    Ok(normwise(
        &to_f32(&got),
        &to_f32(&want),
        gemm_bound(O::DTYPE, k),
    ))
}

// ---------------------------------------------------------------------------------------------
// 2. The guide's model through `Trainer::fit` on the device
// ---------------------------------------------------------------------------------------------

/// The guide's input width (28 x 28 pixels) and hidden width.
const FEATURES: usize = 784;
const UNITS: usize = 4096;
/// The timed fits: the guide's batch, and how many fits of `--steps` batches each.
const TIME_BATCH: usize = 8192;
const TIMED_FITS: usize = 3;
/// The CPU-vs-GPU comparison: one batch per epoch, so each epoch's loss is one step's.
const CHECK_BATCH: usize = 512;
const CHECK_STEPS: usize = 3;

/// `rows` random samples: features uniform in [0, 1) of width 784, labels uniform in 0..10.
fn synthetic(rows: usize, seed: u64) -> Result<(Array2<f32>, Array1<u32>)> {
    let mut rng = Rng::new(seed);
    let x = Array2::from_shape_vec((rows, FEATURES), rng.uniform_vec(rows * FEATURES, 0.0, 1.0))?;
    let y = Array1::from_shape_fn(rows, |_| rng.below(10) as u32);
    Ok((x, y))
}

/// The guide's model, built (its initial weights depend only on the layer names, so every call
/// builds the same ones), compiled as the guide does (RMSprop, sparse categorical cross-entropy;
/// `compile` adds the dynamic loss scale under mixed_float16) and placed on `device`.
fn guide_trainer<P: PolicyKind>(device: Device) -> Result<Trainer<Digits<P>, RmsProp>> {
    let mut model = Digits::<P>::guide(UNITS);
    model.build(&[FEATURES])?;
    let trainer = Trainer::compile(
        model,
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    Ok(trainer.to_device(device)?)
}

/// `epochs` epochs in batches of `batch_size`, in order, nothing held out, nothing printed.
fn fit_options(batch_size: usize, epochs: usize) -> FitOptions {
    FitOptions {
        batch_size,
        epochs,
        validation_split: 0.0,
        shuffle: false,
        seed: 0,
        verbose: Verbose::Silent,
        gradient_accumulation_steps: 1,
    }
}

/// The timing of one policy's `fit`.
struct FitTiming {
    median_ms: f64,
    min_ms: f64,
    loss: f32,
    note: String,
}

/// Times `fit` of the guide's model on the device under one policy.
struct TimeFit<'a> {
    gpu: &'a Gpu,
    device: Device,
    x: &'a Array2<f32>,
    y: &'a Array1<u32>,
    steps: usize,
}

impl PolicyVisitor for TimeFit<'_> {
    type Output = Result<FitTiming>;

    fn visit<P: PolicyKind>(self) -> Result<FitTiming> {
        let mut trainer = guide_trainer::<P>(self.device)?;
        // Warm-up: two batches load the kernels, plan the GEMMs, create the optimizer slots and
        // fill the allocator's caches.
        let warm = 2 * TIME_BATCH;
        trainer.fit(
            self.x.slice(s![..warm, ..]),
            self.y.slice(s![..warm]),
            &fit_options(TIME_BATCH, 1),
        )?;
        self.gpu.synchronize()?;
        // Timed: whole fits of one epoch of `steps` batches (gathering each batch on the host,
        // copying it over, reading the loss back), waited for to the end.
        let mut times = vec![];
        let mut logs = vec![];
        for _ in 0..TIMED_FITS {
            let t = Instant::now();
            let history = trainer.fit(self.x.view(), self.y.view(), &fit_options(TIME_BATCH, 1))?;
            self.gpu.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3 / self.steps as f64);
            logs.extend(history.epochs);
        }
        times.sort_by(f64::total_cmp);
        let last = logs.last().context("fit ran no epoch")?;
        if !last.loss.is_finite() {
            bail!("{}: the loss is {}", P::POLICY.name(), last.loss);
        }
        let compute = <P::Compute as DTypeKind>::DTYPE;
        let note = match last.loss_scale {
            Some(scale) => format!(
                "{compute} compute, loss scale {scale}, {} of {} timed steps skipped",
                logs.iter().map(|l| l.skipped_steps).sum::<u64>(),
                TIMED_FITS * self.steps
            ),
            None => format!("{compute} compute"),
        };
        Ok(FitTiming {
            median_ms: times[times.len() / 2],
            min_ms: times[0],
            loss: last.loss,
            note,
        })
    }
}

/// What a short fit leaves: the per-epoch losses and every variable's final value on the host.
type FitResult = (Vec<f32>, Vec<(String, Vec<f32>)>);

/// The bounds of the CPU-vs-GPU fit comparison per policy: (losses, weights), see [`CompareFit`].
const FIT_BOUNDS: [(Policy, f64, f64); 2] = [
    (Policy::Float32, 1e-4, 1e-4),
    (Policy::MixedBFloat16, 2e-3, 2e-2),
];

/// Fits the guide's model for `CHECK_STEPS` steps (one batch per epoch) on the CPU and on the
/// device from the same initial weights and data, and compares the per-epoch losses (normwise,
/// `max |gpu - cpu| / max |cpu|`) and the final weights (relative 2-norm over the whole model,
/// `||gpu - cpu|| / ||cpu||`).
///
/// Why these measures and bounds. Both devices run the same float32 elementwise operations
/// (casts, ReLU, softmax, the loss gradient and RMSprop are bit-identical in section 1); what
/// differs is the accumulation order of the GEMMs (cuBLASLt's tiles and split-K against the
/// CPU's one chain per element) and of the bias-gradient and loss sums, a relative error of
/// ~sqrt(k) * 2^-24 per value. But RMSprop's first steps, `lr * g / (sqrt(v) + eps)` with `v`
/// starting at 0, are nearly `sign(g) * lr / sqrt(1 - rho)` (3.2e-3 per weight): a gradient
/// within rounding of 0 has its step flipped by any reordering, so a few weights can differ by up
/// to 6e-3 however correct both devices are, and an elementwise bound on the weights cannot
/// hold. The 2-norm counts how much of the model moved differently instead. Under
/// mixed_bfloat16 the activations and gradients between layers are rounded to bfloat16, and a
/// float32 result on the other side of a rounding boundary on one device is a bfloat16 ulp
/// (2^-8 relative) apart from then on, which flips more steps.
///
/// Measured on the CPU alone (two GEMM paths with different rounding or order, same model and
/// data, 3 steps of 512): float32 (scalar vs AVX-512 GEMM) weights 3.9e-8 (elementwise 4.9e-7),
/// losses 7.6e-8; mixed_bfloat16 (`vdpbf16ps` pairs vs AVX-512 widening) weights 8.7e-4
/// (elementwise 2.8e-2), losses 3.8e-5; and for scale, the same fit under float32 against
/// mixed_bfloat16: weights 1.1e-2, losses 3.4e-3. The bounds leave room for the GPU's other
/// order and catch any wrong operand, transpose, bias or update, which moves the weights by
/// O(1): float32 1e-4 for both (tight enough to catch TF32 slipping in: its 10-bit inputs
/// should move the weights ~1e-3, an estimate from the bfloat16 figures), mixed_bfloat16 2e-3
/// for the losses and 2e-2 for the weights.
struct CompareFit<'a> {
    device: Device,
    x: &'a Array2<f32>,
    y: &'a Array1<u32>,
    loss_bound: f64,
    weight_bound: f64,
}

impl PolicyVisitor for CompareFit<'_> {
    type Output = Result<[(bool, String); 2]>;

    fn visit<P: PolicyKind>(self) -> Result<[(bool, String); 2]> {
        let run = |device: Device| -> Result<FitResult> {
            let mut trainer = guide_trainer::<P>(device)?;
            let history = trainer.fit(
                self.x.view(),
                self.y.view(),
                &fit_options(CHECK_BATCH, CHECK_STEPS),
            )?;
            let losses = history.get("loss").context("no loss in the history")?;
            let weights = trainer
                .model_mut()
                .get_weights()?
                .into_iter()
                .map(|(name, w)| Ok((name, w.to_device(Device::Cpu)?.to_f32_vec()?)))
                .collect::<Result<Vec<_>>>()?;
            Ok((losses, weights))
        };
        let (cpu_losses, cpu_weights) = run(Device::Cpu)?;
        let (gpu_losses, gpu_weights) = run(self.device)?;
        let losses = if cpu_losses.iter().all(|l| l.is_finite()) {
            let (ok, detail) = normwise(&gpu_losses, &cpu_losses, self.loss_bound);
            (
                ok,
                format!("{detail}; gpu {gpu_losses:?}, cpu {cpu_losses:?}"),
            )
        } else {
            (
                false,
                format!("the CPU losses are not finite: {cpu_losses:?}"),
            )
        };
        let weights = weights_rel2(&gpu_weights, &cpu_weights, self.weight_bound);
        Ok([losses, weights])
    }
}

/// The relative 2-norm error of a whole model's weights, `||gpu - cpu|| / ||cpu||` over every
/// value of every variable (sums in float64), with the elementwise `max |gpu - cpu| / max |cpu|`
/// and the variable of the largest relative 2-norm error for information. Any non-finite
/// weight fails.
fn weights_rel2(
    gpu: &[(String, Vec<f32>)],
    cpu: &[(String, Vec<f32>)],
    bound: f64,
) -> (bool, String) {
    let gpu_names: Vec<&str> = gpu.iter().map(|(n, _)| n.as_str()).collect();
    let cpu_names: Vec<&str> = cpu.iter().map(|(n, _)| n.as_str()).collect();
    if gpu_names != cpu_names {
        return (
            false,
            format!("variables differ: gpu {gpu_names:?}, cpu {cpu_names:?}"),
        );
    }
    let (mut err2, mut norm2, mut err_max, mut scale_max) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut worst, mut worst_rel, mut count) = ("", 0.0f64, 0usize);
    for ((name, g), (_, w)) in gpu.iter().zip(cpu) {
        if g.len() != w.len() {
            return (false, format!("{name}: length {} vs {}", g.len(), w.len()));
        }
        if let Some(i) = g
            .iter()
            .zip(w)
            .position(|(g, w)| !g.is_finite() || !w.is_finite())
        {
            return (false, format!("{name}[{i}]: gpu {}, cpu {}", g[i], w[i]));
        }
        let (mut e2, mut n2) = (0.0f64, 0.0f64);
        for (&g, &w) in g.iter().zip(w) {
            let (g, w) = (f64::from(g), f64::from(w));
            e2 += (g - w) * (g - w);
            n2 += w * w;
            err_max = err_max.max((g - w).abs());
            scale_max = scale_max.max(w.abs());
        }
        let rel = (e2 / n2.max(f64::MIN_POSITIVE)).sqrt();
        if rel > worst_rel {
            (worst, worst_rel) = (name.as_str(), rel);
        }
        (err2, norm2, count) = (err2 + e2, norm2 + n2, count + w.len());
    }
    let rel = (err2 / norm2.max(f64::MIN_POSITIVE)).sqrt();
    let elementwise = err_max / scale_max.max(f64::MIN_POSITIVE);
    let at = if worst.is_empty() {
        String::new()
    } else {
        format!(", largest in {worst}: {worst_rel:.2e}")
    };
    (
        rel <= bound,
        format!(
            "rel 2-norm err {rel:.2e} (bound {bound:.0e}) over {count} weights in {} \
             variables{at}; elementwise {elementwise:.2e}",
            cpu.len()
        ),
    )
}

/// bfloat16 GEMM throughput: 8192^3, and the best over a few squares (the measured peak).
fn gemm_tflops(gpu: &Gpu, quick: bool) -> Result<(f64, f64, usize)> {
    let sizes: &[usize] = if quick {
        &[8192]
    } else {
        &[4096, 8192, 12288, 16384]
    };
    let mut at_8192 = 0.0;
    let (mut peak, mut peak_n) = (0.0f64, 0usize);
    for &n in sizes {
        let a = gpu.zeros::<bf16>(n * n)?;
        let mut rng = Rng::new(n as u64);
        let host: Vec<bf16> = random(&mut rng, n * n, -1.0, 1.0);
        let mut a = a;
        a.copy_from_host(&host)?;
        let b = gpu.upload(&host)?;
        let mut c = gpu.zeros::<bf16>(n * n)?;
        let run = |c: &mut mp_core::cuda::CudaBuf<bf16>| {
            cuda::gemm(
                gpu,
                false,
                false,
                n,
                n,
                n,
                1.0,
                &a,
                n,
                &b,
                n,
                0.0,
                c,
                n,
                CudaEpilogue::None,
            )
        };
        for _ in 0..3 {
            run(&mut c)?;
        }
        gpu.synchronize()?;
        let reps = if n >= 12288 { 5 } else { 10 };
        let mut times = vec![];
        for _ in 0..reps {
            let t = Instant::now();
            run(&mut c)?;
            gpu.synchronize()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let tflops = 2.0 * (n as f64).powi(3) / times[times.len() / 2] / 1e12;
        if n == 8192 {
            at_8192 = tflops;
        }
        if tflops > peak {
            (peak, peak_n) = (tflops, n);
        }
    }
    Ok((at_8192, peak, peak_n))
}
