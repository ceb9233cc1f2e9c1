//! The convolutional layers against float64 references, forward and every gradient, under every
//! policy, on random shapes that are multiples of no tile, every stride, padding and dilation.
//!
//! The references take the layer's own rounded inputs (the input and the kernel in the compute
//! dtype, as the layer uses them) and, for the ReLU mask, the layer's output, so the bounds
//! measure the layer's float32 arithmetic and its one rounding to the compute dtype:
//! - output and input gradient: `(K + 3) u S + u_T |ref| + s_T`, K the GEMM depth (patch
//!   length, or filters plus window taps for the input gradient), `S` the sum of the terms'
//!   magnitudes, u = 2^-24, `u_T` the compute dtype's unit roundoff (2^-8 bfloat16, 2^-11
//!   float16) and `s_T` half its smallest subnormal (the absolute rounding error near zero);
//! - kernel and bias gradients (float32): `(pixels + 3) u S`.

use mp_core::{DType, DTypeKind, Element, Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng};
use mp_core::{F32, Tensor};
use mp_layers::{AveragePooling2D, Conv2D, GlobalAveragePooling2D, Layer, MaxPooling2D, Padding};

const U: f64 = 1.0 / (1u64 << 24) as f64;

type Compute<P> = <P as PolicyKind>::Compute;

fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F32 => U,
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
    }
}

/// Half the smallest subnormal of `d`: the absolute rounding error near zero.
fn half_subnormal(d: DType) -> f64 {
    match d {
        DType::F32 => f64::from(f32::from_bits(1)) / 2.0,
        DType::BF16 => f64::from(f32::from_bits(1 << 16)) / 2.0,
        DType::F16 => 2f64.powi(-25),
    }
}

fn pick(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below((hi - lo + 1) as u64) as usize
}

fn values<D: DTypeKind>(t: &Tensor<D>) -> Vec<f64> {
    t.as_slice().unwrap().iter().map(|v| v.to_f64()).collect()
}

fn rand<D: DTypeKind>(rng: &mut Rng, shape: &[usize]) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::<D>::from_f32(shape, &rng.uniform_vec(n, -1.0, 1.0)).unwrap()
}

fn check(what: &str, got: &[f64], reference: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    for i in 0..got.len() {
        let err = (got[i] - reference[i]).abs();
        assert!(
            err <= bound[i] + 1e-30,
            "{what}[{i}] = {}, reference {}, error {err:e} > bound {:e}",
            got[i],
            reference[i],
            bound[i]
        );
    }
}

/// Where tap `k` of output `o` lands along an axis, if inside the input.
fn tap(o: usize, k: usize, stride: usize, dilation: usize, pad: usize, n: usize) -> Option<usize> {
    let p = (o * stride + k * dilation) as isize - pad as isize;
    (p >= 0 && (p as usize) < n).then_some(p as usize)
}

/// TensorFlow's `same` padding before the first element: out = ceil(n / s).
fn same_pad(n: usize, k: usize, s: usize, d: usize) -> (usize, usize) {
    let out = n.div_ceil(s);
    let span = (k - 1) * d + 1;
    (out, ((out - 1) * s + span).saturating_sub(n) / 2)
}

