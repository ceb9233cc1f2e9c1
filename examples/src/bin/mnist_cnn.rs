//! A residual convolutional network with BatchNormalization on MNIST images, under any policy.
//!
//! ```sh
//! cargo run --release -p examples --bin mnist_cnn -- [--policy mixed_bfloat16] [--epochs 5]
//!     [--batch-size 128] [--seed 0] [--validation-split 0.1] [--train-samples N]
//! ```
//!
//! The network is [`examples::MnistCnn`]; Adam whose learning rate decays from
//! [`examples::CNN_LEARNING_RATE`] to 0 along a cosine over the whole run
//! ([`examples::cnn_learning_rate_schedule`]), and BatchNormalization momentum
//! [`examples::CNN_BN_MOMENTUM`]. The images are
//! `(n, 28, 28, 1)` float32 in `[0, 1]`. Each epoch prints its validation accuracy (with the
//! moving statistics, as `evaluate` uses them); the test accuracy comes from `evaluate`.

use examples::mnist_run::ImageArgs;
use examples::{CNN_LEARNING_RATE, MnistCnn, cnn_learning_rate_schedule};
use mp_core::{PolicyKind, PolicyVisitor};
use mp_layers::{Layer, Model, SparseCategoricalCrossentropy, Trainer};
use mp_optim::Adam;

struct Run(ImageArgs);

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let lead = self.0.lead();
        // Rank 0 alone prints under mpirun.
        macro_rules! println {
            ($($t:tt)*) => { if lead { std::println!($($t)*) } };
        }
        let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
        let (x_train, y_train) = self.0.limit(
            mp_data::mnist::to_images(&x_train),
            mp_data::mnist::to_labels(&y_train),
        );
        let x_test = mp_data::mnist::to_images(&x_test);
        let y_test = mp_data::mnist::to_labels(&y_test);
        println!(
            "x_train: {:?} float32, x_test: {:?}",
            x_train.dim(),
            x_test.dim()
        );
        let mut model = MnistCnn::<P>::issue();
        model.build(&[28, 28, 1])?;
        println!("{}", model.summary());
        let options = &self.0.options;
        let total_steps = options.updates_per_epoch(y_train.len())? * options.epochs;
        let mut trainer = Trainer::compile(
            model,
            Adam::new(CNN_LEARNING_RATE)?,
            SparseCategoricalCrossentropy::new(),
        )
        .with_communicator(self.0.comm.clone())
        .with_learning_rate_schedule(cnn_learning_rate_schedule(total_steps)?)?;
        self.0.fit_and_report(
            &mut trainer,
            (x_train.view(), y_train.view()),
            (x_test.view(), y_test.view()),
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = ImageArgs::from_env()?;
    args.policy.dispatch(Run(args))
}
