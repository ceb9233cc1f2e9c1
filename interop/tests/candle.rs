//! candle builds mp's networks from mp's PyTorch-layout exports through its own `VarBuilder`, and
//! computes what mp computes.
//!
//! - float32 exports: candle's logits are within 1e-5 of the largest |logit| of mp's (the two
//!   differ only in float32 summation order).
//! - 16-bit exports of the guide's MLP: against the float32 weights, within a bound derived in
//!   the test. Each stored weight and bias is the float32 value times `1 + θ`, `|θ| ≤ u` (`u` =
//!   2^-8 for bfloat16, 2^-11 for float16: round to nearest), taken as independent with variance
//!   at most `u² / 3`. To first order, `z_k = W_kᵀ h_{k-1} + b_k` then has error variance
//!   `V_k = u²/3 (Σ_i (W_ik h_i)² + b_k²) + Σ_i W_ik² V_{k-1,i}` (through ReLU where it passes,
//!   `V_0 = 0`: the input is not rounded). The test computes `V_3` per logit in float64 from the
//!   model's own activations and allows six standard deviations plus the float32 bound. (The
//!   worst case, every rounding aligned, is about 25 times the logits themselves here and would
//!   test nothing.) Against mp's float32 model loaded from the same file, the float32 bound.
//! - 16-bit exports of the CNNs: candle's logits are within the float32 bound of mp's float32
//!   model loaded from the same 16-bit file (the rounded weights), and that model is the
//!   original within the rounding's effect.

use candle_core::{D, DType, Device, Module, ModuleT, Tensor as CTensor};
use candle_nn::{BatchNormConfig, Conv2dConfig, VarBuilder, batch_norm, conv2d, linear};
use examples::{Digits, MnistCnn};
use mp_core::{F32, Float32, Rng, Tensor};
use mp_layers::checkpoint::{
    Layout, WeightDtype, load_weights_from_bytes, safetensors::SafeTensors, weights_to_bytes_as,
};
use mp_layers::{
    Activation, BatchNormalization, Conv2D, Dense, Flatten, Layer, MaxPooling2D, Model, Softmax,
    model,
};

type CResult<T> = candle_core::Result<T>;

const F32_BOUND: f32 = 1e-5;

fn images(n: usize, seed: u64) -> Tensor<F32> {
    let mut rng = Rng::new(seed);
    let values = (0..n * 28 * 28).map(|_| rng.uniform(0.0, 1.0)).collect();
    Tensor::from_vec(&[n, 28, 28, 1], values).unwrap()
}

/// mp's `[n, 28, 28, 1]` images as candle's `[n, 1, 28, 28]`.
fn nchw(x: &Tensor<F32>) -> CTensor {
    let s = x.shape();
    CTensor::from_vec(
        x.as_slice().unwrap().to_vec(),
        (s[0], s[1], s[2], s[3]),
        &Device::Cpu,
    )
    .unwrap()
    .permute((0, 3, 1, 2))
    .unwrap()
    .contiguous()
    .unwrap()
}

fn flat(t: &CTensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn values(t: &Tensor<F32>) -> Vec<f32> {
    t.as_slice().unwrap().to_vec()
}

fn add(a: &Tensor<F32>, b: &Tensor<F32>) -> Tensor<F32> {
    let sum = values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| x + y)
        .collect();
    Tensor::from_vec(a.shape(), sum).unwrap()
}

/// Asserts `|got - want| ≤ bound[i] + 1e-5 max |want|` for every value.
fn assert_close(what: &str, got: &[f32], want: &[f32], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    assert!(scale > 0.0, "{what}: all zeros proves nothing");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - *w as f64).abs();
        let allowed = bound[i] + F32_BOUND as f64 * scale;
        assert!(
            err <= allowed,
            "{what}: value {i}: candle {g}, mp {w}: error {err:e} > {allowed:e}"
        );
        worst = worst.max(err / allowed);
    }
    eprintln!("{what}: worst error {worst:.3} of its bound (largest |value| {scale:.3})");
}