fn conv_case<P: PolicyKind>(rng: &mut Rng) {
    let u_t = unit_roundoff(Compute::<P>::DTYPE);
    let s_t = half_subnormal(Compute::<P>::DTYPE);
    let (k, s, d) = (
        [pick(rng, 1, 4), pick(rng, 1, 4)],
        [pick(rng, 1, 3), pick(rng, 1, 3)],
        [pick(rng, 1, 2), pick(rng, 1, 2)],
    );
    let same = rng.below(2) == 0;
    let span = [(k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1];
    let (h, w) = (pick(rng, span[0], 12), pick(rng, span[1], 12));
    let (n, c, f) = (pick(rng, 1, 3), pick(rng, 1, 6), pick(rng, 1, 9));
    let relu = rng.below(2) == 0;
    let mut layer = Conv2D::<P>::new(f, k)
        .strides(s)
        .dilation(d)
        .padding(if same { Padding::Same } else { Padding::Valid })
        .with_seed(rng.next_u64());
    if relu {
        layer = layer.relu();
    }
    let out = layer.build(&[h, w, c]).unwrap();
    let (oh, pt, ow, pl) = if same {
        let (oh, pt) = same_pad(h, k[0], s[0], d[0]);
        let (ow, pl) = same_pad(w, k[1], s[1], d[1]);
        (oh, pt, ow, pl)
    } else {
        ((h - span[0]) / s[0] + 1, 0, (w - span[1]) / s[1] + 1, 0)
    };
    assert_eq!(out, vec![oh, ow, f]);
    // A non-zero bias, so that its part of the output is checked too.
    let bias: Vec<f32> = rng.uniform_vec(f, -0.5, 0.5);
    layer
        .visit_variables("", &mut |p, v| {
            if p == "bias" {
                v.assign(&bias)?;
            }
            Ok(())
        })
        .unwrap();
    let x = rand::<Compute<P>>(rng, &[n, h, w, c]);
    let y = layer.forward_train(&x).unwrap();
    assert_eq!(y.shape(), &[n, oh, ow, f]);
    let dy = rand::<Compute<P>>(rng, &[n, oh, ow, f]);
    layer
        .visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
        .unwrap();
    let dx = layer.backward(&dy, true).unwrap().unwrap();

    // The kernel as the layer used it: rounded to the compute dtype.
    let kernel: Vec<f64> = layer
        .kernel()
        .unwrap()
        .value()
        .as_slice()
        .unwrap()
        .iter()
        .map(|&v| <Compute<P> as DTypeKind>::Elem::from_f32(v).to_f64())
        .collect();
    let (xv, yv, dyv) = (values(&x), values(&y), values(&dy));
    let mut y_ref = vec![0.0; n * oh * ow * f];
    let mut y_abs = vec![0.0; n * oh * ow * f];
    let mut dk = vec![0.0; kernel.len()];
    let mut dk_abs = vec![0.0; kernel.len()];
    let mut db = vec![0.0; f];
    let mut db_abs = vec![0.0; f];
    let mut dx_ref = vec![0.0; n * h * w * c];
    let mut dx_abs = vec![0.0; n * h * w * c];
    for b in 0..n {
        for i in 0..oh {
            for j in 0..ow {
                let o = ((b * oh + i) * ow + j) * f;
                for ff in 0..f {
                    y_ref[o + ff] = bias[ff] as f64;
                    y_abs[o + ff] = (bias[ff] as f64).abs();
                }
                for ki in 0..k[0] {
                    let Some(ih) = tap(i, ki, s[0], d[0], pt, h) else {
                        continue;
                    };
                    for kj in 0..k[1] {
                        let Some(iw) = tap(j, kj, s[1], d[1], pl, w) else {
                            continue;
                        };
                        for ch in 0..c {
                            let xi = ((b * h + ih) * w + iw) * c + ch;
                            for ff in 0..f {
                                let ki_ = ((ki * k[1] + kj) * c + ch) * f + ff;
                                let t = xv[xi] * kernel[ki_];
                                y_ref[o + ff] += t;
                                y_abs[o + ff] += t.abs();
                                // Through the ReLU as the layer saw its own output.
                                let dz = if relu && yv[o + ff] <= 0.0 {
                                    0.0
                                } else {
                                    dyv[o + ff]
                                };
                                dk[ki_] += xv[xi] * dz;
                                dk_abs[ki_] += (xv[xi] * dz).abs();
                                dx_ref[xi] += dz * kernel[ki_];
                                dx_abs[xi] += (dz * kernel[ki_]).abs();
                            }
                        }
                    }
                }
                for ff in 0..f {
                    let dz = if relu && yv[o + ff] <= 0.0 {
                        0.0
                    } else {
                        dyv[o + ff]
                    };
                    db[ff] += dz;
                    db_abs[ff] += dz.abs();
                }
            }
        }
    }
    if relu {
        y_ref.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    let what = format!(
        "{:?} n{n} {h}x{w}x{c} -> {f}, kernel {k:?} strides {s:?} dilation {d:?} same {same} \
         relu {relu}",
        P::POLICY
    );
    let patch = (k[0] * k[1] * c) as f64;
    let pixels = (n * oh * ow) as f64;
    let b: Vec<f64> = (0..y_ref.len())
        .map(|i| (patch + 3.0) * U * y_abs[i] + u_t * y_ref[i].abs() + s_t)
        .collect();
    check(&format!("{what} y"), &yv, &y_ref, &b);
    let taps = (k[0] * k[1]) as f64;
    let b: Vec<f64> = (0..dx_ref.len())
        .map(|i| (f as f64 + taps + 3.0) * U * dx_abs[i] + u_t * dx_ref[i].abs() + s_t)
        .collect();
    check(&format!("{what} dx"), &values(&dx), &dx_ref, &b);
    let mut grads: Vec<(String, Vec<f64>)> = vec![];
    layer
        .visit_variables("", &mut |p, v| {
            grads.push((p.to_string(), values(v.grad())));
            Ok(())
        })
        .unwrap();
    let b: Vec<f64> = dk_abs.iter().map(|s| (pixels + 3.0) * U * s).collect();
    check(&format!("{what} dkernel"), &grads[0].1, &dk, &b);
    let b: Vec<f64> = db_abs.iter().map(|s| (pixels + 3.0) * U * s).collect();
    check(&format!("{what} dbias"), &grads[1].1, &db, &b);
}

fn conv_sweep<P: PolicyKind>(seed: u64) {
    let mut rng = Rng::new(mp_core::rng::test_seed(&format!("conv2d {seed}")));
    for _ in 0..40 {
        conv_case::<P>(&mut rng);
    }
}

#[test]
fn conv2d_float32_matches_float64() {
    conv_sweep::<Float32>(1);
}

#[test]
fn conv2d_mixed_bfloat16_matches_float64() {
    conv_sweep::<MixedBFloat16>(2);
}

#[test]
fn conv2d_mixed_float16_matches_float64() {
    conv_sweep::<MixedFloat16>(3);
}

/// Pooling layers: shapes, values against float64 and gradients that sum to `dy`'s.
fn pooling<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed("pooling layers"));
    let (n, h, w, c) = (2, 7, 5, 3);
    let x = rand::<Compute<P>>(&mut rng, &[n, h, w, c]);
    let xv = values(&x);

    let mut max = MaxPooling2D::<P>::new([2, 2]);
    assert_eq!(max.build(&[h, w, c]).unwrap(), vec![3, 2, c]);
    let y = max.forward_train(&x).unwrap();
    let yv = values(&y);
    for b in 0..n {
        for i in 0..3 {
            for j in 0..2 {
                for ch in 0..c {
                    let m = (0..2)
                        .flat_map(|a| (0..2).map(move |bb| (a, bb)))
                        .map(|(a, bb)| xv[((b * h + 2 * i + a) * w + 2 * j + bb) * c + ch])
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert_eq!(yv[((b * 3 + i) * 2 + j) * c + ch], m);
                }
            }
        }
    }
    let dy = rand::<Compute<P>>(&mut rng, y.shape());
    let dx = max.backward(&dy, true).unwrap().unwrap();
    assert_eq!(dx.shape(), x.shape());
    let (sum_dx, sum_dy): (f64, f64) = (values(&dx).iter().sum(), values(&dy).iter().sum());
    assert!(
        (sum_dx - sum_dy).abs() <= 1e-2 * (1.0 + sum_dy.abs()),
        "{sum_dx} {sum_dy}"
    );

    let mut avg = AveragePooling2D::<P>::new([3, 3]).padding(Padding::Same);
    assert_eq!(avg.build(&[h, w, c]).unwrap(), vec![3, 2, c]);
    avg.forward_train(&x).unwrap();

    let mut gap = GlobalAveragePooling2D::<P>::new();
    assert_eq!(gap.build(&[h, w, c]).unwrap(), vec![c]);
    let y = gap.forward_train(&x).unwrap();
    assert_eq!(y.shape(), &[n, c]);
    let u_t = unit_roundoff(Compute::<P>::DTYPE);
    for b in 0..n {
        for ch in 0..c {
            let mean: f64 = (0..h * w)
                .map(|p| xv[(b * h * w + p) * c + ch])
                .sum::<f64>()
                / (h * w) as f64;
            let got = values(&y)[b * c + ch];
            assert!(
                (got - mean).abs() <= 1e-6 + u_t * mean.abs(),
                "{got} {mean}"
            );
        }
    }
    let dy = rand::<Compute<P>>(&mut rng, &[n, c]);
    let dx = gap.backward(&dy, true).unwrap().unwrap();
    let dxv = values(&dx);
    for b in 0..n {
        for p in 0..h * w {
            for ch in 0..c {
                let r = values(&dy)[b * c + ch] / (h * w) as f64;
                let got = dxv[(b * h * w + p) * c + ch];
                assert!((got - r).abs() <= 1e-7 + u_t * r.abs(), "{got} {r}");
            }
        }
    }
}

