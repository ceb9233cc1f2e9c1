//! Convolution (im2col + GEMM, col2im) and pooling against float64 references, forward and every
//! gradient, per input dtype, on random shapes that are multiples of no tile (channels, filters
//! and sizes drawn from odd ranges), every stride, padding and dilation.
//!
//! Randomised tests print their seed (`MP_TEST_SEED=<seed>` replays one). Outputs are poisoned
//! before each run, so an element a kernel forgets to write fails.
//!
//! Error bounds asserted (u = 2^-24, float32's unit roundoff; the references take the same
//! rounded 16-bit inputs, so only the float32 arithmetic is measured):
//! - convolution forward, kernel gradient: `(K + 3) u S`, the recursive-summation bound of the
//!   GEMM with depth `K` (the patch length, or the batch's pixels for the kernel gradient),
//!   `S = sum |x w|` of the output's terms (the 16-bit paths multiply exactly in float32);
//! - input gradient (`dy · Wᵀ` then col2im): `(F + taps + 3) u S`, F filters, taps the window's
//!   positions; the stride-1 path (`dy` convolved with the flipped kernel, depth `F · taps`):
//!   `(F · taps + 3) u S`;
//! - any of these rounded to a 16-bit output: that bound times `1 + u_T`, plus `u_T |ref|` and
//!   half the type's smallest subnormal (`u_T` the output type's unit roundoff);
//! - max pooling: exact, the index of the chosen element too; its gradient exact up to
//!   `(overlaps + 1) u S`;
//! - average pooling: `(count + 2) u S + u_T |ref|` forward (`u_T` rounding to the output type),
//!   `(overlaps + 2) u S` backward.

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{Element, Rng};
use mp_kernels::conv::{Geometry, Padding, Window};
use mp_kernels::gemm::{Gemm, GemmInput, MatMut, MatRef};
use mp_kernels::{Cpu, Error};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn cpu() -> &'static Cpu {
    Cpu::global().unwrap()
}

fn rng(name: &str) -> Rng {
    Rng::new(test_seed(name))
}

fn pick(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below((hi - lo + 1) as u64) as usize
}

fn rand_vec<T: Element>(rng: &mut Rng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
        .collect()
}

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// A random valid geometry: any stride, dilation (none for pooling) and padding, sizes that fit.
fn random_geometry(rng: &mut Rng, dilated: bool) -> Geometry {
    loop {
        let size = [pick(rng, 1, 4), pick(rng, 1, 4)];
        let window = Window::new(size)
            .strides([pick(rng, 1, 3), pick(rng, 1, 3)])
            .dilation(if dilated {
                [pick(rng, 1, 2), pick(rng, 1, 2)]
            } else {
                [1, 1]
            })
            .padding(if rng.below(2) == 0 {
                Padding::Valid
            } else {
                Padding::Same
            });
        let input = [
            pick(rng, 1, 3),
            pick(rng, 1, 13),
            pick(rng, 1, 13),
            pick(rng, 1, 7),
        ];
        if let Ok(g) = Geometry::new("test", input, window) {
            return g;
        }
    }
}

/// The input position of tap `k` of output `o` along axis `d`, as the definition says.
fn tap(g: &Geometry, d: usize, o: usize, k: usize) -> Option<usize> {
    let p = (o * g.window.strides[d] + k * g.window.dilation[d]) as isize - g.pad[d] as isize;
    (p >= 0 && (p as usize) < g.input[d]).then_some(p as usize)
}

/// Every (output pixel, tap, input pixel) triple of the geometry, in float64 index form.
fn taps(g: &Geometry) -> Vec<(usize, usize, usize)> {
    let [oh, ow] = g.output;
    let [kh, kw] = g.window.size;
    let mut out = vec![];
    for b in 0..g.batch {
        for i in 0..oh {
            for j in 0..ow {
                for ki in 0..kh {
                    for kj in 0..kw {
                        if let (Some(ih), Some(iw)) = (tap(g, 0, i, ki), tap(g, 1, j, kj)) {
                            let pixel = (b * oh + i) * ow + j;
                            let input = (b * g.input[0] + ih) * g.input[1] + iw;
                            out.push((pixel, ki * kw + kj, input));
                        }
                    }
                }
            }
        }
    }
    out
}

