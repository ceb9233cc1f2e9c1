//! The transformer layers so far, under every policy, against float64: `LayerNormalization` on
//! `[batch, tokens, features]` (forward, dx, dgamma, dbeta; float16 activations whose variance
//! overflows float16 stay finite), `Activation::gelu` / `gelu_tanh` (forward and dx), and
//! `Dense` over the last axis of rank-3 inputs (the same as on the folded rows, bit for bit).
//! A small model with both trains through `fit` under mixed_float16.
//!
//! The references take the layer's own inputs in the compute dtype; bounds are stated per
//! dtype: float32 math plus one rounding to the compute dtype (unit roundoff `u_T`: 2^-24,
//! 2^-8, 2^-11), against the largest magnitude of each result.

use mp_core::{DType, DTypeKind, Element, Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng};
use mp_core::{F32, Tensor};
use mp_layers::{
    Activation, Dense, FitOptions, Layer, LayerNormalization, Model, Softmax,
    SparseCategoricalCrossentropy, Trainer, Verbose, model,
};
use mp_optim::Adam;
use ndarray::{Array1, Array2};

type Compute<P> = <P as PolicyKind>::Compute;

fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F32 => 1.0 / (1u64 << 24) as f64,
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
    }
}

fn values<D: DTypeKind>(t: &Tensor<D>) -> Vec<f64> {
    t.as_slice().unwrap().iter().map(|v| v.to_f64()).collect()
}

fn rand<D: DTypeKind>(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::<D>::from_f32(shape, &rng.uniform_vec(n, lo, hi)).unwrap()
}

/// `max |got - want| <= bound * max |want|`.
fn close(what: &str, got: &[f64], want: &[f64], bound: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        worst <= bound * scale,
        "{what}: max error {worst:e} > {bound:e} x {scale:e}"
    );
}

fn layer_norm_matches<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed(&format!(
        "layer_norm {}",
        P::POLICY
    )));
    let (batch, tokens, features) = (3, 17, 37);
    let mut ln = LayerNormalization::<P>::new();
    assert_eq!(
        ln.build(&[tokens, features]).unwrap(),
        vec![tokens, features]
    );
    assert_eq!(ln.param_count(), 2 * features);
    // Non-trivial gamma and beta.
    ln.visit_variables("", &mut |name, v| {
        let n = v.value().len();
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                if name == "gamma" {
                    0.5 + 0.03 * i as f32
                } else {
                    0.1 - 0.01 * i as f32
                }
            })
            .collect();
        v.assign(&vals).map_err(Into::into)
    })
    .unwrap();
    let x: Tensor<Compute<P>> = rand(&mut rng, &[batch, tokens, features], -3.0, 5.0);
    let dy: Tensor<Compute<P>> = rand(&mut rng, &[batch, tokens, features], -1.0, 1.0);
    let y = ln.forward_train(&x).unwrap();
    assert_eq!(
        values(&y),
        values(&ln.forward(&x).unwrap()),
        "train = inference"
    );
    let dx = ln.backward(&dy, true).unwrap().unwrap();
    let (xf, dyf) = (values(&x), values(&dy));
    let gamma: Vec<f64> = (0..features)
        .map(|i| f64::from(0.5 + 0.03 * i as f32))
        .collect();
    let beta: Vec<f64> = (0..features)
        .map(|i| f64::from(0.1 - 0.01 * i as f32))
        .collect();
    let (mut ry, mut rdx) = (vec![0.0; xf.len()], vec![0.0; xf.len()]);
    let (mut rdg, mut rdb) = (vec![0.0; features], vec![0.0; features]);
    for r in 0..batch * tokens {
        let row = &xf[r * features..(r + 1) * features];
        let d = &dyf[r * features..(r + 1) * features];
        let m = row.iter().sum::<f64>() / features as f64;
        let v = row.iter().map(|a| (a - m).powi(2)).sum::<f64>() / features as f64;
        let s = 1.0 / (v + 1e-3f32 as f64).sqrt();
        let xh: Vec<f64> = row.iter().map(|a| (a - m) * s).collect();
        let g: Vec<f64> = (0..features).map(|j| d[j] * gamma[j]).collect();
        let mg = g.iter().sum::<f64>() / features as f64;
        let mgx = (0..features).map(|j| g[j] * xh[j]).sum::<f64>() / features as f64;
        for j in 0..features {
            ry[r * features + j] = xh[j] * gamma[j] + beta[j];
            rdx[r * features + j] = s * (g[j] - mg - xh[j] * mgx);
            rdg[j] += d[j] * xh[j];
            rdb[j] += d[j];
        }
    }
    let u = unit_roundoff(Compute::<P>::DTYPE);
    let bound = 2.0 * u + 1e-5;
    close(&format!("{} y", P::POLICY), &values(&y), &ry, bound);
    close(&format!("{} dx", P::POLICY), &values(&dx), &rdx, bound);
    let mut grads = vec![];
    ln.visit_variables("", &mut |_, v| {
        grads.push(values(v.grad()));
        Ok(())
    })
    .unwrap();
    close(&format!("{} dgamma", P::POLICY), &grads[0], &rdg, 1e-5);
    close(&format!("{} dbeta", P::POLICY), &grads[1], &rdb, 1e-5);
}