#[test]
fn pooling_layers_under_every_policy() {
    pooling::<Float32>();
    pooling::<MixedBFloat16>();
    pooling::<MixedFloat16>();
}

/// Bad configurations and inputs are errors that name the layer and the shapes.
#[test]
fn bad_convolutions_are_errors_naming_the_layer_and_shapes() {
    let e = |r: mp_layers::Result<Vec<usize>>| r.unwrap_err().to_string();
    let mut c = Conv2D::<Float32>::new(4, [5, 5]);
    c.set_name("conv_1");
    let s = e(c.build(&[3, 8, 1]));
    assert!(
        s.contains("conv_1") && s.contains("does not fit the input [3, 8]"),
        "{s}"
    );
    let mut c = Conv2D::<Float32>::new(4, [3, 3]).strides([0, 1]);
    c.set_name("conv_2");
    let s = e(c.build(&[8, 8, 1]));
    assert!(s.contains("conv_2") && s.contains("strides [0, 1]"), "{s}");
    let mut c = Conv2D::<Float32>::new(4, [3, 3]);
    c.set_name("conv_3");
    let s = e(c.build(&[784]));
    assert!(
        s.contains("conv_3") && s.contains("[784]") && s.contains("Reshape"),
        "{s}"
    );
    let mut c = Conv2D::<Float32>::new(0, [3, 3]);
    assert!(e(c.build(&[8, 8, 1])).contains("at least one filter"));
    // A channel mismatch at run time.
    let mut c = Conv2D::<Float32>::new(4, [3, 3]);
    c.set_name("conv_4");
    c.build(&[8, 8, 3]).unwrap();
    let x = Tensor::<F32>::zeros(&[2, 8, 8, 2]).unwrap();
    let s = c.forward(&x).unwrap_err().to_string();
    assert!(s.contains("conv_4") && s.contains("(batch, 8, 8, 3)") && s.contains("[2, 8, 8, 2]"));
    let mut p = MaxPooling2D::<Float32>::new([0, 2]);
    p.set_name("pool_1");
    let s = e(p.build(&[8, 8, 3]));
    assert!(s.contains("pool_1") && s.contains("size [0, 2]"), "{s}");
    let mut p = MaxPooling2D::<Float32>::new([2, 2]);
    let s = e(p.build(&[8, 3]));
    assert!(s.contains("MaxPooling2D") && s.contains("[8, 3]"), "{s}");
    let mut g = GlobalAveragePooling2D::<Float32>::new();
    g.build(&[4, 4, 3]).unwrap();
    let s = g.forward(&x).unwrap_err().to_string();
    assert!(
        s.contains("global_average_pooling2d") && s.contains("[2, 8, 8, 2]"),
        "{s}"
    );
}

