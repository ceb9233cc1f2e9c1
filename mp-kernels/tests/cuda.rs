//! The CUDA backend (`--features cuda`). Without a GPU (CI) only the no-device behaviour runs
//! (the committed PTX is checked against NVRTC by `cargo xtask kernels --check`); the device
//! tests print why they are skipped and pass, unless `MP_REQUIRE_GPU=1` (then they fail loudly). The full
//! comparison of every kernel and GEMM against the CPU is `examples/src/bin/gpu_check.rs`.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use half::{bf16, f16};
use mp_kernels::Cpu;
use mp_kernels::cuda::{self, CudaEpilogue, FiniteFlag, Gpu};
use mp_kernels::gemm::{Epilogue, Gemm, MatMut, MatRef};
use mp_kernels::optim::{AdamParams, RmspropParams, SgdParams};

/// The CPU backend the GPU is compared against (this machine's default paths).
fn cpu() -> &'static Cpu {
    Cpu::global().unwrap()
}

/// The device, or `None` (with the reason printed) when there is none and none is required.
fn gpu(test: &str) -> Option<Arc<Gpu>> {
    if !Gpu::available() {
        assert!(
            std::env::var_os("MP_REQUIRE_GPU").is_none(),
            "{test}: MP_REQUIRE_GPU is set but no CUDA driver or device is usable \
             (LD_LIBRARY_PATH must reach libcuda.so.1)"
        );
        eprintln!("{test}: skipped: no CUDA driver or device (set MP_REQUIRE_GPU=1 to fail)");
        return None;
    }
    Some(Gpu::new(0).expect("a usable device"))
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    if Gpu::available() {
        eprintln!("no_device_is_an_error_not_a_panic: skipped: a device is present");
        return;
    }
    let err = Gpu::new(0).unwrap_err().to_string();
    assert!(err.contains("cuda device 0 is not usable"), "{err}");
    assert!(err.contains("no CUDA driver library"), "{err}");
    let err = mp_core::Device::cuda(3).unwrap_err().to_string();
    assert!(err.contains("cuda device 3"), "{err}");
}

fn close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= rel * w.abs().max(1.0);
        assert!(ok, "{what}[{i}]: gpu {g}, cpu {w}");
    }
}