#[test]
fn layer_normalization_matches_float64_under_every_policy() {
    layer_norm_matches::<Float32>();
    layer_norm_matches::<MixedBFloat16>();
    layer_norm_matches::<MixedFloat16>();
}

#[test]
fn float16_layer_norm_of_large_activations_stays_finite() {
    // Activations around 300 with a spread of 200: the variance (~1e4 per element, summed over
    // 512 features ~ 5e6) overflows float16's 65504, so a float16 LayerNorm would give inf/NaN.
    let mut rng = Rng::new(mp_core::rng::test_seed("large_layer_norm"));
    let mut ln16 = LayerNormalization::<MixedFloat16>::new();
    let mut ln32 = LayerNormalization::<Float32>::new();
    ln16.build(&[512]).unwrap();
    ln32.build(&[512]).unwrap();
    let x32: Tensor<F32> = rand(&mut rng, &[4, 512], 100.0, 500.0);
    let x16: Tensor<mp_core::F16> =
        Tensor::from_f32(&[4, 512], &x32.to_f32_vec().unwrap()).unwrap();
    let x32: Tensor<F32> = Tensor::from_f32(&[4, 512], &x16.to_f32_vec().unwrap()).unwrap();
    let y16 = values(&ln16.forward(&x16).unwrap());
    let y32 = values(&ln32.forward(&x32).unwrap());
    assert!(y16.iter().all(|v| v.is_finite()));
    close("float16 vs float32", &y16, &y32, 2.0 / 2048.0);
}

fn gelu_matches<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed(&format!("gelu {}", P::POLICY)));
    for (mut act, exact) in [
        (Activation::<P>::gelu(), true),
        (Activation::gelu_tanh(), false),
    ] {
        act.build(&[5, 9]).unwrap();
        let x: Tensor<Compute<P>> = rand(&mut rng, &[7, 5, 9], -4.0, 4.0);
        let dy: Tensor<Compute<P>> = rand(&mut rng, &[7, 5, 9], -1.0, 1.0);
        let y = act.forward_train(&x).unwrap();
        let dx = act.backward(&dy, true).unwrap().unwrap();
        let (mut ry, mut rdx) = (vec![], vec![]);
        for (x, d) in values(&x).into_iter().zip(values(&dy)) {
            let (v, slope) = if exact {
                let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                (x * cdf, cdf + x * pdf)
            } else {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let z = k * (x + 0.044715 * x.powi(3));
                let a = 1.0 / (1.0 + (-2.0 * z).exp());
                (
                    x * a,
                    a + 2.0 * x * a * (1.0 - a) * k * (1.0 + 3.0 * 0.044715 * x * x),
                )
            };
            ry.push(v);
            rdx.push(d * slope);
        }
        let bound = 2.0 * unit_roundoff(Compute::<P>::DTYPE) + 2e-5;
        close(
            &format!("{} {} y", P::POLICY, act.name()),
            &values(&y),
            &ry,
            bound,
        );
        close(
            &format!("{} {} dx", P::POLICY, act.name()),
            &values(&dx),
            &rdx,
            bound,
        );
    }
    assert_eq!(Activation::<P>::from_name("gelu").unwrap().name(), "gelu");
    let e = Activation::<P>::from_name("swish").unwrap_err().to_string();
    assert!(e.contains("gelu_tanh"), "{e}");
}

