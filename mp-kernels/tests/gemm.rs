//! GEMM against a float64 reference, on every GEMM path this CPU can run for each input dtype
//! ([`GemmPath::candidates`], each forced through [`Cpu::with_gemm_paths`]).
//!
//! # Error bounds
//! The reference is the float64 product of the inputs *as stored* (already rounded to their
//! dtype), so what is measured is the kernel's own error: the float32 accumulation and, for a
//! 16-bit output, the final rounding.
//!
//! With `u = 2^-24` (float32 unit roundoff), `S_ij = |alpha| sum_p |a_ip| |b_pj| + |beta c_ij| +
//! |bias_j|` and `K` multiply-adds per element (plus the alpha, beta and bias steps), the
//! worst-case bound for recursive float32 summation is `|c - ref| <= (K + 3) u S_ij` (Higham,
//! *Accuracy and Stability of Numerical Algorithms*, 3.1). It is far from sharp: rounding errors
//! are independent and centred, and Higham & Mary (SIAM J. Sci. Comput. 41, 2019) show that
//! `|c - ref| <= lambda sqrt(K + 3) u S_ij` holds with probability at least
//! `1 - 2 exp(-lambda^2 (1 - u)^2 / 2)`. We assert it per element with `lambda = 8` (failure
//! probability below 1e-13 per element), taking the smaller of the two bounds. `vdpbf16ps` (two
//! roundings per pair of k) and the portable path (separate multiply and add) make at most two
//! roundings per k, covered by a factor 2 on `u`.
//!
//! A 16-bit output adds one rounding to nearest: `u_out |x|` with `u_out = 2^-8` (bfloat16) or
//! `2^-11` (float16), plus half the smallest subnormal spacing for float16's gradual underflow.
//!
//! On the whole matrix, the relative Frobenius error `||C - ref|| / ||ref||` is also checked
//! against `2 sqrt(K + 3) u ||S|| / ||ref|| + u_out`; for float32 with random data in [-1, 1] this
//! is ~1e-6 at K = 4096, far under 1e-4 (asserted separately on a large case).

use half::{bf16, f16};
use mp_core::{DType, Element, Rng, rng::test_seed};
use mp_kernels::gemm::{
    Epilogue, Gemm, GemmInput, GemmOutput, GemmPath, GemmPaths, MatMut, MatRef,
};
use mp_kernels::{Cpu, Error, Isa, counters};

const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// The BLAS-style positional form on the views of [`Cpu::gemm`]: `op(A)` is `m x k` (A stored
/// `k x m` when `trans_a`), `op(B)` `k x n` (B stored `n x k` when `trans_b`), C `m x n`, each
/// with its row stride.
#[allow(clippy::too_many_arguments)]
fn gemm_on<T: GemmInput, O: GemmOutput>(
    cpu: &Cpu,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    beta: f32,
    c: &mut [O],
    ldc: usize,
    epilogue: Epilogue<'_>,
) -> Result<(), Error> {
    let av = if trans_a {
        MatRef::new(a, k, m).with_ld(lda).t()
    } else {
        MatRef::new(a, m, k).with_ld(lda)
    };
    let bv = if trans_b {
        MatRef::new(b, n, k).with_ld(ldb).t()
    } else {
        MatRef::new(b, k, n).with_ld(ldb)
    };
    cpu.gemm(
        av,
        bv,
        MatMut::new(c, m, n).with_ld(ldc),
        Gemm {
            alpha,
            beta,
            epilogue,
        },
    )
}

/// A backend whose GEMMs of `dtype` inputs run on `path` (the other dtypes on the defaults of its
/// instruction set).
fn cpu_for(path: GemmPath, dtype: DType) -> Cpu {
    let mut paths = GemmPaths::default_for(path.isa());
    paths.set(dtype, path);
    Cpu::with(path.isa())
        .and_then(|c| c.with_gemm_paths(paths))
        .unwrap_or_else(|e| panic!("{path} for {dtype}: {e}"))
}

