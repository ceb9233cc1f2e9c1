//! `predict` keeps each kernel's 16-bit copy between calls, and never serves a stale one: after
//! a training step, `set_weights`, a weights load and a resume, it predicts exactly what a model
//! built afresh with the same weights predicts.

use std::sync::Mutex;

use mp_core::{F32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_kernels::counters::casts;
use mp_layers::checkpoint::{Layout, WeightDtype, load_weights, save_weights_as};
use mp_layers::{
    Checkpointing, Conv2D, Dense, Flatten, Layer, Model, Softmax, SparseCategoricalCrossentropy,
    Trainer, model,
};
use mp_optim::Adam;
use ndarray::{Array1, Array4};

/// The cast counter is per process: every test here holds this.
static COUNTING: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    COUNTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[model]
struct Net {
    conv: Conv2D,
    flatten: Flatten,
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn net<P: PolicyKind>() -> Net<P> {
    let mut m = Net {
        conv: Conv2D::new(3, [3, 3]),
        flatten: Flatten::new(),
        hidden: Dense::new(8).relu(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    m.build(&[5, 5, 1]).unwrap();
    m
}

fn trainer<P: PolicyKind>() -> Trainer<Net<P>, Adam> {
    Trainer::compile(
        net::<P>(),
        Adam::new(0.05).unwrap(),
        SparseCategoricalCrossentropy::new(),
    )
}

fn data(n: usize, seed: u64) -> (Array4<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let x = Array4::from_shape_fn((n, 5, 5, 1), |_| rng.normal());
    let y = Array1::from_shape_fn(n, |i| (i % 3) as u32);
    (x, y)
}

fn bits(a: &ndarray::ArrayD<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

/// What a model built afresh with `t`'s weights predicts: nothing cached.
fn fresh<P: PolicyKind>(t: &mut Trainer<Net<P>, Adam>, x: &Array4<f32>) -> Vec<u32> {
    let weights = t.model_mut().get_weights().unwrap();
    let mut other = trainer::<P>();
    other.model_mut().set_weights(&weights).unwrap();
    bits(&other.predict(x.view(), 16).unwrap())
}

#[test]
fn the_second_predict_casts_no_kernel() {
    let _exclusive = exclusive();
    let (x, _) = data(16, 1);
    let mut t = trainer::<MixedBFloat16>();
    let before = casts();
    let first = t.predict(x.view(), 16).unwrap();
    let first_casts = casts() - before;
    let before = casts();
    let second = t.predict(x.view(), 16).unwrap();
    let second_casts = casts() - before;
    assert_eq!(bits(&first), bits(&second));
    // The three kernels (conv, hidden, logits) were cast by the first call only.
    assert_eq!(
        second_casts + 3,
        first_casts,
        "{first_casts} then {second_casts} casts"
    );
}

#[test]
fn predict_never_serves_stale_kernels() {
    let _exclusive = exclusive();
    fn check<P: PolicyKind>() {
        let name = P::POLICY.name();
        let (x, y) = data(16, 2);
        let mut t = trainer::<P>();
        t.predict(x.view(), 16).unwrap(); // cache the initial kernels

        // 1. A training step.
        let labels: Vec<u32> = y.to_vec();
        let xs = Tensor::<P::Compute>::from_f32(&[16, 5, 5, 1], x.as_slice().unwrap()).unwrap();
        assert!(t.train_step(&xs, &labels).unwrap().0.applied);
        let after_step = bits(&t.predict(x.view(), 16).unwrap());
        assert_eq!(after_step, fresh(&mut t, &x), "{name}: after a step");

        // 2. set_weights, from another model.
        let mut other = trainer::<P>();
        let mut w = other.model_mut().get_weights().unwrap();
        for (_, v) in &mut w {
            let scaled: Vec<f32> = v
                .as_slice()
                .unwrap()
                .iter()
                .map(|a| 0.5 * a + 0.01)
                .collect();
            *v = Tensor::<F32>::from_vec(v.shape(), scaled).unwrap();
        }
        t.model_mut().set_weights(&w).unwrap();
        let after_set = bits(&t.predict(x.view(), 16).unwrap());
        assert_eq!(after_set, fresh(&mut t, &x), "{name}: after set_weights");
        assert_ne!(after_set, after_step);

        // 3. A weights file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        other.train_step(&xs, &labels).unwrap();
        save_weights_as(other.model_mut(), &file, Layout::PyTorch, WeightDtype::F32).unwrap();
        load_weights(t.model_mut(), &file).unwrap();
        let after_load = bits(&t.predict(x.view(), 16).unwrap());
        assert_eq!(after_load, fresh(&mut t, &x), "{name}: after load_weights");
        assert_eq!(after_load, bits(&other.predict(x.view(), 16).unwrap()));

        // 4. A resume.
        let ckpt = dir.path().join("ckpt.safetensors");
        let mut source = trainer::<P>();
        source.train_step(&xs, &labels).unwrap();
        source.train_step(&xs, &labels).unwrap();
        source.save_checkpoint(&ckpt).unwrap();
        let mut resumed = trainer::<P>();
        resumed.predict(x.view(), 16).unwrap(); // cache its initial kernels
        resumed.resume(&ckpt).unwrap();
        let after_resume = bits(&resumed.predict(x.view(), 16).unwrap());
        assert_eq!(
            after_resume,
            bits(&source.predict(x.view(), 16).unwrap()),
            "{name}: resume"
        );
    }
    check::<MixedBFloat16>();
    check::<MixedFloat16>();
}