mod residual {
    use super::*;
    use mp_layers::{Activation, Dense, Softmax, model};

    #[model]
    struct Block {
        inner: Dense,
        outer: Dense,
    }

    #[model]
    struct Net {
        stem: Dense,
        #[residual]
        block: Block,
        relu: Activation,
        #[dtype = "float32"]
        head: Softmax,
    }

    fn net<P: PolicyKind>(width: usize) -> Net<P> {
        Net::new(
            Dense::new(width),
            Block::new(Dense::new(width).relu(), Dense::new(width)),
            Activation::relu(),
            Softmax::new(),
        )
    }

    /// `y = x + block(x)`, and the gradient that reaches the input is the block's plus `dy`:
    /// the residual model against the same layers run by hand, bit for bit under float32.
    fn matches_by_hand<P: PolicyKind>() {
        let mut rng = Rng::new(mp_core::rng::test_seed("residual"));
        let mut m = net::<P>(7);
        assert_eq!(m.build(&[5]).unwrap(), vec![7]);
        let x = rand::<Compute<P>>(&mut rng, &[3, 5]);
        let y = m.forward_train(&x).unwrap();
        // By hand, with the model's own layers.
        let h = m.stem.forward(&x).unwrap();
        let b = m.block.forward(&h).unwrap();
        let mut sum = values(&b);
        for (s, v) in sum.iter_mut().zip(values(&h)) {
            *s = <Compute<P> as DTypeKind>::Elem::from_f64(*s + v).to_f64();
        }
        let r = Tensor::<Compute<P>>::from_f32(
            &[3, 7],
            &sum.iter().map(|&v| v.max(0.0) as f32).collect::<Vec<_>>(),
        )
        .unwrap();
        let p = m.head.forward(&mp_layers::convert(r).unwrap()).unwrap();
        assert_eq!(values(&y), values(&p));

        // The input gradient: through the block and around it.
        let dy = Tensor::<F32>::from_f32(&[3, 7], &rng.uniform_vec(21, -1.0, 1.0)).unwrap();
        m.visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
            .unwrap();
        let dx = m.backward(&dy, true).unwrap().unwrap();
        assert_eq!(dx.shape(), &[3, 5]);
        let mut found = vec![];
        m.visit_variables("", &mut |p, v| {
            found.push(p.to_string());
            assert!(values(v.grad()).iter().all(|g| g.is_finite()), "{p}");
            Ok(())
        })
        .unwrap();
        assert_eq!(
            found,
            [
                "stem/kernel",
                "stem/bias",
                "block/inner/kernel",
                "block/inner/bias",
                "block/outer/kernel",
                "block/outer/bias"
            ]
        );
    }

    #[test]
    fn residual_fields_add_the_input_under_every_policy() {
        matches_by_hand::<Float32>();
        matches_by_hand::<MixedBFloat16>();
        matches_by_hand::<MixedFloat16>();
    }

    /// The stem's gradient equals finite differences of the loss (float64 sums of a float32
    /// model): the skip path's gradient is really added.
    #[test]
    fn residual_gradients_match_finite_differences() {
        let mut rng = Rng::new(mp_core::rng::test_seed("residual fd"));
        // Smooth (tanh, no ReLU kinks), so central differences are accurate.
        let mut m = Net::<Float32>::new(
            Dense::new(4),
            Block::new(Dense::new(4), Dense::new(4)),
            Activation::tanh(),
            Softmax::new(),
        );
        m.build(&[3]).unwrap();
        let x = rand::<F32>(&mut rng, &[2, 3]);
        let r: Vec<f32> = rng.uniform_vec(8, -1.0, 1.0);
        let loss = |m: &Net<Float32>| -> f64 {
            let y = m.forward(&x).unwrap();
            values(&y).iter().zip(&r).map(|(a, b)| a * *b as f64).sum()
        };
        m.forward_train(&x).unwrap();
        m.visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
            .unwrap();
        let dy = Tensor::<F32>::from_vec(&[2, 4], r.clone()).unwrap();
        m.backward(&dy, true).unwrap();
        let grad = values(m.stem.kernel().unwrap().grad());
        let w0: Vec<f32> = m
            .stem
            .kernel()
            .unwrap()
            .value()
            .as_slice()
            .unwrap()
            .to_vec();
        for (i, &g) in grad.iter().enumerate() {
            let eps = 1e-3f32;
            let mut at = |d: f32| {
                let mut w = w0.clone();
                w[i] += d;
                m.visit_variables("", &mut |p, v| {
                    if p == "stem/kernel" {
                        v.assign(&w)?;
                    }
                    Ok(())
                })
                .unwrap();
                loss(&m)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - g).abs() <= 2e-3 * (1.0 + g.abs()),
                "stem/kernel[{i}]: {g} vs {fd}"
            );
        }
    }

    #[model]
    struct Widening {
        grow: Dense,
    }

    #[model]
    struct BadShape {
        #[residual]
        block: Widening,
        #[dtype = "float32"]
        head: Softmax,
    }

    #[test]
    fn a_block_that_changes_the_shape_is_an_error_naming_both_shapes() {
        let mut m = BadShape::<Float32>::new(Widening::new(Dense::new(6)), Softmax::new());
        let e = m.build(&[4]).unwrap_err().to_string();
        assert!(
            e.contains("block") && e.contains("[6]") && e.contains("[4]"),
            "{e}"
        );
    }
}

