//! Fine-tuning with frozen layers: no weight-gradient GEMMs, no optimizer slots or decay,
//! weights and moving statistics bit-identical through training, BatchNormalization on its
//! moving statistics with its own backward (checked against float64), the frozen set in
//! checkpoints and summaries, and unfreezing.

use std::sync::Mutex;

use mp_core::{DType, F32, Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_kernels::counters::gemm_calls;
use mp_layers::{
    Activation, BatchNormalization, Checkpointing, Conv2D, Dense, FitOptions, Flatten, Layer,
    Model, Softmax, SparseCategoricalCrossentropy, Trainer, Verbose, model,
};
use mp_optim::{AdamW, Optimizer};
use ndarray::{Array1, Array4};

/// The GEMM counters are per process: every test here holds this, so that one counting sees
/// only its own GEMMs.
static COUNTING: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    COUNTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[model]
struct Cnn {
    conv: Conv2D,
    bn: BatchNormalization,
    relu: Activation,
    flatten: Flatten,
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn trainer<P: PolicyKind>() -> Trainer<Cnn<P>, AdamW> {
    let mut t = Trainer::compile(
        Cnn {
            conv: Conv2D::new(4, [3, 3]),
            bn: BatchNormalization::new(),
            relu: Activation::relu(),
            flatten: Flatten::new(),
            hidden: Dense::new(16).relu(),
            logits: Dense::new(3),
            probs: Softmax::new(),
        },
        AdamW::new(0.01).unwrap().with_weight_decay(0.1).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[6, 6, 1]).unwrap();
    t
}

/// Three classes of 6x6 images: a bright row, column or diagonal, with noise.
fn data(n: usize, seed: u64) -> (Array4<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let mut x = Array4::zeros((n, 6, 6, 1));
    let mut y = Array1::zeros(n);
    for s in 0..n {
        let class = s % 3;
        let at = (rng.uniform(0.0, 6.0) as usize).min(5);
        for i in 0..6 {
            for j in 0..6 {
                let on = match class {
                    0 => i == at,
                    1 => j == at,
                    _ => i == j,
                };
                x[[s, i, j, 0]] = f32::from(u8::from(on)) + 0.1 * rng.normal();
            }
        }
        y[s] = class as u32;
    }
    (x, y)
}

fn options(epochs: usize) -> FitOptions {
    FitOptions {
        batch_size: 16,
        epochs,
        verbose: Verbose::Silent,
        ..FitOptions::default()
    }
}

fn bits<M: Model>(m: &mut M, prefix: &str) -> Vec<(String, Vec<u32>)> {
    m.get_weights()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| {
            (
                n,
                t.as_slice().unwrap().iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

fn step_gemms<P: PolicyKind>(t: &mut Trainer<Cnn<P>, AdamW>) -> u64 {
    let (x, y) = data(8, 1);
    let labels: Vec<u32> = y.to_vec();
    let x = Tensor::<P::Compute>::from_f32(&[8, 6, 6, 1], x.as_slice().unwrap()).unwrap();
    let dtype = <P as PolicyKind>::POLICY.compute_dtype();
    let before = gemm_calls(dtype)
        + if dtype == DType::F32 {
            0
        } else {
            gemm_calls(DType::F32)
        };
    t.train_step(&x, &labels).unwrap();
    gemm_calls(dtype)
        + if dtype == DType::F32 {
            0
        } else {
            gemm_calls(DType::F32)
        }
        - before
}

#[test]
fn frozen_layers_run_no_weight_gradient_gemms() {
    let _exclusive = exclusive();
    fn check<P: PolicyKind>() {
        let mut t = trainer::<P>();
        let all = step_gemms(&mut t);
        let name = P::POLICY.name();
        // Frozen alone, each layer drops its weight-gradient GEMMs: one for a Dense, at least
        // one for a convolution (its CPU kernel may split the images).
        t.model_mut().freeze("hidden").unwrap();
        assert_eq!(step_gemms(&mut t), all - 1, "{name}: frozen Dense");
        t.model_mut().unfreeze("hidden").unwrap();
        assert_eq!(t.model_mut().freeze("conv").unwrap(), 2);
        let conv_dw = all - step_gemms(&mut t);
        assert!(
            conv_dw >= 1,
            "{name}: a frozen Conv2D ran its weight-gradient GEMMs"
        );
        assert_eq!(t.model_mut().freeze("hidden").unwrap(), 2);
        let frozen = step_gemms(&mut t);
        assert_eq!(
            frozen,
            all - conv_dw - 1,
            "{name}: {all} GEMMs a step, {frozen} frozen"
        );
        t.model_mut().unfreeze("").unwrap();
        assert_eq!(step_gemms(&mut t), all);
    }
    check::<Float32>();
    check::<MixedBFloat16>();
    check::<MixedFloat16>();
}

#[test]
fn frozen_weights_and_moving_statistics_stay_bit_identical_and_get_no_slots_or_decay() {
    let _exclusive = exclusive();
    let (x, y) = data(96, 2);
    let mut t = trainer::<MixedBFloat16>();
    t.fit(x.view(), y.view(), &options(1)).unwrap();
    t.model_mut().freeze("conv").unwrap();
    t.model_mut().freeze("bn").unwrap();
    assert_eq!(
        t.model_mut().frozen_variables().unwrap(),
        [
            "conv/kernel",
            "conv/bias",
            "bn/gamma",
            "bn/beta",
            "bn/moving_mean",
            "bn/moving_variance"
        ]
    );
    let body = bits(t.model_mut(), "conv");
    let bn = bits(t.model_mut(), "bn");
    let head = bits(t.model_mut(), "logits");
    // A fresh optimizer (as a fine-tuning phase starts): it must create no slots for them.
    let fresh = AdamW::new(0.01).unwrap().with_weight_decay(0.1).unwrap();
    *t.optimizer_mut().inner_mut() = fresh;
    t.fit(x.view(), y.view(), &options(2)).unwrap();
    assert_eq!(bits(t.model_mut(), "conv"), body, "frozen conv changed");
    assert_eq!(
        bits(t.model_mut(), "bn"),
        bn,
        "frozen BN (or its statistics) changed"
    );
    assert_ne!(
        bits(t.model_mut(), "logits"),
        head,
        "the head did not train"
    );
    let slots: Vec<String> = t
        .optimizer()
        .inner()
        .state()
        .into_iter()
        .map(|(v, _, _)| v)
        .collect();
    assert!(!slots.is_empty());
    assert!(
        slots
            .iter()
            .all(|v| !v.starts_with("conv") && !v.starts_with("bn")),
        "slots for frozen variables: {slots:?}"
    );

    // The summary counts them apart.
    let summary = t.model().summary();
    let conv_bn = 4 * 9 + 4 + 2 * 4;
    assert!(
        summary.contains(&format!("Frozen params: {conv_bn}")),
        "{summary}"
    );
    assert!(summary.contains("Non-trainable params: 8"), "{summary}");

    // Unfrozen, they train again.
    t.model_mut().unfreeze("conv").unwrap();
    t.fit(x.view(), y.view(), &options(1)).unwrap();
    assert_ne!(bits(t.model_mut(), "conv"), body);
    assert!(!t.model().summary().contains("Frozen params: 44"));
}

#[test]
fn freezing_an_unknown_path_names_it_and_the_layers() {
    let _exclusive = exclusive();
    let mut t = trainer::<Float32>();
    let err = t.model_mut().freeze("dense_9").unwrap_err().to_string();
    assert!(err.contains("\"dense_9\""), "{err}");
    assert!(err.contains("conv, bn, hidden, logits"), "{err}");
    // A prefix of a name is not a path: "con" is not "conv".
    assert!(t.model_mut().freeze("con").is_err());
    assert!(t.model_mut().frozen_variables().unwrap().is_empty());
    assert_eq!(t.model_mut().freeze("conv/kernel").unwrap(), 1);
}

#[test]
fn the_frozen_set_is_checkpointed_and_a_resumed_run_matches_an_uninterrupted_one() {
    let _exclusive = exclusive();
    let (x, y) = data(64, 3);
    let mut straight = trainer::<MixedFloat16>();
    straight.model_mut().freeze("hidden").unwrap();
    straight.model_mut().freeze("bn").unwrap();
    straight.fit(x.view(), y.view(), &options(2)).unwrap();

    let mut first = trainer::<MixedFloat16>();
    first.model_mut().freeze("hidden").unwrap();
    first.model_mut().freeze("bn").unwrap();
    first.fit(x.view(), y.view(), &options(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    first.save_checkpoint(&path).unwrap();

    let mut resumed = trainer::<MixedFloat16>();
    resumed.resume(&path).unwrap();
    assert_eq!(
        resumed.model_mut().frozen_variables().unwrap(),
        first.model_mut().frozen_variables().unwrap()
    );
    resumed.fit(x.view(), y.view(), &options(1)).unwrap();
    assert_eq!(
        bits(resumed.model_mut(), ""),
        bits(straight.model_mut(), "")
    );
}

/// BatchNormalization frozen: y = gamma (x - moving_mean) / sqrt(moving_var + eps) + beta and
/// dx = dy gamma / sqrt(moving_var + eps), against float64, with and without the fused ReLU.
#[test]
fn frozen_batch_normalization_forward_and_backward_match_float64() {
    let _exclusive = exclusive();
    fn check<P: PolicyKind>(tolerance: f64) {
        let (n, c) = (37, 5); // not a multiple of any tile
        let mut rng = Rng::new(11);
        let mut bn = BatchNormalization::<P>::new().epsilon(1e-3);
        bn.build(&[c]).unwrap();
        let stats: Vec<(String, Tensor<F32>)> = ["gamma", "beta", "moving_mean", "moving_variance"]
            .iter()
            .map(|name| {
                let v: Vec<f32> = (0..c)
                    .map(|_| match *name {
                        "gamma" => 1.0 + 0.5 * rng.normal(),
                        "moving_variance" => rng.uniform(0.2, 3.0),
                        _ => rng.normal(),
                    })
                    .collect();
                (name.to_string(), Tensor::from_vec(&[c], v).unwrap())
            })
            .collect();
        let mut it = stats.iter();
        bn.visit_variables("", &mut |_, v| {
            v.set_value(&it.next().unwrap().1).unwrap();
            v.set_frozen(true);
            Ok(())
        })
        .unwrap();
        let get = |i: usize| -> Vec<f64> {
            stats[i]
                .1
                .as_slice()
                .unwrap()
                .iter()
                .map(|v| *v as f64)
                .collect()
        };
        let (gamma, beta, mean, var) = (get(0), get(1), get(2), get(3));
        let xs: Vec<f32> = (0..n * c).map(|_| 2.0 * rng.normal()).collect();
        let dys: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
        let x = Tensor::<P::Compute>::from_f32(&[n, c], &xs).unwrap();
        let dy = Tensor::<P::Compute>::from_f32(&[n, c], &dys).unwrap();
        let (x64, dy64) = (x.to_f32_vec().unwrap(), dy.to_f32_vec().unwrap());
        for relu in [false, true] {
            let y = if relu {
                bn.forward_train_fused(&x, mp_kernels::activation::Activation::Relu)
                    .unwrap()
                    .unwrap()
            } else {
                bn.forward_train(&x).unwrap()
            };
            let dx = bn.backward(&dy, true).unwrap().unwrap();
            let (y, dx) = (y.to_f32_vec().unwrap(), dx.to_f32_vec().unwrap());
            for i in 0..n * c {
                let ch = i % c;
                let scale = gamma[ch] / (var[ch] + 1e-3f64).sqrt();
                let z = (x64[i] as f64 - mean[ch]) * scale + beta[ch];
                let (want_y, want_dx) = if relu && z <= 0.0 {
                    (0.0, 0.0)
                } else {
                    (z, dy64[i] as f64 * scale)
                };
                for (what, got, want) in [("y", y[i], want_y), ("dx", dx[i], want_dx)] {
                    let err = (got as f64 - want).abs();
                    assert!(
                        err <= tolerance * want.abs().max(1e-3),
                        "{} relu={relu} {what}[{i}]: {got} vs {want}",
                        P::POLICY.name()
                    );
                }
            }
            // The moving statistics are not updated by a frozen layer's step.
            bn.end_step(true).unwrap();
            let mut now = vec![];
            bn.visit_variables("", &mut |_, v| {
                now.push(v.value().as_slice().unwrap().to_vec());
                Ok(())
            })
            .unwrap();
            for (k, (_, t)) in stats.iter().enumerate() {
                assert_eq!(now[k], t.as_slice().unwrap(), "variable {k} moved");
            }
        }
    }
    // One rounding to the compute dtype of a float32 result.
    check::<Float32>(1e-5);
    check::<MixedBFloat16>(2f64.powi(-8) + 1e-5);
    check::<MixedFloat16>(2f64.powi(-11) + 1e-5);
}