/// Gives BatchNormalization statistics and affine terms that are not the identity, so a wrong
/// layout cannot pass by ones and zeros.
fn vary_batch_norm<M: Model>(m: &mut M, seed: u64) {
    let mut rng = Rng::new(seed);
    let weights: Vec<(String, Tensor<F32>)> = m
        .get_weights()
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let n = t.len();
            let v: Vec<f32> = if name.ends_with("moving_mean") || name.ends_with("beta") {
                (0..n).map(|_| 0.1 * rng.normal()).collect()
            } else if name.ends_with("moving_variance") {
                (0..n).map(|_| rng.uniform(0.5, 1.5)).collect()
            } else if name.ends_with("gamma") {
                (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
            } else {
                return (name, t);
            };
            (name, Tensor::from_vec(t.shape(), v).unwrap())
        })
        .collect();
    m.set_weights(&weights).unwrap();
}

fn var_builder(bytes: &[u8]) -> VarBuilder<'static> {
    VarBuilder::from_buffered_safetensors(bytes.to_vec(), DType::F32, &Device::Cpu).unwrap()
}

/// A hyperparameter mp wrote in the file's metadata.
fn hparam(bytes: &[u8], key: &str) -> f64 {
    let st = SafeTensors::parse("export", bytes).unwrap();
    st.metadata[&format!("mp.hparams.{key}")].parse().unwrap()
}

// ---- the guide's MLP ----

fn candle_mlp(vb: &VarBuilder<'_>, x: &CTensor, units: usize) -> CResult<CTensor> {
    let h = linear(784, units, vb.pp("dense_1"))?.forward(x)?.relu()?;
    let h = linear(units, units, vb.pp("dense_2"))?
        .forward(&h)?
        .relu()?;
    linear(units, 10, vb.pp("dense_logits"))?.forward(&h)
}

fn mp_mlp_logits(m: &Digits<Float32>, x: &Tensor<F32>) -> Tensor<F32> {
    let h = m.dense_1.forward(x).unwrap();
    let h = m.dense_2.forward(&h).unwrap();
    m.dense_logits.forward(&h).unwrap()
}

/// The derived bound on the logits' error from weights rounded with unit roundoff `u`: six
/// standard deviations of the first-order error, each rounding an independent error of
/// variance at most `u² / 3`.
fn rounding_bound(m: &mut Digits<Float32>, x: &Tensor<F32>, u: f64) -> Vec<f64> {
    let w = m.get_weights().unwrap();
    let get = |n: &str| values(&w.iter().find(|(p, _)| p == n).unwrap().1);
    let n = x.shape()[0];
    let mut h: Vec<f64> = values(x).iter().map(|v| *v as f64).collect();
    let mut var = vec![0.0f64; h.len()];
    let mut width = 784;
    let rounding = u * u / 3.0;
    for (layer, relu) in [
        ("dense_1", true),
        ("dense_2", true),
        ("dense_logits", false),
    ] {
        let kernel = get(&format!("{layer}/kernel"));
        let bias = get(&format!("{layer}/bias"));
        let out = bias.len();
        let mut z = vec![0.0f64; n * out];
        let mut next = vec![0.0f64; n * out];
        for s in 0..n {
            for o in 0..out {
                let b = bias[o] as f64;
                let (mut acc, mut own, mut carried) = (b, b * b, 0.0);
                for i in 0..width {
                    let wv = kernel[i * out + o] as f64;
                    let hv = h[s * width + i];
                    acc += wv * hv;
                    own += (wv * hv) * (wv * hv);
                    carried += wv * wv * var[s * width + i];
                }
                let v = rounding * own + carried;
                (z[s * out + o], next[s * out + o]) = match (relu, acc > 0.0) {
                    (true, false) => (0.0, 0.0),
                    (true, true) => (acc, v),
                    (false, _) => (acc, v),
                };
            }
        }
        (h, var, width) = (z, next, out);
    }
    var.iter().map(|v| 6.0 * v.sqrt()).collect()
}

