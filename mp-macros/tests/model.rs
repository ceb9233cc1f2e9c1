//! Models declared with `#[model]`, built and run: the must-compile cases, executed.

use mp_core::{BF16, F16, F32, Float32, MixedBFloat16, MixedFloat16, Policy, PolicyKind, Tensor};
use mp_layers::{Activation, Compute, Dense, Flatten, Layer, Model, Softmax, model};

/// The Keras mixed precision guide's model, with small layers.
#[model]
pub struct Digits {
    dense_1: Dense,
    dense_2: Dense,
    dense_logits: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

fn digits<P: PolicyKind>() -> Digits<P> {
    Digits::new(
        Dense::new(16).relu().with_seed(1),
        Dense::new(16).relu().with_seed(2),
        Dense::new(10).with_seed(3),
        Softmax::new(),
    )
}

/// The same model without the float32 annotation: a `Model` under `Float32` only.
#[model]
struct Plain {
    dense_1: Dense,
    predictions: Softmax,
}

/// A float16 softmax in the middle of a float32-output model.
#[model]
struct MiddleHalf {
    dense_1: Dense,
    #[dtype = "float16"]
    squash: Softmax,
    #[dtype = "mixed_bfloat16"]
    dense_2: Dense,
    #[dtype = "float32"]
    out: Activation,
}

/// A block that ends in the model's compute dtype: a `Layer`, not a `Model`, under mixed policies.
#[model]
struct Block {
    dense_a: Dense,
    dense_b: Dense,
}

/// A nested model as a middle field.
#[model]
struct Outer {
    flatten: Flatten,
    block: Block,
    #[dtype = "float32"]
    predictions: Softmax,
}

/// A float32 head, used as the last field of `Tail`.
#[model]
struct Head {
    logits: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

/// A nested model as the last field: the outer model's output is the head's float32.
#[model]
struct Tail {
    dense_1: Dense,
    head: Head,
}

/// Every field fixed: the struct carries the policy in a hidden `PhantomData`.
#[model]
struct AllFixed {
    #[dtype = "float32"]
    dense_1: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

/// One layer.
#[model]
struct Single {
    dense: Dense,
}

/// A batch of `n` images of 784 features in the policy's compute dtype.
fn batch<P: PolicyKind>(n: usize) -> Tensor<P::Compute> {
    let data: Vec<f32> = (0..n * 784)
        .map(|i| ((i * 37) % 255) as f32 / 255.0)
        .collect();
    Tensor::<P::Compute>::from_f32(&[n, 784], &data).unwrap()
}

fn assert_probabilities(y: &Tensor<F32>, rows: usize, classes: usize) {
    assert_eq!(y.shape(), &[rows, classes]);
    for row in y.as_slice().unwrap().chunks(classes) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "a softmax row sums to {sum}");
        assert!(row.iter().all(|p| p.is_finite() && *p >= 0.0));
    }
}

fn needs_model<M: Model>(_: &M) {}

/// The squared norm of the gradient of variable `name`.
fn grad_norm<M: Model>(model: &mut M, name: &str) -> f32 {
    let mut norm = None;
    model
        .visit_variables("", &mut |path, v| {
            if path == name {
                norm = Some(v.grad().as_slice()?.iter().map(|g| g * g).sum());
            }
            Ok(())
        })
        .unwrap();
    norm.expect("no such variable")
}

/// Builds, runs forward (inference and training) and backward under policy `P`.
fn guide_model_runs<P: PolicyKind>() {
    let mut model = digits::<P>();
    needs_model(&model);
    assert_eq!(model.build(&[784]).unwrap(), vec![10]);
    assert_eq!(model.output_shape(), Some(&[10][..]));
    assert!(model.ends_in_softmax());
    assert_eq!(
        model.param_count(),
        784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    );

    let x = batch::<P>(4);
    let y: Tensor<F32> = model.forward_f32(&x).unwrap();
    assert_probabilities(&y, 4, 10);

    let y = model.forward_train_f32(&x).unwrap();
    assert_probabilities(&y, 4, 10);
    assert!(model.saved_bytes() > 0);
    // The gradient of a cross-entropy with labels 0..4: `-1/p` at each label.
    let mut dy = Tensor::<F32>::zeros(&[4, 10]).unwrap();
    for (row, (d, p)) in dy
        .as_mut_slice()
        .unwrap()
        .chunks_mut(10)
        .zip(y.as_slice().unwrap().chunks(10))
        .enumerate()
    {
        d[row] = -1.0 / p[row] / 4.0;
    }
    model.zero_grad().unwrap();
    model.backward_f32(&dy).unwrap();
    let through_softmax = grad_norm(&mut model, "dense_1/kernel");
    assert!(
        through_softmax > 0.0 && through_softmax.is_finite(),
        "{through_softmax}"
    );

    let names: Vec<String> = model
        .get_weights()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "dense_1/kernel",
            "dense_1/bias",
            "dense_2/kernel",
            "dense_2/bias",
            "dense_logits/kernel",
            "dense_logits/bias"
        ]
    );

    // The fused path: the gradient with respect to the softmax's input, `p - onehot`.
    model.forward_train_f32(&x).unwrap();
    let mut dz = y.clone();
    for (row, d) in dz.as_mut_slice().unwrap().chunks_mut(10).enumerate() {
        d[row] -= 1.0;
        d.iter_mut().for_each(|v| *v /= 4.0);
    }
    model.zero_grad().unwrap();
    assert!(
        model
            .backward_from_softmax_input(&dz, false)
            .unwrap()
            .is_none()
    );
    let fused = grad_norm(&mut model, "dense_1/kernel");
    // The same gradient either way, up to the compute dtype's rounding.
    let tolerance = if P::POLICY == Policy::Float32 {
        1e-3
    } else {
        0.1
    };
    assert!(
        (fused - through_softmax).abs() <= tolerance * through_softmax,
        "{fused} vs {through_softmax}"
    );

    // The input gradient, in the model's compute dtype, when asked for.
    model.forward_train_f32(&x).unwrap();
    let dx: Option<Tensor<Compute<Digits<P>>>> =
        model.backward_from_softmax_input(&dz, true).unwrap();
    assert_eq!(dx.unwrap().shape(), &[4, 784]);
}