#[test]
fn gelu_matches_float64_under_every_policy() {
    gelu_matches::<Float32>();
    gelu_matches::<MixedBFloat16>();
    gelu_matches::<MixedFloat16>();
}

fn dense_folds_tokens<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed(&format!(
        "dense rank3 {}",
        P::POLICY
    )));
    let mut a = Dense::<P>::new(11).with_seed(3);
    let mut b = Dense::<P>::new(11).with_seed(3);
    assert_eq!(a.build(&[6, 13]).unwrap(), vec![6, 11]);
    assert_eq!(b.build(&[13]).unwrap(), vec![11]);
    let x: Tensor<Compute<P>> = rand(&mut rng, &[4, 6, 13], -1.0, 1.0);
    let dy: Tensor<Compute<P>> = rand(&mut rng, &[4, 6, 11], -1.0, 1.0);
    let flat = |t: &Tensor<Compute<P>>, f: usize| {
        Tensor::<Compute<P>>::from_f32(&[24, f], &t.to_f32_vec().unwrap()).unwrap()
    };
    let ya = a.forward_train(&x).unwrap();
    let yb = b.forward_train(&flat(&x, 13)).unwrap();
    assert_eq!(ya.shape(), &[4, 6, 11]);
    assert_eq!(values(&ya), values(&yb), "{}", P::POLICY);
    let dxa = a.backward(&dy, true).unwrap().unwrap();
    let dxb = b.backward(&flat(&dy, 11), true).unwrap().unwrap();
    assert_eq!(dxa.shape(), &[4, 6, 13]);
    assert_eq!(values(&dxa), values(&dxb));
    let (mut ga, mut gb) = (vec![], vec![]);
    a.visit_variables("", &mut |_, v| {
        ga.push(values(v.grad()));
        Ok(())
    })
    .unwrap();
    b.visit_variables("", &mut |_, v| {
        gb.push(values(v.grad()));
        Ok(())
    })
    .unwrap();
    assert_eq!(ga, gb);
    let e = a.build(&[6, 12]).unwrap_err().to_string();
    assert!(e.contains("12") && e.contains("13"), "{e}");
}

#[test]
fn dense_over_the_last_axis_of_rank_3_inputs_is_dense_on_the_folded_rows() {
    dense_folds_tokens::<Float32>();
    dense_folds_tokens::<MixedBFloat16>();
    dense_folds_tokens::<MixedFloat16>();
}

#[model]
struct Mlp {
    hidden: Dense,
    gelu: Activation,
    norm: LayerNormalization,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

#[test]
fn a_model_with_gelu_and_layer_norm_learns_under_mixed_float16() {
    let mut rng = Rng::new(11);
    let n = 600;
    let mut x = Array2::zeros((n, 8));
    let mut y = Array1::zeros(n);
    for i in 0..n {
        let c = rng.below(4) as usize;
        y[i] = c as u32;
        for j in 0..8 {
            x[[i, j]] = if j % 4 == c { 1.5 } else { 0.0 } + 0.6 * rng.normal();
        }
    }
    let mut t = Trainer::compile(
        Mlp::<MixedFloat16> {
            hidden: Dense::new(32),
            gelu: Activation::gelu(),
            norm: LayerNormalization::new(),
            logits: Dense::new(4),
            probs: Softmax::new(),
        },
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let h = t
        .fit(
            x.view(),
            y.view(),
            &FitOptions {
                batch_size: 32,
                epochs: 8,
                validation_split: 0.2,
                verbose: Verbose::Silent,
                ..Default::default()
            },
        )
        .unwrap();
    let last = h.epochs.last().unwrap();
    assert!(
        last.get("val_accuracy").unwrap() > 0.9,
        "validation accuracy {:?}",
        last.get("val_accuracy")
    );
    assert!(last.loss < h.epochs[0].loss);
    assert!(t.model().summary().contains("LayerNormalization"));
}