#[test]
fn candle_builds_the_guide_mlp_from_every_export() {
    let units = 512;
    let mut m = Digits::<Float32>::guide(units);
    m.build(&[784]).unwrap();
    let x = images(16, 1).reshape(&[16, 784]).unwrap();
    assert_eq!(x.shape(), [16, 784]);
    let want = values(&mp_mlp_logits(&m, &x));
    let cx = CTensor::from_vec(values(&x), (16, 784), &Device::Cpu).unwrap();
    for (dtype, u) in [
        (WeightDtype::F32, 0.0),
        (WeightDtype::BF16, 2f64.powi(-8)),
        (WeightDtype::F16, 2f64.powi(-11)),
    ] {
        let bytes = weights_to_bytes_as(&mut m, Layout::PyTorch, dtype).unwrap();
        let got = flat(&candle_mlp(&var_builder(&bytes), &cx, units).unwrap());
        let bound = rounding_bound(&mut m, &x, u);
        assert_close(&format!("guide MLP, {dtype}"), &got, &want, &bound);
        // Tighter: against mp's float32 model with the file's (rounded) weights.
        let mut rounded = Digits::<Float32>::guide(units);
        rounded.build(&[784]).unwrap();
        load_weights_from_bytes(&mut rounded, "export", &bytes).unwrap();
        let reference = values(&mp_mlp_logits(&rounded, &x));
        assert_close(
            &format!("guide MLP, {dtype}, rounded"),
            &got,
            &reference,
            &[0.0; 160],
        );
    }
    // mp's own output is the softmax of these logits.
    let probs = values(&m.forward_f32(&x).unwrap());
    let bytes = weights_to_bytes_as(&mut m, Layout::PyTorch, WeightDtype::F32).unwrap();
    let logits = candle_mlp(&var_builder(&bytes), &cx, units).unwrap();
    let p = flat(&candle_nn::ops::softmax(&logits, D::Minus1).unwrap());
    assert_close("guide MLP probabilities", &p, &probs, &[0.0; 160]);
}

// ---- mnist_cnn ----

fn candle_cnn(vb: &VarBuilder<'_>, bytes: &[u8], x: &CTensor) -> CResult<CTensor> {
    let same = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let unit = |x: &CTensor, conv: &str, bn: &str, cin: usize, cout: usize| -> CResult<CTensor> {
        let config = BatchNormConfig {
            eps: hparam(bytes, &format!("{bn}.eps")),
            ..Default::default()
        };
        let y = conv2d(cin, cout, 3, same, vb.pp(conv))?.forward(x)?;
        batch_norm(cout, config, vb.pp(bn))?.forward_t(&y, false)
    };
    let block = |x: &CTensor, b: &str, c: usize| -> CResult<CTensor> {
        let h = unit(x, &format!("{b}.conv_a"), &format!("{b}.bn_a"), c, c)?.relu()?;
        let h = unit(&h, &format!("{b}.conv_b"), &format!("{b}.bn_b"), c, c)?;
        x + h
    };
    let h = unit(x, "conv_1", "bn_1", 1, 32)?.relu()?;
    let h = block(&h, "block_1", 32)?.relu()?.max_pool2d(2)?;
    let h = unit(&h, "conv_2", "bn_2", 32, 64)?.relu()?;
    let h = block(&h, "block_2", 64)?.relu()?.max_pool2d(2)?;
    let h = h.mean((2, 3))?;
    linear(64, 10, vb.pp("logits"))?.forward(&h)
}

/// mp's logits: the model's fields in order, with its residual additions.
fn mp_cnn_logits(m: &MnistCnn<Float32>, x: &Tensor<F32>) -> Tensor<F32> {
    let h = m.conv_1.forward(x).unwrap();
    let h = m.relu_1.forward(&m.bn_1.forward(&h).unwrap()).unwrap();
    let h = m
        .relu_2
        .forward(&add(&h, &m.block_1.forward(&h).unwrap()))
        .unwrap();
    let h = m.pool_1.forward(&h).unwrap();
    let h = m.conv_2.forward(&h).unwrap();
    let h = m.relu_3.forward(&m.bn_2.forward(&h).unwrap()).unwrap();
    let h = m
        .relu_4
        .forward(&add(&h, &m.block_2.forward(&h).unwrap()))
        .unwrap();
    let h = m.gap.forward(&m.pool_2.forward(&h).unwrap()).unwrap();
    m.logits.forward(&h).unwrap()
}

