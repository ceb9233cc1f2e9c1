//! Bad input and non-finite data: a clear error naming the problem, never a panic, and never a
//! non-finite value in the weights (the findings of a sweep of bad input, one test each).

use mp_core::{Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{
    Dense, Error, FitOptions, Layer, Model, Softmax, SparseCategoricalCrossentropy, Trainer,
    Verbose, model,
};
use mp_optim::Adam;
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
        hidden: Dense::new(16).relu(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    }
}

fn data(rows: usize, seed: u64) -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let x = Array2::from_shape_fn((rows, 5), |_| rng.uniform(-1.0, 1.0));
    let y = Array1::from_shape_fn(rows, |i| (i % 3) as u32);
    (x, y)
}

fn silent(batch_size: usize, epochs: usize) -> FitOptions {
    FitOptions {
        batch_size,
        epochs,
        validation_split: 0.0,
        verbose: Verbose::Silent,
        ..Default::default()
    }
}

fn weights_bits<M: Model>(m: &mut M) -> Vec<u32> {
    m.get_weights()
        .unwrap()
        .iter()
        .flat_map(|(_, t)| t.to_f32_vec().unwrap())
        .map(f32::to_bits)
        .collect()
}

/// A batch holding NaN is skipped under every policy: the weights stay finite and bit-identical,
/// the step is counted as skipped, and a run of such steps stops `fit` with an error that says
/// where the first non-finite value was.
fn nan_batch_is_skipped<P: PolicyKind>() {
    let (mut x, y) = data(48, 7);
    let mut trainer = Trainer::compile(
        net::<P>(),
        Adam::new(1e-3).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    // One clean epoch first, so the weights have moved.
    trainer.fit(x.view(), y.view(), &silent(16, 1)).unwrap();
    let before = weights_bits(trainer.model_mut());
    x[[3, 2]] = f32::NAN;
    // One batch of 48 rows: the NaN row poisons the whole step.
    let (result, _) = {
        let xb = Tensor::<mp_core::F32>::from_f32(&[48, 5], x.as_slice().unwrap()).unwrap();
        let xb = mp_layers::convert::<mp_core::F32, mp_layers::Compute<Net<P>>>(xb).unwrap();
        trainer.train_step(&xb, y.as_slice().unwrap()).unwrap()
    };
    assert!(!result.applied, "{:?}: the NaN step was applied", P::POLICY);
    let after = weights_bits(trainer.model_mut());
    assert_eq!(
        before,
        after,
        "{:?}: a skipped step changed the weights",
        P::POLICY
    );
    assert!(after.iter().all(|&b| f32::from_bits(b).is_finite()));

    // fit on data that is NaN in every batch: skipped steps, then a clear stop.
    let mut x = x;
    x.column_mut(0).fill(f32::INFINITY);
    let mut trainer = trainer.with_max_nonfinite_steps(5);
    let err = trainer
        .fit(x.view(), y.view(), &silent(4, 10))
        .expect_err("fit must stop");
    let text = err.to_string();
    match &err {
        Error::NonFiniteSteps { steps, origin } => {
            assert_eq!(*steps, 5);
            assert_eq!(origin, "the input batch", "{text}");
        }
        // Under mixed_float16 the loss scale halves at each skip and may collapse first.
        Error::Optim(mp_optim::Error::LossScaleCollapsed { .. })
            if P::POLICY.name() == "mixed_float16" => {}
        other => panic!("{:?}: unexpected error {other}", P::POLICY),
    }
    assert!(weights_bits(trainer.model_mut()) == after, "{text}");
}

#[test]
fn nan_batch_is_skipped_float32() {
    nan_batch_is_skipped::<Float32>();
}

#[test]
fn nan_batch_is_skipped_mixed_bfloat16() {
    nan_batch_is_skipped::<MixedBFloat16>();
}

#[test]
fn nan_batch_is_skipped_mixed_float16() {
    nan_batch_is_skipped::<MixedFloat16>();
}

/// A huge learning rate drives the weights to overflow; the steps whose gradients are
/// non-finite are skipped, so the weights never hold NaN.
#[test]
fn exploding_updates_never_reach_the_weights_as_nan() {
    let (x, y) = data(64, 3);
    let mut trainer = Trainer::compile(
        net::<Float32>(),
        Adam::new(1e30).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let r = trainer.fit(x.view(), y.view(), &silent(8, 20));
    let w = weights_bits(trainer.model_mut());
    assert!(
        w.iter().all(|&b| !f32::from_bits(b).is_nan()),
        "NaN weights after {r:?}"
    );
}

#[test]
fn a_bad_label_is_reported_by_its_row_before_any_step() {
    let (x, mut y) = data(40, 1);
    y[37] = 9;
    let mut trainer = Trainer::compile(
        net::<Float32>(),
        Adam::new(1e-3).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let before = {
        trainer.model_mut().build(&[5]).unwrap();
        weights_bits(trainer.model_mut())
    };
    let err = trainer.fit(x.view(), y.view(), &silent(8, 1)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("label 9 in row 37") && text.contains("3 classes"),
        "{text}"
    );
    assert_eq!(
        trainer.progress().step,
        0,
        "a step ran before the labels were checked"
    );
    assert_eq!(weights_bits(trainer.model_mut()), before);
    let err = trainer
        .evaluate(x.view(), y.view(), 8, Verbose::Silent)
        .unwrap_err();
    assert!(err.to_string().contains("row 37"), "{err}");
}

#[test]
fn predict_checks_its_input_like_evaluate() {
    let (x, y) = data(20, 2);
    let mut trainer = Trainer::compile(
        net::<Float32>(),
        Adam::new(1e-3).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    trainer.fit(x.view(), y.view(), &silent(8, 1)).unwrap();
    // Zero rows: an empty (0, classes) result, not (0, 0).
    let none = Array2::<f32>::zeros((0, 5));
    assert_eq!(trainer.predict(none.view(), 8).unwrap().shape(), &[0, 3]);
    // The wrong number of columns: an error naming both shapes, with or without rows.
    for rows in [0, 4] {
        let wrong = Array2::<f32>::zeros((rows, 7));
        let err = trainer.predict(wrong.view(), 8).unwrap_err().to_string();
        assert!(err.contains("[5]") && err.contains("[7]"), "{err}");
    }
    // Zero columns: says so.
    let empty = Array2::<f32>::zeros((4, 0));
    let mut fresh = Trainer::compile(
        net::<Float32>(),
        Adam::new(1e-3).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let err = fresh
        .fit(empty.view(), Array1::<u32>::zeros(4).view(), &silent(2, 1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("0 features"), "{err}");
}

#[test]
fn a_layer_too_large_to_allocate_is_an_error_naming_it() {
    let mut m = net::<Float32>();
    m.hidden = Dense::new(100_000_000);
    let err = m.build(&[784]).unwrap_err().to_string();
    assert!(err.contains("hidden") && err.contains("GiB"), "{err}");
    let mut m = net::<Float32>();
    m.hidden = Dense::new(usize::MAX / 2);
    let err = m.build(&[784]).unwrap_err().to_string();
    assert!(err.contains("hidden"), "{err}");
}

/// A layer whose variable visit fails: the error reaches an optimizer's caller whole, as the
/// `source()` of `mp_optim::Error::Variables`, not as a string.
#[derive(Debug)]
struct BrokenVisit;

impl Layer for BrokenVisit {
    type Policy = Float32;
    type Input = mp_core::F32;
    type Output = mp_core::F32;
    fn type_name(&self) -> &'static str {
        "BrokenVisit"
    }
    fn name(&self) -> &str {
        "broken"
    }
    fn set_name(&mut self, _: &str) {}
    fn build(&mut self, input_shape: &[usize]) -> mp_layers::Result<Vec<usize>> {
        Ok(input_shape.to_vec())
    }
    fn output_shape(&self) -> Option<&[usize]> {
        None
    }
    fn forward(&self, x: &Tensor<mp_core::F32>) -> mp_layers::Result<Tensor<mp_core::F32>> {
        Ok(x.clone())
    }
    fn forward_train(
        &mut self,
        x: &Tensor<mp_core::F32>,
    ) -> mp_layers::Result<Tensor<mp_core::F32>> {
        Ok(x.clone())
    }
    fn backward(
        &mut self,
        dy: &Tensor<mp_core::F32>,
        _: bool,
    ) -> mp_layers::Result<Option<Tensor<mp_core::F32>>> {
        Ok(Some(dy.clone()))
    }
    fn visit_variables(
        &mut self,
        _: &str,
        _: &mut dyn FnMut(&str, &mut mp_core::Variable) -> mp_layers::Result<()>,
    ) -> mp_layers::Result<()> {
        Err(Error::NotBuilt {
            layer: "broken".into(),
        })
    }
    fn saved_bytes(&self) -> usize {
        0
    }
    fn param_count(&self) -> usize {
        0
    }
}

#[test]
fn an_error_inside_the_variable_visit_keeps_its_cause() {
    use mp_optim::Optimizer as _;
    use std::error::Error as _;
    let mut layer = BrokenVisit;
    let mut opt = Adam::new(1e-3).unwrap();
    let err = opt
        .apply_gradients(&mut mp_layers::ModelVars(&mut layer))
        .unwrap_err();
    assert!(matches!(err, mp_optim::Error::Variables(_)), "{err:?}");
    let source = err.source().expect("a source");
    let layer_err = source
        .downcast_ref::<Error>()
        .expect("the layer's own error");
    assert!(matches!(layer_err, Error::NotBuilt { .. }), "{layer_err:?}");
}
