//! The tensor-level op surface ([`mp_kernels::ops`]) on the host, and the calibration that picks
//! its GEMM paths.
//!
//! `ops::gemm` runs on [`Cpu::global`], whatever paths the calibration chose here, and is checked
//! against a float64 reference with the bound of `tests/gemm.rs`: with `u = 2^-24`,
//! `S_ij = |alpha| sum_p |a_ip| |b_pj| + |beta c_ij| + |bias_j|` and `K` multiply-adds,
//! `|c - ref| <= min(8 sqrt(K + 3), K + 3) 2u S_ij` (two roundings per k at most), plus one
//! rounding to nearest (`u_out |ref|`) for a 16-bit output. Errors are values naming the op,
//! never panics. Randomised tests print their seed (`MP_TEST_SEED=<seed>` replays one).

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{BF16, DType, DTypeKind, Device, F16, F32, Rng, Tensor};
use mp_kernels::activation::Activation;
use mp_kernels::calibrate::{self, Origin};
use mp_kernels::gemm::{Epilogue, Gemm, GemmPath};
use mp_kernels::ops::{self, Mat};
use mp_kernels::optim::{AdamParams, RmspropParams, SgdParams};
use mp_kernels::{Cpu, Error, Isa};

const U32: f64 = 1.0 / (1u64 << 24) as f64;

/// A tensor of `shape` with values uniform in [-1, 1) rounded to `D`.
fn rand_tensor<D: DTypeKind>(rng: &mut Rng, shape: &[usize]) -> Tensor<D> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    Tensor::from_f32(shape, &v).unwrap()
}

/// `c = epilogue(alpha * op(a) * op(b) + beta * c)` through `ops::gemm` with a bias + ReLU
/// epilogue, checked element by element against float64. `a` is stored `[k, m]` when `ta`,
/// `b` `[n, k]` when `tb`; `lead` splits the `m` rows of `c` (and of a non-transposed `a`) over
/// leading axes, which the op folds into rows.
#[allow(clippy::too_many_arguments)]
fn check_gemm<T: DTypeKind, O: DTypeKind>(
    rng: &mut Rng,
    lead: &[usize],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
    beta: f32,
) {
    assert_eq!(lead.iter().product::<usize>(), m);
    let with = |last: usize| lead.iter().copied().chain([last]).collect::<Vec<_>>();
    let a: Tensor<T> = if ta {
        rand_tensor(rng, &[k, m])
    } else {
        rand_tensor(rng, &with(k))
    };
    let b: Tensor<T> = if tb {
        rand_tensor(rng, &[n, k])
    } else {
        rand_tensor(rng, &[k, n])
    };
    let bias: Tensor<F32> = rand_tensor(rng, &[n]);
    let mut c: Tensor<O> = rand_tensor(rng, &with(n));
    let c0 = c.to_f32_vec().unwrap();
    let am = if ta { Mat::of(&a).t() } else { Mat::of(&a) };
    let bm = if tb { Mat::of(&b).t() } else { Mat::of(&b) };
    assert_eq!((am.shape(), bm.shape()), ((m, k), (k, n)));
    ops::gemm(
        am,
        bm,
        &mut c,
        Gemm::new()
            .scaled(alpha, beta)
            .epilogue(Epilogue::BiasRelu(&bias)),
    )
    .unwrap_or_else(|e| panic!("{} -> {}: {e}", T::DTYPE, O::DTYPE));
    assert_eq!(c.shape(), with(n).as_slice(), "the output keeps its shape");

    let (av, bv, biasv) = (
        a.to_f32_vec().unwrap(),
        b.to_f32_vec().unwrap(),
        bias.to_f32_vec().unwrap(),
    );
    let got = c.to_f32_vec().unwrap();
    let at = |i: usize, p: usize| f64::from(if ta { av[p * m + i] } else { av[i * k + p] });
    let bt = |p: usize, j: usize| f64::from(if tb { bv[j * k + p] } else { bv[p * n + j] });
    let u_out = match O::DTYPE {
        DType::F32 => 0.0,
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
    };
    let abs_floor = if O::DTYPE == DType::F16 {
        2f64.powi(-25)
    } else {
        0.0
    };
    let kk = (k + 3) as f64;
    let gamma = (8.0 * kk.sqrt()).min(kk) * 2.0 * U32;
    let paths = Cpu::global().unwrap().gemm_paths();
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut absdot) = (0.0f64, 0.0f64);
            for p in 0..k {
                let x = at(i, p) * bt(p, j);
                dot += x;
                absdot += x.abs();
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                f64::from(c0[i * n + j])
            };
            let bj = f64::from(biasv[j]);
            let r = (f64::from(alpha) * dot + f64::from(beta) * old + bj).max(0.0);
            let s = f64::from(alpha).abs() * absdot + (f64::from(beta) * old).abs() + bj.abs();
            let g = f64::from(got[i * n + j]);
            let err = (g - r).abs();
            let bound = gamma * s + u_out * (r.abs() + gamma * s) + abs_floor + f64::MIN_POSITIVE;
            assert!(
                err <= bound,
                "{} -> {} on {} [{m}, {n}, {k}] ta={ta} tb={tb} alpha={alpha} beta={beta}: \
                 c[{i}, {j}] = {g}, reference {r}, error {err:e} > bound {bound:e}",
                T::DTYPE,
                O::DTYPE,
                paths.get(T::DTYPE)
            );
        }
    }
}