#[test]
fn guide_model_float32() {
    guide_model_runs::<Float32>();
}

#[test]
fn guide_model_mixed_float16() {
    guide_model_runs::<MixedFloat16>();
}

#[test]
fn guide_model_mixed_bfloat16() {
    guide_model_runs::<MixedBFloat16>();
}

#[test]
fn output_dtype_is_the_last_fields() {
    fn output<L: Layer>(_: &L) -> &'static str {
        std::any::type_name::<L::Output>()
    }
    assert_eq!(
        output(&digits::<MixedFloat16>()),
        std::any::type_name::<F32>()
    );
    // Without the annotation the model is still a layer, with the last field's output.
    let plain = Plain::<MixedFloat16>::new(Dense::new(3), Softmax::new());
    assert_eq!(output(&plain), std::any::type_name::<F16>());
    let plain = Plain::<MixedBFloat16>::new(Dense::new(3), Softmax::new());
    assert_eq!(output(&plain), std::any::type_name::<BF16>());
}

#[test]
fn unannotated_model_under_float32() {
    let mut model = Plain::<Float32>::new(Dense::new(10).with_seed(4), Softmax::new());
    model.build(&[784]).unwrap();
    let y = model.forward_f32(&batch::<Float32>(3)).unwrap();
    assert_probabilities(&y, 3, 10);
    assert!(model.summary().contains("predictions (Softmax)"));
}

