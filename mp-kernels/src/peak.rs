//! The machine's measured arithmetic peaks, the yardstick for GEMM efficiency.
//!
//! Each loop runs on every thread of [`crate::threads::pool`] at once (on the calling thread
//! when there is no pool): a fixed number of iterations of independent multiply-adds (12
//! accumulators, more than the FMA latency times the issue rate, so the loop is throughput-bound),
//! and reports total FLOP over wall time. Results are kept alive with [`std::hint::black_box`] so
//! nothing is optimised away.

use std::hint::black_box;
use std::time::Instant;

use crate::isa::Isa;
use crate::threads;

/// Iterations per thread of the 12-accumulator loop: about 0.2 s of 512-bit FMAs at ~3.5 GHz.
const ITERS: usize = 60_000_000;

/// Runs `f(iters)` on every pool thread at once (after a short warm-up), returns
/// `flop_per_iter * iters * threads / seconds / 1e9`.
fn measure(flop_per_iter: f64, iters: usize, f: fn(usize) -> f32) -> f64 {
    let pool = threads::pool();
    // Warm-up: wake the threads and let the clock ramp.
    pool.broadcast(|| black_box(f(iters / 20)));
    let start = Instant::now();
    let results = pool.broadcast(|| black_box(f(iters)));
    let secs = start.elapsed().as_secs_f64();
    black_box(results);
    flop_per_iter * iters as f64 * pool.current_num_threads() as f64 / secs / 1e9
}

/// The measured float32 multiply-add peak of the whole pool, GFLOP/s (one FMA = 2 FLOP): 512-bit
/// `vfmadd231ps` with AVX-512, 256-bit with AVX2, else plain multiply-adds.
pub fn fma_f32_peak_gflops() -> f64 {
    fma_f32_peak_gflops_with(ITERS)
}

/// [`fma_f32_peak_gflops`] with `iters` iterations per thread (the calibration's short loop).
pub fn fma_f32_peak_gflops_with(iters: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if Isa::Avx512.is_supported() {
            return measure(12.0 * 32.0, iters, |n| {
                // SAFETY: AVX-512 F is supported (checked above).
                unsafe { x86::fma512(n) }
            });
        }
        if Isa::Avx2.is_supported() {
            return measure(12.0 * 16.0, iters, |n| {
                // SAFETY: AVX2 and FMA are supported (checked above).
                unsafe { x86::fma256(n) }
            });
        }
    }
    measure(8.0 * 2.0, iters / 4, scalar_fma)
}

/// The measured `vdpbf16ps` peak of the whole pool, GFLOP/s (one 512-bit instruction = 32 lanes
/// x 2 products = 64 FLOP), or `None` without AVX512_BF16.
pub fn dpbf16_peak_gflops() -> Option<f64> {
    dpbf16_peak_gflops_with(ITERS)
}

/// [`dpbf16_peak_gflops`] with `iters` iterations per thread.
pub fn dpbf16_peak_gflops_with(iters: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if Isa::Avx512Bf16.is_supported() {
            return Some(measure(12.0 * 64.0, iters, |n| {
                // SAFETY: AVX512_BF16 is supported (checked above).
                unsafe { x86::dpbf16(n) }
            }));
        }
    }
    None
}

/// The bytes of this CPU's per-core L2 cache (Linux sysfs), else 1 MiB.
pub fn l2_bytes() -> usize {
    cache_bytes(2).unwrap_or(1 << 20)
}

/// The bytes of this CPU's last-level (L3) cache (Linux sysfs), else 8 MiB.
pub fn l3_bytes() -> usize {
    cache_bytes(3).unwrap_or(8 << 20)
}

fn cache_bytes(index: usize) -> Option<usize> {
    let s = std::fs::read_to_string(format!(
        "/sys/devices/system/cpu/cpu0/cache/index{index}/size"
    ))
    .ok()?;
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = num.parse().ok()?;
    Some(match unit {
        "K" => n << 10,
        "M" => n << 20,
        _ => n,
    })
    .filter(|&n| n > 0)
}