fn assert_close(what: &str, got: &[f32], reference: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    for (i, ((&g, &r), &b)) in got.iter().zip(reference).zip(bound).enumerate() {
        let err = (g as f64 - r).abs();
        assert!(
            err <= b + f64::MIN_POSITIVE,
            "{what}[{i}] = {g}, reference {r}, error {err:e} > bound {b:e}"
        );
    }
}

/// Forward, kernel gradient and input gradient of one random convolution in `T`.
fn conv_case<T: GemmInput>(rng: &mut Rng, cpu: &Cpu, g: Option<Geometry>) {
    let filters = pick(rng, 1, 11);
    conv_case_with::<T>(rng, cpu, g, filters);
}

/// [`conv_case`] with `filters` filters.
fn conv_case_with<T: GemmInput>(rng: &mut Rng, cpu: &Cpu, g: Option<Geometry>, filters: usize) {
    let g = g.unwrap_or_else(|| random_geometry(rng, true));
    let (pixels, patch, c) = (g.pixels(), g.patch_len(), g.channels);
    let x: Vec<T> = rand_vec(rng, g.input_len());
    let w: Vec<T> = rand_vec(rng, patch * filters);
    let dy: Vec<T> = rand_vec(rng, pixels * filters);
    let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
    let what = format!("{:?} {g:?} filters {filters}", T::DTYPE);

    let mut cols = vec![T::from_f32(-77.0); g.cols_len()];
    cpu.im2col(&g, &x, &mut cols).unwrap();
    let mut y = vec![f32::NAN; pixels * filters];
    cpu.gemm(
        MatRef::new(&cols, pixels, patch),
        MatRef::new(&w, patch, filters),
        MatMut::new(&mut y, pixels, filters),
        Gemm::new(),
    )
    .unwrap();
    let mut dw = vec![f32::NAN; patch * filters];
    cpu.gemm(
        MatRef::new(&cols, pixels, patch).t(),
        MatRef::new(&dy, pixels, filters),
        MatMut::new(&mut dw, patch, filters),
        Gemm::new(),
    )
    .unwrap();
    let mut dcols = vec![f32::NAN; g.cols_len()];
    cpu.gemm(
        MatRef::new(&dy, pixels, filters),
        MatRef::new(&w, patch, filters).t(),
        MatMut::new(&mut dcols, pixels, patch),
        Gemm::new(),
    )
    .unwrap();
    let mut dx = vec![f32::NAN; g.input_len()];
    cpu.col2im(&g, &dcols, &mut dx).unwrap();

    // The float64 references, straight from the definition.
    let mut y_ref = vec![0.0; pixels * filters];
    let mut y_abs = vec![0.0; pixels * filters];
    let mut dw_ref = vec![0.0; patch * filters];
    let mut dw_abs = vec![0.0; patch * filters];
    let mut dx_ref = vec![0.0; g.input_len()];
    let mut dx_abs = vec![0.0; g.input_len()];
    for (p, t, input) in taps(&g) {
        for ch in 0..c {
            let xv = xd[input * c + ch];
            for f in 0..filters {
                let wv = wd[(t * c + ch) * filters + f];
                let dyv = dyd[p * filters + f];
                y_ref[p * filters + f] += xv * wv;
                y_abs[p * filters + f] += (xv * wv).abs();
                dw_ref[(t * c + ch) * filters + f] += xv * dyv;
                dw_abs[(t * c + ch) * filters + f] += (xv * dyv).abs();
                dx_ref[input * c + ch] += dyv * wv;
                dx_abs[input * c + ch] += (dyv * wv).abs();
            }
        }
    }
    let taps_n = (g.window.size[0] * g.window.size[1]) as f64;
    let bound = |abs: &[f64], k: f64| abs.iter().map(|s| (k + 3.0) * U * s).collect::<Vec<_>>();
    assert_close(
        &format!("{what} y"),
        &y,
        &y_ref,
        &bound(&y_abs, patch as f64),
    );
    assert_close(
        &format!("{what} dw"),
        &dw,
        &dw_ref,
        &bound(&dw_abs, pixels as f64),
    );
    assert_close(
        &format!("{what} dx"),
        &dx,
        &dx_ref,
        &bound(&dx_abs, filters as f64 + taps_n),
    );

    // The fused entry points: forward and input gradient into float32 and into `T` (rounded
    // once more), the kernel gradient added into float32. A stride-1 input gradient is the
    // convolution of `dy` with the flipped kernel, a GEMM of depth `taps * filters`.
    let mut y = vec![f32::NAN; pixels * filters];
    cpu.conv2d(&g, &x, &w, filters, &mut y, Gemm::new())
        .unwrap();
    let y_bound = bound(&y_abs, patch as f64);
    assert_close(&format!("{what} conv2d y"), &y, &y_ref, &y_bound);
    let mut y_t = vec![T::from_f32(f32::NAN); pixels * filters];
    cpu.conv2d(&g, &x, &w, filters, &mut y_t, Gemm::new())
        .unwrap();
    assert_close(
        &format!("{what} conv2d y as {:?}", T::DTYPE),
        &y_t.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        &y_ref,
        &rounded::<T>(&y_bound, &y_ref, unit::<T>()),
    );
    let depth = filters as f64 * taps_n;
    let dx_bound = bound(&dx_abs, depth.max(filters as f64 + taps_n));
    let mut dx = vec![f32::NAN; g.input_len()];
    cpu.conv2d_backward_input(&g, &dy, &w, filters, &mut dx)
        .unwrap();
    assert_close(
        &format!("{what} conv2d_backward_input dx"),
        &dx,
        &dx_ref,
        &dx_bound,
    );
    let mut dx_t = vec![T::from_f32(f32::NAN); g.input_len()];
    cpu.conv2d_backward_input(&g, &dy, &w, filters, &mut dx_t)
        .unwrap();
    assert_close(
        &format!("{what} conv2d_backward_input dx as {:?}", T::DTYPE),
        &dx_t.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        &dx_ref,
        &rounded::<T>(&dx_bound, &dx_ref, unit::<T>()),
    );
    let mut dw = vec![0.0f32; patch * filters];
    cpu.conv2d_backward_kernel(&g, &x, &dy, filters, &mut dw)
        .unwrap();
    assert_close(
        &format!("{what} conv2d_backward_kernel dw"),
        &dw,
        &dw_ref,
        &bound(&dw_abs, pixels as f64),
    );
}