/// The machine's default backend (the calibrated paths).
fn global() -> &'static Cpu {
    Cpu::global().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Epi {
    None,
    Relu,
    Bias,
    BiasRelu,
}

const EPIS: [Epi; 4] = [Epi::None, Epi::Relu, Epi::Bias, Epi::BiasRelu];

#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
    epi: Epi,
    /// Extra elements per row beyond the stored width (leading dim = width + pad).
    pad: usize,
}

impl Case {
    fn new(m: usize, n: usize, k: usize) -> Self {
        Case {
            m,
            n,
            k,
            ta: false,
            tb: false,
            alpha: 1.0,
            beta: 0.0,
            epi: Epi::None,
            pad: 0,
        }
    }
}

/// Sentinel written between rows (in the leading-dim padding) of C: must survive the call.
const SENTINEL: f32 = 1234.5;

/// A stored matrix of `rows x cols` with leading dim `cols + pad`, values uniform in [-1, 1)
/// rounded to `T`, padding set to a large value that would show up if read.
fn rand_mat<T: Element>(rng: &mut Rng, rows: usize, cols: usize, pad: usize) -> (Vec<T>, usize) {
    let ld = cols + pad;
    let mut v = vec![T::from_f32(-777.0); rows * ld];
    for r in 0..rows {
        for c in 0..cols {
            v[r * ld + c] = T::from_f32(rng.uniform(-1.0, 1.0));
        }
    }
    (v, ld)
}

/// Runs one case for input `T`, output `O` on `path` and checks it against float64.
fn check<T: GemmInput, O: GemmOutput>(path: GemmPath, case: Case, rng: &mut Rng) {
    let Case {
        m,
        n,
        k,
        ta,
        tb,
        alpha,
        beta,
        epi,
        pad,
    } = case;
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    let (a, lda) = rand_mat::<T>(rng, ar, ac, pad);
    let (b, ldb) = rand_mat::<T>(rng, br, bc, pad);
    let ldc = n + pad;
    let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    // C: NaN when beta == 0 (must be ignored and overwritten), else random; sentinel padding.
    let mut c = vec![O::from_f32(SENTINEL); m * ldc];
    for i in 0..m {
        for j in 0..n {
            c[i * ldc + j] = if beta == 0.0 {
                O::from_f32(f32::NAN)
            } else {
                O::from_f32(rng.uniform(-1.0, 1.0))
            };
        }
    }
    let c0 = c.clone();
    let epilogue = match epi {
        Epi::None => Epilogue::None,
        Epi::Relu => Epilogue::Relu,
        Epi::Bias => Epilogue::Bias(&bias[..]),
        Epi::BiasRelu => Epilogue::BiasRelu(&bias[..]),
    };
    gemm_on(
        &cpu_for(path, T::DTYPE),
        ta,
        tb,
        m,
        n,
        k,
        alpha,
        &a,
        lda,
        &b,
        ldb,
        beta,
        &mut c,
        ldc,
        epilogue,
    )
    .unwrap_or_else(|e| panic!("{path} {case:?}: {e}"));

    let at = |i: usize, p: usize| if ta { a[p * lda + i] } else { a[i * lda + p] }.to_f64();
    let bt = |p: usize, j: usize| if tb { b[j * ldb + p] } else { b[p * ldb + j] }.to_f64();
    // op(B) transposed to n x k for contiguous reference loops.
    let bcols: Vec<Vec<f64>> = (0..n).map(|j| (0..k).map(|p| bt(p, j)).collect()).collect();
    let u_out = match O::DTYPE {
        DType::F32 => 0.0,
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
    };
    let abs_floor = match O::DTYPE {
        DType::F16 => 2f64.powi(-25),
        _ => 0.0,
    };
    // Two roundings per k at most (see the module comment).
    let kk = (k + 3) as f64;
    let gamma = (8.0 * kk.sqrt()).min(kk) * 2.0 * U32;
    let (mut err2, mut ref2, mut s2) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..m {
        let arow: Vec<f64> = (0..k).map(|p| at(i, p)).collect();
        for j in 0..n {
            let (mut dot, mut absdot) = (0.0f64, 0.0f64);
            for (x, y) in arow.iter().zip(&bcols[j]) {
                dot += x * y;
                absdot += (x * y).abs();
            }
            let old = c0[i * ldc + j].to_f64();
            let old = if beta == 0.0 { 0.0 } else { old };
            let bj = if matches!(epi, Epi::Bias | Epi::BiasRelu) {
                bias[j] as f64
            } else {
                0.0
            };
            let mut r = alpha as f64 * dot + beta as f64 * old + bj;
            if matches!(epi, Epi::Relu | Epi::BiasRelu) && r < 0.0 {
                r = 0.0;
            }
            let s = (alpha as f64).abs() * absdot + (beta as f64 * old).abs() + bj.abs();
            let got = c[i * ldc + j].to_f64();
            let err = (got - r).abs();
            let bound = gamma * s + u_out * (r.abs() + gamma * s) + abs_floor + f64::MIN_POSITIVE;
            assert!(
                err <= bound,
                "{path} {} -> {} {case:?}: c[{i}, {j}] = {got}, reference {r}, error {err:e} > bound {bound:e}",
                T::DTYPE,
                O::DTYPE
            );
            err2 += err * err;
            ref2 += r * r;
            s2 += s * s;
        }
        for j in n..ldc {
            assert_eq!(
                c[i * ldc + j],
                O::from_f32(SENTINEL),
                "{path} {case:?}: padding c[{i}, {j}] written"
            );
        }
    }
    if ref2 > 0.0 {
        let rel = (err2 / ref2).sqrt();
        let bound =
            2.0 * kk.sqrt() * 2.0 * U32 * (s2 / ref2).sqrt() + u_out + (abs_floor / ref2.sqrt());
        assert!(
            rel <= bound,
            "{path} {} -> {} {case:?}: relative Frobenius error {rel:e} > {bound:e}",
            T::DTYPE,
            O::DTYPE
        );
    }
}