#[test]
fn casts_match_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu("casts_match_the_cpu_bit_for_bit") else {
        return;
    };
    let x: Vec<f32> = (0..4099)
        .map(|i| match i % 7 {
            0 => f32::NAN,
            1 => f32::from_bits(0x0000_0301), // subnormal
            2 => 1.0 + (i as f32) / 256.0,    // ties
            3 => 70000.0,                     // float16 overflow
            _ => (i as f32 - 2000.0) * 1.37e-3,
        })
        .collect();
    let dx = gpu.upload(&x).unwrap();
    let mut db = gpu.zeros::<bf16>(x.len()).unwrap();
    let mut dh = gpu.zeros::<f16>(x.len()).unwrap();
    cuda::cast(&gpu, &dx, &mut db).unwrap();
    cuda::cast(&gpu, &dx, &mut dh).unwrap();
    let mut cb = vec![bf16::ZERO; x.len()];
    let mut ch = vec![f16::ZERO; x.len()];
    cpu().cast(&x, &mut cb).unwrap();
    cpu().cast(&x, &mut ch).unwrap();
    let bits = |v: &[u16]| v.to_vec();
    assert_eq!(
        bits(
            &db.to_host()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        ),
        cb.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        dh.to_host()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        ch.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let mut back = gpu.zeros::<f32>(x.len()).unwrap();
    cuda::cast(&gpu, &db, &mut back).unwrap();
    let want: Vec<u32> = cb.iter().map(|v| v.to_f32().to_bits()).collect();
    let got: Vec<u32> = back
        .to_host()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn optimizer_updates_match_the_cpu_and_skip_on_the_flag() {
    let Some(gpu) = gpu("optimizer_updates_match_the_cpu_and_skip_on_the_flag") else {
        return;
    };
    let n = 10_007;
    let var: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 1e-2).collect();
    let rp = RmspropParams::new(1e-3, 0.9, 0.0, 1e-7);
    let (mut cv, mut cvel) = (var.clone(), vec![0.0f32; n]);
    cpu()
        .rmsprop_update(&mut cv, &g, &mut cvel, None, rp)
        .unwrap();
    let mut dv = gpu.upload(&var).unwrap();
    let dg = gpu.upload(&g).unwrap();
    let mut dvel = gpu.zeros::<f32>(n).unwrap();
    let mut flag = FiniteFlag::new(&gpu).unwrap();
    cuda::rmsprop_update(&gpu, &mut dv, &dg, &mut dvel, None, rp, Some(&flag)).unwrap();
    assert_eq!(dv.to_host().unwrap(), cv);
    assert_eq!(dvel.to_host().unwrap(), cvel);
    // Adam, AdamW and SGD with Nesterov momentum.
    for wd in [0.0, 0.004] {
        let ap = AdamParams::new(1e-3, 0.9, 0.999, 1e-7, 3).with_weight_decay(wd);
        let (mut cv, mut cm, mut cs) = (var.clone(), vec![0.1f32; n], vec![0.2f32; n]);
        cpu()
            .adam_update(&mut cv, &g, &mut cm, &mut cs, ap)
            .unwrap();
        let mut dv = gpu.upload(&var).unwrap();
        let (mut dm, mut ds) = (
            gpu.upload(&vec![0.1f32; n]).unwrap(),
            gpu.upload(&vec![0.2f32; n]).unwrap(),
        );
        cuda::adam_update(&gpu, &mut dv, &dg, &mut dm, &mut ds, ap, None).unwrap();
        assert_eq!(dv.to_host().unwrap(), cv, "weight_decay {wd}");
    }
    let sp = SgdParams {
        lr: 0.01,
        momentum: 0.9,
        nesterov: true,
    };
    let (mut cv, mut cm) = (var.clone(), vec![0.05f32; n]);
    cpu().sgd_update(&mut cv, &g, Some(&mut cm), sp).unwrap();
    let mut dv = gpu.upload(&var).unwrap();
    let mut dm = gpu.upload(&vec![0.05f32; n]).unwrap();
    cuda::sgd_update(&gpu, &mut dv, &dg, Some(&mut dm), sp, None).unwrap();
    assert_eq!(dv.to_host().unwrap(), cv);
    assert_eq!(dm.to_host().unwrap(), cm);
    // A non-finite gradient sets the flag and the update is skipped on the device.
    let mut bad = g.clone();
    bad[n / 2] = f32::INFINITY;
    let mut dbad = gpu.upload(&bad).unwrap();
    flag.reset(&gpu).unwrap();
    cuda::unscale_and_check(&gpu, &mut dbad, 0.5, &mut flag).unwrap();
    let before = dv.to_host().unwrap();
    cuda::sgd_update(&gpu, &mut dv, &dbad, Some(&mut dm), sp, Some(&flag)).unwrap();
    assert!(!flag.all_finite().unwrap());
    assert_eq!(dv.to_host().unwrap(), before);
    flag.reset(&gpu).unwrap();
    let mut dg2 = gpu.upload(&g).unwrap();
    cuda::unscale_and_check(&gpu, &mut dg2, 0.5, &mut flag).unwrap();
    assert!(flag.all_finite().unwrap());
    let half: Vec<f32> = g.iter().map(|v| v * 0.5).collect();
    assert_eq!(dg2.to_host().unwrap(), half);
}

#[test]
fn gemm_matches_the_cpu_for_every_dtype_and_transpose() {
    let Some(gpu) = gpu("gemm_matches_the_cpu_for_every_dtype_and_transpose") else {
        return;
    };
    fn run<T: mp_kernels::gemm::GemmInput>(gpu: &Gpu, rel: f32) {
        let (m, n, k) = (257, 33, 129);
        let mut rng = mp_core::Rng::new(7);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<T> = (0..m * k)
                .map(|_| T::from_f32(rng.uniform(-0.5, 0.5)))
                .collect();
            let b: Vec<T> = (0..k * n)
                .map(|_| T::from_f32(rng.uniform(-0.5, 0.5)))
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.1).collect();
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let mut want = vec![0.5f32; m * n];
            let av = if ta {
                MatRef::new(&a, k, m).t()
            } else {
                MatRef::new(&a, m, k)
            };
            let bv = if tb {
                MatRef::new(&b, n, k).t()
            } else {
                MatRef::new(&b, k, n)
            };
            cpu()
                .gemm(
                    av,
                    bv,
                    MatMut::new(&mut want, m, n),
                    Gemm::new()
                        .scaled(1.5, 0.25)
                        .epilogue(Epilogue::BiasRelu(&bias)),
                )
                .unwrap();
            let (da, db, dbias) = (
                gpu.upload(&a).unwrap(),
                gpu.upload(&b).unwrap(),
                gpu.upload(&bias).unwrap(),
            );
            let mut dc = gpu.upload(&vec![0.5f32; m * n]).unwrap();
            cuda::gemm(
                gpu,
                ta,
                tb,
                m,
                n,
                k,
                1.5,
                &da,
                lda,
                &db,
                ldb,
                0.25,
                &mut dc,
                n,
                CudaEpilogue::BiasRelu(&dbias),
            )
            .unwrap();
            close(
                &dc.to_host().unwrap(),
                &want,
                rel,
                &format!("{} ta={ta} tb={tb}", T::DTYPE),
            );
        }
    }
    run::<f32>(&gpu, 1e-5);
    run::<bf16>(&gpu, 1e-5);
    run::<f16>(&gpu, 1e-5);
}