#[test]
fn candle_builds_mnist_cnn_from_every_export() {
    let mut m = MnistCnn::<Float32>::issue();
    m.build(&[28, 28, 1]).unwrap();
    vary_batch_norm(&mut m, 2);
    let x = images(8, 3);
    let cx = nchw(&x);
    let want = values(&mp_cnn_logits(&m, &x));
    // The chain above is the model: its softmax is the model's output.
    let logits = CTensor::from_vec(want.clone(), (8, 10), &Device::Cpu).unwrap();
    let p = flat(&candle_nn::ops::softmax(&logits, D::Minus1).unwrap());
    assert_close(
        "mnist_cnn chain",
        &p,
        &values(&m.forward_f32(&x).unwrap()),
        &[0.0; 80],
    );

    for dtype in [WeightDtype::F32, WeightDtype::BF16, WeightDtype::F16] {
        let bytes = weights_to_bytes_as(&mut m, Layout::PyTorch, dtype).unwrap();
        let got = flat(&candle_cnn(&var_builder(&bytes), &bytes, &cx).unwrap());
        // The reference: mp's float32 model with the file's (rounded) weights.
        let mut rounded = MnistCnn::<Float32>::issue();
        rounded.build(&[28, 28, 1]).unwrap();
        load_weights_from_bytes(&mut rounded, "export", &bytes).unwrap();
        let reference = values(&mp_cnn_logits(&rounded, &x));
        assert_close(&format!("mnist_cnn, {dtype}"), &got, &reference, &[0.0; 80]);
        if dtype == WeightDtype::F32 {
            assert_eq!(reference, want, "a float32 export loads back bit-identical");
        }
    }
}

// ---- a CNN ending in Flatten -> Dense ----