#[test]
fn float16_softmax_in_the_middle() {
    fn run<P: PolicyKind>() {
        let mut model = MiddleHalf::<P>::new(
            Dense::new(8).with_seed(5),
            Softmax::new(),
            Dense::new(6).with_seed(6),
            Activation::softmax(),
        );
        assert_eq!(model.build(&[784]).unwrap(), vec![6]);
        let x = batch::<P>(2);
        let y = model.forward_train_f32(&x).unwrap();
        assert_probabilities(&y, 2, 6);
        model
            .backward_f32(
                &Tensor::<F32>::from_f32(
                    &[2, 6],
                    &[0.5, -0.5, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                )
                .unwrap(),
            )
            .unwrap();
        let summary = model.summary();
        assert!(summary.contains("squash (Softmax)"), "{summary}");
        let squash = summary.lines().find(|l| l.contains("squash")).unwrap();
        assert!(squash.contains("mixed_float16"), "{squash}");
        let dense_2 = summary.lines().find(|l| l.contains("dense_2")).unwrap();
        assert!(dense_2.contains("mixed_bfloat16"), "{dense_2}");
        let out = summary.lines().find(|l| l.contains("out (")).unwrap();
        assert!(out.contains("float32") && !out.contains("mixed"), "{out}");
    }
    run::<Float32>();
    run::<MixedFloat16>();
}

#[test]
fn nested_model_in_the_middle() {
    let block = Block::<MixedFloat16>::new(
        Dense::new(12).relu().with_seed(7),
        Dense::new(10).with_seed(8),
    );
    let mut model = Outer::<MixedFloat16>::new(Flatten::new(), block, Softmax::new());
    needs_model(&model);
    assert_eq!(model.build(&[28, 28]).unwrap(), vec![10]);
    let x = Tensor::<F16>::from_f32(&[2, 28, 28], &[0.25; 2 * 784]).unwrap();
    let y = model.forward_train_f32(&x).unwrap();
    assert_probabilities(&y, 2, 10);
    model.backward_f32(&y).unwrap();

    let names: Vec<String> = model
        .get_weights()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "block/dense_a/kernel",
            "block/dense_a/bias",
            "block/dense_b/kernel",
            "block/dense_b/bias"
        ]
    );
    let summary = model.summary();
    for row in [
        "flatten (Flatten)",
        "block/dense_a (Dense)",
        "block/dense_b (Dense)",
        "predictions (Softmax)",
    ] {
        assert!(summary.contains(row), "no {row:?} in\n{summary}");
    }
    assert!(summary.contains("Model: \"Outer\""), "{summary}");
}

#[test]
fn nested_model_as_the_last_field() {
    fn run<P: PolicyKind>() {
        let head = Head::<P>::new(Dense::new(10).with_seed(9), Softmax::new());
        let mut model = Tail::<P>::new(Dense::new(16).relu().with_seed(10), head);
        needs_model(&model);
        assert!(model.ends_in_softmax());
        model.build(&[784]).unwrap();
        let y = model.forward_train_f32(&batch::<P>(2)).unwrap();
        assert_probabilities(&y, 2, 10);
        model.backward_f32(&y).unwrap();
        let summary = model.summary();
        assert!(summary.contains("head/predictions (Softmax)"), "{summary}");
        assert_eq!(model.get_weights().unwrap()[2].0, "head/logits/kernel");
    }
    run::<Float32>();
    run::<MixedFloat16>();
    run::<MixedBFloat16>();
}

#[test]
fn all_fields_fixed() {
    let mut model = AllFixed::<MixedFloat16>::new(Dense::new(4).with_seed(11), Softmax::new());
    model.build(&[784]).unwrap();
    // A model takes what its first layer takes: float32 here, whatever the model's policy.
    let y = model.forward_f32(&batch::<Float32>(2)).unwrap();
    assert_probabilities(&y, 2, 4);
    assert!(model.summary().contains("(policy mixed_float16)"));
}