/// Every GEMM path this CPU can run for `dtype` inputs; the portable one only when
/// `with_scalar`.
fn paths(dtype: DType, with_scalar: bool) -> Vec<GemmPath> {
    let v = GemmPath::candidates(dtype);
    assert!(v.contains(&GemmPath::Scalar), "{dtype}: {v:?}");
    v.into_iter()
        .filter(|&p| with_scalar || p != GemmPath::Scalar)
        .collect()
}

/// Small and odd shapes (no multiple of any tile), every transpose, epilogue, alpha/beta and
/// padding, for one input/output pair on every path, the portable one included.
fn sweep_small<T: GemmInput, O: GemmOutput>(name: &str) {
    let mut rng = Rng::new(test_seed(name));
    let shapes = [
        (1, 1, 1),
        (7, 3, 5),
        (1, 33, 7),
        (33, 1, 17),
        (13, 65, 33),
        (33, 7, 257),
        (70, 129, 19),
    ];
    for path in paths(T::DTYPE, true) {
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            for t in 0..4 {
                let epi = EPIS[(s + t) % 4];
                let (alpha, beta) =
                    [(1.0, 0.0), (0.5, 1.0), (-1.5, 0.25), (2.0, 0.0)][(s + 2 * t) % 4];
                let case = Case {
                    ta: t & 1 == 1,
                    tb: t & 2 == 2,
                    alpha,
                    beta,
                    epi,
                    pad: (s + t) % 3 * 5,
                    ..Case::new(m, n, k)
                };
                check::<T, O>(path, case, &mut rng);
            }
        }
    }
}

#[test]
fn f32_small_shapes_every_path() {
    sweep_small::<f32, f32>("f32_small_shapes_every_path");
}

#[test]
fn f32_input_16bit_outputs() {
    sweep_small::<f32, bf16>("f32_input_bf16_output");
    sweep_small::<f32, f16>("f32_input_f16_output");
}