#[model]
struct FlatCnn {
    conv: Conv2D,
    bn: BatchNormalization,
    relu: Activation,
    pool: MaxPooling2D,
    flatten: Flatten,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn flat_cnn() -> FlatCnn<Float32> {
    let mut m = FlatCnn {
        conv: Conv2D::new(6, [3, 3]),
        bn: BatchNormalization::new(),
        relu: Activation::relu(),
        pool: MaxPooling2D::new([2, 2]),
        flatten: Flatten::new(),
        logits: Dense::new(10),
        probs: Softmax::new(),
    };
    m.build(&[28, 28, 1]).unwrap();
    m
}

#[test]
fn candle_builds_a_cnn_ending_in_flatten_dense_with_its_rows_in_channels_first_order() {
    let mut m = flat_cnn();
    vary_batch_norm(&mut m, 4);
    let x = images(8, 5);
    let cx = nchw(&x);
    let mp_logits = |m: &FlatCnn<Float32>| {
        let h = m.conv.forward(&x).unwrap();
        let h = m.relu.forward(&m.bn.forward(&h).unwrap()).unwrap();
        let h = m.flatten.forward(&m.pool.forward(&h).unwrap()).unwrap();
        values(&m.logits.forward(&h).unwrap())
    };
    for dtype in [WeightDtype::F32, WeightDtype::BF16, WeightDtype::F16] {
        let bytes = weights_to_bytes_as(&mut m, Layout::PyTorch, dtype).unwrap();
        let vb = var_builder(&bytes);
        let config = BatchNormConfig {
            eps: hparam(&bytes, "bn.eps"),
            ..Default::default()
        };
        let run = || -> CResult<CTensor> {
            let h = conv2d(1, 6, 3, Conv2dConfig::default(), vb.pp("conv"))?.forward(&cx)?;
            let h = batch_norm(6, config, vb.pp("bn"))?
                .forward_t(&h, false)?
                .relu()?
                .max_pool2d(2)?
                .flatten_from(1)?; // PyTorch's flatten: channels first
            linear(13 * 13 * 6, 10, vb.pp("logits"))?.forward(&h)
        };
        let got = flat(&run().unwrap());
        let mut rounded = flat_cnn();
        load_weights_from_bytes(&mut rounded, "export", &bytes).unwrap();
        assert_close(
            &format!("Flatten -> Dense, {dtype}"),
            &got,
            &mp_logits(&rounded),
            &[0.0; 80],
        );
    }
    // Without the permutation the logits would differ: the test can tell.
    let bytes = weights_to_bytes_as(&mut m, Layout::PyTorch, WeightDtype::F32).unwrap();
    let vb = var_builder(&bytes);
    let unpermuted = || -> CResult<CTensor> {
        let h = conv2d(1, 6, 3, Conv2dConfig::default(), vb.pp("conv"))?.forward(&cx)?;
        let config = BatchNormConfig {
            eps: hparam(&bytes, "bn.eps"),
            ..Default::default()
        };
        let h = batch_norm(6, config, vb.pp("bn"))?
            .forward_t(&h, false)?
            .relu()?
            .max_pool2d(2)?
            .permute((0, 2, 3, 1))? // channels last, as mp flattens
            .flatten_from(1)?;
        linear(13 * 13 * 6, 10, vb.pp("logits"))?.forward(&h)
    };
    let wrong = flat(&unpermuted().unwrap());
    let right = mp_logits(&m);
    let diff = wrong
        .iter()
        .zip(&right)
        .fold(0.0f32, |d, (a, b)| d.max((a - b).abs()));
    assert!(diff > 1e-2, "the flatten order went unnoticed ({diff})");
}

/// A PyTorch-layout file written by candle's own safetensors writer, its tensors rearranged by
/// candle's ops from mp's variables, loads into mp bit-identical and predicts the same.
#[test]
fn a_file_written_by_candle_loads_into_mp_and_predicts_the_same() {
    let mut m = flat_cnn();
    vary_batch_norm(&mut m, 6);
    let weights = m.get_weights().unwrap();
    let get = |p: &str| {
        let (_, t) = weights.iter().find(|(n, _)| n == p).unwrap();
        CTensor::from_vec(values(t), t.shape(), &Device::Cpu).unwrap()
    };
    let mut tensors = std::collections::HashMap::new();
    // [kh, kw, in, out] -> [out, in, kh, kw]
    let conv = get("conv/kernel").permute((3, 2, 0, 1)).unwrap();
    tensors.insert("conv.weight".to_string(), conv.contiguous().unwrap());
    tensors.insert("conv.bias".to_string(), get("conv/bias"));
    for (mp, torch) in [
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ] {
        tensors.insert(format!("bn.{torch}"), get(&format!("bn/{mp}")));
    }
    let batches = CTensor::new(41i64, &Device::Cpu).unwrap();
    tensors.insert("bn.num_batches_tracked".to_string(), batches);
    // Rows (y, x, c) of [13 * 13 * 6, 10] -> [10, c * h * w]
    let dense = get("logits/kernel")
        .reshape((13, 13, 6, 10))
        .and_then(|k| k.permute((3, 2, 0, 1)))
        .and_then(|k| k.reshape((10, 6 * 13 * 13)))
        .unwrap();
    tensors.insert("logits.weight".to_string(), dense);
    tensors.insert("logits.bias".to_string(), get("logits/bias"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("candle.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let mut fresh = flat_cnn();
    mp_layers::checkpoint::load_weights(&mut fresh, &path).unwrap();
    let bits = |w: Vec<(String, Tensor<F32>)>| -> Vec<(String, Vec<u32>)> {
        w.into_iter()
            .map(|(n, t)| (n, values(&t).iter().map(|v| v.to_bits()).collect()))
            .collect()
    };
    assert_eq!(bits(fresh.get_weights().unwrap()), bits(weights));
    let x = images(4, 7);
    assert_eq!(
        values(&fresh.forward_f32(&x).unwrap()),
        values(&m.forward_f32(&x).unwrap())
    );
}