/// The unit roundoff of `T`.
fn unit<T: Element>() -> f64 {
    match T::DTYPE {
        mp_core::DType::F16 => 1.0 / 2048.0,
        mp_core::DType::BF16 => 1.0 / 256.0,
        _ => U,
    }
}

/// Half the smallest subnormal of `T`: the absolute error of rounding below its normal range.
fn eta<T: Element>() -> f64 {
    match T::DTYPE {
        mp_core::DType::F16 => (-25f64).exp2(),
        mp_core::DType::BF16 => (-134f64).exp2(),
        _ => (-150f64).exp2(),
    }
}

/// A float32 bound widened by one rounding to `T` (unit roundoff `u_t`, subnormals included).
fn rounded<T: Element>(bound: &[f64], reference: &[f64], u_t: f64) -> Vec<f64> {
    bound
        .iter()
        .zip(reference)
        .map(|(b, r)| b * (1.0 + u_t) + u_t * r.abs() + eta::<T>())
        .collect()
}

fn conv_sweep<T: GemmInput>(name: &str) {
    let mut rng = rng(name);
    let cpu = Cpu::global().unwrap();
    for _ in 0..60 {
        conv_case::<T>(&mut rng, cpu, None);
    }
    // Above the threshold where images run on several threads.
    let big = Window::new([3, 3]).padding(Padding::Same);
    conv_case::<T>(
        &mut rng,
        cpu,
        Geometry::new("test", [5, 19, 17, 13], big).ok(),
    );
    // Batches large enough that each kernel thread takes its own images (forward, the stride-1
    // input gradient and the kernel gradient), strided and dilated too.
    conv_case::<T>(
        &mut rng,
        cpu,
        Geometry::new("test", [9, 11, 13, 7], big).ok(),
    );
    let strided = Window::new([3, 2]).strides([2, 1]).dilation([1, 2]);
    conv_case::<T>(
        &mut rng,
        cpu,
        Geometry::new("test", [10, 12, 9, 5], strided).ok(),
    );
    // Enough channels for the implicit-GEMM tiles (the patches read from a padded copy of the
    // input, no im2col matrix), odd and multiple-of-16 channel counts, strided and dilated.
    for (input, window) in [
        ([9, 11, 13, 16], big),
        ([8, 7, 10, 9], strided),
        (
            [8, 9, 8, 32],
            Window::new([3, 3]).dilation([2, 2]).padding(Padding::Same),
        ),
    ] {
        conv_case::<T>(&mut rng, cpu, Geometry::new("test", input, window).ok());
    }
    // Channels a multiple of 16 and filters of 8: the kernel gradient's implicit tiles too
    // (patch widths that end in 48-, 32- and 16-wide panels).
    for (input, window, filters) in [
        ([9, 11, 13, 16], big, 8),
        ([8, 7, 10, 32], strided, 24),
        (
            [8, 6, 5, 48],
            Window::new([2, 2]).padding(Padding::Same),
            16,
        ),
        ([10, 5, 7, 16], Window::new([1, 2]).strides([1, 2]), 40),
    ] {
        conv_case_with::<T>(
            &mut rng,
            cpu,
            Geometry::new("test", input, window).ok(),
            filters,
        );
    }
}