#[test]
fn bf16_small_shapes_every_path() {
    sweep_small::<bf16, bf16>("bf16_to_bf16");
    sweep_small::<bf16, f32>("bf16_to_f32");
    sweep_small::<bf16, f16>("bf16_to_f16");
}

#[test]
fn f16_small_shapes_every_path() {
    sweep_small::<f16, f16>("f16_to_f16");
    sweep_small::<f16, f32>("f16_to_f32");
    sweep_small::<f16, bf16>("f16_to_bf16");
}

/// Larger shapes on the SIMD paths: several depth blocks (K up to 4096, odd K), several row
/// blocks, both thread splits (rows for tall-thin C, columns for wide C), several column blocks
/// of packed B per thread (n = 2200 with K = 2100), depth super-blocks added into a float32 C
/// (K = 5001 > 4096), every transpose.
fn sweep_large<T: GemmInput, O: GemmOutput>(name: &str) {
    let mut rng = Rng::new(test_seed(name));
    let shapes = [
        (257, 130, 301),
        (5, 257, 4096),
        (130, 9, 1025),
        (97, 200, 600),
        (600, 20, 300),
        (20, 600, 300),
        (5, 2200, 2100),
        (37, 70, 5001),
    ];
    for path in paths(T::DTYPE, false) {
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            for t in 0..4 {
                // alpha = 1 into float32 with beta = 1 is how weight gradients accumulate (the
                // partial sums then live in C).
                let (alpha, beta) = [(1.0, 0.0), (0.75, 1.0), (1.0, 1.0)][(s + t) % 3];
                let case = Case {
                    ta: t & 1 == 1,
                    tb: t & 2 == 2,
                    alpha,
                    beta,
                    epi: EPIS[(s + t) % 4],
                    pad: 3,
                    ..Case::new(m, n, k)
                };
                check::<T, O>(path, case, &mut rng);
            }
        }
    }
}

#[test]
fn f32_large_shapes() {
    sweep_large::<f32, f32>("f32_large_shapes");
}

#[test]
fn bf16_large_shapes() {
    sweep_large::<bf16, bf16>("bf16_large_shapes");
    sweep_large::<bf16, f32>("bf16_large_shapes_f32_out");
}

#[test]
fn f16_large_shapes() {
    sweep_large::<f16, f16>("f16_large_shapes");
    sweep_large::<f16, f32>("f16_large_shapes_f32_out");
}

/// Large GEMMs with a transposed A (every dimension >= 1024: hidden-layer weight gradients):
/// float32 and bfloat16 first copy A into depth-contiguous rows (vector transposes on the AVX-512
/// paths, with edge rows and steps past the last whole block), then read the copy in place, or,
/// for bfloat16 at an odd depth, pack pairs from it; float16 packs from the transposed layout.
/// Checked against float64 like every other path, with the weight-gradient accumulation (alpha
/// 1, beta 1 into float32) and a forward-style store, at an odd and an even depth, on every SIMD
/// path (the portable one where there is none).
#[test]
fn large_transposed_a() {
    let mut rng = Rng::new(test_seed("large_transposed_a"));
    let simd = |d: DType| {
        let v = paths(d, false);
        if v.is_empty() {
            vec![GemmPath::Scalar]
        } else {
            v
        }
    };
    let (m, n, k) = (1030, 1024, 1025);
    let acc = Case {
        ta: true,
        beta: 1.0,
        pad: 3,
        ..Case::new(m, n, k)
    };
    let fwd = Case {
        ta: true,
        tb: true,
        alpha: 0.5,
        epi: Epi::BiasRelu,
        ..Case::new(m, n, k)
    };
    for path in simd(DType::F32) {
        check::<f32, f32>(path, acc, &mut rng);
    }
    // An even depth: bfloat16 reads the copy in place as pairs.
    let even = Case { k: 1026, ..acc };
    for path in simd(DType::BF16) {
        check::<bf16, f32>(path, acc, &mut rng);
        check::<bf16, bf16>(path, fwd, &mut rng);
        check::<bf16, f32>(path, even, &mut rng);
    }
    for path in simd(DType::F16) {
        check::<f16, f32>(path, even, &mut rng);
    }
}