fn gemm_sweep<T: DTypeKind>(name: &str) {
    let mut rng = Rng::new(test_seed(name));
    let (m, n, k) = (37, 53, 29);
    for t in 0..4 {
        let (ta, tb) = (t & 1 == 1, t & 2 == 2);
        check_gemm::<T, F32>(&mut rng, &[m], m, n, k, ta, tb, 1.0, 0.0);
        check_gemm::<T, F32>(&mut rng, &[m], m, n, k, ta, tb, 0.75, 0.5);
        check_gemm::<T, T>(&mut rng, &[m], m, n, k, ta, tb, -1.5, 0.25);
    }
    // Leading axes fold into rows: [2, 3, 29] x [29, 53] -> [2, 3, 53].
    check_gemm::<T, F32>(&mut rng, &[2, 3], 6, n, k, false, false, 1.0, 0.0);
    check_gemm::<T, T>(&mut rng, &[2, 3], 6, n, k, false, true, 1.0, 1.0);
}

#[test]
fn gemm_on_tensors_matches_float64_f32() {
    gemm_sweep::<F32>("gemm_on_tensors_matches_float64_f32");
}

#[test]
fn gemm_on_tensors_matches_float64_bf16() {
    gemm_sweep::<BF16>("gemm_on_tensors_matches_float64_bf16");
}

#[test]
fn gemm_on_tensors_matches_float64_f16() {
    gemm_sweep::<F16>("gemm_on_tensors_matches_float64_f16");
}

/// `ops::gemm` runs the global backend's kernel: bit-identical to [`Cpu::gemm`] on the slices.
#[test]
fn gemm_on_tensors_is_the_global_cpu_kernel() {
    let mut rng = Rng::new(test_seed("gemm_on_tensors_is_the_global_cpu_kernel"));
    let (m, n, k) = (37, 53, 29);
    let a: Tensor<BF16> = rand_tensor(&mut rng, &[k, m]);
    let b: Tensor<BF16> = rand_tensor(&mut rng, &[n, k]);
    let bias: Tensor<F32> = rand_tensor(&mut rng, &[n]);
    let mut c = Tensor::<F32>::zeros(&[m, n]).unwrap();
    ops::gemm(
        Mat::of(&a).t(),
        Mat::of(&b).t(),
        &mut c,
        Gemm::new().epilogue(Epilogue::Bias(&bias)),
    )
    .unwrap();
    let mut want = vec![0.0f32; m * n];
    use mp_kernels::gemm::{MatMut, MatRef};
    Cpu::global()
        .unwrap()
        .gemm(
            MatRef::new(a.as_slice().unwrap(), k, m).t(),
            MatRef::new(b.as_slice().unwrap(), n, k).t(),
            MatMut::new(&mut want, m, n),
            Gemm::new().epilogue(Epilogue::Bias(bias.as_slice().unwrap())),
        )
        .unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(c.as_slice().unwrap()), bits(&want));
}