#[test]
fn single_layer_model() {
    let mut model = Single::<Float32>::new(Dense::new(3).with_seed(12));
    needs_model(&model);
    model.build(&[784]).unwrap();
    let x = batch::<Float32>(2);
    let y = model.forward_train_f32(&x).unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    let dx = model.backward(&y, true).unwrap().unwrap();
    assert_eq!(dx.shape(), &[2, 784]);
    model.forward_train_f32(&x).unwrap();
    assert!(model.backward(&y, false).unwrap().is_none());
    assert!(!model.ends_in_softmax());
}

#[test]
fn summary_lists_fields_with_their_policies() {
    let mut model = digits::<MixedFloat16>();
    model.build(&[784]).unwrap();
    let summary = model.summary();
    println!("{summary}");
    let row = |name: &str| {
        summary
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        row("dense_1 (Dense)").contains("mixed_float16"),
        "{summary}"
    );
    assert!(row("dense_2 (Dense)").contains("(None, 16)"), "{summary}");
    assert!(row("dense_logits (Dense)").contains("170"), "{summary}");
    let predictions = row("predictions (Softmax)");
    assert!(
        predictions.contains("float32") && !predictions.contains("mixed"),
        "{summary}"
    );
    assert!(summary.starts_with("Model: \"Digits\""), "{summary}");
    assert_eq!(model.model_name(), "Digits");
    assert_eq!(model.name(), "Digits");
}

#[test]
fn build_errors_name_both_layers() {
    let mut dense_2 = Dense::<Float32>::new(16);
    dense_2.build(&[5]).unwrap();
    let mut model = Digits::new(Dense::new(16), dense_2, Dense::new(10), Softmax::new());
    let err = model.build(&[784]).unwrap_err().to_string();
    assert!(err.contains("dense_2") && err.contains("dense_1"), "{err}");
}

#[test]
fn debug_shows_the_layers() {
    let text = format!("{:?}", digits::<MixedBFloat16>());
    assert_eq!(
        text,
        "Digits { policy: mixed_bfloat16, dense_1: Dense (mixed_bfloat16), \
         dense_2: Dense (mixed_bfloat16), dense_logits: Dense (mixed_bfloat16), \
         predictions: Softmax (float32) }"
    );
}

/// The model's backward is the layers' backward chained by hand.
#[test]
fn backward_matches_the_layers_chained_by_hand() {
    let x = batch::<Float32>(3);
    let mut model = digits::<Float32>();
    model.build(&[784]).unwrap();
    let y = model.forward_train_f32(&x).unwrap();
    let mut dz = y.clone();
    dz.as_mut_slice().unwrap()[0] -= 1.0;
    model.backward_from_softmax_input(&dz, false).unwrap();

    let mut d1 = Dense::<Float32>::new(16).relu().with_seed(1);
    let mut d2 = Dense::<Float32>::new(16).relu().with_seed(2);
    let mut d3 = Dense::<Float32>::new(10).with_seed(3);
    d1.set_name("dense_1");
    d2.set_name("dense_2");
    d3.set_name("dense_logits");
    d1.build(&[784]).unwrap();
    d2.build(&[16]).unwrap();
    d3.build(&[16]).unwrap();
    let h = d1.forward_train(&x).unwrap();
    let h = d2.forward_train(&h).unwrap();
    let _ = d3.forward_train(&h).unwrap();
    let g = d3.backward(&dz, true).unwrap().unwrap();
    let g = d2.backward(&g, true).unwrap().unwrap();
    assert!(d1.backward(&g, false).unwrap().is_none());

    let mut by_hand = vec![];
    for d in [&mut d1, &mut d2, &mut d3] {
        d.visit_variables("", &mut |_, v| {
            by_hand.push(v.grad().as_slice()?.to_vec());
            Ok(())
        })
        .unwrap();
    }
    let mut from_model = vec![];
    model
        .visit_variables("", &mut |_, v| {
            from_model.push(v.grad().as_slice()?.to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(from_model, by_hand);
}