#[test]
fn conv_f32_forward_and_gradients_match_float64() {
    conv_sweep::<f32>("conv_f32");
}

#[test]
fn conv_bf16_forward_and_gradients_match_float64() {
    conv_sweep::<bf16>("conv_bf16");
}

#[test]
fn conv_f16_forward_and_gradients_match_float64() {
    conv_sweep::<f16>("conv_f16");
}

/// Max and average pooling, forward and backward, in `T`.
fn pool_case<T: Element>(rng: &mut Rng, g: Option<Geometry>) {
    let g = g.unwrap_or_else(|| random_geometry(rng, false));
    let c = g.channels;
    let x: Vec<T> = rand_vec(rng, g.input_len());
    let dy: Vec<T> = rand_vec(rng, g.output_len());
    let (xd, dyd) = (f64s(&x), f64s(&dy));
    let what = format!("{:?} {g:?}", T::DTYPE);
    let taps = taps(&g);

    // Max pooling: the first largest value of each window (random values: ties are rare, and
    // the kernel keeps the first, as the reference).
    let mut y = vec![T::from_f32(-77.0); g.output_len()];
    let mut arg = vec![u32::MAX; g.output_len()];
    cpu().max_pool(&g, &x, &mut y, &mut arg).unwrap();
    let mut best: Vec<Option<(f64, usize)>> = vec![None; g.output_len()];
    for &(p, _, input) in &taps {
        for ch in 0..c {
            let v = xd[input * c + ch];
            let slot = &mut best[p * c + ch];
            if slot.is_none_or(|(b, _)| v > b) {
                *slot = Some((v, input * c + ch));
            }
        }
    }
    for (o, b) in best.iter().enumerate() {
        let (v, at) = b.expect("every window has a position inside the input");
        assert_eq!(y[o].to_f64(), v, "{what} max y[{o}]");
        assert_eq!(arg[o] as usize, at, "{what} argmax[{o}]");
    }
    let mut dx = vec![f32::NAN; g.input_len()];
    cpu().max_pool_backward(&g, &dy, &arg, &mut dx).unwrap();
    let mut dx_ref = vec![0.0; g.input_len()];
    let mut dx_abs = vec![0.0; g.input_len()];
    for (o, &a) in arg.iter().enumerate() {
        dx_ref[a as usize] += dyd[o];
        dx_abs[a as usize] += dyd[o].abs();
    }
    let overlaps = (g.window.size[0].div_ceil(g.window.strides[0])
        * g.window.size[1].div_ceil(g.window.strides[1])) as f64;
    let b: Vec<f64> = dx_abs.iter().map(|s| (overlaps + 1.0) * U * s).collect();
    assert_close(&format!("{what} max dx"), &dx, &dx_ref, &b);

    // Average pooling over the positions inside the input.
    let mut y = vec![T::from_f32(-77.0); g.output_len()];
    cpu().avg_pool(&g, &x, &mut y).unwrap();
    let mut sum = vec![0.0; g.output_len()];
    let mut abs = vec![0.0; g.output_len()];
    let mut count = vec![0usize; g.pixels()];
    for &(p, _, input) in &taps {
        count[p] += 1;
        for ch in 0..c {
            sum[p * c + ch] += xd[input * c + ch];
            abs[p * c + ch] += xd[input * c + ch].abs();
        }
    }
    let u_t = unit::<T>();
    let mean: Vec<f64> = (0..g.output_len())
        .map(|o| sum[o] / count[o / c] as f64)
        .collect();
    let got: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
    let b: Vec<f64> = (0..g.output_len())
        .map(|o| {
            let n = count[o / c] as f64;
            (n + 2.0) * U * abs[o] / n + u_t * mean[o].abs()
        })
        .collect();
    assert_close(&format!("{what} avg y"), &got, &mean, &b);
    let mut dx = vec![f32::NAN; g.input_len()];
    cpu().avg_pool_backward(&g, &dy, &mut dx).unwrap();
    let mut dx_ref = vec![0.0; g.input_len()];
    let mut dx_abs = vec![0.0; g.input_len()];
    for &(p, _, input) in &taps {
        let n = count[p] as f64;
        for ch in 0..c {
            dx_ref[input * c + ch] += dyd[p * c + ch] / n;
            dx_abs[input * c + ch] += (dyd[p * c + ch] / n).abs();
        }
    }
    let b: Vec<f64> = dx_abs.iter().map(|s| (overlaps + 2.0) * U * s).collect();
    assert_close(&format!("{what} avg dx"), &dx, &dx_ref, &b);
}