/// The measured memory bandwidth of the whole pool, GB/s, for a working set of `bytes` per
/// thread: every thread scales its own `bytes / 2` float32s into another `bytes / 2` (one read
/// and one write per element, as an elementwise op does), repeated for about 0.1 s; bytes read
/// plus bytes written over wall time. A working set within the L2 ([`l2_bytes`]) measures the
/// L2, one within the L3 ([`l3_bytes`]) the L3, one well beyond it DRAM.
pub fn bandwidth_gbs(bytes: usize) -> f64 {
    let n = (bytes / 8).max(16);
    let pool = threads::pool();
    let threads = pool.current_num_threads();
    let pass = |reps: usize| {
        pool.broadcast(|| {
            let x = vec![1.0f32; n];
            let mut y = vec![0.0f32; n];
            scale_passes(&x, &mut y, 1); // first touch
            let t = Instant::now();
            scale_passes(&x, &mut y, reps);
            let secs = t.elapsed().as_secs_f64();
            black_box(&y);
            secs
        })
    };
    // Passes for about 0.1 s, from a short trial.
    let trial = pass(4).into_iter().fold(0.0f64, f64::max).max(1e-9) / 4.0;
    let reps = ((0.1 / trial) as usize).clamp(4, 100_000);
    let secs = pass(reps).into_iter().fold(0.0f64, f64::max);
    (8 * n * reps * threads) as f64 / secs / 1e9
}

/// `y = 0.5 x`, `reps` times, on the widest vectors this CPU has.
fn scale_passes(x: &[f32], y: &mut [f32], reps: usize) {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512.is_supported() {
        // SAFETY: AVX-512 F is supported (checked above).
        return unsafe { x86::scale512(x, y, reps) };
    }
    scale_loop(x, y, reps);
}

#[inline(always)]
fn scale_loop(x: &[f32], y: &mut [f32], reps: usize) {
    for _ in 0..reps {
        for (y, x) in y.iter_mut().zip(black_box(x)) {
            *y = 0.5 * x;
        }
        black_box(&mut *y);
    }
}

/// One line about this machine: the CPU model (from `/proc/cpuinfo` when readable), the kernel
/// thread count and the instruction set GEMM uses.
pub fn describe_cpu() -> String {
    let model = cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{model}, {cores} cores, {} kernel threads, isa {:?}",
        threads::num_threads(),
        Isa::detect()
    )
}

fn scalar_fma(n: usize) -> f32 {
    let mut acc = [black_box(0.5f32); 8];
    let x = black_box(0.999_999f32);
    let y = black_box(0.000_001f32);
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = *a * x + y;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    #[target_feature(enable = "avx512f")]
    pub(super) fn scale512(x: &[f32], y: &mut [f32], reps: usize) {
        super::scale_loop(x, y, reps);
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn fma512(n: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(black_box(0.5)); 12];
        let x = _mm512_set1_ps(black_box(0.999_999));
        let y = _mm512_set1_ps(black_box(0.000_001));
        for _ in 0..n {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma256(n: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(black_box(0.5)); 12];
        let x = _mm256_set1_ps(black_box(0.999_999));
        let y = _mm256_set1_ps(black_box(0.000_001));
        for _ in 0..n {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let s = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn dpbf16(n: usize) -> f32 {
        // Pairs (1.0, 1.0) and (2^-20, 2^-20): the sums grow slowly and stay finite and normal.
        // SAFETY: __m512i and __m512bh are both 512-bit vectors of plain bits.
        let (a, b): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(black_box(
                    0x3f80_3f80u32 as i32,
                ))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(black_box(
                    0x3580_3580u32 as i32,
                ))),
            )
        };
        let mut acc = [_mm512_set1_ps(black_box(0.0)); 12];
        for _ in 0..n {
            for s in acc.iter_mut() {
                *s = _mm512_dpbf16_ps(*s, a, b);
            }
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
        _mm512_reduce_add_ps(s)
    }
}

/// The CPU model from `/proc/cpuinfo`, or the architecture.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
