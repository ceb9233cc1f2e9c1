//! End to end on real MNIST: one epoch of a small model under each policy.
//!
//! Needs the data: `cargo xtask data` (with `MP_DATA_DIR` set, or into `~/.cache/mp/mnist`).
//! Without it the test prints why it is skipped, except under `CI=true`, where it fails.

use mp_core::{Float32, MixedBFloat16, MixedFloat16, PolicyKind};
use mp_layers::{
    Dense, FitOptions, Softmax, SparseCategoricalCrossentropy, Trainer, Verbose, model,
};
use mp_optim::RmsProp;
use ndarray::{Array1, Array2};

#[model]
struct Small {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

type Data = ((Array2<f32>, Array1<u8>), (Array2<f32>, Array1<u8>));

fn data() -> Option<Data> {
    let loader = mp_data::mnist::Loader::new().fetch(false).quiet(true);
    let dir = loader
        .dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    match loader.load() {
        Ok(((xtr, ytr), (xte, yte))) => Some((
            (mp_data::mnist::to_features(&xtr), ytr),
            (mp_data::mnist::to_features(&xte), yte),
        )),
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "MNIST is missing under CI ({e}); run `cargo xtask data` first"
            );
            eprintln!("skipped: MNIST not found in {dir} ({e}); run `cargo xtask data`");
            None
        }
    }
}

fn one_epoch<P: PolicyKind>(d: &Data) -> f32 {
    let ((x_train, y_train), (x_test, y_test)) = d;
    let model = Small::<P> {
        hidden: Dense::new(128).relu(),
        logits: Dense::new(10),
        probs: Softmax::new(),
    };
    let mut trainer = Trainer::compile(
        model,
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    let options = FitOptions {
        batch_size: 128,
        epochs: 1,
        seed: 1,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    trainer
        .fit(x_train.view(), y_train.view(), &options)
        .unwrap();
    let scores = trainer
        .evaluate(x_test.view(), y_test.view(), 1000, Verbose::Silent)
        .unwrap();
    eprintln!(
        "{}: test loss {:.4}, test accuracy {:.4}",
        P::POLICY,
        scores.loss,
        scores.accuracy()
    );
    scores.accuracy()
}

#[test]
fn one_epoch_of_mnist_under_every_policy() {
    let Some(d) = data() else { return };
    let f32_acc = one_epoch::<Float32>(&d);
    let bf16_acc = one_epoch::<MixedBFloat16>(&d);
    let f16_acc = one_epoch::<MixedFloat16>(&d);
    for (name, acc) in [
        ("float32", f32_acc),
        ("mixed_bfloat16", bf16_acc),
        ("mixed_float16", f16_acc),
    ] {
        assert!(acc >= 0.90, "{name}: test accuracy {acc} < 0.90");
    }
    assert!(
        (bf16_acc - f32_acc).abs() <= 0.01,
        "mixed_bfloat16 {bf16_acc} vs float32 {f32_acc}"
    );
    assert!(
        (f16_acc - f32_acc).abs() <= 0.01,
        "mixed_float16 {f16_acc} vs float32 {f32_acc}"
    );
}