mod batch_norm {
    use super::*;
    use mp_layers::{
        BatchNormalization, Dense, Dropout, Model, Softmax, SparseCategoricalCrossentropy, Trainer,
        model,
    };
    use mp_optim::{Adam, Optimizer};

    /// Forward with batch statistics and every gradient against float64, under `P`.
    fn against_float64<P: PolicyKind>(seed: u64) {
        let mut rng = Rng::new(mp_core::rng::test_seed(&format!("batch norm {seed}")));
        let u_t = unit_roundoff(Compute::<P>::DTYPE);
        let (n, h, w, c) = (
            pick(&mut rng, 1, 3),
            pick(&mut rng, 1, 6),
            pick(&mut rng, 1, 6),
            pick(&mut rng, 1, 9),
        );
        let rows = n * h * w;
        if rows < 2 {
            return;
        }
        let mut bn = BatchNormalization::<P>::new();
        assert_eq!(bn.build(&[h, w, c]).unwrap(), vec![h, w, c]);
        let gamma: Vec<f32> = rng.uniform_vec(c, 0.5, 1.5);
        let beta: Vec<f32> = rng.uniform_vec(c, -0.5, 0.5);
        bn.visit_variables("", &mut |p, v| {
            match p {
                "gamma" => v.assign(&gamma)?,
                "beta" => v.assign(&beta)?,
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        let x = rand::<Compute<P>>(&mut rng, &[n, h, w, c]);
        let y = bn.forward_train(&x).unwrap();
        let dy = rand::<Compute<P>>(&mut rng, &[n, h, w, c]);
        bn.visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
            .unwrap();
        let dx = bn.backward(&dy, true).unwrap().unwrap();
        let (xv, dyv) = (values(&x), values(&dy));
        let eps = 1e-3f64;
        let (mut yr, mut dxr) = (vec![0.0; rows * c], vec![0.0; rows * c]);
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let col: Vec<f64> = (0..rows).map(|r| xv[r * c + ch]).collect();
            let mean = col.iter().sum::<f64>() / rows as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / rows as f64;
            let inv = 1.0 / (var + eps).sqrt();
            let g = gamma[ch] as f64;
            let d: Vec<f64> = (0..rows).map(|r| dyv[r * c + ch]).collect();
            let xhat: Vec<f64> = col.iter().map(|v| (v - mean) * inv).collect();
            let sd: f64 = d.iter().sum();
            let sdx: f64 = d.iter().zip(&xhat).map(|(a, b)| a * b).sum();
            db[ch] = sd;
            dg[ch] = sdx;
            for r in 0..rows {
                yr[r * c + ch] = g * xhat[r] + beta[ch] as f64;
                dxr[r * c + ch] = g * inv / rows as f64 * (rows as f64 * d[r] - sd - xhat[r] * sdx);
            }
        }
        // float32 statistics over `rows` values, then one rounding to the compute dtype.
        let s_t = half_subnormal(Compute::<P>::DTYPE);
        let tol = |r: f64, scale: f64| (rows as f64 + 16.0) * 4.0 * U * scale + u_t * r.abs() + s_t;
        let what = format!("{:?} {n}x{h}x{w}x{c}", P::POLICY);
        let yv = values(&y);
        for i in 0..yr.len() {
            let b = tol(yr[i], 4.0 * gamma[i % c] as f64 + 1.0);
            assert!(
                (yv[i] - yr[i]).abs() <= b,
                "{what} y[{i}] {} vs {}",
                yv[i],
                yr[i]
            );
        }
        let dxv = values(&dx);
        let dscale = dxr.iter().fold(0.0f64, |m, v| m.max(v.abs())) + 1.0;
        for i in 0..dxr.len() {
            let b = tol(dxr[i], 8.0 * dscale);
            assert!(
                (dxv[i] - dxr[i]).abs() <= b,
                "{what} dx[{i}] {} vs {}",
                dxv[i],
                dxr[i]
            );
        }
        let mut grads = vec![];
        bn.visit_variables("", &mut |p, v| {
            grads.push((p.to_string(), values(v.grad())));
            Ok(())
        })
        .unwrap();
        for ch in 0..c {
            let s: f64 = (0..rows).map(|r| dyv[r * c + ch].abs()).sum::<f64>() * 4.0 + 1.0;
            assert!(
                (grads[0].1[ch] - dg[ch]).abs() <= (rows as f64 + 8.0) * 4.0 * U * s,
                "{what} dgamma"
            );
            assert!(
                (grads[1].1[ch] - db[ch]).abs() <= (rows as f64 + 8.0) * U * s,
                "{what} dbeta"
            );
        }
        assert_eq!(grads[2].0, "moving_mean");
        assert_eq!(grads[3].0, "moving_variance");
        assert_eq!(bn.param_count(), 4 * c);
        assert_eq!(bn.non_trainable_param_count(), 2 * c);
    }

    #[test]
    fn batch_norm_matches_float64_under_every_policy() {
        for seed in 0..20 {
            against_float64::<Float32>(seed);
            against_float64::<MixedBFloat16>(seed);
            against_float64::<MixedFloat16>(seed);
        }
    }

    #[model]
    struct Net {
        dense: Dense,
        norm: BatchNormalization,
        drop: Dropout,
        #[dtype = "float32"]
        head: Softmax,
    }

    fn net<P: PolicyKind>() -> Net<P> {
        Net::new(
            Dense::new(6),
            BatchNormalization::new().momentum(0.9),
            Dropout::new(0.25).with_seed(7),
            Softmax::new(),
        )
    }

    fn moving<P: PolicyKind>(m: &Net<P>) -> Vec<u32> {
        let (mm, mv) = (
            m.norm.moving_mean().unwrap(),
            m.norm.moving_variance().unwrap(),
        );
        mm.value()
            .as_slice()
            .unwrap()
            .iter()
            .chain(mv.value().as_slice().unwrap())
            .map(|v| v.to_bits())
            .collect()
    }

    /// A skipped step (a NaN batch) leaves the moving statistics bit-identical under every
    /// policy; an applied step moves them by Keras's rule; the optimizer never sees them.
    fn skipped_steps_leave_the_statistics<P: PolicyKind>() {
        let mut t = Trainer::compile(
            net::<P>(),
            Adam::default(),
            SparseCategoricalCrossentropy::new(),
        );
        t.model_mut().build(&[4]).unwrap();
        let mut rng = Rng::new(5);
        let x: Tensor<Compute<P>> = rand(&mut rng, &[8, 4]);
        let labels: Vec<u32> = (0..8).map(|i| i % 6).collect();
        let before = moving(t.model());
        let (r, _) = t.train_step(&x, &labels).unwrap();
        assert!(r.applied);
        let after = moving(t.model());
        assert_ne!(before, after, "an applied step moves the statistics");
        // moving = 0.9 * moving + 0.1 * batch: the mean started at 0, so it is 0.1 * batch mean.
        let mut nan = values(&x);
        nan[3] = f64::NAN;
        let xn = Tensor::<Compute<P>>::from_f32(
            &[8, 4],
            &nan.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        )
        .unwrap();
        let weights = t.model_mut().get_weights().unwrap();
        let (r, _) = t.train_step(&xn, &labels).unwrap();
        assert!(!r.applied, "{:?}: a NaN batch is skipped", P::POLICY);
        assert_eq!(
            moving(t.model()),
            after,
            "{:?}: the skipped step left them",
            P::POLICY
        );
        let again = t.model_mut().get_weights().unwrap();
        for ((n, a), (_, b)) in weights.iter().zip(&again) {
            assert_eq!(values(a), values(b), "{n}");
        }
        // The optimizer has slots for the trainable variables only.
        let slots: Vec<String> = t
            .optimizer()
            .inner()
            .state()
            .into_iter()
            .map(|(v, _, _)| v)
            .collect();
        assert!(slots.iter().all(|v| !v.contains("moving")), "{slots:?}");
        assert!(slots.iter().any(|v| v == "norm/gamma"), "{slots:?}");
        // Inference uses the moving statistics and no dropout: deterministic.
        let a = t.model().forward_f32(&x).unwrap();
        let b = t.model().forward_f32(&x).unwrap();
        assert_eq!(values(&a), values(&b));
        let rows = mp_layers::format_summary("Net", P::POLICY, &{
            let mut r = vec![];
            t.model().summary_rows("", &mut r);
            r
        });
        assert!(rows.contains("Non-trainable params: 12"), "{rows}");
    }

    #[test]
    fn skipped_steps_leave_the_moving_statistics_bit_identical() {
        skipped_steps_leave_the_statistics::<Float32>();
        skipped_steps_leave_the_statistics::<MixedBFloat16>();
        skipped_steps_leave_the_statistics::<MixedFloat16>();
    }

    /// Dropout: active only in training, the same mask for a step number, another for the next.
    #[test]
    fn dropout_is_reproducible_and_only_in_training() {
        let mut d = Dropout::<Float32>::new(0.5).with_seed(3);
        d.build(&[1000]).unwrap();
        let x = Tensor::<F32>::from_f32(&[2, 1000], &vec![1.0; 2000]).unwrap();
        assert_eq!(values(&d.forward(&x).unwrap()), vec![1.0; 2000]);
        d.begin_step(41);
        let a = values(&d.forward_train(&x).unwrap());
        let kept = a.iter().filter(|&&v| v == 2.0).count();
        assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
        assert!((800..1200).contains(&kept), "{kept}");
        let g = values(&d.backward(&x, true).unwrap().unwrap());
        assert_eq!(a, g, "backward uses the forward's mask");
        d.begin_step(41);
        assert_eq!(
            values(&d.forward_train(&x).unwrap()),
            a,
            "same step, same mask"
        );
        d.begin_step(42);
        assert_ne!(
            values(&d.forward_train(&x).unwrap()),
            a,
            "next step, new mask"
        );
        let mut bad = Dropout::<Float32>::new(1.0);
        bad.set_name("drop_1");
        let e = bad.build(&[4]).unwrap_err().to_string();
        assert!(e.contains("drop_1") && e.contains("rate 1"), "{e}");
    }
}

mod resume {
    use super::*;
    use mp_layers::{
        Activation, BatchNormalization, Checkpointing, Dense, Dropout, FitOptions, Model, Softmax,
        SparseCategoricalCrossentropy, Trainer, Verbose, model,
    };
    use mp_optim::Adam;
    use ndarray::{Array1, Array4};

    #[model]
    struct Block {
        conv: Conv2D,
        bn: BatchNormalization,
    }

    #[model]
    struct SmallCnn {
        conv: Conv2D,
        bn: BatchNormalization,
        relu: Activation,
        #[residual]
        block: Block,
        pool: MaxPooling2D,
        drop: Dropout,
        gap: GlobalAveragePooling2D,
        logits: Dense,
        #[dtype = "float32"]
        probs: Softmax,
    }

    fn small<P: PolicyKind>() -> SmallCnn<P> {
        SmallCnn::new(
            Conv2D::new(6, [3, 3]).padding(Padding::Same),
            BatchNormalization::new().momentum(0.8),
            Activation::relu(),
            Block::new(
                Conv2D::new(6, [3, 3]).padding(Padding::Same),
                BatchNormalization::new(),
            ),
            MaxPooling2D::new([2, 2]),
            Dropout::new(0.2),
            GlobalAveragePooling2D::new(),
            Dense::new(3),
            Softmax::new(),
        )
    }

    /// Three classes of 8x8 images: a bright row, column or diagonal.
    fn data(n: usize, seed: u64) -> (Array4<f32>, Array1<u32>) {
        let mut rng = Rng::new(seed);
        let mut x = Array4::<f32>::zeros((n, 8, 8, 1));
        let mut y = Array1::<u32>::zeros(n);
        for i in 0..n {
            let class = (i % 3) as u32;
            let k = rng.below(8) as usize;
            for j in 0..8 {
                let (r, c) = match class {
                    0 => (k, j),
                    1 => (j, k),
                    _ => (j, j),
                };
                x[[i, r, c, 0]] = 1.0;
            }
            for v in x.slice_mut(ndarray::s![i, .., .., ..]).iter_mut() {
                *v += 0.1 * rng.normal();
            }
            y[i] = class;
        }
        (x, y)
    }

    fn all_bits<M: Model>(m: &mut M) -> Vec<(String, Vec<u32>)> {
        let mut out = vec![];
        m.visit_variables("", &mut |p, v| {
            let bits = v.value().as_slice()?.iter().map(|f| f.to_bits()).collect();
            out.push((p.to_string(), bits));
            Ok(())
        })
        .unwrap();
        out
    }

    /// Two epochs straight, and one epoch, a checkpoint, a new trainer resumed from it and one
    /// more: bit-identical weights, moving statistics included (dropout masks follow the step).
    fn resumes_bit_exactly<P: PolicyKind>() {
        let (x, y) = data(48, 11);
        let opts = |epochs| FitOptions {
            batch_size: 8,
            epochs,
            validation_split: 0.25,
            seed: 3,
            verbose: Verbose::Silent,
            ..Default::default()
        };
        let trainer = || {
            Trainer::compile(
                small::<P>(),
                Adam::new(1e-2).unwrap(),
                SparseCategoricalCrossentropy::new(),
            )
        };
        let mut straight = trainer();
        let history = straight.fit(x.view(), y.view(), &opts(2)).unwrap();
        let mut first = trainer();
        first.fit(x.view(), y.view(), &opts(1)).unwrap();
        let bytes = first.checkpoint_bytes().unwrap();
        let mut resumed = trainer();
        resumed.model_mut().build(&[8, 8, 1]).unwrap();
        resumed.resume_from_bytes("cnn", &bytes).unwrap();
        resumed.fit(x.view(), y.view(), &opts(1)).unwrap();
        let (a, b) = (
            all_bits(straight.model_mut()),
            all_bits(resumed.model_mut()),
        );
        assert!(a.iter().any(|(n, _)| n == "bn/moving_mean"));
        assert_eq!(a, b, "{:?}", P::POLICY);
        assert!(history.epochs[1].loss.is_finite());
    }

    #[test]
    fn a_cnn_resumes_bit_exactly_under_every_policy() {
        resumes_bit_exactly::<Float32>();
        resumes_bit_exactly::<MixedBFloat16>();
        resumes_bit_exactly::<MixedFloat16>();
    }
}

mod fusion {
    use super::*;
    use mp_layers::{Activation, BatchNormalization, model};

    #[model]
    struct Block {
        conv: Conv2D,
        bn: BatchNormalization,
        relu: Activation,
    }

    #[model]
    struct Net {
        conv: Conv2D,
        bn: BatchNormalization,
        relu: Activation,
        #[residual]
        block: Block,
        bn_after: BatchNormalization,
        relu_after: Activation,
    }

    fn grads<M: Layer>(m: &mut M) -> Vec<(String, Vec<u32>)> {
        let mut out = vec![];
        m.visit_variables("", &mut |p, v| {
            let bits = v.grad().as_slice()?.iter().map(|g| g.to_bits()).collect();
            out.push((p.to_string(), bits));
            Ok(v.zero_grad()?)
        })
        .unwrap();
        out
    }

    fn bits<D: DTypeKind>(t: &Tensor<D>) -> Vec<u64> {
        // NaN payloads aside: every NaN compares as one value.
        values(t)
            .iter()
            .map(|v| if v.is_nan() { u64::MAX } else { v.to_bits() })
            .collect()
    }

    /// A `#[model]` runs `BatchNormalization` then a ReLU `Activation` as one fused pass
    /// (`normalize_relu`), the ReLU keeping nothing, wherever no residual addition sits between
    /// them (`bn_after` follows the block's addition and still fuses with `relu_after`; inside
    /// the block too): the output, the input gradient and every variable's gradient are those of
    /// the same layers run one by one, bit for bit, NaN and infinities in the input included.
    fn fused_matches_unfused<P: PolicyKind>() {
        let mut rng = Rng::new(mp_core::rng::test_seed("fusion"));
        let mut m = Net::<P>::new(
            Conv2D::new(16, [3, 3]).padding(Padding::Same),
            BatchNormalization::new(),
            Activation::relu(),
            Block::new(
                Conv2D::new(16, [3, 3]).padding(Padding::Same),
                BatchNormalization::new(),
                Activation::relu(),
            ),
            BatchNormalization::new(),
            Activation::relu(),
        );
        m.build(&[7, 6, 3]).unwrap();
        let mut xs = rng.uniform_vec(5 * 7 * 6 * 3, -1.0, 1.0);
        xs[17] = f32::NAN;
        xs[40] = f32::INFINITY;
        let x = Tensor::<Compute<P>>::from_f32(&[5, 7, 6, 3], &xs).unwrap();
        let dy = rand::<Compute<P>>(&mut rng, &[5, 7, 6, 16]);
        grads(&mut m);

        let y = m.forward_train(&x).unwrap();
        if std::env::var("MP_FUSION").as_deref() != Ok("0") {
            assert_eq!(m.relu.saved_bytes(), 0, "the fused ReLU keeps nothing");
            assert_eq!(m.block.relu.saved_bytes(), 0);
            assert_eq!(m.relu_after.saved_bytes(), 0);
        }
        let dx = m.backward(&dy, true).unwrap().unwrap();
        let fused = grads(&mut m);

        // The same layers one by one.
        let h = m.conv.forward_train(&x).unwrap();
        let h = m.bn.forward_train(&h).unwrap();
        let h = m.relu.forward_train(&h).unwrap();
        assert!(m.relu.saved_bytes() > 0);
        let b = m.block.conv.forward_train(&h).unwrap();
        let b = m.block.bn.forward_train(&b).unwrap();
        let b = m.block.relu.forward_train(&b).unwrap();
        let mut sum = b.clone();
        mp_kernels::ops::add_assign(&h, &mut sum).unwrap();
        let a = m.bn_after.forward_train(&sum).unwrap();
        let y1 = m.relu_after.forward_train(&a).unwrap();
        assert_eq!(bits(&y), bits(&y1), "{:?} output", P::POLICY);
        let g = m.relu_after.backward(&dy, true).unwrap().unwrap();
        let g = m.bn_after.backward(&g, true).unwrap().unwrap();
        let gb = m.block.relu.backward(&g, true).unwrap().unwrap();
        let gb = m.block.bn.backward(&gb, true).unwrap().unwrap();
        let mut gh = m.block.conv.backward(&gb, true).unwrap().unwrap();
        mp_kernels::ops::add_assign(&g, &mut gh).unwrap();
        let g = m.relu.backward(&gh, true).unwrap().unwrap();
        let g = m.bn.backward(&g, true).unwrap().unwrap();
        let dx1 = m.conv.backward(&g, true).unwrap().unwrap();
        assert_eq!(bits(&dx), bits(&dx1), "{:?} input gradient", P::POLICY);
        let unfused = grads(&mut m);
        assert_eq!(fused.len(), 16);
        for ((p, a), (q, b)) in fused.iter().zip(&unfused) {
            assert_eq!(p, q);
            assert!(a == b, "{:?} gradient of {p}", P::POLICY);
        }
    }

    #[test]
    fn batch_norm_then_relu_fuses_bit_for_bit_under_every_policy() {
        fused_matches_unfused::<Float32>();
        fused_matches_unfused::<MixedBFloat16>();
        fused_matches_unfused::<MixedFloat16>();
    }
}