/// Shapes that do not fit are errors naming the op, and nothing is written.
#[test]
fn gemm_shape_mismatches_are_errors_naming_gemm() {
    let a = Tensor::<F32>::full(&[37, 29], 1.0).unwrap();
    let b = Tensor::<F32>::full(&[30, 53], 1.0).unwrap();
    let b_ok = Tensor::<F32>::full(&[29, 53], 1.0).unwrap();
    let mut c = Tensor::<F32>::full(&[37, 53], 7.0).unwrap();
    let msg = |r: Result<(), Error>| match r {
        Err(e @ Error::ShapeMismatch { .. }) => e.to_string(),
        other => panic!("expected a shape mismatch, got {other:?}"),
    };
    // Inner dimensions 29 and 30.
    let s = msg(ops::gemm(Mat::of(&a), Mat::of(&b), &mut c, Gemm::new()));
    assert!(
        s.contains("gemm") && s.contains("29") && s.contains("30"),
        "{s}"
    );
    // op(A) transposed is [29, 37]: does not fit [29, 53].
    let s = msg(ops::gemm(
        Mat::of(&a).t(),
        Mat::of(&b_ok),
        &mut c,
        Gemm::new(),
    ));
    assert!(s.contains("gemm"), "{s}");
    // C of another shape than [37, 53].
    let mut c_bad = Tensor::<F32>::full(&[37, 52], 7.0).unwrap();
    let s = msg(ops::gemm(
        Mat::of(&a),
        Mat::of(&b_ok),
        &mut c_bad,
        Gemm::new(),
    ));
    assert!(s.contains("gemm") && s.contains("[37, 52]"), "{s}");
    // A bias that is not n long.
    let bias = Tensor::<F32>::zeros(&[52]).unwrap();
    let s = msg(ops::gemm(
        Mat::of(&a),
        Mat::of(&b_ok),
        &mut c,
        Gemm::new().epilogue(Epilogue::BiasRelu(&bias)),
    ));
    assert!(s.contains("gemm") && s.contains("bias"), "{s}");
    assert!(c.as_slice().unwrap().iter().all(|&v| v == 7.0));
    assert!(c_bad.as_slice().unwrap().iter().all(|&v| v == 7.0));
    // The same operands fit once B has the right inner dimension.
    ops::gemm(Mat::of(&a), Mat::of(&b_ok), &mut c, Gemm::new()).unwrap();
    assert!(c.as_slice().unwrap().iter().all(|&v| v == 29.0));
}