/// A backward-shaped weight gradient `Xt dY` with beta = 1 into float32 (accumulation), and the
/// forward `X W + b`: the relative Frobenius error of float32 is far under 1e-4.
#[test]
fn f32_relative_error_far_under_1e_4() {
    let mut rng = Rng::new(test_seed("f32_relative_error_far_under_1e_4"));
    for path in paths(DType::F32, false) {
        let cpu = cpu_for(path, DType::F32);
        let (m, n, k) = (64, 96, 4096);
        let (a, _) = rand_mat::<f32>(&mut rng, k, m, 0);
        let (b, _) = rand_mat::<f32>(&mut rng, k, n, 0);
        let mut c = vec![0.0f32; m * n];
        gemm_on(
            &cpu,
            true,
            false,
            m,
            n,
            k,
            1.0,
            &a,
            m,
            &b,
            n,
            0.0,
            &mut c,
            n,
            Epilogue::None,
        )
        .unwrap();
        let mut num = 0.0f64;
        let mut den = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|p| a[p * m + i] as f64 * b[p * n + j] as f64)
                    .sum();
                num += (c[i * n + j] as f64 - r).powi(2);
                den += r * r;
            }
        }
        let rel = (num / den).sqrt();
        eprintln!("{path}: float32 relative Frobenius error at K = {k}: {rel:e}");
        assert!(rel < 1e-5, "{path}: relative error {rel:e}");
    }
}

#[test]
fn nan_and_inf_propagate() {
    fn run<T: GemmInput, O: GemmOutput>(path: GemmPath) {
        let cpu = cpu_for(path, T::DTYPE);
        let (m, n, k) = (9, 20, 11);
        let mut a = vec![T::from_f32(0.5); m * k];
        let mut b = vec![T::from_f32(0.25); k * n];
        a[2 * k + 3] = T::from_f32(f32::NAN); // row 2 of C is NaN
        b[4 * n + 5] = T::from_f32(f32::INFINITY); // column 5 of C is +inf (NaN in row 2)
        let mut c = vec![O::from_f32(f32::NAN); m * n];
        for epi in [Epilogue::None, Epilogue::Relu] {
            gemm_on(
                &cpu, false, false, m, n, k, 1.0, &a, k, &b, n, 0.0, &mut c, n, epi,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    let x = c[i * n + j].to_f32();
                    if i == 2 {
                        assert!(x.is_nan(), "{path} {epi:?}: c[{i},{j}] = {x}, want NaN");
                    } else if j == 5 {
                        assert_eq!(x, f32::INFINITY, "{path} {epi:?}: c[{i},{j}]");
                    } else {
                        assert_eq!(x, 0.125 * k as f32, "{path} {epi:?}: c[{i},{j}]");
                    }
                }
            }
        }
        // -inf through ReLU gives 0; NaN through ReLU stays NaN.
        b[4 * n + 5] = T::from_f32(f32::NEG_INFINITY);
        gemm_on(
            &cpu,
            false,
            false,
            m,
            n,
            k,
            1.0,
            &a,
            k,
            &b,
            n,
            0.0,
            &mut c,
            n,
            Epilogue::Relu,
        )
        .unwrap();
        assert_eq!(c[5].to_f32(), 0.0, "{path}: relu(-inf)");
        assert!(c[2 * n + 5].to_f32().is_nan(), "{path}: relu(NaN)");
        // beta != 0 reads C: NaN in C propagates.
        let mut c = vec![O::from_f32(1.0); m * n];
        c[n + 1] = O::from_f32(f32::NAN);
        gemm_on(
            &cpu,
            false,
            false,
            m,
            n,
            k,
            1.0,
            &a,
            k,
            &b,
            n,
            1.0,
            &mut c,
            n,
            Epilogue::None,
        )
        .unwrap();
        assert!(c[n + 1].to_f32().is_nan(), "{path}: NaN in C with beta = 1");
        assert!(!c[n + 2].to_f32().is_nan());
    }
    for path in paths(DType::F32, true) {
        run::<f32, f32>(path);
    }
    for path in paths(DType::BF16, true) {
        run::<bf16, bf16>(path);
        run::<bf16, f32>(path);
    }
    for path in paths(DType::F16, true) {
        run::<f16, f16>(path);
        run::<f16, f32>(path);
    }
}