#[test]
fn pooling_forward_and_gradients_match_float64() {
    let mut rng = rng("pooling");
    for _ in 0..80 {
        pool_case::<f32>(&mut rng, None);
        pool_case::<bf16>(&mut rng, None);
        pool_case::<f16>(&mut rng, None);
    }
    // Above the threshold where images run on several threads; overlapping windows.
    let big = Window::new([3, 3]).strides([2, 2]).padding(Padding::Same);
    let g = Geometry::new("test", [5, 29, 31, 17], big).ok();
    pool_case::<f32>(&mut rng, g);
    pool_case::<bf16>(&mut rng, g);
    // Keras's default 2 x 2 window at stride 2 (a path of its own): odd sides (the last row
    // and column are dropped), channel counts around the vector width, and the CNN's shape.
    let keras = Window::new([2, 2]).strides([2, 2]);
    for input in [[3, 7, 9, 5], [2, 6, 4, 17], [1, 2, 2, 1], [4, 28, 28, 32]] {
        let g = Geometry::new("test", input, keras).ok();
        pool_case::<f32>(&mut rng, g);
        pool_case::<bf16>(&mut rng, g);
        pool_case::<f16>(&mut rng, g);
    }
}

#[test]
fn nan_and_infinity_propagate_through_2x2_stride_2_pooling() {
    // Two windows side by side, two channels: the first NaN of a window wins and stays.
    let g = Geometry::new("test", [1, 2, 4, 2], Window::new([2, 2]).strides([2, 2])).unwrap();
    let nan = f32::NAN;
    #[rustfmt::skip]
    let x = [
        1.0, nan,   3.0, 2.0,   0.0, 5.0,   nan, -1.0,
        nan, 0.0,   f32::INFINITY, -1.0,   4.0, nan,   9.0, 8.0,
    ];
    let mut y = [0.0f32; 4];
    let mut arg = [0u32; 4];
    cpu().max_pool(&g, &x, &mut y, &mut arg).unwrap();
    assert!(
        y[0].is_nan() && arg[0] == 8,
        "window 0, channel 0: {y:?} {arg:?}"
    );
    assert!(
        y[1].is_nan() && arg[1] == 1,
        "window 0, channel 1: {y:?} {arg:?}"
    );
    assert!(
        y[2].is_nan() && arg[2] == 6,
        "window 1, channel 0: {y:?} {arg:?}"
    );
    assert!(
        y[3].is_nan() && arg[3] == 13,
        "window 1, channel 1: {y:?} {arg:?}"
    );
}