#[test]
fn cast_into_checks_shapes_and_matches_half() {
    let x = Tensor::<F32>::from_vec(
        &[2, 3],
        vec![1.0, 1.0 + 1.0 / 256.0, f32::NAN, 70000.0, -0.0, 1e-40],
    )
    .unwrap();
    let mut wrong = Tensor::<BF16>::zeros(&[3, 2]).unwrap();
    match ops::cast_into(&x, &mut wrong) {
        Err(e @ Error::ShapeMismatch { .. }) => {
            let s = e.to_string();
            assert!(
                s.contains("cast") && s.contains("[2, 3]") && s.contains("[3, 2]"),
                "{s}"
            );
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert!(wrong.as_slice().unwrap().iter().all(|v| v.to_bits() == 0));
    let mut b = Tensor::<BF16>::zeros(&[2, 3]).unwrap();
    ops::cast_into(&x, &mut b).unwrap();
    let h: Tensor<F16> = ops::cast(&x).unwrap();
    let xs = x.as_slice().unwrap();
    for (i, &v) in xs.iter().enumerate() {
        assert_eq!(
            b.as_slice().unwrap()[i].to_bits(),
            bf16::from_f32(v).to_bits(),
            "{i}"
        );
        assert_eq!(
            h.as_slice().unwrap()[i].to_bits(),
            f16::from_f32(v).to_bits(),
            "{i}"
        );
    }
    assert_eq!(h.shape(), &[2, 3]);
}

/// A non-finite gradient clears the flag (the whole tensor is still unscaled), and every
/// optimizer update given that flag then leaves the variable and its state bit-identical.
#[test]
fn a_cleared_finite_flag_skips_the_updates() {
    let mut flag = ops::Finite::new(Device::Cpu).unwrap();
    assert_eq!(flag.device(), Device::Cpu);
    assert!(flag.get().unwrap());
    let n = 1031;
    let mut rng = Rng::new(test_seed("a_cleared_finite_flag_skips_the_updates"));
    let scale = 1024.0f32;
    let inv = (1.0 / f64::from(scale)) as f32;
    let raw: Vec<f32> = rng
        .uniform_vec(n, -1.0, 1.0)
        .into_iter()
        .map(|v| v * scale)
        .collect();
    let mut bad = raw.clone();
    bad[n - 3] = f32::INFINITY;
    let mut g = Tensor::<F32>::from_vec(&[n], bad.clone()).unwrap();
    ops::unscale_and_check(&mut g, inv, &mut flag).unwrap();
    assert!(!flag.get().unwrap(), "an inf clears the flag");
    let gs = g.as_slice().unwrap();
    assert_eq!(gs[0].to_bits(), (bad[0] * inv).to_bits(), "still unscaled");
    assert_eq!(gs[n - 1].to_bits(), (bad[n - 1] * inv).to_bits());
    // A later finite tensor does not set it again.
    let mut fine = Tensor::<F32>::from_vec(&[n], raw.clone()).unwrap();
    ops::unscale_and_check(&mut fine, inv, &mut flag).unwrap();
    assert!(!flag.get().unwrap());

    let t = |v: &[f32]| Tensor::<F32>::from_vec(&[n], v.to_vec()).unwrap();
    let bits = |x: &Tensor<F32>| {
        x.as_slice()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    let var0: Vec<f32> = rng.uniform_vec(n, -1.0, 1.0);
    let m0: Vec<f32> = rng.uniform_vec(n, -0.1, 0.1);
    let v0: Vec<f32> = rng.uniform_vec(n, 0.0, 0.1);
    let adam = AdamParams::new(0.001, 0.9, 0.999, 1e-7, 3);
    let (mut var, mut m, mut v) = (t(&var0), t(&m0), t(&v0));
    ops::adam_update(&mut var, &g, &mut m, &mut v, adam, Some(&flag)).unwrap();
    assert_eq!(bits(&var), bits(&t(&var0)), "adam var");
    assert_eq!(bits(&m), bits(&t(&m0)), "adam m");
    assert_eq!(bits(&v), bits(&t(&v0)), "adam v");
    let sgd = SgdParams {
        lr: 0.1,
        momentum: 0.9,
        nesterov: true,
    };
    let (mut var, mut mom) = (t(&var0), t(&m0));
    ops::sgd_update(&mut var, &g, Some(&mut mom), sgd, Some(&flag)).unwrap();
    assert_eq!(bits(&var), bits(&t(&var0)), "sgd var");
    assert_eq!(bits(&mom), bits(&t(&m0)), "sgd momentum");
    let rms = RmspropParams::new(0.01, 0.9, 0.5, 1e-7);
    let (mut var, mut vel, mut mom) = (t(&var0), t(&v0), t(&m0));
    ops::rmsprop_update(&mut var, &g, &mut vel, Some(&mut mom), rms, Some(&flag)).unwrap();
    assert_eq!(bits(&var), bits(&t(&var0)), "rmsprop var");
    assert_eq!(bits(&vel), bits(&t(&v0)), "rmsprop velocity");
    assert_eq!(bits(&mom), bits(&t(&m0)), "rmsprop momentum");

    // After a reset, finite gradients keep the flag and the update runs: the global kernel's
    // result, bit for bit.
    flag.reset().unwrap();
    assert!(flag.get().unwrap());
    let mut g = t(&raw);
    ops::unscale_and_check(&mut g, inv, &mut flag).unwrap();
    assert!(flag.get().unwrap());
    let (mut var, mut m, mut v) = (t(&var0), t(&m0), t(&v0));
    ops::adam_update(&mut var, &g, &mut m, &mut v, adam, Some(&flag)).unwrap();
    let (mut wv, mut wm, mut wvv) = (var0.clone(), m0.clone(), v0.clone());
    Cpu::global()
        .unwrap()
        .adam_update(&mut wv, g.as_slice().unwrap(), &mut wm, &mut wvv, adam)
        .unwrap();
    assert_eq!(bits(&var), bits(&t(&wv)));
    assert_eq!(bits(&m), bits(&t(&wm)));
    assert_eq!(bits(&v), bits(&t(&wvv)));
    assert_ne!(bits(&var), bits(&t(&var0)), "the step ran");
    // check_finite clears the flag for a 16-bit tensor too.
    let h = Tensor::<F16>::from_f32(&[3], &[1.0, 1e5, 2.0]).unwrap();
    ops::check_finite(&h, &mut flag).unwrap();
    assert!(!flag.get().unwrap(), "float16 overflow is inf");
}

/// Shapes of optimizer slots are checked (an error naming the op), never a panic.
#[test]
fn optimizer_slots_of_another_shape_are_errors() {
    let mut var = Tensor::<F32>::zeros(&[4]).unwrap();
    let g = Tensor::<F32>::zeros(&[4]).unwrap();
    let (mut m, mut v) = (
        Tensor::<F32>::zeros(&[4]).unwrap(),
        Tensor::<F32>::zeros(&[5]).unwrap(),
    );
    let e = ops::adam_update(
        &mut var,
        &g,
        &mut m,
        &mut v,
        AdamParams::new(0.001, 0.9, 0.999, 1e-7, 1),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("adam_update") && e.contains("[5]"), "{e}");
}

/// A CUDA flag cannot be made without the `cuda` feature (nor without a device with it): an
/// error, not a panic.
#[test]
fn a_cuda_flag_without_a_usable_device_is_an_error() {
    let r = ops::Finite::new(Device::Cuda(0));
    #[cfg(not(feature = "cuda"))]
    {
        match r {
            Err(Error::Core(mp_core::Error::CudaNotCompiled { ordinal: 0 })) => {}
            other => panic!("expected CudaNotCompiled, got {other:?}"),
        }
        // Nor can a CUDA tensor be made.
        assert!(matches!(
            Tensor::<F32>::zeros_on(&[3], Device::Cuda(0)),
            Err(mp_core::Error::CudaNotCompiled { ordinal: 0 })
        ));
    }
    #[cfg(feature = "cuda")]
    {
        if mp_kernels::cuda::Gpu::available() {
            let f = r.expect("a usable device gives a flag");
            assert_eq!(f.device(), Device::Cuda(0));
            assert!(f.get().unwrap());
        } else {
            let e = r.expect_err("no usable device");
            assert!(e.to_string().contains("cuda"), "{e}");
        }
    }
}

/// The other host ops agree with the global backend on the same data.
#[test]
fn host_ops_are_the_global_cpu_kernels() {
    let mut rng = Rng::new(test_seed("host_ops_are_the_global_cpu_kernels"));
    let cpu = Cpu::global().unwrap();
    let (rows, cols) = (7, 33);
    let x: Tensor<F32> = rand_tensor(&mut rng, &[rows, cols]);
    let xs = x.as_slice().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let p = ops::softmax(&x).unwrap();
    let mut want = vec![0.0f32; rows * cols];
    cpu.softmax(xs, rows, cols, &mut want).unwrap();
    assert_eq!(bits(p.as_slice().unwrap()), bits(&want));
    let labels: Vec<u32> = (0..rows).map(|_| rng.below(cols as u64) as u32).collect();
    let loss = ops::softmax_cross_entropy(&x, &labels, true).unwrap();
    let want_loss = cpu
        .softmax_cross_entropy(xs, &labels, rows, cols, true)
        .unwrap();
    assert_eq!(loss.to_bits(), want_loss.to_bits());
    let d = ops::softmax_cross_entropy_grad(&p, &labels, 64.0).unwrap();
    let mut want_d = vec![0.0f32; rows * cols];
    cpu.softmax_cross_entropy_grad(
        p.as_slice().unwrap(),
        &labels,
        rows,
        cols,
        64.0,
        &mut want_d,
    )
    .unwrap();
    assert_eq!(bits(d.as_slice().unwrap()), bits(&want_d));
    let e = ops::softmax_cross_entropy(&x, &labels[1..], true).unwrap_err();
    assert!(e.to_string().contains("labels"), "{e}");
    // A NaN row has no argmax (`None`); the others are the kernel's.
    let mut xn = x.clone();
    xn.as_mut_slice().unwrap()[2 * cols + 5] = f32::NAN;
    let idx = ops::argmax_rows(&xn).unwrap();
    let mut want_idx = vec![0u32; rows];
    cpu.argmax_rows(xn.as_slice().unwrap(), rows, cols, &mut want_idx)
        .unwrap();
    assert_eq!(want_idx[2], 5, "the kernel gives the first NaN");
    let want_idx: Vec<Option<u32>> = want_idx
        .iter()
        .enumerate()
        .map(|(r, &i)| (r != 2).then_some(i))
        .collect();
    assert_eq!(idx, want_idx);
    let mut grad = Tensor::<F32>::full(&[cols], 1.0).unwrap();
    ops::bias_grad_accumulate(&x, &mut grad).unwrap();
    let mut want_g = vec![1.0f32; cols];
    cpu.bias_grad(xs, rows, cols, &mut want_g, true).unwrap();
    assert_eq!(bits(grad.as_slice().unwrap()), bits(&want_g));
    let mut short = Tensor::<F32>::zeros(&[cols - 1]).unwrap();
    let e = ops::bias_grad_accumulate(&x, &mut short).unwrap_err();
    assert!(e.to_string().contains("bias_grad"), "{e}");
    let mut y = x.clone();
    ops::activation_inplace(Activation::Relu, &mut y).unwrap();
    let dx = ops::activation_backward(Activation::Relu, &x, &y).unwrap();
    let mut want_dx = vec![0.0f32; rows * cols];
    cpu.activation_backward(Activation::Relu, xs, y.as_slice().unwrap(), &mut want_dx)
        .unwrap();
    assert_eq!(bits(dx.as_slice().unwrap()), bits(&want_dx));
    let other = Tensor::<F32>::zeros(&[rows, cols + 1]).unwrap();
    assert!(ops::activation_backward(Activation::Relu, &x, &other).is_err());
}

/// The calibration names, per dtype, a path that runs here (the fastest measured one unless
/// `MP_GEMM_PATH` forced it), every rate and peak is a finite positive number, and the global
/// backend uses exactly the chosen paths.
#[test]
fn calibration_chooses_paths_that_run_here() {
    let cal = calibrate::calibration().unwrap();
    eprintln!("calibration ({:?}): {}", cal.origin, cal.describe());
    assert!(!cal.key.is_empty());
    if let Origin::Measured { seconds, .. } = cal.origin {
        assert!(seconds.is_finite() && seconds >= 0.0, "{seconds}");
    }
    let m = &cal.measured;
    assert!(
        m.fma_f32_gflops.is_finite() && m.fma_f32_gflops > 0.0,
        "{}",
        m.fma_f32_gflops
    );
    if let Some(dp) = m.dpbf16_gflops {
        assert!(dp.is_finite() && dp > 0.0, "{dp}");
        assert!(Isa::Avx512Bf16.is_supported());
    }
    assert!(!m.rates.is_empty());
    for r in &m.rates {
        assert!(r.gflops.is_finite() && r.gflops > 0.0, "{r:?}");
        let path = GemmPath::from_name(r.path).unwrap_or_else(|| panic!("{r:?}"));
        assert!(path.runs_here(r.dtype), "{r:?}");
    }
    for d in [DType::F32, DType::BF16, DType::F16] {
        let chosen = cal.chosen.get(d);
        assert!(chosen.runs_here(d), "{d}: {chosen}");
        assert!(m.chosen.contains(&(d, chosen.name())) || cal.forced.contains(&d));
        assert!(m.rates.iter().any(|r| r.dtype == d), "{d}: no rate");
        if !cal.forced.contains(&d) {
            let best = cal
                .rate(d, chosen)
                .unwrap_or_else(|| panic!("{d}: {chosen}"));
            // The fastest, except that the instruction set's default path is kept unless
            // another measures 3% faster (timing noise must not flip a tie).
            for r in m.rates.iter().filter(|r| r.dtype == d) {
                assert!(
                    best >= 0.97 * r.gflops,
                    "{d}: chosen {chosen} {best} < {r:?}"
                );
            }
        }
        assert!(cal.describe().contains(chosen.name()), "{d}");
    }
    let cpu = Cpu::global().unwrap();
    assert_eq!(cpu.gemm_paths(), cal.chosen);
    assert_eq!(cpu.isa(), Isa::detect());
    // The same value on every call.
    assert!(std::ptr::eq(cal, calibrate::calibration().unwrap()));
}

/// The short peak loops the calibration runs.
#[test]
fn short_peak_loops_are_finite_and_positive() {
    let fma = mp_kernels::peak::fma_f32_peak_gflops_with(20_000);
    assert!(fma.is_finite() && fma > 0.0, "{fma}");
    let dp = mp_kernels::peak::dpbf16_peak_gflops_with(20_000);
    assert_eq!(dp.is_some(), Isa::Avx512Bf16.is_supported());
    if let Some(dp) = dp {
        assert!(dp.is_finite() && dp > 0.0, "{dp}");
    }
}
