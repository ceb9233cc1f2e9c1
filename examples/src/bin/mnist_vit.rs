//! A small Vision Transformer on MNIST under any policy.
//!
//! ```sh
//! cargo run --release -p examples --bin mnist_vit -- [--policy mixed_bfloat16] [--epochs 5]
//!     [--batch-size 128] [--seed 0] [--validation-split 0.1] [--train-samples N]
//! ```
//!
//! The network is [`examples::MnistVit`]: each image as 16 patches of 7x7, Dense(64), a class
//! token and learned positions, 4 pre-LN encoder blocks (4 heads, MLP 128, GELU), LayerNorm, the
//! class token to Dense(10) and a float32 softmax. AdamW (weight decay 0.004 on the kernels, none
//! on biases, normalization, positions and the class token) at
//! [`examples::transformer::VIT_LEARNING_RATE`] with a linear warmup over the first tenth of
//! the updates and a cosine to 0. The test accuracy comes from `evaluate`.

use std::time::Instant;

use examples::transformer::{VIT_LEARNING_RATE, to_patches, vit_learning_rate_schedule};
use examples::{Args, MnistVit};
use mp_core::{Policy, PolicyKind, PolicyVisitor};
use mp_layers::{FitOptions, Layer, Model, SparseCategoricalCrossentropy, Trainer, Verbose};
use mp_optim::AdamW;
use ndarray::{Axis, s};

const OPTIONS: &[&str] = &[
    "policy",
    "batch-size",
    "epochs",
    "validation-split",
    "seed",
    "train-samples",
];

/// Variables AdamW does not decay (substrings of their paths).
pub const NO_DECAY: &[&str] = &["bias", "gamma", "beta", "positions", "class_token"];

struct Run {
    options: FitOptions,
    train_samples: Option<usize>,
}

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
        let images = |x: &ndarray::Array3<u8>| {
            let x = mp_data::mnist::to_images(x);
            to_patches(x.index_axis(Axis(3), 0))
        };
        let mut x_train = images(&x_train);
        let mut y_train = mp_data::mnist::to_labels(&y_train);
        if let Some(n) = self.train_samples {
            let n = n.min(y_train.len());
            x_train = x_train.slice(s![..n, .., ..]).to_owned();
            y_train = y_train.slice(s![..n]).to_owned();
        }
        let x_test = images(&x_test);
        let y_test = mp_data::mnist::to_labels(&y_test);
        println!(
            "x_train: {:?} patches, x_test: {:?}",
            x_train.dim(),
            x_test.dim()
        );
        let mut model = MnistVit::<P>::issue();
        model.build(&[16, 49])?;
        println!("{}", model.summary());
        let total = self.options.updates_per_epoch(y_train.len())? * self.options.epochs;
        let optimizer = AdamW::new(VIT_LEARNING_RATE)?.exclude_from_weight_decay(NO_DECAY);
        let mut trainer = Trainer::compile(model, optimizer, SparseCategoricalCrossentropy::new())
            .with_learning_rate_schedule(vit_learning_rate_schedule(total / 10, total)?)?;
        let started = Instant::now();
        let history = trainer.fit(x_train.view(), y_train.view(), &self.options)?;
        let seconds = started.elapsed().as_secs_f64();
        let scores = trainer.evaluate(
            x_test.view(),
            y_test.view(),
            self.options.batch_size,
            Verbose::Lines,
        )?;
        let val: Vec<String> = history
            .epochs
            .iter()
            .map(|e| e.val_accuracy.map_or("-".into(), |a| format!("{a:.4}")))
            .collect();
        println!("Test loss: {:.4}", scores.loss);
        println!("Test accuracy: {:.4}", scores.accuracy);
        println!(
            "policy {} seed {}: {:.0}s training, validation accuracy per epoch [{}], test \
             accuracy {:.4}",
            P::POLICY,
            self.options.seed,
            seconds,
            val.join(", "),
            scores.accuracy
        );
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(&[])?;
    args.check_known(OPTIONS)?;
    let policy: Policy = match args.raw("policy") {
        Some(p) => p.parse()?,
        None => mp_kernels::calibrate::recommended_policy()?,
    };
    println!("Policy: {policy:#}");
    println!("CPU: {}", mp_kernels::peak::describe_cpu());
    let options = FitOptions {
        batch_size: args.get("batch-size", 128)?,
        epochs: args.get("epochs", 5)?,
        validation_split: args.get("validation-split", 0.1)?,
        seed: args.get("seed", 0)?,
        shuffle: true,
        verbose: Verbose::Auto,
        gradient_accumulation_steps: 1,
    };
    let train_samples = match args.raw("train-samples") {
        Some(_) => Some(args.get("train-samples", 0usize)?),
        None => None,
    };
    policy.dispatch(Run {
        options,
        train_samples,
    })
}