/// 16-bit 2 x 2 pooling (order keys of the bits) chooses what float32 pooling of the widened
/// values chooses, on values full of ties, signed zeros, infinities and NaNs of both signs.
fn pooling_16_bit_matches_float32<T: Element>(name: &str) {
    let mut rng = rng(name);
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        1e-7,
        -1e-7,
    ];
    // Odd sides: the 2 x 2 windows leave the last row and column out, as Keras's `valid`.
    let g = Geometry::new("test", [3, 9, 7, 37], Window::new([2, 2]).strides([2, 2])).unwrap();
    for _ in 0..20 {
        let x: Vec<T> = (0..g.input_len())
            .map(|_| {
                let k = (rng.uniform(0.0, specials.len() as f32) as usize).min(specials.len() - 1);
                T::from_f32(specials[k])
            })
            .collect();
        let wide: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let (mut y, mut arg) = (
            vec![T::from_f32(5.0); g.output_len()],
            vec![0u32; g.output_len()],
        );
        let (mut yf, mut argf) = (vec![5.0f32; g.output_len()], vec![0u32; g.output_len()]);
        cpu().max_pool(&g, &x, &mut y, &mut arg).unwrap();
        cpu().max_pool(&g, &wide, &mut yf, &mut argf).unwrap();
        assert_eq!(arg, argf, "{:?}: the chosen elements", T::DTYPE);
        for (o, (v, &a)) in y.iter().zip(&arg).enumerate() {
            assert_eq!(
                v.to_f32().to_bits(),
                x[a as usize].to_f32().to_bits(),
                "{:?} y[{o}] is x[argmax] bit for bit",
                T::DTYPE
            );
        }
    }
}

#[test]
fn bfloat16_and_float16_2x2_pooling_choose_as_float32_does() {
    pooling_16_bit_matches_float32::<bf16>("pool16 bf16");
    pooling_16_bit_matches_float32::<f16>("pool16 f16");
}

/// Global average pooling is average pooling with the whole image as the window.
#[test]
fn global_average_pooling_is_the_mean_of_each_channel() {
    let mut rng = rng("global_pool");
    let (n, h, w, c) = (3, 5, 7, 9);
    let x: Vec<f32> = rand_vec(&mut rng, n * h * w * c);
    let g = Geometry::new("test", [n, h, w, c], Window::new([h, w])).unwrap();
    assert_eq!(g.output, [1, 1]);
    let mut y = vec![0.0f32; n * c];
    cpu().avg_pool(&g, &x, &mut y).unwrap();
    for b in 0..n {
        for ch in 0..c {
            let s: f64 = (0..h * w).map(|p| x[(b * h * w + p) * c + ch] as f64).sum();
            let r = s / (h * w) as f64;
            assert!((y[b * c + ch] as f64 - r).abs() <= 1e-6, "{b} {ch}");
        }
    }
}

#[test]
fn nan_and_infinity_propagate_through_pooling() {
    let g = Geometry::new("test", [1, 2, 2, 2], Window::new([2, 2])).unwrap();
    let x = [
        1.0f32,
        f32::NAN,
        3.0,
        2.0,
        f32::NAN,
        0.0,
        f32::INFINITY,
        -1.0,
    ];
    let mut y = [0.0f32; 2];
    let mut arg = [0u32; 2];
    cpu().max_pool(&g, &x, &mut y, &mut arg).unwrap();
    assert!(
        y[0].is_nan() && arg[0] == 4,
        "channel 0: the first NaN, at index 4: {y:?} {arg:?}"
    );
    assert!(y[1].is_nan() && arg[1] == 1, "channel 1: {y:?} {arg:?}");
    let x = [1.0f32, 0.0, f32::INFINITY, 2.0, 3.0, 0.0, 0.0, -1.0];
    cpu().max_pool(&g, &x, &mut y, &mut arg).unwrap();
    assert_eq!((y, arg), ([f32::INFINITY, 2.0], [2, 3]));
    cpu().avg_pool(&g, &x, &mut y).unwrap();
    assert_eq!(y[0], f32::INFINITY);
    let x = [
        f32::INFINITY,
        0.0,
        f32::NEG_INFINITY,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ];
    cpu().avg_pool(&g, &x, &mut y).unwrap();
    assert!(y[0].is_nan());
}

