//! Input that used to be taken silently, or refused with a message about something else (issue
//! 27's sweep), is refused before anything changes, with a message naming the real problem.

use mp_core::{Float32, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{
    CategoricalCrossentropy, Dense, Embedding, FitOptions, Input, Layer, Model, MultiHeadAttention,
    PositionEmbedding, SequencePooling, Softmax, SparseCategoricalCrossentropy, Trainer, Verbose,
    model,
};
use mp_optim::{Adam, Optimizer};
use ndarray::{Array1, Array2};

#[model]
struct Net {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn net<P: PolicyKind>() -> Net<P> {
    Net {
        hidden: Dense::new(16).relu().with_seed(1),
        logits: Dense::new(3).with_seed(2),
        probs: Softmax::new(),
    }
}

fn silent(batch_size: usize) -> FitOptions {
    FitOptions {
        batch_size,
        epochs: 1,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

fn bits(values: impl IntoIterator<Item = f32>) -> Vec<u32> {
    values.into_iter().map(f32::to_bits).collect()
}

/// Everything a training step may change: the variables, the optimizer's slots and update
/// count, the trainer's step count and the loss scale, bit for bit.
fn snapshot<M: Model, O: Optimizer, Lo>(t: &mut Trainer<M, O, Lo>) -> String {
    let weights: Vec<(String, Vec<u32>)> = t
        .model_mut()
        .get_weights()
        .unwrap()
        .into_iter()
        .map(|(name, v)| (name, bits(v.to_f32_vec().unwrap())))
        .collect();
    let slots: Vec<(String, &str, Vec<u32>)> = t
        .optimizer()
        .inner()
        .state()
        .into_iter()
        .map(|(name, slot, v)| (name, slot, bits(v.to_f32_vec().unwrap())))
        .collect();
    format!(
        "{weights:?}\n{slots:?}\niterations {}\nstep {}\nloss scale {:?}",
        t.optimizer().inner().iterations(),
        t.progress().step,
        t.optimizer().loss_scale_state()
    )
}

/// An empty batch moved every variable under Adam (stale moments) and counted a step; it is
/// refused now, and a window of empty micro-batches too. A window with samples in some of its
/// micro-batches still trains.
fn empty_batch_is_refused<P: PolicyKind>() {
    let mut t = Trainer::compile(
        net::<P>(),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[5]).unwrap();
    let mut rng = Rng::new(3);
    let x = Tensor::<Input<Net<P>>>::from_f32(&[8, 5], &rng.uniform_vec(40, -1.0, 1.0)).unwrap();
    let labels: Vec<u32> = (0..8).map(|i| i % 3).collect();
    // One real step first, so the slots exist and hold moments.
    let (first, _) = t.train_step(&x, &labels).unwrap();
    assert!(first.applied);
    let before = snapshot(&mut t);
    assert!(before.contains("iterations 1"), "{before}");
    let empty = Tensor::<Input<Net<P>>>::from_f32(&[0, 5], &[]).unwrap();
    let err = t.train_step(&empty, &[] as &[u32]).unwrap_err().to_string();
    assert!(
        err.contains("train_step: the batch is empty (0 samples)"),
        "{}: {err}",
        P::POLICY
    );
    let err = t
        .train_window(&[(&empty, &[] as &[u32]), (&empty, &[])])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("its 2 micro-batches are all empty (0 samples)"),
        "{}: {err}",
        P::POLICY
    );
    assert_eq!(snapshot(&mut t), before, "{}", P::POLICY);
    let (result, probs) = t
        .train_window(&[(&empty, &[] as &[u32]), (&x, &labels)])
        .unwrap();
    assert!(result.applied && result.loss.is_finite(), "{result:?}");
    assert_eq!(probs[0].shape(), &[0, 3]);
    assert_eq!(t.optimizer().inner().iterations(), 2);
}

#[test]
fn an_empty_batch_is_refused_before_anything_changes_float32() {
    empty_batch_is_refused::<Float32>();
}

#[test]
fn an_empty_batch_is_refused_before_anything_changes_mixed_float16() {
    empty_batch_is_refused::<MixedFloat16>();
}

#[test]
fn negative_categorical_targets_are_named_before_the_first_step() {
    let mut rng = Rng::new(5);
    let x = Array2::from_shape_vec((24, 5), rng.uniform_vec(120, -1.0, 1.0)).unwrap();
    let one_hot = Array2::from_shape_fn((24, 3), |(i, j)| f32::from(u8::from(i % 3 == j)));
    let mut t = Trainer::compile(
        net::<Float32>(),
        Adam::new(0.01).unwrap(),
        CategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[5]).unwrap();
    let before = snapshot(&mut t);
    // The sweep's case trained to a loss of -2.83.
    let mut negative = one_hot.clone();
    negative[[3, 2]] = -1.0;
    let err = t
        .fit(x.view(), negative.view(), &silent(8))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target -1 at position 2 of row 3 of the data is negative")
            && err.contains("categorical_crossentropy"),
        "{err}"
    );
    let err = t
        .evaluate(x.view(), negative.view(), 8, Verbose::Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 3") && err.contains("negative"), "{err}");
    let mut infinite = one_hot.clone();
    infinite[[20, 0]] = f32::INFINITY;
    let err = t
        .fit(x.view(), infinite.view(), &silent(8))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target inf at position 0 of row 20 of the data is not finite"),
        "{err}"
    );
    assert_eq!(snapshot(&mut t), before);
    // Smoothed targets are still the user's choice.
    let smoothed = one_hot.mapv(|t| 0.9 * t + 0.1 / 3.0);
    t.fit(x.view(), smoothed.view(), &silent(8)).unwrap();
}

#[model]
struct TokenClassifier {
    embed: Embedding,
    positions: PositionEmbedding,
    attention: MultiHeadAttention,
    pool: SequencePooling,
    logits: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

fn token_classifier<P: PolicyKind>() -> TokenClassifier<P> {
    TokenClassifier::new(
        Embedding::new(8, 8).with_seed(1),
        PositionEmbedding::new(6).with_seed(2),
        MultiHeadAttention::new(2).with_seed(3),
        SequencePooling::mean(),
        Dense::new(2).with_seed(4),
        Softmax::new(),
    )
}

/// A model whose first layer is a model: the check reaches the Embedding inside.
#[model]
struct Wrapped {
    inner: TokenClassifier,
}

#[test]
fn a_bad_token_id_is_named_by_its_data_row_before_any_step() {
    let (n, seq) = (48usize, 6usize);
    let ids = Array2::from_shape_fn((n, seq), |(i, j)| ((i + j) % 8) as f32);
    let y = Array1::from_shape_fn(n, |i| (i % 2) as u32);
    let mut t = Trainer::compile(
        token_classifier::<MixedFloat16>(),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[seq]).unwrap();
    let before = snapshot(&mut t);
    for (value, says) in [
        (8.0, "is out of range"),
        (1e9, "is out of range"),
        (-1.0, "is negative"),
        (2.5, "is not a whole number"),
        (f32::NAN, "is not finite"),
    ] {
        // Row 37 is in the fifth batch of 8: the old check named its position in that batch,
        // after four steps were applied.
        let mut bad = ids.clone();
        bad[[37, 4]] = value;
        let expected = format!(
            "embed: token id {value} in row 37 of the data (position 4) {says}: the vocabulary \
             has 8 tokens, ids 0 to 7"
        );
        let errors = [
            t.fit(bad.view(), y.view(), &silent(8)).unwrap_err(),
            t.evaluate(bad.view(), y.view(), 8, Verbose::Silent)
                .unwrap_err(),
            t.predict(bad.view(), 8).unwrap_err(),
        ];
        for err in errors {
            let err = err.to_string();
            assert!(err.contains(&expected), "{expected:?} missing from {err:?}");
        }
        assert_eq!(snapshot(&mut t), before, "{value}");
    }
    // Ids of a rank-2 sample are named by their index in it.
    let mut embed = Embedding::<Float32>::new(4, 2);
    let mut grid = ndarray::Array3::<f32>::zeros((3, 2, 2));
    grid[[2, 1, 0]] = 4.0;
    embed.build(&[2, 2]).unwrap();
    let err = embed.check_input(&grid.view().into_dyn()).unwrap_err();
    assert!(
        err.to_string()
            .contains("token id 4 in row 2 of the data (position [1, 0]) is out of range"),
        "{err}"
    );
    // A model forwards the check to its first layer, also when that is a model.
    let wrapped = Wrapped::<Float32>::new(token_classifier());
    let mut bad = ids.clone();
    bad[[0, 0]] = -3.0;
    let err = wrapped.check_input(&bad.view().into_dyn()).unwrap_err();
    assert!(err.to_string().contains("token id -3 in row 0"), "{err}");
    assert!(wrapped.check_input(&ids.view().into_dyn()).is_ok());
    // And a model of layers without such a check takes any value.
    let x = Array2::from_elem((2, 5), f32::NAN);
    assert!(net::<Float32>().check_input(&x.view().into_dyn()).is_ok());
}

#[test]
fn attention_shape_errors_name_the_real_problem() {
    let build = |mha: MultiHeadAttention<Float32>, shape: &[usize]| {
        let mut mha = mha;
        mha.build(shape).unwrap_err().to_string()
    };
    let err = build(MultiHeadAttention::new(2).with_key_dim(0), &[4, 8]);
    assert!(
        err.contains("multi_head_attention: key_dim must be at least 1, got 0")
            && !err.contains("divide"),
        "{err}"
    );
    for mha in [
        MultiHeadAttention::new(2),
        MultiHeadAttention::new(2).with_key_dim(4),
    ] {
        let err = build(mha, &[4, 0]);
        assert!(
            err.contains("the model width is 0 (inputs of shape [4, 0] per sample)")
                && !err.contains("divide"),
            "{err}"
        );
    }
    let err = build(MultiHeadAttention::new(0), &[4, 8]);
    assert!(err.contains("needs at least 1 head, got 0"), "{err}");
    // A real divisibility problem keeps its message.
    let err = build(MultiHeadAttention::new(3), &[4, 8]);
    assert!(
        err.contains("3 heads do not divide the model width 8"),
        "{err}"
    );

    let rank = "it expects [tokens, width] inputs (rank 2) per sample, but the model input \
                gives [8]";
    let err = build(MultiHeadAttention::new(2), &[8]);
    assert!(
        err.contains(&format!("cannot build multi_head_attention: {rank}")),
        "{err}"
    );
    let err = SequencePooling::<Float32>::mean()
        .build(&[8])
        .unwrap_err()
        .to_string();
    assert!(err.contains(rank) && !err.contains("[0, 0]"), "{err}");
    for err in [
        PositionEmbedding::<Float32>::new(4)
            .build(&[8])
            .unwrap_err(),
        mp_layers::ClassToken::<Float32>::new()
            .build(&[8])
            .unwrap_err(),
    ] {
        assert!(err.to_string().contains(rank), "{err}");
    }
    // Inside a model, the message names the field and what comes before it.
    let err = token_classifier::<Float32>()
        .build(&[6, 8])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "cannot build positions: it expects [tokens, width] inputs (rank 2) per sample, but \
             embed gives [6, 8, 8]"
        ),
        "{err}"
    );
}

#[test]
fn an_empty_input_shape_says_it_needs_an_axis() {
    let err = net::<Float32>().build(&[]).unwrap_err().to_string();
    assert!(
        err.contains(
            "cannot build hidden: it expects an input shape with at least one axis (the \
             features) per sample, but the model input gives []"
        ),
        "{err}"
    );
    let err = Softmax::<Float32>::new()
        .build(&[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least one axis"), "{err}");
    // What the trainer says for samples without an axis is unchanged.
    let mut t = Trainer::compile(
        net::<Float32>(),
        Adam::new(0.01).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let x = Array1::<f32>::zeros(4);
    let y = Array1::<u32>::zeros(4);
    let err = t.fit(x.view(), y.view(), &silent(2)).unwrap_err();
    assert!(err.to_string().contains("at least one axis"), "{err}");
}