#[test]
fn bad_shapes_are_errors_naming_both_shapes() {
    let a = vec![1.0f32; 12];
    let b = vec![1.0f32; 12];
    let mut c = vec![7.0f32; 16];
    let untouched = c.clone();
    let msg = |e: Error| e.to_string();

    // A too short for [4, 3]: 11 elements.
    let e = gemm_on(
        global(),
        false,
        false,
        4,
        4,
        3,
        1.0,
        &a[..11],
        3,
        &b,
        4,
        0.0,
        &mut c,
        4,
        Epilogue::None,
    )
    .unwrap_err();
    let s = msg(e);
    assert!(
        s.contains("gemm") && s.contains("[4, 3]") && s.contains("[11]"),
        "{s}"
    );
    // B (stored [3, 4]) too short.
    let e = gemm_on(
        global(),
        false,
        false,
        4,
        4,
        3,
        1.0,
        &a,
        3,
        &b[..10],
        4,
        0.0,
        &mut c,
        4,
        Epilogue::None,
    )
    .unwrap_err();
    let s = msg(e);
    assert!(
        s.contains("b stored") && s.contains("[3, 4]") && s.contains("[10]"),
        "{s}"
    );
    // Transposed B is stored [n, k] = [4, 3]: ldb 2 < 3.
    let e = gemm_on(
        global(),
        false,
        true,
        4,
        4,
        3,
        1.0,
        &a,
        3,
        &b,
        2,
        0.0,
        &mut c,
        4,
        Epilogue::None,
    )
    .unwrap_err();
    let s = msg(e);
    assert!(
        s.contains("[4, 3]") && s.contains("ldb") && s.contains("[2]"),
        "{s}"
    );
    // C too short.
    let e = gemm_on(
        global(),
        false,
        false,
        4,
        4,
        3,
        1.0,
        &a,
        3,
        &b,
        4,
        0.0,
        &mut c[..15],
        4,
        Epilogue::None,
    )
    .unwrap_err();
    let s = msg(e);
    assert!(
        s.contains("c [m, n]") && s.contains("[4, 4]") && s.contains("[15]"),
        "{s}"
    );
    // Bias of the wrong length.
    let e = gemm_on(
        global(),
        false,
        false,
        4,
        4,
        3,
        1.0,
        &a,
        3,
        &b,
        4,
        0.0,
        &mut c,
        4,
        Epilogue::Bias(&[1.0; 3]),
    )
    .unwrap_err();
    let s = msg(e);
    assert!(s.contains("[4, 4]") && s.contains("bias [3]"), "{s}");
    assert!(matches!(
        gemm_on(
            global(),
            false,
            false,
            4,
            4,
            3,
            1.0,
            &a,
            3,
            &b,
            4,
            0.0,
            &mut c,
            4,
            Epilogue::BiasRelu(&[])
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    // lda smaller than the row width.
    assert!(
        gemm_on(
            global(),
            false,
            false,
            4,
            4,
            3,
            1.0,
            &a,
            2,
            &b,
            4,
            0.0,
            &mut c,
            4,
            Epilogue::None
        )
        .is_err()
    );
    // Overflowing strides are errors, not panics.
    assert!(
        gemm_on(
            global(),
            false,
            false,
            4,
            4,
            3,
            1.0,
            &a,
            usize::MAX,
            &b,
            4,
            0.0,
            &mut c,
            4,
            Epilogue::None
        )
        .is_err()
    );
    // Views whose shapes do not fit: op(A) [4, 3] times op(B) [4, 3], and a C of another shape
    // than op(A) * op(B) [4, 4].
    let e = global()
        .gemm(
            MatRef::new(&a, 4, 3),
            MatRef::new(&b, 4, 3),
            MatMut::new(&mut c, 4, 4),
            Gemm::new(),
        )
        .unwrap_err();
    let s = msg(e);
    assert!(
        s.contains("gemm")
            && s.contains("op(a) [m, k] [4, 3]")
            && s.contains("op(b) [k, n] [4, 3]"),
        "{s}"
    );
    let e = global()
        .gemm(
            MatRef::new(&a, 4, 3),
            MatRef::new(&b, 3, 4),
            MatMut::new(&mut c, 2, 8),
            Gemm::new(),
        )
        .unwrap_err();
    let s = msg(e);
    assert!(
        s.contains("gemm") && s.contains("[4, 4]") && s.contains("c [rows, cols] [2, 8]"),
        "{s}"
    );
    assert_eq!(c, untouched, "an error must leave C untouched");
    // The same B used transposed fits.
    let mut c2 = vec![0.0f32; 16];
    global()
        .gemm(
            MatRef::new(&a, 4, 3),
            MatRef::new(&b, 4, 3).t(),
            MatMut::new(&mut c2, 4, 4),
            Gemm::new(),
        )
        .unwrap();
    assert_eq!(c2, [3.0; 16]);
}

/// Forcing what this CPU cannot run fails when the backend is made, naming what was forced: an
/// instruction set it lacks at [`Cpu::with`], a path that cannot run a dtype (the dot-product path
/// for float32 or float16, or a path whose instruction set is missing) at
/// [`Cpu::with_gemm_paths`]. What runs here is accepted and kept.
#[test]
fn paths_that_cannot_run_are_refused_when_the_backend_is_made() {
    for isa in Isa::ALL {
        match Cpu::with(isa) {
            Ok(cpu) => {
                assert!(isa.is_supported(), "{isa:?}");
                assert_eq!(cpu.isa(), isa);
                assert_eq!(cpu.gemm_paths(), GemmPaths::default_for(isa), "{isa:?}");
            }
            Err(e) => {
                let s = e.to_string();
                assert!(!isa.is_supported(), "{isa:?}: {s}");
                assert!(
                    matches!(e, Error::InvalidArgument { .. })
                        && s.contains("not supported")
                        && s.contains(&format!("{isa:?}")),
                    "{s}"
                );
            }
        }
    }
    let base = Cpu::with(Isa::Scalar).unwrap();
    for dtype in DType::ALL {
        for path in GemmPath::ALL {
            let mut p = GemmPaths::default_for(Isa::Scalar);
            p.set(dtype, path);
            assert_eq!(p.get(dtype), path);
            match base.with_gemm_paths(p) {
                Ok(cpu) => {
                    assert!(path.runs_here(dtype), "{path} {dtype}");
                    assert_eq!(cpu.gemm_paths(), p);
                    assert_eq!(cpu.isa(), Isa::Scalar);
                }
                Err(e) => {
                    let s = e.to_string();
                    assert!(!path.runs_here(dtype), "{path} {dtype}: {s}");
                    assert!(
                        matches!(e, Error::InvalidArgument { .. }) && s.contains(path.name()),
                        "{s}"
                    );
                }
            }
        }
        let candidates = GemmPath::candidates(dtype);
        assert!(candidates.iter().all(|p| p.runs_here(dtype)), "{dtype}");
        assert_eq!(
            candidates.contains(&GemmPath::Avx512Wide),
            Isa::Avx512.is_supported(),
            "{dtype}"
        );
        assert_eq!(
            candidates.contains(&GemmPath::Avx512Bf16Dot),
            dtype == DType::BF16 && Isa::Avx512Bf16.is_supported(),
            "{dtype}"
        );
    }
    let mut p = GemmPaths::default_for(Isa::Scalar);
    p.set(DType::F32, GemmPath::Avx512Bf16Dot);
    let s = base.with_gemm_paths(p).unwrap_err().to_string();
    assert!(s.contains("avx512bf16-dot") && s.contains("float32"), "{s}");
    for path in GemmPath::ALL {
        assert_eq!(GemmPath::from_name(path.name()), Some(path));
    }
}

#[test]
fn zero_sized_dims_are_valid() {
    for path in paths(DType::F32, true) {
        let cpu = cpu_for(path, DType::F32);
        let mut c = vec![2.0f32; 6];
        // m = 0, n = 0: nothing to do, empty slices fine.
        gemm_on::<f32, f32>(
            &cpu,
            false,
            false,
            0,
            3,
            4,
            1.0,
            &[],
            4,
            &[0.0; 12],
            3,
            0.0,
            &mut [],
            3,
            Epilogue::None,
        )
        .unwrap();
        gemm_on::<f32, f32>(
            &cpu,
            false,
            false,
            2,
            0,
            4,
            1.0,
            &[0.0; 8],
            4,
            &[],
            0,
            0.0,
            &mut [],
            0,
            Epilogue::None,
        )
        .unwrap();
        // k = 0: C = epilogue(beta * C).
        let bias = [1.0f32, -10.0, 0.5];
        gemm_on::<f32, f32>(
            &cpu,
            false,
            false,
            2,
            3,
            0,
            1.0,
            &[],
            0,
            &[],
            3,
            0.5,
            &mut c,
            3,
            Epilogue::BiasRelu(&bias),
        )
        .unwrap();
        assert_eq!(c, [2.0, 0.0, 1.5, 2.0, 0.0, 1.5], "{path}");
    }
    for path in paths(DType::BF16, true) {
        let cpu = cpu_for(path, DType::BF16);
        let mut c = vec![f16::NAN; 6];
        gemm_on::<bf16, f16>(
            &cpu,
            true,
            true,
            2,
            3,
            0,
            1.0,
            &[],
            2,
            &[],
            0,
            0.0,
            &mut c,
            3,
            Epilogue::None,
        )
        .unwrap();
        assert!(
            c.iter().all(|x| x.to_f32() == 0.0),
            "{path}: beta = 0 with k = 0 gives zeros"
        );
    }
}

#[test]
fn results_are_bit_identical_across_calls() {
    fn run<T: GemmInput, O: GemmOutput>(rng: &mut Rng) {
        let (m, n, k) = (150, 300, 700);
        let (a, _) = rand_mat::<T>(rng, m, k, 0);
        let (b, _) = rand_mat::<T>(rng, n, k, 0);
        let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for path in paths(T::DTYPE, false) {
            let cpu = cpu_for(path, T::DTYPE);
            let mut c1 = vec![O::ZERO; m * n];
            let mut c2 = vec![O::ZERO; m * n];
            for c in [&mut c1, &mut c2] {
                gemm_on(
                    &cpu,
                    false,
                    true,
                    m,
                    n,
                    k,
                    1.0,
                    &a,
                    k,
                    &b,
                    k,
                    0.0,
                    c,
                    n,
                    Epilogue::BiasRelu(&bias),
                )
                .unwrap();
            }
            let bits = |c: &[O]| c.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&c1), bits(&c2), "{path} {}", T::DTYPE);
        }
    }
    let mut rng = Rng::new(test_seed("results_are_bit_identical_across_calls"));
    run::<f32, f32>(&mut rng);
    run::<bf16, bf16>(&mut rng);
    run::<f16, f16>(&mut rng);
}

#[test]
fn counts_calls_per_input_dtype() {
    let before = counters::gemm_calls(DType::BF16);
    let mut c = [0.0f32; 1];
    gemm_on::<bf16, f32>(
        global(),
        false,
        false,
        1,
        1,
        1,
        1.0,
        &[bf16::ONE],
        1,
        &[bf16::ONE],
        1,
        0.0,
        &mut c,
        1,
        Epilogue::None,
    )
    .unwrap();
    assert!(counters::gemm_calls(DType::BF16) > before);
    assert_eq!(c[0], 1.0);
}