#[test]
fn wrong_lengths_are_errors_that_name_the_argument_and_write_nothing() {
    let g = Geometry::new("test", [2, 4, 4, 3], Window::new([3, 3])).unwrap();
    let x = vec![1.0f32; g.input_len()];
    let mut cols = vec![5.0f32; g.cols_len() - 1];
    let e = cpu().im2col(&g, &x, &mut cols).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthMismatch {
                op: "im2col",
                what: "cols",
                ..
            }
        ),
        "{e}"
    );
    assert!(cols.iter().all(|&v| v == 5.0));
    let mut dx = vec![5.0f32; g.input_len() + 1];
    let e = cpu()
        .col2im(&g, &vec![0.0f32; g.cols_len()], &mut dx)
        .unwrap_err();
    assert!(
        e.to_string().contains("col2im") && e.to_string().contains("dx"),
        "{e}"
    );
    assert!(dx.iter().all(|&v| v == 5.0));
    let mut y = vec![0.0f32; g.output_len()];
    let mut arg = vec![0u32; g.output_len() - 1];
    let e = cpu().max_pool(&g, &x, &mut y, &mut arg).unwrap_err();
    assert!(e.to_string().contains("argmax"), "{e}");
    // An argmax from another image is refused, not followed.
    let arg = vec![0u32; g.output_len()];
    let mut dx = vec![5.0f32; g.input_len()];
    let e = cpu().max_pool_backward(&g, &y, &arg, &mut dx).unwrap_err();
    assert!(e.to_string().contains("not in image 1"), "{e}");
    assert!(dx.iter().all(|&v| v == 5.0));
    // The same on a batch large enough to be checked on all kernel threads: the first image
    // (in batch order) with a stray entry is named, and nothing is written.
    let big = Geometry::new("test", [8, 32, 32, 64], Window::new([2, 2]).strides([2, 2])).unwrap();
    let xb = vec![1.0f32; big.input_len()];
    let (mut yb, mut argb) = (vec![0.0f32; big.output_len()], vec![0u32; big.output_len()]);
    cpu().max_pool(&big, &xb, &mut yb, &mut argb).unwrap();
    let per = big.output_len() / 8;
    argb[5 * per + 7] -= (big.input_len() / 8) as u32;
    argb[6 * per] = u32::MAX;
    let mut dx = vec![5.0f32; big.input_len()];
    let e = cpu()
        .max_pool_backward(&big, &yb, &argb, &mut dx)
        .unwrap_err();
    assert!(e.to_string().contains("is not in image 5"), "{e}");
    assert!(dx.iter().all(|&v| v == 5.0));
    let dilated =
        Geometry::new("test", [1, 5, 5, 1], Window::new([2, 2]).dilation([2, 1])).unwrap();
    let e = cpu()
        .avg_pool(&dilated, &[0.0f32; 25], &mut [0.0f32; 12])
        .unwrap_err();
    assert!(e.to_string().contains("no dilation"), "{e}");
}

/// The tensor surface: the input's rank and shape are checked and named; outputs have the
/// NHWC shapes the geometry says.
#[test]
fn the_op_surface_checks_ranks_and_shapes() {
    use mp_core::{BF16, Tensor};
    use mp_kernels::ops;

    let x = Tensor::<BF16>::from_f32(&[2, 5, 4, 3], &vec![0.5; 120]).unwrap();
    let flat = Tensor::<BF16>::from_f32(&[2, 60], &vec![0.5; 120]).unwrap();
    let w = Window::new([3, 3]).padding(Padding::Same).strides([2, 1]);
    let e = ops::geometry("Conv2D conv_1", &flat, w)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Conv2D conv_1") && e.contains("rank 4") && e.contains("[2, 60]"),
        "{e}"
    );
    let g = ops::geometry("Conv2D conv_1", &x, w).unwrap();
    assert_eq!(g.output, [3, 4]);
    let cols = ops::im2col(&x, &g).unwrap();
    assert_eq!(cols.shape(), &[2 * 3 * 4, 27]);
    let dx = ops::col2im(&cols, &g).unwrap();
    assert_eq!(dx.shape(), &[2, 5, 4, 3]);
    let e = ops::im2col(&flat, &g).unwrap_err().to_string();
    assert!(e.contains("im2col") && e.contains("[2, 60]"), "{e}");
    let e = ops::col2im(&x, &g).unwrap_err().to_string();
    assert!(e.contains("col2im") && e.contains("dcols"), "{e}");

    let p = ops::geometry("MaxPooling2D pool", &x, Window::new([2, 2]).strides([2, 2])).unwrap();
    let (y, idx) = ops::max_pool(&x, &p).unwrap();
    assert_eq!(y.shape(), &[2, 2, 2, 3]);
    assert_eq!(
        ops::max_pool_backward(&y, &idx).unwrap().shape(),
        &[2, 5, 4, 3]
    );
    let e = ops::max_pool_backward(&x, &idx).unwrap_err().to_string();
    assert!(e.contains("max_pool_backward") && e.contains("dy"), "{e}");
    let a = ops::avg_pool(&x, &p).unwrap();
    assert_eq!(a.to_f32_vec().unwrap(), vec![0.5; 24]);
    assert_eq!(
        ops::avg_pool_backward(&a, &p).unwrap().shape(),
        &[2, 5, 4, 3]
    );
    let e = ops::geometry("MaxPooling2D pool", &x, Window::new([0, 2])).unwrap_err();
    assert!(e.to_string().contains("MaxPooling2D pool") && e.to_string().contains("size [0, 2]"));
}

/// The chunked convolution (`Cpu::conv2d` and its two gradients, which form patches a few MiB
/// of images at a time) against one im2col and one GEMM over the whole batch, on a batch that
/// splits into several chunks and a remainder: the same sums, so within float32 rounding.
fn chunked_matches_whole<T: GemmInput>(name: &str) {
    let mut rng = rng(name);
    let cpu = cpu();
    let w = Window::new([3, 3]).padding(Padding::Same);
    // 48x48x24 images: 2304 pixels x 216 patch values, 2 MiB float32 a image: chunks of 4.
    let g = Geometry::new("test", [9, 48, 48, 24], w).unwrap();
    let f = 10;
    let (pixels, patch) = (g.pixels(), g.patch_len());
    let x: Vec<T> = rand_vec(&mut rng, g.input_len());
    let k: Vec<T> = rand_vec(&mut rng, patch * f);
    let dy: Vec<T> = rand_vec(&mut rng, pixels * f);
    let mut cols = vec![T::from_f32(0.0); g.cols_len()];
    cpu.im2col(&g, &x, &mut cols).unwrap();
    let close = |what: &str, a: &[f32], b: &[f32]| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "{name} {what}[{i}]: {p} vs {q}"
            );
        }
    };
    let mut whole = vec![0.0f32; pixels * f];
    cpu.gemm(
        MatRef::new(&cols, pixels, patch),
        MatRef::new(&k, patch, f),
        MatMut::new(&mut whole, pixels, f),
        Gemm::new(),
    )
    .unwrap();
    let mut y = vec![f32::NAN; pixels * f];
    cpu.conv2d(&g, &x, &k, f, &mut y, Gemm::new()).unwrap();
    close("y", &y, &whole);
    let mut dcols = vec![0.0f32; g.cols_len()];
    cpu.gemm(
        MatRef::new(&dy, pixels, f),
        MatRef::new(&k, patch, f).t(),
        MatMut::new(&mut dcols, pixels, patch),
        Gemm::new(),
    )
    .unwrap();
    let mut dx_whole = vec![0.0f32; g.input_len()];
    cpu.col2im(&g, &dcols, &mut dx_whole).unwrap();
    let mut dx = vec![f32::NAN; g.input_len()];
    cpu.conv2d_backward_input(&g, &dy, &k, f, &mut dx).unwrap();
    close("dx", &dx, &dx_whole);
    let mut dw_whole = vec![0.5f32; patch * f];
    cpu.gemm(
        MatRef::new(&cols, pixels, patch).t(),
        MatRef::new(&dy, pixels, f),
        MatMut::new(&mut dw_whole, patch, f),
        Gemm::new().accumulate(),
    )
    .unwrap();
    let mut dw = vec![0.5f32; patch * f];
    cpu.conv2d_backward_kernel(&g, &x, &dy, f, &mut dw).unwrap();
    let scale = dw_whole.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (p, q)) in dw.iter().zip(&dw_whole).enumerate() {
        // The chunks' sums are added in another order than one GEMM's depth blocks.
        assert!((p - q).abs() <= 1e-5 * scale, "{name} dw[{i}]: {p} vs {q}");
    }
}

#[test]
fn chunked_convolution_matches_one_gemm() {
    chunked_matches_whole::<f32>("chunked f32");
    chunked_matches_whole::<bf16>("chunked bf16");
    chunked_matches_whole::<f16>("chunked f16");
}
